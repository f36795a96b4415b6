//! What the Elasticsearch adapter sends and how it reads answers, without a server: the exact
//! NDJSON of a bulk request, the search body built from a query API request, and answers copied
//! from Elasticsearch's documentation (a partial bulk failure, version conflicts, 429s, a
//! search with highlights and aggregations).

use callisto_core::readmodel::elastic::{ElasticOptions, IndexAction, body};
use callisto_core::readmodel::{HitKind, SearchRequest, Status, StoreError};
use serde_json::json;
use uuid::Uuid;

#[test]
fn bulk_bodies_are_ndjson_with_external_versions() {
    let actions = vec![
        IndexAction {
            id: "person:p1".into(),
            version: 14,
            source: Some(json!({"kind": "person", "name": "Ada Lovelace"})),
        },
        IndexAction { id: "note:n1".into(), version: 11, source: Some(json!({"kind": "note", "text": "engine"})) },
    ];
    let ndjson = body::ndjson(&body::bulk_lines("callisto-persons", &actions));
    let expected = concat!(
        r#"{"index":{"_index":"callisto-persons","_id":"person:p1","version":14,"version_type":"external"}}"#,
        "\n",
        r#"{"kind":"person","name":"Ada Lovelace"}"#,
        "\n",
        r#"{"index":{"_index":"callisto-persons","_id":"note:n1","version":11,"version_type":"external"}}"#,
        "\n",
        r#"{"kind":"note","text":"engine"}"#,
        "\n",
    );
    assert_eq!(ndjson, expected);
}

#[test]
fn bulks_are_split_by_count_and_by_bytes() {
    let action = |n: usize, bytes: usize| IndexAction {
        id: format!("person:{n}"),
        version: n as u64,
        source: Some(json!({"text": "x".repeat(bytes)})),
    };
    let by_count = body::chunks((0..25).map(|n| action(n, 10)).collect(), 10, usize::MAX);
    assert_eq!(by_count.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10, 5]);
    let by_bytes = body::chunks((0..6).map(|n| action(n, 1000)).collect(), 1000, 2500);
    assert_eq!(by_bytes.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 2]);
    let huge = body::chunks(vec![action(0, 10_000), action(1, 10)], 1000, 2500);
    assert_eq!(huge.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1], "an oversized document goes alone");
}

#[test]
fn bulk_items_are_checked_one_by_one() {
    // Shapes from the bulk API reference: successes, a version conflict, a rejected execution
    // (429), a shard failure (503) and a mapping error (400) in one answer with errors: true.
    let answer = json!({
        "took": 486,
        "errors": true,
        "items": [
            {"index": {"_index": "callisto-persons-000001", "_id": "person:1", "_version": 14, "result": "created",
                       "_shards": {"total": 2, "successful": 1, "failed": 0}, "_seq_no": 0, "_primary_term": 1, "status": 201}},
            {"index": {"_index": "callisto-persons-000001", "_id": "person:2", "status": 409,
                       "error": {"type": "version_conflict_engine_exception",
                                 "reason": "[person:2]: version conflict, current version [20] is higher or equal to the one provided [12]",
                                 "index_uuid": "aAsFqTI0Tc2W0LCWgPNrOA", "shard": "0", "index": "callisto-persons-000001"}}},
            {"index": {"_index": "callisto-persons-000001", "_id": "note:3", "status": 429,
                       "error": {"type": "es_rejected_execution_exception",
                                 "reason": "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, replica_bytes=0, all_bytes=0, coordinating_operation_bytes=104857600, max_coordinating_and_primary_bytes=107374182]"}}},
            {"index": {"_index": "callisto-persons-000001", "_id": "note:4", "status": 503,
                       "error": {"type": "unavailable_shards_exception", "reason": "[callisto-persons-000001][0] primary shard is not active"}}},
            {"index": {"_index": "callisto-persons-000001", "_id": "person:5", "_version": 3, "result": "updated", "status": 200}}
        ]
    });
    let outcome = body::bulk_outcome(&answer).unwrap();
    assert_eq!(outcome.written, 2);
    assert_eq!(outcome.stale, 1, "409 means Elasticsearch already holds this version or newer");
    assert_eq!(outcome.retry, vec![2, 3], "429 and 5xx are sent again");
    assert!(outcome.rejected.is_empty());

    let mapping = json!({"errors": true, "items": [
        {"index": {"_index": "callisto-persons-000001", "_id": "person:6", "status": 400,
                   "error": {"type": "document_parsing_exception",
                             "reason": "[1:42] failed to parse field [updated_at] of type [date] in document with id 'person:6'",
                             "caused_by": {"type": "illegal_argument_exception", "reason": "failed to parse date field [yesterday]"}}}}
    ]});
    let outcome = body::bulk_outcome(&mapping).unwrap();
    assert_eq!(outcome.rejected.len(), 1);
    assert!(outcome.rejected[0].1.starts_with("document_parsing_exception: [1:42] failed to parse field [updated_at]"));

    // A 200 answer without items is not a success.
    assert!(matches!(body::bulk_outcome(&json!({"took": 1})), Err(StoreError::Unavailable(_))));
}

#[test]
fn search_requests_map_to_query_string_filters_highlights_and_aggregations() {
    let request = SearchRequest {
        query: "engine AND name:ada*".into(),
        tag: Some("vip".into()),
        status: Some(Status::Archived),
        limit: 20,
        offset: 40,
        search_after: None,
    };
    let built = body::search_body(&request);
    assert_eq!(built["from"], 40, "without a sort key, the first pages go by offset");
    assert_eq!(built["sort"], json!([{"_score": "desc"}, {"doc_key": "asc"}]));
    assert_eq!(built["size"], 20);
    assert_eq!(built["track_total_hits"], true);
    assert_eq!(
        built["query"],
        json!({"bool": {
            "must": [{"query_string": {"query": "engine AND name:ada*", "fields": ["name^2", "email", "address", "tag", "text"], "default_operator": "OR"}}],
            "filter": [{"term": {"tags": "vip"}}, {"term": {"status": "archived"}}]
        }})
    );
    assert_eq!(built["aggs"]["tags"], json!({"terms": {"field": "tags", "size": 100}}));
    assert_eq!(built["aggs"]["status"], json!({"terms": {"field": "status", "size": 10}}));
    assert_eq!(built["highlight"]["pre_tags"], json!(["<b>"]));
    let everything = body::search_body(&SearchRequest {
        query: " ".into(),
        tag: None,
        status: None,
        limit: 10,
        offset: 0,
        search_after: None,
    });
    assert_eq!(everything["query"], json!({"bool": {"must": [{"match_all": {}}], "filter": []}}));
    let next = SearchRequest { search_after: Some(vec![json!(1.25), json!("note:n1")]), offset: 60_000, ..request };
    let built = body::search_body(&next);
    assert_eq!(built["search_after"], json!([1.25, "note:n1"]));
    assert!(built.get("from").is_none(), "search_after pages have no depth limit");
}

#[test]
fn search_answers_become_hits_and_facets() {
    let (person, note) = (Uuid::new_v4(), Uuid::new_v4());
    let answer = json!({
        "took": 5, "timed_out": false,
        "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
        "hits": {
            "total": {"value": 2, "relation": "eq"},
            "max_score": 1.3862942,
            "hits": [
                {"_index": "callisto-persons-000001", "_id": format!("note:{note}"), "_score": 1.3862942,
                 "_source": {"kind": "note", "person_id": person.to_string(), "note_id": note.to_string(), "name": "Ada Lovelace", "text": "the analytical engine"},
                 "highlight": {"text": ["the analytical <b>engine</b>"]}, "sort": [1.3862942, format!("note:{note}")]},
                {"_index": "callisto-persons-000001", "_id": format!("person:{person}"), "_score": 0.2876821,
                 "_source": {"kind": "person", "person_id": person.to_string(), "name": "Ada Lovelace"},
                 "highlight": {"name": ["<b>Ada</b> Lovelace"], "tag": ["<b>engine</b>", "<b>engine</b>ering"]},
                 "sort": [0.2876821, format!("person:{person}")]}
            ]
        },
        "aggregations": {
            "tags": {"doc_count_error_upper_bound": 0, "sum_other_doc_count": 0, "buckets": [{"key": "vip", "doc_count": 2}]},
            "status": {"doc_count_error_upper_bound": 0, "sum_other_doc_count": 0, "buckets": [{"key": "active", "doc_count": 2}]}
        }
    });
    let results = body::search_results(&answer).unwrap();
    assert_eq!(results.total, 2);
    assert_eq!(results.hits[0].kind, HitKind::Note);
    assert_eq!(results.hits[0].note_id, Some(note));
    assert_eq!(results.hits[0].text.as_deref(), Some("the analytical engine"));
    assert_eq!(results.hits[0].highlights["text"], "the analytical <b>engine</b>");
    assert_eq!(results.hits[1].kind, HitKind::Person);
    assert_eq!((results.hits[1].note_id.is_none(), results.hits[1].text.is_none()), (true, true));
    assert_eq!(results.hits[1].highlights["tag"], "<b>engine</b> … <b>engine</b>ering");
    assert!((results.hits[0].score - 1.386_294_2).abs() < 1e-6);
    assert_eq!(results.facets.tags["vip"], 2);
    assert_eq!(results.facets.status["active"], 2);
    assert_eq!(
        results.last_sort,
        Some(vec![json!(0.2876821), json!(format!("person:{person}"))]),
        "the next page starts after it"
    );
}

#[test]
fn request_failures_are_classified() {
    // A query that does not parse is the caller's error; an overloaded cluster is an outage.
    let bad_query = json!({"error": {"root_cause": [{"type": "query_shard_exception", "reason": "Failed to parse query [name:(]"}],
                                     "type": "search_phase_execution_exception", "reason": "all shards failed"}, "status": 400});
    assert!(matches!(body::request_error(400, &bad_query), StoreError::InvalidRequest(_)));
    let overloaded =
        json!({"error": {"type": "es_rejected_execution_exception", "reason": "rejected execution"}, "status": 429});
    assert!(matches!(body::request_error(429, &overloaded), StoreError::Unavailable(_)));
    assert!(matches!(body::request_error(503, &json!({})), StoreError::Unavailable(_)));
}

#[test]
fn the_template_maps_every_field_explicitly() {
    let template = body::index_template(&ElasticOptions::new("http://localhost:9200"));
    assert_eq!(template["index_patterns"], json!(["callisto-persons-*"]));
    let mappings = &template["template"]["mappings"];
    assert_eq!(mappings["dynamic"], "strict");
    assert_eq!(mappings["properties"]["name"]["analyzer"], "folding");
    assert_eq!(mappings["properties"]["name"]["fields"]["keyword"]["type"], "keyword");
    assert_eq!(mappings["properties"]["tags"]["type"], "keyword");
    let folding = &template["template"]["settings"]["analysis"]["analyzer"]["folding"];
    assert_eq!(folding["filter"], json!(["lowercase", "asciifolding"]));
    // Every field a document carries is mapped (dynamic: strict would reject it otherwise).
    let person = callisto_core::readmodel::PersonDoc {
        person_id: Uuid::new_v4(),
        given_name: "Zoë".into(),
        family_name: "Ada".into(),
        email: Some("z@example.org".into()),
        phone: None,
        date_of_birth: None,
        address: None,
        tags: vec!["vip".into()],
        status: Status::Active,
        archive_reason: None,
        note_count: 1,
        created_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
        version: callisto_core::readmodel::Version { partition: 0, offset: 3 },
    };
    for source in [body::person_source(&person), body::note_source(&person, Uuid::new_v4(), "text")] {
        for field in source.as_object().unwrap().keys() {
            assert!(mappings["properties"][field].is_object(), "{field} is not mapped");
        }
    }
}

/// A stand-in for the few Elasticsearch endpoints the adapter calls, recording each request.
mod fake {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::{Request, State};
    use axum::http::{Method, StatusCode};
    use axum::response::{IntoResponse, Response};
    use serde_json::{Value, json};

    #[derive(Debug, Clone)]
    pub struct Seen {
        pub method: Method,
        pub path: String,
        pub query: String,
        pub content_type: String,
        pub body: String,
    }

    #[derive(Default)]
    pub struct Fake {
        pub seen: Mutex<Vec<Seen>>,
        /// Bulk requests answered so far; the first gets a 429 for its last item.
        pub bulks: Mutex<usize>,
        /// Searches answer 503, as a cluster without a primary shard does.
        pub searches_fail: std::sync::atomic::AtomicBool,
    }

    async fn handle(State(fake): State<Arc<Fake>>, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        let seen = Seen {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        fake.seen.lock().unwrap().push(seen.clone());
        let path = seen.path.as_str();
        let answer = |status: StatusCode, body: Value| (status, axum::Json(body)).into_response();
        match (&parts.method, path) {
            (&Method::HEAD, _) => StatusCode::NOT_FOUND.into_response(),
            (&Method::PUT, p) if p.contains("/_doc/") => answer(StatusCode::CREATED, json!({"result": "created"})),
            (&Method::PUT, _) => answer(StatusCode::OK, json!({"acknowledged": true})),
            (_, p) if p.ends_with("/_mget") => answer(StatusCode::OK, json!({"docs": []})),
            (_, p) if p.ends_with("/_bulk") => {
                let mut bulks = fake.bulks.lock().unwrap();
                *bulks += 1;
                let actions = seen.body.lines().step_by(2).count();
                let items: Vec<Value> = (0..actions)
                    .map(|i| {
                        let status = if *bulks == 1 && i == actions - 1 { 429 } else { 201 };
                        json!({"index": {"status": status, "error": {"type": "es_rejected_execution_exception", "reason": "busy"}}})
                    })
                    .collect();
                answer(StatusCode::OK, json!({"took": 1, "errors": *bulks == 1, "items": items}))
            }
            (_, p) if p.ends_with("/_search") && fake.searches_fail.load(std::sync::atomic::Ordering::SeqCst) => {
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": {"type": "search_phase_execution_exception", "reason": "all shards failed"}, "status": 503}),
                )
            }
            (_, p) if p.ends_with("/_search") => {
                answer(StatusCode::OK, json!({"hits": {"total": {"value": 0, "relation": "eq"}, "hits": []}}))
            }
            _ => answer(StatusCode::NOT_FOUND, json!({"error": {"type": "not_found"}})),
        }
    }

    pub async fn start() -> (String, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        let app = axum::Router::new().fallback(handle).with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, fake)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_bulk_indexed_retried_item_by_item_then_checkpointed() {
    use callisto_avro::PersonEvent;
    use callisto_avro::events::{NoteAdded, PersonRegistered};
    use callisto_core::readmodel::elastic::ElasticSearchIndex;
    use callisto_core::readmodel::{ProjectedEvent, Projection};

    let (url, fake) = fake::start().await;
    let index = ElasticSearchIndex::connect(&ElasticOptions::new(url)).await.unwrap();
    let setup: Vec<(String, String)> =
        fake.seen.lock().unwrap().iter().map(|s| (s.method.to_string(), s.path.clone())).collect();
    assert_eq!(
        setup,
        [
            ("PUT", "/_index_template/callisto-persons"),
            ("HEAD", "/_alias/callisto-persons"),
            ("PUT", "/callisto-persons-000001"),
            ("PUT", "/callisto-checkpoints"),
            ("POST", "/callisto-checkpoints/_search"),
        ]
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
    );
    let create = fake.seen.lock().unwrap()[2].body.clone();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&create).unwrap(),
        json!({"aliases": {"callisto-persons": {"is_write_index": true}}})
    );
    fake.seen.lock().unwrap().clear();

    let person = Uuid::new_v4();
    let note_id = Uuid::new_v4();
    let events = vec![
        ProjectedEvent {
            partition: 3,
            offset: 20,
            timestamp_ms: 0,
            event: PersonEvent::Registered(PersonRegistered {
                event_id: Uuid::new_v4(),
                person_id: person,
                occurred_at: chrono::Utc::now(),
                correlation_id: "c".into(),
                given_name: "Ada".into(),
                family_name: "Lovelace".into(),
                email: None,
                phone: None,
                date_of_birth: None,
                address: None,
                tags: vec![],
            }),
            principal: None,
            erased: false,
        },
        ProjectedEvent {
            partition: 3,
            offset: 21,
            timestamp_ms: 0,
            event: PersonEvent::NoteAdded(NoteAdded {
                event_id: Uuid::new_v4(),
                person_id: person,
                occurred_at: chrono::Utc::now(),
                correlation_id: "c".into(),
                note_id,
                text: "engine".into(),
            }),
            principal: None,
            erased: false,
        },
    ];
    index.apply(3, &events, 21).await.unwrap();

    let seen = fake.seen.lock().unwrap().clone();
    let bulks: Vec<_> = seen.iter().filter(|s| s.path.ends_with("/_bulk")).collect();
    assert_eq!(bulks.len(), 2, "the 429 item is sent again, alone");
    for bulk in &bulks {
        // Callisto writes and reads its generation's own index; the alias is for readers outside it.
        assert_eq!(bulk.path, "/callisto-persons-000001/_bulk");
        assert!(bulk.content_type.contains("x-ndjson"), "bulk content type {}", bulk.content_type);
        assert!(bulk.query.contains("refresh=wait_for"), "{}", bulk.query);
        assert!(bulk.body.ends_with('\n'), "NDJSON ends with a newline");
    }
    let actions = |body: &str| -> Vec<(String, u64)> {
        body.lines()
            .step_by(2)
            .map(|l| {
                let action: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(action["index"]["version_type"], "external");
                (action["index"]["_id"].as_str().unwrap().to_owned(), action["index"]["version"].as_u64().unwrap())
            })
            .collect()
    };
    assert_eq!(actions(&bulks[0].body), vec![(format!("person:{person}"), 21), (format!("note:{note_id}"), 21)]);
    assert_eq!(actions(&bulks[1].body), vec![(format!("note:{note_id}"), 21)]);

    let checkpoint = seen.iter().position(|s| s.path.contains("/_doc/")).expect("a checkpoint write");
    let last_bulk = seen.iter().rposition(|s| s.path.ends_with("/_bulk")).unwrap();
    assert!(checkpoint > last_bulk, "the checkpoint is written after the batch");
    let checkpoint = &seen[checkpoint];
    assert_eq!(checkpoint.path, "/callisto-checkpoints/_doc/search:3");
    for part in ["version=21", "version_type=external", "refresh=wait_for"] {
        assert!(checkpoint.query.contains(part), "{} lacks {part}", checkpoint.query);
    }
    assert_eq!(index.checkpoints().await.unwrap().len(), 0, "the fake stores nothing");
    assert_eq!(*index.progress().borrow(), [(3, 21)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cluster_turns_searches_into_prompt_unavailable_errors() {
    use callisto_core::readmodel::SearchIndex;
    use callisto_core::readmodel::elastic::ElasticSearchIndex;
    use std::time::{Duration, Instant};

    let (url, fake) = fake::start().await;
    let index = ElasticSearchIndex::connect(&ElasticOptions::new(url)).await.unwrap();
    fake.searches_fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let request =
        SearchRequest { query: "engine".into(), tag: None, status: None, limit: 10, offset: 0, search_after: None };
    let searches = || fake.seen.lock().unwrap().iter().filter(|s| s.path == "/callisto-persons-000001/_search").count();
    for _ in 0..5 {
        let started = Instant::now();
        let error = index.search(&request).await.unwrap_err();
        assert!(matches!(error, StoreError::Unavailable(_)), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3), "a failing search answers within seconds");
    }
    assert_eq!(searches(), 10, "two attempts each");
    // The breaker is open now: no more calls until it probes again.
    let error = index.search(&request).await.unwrap_err();
    assert!(error.to_string().contains("paused"), "{error}");
    assert_eq!(searches(), 10);
}

#[test]
fn erasures_are_versioned_deletes_and_a_missing_document_is_already_gone() {
    let actions = vec![IndexAction { id: "person:p1".into(), version: 20, source: None }];
    let ndjson = body::ndjson(&body::bulk_lines("callisto-persons", &actions));
    assert_eq!(
        ndjson,
        concat!(
            r#"{"delete":{"_index":"callisto-persons","_id":"person:p1","version":20,"version_type":"external"}}"#,
            "\n"
        )
    );
    let answer = json!({"errors": true, "items": [
        {"delete": {"_id": "person:p1", "status": 404, "result": "not_found"}},
        {"delete": {"_id": "note:n1", "status": 200, "result": "deleted"}},
        {"index": {"_id": "note:n2", "status": 404, "error": {"type": "index_not_found_exception", "reason": "no such index"}}}
    ]});
    let outcome = body::bulk_outcome(&answer).unwrap();
    assert_eq!(outcome.written, 2, "a delete of a missing document counts as done");
    assert_eq!(outcome.rejected.len(), 1, "an index answered 404 is still a failure");
}
