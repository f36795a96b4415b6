//! The key store as a dependency that fails, and sealed data that was tampered with: with the key
//! store down, commands answer 503 and projectors pause, then resume with nothing lost or
//! skipped; ciphertext moved to another event fails authentication and is dead-lettered while
//! the partition moves on; once the person is erased, `dlq show` prints that dead letter without
//! content or payload.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use callisto_avro::{Codec, EmbeddedRegistry, PersonEvent};
use callisto_core::log::{AppendRequest, EmbeddedLog, EmbeddedLogOptions, EventLog, Record};
use callisto_core::privacy::embedded::EmbeddedKeyStore;
use callisto_core::privacy::{EventReader, KeyStore, Keyring, KeyringOptions, MasterKey, StoredKey};
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use callisto_core::readmodel::{Projection, ReadStore, StoreError};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

mod common;

/// The embedded key store behind a switch that makes every call fail as a dead server would.
struct Switchable {
    inner: EmbeddedKeyStore,
    down: AtomicBool,
}

impl Switchable {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl KeyStore for Switchable {
    async fn load(&self, person: Uuid) -> Result<Option<StoredKey>, StoreError> {
        self.check()?;
        self.inner.load(person).await
    }
    async fn insert_if_absent(&self, person: Uuid, key: StoredKey) -> Result<StoredKey, StoreError> {
        self.check()?;
        self.inner.insert_if_absent(person, key).await
    }
    async fn destroy(&self, person: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.check()?;
        self.inner.destroy(person, at).await
    }
    async fn wrapped_by_other(&self, kek_id: &str, limit: usize) -> Result<Vec<(Uuid, StoredKey)>, StoreError> {
        self.check()?;
        self.inner.wrapped_by_other(kek_id, limit).await
    }
    async fn replace_wrapping(&self, person: Uuid, from_kek: &str, key: StoredKey) -> Result<(), StoreError> {
        self.check()?;
        self.inner.replace_wrapping(person, from_kek, key).await
    }
}

async fn record_at(log: &dyn EventLog, topic: &str, partition: u32, offset: u64) -> Record {
    let records = log.read(topic, partition, offset, 1, Duration::ZERO).await.unwrap();
    records.into_iter().find(|r| r.offset == offset).unwrap()
}

async fn wait_for_checkpoint(store: &dyn Projection, partition: u32, offset: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.progress().borrow().get(&partition).is_none_or(|o| *o < offset) {
        assert!(Instant::now() < deadline, "the projector never reached {partition}:{offset}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_key_store_pauses_everything_and_tampered_ciphertext_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let settings = common::settings(dir.path());
    let client = common::client(dir.path());
    let log: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(&dir.path().join("log.redb"), EmbeddedLogOptions::default()).unwrap());
    let codec = Arc::new(
        Codec::new(Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap()), "persons").unwrap(),
    );
    let store = Arc::new(Switchable {
        inner: EmbeddedKeyStore::open(&dir.path().join("keys.redb")).unwrap(),
        down: AtomicBool::new(false),
    });
    // No cache: every seal and open asks the store, so an outage shows at once.
    let options =
        KeyringOptions { cache_ttl: Duration::ZERO, timeout: Duration::from_millis(300), ..KeyringOptions::default() };
    let master = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
    let keyring = Arc::new(Keyring::new(store.clone(), master, Vec::new(), &options));

    let auth = callisto_core::auth::Auth::from_settings(&settings, false).await.unwrap();
    let writer = callisto_writers::state(&settings, log.clone(), codec.clone(), keyring.clone(), None).await.unwrap();
    let app = callisto_writers::build(&settings, writer, &auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        callisto_core::http::serve(listener, app, &Default::default(), std::future::pending()).await
    });

    let registered =
        common::post_json(&client, format!("{base}/v1/persons"), json!({"given_name": "Ada", "family_name": "Byron"}))
            .await;
    let id = registered["person_id"].as_str().unwrap().to_owned();
    let partition = registered["partition"].as_u64().unwrap() as u32;
    let note = common::post_json(&client, format!("{base}/v1/persons/{id}/notes"), json!({"text": "first note"})).await;
    let note_offset = note["offset"].as_u64().unwrap();

    // Down: a command answers a prompt 503 problem, and appends nothing.
    store.down.store(true, Ordering::SeqCst);
    let ends_before = log.end_offsets("persons").await.unwrap();
    let started = Instant::now();
    let refused =
        client.post(format!("{base}/v1/persons/{id}/notes")).json(&json!({"text": "while down"})).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    let body: Value = refused.json().await.unwrap();
    assert!(!body.to_string().contains("connection refused"), "the dependency's error stays in the logs: {body}");
    assert!(started.elapsed() < Duration::from_secs(10), "503 within {:?}", started.elapsed());
    assert_eq!(log.end_offsets("persons").await.unwrap(), ends_before, "nothing appended");

    // Projectors started while it is down pause: nothing applied, nothing skipped.
    let read_store = Arc::new(EmbeddedReadStore::open(&dir.path().join("readmodel.redb")).unwrap());
    let reader = Arc::new(EventReader::new(codec.clone(), keyring.clone()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let projector = callisto_projectors::Projector::new(
        log.clone(),
        reader,
        vec![read_store.clone() as Arc<dyn Projection>],
        callisto_projectors::ProjectorSettings::new("persons"),
    )
    .start(shutdown.clone())
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(read_store.progress().borrow().get(&partition).is_none(), "paused, not moving past unopened events");
    // The pause shows as lag, in records and in seconds (the oldest waiting event's age).
    let lag = |name: &str| -> f64 {
        let scrape = callisto_core::telemetry::prometheus().render();
        let series = format!("{name}{{projection=\"documents\",partition=\"{partition}\"}} ");
        let line =
            scrape.lines().find(|l| l.starts_with(&series)).unwrap_or_else(|| panic!("no {series} in the scrape"));
        line[series.len()..].trim().parse().unwrap()
    };
    assert_eq!(lag("callisto_projection_lag"), (note_offset + 1) as f64, "registration and note wait");
    assert!(lag("callisto_projection_lag_seconds") >= 1.0, "the registration has waited over a second");
    assert!(read_store.get(Uuid::parse_str(&id).unwrap()).await.unwrap().is_none());

    // Back: the projector resumes on its own, with every event.
    store.down.store(false, Ordering::SeqCst);
    wait_for_checkpoint(read_store.as_ref(), partition, note_offset).await;
    let doc = read_store.get(Uuid::parse_str(&id).unwrap()).await.unwrap().unwrap();
    assert_eq!((doc.given_name.as_str(), doc.note_count), ("Ada", 1));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lag("callisto_projection_lag_seconds"), 0.0, "caught up: no event waits");
    let dlq_ends = log.end_offsets("persons.dlq").await.unwrap();
    assert!(dlq_ends.iter().all(|e| *e == 0), "nothing dead-lettered by the outage: {dlq_ends:?}");

    // Tampering: a second note's event carrying the first note's ciphertext.
    let second =
        common::post_json(&client, format!("{base}/v1/persons/{id}/notes"), json!({"text": "second note"})).await;
    let first_record = record_at(log.as_ref(), "persons", partition, note_offset).await;
    let second_record = record_at(log.as_ref(), "persons", partition, second["offset"].as_u64().unwrap()).await;
    let (_, first_sealed) = codec.decode_sealed(&first_record.payload).unwrap();
    let (mut moved, _) = codec.decode_sealed(&second_record.payload).unwrap();
    if let PersonEvent::NoteAdded(n) = &mut moved {
        n.event_id = Uuid::new_v4();
    }
    let tampered = codec.encode_sealed(&moved, first_sealed.as_ref()).unwrap();
    let appended = log
        .append(AppendRequest {
            topic: "persons".into(),
            key: id.as_bytes().to_vec(),
            payload: tampered,
            headers: vec![("event_type".into(), b"NoteAdded".to_vec())],
            idempotency: None,
        })
        .await
        .unwrap();
    let third =
        common::post_json(&client, format!("{base}/v1/persons/{id}/notes"), json!({"text": "third note"})).await;
    wait_for_checkpoint(read_store.as_ref(), partition, third["offset"].as_u64().unwrap()).await;
    let doc = read_store.get(Uuid::parse_str(&id).unwrap()).await.unwrap().unwrap();
    assert_eq!(doc.note_count, 3, "first, second and third notes; the tampered one is not applied");
    let dead = log.read("persons.dlq", partition, 0, 10, Duration::ZERO).await.unwrap();
    assert_eq!(dead.len(), 1, "exactly the tampered event is dead-lettered");
    assert_eq!(dead[0].header("dlq.source.offset"), Some(appended.offset.to_string().as_bytes()));
    let error = String::from_utf8_lossy(dead[0].header("dlq.error").unwrap()).into_owned();
    assert!(error.contains("authentication failed"), "{error}");
    assert!(!error.contains("first note"), "the error holds no plaintext: {error}");

    // Once the person is erased, `dlq show` prints the dead letter without content or payload.
    let reader = EventReader::new(codec.clone(), keyring.clone());
    let dead_id = format!("{}:{}", dead[0].partition, dead[0].offset);
    let before = callisto::dlq::show(log.as_ref(), &reader, "persons.dlq", &dead_id).await.unwrap();
    assert!(before.payload_hex.is_some() && before.decoded.is_none(), "still unreadable, bytes shown: {before:?}");
    let erased = client.delete(format!("{base}/v1/persons/{id}")).send().await.unwrap();
    assert_eq!(erased.status(), StatusCode::ACCEPTED);
    let after = callisto::dlq::show(log.as_ref(), &reader, "persons.dlq", &dead_id).await.unwrap();
    let decoded = after.decoded.expect("an erased event reads, without content");
    assert_eq!((decoded["erased"].clone(), decoded["data"].clone()), (json!(true), json!({})), "{decoded}");
    assert!(after.payload_hex.is_none(), "the raw payload is withheld for an erased person");

    shutdown.cancel();
    projector.await.unwrap();
}
