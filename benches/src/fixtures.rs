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

/// `PersonRegistered` for a given id, with a tag.
pub fn registered_as(person_id: Uuid) -> PersonEvent {
    let PersonEvent::Registered(mut e) = registered() else { unreachable!("registered() builds a registration") };
    e.person_id = person_id;
    PersonEvent::Registered(e)
}

/// The `n`th note of a person: a dozen words, a few of them varying, like real notes.
pub fn note_for(person_id: Uuid, n: u64) -> PersonEvent {
    const WORDS: [&str; 12] = [
        "call", "about", "renewal", "engine", "invoice", "meeting", "follow", "up", "contract", "review", "budget",
        "quarter",
    ];
    let text = (0..12).map(|i| WORDS[((n as usize) * 7 + i * 5) % WORDS.len()]).collect::<Vec<_>>().join(" ");
    PersonEvent::NoteAdded(NoteAdded {
        event_id: Uuid::new_v4(),
        person_id,
        occurred_at: Utc::now(),
        correlation_id: format!("bench-{n}"),
        note_id: Uuid::new_v4(),
        text: format!("{text} ref{n}"),
    })
}

/// A stored person document as JSON: the size the read store writes per event.
pub fn document_bytes() -> Vec<u8> {
    use callisto_core::readmodel::{ProjectedEvent, fold};
    let event = ProjectedEvent { partition: 0, offset: 0, timestamp_ms: 0, event: registered() };
    let doc = fold(None, &event).expect("a registration makes a document");
    serde_json::to_vec(&doc).expect("documents serialize")
}
