//! The asynchronous contract: the AsyncAPI document names a message for every event record
//! the schemas define, on both topics; it is valid AsyncAPI 3 (checked with the AsyncAPI
//! parser from npm where installed; `.ci/run` installs it); and the services serve it.

use std::collections::BTreeSet;
use std::path::Path;

use reqwest::StatusCode;
use serde_json::Value;

mod common;

/// The event records the `.avsc` files define (not `PersonalData`, which is no event).
fn event_records_on_disk() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../avro/schemas");
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            (path.extension()? == "avsc").then_some(path)
        })
        .map(|path| {
            let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            schema["name"].as_str().unwrap().to_owned()
        })
        .filter(|name| name != "PersonalData")
        .collect()
}

#[test]
fn every_event_record_has_a_message_on_both_topics() {
    let doc = callisto::asyncapi::document("persons", 12);
    let records = event_records_on_disk();
    assert!(records.len() >= 9, "{records:?}");
    let names = |channel: &str| -> BTreeSet<String> {
        doc["channels"][channel]["messages"]
            .as_object()
            .unwrap()
            .values()
            .map(|m| {
                let target = m["$ref"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
                doc["components"]["messages"][&target]["name"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    assert_eq!(names("persons"), records, "the person topic");
    assert_eq!(names("deadLetters"), records, "the dead-letter topic");
    for record in &records {
        let message = &doc["components"]["messages"][record];
        let file: Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../avro/schemas/{record}.avsc")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(message["payload"]["schema"], file, "{record}: the payload is the schema file");
        for header in ["traceparent", "callisto.principal"] {
            assert!(message["headers"]["properties"].get(header).is_some(), "{record} lacks {header}");
        }
    }
    assert_eq!(doc["channels"]["deadLetters"]["address"], "persons.dlq");
}

#[test]
fn the_document_is_valid_asyncapi() {
    let Some(modules) = std::env::var("CALLISTO_ASYNCAPI_MODULES").ok().filter(|m| !m.is_empty()) else {
        assert!(
            std::env::var_os("CALLISTO_REQUIRE_PEERS").is_none(),
            "CALLISTO_ASYNCAPI_MODULES is required here: npm install @asyncapi/parser@3.6.6 @asyncapi/avro-schema-parser@3.1.0"
        );
        eprintln!(
            "skipped: npm install @asyncapi/parser@3.6.6 @asyncapi/avro-schema-parser@3.1.0, then set CALLISTO_ASYNCAPI_MODULES"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("asyncapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&callisto::asyncapi::document("persons", 12)).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/asyncapi/validate.mjs");
    let output = std::process::Command::new("node")
        .arg(script)
        .arg(&file)
        .env("CALLISTO_ASYNCAPI_MODULES", modules)
        .output()
        .expect("node runs");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the AsyncAPI parser refuses the document:\n{report}");
    assert!(report.contains("valid: 18 messages in 2 channels"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_the_document_to_callers_only() {
    let dir = tempfile::tempdir().unwrap();
    let common::DevApp { dev, base, client } = common::dev_app(&common::settings(dir.path())).await;
    let served: Value = client.get(format!("{base}/asyncapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(served["asyncapi"], "3.0.0");
    assert_eq!(served, callisto::asyncapi::document("persons", 12));
    let anonymous = reqwest::get(format!("{base}/asyncapi.json")).await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    dev.stop().await.unwrap();
}
