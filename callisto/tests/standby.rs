//! Primary and standby: a standby site refuses every command with a 503 problem naming the
//! primary (after checking credentials), serves reads and search, builds its read models from the
//! log it is given, and takes commands again once it is promoted (config change and restart).

use callisto_core::config::{Role, Settings};
use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;
use common::{DevApp, dev_app, post_json};

const PRIMARY: &str = "https://callisto.primary.example";

fn standby(settings: &Settings) -> Settings {
    let mut settings = settings.clone();
    settings.server.role = Role::Standby;
    settings.server.primary_url = Some(PRIMARY.into());
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_refuses_commands_serves_reads_and_takes_commands_once_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let primary = common::settings(dir.path());

    // The primary site writes a person and a note.
    let DevApp { dev, base, client } = dev_app(&primary).await;
    let person =
        post_json(&client, format!("{base}/v1/persons"), json!({"given_name": "Vera", "family_name": "Rubin"})).await;
    let id = person["person_id"].as_str().unwrap().to_owned();
    let note =
        post_json(&client, format!("{base}/v1/persons/{id}/notes"), json!({"text": "galaxy rotation curves"})).await;
    let token = note["consistency_token"].as_str().unwrap().to_owned();
    dev.stop().await.unwrap();

    // The standby starts with no read models: its projectors build them from the log.
    std::fs::remove_file(dir.path().join("readmodel.redb")).unwrap();
    std::fs::remove_dir_all(dir.path().join("search")).unwrap();
    let DevApp { dev, base, client } = dev_app(&standby(&primary)).await;

    let refusals = [
        client.post(format!("{base}/v1/persons")).json(&json!({"given_name": "A", "family_name": "B"})),
        client.put(format!("{base}/v1/persons/{id}/name")).json(&json!({"given_name": "V", "family_name": "R"})),
        client.post(format!("{base}/v1/persons/{id}/notes")).json(&json!({"text": "more"})),
        client.delete(format!("{base}/v1/persons/{id}")),
    ];
    for request in refusals {
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers()["content-type"], "application/problem+json");
        let problem: Value = answer.json().await.unwrap();
        assert_eq!(problem["type"], "/problems/standby", "{problem}");
        assert_eq!(problem["primary"], PRIMARY);
        assert!(problem["detail"].as_str().unwrap().contains(PRIMARY), "{problem}");
    }
    // Credentials are checked first: a stranger learns nothing about the site's role.
    let anonymous = reqwest::Client::new()
        .post(format!("{base}/v1/persons"))
        .json(&json!({"given_name": "A", "family_name": "B"}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // Reads and search are served from the read models the standby built.
    // The primary's last token: reads wait until the standby's projections have reached it.
    let read = client.get(format!("{base}/v1/persons/{id}?after={token}")).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert!(read.headers().get("callisto-stale").is_none());
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["given_name"], "Vera", "the refused erasure destroyed nothing");
    let found: Value =
        client.get(format!("{base}/v1/search?q=rotation&after={token}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(found["total"], 1, "{found}");
    assert_eq!(found["hits"][0]["person_id"], id.as_str());
    dev.stop().await.unwrap();

    // Promotion: the same site restarted as the primary takes commands.
    let DevApp { dev, base, client } = dev_app(&primary).await;
    let accepted =
        client.post(format!("{base}/v1/persons/{id}/notes")).json(&json!({"text": "promoted"})).send().await.unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    dev.stop().await.unwrap();
}
