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

/// Words that analysts search for, placed among generated filler words.
const COMMON: [&str; 16] = [
    "call",
    "renewal",
    "meeting",
    "invoice",
    "contract",
    "review",
    "budget",
    "quarter",
    "engine",
    "follow",
    "support",
    "pricing",
    "escalation",
    "onboarding",
    "feedback",
    "security",
];

/// A vocabulary of 2,000 words: the common ones first, then generated ones.
fn word(index: usize) -> String {
    if let Some(w) = COMMON.get(index) {
        return (*w).to_owned();
    }
    const SYLLABLES: [&str; 16] =
        ["ka", "lo", "mi", "ren", "sto", "vel", "dra", "po", "qui", "zen", "tor", "bal", "fin", "gru", "hol", "jex"];
    let mut n = index;
    let mut out = String::new();
    for _ in 0..3 {
        out.push_str(SYLLABLES[n % 16]);
        n /= 16;
    }
    out
}

/// The `n`th note of a person: twelve words drawn with a skewed (Zipf-like) distribution from a
/// 2,000-word vocabulary, so a common term matches a few percent of notes, as in real text.
pub fn note_for(person_id: Uuid, n: u64) -> PersonEvent {
    let mut state = n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from_le_bytes(person_id.as_bytes()[..8].try_into().expect("8 bytes"));
    let words: Vec<String> = (0..12)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state % 10_000) as f64 / 10_000.0;
            word((u * u * 2_000.0) as usize)
        })
        .collect();
    PersonEvent::NoteAdded(NoteAdded {
        event_id: Uuid::new_v4(),
        person_id,
        occurred_at: Utc::now(),
        correlation_id: format!("bench-{n}"),
        note_id: Uuid::new_v4(),
        text: format!("{} ref{n}", words.join(" ")),
    })
}

/// A stored person document as JSON: the size the read store writes per event.
pub fn document_bytes() -> Vec<u8> {
    use callisto_core::readmodel::{ProjectedEvent, fold};
    let event = ProjectedEvent {
        partition: 0,
        offset: 0,
        timestamp_ms: 0,
        event: registered(),
        principal: None,
        erased: false,
    };
    let doc = fold(None, &event).expect("a registration makes a document");
    serde_json::to_vec(&doc).expect("documents serialize")
}
