//! # callisto — the one binary, and the wiring behind it
//!
//! The binary stays thin: it parses the command line and calls into [`services`], which opens
//! the backends and composes the service crates. Tests start services the same way.
//!
//! ## Layout
//! - [`backends`]: opens the embedded stand-ins (log, registry, read models) under the data dir.
//! - [`export`]: `callisto export`, JSON Lines or Avro out of the log, on the replay API.
//! - [`services`]: one function per subcommand that runs a service, and [`services::Dev`], the
//!   whole backbone in one process.
//! - `main.rs`: the command line.

pub mod backends;
pub mod export;
pub mod services;
