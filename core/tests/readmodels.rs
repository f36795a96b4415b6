//! Contract checks for the read-model ports, run against the embedded adapters: the version
//! guard, idempotent redelivery, checkpoint round-trips and search semantics.

use std::sync::Arc;

use callisto_avro::PersonEvent;
use callisto_avro::events::{NoteAdded, PersonArchived, PersonRegistered, TagChanged};
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use callisto_core::readmodel::search::TantivySearchIndex;
use callisto_core::readmodel::{
    ListFilter, ProjectedEvent, Projection, ReadStore, SearchIndex, SearchRequest, Status, StoreError,
};
use chrono::Utc;
use uuid::Uuid;

fn at(partition: u32, offset: u64, event: PersonEvent) -> ProjectedEvent {
    ProjectedEvent { partition, offset, timestamp_ms: 0, event }
}

fn registered(id: Uuid, name: &str, tags: &[&str]) -> PersonEvent {
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

fn note(id: Uuid, text: &str) -> PersonEvent {
    PersonEvent::NoteAdded(NoteAdded {
        event_id: Uuid::new_v4(),
        person_id: id,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
        note_id: Uuid::new_v4(),
        text: text.into(),
    })
}

fn tagged(id: Uuid, tag: &str) -> PersonEvent {
    PersonEvent::Tagged(TagChanged {
        event_id: Uuid::new_v4(),
        person_id: id,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
        tag: tag.into(),
    })
}

fn archived(id: Uuid) -> PersonEvent {
    PersonEvent::Archived(PersonArchived {
        event_id: Uuid::new_v4(),
        person_id: id,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
        reason: None,
    })
}

fn history(id: Uuid) -> Vec<ProjectedEvent> {
    vec![
        at(3, 10, registered(id, "Ada", &["vip"])),
        at(3, 11, note(id, "the analytical engine")),
        at(3, 12, tagged(id, "math")),
        at(3, 13, note(id, "bernoulli numbers")),
        at(3, 14, archived(id)),
    ]
}

struct Stores {
    store: Arc<EmbeddedReadStore>,
    search: Arc<TantivySearchIndex>,
    _dir: tempfile::TempDir,
}

fn open() -> Stores {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedReadStore::open(&dir.path().join("readmodel.redb")).unwrap());
    let search = Arc::new(TantivySearchIndex::open(&dir.path().join("search")).unwrap());
    Stores { store, search, _dir: dir }
}

fn request(query: &str) -> SearchRequest {
    SearchRequest { query: query.into(), tag: None, status: None, limit: 50, offset: 0 }
}

#[tokio::test]
async fn redelivery_and_stale_events_change_nothing() {
    let s = open();
    let id = Uuid::new_v4();
    let events = history(id);
    for projection in [s.store.clone() as Arc<dyn Projection>, s.search.clone()] {
        projection.apply(3, &events, 14).await.unwrap();
    }
    let doc = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (doc.note_count, doc.status, doc.tags.clone()),
        (2, Status::Archived, vec!["math".into(), "vip".into()])
    );
    assert_eq!(doc.version.offset, 14);
    let search_before = s.search.search(&request("")).await.unwrap();

    // The whole batch again, then an older event alone: both are refused by the version guard.
    for projection in [s.store.clone() as Arc<dyn Projection>, s.search.clone()] {
        projection.apply(3, &events, 14).await.unwrap();
        projection.apply(3, &[at(3, 12, note(id, "late duplicate"))], 14).await.unwrap();
    }
    assert_eq!(s.store.get(id).await.unwrap().unwrap(), doc);
    assert_eq!(s.store.timeline(id, 100, None).await.unwrap().items.len(), 5, "one timeline entry per offset");
    let search_after = s.search.search(&request("")).await.unwrap();
    assert_eq!((search_after.total, search_after.facets), (search_before.total, search_before.facets));
    assert_eq!(s.search.search(&request("duplicate")).await.unwrap().total, 0);
}

#[tokio::test]
async fn checkpoints_round_trip_and_never_move_back() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedReadStore::open(&dir.path().join("r.redb")).unwrap();
        let search = TantivySearchIndex::open(&dir.path().join("s")).unwrap();
        for projection in [&store as &dyn Projection, &search] {
            projection.apply(0, &[], 41).await.unwrap();
            projection.apply(5, &[], 7).await.unwrap();
            projection.apply(5, &[], 3).await.unwrap();
            assert_eq!(*projection.progress().borrow(), [(0, 41), (5, 7)].into());
        }
    }
    let store = EmbeddedReadStore::open(&dir.path().join("r.redb")).unwrap();
    let search = TantivySearchIndex::open(&dir.path().join("s")).unwrap();
    for projection in [&store as &dyn Projection, &search] {
        assert_eq!(projection.checkpoints().await.unwrap(), [(0, 41), (5, 7)].into());
    }
}

#[tokio::test]
async fn listing_filters_and_pages_in_id_order() {
    let s = open();
    let mut ids: Vec<Uuid> = (0..25).map(|_| Uuid::new_v4()).collect();
    let events: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| at(0, i as u64, registered(*id, &format!("P{i}"), if i % 2 == 0 { &["even"] } else { &[] })))
        .collect();
    s.store.apply(0, &events, 24).await.unwrap();
    s.store.apply(0, &[at(0, 25, archived(ids[0]))], 25).await.unwrap();
    ids.sort();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s.store.list(&ListFilter::default(), 10, cursor).await.unwrap();
        assert!(page.items.len() <= 10);
        seen.extend(page.items.iter().map(|d| d.person_id));
        match page.next_cursor {
            Some(next) => cursor = Some(Uuid::parse_str(&next).unwrap()),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every person once, in id order");
    let even = s.store.list(&ListFilter { tag: Some("even".into()), status: None }, 100, None).await.unwrap();
    assert_eq!(even.items.len(), 13);
    assert!(even.next_cursor.is_none());
    let archived = s.store.list(&ListFilter { tag: None, status: Some(Status::Archived) }, 100, None).await.unwrap();
    assert_eq!(archived.items.len(), 1);
    let both =
        s.store.list(&ListFilter { tag: Some("even".into()), status: Some(Status::Active) }, 100, None).await.unwrap();
    assert_eq!(both.items.len(), 12);
}

#[tokio::test]
async fn search_ranks_highlights_filters_and_counts_facets() {
    let s = open();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let events = vec![
        at(1, 0, registered(a, "Zoë", &["vip"])),
        at(1, 1, note(a, "engine engine engine design review")),
        at(1, 2, registered(b, "Bob", &["ops"])),
        at(1, 3, note(b, "one mention of the engine among many other words in a long note")),
        at(1, 4, archived(b)),
    ];
    s.search.apply(1, &events, 4).await.unwrap();
    let results = s.search.search(&request("engine")).await.unwrap();
    assert_eq!(results.total, 2);
    assert_eq!(results.hits[0].person_id, a, "denser match ranks first");
    assert!(results.hits[0].score >= results.hits[1].score);
    assert!(results.hits[0].highlights["text"].contains("<b>engine</b>"));
    assert_eq!(results.facets.tags.get("vip"), Some(&1));
    assert_eq!(results.facets.status.get("archived"), Some(&1));

    let archived_only = SearchRequest { status: Some(Status::Archived), ..request("engine") };
    let archived_hits = s.search.search(&archived_only).await.unwrap();
    assert_eq!(archived_hits.total, 1);
    assert_eq!(archived_hits.hits[0].person_id, b, "notes carry their person's current status");
    let vip = SearchRequest { tag: Some("vip".into()), ..request("") };
    assert_eq!(s.search.search(&vip).await.unwrap().total, 2, "Zoë and her note");
    assert_eq!(s.search.search(&request("zoe")).await.unwrap().hits[0].person_id, a, "accents fold");
    assert_eq!(s.search.search(&request("email:bob")).await.unwrap().total, 1);
    let second_page = SearchRequest { limit: 1, offset: 1, ..request("engine") };
    assert_eq!(s.search.search(&second_page).await.unwrap().hits[0].person_id, b);
    assert!(matches!(s.search.search(&request("name:(")).await, Err(StoreError::InvalidRequest(_))));
}
