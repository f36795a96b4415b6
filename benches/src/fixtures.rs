//! Sample events for benchmarks.

use callisto_avro::PersonEvent;
use callisto_avro::events::{NoteAdded, PersonRegistered};
use chrono::Utc;
use uuid::Uuid;

pub fn registered() -> PersonEvent {
    PersonEvent::Registered(PersonRegistered {
        event_id: Uuid::new_v4(),
        person_id: Uuid::new_v4(),
        occurred_at: Utc::now(),
        correlation_id: Uuid::new_v4().to_string(),
        given_name: "Ada".into(),
        family_name: "Lovelace".into(),
        email: Some("ada@example.org".into()),
        phone: None,
        date_of_birth: None,
        address: None,
        tags: vec!["vip".into(), "math".into()],
    })
}

pub fn note(words: usize) -> PersonEvent {
    PersonEvent::NoteAdded(NoteAdded {
        event_id: Uuid::new_v4(),
        person_id: Uuid::new_v4(),
        occurred_at: Utc::now(),
        correlation_id: Uuid::new_v4().to_string(),
        note_id: Uuid::new_v4(),
        text: (0..words).map(|i| format!("word{i}")).collect::<Vec<_>>().join(" "),
    })
}
