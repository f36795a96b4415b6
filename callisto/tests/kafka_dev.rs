//! `callisto dev --kafka-mock 3`: the whole backbone with Kafka as the event log, on
//! librdkafka's in-process mock cluster. Commands go through the Kafka producer, projectors
//! read the partitions back, and reads with the token see the change.

use callisto::services::{Dev, start_kafka_mock};
use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;
use common::{post_json, settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_flow_through_kafka_into_read_models_and_search() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    let _cluster = start_kafka_mock(&mut settings, 3).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dev = Dev::start(&settings, listener).await.unwrap();
    let base = format!("http://{}", dev.addr);
    let client = reqwest::Client::new();

    let person = post_json(
        &client,
        format!("{base}/v1/persons"),
        json!({"given_name": "Kaf", "family_name": "Ka", "tags": ["stream"]}),
    )
    .await;
    let id = person["person_id"].as_str().unwrap().to_owned();
    assert_eq!(person["partition"], callisto_core::partition::partition_for(id.as_bytes(), 12));
    let token = person["consistency_token"].as_str().unwrap();
    let read =
        client.get(format!("{base}/v1/persons/{id}")).header("callisto-consistency-token", token).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert!(read.headers().get("callisto-stale").is_none());
    assert_eq!(read.json::<Value>().await.unwrap()["given_name"], "Kaf");

    let note =
        post_json(&client, format!("{base}/v1/persons/{id}/notes"), json!({"text": "replicated through the brokers"}))
            .await;
    let token = note["consistency_token"].as_str().unwrap();
    let found: Value =
        client.get(format!("{base}/v1/search?q=brokers&after={token}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(found["total"], 1, "{found}");
    assert!(found["hits"][0]["highlights"]["text"].as_str().unwrap().contains("<b>brokers</b>"));

    // Idempotency keys need the embedded log's atomic dedupe; Kafka says so plainly.
    let keyed = client
        .post(format!("{base}/v1/persons"))
        .header("idempotency-key", "k-1")
        .json(&json!({"given_name": "A", "family_name": "B"}))
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), StatusCode::UNPROCESSABLE_ENTITY);
    dev.stop().await.unwrap();
}
