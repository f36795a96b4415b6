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
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::PersonRegistered,
        EventKind::PersonRenamed,
        EventKind::ContactDetailsChanged,
        EventKind::AddressChanged,
        EventKind::NoteAdded,
        EventKind::PersonTagged,
        EventKind::PersonUntagged,
        EventKind::PersonArchived,
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
        }
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
