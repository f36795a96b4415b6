//! End to end against a running production stack (`make up`, then `make test-integration`):
//! commands through the writer into Kafka, projected by the projector into MongoDB and
//! Elasticsearch, read back through the query API with the consistency token. Skipped with one
//! line unless `CALLISTO_STACK_WRITER_URL` and `CALLISTO_STACK_QUERY_URL` are set.

use std::io::Write;

use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;
use common::post_json;

fn stack() -> Option<(String, String, String)> {
    let var = |name: &str| std::env::var(name).ok().filter(|u| !u.is_empty());
    let writer = var("CALLISTO_STACK_WRITER_URL");
    let query = var("CALLISTO_STACK_QUERY_URL");
    let key = var("CALLISTO_STACK_API_KEY");
    match (writer, query, key) {
        (Some(writer), Some(query), Some(key)) => Some((writer, query, key)),
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "skipped: set CALLISTO_STACK_WRITER_URL, CALLISTO_STACK_QUERY_URL and CALLISTO_STACK_API_KEY to run"
            );
            None
        }
    }
}

#[tokio::test]
async fn commands_reach_mongodb_and_elasticsearch_and_read_back_with_the_token() {
    let Some((writer, query, key)) = stack() else { return };
    let client = common::client_with_key(&key);
    let marker = format!("stack{}", uuid::Uuid::new_v4().simple());
    let person = post_json(
        &client,
        format!("{writer}/v1/persons"),
        json!({"given_name": "Stack", "family_name": "Test", "tags": [marker.clone()]}),
    )
    .await;
    let id = person["person_id"].as_str().expect("the writer accepted the command").to_owned();
    let note =
        post_json(&client, format!("{writer}/v1/persons/{id}/notes"), json!({"text": format!("note {marker}")})).await;
    let token = note["consistency_token"].as_str().unwrap();

    let read = client.get(format!("{query}/v1/persons/{id}?after={token}")).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert!(read.headers().get("callisto-stale").is_none(), "the projector did not reach the token in time");
    let doc: Value = read.json().await.unwrap();
    assert_eq!((doc["family_name"].as_str(), doc["note_count"].as_u64()), (Some("Test"), Some(1)));

    let found: Value =
        client.get(format!("{query}/v1/search?q={marker}&after={token}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(found["total"], 2, "the person (by tag) and the note: {found}");
    assert_eq!(found["facets"]["tags"][&marker], 2);
}
