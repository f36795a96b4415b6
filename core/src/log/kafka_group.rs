//! Consumer-group membership on Kafka: how projectors in several processes share partitions.
//!
//! - The `cooperative-sticky` assignor moves only the partitions that must move; the others
//!   keep being consumed through a rebalance.
//! - Each assigned partition gets its own queue (librdkafka's split partition queues), handed
//!   to the [`GroupHandler`] as a [`PartitionFeed`]; the main queue is polled by one dedicated
//!   thread, which is where rebalance callbacks run.
//! - On assignment the consumer seeks to where the handler says (the read model's own
//!   checkpoint + 1), never to the group's committed offset, which may trail the read model.
//! - `enable.auto.offset.store=false`: a feed stores an offset only once its batch is durable
//!   downstream; stored offsets are committed every second and synchronously on revoke.
//! - On revoke the handler drains in-flight batches before the partitions are released, bounded
//!   by `drain_timeout`, which is kept well under the session timeout.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::kafka::{KafkaLogOptions, kafka_error};
use super::{GroupHandler, LogError, PartitionFeed, Record};

type GroupConsumer = BaseConsumer<GroupContext>;

/// How long the main queue is polled at a time; also how quickly shutdown is noticed.
const MAIN_POLL: Duration = Duration::from_millis(100);

pub(super) struct GroupContext {
    topic: String,
    group: String,
    handler: Arc<dyn GroupHandler>,
    runtime: tokio::runtime::Handle,
    drain_timeout: Duration,
    /// Set right after creation: splitting partition queues needs the consumer's `Arc`.
    consumer: OnceLock<Weak<GroupConsumer>>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn rebalance(&self, consumer: &GroupConsumer, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<u32> = tpl.elements_for_topic(&self.topic).iter().map(|e| e.partition() as u32).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                tracing::info!(group = self.group, ?partitions, "partitions assigned");
                let Some(feeds) = self.prepare_assignment(tpl, &partitions) else {
                    // Shutting down: take nothing; leaving the group follows.
                    tracing::info!(group = self.group, "shutting down; not taking the partitions");
                    return;
                };
                let assigned = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = assigned {
                    tracing::error!(group = self.group, error = %e, "assigning partitions failed");
                    return;
                }
                if !feeds.is_empty() {
                    self.handler.assigned(feeds);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(
                    group = self.group,
                    ?partitions,
                    lost = consumer.assignment_lost(),
                    "partitions revoked"
                );
                self.drain(&partitions);
                // Stored offsets of the drained batches; nothing stored is not an error.
                if !consumer.assignment_lost()
                    && let Err(e) = consumer.commit_consumer_state(CommitMode::Sync)
                {
                    tracing::debug!(group = self.group, error = %e, "commit on revoke");
                }
                let released = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = released {
                    tracing::error!(group = self.group, error = %e, "releasing partitions failed");
                }
            }
            other => tracing::error!(group = self.group, error = ?other, "rebalance error"),
        }
    }
}

impl GroupContext {
    /// Positions `tpl` at the handler's start offsets and splits each partition's queue off the
    /// main queue before fetching starts, so no record of it is ever delivered to the main queue.
    /// `None` when the member is shutting down (or being dropped) and should take nothing.
    fn prepare_assignment(
        &self,
        tpl: &mut TopicPartitionList,
        partitions: &[u32],
    ) -> Option<Vec<Box<dyn PartitionFeed>>> {
        let consumer = self.consumer.get().and_then(Weak::upgrade)?;
        let starts = self.runtime.block_on(self.handler.start_offsets(partitions))?;
        let mut feeds: Vec<Box<dyn PartitionFeed>> = Vec::with_capacity(partitions.len());
        for (&partition, &start) in partitions.iter().zip(&starts) {
            if let Err(e) = tpl.set_partition_offset(&self.topic, partition as i32, Offset::Offset(start as i64)) {
                tracing::error!(group = self.group, partition, error = %e, "positioning partition failed");
                continue;
            }
            match consumer.split_partition_queue(&self.topic, partition as i32) {
                Some(queue) => feeds.push(Box::new(KafkaFeed::new(queue, consumer.clone(), &self.topic, partition))),
                None => tracing::error!(group = self.group, partition, "no queue for partition"),
            }
        }
        Some(feeds)
    }

    fn drain(&self, partitions: &[u32]) {
        let drained = self
            .runtime
            .block_on(async { tokio::time::timeout(self.drain_timeout, self.handler.revoked(partitions)).await });
        if drained.is_err() {
            tracing::warn!(group = self.group, ?partitions, timeout = ?self.drain_timeout,
                "in-flight batches did not drain in time; the next owner may repeat them (the version guard absorbs that)");
        }
    }
}

/// Joins `group`, serving its rebalances on a dedicated thread until `shutdown`.
pub(super) fn join(
    options: &KafkaLogOptions,
    topic: &str,
    group: &str,
    handler: Arc<dyn GroupHandler>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, LogError> {
    let context = GroupContext {
        topic: topic.to_owned(),
        group: group.to_owned(),
        handler: handler.clone(),
        runtime: tokio::runtime::Handle::current(),
        drain_timeout: options.drain_timeout,
        consumer: OnceLock::new(),
    };
    let consumer: GroupConsumer = options
        .config_with_defaults(&[
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("auto.commit.interval.ms", "1000"),
            ("auto.offset.reset", "earliest"),
            ("fetch.wait.max.ms", "100"),
            ("queued.max.messages.kbytes", "16384"),
        ])
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .create_with_context(context)
        .map_err(kafka_error)?;
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    consumer.subscribe(&[topic]).map_err(kafka_error)?;
    let group = group.to_owned();
    // A plain thread rather than the runtime's blocking pool: a runtime being dropped waits
    // for its blocking tasks, and this one only ends on `shutdown`.
    let (left, leaving) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("kafka-group".into());
    let runtime = tokio::runtime::Handle::current();
    thread
        .spawn(move || {
            // Rebalance callbacks spawn the handler's tasks and block on its futures.
            let _runtime = runtime.enter();
            while !shutdown.is_cancelled() {
                match consumer.poll(MAIN_POLL) {
                    None => {}
                    Some(Err(e)) => tracing::debug!(group, error = %e, "consumer error"),
                    // Every assigned partition has its own queue; a record here would mean a bug.
                    Some(Ok(m)) => tracing::error!(
                        group,
                        partition = m.partition(),
                        offset = m.offset(),
                        "record on the main queue"
                    ),
                }
            }
            // Leaving: drain and commit what this member holds, then close (which leaves the group).
            let held: Vec<u32> = consumer
                .assignment()
                .map(|tpl| tpl.elements().iter().map(|e| e.partition() as u32).collect())
                .unwrap_or_default();
            consumer.context().drain(&held);
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(group, error = %e, "final commit");
            }
            leave(consumer);
            tracing::info!(group, "left consumer group");
            let _ = left.send(());
        })
        .map_err(|e| LogError::Unavailable(format!("starting the consumer thread: {e}")))?;
    Ok(tokio::spawn(async move {
        let _ = leaving.await;
    }))
}

/// Unsubscribes and closes on this thread, so the final revoke is served here, never on an
/// async worker (a rebalance callback blocks on the runtime). Normally this thread holds the
/// last reference once the workers are drained, and dropping it closes the consumer.
fn leave(consumer: Arc<GroupConsumer>) {
    if let Err(e) = unsubscribe_and_wait(&consumer) {
        tracing::debug!(error = %e, "unsubscribing");
    }
    match Arc::try_unwrap(consumer) {
        Ok(consumer) => drop(consumer),
        // A worker that did not drain in time still holds a feed: close explicitly.
        Err(consumer) => {
            if consumer.close_queue().is_ok() {
                while !consumer.closed() {
                    let _ = consumer.poll(MAIN_POLL);
                }
            }
        }
    }
}

/// Unsubscribes and serves the resulting revoke, waiting (boundedly) until nothing is held.
fn unsubscribe_and_wait(consumer: &GroupConsumer) -> Result<(), LogError> {
    consumer.unsubscribe();
    let deadline = std::time::Instant::now() + consumer.context().drain_timeout;
    while consumer.assignment().map_err(kafka_error)?.count() > 0 && std::time::Instant::now() < deadline {
        let _ = consumer.poll(MAIN_POLL);
    }
    Ok(())
}

/// One assigned partition's split queue.
struct KafkaFeed {
    queue: PartitionQueue<GroupContext>,
    consumer: Arc<GroupConsumer>,
    topic: String,
    partition: u32,
    /// Woken by librdkafka when the queue goes from empty to non-empty.
    arrived: Arc<Notify>,
}

impl KafkaFeed {
    fn new(mut queue: PartitionQueue<GroupContext>, consumer: Arc<GroupConsumer>, topic: &str, partition: u32) -> Self {
        let arrived = Arc::new(Notify::new());
        let wake = arrived.clone();
        queue.set_nonempty_callback(move || wake.notify_one());
        Self { queue, consumer, topic: topic.to_owned(), partition, arrived }
    }

    /// Takes what is queued, without waiting.
    fn drain_queued(&self, records: &mut Vec<Record>, max_records: usize) -> Result<(), LogError> {
        while records.len() < max_records {
            let Some(message) = self.queue.poll(Duration::ZERO) else { return Ok(()) };
            records.push(super::kafka::to_record(&message.map_err(kafka_error)?, &self.topic, self.partition));
        }
        Ok(())
    }
}

#[async_trait]
impl PartitionFeed for KafkaFeed {
    fn partition(&self) -> u32 {
        self.partition
    }

    async fn next_batch(&mut self, max_records: usize, max_wait: Duration) -> Result<Vec<Record>, LogError> {
        let mut records = Vec::new();
        self.drain_queued(&mut records, max_records)?;
        if records.is_empty() {
            // Waiting holds no records, so a cancelled wait loses nothing.
            if tokio::time::timeout(max_wait, self.arrived.notified()).await.is_ok() {
                self.drain_queued(&mut records, max_records)?;
            }
        }
        Ok(records)
    }

    async fn processed(&mut self, next: u64) -> Result<(), LogError> {
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&self.topic, self.partition as i32, Offset::Offset(next as i64))
            .map_err(kafka_error)?;
        self.consumer.store_offsets(&offsets).map_err(kafka_error)
    }
}
