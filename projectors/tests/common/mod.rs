//! Helpers the projector tests share.

use std::path::Path;
use std::sync::Arc;

use callisto_avro::events::NoteAdded;
use callisto_avro::{Codec, EmbeddedRegistry, PersonEvent};
use callisto_core::log::{EmbeddedLog, EmbeddedLogOptions, EventLog};
use callisto_core::privacy::EventReader;
use uuid::Uuid;

/// A codec for `topic` over an embedded schema registry in `dir`, and a reader that opens events
/// with an embedded key store there.
pub fn codec_and_reader(dir: &Path, topic: &str) -> (Arc<Codec>, Arc<EventReader>) {
    let registry = Arc::new(EmbeddedRegistry::open(&dir.join("s.redb")).unwrap());
    let codec = Arc::new(Codec::new(registry, topic).unwrap());
    let reader = Arc::new(EventReader::new(codec.clone(), callisto_core::privacy::open_embedded(dir).unwrap()));
    (codec, reader)
}

/// An embedded log in `dir` holding `topic` with `partitions`.
#[allow(dead_code, reason = "the Kafka group test runs on the mock cluster instead")]
pub async fn embedded_log(dir: &Path, topic: &str, partitions: u32) -> Arc<dyn EventLog> {
    let log: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(&dir.join("log.redb"), EmbeddedLogOptions::default()).unwrap());
    log.ensure_topic(topic, partitions).await.unwrap();
    log
}

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
