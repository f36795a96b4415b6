//! The `EventLog` port: a partitioned, append-only log with Kafka's semantics.
//!
//! Offsets are per partition and dense from 0. Timestamps are log-append times in milliseconds,
//! never decreasing within a partition, so offset lookup by time is well defined.

pub mod embedded;
pub mod kafka;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use embedded::{EmbeddedLog, EmbeddedLogOptions};
pub use kafka::{KafkaLog, KafkaLogOptions};

/// A Kafka-style record header: a name and raw bytes.
pub type Header = (String, Vec<u8>);

/// Deduplicates application retries: a second append under the same key returns the first
/// append's position instead of writing again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    /// A digest of the request; the same key with a different request is a conflict.
    pub fingerprint: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<Header>,
    pub idempotency: Option<IdempotencyKey>,
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    /// True when the idempotency key had been seen: nothing new was written.
    pub replayed: bool,
}

/// A record as read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Vec<u8>,
    pub headers: Vec<Header>,
    pub payload: Vec<u8>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log cannot take or serve requests right now; callers answer 503 and retry later.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    #[error("event log did not answer within {0:?}")]
    Timeout(Duration),
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("topic {topic:?} has no partition {partition}")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("topic {topic:?} has {actual} partitions, not {requested}; migrate to a new topic instead")]
    PartitionCountMismatch { topic: String, actual: u32, requested: u32 },
    #[error("idempotency key {0:?} was already used for a different request")]
    IdempotencyConflict(String),
    /// The request needs something this log does not offer.
    #[error("{0}")]
    Unsupported(String),
}

impl LogError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, LogError::Unavailable(_) | LogError::Timeout(_))
    }
}

#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Creates `topic` with `partitions` partitions, or checks that it has that many.
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError>;

    /// The partition count of `topic`.
    async fn partitions(&self, topic: &str) -> Result<u32, LogError>;

    /// Appends one record; durable when this returns `Ok`.
    async fn append(&self, request: AppendRequest) -> Result<Appended, LogError>;

    /// Reads up to `max_records` records of one partition starting at `from`. When none are
    /// there yet it waits up to `max_wait` for some (a Kafka fetch's long poll) and may return
    /// an empty batch.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Vec<Record>, LogError>;

    /// The next offset to be written, per partition (Kafka's high watermark).
    async fn end_offsets(&self, topic: &str) -> Result<Vec<u64>, LogError>;

    /// Per partition, the first offset whose timestamp is at or after `timestamp_ms`, or `None`
    /// when every record is older (Kafka's `offsetsForTimes`).
    async fn offsets_for_timestamp(&self, topic: &str, timestamp_ms: i64) -> Result<Vec<Option<u64>>, LogError>;

    /// Stores a consumer group's next offsets to read, as (partition, offset).
    async fn commit_offsets(&self, group: &str, topic: &str, offsets: &[(u32, u64)]) -> Result<(), LogError>;

    /// A consumer group's committed offsets, as (partition, offset).
    async fn committed_offsets(&self, group: &str, topic: &str) -> Result<Vec<(u32, u64)>, LogError>;

    /// Deletes a partition's records below `before` (Kafka's `DeleteRecords`): what `dlq purge`
    /// does to the dead-letter topic. Offsets are never reused.
    async fn delete_records(&self, topic: &str, partition: u32, before: u64) -> Result<(), LogError>;

    /// Whether the log can take appends now; backs `/readyz`.
    async fn health(&self) -> Result<(), LogError>;
}
