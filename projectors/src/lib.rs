//! # callisto-projectors — the projector runtime
//!
//! Builds read models from the person topic. Each [`Projection`] gets one ordered worker per
//! partition; workers run in parallel across partitions and projections.
//!
//! ## Layout
//! - [`worker`]: the per-(projection, partition) loop: read a batch from the projection's own
//!   checkpoint, decode, apply with the checkpoint, repeat.
//! - [`dlq`]: dead-lettering events that cannot be decoded or applied, with their original bytes.
//! - [`retry`]: back-off with jitter for dependency calls.
//!
//! ## Guarantees
//! - Memory is bounded: workers pull at most `batch_max` records at a time; nothing queues.
//! - A checkpoint is written with (or after) the batch that reached it, and workers resume from
//!   the projection's checkpoint, never from the log's consumer-group offsets (those are only a
//!   lag signal).
//! - A store that is down pauses its partitions, retrying with back-off; it never loses events.
//! - A poison event is dead-lettered and its partition moves on.

pub mod dlq;
pub mod retry;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use callisto_avro::Codec;
use callisto_core::log::{EventLog, LogError};
use callisto_core::readmodel::Projection;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    pub topic: String,
    /// Most records one batch reads and applies.
    pub batch_max: usize,
    /// How long a read waits for the first new record before returning empty.
    pub poll_wait: Duration,
    /// Attempts to decode or apply before a single event is dead-lettered.
    pub event_attempts: usize,
    /// Consumer group under which offsets are committed, for lag visibility only.
    pub group: String,
    /// Per partition, where a projection with no checkpoint starts (a rebuild from a point in
    /// time); offset 0 when absent.
    pub start_offsets: Option<Vec<u64>>,
}

impl ProjectorSettings {
    pub fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            batch_max: 2000,
            poll_wait: Duration::from_millis(250),
            event_attempts: 3,
            group: "callisto-projectors".into(),
            start_offsets: None,
        }
    }

    pub fn dlq_topic(&self) -> String {
        dlq::topic_for(&self.topic)
    }
}

/// Runs every projection over every partition until `shutdown` is cancelled.
pub struct Projector {
    log: Arc<dyn EventLog>,
    codec: Arc<Codec>,
    projections: Vec<Arc<dyn Projection>>,
    settings: ProjectorSettings,
}

impl Projector {
    pub fn new(
        log: Arc<dyn EventLog>,
        codec: Arc<Codec>,
        projections: Vec<Arc<dyn Projection>>,
        settings: ProjectorSettings,
    ) -> Self {
        Self { log, codec, projections, settings }
    }

    /// Ensures the dead-letter topic exists (with the source topic's partition count) and spawns
    /// the workers. The returned handle finishes once every worker has stopped.
    pub async fn start(self, shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>, LogError> {
        let partitions = self.log.partitions(&self.settings.topic).await?;
        self.log.ensure_topic(&self.settings.dlq_topic(), partitions).await?;
        let mut workers = tokio::task::JoinSet::new();
        for projection in &self.projections {
            for partition in 0..partitions {
                let worker = worker::Worker {
                    log: self.log.clone(),
                    codec: self.codec.clone(),
                    projection: projection.clone(),
                    settings: self.settings.clone(),
                    partition,
                };
                workers.spawn(worker.run(shutdown.clone()));
            }
        }
        workers.spawn(worker::report_lag(
            self.log.clone(),
            self.projections.clone(),
            self.settings.topic.clone(),
            shutdown,
        ));
        Ok(tokio::spawn(async move {
            while let Some(result) = workers.join_next().await {
                if let Err(e) = result {
                    tracing::error!(error = %e, "projector worker crashed");
                }
            }
        }))
    }
}
