//! The Kafka [`EventLog`], on rdkafka (librdkafka).
//!
//! - Appends go through one idempotent producer (`enable.idempotence`, `acks=all`) with
//!   `partitioner=murmur2_random`, so a key lands on the partition Kafka's Java client and the
//!   embedded log pick; an append is `Ok` only after the broker's delivery report.
//! - Reads by position use one assigned (group-less) consumer per partition, kept between reads
//!   and re-seeked only when a read does not continue where the last one ended.
//! - Consumer-group offsets are committed and fetched with a consumer in that group.
//! - Projectors join consumer groups through [`super::kafka_group`].
//!
//! Every call is bounded by `request_timeout`; librdkafka retries transient broker errors
//! within it. Extra librdkafka properties (SASL, TLS, …) pass through unchanged.
//!
//! Idempotency keys need a store that can check and write atomically with the append; Kafka
//! has none, so an append carrying one is refused rather than silently not deduplicated.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use tokio_util::sync::CancellationToken;

use super::{AppendRequest, Appended, EventLog, GroupHandler, LogError, Record};

#[derive(Debug, Clone)]
pub struct KafkaLogOptions {
    pub brokers: String,
    /// Extra librdkafka properties for every client (security.protocol, sasl.*, ssl.*, …).
    pub properties: BTreeMap<String, String>,
    pub request_timeout: Duration,
    pub message_timeout: Duration,
    pub replication_factor: i32,
    pub min_insync_replicas: Option<u32>,
    /// How long a consumer-group member waits for in-flight batches when partitions are
    /// revoked; kept well under the session timeout (45 s by default).
    pub drain_timeout: Duration,
}

impl KafkaLogOptions {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            properties: BTreeMap::new(),
            request_timeout: Duration::from_secs(10),
            message_timeout: Duration::from_secs(30),
            replication_factor: 3,
            min_insync_replicas: Some(2),
            drain_timeout: Duration::from_secs(10),
        }
    }

    /// `defaults` first, so the pass-through properties can tune them.
    pub(super) fn config_with_defaults(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    fn base(&self) -> ClientConfig {
        self.config_with_defaults(&[])
    }
}

pub struct KafkaLog {
    options: KafkaLogOptions,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// For metadata, watermarks and time lookups; shared by every call.
    meta: Arc<BaseConsumer>,
    /// Partition counts seen in metadata. A live topic's count never changes (a repartition
    /// is a migration to a new topic), so each topic's is fetched once.
    partition_counts: Mutex<HashMap<String, u32>>,
    /// One member per consumer group whose offsets this log commits or reads.
    group_members: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    readers: Arc<Mutex<Readers>>,
}

/// (topic, partition) → idle assigned consumers, each with the offset its next message will
/// have. Several readers of one partition (one per projection) each keep their own, so a
/// sequential reader never pays a seek or a new connection.
type Readers = HashMap<(String, u32), Vec<(BaseConsumer, u64)>>;

/// Idle consumers kept per partition; more are closed when returned.
const IDLE_READERS_PER_PARTITION: usize = 4;

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog").field("brokers", &self.options.brokers).finish_non_exhaustive()
    }
}

/// A consumed message as an owned [`Record`].
pub(super) fn to_record(message: &impl Message, topic: &str, partition: u32) -> Record {
    let headers = message
        .headers()
        .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect())
        .unwrap_or_default();
    Record {
        topic: topic.to_owned(),
        partition,
        offset: message.offset() as u64,
        timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
        key: message.key().unwrap_or_default().to_vec(),
        headers,
        payload: message.payload().unwrap_or_default().to_vec(),
    }
}

pub(super) fn kafka_error(e: KafkaError) -> LogError {
    LogError::Unavailable(e.to_string())
}

impl KafkaLog {
    pub fn new(options: KafkaLogOptions) -> Result<Self, LogError> {
        let producer: FutureProducer = options
            .base()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("message.timeout.ms", options.message_timeout.as_millis().to_string())
            .set("request.timeout.ms", options.request_timeout.as_millis().to_string())
            .create()
            .map_err(kafka_error)?;
        let admin = options.base().create().map_err(kafka_error)?;
        let meta = options.base().set("enable.auto.commit", "false").create().map_err(kafka_error)?;
        Ok(Self {
            options,
            producer,
            admin,
            meta: Arc::new(meta),
            partition_counts: Mutex::new(HashMap::new()),
            group_members: Mutex::new(HashMap::new()),
            readers: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// A consumer for position reads. It is only ever assigned partitions and never commits;
    /// librdkafka still wants a group id for `assign`.
    fn reader(&self) -> Result<BaseConsumer, LogError> {
        self.options
            .base()
            .set("group.id", "callisto-position-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .map_err(kafka_error)
    }

    /// The consumer in `group` used only to commit or fetch the group's offsets, created once.
    fn group_member(&self, group: &str) -> Result<Arc<BaseConsumer>, LogError> {
        let mut members = self.group_members.lock().map_err(|e| LogError::Unavailable(e.to_string()))?;
        if let Some(member) = members.get(group) {
            return Ok(member.clone());
        }
        let member: BaseConsumer = self
            .options
            .base()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka_error)?;
        let member = Arc::new(member);
        members.insert(group.to_owned(), member.clone());
        Ok(member)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        tokio::task::spawn_blocking(f).await.map_err(|e| LogError::Unavailable(e.to_string()))?
    }

    fn partition_count(meta: &BaseConsumer, topic: &str, timeout: Duration) -> Result<u32, LogError> {
        let metadata = meta.fetch_metadata(Some(topic), timeout).map_err(kafka_error)?;
        let found = metadata.topics().iter().find(|t| t.name() == topic);
        match found {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len() as u32),
            _ => Err(LogError::UnknownTopic(topic.to_owned())),
        }
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    fn system(&self) -> &'static str {
        "kafka"
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        let check = |actual: u32| {
            if actual == partitions {
                Ok(())
            } else {
                Err(LogError::PartitionCountMismatch { topic: topic.into(), actual, requested: partitions })
            }
        };
        // An existing topic is only checked: creating is an admin operation many deployments
        // reserve for their platform team.
        match self.partitions(topic).await {
            Ok(actual) => return check(actual),
            Err(LogError::UnknownTopic(_)) => {}
            Err(e) => return Err(e),
        }
        let timeout = self.options.request_timeout;
        let min_isr = self.options.min_insync_replicas.map(|m| m.to_string());
        let mut new_topic =
            NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(self.options.replication_factor));
        if let Some(min_isr) = &min_isr {
            new_topic = new_topic.set("min.insync.replicas", min_isr);
        }
        let options = AdminOptions::new().operation_timeout(Some(timeout)).request_timeout(Some(timeout));
        let results = self.admin.create_topics([&new_topic], &options).await.map_err(kafka_error)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(LogError::Unavailable(format!("creating topic {topic}: {code}"))),
            }
        }
        // Metadata can lag a creation briefly.
        let deadline = Instant::now() + timeout;
        loop {
            match self.partitions(topic).await {
                Ok(actual) => return check(actual),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        if let Some(count) = self.partition_counts.lock().ok().and_then(|c| c.get(topic).copied()) {
            return Ok(count);
        }
        let count = Self::partition_count(&self.meta, topic, self.options.request_timeout)?;
        if let Ok(mut counts) = self.partition_counts.lock() {
            counts.insert(topic.to_owned(), count);
        }
        Ok(count)
    }

    async fn append(&self, request: AppendRequest) -> Result<Appended, LogError> {
        if request.idempotency.is_some() {
            return Err(LogError::Unsupported(
                "Idempotency-Key on Kafka needs a claim store shared by the writers (IdempotentLog)".into(),
            ));
        }
        let mut headers = OwnedHeaders::new();
        for (key, value) in &request.headers {
            headers = headers.insert(Header { key, value: Some(value.as_slice()) });
        }
        let record = FutureRecord::to(&request.topic).key(&request.key).payload(&request.payload).headers(headers);
        let delivery = self.producer.send(record, self.options.message_timeout).await.map_err(|(e, _)| match e {
            KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                LogError::UnknownTopic(request.topic.clone())
            }
            other => kafka_error(other),
        })?;
        Ok(Appended {
            partition: delivery.partition as u32,
            offset: delivery.offset as u64,
            timestamp_ms: delivery.timestamp.to_millis().unwrap_or(0),
            replayed: false,
        })
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Vec<Record>, LogError> {
        let partitions = self.partitions(topic).await?;
        if partition >= partitions {
            return Err(LogError::UnknownPartition { topic: topic.into(), partition });
        }
        let key = (topic.to_owned(), partition);
        let reused = {
            let mut readers = self.readers.lock().map_err(|e| LogError::Unavailable(e.to_string()))?;
            readers.get_mut(&key).and_then(|idle| {
                // Prefer the consumer that stopped exactly where this read starts.
                let at = idle.iter().position(|(_, next)| *next == from).unwrap_or(0);
                (!idle.is_empty()).then(|| idle.swap_remove(at))
            })
        };
        let (consumer, position) = match reused {
            Some(found) => found,
            None => (self.reader()?, u64::MAX),
        };
        let readers = self.readers.clone();
        let topic = topic.to_owned();
        let timeout = self.options.request_timeout;
        self.blocking(move || {
            if position != from {
                let mut assignment = TopicPartitionList::new();
                assignment
                    .add_partition_offset(&topic, partition as i32, Offset::Offset(from as i64))
                    .map_err(kafka_error)?;
                consumer.assign(&assignment).map_err(kafka_error)?;
            }
            // Records already in the partition are returned at once; only when there are none
            // does the read wait, up to `max_wait`, for new ones (a fetch's long poll).
            let (_, high) = consumer.fetch_watermarks(&topic, partition as i32, timeout).map_err(kafka_error)?;
            let present = (high.max(0) as u64).saturating_sub(from);
            let wait_until = Instant::now() + max_wait;
            let fetch_until = Instant::now() + timeout;
            let mut records = Vec::new();
            while records.len() < max_records {
                let have_present = records.len() as u64 >= present;
                if have_present && (!records.is_empty() || Instant::now() >= wait_until) {
                    break;
                }
                let until = if have_present { wait_until } else { fetch_until };
                let Some(message) = consumer.poll(until.saturating_duration_since(Instant::now())) else {
                    if have_present {
                        break;
                    }
                    if Instant::now() >= fetch_until {
                        return Err(LogError::Timeout(timeout));
                    }
                    continue;
                };
                records.push(to_record(&message.map_err(kafka_error)?, &topic, partition));
            }
            let next = records.last().map_or(from, |r| r.offset + 1);
            if let Ok(mut readers) = readers.lock() {
                let idle = readers.entry((topic, partition)).or_default();
                if idle.len() < IDLE_READERS_PER_PARTITION {
                    idle.push((consumer, next));
                }
            }
            Ok(records)
        })
        .await
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<u64>, LogError> {
        let partitions = self.partitions(topic).await?;
        let timeout = self.options.request_timeout;
        let meta = self.meta.clone();
        let topic = topic.to_owned();
        self.blocking(move || {
            (0..partitions)
                .map(|p| {
                    let (_, high) = meta.fetch_watermarks(&topic, p as i32, timeout).map_err(kafka_error)?;
                    Ok(high.max(0) as u64)
                })
                .collect()
        })
        .await
    }

    async fn offsets_for_timestamp(&self, topic: &str, timestamp_ms: i64) -> Result<Vec<Option<u64>>, LogError> {
        let partitions = self.partitions(topic).await?;
        let timeout = self.options.request_timeout;
        let meta = self.meta.clone();
        let topic = topic.to_owned();
        self.blocking(move || {
            let mut query = TopicPartitionList::new();
            for p in 0..partitions {
                query.add_partition_offset(&topic, p as i32, Offset::Offset(timestamp_ms)).map_err(kafka_error)?;
            }
            let found = meta.offsets_for_times(query, timeout).map_err(kafka_error)?;
            Ok((0..partitions)
                .map(|p| match found.find_partition(&topic, p as i32).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) if o >= 0 => Some(o as u64),
                    _ => None,
                })
                .collect())
        })
        .await
    }

    async fn commit_offsets(&self, group: &str, topic: &str, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        let consumer = self.group_member(group)?;
        let mut list = TopicPartitionList::new();
        for (partition, offset) in offsets {
            list.add_partition_offset(topic, *partition as i32, Offset::Offset(*offset as i64)).map_err(kafka_error)?;
        }
        self.blocking(move || consumer.commit(&list, CommitMode::Sync).map_err(kafka_error)).await
    }

    async fn committed_offsets(&self, group: &str, topic: &str) -> Result<Vec<(u32, u64)>, LogError> {
        let partitions = self.partitions(topic).await?;
        let timeout = self.options.request_timeout;
        let consumer = self.group_member(group)?;
        let topic = topic.to_owned();
        self.blocking(move || {
            let mut query = TopicPartitionList::new();
            for p in 0..partitions {
                query.add_partition(&topic, p as i32);
            }
            let committed = consumer.committed_offsets(query, timeout).map_err(kafka_error)?;
            Ok(committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some((e.partition() as u32, o as u64)),
                    _ => None,
                })
                .collect())
        })
        .await
    }

    async fn delete_records(&self, topic: &str, partition: u32, before: u64) -> Result<(), LogError> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition as i32, Offset::Offset(before as i64)).map_err(kafka_error)?;
        let timeout = Some(self.options.request_timeout);
        let options = AdminOptions::new().operation_timeout(timeout).request_timeout(timeout);
        self.admin.delete_records(&list, &options).await.map_err(kafka_error)?;
        Ok(())
    }

    async fn health(&self) -> Result<(), LogError> {
        let timeout = self.options.request_timeout.min(Duration::from_secs(2));
        let meta = self.meta.clone();
        self.blocking(move || meta.fetch_metadata(None, timeout).map(|_| ()).map_err(kafka_error)).await
    }

    async fn join_group(
        &self,
        topic: &str,
        group: &str,
        handler: Arc<dyn GroupHandler>,
        shutdown: CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, LogError> {
        self.partitions(topic).await?;
        super::kafka_group::join(&self.options, topic, group, handler, shutdown).map(Some)
    }
}
