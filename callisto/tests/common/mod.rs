//! Helpers shared by the integration tests: every test gets its own data dir and port.
#![allow(dead_code)]

use std::path::Path;

use callisto::services::Dev;
use callisto_core::config::Settings;
use serde_json::Value;

/// Default settings on the data dir `dir`.
pub fn settings(dir: &Path) -> Settings {
    let mut settings = Settings::default();
    settings.storage.data_dir = dir.to_path_buf();
    settings.http.listen = "127.0.0.1:0".into();
    settings
}

/// `callisto dev` in this process on a free port, with its state in `dir`.
pub async fn start_dev(dir: &Path) -> Dev {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Dev::start(&settings(dir), listener).await.unwrap()
}

/// POSTs `body` as JSON and returns the answer's JSON.
pub async fn post_json(client: &reqwest::Client, url: impl reqwest::IntoUrl, body: Value) -> Value {
    client.post(url).json(&body).send().await.unwrap().json().await.unwrap()
}
