//! # callisto-benches — benchmarks measured against same-run baselines
//!
//! Figures here are ratios against a baseline run in the same process, because absolute times
//! on shared machines are noise.
//!
//! ## Layout
//! - `benches/write_path.rs`: the Avro codec against a plain `apache-avro` round-trip, and
//!   murmur2 partitioning.
//! - [`fixtures`]: sample events shared by the benches.

pub mod fixtures;
