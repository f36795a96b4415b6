//! # callisto-projectors — the projector runtime
//!
//! Builds read models from the person topic. Each [`Projection`] gets one ordered worker per
//! partition; workers run in parallel across partitions and projections.
//!
//! ## Layout
//! - [`member`]: a projection as a consumer-group member: starts a worker for each partition
//!   the log assigns (at the projection's checkpoint + 1), drains it on revoke.
//! - [`worker`]: the per-(projection, partition) loop: take a batch from the partition's feed,
//!   decode and open (personal data, through the keyring), or take the batch another
//!   projection's worker decoded, apply with the checkpoint, record the group position, repeat.
//! - [`shared`]: decoded batches one projection's worker hands to the others' on the same
//!   partition while they catch up, so a rebuild of several read models decodes each record once.
//! - [`dlq`]: dead-lettering events that cannot be decoded or applied, with their original bytes.
//! - [`retry`]: back-off with jitter for dependency calls.
//!
//! ## Guarantees
//! - Memory is bounded: workers pull at most `batch_max` records at a time (or what the
//!   projection asks for, `Projection::batch_max`), and while catching up the workers of all
//!   of a projector's projections hold at most `catch_up_records` records between them;
//!   nothing queues.
//! - A checkpoint is written with (or after) the batch that reached it, and workers resume from
//!   the projection's checkpoint, never from the log's consumer-group offsets (those trail it).
//! - On Kafka each projection is its own consumer group (`<group>.<projection>`), so projector
//!   processes share partitions and scale out and in; a revoked partition's batch in hand is
//!   finished before the next owner starts after it.
//! - A store that is down pauses its partitions, retrying with back-off; it never loses events.
//! - A poison event is dead-lettered and its partition moves on; so is sealed personal data
//!   that fails authentication (moved or altered ciphertext). A key store that is down pauses
//!   the partition like a store that is down.
//! - Events of an erased person (key destroyed) are applied as erasures: read models keep
//!   nothing of the person, however often the log is replayed.

pub mod dlq;
pub mod member;
pub mod retry;
pub mod shared;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use callisto_core::log::{EventLog, GroupHandler, LogError, PartitionFeed, PositionFeed};
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::Projection;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    pub topic: String,
    /// Most records one batch reads and applies.
    pub batch_max: usize,
    /// How long a read waits for the first new record before returning empty.
    pub poll_wait: Duration,
    /// Once live, a worker reads its partition at most this often while records keep coming:
    /// those that arrive meanwhile join the next batch. Under load a commit of the log holds a
    /// record or two per partition, and reading, decoding and applying them one commit at a time
    /// cost each projection a read transaction, a wake-up and an apply per command. After a read
    /// that found nothing, or waited longer than this for its records (a quiet spell), the next
    /// read is not held back.
    pub live_read_interval: Duration,
    /// Records the projector's projections hold in full batches at a time, across all their
    /// partitions, while they catch up (a rebuild, a backlog): a worker reads a full batch only
    /// with that many records of the budget. This bounds a rebuild's memory, as otherwise every
    /// partition of every projection holds a full batch, raw and decoded. The budget is one for
    /// all projections, so rebuilding two read models holds no more batches than rebuilding
    /// one, and a projection that finishes first leaves the whole budget to the others. Live
    /// traffic reads without waiting for it. The default, [`catch_up_records_for`], grows with
    /// the cores that can work on the batches.
    pub catch_up_records: usize,
    /// Attempts to decode or apply before a single event is dead-lettered.
    pub event_attempts: usize,
    /// Consumer-group prefix; each projection's group is `<group>.<projection>`.
    pub group: String,
    /// Per partition, where a projection with no checkpoint starts (a rebuild from a point in
    /// time); offset 0 when absent.
    pub start_offsets: Option<Vec<u64>>,
}

/// The default catch-up budget on a machine with `cores` cores: 12,000 records (one full batch
/// of the embedded stores) per core, and never under two batches. One budget serves all
/// projections, and a batch that several projections catch up on is decoded once and applied by
/// each of them at the same time under one share ([`shared`]), so a 1M-event rebuild of
/// documents and search on 2 cores holds two batches and applies each twice at once. Three
/// batches of 8,000 held the same records; two of 12,000 rebuild faster, since the documents
/// store rewrites its tables once per transaction, not once per event, and three of 12,000
/// took the rebuild's peak RSS past 300 MiB (`BENCHMARKS.md`, twelfth pass). On more cores
/// more batches are folded in parallel, with memory to match.
pub fn catch_up_records_for(cores: usize) -> usize {
    use callisto_core::readmodel::CATCH_UP_BATCH;
    (CATCH_UP_BATCH * cores).max(2 * CATCH_UP_BATCH)
}

impl ProjectorSettings {
    pub fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            batch_max: 2000,
            poll_wait: Duration::from_millis(250),
            live_read_interval: Duration::from_millis(3),
            catch_up_records: catch_up_records_for(std::thread::available_parallelism().map_or(1, usize::from)),
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
    reader: Arc<EventReader>,
    projections: Vec<Arc<dyn Projection>>,
    settings: ProjectorSettings,
}

impl Projector {
    pub fn new(
        log: Arc<dyn EventLog>,
        reader: Arc<EventReader>,
        projections: Vec<Arc<dyn Projection>>,
        settings: ProjectorSettings,
    ) -> Self {
        Self { log, reader, projections, settings }
    }

    /// Ensures the dead-letter topic exists (with the source topic's partition count), joins
    /// each projection's consumer group and starts working on what it is given. The returned
    /// handle finishes once every worker has stopped and the groups are left.
    pub async fn start(self, shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>, LogError> {
        let topic = self.settings.topic.clone();
        let partitions = self.log.partitions(&topic).await?;
        self.log.ensure_topic(&self.settings.dlq_topic(), partitions).await?;
        let mut tasks = tokio::task::JoinSet::new();
        let mut members = Vec::new();
        let catch_up = Arc::new(tokio::sync::Semaphore::new(self.settings.catch_up_records.max(1)));
        let shared = Arc::new(shared::SharedBatches::default());
        for projection in &self.projections {
            let member = Arc::new(member::Member::new(
                self.log.clone(),
                self.reader.clone(),
                projection.clone(),
                self.settings.clone(),
                shutdown.clone(),
                catch_up.clone(),
                shared.clone(),
            ));
            members.push(member.clone());
            let group = member.group();
            match self.log.join_group(&topic, &group, member.clone(), shutdown.clone()).await? {
                Some(membership) => {
                    tasks.spawn(async move {
                        if let Err(e) = membership.await {
                            tracing::error!(group, error = %e, "consumer group member crashed");
                        }
                        member.stop_all().await;
                    });
                }
                // No consumer groups: this process owns every partition.
                None => {
                    let log = self.log.clone();
                    let topic = topic.clone();
                    let shutdown = shutdown.clone();
                    tasks.spawn(async move {
                        let all: Vec<u32> = (0..partitions).collect();
                        if let Some(starts) = member.start_offsets(&all).await {
                            let feeds = all
                                .iter()
                                .zip(starts)
                                .map(|(&partition, next)| {
                                    Box::new(PositionFeed::new(
                                        log.clone(),
                                        topic.clone(),
                                        group.clone(),
                                        partition,
                                        next,
                                    )) as Box<dyn PartitionFeed>
                                })
                                .collect();
                            member.assigned(feeds);
                        }
                        shutdown.cancelled().await;
                        member.stop_all().await;
                    });
                }
            }
        }
        tasks.spawn(worker::report_lag(self.log.clone(), members, topic, shutdown));
        Ok(tokio::spawn(async move {
            while let Some(result) = tasks.join_next().await {
                if let Err(e) = result {
                    tracing::error!(error = %e, "projector task crashed");
                }
            }
        }))
    }
}
