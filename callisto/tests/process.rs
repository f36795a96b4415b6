//! The `callisto` binary as a user runs it: restarted gracefully, and killed with SIGKILL
//! mid-load. Every command answered 202 must still be in the log, at the offset the answer
//! named, and the read models must hold each event exactly once after recovery.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use callisto_avro::{Codec, EmbeddedRegistry, PersonEvent};
use callisto_core::log::{EmbeddedLog, EmbeddedLogOptions, EventLog};
use callisto_core::readmodel::ReadStore;
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use serde_json::{Value, json};

mod common;
use common::{Service, post_json};

fn start_writer(data_dir: &Path) -> Service {
    start("writer", data_dir)
}

fn start(subcommand: &str, data_dir: &Path) -> Service {
    Service::start(subcommand, data_dir, &[])
}

/// (partition, offset, event_id) of an acknowledged command.
type Ack = (u32, u64, String);

async fn register(client: &reqwest::Client, base: &str, n: usize) -> Option<Ack> {
    let response = client
        .post(format!("{base}/v1/persons"))
        .json(&json!({"given_name": format!("Person {n}"), "family_name": "Load"}))
        .send()
        .await
        .ok()?;
    if response.status() != reqwest::StatusCode::ACCEPTED {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    Some((body["partition"].as_u64()? as u32, body["offset"].as_u64()?, body["event_id"].as_str()?.to_owned()))
}

async fn assert_all_present(data_dir: &Path, acks: &[Ack]) {
    let log = EmbeddedLog::open(&data_dir.join("log.redb"), EmbeddedLogOptions::default()).unwrap();
    for (partition, offset, event_id) in acks {
        let records = log.read("persons", *partition, *offset, 1, Duration::ZERO).await.unwrap();
        let record = records.first().unwrap_or_else(|| panic!("acknowledged {partition}:{offset} is lost"));
        assert_eq!(record.offset, *offset);
        assert_eq!(record.header("event_id").unwrap(), event_id.as_bytes(), "{partition}:{offset} holds another event");
    }
}

#[tokio::test]
async fn acknowledged_events_survive_a_restart_at_the_same_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let client = common::client(dir.path());
    let mut acks = Vec::new();
    let writer = start_writer(dir.path());
    for n in 0..40 {
        acks.push(register(&client, &writer.base, n).await.expect("healthy writer accepts"));
    }
    writer.terminate();

    let writer = start_writer(dir.path());
    for n in 40..60 {
        acks.push(register(&client, &writer.base, n).await.expect("restarted writer accepts"));
    }
    writer.terminate();

    let mut positions: Vec<(u32, u64)> = acks.iter().map(|(p, o, _)| (*p, *o)).collect();
    positions.sort();
    positions.dedup();
    assert_eq!(positions.len(), acks.len(), "no offset was handed out twice across the restart");
    assert_all_present(dir.path(), &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_event_is_lost_when_the_process_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let writer = start_writer(dir.path());
    let client = common::client(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (client, base, stop) = (client.clone(), writer.base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acks = Vec::new();
                let mut n = c * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    match register(&client, &base, n).await {
                        Some(ack) => acks.push(ack),
                        None => break, // the server died mid-request: that command was never acknowledged
                    }
                    n += 1;
                }
                acks
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    writer.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut acks = Vec::new();
    for c in clients {
        acks.extend(c.await.unwrap());
    }
    assert!(acks.len() >= 20, "the load ran before the kill ({} acks)", acks.len());
    assert_all_present(dir.path(), &acks).await;

    // The log opens cleanly after the crash and appends continue after the last durable offset.
    let writer = start_writer(dir.path());
    let after = register(&client, &writer.base, 99).await.expect("writer recovers after SIGKILL");
    writer.terminate();
    let acked_in_partition = acks.iter().filter(|(p, _, _)| *p == after.0).map(|(_, o, _)| *o).max();
    if let Some(max) = acked_in_partition {
        assert!(after.1 > max, "new appends never overwrite acknowledged offsets");
    }
    assert_all_present(dir.path(), &[after]).await;
}

/// Kills `callisto dev` while notes stream in (so projector batches are in flight), restarts
/// it, and checks each person's document and timeline against the log itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_recover_exactly_once_after_a_kill_mid_batch() {
    let dir = tempfile::tempdir().unwrap();
    let client = common::client(dir.path());
    let dev = start("dev", dir.path());
    let mut people = Vec::new();
    for n in 0..6 {
        let body = json!({"given_name": format!("Crash{n}"), "family_name": "Test"});
        let answer: Value =
            client.post(format!("{}/v1/persons", dev.base)).json(&body).send().await.unwrap().json().await.unwrap();
        people.push(answer["person_id"].as_str().unwrap().to_owned());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = people
        .iter()
        .map(|id| {
            let (client, url, stop) = (client.clone(), format!("{}/v1/persons/{id}/notes", dev.base), stop.clone());
            tokio::spawn(async move {
                let mut acked = 0;
                while !stop.load(Ordering::Relaxed) {
                    let sent = client.post(&url).json(&json!({"text": format!("note {acked}")})).send().await;
                    match sent {
                        Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => acked += 1,
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    dev.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut acked = 0;
    for task in load {
        acked += task.await.unwrap();
    }
    assert!(acked > 10, "notes were flowing when the process died ({acked})");

    // Restart; one more note per person, read back with its token, proves each partition has
    // caught up past everything written before the crash.
    let dev = start("dev", dir.path());
    for id in &people {
        let url = format!("{}/v1/persons/{id}/notes", dev.base);
        let answer = post_json(&client, url, json!({"text": "after restart"})).await;
        let token = answer["consistency_token"].as_str().unwrap();
        let read = client.get(format!("{}/v1/persons/{id}?after={token}", dev.base)).send().await.unwrap();
        assert!(read.headers().get("callisto-stale").is_none(), "projection caught up after restart");
    }
    dev.terminate();

    // Compare the read model with a count straight from the log.
    let log = EmbeddedLog::open(&dir.path().join("log.redb"), EmbeddedLogOptions::default()).unwrap();
    let registry = Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
    let codec = Codec::new(registry, "persons").unwrap();
    let store = EmbeddedReadStore::open(&dir.path().join("readmodel.redb")).unwrap();
    let mut notes_in_log: std::collections::HashMap<String, (u64, u64)> = Default::default();
    for (partition, end) in log.end_offsets("persons").await.unwrap().into_iter().enumerate() {
        for record in log.read("persons", partition as u32, 0, end as usize, Duration::ZERO).await.unwrap() {
            let event = codec.decode(&record.payload).unwrap();
            let entry = notes_in_log.entry(event.meta().person_id.to_string()).or_default();
            entry.1 += 1;
            if matches!(event, PersonEvent::NoteAdded(_)) {
                entry.0 += 1;
            }
        }
    }
    for id in &people {
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        let doc = store.get(uuid).await.unwrap().expect("document exists");
        let (notes, events) = notes_in_log[id];
        assert_eq!(doc.note_count, notes, "{id}: every note applied exactly once");
        let timeline = store.timeline(uuid, 10_000, None).await.unwrap();
        assert_eq!(timeline.items.len() as u64, events, "{id}: timeline holds each event once");
    }
}

/// The split services on one embedded data dir, one after another: the writer appends, the
/// projector builds the read models, the query API serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_projector_and_query_api_run_as_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let client = common::client(dir.path());
    let writer = start("writer", dir.path());
    let body = json!({"given_name": "Split", "family_name": "Process", "tags": ["ops"]});
    let person = post_json(&client, format!("{}/v1/persons", writer.base), body).await;
    let id = person["person_id"].as_str().unwrap().to_owned();
    let note =
        client.post(format!("{}/v1/persons/{id}/notes", writer.base)).json(&json!({"text": "separate processes"}));
    assert_eq!(note.send().await.unwrap().status(), reqwest::StatusCode::ACCEPTED);
    writer.terminate();

    let projector = start("projector", dir.path());
    // Wait (generously: CI runs other tests beside this one) for both projections to count
    // both events in the projector's own metrics.
    let mut caught_up = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let metrics = client.get(format!("{}/metrics", projector.base)).send().await.unwrap().text().await.unwrap();
        let applied = |projection: &str| {
            let prefix = format!("callisto_projected_events_total{{projection=\"{projection}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if applied("documents") >= 2.0 && applied("search") >= 2.0 {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(caught_up, "the projector applied both events");
    projector.terminate();

    let query = start("query-api", dir.path());
    let doc: Value = client.get(format!("{}/v1/persons/{id}", query.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["note_count"], 1);
    assert_eq!(doc["tags"], json!(["ops"]));
    let found: Value =
        client.get(format!("{}/v1/search?q=separate", query.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(found["total"], 1);
    query.terminate();
}

/// At the default level a busy `callisto dev` logs Callisto's own lines, as JSON when its
/// stderr is not a terminal, and no library chatter (a tantivy commit is not news).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_quiet_by_default_and_json_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let dev = Service::start_with("dev", &dir.path().join("data"), &[], |command| {
        command.env_remove("RUST_LOG").env_remove("CALLISTO__TELEMETRY__LOG_LEVEL").stderr(log);
    });
    let client = common::client(&dir.path().join("data"));
    let mut token = String::new();
    for n in 0..20 {
        let answer = post_json(
            &client,
            format!("{}/v1/persons", dev.base),
            json!({"given_name": format!("Q{n}"), "family_name": "Uiet"}),
        )
        .await;
        token = answer["consistency_token"].as_str().unwrap().to_owned();
    }
    let found = client.get(format!("{}/v1/search?q=uiet&after={token}", dev.base)).send().await.unwrap();
    assert_eq!(found.status(), 200);
    dev.terminate();

    let logged = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<Value> = logged
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
        .collect();
    assert!(lines.iter().any(|l| l["target"].as_str().is_some_and(|t| t.starts_with("callisto"))), "{logged}");
    let chatter: Vec<&Value> = lines
        .iter()
        .filter(|l| l["level"] == "INFO" || l["level"] == "DEBUG")
        .filter(|l| !l["target"].as_str().is_some_and(|t| t.starts_with("callisto")))
        .collect();
    assert!(chatter.is_empty(), "library info lines at the default level: {chatter:?}");
}

/// The process runs with Callisto's allocator settings whether or not it was started with them,
/// and an option the operator set comes after them, so it wins.
#[test]
fn the_process_runs_with_the_allocator_settings_and_keeps_the_operators() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Service::start_with("dev", &dir.path().join("data"), &[], |command| {
        command.env("_RJEM_MALLOC_CONF", "dirty_decay_ms:250");
    });
    let environ = std::fs::read(format!("/proc/{}/environ", dev.child.id())).unwrap();
    let variables: Vec<String> = environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
    let conf = variables.iter().find_map(|v| v.strip_prefix("_RJEM_MALLOC_CONF=")).expect("the allocator's options");
    let options: Vec<&str> = conf.split(',').collect();
    assert!(options.contains(&"background_thread:true"), "{conf}");
    assert!(options.iter().any(|o| o.starts_with("narenas:")), "{conf}");
    assert_eq!(options.last(), Some(&"dirty_decay_ms:250"), "the operator's option comes last: {conf}");
    dev.terminate();
}
