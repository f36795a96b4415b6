//! # callisto-core — ports, adapters and the plumbing every service shares
//!
//! ## Layout
//! - [`log`]: the [`EventLog`](log::EventLog) port and its adapters: embedded (redb) and Kafka.
//! - [`partition`]: Kafka's murmur2 key → partition function.
//! - [`readmodel`]: person documents, timelines and search; the `Projection`, `ReadStore` and
//!   `SearchIndex` ports with their embedded adapters (redb, tantivy) and production ones
//!   (MongoDB, Elasticsearch).
//! - [`privacy`]: crypto-shredding: personal fields sealed with per-person data keys, the
//!   `KeyStore` port (embedded, MongoDB) and the `Keyring` services seal and open events with.
//! - [`rules`]: input rules (lengths, patterns) shared by the handlers and the OpenAPI
//!   document, so what is enforced is what is declared.
//! - [`group_commit`]: one writer thread, one transaction and one fsync for many writers of an
//!   embedded store.
//! - [`resilience`]: timeout, retries and circuit breaker around read-model server calls.
//! - [`auth`]: API keys, bearer JWTs, scopes, rate limits and the audit trail: the guard in
//!   front of every route.
//! - [`tls`]: rustls server configuration, reloaded when the certificate files change.
//! - [`config`]: layered settings (defaults, file, `CALLISTO__…` environment).
//! - [`telemetry`]: JSON logs and the Prometheus recorder, set up in one place.
//! - [`http`]: `application/problem+json` errors and the JSON/query extractors that produce them.
//! - [`replay`]: a stream of decoded events from a position (offset or time), for batch jobs.
//! - [`allocator`]: jemalloc's settings, applied by the binaries before they do any work.
//! - [`priority`]: where the API shares the process, a lower scheduling priority for the
//!   search index's threads, so commands, reads and the documents projection get the cores first.
//! - [`token`]: consistency tokens, `partition:offset`, handed to clients for read-your-writes.

pub mod allocator;
pub mod auth;
pub mod config;
pub mod group_commit;
pub mod http;
pub mod log;
pub mod partition;
pub mod priority;
pub mod privacy;
pub mod readmodel;
pub mod replay;
pub mod resilience;
pub mod rules;
pub mod telemetry;
pub mod tls;
pub mod token;
