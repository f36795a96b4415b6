//! Read models and their ports.
//!
//! - [`PersonDoc`] is the current state of one person; [`TimelineEntry`] one event of a
//!   person's history. [`fold`] applies an event to a document — the one definition of what each
//!   event means, shared by every store adapter.
//! - [`Projection`] is what the projector runtime drives: apply a batch of one partition
//!   together with its checkpoint, and publish progress so readers can wait for a token.
//! - [`ReadStore`] (documents, lists, timelines) and [`SearchIndex`] (full text) are the two
//!   projection ports the query API reads from.
//!
//! Adapters: [`embedded`] (redb) and [`mongo`] for documents, [`search`] (tantivy) and
//! [`elastic`] for search.
//!
//! [`switch`] puts a generation switch in front of both, for blue/green rebuilds, and
//! [`generations`] records which generation is live.
//!
//! Every document stores the (partition, offset) that last changed it, and adapters refuse
//! events at or below it, so redeliveries and replays are harmless.

/// Most records in one partition's catch-up batch for the embedded documents store and search
/// index (their [`Projection::batch_max`]); a batch this full comes from a partition that is
/// behind. Both stores ask for the same size, so projections catching up on a partition take
/// the same share of the projector's budget and can share the batches they decode. While
/// catching up, a documents transaction touches most pages of the persons and index tables
/// whatever its size, and rewrites each one (redb's write buffer is a tenth of its cache, so
/// most go out to the file and are read back): larger batches mean fewer rewrites per event.
/// 12,000 instead of 8,000 took the 1M-event rebuild from about 61k to 70k events/s with a sixth
/// less CPU (`BENCHMARKS.md`, twelfth pass).
pub const CATCH_UP_BATCH: usize = 12_000;

pub mod elastic;
pub mod embedded;
pub mod generations;
pub mod mongo;
pub mod search;
mod search_directory;
pub mod switch;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use callisto_avro::PersonEvent;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::ToSchema;
use uuid::Uuid;

/// A batch of decoded events, shared by the projector that read it and the store applying it.
pub type EventBatch = Arc<Vec<ProjectedEvent>>;

/// A decoded event and where it sits in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectedEvent {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub event: PersonEvent,
    /// Who asked for the event, from the record's `callisto.principal` header.
    pub principal: Option<String>,
    /// The person is erased: the event's personal fields are blank and read models keep
    /// nothing of the person but an erased marker.
    pub erased: bool,
}

impl ProjectedEvent {
    /// `event`, decoded from `record`, with where it sits and who asked for it.
    pub fn from_record(record: &crate::log::Record, event: PersonEvent) -> Self {
        Self {
            partition: record.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            event,
            principal: record
                .header(crate::log::PRINCIPAL_HEADER)
                .and_then(|p| std::str::from_utf8(p).ok())
                .map(str::to_owned),
            erased: false,
        }
    }

    /// An event opened by the [`Keyring`](crate::privacy::Keyring), with where it sits.
    pub fn from_opened(record: &crate::log::Record, opened: crate::privacy::Opened) -> Self {
        Self { erased: opened.erased, ..Self::from_record(record, opened.event) }
    }

    /// Whether the event leaves the person erased: a `PersonErased`, or any event of a person
    /// whose key is destroyed.
    pub fn erases(&self) -> bool {
        self.erased || matches!(self.event, PersonEvent::Erased(_))
    }
}

/// partition → last applied offset.
pub type Checkpoints = BTreeMap<u32, u64>;

/// `PersonErased` events this process's projections have applied, so stores that keep deleted
/// bytes until compacted can be compacted after erasures.
static ERASURES_APPLIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts `PersonErased` events among `events`, once they are applied.
pub fn record_erasures<'a>(events: impl IntoIterator<Item = &'a ProjectedEvent>) {
    let erasures = events.into_iter().filter(|e| matches!(e.event, PersonEvent::Erased(_))).count() as u64;
    if erasures > 0 {
        ERASURES_APPLIED.fetch_add(erasures, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many `PersonErased` events this process's projections have applied since it started.
pub fn erasures_applied() -> u64 {
    ERASURES_APPLIED.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct Version {
    pub partition: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Archived,
    /// Erased: the document is a marker without personal data, and reads answer 410.
    Erased,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Archived => "archived",
            Status::Erased => "erased",
        }
    }

    /// A status callers may filter on; erased persons are never listed.
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "archived" => Some(Status::Archived),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AddressDoc {
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postcode: String,
    pub country: String,
}

impl From<&callisto_avro::Address> for AddressDoc {
    fn from(a: &callisto_avro::Address) -> Self {
        Self {
            line1: a.line1.clone(),
            line2: a.line2.clone(),
            city: a.city.clone(),
            postcode: a.postcode.clone(),
            country: a.country.clone(),
        }
    }
}

impl AddressDoc {
    /// One line for full-text indexing.
    pub fn one_line(&self) -> String {
        [Some(self.line1.as_str()), self.line2.as_deref(), Some(&self.city), Some(&self.postcode), Some(&self.country)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The current state of one person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PersonDoc {
    pub person_id: Uuid,
    pub given_name: String,
    pub family_name: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub date_of_birth: Option<NaiveDate>,
    pub address: Option<AddressDoc>,
    /// Sorted, without duplicates.
    pub tags: Vec<String>,
    pub status: Status,
    pub archive_reason: Option<String>,
    pub note_count: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The log position of the last event applied to this document.
    pub version: Version,
}

impl PersonDoc {
    /// The version guard every adapter applies: `ev` sits at or below the position that last
    /// changed this document, so it was applied already (a redelivery or a replay).
    pub fn has_applied(&self, ev: &ProjectedEvent) -> bool {
        self.version.partition == ev.partition && self.version.offset >= ev.offset
    }
}

/// One event in a person's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TimelineEntry {
    pub person_id: Uuid,
    pub partition: u32,
    pub offset: u64,
    pub event_id: Uuid,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    /// Who asked for the event: an API key id or a token subject. Absent on events written
    /// before callers were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The event's own fields (names, text, tag …), as JSON; empty when erased.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// The person was erased: the entry keeps its type, time and ids, and no content.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub erased: bool,
}

impl TimelineEntry {
    /// This entry with its content removed.
    pub fn scrubbed(mut self) -> Self {
        self.data = serde_json::json!({});
        self.erased = true;
        self
    }
}

/// What is left of an erased person: ids and times, no personal data, no tags.
fn erased_marker(doc: Option<PersonDoc>, ev: &ProjectedEvent) -> PersonDoc {
    let meta = ev.event.meta();
    PersonDoc {
        person_id: meta.person_id,
        given_name: String::new(),
        family_name: String::new(),
        email: None,
        phone: None,
        date_of_birth: None,
        address: None,
        tags: Vec::new(),
        status: Status::Erased,
        archive_reason: None,
        note_count: 0,
        created_at: doc.as_ref().map_or(meta.occurred_at, |d| d.created_at),
        updated_at: doc.as_ref().map_or(meta.occurred_at, |d| d.updated_at.max(meta.occurred_at)),
        version: Version { partition: ev.partition, offset: ev.offset },
    }
}

/// Applies `event` to the current document. Returns `None` when the person is unknown and the
/// event does not register them: such events stay on the timeline but make no document.
/// The caller has already checked the version guard.
pub fn fold(doc: Option<PersonDoc>, ev: &ProjectedEvent) -> Option<PersonDoc> {
    if ev.erases() {
        return Some(erased_marker(doc, ev));
    }
    // An erased person stays erased, whatever follows.
    if doc.as_ref().is_some_and(|d| d.status == Status::Erased) {
        return doc;
    }
    let meta = ev.event.meta();
    let version = Version { partition: ev.partition, offset: ev.offset };
    let mut doc = match (&ev.event, doc) {
        (PersonEvent::Registered(e), existing) => {
            let mut tags = e.tags.clone();
            tags.sort();
            tags.dedup();
            PersonDoc {
                person_id: e.person_id,
                given_name: e.given_name.clone(),
                family_name: e.family_name.clone(),
                email: e.email.clone(),
                phone: e.phone.clone(),
                date_of_birth: e.date_of_birth,
                address: e.address.as_ref().map(AddressDoc::from),
                tags,
                status: Status::Active,
                archive_reason: None,
                note_count: existing.as_ref().map_or(0, |d| d.note_count),
                created_at: existing.as_ref().map_or(meta.occurred_at, |d| d.created_at),
                updated_at: meta.occurred_at,
                version,
            }
        }
        (_, None) => return None,
        (PersonEvent::Renamed(e), Some(mut d)) => {
            d.given_name = e.given_name.clone();
            d.family_name = e.family_name.clone();
            d
        }
        (PersonEvent::ContactChanged(e), Some(mut d)) => {
            if let Some(email) = &e.email {
                d.email = Some(email.clone());
            }
            if let Some(phone) = &e.phone {
                d.phone = Some(phone.clone());
            }
            d
        }
        (PersonEvent::AddressChanged(e), Some(mut d)) => {
            d.address = Some(AddressDoc::from(&e.address));
            d
        }
        (PersonEvent::NoteAdded(_), Some(mut d)) => {
            d.note_count += 1;
            d
        }
        (PersonEvent::Tagged(e), Some(mut d)) => {
            if let Err(at) = d.tags.binary_search(&e.tag) {
                d.tags.insert(at, e.tag.clone());
            }
            d
        }
        (PersonEvent::Untagged(e), Some(mut d)) => {
            d.tags.retain(|t| t != &e.tag);
            d
        }
        (PersonEvent::Archived(e), Some(mut d)) => {
            d.status = Status::Archived;
            d.archive_reason = e.reason.clone();
            d
        }
        (PersonEvent::Erased(_), Some(d)) => d,
    };
    doc.updated_at = doc.updated_at.max(meta.occurred_at);
    doc.version = version;
    Some(doc)
}

/// Whether applying `ev` to `before` must remove the content of the person's earlier timeline
/// entries: on `PersonErased`, and when an erasure reaches a person still held in full. (Entries
/// written while the person was already erased have no content to remove.)
pub fn scrubs_timeline(before: Option<&PersonDoc>, ev: &ProjectedEvent) -> bool {
    ev.erases() && (matches!(ev.event, PersonEvent::Erased(_)) || before.is_some_and(|b| b.status != Status::Erased))
}

/// The timeline entry for one event.
pub fn timeline_entry(ev: &ProjectedEvent) -> TimelineEntry {
    use serde_json::json;
    let meta = ev.event.meta();
    let data = match &ev.event {
        PersonEvent::Registered(e) => json!({
            "given_name": e.given_name, "family_name": e.family_name, "email": e.email, "phone": e.phone,
            "date_of_birth": e.date_of_birth, "address": e.address.as_ref().map(AddressDoc::from), "tags": e.tags,
        }),
        PersonEvent::Renamed(e) => json!({"given_name": e.given_name, "family_name": e.family_name}),
        PersonEvent::ContactChanged(e) => json!({"email": e.email, "phone": e.phone}),
        PersonEvent::AddressChanged(e) => json!({"address": AddressDoc::from(&e.address)}),
        PersonEvent::NoteAdded(e) => json!({"note_id": e.note_id, "text": e.text}),
        PersonEvent::Tagged(e) | PersonEvent::Untagged(e) => json!({"tag": e.tag}),
        PersonEvent::Archived(e) => json!({"reason": e.reason}),
        PersonEvent::Erased(_) => json!({}),
    };
    let entry = TimelineEntry {
        person_id: meta.person_id,
        partition: ev.partition,
        offset: ev.offset,
        event_id: meta.event_id,
        event_type: ev.event.kind().name().to_owned(),
        occurred_at: meta.occurred_at,
        correlation_id: meta.correlation_id.to_owned(),
        principal: ev.principal.clone(),
        data,
        erased: false,
    };
    if ev.erases() { entry.scrubbed() } else { entry }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot serve now; retry later (503).
    #[error("read model store unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong, e.g. a query that does not parse (400).
    #[error("{0}")]
    InvalidRequest(String),
    /// The store refuses the content of a batch (a mapping or validation error): retrying the
    /// same events will not help, so the projector isolates and dead-letters the culprit.
    #[error("store rejected the batch: {0}")]
    Rejected(String),
}

/// One page of a listing, with the cursor of the next page (`None` on the last).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub tag: Option<String>,
    pub status: Option<Status>,
}

/// Publishes `partition` as applied through `through`; progress never moves backwards.
pub(crate) fn advance(progress: &watch::Sender<Checkpoints>, partition: u32, through: u64) {
    progress.send_modify(|checkpoints| {
        let entry = checkpoints.entry(partition).or_insert(through);
        *entry = (*entry).max(through);
    });
}

/// Keeps a server-backed projection's `progress` in step with checkpoints any process wrote
/// (a query API beside projectors elsewhere), re-reading them every `every` until the
/// projection is dropped.
pub(crate) async fn follow_checkpoints<P: Projection>(
    projection: std::sync::Weak<P>,
    progress: fn(&P) -> &watch::Sender<Checkpoints>,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Some(projection) = projection.upgrade() else { return };
        let Ok(stored) = projection.checkpoints().await else { continue };
        progress(&projection).send_if_modified(|current| {
            let mut changed = false;
            for (partition, offset) in stored {
                let entry = current.entry(partition).or_insert(offset);
                if *entry < offset {
                    *entry = offset;
                    changed = true;
                }
            }
            changed
        });
    }
}

/// What the projector runtime drives.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// A short, stable name: checkpoints, metrics and dead letters carry it.
    fn name(&self) -> &'static str;

    /// The database, as trace attributes name it (`db.system.name`).
    fn system(&self) -> &'static str;

    /// Most records this projection takes in one batch, where it knows better than the
    /// projector's default: a store whose batch costs about the same however many events it
    /// holds catches up faster with larger ones. `None` takes the projector's `batch_max`.
    fn batch_max(&self) -> Option<usize> {
        None
    }

    /// Applies `events` (all of `partition`, in offset order) and records `through` as the
    /// partition's checkpoint, atomically or, where the store cannot, checkpoint after data.
    /// `through` may be past the last event when trailing events were dead-lettered.
    ///
    /// The batch is shared with the caller, so a store that applies it on a thread of its own
    /// takes it as it is: copying it there was a deep clone of every event, once for each
    /// projection of a rebuild.
    async fn apply_shared(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError>;

    /// [`Projection::apply_shared`] for a batch of a partition that is behind (a rebuild, a
    /// backlog), read under the projector's catch-up budget. A store that commits on a timer
    /// may return once the batch is taken, before the commit that makes it durable, so the
    /// budget the batch holds goes to the next one instead of waiting on the timer; its
    /// checkpoints still move only with the data, so a crash before that commit applies the
    /// batch again on restart. By default the same as [`Projection::apply_shared`].
    async fn apply_catching_up(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
        self.apply_shared(partition, events, through).await
    }

    /// [`Projection::apply_shared`] for a batch the caller keeps: applies a copy.
    async fn apply(&self, partition: u32, events: &[ProjectedEvent], through: u64) -> Result<(), StoreError> {
        self.apply_shared(partition, Arc::new(events.to_vec()), through).await
    }

    /// The stored checkpoints: partition → last applied offset.
    async fn checkpoints(&self) -> Result<Checkpoints, StoreError>;

    /// Checkpoints as they advance; readers wait on it for consistency tokens.
    fn progress(&self) -> watch::Receiver<Checkpoints>;

    /// Purges what the store still keeps on disk of deleted and replaced documents (after an
    /// erasure). Stores that purge on their own schedule do nothing here.
    async fn compact(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Documents and timelines.
#[async_trait]
pub trait ReadStore: Projection {
    async fn get(&self, person_id: Uuid) -> Result<Option<PersonDoc>, StoreError>;

    /// Persons in `person_id` order after `cursor`. Ordering by an immutable key is what keeps
    /// pages from skipping or repeating anyone while writes go on.
    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<Uuid>,
    ) -> Result<Page<PersonDoc>, StoreError>;

    /// A person's events in log order after offset `cursor`.
    async fn timeline(
        &self,
        person_id: Uuid,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<Page<TimelineEntry>, StoreError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchRequest {
    /// Query-string syntax; empty matches everything.
    pub query: String,
    pub tag: Option<String>,
    pub status: Option<Status>,
    pub limit: usize,
    /// Hits before this page (from the cursor).
    pub offset: usize,
    /// Where the previous page ended, as the index's own sort key, for indexes that page by
    /// key (Elasticsearch's `search_after`); such an index then ignores `offset`.
    pub search_after: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HitKind {
    Person,
    Note,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SearchHit {
    pub kind: HitKind,
    pub person_id: Uuid,
    pub note_id: Option<Uuid>,
    pub score: f32,
    /// The person's display name.
    pub name: String,
    /// The note's text, for note hits.
    pub text: Option<String>,
    /// field → HTML fragment with matches in `<b>`.
    pub highlights: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Facets {
    pub tags: BTreeMap<String, u64>,
    pub status: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchResults {
    pub total: usize,
    pub hits: Vec<SearchHit>,
    pub facets: Facets,
    /// The sort key of the last hit, for indexes that page by key; the next page passes it
    /// back as `search_after`.
    pub last_sort: Option<Vec<serde_json::Value>>,
}

/// Full-text search over persons and their notes.
#[async_trait]
pub trait SearchIndex: Projection {
    async fn search(&self, request: &SearchRequest) -> Result<SearchResults, StoreError>;
}
