//! The embedded [`ReadStore`]: documents, secondary indexes, timelines and checkpoints in one
//! redb file, each batch and its checkpoint in one write transaction. Batches of different
//! partitions arriving together share that transaction and its fsync (a group commit).
//!
//! ## Tables
//! - `persons`: person id → JSON [`PersonDoc`].
//! - `persons_by_tag`: (tag, person id) and `persons_by_status`: (status, person id), so a
//!   filtered listing is a range scan from the cursor.
//! - `timeline`: (person id, offset) → JSON [`TimelineEntry`].
//! - `checkpoints`: partition → last applied offset.

use std::path::Path;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::watch;
use uuid::Uuid;

use crate::group_commit::GroupCommit;

use super::{
    Checkpoints, ListFilter, Page, PersonDoc, ProjectedEvent, Projection, ReadStore, Status, StoreError, TimelineEntry,
    fold, timeline_entry,
};

const PERSONS: TableDefinition<&str, &[u8]> = TableDefinition::new("persons");
const BY_TAG: TableDefinition<(&str, &str), ()> = TableDefinition::new("persons_by_tag");
const BY_STATUS: TableDefinition<(&str, &str), ()> = TableDefinition::new("persons_by_status");
const TIMELINE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("timeline");
const CHECKPOINTS: TableDefinition<u32, u64> = TableDefinition::new("checkpoints");

/// redb's page cache for the read models: bounded, so memory stays flat as they grow.
const CACHE_BYTES: usize = 16 << 20;

fn unavailable<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A redb database for blocking tasks: used under the read lock (redb serialises writers
/// itself), compacted under the write lock, as redb compaction needs the database to itself.
#[derive(Clone)]
pub struct SharedDb(Arc<RwLock<Database>>);

impl SharedDb {
    pub fn new(db: Database) -> Self {
        Self(Arc::new(RwLock::new(db)))
    }

    /// A [`GroupCommit`] writer thread `name` whose groups `commit` applies to this database.
    pub fn group_commit<R: Send + 'static, T: Send + 'static>(
        &self,
        name: &str,
        max_group: usize,
        commit: fn(&Database, &[R]) -> Result<Vec<T>, StoreError>,
    ) -> Result<GroupCommit<R, T>, StoreError> {
        let db = self.0.clone();
        GroupCommit::start(name, max_group, move |group: &[R]| commit(&*db.read().map_err(unavailable)?, group))
    }

    /// Runs `f` on a blocking thread.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || f(&*db.read().map_err(unavailable)?)).await.map_err(unavailable)?
    }

    /// Compacts until the file shrinks no further. Free pages are only handed back to the file
    /// system at the end of the file, so this is what makes deleted data leave the disk file.
    pub async fn compact(&self) -> Result<(), StoreError> {
        let db = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = db.write().map_err(unavailable)?;
            while db.compact().map_err(unavailable)? {}
            Ok(())
        })
        .await
        .map_err(unavailable)?
    }
}

/// One partition's batch and the checkpoint it reaches.
struct Batch {
    partition: u32,
    events: Vec<ProjectedEvent>,
    through: u64,
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
        txn.open_table(CHECKPOINTS).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        let checkpoints = read_checkpoints(&db)?;
        let (progress, _) = watch::channel(checkpoints);
        let db = SharedDb::new(db);
        let batches = db.group_commit("callisto-documents-writer", MAX_GROUP, commit_batches)?;
        Ok(Self { db, progress, batches })
    }
}

/// Applies every batch of `group` with its checkpoint, in one transaction. Partitions never
/// share a person, so batches of different partitions do not interact.
fn commit_batches(db: &Database, group: &[Batch]) -> Result<Vec<()>, StoreError> {
    let txn = db.begin_write().map_err(unavailable)?;
    {
        let mut tables = Tables::open(&txn)?;
        for batch in group {
            apply_in(&mut tables, &batch.events)?;
            let current = tables.checkpoints.get(batch.partition).map_err(unavailable)?.map(|g| g.value());
            if current.is_none_or(|c| c < batch.through) {
                tables.checkpoints.insert(batch.partition, batch.through).map_err(unavailable)?;
            }
        }
    }
    txn.commit().map_err(unavailable)?;
    Ok(vec![(); group.len()])
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
    serde_json::from_slice(bytes).map_err(|e| StoreError::Unavailable(format!("stored document is corrupt: {e}")))
}

/// The tables batches write, opened once per transaction.
struct Tables<'txn> {
    persons: redb::Table<'txn, &'static str, &'static [u8]>,
    by_tag: redb::Table<'txn, (&'static str, &'static str), ()>,
    by_status: redb::Table<'txn, (&'static str, &'static str), ()>,
    timeline: redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    checkpoints: redb::Table<'txn, u32, u64>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            persons: txn.open_table(PERSONS).map_err(unavailable)?,
            by_tag: txn.open_table(BY_TAG).map_err(unavailable)?,
            by_status: txn.open_table(BY_STATUS).map_err(unavailable)?,
            timeline: txn.open_table(TIMELINE).map_err(unavailable)?,
            checkpoints: txn.open_table(CHECKPOINTS).map_err(unavailable)?,
        })
    }

    fn load_doc(&self, id: &str) -> Result<Option<PersonDoc>, StoreError> {
        let found = self.persons.get(id).map_err(unavailable)?;
        found.map(|g| decode(g.value())).transpose()
    }

    /// Writes `after` over `before` with its index entries, touching only the entries that
    /// changed.
    fn save_doc(&mut self, before: Option<&PersonDoc>, after: &PersonDoc) -> Result<(), StoreError> {
        let id = after.person_id.to_string();
        let bytes = serde_json::to_vec(after).map_err(unavailable)?;
        self.persons.insert(id.as_str(), bytes.as_slice()).map_err(unavailable)?;
        let old_tags = before.map(|d| d.tags.as_slice()).unwrap_or_default();
        for tag in old_tags.iter().filter(|t| !after.tags.contains(t)) {
            self.by_tag.remove((tag.as_str(), id.as_str())).map_err(unavailable)?;
        }
        for tag in after.tags.iter().filter(|t| !old_tags.contains(t)) {
            self.by_tag.insert((tag.as_str(), id.as_str()), ()).map_err(unavailable)?;
        }
        let old_status = before.map(|d| d.status);
        if old_status != Some(after.status) {
            if let Some(old) = old_status {
                self.by_status.remove((old.as_str(), id.as_str())).map_err(unavailable)?;
            }
            self.by_status.insert((after.status.as_str(), id.as_str()), ()).map_err(unavailable)?;
        }
        Ok(())
    }

    /// Rewrites every timeline entry of the person without its content.
    fn scrub_timeline(&mut self, id: &str) -> Result<(), StoreError> {
        let entries: Vec<(u64, TimelineEntry)> = self
            .timeline
            .range((id, 0)..=(id, u64::MAX))
            .map_err(unavailable)?
            .map(|entry| {
                let (key, value) = entry.map_err(unavailable)?;
                Ok((key.value().1, decode::<TimelineEntry>(value.value())?))
            })
            .collect::<Result<_, StoreError>>()?;
        for (offset, entry) in entries.into_iter().filter(|(_, e)| !e.erased) {
            let bytes = serde_json::to_vec(&entry.scrubbed()).map_err(unavailable)?;
            self.timeline.insert((id, offset), bytes.as_slice()).map_err(unavailable)?;
        }
        Ok(())
    }
}

/// Applies a batch: every event goes on its person's timeline; each person is read once,
/// folded in memory through the batch and written once at the end, with only the index
/// entries that changed.
fn apply_in(tables: &mut Tables<'_>, events: &[ProjectedEvent]) -> Result<(), StoreError> {
    // person id → (as stored, as after the events so far).
    let mut persons: std::collections::HashMap<String, (Option<PersonDoc>, Option<PersonDoc>)> =
        std::collections::HashMap::new();
    for ev in events {
        let id = ev.event.meta().person_id.to_string();
        let entry = serde_json::to_vec(&timeline_entry(ev)).map_err(unavailable)?;
        tables.timeline.insert((id.as_str(), ev.offset), entry.as_slice()).map_err(unavailable)?;
        let (_, current) = match persons.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let stored = tables.load_doc(entry.key())?;
                entry.insert((stored.clone(), stored))
            }
        };
        if current.as_ref().is_some_and(|d| d.has_applied(ev)) {
            continue;
        }
        let scrubs = super::scrubs_timeline(current.as_ref(), ev);
        *current = fold(current.take(), ev);
        if let Some(after) = current.as_ref().filter(|_| scrubs) {
            tables.scrub_timeline(&after.person_id.to_string())?;
        }
    }
    for (stored, after) in persons.values() {
        if let Some(after) = after.as_ref().filter(|after| stored.as_ref() != Some(*after)) {
            tables.save_doc(stored.as_ref(), after)?;
        }
    }
    Ok(())
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

    async fn apply(&self, partition: u32, events: &[ProjectedEvent], through: u64) -> Result<(), StoreError> {
        self.batches.submit(Batch { partition, events: events.to_vec(), through }).await?;
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
            .blocking(move |db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let table = txn.open_table(PERSONS).map_err(unavailable)?;
                let found = table.get(person_id.to_string().as_str()).map_err(unavailable)?;
                found.map(|g| decode(g.value())).transpose()
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
                    let doc: PersonDoc = decode(found.value())?;
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
                let table = txn.open_table(TIMELINE).map_err(unavailable)?;
                let id = person_id.to_string();
                let start = cursor.map_or(0, |c| c.saturating_add(1));
                let mut items: Vec<TimelineEntry> = Vec::with_capacity(limit + 1);
                for entry in
                    table.range((id.as_str(), start)..=(id.as_str(), u64::MAX)).map_err(unavailable)?.take(limit + 1)
                {
                    items.push(decode(entry.map_err(unavailable)?.1.value())?);
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
