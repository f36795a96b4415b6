//! The Elasticsearch [`SearchIndex`], on the official `elasticsearch` crate.
//!
//! ## Indices
//! - An index template (`<prefix>-persons`) with explicit, strict mappings: a `folding`
//!   analyzer (standard tokenizer, lowercase, ASCII folding) for names, notes, emails and
//!   addresses; `name` with a `keyword` subfield; `tags` and `status` as keywords for filters
//!   and aggregations.
//! - One index per read-model generation (`<prefix>-persons-000001` for generation 0), which
//!   Callisto reads and writes directly; the read alias `<prefix>-persons` names the live one
//!   for every other reader, and [`ElasticGenerations`] moves it when a rebuild switches.
//! - Persons and notes are separate documents (`kind`), a note tied to its person by
//!   `person_id` and carrying the person's name, tags and status for filters and facets; when
//!   those change, the person's notes are re-indexed.
//! - Checkpoints live in Elasticsearch itself (`<prefix>-checkpoints`, one document per
//!   partition and generation), written after the batch's bulk request succeeded.
//!
//! ## Writes
//! Searches page with `search_after` on (score, document key), so paging has no depth limit.
//!
//! Bulk requests, split by action count and by bytes. Every action uses
//! `version_type=external` with the event's offset as version, so Elasticsearch itself refuses
//! anything older. Each item of the answer is checked ([`body::bulk_outcome`]): 409 is stale
//! and counts as applied; 429 and 5xx items are retried with back-off; mapping and parse
//! errors reject the batch so the projector isolates the event and dead-letters it. A bulk
//! answered 200 therefore never loses a document silently. Bulks use the configured refresh
//! policy (`wait_for` by default), so once a checkpoint moves, a search sees the batch: that is
//! what a consistency token waits for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use callisto_avro::PersonEvent;
use elasticsearch::auth::Credentials;
use elasticsearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
use elasticsearch::http::request::JsonBody;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, StatusCode, Url};
use elasticsearch::{BulkParts, Elasticsearch};
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    Checkpoints, EventBatch, Facets, HitKind, PersonDoc, ProjectedEvent, Projection, SearchHit, SearchIndex,
    SearchRequest, SearchResults, Status, StoreError, fold,
};
use crate::resilience::{Guard, READ_TIMEOUT};

const PROJECTION: &str = "search";

#[derive(Clone)]
pub struct ElasticOptions {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Elastic Cloud API key as (id, secret); used instead of basic auth when set.
    pub api_key: Option<(String, String)>,
    /// Index and alias names start with it.
    pub prefix: String,
    /// `wait_for` (default: searchable before the checkpoint moves), `true` or `false`.
    pub refresh: String,
    pub timeout: Duration,
    pub bulk_max_actions: usize,
    pub bulk_max_bytes: usize,
    /// How often to re-read checkpoints written by other processes, for a query API that
    /// waits on consistency tokens; `None` (the default) for the projector, which publishes
    /// its own progress as it applies.
    pub checkpoint_poll: Option<Duration>,
    /// The read-model generation (blue/green rebuilds): its index is named after it.
    pub generation: u32,
}

impl ElasticOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            username: None,
            password: None,
            api_key: None,
            prefix: "callisto".into(),
            refresh: "wait_for".into(),
            timeout: Duration::from_secs(30),
            bulk_max_actions: 1000,
            bulk_max_bytes: 5 * 1024 * 1024,
            checkpoint_poll: None,
            generation: 0,
        }
    }

    /// The read alias: it names the live generation's index, for every reader outside Callisto.
    pub fn alias(&self) -> String {
        format!("{}-persons", self.prefix)
    }

    /// This generation's index: generation 0 is `-000001`, generation N `-00000(N+1)`.
    pub fn index(&self) -> String {
        index_of(&self.prefix, self.generation)
    }

    /// The name this generation's checkpoints carry: `search`, then `search-gN`.
    pub fn checkpoint_projection(&self) -> String {
        if self.generation == 0 { PROJECTION.to_owned() } else { format!("{PROJECTION}-g{}", self.generation) }
    }

    /// The index recording the generations.
    pub fn generations_index(&self) -> String {
        format!("{}-generations", self.prefix)
    }

    pub fn checkpoint_index(&self) -> String {
        format!("{}-checkpoints", self.prefix)
    }
}

impl std::fmt::Debug for ElasticOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElasticOptions")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("prefix", &self.prefix)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn index_of(prefix: &str, generation: u32) -> String {
    format!("{prefix}-persons-{:06}", u64::from(generation) + 1)
}

/// The generation an index of `prefix` belongs to, from its name.
fn generation_of(prefix: &str, index: &str) -> Option<u32> {
    let number: u64 = index.strip_prefix(&format!("{prefix}-persons-"))?.parse().ok()?;
    u32::try_from(number.checked_sub(1)?).ok()
}

/// One document write.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexAction {
    pub id: String,
    /// The offset of the event this write reflects (external version).
    pub version: u64,
    /// The document to index, or `None` to delete it (an erased person's documents).
    pub source: Option<Value>,
}

/// Request bodies and the reading of answers; no I/O.
pub mod body {
    use super::*;

    pub fn index_template(options: &ElasticOptions) -> Value {
        let folded = json!({"type": "text", "analyzer": "folding"});
        json!({
            "index_patterns": [format!("{}-persons-*", options.prefix)],
            "priority": 200,
            "template": {
                "settings": {
                    "analysis": {
                        "analyzer": {
                            "folding": {"type": "custom", "tokenizer": "standard", "filter": ["lowercase", "asciifolding"]}
                        }
                    }
                },
                "mappings": {
                    "dynamic": "strict",
                    "properties": {
                        "kind": {"type": "keyword"},
                        "doc_key": {"type": "keyword"},
                        "person_id": {"type": "keyword"},
                        "note_id": {"type": "keyword"},
                        "name": {"type": "text", "analyzer": "folding", "fields": {"keyword": {"type": "keyword"}}},
                        "email": folded,
                        "address": folded,
                        "tag": folded,
                        "text": folded,
                        "tags": {"type": "keyword"},
                        "status": {"type": "keyword"},
                        "updated_at": {"type": "date"},
                        "person": {"type": "object", "enabled": false}
                    }
                }
            }
        })
    }

    pub fn person_source(person: &PersonDoc) -> Value {
        json!({
            "kind": "person",
            "doc_key": format!("person:{}", person.person_id),
            "person_id": person.person_id.to_string(),
            "name": super::super::search::display_name(person),
            "email": person.email,
            "address": person.address.as_ref().map(|a| a.one_line()),
            "tag": person.tags,
            "tags": person.tags,
            "status": person.status.as_str(),
            "updated_at": person.updated_at.to_rfc3339(),
            "person": person,
        })
    }

    pub fn note_source(person: &PersonDoc, note_id: Uuid, text: &str) -> Value {
        json!({
            "kind": "note",
            "doc_key": format!("note:{note_id}"),
            "person_id": person.person_id.to_string(),
            "note_id": note_id.to_string(),
            "name": super::super::search::display_name(person),
            "text": text,
            "tags": person.tags,
            "status": person.status.as_str(),
            "updated_at": person.updated_at.to_rfc3339(),
        })
    }

    /// The bulk body's lines: an action line then the source, per write.
    pub fn bulk_lines(index: &str, actions: &[IndexAction]) -> Vec<Value> {
        let mut lines = Vec::with_capacity(actions.len() * 2);
        for a in actions {
            let target = json!({"_index": index, "_id": a.id, "version": a.version, "version_type": "external"});
            match &a.source {
                Some(source) => lines.extend([json!({"index": target}), source.clone()]),
                None => lines.push(json!({"delete": target})),
            }
        }
        lines
    }

    /// NDJSON as it goes on the wire: one JSON document per line, newline-terminated.
    pub fn ndjson(lines: &[Value]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Splits writes so no bulk exceeds `max_actions` actions or about `max_bytes` of body.
    pub fn chunks(actions: Vec<IndexAction>, max_actions: usize, max_bytes: usize) -> Vec<Vec<IndexAction>> {
        let mut out: Vec<Vec<IndexAction>> = Vec::new();
        let mut bytes = 0;
        for action in actions {
            let size = action.source.as_ref().map_or(0, |s| s.to_string().len()) + action.id.len() + 96;
            let full =
                out.last().is_none_or(|c| c.len() >= max_actions.max(1) || (bytes + size > max_bytes && !c.is_empty()));
            if full {
                out.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            out.last_mut().expect("just pushed").push(action);
        }
        out
    }

    /// How a bulk answer went, item by item.
    #[derive(Debug, Default, PartialEq)]
    pub struct BulkOutcome {
        pub written: usize,
        /// 409: Elasticsearch already holds this version or a newer one.
        pub stale: usize,
        /// Indexes (into the request's actions) worth sending again: 429 and 5xx.
        pub retry: Vec<usize>,
        /// Documents Elasticsearch refuses as they are (mapping and parse errors).
        pub rejected: Vec<(usize, String)>,
    }

    pub fn bulk_outcome(answer: &Value) -> Result<BulkOutcome, StoreError> {
        let items =
            answer["items"].as_array().ok_or_else(|| unavailable(format!("bulk answer without items: {answer}")))?;
        let mut outcome = BulkOutcome::default();
        for (at, item) in items.iter().enumerate() {
            let result = item.as_object().and_then(|o| o.values().next()).unwrap_or(&Value::Null);
            let status = result["status"].as_u64().unwrap_or(0);
            match status {
                200..=299 => outcome.written += 1,
                // Deleting what is not there: already gone.
                404 if item.get("delete").is_some() => outcome.written += 1,
                409 => outcome.stale += 1,
                429 | 500..=599 => outcome.retry.push(at),
                _ => {
                    let error = &result["error"];
                    let reason = format!(
                        "{}: {}",
                        error["type"].as_str().unwrap_or("error"),
                        error["reason"].as_str().unwrap_or("no reason given")
                    );
                    outcome.rejected.push((at, reason));
                }
            }
        }
        Ok(outcome)
    }

    /// The query for one search request. Filters do not score; aggregations give the facets.
    pub fn search_body(request: &SearchRequest) -> Value {
        let query = request.query.trim();
        let must = if query.is_empty() || query == "*" {
            json!({"match_all": {}})
        } else {
            json!({"query_string": {
                "query": query,
                "fields": ["name^2", "email", "address", "tag", "text"],
                "default_operator": "OR"
            }})
        };
        let mut filter = Vec::new();
        if let Some(tag) = &request.tag {
            filter.push(json!({"term": {"tags": tag}}));
        }
        if let Some(status) = request.status {
            filter.push(json!({"term": {"status": status.as_str()}}));
        }
        // Pages by key: score, then the document id as a tiebreak that every document has.
        let mut body = json!({
            "size": request.limit,
            "sort": [{"_score": "desc"}, {"doc_key": "asc"}],
            "track_total_hits": true,
            "query": {"bool": {"must": [must], "filter": filter}},
            "_source": ["kind", "person_id", "note_id", "name", "text"],
            "highlight": {
                "pre_tags": ["<b>"],
                "post_tags": ["</b>"],
                "fields": {"name": {}, "text": {}, "email": {}, "address": {}, "tag": {}}
            },
            "aggs": {
                "tags": {"terms": {"field": "tags", "size": 100}},
                "status": {"terms": {"field": "status", "size": 10}}
            }
        });
        match &request.search_after {
            Some(after) => body["search_after"] = json!(after),
            None => body["from"] = json!(request.offset),
        }
        body
    }

    pub fn search_results(answer: &Value) -> Result<SearchResults, StoreError> {
        let hits = answer["hits"]["hits"]
            .as_array()
            .ok_or_else(|| unavailable(format!("search answer without hits: {answer}")))?;
        let total = answer["hits"]["total"]["value"].as_u64().unwrap_or(hits.len() as u64) as usize;
        let uuid = |v: &Value| v.as_str().and_then(|s| Uuid::parse_str(s).ok());
        let hits = hits
            .iter()
            .map(|hit| {
                let source = &hit["_source"];
                let kind = if source["kind"] == "note" { HitKind::Note } else { HitKind::Person };
                let highlights = hit["highlight"]
                    .as_object()
                    .map(|h| {
                        h.iter()
                            .map(|(field, fragments)| {
                                let joined = fragments
                                    .as_array()
                                    .map(|f| f.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" … "))
                                    .unwrap_or_default();
                                (field.clone(), joined)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                SearchHit {
                    person_id: uuid(&source["person_id"]).unwrap_or_default(),
                    note_id: if kind == HitKind::Note { uuid(&source["note_id"]) } else { None },
                    text: if kind == HitKind::Note { source["text"].as_str().map(str::to_owned) } else { None },
                    kind,
                    score: hit["_score"].as_f64().unwrap_or(0.0) as f32,
                    name: source["name"].as_str().unwrap_or_default().to_owned(),
                    highlights,
                }
            })
            .collect();
        let buckets = |name: &str| -> BTreeMap<String, u64> {
            answer["aggregations"][name]["buckets"]
                .as_array()
                .map(|b| {
                    b.iter().filter_map(|b| Some((b["key"].as_str()?.to_owned(), b["doc_count"].as_u64()?))).collect()
                })
                .unwrap_or_default()
        };
        let last_sort =
            answer["hits"]["hits"].as_array().and_then(|h| h.last()).and_then(|h| h["sort"].as_array()).cloned();
        Ok(SearchResults {
            total,
            hits,
            facets: Facets { tags: buckets("tags"), status: buckets("status") },
            last_sort,
        })
    }

    /// Classifies a failed (non-2xx) answer to a whole request.
    pub fn request_error(status: u16, answer: &Value) -> StoreError {
        let error = &answer["error"];
        let reason = format!(
            "{status} {}: {}",
            error["type"].as_str().unwrap_or("error"),
            error["reason"].as_str().or(error.as_str()).unwrap_or("no reason given")
        );
        match status {
            400 => StoreError::InvalidRequest(reason),
            _ => StoreError::Unavailable(reason),
        }
    }
}

pub struct ElasticSearchIndex {
    client: Elasticsearch,
    options: ElasticOptions,
    /// Indexing and start-up: the full timeout, three attempts.
    guard: Guard,
    /// Searches serving requests: short, two attempts, a breaker of their own.
    reads: Guard,
    progress: watch::Sender<Checkpoints>,
}

impl std::fmt::Debug for ElasticSearchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElasticSearchIndex").field("options", &self.options).finish_non_exhaustive()
    }
}

impl ElasticSearchIndex {
    /// Connects, installs the template, creates the first index behind the alias and the
    /// checkpoint index where missing, loads the checkpoints and starts following them.
    pub async fn connect(options: &ElasticOptions) -> Result<Arc<Self>, StoreError> {
        let index = Arc::new(Self::client(options)?);
        index.install().await?;
        let loaded = index.checkpoints().await?;
        index.progress.send_replace(loaded);
        if let Some(every) = options.checkpoint_poll {
            tokio::spawn(super::follow_checkpoints(Arc::downgrade(&index), |p| &p.progress, every));
        }
        Ok(index)
    }

    /// The client alone: nothing is created or read yet.
    fn client(options: &ElasticOptions) -> Result<Self, StoreError> {
        let url =
            Url::parse(&options.url).map_err(|e| StoreError::InvalidRequest(format!("elasticsearch url: {e}")))?;
        let mut transport = TransportBuilder::new(SingleNodeConnectionPool::new(url)).timeout(options.timeout);
        if let Some((id, secret)) = &options.api_key {
            transport = transport.auth(Credentials::ApiKey(id.clone(), secret.clone()));
        } else if let Some(user) = &options.username {
            transport = transport.auth(Credentials::Basic(user.clone(), options.password.clone().unwrap_or_default()));
        }
        let transport = transport.build().map_err(unavailable)?;
        Ok(Self {
            client: Elasticsearch::new(transport),
            options: options.clone(),
            guard: Guard::new("elasticsearch", "writes", options.timeout, 3),
            reads: Guard::new("elasticsearch", "reads", options.timeout.min(READ_TIMEOUT), 2),
            progress: watch::channel(BTreeMap::new()).0,
        })
    }

    /// One HTTP call through the guard: (status, JSON body).
    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(u16, Value), StoreError> {
        self.call_via(&self.guard, what, method, path, query, body).await
    }

    /// [`Self::call`] through a chosen guard.
    async fn call_via(
        &self,
        guard: &Guard,
        what: &str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(u16, Value), StoreError> {
        guard
            .call(what, || async {
                let body = body.map(|b| JsonBody::new(b.clone()));
                let response = self
                    .client
                    .send(method, path, HeaderMap::new(), Some(query), body, None)
                    .await
                    .map_err(unavailable)?;
                let status = response.status_code().as_u16();
                let answer = if method == Method::Head {
                    Value::Null
                } else {
                    response.json::<Value>().await.unwrap_or(Value::Null)
                };
                if status == StatusCode::TOO_MANY_REQUESTS.as_u16() || status >= 500 {
                    return Err(body::request_error(status, &answer));
                }
                Ok((status, answer))
            })
            .await
    }

    /// [`Self::call`], with any answer but 2xx an error.
    async fn call_ok(
        &self,
        what: &str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value, StoreError> {
        let (status, answer) = self.call(what, method, path, query, body).await?;
        if status >= 300 {
            return Err(body::request_error(status, &answer));
        }
        Ok(answer)
    }

    /// [`Self::call`], where 404 is an answer (`None`) and anything else but 2xx an error.
    async fn call_unless_missing(
        &self,
        what: &str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Option<Value>, StoreError> {
        match self.call(what, method, path, query, body).await? {
            (404, _) => Ok(None),
            (status, answer) if status >= 300 => Err(body::request_error(status, &answer)),
            (_, answer) => Ok(Some(answer)),
        }
    }

    /// Creates index `index` with `definition`, unless it exists.
    async fn create_index(&self, what: &str, index: &str, definition: &Value) -> Result<(), StoreError> {
        let (status, answer) = self.call(what, Method::Put, &format!("/{index}"), &[], Some(definition)).await?;
        if status >= 300 && answer["error"]["type"] != "resource_already_exists_exception" {
            return Err(body::request_error(status, &answer));
        }
        Ok(())
    }

    async fn install(&self) -> Result<(), StoreError> {
        let template = body::index_template(&self.options);
        let path = format!("/_index_template/{}", self.options.alias());
        self.call_ok("installing the index template", Method::Put, &path, &[], Some(&template)).await?;
        // The first generation ever made takes the read alias; later ones get it when a rebuild
        // switches to them.
        let alias = self.options.alias();
        let (status, _) = self.call("checking the alias", Method::Head, &format!("/_alias/{alias}"), &[], None).await?;
        let create =
            if status == 404 { json!({"aliases": {alias.clone(): {"is_write_index": true}}}) } else { json!({}) };
        self.create_index("creating the index", &self.options.index(), &create).await?;
        let checkpoints = json!({"mappings": {"dynamic": "strict", "properties": {
            "projection": {"type": "keyword"}, "partition": {"type": "integer"}, "offset": {"type": "long"}
        }}});
        self.create_index("creating the checkpoint index", &self.options.checkpoint_index(), &checkpoints).await
    }

    /// The stored persons among `ids` (realtime gets, no refresh needed).
    async fn load(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, PersonDoc>, StoreError> {
        // Elasticsearch refuses an `_mget` without ids (a batch may be all dead letters).
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let request = json!({"ids": ids.iter().map(|id| format!("person:{id}")).collect::<Vec<_>>()});
        let path = format!("/{}/_mget", self.options.index());
        let answer =
            self.call_ok("loading persons", Method::Post, &path, &[("_source", "person")], Some(&request)).await?;
        Ok(answer["docs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| serde_json::from_value::<PersonDoc>(d["_source"]["person"].clone()).ok())
            .map(|p| (p.person_id, p))
            .collect())
    }

    /// A person's indexed notes, to re-index them with new facets.
    async fn notes_of(&self, person: &PersonDoc) -> Result<Vec<(Uuid, String)>, StoreError> {
        let request = json!({
            "size": person.note_count.min(10_000),
            "query": {"bool": {"filter": [{"term": {"kind": "note"}}, {"term": {"person_id": person.person_id.to_string()}}]}},
            "_source": ["note_id", "text"]
        });
        let path = format!("/{}/_search", self.options.index());
        let answer = self.call_ok("loading notes", Method::Post, &path, &[], Some(&request)).await?;
        Ok(answer["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| {
                let note_id = Uuid::parse_str(h["_source"]["note_id"].as_str()?).ok()?;
                Some((note_id, h["_source"]["text"].as_str()?.to_owned()))
            })
            .collect())
    }

    /// What a batch writes: changed persons, new notes, and notes whose person's name, tags or
    /// status changed.
    async fn actions(&self, events: &[ProjectedEvent]) -> Result<Vec<IndexAction>, StoreError> {
        let mut ids: Vec<Uuid> = events.iter().map(|e| e.event.meta().person_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let stored = self.load(&ids).await?;
        let mut current: HashMap<Uuid, PersonDoc> = stored.clone();
        let mut new_notes: Vec<(Uuid, Uuid, String, u64)> = Vec::new();
        for event in events {
            let id = event.event.meta().person_id;
            let before = current.get(&id);
            // External versioning alone cannot refuse a redelivery where it would make a new
            // document (a note with its own id), so the guard runs here too.
            if before.is_some_and(|d| d.has_applied(event)) {
                continue;
            }
            let Some(after) = fold(before.cloned(), event) else { continue };
            if let PersonEvent::NoteAdded(note) = &event.event
                && !event.erases()
                && after.version.offset == event.offset
            {
                new_notes.push((id, note.note_id, note.text.clone(), event.offset));
            }
            current.insert(id, after);
        }
        let mut actions = Vec::new();
        let facets = |p: &PersonDoc| (super::search::display_name(p), p.tags.clone(), p.status);
        for (id, after) in &current {
            let before = stored.get(id);
            if before == Some(after) {
                continue;
            }
            if after.status == Status::Erased {
                // Every document of the person goes, at the erasure's version, so an older
                // write arriving late is refused.
                actions.push(IndexAction { id: format!("person:{id}"), version: after.version.offset, source: None });
                if let Some(before) = before.filter(|b| b.note_count > 0) {
                    for (note_id, _) in self.notes_of(before).await? {
                        actions.push(IndexAction {
                            id: format!("note:{note_id}"),
                            version: after.version.offset,
                            source: None,
                        });
                    }
                }
                continue;
            }
            actions.push(IndexAction {
                id: format!("person:{id}"),
                version: after.version.offset,
                source: Some(body::person_source(after)),
            });
            if let Some(before) = before
                && before.note_count > 0
                && facets(before) != facets(after)
            {
                for (note_id, text) in self.notes_of(before).await? {
                    actions.push(IndexAction {
                        id: format!("note:{note_id}"),
                        version: after.version.offset,
                        source: Some(body::note_source(after, note_id, &text)),
                    });
                }
            }
        }
        let mut seen = HashSet::new();
        for (person_id, note_id, text, offset) in new_notes {
            if seen.insert(note_id) {
                let person = &current[&person_id];
                actions.push(IndexAction {
                    id: format!("note:{note_id}"),
                    version: offset,
                    source: Some(body::note_source(person, note_id, &text)),
                });
            }
        }
        Ok(actions)
    }

    /// Sends one bulk, re-sending items answered 429 or 5xx with back-off.
    async fn bulk(&self, mut actions: Vec<IndexAction>) -> Result<(), StoreError> {
        let index = self.options.index();
        let mut delays = crate::resilience::item_backoff();
        loop {
            let lines = body::bulk_lines(&index, &actions);
            let refresh = self.options.refresh.clone();
            let answer = self
                .guard
                .call("bulk indexing", || async {
                    let body: Vec<JsonBody<Value>> = lines.iter().cloned().map(JsonBody::new).collect();
                    let response = self
                        .client
                        .bulk(BulkParts::Index(&index))
                        // The bulk API documents NDJSON; the client would otherwise say JSON.
                        .header(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"))
                        .refresh(match refresh.as_str() {
                            "true" => elasticsearch::params::Refresh::True,
                            "false" => elasticsearch::params::Refresh::False,
                            _ => elasticsearch::params::Refresh::WaitFor,
                        })
                        .body(body)
                        .send()
                        .await
                        .map_err(unavailable)?;
                    let status = response.status_code().as_u16();
                    let answer = response.json::<Value>().await.map_err(unavailable)?;
                    if status >= 300 {
                        return Err(body::request_error(status, &answer));
                    }
                    Ok(answer)
                })
                .await?;
            let outcome = body::bulk_outcome(&answer)?;
            if let Some((at, reason)) = outcome.rejected.first() {
                return Err(StoreError::Rejected(format!("document {}: {reason}", actions[*at].id)));
            }
            if outcome.retry.is_empty() {
                return Ok(());
            }
            let Some(delay) = delays.next() else {
                return Err(StoreError::Unavailable(format!(
                    "{} bulk items kept failing with 429 or 5xx",
                    outcome.retry.len()
                )));
            };
            tracing::debug!(items = outcome.retry.len(), ?delay, "re-sending bulk items");
            tokio::time::sleep(delay).await;
            actions = outcome.retry.iter().map(|at| actions[*at].clone()).collect();
        }
    }
}

#[async_trait]
impl Projection for ElasticSearchIndex {
    fn name(&self) -> &'static str {
        PROJECTION
    }

    fn system(&self) -> &'static str {
        "elasticsearch"
    }

    async fn apply_shared(&self, partition: u32, events: EventBatch, through: u64) -> Result<(), StoreError> {
        let events = events.as_slice();
        let actions = self.actions(events).await?;
        for chunk in body::chunks(actions, self.options.bulk_max_actions, self.options.bulk_max_bytes) {
            self.bulk(chunk).await?;
        }
        // The batch is indexed (and, with `wait_for`, searchable): now the checkpoint.
        let projection = self.options.checkpoint_projection();
        let path = format!("/{}/_doc/{projection}:{partition}", self.options.checkpoint_index());
        let version = through.to_string();
        let query =
            [("version", version.as_str()), ("version_type", "external"), ("refresh", self.options.refresh.as_str())];
        let source = json!({"projection": projection, "partition": partition, "offset": through});
        let (status, answer) = self.call("writing the checkpoint", Method::Put, &path, &query, Some(&source)).await?;
        if status >= 300 && status != 409 {
            return Err(body::request_error(status, &answer));
        }
        super::advance(&self.progress, partition, through);
        Ok(())
    }

    async fn checkpoints(&self) -> Result<Checkpoints, StoreError> {
        let request = json!({"size": 10_000, "query": {"term": {"projection": self.options.checkpoint_projection()}}});
        let path = format!("/{}/_search", self.options.checkpoint_index());
        let found = self.call_unless_missing("reading checkpoints", Method::Post, &path, &[], Some(&request)).await?;
        let Some(answer) = found else { return Ok(Checkpoints::new()) };
        Ok(answer["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| Some((h["_source"]["partition"].as_u64()? as u32, h["_source"]["offset"].as_u64()?)))
            .collect())
    }

    fn progress(&self) -> watch::Receiver<Checkpoints> {
        self.progress.subscribe()
    }

    /// Asks Elasticsearch to merge away deleted documents now rather than on its own schedule.
    async fn compact(&self) -> Result<(), StoreError> {
        let path = format!("/{}/_forcemerge", self.options.index());
        let query = [("only_expunge_deletes", "true")];
        let (status, answer) = self.call("expunging deleted documents", Method::Post, &path, &query, None).await?;
        if status >= 300 {
            return Err(body::request_error(status, &answer));
        }
        Ok(())
    }
}

#[async_trait]
impl SearchIndex for ElasticSearchIndex {
    async fn search(&self, request: &SearchRequest) -> Result<SearchResults, StoreError> {
        let query = body::search_body(request);
        let path = format!("/{}/_search", self.options.index());
        let (status, answer) = self.call_via(&self.reads, "searching", Method::Post, &path, &[], Some(&query)).await?;
        if status >= 300 {
            return Err(body::request_error(status, &answer));
        }
        body::search_results(&answer)
    }
}

/// The generations in Elasticsearch: a document in `<prefix>-generations`, and the read alias,
/// which one `_aliases` call moves to the live generation's index (readers of the alias never
/// see it missing or on two indices). Without the document, the alias says which is live.
pub struct ElasticGenerations {
    es: ElasticSearchIndex,
}

const POINTER_ID: &str = "read-models";

impl ElasticGenerations {
    pub fn new(options: &ElasticOptions) -> Result<Self, StoreError> {
        Ok(Self { es: ElasticSearchIndex::client(options)? })
    }

    /// The indices the read alias names now.
    async fn alias_targets(&self) -> Result<Vec<String>, StoreError> {
        let path = format!("/_alias/{}", self.es.options.alias());
        let answer = self.es.call_unless_missing("reading the alias", Method::Get, &path, &[], None).await?;
        Ok(answer.as_ref().and_then(Value::as_object).map(|o| o.keys().cloned().collect()).unwrap_or_default())
    }

    /// Deletes generation `generation`'s index and checkpoints.
    pub async fn drop_generation(&self, generation: u32) -> Result<(), StoreError> {
        let options = ElasticOptions { generation, ..self.es.options.clone() };
        let index = format!("/{}", options.index());
        self.es.call_unless_missing("deleting an index", Method::Delete, &index, &[], None).await?;
        let query = json!({"query": {"term": {"projection": options.checkpoint_projection()}}});
        let path = format!("/{}/_delete_by_query", options.checkpoint_index());
        let refresh = [("refresh", "true")];
        self.es.call_unless_missing("deleting checkpoints", Method::Post, &path, &refresh, Some(&query)).await?;
        Ok(())
    }
}

#[async_trait]
impl super::generations::GenerationPointer for ElasticGenerations {
    async fn load(&self) -> Result<super::generations::Generations, StoreError> {
        let path = format!("/{}/_doc/{POINTER_ID}", self.es.options.generations_index());
        // 404: no generations index yet, or no document in it.
        if let Some(answer) =
            self.es.call_unless_missing("reading the generations", Method::Get, &path, &[], None).await?
        {
            return serde_json::from_value(answer["_source"].clone())
                .map_err(|e| unavailable(format!("unreadable generations document: {e}")));
        }
        let live = self.alias_targets().await?.iter().find_map(|i| generation_of(&self.es.options.prefix, i));
        Ok(super::generations::Generations { live: live.unwrap_or(0), ..Default::default() })
    }

    async fn save(&self, next: &super::generations::Generations) -> Result<(), StoreError> {
        let options = &self.es.options;
        let live = index_of(&options.prefix, next.live);
        let targets = self.alias_targets().await?;
        if targets != [live.clone()] {
            let mut actions: Vec<Value> =
                targets.iter().map(|index| json!({"remove": {"index": index, "alias": options.alias()}})).collect();
            actions.push(json!({"add": {"index": live, "alias": options.alias(), "is_write_index": true}}));
            self.es
                .call_ok("moving the read alias", Method::Post, "/_aliases", &[], Some(&json!({"actions": actions})))
                .await?;
        }
        let mapping = json!({"mappings": {"dynamic": "strict", "properties": {
            "live": {"type": "integer"}, "previous": {"type": "integer"}, "building": {"type": "integer"}
        }}});
        let index = options.generations_index();
        self.es.create_index("creating the generations index", &index, &mapping).await?;
        let document = serde_json::to_value(next).map_err(unavailable)?;
        let path = format!("/{index}/_doc/{POINTER_ID}");
        self.es
            .call_ok("recording the generations", Method::Put, &path, &[("refresh", "true")], Some(&document))
            .await?;
        Ok(())
    }
}
