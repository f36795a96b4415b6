//! Rust event types, one struct per `.avsc` record. Field names and order match the schemas.
//!
//! Every event carries `event_id`, `person_id`, `occurred_at` and `correlation_id`.
//! Timestamps are UTC with microsecond precision (`timestamp-micros`), dates are
//! days since the epoch (`date`).

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::schemas::EventKind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postcode: String,
    pub country: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonRegistered {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    #[serde(with = "uuid_string")]
    pub person_id: Uuid,
    #[serde(with = "timestamp_micros")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    pub given_name: String,
    pub family_name: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    #[serde(with = "optional_date")]
    pub date_of_birth: Option<NaiveDate>,
    pub address: Option<Address>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonRenamed {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    #[serde(with = "uuid_string")]
    pub person_id: Uuid,
    #[serde(with = "timestamp_micros")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    pub given_name: String,
    pub family_name: String,
}

/// A `None` field was left unchanged by the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactDetailsChanged {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    #[serde(with = "uuid_string")]
    pub person_id: Uuid,
    #[serde(with = "timestamp_micros")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    pub email: Option<String>,
    pub phone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressChanged {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    #[serde(with = "uuid_string")]
    pub person_id: Uuid,
    #[serde(with = "timestamp_micros")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    pub address: Address,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoteAdded {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    #[serde(with = "uuid_string")]
    pub person_id: Uuid,
    #[serde(with = "timestamp_micros")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    #[serde(with = "uuid_string")]
    pub note_id: Uuid,
    pub text: String,
}

/// Shared by [`PersonEvent::Tagged`] and [`PersonEvent::Untagged`]: both records have this shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagChanged {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    #[serde(with = "uuid_string")]
    pub person_id: Uuid,
    #[serde(with = "timestamp_micros")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    pub tag: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonArchived {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    #[serde(with = "uuid_string")]
    pub person_id: Uuid,
    #[serde(with = "timestamp_micros")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    pub reason: Option<String>,
}

/// Every event of the person topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersonEvent {
    Registered(PersonRegistered),
    Renamed(PersonRenamed),
    ContactChanged(ContactDetailsChanged),
    AddressChanged(AddressChanged),
    NoteAdded(NoteAdded),
    Tagged(TagChanged),
    Untagged(TagChanged),
    Archived(PersonArchived),
}

/// The four fields every event carries, borrowed from whichever variant holds them.
#[derive(Debug, Clone, Copy)]
pub struct EventMeta<'a> {
    pub event_id: Uuid,
    pub person_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: &'a str,
}

macro_rules! meta_of {
    ($e:expr) => {
        EventMeta {
            event_id: $e.event_id,
            person_id: $e.person_id,
            occurred_at: $e.occurred_at,
            correlation_id: &$e.correlation_id,
        }
    };
}

impl PersonEvent {
    pub fn kind(&self) -> EventKind {
        match self {
            PersonEvent::Registered(_) => EventKind::PersonRegistered,
            PersonEvent::Renamed(_) => EventKind::PersonRenamed,
            PersonEvent::ContactChanged(_) => EventKind::ContactDetailsChanged,
            PersonEvent::AddressChanged(_) => EventKind::AddressChanged,
            PersonEvent::NoteAdded(_) => EventKind::NoteAdded,
            PersonEvent::Tagged(_) => EventKind::PersonTagged,
            PersonEvent::Untagged(_) => EventKind::PersonUntagged,
            PersonEvent::Archived(_) => EventKind::PersonArchived,
        }
    }

    pub fn meta(&self) -> EventMeta<'_> {
        match self {
            PersonEvent::Registered(e) => meta_of!(e),
            PersonEvent::Renamed(e) => meta_of!(e),
            PersonEvent::ContactChanged(e) => meta_of!(e),
            PersonEvent::AddressChanged(e) => meta_of!(e),
            PersonEvent::NoteAdded(e) => meta_of!(e),
            PersonEvent::Tagged(e) | PersonEvent::Untagged(e) => meta_of!(e),
            PersonEvent::Archived(e) => meta_of!(e),
        }
    }
}

/// Avro `{"type": "string", "logicalType": "uuid"}` ⇄ `Uuid`, in the hyphenated form
/// other Avro implementations write. (apache-avro's serializer is not human-readable, so
/// `Uuid`'s own impl would write 16 raw bytes.)
pub mod uuid_string {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        let text = String::deserialize(d)?;
        Uuid::parse_str(&text).map_err(D::Error::custom)
    }
}

/// Avro `timestamp-micros` ⇄ `DateTime<Utc>`.
pub mod timestamp_micros {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(t.timestamp_micros())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let micros = i64::deserialize(d)?;
        DateTime::from_timestamp_micros(micros).ok_or_else(|| D::Error::custom("timestamp out of range"))
    }
}

/// Avro `["null", {"type": "int", "logicalType": "date"}]` ⇄ `Option<NaiveDate>`.
pub mod optional_date {
    use chrono::{Days, NaiveDate};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    const EPOCH: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid epoch");

    pub fn serialize<S: Serializer>(d: &Option<NaiveDate>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => {
                let days =
                    i32::try_from(d.signed_duration_since(EPOCH).num_days()).map_err(serde::ser::Error::custom)?;
                s.serialize_some(&days)
            }
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NaiveDate>, D::Error> {
        let Some(days) = Option::<i32>::deserialize(d)? else {
            return Ok(None);
        };
        let date = if days >= 0 {
            EPOCH.checked_add_days(Days::new(days as u64))
        } else {
            EPOCH.checked_sub_days(Days::new(days.unsigned_abs() as u64))
        };
        date.map(Some).ok_or_else(|| D::Error::custom("date out of range"))
    }
}
