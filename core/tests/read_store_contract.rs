//! The `ReadStore` contract against the embedded store (always) and MongoDB (with
//! `MONGODB_URI`, e.g. `mongodb://localhost:27017/?replicaSet=rs0`).

use std::sync::Arc;

use callisto_core::readmodel::ReadStore;
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use callisto_core::readmodel::mongo::{MongoOptions, MongoReadStore};

mod contract;

#[tokio::test]
async fn the_embedded_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    contract::read_store_contract(|name| {
        let path = base.join(format!("{name}.redb"));
        async move { Arc::new(EmbeddedReadStore::open(&path).unwrap()) as Arc<dyn ReadStore> }
    })
    .await;
}

/// Two persons' events on partition 2, interleaved: Ada at 10, 12 and 14, Bob at 11 and 13.
fn two_timelines() -> (uuid::Uuid, uuid::Uuid, [callisto_core::readmodel::ProjectedEvent; 5]) {
    let (ada, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let events = [
        contract::at(2, 10, contract::registered(ada, "Ada", &[])),
        contract::at(2, 11, contract::registered(bob, "Bob", &[])),
        contract::at(2, 12, contract::note(ada, "first")),
        contract::at(2, 13, contract::note(bob, "hello")),
        contract::at(2, 14, contract::note(ada, "second")),
    ];
    (ada, bob, events)
}

/// Opens the store at `path`, holding [`two_timelines`] in an earlier layout: each timeline is
/// in place, in order, and goes on with the next event applied.
async fn timelines_carry_on(path: &std::path::Path, ada: uuid::Uuid, bob: uuid::Uuid) {
    use callisto_core::readmodel::{Page, Projection, TimelineEntry};
    let store = EmbeddedReadStore::open(path).unwrap();
    let offsets = |page: Page<TimelineEntry>| page.items.iter().map(|e| e.offset).collect::<Vec<_>>();
    assert_eq!(offsets(store.timeline(ada, 10, None).await.unwrap()), vec![10, 12, 14]);
    assert_eq!(offsets(store.timeline(bob, 10, None).await.unwrap()), vec![11, 13]);
    assert_eq!(store.timeline(ada, 10, Some(10)).await.unwrap().items[0].data["text"], "first");
    assert_eq!(store.timeline(ada, 10, Some(12)).await.unwrap().items[0].data["text"], "second");
    store.apply(2, &[contract::at(2, 15, contract::note(ada, "third"))], 15).await.unwrap();
    assert_eq!(offsets(store.timeline(ada, 10, None).await.unwrap()), vec![10, 12, 14, 15]);
}

/// A store whose timeline was written in the earlier layout (one `timeline` table keyed by
/// person and offset) opens with every entry in place and in order, and goes on from there.
#[tokio::test]
async fn an_embedded_timeline_in_the_earlier_layout_is_migrated_on_open() {
    use callisto_core::readmodel::timeline_entry;
    use redb::{ReadableDatabase, TableHandle};
    const EARLIER: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("timeline");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("documents.redb");
    let (ada, bob, earlier) = two_timelines();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(EARLIER).unwrap();
            for ev in &earlier {
                let id = ev.event.meta().person_id.to_string();
                let entry = serde_json::to_vec(&timeline_entry(ev)).unwrap();
                table.insert((id.as_str(), ev.offset), entry.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    // New entries follow the migrated ones, and the earlier table is gone.
    timelines_carry_on(&path, ada, bob).await;
    let db = redb::Database::open(&path).unwrap();
    assert!(db.begin_read().unwrap().list_tables().unwrap().all(|t| t.name() != EARLIER.name()));
}

/// A store whose timeline index holds fixed-width positions (12 bytes each, as earlier builds
/// wrote them) opens with every person's timeline in place, the rows re-packed smaller, and goes
/// on from there.
#[tokio::test]
async fn an_embedded_timeline_index_at_fixed_width_is_repacked_on_open() {
    use callisto_core::readmodel::timeline_entry;
    use redb::{ReadableDatabase, TableHandle};
    const ENTRIES: redb::TableDefinition<(u32, u64), &[u8]> = redb::TableDefinition::new("timeline_entries");
    const FIXED: redb::TableDefinition<(&str, u32), &[u8]> = redb::TableDefinition::new("timeline_index");
    const REPACKED: redb::TableDefinition<(&str, u32), &[u8]> = redb::TableDefinition::new("timeline_positions");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("documents.redb");
    let (ada, bob, events) = two_timelines();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut entries = txn.open_table(ENTRIES).unwrap();
            let mut index = txn.open_table(FIXED).unwrap();
            for person in [ada, bob] {
                let mut row = Vec::new();
                for ev in events.iter().filter(|ev| ev.event.meta().person_id == person) {
                    let entry = serde_json::to_vec(&timeline_entry(ev)).unwrap();
                    entries.insert((ev.partition, ev.offset), entry.as_slice()).unwrap();
                    row.extend_from_slice(&ev.partition.to_le_bytes());
                    row.extend_from_slice(&ev.offset.to_le_bytes());
                }
                index.insert((person.to_string().as_str(), 0), row.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    timelines_carry_on(&path, ada, bob).await;
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    assert!(txn.list_tables().unwrap().all(|t| t.name() != FIXED.name()), "the fixed-width index is gone");
    let rows = txn.open_table(REPACKED).unwrap();
    let id = ada.to_string();
    let bytes: usize =
        rows.range((id.as_str(), 0)..=(id.as_str(), u32::MAX)).unwrap().map(|row| row.unwrap().1.value().len()).sum();
    assert!(0 < bytes && bytes < 2 * 12, "{bytes} bytes for 4 positions, 48 at fixed width");
}

/// Person documents written as JSON by earlier builds are read as they are, and each is
/// rewritten in the compact layout, well under its JSON size, the next time an event changes it.
#[tokio::test]
async fn embedded_person_documents_stored_as_json_are_read_and_rewritten_compactly() {
    use callisto_core::readmodel::{ListFilter, PersonDoc, Projection, fold};
    use redb::ReadableDatabase;
    const PERSONS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("persons");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("documents.redb");
    let ada = uuid::Uuid::new_v4();
    let registered = contract::at(3, 7, contract::registered(ada, "Ada", &["vip"]));
    let earlier: PersonDoc = fold(None, &registered).unwrap();
    let json = serde_json::to_vec(&earlier).unwrap();
    {
        let store = EmbeddedReadStore::open(&path).unwrap();
        store.apply(3, std::slice::from_ref(&registered), 7).await.unwrap();
    }
    let stored = |path: &std::path::Path| {
        let db = redb::Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(PERSONS).unwrap();
        table.get(ada.to_string().as_str()).unwrap().unwrap().value().to_vec()
    };
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(PERSONS).unwrap().insert(ada.to_string().as_str(), json.as_slice()).unwrap();
        txn.commit().unwrap();
    }
    assert_eq!(stored(&path), json, "the earlier build's JSON document is in place");

    let store = EmbeddedReadStore::open(&path).unwrap();
    assert_eq!(store.get(ada).await.unwrap(), Some(earlier.clone()));
    let tagged = ListFilter { tag: Some("vip".into()), status: None };
    assert_eq!(store.list(&tagged, 10, None).await.unwrap().items, vec![earlier.clone()]);

    let note = contract::at(3, 8, contract::note(ada, "first"));
    store.apply(3, std::slice::from_ref(&note), 8).await.unwrap();
    let now = fold(Some(earlier), &note).unwrap();
    assert_eq!(store.get(ada).await.unwrap(), Some(now.clone()));
    drop(store);
    let rewritten = stored(&path);
    assert!(serde_json::from_slice::<PersonDoc>(&rewritten).is_err(), "the document is no longer JSON");
    assert!(
        rewritten.len() * 2 < serde_json::to_vec(&now).unwrap().len(),
        "{} bytes against {} as JSON",
        rewritten.len(),
        serde_json::to_vec(&now).unwrap().len()
    );
}

/// What the embedded documents store has on disk after a crash, read from a copy of its file:
/// redb opens such a copy the way it opens a file after a crash, at its last durable commit.
async fn after_a_crash(
    path: &std::path::Path,
    person: uuid::Uuid,
) -> (Option<callisto_core::readmodel::PersonDoc>, u64) {
    use callisto_core::readmodel::Projection;
    let copy = path.with_extension("crashed.redb");
    std::fs::copy(path, &copy).unwrap();
    let store = EmbeddedReadStore::open(&copy).unwrap();
    let found = store.get(person).await.unwrap();
    let checkpoint = store.checkpoints().await.unwrap().get(&3).copied().unwrap_or(0);
    drop(store);
    std::fs::remove_file(&copy).unwrap();
    (found, checkpoint)
}

/// Live commits of the embedded documents store are made durable within moments without
/// another write coming, and a batch that erases a person is durable when it is applied.
#[tokio::test]
async fn embedded_documents_become_durable_without_another_write_and_erasures_at_once() {
    use callisto_core::readmodel::{Projection, Status};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("documents.redb");
    let store = EmbeddedReadStore::open(&path).unwrap();
    let ada = uuid::Uuid::new_v4();
    store.apply(3, &[contract::at(3, 7, contract::registered(ada, "Ada", &["vip"]))], 7).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (found, checkpoint) = after_a_crash(&path, ada).await;
    assert_eq!(found.map(|doc| doc.given_name), Some("Ada".to_owned()), "on disk after a pause");
    assert_eq!(checkpoint, 7, "with its checkpoint");

    // The note's commit is durable (the last one was long ago), so the erasure right after it
    // would not be, by time alone.
    store.apply(3, &[contract::at(3, 8, contract::note(ada, "first"))], 8).await.unwrap();
    store.apply(3, &[contract::at(3, 9, contract::erased(ada))], 9).await.unwrap();
    let (found, checkpoint) = after_a_crash(&path, ada).await;
    let found = found.expect("the erased person's document remains, scrubbed");
    assert_eq!((found.status, checkpoint), (Status::Erased, 9), "the erasure is on disk as soon as it is applied");
    assert_ne!(found.given_name, "Ada");

    // Compaction (erasure's `admin compact`) waits on no flush: commits not yet durable are
    // made durable first.
    let grace = uuid::Uuid::new_v4();
    store.apply(3, &[contract::at(3, 10, contract::registered(grace, "Grace", &[]))], 10).await.unwrap();
    store.compact().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_meets_the_contract() {
    let Some(uri) = contract::server_url("MONGODB_URI") else { return };
    let run = contract::unique("callisto-contract");
    contract::read_store_contract(|name| {
        let options = MongoOptions::new(uri.clone(), format!("{run}-{name}"));
        async move { MongoReadStore::connect(&options).await.unwrap() as Arc<dyn ReadStore> }
    })
    .await;
}

/// Blue/green on MongoDB: each generation has its own collections and checkpoints, the pointer
/// document records the switch, and dropping a generation drops its collections only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_generations_are_separate_and_switch_with_the_pointer() {
    use callisto_core::readmodel::Projection;
    use callisto_core::readmodel::generations::{GenerationPointer, Generations};
    use callisto_core::readmodel::mongo::{MongoGenerations, connect_database, drop_generation};

    let Some(uri) = contract::server_url("MONGODB_URI") else { return };
    let options = MongoOptions::new(uri, contract::unique("callisto-generations"));
    let generation = |n: u32| MongoOptions { generation: n, ..options.clone() };
    let db = connect_database(&options).await.unwrap();
    let pointer = MongoGenerations::new(&db, options.timeout);
    assert_eq!(pointer.load().await.unwrap(), Generations::default());

    let (blue_person, green_person) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let blue = MongoReadStore::connect(&generation(0)).await.unwrap();
    blue.apply(0, &[contract::at(0, 4, contract::registered(blue_person, "Blue", &[]))], 4).await.unwrap();
    let green = MongoReadStore::connect(&generation(1)).await.unwrap();
    assert!(green.checkpoints().await.unwrap().is_empty(), "a new generation starts without checkpoints");
    green.apply(0, &[contract::at(0, 9, contract::registered(green_person, "Green", &[]))], 9).await.unwrap();
    assert!(blue.get(green_person).await.unwrap().is_none() && green.get(blue_person).await.unwrap().is_none());
    assert_eq!(blue.checkpoints().await.unwrap().get(&0), Some(&4));

    let switched = Generations { live: 1, previous: Some(0), building: None };
    pointer.save(&switched).await.unwrap();
    assert_eq!(MongoGenerations::new(&db, options.timeout).load().await.unwrap(), switched);

    drop_generation(&db, 1).await.unwrap();
    let rebuilt = MongoReadStore::connect(&generation(1)).await.unwrap();
    assert!(rebuilt.get(green_person).await.unwrap().is_none(), "dropped with its collections");
    assert!(rebuilt.checkpoints().await.unwrap().is_empty());
    assert!(blue.get(blue_person).await.unwrap().is_some(), "other generations are untouched");
}
