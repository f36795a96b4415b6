//! Helpers shared by the integration tests: every test gets its own data dir and port.
#![allow(dead_code)]

pub mod jwt;
/// The independent servers the core contract suites start (osmem-server, …).
#[path = "../../../core/tests/contract/peers.rs"]
pub mod peers;
pub mod registry;
pub mod tls;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use callisto::services::Dev;
use callisto_avro::Codec;
use callisto_core::config::Settings;
use callisto_core::log::EventLog;
use callisto_core::privacy::EventReader;
use callisto_core::readmodel::{ListFilter, PersonDoc, ProjectedEvent, ReadStore, fold};
use serde_json::Value;
use uuid::Uuid;

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

/// A running `callisto dev` on `settings`, its base URL, and a client calling as its dev key.
pub struct DevApp {
    pub dev: Dev,
    pub base: String,
    pub client: reqwest::Client,
}

pub async fn dev_app(settings: &Settings) -> DevApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dev = Dev::start(settings, listener).await.unwrap();
    let base = format!("http://{}", dev.addr);
    DevApp { dev, base, client: client(&settings.storage.data_dir) }
}

/// The dev key of `dir` (created if no service made one yet), so tests call as an admin with
/// every scope, as the README's walkthrough does.
pub fn api_key(dir: &Path) -> String {
    let settings = settings(dir);
    callisto::keys::ensure_dev_key(&settings).unwrap();
    std::fs::read_to_string(callisto::keys::dev_key_path(&settings)).unwrap().trim().to_owned()
}

/// A client that presents `key` on every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let headers = reqwest::header::HeaderMap::from_iter([(
        reqwest::header::AUTHORIZATION,
        format!("ApiKey {key}").parse().unwrap(),
    )]);
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// A client calling as the dev key of `dir`.
pub fn client(dir: &Path) -> reqwest::Client {
    client_with_key(&api_key(dir))
}

/// Sends `request` and returns the answer's JSON.
pub async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// POSTs `body` as JSON and returns the answer's JSON.
pub async fn post_json(client: &reqwest::Client, url: impl reqwest::IntoUrl, body: Value) -> Value {
    json_of(client.post(url).json(&body)).await
}

/// The documents a fold over the whole `persons` topic gives, with the same version guard,
/// events opened by `reader`'s keyring as projectors open them.
pub async fn fold_log(log: &dyn EventLog, reader: &EventReader) -> BTreeMap<Uuid, PersonDoc> {
    let mut docs: BTreeMap<Uuid, PersonDoc> = BTreeMap::new();
    for (partition, end) in log.end_offsets("persons").await.unwrap().into_iter().enumerate() {
        for record in log.read("persons", partition as u32, 0, end as usize, Duration::ZERO).await.unwrap() {
            let opened = reader.read(&record.payload).await.unwrap();
            let id = opened.event.meta().person_id;
            let projected = ProjectedEvent::from_opened(&record, opened);
            if let Some(doc) = fold(docs.get(&id).cloned(), &projected) {
                docs.insert(id, doc);
            }
        }
    }
    docs
}

/// A reader over `codec` and the embedded keyring of data dir `dir` (no process may hold it).
pub fn reader_of(dir: &Path, codec: Codec) -> EventReader {
    EventReader::new(std::sync::Arc::new(codec), callisto_core::privacy::open_embedded(dir).unwrap())
}

/// Every document in the store, through paging.
pub async fn all_persons(store: &dyn ReadStore) -> BTreeMap<Uuid, PersonDoc> {
    let mut out = BTreeMap::new();
    let mut cursor = None;
    loop {
        let page = store.list(&ListFilter::default(), 100, cursor).await.unwrap();
        out.extend(page.items.into_iter().map(|d| (d.person_id, d)));
        match page.next_cursor {
            Some(next) => cursor = Some(Uuid::parse_str(&next).unwrap()),
            None => return out,
        }
    }
}

/// The `callisto` binary running one service on a free port, as a user runs it.
pub struct Service {
    pub child: Child,
    pub base: String,
}

impl Service {
    /// Starts `callisto <subcommand> --listen 127.0.0.1:0 --data-dir <data_dir> <extra…>` and
    /// waits for the line announcing its address. It logs warnings and errors to the test's
    /// stderr.
    pub fn start(subcommand: &str, data_dir: &Path, extra: &[&str]) -> Service {
        Self::start_with(subcommand, data_dir, extra, |command| {
            command.env("CALLISTO__TELEMETRY__LOG_LEVEL", "warn").stderr(Stdio::inherit());
        })
    }

    /// [`Service::start`], with the command adjusted by `configure` (environment, stderr).
    pub fn start_with(
        subcommand: &str,
        data_dir: &Path,
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Service {
        // Services refuse to start without authentication; the data dir's dev key is it.
        api_key(data_dir);
        let mut command = Command::new(env!("CARGO_BIN_EXE_callisto"));
        command.args([subcommand, "--listen", "127.0.0.1:0", "--data-dir"]).arg(data_dir).args(extra);
        configure(&mut command);
        let mut child = command.stdout(Stdio::piped()).spawn().expect("callisto binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let base = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Service { child, base }
    }

    /// SIGTERM, and a clean exit.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "graceful stop exits 0, got {status}");
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}
