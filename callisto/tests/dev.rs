//! `callisto dev` end to end, in process: commands in, read models and search out, with
//! consistency tokens, restarts, replays, poison events and paging under writes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use callisto::services::Dev;
use callisto_core::config::Settings;
use callisto_core::log::AppendRequest;
use callisto_core::readmodel::embedded::EmbeddedReadStore;
use callisto_core::readmodel::search::TantivySearchIndex;
use callisto_core::readmodel::{ListFilter, PersonDoc, Projection, ReadStore, SearchIndex, SearchRequest};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

struct App {
    dev: Dev,
    base: String,
    client: reqwest::Client,
}

mod common;
use common::settings;

async fn start(settings: &Settings) -> App {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dev = Dev::start(settings, listener).await.unwrap();
    let base = format!("http://{}", dev.addr);
    App { dev, base, client: common::client(&settings.storage.data_dir) }
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl App {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>, token: Option<&str>) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(token) = token {
            request = request.header("callisto-consistency-token", token);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer { status, headers, body }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.call(reqwest::Method::GET, path, None, token).await
    }

    /// Sends a command and returns its answer, which must be 202.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let answer = self.call(method, path, body, None).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{path}: {}", answer.body);
        answer.body
    }

    async fn register(&self, given: &str, tags: &[&str]) -> (String, String) {
        let body = self
            .command(
                reqwest::Method::POST,
                "/v1/persons",
                Some(json!({"given_name": given, "family_name": "Test", "tags": tags})),
            )
            .await;
        (body["person_id"].as_str().unwrap().to_owned(), body["consistency_token"].as_str().unwrap().to_owned())
    }

    async fn note(&self, id: &str, text: &str) -> String {
        let body =
            self.command(reqwest::Method::POST, &format!("/v1/persons/{id}/notes"), Some(json!({"text": text}))).await;
        body["consistency_token"].as_str().unwrap().to_owned()
    }
}

fn assert_fresh(answer: &Answer) {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(answer.headers.get("callisto-stale").is_none(), "a token was honoured, not timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_become_documents_timelines_and_search_results() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(&settings(dir.path())).await;
    let (id, token) = app.register("Ada", &["vip"]).await;

    let person = app.get(&format!("/v1/persons/{id}"), Some(&token)).await;
    assert_fresh(&person);
    assert_eq!(person.body["given_name"], "Ada");
    assert_eq!(person.body["status"], "active");
    assert_eq!(person.body["tags"], json!(["vip"]));

    app.note(&id, "Explained the analytical engine to Babbage's guests.").await;
    let token = app.note(&id, "Her notes include the first published algorithm.").await;
    let found = app.get(&format!("/v1/search?q=engine&after={token}"), None).await;
    assert_fresh(&found);
    assert_eq!(found.body["total"], 1, "{}", found.body);
    let hit = &found.body["hits"][0];
    assert_eq!(hit["kind"], "note");
    assert_eq!(hit["person_id"], id.as_str());
    assert_eq!(hit["name"], "Ada Test");
    assert!(hit["highlights"]["text"].as_str().unwrap().contains("<b>engine</b>"), "{hit}");
    assert!(hit["score"].as_f64().unwrap() > 0.0);
    assert_eq!(found.body["facets"]["status"]["active"], 1);
    assert_eq!(found.body["facets"]["tags"]["vip"], 1);

    let phrase = app.get("/v1/search?q=%22published%20algorithm%22", None).await;
    assert_eq!(phrase.body["total"], 1);
    let prefix = app.get("/v1/search?q=algor*", None).await;
    assert_eq!(prefix.body["total"], 1, "{}", prefix.body);
    let boolean = app.get("/v1/search?q=engine%20OR%20algorithm", None).await;
    assert_eq!(boolean.body["total"], 2);
    let negated = app.get("/v1/search?q=text:engine%20AND%20NOT%20babbage", None).await;
    assert_eq!(negated.body["total"], 0, "{}", negated.body);
    let by_name = app.get("/v1/search?q=name:ada", None).await;
    assert_eq!(by_name.body["hits"][0]["kind"], "person");

    let archived = app
        .command(reqwest::Method::POST, &format!("/v1/persons/{id}/archive"), Some(json!({"reason": "moved"})))
        .await;
    let token = archived["consistency_token"].as_str().unwrap();
    let person = app.get(&format!("/v1/persons/{id}?after={token}"), None).await;
    assert_fresh(&person);
    assert_eq!(person.body["status"], "archived");
    assert_eq!(person.body["note_count"], 2);
    let facets = app.get(&format!("/v1/search?q=&after={token}"), None).await;
    assert_fresh(&facets);
    assert_eq!(facets.body["facets"]["status"], json!({"archived": 3}), "person and both notes: {}", facets.body);
    let archived_list = app.get("/v1/persons?status=archived", None).await;
    assert_eq!(archived_list.body["items"][0]["person_id"], id.as_str());
    let active_list = app.get("/v1/persons?status=active", None).await;
    assert_eq!(active_list.body["items"], json!([]));

    let timeline = app.get(&format!("/v1/persons/{id}/timeline"), None).await;
    let types: Vec<&str> =
        timeline.body["items"].as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["PersonRegistered", "NoteAdded", "NoteAdded", "PersonArchived"]);
    assert_eq!(timeline.body["next_cursor"], Value::Null);

    let missing = app.get(&format!("/v1/persons/{}", Uuid::new_v4()), None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.headers["content-type"], "application/problem+json");
    app.dev.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreached_token_times_out_and_says_the_answer_may_be_stale() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.query.consistency_wait_ms = 200;
    let app = start(&settings).await;
    let (id, _) = app.register("Grace", &[]).await;
    let started = std::time::Instant::now();
    let answer = app.get(&format!("/v1/persons/{id}"), Some("0:999999")).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(answer.headers["callisto-stale"], "true");
    let search = app.get("/v1/search?q=grace&after=0:999999", None).await;
    assert_eq!(search.headers["callisto-stale"], "true");
    app.dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_survive_a_restart_without_applying_anything_twice() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let app = start(&settings).await;
    let (id, _) = app.register("Hedy", &["inventor"]).await;
    app.note(&id, "frequency hopping").await;
    let token = app.note(&id, "torpedo guidance").await;
    assert_fresh(&app.get(&format!("/v1/persons/{id}"), Some(&token)).await);
    app.dev.stop().await.unwrap();

    let app = start(&settings).await;
    let person = app.get(&format!("/v1/persons/{id}"), None).await;
    assert_eq!(person.body["note_count"], 2);
    let token = app.note(&id, "film career").await;
    let person = app.get(&format!("/v1/persons/{id}"), Some(&token)).await;
    assert_fresh(&person);
    assert_eq!(person.body["note_count"], 3, "old events were not re-applied on restart");
    let timeline = app.get(&format!("/v1/persons/{id}/timeline"), None).await;
    assert_eq!(timeline.body["items"].as_array().unwrap().len(), 4);
    let search = app.get(&format!("/v1/search?q=torpedo%20OR%20hopping%20OR%20film&after={token}"), None).await;
    assert_eq!(search.body["total"], 3, "{}", search.body);
    app.dev.stop().await.unwrap();
}

async fn wait_for_checkpoints(projection: &dyn Projection, ends: &[u64]) {
    let mut progress = projection.progress();
    let reached = |cp: &BTreeMap<u32, u64>| {
        ends.iter().enumerate().all(|(p, end)| *end == 0 || cp.get(&(p as u32)).is_some_and(|o| o + 1 >= *end))
    };
    tokio::time::timeout(Duration::from_secs(30), progress.wait_for(reached)).await.unwrap().unwrap();
}

async fn all_persons(store: &dyn ReadStore) -> Vec<PersonDoc> {
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list(&ListFilter::default(), 100, cursor).await.unwrap();
        all.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(Uuid::parse_str(&next).unwrap()),
            None => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_log_from_zero_rebuilds_identical_read_models() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(&settings(dir.path())).await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let (id, _) = app.register(&format!("Person{i}"), &["alpha"]).await;
        app.note(&id, &format!("note number {i} about widgets")).await;
        if i % 2 == 0 {
            app.command(reqwest::Method::POST, &format!("/v1/persons/{id}/tags"), Some(json!({"tag": "beta"}))).await;
        }
        if i % 3 == 0 {
            app.command(reqwest::Method::DELETE, &format!("/v1/persons/{id}/tags/alpha"), None).await;
            app.command(
                reqwest::Method::PUT,
                &format!("/v1/persons/{id}/name"),
                Some(json!({"given_name": "Re", "family_name": "Named"})),
            )
            .await;
        }
        if i % 4 == 0 {
            app.command(reqwest::Method::POST, &format!("/v1/persons/{id}/archive"), None).await;
        }
        ids.push(id);
    }
    let log = app.dev.log.clone();
    // The same keyring as the dev server: the events are sealed with its keys.
    let reader = Arc::new(callisto_core::privacy::EventReader::new(app.dev.codec.clone(), app.dev.keyring.clone()));
    let ends = log.end_offsets("persons").await.unwrap();
    wait_for_checkpoints(app.dev.store.as_ref(), &ends).await;
    wait_for_checkpoints(app.dev.search.as_ref(), &ends).await;

    // Fresh, empty stores fed from offset 0 by a second projector over the same log.
    let fresh = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedReadStore::open(&fresh.path().join("readmodel.redb")).unwrap());
    let search = Arc::new(TantivySearchIndex::open(&fresh.path().join("search")).unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let projections: Vec<Arc<dyn Projection>> = vec![store.clone(), search.clone()];
    let projector = callisto_projectors::Projector::new(
        log.clone(),
        reader,
        projections,
        callisto_projectors::ProjectorSettings::new("persons"),
    )
    .start(shutdown.clone())
    .await
    .unwrap();
    wait_for_checkpoints(store.as_ref(), &ends).await;
    wait_for_checkpoints(search.as_ref(), &ends).await;
    shutdown.cancel();
    projector.await.unwrap();

    let live = all_persons(app.dev.store.as_ref()).await;
    assert_eq!(live.len(), 12);
    assert_eq!(all_persons(store.as_ref()).await, live, "documents equal");
    for id in &ids {
        let id = Uuid::parse_str(id).unwrap();
        assert_eq!(store.timeline(id, 100, None).await.unwrap(), app.dev.store.timeline(id, 100, None).await.unwrap());
    }
    for query in ["", "widgets", "name:re", "tag:beta"] {
        let request =
            SearchRequest { query: query.into(), tag: None, status: None, limit: 100, offset: 0, search_after: None };
        let (a, b) = (app.dev.search.search(&request).await.unwrap(), search.search(&request).await.unwrap());
        assert_eq!((a.total, &a.facets), (b.total, &b.facets), "search for {query:?}");
        let docs = |r: &callisto_core::readmodel::SearchResults| {
            let mut v: Vec<_> = r.hits.iter().map(|h| (h.person_id, h.note_id)).collect();
            v.sort();
            v
        };
        assert_eq!(docs(&a), docs(&b));
    }
    app.dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_and_its_partition_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(&settings(dir.path())).await;
    let (id, _) = app.register("Poison", &[]).await;
    let corrupt = vec![0u8, 0, 0, 0, 42, 0xde, 0xad, 0xbe, 0xef];
    let at = app
        .dev
        .log
        .append(AppendRequest {
            topic: "persons".into(),
            key: id.as_bytes().to_vec(),
            payload: corrupt.clone(),
            headers: vec![("event_type".into(), b"NoteAdded".to_vec())],
            idempotency: None,
        })
        .await
        .unwrap();
    let token = app.note(&id, "written after the poison").await;
    let person = app.get(&format!("/v1/persons/{id}"), Some(&token)).await;
    assert_fresh(&person);
    assert_eq!(person.body["note_count"], 1, "the later event of the same partition was applied");
    let search = app.get(&format!("/v1/search?q=poison&after={token}"), None).await;
    assert_fresh(&search);
    assert_eq!(search.body["total"], 2, "{}", search.body);

    let letters = app.dev.log.read("persons.dlq", at.partition, 0, 10, Duration::from_secs(5)).await.unwrap();
    let projections: HashSet<&[u8]> = letters.iter().map(|l| l.header("dlq.projection").unwrap()).collect();
    assert_eq!(projections, HashSet::from([&b"documents"[..], &b"search"[..]]), "each projection dead-letters it once");
    for letter in &letters {
        assert_eq!(letter.payload, corrupt, "original bytes kept");
        assert_eq!(letter.key, id.as_bytes());
        assert_eq!(letter.header("event_type"), Some(&b"NoteAdded"[..]), "original headers kept");
        assert_eq!(letter.header("dlq.source.offset").unwrap(), at.offset.to_string().as_bytes());
        assert!(String::from_utf8_lossy(letter.header("dlq.error").unwrap()).contains("decode"));
    }
    app.dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_under_concurrent_writes_never_skips_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(&settings(dir.path())).await;
    let mut before = HashSet::new();
    for i in 0..40 {
        let (id, token) = app.register(&format!("Early{i}"), &["paged"]).await;
        // Each early registration is visible before paging starts: read it with its own token.
        assert_fresh(&app.get(&format!("/v1/persons/{id}"), Some(&token)).await);
        before.insert(id);
    }
    let writer = {
        let (client, base) = (app.client.clone(), app.base.clone());
        tokio::spawn(async move {
            for i in 0..40 {
                let body = json!({"given_name": format!("Late{i}"), "family_name": "Test", "tags": ["paged"]});
                client.post(format!("{base}/v1/persons")).json(&body).send().await.unwrap();
            }
        })
    };
    for filter in ["", "tag=paged&"] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/persons?{filter}limit=7&cursor={c}"),
                None => format!("/v1/persons?{filter}limit=7"),
            };
            let page = app.get(&path, None).await;
            assert_eq!(page.status, StatusCode::OK, "{}", page.body);
            let items = page.body["items"].as_array().unwrap();
            assert!(items.len() <= 7);
            seen.extend(items.iter().map(|p| p["person_id"].as_str().unwrap().to_owned()));
            match page.body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let unique: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "a page repeated a person");
        assert!(before.is_subset(&unique), "a person that existed throughout was skipped");
    }
    writer.await.unwrap();
    app.dev.stop().await.unwrap();
}

#[tokio::test]
async fn bad_query_parameters_get_400_problems() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(&settings(dir.path())).await;
    let (id, _) = app.register("Params", &[]).await;
    let long_q = "a".repeat(1001);
    let cases = [
        ("/v1/persons?limit=0".to_owned(), "limit"),
        ("/v1/persons?limit=101".to_owned(), "limit"),
        ("/v1/persons?limit=ten".to_owned(), "limit"),
        ("/v1/persons?status=deleted".to_owned(), "status"),
        ("/v1/persons?tag=has%20space".to_owned(), "tag"),
        ("/v1/persons?cursor=not-a-cursor".to_owned(), "cursor"),
        ("/v1/persons?after=banana".to_owned(), "after"),
        ("/v1/persons?after=99:1".to_owned(), "after"),
        (format!("/v1/persons/{id}?after=1:x"), "after"),
        ("/v1/persons/not-a-uuid".to_owned(), "id"),
        (format!("/v1/persons/{id}/timeline?limit=-1"), "limit"),
        (format!("/v1/persons/{id}/timeline?cursor=abc"), "cursor"),
        ("/v1/persons/nope/timeline".to_owned(), "id"),
        ("/v1/search?q=text:(unclosed".to_owned(), "q"),
        (format!("/v1/search?q={long_q}"), "q"),
        ("/v1/search?q=a&status=gone".to_owned(), "status"),
        ("/v1/search?q=a&tag=-x".to_owned(), "tag"),
        ("/v1/search?q=a&limit=1000".to_owned(), "limit"),
        ("/v1/search?q=a&cursor=xyz".to_owned(), "cursor"),
        ("/v1/search?q=a&cursor=20000".to_owned(), "cursor"),
        ("/v1/search?q=a&after=-1:0".to_owned(), "after"),
    ];
    for (path, field) in cases {
        let answer = app.get(&path, None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path}: {}", answer.body);
        assert_eq!(answer.headers["content-type"], "application/problem+json", "{path}");
        let fields: Vec<&str> =
            answer.body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
        assert!(fields.contains(&field), "{path}: expected {field} in {}", answer.body);
    }
    for path in ["/v1/persons?bogus=1", "/v1/search?q=a&sort=desc"] {
        let answer = app.get(path, None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path}: {}", answer.body);
        assert_eq!(answer.headers["content-type"], "application/problem+json");
    }
    let bad_header = app.get(&format!("/v1/persons/{id}"), Some("three")).await;
    assert_eq!(bad_header.status, StatusCode::BAD_REQUEST);
    // A header token and an `after` token are both waited for: each names a write to see.
    let (first, first_token) = app.register("First", &[]).await;
    let (_, second_token) = app.register("Second", &[]).await;
    let both = app.get(&format!("/v1/persons/{first}?after={second_token}"), Some(&first_token)).await;
    assert_eq!(both.status, StatusCode::OK, "{}", both.body);
    assert!(!both.headers.contains_key("callisto-stale"), "both writes were reached");
    let doc = app.get("/openapi.json", None).await;
    for path in ["/v1/persons", "/v1/persons/{id}", "/v1/persons/{id}/timeline", "/v1/search", "/v1/persons/{id}/notes"]
    {
        assert!(doc.body["paths"][path].is_object(), "openapi lacks {path}");
    }
    let metrics = app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    for name in ["callisto_query_seconds_bucket", "callisto_projected_events_total", "callisto_commands_total"] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    app.dev.stop().await.unwrap();
}
