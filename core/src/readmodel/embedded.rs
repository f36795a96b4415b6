//! The embedded [`ReadStore`]: documents, secondary indexes, timelines and checkpoints in one
//! redb file, each batch and its checkpoint in one write transaction. What a batch writes is
//! worked out on its partition's thread (fold, serialization, index rows), so partitions do
//! that in parallel; batches arriving together then share one transaction on the store's
//! single writer thread (a group commit), started at most every [`LIVE_LINGER`] while batches
//! keep coming. Those transactions are made durable at most every [`DURABLE_EVERY`], and at
//! once when they erase.
//!
//! ## Tables
//! - `persons`: person id → [`PersonDoc`] (postcard behind a layout byte; JSON in stores
//!   written by earlier builds).
//! - `persons_by_tag`: (tag, person id) and `persons_by_status`: (status, person id), so a
//!   filtered listing is a range scan from the cursor.
//! - `timeline_entries`: (partition, offset) → [`TimelineEntry`] (postcard behind a layout
//!   byte; JSON in stores written by earlier builds), in log order, so a batch appends its
//!   entries at the end of its partition's range instead of inserting each at a random place
//!   in a tree far larger than the page cache.
//! - `timeline_positions`: (person id, bucket number) → that person's timeline positions,
//!   [`BUCKET`] to a row, so a batch rewrites one row per person rather than one page per event;
//!   the last row, the one batches extend, sits under [`OPEN_ROW`] so a point look-up finds it.
//!   Each position after a person's first is the step from the one before, as a varint (see
//!   [`pack`]), a few bytes where fixed width took twelve.
//! - `checkpoints`: partition → last applied offset.
//!
//! Earlier layouts are migrated when the store is opened: a timeline kept in one `timeline`
//! table keyed by person and offset, and positions packed at fixed width in `timeline_index`.

use std::path::Path;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use tokio::sync::watch;
use uuid::Uuid;

use crate::group_commit::{GroupCommit, IdleFlush, Linger, Weigh, WriterOptions};

use super::{
    Checkpoints, EventBatch, ListFilter, Page, PersonDoc, ProjectedEvent, Projection, ReadStore, Status, StoreError,
    TimelineEntry, fold, timeline_entry,
};

const PERSONS: TableDefinition<&str, &[u8]> = TableDefinition::new("persons");
const BY_TAG: TableDefinition<(&str, &str), ()> = TableDefinition::new("persons_by_tag");
const BY_STATUS: TableDefinition<(&str, &str), ()> = TableDefinition::new("persons_by_status");
const TIMELINE: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("timeline_entries");
const TIMELINE_POSITIONS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("timeline_positions");
/// The index as earlier builds kept it: 12 bytes per position (partition, offset).
const TIMELINE_INDEX_FIXED: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("timeline_index");
/// The timeline's earlier layout, (person id, offset) → entry, migrated on open.
const TIMELINE_BY_PERSON: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("timeline");
const CHECKPOINTS: TableDefinition<u32, u64> = TableDefinition::new("checkpoints");

/// redb's page cache for the read models: bounded, so memory stays flat as they grow.
const CACHE_BYTES: usize = 16 << 20;
/// Batches of at most this many events are prepared on the calling task (see
/// [`SharedDb::quick_read`]).
const INLINE_BATCH_EVENTS: usize = 32;

fn unavailable<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A redb database for blocking tasks: used under the read lock (redb serialises writers
/// itself), compacted under the write lock, as redb compaction needs the database to itself.
#[derive(Clone)]
pub struct SharedDb(Arc<RwLock<Database>>);

/// What a store's writer runs on its database once idle after a commit (see
/// [`SharedDb::group_commit`]).
pub type DatabaseFlush = Box<dyn FnMut(&Database) + Send>;

impl SharedDb {
    pub fn new(db: Database) -> Self {
        Self(Arc::new(RwLock::new(db)))
    }

    /// A [`GroupCommit`] writer thread `name` whose groups `commit` applies to this database;
    /// with `flush`, the writer also runs that on the database once it has been idle for its
    /// duration after a commit (see [`crate::group_commit::IdleFlush`]); with `linger`, commits
    /// of concurrent requests start at most that often, each request weighing what the function
    /// beside it says (see [`WriterOptions::linger`]).
    pub fn group_commit<R: Send + 'static, T: Send + 'static>(
        &self,
        name: &'static str,
        max_group: usize,
        flush: Option<(std::time::Duration, DatabaseFlush)>,
        linger: Option<(Linger, Weigh<R>)>,
        mut commit: impl FnMut(&Database, &[R]) -> Result<Vec<T>, StoreError> + Send + 'static,
    ) -> Result<GroupCommit<R, T>, StoreError> {
        let flush = flush.map(|(after, mut run)| {
            let db = self.0.clone();
            let run = move || match db.read() {
                Ok(db) => run(&db),
                Err(_) => tracing::warn!("the store's lock is poisoned; its last commits stay unflushed"),
            };
            IdleFlush { after, run: Box::new(run) }
        });
        let db = self.0.clone();
        let options = match linger {
            Some((linger, weigh)) => WriterOptions { flush, linger: Some(linger), weigh },
            None => WriterOptions { flush, ..WriterOptions::default() },
        };
        GroupCommit::start(name, max_group, options, move |group: &[R]| {
            commit(&*db.read().map_err(unavailable)?, group)
        })
    }

    /// Runs `f` on a blocking thread.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || f(&*db.read().map_err(unavailable)?)).await.map_err(unavailable)?
    }

    /// Runs `f`, a read of a few pages, on the calling thread when the database is free: for a
    /// point look-up the hand-off to a blocking thread and back costs more than the read itself
    /// (two context switches and a wake-up per request). While the database is being compacted,
    /// which can take a while, `f` runs on a blocking thread instead, so no async worker waits.
    pub async fn quick_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        if let Ok(db) = self.0.try_read() {
            return f(&db);
        }
        self.blocking(f).await
    }

    /// Compacts until the file shrinks no further. Free pages are only handed back to the file
    /// system at the end of the file, so this is what makes deleted data leave the disk file.
    pub async fn compact(&self) -> Result<(), StoreError> {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = db.write().map_err(unavailable)?;
            // redb compacts only once every commit is durable (commits that are not yet hold
            // on to pages the way live readers do); an empty durable commit makes them so.
            db.begin_write().map_err(unavailable)?.commit().map_err(unavailable)?;
            while db.compact().map_err(unavailable)? {}
            Ok(())
        })
        .await
        .map_err(unavailable)?
    }
}

/// One partition's batch as the writer applies it, with the checkpoint it reaches. Everything
/// in it was worked out and serialized by [`prepare`] on the partition's own thread, so the one
/// writer thread only writes.
struct Batch {
    partition: u32,
    through: u64,
    /// The events it applies: its weight in the writer's pacing (see [`LIVE_LINGER`]).
    events: usize,
    /// New timeline entries, and the scrubbed rewrites of stored ones.
    timeline: Vec<(Position, Vec<u8>)>,
    /// (person id, row key, packed row): the index rows that changed, each under its bucket
    /// number or, the last, under [`OPEN_ROW`].
    index_rows: Vec<(String, u32, Vec<u8>)>,
    persons: Vec<PersonWrite>,
    /// Whether it scrubs an erased person's data: such a batch commits durably at once, so an
    /// erasure the store has applied is not undone by a crash, not even until it is re-applied.
    erases: bool,
}

/// A person document to write, with the index entries that change with it.
struct PersonWrite {
    id: String,
    bytes: Vec<u8>,
    tags_removed: Vec<String>,
    tags_added: Vec<String>,
    /// (status before, status after), when it changed.
    status_moved: Option<(Option<Status>, Status)>,
}

impl PersonWrite {
    fn new(before: Option<&PersonDoc>, after: &PersonDoc) -> Result<Self, StoreError> {
        let old_tags = before.map(|d| d.tags.as_slice()).unwrap_or_default();
        let old_status = before.map(|d| d.status);
        Ok(Self {
            id: after.person_id.to_string(),
            bytes: encode_person(after)?,
            tags_removed: old_tags.iter().filter(|t| !after.tags.contains(t)).cloned().collect(),
            tags_added: after.tags.iter().filter(|t| !old_tags.contains(t)).cloned().collect(),
            status_moved: (old_status != Some(after.status)).then_some((old_status, after.status)),
        })
    }
}

/// Most partition batches one transaction takes.
const MAX_GROUP: usize = 64;

pub struct EmbeddedReadStore {
    db: SharedDb,
    progress: watch::Sender<Checkpoints>,
    /// Batches of every partition share transactions (see [`crate::group_commit`]).
    batches: GroupCommit<Batch, ()>,
}

impl std::fmt::Debug for EmbeddedReadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedReadStore").finish_non_exhaustive()
    }
}

impl EmbeddedReadStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(unavailable)?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(PERSONS).map_err(unavailable)?;
        txn.open_table(BY_TAG).map_err(unavailable)?;
        txn.open_table(BY_STATUS).map_err(unavailable)?;
        txn.open_table(TIMELINE).map_err(unavailable)?;
        txn.open_table(TIMELINE_POSITIONS).map_err(unavailable)?;
        txn.open_table(CHECKPOINTS).map_err(unavailable)?;
        migrate_fixed_index(&txn)?;
        migrate_timeline(&txn)?;
        txn.commit().map_err(unavailable)?;
        let checkpoints = read_checkpoints(&db)?;
        let (progress, _) = watch::channel(checkpoints);
        let db = SharedDb::new(db);
        let synced = Arc::new(std::sync::Mutex::new(Synced::new()));
        let flush: DatabaseFlush = {
            let synced = synced.clone();
            Box::new(move |db: &Database| {
                if let Err(e) = make_durable(db, &synced) {
                    tracing::warn!(error = %e, "the documents store could not make its last commits durable");
                }
            })
        };
        let batches = db.group_commit(
            "callisto-documents-writer",
            MAX_GROUP,
            Some((DURABLE_EVERY, flush)),
            Some((LIVE_LINGER, |batch: &Batch| batch.events)),
            move |db: &Database, group: &[Batch]| commit_batches(db, group, &synced),
        )?;
        Ok(Self { db, progress, batches })
    }
}

/// How often the documents store's commits are made durable. Those in between are visible to
/// readers at once but reach the disk with the next durable one, or once the writer has been
/// idle this long, the trade MongoDB's journal makes with its 100 ms commit interval. A read
/// model can afford it where the log cannot: its checkpoints commit with its documents, so a
/// crash loses at most about twice this much projection, which the projector applies again from
/// the log on restart; nothing acknowledged is lost. Live traffic had made an fsync of this
/// file for every few events, on the disk whose fsyncs commands wait on.
const DURABLE_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// While batches come from several partitions at once, the documents writer starts a commit at
/// most this often (see [`WriterOptions::linger`]). Live traffic otherwise commits a few events
/// at a time, and each commit copies and writes out the touched pages of every table: under a
/// saturating command load 2 ms cut the writer's CPU per command by about a third, CPU the
/// request path on the same cores gets instead. It adds at most this much to a document's
/// freshness; a lone batch, and a catch-up batch whose commit takes longer than this, do not
/// wait.
///
/// Above 4,000 events a second it grows with the rate, up to 10 ms at 20,000. Such a rate is
/// what saturates a small machine's commands, whose cores the writer shares, and the CPU its
/// fewer commits save goes to the commands (at 10 ms instead of 2 the writer spent about 40%
/// less per event; `BENCHMARKS.md`, twentieth pass). A document then waits longer to be
/// visible, but a projector that shares its cores with a saturating load falls behind by more
/// than that anyway; at a few thousand events a second, where read-your-writes is measured,
/// the linger stays at 2 ms.
const LIVE_LINGER: Linger =
    Linger { least: std::time::Duration::from_millis(2), most: std::time::Duration::from_millis(10), knee: 4_000.0 };

/// When the documents store last committed durably, and whether commits since are not yet.
struct Synced {
    at: std::time::Instant,
    pending: bool,
}

impl Synced {
    fn new() -> Self {
        Self { at: std::time::Instant::now(), pending: false }
    }

    /// Whether the next commit is to be durable by time alone.
    fn due(&self) -> bool {
        self.at.elapsed() >= DURABLE_EVERY
    }

    fn committed(&mut self, durable: bool) {
        if durable {
            *self = Self { at: std::time::Instant::now(), pending: false };
        } else {
            self.pending = true;
        }
    }
}

/// Applies every batch of `group` with its checkpoint, in one transaction. Partitions never
/// share a person, so batches of different partitions do not interact. The transaction is
/// durable when the last durable one is [`DURABLE_EVERY`] old, or when it erases.
fn commit_batches(db: &Database, group: &[Batch], synced: &std::sync::Mutex<Synced>) -> Result<Vec<()>, StoreError> {
    let mut txn = db.begin_write().map_err(unavailable)?;
    let mut synced = synced.lock().map_err(unavailable)?;
    let durable = synced.due() || group.iter().any(|batch| batch.erases);
    if !durable {
        txn.set_durability(redb::Durability::None).map_err(unavailable)?;
    }
    {
        let mut tables = Tables::open(&txn)?;
        for batch in group {
            tables.write(batch)?;
            let current = tables.checkpoints.get(batch.partition).map_err(unavailable)?.map(|g| g.value());
            if current.is_none_or(|c| c < batch.through) {
                tables.checkpoints.insert(batch.partition, batch.through).map_err(unavailable)?;
            }
        }
    }
    txn.commit().map_err(unavailable)?;
    synced.committed(durable);
    Ok(vec![(); group.len()])
}

/// Makes every commit so far durable, when one is not yet: an empty durable transaction
/// persists the ones before it. After a durable commit it does nothing, so light traffic, whose
/// every commit is durable anyway, does not pay a second fsync for each.
fn make_durable(db: &Database, synced: &std::sync::Mutex<Synced>) -> Result<(), StoreError> {
    let mut synced = synced.lock().map_err(unavailable)?;
    if synced.pending {
        db.begin_write().map_err(unavailable)?.commit().map_err(unavailable)?;
        synced.committed(true);
    }
    Ok(())
}

/// Whether the store holds `table`: an earlier layout's, which opening it would create.
fn holds_table(txn: &WriteTransaction, table: impl TableHandle) -> Result<bool, StoreError> {
    Ok(txn.list_tables().map_err(unavailable)?.any(|t| t.name() == table.name()))
}

/// Re-packs index rows kept at fixed width (see [`TIMELINE_INDEX_FIXED`]) into
/// `timeline_positions`, in the transaction that opens the store.
fn migrate_fixed_index(txn: &WriteTransaction) -> Result<(), StoreError> {
    if !holds_table(txn, TIMELINE_INDEX_FIXED)? {
        return Ok(());
    }
    {
        let old = txn.open_table(TIMELINE_INDEX_FIXED).map_err(unavailable)?;
        let mut tables = Tables::open(txn)?;
        // Rows come in order of person, then bucket, each appended after the one before.
        for row in old.iter().map_err(unavailable)? {
            let (key, value) = row.map_err(unavailable)?;
            let positions: Vec<Position> = value
                .value()
                .chunks_exact(12)
                .map(|chunk| {
                    let (partition, offset) = chunk.split_at(4);
                    (
                        u32::from_le_bytes(partition.try_into().expect("4 bytes")),
                        u64::from_le_bytes(offset.try_into().expect("8 bytes")),
                    )
                })
                .collect();
            tables.index_positions(key.value().0, &positions)?;
        }
    }
    txn.delete_table(TIMELINE_INDEX_FIXED).map_err(unavailable)?;
    tracing::info!("re-packed the documents store's timeline index");
    Ok(())
}

/// Moves a timeline kept in the earlier layout (one table keyed by person and offset) into
/// entries and index, in the transaction that opens the store.
fn migrate_timeline(txn: &WriteTransaction) -> Result<(), StoreError> {
    if !holds_table(txn, TIMELINE_BY_PERSON)? {
        return Ok(());
    }
    {
        let old = txn.open_table(TIMELINE_BY_PERSON).map_err(unavailable)?;
        let mut tables = Tables::open(txn)?;
        // The old table is ordered by person, then offset: each person's positions are indexed
        // when the next person's entries begin.
        let (mut person, mut positions) = (None::<String>, Vec::new());
        for entry in old.iter().map_err(unavailable)? {
            let (key, value) = entry.map_err(unavailable)?;
            let (id, offset) = key.value();
            let partition = decode::<TimelineEntry>(value.value())?.partition;
            tables.timeline.insert((partition, offset), value.value()).map_err(unavailable)?;
            if person.as_deref() != Some(id)
                && let Some(done) = person.replace(id.to_owned())
            {
                tables.index_positions(&done, &std::mem::take(&mut positions))?;
            }
            positions.push((partition, offset));
        }
        if let Some(done) = person {
            tables.index_positions(&done, &positions)?;
        }
    }
    txn.delete_table(TIMELINE_BY_PERSON).map_err(unavailable)?;
    tracing::info!("moved the documents store's timeline to the entries-and-index layout");
    Ok(())
}

fn read_checkpoints(db: &Database) -> Result<Checkpoints, StoreError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let table = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
    table
        .iter()
        .map_err(unavailable)?
        .map(|entry| {
            let (k, v) = entry.map_err(unavailable)?;
            Ok((k.value(), v.value()))
        })
        .collect()
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(corrupt)
}

fn corrupt<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Unavailable(format!("stored document is corrupt: {e}"))
}

/// The first byte of a person document stored as postcard. Person documents are the rows every
/// batch reads and rewrites all over the `persons` table, so their size is what a transaction
/// copies: postcard (16-byte ids, no field names) is well under half of their JSON. Postcard is
/// not self-describing, so the byte names the layout, and a later change to [`PersonDoc`] takes
/// a new one. JSON documents of earlier builds start with `{` and are still read; each is
/// rewritten in this layout the next time an event changes the person.
const PERSON_LAYOUT: u8 = 1;

fn encode_person(doc: &PersonDoc) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(doc, vec![PERSON_LAYOUT]).map_err(unavailable)
}

fn decode_person(bytes: &[u8]) -> Result<PersonDoc, StoreError> {
    match stored_as(PERSON_LAYOUT, bytes)? {
        Stored::Postcard(body) => postcard::from_bytes(body).map_err(corrupt),
        Stored::Json(json) => decode(json),
    }
}

/// A stored value's bytes, by the layout its first byte names.
enum Stored<'a> {
    /// Postcard, after the layout byte.
    Postcard(&'a [u8]),
    /// JSON as earlier builds wrote it: `{` and on.
    Json(&'a [u8]),
}

/// Tells a value stored as postcard behind the `layout` byte from JSON of earlier builds.
fn stored_as(layout: u8, bytes: &[u8]) -> Result<Stored<'_>, StoreError> {
    match bytes.split_first() {
        Some((&first, body)) if first == layout => Ok(Stored::Postcard(body)),
        Some((b'{', _)) => Ok(Stored::Json(bytes)),
        _ => Err(corrupt(format!("unknown layout {:?}", bytes.first()))),
    }
}

/// The first byte of a timeline entry stored as postcard ([`StoredEntry`]). Entries are nearly
/// all of what a rebuild writes, one per event: as JSON, field names, ids as 36-character text
/// and the position the row's key holds already took about three times the bytes of their
/// content. As with persons, JSON entries of earlier builds start with `{` and are still read.
const ENTRY_LAYOUT: u8 = 1;

/// A timeline entry as stored, less its position, which is the row's key.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredEntry {
    person_id: Uuid,
    event_id: Uuid,
    event_type: String,
    /// Seconds and nanoseconds since the epoch.
    occurred_at: (i64, u32),
    correlation_id: String,
    principal: Option<String>,
    /// The event's own fields as JSON text: their shape depends on the event type, and postcard
    /// only writes shapes known in advance.
    data: String,
    erased: bool,
}

fn encode_entry(entry: TimelineEntry) -> Result<Vec<u8>, StoreError> {
    let stored = StoredEntry {
        person_id: entry.person_id,
        event_id: entry.event_id,
        event_type: entry.event_type,
        occurred_at: (entry.occurred_at.timestamp(), entry.occurred_at.timestamp_subsec_nanos()),
        correlation_id: entry.correlation_id,
        principal: entry.principal,
        data: serde_json::to_string(&entry.data).map_err(unavailable)?,
        erased: entry.erased,
    };
    postcard::to_extend(&stored, vec![ENTRY_LAYOUT]).map_err(unavailable)
}

fn decode_entry((partition, offset): Position, bytes: &[u8]) -> Result<TimelineEntry, StoreError> {
    let stored: StoredEntry = match stored_as(ENTRY_LAYOUT, bytes)? {
        Stored::Postcard(body) => postcard::from_bytes(body).map_err(corrupt)?,
        Stored::Json(json) => return decode(json),
    };
    let (seconds, nanos) = stored.occurred_at;
    Ok(TimelineEntry {
        person_id: stored.person_id,
        partition,
        offset,
        event_id: stored.event_id,
        event_type: stored.event_type,
        occurred_at: chrono::DateTime::from_timestamp(seconds, nanos)
            .ok_or_else(|| corrupt(format!("time out of range: {seconds} s {nanos} ns")))?,
        correlation_id: stored.correlation_id,
        principal: stored.principal,
        data: serde_json::from_str(&stored.data).map_err(corrupt)?,
        erased: stored.erased,
    })
}

/// Where a timeline entry sits in `timeline_entries`: (partition, offset).
type Position = (u32, u64);

/// Positions per `timeline_positions` row: at most a few KiB even where each takes its widest.
const BUCKET: usize = 256;

/// The key of a person's last row, the one batches extend, which holds its own bucket number;
/// full rows are keyed by theirs. A point look-up finds it, where a range scan from the back
/// had cost more than every other read of a batch together.
const OPEN_ROW: u32 = u32::MAX;

/// Packs a row as postcard varints, its bucket number first, then each position: (0, offset
/// step) after one of the same partition with a lower offset, (partition + 1, offset) otherwise.
/// A person's events sit in one partition in log order, so a row is mostly steps of a byte or
/// two, and the index, which every batch reads and rewrites all over, takes a fraction of the
/// pages.
fn pack(bucket: u32, positions: &[Position]) -> Vec<u8> {
    let mut previous: Option<Position> = None;
    let steps: Vec<(u64, u64)> = positions
        .iter()
        .map(|&(partition, offset)| {
            let step = match previous {
                Some((p, o)) if p == partition && o < offset => (0, offset - o),
                _ => (u64::from(partition) + 1, offset),
            };
            previous = Some((partition, offset));
            step
        })
        .collect();
    postcard::to_allocvec(&(bucket, steps)).expect("integers always serialize")
}

/// The bucket number and positions of a row written by [`pack`].
fn unpack(bytes: &[u8]) -> Result<(u32, Vec<Position>), StoreError> {
    let (bucket, steps): (u32, Vec<(u64, u64)>) = postcard::from_bytes(bytes).map_err(corrupt)?;
    let mut previous: Option<Position> = None;
    let positions = steps
        .into_iter()
        .map(|(tag, offset)| {
            let position = match (tag, previous) {
                (0, Some((partition, before))) => {
                    (partition, before.checked_add(offset).ok_or_else(|| corrupt("a timeline offset overflows"))?)
                }
                (0, None) => return Err(corrupt("a timeline row starts with a step")),
                (tag, _) => (u32::try_from(tag - 1).map_err(corrupt)?, offset),
            };
            previous = Some(position);
            Ok(position)
        })
        .collect::<Result<_, _>>()?;
    Ok((bucket, positions))
}

/// A person's timeline positions in the order they were applied, read row by row as the
/// caller consumes them.
fn positions_of<'t, T>(
    index: &'t T,
    id: &str,
) -> Result<impl Iterator<Item = Result<Position, StoreError>> + 't, StoreError>
where
    T: ReadableTable<(&'static str, u32), &'static [u8]>,
{
    let rows = index.range((id, 0)..=(id, u32::MAX)).map_err(unavailable)?;
    Ok(rows.flat_map(|row| match row {
        Ok((_, value)) => match unpack(value.value()) {
            Ok((_, positions)) => positions.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        },
        Err(e) => vec![Err(unavailable(e))],
    }))
}

/// The tables batches write, opened once per transaction.
struct Tables<'txn> {
    persons: redb::Table<'txn, &'static str, &'static [u8]>,
    by_tag: redb::Table<'txn, (&'static str, &'static str), ()>,
    by_status: redb::Table<'txn, (&'static str, &'static str), ()>,
    timeline: redb::Table<'txn, (u32, u64), &'static [u8]>,
    timeline_positions: redb::Table<'txn, (&'static str, u32), &'static [u8]>,
    checkpoints: redb::Table<'txn, u32, u64>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            persons: txn.open_table(PERSONS).map_err(unavailable)?,
            by_tag: txn.open_table(BY_TAG).map_err(unavailable)?,
            by_status: txn.open_table(BY_STATUS).map_err(unavailable)?,
            timeline: txn.open_table(TIMELINE).map_err(unavailable)?,
            timeline_positions: txn.open_table(TIMELINE_POSITIONS).map_err(unavailable)?,
            checkpoints: txn.open_table(CHECKPOINTS).map_err(unavailable)?,
        })
    }

    /// Writes one prepared batch.
    fn write(&mut self, batch: &Batch) -> Result<(), StoreError> {
        for (position, bytes) in &batch.timeline {
            self.timeline.insert(*position, bytes.as_slice()).map_err(unavailable)?;
        }
        for (id, bucket, row) in &batch.index_rows {
            self.timeline_positions.insert((id.as_str(), *bucket), row.as_slice()).map_err(unavailable)?;
        }
        for person in &batch.persons {
            let id = person.id.as_str();
            self.persons.insert(id, person.bytes.as_slice()).map_err(unavailable)?;
            for tag in &person.tags_removed {
                self.by_tag.remove((tag.as_str(), id)).map_err(unavailable)?;
            }
            for tag in &person.tags_added {
                self.by_tag.insert((tag.as_str(), id), ()).map_err(unavailable)?;
            }
            if let Some((before, after)) = person.status_moved {
                if let Some(before) = before {
                    self.by_status.remove((before.as_str(), id)).map_err(unavailable)?;
                }
                self.by_status.insert((after.as_str(), id), ()).map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// Appends `positions` to the person's index rows (see [`extend_rows`]).
    fn index_positions(&mut self, id: &str, positions: &[Position]) -> Result<(), StoreError> {
        let last = last_row(&self.timeline_positions, id)?;
        for (bucket, row) in extend_rows(last, positions) {
            self.timeline_positions.insert((id, bucket), row.as_slice()).map_err(unavailable)?;
        }
        Ok(())
    }
}

/// The person's last index row: (bucket number, positions).
fn last_row<T>(index: &T, id: &str) -> Result<Option<(u32, Vec<Position>)>, StoreError>
where
    T: ReadableTable<(&'static str, u32), &'static [u8]>,
{
    match index.get((id, OPEN_ROW)).map_err(unavailable)? {
        Some(found) => Ok(Some(unpack(found.value())?)),
        None => Ok(None),
    }
}

/// The index rows, by key, that change when `positions` (ascending within each partition) are
/// appended after the person's `last` row: rows that fill up under their bucket number, the
/// last one under [`OPEN_ROW`]. Positions at or below the last one recorded for the same
/// partition were indexed already: a batch delivered again after a crash.
fn extend_rows(last: Option<(u32, Vec<Position>)>, positions: &[Position]) -> Vec<(u32, Vec<u8>)> {
    let (mut bucket, mut row) = last.unwrap_or_default();
    let recorded = row.last().copied();
    let mut rows = Vec::new();
    let mut changed = false;
    for &position in positions.iter().filter(|(p, o)| recorded.is_none_or(|(rp, ro)| rp != *p || ro < *o)) {
        if row.len() == BUCKET {
            rows.push((bucket, pack(bucket, &row)));
            bucket += 1;
            row.clear();
        }
        row.push(position);
        changed = true;
    }
    if changed {
        rows.push((OPEN_ROW, pack(bucket, &row)));
    }
    rows
}

/// A person as a batch folds them.
struct Folding {
    /// As stored before the batch.
    stored: Option<PersonDoc>,
    /// After the batch's events so far.
    current: Option<PersonDoc>,
    /// Where the batch's events for this person are in its timeline entries.
    entries: Vec<usize>,
    /// An erasure in the batch: the entries stored before it lose their content too.
    scrubs: bool,
}

/// Works out what a partition's batch writes, against the last commit: every event's timeline
/// entry, each person read once, folded in memory through the batch and written once, only
/// the tag and status index entries that changed, and the index rows the new positions go in.
/// Reading outside the writer is safe because partitions never share a person and a
/// partition's previous batch is committed before its next one is applied.
fn prepare(db: &Database, partition: u32, events: &[ProjectedEvent], through: u64) -> Result<Batch, StoreError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let stored_persons = txn.open_table(PERSONS).map_err(unavailable)?;
    let stored_entries = txn.open_table(TIMELINE).map_err(unavailable)?;
    let index = txn.open_table(TIMELINE_POSITIONS).map_err(unavailable)?;
    // Serialized at once: entries are the bulk of a batch, and a JSON tree per entry would be
    // held until the batch is written. Entry `i` is event `i`'s.
    let mut entries: Vec<(Position, Vec<u8>)> = Vec::with_capacity(events.len());
    let mut persons: std::collections::HashMap<String, Folding> = std::collections::HashMap::new();
    for ev in events {
        let person = match persons.entry(ev.event.meta().person_id.to_string()) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let found = stored_persons.get(entry.key().as_str()).map_err(unavailable)?;
                let stored = found.map(|g| decode_person(g.value())).transpose()?;
                entry.insert(Folding { current: stored.clone(), stored, entries: Vec::new(), scrubs: false })
            }
        };
        person.entries.push(entries.len());
        entries.push(((ev.partition, ev.offset), encode_entry(timeline_entry(ev))?));
        if person.current.as_ref().is_some_and(|d| d.has_applied(ev)) {
            continue;
        }
        if super::scrubs_timeline(person.current.as_ref(), ev) {
            person.scrubs = true;
            for &i in &person.entries {
                entries[i].1 = encode_entry(timeline_entry(&events[i]).scrubbed())?;
            }
        }
        person.current = fold(person.current.take(), ev);
    }
    let erases = persons.values().any(|person| person.scrubs);
    let mut batch = Batch {
        partition,
        through,
        events: events.len(),
        timeline: Vec::new(),
        index_rows: Vec::new(),
        persons: Vec::new(),
        erases,
    };
    for (id, person) in &persons {
        let positions: Vec<Position> = person.entries.iter().map(|&i| entries[i].0).collect();
        if person.scrubs {
            for position in positions_of(&index, id)? {
                let position = position?;
                let Some(stored) = stored_entries.get(position).map_err(unavailable)? else { continue };
                let entry = decode_entry(position, stored.value())?;
                if !entry.erased && !positions.contains(&position) {
                    batch.timeline.push((position, encode_entry(entry.scrubbed())?));
                }
            }
        }
        let rows = extend_rows(last_row(&index, id)?, &positions);
        batch.index_rows.extend(rows.into_iter().map(|(bucket, row)| (id.clone(), bucket, row)));
        if let Some(after) = person.current.as_ref().filter(|after| person.stored.as_ref() != Some(*after)) {
            batch.persons.push(PersonWrite::new(person.stored.as_ref(), after)?);
        }
    }
    batch.timeline.extend(entries);
    // In key order, so the writer dirties each page in one run: a transaction that dirties more
    // pages than the cache holds writes some out early, and an unordered batch came back to
    // many of them, reading and writing them again.
    batch.index_rows.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    batch.persons.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    Ok(batch)
}

fn cursor_after<'a>(prefix: &'a str, cursor: &'a Option<String>) -> (&'a str, &'a str) {
    (prefix, cursor.as_deref().unwrap_or(""))
}

#[async_trait]
impl Projection for EmbeddedReadStore {
    fn name(&self) -> &'static str {
        "documents"
    }

    fn system(&self) -> &'static str {
        "redb"
    }

    /// A transaction rewrites every page its batches touch, and during a rebuild a batch
    /// touches pages all over the persons and index tables, so larger batches make for fewer
    /// rewrites of the same pages. Live traffic comes in far smaller batches anyway.
    fn batch_max(&self) -> Option<usize> {
        Some(super::CATCH_UP_BATCH)
    }

    async fn apply_shared(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
        // A live batch of a few events is prepared in less time than the hand-off to a blocking
        // thread and back takes; a catch-up batch of thousands is not.
        let small = events.len() <= INLINE_BATCH_EVENTS;
        let prepare = move |db: &Database| prepare(db, partition, &events, through);
        let batch = if small { self.db.quick_read(prepare).await? } else { self.db.blocking(prepare).await? };
        self.batches.submit(batch).await?;
        // The same never-backwards rule as the table above, without reading it back.
        super::advance(&self.progress, partition, through);
        Ok(())
    }

    async fn checkpoints(&self) -> Result<Checkpoints, StoreError> {
        self.db.blocking(read_checkpoints).await
    }

    fn progress(&self) -> watch::Receiver<Checkpoints> {
        self.progress.subscribe()
    }

    /// Packs the file, so pages that held erased persons' documents and timelines are cut off
    /// the end of the file instead of lingering as free pages.
    async fn compact(&self) -> Result<(), StoreError> {
        self.db.compact().await
    }
}

#[async_trait]
impl ReadStore for EmbeddedReadStore {
    async fn get(&self, person_id: Uuid) -> Result<Option<PersonDoc>, StoreError> {
        self.db
            .quick_read(move |db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let table = txn.open_table(PERSONS).map_err(unavailable)?;
                let found = table.get(person_id.to_string().as_str()).map_err(unavailable)?;
                found.map(|g| decode_person(g.value())).transpose()
            })
            .await
    }

    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<Uuid>,
    ) -> Result<Page<PersonDoc>, StoreError> {
        let filter = filter.clone();
        let cursor = cursor.map(|c| c.to_string());
        self.db
            .blocking(move |db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let persons = txn.open_table(PERSONS).map_err(unavailable)?;
                let mut items = Vec::with_capacity(limit + 1);
                let mut push = |id: &str| -> Result<bool, StoreError> {
                    if cursor.as_deref().is_some_and(|c| id <= c) {
                        return Ok(true);
                    }
                    let Some(found) = persons.get(id).map_err(unavailable)? else { return Ok(true) };
                    let doc = decode_person(found.value())?;
                    let matches = filter.status.map_or(doc.status != Status::Erased, |s| s == doc.status)
                        && filter.tag.as_ref().is_none_or(|t| doc.tags.contains(t));
                    if matches {
                        items.push(doc);
                    }
                    Ok(items.len() <= limit)
                };
                // Scan the narrowest index; the doc check above applies the other filter.
                if let Some(tag) = &filter.tag {
                    let index = txn.open_table(BY_TAG).map_err(unavailable)?;
                    let start = cursor_after(tag, &cursor);
                    for entry in index.range(start..=(tag.as_str(), "\u{10FFFF}")).map_err(unavailable)? {
                        if !push(entry.map_err(unavailable)?.0.value().1)? {
                            break;
                        }
                    }
                } else if let Some(status) = filter.status {
                    let index = txn.open_table(BY_STATUS).map_err(unavailable)?;
                    let start = cursor_after(status.as_str(), &cursor);
                    for entry in index.range(start..=(status.as_str(), "\u{10FFFF}")).map_err(unavailable)? {
                        if !push(entry.map_err(unavailable)?.0.value().1)? {
                            break;
                        }
                    }
                } else {
                    let start = cursor.clone().unwrap_or_default();
                    for entry in persons.range(start.as_str()..).map_err(unavailable)? {
                        let (key, _) = entry.map_err(unavailable)?;
                        if !push(key.value())? {
                            break;
                        }
                    }
                }
                let next_cursor = if items.len() > limit {
                    items.truncate(limit);
                    items.last().map(|d| d.person_id.to_string())
                } else {
                    None
                };
                Ok(Page { items, next_cursor })
            })
            .await
    }

    async fn timeline(
        &self,
        person_id: Uuid,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<Page<TimelineEntry>, StoreError> {
        self.db
            .blocking(move |db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let entries = txn.open_table(TIMELINE).map_err(unavailable)?;
                let index = txn.open_table(TIMELINE_POSITIONS).map_err(unavailable)?;
                let id = person_id.to_string();
                let mut items: Vec<TimelineEntry> = Vec::with_capacity(limit + 1);
                for position in positions_of(&index, &id)? {
                    let position = position?;
                    if cursor.is_some_and(|c| position.1 <= c) {
                        continue;
                    }
                    if let Some(stored) = entries.get(position).map_err(unavailable)? {
                        items.push(decode_entry(position, stored.value())?);
                    }
                    if items.len() > limit {
                        break;
                    }
                }
                let next_cursor = if items.len() > limit {
                    items.truncate(limit);
                    items.last().map(|e| e.offset.to_string())
                } else {
                    None
                };
                Ok(Page { items, next_cursor })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Position, SharedDb, Synced, decode_entry, encode_entry, make_durable, pack, unpack};

    /// Entries come back as they went in (a note with its caller, a registration to the
    /// nanosecond, a scrubbed one), at the position they are read from; JSON entries of earlier
    /// builds are still read; an unknown layout or a cut entry is an error, not a panic; and a
    /// note takes under three fifths of its JSON.
    #[test]
    fn timeline_entries_round_trip_compactly() {
        use crate::readmodel::{ProjectedEvent, timeline_entry};
        let person = uuid::Uuid::now_v7();
        let at = |offset: u64, event: callisto_avro::PersonEvent| ProjectedEvent {
            partition: 7,
            offset,
            timestamp_ms: 0,
            event,
            principal: Some("key:4f2a".into()),
            erased: false,
        };
        let registered = callisto_avro::PersonEvent::Registered(callisto_avro::events::PersonRegistered {
            event_id: uuid::Uuid::new_v4(),
            person_id: person,
            occurred_at: chrono::DateTime::from_timestamp(1_764_000_000, 123_456_789).unwrap(),
            correlation_id: "c-1".into(),
            given_name: "Zoë".into(),
            family_name: "Quinn".into(),
            email: Some("zoe@example.org".into()),
            phone: None,
            date_of_birth: None,
            address: None,
            tags: vec!["vip".into()],
        });
        let note = callisto_avro::PersonEvent::NoteAdded(callisto_avro::events::NoteAdded {
            event_id: uuid::Uuid::new_v4(),
            person_id: person,
            occurred_at: chrono::Utc::now(),
            correlation_id: "bench-3".into(),
            note_id: uuid::Uuid::new_v4(),
            text: "twelve words of a note about the analytical engine and its cards ref3".into(),
        });
        let entries = [
            timeline_entry(&at(41, note)),
            timeline_entry(&at(40, registered.clone())),
            timeline_entry(&ProjectedEvent { principal: None, ..at(40, registered.clone()) }).scrubbed(),
        ];
        for entry in &entries {
            let position = (entry.partition, entry.offset);
            let stored = encode_entry(entry.clone()).unwrap();
            assert_eq!(&decode_entry(position, &stored).unwrap(), entry);
            let json = serde_json::to_vec(entry).unwrap();
            assert_eq!(&decode_entry(position, &json).unwrap(), entry, "an earlier build's JSON entry");
            assert!(decode_entry(position, &stored[..stored.len() / 2]).is_err(), "a cut entry");
        }
        let (note, json) = (encode_entry(entries[0].clone()).unwrap(), serde_json::to_vec(&entries[0]).unwrap());
        assert!(note.len() * 5 < json.len() * 3, "{} bytes against {} as JSON", note.len(), json.len());
        assert!(decode_entry((7, 41), &[9, 1, 2]).is_err(), "an unknown layout");
        assert!(decode_entry((7, 40), &[]).is_err());
    }

    /// Rows come back as they went in, whatever the partitions and offsets, and a person's
    /// positions in one partition take a few bytes each.
    #[test]
    fn timeline_rows_round_trip_compactly() {
        let rows: [Vec<Position>; 5] = [
            vec![],
            vec![(0, 0)],
            // Moves between partitions, back to an earlier offset, the same one again.
            vec![(3, 10), (3, 11), (5, 2), (3, 12), (3, 12), (3, 4), (0, 0)],
            vec![(u32::MAX, u64::MAX), (u32::MAX, 0), (0, u64::MAX), (0, u64::MAX - 1)],
            (0..256u64).map(|i| (7, 1_000_000 + i * 4_100)).collect(),
        ];
        for (bucket, row) in rows.iter().enumerate() {
            let bucket = u32::try_from(bucket).unwrap() * 1000;
            assert_eq!(unpack(&pack(bucket, row)).unwrap(), (bucket, row.clone()));
        }
        let typical = pack(7, &rows[4]);
        assert!(typical.len() <= 3 * 256 + 8, "{} bytes for 256 positions, 3072 at fixed width", typical.len());
    }

    #[test]
    fn a_timeline_row_that_does_not_decode_is_an_error() {
        // A step with no position before it, and a row cut short.
        let starts_with_a_step = postcard::to_allocvec(&(0u32, vec![(0u64, 5u64)])).unwrap();
        assert!(unpack(&starts_with_a_step).is_err());
        let full = pack(0, &[(1, 300), (1, 900)]);
        assert!(unpack(&full[..full.len() - 1]).is_err());
    }

    /// An idle flush commits only when a commit since the last durable one is not durable yet.
    #[test]
    fn an_idle_flush_commits_only_what_is_not_durable_yet() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("flush.redb")).unwrap();
        let synced = std::sync::Mutex::new(Synced::new());
        let durable_at = synced.lock().unwrap().at;
        make_durable(&db, &synced).unwrap();
        assert_eq!(synced.lock().unwrap().at, durable_at, "nothing pending: no commit");

        synced.lock().unwrap().committed(false);
        std::thread::sleep(Duration::from_millis(2));
        make_durable(&db, &synced).unwrap();
        let after = synced.lock().unwrap();
        assert!(after.at > durable_at && !after.pending, "the pending commit was made durable");
    }

    /// Compaction holds the database to itself, possibly for seconds: a quick read meanwhile
    /// waits on a blocking thread, not on the async worker (here the runtime's only thread).
    #[tokio::test(flavor = "current_thread")]
    async fn a_quick_read_during_compaction_does_not_hold_up_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let db = SharedDb::new(redb::Database::create(dir.path().join("quick.redb")).unwrap());
        let (locked, is_locked) = std::sync::mpsc::channel();
        let compaction = {
            let db = db.clone();
            std::thread::spawn(move || {
                let _compacting = db.0.write().unwrap();
                locked.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(1500));
            })
        };
        is_locked.recv().unwrap();
        let started = Instant::now();
        let read = tokio::spawn({
            let db = db.clone();
            async move { db.quick_read(|_| Ok(7)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(started.elapsed() < Duration::from_millis(1000), "the runtime went on while the database was locked");
        assert_eq!(read.await.unwrap().unwrap(), 7, "the read is answered once compaction ends");
        compaction.join().unwrap();
    }
}
