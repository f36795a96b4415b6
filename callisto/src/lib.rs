//! # callisto — the one binary, and the wiring behind it
//!
//! The binary stays thin: it parses the command line and calls into [`services`], which opens
//! the backends and composes the service crates. Tests start services the same way.
//!
//! ## Layout
//! - [`admin`]: batch commands through a running `callisto dev`, and its admin API.
//! - [`asyncapi`]: the AsyncAPI 3 document of the person and dead-letter topics.
//! - [`backends`]: opens the embedded stand-ins (log, registry, read models) under the data dir.
//! - [`dlq`]: `callisto dlq`: list, show, re-drive and purge dead letters.
//! - [`export`]: `callisto export`, JSON Lines or Avro out of the log, on the replay API.
//! - [`generations`]: live, previous and building generations of the read models.
//! - [`keys`]: `callisto keys`, and the admin key `callisto dev` creates on first start.
//! - [`replay`]: `callisto replay`, blue/green rebuilds of the read models.
//! - [`services`]: one function per subcommand that runs a service, and [`services::Dev`], the
//!   whole backbone in one process.
//! - `main.rs`: the command line.

pub mod admin;
pub mod asyncapi;
pub mod backends;
pub mod dlq;
pub mod export;
pub mod generations;
pub mod keys;
pub mod replay;
pub mod services;
