//! `callisto replay`: a blue/green rebuild under a command load (through the running dev
//! server), rollback, and an interrupted rebuild on a stopped data dir.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use callisto::services::Dev;
use callisto_avro::{Codec, EmbeddedRegistry};
use callisto_core::log::{AppendRequest, EmbeddedLog, EmbeddedLogOptions, EventLog};
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use serde_json::{Value, json};
use uuid::Uuid;

mod common;
use common::{all_persons, fold_log, post_json, start_dev};

/// Waits until the live generation has applied everything in the log.
async fn settle(dev: &Dev) {
    let ends = dev.log.end_offsets("persons").await.unwrap();
    let mut progress = callisto_core::readmodel::Projection::progress(dev.store.as_ref());
    let reached = |cp: &BTreeMap<u32, u64>| {
        ends.iter().enumerate().all(|(p, end)| *end == 0 || cp.get(&(p as u32)).is_some_and(|o| o + 1 >= *end))
    };
    tokio::time::timeout(Duration::from_secs(30), progress.wait_for(reached)).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_load_switches_without_failed_reads_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path()).await;
    let base = format!("http://{}", dev.addr);
    let client = common::client(dir.path());
    let mut ids = Vec::new();
    for i in 0..30 {
        let body = json!({"given_name": format!("Blue{i}"), "family_name": "Green", "tags": ["bg"]});
        let answer = post_json(&client, format!("{base}/v1/persons"), body).await;
        ids.push(answer["person_id"].as_str().unwrap().to_owned());
    }
    let old_generation_docs = {
        settle(&dev).await;
        all_persons(dev.store.as_ref()).await
    };

    // Writers and readers keep going through the whole rebuild and switch.
    let stop = Arc::new(AtomicBool::new(false));
    let failed_reads = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, base, ids, stop) = (client.clone(), base.clone(), ids.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[n % ids.len()];
                let r = client
                    .post(format!("{base}/v1/persons/{id}/notes"))
                    .json(&json!({"text": format!("note {n}")}))
                    .send()
                    .await;
                assert_eq!(r.unwrap().status(), 202);
                n += 1;
            }
        })
    };
    let reader = {
        let (client, base, ids, stop, failed, reads) =
            (client.clone(), base.clone(), ids.clone(), stop.clone(), failed_reads.clone(), reads.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[n % ids.len()];
                for path in
                    [format!("/v1/persons/{id}"), "/v1/search?q=note".into(), "/v1/persons?tag=bg&limit=5".into()]
                {
                    let ok = client.get(format!("{base}{path}")).send().await.is_ok_and(|r| r.status() == 200);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = client.post(format!("{base}/admin/v1/replay")).json(&json!({})).send().await.unwrap();
    assert_eq!(started.status(), 202);
    let generation = started.json::<Value>().await.unwrap()["generation"].as_u64().unwrap();
    assert_eq!(generation, 1);
    let mut switched = false;
    for _ in 0..300 {
        let status: Value = client.get(format!("{base}/admin/v1/replay")).send().await.unwrap().json().await.unwrap();
        if status["job"]["state"] == "switched" {
            assert_eq!(status["generations"]["live"], 1);
            assert_eq!(status["generations"]["previous"], 0);
            switched = true;
            break;
        }
        assert_ne!(status["job"]["state"], "failed", "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "the rebuild switched readers");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    reader.await.unwrap();
    assert!(reads.load(Ordering::Relaxed) > 10);
    assert_eq!(failed_reads.load(Ordering::Relaxed), 0, "no read failed during the rebuild and switch");

    // The new generation equals a fold over the whole log.
    settle(&dev).await;
    let reader = callisto_core::privacy::EventReader::new(dev.codec.clone(), dev.keyring.clone());
    let expected = fold_log(dev.log.as_ref(), &reader).await;
    assert_eq!(all_persons(dev.store.as_ref()).await, expected, "new generation = fold over the log");
    assert!(dir.path().join("generations/g1/readmodel.redb").exists());

    // A second rebuild is refused while the old generation is kept.
    let refused = client.post(format!("{base}/admin/v1/replay")).send().await.unwrap();
    assert_eq!(refused.status(), 409);

    // Rollback: readers are back on generation 0, which was kept current meanwhile.
    let rolled: Value =
        client.post(format!("{base}/admin/v1/replay/rollback")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rolled["summary"]["live"], 0);
    settle(&dev).await;
    let after_rollback = all_persons(dev.store.as_ref()).await;
    assert_eq!(after_rollback, expected, "the old generation is current too");
    assert_ne!(after_rollback, old_generation_docs, "and it serves, not a frozen copy");
    let dropped = client.post(format!("{base}/admin/v1/replay/drop-old").as_str()).send().await.unwrap();
    assert_eq!(dropped.status(), 200);
    let dropped: Value = dropped.json().await.unwrap();
    assert_eq!(dropped["summary"]["live"], 0, "{dropped}");
    assert_eq!(dropped["summary"]["previous"], Value::Null);
    assert!(!dir.path().join("generations/g1").exists(), "the dropped generation's files are gone");
    dev.stop().await.unwrap();
}

async fn fill_log(dir: &Path, persons: usize, notes_each: usize) {
    let registry = Arc::new(EmbeddedRegistry::open(&dir.join("schemas.redb")).unwrap());
    let codec = Arc::new(Codec::new(registry, "persons").unwrap());
    let log = Arc::new(EmbeddedLog::open(&dir.join("log.redb"), EmbeddedLogOptions::default()).unwrap());
    log.ensure_topic("persons", 12).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let (log, codec) = (log.clone(), codec.clone());
            tokio::spawn(async move {
                for p in (0..persons).filter(|p| p % 16 == t) {
                    let id = Uuid::new_v4();
                    for n in 0..=notes_each {
                        let event = if n == 0 { fill_events::registered(id) } else { fill_events::note(id, n, p) };
                        let request = AppendRequest {
                            topic: "persons".into(),
                            key: id.to_string().into_bytes(),
                            payload: codec.encode(&event).unwrap(),
                            headers: vec![],
                            idempotency: None,
                        };
                        log.append(request).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Minimal event builders for filling a log.
mod fill_events {
    use callisto_avro::PersonEvent;
    use callisto_avro::events::{NoteAdded, PersonRegistered};
    use chrono::Utc;
    use uuid::Uuid;

    pub fn registered(id: Uuid) -> PersonEvent {
        PersonEvent::Registered(PersonRegistered {
            event_id: Uuid::new_v4(),
            person_id: id,
            occurred_at: Utc::now(),
            correlation_id: "fill".into(),
            given_name: "Fill".into(),
            family_name: "Log".into(),
            email: None,
            phone: None,
            date_of_birth: None,
            address: None,
            tags: vec!["fill".into()],
        })
    }

    pub fn note(id: Uuid, n: usize, p: usize) -> PersonEvent {
        PersonEvent::NoteAdded(NoteAdded {
            event_id: Uuid::new_v4(),
            person_id: id,
            occurred_at: Utc::now(),
            correlation_id: "fill".into(),
            note_id: Uuid::new_v4(),
            text: format!("note {n} of person {p}"),
        })
    }
}

/// Waits until the search index whose `meta.json` is at `meta` has committed a checkpoint.
async fn wait_for_search_progress(meta: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let committed = std::fs::read(meta)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .and_then(|meta| meta["payload"].as_str().and_then(|p| serde_json::from_str::<Value>(p).ok()))
            .and_then(|payload| payload["checkpoints"].as_object().map(|c| !c.is_empty()))
            .unwrap_or(false);
        if committed {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the rebuild never committed any progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn replay_cli(dir: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_callisto"))
        .args(["replay", "--quiet", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rebuild_resumes_and_never_touches_the_live_generation() {
    let dir = tempfile::tempdir().unwrap();
    fill_log(dir.path(), 400, 40).await;
    // A live generation 0 built by a projector run, as `callisto dev` would have left it.
    {
        let dev = start_dev(dir.path()).await;
        settle(&dev).await;
        dev.stop().await.unwrap();
    }
    let live_file = dir.path().join("readmodel.redb");
    let live_before = std::fs::read(&live_file).unwrap();

    // Kill the first rebuild part-way: once generation 1's search index has committed some
    // progress, which a rebuild of this log does long before it ends.
    let mut first = replay_cli(dir.path());
    wait_for_search_progress(&dir.path().join("generations/g1/search/meta.json")).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let pointer: Value = serde_json::from_slice(&std::fs::read(dir.path().join("generations.json")).unwrap()).unwrap();
    assert_eq!(pointer["live"], 0, "the live generation is still live");
    assert_eq!(pointer["building"], 1, "the interrupted rebuild is remembered");
    assert_eq!(std::fs::read(&live_file).unwrap(), live_before, "the live generation was never touched");

    // Run again: it resumes generation 1 and switches.
    let second = replay_cli(dir.path()).wait_with_output().unwrap();
    assert!(second.status.success());
    let summary: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!((summary["live"].clone(), summary["previous"].clone()), (json!(1), json!(0)), "{summary}");
    assert_eq!(std::fs::read(&live_file).unwrap(), live_before, "the old generation is kept as it was");

    let registry = Arc::new(EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap());
    let codec = Codec::new(registry, "persons").unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log.redb"), EmbeddedLogOptions::default()).unwrap();
    let expected = fold_log(&log, &common::reader_of(dir.path(), codec)).await;
    assert_eq!(expected.len(), 400);
    let rebuilt = EmbeddedReadStore::open(&dir.path().join("generations/g1/readmodel.redb")).unwrap();
    assert_eq!(all_persons(&rebuilt).await, expected, "the resumed rebuild ends correct");
    drop(rebuilt);

    // Rollback and drop-old on the stopped data dir.
    let rollback = Command::new(env!("CARGO_BIN_EXE_callisto"))
        .args(["replay", "--rollback", "--quiet", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(rollback.status.success());
    let pointer: Value = serde_json::from_slice(&std::fs::read(dir.path().join("generations.json")).unwrap()).unwrap();
    assert_eq!((pointer["live"].clone(), pointer["previous"].clone()), (json!(0), json!(1)));
}
