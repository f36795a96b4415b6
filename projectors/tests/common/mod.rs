//! Helpers the projector tests share.

use callisto_avro::PersonEvent;
use callisto_avro::events::NoteAdded;
use uuid::Uuid;

/// A note on a new person, so events spread over every partition.
pub fn note(text: &str) -> PersonEvent {
    PersonEvent::NoteAdded(NoteAdded {
        event_id: Uuid::new_v4(),
        person_id: Uuid::new_v4(),
        occurred_at: chrono::Utc::now(),
        correlation_id: "projector-test".into(),
        note_id: Uuid::new_v4(),
        text: text.into(),
    })
}

/// The append of [`note`] with `text` to `topic`, keyed by its person.
pub fn note_append(codec: &callisto_avro::Codec, topic: &str, text: &str) -> callisto_core::log::AppendRequest {
    let event = note(text);
    callisto_core::log::AppendRequest {
        topic: topic.to_owned(),
        key: event.meta().person_id.to_string().into_bytes(),
        payload: codec.encode(&event).unwrap(),
        headers: Vec::new(),
        idempotency: None,
    }
}
