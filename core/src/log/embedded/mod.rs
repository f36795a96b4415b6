//! The embedded event log: every partition of every topic in one redb file, with a journal.
//!
//! - `journal`: where group commits become durable.
//! - `tail`: records journaled and not yet in redb, which reads at a partition's end get from
//!   memory.
//!
//! ## Group commit
//! Appenders do not write themselves: they queue their record on a bounded channel, and one
//! writer thread takes whatever is queued as one group, assigns positions, writes the group's
//! records to the journal as one frame and syncs it, then answers every waiter. Under load,
//! hundreds of appends share one sync; when idle, a lone append is committed at once. The
//! bounded queue is the backpressure: when it is full, appends fail fast with
//! [`LogError::Unavailable`] rather than pile up memory.
//!
//! ## Flushing
//! Every [`EmbeddedLogOptions::flush_interval`] (or [`EmbeddedLogOptions::flush_records`]), the
//! writer closes its journal file and starts another; the flusher thread moves the closed file's
//! records into redb in one durable transaction, then hands the file back to be written over
//! for later groups (beyond two spare ones, deletes it). Opening the log applies
//! the journal files left by a crash before anything else. Should the flusher fall
//! [`EmbeddedLogOptions::max_unflushed_records`] behind, appends are refused until it catches up.
//!
//! ## Tables
//! - `topics`: topic → partition count, fixed at creation.
//! - `records`: (topic, partition, offset) → postcard-encoded [`StoredRecord`].
//! - `ends`: (topic, partition) → (next offset, last timestamp).
//! - `time_index`: (topic, partition, timestamp) → first offset with that timestamp.
//! - `group_offsets`: (group, topic, partition) → next offset to read.
//! - `idempotency`: (topic, key) → (partition, offset, request fingerprint).
//! - `journal`: the number of the last journaled group the tables hold.

mod journal;
mod tail;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use self::journal::{JournalFile, JournalGroup, JournaledAppend};
use self::tail::{Located, Tail, TakenKey};
use super::{AppendRequest, Appended, EventLog, LogError, Record};
use crate::partition::partition_for;

const TOPICS: TableDefinition<&str, u32> = TableDefinition::new("topics");
const RECORDS: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("records");
const ENDS: TableDefinition<(&str, u32), (u64, i64)> = TableDefinition::new("ends");
const TIME_INDEX: TableDefinition<(&str, u32, i64), u64> = TableDefinition::new("time_index");
/// The time index holds every this-many-th record of a partition, the way Kafka's is sparse: a
/// look-up reads at most this many records past the entry it finds, and a flush writes the
/// index's page only once in this many records. Logs written when every record was indexed
/// read the same way.
const TIME_INDEX_INTERVAL: u64 = 32;
const GROUP_OFFSETS: TableDefinition<(&str, &str, u32), u64> = TableDefinition::new("group_offsets");
const IDEMPOTENCY: TableDefinition<(&str, &str), (u32, u64, [u8; 32])> = TableDefinition::new("idempotency");
/// Idempotency keys by the log time of their append, with the position they were taken at, so
/// expired ones are purged by a range scan.
const IDEMPOTENCY_EXPIRY: TableDefinition<(i64, &str, &str), (u32, u64)> = TableDefinition::new("idempotency_expiry");
/// The number of the last journaled group the tables hold, under [`APPLIED_GROUP`].
const JOURNAL: TableDefinition<&str, u64> = TableDefinition::new("journal");
const APPLIED_GROUP: &str = "applied";
/// Most keys one purge forgets, so the flusher never stalls long on a backlog; the rest go at
/// its next round.
const PURGE_BATCH: usize = 10_000;
/// Closed journal files waiting for the flusher before the writer waits for it.
const FLUSH_QUEUE: usize = 2;
/// Flushed journal files kept to be written over instead of deleted.
const SPARE_JOURNALS: usize = 2;

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

impl StoredRecord {
    fn into_record(self, topic: &str, partition: u32, offset: u64) -> Record {
        Record {
            topic: topic.to_owned(),
            partition,
            offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key,
            headers: self.headers.into_iter().map(|(k, v)| (k, v.into_vec())).collect(),
            payload: self.payload,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EmbeddedLogOptions {
    /// Appends waiting for the writer thread before new ones are refused.
    pub queue_capacity: usize,
    /// Most appends committed in one group.
    pub max_batch: usize,
    /// redb's page cache. Reads past it go to the OS page cache, so this bounds the log's own
    /// memory however large the log grows.
    pub cache_bytes: usize,
    /// How long an idempotency key is remembered (from its append's log time).
    pub idempotency_retention: Duration,
    /// Longest a journaled record waits before the flusher moves it into redb.
    pub flush_interval: Duration,
    /// Journaled records that close a journal file for the flusher before the interval is up.
    pub flush_records: usize,
    /// Records journaled and not yet flushed past which appends are refused: bounds the tail's
    /// memory when redb cannot keep up or fails.
    pub max_unflushed_records: usize,
}

impl Default for EmbeddedLogOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 8192,
            max_batch: 1024,
            cache_bytes: 16 << 20,
            idempotency_retention: Duration::from_secs(24 * 3600),
            flush_interval: Duration::from_millis(100),
            flush_records: 8192,
            max_unflushed_records: 256 * 1024,
        }
    }
}

struct PendingAppend {
    request: AppendRequest,
    reply: oneshot::Sender<Result<Appended, LogError>>,
    /// When it was queued: the writer reports how long each append waited for its answer
    /// (`callisto_log_append_wait_seconds`), beside how long the group commit took.
    queued_at: Instant,
}

enum WriterMessage {
    Append(PendingAppend),
    /// Flush everything appended so far into redb, then answer.
    Flush(oneshot::Sender<Result<(), LogError>>),
}

pub struct EmbeddedLog {
    db: Arc<Database>,
    queue: Option<SyncSender<WriterMessage>>,
    writer: Option<JoinHandle<()>>,
    flusher: Option<JoinHandle<()>>,
    /// Set while the log closes: the flusher stops retrying a failing flush, leaving the
    /// journal to the next open.
    closing: Arc<AtomicBool>,
    /// Group commits since open.
    commits: Arc<AtomicU64>,
    /// Where each partition ends, published after every commit that appends to it, so a
    /// long-polling reader wakes on new records of its own partition instead of polling.
    arrivals: Arc<Arrivals>,
    tail: Arc<Tail>,
}

/// A read that finds at most this many records in redb runs on the calling task; more go to a
/// blocking thread.
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
    /// Opens (or creates) the log file at `path`, applies what its journal holds past the
    /// tables, and starts its writer and flusher threads.
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
            txn.open_table(JOURNAL).map_err(unavailable)?;
            txn.commit().map_err(unavailable)?;
        }
        let last_group = recover(&db, path)?;
        let journal = JournalFile::create(path, last_group + 1).map_err(unavailable)?;
        let db = Arc::new(db);
        let (queue, messages) = std::sync::mpsc::sync_channel(options.queue_capacity.max(1));
        let (flushes, jobs) = std::sync::mpsc::sync_channel(FLUSH_QUEUE);
        let (spare, spares) = std::sync::mpsc::sync_channel(SPARE_JOURNALS);
        let commits = Arc::new(AtomicU64::new(0));
        let arrivals = Arc::new(Arrivals::default());
        let tail = Arc::new(Tail::default());
        let closing = Arc::new(AtomicBool::new(false));
        let flusher = {
            let (db, tail, closing) = (db.clone(), tail.clone(), closing.clone());
            let retention = options.idempotency_retention;
            std::thread::Builder::new()
                .name("callisto-log-flusher".into())
                .spawn(move || flusher_loop(&db, jobs, &spare, &tail, retention, &closing))
                .map_err(unavailable)?
        };
        let writer = {
            let writer = Writer {
                db: db.clone(),
                log_path: path.to_path_buf(),
                journal: Some(journal),
                next_group: last_group + 1,
                unflushed: Vec::new(),
                journal_opened: Instant::now(),
                partitions: HashMap::new(),
                ends: HashMap::new(),
                tail: tail.clone(),
                flushes,
                spares,
                failed: None,
                options,
            };
            let (commits, arrivals) = (commits.clone(), arrivals.clone());
            std::thread::Builder::new()
                .name("callisto-log-writer".into())
                .spawn(move || writer.run(messages, &commits, &arrivals))
                .map_err(unavailable)?
        };
        Ok(Self {
            db,
            queue: Some(queue),
            writer: Some(writer),
            flusher: Some(flusher),
            closing,
            commits,
            arrivals,
            tail,
        })
    }

    /// How many group commits the writer has made since open.
    pub fn commit_count(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The number of idempotency keys the log remembers (expired ones included until purged).
    pub fn idempotency_keys(&self) -> Result<u64, LogError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let keys = txn.open_table(IDEMPOTENCY).map_err(unavailable)?;
        let mut count = keys.len().map_err(unavailable)?;
        for (topic, key) in self.tail.keys() {
            if keys.get((topic.as_str(), key.as_str())).map_err(unavailable)?.is_none() {
                count += 1;
            }
        }
        Ok(count)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(unavailable)?
    }

    /// Waits until redb holds every record appended so far.
    async fn flush(&self) -> Result<(), LogError> {
        let queue = self.queue.clone().ok_or_else(|| LogError::Unavailable("log is closed".into()))?;
        let (done, flushed) = oneshot::channel();
        // The queue may be full under load: wait for room off the async threads.
        let sent = tokio::task::spawn_blocking(move || queue.send(WriterMessage::Flush(done)).is_ok());
        if !sent.await.map_err(unavailable)? {
            return Err(LogError::Unavailable("log writer has stopped".into()));
        }
        flushed.await.map_err(|_| LogError::Unavailable("log flusher has stopped".into()))?
    }

    /// Up to `max` records of a partition from `from` on, from redb below where its tail
    /// starts and from memory after.
    async fn read_from(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, LogError> {
        let mut records = Vec::new();
        let mut at = from;
        loop {
            let wanted = max - records.len();
            let below = match self.tail.read(topic, partition, at, wanted) {
                Located::InMemory(more) => {
                    records.extend(more);
                    return Ok(records);
                }
                Located::FlushedBelow(below) => below,
                Located::Untracked => u64::MAX,
            };
            let topic_name = topic.to_owned();
            let flushed = if below.saturating_sub(at) <= INLINE_READ_RECORDS as u64 {
                read_records(&self.db, topic, partition, at..below, wanted)?
            } else {
                self.blocking(move |db| read_records(db, &topic_name, partition, at..below, wanted)).await?
            };
            let complete = flushed.len() < wanted;
            records.extend(flushed);
            if records.len() >= max || below == u64::MAX {
                return Ok(records);
            }
            // redb had nothing more below its line (or the line moved): the rest is past it.
            at = if complete { below } else { records.last().map_or(below, |r| r.offset + 1) };
        }
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        // Closing the queue lets the writer commit what is queued, hand its journal to the
        // flusher and exit; joining both means the files are released when `drop` returns, so
        // the same process can reopen them.
        self.closing.store(true, Ordering::Relaxed);
        self.queue.take();
        for thread in [self.writer.take(), self.flusher.take()].into_iter().flatten() {
            let _ = thread.join();
        }
    }
}

/// A closed journal file's appends, for the flusher to move into redb.
struct FlushJob {
    /// The journal file that holds them, handed back to be written over (or deleted) once redb
    /// holds them; `None` when the writer goes on writing to it (its groups are then skipped
    /// when it is read).
    journal: Option<PathBuf>,
    appends: Vec<JournaledAppend<'static>>,
    last_group: u64,
    done: Option<oneshot::Sender<Result<(), LogError>>>,
}

/// The writer thread's state: positions, the journal file, and what it holds unflushed.
struct Writer {
    db: Arc<Database>,
    log_path: PathBuf,
    journal: Option<JournalFile>,
    next_group: u64,
    /// The appends in journal files not yet handed to the flusher.
    unflushed: Vec<JournaledAppend<'static>>,
    journal_opened: Instant,
    /// Partition counts of the topics appended to.
    partitions: HashMap<String, u32>,
    /// Per topic and partition, the next offset and the last timestamp.
    ends: HashMap<(String, u32), (u64, i64)>,
    tail: Arc<Tail>,
    flushes: SyncSender<FlushJob>,
    /// Flushed journal files the flusher hands back to be written over.
    spares: Receiver<PathBuf>,
    /// Set when a failed group's frame could not be removed from the journal: the writer stops,
    /// and the next open settles what the journal holds.
    failed: Option<String>,
    options: EmbeddedLogOptions,
}

impl Writer {
    fn run(mut self, messages: Receiver<WriterMessage>, commits: &AtomicU64, arrivals: &Arrivals) {
        let max_batch = self.options.max_batch.max(1);
        let mut batch = Vec::with_capacity(max_batch);
        let mut flushes = Vec::new();
        loop {
            match messages.recv_timeout(self.options.flush_interval) {
                Ok(first) => {
                    let mut next = Some(first);
                    while let Some(message) = next.take() {
                        match message {
                            WriterMessage::Append(pending) => batch.push(pending),
                            WriterMessage::Flush(done) => flushes.push(done),
                        }
                        if batch.len() < max_batch {
                            next = messages.try_recv().ok();
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if !batch.is_empty() {
                self.commit(&mut batch, commits, arrivals);
            }
            if self.failed.is_some() {
                // The journal cannot be trusted to hold only what was acknowledged: stop, and
                // let health report it, until a restart settles the journal.
                for done in flushes.drain(..) {
                    let _ = done.send(Err(LogError::Unavailable("log writer has stopped".into())));
                }
                break;
            }
            for done in flushes.drain(..) {
                self.hand_over(Some(done), false);
            }
            let due = self.unflushed.len() >= self.options.flush_records
                || self.journal_opened.elapsed() >= self.options.flush_interval;
            if due && !self.unflushed.is_empty() {
                self.hand_over(None, false);
            }
        }
        // Closed: everything to the flusher, and no new journal file.
        self.hand_over(None, true);
    }

    /// Commits one group and answers its appenders.
    fn commit(&mut self, batch: &mut Vec<PendingAppend>, commits: &AtomicU64, arrivals: &Arrivals) {
        let started = Instant::now();
        let outcome = self.commit_group(batch);
        metrics::histogram!("callisto_log_group_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("callisto_log_group_commit_size").record(batch.len() as f64);
        match outcome {
            Ok(results) => {
                commits.fetch_add(1, Ordering::Relaxed);
                arrivals.committed(batch.iter().zip(&results).filter_map(|(pending, result)| {
                    let appended = result.as_ref().ok().filter(|a| !a.replayed)?;
                    Some((pending.request.topic.as_str(), appended.partition, appended.offset))
                }));
                let waited = metrics::histogram!("callisto_log_append_wait_seconds");
                for (pending, result) in batch.drain(..).zip(results) {
                    waited.record(pending.queued_at.elapsed().as_secs_f64());
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
    }

    /// Positions the group's appends, journals them and hands them to the tail. Returns each
    /// request's answer; an `Err` fails them all, and then nothing of the group was committed.
    fn commit_group(&mut self, batch: &[PendingAppend]) -> Result<Vec<Result<Appended, LogError>>, LogError> {
        if self.tail.len() >= self.options.max_unflushed_records {
            return Err(LogError::Unavailable("the log's flusher is behind; try again shortly".into()));
        }
        let retention = self.options.idempotency_retention.as_millis() as i64;
        let mut results = Vec::with_capacity(batch.len());
        let mut appends: Vec<JournaledAppend<'static>> = Vec::new();
        let mut records = Vec::new();
        // Positions and keys this group takes, applied to the writer's own only once it commits.
        let mut ends: HashMap<(String, u32), (u64, i64)> = HashMap::new();
        let mut keys: HashMap<(String, String), TakenKey> = HashMap::new();
        for pending in batch {
            let request = &pending.request;
            let topic = request.topic.as_str();
            let Some(partitions) = self.partitions(topic)? else {
                results.push(Err(LogError::UnknownTopic(request.topic.clone())));
                continue;
            };
            if let Some(idem) = &request.idempotency {
                let id = (request.topic.clone(), idem.key.clone());
                let seen = match keys.get(&id).or(self.tail.key(topic, &idem.key).as_ref()) {
                    Some(taken) => Some(*taken),
                    None => self.flushed_key(topic, &idem.key)?,
                };
                // A key older than the retention is forgotten: this request appends, and takes it.
                if let Some(seen) = seen.filter(|seen| now_ms().saturating_sub(seen.timestamp_ms) <= retention) {
                    results.push(if seen.fingerprint == idem.fingerprint {
                        Ok(Appended {
                            partition: seen.partition,
                            offset: seen.offset,
                            timestamp_ms: seen.timestamp_ms,
                            replayed: true,
                        })
                    } else {
                        Err(LogError::IdempotencyConflict(idem.key.clone()))
                    });
                    continue;
                }
            }
            let partition = partition_for(&request.key, partitions);
            let position = (request.topic.clone(), partition);
            let (offset, last_ts) = match ends.get(&position) {
                Some(end) => *end,
                None => self.end(topic, partition)?,
            };
            let timestamp_ms = now_ms().max(last_ts);
            let stored = StoredRecord {
                timestamp_ms,
                key: request.key.clone(),
                headers: request
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_bytes::ByteBuf::from(v.clone())))
                    .collect(),
                payload: request.payload.clone(),
            };
            let taken = request.idempotency.as_ref().map(|idem| {
                let taken = TakenKey { partition, offset, fingerprint: idem.fingerprint, timestamp_ms };
                keys.insert((request.topic.clone(), idem.key.clone()), taken);
                (idem.key.clone(), taken)
            });
            appends.push(JournaledAppend {
                topic: request.topic.clone().into(),
                partition,
                offset,
                timestamp_ms,
                record: postcard::to_allocvec(&stored).map_err(unavailable)?.into(),
                idempotency: request.idempotency.as_ref().map(|idem| (idem.key.clone().into(), idem.fingerprint)),
            });
            records.push((stored.into_record(topic, partition, offset), taken));
            ends.insert(position, (offset + 1, timestamp_ms));
            results.push(Ok(Appended { partition, offset, timestamp_ms, replayed: false }));
        }
        if appends.is_empty() {
            return Ok(results);
        }
        let journal = self.journal.as_mut().ok_or_else(|| LogError::Unavailable("log is closed".into()))?;
        let group = JournalGroup { sequence: self.next_group, appends };
        let rewind_to = journal.len();
        if let Err(e) = journal.append(&group) {
            // The appenders hear that the group failed: it must not come back from the journal.
            if let Err(rewind) = journal.rewind(rewind_to) {
                tracing::error!(error = %rewind, "a failed group could not be removed from the log journal");
                self.failed = Some(rewind.to_string());
            }
            return Err(unavailable(e));
        }
        self.next_group += 1;
        self.ends.extend(ends);
        self.tail.appended(records);
        self.unflushed.extend(group.appends);
        Ok(results)
    }

    /// The partition count of `topic`, `None` when there is no such topic.
    fn partitions(&mut self, topic: &str) -> Result<Option<u32>, LogError> {
        if let Some(partitions) = self.partitions.get(topic) {
            return Ok(Some(*partitions));
        }
        let found = match topic_partitions(&self.db, topic) {
            Ok(partitions) => partitions,
            Err(LogError::UnknownTopic(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.partitions.insert(topic.to_owned(), found);
        Ok(Some(found))
    }

    /// The next offset and last timestamp of a partition: the writer's own once it has
    /// appended to it, redb's before (it holds every earlier record by then).
    fn end(&mut self, topic: &str, partition: u32) -> Result<(u64, i64), LogError> {
        if let Some(end) = self.ends.get(&(topic.to_owned(), partition)) {
            return Ok(*end);
        }
        let txn = self.db.begin_read().map_err(unavailable)?;
        let ends = txn.open_table(ENDS).map_err(unavailable)?;
        let end = ends.get((topic, partition)).map_err(unavailable)?.map_or((0, i64::MIN), |g| g.value());
        self.ends.insert((topic.to_owned(), partition), end);
        Ok(end)
    }

    /// Where a flushed append took `key`, with its log time.
    fn flushed_key(&self, topic: &str, key: &str) -> Result<Option<TakenKey>, LogError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let keys = txn.open_table(IDEMPOTENCY).map_err(unavailable)?;
        let Some((partition, offset, fingerprint)) = keys.get((topic, key)).map_err(unavailable)?.map(|g| g.value())
        else {
            return Ok(None);
        };
        let records = txn.open_table(RECORDS).map_err(unavailable)?;
        let timestamp_ms = records
            .get((topic, partition, offset))
            .map_err(unavailable)?
            .and_then(|g| postcard::from_bytes::<StoredRecord>(g.value()).ok())
            .map_or(0, |r| r.timestamp_ms);
        Ok(Some(TakenKey { partition, offset, fingerprint, timestamp_ms }))
    }

    /// Hands what is unflushed to the flusher, closing the journal file that holds it and
    /// starting another (none when `closing`), with `done` to answer once redb holds it.
    fn hand_over(&mut self, done: Option<oneshot::Sender<Result<(), LogError>>>, closing: bool) {
        if self.unflushed.is_empty() && done.is_none() {
            return;
        }
        let closed = if self.unflushed.is_empty() {
            None
        } else if closing {
            self.journal.take().map(|journal| journal.path().to_path_buf())
        } else {
            let next = match self.spares.try_recv() {
                Ok(spare) => JournalFile::reuse(&spare, &self.log_path, self.next_group).or_else(|e| {
                    tracing::warn!(error = %e, "reusing a flushed log journal file failed; starting a new one");
                    let _ = std::fs::remove_file(&spare);
                    JournalFile::create(&self.log_path, self.next_group)
                }),
                Err(_) => JournalFile::create(&self.log_path, self.next_group),
            };
            match next {
                Ok(next) => self.journal.replace(next).map(|journal| journal.path().to_path_buf()),
                // The flush goes ahead; the file stays in use, and its flushed groups are skipped
                // when it is read.
                Err(e) => {
                    tracing::warn!(error = %e, "starting a new log journal file failed; the current one goes on");
                    None
                }
            }
        };
        self.journal_opened = Instant::now();
        let job = FlushJob {
            journal: closed,
            appends: std::mem::take(&mut self.unflushed),
            last_group: self.next_group - 1,
            done,
        };
        // Blocks while the flusher is behind: the appends queue up meanwhile, and past its
        // bound are refused.
        if let Err(failed) = self.flushes.send(job) {
            tracing::error!("the log flusher has stopped; the journal is applied on next open");
            if let Some(done) = failed.0.done {
                let _ = done.send(Err(LogError::Unavailable("log flusher has stopped".into())));
            }
        }
    }
}

/// Moves each closed journal file's appends into redb, in the order they were handed over,
/// retrying a failed flush until it succeeds: a later one must not pass it. Purges expired
/// idempotency keys between flushes.
fn flusher_loop(
    db: &Database,
    jobs: Receiver<FlushJob>,
    spares: &SyncSender<PathBuf>,
    tail: &Tail,
    retention: Duration,
    closing: &AtomicBool,
) {
    let purge_every = retention.min(Duration::from_secs(3600));
    let mut purged_at = Instant::now();
    while let Ok(job) = jobs.recv() {
        let mut backoff = Duration::from_millis(50);
        let flushed = loop {
            match flush(db, &job) {
                Ok(()) => break Ok(()),
                Err(e) if closing.load(Ordering::Relaxed) => break Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "flushing the log journal failed");
                    let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
                    std::thread::sleep(backoff + Duration::from_millis(jitter));
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        match flushed {
            Ok(()) => {
                tail.flushed(&job.appends);
                // Its groups are all in redb now, and are skipped when it is read: the writer may
                // write over it, or it goes.
                if let Some(path) = job.journal
                    && let Err(TrySendError::Full(path) | TrySendError::Disconnected(path)) = spares.try_send(path)
                    && let Err(e) = std::fs::remove_file(&path)
                {
                    tracing::warn!(error = %e, path = %path.display(), "removing a flushed log journal file failed");
                }
                if let Some(done) = job.done {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the log closed with a flush failing; its journal is applied on next open");
                if let Some(done) = job.done {
                    let _ = done.send(Err(e));
                }
                return;
            }
        }
        if purged_at.elapsed() >= purge_every {
            match purge_expired_keys(db, retention) {
                // More are due: the next round purges again.
                Ok(true) => {}
                Ok(false) => purged_at = Instant::now(),
                Err(e) => {
                    purged_at = Instant::now();
                    tracing::warn!(error = %e, "purging expired idempotency keys failed");
                }
            }
        }
    }
}

/// One durable redb transaction with a flush job's appends and the number of its last group.
fn flush(db: &Database, job: &FlushJob) -> Result<(), LogError> {
    if job.appends.is_empty() {
        return Ok(());
    }
    let txn = db.begin_write().map_err(unavailable)?;
    {
        let mut tables = FlushTables::open(&txn)?;
        for append in &job.appends {
            tables.store(append)?;
        }
        tables.set_applied_group(job.last_group)?;
    }
    txn.commit().map_err(unavailable)
}

/// Applies the journal files' groups past the tables' last one, in order of their numbers,
/// durably, and removes the files: what a crash left to redo. Returns the number of the last
/// group.
fn recover(db: &Database, path: &Path) -> Result<u64, LogError> {
    let files = journal::existing(path).map_err(unavailable)?;
    let contents = files.iter().map(std::fs::read).collect::<Result<Vec<_>, _>>().map_err(unavailable)?;
    let txn = db.begin_write().map_err(unavailable)?;
    let (last, appends) = {
        let mut tables = FlushTables::open(&txn)?;
        let applied = tables.applied_group()?;
        // A file written over since, or renamed by a rename a crash lost, may sit anywhere in
        // the listing: the numbers decide the order.
        let mut pending: Vec<JournalGroup<'_>> =
            contents.iter().flat_map(|c| journal::groups(c)).filter(|group| group.sequence > applied).collect();
        pending.sort_by_key(|group| group.sequence);
        let (mut last, mut appends) = (applied, 0);
        for group in &pending {
            if group.sequence != last + 1 {
                return Err(LogError::Unavailable(format!(
                    "the log's journal holds group {} after group {last}: groups are missing; the files {}-journal-* need attention",
                    group.sequence,
                    path.display()
                )));
            }
            for append in &group.appends {
                tables.store(append)?;
            }
            appends += group.appends.len();
            last = group.sequence;
        }
        tables.set_applied_group(last)?;
        (last, appends)
    };
    txn.commit().map_err(unavailable)?;
    for file in &files {
        std::fs::remove_file(file).map_err(unavailable)?;
    }
    if appends > 0 {
        tracing::info!(appends, last_group = last, "applied the log journal's appends past the tables");
    }
    Ok(last)
}

/// The tables a flush writes, opened once for the whole transaction.
struct FlushTables<'txn> {
    records: redb::Table<'txn, (&'static str, u32, u64), &'static [u8]>,
    ends: redb::Table<'txn, (&'static str, u32), (u64, i64)>,
    time_index: redb::Table<'txn, (&'static str, u32, i64), u64>,
    idempotency: redb::Table<'txn, (&'static str, &'static str), (u32, u64, [u8; 32])>,
    idempotency_expiry: redb::Table<'txn, (i64, &'static str, &'static str), (u32, u64)>,
    journal: redb::Table<'txn, &'static str, u64>,
}

impl<'txn> FlushTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, LogError> {
        Ok(Self {
            records: txn.open_table(RECORDS).map_err(unavailable)?,
            ends: txn.open_table(ENDS).map_err(unavailable)?,
            time_index: txn.open_table(TIME_INDEX).map_err(unavailable)?,
            idempotency: txn.open_table(IDEMPOTENCY).map_err(unavailable)?,
            idempotency_expiry: txn.open_table(IDEMPOTENCY_EXPIRY).map_err(unavailable)?,
            journal: txn.open_table(JOURNAL).map_err(unavailable)?,
        })
    }

    /// The number of the last journaled group these tables hold.
    fn applied_group(&self) -> Result<u64, LogError> {
        Ok(self.journal.get(APPLIED_GROUP).map_err(unavailable)?.map_or(0, |g| g.value()))
    }

    fn set_applied_group(&mut self, sequence: u64) -> Result<(), LogError> {
        self.journal.insert(APPLIED_GROUP, sequence).map_err(unavailable)?;
        Ok(())
    }

    /// Writes one record where it was appended, with its partition's end, time index entry and
    /// idempotency key.
    fn store(&mut self, append: &JournaledAppend<'_>) -> Result<(), LogError> {
        let JournaledAppend { ref topic, partition, offset, timestamp_ms, ref record, ref idempotency } = *append;
        let topic = topic.as_ref();
        self.records.insert((topic, partition, offset), record.as_ref()).map_err(unavailable)?;
        self.ends.insert((topic, partition), (offset + 1, timestamp_ms)).map_err(unavailable)?;
        if offset % TIME_INDEX_INTERVAL == 0 {
            self.time_index.insert((topic, partition, timestamp_ms), offset).map_err(unavailable)?;
        }
        if let Some((key, fingerprint)) = idempotency {
            self.idempotency.insert((topic, key.as_ref()), (partition, offset, *fingerprint)).map_err(unavailable)?;
            self.idempotency_expiry
                .insert((timestamp_ms, topic, key.as_ref()), (partition, offset))
                .map_err(unavailable)?;
        }
        Ok(())
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

fn topic_partitions(db: &Database, topic: &str) -> Result<u32, LogError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let table = txn.open_table(TOPICS).map_err(unavailable)?;
    table.get(topic).map_err(unavailable)?.map(|g| g.value()).ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))
}

fn read_records(
    db: &Database,
    topic: &str,
    partition: u32,
    offsets: std::ops::Range<u64>,
    max: usize,
) -> Result<Vec<Record>, LogError> {
    let partitions = topic_partitions(db, topic)?;
    if partition >= partitions {
        return Err(LogError::UnknownPartition { topic: topic.to_owned(), partition });
    }
    let txn = db.begin_read().map_err(unavailable)?;
    let table = txn.open_table(RECORDS).map_err(unavailable)?;
    let mut out = Vec::new();
    let range = (topic, partition, offsets.start)..(topic, partition, offsets.end);
    for entry in table.range(range).map_err(unavailable)?.take(max) {
        let (k, v) = entry.map_err(unavailable)?;
        let stored: StoredRecord = postcard::from_bytes(v.value()).map_err(unavailable)?;
        out.push(stored.into_record(topic, partition, k.value().2));
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
        let pending = PendingAppend { request, reply, queued_at: Instant::now() };
        queue.try_send(WriterMessage::Append(pending)).map_err(|e| match e {
            TrySendError::Full(_) => LogError::Unavailable("append queue is full".into()),
            TrySendError::Disconnected(_) => LogError::Unavailable("log writer has stopped".into()),
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
            // at that end has nothing to read and waits at once.
            let end = *arrivals.borrow_and_update();
            let records = if end > 0 && end <= from {
                Vec::new()
            } else {
                self.read_from(topic, partition, from, max_records).await?
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
        let topic_name = topic.to_owned();
        let flushed = self
            .blocking(move |db| {
                let partitions = topic_partitions(db, &topic_name)?;
                let txn = db.begin_read().map_err(unavailable)?;
                let ends = txn.open_table(ENDS).map_err(unavailable)?;
                (0..partitions)
                    .map(|p| Ok(ends.get((topic_name.as_str(), p)).map_err(unavailable)?.map_or(0, |g| g.value().0)))
                    .collect::<Result<Vec<u64>, LogError>>()
            })
            .await?;
        // The tail's end, where it has one, is past every flushed record.
        Ok(flushed
            .into_iter()
            .enumerate()
            .map(|(p, end)| self.tail.end(topic, p as u32).unwrap_or(end).max(end))
            .collect())
    }

    async fn offsets_for_timestamp(&self, topic: &str, timestamp_ms: i64) -> Result<Vec<Option<u64>>, LogError> {
        let (topic, tail) = (topic.to_owned(), self.tail.clone());
        let (flushed, unflushed) = self
            .blocking(move |db| {
                let partitions = topic_partitions(db, &topic)?;
                // The tail first, then redb: a record the flusher moves in between is found in
                // one or the other, and the earliest found is the answer.
                let unflushed: Vec<Option<u64>> =
                    (0..partitions).map(|p| tail.first_at_or_after(&topic, p, timestamp_ms)).collect();
                let txn = db.begin_read().map_err(unavailable)?;
                let index = txn.open_table(TIME_INDEX).map_err(unavailable)?;
                let records = txn.open_table(RECORDS).map_err(unavailable)?;
                let flushed = (0..partitions)
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
                    .collect::<Result<Vec<Option<u64>>, LogError>>()?;
                Ok((flushed, unflushed))
            })
            .await?;
        Ok(flushed
            .into_iter()
            .zip(unflushed)
            .map(|(flushed, unflushed)| match (flushed, unflushed) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
            .collect())
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
        // Into redb first: the records to delete must not come back from the journal.
        self.flush().await?;
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
        let running = |thread: &Option<JoinHandle<()>>| thread.as_ref().is_some_and(|t| !t.is_finished());
        if self.queue.is_some() && running(&self.writer) && running(&self.flusher) {
            Ok(())
        } else {
            Err(LogError::Unavailable("log writer or flusher has stopped".into()))
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
