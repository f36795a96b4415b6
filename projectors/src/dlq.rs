//! The dead-letter topic, `<topic>.dlq`: events a projection could not decode or apply.
//!
//! A dead letter keeps the original key, payload and headers byte for byte, and adds `dlq.*`
//! headers saying which projection failed, where the event came from, and why. Appends carry an
//! idempotency key per (projection, source position), so a worker that crashes after
//! dead-lettering and re-reads the event does not dead-letter it twice.

use callisto_core::log::{AppendRequest, IdempotencyKey, Record};

pub const ERROR: &str = "dlq.error";
pub const PROJECTION: &str = "dlq.projection";
pub const SOURCE_TOPIC: &str = "dlq.source.topic";
pub const SOURCE_PARTITION: &str = "dlq.source.partition";
pub const SOURCE_OFFSET: &str = "dlq.source.offset";
pub const FAILED_AT: &str = "dlq.failed_at";

/// Longest error text kept in a header.
const MAX_ERROR_BYTES: usize = 4096;

pub fn topic_for(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// The append that dead-letters `record` for `projection`.
pub fn dead_letter(record: &Record, projection: &str, error: &str) -> AppendRequest {
    let mut error = error.to_owned();
    if error.len() > MAX_ERROR_BYTES {
        let mut cut = MAX_ERROR_BYTES;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
    }
    let mut headers = record.headers.clone();
    headers.push((ERROR.into(), error.into_bytes()));
    headers.push((PROJECTION.into(), projection.as_bytes().to_vec()));
    headers.push((SOURCE_TOPIC.into(), record.topic.as_bytes().to_vec()));
    headers.push((SOURCE_PARTITION.into(), record.partition.to_string().into_bytes()));
    headers.push((SOURCE_OFFSET.into(), record.offset.to_string().into_bytes()));
    headers.push((FAILED_AT.into(), chrono::Utc::now().to_rfc3339().into_bytes()));
    AppendRequest {
        topic: topic_for(&record.topic),
        key: record.key.clone(),
        payload: record.payload.clone(),
        headers,
        idempotency: Some(IdempotencyKey {
            key: format!("dlq:{projection}:{}:{}:{}", record.topic, record.partition, record.offset),
            fingerprint: [0; 32],
        }),
    }
}
