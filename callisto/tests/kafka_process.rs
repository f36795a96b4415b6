//! `callisto projector` as its own process against Kafka (librdkafka's mock cluster, 3 brokers,
//! in this test process): killed with SIGKILL mid-batch and started again, it joins its
//! consumer groups anew, resumes after the read models' checkpoints, and ends with read models
//! equal to a fold over the log, each event applied once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use callisto_avro::events::{NoteAdded, PersonRegistered};
use callisto_avro::{Codec, EmbeddedRegistry, PersonEvent};
use callisto_core::config::Settings;
use callisto_core::log::{AppendRequest, EventLog, KafkaLog, KafkaLogOptions};
use callisto_core::readmodel::{Projection, ReadStore};
use futures::StreamExt;
use uuid::Uuid;

mod common;
use common::{Service, all_persons, fold_log};

const PERSONS: usize = 400;
const NOTES_EACH: usize = 15;

fn codec(dir: &Path) -> Codec {
    Codec::new(Arc::new(EmbeddedRegistry::open(&dir.join("schemas.redb")).unwrap()), "persons").unwrap()
}

fn events_of(person: Uuid) -> Vec<PersonEvent> {
    let meta = |n: usize| (Uuid::new_v4(), chrono::Utc::now(), format!("crash-{n}"));
    let (event_id, occurred_at, correlation_id) = meta(0);
    let mut events = vec![PersonEvent::Registered(PersonRegistered {
        event_id,
        person_id: person,
        occurred_at,
        correlation_id,
        given_name: "Crash".into(),
        family_name: "Test".into(),
        email: None,
        phone: None,
        date_of_birth: None,
        address: None,
        tags: vec!["kafka".into()],
    })];
    for n in 1..=NOTES_EACH {
        let (event_id, occurred_at, correlation_id) = meta(n);
        events.push(PersonEvent::NoteAdded(NoteAdded {
            event_id,
            person_id: person,
            occurred_at,
            correlation_id,
            note_id: Uuid::new_v4(),
            text: format!("note {n}"),
        }));
    }
    events
}

/// Appends every person's events, persons concurrently, each person's in order.
async fn fill(log: &KafkaLog, codec: &Codec) -> usize {
    let persons: Vec<Uuid> = (0..PERSONS).map(|_| Uuid::new_v4()).collect();
    let appended = futures::stream::iter(persons)
        .map(|person| async move {
            for event in events_of(person) {
                let request = AppendRequest {
                    topic: "persons".into(),
                    key: person.to_string().into_bytes(),
                    payload: codec.encode(&event).unwrap(),
                    headers: Vec::new(),
                    idempotency: None,
                };
                log.append(request).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .count()
        .await;
    appended * (NOTES_EACH + 1)
}

/// Sum of `callisto_projected_events_total{projection}` from the service's metrics.
async fn projected(client: &reqwest::Client, base: &str, projection: &str) -> f64 {
    let Ok(response) = client.get(format!("{base}/metrics")).send().await else { return 0.0 };
    let text = response.text().await.unwrap_or_default();
    let series = format!("callisto_projected_events_total{{projection=\"{projection}\"}}");
    text.lines().filter_map(|l| l.strip_prefix(&series)).filter_map(|v| v.trim().parse::<f64>().ok()).sum()
}

fn config(dir: &Path, brokers: &str) -> std::path::PathBuf {
    let path = dir.join("callisto.toml");
    let toml = format!(
        "[kafka]\nbrokers = \"{brokers}\"\nreplication_factor = 3\n\n[kafka.properties]\n\
         \"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n"
    );
    std::fs::write(&path, toml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_batch_resumes_without_loss_or_repeats() {
    let cluster = rdkafka::mocking::MockCluster::new(3).unwrap();
    for topic in ["persons", "persons.dlq"] {
        cluster.create_topic(topic, 12, 3).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut options = KafkaLogOptions::new(cluster.bootstrap_servers());
    options.min_insync_replicas = None;
    let log = KafkaLog::new(options).unwrap();
    let total = {
        let codec = codec(&data);
        fill(&log, &codec).await
    };
    let config = config(dir.path(), &cluster.bootstrap_servers());
    let config_arg = config.to_str().unwrap();
    let client = common::client(&data);

    // Kill it once it is busy, well before it is done.
    let projector = Service::start("projector", &data, &["--config", config_arg]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while projected(&client, &projector.base, "documents").await < (total / 5) as f64 {
        assert!(Instant::now() < deadline, "the projector made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    projector.kill9();

    let mut settings = Settings::default();
    settings.storage.data_dir = data.clone();
    let applied_before_restart: u64 = {
        let read = callisto::backends::open_read_models(&settings).unwrap();
        let checkpoints = read.store.checkpoints().await.unwrap();
        checkpoints.values().map(|last| last + 1).sum()
    };
    assert!(applied_before_restart < total as u64, "the kill came too late to be mid-way");

    let projector = Service::start("projector", &data, &["--config", config_arg]);
    let remaining = (total as u64 - applied_before_restart) as f64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let documents = projected(&client, &projector.base, "documents").await;
        let search = projected(&client, &projector.base, "search").await;
        if documents >= remaining && search > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart only {documents} of {remaining} events were projected into documents, {search} into search"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The search index group-commits; give it a moment before stopping gracefully.
    tokio::time::sleep(Duration::from_millis(500)).await;
    projector.terminate();

    let expected = fold_log(&log, &common::reader_of(&data, codec(&data))).await;
    let read = callisto::backends::open_read_models(&settings).unwrap();
    let actual = all_persons(read.store.as_ref()).await;
    assert_eq!(actual.len(), PERSONS);
    assert_eq!(actual, expected, "documents differ from a fold over the log");
    let mut timeline_entries = 0;
    for (id, doc) in &actual {
        assert_eq!(doc.note_count as usize, NOTES_EACH, "{id}: a note applied twice or lost");
        timeline_entries += read.store.timeline(*id, 10_000, None).await.unwrap().items.len();
    }
    assert_eq!(timeline_entries, total, "each event is on its person's timeline exactly once");
    let ends = log.end_offsets("persons").await.unwrap();
    let checkpoints: BTreeMap<u32, u64> = read.store.checkpoints().await.unwrap();
    for (partition, end) in ends.iter().enumerate() {
        assert_eq!(checkpoints.get(&(partition as u32)).map(|l| l + 1), Some(*end).filter(|e| *e > 0));
    }
}
