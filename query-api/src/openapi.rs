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

pub fn document() -> utoipa::openapi::OpenApi {
    QueryApi::openapi()
}
