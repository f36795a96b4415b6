//! The schemas compiled into the binary, and the event kinds they define.

use std::sync::OnceLock;

use apache_avro::Schema;

/// Namespace shared by every person event record.
pub const NAMESPACE: &str = "io.callisto.person";

/// One variant per Avro record written to the person topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    PersonRegistered,
    PersonRenamed,
    ContactDetailsChanged,
    AddressChanged,
    NoteAdded,
    PersonTagged,
    PersonUntagged,
    PersonArchived,
    PersonErased,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::PersonRegistered,
        EventKind::PersonRenamed,
        EventKind::ContactDetailsChanged,
        EventKind::AddressChanged,
        EventKind::NoteAdded,
        EventKind::PersonTagged,
        EventKind::PersonUntagged,
        EventKind::PersonArchived,
        EventKind::PersonErased,
    ];

    /// The record's short name, also used as the `event_type` header and metric label.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::PersonRegistered => "PersonRegistered",
            EventKind::PersonRenamed => "PersonRenamed",
            EventKind::ContactDetailsChanged => "ContactDetailsChanged",
            EventKind::AddressChanged => "AddressChanged",
            EventKind::NoteAdded => "NoteAdded",
            EventKind::PersonTagged => "PersonTagged",
            EventKind::PersonUntagged => "PersonUntagged",
            EventKind::PersonArchived => "PersonArchived",
            EventKind::PersonErased => "PersonErased",
        }
    }

    /// Whether records of this kind carry personal fields, sealed from schema v2 on.
    pub fn carries_personal_data(self) -> bool {
        !matches!(self, EventKind::PersonTagged | EventKind::PersonUntagged | EventKind::PersonErased)
    }

    /// The record's full name, as a Confluent `RecordNameStrategy` subject uses it.
    pub fn full_name(self) -> String {
        format!("{NAMESPACE}.{}", self.name())
    }

    pub fn from_name(name: &str) -> Option<EventKind> {
        let short = name.strip_prefix(NAMESPACE).and_then(|s| s.strip_prefix('.')).unwrap_or(name);
        EventKind::ALL.into_iter().find(|k| k.name() == short)
    }

    /// The `.avsc` text shipped with this build.
    pub fn schema_text(self) -> &'static str {
        match self {
            EventKind::PersonRegistered => include_str!("../schemas/PersonRegistered.avsc"),
            EventKind::PersonRenamed => include_str!("../schemas/PersonRenamed.avsc"),
            EventKind::ContactDetailsChanged => {
                include_str!("../schemas/ContactDetailsChanged.avsc")
            }
            EventKind::AddressChanged => include_str!("../schemas/AddressChanged.avsc"),
            EventKind::NoteAdded => include_str!("../schemas/NoteAdded.avsc"),
            EventKind::PersonTagged => include_str!("../schemas/PersonTagged.avsc"),
            EventKind::PersonUntagged => include_str!("../schemas/PersonUntagged.avsc"),
            EventKind::PersonArchived => include_str!("../schemas/PersonArchived.avsc"),
            EventKind::PersonErased => include_str!("../schemas/PersonErased.avsc"),
        }
    }

    /// The parsed schema; parsed once per process.
    pub fn schema(self) -> &'static Schema {
        static PARSED: OnceLock<Vec<Schema>> = OnceLock::new();
        let all = PARSED.get_or_init(|| {
            EventKind::ALL
                .iter()
                .map(|k| {
                    Schema::parse_str(k.schema_text())
                        .unwrap_or_else(|e| panic!("built-in schema {} does not parse: {e}", k.name()))
                })
                .collect()
        });
        &all[self as usize]
    }

    /// Subject under which the schema is registered: Confluent's `TopicRecordNameStrategy`,
    /// because one topic carries several record types.
    pub fn subject(self, topic: &str) -> String {
        format!("{topic}-{}", self.full_name())
    }
}

/// Decodes Avro binary datums written with one schema, its named types resolved once.
/// apache-avro's `from_avro_datum` resolves them again for every datum it decodes, which in a
/// rebuild's profile cost more than the decryption of the personal data it carried.
pub struct DatumReader {
    reader: apache_avro::GenericSingleObjectReader,
}

/// A datum is read without the single-object header: the Confluent framing (or the sealed
/// field) around it already names the schema.
struct NoHeader;

impl apache_avro::headers::HeaderBuilder for NoHeader {
    fn build_header(&self) -> Vec<u8> {
        Vec::new()
    }
}

impl DatumReader {
    pub fn new(schema: Schema) -> apache_avro::AvroResult<Self> {
        Ok(Self { reader: apache_avro::GenericSingleObjectReader::new_with_header_builder(schema, NoHeader)? })
    }

    /// Decodes one datum from the front of `body`, leaving what follows it.
    pub fn read(&self, body: &mut &[u8]) -> apache_avro::AvroResult<apache_avro::types::Value> {
        self.reader.read_value(body)
    }
}

/// A [`DatumReader`] for [`personal_data_schema`].
pub fn personal_data_reader() -> &'static DatumReader {
    static READER: OnceLock<DatumReader> = OnceLock::new();
    READER.get_or_init(|| DatumReader::new(personal_data_schema().clone()).expect("PersonalData.avsc resolves"))
}

/// The schema of the plaintext inside a `sealed` field.
pub fn personal_data_schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::parse_str(include_str!("../schemas/PersonalData.avsc")).expect("PersonalData.avsc parses")
    })
}

/// The record an `export --format avro` file holds: an event's position in the log and the
/// event itself, as a union of every event record in [`EventKind::ALL`] order.
pub fn export_schema() -> &'static apache_avro::Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut defined = std::collections::HashSet::new();
        let events: Vec<serde_json::Value> = EventKind::ALL
            .iter()
            .map(|kind| {
                let mut json: serde_json::Value = serde_json::from_str(kind.schema_text()).expect("schema is JSON");
                dedupe_named_types(&mut json, &mut defined);
                json
            })
            .collect();
        let schema = serde_json::json!({
            "type": "record",
            "name": "ExportedEvent",
            "namespace": "io.callisto.export",
            "doc": "One event of a Callisto topic with its log position, as written by callisto export.",
            "fields": [
                {"name": "topic", "type": "string"},
                {"name": "partition", "type": "int"},
                {"name": "offset", "type": "long"},
                {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                {"name": "key", "type": "string"},
                {"name": "event", "type": events},
                {"name": "erased", "type": "boolean", "default": false,
                 "doc": "The person was erased: the event's personal fields are blank and its sealed field is dropped."}
            ]
        });
        Schema::parse(&schema).expect("export schema parses")
    })
}

/// An Avro schema may define a named type once; later uses must refer to it by full name.
fn dedupe_named_types(json: &mut serde_json::Value, defined: &mut std::collections::HashSet<String>) {
    match json {
        serde_json::Value::Object(map) => {
            let is_named = matches!(map.get("type").and_then(|t| t.as_str()), Some("record" | "enum" | "fixed"));
            if is_named && map.get("name").is_some() {
                let name = map["name"].as_str().unwrap_or_default().to_owned();
                let full = if name.contains('.') { name } else { format!("{NAMESPACE}.{name}") };
                if !defined.insert(full.clone()) {
                    *json = serde_json::Value::String(full);
                    return;
                }
            }
            for value in map.values_mut() {
                dedupe_named_types(value, defined);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| dedupe_named_types(v, defined)),
        _ => {}
    }
}
