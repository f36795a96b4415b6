//! The query API's OpenAPI document, generated from the handler annotations and types.

use utoipa::OpenApi;

use crate::api;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Callisto query API",
        description = "Persons, timelines and full-text search over Callisto's read models."
    ),
    paths(api::get_person, api::list_persons, api::timeline, api::search),
    components(schemas(callisto_core::http::Problem, callisto_core::http::FieldError))
)]
struct QueryApi;

/// The document, with each operation's scopes as the routes enforce them, and every rule the
/// parameter parsing enforces; tokens name only the `partitions` the topic has.
pub fn document(partitions: u32) -> serde_json::Value {
    let mut doc = QueryApi::openapi();
    callisto_core::auth::document(&mut doc, api::rule_for);
    let mut rules = callisto_core::rules::DocumentRules::new(doc);
    crate::params::declare(&mut rules, partitions);
    rules.into_json()
}
