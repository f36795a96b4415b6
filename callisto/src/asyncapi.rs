//! The asynchronous contract: an AsyncAPI 3 document for the person topic and its dead-letter
//! topic, generated from the same sources the code uses — the `.avsc` schemas compiled into the
//! binary, the record headers writers set, and the headers dead letters add. Served as
//! `/asyncapi.json` next to `/openapi.json`.

use callisto_avro::EventKind;
use serde_json::{Value, json};

/// Avro 1.9+ schemas, as AsyncAPI's registered schema formats name them.
const AVRO_FORMAT: &str = "application/vnd.apache.avro;version=1.9.0";

/// A header the writers put on every event record.
fn event_headers() -> Value {
    use callisto_core::log::{AUTH_METHOD_HEADER, PRINCIPAL_HEADER, SOURCE_ADDRESS_HEADER};
    let text = |description: &str| json!({"type": "string", "description": description});
    json!({
        "type": "object",
        "properties": {
            "event_id": {"type": "string", "format": "uuid", "description": "The event's id, as in the payload."},
            "event_type": text("The record's short name, e.g. `NoteAdded`."),
            "correlation_id": text("The request's correlation id, as in the payload."),
            "traceparent": text("W3C trace context of the command that wrote the event."),
            (PRINCIPAL_HEADER): text("Who asked: an API key id or a token subject."),
            (AUTH_METHOD_HEADER): text("How the caller proved it: `api_key` or `jwt`."),
            (SOURCE_ADDRESS_HEADER): text("The caller's network address."),
        },
        "required": ["event_id", "event_type", "correlation_id"]
    })
}

/// The event headers plus what a dead letter adds.
fn dead_letter_headers() -> Value {
    use callisto_projectors::dlq;
    let mut headers = event_headers();
    let properties = headers["properties"].as_object_mut().expect("an object");
    for (name, description) in [
        (dlq::ERROR, "Why the projection could not decode or apply the event (no personal data)."),
        (dlq::PROJECTION, "The projection that failed: `documents` or `search`."),
        (dlq::SOURCE_TOPIC, "The topic the event came from."),
        (dlq::SOURCE_PARTITION, "Its partition there."),
        (dlq::SOURCE_OFFSET, "Its offset there."),
        (dlq::FAILED_AT, "When it was dead-lettered, RFC 3339."),
    ] {
        properties.insert(name.to_owned(), json!({"type": "string", "description": description}));
    }
    headers["required"].as_array_mut().expect("an array").push(json!(dlq::ERROR));
    headers
}

/// The document for `topic` with `partitions` partitions.
pub fn document(topic: &str, partitions: u32) -> Value {
    let dlq_topic = callisto_projectors::dlq::topic_for(topic);
    let mut messages = serde_json::Map::new();
    let mut dead_letters = serde_json::Map::new();
    let mut refs = serde_json::Map::new();
    let mut dead_refs = serde_json::Map::new();
    for kind in EventKind::ALL {
        let schema: Value = serde_json::from_str(kind.schema_text()).expect("a built-in schema is JSON");
        let name = kind.name();
        let message = |headers: Value, summary: String| {
            json!({
                "name": name,
                "title": name,
                "summary": summary,
                "contentType": "application/octet-stream",
                "headers": headers,
                "payload": {"schemaFormat": AVRO_FORMAT, "schema": schema},
                "bindings": {"kafka": {
                    "key": {"type": "string", "format": "uuid", "description": "The person id: all of a person's events share a partition."},
                    "schemaIdLocation": "payload",
                    "schemaIdPayloadEncoding": "confluent",
                    "schemaLookupStrategy": "TopicRecordNameStrategy",
                    "bindingVersion": "0.5.0"
                }},
                // The schema file in Callisto's repository that the payload schema is compiled from.
                "x-schema-file": format!("avro/schemas/{name}.avsc")
            })
        };
        let doc = schema["doc"].as_str().unwrap_or_default().to_owned();
        messages.insert(name.to_owned(), message(event_headers(), doc.clone()));
        let dead = format!("{name}DeadLetter");
        dead_letters.insert(
            dead.clone(),
            message(dead_letter_headers(), format!("{doc} Dead-lettered with its original bytes.")),
        );
        refs.insert(name.to_owned(), json!({"$ref": format!("#/components/messages/{name}")}));
        dead_refs.insert(dead.clone(), json!({"$ref": format!("#/components/messages/{dead}")}));
    }
    messages.extend(dead_letters);
    let channel_messages = |channel: &str, refs: &serde_json::Map<String, Value>| -> Vec<Value> {
        refs.keys().map(|m| json!({"$ref": format!("#/channels/{channel}/messages/{m}")})).collect()
    };
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Callisto events",
            "version": "2",
            "description": "The person topic: one Avro record per event in the Confluent wire format (magic byte 0, a 4-byte big-endian schema id, Avro binary), keyed by person id. Personal fields are sealed per person (the `sealed` field; see the README's Personal data and erasure). The dead-letter topic holds events a projection could not decode or apply, byte for byte, with headers saying why."
        },
        "defaultContentType": "application/octet-stream",
        "channels": {
            "persons": {
                "address": topic,
                "title": "Person events",
                "messages": refs,
                "bindings": {"kafka": {"topic": topic, "partitions": partitions, "bindingVersion": "0.5.0"}}
            },
            "deadLetters": {
                "address": dlq_topic,
                "title": "Dead letters",
                "messages": dead_refs,
                "bindings": {"kafka": {"topic": dlq_topic, "partitions": partitions, "bindingVersion": "0.5.0"}}
            }
        },
        "operations": {
            "appendPersonEvent": {
                "action": "send",
                "summary": "Writers append one event per accepted command.",
                "channel": {"$ref": "#/channels/persons"},
                "messages": channel_messages("persons", &refs)
            },
            "projectPersonEvents": {
                "action": "receive",
                "summary": "Projectors, export and replay read the topic per partition.",
                "channel": {"$ref": "#/channels/persons"},
                "messages": channel_messages("persons", &refs)
            },
            "deadLetter": {
                "action": "send",
                "summary": "Projectors dead-letter what they cannot decode or apply.",
                "channel": {"$ref": "#/channels/deadLetters"},
                "messages": channel_messages("deadLetters", &dead_refs)
            }
        },
        "components": {"messages": messages}
    })
}
