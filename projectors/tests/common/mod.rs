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
