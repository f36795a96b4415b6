//! Callisto against a Confluent-compatible Schema Registry (a small in-test server speaking
//! its REST protocol): schemas registered at start under `TopicRecordNameStrategy` subjects,
//! Confluent framing byte by byte, records readable by a plain Avro library given the
//! registry's schema, records from another producer's newer schema read through schema
//! resolution, basic auth, and a registry outage that is retried, paused and recovered from.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use callisto::services::{Dev, start_kafka_mock};
use callisto_avro::events::NoteAdded;
use callisto_avro::{
    Codec, ConfluentOptions, ConfluentRegistry, EventKind, PersonEvent, RegistryError, SchemaRegistry,
};
use chrono::SubsecRound;
use serde_json::json;
use uuid::Uuid;

mod common;
use common::registry::FakeRegistry;
use common::{post_json, settings};

fn client(registry: &FakeRegistry) -> ConfluentRegistry {
    let mut options = ConfluentOptions::new(registry.url.clone());
    options.timeout = Duration::from_secs(2);
    ConfluentRegistry::new(options).unwrap()
}

fn note(text: &str) -> PersonEvent {
    PersonEvent::NoteAdded(NoteAdded {
        event_id: Uuid::new_v4(),
        person_id: Uuid::new_v4(),
        // Avro carries microseconds.
        occurred_at: chrono::Utc::now().trunc_subsecs(6),
        correlation_id: "registry-test".into(),
        note_id: Uuid::new_v4(),
        text: text.into(),
    })
}

fn field<'a>(record: &'a Avro, name: &str) -> &'a Avro {
    let Avro::Record(fields) = record else { panic!("not a record: {record:?}") };
    &fields.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no field {name}")).1
}

#[test]
fn schemas_are_registered_and_records_carry_confluent_framing() {
    let registry = FakeRegistry::start();
    let codec = Codec::new(Arc::new(client(&registry)), "persons").unwrap();

    let requests = registry.state.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), EventKind::ALL.len(), "one registration per event type: {requests:?}");
    for kind in EventKind::ALL {
        let path = format!("/subjects/persons-{}/versions", kind.full_name());
        let request = requests.iter().find(|(_, p, _)| *p == path).unwrap_or_else(|| panic!("{path} never posted"));
        assert_eq!(request.0, "POST");
        assert_eq!(request.2.as_deref(), Some("application/vnd.schemaregistry.v1+json"));
    }

    let event = note("framed for any consumer");
    let bytes = codec.encode(&event).unwrap();
    assert_eq!(bytes[0], 0, "magic byte");
    let id = u32::from_be_bytes(bytes[1..5].try_into().unwrap());
    let subject = format!("persons-{}", EventKind::NoteAdded.full_name());
    assert_eq!(registry.state.subjects.lock().unwrap()[&subject], vec![id], "the id the registry assigned");

    // What a Java, Python or Go consumer does: fetch the schema by id and decode the rest.
    let schema = apache_avro::Schema::parse_str(&registry.schema_text(id)).unwrap();
    let record = apache_avro::from_avro_datum(&schema, &mut &bytes[5..], None).unwrap();
    assert_eq!(field(&record, "text"), &Avro::String("framed for any consumer".into()));
    let PersonEvent::NoteAdded(sent) = &event else { unreachable!() };
    let person_id = match field(&record, "person_id") {
        Avro::Uuid(u) => *u,
        Avro::String(s) => Uuid::parse_str(s).unwrap(),
        other => panic!("person_id decoded as {other:?}"),
    };
    assert_eq!(person_id, sent.person_id);

    // A second writer start registers the same schemas and gets the same ids.
    let again = Codec::new(Arc::new(client(&registry)), "persons").unwrap();
    assert_eq!(again.writer_id(EventKind::NoteAdded), id);
    assert_eq!(again.decode(&bytes).unwrap(), event);
}

#[test]
fn a_newer_producers_schema_is_fetched_once_and_resolved() {
    let registry = FakeRegistry::start();
    let codec = Codec::new(Arc::new(client(&registry)), "persons").unwrap();

    // Another team's producer added an optional field and registered its schema.
    let mut evolved: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(EventKind::NoteAdded.schema()).unwrap()).unwrap();
    evolved["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "language", "type": ["null", "string"], "default": null}));
    let other = client(&registry);
    let evolved_schema = apache_avro::Schema::parse_str(&evolved.to_string()).unwrap();
    let subject = format!("persons-{}", EventKind::NoteAdded.full_name());
    let new_id = other.register(&subject, &evolved_schema).unwrap();
    assert_ne!(new_id, codec.writer_id(EventKind::NoteAdded));

    let person_id = Uuid::new_v4();
    let record = Avro::Record(vec![
        ("event_id".into(), Avro::Uuid(Uuid::new_v4())),
        ("person_id".into(), Avro::Uuid(person_id)),
        ("occurred_at".into(), Avro::TimestampMicros(1_700_000_000_000_000)),
        ("correlation_id".into(), Avro::String("java".into())),
        ("note_id".into(), Avro::Uuid(Uuid::new_v4())),
        ("text".into(), Avro::String("from elsewhere".into())),
        ("sealed".into(), Avro::Union(0, Box::new(Avro::Null))),
        ("language".into(), Avro::Union(1, Box::new(Avro::String("en".into())))),
    ]);
    let mut bytes = vec![0];
    bytes.extend_from_slice(&new_id.to_be_bytes());
    bytes.extend(apache_avro::to_avro_datum(&evolved_schema, record).unwrap());

    let fetches = |registry: &FakeRegistry| {
        let path = format!("/schemas/ids/{new_id}");
        registry.state.requests.lock().unwrap().iter().filter(|(_, p, _)| *p == path).count()
    };
    for _ in 0..3 {
        let PersonEvent::NoteAdded(decoded) = codec.decode(&bytes).unwrap() else { panic!("wrong kind") };
        assert_eq!(decoded.person_id, person_id);
        assert_eq!(decoded.text, "from elsewhere");
    }
    assert_eq!(fetches(&registry), 1, "an unknown id is fetched once, then cached");

    let mut unknown = bytes.clone();
    unknown[1..5].copy_from_slice(&9_999u32.to_be_bytes());
    let error = codec.decode(&unknown).unwrap_err().to_string();
    assert!(error.contains("9999"), "{error}");
}

#[test]
fn basic_auth_is_sent_and_bad_credentials_are_refused() {
    let registry = FakeRegistry::start();
    // "callisto:s3cret" in base64.
    *registry.state.authorization.lock().unwrap() = Some("Basic Y2FsbGlzdG86czNjcmV0".into());
    let with = |user: &str, password: &str| {
        let mut options = ConfluentOptions::new(registry.url.clone());
        options.basic_auth = Some((user.into(), password.into()));
        Codec::new(Arc::new(ConfluentRegistry::new(options).unwrap()), "persons")
    };
    assert!(with("callisto", "s3cret").is_ok());
    let refused = with("callisto", "wrong").unwrap_err().to_string();
    assert!(refused.contains("refused") && refused.contains("401"), "{refused}");
}

#[test]
fn an_unavailable_registry_is_retried_then_paused_then_recovered_from() {
    let registry = FakeRegistry::start();
    let client = client(&registry);
    let schema = EventKind::PersonRenamed.schema();
    registry.state.failing.store(true, Ordering::SeqCst);

    let before = registry.state.calls.load(Ordering::SeqCst);
    let failed = client.register("persons-renamed", schema).unwrap_err();
    assert!(matches!(failed, RegistryError::Unavailable(_)), "{failed}");
    assert_eq!(registry.state.calls.load(Ordering::SeqCst) - before, 3, "three attempts, with back-off");

    // Three failed operations open the breaker: calls then fail at once, without HTTP.
    for _ in 0..2 {
        let _ = client.register("persons-renamed", schema);
    }
    let calls = registry.state.calls.load(Ordering::SeqCst);
    let started = Instant::now();
    let paused = client.register("persons-renamed", schema).unwrap_err();
    assert!(paused.to_string().contains("paused"), "{paused}");
    assert!(started.elapsed() < Duration::from_millis(100), "an open breaker answers at once");
    assert_eq!(registry.state.calls.load(Ordering::SeqCst), calls, "an open breaker makes no call");

    // The registry recovers; after the breaker's back-off a probe goes through.
    registry.state.failing.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    let id = loop {
        match client.register("persons-renamed", schema) {
            Ok(id) => break id,
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(registry.state.subjects.lock().unwrap()["persons-renamed"], vec![id]);
}

/// The Kafka backbone with the registry: the writer's records carry the registry's ids and the
/// projectors decode them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_backbone_writes_with_registry_ids() {
    let registry = FakeRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.schema_registry.url = Some(registry.url.clone());
    let _cluster = start_kafka_mock(&mut settings, 3).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dev = Dev::start(&settings, listener).await.unwrap();
    let base = format!("http://{}", dev.addr);
    let http = common::client(dir.path());
    let person =
        post_json(&http, format!("{base}/v1/persons"), json!({"given_name": "Reg", "family_name": "Istry"})).await;
    let (partition, offset) = (person["partition"].as_u64().unwrap() as u32, person["offset"].as_u64().unwrap());
    let token = person["consistency_token"].as_str().unwrap();
    let read: serde_json::Value = http
        .get(format!("{base}/v1/persons/{}?after={token}", person["person_id"].as_str().unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["family_name"], "Istry");

    let record = dev.log.read("persons", partition, offset, 1, Duration::ZERO).await.unwrap().remove(0);
    let id = u32::from_be_bytes(record.payload[1..5].try_into().unwrap());
    let subject = format!("persons-{}", EventKind::PersonRegistered.full_name());
    assert_eq!(registry.state.subjects.lock().unwrap()[&subject], vec![id]);
    assert!(!dir.path().join("schemas.redb").exists(), "no embedded registry when one is configured");
    dev.stop().await.unwrap();
}
