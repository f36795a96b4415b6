//! Rust event types, one struct per `.avsc` record. Field names and order match the schemas.
//!
//! Every event carries `event_id`, `person_id`, `occurred_at` and `correlation_id`.
//! Timestamps are UTC with microsecond precision (`timestamp-micros`), dates are
//! days since the epoch (`date`).

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::schemas::EventKind;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// The person's data key is destroyed; carries no personal data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonErased {
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    #[serde(with = "uuid_string")]
    pub person_id: Uuid,
    #[serde(with = "timestamp_micros")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
}

/// An event's personal fields, the plaintext of [`SealedPersonalData`] (`PersonalData.avsc`).
/// Only the fields the event carries are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonalData {
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    #[serde(with = "optional_date")]
    pub date_of_birth: Option<NaiveDate>,
    pub address: Option<Address>,
    pub text: Option<String>,
    pub reason: Option<String>,
}

/// The `sealed` field of v2 events: [`PersonalData`] encrypted with the person's data key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedPersonalData {
    pub key_id: String,
    pub algorithm: String,
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
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
    Erased(PersonErased),
}

/// The four fields every event carries, borrowed from whichever variant holds them.
#[derive(Debug, Clone, Copy)]
pub struct EventMeta<'a> {
    pub event_id: Uuid,
    pub person_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: &'a str,
}

/// `$body` evaluated with `$e` bound to the event's own struct, whichever variant holds it: one
/// expression for code that is the same for every kind but needs the concrete type (serde,
/// the shared fields).
macro_rules! with_body {
    ($event:expr, $e:ident => $body:expr) => {
        match $event {
            PersonEvent::Registered($e) => $body,
            PersonEvent::Renamed($e) => $body,
            PersonEvent::ContactChanged($e) => $body,
            PersonEvent::AddressChanged($e) => $body,
            PersonEvent::NoteAdded($e) => $body,
            PersonEvent::Tagged($e) | PersonEvent::Untagged($e) => $body,
            PersonEvent::Archived($e) => $body,
            PersonEvent::Erased($e) => $body,
        }
    };
}
pub(crate) use with_body;

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
            PersonEvent::Erased(_) => EventKind::PersonErased,
        }
    }

    pub fn meta(&self) -> EventMeta<'_> {
        with_body!(self, e => meta_of!(e))
    }

    /// Moves the personal fields out, leaving them blank: empty strings where the schema
    /// requires a value, `None` elsewhere. What remains is safe to write in clear.
    pub fn take_personal(&mut self) -> PersonalData {
        use std::mem::take;
        match self {
            PersonEvent::Registered(e) => PersonalData {
                given_name: Some(take(&mut e.given_name)),
                family_name: Some(take(&mut e.family_name)),
                email: e.email.take(),
                phone: e.phone.take(),
                date_of_birth: e.date_of_birth.take(),
                address: e.address.take(),
                ..PersonalData::default()
            },
            PersonEvent::Renamed(e) => PersonalData {
                given_name: Some(take(&mut e.given_name)),
                family_name: Some(take(&mut e.family_name)),
                ..PersonalData::default()
            },
            PersonEvent::ContactChanged(e) => {
                PersonalData { email: e.email.take(), phone: e.phone.take(), ..PersonalData::default() }
            }
            PersonEvent::AddressChanged(e) => {
                PersonalData { address: Some(take(&mut e.address)), ..PersonalData::default() }
            }
            PersonEvent::NoteAdded(e) => PersonalData { text: Some(take(&mut e.text)), ..PersonalData::default() },
            PersonEvent::Archived(e) => PersonalData { reason: e.reason.take(), ..PersonalData::default() },
            PersonEvent::Tagged(_) | PersonEvent::Untagged(_) | PersonEvent::Erased(_) => PersonalData::default(),
        }
    }

    /// Puts personal fields taken by [`take_personal`](Self::take_personal) back.
    pub fn restore_personal(&mut self, data: PersonalData) {
        match self {
            PersonEvent::Registered(e) => {
                e.given_name = data.given_name.unwrap_or_default();
                e.family_name = data.family_name.unwrap_or_default();
                e.email = data.email;
                e.phone = data.phone;
                e.date_of_birth = data.date_of_birth;
                e.address = data.address;
            }
            PersonEvent::Renamed(e) => {
                e.given_name = data.given_name.unwrap_or_default();
                e.family_name = data.family_name.unwrap_or_default();
            }
            PersonEvent::ContactChanged(e) => {
                e.email = data.email;
                e.phone = data.phone;
            }
            PersonEvent::AddressChanged(e) => e.address = data.address.unwrap_or_default(),
            PersonEvent::NoteAdded(e) => e.text = data.text.unwrap_or_default(),
            PersonEvent::Archived(e) => e.reason = data.reason,
            PersonEvent::Tagged(_) | PersonEvent::Untagged(_) | PersonEvent::Erased(_) => {}
        }
    }

    /// Whether this kind of event carries personal fields (and so a `sealed` field from v2).
    pub fn carries_personal_data(&self) -> bool {
        self.kind().carries_personal_data()
    }
}

/// Avro `{"type": "string", "logicalType": "uuid"}` ⇄ `Uuid`, in the hyphenated form
/// other Avro implementations write. (apache-avro's serializer is not human-readable, so
/// `Uuid`'s own impl would write 16 raw bytes.)
pub mod uuid_string {
    use serde::{Deserializer, Serializer, de::Error};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    /// apache-avro (not human-readable) is asked for bytes: it hands a decoded `uuid` over as
    /// its 16 bytes that way, where asking for a string would have it format the id as text for
    /// us to parse again, with an allocation for each id of each event. Text formats (JSON) are
    /// asked for the text, so 16 characters there are never taken for raw bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        if d.is_human_readable() { d.deserialize_str(UuidVisitor) } else { d.deserialize_bytes(UuidVisitor) }
    }

    struct UuidVisitor;

    impl serde::de::Visitor<'_> for UuidVisitor {
        type Value = Uuid;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a UUID, as text or as 16 bytes")
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<Uuid, E> {
            Uuid::parse_str(text).map_err(E::custom)
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Uuid, E> {
            match <[u8; 16]>::try_from(bytes) {
                Ok(raw) => Ok(Uuid::from_bytes(raw)),
                Err(_) => Uuid::try_parse_ascii(bytes).map_err(E::custom),
            }
        }
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
