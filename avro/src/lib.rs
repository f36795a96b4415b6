//! # callisto-avro — the event contract
//!
//! The `.avsc` files under `schemas/` are the source of truth for every event Callisto writes.
//! Everything else in this crate follows from them.
//!
//! ## Layout
//! - [`schemas`]: the schemas compiled into the binary, one [`EventKind`] per record, and the
//!   [`DatumReader`](schemas::DatumReader) that decodes with a schema resolved once.
//! - [`events`]: the Rust event types, one struct per schema, and the [`PersonEvent`] sum.
//! - [`codec`]: Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary).
//! - [`registry`]: the [`SchemaRegistry`] port and the embedded, persistent registry used when
//!   no registry URL is configured.
//! - [`confluent`]: a Confluent-compatible Schema Registry over HTTP
//!   (`schema_registry_converter`), for when a registry URL is configured.
//! - [`compat`]: the schema-evolution check against released schema versions.

pub mod codec;
pub mod compat;
pub mod confluent;
pub mod events;
pub mod registry;
pub mod schemas;

pub use codec::{Codec, CodecError};
pub use confluent::{ConfluentOptions, ConfluentRegistry};
pub use events::{Address, PersonEvent};
pub use registry::{EmbeddedRegistry, RegistryError, SchemaRegistry};
pub use schemas::EventKind;
