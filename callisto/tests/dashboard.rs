//! The Grafana dashboard (`deploy/grafana/callisto.json`) is valid JSON with a query in every
//! panel, and every metric it queries is in a scrape of a `callisto dev` that has done each kind
//! of work: commands, reads, a stale read, a dead letter and an erasure.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use callisto_core::log::AppendRequest;
use serde_json::{Value, json};

mod common;

fn queried_metrics(dashboard: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{} has no targets", panel["title"]));
        assert!(!targets.is_empty(), "{} queries nothing", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("callisto_") {
                    let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
                    names.insert(base.to_owned());
                }
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/callisto.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    let queried = queried_metrics(&dashboard);
    assert!(queried.len() >= 10, "{queried:?}");

    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    settings.query.consistency_wait_ms = 50;
    let common::DevApp { dev, base, client } = common::dev_app(&settings).await;
    let person = common::post_json(
        &client,
        format!("{base}/v1/persons"),
        json!({"given_name": "Grace", "family_name": "Hopper"}),
    )
    .await;
    let id = person["person_id"].as_str().unwrap().to_owned();
    let token = person["consistency_token"].as_str().unwrap().to_owned();
    client.get(format!("{base}/v1/persons/{id}?after={token}")).send().await.unwrap();
    client.get(format!("{base}/v1/search?q=hopper&after={token}")).send().await.unwrap();
    // A token nobody reached: answered stale.
    client.get(format!("{base}/v1/search?q=hopper&after=0:999999")).send().await.unwrap();
    // A record that is no event: dead-lettered.
    dev.log
        .append(AppendRequest {
            topic: "persons".into(),
            key: b"poison".to_vec(),
            payload: vec![0xff, 0, 1],
            headers: vec![],
            idempotency: None,
        })
        .await
        .unwrap();
    client.delete(format!("{base}/v1/persons/{id}")).send().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let scrape = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        let missing: Vec<&String> =
            queried.iter().filter(|name| !scrape.contains(&format!("# TYPE {name} "))).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(missing.is_empty(), "the dashboard queries metrics a working dev does not export: {missing:?}");
    dev.stop().await.unwrap();
}
