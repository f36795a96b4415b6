//! The embedded event log: every partition of every topic in one redb file.
//!
//! ## Group commit
//! redb has one writer at a time and every commit pays an fsync. Appenders therefore do not
//! write themselves: they queue their record on a bounded channel, and one writer thread drains
//! whatever is queued into a single write transaction with immediate durability, then answers
//! every waiter. Under load, hundreds of appends share one fsync; when idle, a lone append is
//! committed at once. The bounded queue is the backpressure: when it is full, appends fail fast
//! with [`LogError::Unavailable`] rather than pile up memory.
//!
//! ## Tables
//! - `topics`: topic → partition count, fixed at creation.
//! - `records`: (topic, partition, offset) → postcard-encoded [`StoredRecord`].
//! - `ends`: (topic, partition) → (next offset, last timestamp).
//! - `time_index`: (topic, partition, timestamp) → first offset with that timestamp.
//! - `group_offsets`: (group, topic, partition) → next offset to read.
//! - `idempotency`: (topic, key) → (partition, offset, request fingerprint).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::{AppendRequest, Appended, EventLog, LogError, Record};
use crate::partition::partition_for;

const TOPICS: TableDefinition<&str, u32> = TableDefinition::new("topics");
const RECORDS: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("records");
const ENDS: TableDefinition<(&str, u32), (u64, i64)> = TableDefinition::new("ends");
const TIME_INDEX: TableDefinition<(&str, u32, i64), u64> = TableDefinition::new("time_index");
/// The time index holds every this-many-th record of a partition, the way Kafka's is sparse: a
/// look-up reads at most this many records past the entry it finds, and an append writes the
/// index's page only once in this many records instead of at almost every commit. Logs written
/// when every record was indexed read the same way.
const TIME_INDEX_INTERVAL: u64 = 32;
const GROUP_OFFSETS: TableDefinition<(&str, &str, u32), u64> = TableDefinition::new("group_offsets");
const IDEMPOTENCY: TableDefinition<(&str, &str), (u32, u64, [u8; 32])> = TableDefinition::new("idempotency");
/// Idempotency keys by the log time of their append, with the position they were taken at, so
/// expired ones are purged by a range scan.
const IDEMPOTENCY_EXPIRY: TableDefinition<(i64, &str, &str), (u32, u64)> = TableDefinition::new("idempotency_expiry");
/// Most keys one purge forgets, so the writer thread never stalls long on a backlog; the rest
/// go at the next group commit.
const PURGE_BATCH: usize = 10_000;

/// The on-disk form of one record; position is in the table key.
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    timestamp_ms: i64,
    #[serde(with = "serde_bytes")]
    key: Vec<u8>,
    headers: Vec<(String, serde_bytes::ByteBuf)>,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct EmbeddedLogOptions {
    /// Appends waiting for the writer thread before new ones are refused.
    pub queue_capacity: usize,
    /// Most appends committed in one transaction.
    pub max_batch: usize,
    /// redb's page cache. Reads past it go to the OS page cache, so this bounds the log's own
    /// memory however large the log grows.
    pub cache_bytes: usize,
    /// How long an idempotency key is remembered (from its append's log time).
    pub idempotency_retention: Duration,
}

impl Default for EmbeddedLogOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 8192,
            max_batch: 1024,
            cache_bytes: 16 << 20,
            idempotency_retention: Duration::from_secs(24 * 3600),
        }
    }
}

struct PendingAppend {
    request: AppendRequest,
    reply: oneshot::Sender<Result<Appended, LogError>>,
}

pub struct EmbeddedLog {
    db: Arc<Database>,
    queue: Option<mpsc::Sender<PendingAppend>>,
    writer: Option<JoinHandle<()>>,
    /// Write transactions committed since open.
    commits: Arc<AtomicU64>,
    /// Where each partition ends, published after every commit that appends to it, so a
    /// long-polling reader wakes on new records of its own partition instead of polling.
    arrivals: Arc<Arrivals>,
}

/// A read that finds at most this many records committed since the log was opened runs on the
/// calling task, and takes at most this many.
const INLINE_READ_RECORDS: usize = 32;

/// Per topic and partition, the offset after its last committed record. Readers wait on their
/// partition's alone: a commit wakes only the readers it has records for, where waking every
/// reader on every commit had each of them (two projections × every partition) read its
/// partition again on a blocking thread to find nothing, a thousand times a second under load.
#[derive(Default)]
struct Arrivals {
    ends: std::sync::Mutex<HashMap<String, HashMap<u32, watch::Sender<u64>>>>,
}

impl Arrivals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u32, watch::Sender<u64>>>> {
        // The map only ever holds senders; a panic elsewhere leaves nothing half-written.
        self.ends.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes whenever records are committed to `partition` of `topic`.
    fn watch(&self, topic: &str, partition: u32) -> watch::Receiver<u64> {
        let mut ends = self.lock();
        let partitions = match ends.get_mut(topic) {
            Some(partitions) => partitions,
            None => ends.entry(topic.to_owned()).or_default(),
        };
        partitions.entry(partition).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// `appended` were committed: wakes the readers of their partitions.
    fn committed<'a>(&self, appended: impl Iterator<Item = (&'a str, u32, u64)>) {
        let ends = self.lock();
        for (topic, partition, offset) in appended {
            if let Some(end) = ends.get(topic).and_then(|partitions| partitions.get(&partition)) {
                end.send_if_modified(|end| {
                    let moved = offset + 1 > *end;
                    *end = (*end).max(offset + 1);
                    moved
                });
            }
        }
    }
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog").finish_non_exhaustive()
    }
}

fn unavailable<E: std::fmt::Display>(e: E) -> LogError {
    LogError::Unavailable(e.to_string())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl EmbeddedLog {
    /// Opens (or creates) the log file at `path` and starts its writer thread.
    pub fn open(path: &Path, options: EmbeddedLogOptions) -> Result<Self, LogError> {
        let db = redb::Builder::new().set_cache_size(options.cache_bytes).create(path).map_err(unavailable)?;
        {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(TOPICS).map_err(unavailable)?;
            txn.open_table(RECORDS).map_err(unavailable)?;
            txn.open_table(ENDS).map_err(unavailable)?;
            txn.open_table(TIME_INDEX).map_err(unavailable)?;
            txn.open_table(GROUP_OFFSETS).map_err(unavailable)?;
            txn.open_table(IDEMPOTENCY).map_err(unavailable)?;
            txn.open_table(IDEMPOTENCY_EXPIRY).map_err(unavailable)?;
            txn.commit().map_err(unavailable)?;
        }
        let db = Arc::new(db);
        let (queue, rx) = mpsc::channel(options.queue_capacity.max(1));
        let commits = Arc::new(AtomicU64::new(0));
        let arrivals = Arc::new(Arrivals::default());
        let writer = {
            let db = db.clone();
            let commits = commits.clone();
            let arrivals = arrivals.clone();
            let max_batch = options.max_batch.max(1);
            let retention = options.idempotency_retention;
            std::thread::Builder::new()
                .name("callisto-log-writer".into())
                .spawn(move || writer_loop(&db, rx, max_batch, retention, &commits, &arrivals))
                .map_err(unavailable)?
        };
        Ok(Self { db, queue: Some(queue), writer: Some(writer), commits, arrivals })
    }

    /// How many write transactions the group-commit writer has committed since open.
    pub fn commit_count(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(unavailable)?
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and exit; joining it means the
        // file is released when `drop` returns, so the same process can reopen it.
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn writer_loop(
    db: &Database,
    mut rx: mpsc::Receiver<PendingAppend>,
    max_batch: usize,
    retention: Duration,
    commits: &AtomicU64,
    arrivals: &Arrivals,
) {
    let mut batch = Vec::with_capacity(max_batch);
    // Expired keys are purged between group commits, at most this often.
    let purge_every = retention.min(Duration::from_secs(3600));
    let mut purged_at = std::time::Instant::now();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let outcome = db.begin_write().map_err(unavailable).and_then(|txn| {
            let results = {
                let mut tables = GroupTables::open(&txn)?;
                batch.iter().map(|p| tables.append(&p.request, retention)).collect::<Result<Vec<_>, _>>()?
            };
            txn.commit().map_err(unavailable)?;
            Ok(results)
        });
        metrics::histogram!("callisto_log_group_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("callisto_log_group_commit_size").record(batch.len() as f64);
        match outcome {
            Ok(results) => {
                commits.fetch_add(1, Ordering::Relaxed);
                arrivals.committed(batch.iter().zip(&results).filter_map(|(pending, result)| {
                    let appended = result.as_ref().ok().filter(|a| !a.replayed)?;
                    Some((pending.request.topic.as_str(), appended.partition, appended.offset))
                }));
                for (pending, result) in batch.drain(..).zip(results) {
                    let _ = pending.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, appends = batch.len(), "group commit failed");
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(Err(LogError::Unavailable(e.to_string())));
                }
            }
        }
        if purged_at.elapsed() >= purge_every {
            match purge_expired_keys(db, retention) {
                // More are due: the next group commit purges again.
                Ok(true) => {}
                Ok(false) => purged_at = std::time::Instant::now(),
                Err(e) => {
                    purged_at = std::time::Instant::now();
                    tracing::warn!(error = %e, "purging expired idempotency keys failed");
                }
            }
        }
    }
}

/// The tables a group commit writes, opened once for the whole group: opening a table and
/// closing it again for every append rewrote the table tree's root bookkeeping each time.
struct GroupTables<'txn> {
    topics: redb::Table<'txn, &'static str, u32>,
    records: redb::Table<'txn, (&'static str, u32, u64), &'static [u8]>,
    ends: redb::Table<'txn, (&'static str, u32), (u64, i64)>,
    time_index: redb::Table<'txn, (&'static str, u32, i64), u64>,
    idempotency: redb::Table<'txn, (&'static str, &'static str), (u32, u64, [u8; 32])>,
    idempotency_expiry: redb::Table<'txn, (i64, &'static str, &'static str), (u32, u64)>,
}

impl<'txn> GroupTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, LogError> {
        Ok(Self {
            topics: txn.open_table(TOPICS).map_err(unavailable)?,
            records: txn.open_table(RECORDS).map_err(unavailable)?,
            ends: txn.open_table(ENDS).map_err(unavailable)?,
            time_index: txn.open_table(TIME_INDEX).map_err(unavailable)?,
            idempotency: txn.open_table(IDEMPOTENCY).map_err(unavailable)?,
            idempotency_expiry: txn.open_table(IDEMPOTENCY_EXPIRY).map_err(unavailable)?,
        })
    }

    /// Appends one request inside the group's transaction. The outer `Result` is a storage
    /// failure that aborts the whole group; the inner one belongs to this request alone.
    #[allow(clippy::type_complexity)]
    fn append(&mut self, req: &AppendRequest, retention: Duration) -> Result<Result<Appended, LogError>, LogError> {
        let topic = req.topic.as_str();
        let Some(partitions) = self.topics.get(topic).map_err(unavailable)?.map(|g| g.value()) else {
            return Ok(Err(LogError::UnknownTopic(req.topic.clone())));
        };
        if let Some(idem) = &req.idempotency
            && let Some(seen) = self.idempotency.get((topic, idem.key.as_str())).map_err(unavailable)?
        {
            let (partition, offset, fingerprint) = seen.value();
            let timestamp_ms = self
                .records
                .get((topic, partition, offset))
                .map_err(unavailable)?
                .and_then(|g| postcard::from_bytes::<StoredRecord>(g.value()).ok())
                .map_or(0, |r| r.timestamp_ms);
            // A key older than the retention is forgotten: this request appends, and takes it.
            let expired = now_ms().saturating_sub(timestamp_ms) > retention.as_millis() as i64;
            if !expired {
                if fingerprint != idem.fingerprint {
                    return Ok(Err(LogError::IdempotencyConflict(idem.key.clone())));
                }
                return Ok(Ok(Appended { partition, offset, timestamp_ms, replayed: true }));
            }
        }
        let partition = partition_for(&req.key, partitions);
        let (offset, last_ts) =
            self.ends.get((topic, partition)).map_err(unavailable)?.map_or((0, i64::MIN), |g| g.value());
        let timestamp_ms = now_ms().max(last_ts);
        let stored = StoredRecord {
            timestamp_ms,
            key: req.key.clone(),
            headers: req.headers.iter().map(|(k, v)| (k.clone(), serde_bytes::ByteBuf::from(v.clone()))).collect(),
            payload: req.payload.clone(),
        };
        let bytes = postcard::to_allocvec(&stored).map_err(unavailable)?;
        self.records.insert((topic, partition, offset), bytes.as_slice()).map_err(unavailable)?;
        self.ends.insert((topic, partition), (offset + 1, timestamp_ms)).map_err(unavailable)?;
        if offset % TIME_INDEX_INTERVAL == 0 {
            self.time_index.insert((topic, partition, timestamp_ms), offset).map_err(unavailable)?;
        }
        if let Some(idem) = &req.idempotency {
            self.idempotency
                .insert((topic, idem.key.as_str()), (partition, offset, idem.fingerprint))
                .map_err(unavailable)?;
            self.idempotency_expiry
                .insert((timestamp_ms, topic, idem.key.as_str()), (partition, offset))
                .map_err(unavailable)?;
        }
        Ok(Ok(Appended { partition, offset, timestamp_ms, replayed: false }))
    }
}

/// Forgets up to [`PURGE_BATCH`] idempotency keys appended before `now - retention`; `true`
/// when more are due. A key taken again since keeps its newer entry.
fn purge_expired_keys(db: &Database, retention: Duration) -> Result<bool, LogError> {
    let cutoff = now_ms().saturating_sub(retention.as_millis() as i64);
    let txn = db.begin_write().map_err(unavailable)?;
    let more = {
        let mut expiry = txn.open_table(IDEMPOTENCY_EXPIRY).map_err(unavailable)?;
        let mut keys = txn.open_table(IDEMPOTENCY).map_err(unavailable)?;
        let mut expired: Vec<(i64, String, String, (u32, u64))> = Vec::new();
        for entry in expiry.range((i64::MIN, "", "")..(cutoff, "", "")).map_err(unavailable)?.take(PURGE_BATCH + 1) {
            let (k, taken_at) = entry.map_err(unavailable)?;
            let (t, topic, key) = k.value();
            expired.push((t, topic.to_owned(), key.to_owned(), taken_at.value()));
        }
        let more = expired.len() > PURGE_BATCH;
        for (timestamp_ms, topic, key, taken_at) in expired.iter().take(PURGE_BATCH) {
            expiry.remove((*timestamp_ms, topic.as_str(), key.as_str())).map_err(unavailable)?;
            let current = keys.get((topic.as_str(), key.as_str())).map_err(unavailable)?.map(|g| g.value());
            if current.is_some_and(|(partition, offset, _)| (partition, offset) == *taken_at) {
                keys.remove((topic.as_str(), key.as_str())).map_err(unavailable)?;
            }
        }
        more
    };
    txn.commit().map_err(unavailable)?;
    Ok(more)
}

impl EmbeddedLog {
    /// The number of idempotency keys the log remembers (expired ones included until purged).
    pub fn idempotency_keys(&self) -> Result<u64, LogError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        txn.open_table(IDEMPOTENCY).map_err(unavailable)?.len().map_err(unavailable)
    }
}

fn topic_partitions(db: &Database, topic: &str) -> Result<u32, LogError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let table = txn.open_table(TOPICS).map_err(unavailable)?;
    table.get(topic).map_err(unavailable)?.map(|g| g.value()).ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))
}

fn read_records(db: &Database, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
    let partitions = topic_partitions(db, topic)?;
    if partition >= partitions {
        return Err(LogError::UnknownPartition { topic: topic.to_owned(), partition });
    }
    let txn = db.begin_read().map_err(unavailable)?;
    let table = txn.open_table(RECORDS).map_err(unavailable)?;
    let mut out = Vec::new();
    for entry in table.range((topic, partition, from)..=(topic, partition, u64::MAX)).map_err(unavailable)?.take(max) {
        let (k, v) = entry.map_err(unavailable)?;
        let stored: StoredRecord = postcard::from_bytes(v.value()).map_err(unavailable)?;
        out.push(Record {
            topic: topic.to_owned(),
            partition,
            offset: k.value().2,
            timestamp_ms: stored.timestamp_ms,
            key: stored.key,
            headers: stored.headers.into_iter().map(|(k, v)| (k, v.into_vec())).collect(),
            payload: stored.payload,
        });
    }
    Ok(out)
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        if partitions == 0 {
            return Err(LogError::PartitionCountMismatch { topic: topic.to_owned(), actual: 0, requested: 0 });
        }
        let topic = topic.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(TOPICS).map_err(unavailable)?;
                let existing = table.get(topic.as_str()).map_err(unavailable)?.map(|g| g.value());
                match existing {
                    Some(actual) if actual != partitions => {
                        return Err(LogError::PartitionCountMismatch { topic, actual, requested: partitions });
                    }
                    Some(_) => {}
                    None => {
                        table.insert(topic.as_str(), partitions).map_err(unavailable)?;
                    }
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        let topic = topic.to_owned();
        self.blocking(move |db| topic_partitions(db, &topic)).await
    }

    async fn append(&self, request: AppendRequest) -> Result<Appended, LogError> {
        let queue = self.queue.as_ref().ok_or_else(|| LogError::Unavailable("log is closed".into()))?;
        let (reply, answer) = oneshot::channel();
        queue.try_send(PendingAppend { request, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LogError::Unavailable("append queue is full".into()),
            mpsc::error::TrySendError::Closed(_) => LogError::Unavailable("log writer has stopped".into()),
        })?;
        answer.await.map_err(|_| LogError::Unavailable("log writer has stopped".into()))?
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Vec<Record>, LogError> {
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut arrivals = self.arrivals.watch(topic, partition);
        loop {
            // Once a commit has published where the partition ends (0: none since open), a reader
            // at that end has nothing to read and waits at once. A few records just committed (a
            // live reader's usual read) take less time to read than the hand-off to a blocking
            // thread and back; a catch-up read of thousands does not.
            let end = *arrivals.borrow_and_update();
            let topic_name = topic.to_owned();
            let records = if end > 0 && end <= from {
                Vec::new()
            } else if end > from && end - from <= INLINE_READ_RECORDS as u64 {
                read_records(&self.db, &topic_name, partition, from, max_records.min(INLINE_READ_RECORDS))?
            } else {
                self.blocking(move |db| read_records(db, &topic_name, partition, from, max_records)).await?
            };
            if !records.is_empty() {
                return Ok(records);
            }
            match tokio::time::timeout_at(deadline, arrivals.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(records),
            }
        }
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<u64>, LogError> {
        let topic = topic.to_owned();
        self.blocking(move |db| {
            let partitions = topic_partitions(db, &topic)?;
            let txn = db.begin_read().map_err(unavailable)?;
            let ends = txn.open_table(ENDS).map_err(unavailable)?;
            (0..partitions)
                .map(|p| Ok(ends.get((topic.as_str(), p)).map_err(unavailable)?.map_or(0, |g| g.value().0)))
                .collect()
        })
        .await
    }

    async fn offsets_for_timestamp(&self, topic: &str, timestamp_ms: i64) -> Result<Vec<Option<u64>>, LogError> {
        let topic = topic.to_owned();
        self.blocking(move |db| {
            let partitions = topic_partitions(db, &topic)?;
            let txn = db.begin_read().map_err(unavailable)?;
            let index = txn.open_table(TIME_INDEX).map_err(unavailable)?;
            let records = txn.open_table(RECORDS).map_err(unavailable)?;
            (0..partitions)
                .map(|p| {
                    // The last indexed record stamped before the time: every record before it
                    // is too, and the one sought is at most an index interval after it.
                    let start = match index
                        .range((topic.as_str(), p, i64::MIN)..(topic.as_str(), p, timestamp_ms))
                        .map_err(unavailable)?
                        .next_back()
                    {
                        Some(entry) => entry.map_err(unavailable)?.1.value(),
                        None => 0,
                    };
                    for entry in records
                        .range((topic.as_str(), p, start)..=(topic.as_str(), p, u64::MAX))
                        .map_err(unavailable)?
                    {
                        let (key, value) = entry.map_err(unavailable)?;
                        // The stamp is the record's first field: no need to decode the rest.
                        let (stamp, _) = postcard::take_from_bytes::<i64>(value.value()).map_err(unavailable)?;
                        if stamp >= timestamp_ms {
                            return Ok(Some(key.value().2));
                        }
                    }
                    Ok(None)
                })
                .collect()
        })
        .await
    }

    async fn commit_offsets(&self, group: &str, topic: &str, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        let (group, topic, offsets) = (group.to_owned(), topic.to_owned(), offsets.to_vec());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(GROUP_OFFSETS).map_err(unavailable)?;
                for (partition, offset) in offsets {
                    table.insert((group.as_str(), topic.as_str(), partition), offset).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn committed_offsets(&self, group: &str, topic: &str) -> Result<Vec<(u32, u64)>, LogError> {
        let (group, topic) = (group.to_owned(), topic.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(GROUP_OFFSETS).map_err(unavailable)?;
            let range = table
                .range((group.as_str(), topic.as_str(), 0)..=(group.as_str(), topic.as_str(), u32::MAX))
                .map_err(unavailable)?;
            range
                .map(|entry| {
                    let (k, v) = entry.map_err(unavailable)?;
                    Ok((k.value().2, v.value()))
                })
                .collect()
        })
        .await
    }

    async fn delete_records(&self, topic: &str, partition: u32, before: u64) -> Result<(), LogError> {
        let topic = topic.to_owned();
        self.blocking(move |db| {
            let partitions = topic_partitions(db, &topic)?;
            if partition >= partitions {
                return Err(LogError::UnknownPartition { topic, partition });
            }
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut records = txn.open_table(RECORDS).map_err(unavailable)?;
                let doomed: Vec<u64> = records
                    .range((topic.as_str(), partition, 0)..(topic.as_str(), partition, before))
                    .map_err(unavailable)?
                    .map(|entry| entry.map(|(k, _)| k.value().2).map_err(unavailable))
                    .collect::<Result<_, _>>()?;
                for offset in doomed {
                    records.remove((topic.as_str(), partition, offset)).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn health(&self) -> Result<(), LogError> {
        match (&self.queue, &self.writer) {
            (Some(queue), Some(writer)) if !queue.is_closed() && !writer.is_finished() => Ok(()),
            _ => Err(LogError::Unavailable("log writer has stopped".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_wakes_only_the_readers_of_the_partitions_it_appended_to() {
        let arrivals = Arrivals::default();
        let first = arrivals.watch("persons", 0);
        let mut second = arrivals.watch("persons", 1);
        let other_topic = arrivals.watch("persons.dlq", 1);
        arrivals.committed([("persons", 1, 7), ("persons", 1, 8)].into_iter());
        assert!(!first.has_changed().unwrap(), "nothing was appended to partition 0");
        assert!(!other_topic.has_changed().unwrap(), "nor to the other topic");
        assert!(second.has_changed().unwrap());
        assert_eq!(*second.borrow_and_update(), 9, "the offset after the last record");
        arrivals.committed([("persons", 0, 0)].into_iter());
        assert!(first.has_changed().unwrap());
        assert!(!second.has_changed().unwrap());
    }
}
