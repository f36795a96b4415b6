//! The `EventLog` port: a partitioned, append-only log with Kafka's semantics.
//!
//! Offsets are per partition and dense from 0. Timestamps are log-append times in milliseconds,
//! never decreasing within a partition, so offset lookup by time is well defined.
//!
//! Consumers that build state from a topic take partitions through [`EventLog::join_group`]:
//! on Kafka that is a consumer group whose members share the partitions; a log without groups
//! (the embedded one) leaves every partition to the one process that owns it, read through
//! [`PositionFeed`].
//!
//! - [`embedded`]: the log in one redb file, for one process.
//! - [`kafka`]: the log on a Kafka cluster (rdkafka).
//! - [`idempotency`]: `Idempotency-Key` for a log that cannot refuse duplicates by key (Kafka).

pub mod embedded;
pub mod idempotency;
pub mod kafka;
mod kafka_group;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

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

/// Who asked for an event, in its headers: the log is the audit trail of writes. The
/// principal is an API key id or a token subject; the method `api_key`, `jwt` or `none`.
pub const PRINCIPAL_HEADER: &str = "callisto.principal";
pub const AUTH_METHOD_HEADER: &str = "callisto.auth_method";
pub const SOURCE_ADDRESS_HEADER: &str = "callisto.source_address";

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
    /// Another request with this idempotency key is still being appended; retry shortly.
    #[error("a request with idempotency key {0:?} is still in progress")]
    InFlight(String),
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
    /// The messaging system, as trace attributes name it (`messaging.system`).
    fn system(&self) -> &'static str {
        "callisto"
    }

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

    /// Joins consumer group `group` on `topic`, handing partitions to `handler` as the group
    /// assigns and revokes them, until `shutdown`; the handle finishes once this member has
    /// drained, committed and left. `Ok(None)` when the log has no consumer groups: the caller
    /// then owns every partition and reads it by position.
    async fn join_group(
        &self,
        _topic: &str,
        _group: &str,
        _handler: Arc<dyn GroupHandler>,
        _shutdown: CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, LogError> {
        Ok(None)
    }
}

/// Implements [`EventLog`] for a decorator of another log: `append` is the decorator's own
/// (`|this, request| body`, with `this` the decorator), every other call goes to the log in the
/// field `inner`.
#[macro_export]
macro_rules! event_log_decorator {
    ($decorator:ty, $inner:ident, |$this:ident, $request:ident| $append:expr) => {
        #[$crate::log::decorator_support::async_trait]
        impl $crate::log::EventLog for $decorator {
            fn system(&self) -> &'static str {
                self.$inner.system()
            }

            async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), $crate::log::LogError> {
                self.$inner.ensure_topic(topic, partitions).await
            }

            async fn partitions(&self, topic: &str) -> Result<u32, $crate::log::LogError> {
                self.$inner.partitions(topic).await
            }

            async fn append(
                &self,
                $request: $crate::log::AppendRequest,
            ) -> Result<$crate::log::Appended, $crate::log::LogError> {
                let $this = self;
                $append
            }

            async fn read(
                &self,
                topic: &str,
                partition: u32,
                from: u64,
                max_records: usize,
                max_wait: std::time::Duration,
            ) -> Result<Vec<$crate::log::Record>, $crate::log::LogError> {
                self.$inner.read(topic, partition, from, max_records, max_wait).await
            }

            async fn end_offsets(&self, topic: &str) -> Result<Vec<u64>, $crate::log::LogError> {
                self.$inner.end_offsets(topic).await
            }

            async fn offsets_for_timestamp(
                &self,
                topic: &str,
                timestamp_ms: i64,
            ) -> Result<Vec<Option<u64>>, $crate::log::LogError> {
                self.$inner.offsets_for_timestamp(topic, timestamp_ms).await
            }

            async fn commit_offsets(
                &self,
                group: &str,
                topic: &str,
                offsets: &[(u32, u64)],
            ) -> Result<(), $crate::log::LogError> {
                self.$inner.commit_offsets(group, topic, offsets).await
            }

            async fn committed_offsets(
                &self,
                group: &str,
                topic: &str,
            ) -> Result<Vec<(u32, u64)>, $crate::log::LogError> {
                self.$inner.committed_offsets(group, topic).await
            }

            async fn delete_records(
                &self,
                topic: &str,
                partition: u32,
                before: u64,
            ) -> Result<(), $crate::log::LogError> {
                self.$inner.delete_records(topic, partition, before).await
            }

            async fn health(&self) -> Result<(), $crate::log::LogError> {
                self.$inner.health().await
            }

            async fn join_group(
                &self,
                topic: &str,
                group: &str,
                handler: std::sync::Arc<dyn $crate::log::GroupHandler>,
                shutdown: $crate::log::decorator_support::CancellationToken,
            ) -> Result<Option<$crate::log::decorator_support::JoinHandle<()>>, $crate::log::LogError> {
                self.$inner.join_group(topic, group, handler, shutdown).await
            }
        }
    };
}

/// What [`event_log_decorator!`] names, so crates using it need no dependencies of their own.
#[doc(hidden)]
pub mod decorator_support {
    pub use async_trait::async_trait;
    pub use tokio::task::JoinHandle;
    pub use tokio_util::sync::CancellationToken;
}

/// One partition's records, in order, as one consumer receives them.
#[async_trait]
pub trait PartitionFeed: Send + Sync {
    fn partition(&self) -> u32;

    /// The next records after the last batch returned (the first batch starts where the
    /// handler said). When none are there yet, waits up to `max_wait` and may return none.
    /// Cancelling the call loses nothing.
    async fn next_batch(&mut self, max_records: usize, max_wait: Duration) -> Result<Vec<Record>, LogError>;

    /// The offset the next batch starts at, for a feed that reads by position; `None` for one
    /// that takes what a consumer prefetched.
    fn next_offset(&self) -> Option<u64> {
        None
    }

    /// Moves a feed that reads by position (its `next_offset` is `Some`) on to `next`, as if it
    /// had returned the records before it: the caller has them from elsewhere.
    fn skip_to(&mut self, next: u64) {
        let _ = next;
    }

    /// Everything before `next` is durable downstream: record it as the group's position.
    async fn processed(&mut self, next: u64) -> Result<(), LogError>;
}

/// What a member of a consumer group does as partitions come and go.
#[async_trait]
pub trait GroupHandler: Send + Sync + 'static {
    /// Where each of `partitions` should start, in the same order: the consumer seeks there
    /// instead of trusting the group's committed offsets. `None` when shutting down.
    async fn start_offsets(&self, partitions: &[u32]) -> Option<Vec<u64>>;

    /// The partitions' feeds, positioned where `start_offsets` said.
    fn assigned(&self, feeds: Vec<Box<dyn PartitionFeed>>);

    /// `partitions` are leaving this member: stop reading them and finish in-flight work
    /// before returning, so the next owner starts after it.
    async fn revoked(&self, partitions: &[u32]);
}

/// A [`PartitionFeed`] that reads by position, for logs without consumer groups; its
/// progress is committed under `group` as a lag signal.
///
/// Positions are committed at most once per [`PositionFeed::COMMIT_INTERVAL`], and the last
/// one when a read finds the partition idle, the way Kafka's consumers auto-commit. Committing
/// after every batch put a durable write of the log's own store next to every live batch of
/// every projection, and those writes queue with the appends behind the store's one writer.
/// The group's position only signals lag: resuming always starts from the read model's own
/// checkpoint, so a position a little behind costs nothing.
pub struct PositionFeed {
    log: Arc<dyn EventLog>,
    topic: String,
    group: String,
    partition: u32,
    next: u64,
    /// Processed but not committed yet.
    pending: Option<u64>,
    committed_at: Option<Instant>,
}

impl PositionFeed {
    /// How often, at most, one partition's position is committed.
    pub const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

    /// Reads `partition` of `topic` from `next` on.
    pub fn new(log: Arc<dyn EventLog>, topic: String, group: String, partition: u32, next: u64) -> Self {
        Self { log, topic, group, partition, next, pending: None, committed_at: None }
    }

    async fn commit_pending(&mut self) -> Result<(), LogError> {
        if let Some(next) = self.pending {
            self.log.commit_offsets(&self.group, &self.topic, &[(self.partition, next)]).await?;
            self.pending = None;
            self.committed_at = Some(Instant::now());
        }
        Ok(())
    }
}

#[async_trait]
impl PartitionFeed for PositionFeed {
    fn partition(&self) -> u32 {
        self.partition
    }

    fn next_offset(&self) -> Option<u64> {
        Some(self.next)
    }

    fn skip_to(&mut self, next: u64) {
        self.next = next;
    }

    async fn next_batch(&mut self, max_records: usize, max_wait: Duration) -> Result<Vec<Record>, LogError> {
        let records = self.log.read(&self.topic, self.partition, self.next, max_records, max_wait).await?;
        match records.last() {
            Some(last) => self.next = last.offset + 1,
            // Idle: nothing will come to commit the last position with, so commit it now.
            None => {
                if let Err(e) = self.commit_pending().await {
                    tracing::debug!(partition = self.partition, error = %e, "recording the group position failed");
                }
            }
        }
        Ok(records)
    }

    async fn processed(&mut self, next: u64) -> Result<(), LogError> {
        self.pending = Some(next);
        if self.committed_at.is_none_or(|at| at.elapsed() >= Self::COMMIT_INTERVAL) {
            self.commit_pending().await?;
        }
        Ok(())
    }
}
