//! Blue/green rebuilds on a search server: `callisto dev` over the Kafka mock cluster with
//! Elasticsearch (an independent OpenSearch-compatible server, osmem-server, started here) as
//! its search index. A rebuild fills a new `…-00000N` index under its own consumer group while
//! reads keep answering; the switch moves the read alias; rollback moves it back; `--drop-old`
//! deletes the old index. A query API reading the same server from elsewhere follows every
//! switch without a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use callisto::backends::{ReadModelUse, open_configured_read_models};
use callisto::services::start_kafka_mock;
use callisto_core::readmodel::SearchRequest;
use serde_json::{Value, json};

mod common;
use common::{DevApp, dev_app, json_of, post_json, settings};

const PERSONS: usize = 20;

/// The indices the read alias names.
async fn alias_targets(url: &str, prefix: &str) -> Vec<String> {
    let answer: Value = reqwest::get(format!("{url}/_alias/{prefix}-persons")).await.unwrap().json().await.unwrap();
    answer.as_object().unwrap().keys().cloned().collect()
}

async fn index_exists(url: &str, index: &str) -> bool {
    reqwest::get(format!("{url}/{index}")).await.unwrap().status().is_success()
}

/// Runs a replay action through the dev server's admin API and waits for a rebuild to switch.
async fn replay(client: &reqwest::Client, base: &str, path: &str) -> Value {
    let answer = client.post(format!("{base}{path}")).json(&json!({})).send().await.unwrap();
    assert!(answer.status().is_success(), "{path}: {}", answer.text().await.unwrap());
    let answer: Value = answer.json().await.unwrap();
    if path != "/admin/v1/replay" {
        return answer["summary"].clone();
    }
    for _ in 0..600 {
        let status = json_of(client.get(format!("{base}/admin/v1/replay"))).await;
        if status["job"]["state"] == "switched" {
            return status["generations"].clone();
        }
        assert_ne!(status["job"]["state"], "failed", "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the rebuild never switched");
}

/// Everything the outside query API finds, once it has had time to follow a switch.
async fn outside_total(outside: &callisto::backends::ReadSide) -> usize {
    tokio::time::sleep(callisto::backends::GENERATION_POLL * 2).await;
    let everything =
        SearchRequest { query: String::new(), tag: None, status: None, limit: 1, offset: 0, search_after: None };
    outside.search.search(&everything).await.expect("the outside reader follows the live generation").total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilds_on_elasticsearch_move_the_read_alias_and_readers_follow() {
    let Some(peer) = common::peers::Osmem::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    let _cluster = start_kafka_mock(&mut settings, 1).unwrap();
    settings.elasticsearch.url = Some(peer.url.clone());
    let prefix = format!("bg-{}", uuid::Uuid::new_v4().simple());
    settings.elasticsearch.prefix = prefix.clone();
    let index = |n: u32| format!("{prefix}-persons-{n:06}");
    let DevApp { dev, base, client } = dev_app(&settings).await;

    for i in 0..PERSONS {
        let body = json!({"given_name": format!("Blue{i}"), "family_name": "Green", "tags": ["bg"]});
        post_json(&client, format!("{base}/v1/persons"), body).await;
    }
    // Each token covers its own partition: wait until every partition is in.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while json_of(client.get(format!("{base}/v1/search?q=green"))).await["total"] != PERSONS {
        assert!(std::time::Instant::now() < deadline, "the commands never reached search");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alias_targets(&peer.url, &prefix).await, [index(1)]);

    // A query API elsewhere (its own data dir) reading the same search server.
    let elsewhere = tempfile::tempdir().unwrap();
    let outside_settings = {
        let mut s = settings.clone();
        s.storage.data_dir = elsewhere.path().to_path_buf();
        s
    };
    let outside = open_configured_read_models(&outside_settings, ReadModelUse::Serving).await.unwrap();
    assert_eq!(outside_total(&outside).await, PERSONS);

    // Searches keep answering through every rebuild, switch, rollback and drop.
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (client, base, stop, reads, failed) =
            (client.clone(), base.clone(), stop.clone(), reads.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let answer = client.get(format!("{base}/v1/search?q=green&limit=5")).send().await;
                let whole = match answer {
                    Ok(r) if r.status() == 200 => r.json::<Value>().await.is_ok_and(|v| v["total"] == PERSONS),
                    _ => false,
                };
                if !whole {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Generation 1 is built in its own index, then takes the alias.
    let generations = replay(&client, &base, "/admin/v1/replay").await;
    assert_eq!((generations["live"].as_u64(), generations["previous"].as_u64()), (Some(1), Some(0)));
    assert_eq!(alias_targets(&peer.url, &prefix).await, [index(2)]);
    let dropped = replay(&client, &base, "/admin/v1/replay/drop-old").await;
    assert_eq!(dropped["previous"], Value::Null);
    assert!(!index_exists(&peer.url, &index(1)).await, "drop-old deletes the old index");
    // Generation 0's index is gone: the outside reader answers only if it moved to generation 1.
    assert_eq!(outside_total(&outside).await, PERSONS);

    // Generation 2, then a rollback to 1: the alias goes back; dropping 2 deletes its index.
    replay(&client, &base, "/admin/v1/replay").await;
    assert_eq!(alias_targets(&peer.url, &prefix).await, [index(3)]);
    let rolled = replay(&client, &base, "/admin/v1/replay/rollback").await;
    assert_eq!((rolled["live"].as_u64(), rolled["previous"].as_u64()), (Some(1), Some(2)));
    assert_eq!(alias_targets(&peer.url, &prefix).await, [index(2)]);
    replay(&client, &base, "/admin/v1/replay/drop-old").await;
    assert!(!index_exists(&peer.url, &index(3)).await);
    // Generation 2's index is gone: the outside reader followed the rollback back to 1.
    assert_eq!(outside_total(&outside).await, PERSONS);

    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    assert!(reads.load(Ordering::Relaxed) > 20, "{reads:?}");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "every search answered in full throughout");

    // New commands reach the live generation.
    let late =
        post_json(&client, format!("{base}/v1/persons"), json!({"given_name": "Late", "family_name": "Green"})).await;
    let token = late["consistency_token"].as_str().unwrap();
    let found = json_of(client.get(format!("{base}/v1/search?q=late&after={token}"))).await;
    assert_eq!(found["total"], 1, "{found}");
    dev.stop().await.unwrap();
}

/// `callisto projector` follows the generation pointer: once a rebuild elsewhere switches
/// readers, it drains and projects new events into the new live generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_moves_to_the_generation_a_rebuild_switched_to() {
    use callisto::replay::{GenerationRuntime, catch_up};
    use callisto_core::readmodel::elastic::{ElasticOptions, ElasticSearchIndex};
    use callisto_core::readmodel::generations::Generations;
    use callisto_core::readmodel::switch::{SwitchedReadStore, SwitchedSearchIndex};
    use callisto_core::readmodel::{Projection, SearchIndex};

    let Some(peer) = common::peers::Osmem::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    let _cluster = start_kafka_mock(&mut settings, 1).unwrap();
    settings.elasticsearch.url = Some(peer.url.clone());
    settings.elasticsearch.prefix = format!("follow-{}", uuid::Uuid::new_v4().simple());
    // The mock cluster lets a new member of a group in only once the last one's session has
    // ended, even after it left cleanly (a real broker does at once): keep sessions short.
    settings.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    settings.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
    let topic = settings.log.topic.clone();

    // One process's log side, shared by a writer and the projector under test.
    let side = callisto::backends::open_log(&settings).await.unwrap();
    let writer = callisto_writers::state(&settings, side.log.clone(), side.codec.clone(), side.keyring.clone(), None)
        .await
        .unwrap();
    let client = common::client(dir.path());
    let auth = callisto_core::auth::Auth::from_settings(&settings, false).await.unwrap();
    let app = callisto_writers::build(&settings, writer, &auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let tls = settings.http.tls.clone();
    tokio::spawn(async move { callisto_core::http::serve(listener, app, &tls, std::future::pending()).await });
    let register = |name: &str| {
        let (client, url, body) =
            (client.clone(), format!("{base}/v1/persons"), json!({"given_name": name, "family_name": "Moves"}));
        async move { post_json(&client, url, body).await }
    };
    let pointer = callisto::backends::generation_pointer(&settings).await.unwrap();
    let live = callisto::backends::open_generation(&settings, 0, ReadModelUse::Projecting).await.unwrap();
    let switches = (Arc::new(SwitchedReadStore::new(live.store)), Arc::new(SwitchedSearchIndex::new(live.search)));
    let stop = tokio_util::sync::CancellationToken::new();
    let projector = tokio::spawn(callisto::services::project_live_generation(
        settings.clone(),
        side.log.clone(),
        side.reader(),
        pointer.clone(),
        0,
        switches.clone(),
        stop.clone(),
    ));
    let search_for = |index: Arc<dyn SearchIndex>, q: &'static str| async move {
        let request =
            SearchRequest { query: q.into(), tag: None, status: None, limit: 10, offset: 0, search_after: None };
        index.search(&request).await.unwrap().total
    };
    let eventually = |what: &'static str, index: Arc<dyn SearchIndex>, q: &'static str, want: usize| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while search_for(index.clone(), q).await != want {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    for name in ["Ada", "Brian", "Cleo"] {
        register(name).await;
    }
    eventually("generation 0 is projected", switches.1.clone(), "moves", 3).await;

    // A rebuild elsewhere: generation 1 under its own group, level with 0, then the switch.
    let rebuilt = GenerationRuntime::start(&settings, side.log.clone(), side.reader(), 1, None).await.unwrap();
    let reference = (switches.0.clone() as Arc<dyn Projection>, switches.1.clone() as Arc<dyn Projection>);
    catch_up(side.log.as_ref(), &topic, &rebuilt, Some(&reference), &None, |_| {}).await.unwrap();
    rebuilt.stop().await;
    pointer.save(&Generations { live: 1, previous: Some(0), building: None }).await.unwrap();

    // The projector follows; what is written next lands in generation 1 only.
    let connect = |generation: u32| {
        let options = ElasticOptions {
            prefix: settings.elasticsearch.prefix.clone(),
            generation,
            ..ElasticOptions::new(peer.url.clone())
        };
        async move { ElasticSearchIndex::connect(&options).await.unwrap() as Arc<dyn SearchIndex> }
    };
    tokio::time::sleep(callisto::backends::GENERATION_POLL * 3).await;
    register("Late").await;
    eventually("the projector writes into generation 1", connect(1).await, "late", 1).await;
    assert_eq!(search_for(connect(0).await, "late").await, 0, "generation 0 no longer gets events");
    assert_eq!(search_for(switches.1.clone(), "moves").await, 4, "its readiness and compaction handles moved too");

    stop.cancel();
    projector.await.unwrap().unwrap();
}
