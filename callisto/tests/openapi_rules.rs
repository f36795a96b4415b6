//! The served OpenAPI document states every rule the server enforces.
//!
//! For every operation of `callisto dev`, requests are generated from the document's own
//! schemas (JSON Schema: types, lengths, patterns through `rand_regex`, formats, enums,
//! `anyOf`/`oneOf`, required properties) and judged by a real JSON Schema validator
//! (`jsonschema`, draft 2020-12, formats on). Requests the document calls valid must not be
//! refused with 400 or 422; for each declared rule, a request breaking it (and only it, as the
//! validator confirms) must be refused with a 4xx. A rule the server enforces but the document
//! does not state makes the first half fail.
//!
//! Two values are not invented, as their descriptions say: search `q` follows the query syntax
//! (a grammar JSON Schema cannot state), so it is drawn from that grammar; search cursors are
//! opaque `next_cursor` values. An `Idempotency-Key` gets a unique suffix: reusing a key for a
//! different request is a stateful rule, not a schema one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};

mod common;

/// Valid requests generated per operation.
const VALID_PER_OPERATION: usize = 30;

struct Doc {
    root: Value,
}

impl Doc {
    /// `schema` with every `$ref` to a component replaced by the component.
    fn resolve(&self, schema: &Value) -> Value {
        match schema {
            Value::Object(map) => {
                if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
                    let name = reference.trim_start_matches("#/components/schemas/");
                    let mut resolved = self.resolve(&self.root["components"]["schemas"][name]);
                    for (key, value) in map.iter().filter(|(k, _)| *k != "$ref") {
                        resolved[key.as_str()] = self.resolve(value);
                    }
                    return resolved;
                }
                Value::Object(map.iter().map(|(k, v)| (k.clone(), self.resolve(v))).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(|i| self.resolve(i)).collect()),
            other => other.clone(),
        }
    }
}

/// Whether `schema` accepts `instance`; validators are built once per schema.
fn is_valid(schema: &Value, instance: &Value) -> bool {
    static VALIDATORS: LazyLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> = LazyLock::new(Default::default);
    let key = schema.to_string();
    let validator = VALIDATORS
        .lock()
        .unwrap()
        .entry(key)
        .or_insert_with(|| {
            Arc::new(jsonschema::draft202012::options().should_validate_formats(true).build(schema).unwrap())
        })
        .clone();
    validator.is_valid(instance)
}

/// Generates instances of JSON Schemas.
struct Generator {
    rng: StdRng,
    unique: u64,
    patterns: HashMap<String, rand_regex::Regex>,
}

impl Generator {
    fn string_from_pattern(&mut self, pattern: &str, max_chars: Option<usize>) -> String {
        let regex = self
            .patterns
            .entry(pattern.to_owned())
            .or_insert_with(|| {
                rand_regex::Regex::compile(pattern.trim_start_matches('^').trim_end_matches('$'), 12).unwrap()
            })
            .clone();
        loop {
            let candidate: String = self.rng.sample(&regex);
            if max_chars.is_none_or(|max| candidate.chars().count() <= max) {
                return candidate;
            }
        }
    }

    fn string(&mut self, schema: &Value) -> String {
        let max = schema["maxLength"].as_u64().map(|m| m as usize);
        let min = schema["minLength"].as_u64().unwrap_or(0) as usize;
        if let Some(values) = schema["enum"].as_array() {
            return values.choose(&mut self.rng).unwrap().as_str().unwrap().to_owned();
        }
        match schema["format"].as_str() {
            Some("uuid") => return uuid::Uuid::new_v4().to_string(),
            Some("date") => {
                // A calendar date; the pattern, when there is one, still has the last word.
                let earliest = chrono::NaiveDate::from_ymd_opt(1800, 1, 1).unwrap();
                let span = (chrono::Utc::now().date_naive() - earliest).num_days() + 400;
                let date = earliest + chrono::Duration::days(self.rng.random_range(0..span));
                return date.to_string();
            }
            Some("email") => {
                let local = self.string_from_pattern("[a-z0-9]{1,8}(\\.[a-z0-9]{1,8})?", None);
                let domain = self.string_from_pattern("[a-z0-9]{1,10}\\.[a-z]{2,6}", None);
                return format!("{local}@{domain}");
            }
            _ => {}
        }
        if let Some(pattern) = schema["pattern"].as_str() {
            return self.string_from_pattern(pattern, max);
        }
        // No pattern: any characters at all, control characters included.
        let len = self.rng.random_range(min..=max.unwrap_or(40).min(min + 40));
        (0..len).map(|_| char::from_u32(self.rng.random_range(0..0x3000)).unwrap_or('x')).collect()
    }

    fn value(&mut self, schema: &Value) -> Value {
        for (keyword, _) in [("oneOf", ()), ("anyOf", ())] {
            if let Some(branches) = schema[keyword].as_array()
                && schema["properties"].is_null()
            {
                let branch = branches.choose(&mut self.rng).unwrap().clone();
                return self.value(&branch);
            }
        }
        let kinds: Vec<&str> = match &schema["type"] {
            Value::String(kind) => vec![kind.as_str()],
            Value::Array(kinds) => kinds.iter().filter_map(Value::as_str).collect(),
            _ => vec!["object"],
        };
        let kind = if kinds.contains(&"null") && kinds.len() > 1 && self.rng.random_bool(0.2) {
            "null"
        } else {
            kinds.iter().copied().find(|k| *k != "null").unwrap_or("null")
        };
        match kind {
            "null" => Value::Null,
            "string" => Value::String(self.string(schema)),
            "integer" => {
                let min = schema["minimum"].as_i64().unwrap_or(0);
                let max = schema["maximum"].as_i64().unwrap_or(min + 1000);
                json!(self.rng.random_range(min..=max))
            }
            "boolean" => json!(self.rng.random_bool(0.5)),
            "array" => {
                let max = schema["maxItems"].as_u64().unwrap_or(4).min(4);
                let count = self.rng.random_range(0..=max);
                Value::Array((0..count).map(|_| self.value(&schema["items"])).collect())
            }
            _ => self.object(schema),
        }
    }

    fn object(&mut self, schema: &Value) -> Value {
        let mut required: Vec<String> =
            schema["required"].as_array().into_iter().flatten().filter_map(|r| r.as_str().map(str::to_owned)).collect();
        if let Some(branches) = schema["anyOf"].as_array() {
            let branch = branches.choose(&mut self.rng).unwrap();
            required
                .extend(branch["required"].as_array().into_iter().flatten().map(|r| r.as_str().unwrap().to_owned()));
        }
        let mut object = Map::new();
        for (name, property) in schema["properties"].as_object().into_iter().flatten() {
            if required.contains(name) || self.rng.random_bool(0.6) {
                object.insert(name.clone(), self.value(property));
            }
        }
        Value::Object(object)
    }

    /// A value for parameter `parameter` of `path`; `None` to leave it out.
    fn parameter(&mut self, path: &str, parameter: &Value) -> Option<String> {
        let name = parameter["name"].as_str().unwrap();
        let required = parameter["required"] == json!(true);
        if !required && self.rng.random_bool(0.5) {
            return None;
        }
        if name == "cursor" && path == "/v1/search" {
            return None;
        }
        if name == "q" {
            return Some(self.query());
        }
        let value = match self.value(&parameter["schema"]) {
            Value::String(s) => s,
            Value::Null => return None,
            other => other.to_string(),
        };
        if name == "Idempotency-Key" {
            self.unique += 1;
            let suffix = format!("-{}", self.unique);
            let keep = 255usize.saturating_sub(suffix.len());
            return Some(format!("{}{suffix}", &value[..value.len().min(keep)]));
        }
        Some(value)
    }

    /// A search in the documented syntax.
    fn query(&mut self) -> String {
        let words = ["engine", "ada", "note", "zoë", "analytical", "bern*", "text:engine", "\"first algorithm\""];
        let operators = [" ", " AND ", " OR ", " AND NOT ", " -"];
        let count = self.rng.random_range(0..4);
        let mut q = String::new();
        for i in 0..count {
            if i > 0 {
                q.push_str(operators.choose(&mut self.rng).unwrap());
            }
            q.push_str(words.choose(&mut self.rng).unwrap());
        }
        q
    }
}

/// One request: where, with what parameters and body.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

impl Request {
    async fn send(&self, client: &reqwest::Client, base: &str) -> (StatusCode, String) {
        let method = reqwest::Method::from_bytes(self.method.to_uppercase().as_bytes()).unwrap();
        let mut request = client.request(method, format!("{base}{}", self.path)).query(&self.query);
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(body) = &self.body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }
}

/// An operation of the document, with its parameters and body schema resolved.
struct Operation {
    method: String,
    path: String,
    parameters: Vec<Value>,
    body: Option<Value>,
}

fn operations(doc: &Doc) -> Vec<Operation> {
    let mut out = Vec::new();
    for (path, item) in doc.root["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let parameters = operation["parameters"].as_array().cloned().unwrap_or_default();
            let body = operation["requestBody"]["content"]["application/json"]["schema"].clone();
            out.push(Operation {
                method: method.clone(),
                path: path.clone(),
                parameters: parameters.iter().map(|p| doc.resolve(p)).collect(),
                body: (!body.is_null()).then(|| doc.resolve(&body)),
            });
        }
    }
    out
}

impl Operation {
    /// A request the document calls valid.
    fn generate(&self, generator: &mut Generator) -> Request {
        let mut request = Request {
            method: self.method.clone(),
            path: self.path.clone(),
            query: Vec::new(),
            headers: Vec::new(),
            body: None,
        };
        for parameter in &self.parameters {
            let Some(value) = generator.parameter(&self.path, parameter) else { continue };
            assert!(
                is_valid(&parameter["schema"], &parameter_value(&parameter["schema"], &value)),
                "generated {value:?} for {} breaks its own schema",
                parameter["name"]
            );
            let name = parameter["name"].as_str().unwrap().to_owned();
            match parameter["in"].as_str().unwrap() {
                "path" => request.path = request.path.replace(&format!("{{{name}}}"), &urlencode(&value)),
                "query" => request.query.push((name, value)),
                "header" => request.headers.push((name, value)),
                other => panic!("parameter in {other}"),
            }
        }
        if let Some(schema) = &self.body {
            let body = loop {
                let candidate = generator.value(schema);
                if is_valid(schema, &candidate) {
                    break candidate;
                }
            };
            request.body = Some(body);
        }
        request
    }
}

/// The JSON value a parameter's text stands for, to validate it against its schema.
fn parameter_value(schema: &Value, text: &str) -> Value {
    match schema["type"].as_str() {
        Some("integer") => text.parse::<i64>().map(|n| json!(n)).unwrap_or(json!(text)),
        _ => json!(text),
    }
}

fn urlencode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Values that break one rule of a string schema, each checked by the validator.
fn rule_breakers(schema: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut candidates: Vec<(&str, Value)> = vec![("wrong type", json!(42))];
    if let Some(min) = schema["minLength"].as_u64() {
        candidates.push(("below minLength", json!("a".repeat(min.saturating_sub(1) as usize))));
    }
    if let Some(max) = schema["maxLength"].as_u64() {
        candidates.push(("over maxLength", json!("a".repeat(max as usize + 1))));
    }
    if schema["pattern"].is_string() {
        for bad in ["", " ", "a\u{1}b", "-x", "x y", "+1+2", "G1", "99:1"] {
            candidates.push(("pattern", json!(bad)));
        }
    }
    if schema["enum"].is_array() {
        candidates.push(("enum", json!("bogus")));
    }
    match schema["format"].as_str() {
        Some("email") => candidates.push(("format email", json!("not-an-email"))),
        Some("date") => candidates.push(("format date", json!("2020-02-30"))),
        Some("uuid") => candidates.push(("format uuid", json!("not-a-uuid"))),
        _ => {}
    }
    if let Some(max) = schema["maximum"].as_i64() {
        candidates.push(("over maximum", json!(max + 1)));
    }
    if let Some(min) = schema["minimum"].as_i64() {
        candidates.push(("below minimum", json!(min - 1)));
    }
    for (rule, value) in candidates {
        if !is_valid(schema, &value) && !out.iter().any(|(r, _)| r == rule) {
            out.push((rule.to_owned(), value));
        }
    }
    out
}

/// Requests that each break one rule of `operation`, starting from a valid `base`.
fn invalid_requests(operation: &Operation, base: &Request) -> Vec<(String, Request)> {
    let mut out = Vec::new();
    for parameter in &operation.parameters {
        let name = parameter["name"].as_str().unwrap();
        let place = parameter["in"].as_str().unwrap();
        for (rule, value) in rule_breakers(&parameter["schema"]) {
            let text = match &value {
                Value::String(s) => s.clone(),
                // On the wire every parameter is text; 42 for a string parameter is "42".
                _ if parameter["schema"]["type"] == "string" => continue,
                other => other.to_string(),
            };
            if place == "path" && text.is_empty() {
                continue; // An empty path segment is another route, not a bad value.
            }
            let mut request = base.clone();
            match place {
                "path" => request.path = operation.path.replace(&format!("{{{name}}}"), &urlencode(&text)),
                "query" => {
                    request.query.retain(|(n, _)| n != name);
                    request.query.push((name.to_owned(), text));
                }
                _ => {
                    if text.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
                        continue; // Not sendable as a header at all.
                    }
                    request.headers.retain(|(n, _)| n != name);
                    request.headers.push((name.to_owned(), text));
                }
            }
            // Other path parameters keep their valid values.
            for other in &operation.parameters {
                if other["in"] == "path" && other["name"] != name {
                    let segment = base_segment(operation, base, other["name"].as_str().unwrap());
                    request.path = request.path.replace(&format!("{{{}}}", other["name"].as_str().unwrap()), &segment);
                }
            }
            out.push((format!("{place} {name}: {rule}"), request));
        }
    }
    if let (Some(schema), Some(Value::Object(body))) = (&operation.body, &base.body) {
        let properties = schema["properties"].as_object().cloned().unwrap_or_default();
        for (name, property) in &properties {
            let mut breakers = rule_breakers(&resolve_nullable(property));
            breakers.retain(|(rule, _)| rule != "wrong type" || property["type"] == "string");
            for (rule, value) in breakers {
                let mut broken = body.clone();
                broken.insert(name.clone(), value);
                let broken = Value::Object(broken);
                if !is_valid(schema, &broken) {
                    out.push((format!("body {name}: {rule}"), Request { body: Some(broken), ..base.clone() }));
                }
            }
        }
        for required in schema["required"].as_array().into_iter().flatten() {
            let mut broken = body.clone();
            broken.remove(required.as_str().unwrap());
            out.push((
                format!("body: missing {required}"),
                Request { body: Some(Value::Object(broken)), ..base.clone() },
            ));
        }
        if schema["anyOf"].is_array() {
            out.push(("body: none of anyOf".into(), Request { body: Some(json!({})), ..base.clone() }));
        }
        let mut unknown = body.clone();
        unknown.insert("surprise".into(), json!(1));
        out.push(("body: unknown property".into(), Request { body: Some(Value::Object(unknown)), ..base.clone() }));
    }
    out
}

/// The valid value `base` holds for path parameter `name`.
fn base_segment(operation: &Operation, base: &Request, name: &str) -> String {
    let template: Vec<&str> = operation.path.split('/').collect();
    let actual: Vec<&str> = base.path.split('/').collect();
    template
        .iter()
        .zip(actual)
        .find(|(t, _)| **t == format!("{{{name}}}"))
        .map(|(_, a)| a.to_owned())
        .unwrap_or_default()
}

/// A property schema with `null` dropped from its types, so breakers target the value.
fn resolve_nullable(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(kinds) = schema["type"].as_array() {
        let kinds: Vec<Value> = kinds.iter().filter(|k| *k != "null").cloned().collect();
        schema["type"] = kinds.first().cloned().unwrap_or(Value::Null);
    }
    schema
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_document_calls_valid_is_accepted_and_each_declared_rule_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    // Generated tokens name offsets nobody wrote; such reads answer stale after this wait.
    let mut settings = common::settings(dir.path());
    settings.query.consistency_wait_ms = 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dev = callisto::services::Dev::start(&settings, listener).await.unwrap();
    let base = format!("http://{}", dev.addr);
    let client = common::client(dir.path());
    let doc = Doc { root: common::json_of(client.get(format!("{base}/openapi.json"))).await };
    let seed = std::env::var("CALLISTO_OPENAPI_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let mut generator = Generator { rng: StdRng::seed_from_u64(seed), unique: 0, patterns: HashMap::new() };

    let mut refused_valid = Vec::new();
    let mut accepted_invalid = Vec::new();
    let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let operations: Vec<Operation> = operations(&doc).into_iter().filter(|o| !o.path.starts_with("/admin/")).collect();
    assert_eq!(operations.len(), 13, "9 commands (erasure among them) and 4 reads");
    for operation in &operations {
        let key = format!("{} {}", operation.method.to_uppercase(), operation.path);
        let mut base_request = None;
        for _ in 0..VALID_PER_OPERATION {
            let request = operation.generate(&mut generator);
            let (status, body) = request.send(&client, &base).await;
            assert!(!status.is_server_error(), "{key}: {status} {body} for {request:?}");
            if status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY {
                refused_valid.push(format!("{key}: {status} {body}\n    for {request:?}"));
            } else if base_request.is_none() {
                base_request = Some(request);
            }
            counts.entry(key.clone()).or_default().0 += 1;
        }
        let base_request = base_request.unwrap_or_else(|| panic!("{key}: no valid request was accepted"));
        for (rule, request) in invalid_requests(operation, &base_request) {
            let (status, body) = request.send(&client, &base).await;
            assert!(!status.is_server_error(), "{key} with {rule}: {status} {body}");
            if !status.is_client_error() {
                accepted_invalid.push(format!("{key} with {rule}: {status}\n    for {request:?}"));
            }
            counts.entry(key.clone()).or_default().1 += 1;
        }
    }
    eprintln!("requests per operation (valid, invalid): {counts:?}");
    assert!(refused_valid.is_empty(), "the document calls these valid:\n{}", refused_valid.join("\n"));
    assert!(accepted_invalid.is_empty(), "the document calls these invalid:\n{}", accepted_invalid.join("\n"));
    assert!(counts.values().all(|(_, invalid)| *invalid > 0), "every operation had rules to break: {counts:?}");
    dev.stop().await.unwrap();
}
