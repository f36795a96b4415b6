//! The Confluent wire format: `0x00`, a 4-byte big-endian schema id, then the Avro binary body.
//!
//! Decoding uses Avro schema resolution with the writer's schema (looked up by id) and this
//! build's schema as the reader, so events written by older or newer compatible schema versions
//! decode into today's types.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::{Schema, from_value, to_value, write_avro_datum_ref};
use serde::de::DeserializeOwned;

use crate::events::{PersonEvent, SealedPersonalData, with_body};
use crate::registry::{RegistryError, SchemaRegistry};
use crate::schemas::{DatumReader, EventKind};

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
    /// Readers of the writer schemas seen so far, by id, with the event kind their record name
    /// maps to.
    known: RwLock<HashMap<u32, (EventKind, Arc<DatumReader>)>>,
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
            known.insert(id, (kind, Arc::new(DatumReader::new(schema.clone()).map_err(avro_err)?)));
        }
        Ok(Self { registry, writer_ids, known: RwLock::new(known) })
    }

    /// The id this build writes `kind` with.
    pub fn writer_id(&self, kind: EventKind) -> u32 {
        self.writer_ids[&kind]
    }

    /// Encodes `event` as it is, personal fields in clear: what events written before schema v2
    /// look like. Services write through [`encode_sealed`](Self::encode_sealed).
    pub fn encode(&self, event: &PersonEvent) -> Result<Vec<u8>, CodecError> {
        self.encode_sealed(event, None)
    }

    /// Encodes `event` with its `sealed` field set. The caller has blanked the personal fields
    /// ([`PersonEvent::take_personal`]) and sealed them into `sealed`.
    pub fn encode_sealed(
        &self,
        event: &PersonEvent,
        sealed: Option<&SealedPersonalData>,
    ) -> Result<Vec<u8>, CodecError> {
        let kind = event.kind();
        check_sealable(kind, sealed)?;
        let mut out = Vec::with_capacity(256);
        out.push(MAGIC_BYTE);
        out.extend_from_slice(&self.writer_id(kind).to_be_bytes());
        // Serialized straight from the event's fields with the schema: building an Avro `Value`
        // and resolving it into the schema first cost several times the encoding itself, on
        // every command. An Avro record is its fields' encodings one after the other, in the
        // schema's order (which the event structs keep), so the `sealed` field, the schema's
        // last, follows the event's own.
        let schema = kind.schema();
        with_body!(event, e => write_avro_datum_ref(schema, e, &mut out)).map_err(avro_err)?;
        if let Some(field) = sealed_field(schema) {
            write_avro_datum_ref(&field.schema, &sealed, &mut out).map_err(avro_err)?;
        }
        Ok(out)
    }

    /// `event` with `sealed` as an Avro value in this build's schema for its kind: the record an
    /// Avro export writes. [`encode_sealed`](Self::encode_sealed) writes the same bytes without
    /// building it.
    pub fn to_value(
        event: &PersonEvent,
        sealed: Option<&SealedPersonalData>,
    ) -> Result<apache_avro::types::Value, CodecError> {
        let kind = event.kind();
        check_sealable(kind, sealed)?;
        let mut value = with_body!(event, e => to_value(e)).map_err(avro_err)?;
        if let Some(sealed) = sealed
            && let apache_avro::types::Value::Record(fields) = &mut value
        {
            fields.push((SEALED_FIELD.to_owned(), to_value(sealed).map_err(avro_err)?));
        }
        value.resolve(kind.schema()).map_err(avro_err)
    }

    /// Which kind `id` stands for, and a reader of its writer schema, asking the registry for
    /// ids not seen yet.
    fn writer(&self, id: u32) -> Result<(EventKind, Arc<DatumReader>), CodecError> {
        if let Some(found) = self.known.read().expect("codec cache poisoned").get(&id) {
            return Ok(found.clone());
        }
        let schema = self.registry.schema_by_id(id)?;
        let name = match schema.as_ref() {
            Schema::Record(record) => record.name.fullname(None),
            other => format!("{other:?}"),
        };
        let kind = EventKind::from_name(&name).ok_or(CodecError::UnknownRecord { id, name })?;
        let reader = Arc::new(DatumReader::new(schema.as_ref().clone()).map_err(avro_err)?);
        self.known.write().expect("codec cache poisoned").insert(id, (kind, reader.clone()));
        Ok((kind, reader))
    }

    /// Decodes to a generic Avro value in this build's schema for its kind (for re-encoding, as
    /// `export --format avro` does).
    pub fn decode_value(&self, bytes: &[u8]) -> Result<(EventKind, apache_avro::types::Value), CodecError> {
        let id = schema_id(bytes)?;
        let (kind, writer) = self.writer(id)?;
        // Written with this build's schema for the kind, the record needs no resolution into
        // it: resolving rebuilds the value field by field, and most records read are this
        // build's own. Records of any other schema (an older producer's) are resolved.
        let reader = (self.writer_ids.get(&kind) != Some(&id)).then(|| kind.schema());
        let mut body = &bytes[HEADER_LEN..];
        let value = writer.read(&mut body).map_err(avro_err)?;
        let value = match reader {
            Some(schema) => value.resolve(schema).map_err(avro_err)?,
            None => value,
        };
        if !body.is_empty() {
            return Err(CodecError::TrailingBytes(body.len()));
        }
        Ok((kind, value))
    }

    /// Decodes the event as written: a sealed event's personal fields are blank. Services read
    /// through [`decode_sealed`](Self::decode_sealed) and open the seal.
    pub fn decode(&self, bytes: &[u8]) -> Result<PersonEvent, CodecError> {
        Ok(self.decode_sealed(bytes)?.0)
    }

    /// Decodes the event and its `sealed` field (absent on events written before v2).
    pub fn decode_sealed(&self, bytes: &[u8]) -> Result<(PersonEvent, Option<SealedPersonalData>), CodecError> {
        let (kind, value) = self.decode_value(bytes)?;
        let sealed = sealed_of(&value)?;
        Ok((Self::typed_event(kind, &value)?, sealed))
    }

    fn typed_event(kind: EventKind, value: &apache_avro::types::Value) -> Result<PersonEvent, CodecError> {
        fn typed<T: DeserializeOwned>(value: &apache_avro::types::Value) -> Result<T, CodecError> {
            from_value(value).map_err(avro_err)
        }
        Ok(match kind {
            EventKind::PersonRegistered => PersonEvent::Registered(typed(value)?),
            EventKind::PersonRenamed => PersonEvent::Renamed(typed(value)?),
            EventKind::ContactDetailsChanged => PersonEvent::ContactChanged(typed(value)?),
            EventKind::AddressChanged => PersonEvent::AddressChanged(typed(value)?),
            EventKind::NoteAdded => PersonEvent::NoteAdded(typed(value)?),
            EventKind::PersonTagged => PersonEvent::Tagged(typed(value)?),
            EventKind::PersonUntagged => PersonEvent::Untagged(typed(value)?),
            EventKind::PersonArchived => PersonEvent::Archived(typed(value)?),
            EventKind::PersonErased => PersonEvent::Erased(typed(value)?),
        })
    }
}

/// The field of v2 records that holds the sealed personal data.
pub const SEALED_FIELD: &str = "sealed";

/// Only kinds that carry personal data have a `sealed` field to set.
fn check_sealable(kind: EventKind, sealed: Option<&SealedPersonalData>) -> Result<(), CodecError> {
    if sealed.is_some() && !kind.carries_personal_data() {
        return Err(CodecError::Avro(format!("{} has no personal fields to seal", kind.name())));
    }
    Ok(())
}

/// The schema's `sealed` field, which kinds that carry personal data have last.
fn sealed_field(schema: &Schema) -> Option<&apache_avro::schema::RecordField> {
    let Schema::Record(record) = schema else { return None };
    record.fields.last().filter(|field| field.name == SEALED_FIELD)
}

/// The `sealed` field of a decoded record, if set.
fn sealed_of(value: &apache_avro::types::Value) -> Result<Option<SealedPersonalData>, CodecError> {
    use apache_avro::types::Value;
    let Value::Record(fields) = value else { return Ok(None) };
    match fields.iter().find(|(name, _)| name == SEALED_FIELD).map(|(_, v)| v) {
        Some(Value::Union(_, inner)) if !matches!(**inner, Value::Null) => {
            from_value(inner).map(Some).map_err(avro_err)
        }
        _ => Ok(None),
    }
}
