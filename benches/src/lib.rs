//! # callisto-benches — figures measured against same-run baselines
//!
//! Absolute times on shared machines are noise, so every figure here comes with a baseline
//! measured in the same run, and is reported as a ratio to it.
//!
//! ## Layout
//! - `benches/write_path.rs`: the Avro codec against plain `apache-avro`, murmur2, and the
//!   embedded log's appends (1, 8, 64 appenders) against raw redb commits.
//! - `benches/read_path.rs`: projector batch apply into the read store and search index
//!   against raw bulk writes into the same stores, and search latency on a large note index.
//! - `src/bin/loadgen.rs`: drives a running `callisto dev` over HTTP (throughput, latency,
//!   freshness, queries, RSS) against its own no-op endpoint, and measures rebuilds.
//! - `src/bin/bench_report.rs`: folds criterion's estimates and the load generator's JSON into
//!   one table.
//! - [`fixtures`]: sample events; [`stats`]: histograms and the report rows.

pub mod fixtures;
pub mod stats;
