//! The Confluent wire format: `0x00`, a 4-byte big-endian schema id, then the Avro binary body.
//!
//! Decoding uses Avro schema resolution with the writer's schema (looked up by id) and this
//! build's schema as the reader, so events written by older or newer compatible schema versions
//! decode into today's types.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::{Schema, from_avro_datum, from_value, to_avro_datum, to_value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::events::PersonEvent;
use crate::registry::{RegistryError, SchemaRegistry};
use crate::schemas::EventKind;

/// The first byte of every Confluent-framed payload.
pub const MAGIC_BYTE: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("payload is {0} bytes, shorter than the 5-byte wire-format header")]
    TooShort(usize),
    #[error("payload starts with byte {0:#04x}, not the wire-format magic byte 0")]
    BadMagic(u8),
    #[error("schema id {id} names record {name:?}, which is not a person event")]
    UnknownRecord { id: u32, name: String },
    #[error("avro body does not match its schema: {0}")]
    Avro(String),
    #[error("{0} trailing bytes after the avro body")]
    TrailingBytes(usize),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

fn avro_err<E: std::fmt::Display>(e: E) -> CodecError {
    CodecError::Avro(e.to_string())
}

/// Reads the schema id of a framed payload without decoding the body.
pub fn schema_id(bytes: &[u8]) -> Result<u32, CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[0] != MAGIC_BYTE {
        return Err(CodecError::BadMagic(bytes[0]));
    }
    Ok(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]))
}

/// Encodes and decodes [`PersonEvent`]s for one topic.
pub struct Codec {
    registry: Arc<dyn SchemaRegistry>,
    writer_ids: HashMap<EventKind, u32>,
    /// Writer schemas seen so far, by id, with the event kind their record name maps to.
    known: RwLock<HashMap<u32, (EventKind, Arc<Schema>)>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("writer_ids", &self.writer_ids).finish_non_exhaustive()
    }
}

impl Codec {
    /// Registers this build's schemas for `topic` (Confluent `TopicRecordNameStrategy`) and
    /// caches their ids.
    pub fn new(registry: Arc<dyn SchemaRegistry>, topic: &str) -> Result<Self, CodecError> {
        let mut writer_ids = HashMap::new();
        let mut known = HashMap::new();
        for kind in EventKind::ALL {
            let schema = kind.schema();
            let id = registry.register(&kind.subject(topic), schema)?;
            writer_ids.insert(kind, id);
            known.insert(id, (kind, Arc::new(schema.clone())));
        }
        Ok(Self { registry, writer_ids, known: RwLock::new(known) })
    }

    /// The id this build writes `kind` with.
    pub fn writer_id(&self, kind: EventKind) -> u32 {
        self.writer_ids[&kind]
    }

    pub fn encode(&self, event: &PersonEvent) -> Result<Vec<u8>, CodecError> {
        match event {
            PersonEvent::Registered(e) => self.encode_record(EventKind::PersonRegistered, e),
            PersonEvent::Renamed(e) => self.encode_record(EventKind::PersonRenamed, e),
            PersonEvent::ContactChanged(e) => self.encode_record(EventKind::ContactDetailsChanged, e),
            PersonEvent::AddressChanged(e) => self.encode_record(EventKind::AddressChanged, e),
            PersonEvent::NoteAdded(e) => self.encode_record(EventKind::NoteAdded, e),
            PersonEvent::Tagged(e) => self.encode_record(EventKind::PersonTagged, e),
            PersonEvent::Untagged(e) => self.encode_record(EventKind::PersonUntagged, e),
            PersonEvent::Archived(e) => self.encode_record(EventKind::PersonArchived, e),
        }
    }

    fn encode_record<T: Serialize>(&self, kind: EventKind, record: &T) -> Result<Vec<u8>, CodecError> {
        let schema = kind.schema();
        let value = to_value(record).map_err(avro_err)?.resolve(schema).map_err(avro_err)?;
        let body = to_avro_datum(schema, value).map_err(avro_err)?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.push(MAGIC_BYTE);
        out.extend_from_slice(&self.writer_id(kind).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Which kind and writer schema `id` stands for, asking the registry for ids not seen yet.
    fn writer_schema(&self, id: u32) -> Result<(EventKind, Arc<Schema>), CodecError> {
        if let Some(found) = self.known.read().expect("codec cache poisoned").get(&id) {
            return Ok(found.clone());
        }
        let schema = self.registry.schema_by_id(id)?;
        let name = match schema.as_ref() {
            Schema::Record(record) => record.name.fullname(None),
            other => format!("{other:?}"),
        };
        let kind = EventKind::from_name(&name).ok_or(CodecError::UnknownRecord { id, name })?;
        self.known.write().expect("codec cache poisoned").insert(id, (kind, schema.clone()));
        Ok((kind, schema))
    }

    /// Decodes to a generic Avro value in this build's schema for its kind (for re-encoding, as
    /// `export --format avro` does).
    pub fn decode_value(&self, bytes: &[u8]) -> Result<(EventKind, apache_avro::types::Value), CodecError> {
        let id = schema_id(bytes)?;
        let (kind, writer) = self.writer_schema(id)?;
        let mut body = &bytes[HEADER_LEN..];
        let value = from_avro_datum(&writer, &mut body, Some(kind.schema())).map_err(avro_err)?;
        if !body.is_empty() {
            return Err(CodecError::TrailingBytes(body.len()));
        }
        Ok((kind, value))
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<PersonEvent, CodecError> {
        let (kind, value) = self.decode_value(bytes)?;
        fn typed<T: DeserializeOwned>(value: &apache_avro::types::Value) -> Result<T, CodecError> {
            from_value(value).map_err(avro_err)
        }
        Ok(match kind {
            EventKind::PersonRegistered => PersonEvent::Registered(typed(&value)?),
            EventKind::PersonRenamed => PersonEvent::Renamed(typed(&value)?),
            EventKind::ContactDetailsChanged => PersonEvent::ContactChanged(typed(&value)?),
            EventKind::AddressChanged => PersonEvent::AddressChanged(typed(&value)?),
            EventKind::NoteAdded => PersonEvent::NoteAdded(typed(&value)?),
            EventKind::PersonTagged => PersonEvent::Tagged(typed(&value)?),
            EventKind::PersonUntagged => PersonEvent::Untagged(typed(&value)?),
            EventKind::PersonArchived => PersonEvent::Archived(typed(&value)?),
        })
    }
}
