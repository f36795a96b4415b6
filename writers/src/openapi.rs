//! The writer's OpenAPI document, generated from the handler annotations and body types.

use utoipa::OpenApi;

use crate::api;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Callisto command API",
        description = "Person commands, appended as Avro events to the person topic."
    ),
    paths(
        api::register,
        api::rename,
        api::change_contact,
        api::change_address,
        api::add_note,
        api::tag,
        api::untag,
        api::archive,
        api::erase
    ),
    components(schemas(callisto_core::http::Problem, callisto_core::http::FieldError, api::Accepted))
)]
struct WriterApi;

/// The document, with every command declared as needing `persons:write` (erasure
/// `persons:erase`), and every rule the handlers enforce on bodies and headers.
pub fn document() -> serde_json::Value {
    use callisto_core::auth::Rule;
    let mut doc = WriterApi::openapi();
    callisto_core::auth::document(
        &mut doc,
        |path| if path == "/v1/persons/{id}" { Rule::ERASE } else { Rule::COMMANDS },
    );
    let mut rules = callisto_core::rules::DocumentRules::new(doc);
    crate::commands::declare(&mut rules, chrono::Utc::now().date_naive());
    rules.into_json()
}
