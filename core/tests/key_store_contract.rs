//! The `KeyStore` contract, and the `Keyring` over it, against the embedded store (always) and
//! MongoDB (with `MONGODB_URI`): keys are created once and shared by racing writers, wrapped
//! (never in clear), destroyed for good with a tombstone, re-wrapped by a new master key
//! without touching sealed events; a destroyed key opens nothing, in this process at once and
//! in another within the cache bound.

use std::sync::Arc;
use std::time::Duration;

use callisto_avro::PersonEvent;
use callisto_avro::events::{NoteAdded, PersonRegistered};
use callisto_core::privacy::embedded::EmbeddedKeyStore;
use callisto_core::privacy::mongo::MongoKeyStore;
use callisto_core::privacy::{KeyError, KeyStore, Keyring, KeyringOptions, MasterKey, StoredKey};
use callisto_core::readmodel::mongo::{MongoOptions, connect_database};
use chrono::Utc;
use uuid::Uuid;

mod contract;

fn keyring(store: Arc<dyn KeyStore>, current: &str, previous: &[&str], ttl: Duration) -> Keyring {
    let options = KeyringOptions { cache_ttl: ttl, ..KeyringOptions::default() };
    let previous = previous.iter().map(|k| MasterKey::from_hex(k).unwrap()).collect();
    Keyring::new(store, MasterKey::from_hex(current).unwrap(), previous, &options)
}

fn registered(person: Uuid) -> PersonEvent {
    PersonEvent::Registered(PersonRegistered {
        event_id: Uuid::new_v4(),
        person_id: person,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
        given_name: "Hedy".into(),
        family_name: "Lamarr".into(),
        email: Some("hedy@example.org".into()),
        phone: None,
        date_of_birth: None,
        address: None,
        tags: vec!["radio".into()],
    })
}

fn noted(person: Uuid, text: &str) -> PersonEvent {
    PersonEvent::NoteAdded(NoteAdded {
        event_id: Uuid::new_v4(),
        person_id: person,
        occurred_at: Utc::now(),
        correlation_id: "c".into(),
        note_id: Uuid::new_v4(),
        text: text.into(),
    })
}

async fn key_store_contract(store: Arc<dyn KeyStore>) {
    // The store itself: first insert wins, tombstones are final.
    let person = Uuid::new_v4();
    assert_eq!(store.load(person).await.unwrap(), None);
    let first = StoredKey::Active { kek_id: "k1".into(), wrapped: vec![1; 60], created_at: Utc::now() };
    let second = StoredKey::Active { kek_id: "k1".into(), wrapped: vec![2; 60], created_at: Utc::now() };
    assert_eq!(store.insert_if_absent(person, first.clone()).await.unwrap(), first);
    assert_eq!(store.insert_if_absent(person, second).await.unwrap(), first, "a racing writer gets the stored key");
    assert_eq!(store.load(person).await.unwrap(), Some(first.clone()));
    store.destroy(person, Utc::now()).await.unwrap();
    store.destroy(person, Utc::now()).await.unwrap();
    let tombstone = store.load(person).await.unwrap().unwrap();
    assert!(matches!(tombstone, StoredKey::Destroyed { .. }), "{tombstone:?}");
    let again = store.insert_if_absent(person, first.clone()).await.unwrap();
    assert!(matches!(again, StoredKey::Destroyed { .. }), "a destroyed key is never recreated");
    let never_seen = Uuid::new_v4();
    store.destroy(never_seen, Utc::now()).await.unwrap();
    assert!(matches!(store.load(never_seen).await.unwrap(), Some(StoredKey::Destroyed { .. })));

    // Many at once: every person with a record, tombstones included, and nothing for the rest.
    let other = Uuid::new_v4();
    let third = StoredKey::Active { kek_id: "k1".into(), wrapped: vec![3; 60], created_at: Utc::now() };
    store.insert_if_absent(other, third.clone()).await.unwrap();
    let mut many = store.load_many(&[person, Uuid::new_v4(), other]).await.unwrap();
    many.sort_by_key(|(id, _)| *id);
    let mut expected = vec![(person, tombstone.clone()), (other, third)];
    expected.sort_by_key(|(id, _)| *id);
    assert_eq!(many, expected);
    assert_eq!(store.load_many(&[]).await.unwrap(), vec![]);
    // Its made-up master key would stop the rotation below.
    store.destroy(other, Utc::now()).await.unwrap();

    // The keyring over it.
    let (old, new) = (MasterKey::generate_hex(), MasterKey::generate_hex());
    let ring = keyring(store.clone(), &old, &[], Duration::from_secs(30));
    let hedy = Uuid::new_v4();
    let (sealed_event, sealed) = ring.seal(registered(hedy)).await.unwrap();
    let sealed = sealed.expect("a registration carries personal data");
    let PersonEvent::Registered(blank) = &sealed_event else { unreachable!() };
    assert_eq!((blank.given_name.as_str(), blank.email.as_deref(), blank.tags.len()), ("", None, 1));
    let opened = ring.open(sealed_event.clone(), Some(sealed.clone())).await.unwrap();
    assert_eq!((opened.event.clone(), opened.erased), (registered_like(&opened.event, hedy), false));
    let Some(StoredKey::Active { wrapped, .. }) = store.load(hedy).await.unwrap() else { panic!("an active key") };
    assert_eq!(wrapped.len(), 12 + 32 + 16, "nonce, the 256-bit key, the tag: wrapped, not clear");

    // Ciphertext moved to another event does not open.
    let (other_event, _) = ring.seal(noted(hedy, "moved")).await.unwrap();
    assert!(matches!(ring.open(other_event, Some(sealed.clone())).await, Err(KeyError::Unreadable(_))));

    // Rotation: the new master key re-wraps; old events still open; the old key is not needed.
    let (note_event, note_sealed) = ring.seal(noted(hedy, "before rotation")).await.unwrap();
    let rotated = keyring(store.clone(), &new, &[&old], Duration::from_secs(30));
    assert!(rotated.rewrap_all().await.unwrap() >= 1);
    let only_new = keyring(store.clone(), &new, &[], Duration::from_secs(30));
    let opened = only_new.open(note_event.clone(), note_sealed.clone()).await.unwrap();
    let PersonEvent::NoteAdded(note) = opened.event else { unreachable!() };
    assert_eq!(note.text, "before rotation");
    assert!(
        matches!(ring.open(sealed_event.clone(), Some(sealed.clone())).await, Ok(o) if !o.erased),
        "a cached key keeps working until it expires"
    );

    // Another process, with a short cache, sees the erasure within its bound.
    let elsewhere = keyring(store.clone(), &new, &[], Duration::from_millis(200));
    assert!(!elsewhere.open(sealed_event.clone(), Some(sealed.clone())).await.unwrap().erased);
    only_new.destroy(hedy).await.unwrap();
    let here = only_new.open(sealed_event.clone(), Some(sealed.clone())).await.unwrap();
    assert!(here.erased, "the destroying process forgets the key at once");
    let PersonEvent::Registered(blank) = here.event else { unreachable!() };
    assert_eq!(blank.given_name, "");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(elsewhere.open(sealed_event.clone(), Some(sealed.clone())).await.unwrap().erased, "after the cache bound");
    assert!(matches!(only_new.seal(noted(hedy, "late")).await, Err(KeyError::Erased)));
    assert!(matches!(only_new.key_for_writing(hedy).await, Err(KeyError::Erased)));
    // A registration does not look the key up first; reusing an erased person's id is refused
    // all the same, from the cache or, in a process that never saw the person, by the store.
    assert!(matches!(only_new.seal(registered(hedy)).await, Err(KeyError::Erased)));
    let unaware = keyring(store.clone(), &new, &[], Duration::from_secs(30));
    assert!(matches!(unaware.seal(registered(hedy)).await, Err(KeyError::Erased)));
    // Reusing a live person's id seals with their stored key, not a new one.
    let ada = Uuid::new_v4();
    only_new.seal(registered(ada)).await.unwrap();
    let (again, again_sealed) = unaware.seal(registered(ada)).await.unwrap();
    assert!(!only_new.open(again, again_sealed).await.unwrap().erased, "sealed with the key stored first");
    assert!(matches!(store.load(hedy).await.unwrap(), Some(StoredKey::Destroyed { .. })), "the wrapped key is gone");
    store.compact().await.unwrap();
}

/// `event`'s identity with Hedy's personal fields, to compare an opened event with the original.
fn registered_like(event: &PersonEvent, person: Uuid) -> PersonEvent {
    let PersonEvent::Registered(e) = event else { panic!("not a registration") };
    let PersonEvent::Registered(original) = registered(person) else { unreachable!() };
    PersonEvent::Registered(PersonRegistered {
        event_id: e.event_id,
        occurred_at: e.occurred_at,
        correlation_id: e.correlation_id.clone(),
        ..original
    })
}

#[tokio::test]
async fn the_embedded_key_store_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedKeyStore::open(&dir.path().join("keys.redb")).unwrap());
    key_store_contract(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mongodb_key_store_meets_the_contract() {
    let Some(uri) = contract::server_url("MONGODB_URI") else { return };
    let options = MongoOptions::new(uri, contract::unique("callisto-keys"));
    let db = connect_database(&options).await.unwrap();
    key_store_contract(Arc::new(MongoKeyStore::new(&db))).await;
}

/// Counts the keys written through it, and the calls that read them.
#[derive(Default)]
struct Counts {
    inserts: std::sync::atomic::AtomicUsize,
    loads: std::sync::atomic::AtomicUsize,
    batch_loads: std::sync::atomic::AtomicUsize,
}

impl Counts {
    fn get(counter: &std::sync::atomic::AtomicUsize) -> usize {
        counter.load(std::sync::atomic::Ordering::SeqCst)
    }
}

struct CountingStore {
    inner: Arc<dyn KeyStore>,
    counts: Counts,
}

impl CountingStore {
    fn new(inner: Arc<dyn KeyStore>) -> Self {
        Self { inner, counts: Counts::default() }
    }
}

#[async_trait::async_trait]
impl KeyStore for CountingStore {
    async fn load(&self, person: Uuid) -> Result<Option<StoredKey>, callisto_core::readmodel::StoreError> {
        self.counts.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.load(person).await
    }
    async fn load_many(
        &self,
        persons: &[Uuid],
    ) -> Result<Vec<(Uuid, StoredKey)>, callisto_core::readmodel::StoreError> {
        self.counts.batch_loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.load_many(persons).await
    }
    async fn insert_if_absent(
        &self,
        person: Uuid,
        key: StoredKey,
    ) -> Result<StoredKey, callisto_core::readmodel::StoreError> {
        self.counts.inserts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.insert_if_absent(person, key).await
    }
    async fn destroy(
        &self,
        person: Uuid,
        at: chrono::DateTime<Utc>,
    ) -> Result<(), callisto_core::readmodel::StoreError> {
        self.inner.destroy(person, at).await
    }
    async fn wrapped_by_other(
        &self,
        kek_id: &str,
        limit: usize,
    ) -> Result<Vec<(Uuid, StoredKey)>, callisto_core::readmodel::StoreError> {
        self.inner.wrapped_by_other(kek_id, limit).await
    }
    async fn replace_wrapping(
        &self,
        person: Uuid,
        from_kek: &str,
        key: StoredKey,
    ) -> Result<(), callisto_core::readmodel::StoreError> {
        self.inner.replace_wrapping(person, from_kek, key).await
    }
}

/// A person id from the reserve comes with its key stored before any event, so registering
/// them writes nothing to the key store; each id is handed out once, and what it seals opens
/// in a process that knows only the store.
#[tokio::test]
async fn reserved_persons_have_stored_keys_and_register_without_a_key_store_write() {
    let dir = tempfile::tempdir().unwrap();
    let embedded: Arc<dyn KeyStore> = Arc::new(EmbeddedKeyStore::open(&dir.path().join("keys.redb")).unwrap());
    let store = Arc::new(CountingStore::new(embedded.clone()));
    let master = MasterKey::generate_hex();
    let options = KeyringOptions { reserved_persons: 8, ..KeyringOptions::default() };
    let ring = Arc::new(Keyring::new(store.clone(), MasterKey::from_hex(&master).unwrap(), Vec::new(), &options));

    let first = ring.new_person();
    assert_eq!(embedded.load(first).await.unwrap(), None, "an empty reserve hands out a fresh id");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ring.reserved_persons() < 8 {
        assert!(std::time::Instant::now() < deadline, "the reserve refills in the background");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let reserved = ring.new_person();
    assert!(matches!(embedded.load(reserved).await.unwrap(), Some(StoredKey::Active { .. })), "stored ahead");
    let written = Counts::get(&store.counts.inserts);
    let (event, sealed) = ring.seal(registered(reserved)).await.unwrap();
    assert_eq!(Counts::get(&store.counts.inserts), written, "no key written to register");
    let elsewhere = keyring(embedded.clone(), &master, &[], Duration::from_secs(30));
    let opened = elsewhere.open(event, sealed).await.unwrap();
    assert_eq!(opened.event, registered_like(&opened.event, reserved));

    let mut handed_out: Vec<Uuid> = (0..20).map(|_| ring.new_person()).collect();
    handed_out.extend([first, reserved]);
    let distinct: std::collections::HashSet<_> = handed_out.iter().collect();
    assert_eq!(distinct.len(), handed_out.len(), "every id is handed out once");
    // Time-ordered ids keep a refill's keys (and the documents of new persons) together in the
    // stores' B-trees instead of one page apiece.
    for id in &handed_out {
        assert_eq!(id.get_version(), Some(uuid::Version::SortRand), "{id} is not a UUIDv7");
    }
}

/// Refilling the reserve creates keys nobody reads until their persons are handed out: it
/// leaves the key cache to the persons in use. With a cache of four and a refill of 64, a
/// person sealed before the refill still opens without asking the store, and a reserved person
/// handed out afterwards seals without asking it either.
#[tokio::test]
async fn a_refill_leaves_the_key_cache_to_the_persons_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let embedded: Arc<dyn KeyStore> = Arc::new(EmbeddedKeyStore::open(&dir.path().join("keys.redb")).unwrap());
    let store = Arc::new(CountingStore::new(embedded));
    let master = MasterKey::generate_hex();
    let options = KeyringOptions { reserved_persons: 64, cache_entries: 4, ..KeyringOptions::default() };
    let ring = Arc::new(Keyring::new(store.clone(), MasterKey::from_hex(&master).unwrap(), Vec::new(), &options));

    let in_use = Uuid::new_v4();
    let (event, sealed) = ring.seal(noted(in_use, "before the refill")).await.unwrap();
    let loads = Counts::get(&store.counts.loads);
    ring.new_person();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ring.reserved_persons() < 64 {
        assert!(std::time::Instant::now() < deadline, "the reserve refills in the background");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let opened = ring.open(event, sealed).await.unwrap();
    assert!(!opened.erased);
    let reserved = ring.new_person();
    ring.seal(registered(reserved)).await.unwrap();
    assert_eq!(Counts::get(&store.counts.loads), loads, "every key came from the cache");
    assert_eq!(Counts::get(&store.counts.batch_loads), 0);
}

/// A writer's side for the prefetch tests: an embedded key store in a fresh directory, its master
/// key, a keyring that seals with it, and the topic's codec.
struct Sealing {
    dir: tempfile::TempDir,
    store: Arc<dyn KeyStore>,
    master: String,
    writer: Keyring,
    codec: Arc<callisto_avro::Codec>,
}

impl Sealing {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> = Arc::new(EmbeddedKeyStore::open(&dir.path().join("keys.redb")).unwrap());
        let master = MasterKey::generate_hex().to_string();
        let writer = keyring(store.clone(), &master, &[], Duration::from_secs(30));
        let registry = Arc::new(callisto_avro::EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
        let codec = Arc::new(callisto_avro::Codec::new(registry, "persons").unwrap());
        Self { dir, store, master, writer, codec }
    }

    /// `event` sealed and encoded as the log holds it.
    async fn payload(&self, event: PersonEvent) -> Vec<u8> {
        let (event, sealed) = self.writer.seal(event).await.unwrap();
        self.codec.encode_sealed(&event, sealed.as_ref()).unwrap()
    }

    /// A keyring reading through `store`, as another process with the same master key.
    fn reader(&self, store: Arc<dyn KeyStore>) -> Keyring {
        keyring(store, &self.master, &[], Duration::from_secs(30))
    }
}

/// A batch of records read from the log loads its persons' keys in one call to the store, named
/// by the records' keys: opening its events then asks the store nothing. A person with no key
/// and a record not keyed by a person are no obstacle, and a second prefetch finds everything
/// cached.
#[tokio::test]
async fn a_batch_of_records_loads_its_keys_in_one_call() {
    let sealing = Sealing::new();
    let record = |offset: u64, key: Vec<u8>, payload: Vec<u8>| callisto_core::log::Record {
        topic: "persons".into(),
        partition: 0,
        offset,
        timestamp_ms: 0,
        key,
        headers: vec![],
        payload,
    };
    let mut records = Vec::new();
    let persons: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    for person in &persons {
        for event in [registered(*person), noted(*person, "hello")] {
            let payload = sealing.payload(event).await;
            records.push(record(records.len() as u64, person.to_string().into_bytes(), payload));
        }
    }
    // A person written before sealing existed: events in clear, no key.
    let keyless = Uuid::new_v4();
    let bare = registered(keyless);
    let clear = sealing.codec.encode_sealed(&bare, None).unwrap();
    records.push(record(80, keyless.to_string().into_bytes(), clear.clone()));
    records.push(record(81, b"not-a-person".to_vec(), clear));

    let store = Arc::new(CountingStore::new(sealing.store.clone()));
    let ring = Arc::new(sealing.reader(store.clone()));
    let reader = callisto_core::privacy::EventReader::new(sealing.codec.clone(), ring.clone());
    reader.prefetch_keys(&records).await;
    assert_eq!(Counts::get(&store.counts.batch_loads), 1, "one call for the batch");
    for record in &records {
        let opened = reader.read(&record.payload).await.unwrap();
        assert!(!opened.erased);
    }
    assert_eq!(Counts::get(&store.counts.loads), 0, "every key came from the batch's call");
    assert_eq!(ring.prefetch(persons.iter().copied().chain([keyless])).await.unwrap(), 0, "all cached");
    assert_eq!(Counts::get(&store.counts.batch_loads), 1);
}

/// A prefetch asks the store for a thousand persons at most per call, so a large batch is never
/// one query too big for the store's timeout, and loads no more than its cache holds.
#[tokio::test]
async fn a_prefetch_asks_for_a_thousand_keys_at_most_per_call() {
    let sealing = Sealing::new();
    let persons: Vec<Uuid> = (0..1001).map(|_| Uuid::new_v4()).collect();
    futures::future::join_all(persons.iter().map(|p| sealing.payload(registered(*p)))).await;
    let store = Arc::new(CountingStore::new(sealing.store.clone()));
    let ring = sealing.reader(store.clone());
    assert_eq!(ring.prefetch(persons.iter().copied()).await.unwrap(), 1001);
    assert_eq!(Counts::get(&store.counts.batch_loads), 2);
    assert_eq!(Counts::get(&store.counts.loads), 0);
    // No more than its cache holds: the rest would push out what it had just loaded.
    let options = KeyringOptions { cache_entries: 10, ..KeyringOptions::default() };
    let small = Keyring::new(sealing.store.clone(), MasterKey::from_hex(&sealing.master).unwrap(), vec![], &options);
    assert_eq!(small.prefetch(persons.iter().copied()).await.unwrap(), 10);
}

/// A replay (what `callisto export` streams) opens each batch it reads with keys loaded in one
/// call, not one store call per person.
#[tokio::test]
async fn a_replay_loads_its_keys_a_batch_at_a_time() {
    use callisto_core::log::embedded::{EmbeddedLog, EmbeddedLogOptions};
    use callisto_core::log::{AppendRequest, EventLog};
    use callisto_core::replay::{ReplayRequest, plan, stream};
    use futures::StreamExt;

    let sealing = Sealing::new();
    let log: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(&sealing.dir.path().join("log.redb"), EmbeddedLogOptions::default()).unwrap());
    log.ensure_topic("persons", 3).await.unwrap();
    for _ in 0..30 {
        let person = Uuid::new_v4();
        for event in [registered(person), noted(person, "hello")] {
            let payload = sealing.payload(event).await;
            let key = person.to_string().into_bytes();
            let request = AppendRequest { topic: "persons".into(), key, payload, headers: vec![], idempotency: None };
            log.append(request).await.unwrap();
        }
    }

    let store = Arc::new(CountingStore::new(sealing.store.clone()));
    let ring = Arc::new(sealing.reader(store.clone()));
    let reader = Arc::new(callisto_core::privacy::EventReader::new(sealing.codec.clone(), ring));
    let request = ReplayRequest { topic: "persons".into(), partitions: None, from: None, to: None };
    let spans = plan(log.as_ref(), &request).await.unwrap();
    let replayed: Vec<_> = stream(log, reader, "persons".into(), spans).collect().await;
    assert_eq!(replayed.len(), 60);
    for item in replayed {
        let opened = item.unwrap().event.unwrap();
        assert!(!opened.erased);
    }
    assert_eq!(Counts::get(&store.counts.loads), 0, "no key loaded one by one");
    assert!(Counts::get(&store.counts.batch_loads) <= 3, "at most one call per partition's batch");
}

/// With the store unreachable, the keyring answers `Unavailable` promptly (timeout, retries,
/// then the breaker), never a guess.
#[tokio::test]
async fn an_unreachable_key_store_is_unavailable_not_a_guess() {
    let options = MongoOptions {
        timeout: Duration::from_millis(300),
        ..MongoOptions::new("mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300", "nowhere")
    };
    let db = connect_database(&options).await.unwrap();
    let ring = keyring(Arc::new(MongoKeyStore::new(&db)), &MasterKey::generate_hex(), &[], Duration::from_secs(30));
    let started = std::time::Instant::now();
    let person = Uuid::new_v4();
    assert!(matches!(ring.seal(registered(person)).await, Err(KeyError::Unavailable(_))));
    assert!(matches!(ring.open(noted(person, "x"), None).await, Err(KeyError::Unavailable(_))));
    // The reserve cannot fill: a new person's registration is refused the same way.
    let ring = Arc::new(ring);
    let fresh = ring.new_person();
    assert!(matches!(ring.seal(registered(fresh)).await, Err(KeyError::Unavailable(_))));
    assert_eq!(ring.reserved_persons(), 0);
    assert!(started.elapsed() < Duration::from_secs(20), "answered in {:?}", started.elapsed());
}

/// The README's recipe for a consumer outside Callisto, followed with nothing but an AES-GCM
/// library, an Avro library, the key store's record and the master key file's text.
#[tokio::test]
async fn a_foreign_consumer_decrypts_with_the_documented_recipe() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use aes_gcm::{Aes256Gcm, Key, Nonce};
    use apache_avro::types::Value;

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedKeyStore::open(&dir.path().join("keys.redb")).unwrap());
    let master_hex = MasterKey::generate_hex();
    let ring = keyring(store.clone(), &master_hex, &[], Duration::from_secs(30));
    let registry = Arc::new(callisto_avro::EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
    let codec = callisto_avro::Codec::new(registry, "persons").unwrap();
    let person = Uuid::new_v4();
    let (event, sealed) = ring.seal(registered(person)).await.unwrap();
    let bytes = codec.encode_sealed(&event, sealed.as_ref()).unwrap();

    // 1. The record, read with its schema after the 5-byte Confluent header.
    let schema = apache_avro::Schema::parse_str(callisto_avro::EventKind::PersonRegistered.schema_text()).unwrap();
    let Value::Record(fields) = apache_avro::from_avro_datum(&schema, &mut &bytes[5..], None).unwrap() else {
        panic!("a record")
    };
    let field = |name: &str| fields.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let Value::Union(1, sealed) = field("sealed") else { panic!("sealed is set") };
    let Value::Record(sealed) = *sealed else { panic!("a sealed record") };
    let part = |name: &str| match &sealed.iter().find(|(n, _)| n == name).unwrap().1 {
        Value::Bytes(b) => b.clone(),
        Value::String(s) => s.clone().into_bytes(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(part("algorithm"), b"AES-256-GCM");
    let event_id = match field("event_id") {
        Value::Uuid(u) => u.to_string(),
        Value::String(s) => s,
        other => panic!("event_id: {other:?}"),
    };

    // 2. The person's data key: unwrap with the master key, associated data the person id.
    let Some(StoredKey::Active { wrapped, .. }) = store.load(person).await.unwrap() else { panic!("an active key") };
    let master = hex::decode(master_hex.trim()).unwrap();
    let kek = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&master));
    let (nonce, ciphertext) = wrapped.split_at(12);
    let aad = format!("callisto-data-key:{person}");
    let data_key = kek.decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: aad.as_bytes() }).unwrap();

    // 3. The personal fields: decrypt with the data key, associated data the event id, then Avro.
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&data_key));
    let nonce = part("nonce");
    let plaintext = cipher
        .decrypt(Nonce::from_slice(&nonce), Payload { msg: &part("ciphertext"), aad: event_id.as_bytes() })
        .unwrap();
    let personal_schema = apache_avro::Schema::parse_str(include_str!("../../avro/schemas/PersonalData.avsc")).unwrap();
    let Value::Record(personal) =
        apache_avro::from_avro_datum(&personal_schema, &mut plaintext.as_slice(), None).unwrap()
    else {
        panic!("a record")
    };
    let given = personal.iter().find(|(n, _)| n == "given_name").unwrap().1.clone();
    assert_eq!(given, Value::Union(1, Box::new(Value::String("Hedy".into()))));
}
