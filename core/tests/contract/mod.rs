//! One contract per read-model port, run against every adapter so the embedded stand-ins and
//! the production servers cannot drift apart: get, list and pagination; search semantics and
//! facets; the version guard and idempotent replays; checkpoint round-trips; bad input.
//!
//! A suite takes an opener: the same name opens the same storage again (a restart).
#![allow(dead_code)]

use std::future::Future;
use std::io::Write;
use std::sync::Arc;

use callisto_avro::PersonEvent;
use callisto_avro::events::{NoteAdded, PersonArchived, PersonErased, PersonRegistered, TagChanged};
use callisto_core::readmodel::{
    ListFilter, ProjectedEvent, Projection, ReadStore, SearchIndex, SearchRequest, Status, StoreError,
};
use chrono::Utc;
use uuid::Uuid;

/// The production half of a suite runs only with its server configured; otherwise it says so
/// in one line, outside the test harness's output capture.
pub fn server_url(variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let _ = writeln!(std::io::stderr(), "skipped: set {variable} to run");
            None
        }
    }
}

pub mod peers;

/// What a suite runs against. Independent peers (servers that speak the protocol but are not
/// the real product) may lack a feature; each gap is named here, and only the assertions that
/// need that feature are skipped for them. Real servers and the embedded stores get every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The embedded store, or a real MongoDB / Elasticsearch.
    Reference,
    /// `osmem-server` (PyPI), an OpenSearch-compatible in-memory server.
    Osmem,
}

impl Server {
    /// `search_after` with a `_score` sort key: osmem answers the page it was given again.
    pub fn pages_by_score(self) -> bool {
        self != Server::Osmem
    }
}

/// A name no other run uses, for databases and index prefixes on shared servers.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

pub fn at(partition: u32, offset: u64, event: PersonEvent) -> ProjectedEvent {
    ProjectedEvent { partition, offset, timestamp_ms: 0, event, principal: None, erased: false }
}

pub fn registered(id: Uuid, name: &str, tags: &[&str]) -> PersonEvent {
    PersonEvent::Registered(PersonRegistered {
        event_id: Uuid::new_v4(),
        person_id: id,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
        given_name: name.into(),
        family_name: "Contract".into(),
        email: Some(format!("{}@example.org", name.to_lowercase())),
        phone: None,
        date_of_birth: None,
        address: None,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    })
}

pub fn note(id: Uuid, text: &str) -> PersonEvent {
    PersonEvent::NoteAdded(NoteAdded {
        event_id: Uuid::new_v4(),
        person_id: id,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
        note_id: Uuid::new_v4(),
        text: text.into(),
    })
}

pub fn tagged(id: Uuid, tag: &str) -> PersonEvent {
    PersonEvent::Tagged(TagChanged {
        event_id: Uuid::new_v4(),
        person_id: id,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
        tag: tag.into(),
    })
}

pub fn archived(id: Uuid) -> PersonEvent {
    PersonEvent::Archived(PersonArchived {
        event_id: Uuid::new_v4(),
        person_id: id,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
        reason: None,
    })
}

pub fn history(id: Uuid) -> Vec<ProjectedEvent> {
    vec![
        at(3, 10, registered(id, "Ada", &["vip"])),
        at(3, 11, note(id, "the analytical engine")),
        at(3, 12, tagged(id, "math")),
        at(3, 13, note(id, "bernoulli numbers")),
        at(3, 14, archived(id)),
    ]
}

fn request(query: &str) -> SearchRequest {
    SearchRequest { query: query.into(), tag: None, status: None, limit: 50, offset: 0, search_after: None }
}

pub async fn read_store_contract<F, Fut>(open: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn ReadStore>>,
{
    guard_and_redelivery(open("guard".into()).await).await;
    long_timeline(open("long-timeline".into()).await).await;
    checkpoints_round_trip(&open).await;
    listing(open("listing".into()).await).await;
    bad_input(open("bad-input".into()).await).await;
    erasure(open("erasure".into()).await).await;
}

pub fn erased(id: Uuid) -> PersonEvent {
    PersonEvent::Erased(PersonErased {
        event_id: Uuid::new_v4(),
        person_id: id,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
    })
}

/// `event` as projectors see it once the person's key is destroyed: personal fields blank.
pub fn after_erasure(partition: u32, offset: u64, mut event: PersonEvent) -> ProjectedEvent {
    event.take_personal();
    ProjectedEvent { erased: true, ..at(partition, offset, event) }
}

/// `PersonErased` leaves an erased marker with nothing personal, scrubs the timeline, and hides
/// the person from listings; events read after the key is gone (redeliveries, a replay from
/// offset 0) bring nothing back; another person is untouched.
async fn erasure(store: Arc<dyn ReadStore>) {
    let (id, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut events = history(id);
    events.push(at(3, 15, registered(other, "Grace", &["vip"])));
    store.apply(3, &events, 15).await.unwrap();
    store.apply(3, &[at(3, 16, erased(id))], 16).await.unwrap();
    let check = |label: &'static str| {
        let store = store.clone();
        async move {
            let marker = store.get(id).await.unwrap().expect("an erased marker");
            assert_eq!(marker.status, Status::Erased, "{label}");
            assert_eq!(
                (marker.given_name.as_str(), marker.email.as_deref(), marker.tags.len()),
                ("", None, 0),
                "{label}"
            );
            let timeline = store.timeline(id, 100, None).await.unwrap();
            assert_eq!(
                timeline.items.iter().map(|e| e.offset).collect::<Vec<_>>(),
                vec![10, 11, 12, 13, 14, 16],
                "{label}"
            );
            assert!(
                timeline.items.iter().all(|e| e.erased && e.data == serde_json::json!({})),
                "{label}: {timeline:?}"
            );
            let listed = store.list(&ListFilter::default(), 100, None).await.unwrap();
            assert_eq!(listed.items.iter().map(|d| d.person_id).collect::<Vec<_>>(), vec![other], "{label}");
            let vip = store.list(&ListFilter { tag: Some("vip".into()), status: None }, 100, None).await.unwrap();
            assert_eq!(vip.items.len(), 1, "{label}");
            assert_eq!(store.get(other).await.unwrap().unwrap().given_name, "Grace", "{label}");
        }
    };
    check("after PersonErased").await;
    // Redelivered and replayed: the key is gone, so the events arrive erased.
    let replayed: Vec<ProjectedEvent> = history(id).into_iter().map(|e| after_erasure(3, e.offset, e.event)).collect();
    store.apply(3, &replayed, 16).await.unwrap();
    store.apply(3, &[at(3, 16, erased(id))], 16).await.unwrap();
    check("after a redelivery").await;

    // A person registered, noted and erased within one batch: no content reaches the timeline.
    let brief = Uuid::new_v4();
    let batch = [at(4, 1, registered(brief, "Brief", &[])), at(4, 2, note(brief, "secret")), at(4, 3, erased(brief))];
    store.apply(4, &batch, 3).await.unwrap();
    let timeline = store.timeline(brief, 10, None).await.unwrap();
    assert_eq!(timeline.items.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(timeline.items.iter().all(|e| e.erased && e.data == serde_json::json!({})), "{timeline:?}");
}

async fn guard_and_redelivery(store: Arc<dyn ReadStore>) {
    let id = Uuid::new_v4();
    let events = history(id);
    store.apply(3, &events, 14).await.unwrap();
    let doc = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (doc.note_count, doc.status, doc.tags.clone()),
        (2, Status::Archived, vec!["math".into(), "vip".into()])
    );
    assert_eq!(doc.version.offset, 14);

    // The whole batch again, then an older event alone: both are refused by the version guard.
    store.apply(3, &events, 14).await.unwrap();
    store.apply(3, &[at(3, 12, note(id, "late duplicate"))], 14).await.unwrap();
    assert_eq!(store.get(id).await.unwrap().unwrap(), doc);
    let timeline = store.timeline(id, 100, None).await.unwrap();
    assert_eq!(
        timeline.items.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![10, 11, 12, 13, 14],
        "one entry per offset"
    );
    let first = store.timeline(id, 2, None).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let cursor = first.next_cursor.expect("more entries follow").parse::<u64>().unwrap();
    let rest = store.timeline(id, 10, Some(cursor)).await.unwrap();
    assert_eq!(rest.items.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![12, 13, 14]);
    assert!(rest.next_cursor.is_none());
}

/// A timeline of hundreds of entries, applied over several batches with one delivered twice,
/// pages through every entry once and in order.
async fn long_timeline(store: Arc<dyn ReadStore>) {
    let id = Uuid::new_v4();
    let mut events = vec![at(5, 100, registered(id, "Grace", &[]))];
    events.extend((101..700).map(|offset| at(5, offset, note(id, &format!("note {offset}")))));
    for batch in events.chunks(150) {
        let through = batch.last().unwrap().offset;
        store.apply(5, batch, through).await.unwrap();
    }
    store.apply(5, &events[300..450], 549).await.unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.timeline(id, 64, cursor).await.unwrap();
        seen.extend(page.items.iter().map(|e| e.offset));
        match page.next_cursor {
            Some(next) => cursor = Some(next.parse::<u64>().unwrap()),
            None => break,
        }
    }
    assert_eq!(seen, (100..700).collect::<Vec<u64>>());
    assert_eq!(store.get(id).await.unwrap().unwrap().note_count, 599);
}

/// Checkpoints survive a reopen and never move back; the same for every projection.
async fn checkpoints_round_trip<P, F, Fut>(open: &F)
where
    P: Projection + ?Sized,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<P>>,
{
    {
        let projection = open("checkpoints".into()).await;
        projection.apply(0, &[], 41).await.unwrap();
        projection.apply(5, &[], 7).await.unwrap();
        projection.apply(5, &[], 3).await.unwrap();
        assert_eq!(*projection.progress().borrow(), [(0, 41), (5, 7)].into());
    }
    let reopened = open("checkpoints".into()).await;
    assert_eq!(
        reopened.checkpoints().await.unwrap(),
        [(0, 41), (5, 7)].into(),
        "checkpoints survive a restart and never move back"
    );
}

async fn listing(store: Arc<dyn ReadStore>) {
    let mut ids: Vec<Uuid> = (0..25).map(|_| Uuid::new_v4()).collect();
    let events: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| at(0, i as u64, registered(*id, &format!("P{i}"), if i % 2 == 0 { &["even"] } else { &[] })))
        .collect();
    store.apply(0, &events, 24).await.unwrap();
    store.apply(0, &[at(0, 25, archived(ids[0]))], 25).await.unwrap();
    ids.sort();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list(&ListFilter::default(), 10, cursor).await.unwrap();
        assert!(page.items.len() <= 10);
        seen.extend(page.items.iter().map(|d| d.person_id));
        match page.next_cursor {
            Some(next) => cursor = Some(Uuid::parse_str(&next).unwrap()),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every person once, in id order");
    let even = store.list(&ListFilter { tag: Some("even".into()), status: None }, 100, None).await.unwrap();
    assert_eq!(even.items.len(), 13);
    assert!(even.next_cursor.is_none());
    let archived = store.list(&ListFilter { tag: None, status: Some(Status::Archived) }, 100, None).await.unwrap();
    assert_eq!(archived.items.len(), 1);
    let both =
        store.list(&ListFilter { tag: Some("even".into()), status: Some(Status::Active) }, 100, None).await.unwrap();
    assert_eq!(both.items.len(), 12);
}

async fn bad_input(store: Arc<dyn ReadStore>) {
    let unknown = Uuid::new_v4();
    assert!(store.get(unknown).await.unwrap().is_none());
    assert!(store.timeline(unknown, 10, None).await.unwrap().items.is_empty());
    // Events for a person never registered change no document but stay on the timeline.
    store.apply(7, &[at(7, 0, note(unknown, "orphan")), at(7, 1, tagged(unknown, "x"))], 1).await.unwrap();
    assert!(store.get(unknown).await.unwrap().is_none());
    assert_eq!(store.timeline(unknown, 10, None).await.unwrap().items.len(), 2);
    assert!(store.list(&ListFilter { tag: Some("x".into()), status: None }, 10, None).await.unwrap().items.is_empty());
}

pub async fn search_index_contract<F, Fut>(server: Server, open: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn SearchIndex>>,
{
    search_guard_and_redelivery(open("guard".into()).await).await;
    search_guard_after_reopen(&open).await;
    checkpoints_round_trip(&open).await;
    search_semantics(server, open("semantics".into()).await).await;
    search_erasure(open("erasure".into()).await).await;
}

/// An erased person's documents (person and notes) are gone from search, and events read after
/// the key is destroyed put nothing back; another person is still found.
async fn search_erasure(index: Arc<dyn SearchIndex>) {
    let (id, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut events = history(id);
    events.push(at(3, 15, registered(other, "Grace", &["vip"])));
    events.push(at(3, 16, note(other, "the engine of Grace")));
    index.apply(3, &events, 16).await.unwrap();
    assert_eq!(index.search(&request("engine")).await.unwrap().total, 2);
    index.apply(3, &[at(3, 17, erased(id))], 17).await.unwrap();
    let only_other = |results: callisto_core::readmodel::SearchResults| {
        assert!(results.hits.iter().all(|h| h.person_id == other), "{results:?}");
        results.total
    };
    assert_eq!(only_other(index.search(&request("")).await.unwrap()), 2, "Grace and her note");
    assert_eq!(only_other(index.search(&request("bernoulli")).await.unwrap()), 0);
    assert_eq!(only_other(index.search(&request("Ada")).await.unwrap()), 0);
    let replayed: Vec<ProjectedEvent> = history(id).into_iter().map(|e| after_erasure(3, e.offset, e.event)).collect();
    index.apply(3, &replayed, 17).await.unwrap();
    let results = index.search(&request("")).await.unwrap();
    assert_eq!(only_other(results.clone()), 2, "a replay brings nothing back");
    assert_eq!(results.facets.status.get("erased"), None);
}

async fn search_guard_and_redelivery(index: Arc<dyn SearchIndex>) {
    let id = Uuid::new_v4();
    let events = history(id);
    index.apply(3, &events, 14).await.unwrap();
    let before = index.search(&request("")).await.unwrap();
    assert_eq!(before.total, 3, "the person and two notes");
    index.apply(3, &events, 14).await.unwrap();
    index.apply(3, &[at(3, 12, note(id, "late duplicate"))], 14).await.unwrap();
    let after = index.search(&request("")).await.unwrap();
    assert_eq!((after.total, after.facets), (before.total, before.facets));
    assert_eq!(index.search(&request("duplicate")).await.unwrap().total, 0);
    // Tagged after the notes were written: the notes carry the new tag too.
    let math = SearchRequest { tag: Some("math".into()), ..request("") };
    assert_eq!(index.search(&math).await.unwrap().total, 3);
}

/// The guard holds for a process that starts afresh: after notes that change nothing else of
/// the person, a redelivered note at or below the last one is refused, a newer one is added.
async fn search_guard_after_reopen<F, Fut>(open: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn SearchIndex>>,
{
    let id = Uuid::new_v4();
    {
        let index = open("reopen".into()).await;
        index.apply(3, &[at(3, 10, registered(id, "Ada", &["vip"]))], 10).await.unwrap();
        let notes = vec![at(3, 11, note(id, "the analytical engine")), at(3, 12, note(id, "bernoulli numbers"))];
        index.apply(3, &notes, 12).await.unwrap();
        assert_eq!(index.search(&request("")).await.unwrap().total, 3, "the person and two notes");
    }
    let index = open("reopen".into()).await;
    index.apply(3, &[at(3, 12, note(id, "late duplicate")), at(3, 11, note(id, "older duplicate"))], 12).await.unwrap();
    assert_eq!(index.search(&request("duplicate")).await.unwrap().total, 0, "redeliveries are refused");
    index.apply(3, &[at(3, 13, note(id, "difference engine"))], 13).await.unwrap();
    let results = index.search(&request("")).await.unwrap();
    assert_eq!(results.total, 4, "the newer note is added: {results:?}");
    assert_eq!(results.facets.tags.get("vip"), Some(&4), "and carries the person's facets");
}

async fn search_semantics(server: Server, index: Arc<dyn SearchIndex>) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let events = vec![
        at(1, 0, registered(a, "Zoë", &["vip"])),
        at(1, 1, note(a, "engine engine engine design review")),
        at(1, 2, registered(b, "Bob", &["ops"])),
        at(1, 3, note(b, "one mention of the engine among many other words in a long note")),
        at(1, 4, archived(b)),
    ];
    index.apply(1, &events, 4).await.unwrap();
    let results = index.search(&request("engine")).await.unwrap();
    assert_eq!(results.total, 2);
    assert_eq!(results.hits[0].person_id, a, "denser match ranks first");
    assert!(results.hits[0].score >= results.hits[1].score);
    assert!(results.hits[0].highlights["text"].contains("<b>engine</b>"));
    assert_eq!(results.facets.tags.get("vip"), Some(&1));
    assert_eq!(results.facets.status.get("archived"), Some(&1));

    let archived_only = SearchRequest { status: Some(Status::Archived), ..request("engine") };
    let archived_hits = index.search(&archived_only).await.unwrap();
    assert_eq!(archived_hits.total, 1);
    assert_eq!(archived_hits.hits[0].person_id, b, "notes carry their person's current status");
    let vip = SearchRequest { tag: Some("vip".into()), ..request("") };
    assert_eq!(index.search(&vip).await.unwrap().total, 2, "Zoë and her note");
    assert_eq!(index.search(&request("zoe")).await.unwrap().hits[0].person_id, a, "accents fold");
    assert_eq!(index.search(&request("email:bob")).await.unwrap().total, 1);
    let second_page = SearchRequest { limit: 1, offset: 1, ..request("engine") };
    assert_eq!(index.search(&second_page).await.unwrap().hits[0].person_id, b);
    // Paging as the query API does: the next page starts after the last hit's sort key where
    // the index pages by key, at the offset otherwise.
    if server.pages_by_score() {
        let first = index.search(&SearchRequest { limit: 1, ..request("engine") }).await.unwrap();
        let next = SearchRequest { limit: 1, offset: 1, search_after: first.last_sort, ..request("engine") };
        let next = index.search(&next).await.unwrap();
        assert_eq!(next.hits.iter().map(|h| h.person_id).collect::<Vec<_>>(), vec![b]);
    }
    // Bad input is the caller's error, not an outage.
    assert!(matches!(index.search(&request("name:(")).await, Err(StoreError::InvalidRequest(_))));
}
