//! Handlers for persons, timelines and search.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use callisto_core::auth::{Auth, Rule};
use callisto_core::http::{ApiPath, ApiQuery, Problem};
use callisto_core::readmodel::{
    Facets, ListFilter, PersonDoc, Projection, SearchHit, SearchRequest, Status, StoreError, TimelineEntry,
};
use callisto_core::telemetry::trace;
use callisto_core::token::{self, ConsistencyToken};
use serde::Serialize;
use tracing::Instrument as _;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::QueryState;
use crate::consistency::wait_for;
use crate::params::{self, GetParams, ListParams, SearchParams, TimelineParams};

const PROBLEM: &str = "application/problem+json";
const STALE_HEADER: &str = "callisto-stale";
const RETRY_AFTER_SECS: u32 = 1;

#[derive(Debug, Serialize, ToSchema)]
pub struct PersonPage {
    pub items: Vec<PersonDoc>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TimelinePage {
    pub items: Vec<TimelineEntry>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResponse {
    /// Matching documents (persons and notes) in all.
    pub total: usize,
    pub hits: Vec<SearchHit>,
    /// Counts by tag and status over all matching documents.
    pub facets: Facets,
    pub next_cursor: Option<String>,
}

/// The read routes, each behind `auth`'s guard with the rule [`rule_for`] gives its path.
pub fn routes(state: QueryState, auth: &Arc<Auth>) -> Router {
    let route = |path: &str, handler: axum::routing::MethodRouter<QueryState>| {
        auth.protect(Router::new().route(path, handler).with_state(state.clone()), rule_for(path))
    };
    route("/v1/persons", get(list_persons))
        .merge(route("/v1/persons/{id}", get(get_person)))
        .merge(route("/v1/persons/{id}/timeline", get(timeline)))
        .merge(route("/v1/search", get(search)))
}

/// Search needs `search` and spends the search budget; everything else here reads persons,
/// and a single person's document is audited when `auth.audit_person_reads` is on.
pub fn rule_for(path: &str) -> Rule {
    match path {
        "/v1/search" => Rule::SEARCH,
        "/v1/persons/{id}" => Rule::PERSON_READ,
        _ => Rule::READS,
    }
}

fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::InvalidRequest(message) => Problem::malformed(message.clone()).with_field("q", message),
        StoreError::Unavailable(_) | StoreError::Rejected(_) => {
            tracing::warn!(error = %e, "read failed");
            Problem::unavailable(e.to_string(), RETRY_AFTER_SECS)
        }
    }
}

fn person_id(raw: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw)
        .map_err(|_| Problem::malformed(format!("{raw:?} is not a person id")).with_field("id", "must be a UUID"))
}

fn token_of(state: &QueryState, headers: &HeaderMap, after: Option<&str>) -> Result<Vec<ConsistencyToken>, Problem> {
    let header = match headers.get(token::HEADER) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            Problem::malformed("Callisto-Consistency-Token is not text")
                .with_field("Callisto-Consistency-Token", "not text")
        })?),
    };
    params::token(header, after, state.partitions)
}

/// Adds `Callisto-Stale: true` when the token's wait ran out, and records query latency.
fn answer(route: &'static str, started: Instant, stale: bool, body: impl IntoResponse) -> Response {
    metrics::histogram!("callisto_query_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    let mut response = body.into_response();
    if stale {
        response.headers_mut().insert(STALE_HEADER, HeaderValue::from_static("true"));
    }
    response
}

async fn wait(state: &QueryState, tokens: Vec<ConsistencyToken>, projection: &dyn Projection) -> bool {
    if tokens.is_empty() {
        return false; // no span for a read that does not wait
    }
    let span = trace::consistency_wait_span(projection.name(), tokens.len());
    let stale = wait_for(&tokens, &[projection], state.consistency_wait).instrument(span.clone()).await;
    span.record("callisto.consistency.stale", stale);
    stale
}

#[utoipa::path(get, path = "/v1/persons/{id}", tag = "queries",
    params(("id" = Uuid, Path, description = "the person's id"), GetParams,
        ("Callisto-Consistency-Token" = Option<String>, Header, description = "wait until this write is visible")),
    responses((status = 200, body = PersonDoc), (status = 404, body = Problem, content_type = PROBLEM),
        (status = 410, body = Problem, content_type = PROBLEM, description = "The person was erased."),
        (status = "4XX", body = Problem, content_type = PROBLEM), (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn get_person(
    State(state): State<QueryState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<GetParams>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let started = Instant::now();
    let id = person_id(&id)?;
    let token = token_of(&state, &headers, query.after.as_deref())?;
    let stale = wait(&state, token, state.store.as_ref()).await;
    match state.store.get(id).await.map_err(store_problem)? {
        Some(doc) if doc.status == Status::Erased => {
            let problem = Problem::new(
                StatusCode::GONE,
                "person-erased",
                "Person erased",
                format!("person {id} was erased; nothing about them is kept"),
            );
            Ok(answer("get_person", started, stale, problem))
        }
        Some(doc) => Ok(answer("get_person", started, stale, axum::Json(doc))),
        None => {
            let problem = Problem::not_found(format!("no person with id {id}"));
            Ok(answer("get_person", started, stale, problem))
        }
    }
}

#[utoipa::path(get, path = "/v1/persons", tag = "queries",
    params(ListParams, ("Callisto-Consistency-Token" = Option<String>, Header, description = "wait until this write is visible")),
    responses((status = 200, body = PersonPage), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn list_persons(
    State(state): State<QueryState>,
    ApiQuery(query): ApiQuery<ListParams>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let started = Instant::now();
    let filter =
        ListFilter { tag: params::tag(query.tag.as_deref())?, status: params::status(query.status.as_deref())? };
    let limit = params::limit(query.limit.as_deref())?;
    let cursor = params::person_cursor(query.cursor.as_deref())?;
    let token = token_of(&state, &headers, query.after.as_deref())?;
    let stale = wait(&state, token, state.store.as_ref()).await;
    let page = state.store.list(&filter, limit, cursor).await.map_err(store_problem)?;
    Ok(answer(
        "list_persons",
        started,
        stale,
        axum::Json(PersonPage { items: page.items, next_cursor: page.next_cursor }),
    ))
}

#[utoipa::path(get, path = "/v1/persons/{id}/timeline", tag = "queries",
    params(("id" = Uuid, Path, description = "the person's id"), TimelineParams,
        ("Callisto-Consistency-Token" = Option<String>, Header, description = "wait until this write is visible")),
    responses((status = 200, body = TimelinePage), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn timeline(
    State(state): State<QueryState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<TimelineParams>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let started = Instant::now();
    let id = person_id(&id)?;
    let limit = params::limit(query.limit.as_deref())?;
    let cursor = params::offset_cursor(query.cursor.as_deref())?;
    let token = token_of(&state, &headers, query.after.as_deref())?;
    let stale = wait(&state, token, state.store.as_ref()).await;
    let page = state.store.timeline(id, limit, cursor).await.map_err(store_problem)?;
    Ok(answer(
        "timeline",
        started,
        stale,
        axum::Json(TimelinePage { items: page.items, next_cursor: page.next_cursor }),
    ))
}

#[utoipa::path(get, path = "/v1/search", tag = "queries",
    params(SearchParams, ("Callisto-Consistency-Token" = Option<String>, Header, description = "wait until this write is searchable")),
    responses((status = 200, body = SearchResponse), (status = "4XX", body = Problem, content_type = PROBLEM),
        (status = 503, body = Problem, content_type = PROBLEM)))]
pub async fn search(
    State(state): State<QueryState>,
    ApiQuery(query): ApiQuery<SearchParams>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let started = Instant::now();
    let request = SearchRequest {
        query: params::query(query.q.as_deref())?,
        tag: params::tag(query.tag.as_deref())?,
        status: params::status(query.status.as_deref())?,
        limit: params::limit(query.limit.as_deref())?,
        offset: 0,
        search_after: None,
    };
    let (offset, search_after) = params::search_cursor(query.cursor.as_deref())?;
    let request = SearchRequest { offset, search_after, ..request };
    let token = token_of(&state, &headers, query.after.as_deref())?;
    let stale = wait(&state, token, state.search.as_ref()).await;
    let results = state.search.search(&request).await.map_err(store_problem)?;
    let reached = request.offset + results.hits.len();
    let next_cursor = (results.hits.len() == request.limit && reached < results.total)
        .then(|| params::next_search_cursor(reached, results.last_sort.as_deref()))
        .flatten();
    let body = SearchResponse { total: results.total, hits: results.hits, facets: results.facets, next_cursor };
    Ok(answer("search", started, stale, axum::Json(body)))
}
