//! The MongoDB [`ReadStore`], on the official `mongodb` driver.
//!
//! ## Collections
//! - `persons`: one document per person, `_id` = the person id; the fields of [`PersonDoc`]
//!   (uuids as strings, as users querying MongoDB expect), `version.offset` for the guard.
//! - `timeline`: one document per event, `_id` = `partition:offset`.
//! - `checkpoints`: `_id` = `projection:partition`, `offset` = last applied.
//! - A rebuilt generation N has its own `persons_gN`, `timeline_gN` and `checkpoints_gN`;
//!   [`MongoGenerations`] records which generation is live (`generations` collection).
//!
//! Indexes are created at start: `(tags, _id)` and `(status, _id)` for filtered cursor paging,
//! `updated_at`, and `(person_id, offset)` for timelines.
//!
//! ## Writes
//! A batch is folded in memory from the stored documents, then written with unordered bulk
//! writes (the `update` and `insert` commands with `ordered: false`):
//! - a person is replaced only where the stored `version.offset` is lower than the new one; if
//!   the stored document is newer, the filter misses, the upsert collides on `_id` and MongoDB
//!   answers E11000, which counts as already applied;
//! - a timeline entry that already exists is E11000 too;
//! - the checkpoint is written only after both succeeded with the configured write concern
//!   (`majority` by default): a write-concern error means not durable, and the batch is retried.
//!
//! Command bodies and the parsing of their answers are plain functions ([`bulk`]), tested
//! against the documented server responses without a server.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::{ClientOptions, DatabaseOptions, FindOptions, IndexOptions, ReadConcern, WriteConcern};
use mongodb::{Client, Collection, Database, IndexModel};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    Checkpoints, EventBatch, ListFilter, Page, PersonDoc, Projection, ReadStore, Status, StoreError, TimelineEntry,
    fold, timeline_entry,
};
use crate::resilience::{Guard, READ_TIMEOUT};

pub const PERSONS: &str = "persons";
pub const TIMELINE: &str = "timeline";
pub const CHECKPOINTS: &str = "checkpoints";
const PROJECTION: &str = "documents";

#[derive(Debug, Clone)]
pub struct MongoOptions {
    /// A `mongodb://` or `mongodb+srv://` URI (credentials and TLS go here).
    pub uri: String,
    pub database: String,
    /// `majority` (default), or a number of nodes.
    pub write_concern: String,
    /// `majority` (default), `local`, …
    pub read_concern: String,
    /// Bounds every call.
    pub timeout: Duration,
    /// How often to re-read checkpoints written by other processes, for a query API that
    /// waits on consistency tokens; `None` (the default) for the projector, which publishes
    /// its own progress as it applies.
    pub checkpoint_poll: Option<Duration>,
    /// The read-model generation (blue/green rebuilds): its collections are named after it.
    pub generation: u32,
}

impl MongoOptions {
    pub fn new(uri: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            database: database.into(),
            write_concern: "majority".into(),
            read_concern: "majority".into(),
            timeout: Duration::from_secs(10),
            checkpoint_poll: None,
            generation: 0,
        }
    }
}

/// A collection of generation `generation`: generation 0 has the plain names, generation N
/// `persons_gN`, `timeline_gN`, `checkpoints_gN`.
pub fn collection_name(base: &str, generation: u32) -> String {
    if generation == 0 { base.to_owned() } else { format!("{base}_g{generation}") }
}

/// Deletes generation `generation`'s collections (a rebuild's leftovers, or `--drop-old`).
pub async fn drop_generation(db: &Database, generation: u32) -> Result<(), StoreError> {
    for base in [PERSONS, TIMELINE, CHECKPOINTS] {
        db.collection::<Document>(&collection_name(base, generation)).drop().await.map_err(unavailable)?;
    }
    Ok(())
}

/// The generations, in one document (`generations` collection, `_id: "read-models"`) written
/// with the database's write concern (majority by default), so a switch acknowledged before a
/// failover is still the switch after it.
pub struct MongoGenerations {
    pointer: Collection<Document>,
    guard: Guard,
}

impl MongoGenerations {
    pub fn new(db: &Database, timeout: Duration) -> Self {
        Self { pointer: db.collection(GENERATIONS), guard: Guard::new("mongodb", "generations", timeout, 3) }
    }
}

pub const GENERATIONS: &str = "generations";
const POINTER_ID: &str = "read-models";

#[async_trait]
impl super::generations::GenerationPointer for MongoGenerations {
    async fn load(&self) -> Result<super::generations::Generations, StoreError> {
        let found = self
            .guard
            .call("reading the generations", || async {
                self.pointer.find_one(doc! { "_id": POINTER_ID }).await.map_err(unavailable)
            })
            .await?;
        match found {
            Some(document) => bulk::from_bson_document(document),
            None => Ok(super::generations::Generations::default()),
        }
    }

    async fn save(&self, next: &super::generations::Generations) -> Result<(), StoreError> {
        let mut document = bulk::to_bson_document(next)?;
        document.insert("_id", POINTER_ID);
        self.guard
            .call("switching generations", || async {
                let options = mongodb::options::ReplaceOptions::builder().upsert(true).build();
                self.pointer
                    .replace_one(doc! { "_id": POINTER_ID }, document.clone())
                    .with_options(options)
                    .await
                    .map_err(unavailable)
                    .map(|_| ())
            })
            .await
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Building the bulk commands and reading their answers; no I/O.
pub mod bulk {
    use super::*;

    /// The write concern as a command field.
    pub fn write_concern(w: &str, timeout: Duration) -> Document {
        let w = match w.parse::<i32>() {
            Ok(n) => Bson::Int32(n),
            Err(_) => Bson::String(w.to_owned()),
        };
        doc! { "w": w, "wtimeout": timeout.as_millis() as i64 }
    }

    /// A value as MongoDB stores it: through JSON, so uuids and dates are strings, with every
    /// integer an Int64 (offsets and counts keep one BSON type whatever their size).
    pub fn to_bson_document<T: serde::Serialize>(value: &T) -> Result<Document, StoreError> {
        fn widen(value: Bson) -> Bson {
            match value {
                Bson::Int32(n) => Bson::Int64(n.into()),
                Bson::Document(d) => Bson::Document(d.into_iter().map(|(k, v)| (k, widen(v))).collect()),
                Bson::Array(a) => Bson::Array(a.into_iter().map(widen).collect()),
                other => other,
            }
        }
        let json = serde_json::to_value(value).map_err(|e| StoreError::Rejected(e.to_string()))?;
        match widen(Bson::try_from(json).map_err(|e| StoreError::Rejected(e.to_string()))?) {
            Bson::Document(d) => Ok(d),
            other => Err(StoreError::Rejected(format!("not a document: {other}"))),
        }
    }

    pub fn from_bson_document<T: serde::de::DeserializeOwned>(mut document: Document) -> Result<T, StoreError> {
        document.remove("_id");
        let json = Bson::Document(document).into_relaxed_extjson();
        serde_json::from_value(json).map_err(|e| unavailable(format!("unreadable stored document: {e}")))
    }

    /// Replaces each person where the stored version is older, inserting where there is none.
    pub fn upsert_persons(
        collection: &str,
        docs: &[PersonDoc],
        write_concern: &Document,
    ) -> Result<Document, StoreError> {
        let updates = docs
            .iter()
            .map(|d| {
                let id = d.person_id.to_string();
                let mut replacement = to_bson_document(d)?;
                replacement.insert("_id", id.clone());
                Ok(doc! {
                    "q": { "_id": id, "version.offset": { "$lt": d.version.offset as i64 } },
                    "u": replacement,
                    "upsert": true,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(doc! { "update": collection, "updates": updates, "ordered": false, "writeConcern": write_concern.clone() })
    }

    pub fn insert_timeline(
        collection: &str,
        entries: &[TimelineEntry],
        write_concern: &Document,
    ) -> Result<Document, StoreError> {
        let documents = entries
            .iter()
            .map(|e| {
                let mut d = to_bson_document(e)?;
                d.insert("_id", format!("{}:{}", e.partition, e.offset));
                d.insert("person_id", e.person_id.to_string());
                Ok(d)
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(
            doc! { "insert": collection, "documents": documents, "ordered": false, "writeConcern": write_concern.clone() },
        )
    }

    /// Removes the content of every timeline entry of the erased persons `ids`.
    pub fn scrub_timelines(collection: &str, ids: &[String], write_concern: &Document) -> Document {
        doc! {
            "update": collection,
            "updates": [{
                "q": { "person_id": { "$in": ids }, "erased": { "$ne": true } },
                "u": { "$set": { "data": {}, "erased": true } },
                "multi": true,
            }],
            "ordered": false,
            "writeConcern": write_concern.clone(),
        }
    }

    /// Moves a checkpoint forward only.
    pub fn advance_checkpoint(
        collection: &str,
        projection: &str,
        partition: u32,
        through: u64,
        write_concern: &Document,
    ) -> Document {
        doc! {
            "update": collection,
            "updates": [{
                "q": { "_id": format!("{projection}:{partition}"), "offset": { "$lt": through as i64 } },
                "u": { "$set": { "projection": projection, "partition": partition as i64, "offset": through as i64 } },
                "upsert": true,
            }],
            "ordered": false,
            "writeConcern": write_concern.clone(),
        }
    }

    /// What an unordered write's answer means for the batch.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Outcome {
        /// Written now (matched, modified, upserted or inserted).
        pub written: u64,
        /// E11000: the stored state is already at or past this write.
        pub already_applied: u64,
    }

    /// Error codes that mean "this document can never be written as is".
    const REFUSED: &[i32] = &[2, 52, 55, 10334, 17419, 17280, 121];

    /// Reads an `insert`/`update` answer (`ok: 1`, possibly with `writeErrors` and
    /// `writeConcernError`). A write-concern error means the batch is not known durable, so it
    /// is an outage to retry; a refused document is a rejection (the projector isolates and
    /// dead-letters it); anything else is an outage.
    pub fn outcome(answer: &Document) -> Result<Outcome, StoreError> {
        let number = |key: &str| match answer.get(key) {
            Some(Bson::Int32(n)) => *n as u64,
            Some(Bson::Int64(n)) => *n as u64,
            Some(Bson::Double(n)) => *n as u64,
            _ => 0,
        };
        if let Ok(error) = answer.get_document("writeConcernError") {
            return Err(StoreError::Unavailable(format!(
                "write concern not satisfied: {}",
                error.get_str("errmsg").unwrap_or("unknown")
            )));
        }
        let mut already_applied = 0;
        if let Ok(errors) = answer.get_array("writeErrors") {
            for error in errors.iter().filter_map(Bson::as_document) {
                let code = error.get_i32("code").unwrap_or_default();
                let message = error.get_str("errmsg").unwrap_or("unknown");
                match code {
                    11000 => already_applied += 1,
                    code if REFUSED.contains(&code) => {
                        return Err(StoreError::Rejected(format!("MongoDB refused a document ({code}): {message}")));
                    }
                    code => return Err(StoreError::Unavailable(format!("write error {code}: {message}"))),
                }
            }
        }
        let upserted = answer.get_array("upserted").map_or(0, |u| u.len() as u64);
        // `n` counts matched updates and inserted documents; upserts are listed separately
        // and also counted in `n`.
        let written = number("n").max(upserted);
        Ok(Outcome { written, already_applied })
    }
}

pub struct MongoReadStore {
    db: Database,
    persons: Collection<Document>,
    timeline: Collection<Document>,
    checkpoints: Collection<Document>,
    write_concern: Document,
    /// Projector writes and start-up: the full timeout, three attempts.
    guard: Guard,
    /// Reads serving requests: short, two attempts, a breaker of their own.
    reads: Guard,
    progress: watch::Sender<Checkpoints>,
}

impl std::fmt::Debug for MongoReadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoReadStore").field("database", &self.db.name()).finish_non_exhaustive()
    }
}

/// A handle on `options.database` with the configured read and write concerns and timeouts.
/// The driver connects lazily; the first call reports a server that is not there.
pub async fn connect_database(options: &MongoOptions) -> Result<Database, StoreError> {
    let mut client_options =
        ClientOptions::parse(&options.uri).await.map_err(|e| StoreError::InvalidRequest(e.to_string()))?;
    client_options.server_selection_timeout = Some(options.timeout);
    client_options.connect_timeout = Some(options.timeout);
    client_options.app_name.get_or_insert_with(|| "callisto".into());
    let client = Client::with_options(client_options).map_err(unavailable)?;
    let read_concern = match options.read_concern.as_str() {
        "majority" => ReadConcern::majority(),
        "local" => ReadConcern::local(),
        "available" => ReadConcern::available(),
        "linearizable" => ReadConcern::linearizable(),
        "snapshot" => ReadConcern::snapshot(),
        other => return Err(StoreError::InvalidRequest(format!("unknown read concern {other:?}"))),
    };
    let write_concern = match options.write_concern.parse::<u32>() {
        Ok(n) => WriteConcern::nodes(n),
        Err(_) if options.write_concern == "majority" => WriteConcern::majority(),
        Err(_) => WriteConcern::custom(options.write_concern.clone()),
    };
    Ok(client.database_with_options(
        &options.database,
        DatabaseOptions::builder().read_concern(read_concern).write_concern(write_concern).build(),
    ))
}

impl MongoReadStore {
    /// Connects, creates the indexes, loads the checkpoints and starts following them.
    pub async fn connect(options: &MongoOptions) -> Result<Arc<Self>, StoreError> {
        let db = connect_database(options).await?;
        let store = Arc::new(Self {
            persons: db.collection(&collection_name(PERSONS, options.generation)),
            timeline: db.collection(&collection_name(TIMELINE, options.generation)),
            checkpoints: db.collection(&collection_name(CHECKPOINTS, options.generation)),
            write_concern: bulk::write_concern(&options.write_concern, options.timeout),
            guard: Guard::new("mongodb", "writes", options.timeout, 3),
            reads: Guard::new("mongodb", "reads", options.timeout.min(READ_TIMEOUT), 2),
            progress: watch::channel(BTreeMap::new()).0,
            db,
        });
        store.create_indexes().await?;
        let loaded = store.checkpoints().await?;
        store.progress.send_replace(loaded);
        if let Some(every) = options.checkpoint_poll {
            tokio::spawn(super::follow_checkpoints(Arc::downgrade(&store), |p| &p.progress, every));
        }
        Ok(store)
    }

    async fn create_indexes(&self) -> Result<(), StoreError> {
        let index = |keys: Document, name: &str, unique: bool| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).unique(unique).build())
                .build()
        };
        self.guard
            .call("creating indexes", || async {
                self.persons
                    .create_indexes([
                        index(doc! { "tags": 1, "_id": 1 }, "tags_id", false),
                        index(doc! { "status": 1, "_id": 1 }, "status_id", false),
                        index(doc! { "updated_at": 1 }, "updated_at", false),
                    ])
                    .await
                    .map_err(unavailable)?;
                self.timeline
                    .create_indexes([index(doc! { "person_id": 1, "offset": 1 }, "person_offset", true)])
                    .await
                    .map_err(unavailable)?;
                Ok(())
            })
            .await
    }

    async fn command(&self, what: &str, command: &Document) -> Result<bulk::Outcome, StoreError> {
        self.guard
            .call(what, || async { bulk::outcome(&self.db.run_command(command.clone()).await.map_err(unavailable)?) })
            .await
    }

    /// Every document of `collection` matching `filter`.
    async fn find_all(
        &self,
        what: &str,
        collection: &Collection<Document>,
        filter: Document,
    ) -> Result<Vec<Document>, StoreError> {
        self.guard
            .call(what, || async {
                collection.find(filter.clone()).await.map_err(unavailable)?.try_collect().await.map_err(unavailable)
            })
            .await
    }

    async fn load(&self, ids: &[String]) -> Result<HashMap<Uuid, PersonDoc>, StoreError> {
        let found = self.find_all("loading persons", &self.persons, doc! { "_id": { "$in": ids } }).await?;
        found.into_iter().map(|d| bulk::from_bson_document::<PersonDoc>(d).map(|p| (p.person_id, p))).collect()
    }
}

#[async_trait]
impl Projection for MongoReadStore {
    fn name(&self) -> &'static str {
        PROJECTION
    }

    fn system(&self) -> &'static str {
        "mongodb"
    }

    async fn apply_shared(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
        let events = events.as_slice();
        if !events.is_empty() {
            let ids: Vec<String> = {
                let mut ids: Vec<String> = events.iter().map(|e| e.event.meta().person_id.to_string()).collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            };
            let docs = self.load(&ids).await?;
            let mut changed: BTreeMap<Uuid, PersonDoc> = BTreeMap::new();
            let mut scrub: Vec<String> = Vec::new();
            for event in events {
                let id = event.event.meta().person_id;
                let before = changed.get(&id).or_else(|| docs.get(&id)).cloned();
                if super::scrubs_timeline(before.as_ref(), event) {
                    scrub.push(id.to_string());
                }
                if let Some(after) = fold(before.clone(), event)
                    && Some(&after) != before.as_ref()
                {
                    changed.insert(id, after);
                }
            }
            if !changed.is_empty() {
                let docs: Vec<PersonDoc> = changed.into_values().collect();
                self.command(
                    "writing persons",
                    &bulk::upsert_persons(self.persons.name(), &docs, &self.write_concern)?,
                )
                .await?;
            }
            let entries: Vec<TimelineEntry> = events.iter().map(timeline_entry).collect();
            self.command(
                "writing timelines",
                &bulk::insert_timeline(self.timeline.name(), &entries, &self.write_concern)?,
            )
            .await?;
            if !scrub.is_empty() {
                scrub.dedup();
                self.command(
                    "erasing timelines",
                    &bulk::scrub_timelines(self.timeline.name(), &scrub, &self.write_concern),
                )
                .await?;
            }
        }
        // Only now, with the batch durable, does the checkpoint move.
        let checkpoint =
            bulk::advance_checkpoint(self.checkpoints.name(), PROJECTION, partition, through, &self.write_concern);
        self.command("writing the checkpoint", &checkpoint).await?;
        super::advance(&self.progress, partition, through);
        Ok(())
    }

    async fn checkpoints(&self) -> Result<Checkpoints, StoreError> {
        let stored = self.find_all("reading checkpoints", &self.checkpoints, doc! { "projection": PROJECTION }).await?;
        Ok(stored
            .iter()
            .filter_map(|d| Some((d.get_i64("partition").ok()? as u32, d.get_i64("offset").ok()? as u64)))
            .collect())
    }

    fn progress(&self) -> watch::Receiver<Checkpoints> {
        self.progress.subscribe()
    }
}

/// One page of `collection` after `filter`, sorted by `sort`, plus whether more follow.
async fn page(
    guard: &Guard,
    collection: &Collection<Document>,
    filter: Document,
    sort: Document,
    limit: usize,
) -> Result<(Vec<Document>, bool), StoreError> {
    let mut found: Vec<Document> = guard
        .call("reading a page", || async {
            let options = FindOptions::builder().sort(sort.clone()).limit(limit as i64 + 1).build();
            collection
                .find(filter.clone())
                .with_options(options)
                .await
                .map_err(unavailable)?
                .try_collect()
                .await
                .map_err(unavailable)
        })
        .await?;
    let more = found.len() > limit;
    found.truncate(limit);
    Ok((found, more))
}

/// The filter a listing uses: equality on tag and status, then the cursor on `_id`.
pub fn list_filter(filter: &ListFilter, cursor: Option<Uuid>) -> Document {
    let mut query = Document::new();
    if let Some(tag) = &filter.tag {
        query.insert("tags", tag.clone());
    }
    match filter.status {
        Some(status) => query.insert("status", status.as_str()),
        None => query.insert("status", doc! { "$ne": Status::Erased.as_str() }),
    };
    if let Some(cursor) = cursor {
        query.insert("_id", doc! { "$gt": cursor.to_string() });
    }
    query
}

#[async_trait]
impl ReadStore for MongoReadStore {
    async fn get(&self, person_id: Uuid) -> Result<Option<PersonDoc>, StoreError> {
        let id = person_id.to_string();
        let found = self
            .reads
            .call("reading a person", || async {
                self.persons.find_one(doc! { "_id": &id }).await.map_err(unavailable)
            })
            .await?;
        found.map(bulk::from_bson_document).transpose()
    }

    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<Uuid>,
    ) -> Result<Page<PersonDoc>, StoreError> {
        let (found, more) =
            page(&self.reads, &self.persons, list_filter(filter, cursor), doc! { "_id": 1 }, limit).await?;
        let items: Vec<PersonDoc> = found.into_iter().map(bulk::from_bson_document).collect::<Result<_, _>>()?;
        let next_cursor = if more { items.last().map(|d| d.person_id.to_string()) } else { None };
        Ok(Page { items, next_cursor })
    }

    async fn timeline(
        &self,
        person_id: Uuid,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<Page<TimelineEntry>, StoreError> {
        let mut filter = doc! { "person_id": person_id.to_string() };
        if let Some(cursor) = cursor {
            filter.insert("offset", doc! { "$gt": cursor as i64 });
        }
        let (found, more) = page(&self.reads, &self.timeline, filter, doc! { "offset": 1 }, limit).await?;
        let items: Vec<TimelineEntry> = found.into_iter().map(bulk::from_bson_document).collect::<Result<_, _>>()?;
        let next_cursor = if more { items.last().map(|e| e.offset.to_string()) } else { None };
        Ok(Page { items, next_cursor })
    }
}
