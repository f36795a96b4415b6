//! `callisto dev --kafka-mock 3`: the whole backbone with Kafka as the event log, on
//! librdkafka's in-process mock cluster. Commands go through the Kafka producer, projectors
//! read the partitions back, and reads with the token see the change.

use callisto::services::start_kafka_mock;
use reqwest::StatusCode;
use serde_json::{Value, json};

mod common;
use common::{DevApp, dev_app, post_json, settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_flow_through_kafka_into_read_models_and_search() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    let _cluster = start_kafka_mock(&mut settings, 3).unwrap();
    let DevApp { dev, base, client } = dev_app(&settings).await;

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

    // A retry with the same Idempotency-Key gets the first answer back and appends nothing.
    let keyed = |body: Value| client.post(format!("{base}/v1/persons")).header("idempotency-key", "k-1").json(&body);
    let first = keyed(json!({"given_name": "A", "family_name": "B"})).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let ends_before = dev.log.end_offsets(&settings.log.topic).await.unwrap();
    let again = keyed(json!({"given_name": "A", "family_name": "B"})).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!((&again["person_id"], &again["offset"]), (&first["person_id"], &first["offset"]));
    assert_eq!(dev.log.end_offsets(&settings.log.topic).await.unwrap(), ends_before, "a replay appended");
    // The same key with another request is refused.
    let other = keyed(json!({"given_name": "Other", "family_name": "B"})).send().await.unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    dev.stop().await.unwrap();
}

/// Faults during a steady command load: Produce and Fetch request errors, partition leaders
/// moved, a broker down and back up. Afterwards every command answered 202 is in the read
/// model exactly once, and every other answer was a prompt 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_lose_nothing_and_duplicate_nothing() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.kafka.message_timeout_ms = 4_000;
    settings.kafka.request_timeout_ms = 3_000;
    settings.log.append_timeout_ms = 5_000;
    settings.query.consistency_wait_ms = 15_000;
    let cluster = start_kafka_mock(&mut settings, 3).unwrap();
    let DevApp { dev, base, client } = dev_app(&settings).await;
    let mut people = Vec::new();
    for i in 0..8 {
        let person = post_json(
            &client,
            format!("{base}/v1/persons"),
            json!({"given_name": format!("F{i}"), "family_name": "Ault"}),
        )
        .await;
        people.push(person["person_id"].as_str().unwrap().to_owned());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (client, base, people, stop) = (client.clone(), base.clone(), people.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut accepted, mut refused, mut slowest) = (Vec::new(), 0u32, Duration::ZERO);
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    let id = &people[n % people.len()];
                    let started = Instant::now();
                    let response = client
                        .post(format!("{base}/v1/persons/{id}/notes"))
                        .json(&json!({"text": format!("n{n}")}))
                        .send()
                        .await
                        .unwrap();
                    slowest = slowest.max(started.elapsed());
                    match response.status().as_u16() {
                        202 => {
                            let body: Value = response.json().await.unwrap();
                            accepted.push((id.clone(), body["event_id"].as_str().unwrap().to_owned()));
                        }
                        503 => {
                            assert_eq!(response.headers()["content-type"], "application/problem+json");
                            refused += 1;
                        }
                        other => panic!("unexpected status {other}"),
                    }
                    n += 4;
                }
                (accepted, refused, slowest)
            })
        })
        .collect();

    let topic = settings.log.topic.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    use RDKafkaRespErr::*;
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION, RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for partition in 0..settings.log.partitions as i32 {
        cluster.partition_leader(&topic, partition, Some(2)).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    cluster.broker_up(1).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The broker leading every partition goes away for longer than the producer may try:
    // commands must fail with 503 within the append timeout, not hang.
    cluster.broker_down(2).unwrap();
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    cluster.broker_up(2).unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut accepted, mut refused, mut slowest) = (Vec::new(), 0, Duration::ZERO);
    for task in load {
        let (a, r, s) = task.await.unwrap();
        accepted.extend(a);
        refused += r;
        slowest = slowest.max(s);
    }
    eprintln!("faults under load: {} accepted, {refused} refused with 503, slowest answer {slowest:?}", accepted.len());
    assert!(accepted.len() > 20, "the load ran ({} accepted, {refused} refused)", accepted.len());
    assert!(refused > 0, "the leader outage refused commands");
    assert!(slowest < Duration::from_secs(8), "no command hung: slowest {slowest:?}");

    // The writer recovers by itself (the breaker probes again); then one more note per person,
    // read back with its token, shows each partition has caught up.
    for id in &people {
        let recovered_by = Instant::now() + Duration::from_secs(60);
        let note = loop {
            let response = client
                .post(format!("{base}/v1/persons/{id}/notes"))
                .json(&json!({"text": "final"}))
                .send()
                .await
                .unwrap();
            if response.status() == 202 {
                break response.json::<Value>().await.unwrap();
            }
            assert!(Instant::now() < recovered_by, "the writer did not recover");
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let token = note["consistency_token"].as_str().unwrap();
        let read = client.get(format!("{base}/v1/persons/{id}?after={token}")).send().await.unwrap();
        assert!(read.headers().get("callisto-stale").is_none(), "projection caught up for {id}");
        accepted.push((id.clone(), note["event_id"].as_str().unwrap().to_owned()));
    }
    let mut by_person: HashMap<String, Vec<String>> = HashMap::new();
    for (id, event) in accepted {
        by_person.entry(id).or_default().push(event);
    }
    for (id, events) in by_person {
        let mut seen: Vec<String> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_query = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
            let url = format!("{base}/v1/persons/{id}/timeline?limit=100{page_query}");
            let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            seen.extend(page["items"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()));
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{id}: an event was applied twice");
        for event in &events {
            assert!(unique.contains(event), "{id}: acknowledged event {event} is missing");
        }
        let doc: Value = client.get(format!("{base}/v1/persons/{id}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(doc["note_count"].as_u64().unwrap() as usize, seen.len() - 1, "{id}: note count = notes in the log");
    }
    dev.stop().await.unwrap();
}

/// Over Kafka, no record on the topic (payload, key or headers) ever holds a personal field in
/// clear, and erasure through the API works end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_bytes_never_hold_personal_data_and_erasure_works_over_kafka() {
    use callisto_core::log::{EventLog, KafkaLog, KafkaLogOptions};
    const SECRETS: [&str; 4] = ["Wilhelmina", "Vandersloot", "wvs@kafka-probe.example", "stroopwafel confessions"];
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    let _cluster = start_kafka_mock(&mut settings, 3).unwrap();
    let DevApp { dev, base, client } = dev_app(&settings).await;
    let person = post_json(
        &client,
        format!("{base}/v1/persons"),
        json!({"given_name": SECRETS[0], "family_name": SECRETS[1], "email": SECRETS[2]}),
    )
    .await;
    let id = person["person_id"].as_str().unwrap().to_owned();
    let note = post_json(&client, format!("{base}/v1/persons/{id}/notes"), json!({"text": SECRETS[3]})).await;
    let token = note["consistency_token"].as_str().unwrap();
    let read =
        client.get(format!("{base}/v1/persons/{id}")).header("callisto-consistency-token", token).send().await.unwrap();
    assert_eq!(read.json::<Value>().await.unwrap()["given_name"], SECRETS[0], "projectors open what writers sealed");

    let raw = KafkaLog::new(KafkaLogOptions::new(settings.kafka.brokers.clone().unwrap())).unwrap();
    let raw_bytes = || async {
        let mut all = Vec::new();
        for topic in ["persons", "persons.dlq"] {
            for (partition, end) in raw.end_offsets(topic).await.unwrap().into_iter().enumerate() {
                for record in
                    raw.read(topic, partition as u32, 0, end as usize, std::time::Duration::ZERO).await.unwrap()
                {
                    all.extend(record.payload);
                    all.extend(record.key);
                    record.headers.into_iter().for_each(|(name, value)| {
                        all.extend(name.into_bytes());
                        all.extend(value);
                    });
                }
            }
        }
        all
    };
    let bytes = raw_bytes().await;
    assert!(bytes.windows(id.len()).any(|w| w == id.as_bytes()), "the probe reads the person's records");
    for secret in SECRETS {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret:?} is on the topic in clear");
    }

    let erased = client.delete(format!("{base}/v1/persons/{id}")).send().await.unwrap();
    assert_eq!(erased.status(), StatusCode::ACCEPTED);
    let token = erased.json::<Value>().await.unwrap()["consistency_token"].as_str().unwrap().to_owned();
    let gone = client
        .get(format!("{base}/v1/persons/{id}"))
        .header("callisto-consistency-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::GONE);
    let found: Value =
        client.get(format!("{base}/v1/search?q=stroopwafel&after={token}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(found["total"], 0, "{found}");
    let bytes = raw_bytes().await;
    for secret in SECRETS {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret:?} on the topic after erasure");
    }
    dev.stop().await.unwrap();
}
