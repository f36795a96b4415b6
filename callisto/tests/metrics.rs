//! `/metrics` answers an operator's questions and stays bounded: every Callisto metric in a
//! scrape is one of `telemetry::METRICS`, with its `# HELP` and the declared type; RED metrics
//! per route use route templates; and no label carries an id.

use std::collections::BTreeMap;

use callisto_core::telemetry::{METRICS, MetricKind};
use serde_json::json;

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_is_described_typed_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let common::DevApp { dev, base, client } = common::dev_app(&common::settings(dir.path())).await;
    let person = common::post_json(
        &client,
        format!("{base}/v1/persons"),
        json!({"given_name": "Mae", "family_name": "Jemison"}),
    )
    .await;
    let id = person["person_id"].as_str().unwrap().to_owned();
    let token = person["consistency_token"].as_str().unwrap().to_owned();
    client.get(format!("{base}/v1/persons/{id}?after={token}")).send().await.unwrap();
    client.get(format!("{base}/v1/persons/{}", uuid::Uuid::new_v4())).send().await.unwrap();
    client.get(format!("{base}/v1/search?q=jemison&after={token}")).send().await.unwrap();
    reqwest::get(format!("{base}/v1/persons/{id}")).await.unwrap(); // no credentials: 401
    let scrape = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();

    let declared: BTreeMap<&str, (MetricKind, &str)> = METRICS.iter().map(|(n, k, h)| (*n, (*k, *h))).collect();
    let mut types = BTreeMap::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE callisto_") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(format!("callisto_{name}"), kind.to_owned());
        }
    }
    assert!(types.len() >= 8, "a busy dev exports its metrics: {types:?}");
    for (name, kind) in &types {
        let (declared_kind, help) =
            declared.get(name.as_str()).unwrap_or_else(|| panic!("{name} is not in telemetry::METRICS"));
        let want = match declared_kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        assert_eq!(kind, want, "{name}");
        assert!(scrape.contains(&format!("# HELP {name} {help}")), "{name} has no HELP text");
    }

    let uuid = regex::Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").unwrap();
    let label = regex::Regex::new(r#"(\w+)="([^"]*)""#).unwrap();
    for line in scrape.lines().filter(|l| l.starts_with("callisto_")) {
        for capture in label.captures_iter(line) {
            let (name, value) = (&capture[1], &capture[2]);
            assert!(!uuid.is_match(value), "an id in a label: {line}");
            if name == "route" && line.starts_with("callisto_http_") {
                assert!(value.starts_with('/'), "an HTTP route label is a template: {line}");
            }
            if name == "partition" {
                assert!(value.parse::<u32>().is_ok_and(|p| p < 12), "{line}");
            }
        }
    }
    let requests = |route: &str, method: &str, status: &str| {
        let series = format!(r#"callisto_http_requests_total{{route="{route}",method="{method}",status="{status}"}} "#);
        scrape.lines().find_map(|l| l.strip_prefix(series.as_str())).map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!(requests("/v1/persons", "POST", "2xx"), 1.0, "{scrape}");
    assert_eq!(requests("/v1/persons/{id}", "GET", "2xx"), 1.0);
    assert_eq!(requests("/v1/persons/{id}", "GET", "4xx"), 2.0, "an unknown person and an anonymous caller");
    assert!(scrape.contains(r#"callisto_http_request_duration_seconds_bucket{route="/v1/search",method="GET""#));
    // What an append waited for in the embedded log, beside what its group commit took.
    let count = |histogram: &str| {
        let prefix = format!("{histogram}_count ");
        scrape.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    assert!(count("callisto_log_append_wait_seconds") >= 1.0, "{scrape}");
    assert!(count("callisto_log_group_commit_seconds") >= 1.0);
    dev.stop().await.unwrap();
}
