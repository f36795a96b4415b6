//! The `callisto writer` binary as a user runs it: restarted gracefully, and killed with
//! SIGKILL mid-load. Every command answered 202 must still be in the log, at the offset the
//! answer named.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use callisto_core::log::{EmbeddedLog, EmbeddedLogOptions, EventLog};
use serde_json::{Value, json};

struct Writer {
    child: Child,
    base: String,
}

fn start_writer(data_dir: &Path) -> Writer {
    let mut child = Command::new(env!("CARGO_BIN_EXE_callisto"))
        .args(["writer", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("CALLISTO__TELEMETRY__LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("callisto binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let base = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Writer { child, base }
}

impl Writer {
    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "graceful stop exits 0, got {status}");
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
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
    let client = reqwest::Client::new();
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
    let client = reqwest::Client::new();
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
