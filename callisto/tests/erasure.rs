//! Right to erasure on `callisto dev`: a person's personal data is sealed with their own key in
//! every event; `DELETE /v1/persons/{id}` destroys the key, read models drop the person, export
//! and timelines keep no content, and after compaction no file under the data dir holds any of
//! the person's distinctive strings. A rebuild from offset 0 brings nothing back, and another
//! person is untouched throughout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;
use callisto_core::readmodel::ReadStore;
use common::{DevApp, dev_app, post_json, start_dev};

/// Strings only the erased person's data contains, each one field of theirs.
const ERASED: [&str; 6] = [
    "Zephyrinequa",
    "Quillfeatherby",
    "zephy.quill@erasure-probe.example",
    "77 Obsidianmoor Lane",
    "+44 7700 913377",
    "prefers marmalade with xylophonics",
];

/// Every file under `dir` that contains `needle`, compared case-insensitively (search indexes
/// keep terms lowercased).
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let needle = needle.to_lowercase().into_bytes();
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else { continue };
        if bytes.to_ascii_lowercase().windows(needle.len()).any(|w| w == needle.as_slice()) {
            found.push(path.display().to_string());
        }
    }
    found
}

async fn read_with(client: &reqwest::Client, url: String, token: &str) -> (StatusCode, Value) {
    let response = client.get(url).header("callisto-consistency-token", token).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn export_jsonl(client: &reqwest::Client, base: &str) -> String {
    let response = client.get(format!("{base}/admin/v1/export?format=jsonl")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

async fn rebuild(client: &reqwest::Client, base: &str) {
    let started = client.post(format!("{base}/admin/v1/replay")).json(&json!({})).send().await.unwrap();
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    for _ in 0..600 {
        let status: Value = client.get(format!("{base}/admin/v1/replay")).send().await.unwrap().json().await.unwrap();
        if status["job"]["state"] == "switched" {
            return;
        }
        assert_ne!(status["job"]["state"], "failed", "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the rebuild did not switch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_person_is_gone_from_reads_search_exports_and_every_file_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let DevApp { dev, base, client } = dev_app(&common::settings(dir.path())).await;

    let erased = post_json(
        &client,
        format!("{base}/v1/persons"),
        json!({
            "given_name": ERASED[0], "family_name": ERASED[1], "email": ERASED[2], "phone": ERASED[4],
            "date_of_birth": "1961-04-12",
            "address": {"line1": ERASED[3], "city": "Lyon", "postcode": "69001", "country": "FR"},
            "tags": ["probe"]
        }),
    )
    .await;
    let id = erased["person_id"].as_str().unwrap().to_owned();
    let note = post_json(&client, format!("{base}/v1/persons/{id}/notes"), json!({"text": ERASED[5]})).await;
    let kept = post_json(
        &client,
        format!("{base}/v1/persons"),
        json!({"given_name": "Bartholomew", "family_name": "Ravensworth", "email": "bart@kept.example", "tags": ["probe"]}),
    )
    .await;
    let kept_id = kept["person_id"].as_str().unwrap().to_owned();
    let kept_note =
        post_json(&client, format!("{base}/v1/persons/{kept_id}/notes"), json!({"text": "keeps bees in Ravensworth"}))
            .await;
    let token = kept_note["consistency_token"].as_str().unwrap().to_owned();
    let note_token = note["consistency_token"].as_str().unwrap().to_owned();

    // Before: readable everywhere it should be, and never in clear in the event log.
    let (status, doc) = read_with(&client, format!("{base}/v1/persons/{id}"), &note_token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((doc["given_name"].as_str(), doc["email"].as_str()), (Some(ERASED[0]), Some(ERASED[2])));
    let (_, found) = read_with(&client, format!("{base}/v1/search?q=xylophonics"), &note_token).await;
    assert_eq!(found["total"], 1, "{found}");
    let (_, found) = read_with(&client, format!("{base}/v1/search?q={}", ERASED[0]), &token).await;
    assert_eq!(found["total"], 1, "{found}");
    let exported = export_jsonl(&client, &base).await;
    assert!(exported.contains(ERASED[0]) && exported.contains(ERASED[5]), "export opens sealed events");
    for needle in ERASED {
        let holders = files_containing(dir.path(), needle);
        assert!(!holders.iter().any(|f| f.ends_with("log.redb")), "{needle:?} in clear in the log: {holders:?}");
    }
    // An export that keeps personal fields sealed holds ciphertext only; today the person's key
    // opens it.
    let sealed_export = client
        .get(format!("{base}/admin/v1/export?format=jsonl&personal_data=sealed"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in ERASED {
        assert!(!sealed_export.contains(needle), "the sealed export holds {needle:?} in clear");
    }
    for bad in ["personal_data=plaintext", "format=xml"] {
        let refused = client.get(format!("{base}/admin/v1/export?{bad}")).send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(refused.headers()["content-type"], "application/problem+json", "{bad}");
    }
    let registration: Value = sealed_export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["key"] == id.as_str() && l["event"]["event_type"] == "PersonRegistered")
        .unwrap();
    let sealed_in_file = {
        use base64::Engine as _;
        let bytes = |v: &Value| base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
        let s = &registration["sealed"];
        callisto_avro::events::SealedPersonalData {
            key_id: s["key_id"].as_str().unwrap().to_owned(),
            algorithm: s["algorithm"].as_str().unwrap().to_owned(),
            nonce: bytes(&s["nonce"]),
            ciphertext: bytes(&s["ciphertext"]),
        }
    };
    let event_id = uuid::Uuid::parse_str(registration["event"]["event_id"].as_str().unwrap()).unwrap();
    let person = uuid::Uuid::parse_str(&id).unwrap();
    let key = dev.keyring.key_for_writing(person).await.unwrap();
    assert_eq!(key.open(event_id, &sealed_in_file).unwrap().given_name.as_deref(), Some(ERASED[0]));

    // The probe works: the read model holds the plaintext, so the check below can fail.
    assert!(
        files_containing(dir.path(), ERASED[0]).iter().any(|f| f.contains("readmodel.redb")),
        "the read model keeps the name before erasure"
    );

    // Erase, twice: idempotent.
    let first = client.delete(format!("{base}/v1/persons/{id}")).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let again = client.delete(format!("{base}/v1/persons/{id}")).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let erased_token = again.json::<Value>().await.unwrap()["consistency_token"].as_str().unwrap().to_owned();

    // The sealed export written before the erasure opens no more: the key is gone everywhere.
    assert!(matches!(dev.keyring.key_for_writing(person).await, Err(callisto_core::privacy::KeyError::Erased)));

    // Later commands for the person are refused as gone.
    let late =
        client.post(format!("{base}/v1/persons/{id}/notes")).json(&json!({"text": "too late"})).send().await.unwrap();
    assert_eq!(late.status(), StatusCode::GONE);
    assert_eq!(late.headers()["content-type"], "application/problem+json");
    let relabel =
        client.post(format!("{base}/v1/persons/{id}/tags")).json(&json!({"tag": "again"})).send().await.unwrap();
    assert_eq!(relabel.status(), StatusCode::GONE);

    let assert_erased = |label: &'static str| {
        let client = client.clone();
        let (base, id, kept_id, erased_token) = (base.clone(), id.clone(), kept_id.clone(), erased_token.clone());
        async move {
            let (status, problem) = read_with(&client, format!("{base}/v1/persons/{id}"), &erased_token).await;
            assert_eq!(status, StatusCode::GONE, "{label}: {problem}");
            assert_eq!(problem["status"], 410);
            for q in ["xylophonics", ERASED[0], ERASED[1], "Obsidianmoor", "probe"] {
                let (_, found) = read_with(&client, format!("{base}/v1/search?q={q}"), &erased_token).await;
                assert!(
                    found["hits"].as_array().unwrap().iter().all(|h| h["person_id"] != id.as_str()),
                    "{label}: search {q} still finds the erased person: {found}"
                );
            }
            let (_, timeline) = read_with(&client, format!("{base}/v1/persons/{id}/timeline"), &erased_token).await;
            let entries = timeline["items"].as_array().unwrap();
            assert!(entries.len() >= 3, "{label}: the timeline keeps the events: {timeline}");
            for entry in entries {
                assert_eq!(entry["erased"], true, "{label}: {entry}");
                assert_eq!(entry["data"], json!({}), "{label}: {entry}");
                assert!(entry["event_type"].is_string() && entry["occurred_at"].is_string());
            }
            let (_, listed) = read_with(&client, format!("{base}/v1/persons?tag=probe"), &erased_token).await;
            let ids: Vec<&str> =
                listed["items"].as_array().unwrap().iter().map(|p| p["person_id"].as_str().unwrap()).collect();
            assert_eq!(ids, vec![kept_id.as_str()], "{label}: listing");
            let (status, kept) = read_with(&client, format!("{base}/v1/persons/{kept_id}"), &erased_token).await;
            assert_eq!((status, kept["given_name"].as_str()), (StatusCode::OK, Some("Bartholomew")), "{label}");
            let (_, found) = read_with(&client, format!("{base}/v1/search?q=bees"), &erased_token).await;
            assert_eq!(found["total"], 1, "{label}: the other person is still found: {found}");
        }
    };
    assert_erased("after erasure").await;

    // Export: the person's events are there, marked erased, with no personal field.
    let exported = export_jsonl(&client, &base).await;
    for needle in ERASED {
        assert!(!exported.contains(needle), "export still holds {needle:?}");
    }
    let lines: Vec<Value> = exported.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of_person: Vec<&Value> = lines.iter().filter(|l| l["key"] == id.as_str()).collect();
    assert!(of_person.len() >= 4, "register, note, two erasures");
    assert!(of_person.iter().all(|l| l["erased"] == true), "{of_person:?}");
    assert!(exported.contains("Ravensworth"), "the other person exports in full");
    let avro = client.get(format!("{base}/admin/v1/export?format=avro")).send().await.unwrap().bytes().await.unwrap();
    for needle in ERASED {
        assert!(!avro.windows(needle.len()).any(|w| w == needle.as_bytes()), "the Avro export holds {needle:?}");
    }
    let marked: Vec<bool> = apache_avro::Reader::new(&avro[..])
        .unwrap()
        .map(|row| {
            let apache_avro::types::Value::Record(fields) = row.unwrap() else { panic!("a record") };
            let field = |name: &str| fields.iter().find(|(n, _)| n == name).unwrap().1.clone();
            (field("key"), field("erased"))
        })
        .filter(|(key, _)| *key == apache_avro::types::Value::String(id.clone()))
        .map(|(_, erased)| erased == apache_avro::types::Value::Boolean(true))
        .collect();
    assert!(marked.len() >= 4 && marked.iter().all(|m| *m), "the Avro export marks the person's events erased");

    // Compaction, then not one file under the data dir holds any of the strings.
    let compacted = client.post(format!("{base}/admin/v1/compact")).send().await.unwrap();
    assert_eq!(compacted.status(), StatusCode::OK);
    for needle in ERASED {
        assert_eq!(files_containing(dir.path(), needle), Vec::<String>::new(), "{needle:?} survives on disk");
    }
    assert!(!files_containing(dir.path(), "Ravensworth").is_empty(), "the other person's data is still on disk");

    // A rebuild from offset 0 brings nothing back (the key is gone), and gives the same read
    // models as before it.
    let snapshot = || async {
        let store = dev.store.clone();
        let mut docs = common::all_persons(store.as_ref()).await;
        let mut timelines = Vec::new();
        for person in [&id, &kept_id] {
            let person = uuid::Uuid::parse_str(person).unwrap();
            docs.insert(person, store.get(person).await.unwrap().unwrap());
            timelines.push(store.timeline(person, 100, None).await.unwrap().items);
        }
        (docs, timelines)
    };
    let before_rebuild = snapshot().await;
    rebuild(&client, &base).await;
    assert_erased("after a rebuild").await;
    assert_eq!(snapshot().await, before_rebuild, "the rebuilt read models equal the ones before");
    let compacted = client.post(format!("{base}/admin/v1/compact")).send().await.unwrap();
    assert_eq!(compacted.status(), StatusCode::OK);
    for needle in ERASED {
        assert_eq!(files_containing(dir.path(), needle), Vec::<String>::new(), "{needle:?} came back with the rebuild");
    }
    dev.stop().await.unwrap();
}

fn callisto(args: &[&str]) -> std::process::Output {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_callisto")).args(args).output().unwrap();
    assert!(output.status.success(), "callisto {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// Rotating the master key: a new key file, the old one listed as previous, `privacy rewrap`;
/// then the new key alone opens events sealed before the rotation, and `privacy compact` works
/// on a stopped data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_rotates_without_touching_events() {
    use callisto_core::privacy::{EventReader, Keyring, KeyringOptions, load_master_key};
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path()).await;
    let base = format!("http://{}", dev.addr);
    let person = post_json(
        &common::client(dir.path()),
        format!("{base}/v1/persons"),
        json!({"given_name": "Rosalind", "family_name": "Franklin"}),
    )
    .await;
    let (partition, offset) = (person["partition"].as_u64().unwrap() as u32, person["offset"].as_u64().unwrap());
    dev.stop().await.unwrap();

    let data = dir.path().to_str().unwrap();
    let new_key = dir.path().join("master-2026.key");
    callisto(&["privacy", "new-master-key", new_key.to_str().unwrap()]);
    let config = dir.path().join("callisto.toml");
    std::fs::write(
        &config,
        format!(
            "[privacy]\nmaster_key_file = {:?}\nprevious_master_key_files = [{:?}]\n",
            new_key.display().to_string(),
            dir.path().join("master.key").display().to_string()
        ),
    )
    .unwrap();
    // Every stored key is re-wrapped: Rosalind's and those of the writer's reserve of new persons.
    let rewrap = || {
        let output = callisto(&["--config", config.to_str().unwrap(), "privacy", "rewrap", "--data-dir", data]);
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        let count = said.split("re-wrapped ").nth(1).and_then(|rest| rest.split(' ').next()?.parse::<usize>().ok());
        (count, said)
    };
    let (first, said) = rewrap();
    assert!(first.is_some_and(|n| n >= 1), "{said}");
    let (again, said) = rewrap();
    assert_eq!(again, Some(0), "nothing is left wrapped by the old key: {said}");

    // Only the new master key now: the event sealed before the rotation still opens.
    let store = callisto_core::privacy::embedded::EmbeddedKeyStore::open(&dir.path().join("keys.redb")).unwrap();
    let keyring = Keyring::new(
        Arc::new(store),
        load_master_key(&new_key, false).unwrap(),
        Vec::new(),
        &KeyringOptions::default(),
    );
    let registry = callisto_avro::EmbeddedRegistry::open(&dir.path().join("schemas.redb")).unwrap();
    let codec = callisto_avro::Codec::new(Arc::new(registry), "persons").unwrap();
    let reader = EventReader::new(Arc::new(codec), Arc::new(keyring));
    let log = callisto_core::log::EmbeddedLog::open(&dir.path().join("log.redb"), Default::default()).unwrap();
    let record =
        callisto_core::log::EventLog::read(&log, "persons", partition, offset, 1, Duration::ZERO).await.unwrap();
    let opened = reader.read(&record[0].payload).await.unwrap();
    let callisto_avro::PersonEvent::Registered(e) = opened.event else { panic!("a registration") };
    assert_eq!(e.given_name, "Rosalind");
    drop((reader, log));

    let compacted = callisto(&["privacy", "compact", "--data-dir", data]);
    let compacted: Value = serde_json::from_slice(&compacted.stdout).unwrap();
    assert_eq!(compacted["generations"], json!([0]));
}

/// Without anyone asking, `callisto dev` compacts after an erasure: within two periods of
/// `privacy.compact_after_erasure_secs` no file holds the erased person's strings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_follows_erasures_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    settings.privacy.compact_after_erasure_secs = 1;
    let DevApp { dev, base, client } = dev_app(&settings).await;
    let person = post_json(
        &client,
        format!("{base}/v1/persons"),
        json!({"given_name": "Ottoline", "family_name": "Quarrendon"}),
    )
    .await;
    let id = person["person_id"].as_str().unwrap().to_owned();
    let token = person["consistency_token"].as_str().unwrap().to_owned();
    let (status, _) = read_with(&client, format!("{base}/v1/persons/{id}"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!files_containing(dir.path(), "Quarrendon").is_empty(), "the read models hold the name");
    let erased = client.delete(format!("{base}/v1/persons/{id}")).send().await.unwrap();
    let token = erased.json::<Value>().await.unwrap()["consistency_token"].as_str().unwrap().to_owned();
    let (status, _) = read_with(&client, format!("{base}/v1/persons/{id}"), &token).await;
    assert_eq!(status, StatusCode::GONE);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let holders = files_containing(dir.path(), "Quarrendon");
        if holders.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still on disk: {holders:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    dev.stop().await.unwrap();
}
