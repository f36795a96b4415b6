//! `callisto export` as a batch job runs it: a time range gives exactly the events in it, in
//! partition-then-offset order, and the Avro file reads back with its embedded schema.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use callisto_avro::events::NoteAdded;
use callisto_avro::{Codec, EmbeddedRegistry, PersonEvent};
use callisto_core::log::{AppendRequest, EmbeddedLog, EmbeddedLogOptions, EventLog};
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

mod common;

/// (partition, offset, timestamp, event_id) of every appended event.
type Written = Vec<(u32, u64, i64, String)>;

async fn append_notes(log: &EmbeddedLog, codec: &Codec, n: usize, written: &mut Written) {
    for i in 0..n {
        let event_id = Uuid::new_v4();
        let person = Uuid::new_v4();
        let event = PersonEvent::NoteAdded(NoteAdded {
            event_id,
            person_id: person,
            occurred_at: Utc::now(),
            correlation_id: "export-test".into(),
            note_id: Uuid::new_v4(),
            text: format!("note {i}"),
        });
        let at = log
            .append(AppendRequest {
                topic: "persons".into(),
                key: person.to_string().into_bytes(),
                payload: codec.encode(&event).unwrap(),
                headers: vec![],
                idempotency: None,
            })
            .await
            .unwrap();
        written.push((at.partition, at.offset, at.timestamp_ms, event_id.to_string()));
    }
}

/// Three bursts of events with quiet gaps between them; returns the events and two instants
/// that fall in the gaps.
async fn fill(dir: &Path) -> (Written, DateTime<Utc>, DateTime<Utc>) {
    let registry = Arc::new(EmbeddedRegistry::open(&dir.join("schemas.redb")).unwrap());
    let codec = Codec::new(registry, "persons").unwrap();
    let log = EmbeddedLog::open(&dir.join("log.redb"), EmbeddedLogOptions::default()).unwrap();
    log.ensure_topic("persons", 4).await.unwrap();
    let mut written = Vec::new();
    append_notes(&log, &codec, 10, &mut written).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t1 = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    append_notes(&log, &codec, 12, &mut written).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t2 = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    append_notes(&log, &codec, 8, &mut written).await;
    (written, t1, t2)
}

fn export(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_callisto"))
        .arg("export")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    (output.status, String::from_utf8_lossy(&output.stderr).into_owned())
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn a_time_range_exports_exactly_its_events_in_partition_then_offset_order() {
    let dir = tempfile::tempdir().unwrap();
    let (written, t1, t2) = fill(dir.path()).await;
    let out = dir.path().join("range.jsonl");
    let (status, stderr) = export(
        dir.path(),
        &["--from", &t1.to_rfc3339(), "--to", &t2.to_rfc3339(), "--output", out.to_str().unwrap(), "--quiet"],
    );
    assert!(status.success(), "{stderr}");
    let exported = lines(&out);
    let (from_ms, to_ms) = (t1.timestamp_millis(), t2.timestamp_millis());
    let mut expected: Vec<_> = written.iter().filter(|(_, _, ts, _)| *ts >= from_ms && *ts < to_ms).cloned().collect();
    expected.sort();
    assert_eq!(expected.len(), 12, "the middle burst");
    let got: Vec<(u32, u64, String)> = exported
        .iter()
        .map(|l| {
            (
                l["partition"].as_u64().unwrap() as u32,
                l["offset"].as_u64().unwrap(),
                l["event"]["event_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(u32, u64, String)> = expected.iter().map(|(p, o, _, id)| (*p, *o, id.clone())).collect();
    assert_eq!(got, want, "exactly the range, partition by partition, then by offset");
    assert_eq!(exported[0]["event"]["event_type"], "NoteAdded");
    let summary: Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!(summary["records"], 12);
}

#[tokio::test]
async fn offsets_and_partitions_select_a_slice() {
    let dir = tempfile::tempdir().unwrap();
    let (written, _, _) = fill(dir.path()).await;
    let out = dir.path().join("slice.jsonl");
    let (status, stderr) = export(
        dir.path(),
        &["--partitions", "1,2", "--from", "1", "--to", "4", "--output", out.to_str().unwrap(), "--quiet"],
    );
    assert!(status.success(), "{stderr}");
    let got: Vec<(u32, u64)> =
        lines(&out).iter().map(|l| (l["partition"].as_u64().unwrap() as u32, l["offset"].as_u64().unwrap())).collect();
    let mut want: Vec<(u32, u64)> = written
        .iter()
        .filter(|(p, o, _, _)| (*p == 1 || *p == 2) && (1..4).contains(o))
        .map(|(p, o, _, _)| (*p, *o))
        .collect();
    want.sort();
    assert!(!want.is_empty());
    assert_eq!(got, want);
}

#[tokio::test]
async fn the_avro_file_reads_back_with_its_embedded_schema() {
    let dir = tempfile::tempdir().unwrap();
    let (written, _, _) = fill(dir.path()).await;
    let out = dir.path().join("all.avro");
    let (status, stderr) = export(dir.path(), &["--format", "avro", "--output", out.to_str().unwrap(), "--quiet"]);
    assert!(status.success(), "{stderr}");
    let reader = apache_avro::Reader::new(std::fs::File::open(&out).unwrap()).unwrap();
    let apache_avro::Schema::Record(schema) = reader.writer_schema() else { panic!("not a record schema") };
    assert_eq!(schema.name.fullname(None), "io.callisto.export.ExportedEvent");
    let mut ids = HashSet::new();
    let mut positions = Vec::new();
    for value in reader {
        let apache_avro::types::Value::Record(fields) = value.unwrap() else { panic!("not a record") };
        let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap();
        let (apache_avro::types::Value::Int(p), apache_avro::types::Value::Long(o)) =
            (field("partition"), field("offset"))
        else {
            panic!("bad position")
        };
        positions.push((p as u32, o as u64));
        let apache_avro::types::Value::Union(_, event) = field("event") else { panic!("event is a union") };
        let apache_avro::types::Value::Record(event) = *event else { panic!("event is a record") };
        let id = event.iter().find(|(n, _)| n == "event_id").map(|(_, v)| v.clone()).unwrap();
        match id {
            apache_avro::types::Value::Uuid(u) => ids.insert(u.to_string()),
            apache_avro::types::Value::String(s) => ids.insert(s),
            other => panic!("event_id is {other:?}"),
        };
    }
    assert_eq!(ids, written.iter().map(|(_, _, _, id)| id.clone()).collect::<HashSet<_>>());
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted, "partition then offset order");
}

#[tokio::test]
async fn bad_ranges_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path()).await;
    let (status, stderr) = export(dir.path(), &["--from", "yesterday"]);
    assert!(!status.success());
    assert!(stderr.contains("RFC 3339"), "{stderr}");
    let (status, stderr) = export(dir.path(), &["--partitions", "9"]);
    assert!(!status.success());
    assert!(stderr.contains("partition 9 does not exist"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_goes_through_a_running_dev_that_owns_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let dev = common::start_dev(dir.path()).await;
    let client = common::client(dir.path());
    for i in 0..7 {
        let r = client
            .post(format!("http://{}/v1/persons", dev.addr))
            .json(&serde_json::json!({"given_name": format!("Live{i}"), "family_name": "Export"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let out = dir.path().join("live.jsonl");
    let (status, stderr) = export(dir.path(), &["--output", out.to_str().unwrap(), "--quiet"]);
    assert!(status.success(), "{stderr}");
    let exported = lines(&out);
    assert_eq!(exported.len(), 7, "every event, read through the running server");
    assert!(exported.iter().all(|l| l["event"]["event_type"] == "PersonRegistered"));
    let avro = dir.path().join("live.avro");
    let (status, stderr) = export(dir.path(), &["--format", "avro", "--output", avro.to_str().unwrap(), "--quiet"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(apache_avro::Reader::new(std::fs::File::open(&avro).unwrap()).unwrap().count(), 7);
    let (status, stderr) = export(dir.path(), &["--partitions", "99"]);
    assert!(!status.success());
    assert!(stderr.contains("partition 99"), "{stderr}");
    dev.stop().await.unwrap();
}
