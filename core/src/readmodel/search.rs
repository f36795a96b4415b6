//! The embedded [`SearchIndex`] on tantivy.
//!
//! Two kinds of documents share one index: one per person (names, email, address, tags) and one
//! per note (its text, tied to its person by `person_id`), so analysts find notes one by one.
//! Both carry the person's tags and status as facets, for filters and facet counts; when those
//! change, the person's notes are re-indexed with the new facets.
//!
//! The projection checkpoint travels in the commit payload, so the index and its checkpoint move
//! together atomically: a crash leaves both at the last commit.
//!
//! ## Group commit
//! A tantivy commit is expensive (segment flush, fsync, reader reload). Partition workers
//! therefore only add their batch to the one shared `IndexWriter` and wait; a committer thread
//! commits everything added so far every [`COMMIT_INTERVAL`], with the merged checkpoints as the
//! payload, and then wakes every waiter whose batch it covered. Twelve partitions cost one
//! commit per interval instead of twelve.
//!
//! ## Catching up
//! A full batch means its partition is behind (a rebuild, a backlog). Such a batch does not
//! wait for its commit, and while no batch waits, commits come at most every
//! [`CATCH_UP_COMMIT_INTERVAL`]: fewer, larger segments, which is most of what a rebuild's
//! indexing costs (each segment builds its term dictionaries, and merges build them again).
//! The last batch of a partition that was behind, read under the projector's catch-up budget
//! ([`Projection::apply_catching_up`]), is committed at the next tick, as live batches are, but
//! does not wait for it either: the budget it holds goes to the next partition's batch instead
//! of sleeping on the timer. Later batches fold onto persons as added and not yet committed
//! (`Pending::unsettled`), and a batch that needs a person's notes from the index while some of
//! them are not yet committed commits first. A batch that erases someone still waits, so an
//! erasure the index has applied is on disk, as in the documents store.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use callisto_avro::PersonEvent;
use serde::{Deserialize, Serialize};
use tantivy::collector::{Count, DocSetCollector, FacetCollector, TopDocs};
use tantivy::query::{AllQuery, BooleanQuery, Occur, Query, QueryParser, TermQuery};
use tantivy::schema::{
    BytesOptions, FAST, Facet, FacetOptions, Field, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
    TextOptions, Value,
};
use tantivy::snippet::SnippetGenerator;
use tantivy::tokenizer::{AsciiFoldingFilter, LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term, doc};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    AddressDoc, Checkpoints, EventBatch, Facets, HitKind, PersonDoc, ProjectedEvent, Projection, SearchHit,
    SearchIndex, SearchRequest, SearchResults, Status, StoreError, fold,
};

/// Lower-cases and folds accents (`Zoë` finds `zoe`), as analysts expect of names.
const FOLDED: &str = "callisto_folded";
/// tantivy's indexing arena: a segment is written out when it fills. Live traffic commits long
/// before that; a rebuild fills it between commits, so it is part of a rebuild's peak memory. At
/// 20 MB instead of 30 MB a 1M-event rebuild peaked 15–30 MiB lower and ran as fast
/// (`BENCHMARKS.md`, eleventh pass).
const WRITER_HEAP_BYTES: usize = 20_000_000;
/// Persons kept in the fold cache (a few hundred bytes each).
const PERSON_CACHE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(100_000).expect("non-zero");
const SNIPPET_CHARS: usize = 200;
/// How often pending batches are committed together.
pub const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// How often batches are committed while none waits for its commit (see "Catching up").
pub const CATCH_UP_COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
fn unavailable<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[derive(Clone, Copy)]
struct Fields {
    doc_id: Field,
    kind: Field,
    person_id: Field,
    note_owner: Field,
    note_id: Field,
    name: Field,
    email: Field,
    address: Field,
    tag: Field,
    status: Field,
    text: Field,
    facets: Field,
    version: Field,
    /// The whole person document as JSON, so a later event can be folded onto it.
    person: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let text = TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(FOLDED)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
        .set_stored();
    // Only what is looked up by term is indexed. Every indexed value goes into its segment's
    // term dictionary, which is rebuilt each time segments are written and merged, and a
    // unique value per document (an id, an offset) made those dictionaries the largest cost of
    // a rebuild. So person documents carry `doc_id` (for `person_term`), notes carry
    // `note_owner` (their person's notes), and ids and versions are only stored. Both hold the
    // person id's 16 bytes, not its 36-character text: building a dictionary costs about as
    // much per byte of its terms, and these are nearly all of the terms.
    let id_key = BytesOptions::default().set_indexed();
    let fields = Fields {
        doc_id: b.add_bytes_field("doc_id", id_key.clone()),
        kind: b.add_text_field("kind", STRING | STORED),
        person_id: b.add_text_field("person_id", STORED),
        note_owner: b.add_bytes_field("note_owner", id_key),
        note_id: b.add_text_field("note_id", STORED),
        name: b.add_text_field("name", text.clone()),
        email: b.add_text_field("email", text.clone()),
        address: b.add_text_field("address", text.clone()),
        tag: b.add_text_field("tag", text.clone()),
        status: b.add_text_field("status", STRING | STORED),
        text: b.add_text_field("text", text),
        facets: b.add_facet_field("facets", FacetOptions::default()),
        version: b.add_u64_field("version", STORED | FAST),
        person: b.add_text_field("person", STORED),
    };
    (b.build(), fields)
}

/// Opens the index in `dir`, or creates it. An index built with another schema (an earlier
/// Callisto's) is derived data in a layout this one does not write: it is removed, and the
/// projector, finding no checkpoint, rebuilds it from the log.
fn open_with_schema(dir: &Path, schema: Schema) -> Result<Index, StoreError> {
    std::fs::create_dir_all(dir).map_err(unavailable)?;
    let directory = || super::search_directory::SearchDirectory::open(dir).map_err(unavailable);
    if Index::exists(&directory()?).map_err(unavailable)? {
        let existing = Index::open(directory()?).map_err(unavailable)?;
        if existing.schema() == schema {
            return Ok(existing);
        }
        drop(existing);
        tracing::warn!(
            dir = %dir.display(),
            "the search index was built with another schema; removing it so it is rebuilt from the log"
        );
        std::fs::remove_dir_all(dir).map_err(unavailable)?;
        std::fs::create_dir_all(dir).map_err(unavailable)?;
    }
    Index::create(directory()?, schema, tantivy::IndexSettings::default()).map_err(unavailable)
}

/// A note as stored, enough to re-index it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NoteDoc {
    note_id: Uuid,
    text: String,
    /// The offset of its `NoteAdded`; part of the person's version guard (see [`Inner::add`]).
    offset: u64,
}

/// What the writer holds between commits, under one lock so a commit's payload always matches
/// the documents it contains.
struct Pending {
    /// Taken when the index is dropped, so in-flight merges can be waited for.
    writer: Option<IndexWriter>,
    /// Checkpoints including batches added but not yet committed.
    checkpoints: Checkpoints,
    /// Bumped by every batch added; the committer commits up to it.
    added: u64,
    /// The highest `added` count a caller waits to see committed.
    awaited: u64,
    /// When the last commit was made.
    last_commit: std::time::Instant,
    /// Persons as added since the last commit, which the index cannot show yet. A later batch
    /// folds onto these before the cache or the index; a commit moves them into the cache.
    unsettled: HashMap<Uuid, Option<PersonDoc>>,
    /// Recently committed persons, so folding an event onto a person rarely needs a
    /// stored-document fetch (a block decompression); bounded, so memory stays flat.
    committed_persons: lru::LruCache<Uuid, Option<PersonDoc>>,
}

impl Pending {
    fn writer(&mut self) -> Result<&mut IndexWriter, StoreError> {
        self.writer.as_mut().ok_or_else(|| StoreError::Unavailable("the search index is closed".into()))
    }
}

struct Inner {
    index: Index,
    reader: IndexReader,
    pending: Mutex<Pending>,
    fields: Fields,
    /// The `added` count the last commit covered, and the checkpoints it made durable.
    committed: watch::Sender<(u64, Checkpoints)>,
    /// The checkpoints of the last commit, as readers follow them.
    progress: watch::Sender<Checkpoints>,
}

pub struct TantivySearchIndex {
    inner: Arc<Inner>,
    stop_committer: Option<std::sync::mpsc::Sender<()>>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TantivySearchIndex {
    fn drop(&mut self) {
        // Stop the committer (it commits what is pending first), then wait for the merges in
        // flight: dropping a writer leaves them writing segment files, so the index lock and the
        // files are only done with once this returns (a dropped generation's directory is
        // removed right after).
        self.stop_committer.take();
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
        let writer = self.inner.pending.lock().ok().and_then(|mut pending| pending.writer.take());
        if let Some(Err(e)) = writer.map(IndexWriter::wait_merging_threads) {
            tracing::warn!(error = %e, "a search index merge failed while closing");
        }
    }
}

impl std::fmt::Debug for TantivySearchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TantivySearchIndex").finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize, Default)]
struct CommitPayload {
    checkpoints: Checkpoints,
}

impl TantivySearchIndex {
    /// Opens (or creates) the index in directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let (schema, fields) = schema();
        let index = open_with_schema(dir, schema)?;
        index.tokenizers().register(
            FOLDED,
            TextAnalyzer::builder(SimpleTokenizer::default())
                .filter(RemoveLongFilter::limit(64))
                .filter(LowerCaser)
                .filter(AsciiFoldingFilter)
                .build(),
        );
        // tantivy starts its indexing and merge threads with the writer, and indexing threads
        // again at every commit (on the committer thread, below): created from background
        // threads, they all run below the request path where it shares the process
        // (see `crate::priority`).
        let writer = {
            let index = index.clone();
            std::thread::Builder::new()
                .name("callisto-search-open".into())
                .spawn(move || {
                    crate::priority::enter_background();
                    index.writer_with_num_threads(1, WRITER_HEAP_BYTES)
                })
                .map_err(unavailable)?
                .join()
                .map_err(|_| StoreError::Unavailable("opening the search index writer panicked".into()))?
                .map_err(unavailable)?
        };
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(unavailable)?;
        let payload = index.load_metas().map_err(unavailable)?.payload;
        let checkpoints = match payload {
            Some(text) => serde_json::from_str::<CommitPayload>(&text).map_err(unavailable)?.checkpoints,
            None => Checkpoints::new(),
        };
        let (progress, _) = watch::channel(checkpoints.clone());
        let (committed, _) = watch::channel((0, checkpoints.clone()));
        let pending = Mutex::new(Pending {
            writer: Some(writer),
            checkpoints,
            added: 0,
            awaited: 0,
            last_commit: std::time::Instant::now(),
            unsettled: HashMap::new(),
            committed_persons: lru::LruCache::new(PERSON_CACHE),
        });
        let inner = Arc::new(Inner { index, reader, pending, fields, committed, progress });
        let (stop_committer, stopped) = std::sync::mpsc::channel::<()>();
        let committer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("callisto-search-commit".into())
                .spawn(move || {
                    crate::priority::enter_background();
                    inner.commit_loop(&stopped);
                })
                .map_err(unavailable)?
        };
        Ok(Self { inner, stop_committer: Some(stop_committer), committer: Some(committer) })
    }
}

/// A batch as added to the writer.
struct Added {
    /// The `added` count a commit that covers the batch reaches.
    count: u64,
    /// Whether that commit comes at the next tick ([`COMMIT_INTERVAL`]): for any batch but a
    /// full one that erases no one, which is committed with the batches after it.
    next_tick: bool,
    /// Whether it erases someone: such a batch returns only once committed.
    erases: bool,
}

impl TantivySearchIndex {
    /// Adds the batch on a blocking thread.
    async fn add(&self, partition: u32, events: EventBatch, through: u64) -> Result<Added, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.add(partition, &events, through)).await.map_err(unavailable)?
    }

    /// Waits until a commit covers the `added` count `count`.
    async fn committed(&self, count: u64) -> Result<(), StoreError> {
        let mut committed = self.inner.committed.subscribe();
        committed.wait_for(|(done, _)| *done >= count).await.map_err(unavailable)?;
        Ok(())
    }
}

impl Inner {
    fn person_term(&self, id: Uuid) -> Term {
        Term::from_field_bytes(self.fields.doc_id, id.as_bytes())
    }

    fn notes_term(&self, id: Uuid) -> Term {
        Term::from_field_bytes(self.fields.note_owner, id.as_bytes())
    }

    /// The person as the index holds them, with the version guard's position: the person
    /// document is rewritten only when something it indexes changes, so events that change
    /// nothing searchable (a note, a new phone number) are accounted for by the notes' own
    /// offsets, and the rest need no guard (applying them again changes nothing indexed).
    fn load_person(&self, searcher: &tantivy::Searcher, id: Uuid) -> Result<Option<PersonDoc>, StoreError> {
        let query = TermQuery::new(self.person_term(id), IndexRecordOption::Basic);
        let top = searcher.search(&query, &TopDocs::with_limit(1)).map_err(unavailable)?;
        let Some((_, address)) = top.first() else { return Ok(None) };
        let doc: TantivyDocument = searcher.doc(*address).map_err(unavailable)?;
        let json = doc.get_first(self.fields.person).and_then(|v| v.as_str()).unwrap_or("null");
        let mut person: Option<PersonDoc> = serde_json::from_str(json).map_err(unavailable)?;
        if let Some(person) = &mut person {
            let latest_note = self.latest_note_offset(searcher, id)?;
            person.version.offset = person.version.offset.max(latest_note);
        }
        Ok(person)
    }

    /// The highest offset among the person's notes (0 without notes), read from the fast field
    /// without fetching documents.
    fn latest_note_offset(&self, searcher: &tantivy::Searcher, id: Uuid) -> Result<u64, StoreError> {
        let term = self.notes_term(id);
        let found =
            searcher.search(&TermQuery::new(term, IndexRecordOption::Basic), &DocSetCollector).map_err(unavailable)?;
        let mut latest = 0;
        let mut columns = HashMap::new();
        for address in found {
            let column = match columns.entry(address.segment_ord) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => entry.insert(
                    searcher.segment_reader(address.segment_ord).fast_fields().u64("version").map_err(unavailable)?,
                ),
            };
            latest = latest.max(column.first(address.doc_id).unwrap_or(0));
        }
        Ok(latest)
    }

    fn load_notes(&self, searcher: &tantivy::Searcher, id: Uuid) -> Result<Vec<NoteDoc>, StoreError> {
        let term = self.notes_term(id);
        let found =
            searcher.search(&TermQuery::new(term, IndexRecordOption::Basic), &DocSetCollector).map_err(unavailable)?;
        found
            .into_iter()
            .map(|address| {
                let doc: TantivyDocument = searcher.doc(address).map_err(unavailable)?;
                let text_of = |f: Field| doc.get_first(f).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
                let note_id = Uuid::parse_str(&text_of(self.fields.note_id)).map_err(unavailable)?;
                let offset = doc.get_first(self.fields.version).and_then(|v| v.as_u64()).unwrap_or(0);
                Ok(NoteDoc { note_id, text: text_of(self.fields.text), offset })
            })
            .collect()
    }

    fn facet_values(&self, doc: &mut TantivyDocument, person: &PersonDoc) {
        for tag in &person.tags {
            doc.add_facet(self.fields.facets, Facet::from_path(["tag", tag.as_str()]));
        }
        doc.add_facet(self.fields.facets, Facet::from_path(["status", person.status.as_str()]));
        doc.add_text(self.fields.status, person.status.as_str());
    }

    fn person_document(&self, person: &PersonDoc) -> Result<TantivyDocument, StoreError> {
        let f = self.fields;
        let mut doc = doc!(
            f.doc_id => person.person_id.as_bytes().as_slice(),
            f.kind => "person",
            f.person_id => person.person_id.to_string(),
            f.name => display_name(person),
            f.version => person.version.offset,
            f.person => serde_json::to_string(person).map_err(unavailable)?,
        );
        if let Some(email) = &person.email {
            doc.add_text(f.email, email);
        }
        if let Some(address) = &person.address {
            doc.add_text(f.address, address.one_line());
        }
        for tag in &person.tags {
            doc.add_text(f.tag, tag);
        }
        self.facet_values(&mut doc, person);
        Ok(doc)
    }

    fn note_document(&self, person: &PersonDoc, note: &NoteDoc) -> TantivyDocument {
        let f = self.fields;
        let mut doc = doc!(
            f.kind => "note",
            f.person_id => person.person_id.to_string(),
            f.note_owner => person.person_id.as_bytes().as_slice(),
            f.note_id => note.note_id.to_string(),
            f.text => note.text.clone(),
            f.person => display_name(person),
            f.version => note.offset,
        );
        self.facet_values(&mut doc, person);
        doc
    }

    /// Commits what was added, every [`COMMIT_INTERVAL`] while a batch waits for its commit
    /// and every [`CATCH_UP_COMMIT_INTERVAL`] otherwise, until `stopped` disconnects; then
    /// commits what is left.
    fn commit_loop(&self, stopped: &std::sync::mpsc::Receiver<()>) {
        loop {
            let stopping =
                !matches!(stopped.recv_timeout(COMMIT_INTERVAL), Err(std::sync::mpsc::RecvTimeoutError::Timeout));
            let when = if stopping { Commit::Now } else { Commit::WhenDue };
            let committed = self.pending.lock().map_err(unavailable).and_then(|mut p| self.commit(&mut p, when));
            if let Err(e) = committed {
                tracing::error!(error = %e, "search index commit failed; retrying");
            }
            if stopping {
                return;
            }
        }
    }

    /// Commits what was added since the last commit, if anything was and `when` says it is
    /// time, with the checkpoints as the payload.
    fn commit(&self, pending: &mut Pending, when: Commit) -> Result<(), StoreError> {
        let committed = self.committed.borrow().0;
        if pending.added == committed {
            return Ok(());
        }
        let due = pending.awaited > committed || pending.last_commit.elapsed() >= CATCH_UP_COMMIT_INTERVAL;
        if when == Commit::WhenDue && !due {
            return Ok(());
        }
        let payload =
            serde_json::to_string(&CommitPayload { checkpoints: pending.checkpoints.clone() }).map_err(unavailable)?;
        let started = std::time::Instant::now();
        let mut commit = pending.writer()?.prepare_commit().map_err(unavailable)?;
        commit.set_payload(&payload);
        commit.commit().map_err(unavailable)?;
        self.reader.reload().map_err(unavailable)?;
        metrics::histogram!("callisto_search_commit_seconds").record(started.elapsed().as_secs_f64());
        pending.last_commit = std::time::Instant::now();
        for (id, person) in pending.unsettled.drain() {
            pending.committed_persons.put(id, person);
        }
        let checkpoints = pending.checkpoints.clone();
        self.committed.send_replace((pending.added, checkpoints.clone()));
        self.progress.send_replace(checkpoints);
        Ok(())
    }

    /// Commits, merges every segment (dropping deleted documents for good) and removes the
    /// files no commit uses any more.
    fn compact(&self) -> Result<(), StoreError> {
        let mut pending = self.pending.lock().map_err(unavailable)?;
        self.commit(&mut pending, Commit::Now)?;
        let segments = self.index.searchable_segment_ids().map_err(unavailable)?;
        if !segments.is_empty() {
            pending.writer()?.merge(&segments).wait().map_err(unavailable)?;
        }
        self.reader.reload().map_err(unavailable)?;
        pending.writer()?.garbage_collect_files().wait().map_err(unavailable)?;
        Ok(())
    }

    /// Adds one partition's batch to the writer, to be committed at the next tick unless it is
    /// full (see "Catching up") or, when it erases someone, at the next tick in any case.
    ///
    /// The version guard refuses events at or below the person's position (see
    /// [`Inner::load_person`]). Since a note that passes it cannot be in the index yet, new
    /// notes and new persons are added without a delete in front of them: deletes are what a
    /// commit pays for in every segment's term dictionary, and a rebuild would otherwise issue
    /// one per event.
    fn add(&self, partition: u32, events: &[ProjectedEvent], through: u64) -> Result<Added, StoreError> {
        let mut guard = self.pending.lock().map_err(unavailable)?;
        let pending = &mut *guard;
        let mut searcher = self.reader.searcher();
        // person → (as the index holds them, with batches not yet committed; as after this
        // batch), and the notes this batch adds.
        let mut persons: HashMap<Uuid, (Option<PersonDoc>, Option<PersonDoc>)> = HashMap::new();
        let mut new_notes: HashMap<Uuid, Vec<NoteDoc>> = HashMap::new();
        for ev in events {
            let id = ev.event.meta().person_id;
            let (_, current) = match persons.entry(id) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    let known = match pending.unsettled.get(&id) {
                        Some(added) => Some(added.clone()),
                        None => pending.committed_persons.get(&id).cloned(),
                    };
                    let before = match known {
                        Some(doc) => doc,
                        None => self.load_person(&searcher, id)?,
                    };
                    entry.insert((before.clone(), before))
                }
            };
            if current.as_ref().is_some_and(|d| d.has_applied(ev)) {
                continue;
            }
            *current = fold(current.take(), ev);
            if let (PersonEvent::NoteAdded(e), Some(_), false) = (&ev.event, current.as_ref(), ev.erases()) {
                let note = NoteDoc { note_id: e.note_id, text: e.text.clone(), offset: ev.offset };
                new_notes.entry(id).or_default().push(note);
            }
        }
        // Every read (a person's notes) happens while planning, so a failing read leaves the
        // writer untouched and the retried batch starts from the same state.
        let mut operations = Vec::new();
        let mut erases = false;
        for (id, (before, after)) in &persons {
            let Some(after) = after else { continue };
            let owner = || self.notes_term(*id);
            if before.as_ref().map(indexed) == Some(indexed(after)) {
                if after.status != Status::Erased {
                    for note in new_notes.get(id).into_iter().flatten() {
                        operations.push(Operation::Add(self.note_document(after, note)));
                    }
                }
                continue;
            }
            if before.is_some() {
                operations.push(Operation::Delete(self.person_term(*id)));
            }
            if after.status == Status::Erased {
                // Erased: every document of the person goes; nothing is added back.
                operations.push(Operation::Delete(owner()));
                erases = true;
                continue;
            }
            operations.push(Operation::Add(self.person_document(after)?));
            let facets_changed = before.as_ref().is_some_and(|b| {
                b.tags != after.tags || b.status != after.status || display_name(b) != display_name(after)
            });
            if facets_changed {
                // The notes are read back from the index, which shows only committed ones.
                // None of this batch's operations are in the writer yet, so a commit here
                // covers exactly the batches before it.
                if pending.unsettled.contains_key(id) {
                    self.commit(pending, Commit::Now)?;
                    searcher = self.reader.searcher();
                }
                let notes = self.load_notes(&searcher, *id)?;
                operations.push(Operation::Delete(owner()));
                operations.extend(notes.iter().map(|note| Operation::Add(self.note_document(after, note))));
            }
            for note in new_notes.get(id).into_iter().flatten() {
                operations.push(Operation::Add(self.note_document(after, note)));
            }
        }
        for operation in operations {
            match operation {
                Operation::Delete(term) => {
                    pending.writer()?.delete_term(term);
                }
                // Fails only once the writer's indexing threads are gone, which no retry mends.
                Operation::Add(doc) => {
                    pending.writer()?.add_document(doc).map_err(unavailable)?;
                }
            }
        }
        for (id, (_, after)) in persons {
            pending.unsettled.insert(id, after);
        }
        let entry = pending.checkpoints.entry(partition).or_insert(through);
        *entry = (*entry).max(through);
        pending.added += 1;
        let next_tick = events.len() < super::CATCH_UP_BATCH || erases;
        if next_tick {
            pending.awaited = pending.added;
        }
        Ok(Added { count: pending.added, next_tick, erases })
    }

    /// Index terms starting with `stem` (analysed like indexed text) in `field`, or in every
    /// default search field when none is named.
    fn expand_prefix(&self, searcher: &tantivy::Searcher, field: Option<&str>, stem: &str) -> Vec<String> {
        let f = self.fields;
        let fields: Vec<Field> = match field {
            Some(name) => self.index.schema().get_field(name).ok().into_iter().collect(),
            None => vec![f.name, f.email, f.address, f.tag, f.text],
        };
        let Some(mut analyzer) = self.index.tokenizers().get(FOLDED) else { return Vec::new() };
        let mut stream = analyzer.token_stream(stem);
        let Some(stem) = stream.next().map(|t| t.text.clone()) else { return Vec::new() };
        let mut terms = std::collections::BTreeSet::new();
        'fields: for field in fields {
            for segment in searcher.segment_readers() {
                let Ok(index) = segment.inverted_index(field) else { continue };
                let Ok(mut streamer) = index.terms().range().ge(stem.as_bytes()).into_stream() else { continue };
                while streamer.advance() {
                    let key = streamer.key();
                    if !key.starts_with(stem.as_bytes()) {
                        break;
                    }
                    if let Ok(term) = std::str::from_utf8(key) {
                        terms.insert(term.to_owned());
                    }
                    if terms.len() >= MAX_PREFIX_EXPANSIONS {
                        break 'fields;
                    }
                }
            }
        }
        terms.into_iter().collect()
    }

    fn search(&self, request: &SearchRequest) -> Result<SearchResults, StoreError> {
        let f = self.fields;
        let searcher = self.reader.searcher();
        let mut parser = QueryParser::for_index(&self.index, vec![f.name, f.email, f.address, f.tag, f.text]);
        parser.set_field_boost(f.name, 2.0);
        let user_query: Box<dyn Query> = if request.query.trim().is_empty() {
            Box::new(AllQuery)
        } else {
            let expand = |field: Option<&str>, stem: &str| self.expand_prefix(&searcher, field, stem);
            let query = normalize_query(&request.query, &expand);
            parser.parse_query(&query).map_err(|e| StoreError::InvalidRequest(format!("query: {e}")))?
        };
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, user_query.box_clone())];
        let facet_filter = |path: [&str; 2]| -> Box<dyn Query> {
            Box::new(TermQuery::new(Term::from_facet(f.facets, &Facet::from_path(path)), IndexRecordOption::Basic))
        };
        if let Some(tag) = &request.tag {
            clauses.push((Occur::Must, facet_filter(["tag", tag.as_str()])));
        }
        if let Some(status) = request.status {
            clauses.push((Occur::Must, facet_filter(["status", status.as_str()])));
        }
        let query = BooleanQuery::new(clauses);
        let mut facet_collector = FacetCollector::for_field("facets");
        facet_collector.add_facet("/tag");
        facet_collector.add_facet("/status");
        let top = TopDocs::with_limit(request.limit.max(1)).and_offset(request.offset);
        let (top, total, facet_counts) =
            searcher.search(&query, &(top, Count, facet_collector)).map_err(unavailable)?;

        let mut facets = Facets::default();
        for (facet, count) in facet_counts.get("/tag") {
            if let Some(tag) = facet.to_path().last() {
                facets.tags.insert((*tag).to_owned(), count);
            }
        }
        for (facet, count) in facet_counts.get("/status") {
            if let Some(status) = facet.to_path().last() {
                facets.status.insert((*status).to_owned(), count);
            }
        }

        let snippets = |field: Field| -> Result<SnippetGenerator, StoreError> {
            let mut generator = SnippetGenerator::create(&searcher, &*user_query, field).map_err(unavailable)?;
            generator.set_max_num_chars(SNIPPET_CHARS);
            Ok(generator)
        };
        let generators = [
            ("name", snippets(f.name)?),
            ("text", snippets(f.text)?),
            ("email", snippets(f.email)?),
            ("address", snippets(f.address)?),
            ("tag", snippets(f.tag)?),
        ];
        let mut hits = Vec::with_capacity(top.len());
        for (score, address) in top {
            let doc: TantivyDocument = searcher.doc(address).map_err(unavailable)?;
            let text_of = |field: Field| doc.get_first(field).and_then(|v| v.as_str()).map(str::to_owned);
            let kind = if text_of(f.kind).as_deref() == Some("note") { HitKind::Note } else { HitKind::Person };
            let person_id = text_of(f.person_id).and_then(|s| Uuid::parse_str(&s).ok()).unwrap_or_default();
            let (name, note_id, text) = match kind {
                HitKind::Person => {
                    let person: Option<PersonDoc> = text_of(f.person).and_then(|j| serde_json::from_str(&j).ok());
                    (person.as_ref().map(display_name).unwrap_or_default(), None, None)
                }
                HitKind::Note => (
                    text_of(f.person).unwrap_or_default(),
                    text_of(f.note_id).and_then(|s| Uuid::parse_str(&s).ok()),
                    text_of(f.text),
                ),
            };
            let mut highlights = BTreeMap::new();
            for (label, generator) in &generators {
                let snippet = generator.snippet_from_doc(&doc);
                if !snippet.is_empty() && !snippet.highlighted().is_empty() {
                    highlights.insert((*label).to_owned(), snippet.to_html());
                }
            }
            hits.push(SearchHit { kind, person_id, note_id, score, name, text, highlights });
        }
        Ok(SearchResults { total, hits, facets, last_sort: None })
    }
}

/// Most index terms one `prefix*` expands to, as Elasticsearch's `max_expansions`.
const MAX_PREFIX_EXPANSIONS: usize = 64;

/// Bridges the Lucene query-string habits analysts have to tantivy's grammar:
/// - `term*` (and `field:term*`) is rewritten, as Lucene rewrites a prefix query, into an OR of
///   the index terms that start with it (`expand` lists them, given the field if one was named);
/// - `a AND NOT b` becomes `a NOT b`, which tantivy reads as Lucene does (`+a -b`).
///
/// Quoted phrases (including tantivy's phrase prefix `"a b"*`) are left as they are.
pub fn normalize_query(query: &str, expand: &dyn Fn(Option<&str>, &str) -> Vec<String>) -> String {
    let mut out = String::with_capacity(query.len() + 8);
    let mut token = String::new();
    let mut in_quotes = false;
    let mut pending_and = false;
    let flush = |token: &mut String, out: &mut String, pending_and: &mut bool| {
        if token.is_empty() {
            return;
        }
        if token == "AND" {
            *pending_and = true;
            token.clear();
            return;
        }
        if std::mem::take(pending_and) && token != "NOT" {
            out.push_str("AND ");
        }
        out.push_str(&prefix_form(token, expand));
        token.clear();
    };
    for c in query.chars() {
        if in_quotes {
            out.push(c);
            in_quotes = c != '"';
            continue;
        }
        match c {
            '"' => {
                flush(&mut token, &mut out, &mut pending_and);
                if std::mem::take(&mut pending_and) {
                    out.push_str("AND ");
                }
                in_quotes = true;
                out.push(c);
            }
            '(' | ')' => {
                flush(&mut token, &mut out, &mut pending_and);
                if c == '(' && std::mem::take(&mut pending_and) {
                    out.push_str("AND ");
                }
                out.push(c);
            }
            c if c.is_whitespace() => {
                flush(&mut token, &mut out, &mut pending_and);
                if !out.is_empty() && !out.ends_with(' ') {
                    out.push(' ');
                }
            }
            c => token.push(c),
        }
    }
    flush(&mut token, &mut out, &mut pending_and);
    if pending_and {
        out.push_str("AND");
    }
    out.trim_end().to_owned()
}

/// `word*` → `(t1 OR t2 …)` over the terms `word` prefixes, keeping a leading `+`/`-` and a
/// `field:`. With no such term it stays the bare stem, which matches nothing.
fn prefix_form(token: &str, expand: &dyn Fn(Option<&str>, &str) -> Vec<String>) -> String {
    let (sign, rest) = match token.chars().next() {
        Some(c @ ('+' | '-')) => (c.to_string(), &token[1..]),
        _ => (String::new(), token),
    };
    let (field, term) = match rest.split_once(':') {
        Some((field, term)) if !field.is_empty() => (Some(field), term),
        _ => (None, rest),
    };
    let Some(stem) = term.strip_suffix('*').filter(|s| !s.is_empty() && s.chars().all(char::is_alphanumeric)) else {
        return token.to_owned();
    };
    let prefix = field.map(|f| format!("{f}:")).unwrap_or_default();
    let terms = expand(field, stem);
    if terms.is_empty() {
        return format!("{sign}{prefix}{stem}");
    }
    let alternatives: Vec<String> = terms.iter().map(|t| format!("{prefix}{t}")).collect();
    format!("{sign}({})", alternatives.join(" OR "))
}

/// Whether a commit is made whatever the time, or only once one is due.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Commit {
    Now,
    WhenDue,
}

/// One change to the index, in the order the writer must see it (a delete removes only what
/// was added before it).
enum Operation {
    Delete(Term),
    Add(TantivyDocument),
}

/// What the index shows of a person: the person document is rewritten only when this changes.
/// A note count, a phone number or a timestamp is not searched, so events that change only
/// those add their own documents (a note) or nothing.
fn indexed(person: &PersonDoc) -> (&str, &str, Option<&str>, Option<&AddressDoc>, &[String], Status) {
    (
        &person.given_name,
        &person.family_name,
        person.email.as_deref(),
        person.address.as_ref(),
        &person.tags,
        person.status,
    )
}

pub(crate) fn display_name(person: &PersonDoc) -> String {
    format!("{} {}", person.given_name, person.family_name)
}

#[async_trait]
impl Projection for TantivySearchIndex {
    fn name(&self) -> &'static str {
        "search"
    }

    fn system(&self) -> &'static str {
        "tantivy"
    }

    fn batch_max(&self) -> Option<usize> {
        Some(super::CATCH_UP_BATCH)
    }

    /// Returns once the committer has made the batch durable (within about one
    /// [`COMMIT_INTERVAL`]), except for a full batch, which a partition that is behind
    /// brings: that returns once added, and is committed with the batches after it.
    async fn apply_shared(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
        let added = self.add(partition, events, through).await?;
        if added.next_tick {
            self.committed(added.count).await?;
        }
        Ok(())
    }

    /// Returns once the batch is added; it is committed with the batches after it when full,
    /// at the next tick otherwise (the partition has caught up). A batch that erases someone
    /// returns once committed, as in [`Projection::apply_shared`].
    async fn apply_catching_up(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
        let added = self.add(partition, events, through).await?;
        if added.erases {
            self.committed(added.count).await?;
        }
        Ok(())
    }

    /// The checkpoints of the last commit: what a crash now would leave.
    async fn checkpoints(&self) -> Result<Checkpoints, StoreError> {
        Ok(self.inner.committed.borrow().1.clone())
    }

    fn progress(&self) -> watch::Receiver<Checkpoints> {
        self.inner.progress.subscribe()
    }

    async fn compact(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.compact()).await.map_err(unavailable)?
    }
}

#[async_trait]
impl SearchIndex for TantivySearchIndex {
    async fn search(&self, request: &SearchRequest) -> Result<SearchResults, StoreError> {
        let inner = self.inner.clone();
        let request = request.clone();
        tokio::task::spawn_blocking(move || inner.search(&request)).await.map_err(unavailable)?
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_query;

    /// An index left by an earlier schema is replaced by an empty one without checkpoints, so
    /// the projector rebuilds it from the log, instead of failing to open.
    #[tokio::test]
    async fn an_index_with_another_schema_is_replaced_for_a_rebuild() {
        use crate::readmodel::Projection;
        let dir = tempfile::tempdir().unwrap();
        {
            let mut earlier = tantivy::schema::Schema::builder();
            let doc_id = earlier.add_text_field("doc_id", tantivy::schema::STRING | tantivy::schema::STORED);
            let index = tantivy::Index::create_in_dir(dir.path(), earlier.build()).unwrap();
            let mut writer: tantivy::IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
            writer.add_document(tantivy::doc!(doc_id => "person:1")).unwrap();
            let mut commit = writer.prepare_commit().unwrap();
            commit.set_payload(r#"{"checkpoints":{"0":41}}"#);
            commit.commit().unwrap();
        }
        let index = super::TantivySearchIndex::open(dir.path()).unwrap();
        assert!(index.checkpoints().await.unwrap().is_empty());
        let reopened = tantivy::Index::open_in_dir(dir.path()).unwrap();
        assert_eq!(reopened.schema(), super::schema().0);
    }

    fn expand(field: Option<&str>, stem: &str) -> Vec<String> {
        match (field, stem) {
            (None, "bern") => vec!["bernard".into(), "bernoulli".into()],
            (Some("name"), "ada") => vec!["ada".into()],
            _ => vec![],
        }
    }

    #[test]
    fn lucene_habits_become_tantivy_syntax() {
        let n = |q: &str| normalize_query(q, &expand);
        assert_eq!(n("bern*"), "(bernard OR bernoulli)");
        assert_eq!(n("text:eng* -name:ada*"), "text:eng -(name:ada)");
        assert_eq!(n("engine AND NOT foo"), "engine NOT foo");
        assert_eq!(n("a AND b"), "a AND b");
        assert_eq!(n(r#""exact phrase*" AND (x OR bern*)"#), r#""exact phrase*" AND (x OR (bernard OR bernoulli))"#);
        assert_eq!(n(r#"name:"ada king" "a b"*"#), r#"name:"ada king" "a b"*"#);
        assert_eq!(n("tag:*"), "tag:*");
        assert_eq!(n("*"), "*");
    }
}
