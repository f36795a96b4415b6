//! Input rules in one place: what the handlers enforce and what the OpenAPI document declares
//! come from the same constants and patterns here, so the two cannot drift apart.
//!
//! Patterns are written in the subset of regular-expression syntax that ECMA-262 (what JSON
//! Schema's `pattern` means) and Rust's `regex` read alike: classes, `\x` escapes, `\s`,
//! quantifiers and alternation. A pattern is at least as strict as the check behind it, so a
//! value the document calls valid is never refused.

use std::sync::LazyLock;

use serde_json::{Value, json};

/// Single-line text: at least one character that is not white space, and no control
/// characters (what `char::is_control` means: U+0000–U+001F and U+007F–U+009F).
pub const TEXT_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$";
/// Multi-line text: as [`TEXT_PATTERN`], but tab, line feed and carriage return are allowed.
pub const MULTILINE_TEXT_PATTERN: &str =
    r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*$";
/// A tag: 1–64 letters, digits or `_ . : -`, starting with a letter or digit.
pub const TAG_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$";
pub const MAX_TAG_CHARS: usize = 64;
/// A phone number: digits, spaces and `( ) - .`, at least three digits, `+` only in front.
pub const PHONE_PATTERN: &str = r"^\+?[ ().\-]*(?:[0-9][ ().\-]*){3,}$";
/// An ISO 3166-1 alpha-2 country code, either case.
pub const COUNTRY_PATTERN: &str = r"^[A-Za-z]{2}$";
/// Header values such as `Idempotency-Key` and `X-Correlation-Id`: visible ASCII only.
pub const VISIBLE_ASCII_PATTERN: &str = r"^[\x21-\x7E]+$";
/// Query text: anything but control characters.
pub const QUERY_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F]*$";
/// The earliest date of birth accepted.
pub const EARLIEST_BIRTH_YEAR: i32 = 1800;

/// The patterns the handlers check values against: exactly what the document declares.
pub static TAG: LazyLock<regex::Regex> = LazyLock::new(|| compile(TAG_PATTERN));
pub static PHONE: LazyLock<regex::Regex> = LazyLock::new(|| compile(PHONE_PATTERN));
pub static COUNTRY: LazyLock<regex::Regex> = LazyLock::new(|| compile(COUNTRY_PATTERN));

fn compile(pattern: &str) -> regex::Regex {
    regex::Regex::new(pattern).expect("rule patterns compile")
}

/// A tag as stored (trimmed, lower case), or `None` when it breaks [`TAG_PATTERN`] or
/// [`MAX_TAG_CHARS`]. Writers and the query API's tag filter use the same rule.
pub fn normalize_tag(raw: &str) -> Option<String> {
    let tag = raw.trim().to_ascii_lowercase();
    (tag.chars().count() <= MAX_TAG_CHARS && TAG.is_match(&tag)).then_some(tag)
}

/// Alternation of `items`, for patterns that enumerate what is allowed.
fn any_of(items: impl IntoIterator<Item = String>) -> String {
    format!("(?:{})", items.into_iter().collect::<Vec<_>>().join("|"))
}

/// `YYYY-MM-DD` from [`EARLIEST_BIRTH_YEAR`] up to and including `today`. Built when the
/// document is; a day later the server also takes the new day, so the document only errs on
/// the strict side.
pub fn date_not_after_pattern(today: chrono::NaiveDate) -> String {
    use chrono::Datelike;
    let (year, month, day) = (today.year(), today.month(), today.day());
    let two = |n: u32| format!("{n:02}");
    let any_month = r"[0-9]{2}";
    let any_day = r"[0-9]{2}";
    let earlier_years = any_of((EARLIEST_BIRTH_YEAR..year).map(|y| y.to_string()));
    let earlier_months = any_of((1..month).map(two));
    let days = any_of((1..=day).map(two));
    let mut branches = vec![format!("{earlier_years}-{any_month}-{any_day}")];
    if month > 1 {
        branches.push(format!("{year}-{earlier_months}-{any_day}"));
    }
    branches.push(format!("{year}-{}-{days}", two(month)));
    format!("^(?:{})$", branches.join("|"))
}

/// `partition:offset` for a topic of `partitions` partitions; offsets up to 19 digits fit a
/// 64-bit offset.
pub fn token_pattern(partitions: u32) -> String {
    format!("^{}:[0-9]{{1,19}}$", any_of((0..partitions).map(|p| p.to_string())))
}

/// A string schema with these constraints.
pub fn string(min_length: Option<usize>, max_length: Option<usize>, pattern: Option<&str>) -> Value {
    let mut schema = json!({"type": "string"});
    if let Some(min) = min_length {
        schema["minLength"] = json!(min);
    }
    if let Some(max) = max_length {
        schema["maxLength"] = json!(max);
    }
    if let Some(pattern) = pattern {
        schema["pattern"] = json!(pattern);
    }
    schema
}

/// Required text of 1 to `max` characters.
pub fn text(max: usize) -> Value {
    string(Some(1), Some(max), Some(TEXT_PATTERN))
}

pub fn tag() -> Value {
    string(Some(1), Some(MAX_TAG_CHARS), Some(TAG_PATTERN))
}

/// Edits of a served OpenAPI document, applied to its JSON form: JSON Schema keywords such as
/// an `anyOf` of `required` lists beside `properties` have no place in utoipa's model, so the
/// document is served as JSON from here on.
pub struct DocumentRules {
    doc: Value,
}

impl DocumentRules {
    pub fn new(doc: utoipa::openapi::OpenApi) -> Self {
        Self { doc: serde_json::to_value(doc).expect("an OpenAPI document serializes") }
    }

    /// Merges `constraints` into property `property` of component schema `component`, keeping
    /// whether it may be null (`type: [string, null]`); [`Self::not_null`] drops that.
    pub fn property(&mut self, component: &str, property: &str, constraints: Value) -> &mut Self {
        let schema = &mut self.doc["components"]["schemas"][component]["properties"][property];
        assert!(schema.is_object(), "{component}.{property} is not in the document");
        merge(schema, constraints);
        self
    }

    /// Makes property `property` of `component` a plain string: present means a value.
    pub fn not_null(&mut self, component: &str, property: &str) -> &mut Self {
        self.doc["components"]["schemas"][component]["properties"][property]["type"] = json!("string");
        self
    }

    /// Sets keywords on component schema `component` itself (`anyOf`, …).
    pub fn component(&mut self, component: &str, keywords: Value) -> &mut Self {
        let schema = &mut self.doc["components"]["schemas"][component];
        assert!(schema.is_object(), "{component} is not in the document");
        merge(schema, keywords);
        self
    }

    /// Sets the schema of parameter `name` on every operation that takes it, or only on paths
    /// starting with `path_prefix`.
    pub fn parameter(&mut self, name: &str, path_prefix: Option<&str>, schema: Value) -> &mut Self {
        self.set_parameter(name, |path| path_prefix.is_none_or(|prefix| path.starts_with(prefix)), schema)
    }

    /// Sets the schema of parameter `name` on path `path` alone.
    pub fn exact_parameter(&mut self, path: &str, name: &str, schema: Value) -> &mut Self {
        self.set_parameter(name, |p| p == path, schema)
    }

    fn set_parameter(&mut self, name: &str, on: impl Fn(&str) -> bool, schema: Value) -> &mut Self {
        let mut found = false;
        let paths = self.doc["paths"].as_object_mut().expect("paths");
        for (_, item) in paths.iter_mut().filter(|(path, _)| on(path)) {
            for operation in item.as_object_mut().into_iter().flat_map(|o| o.values_mut()) {
                for parameter in operation["parameters"].as_array_mut().into_iter().flatten() {
                    if parameter["name"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)) {
                        // Optional parameters are absent rather than null, so no null type.
                        parameter["schema"] = schema.clone();
                        found = true;
                    }
                }
            }
        }
        assert!(found, "no operation takes parameter {name} there");
        self
    }

    pub fn into_json(self) -> Value {
        self.doc
    }
}

/// Adds `other`'s paths, component schemas and security schemes to `into`, as documents of
/// services served together on one listener.
pub fn merge_documents(into: &mut Value, other: Value) {
    for section in [&["paths"][..], &["components", "schemas"], &["components", "securitySchemes"]] {
        let mut source = &other;
        for key in section {
            source = &source[*key];
        }
        let Some(entries) = source.as_object() else { continue };
        let mut target = &mut *into;
        for key in section {
            if target[*key].is_null() {
                target[*key] = json!({});
            }
            target = &mut target[*key];
        }
        for (name, value) in entries {
            match (section, target[name.as_str()].as_object_mut(), value.as_object()) {
                // One path can have operations from both documents (POST and GET /v1/persons).
                (["paths"], Some(existing), Some(operations)) => {
                    existing.extend(operations.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                _ => target[name.as_str()] = value.clone(),
            }
        }
    }
}

/// Merges `extra` into `schema`; a string-typed `extra` keeps a nullable `schema` nullable.
fn merge(schema: &mut Value, extra: Value) {
    let was_nullable = schema["type"].as_array().is_some_and(|t| t.iter().any(|t| t == "null"));
    let Value::Object(extra) = extra else { return };
    for (key, value) in extra {
        schema[key.as_str()] = value;
    }
    if was_nullable && let Some(kind) = schema["type"].as_str().map(str::to_owned) {
        schema["type"] = json!([kind, "null"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_documents_keep_every_operation_of_a_shared_path() {
        let mut writer = json!({"paths": {"/v1/persons": {"post": {}}}, "components": {"schemas": {"A": {}}}});
        let reader = json!({"paths": {"/v1/persons": {"get": {}}, "/v1/search": {"get": {}}}, "components": {"schemas": {"B": {}}}});
        merge_documents(&mut writer, reader);
        assert_eq!(writer["paths"]["/v1/persons"], json!({"post": {}, "get": {}}));
        assert!(writer["paths"]["/v1/search"]["get"].is_object());
        assert_eq!(writer["components"]["schemas"], json!({"A": {}, "B": {}}));
    }

    #[test]
    fn patterns_mean_what_the_checks_mean() {
        let text = compile(TEXT_PATTERN);
        for ok in ["Ada", "  Zoë  ", "O'Brien-Smith", "李"] {
            assert!(text.is_match(ok), "{ok:?}");
        }
        for bad in ["", "   ", "a\u{7}b", "tab\there", "x\u{85}"] {
            assert!(!text.is_match(bad), "{bad:?}");
        }
        let multiline = compile(MULTILINE_TEXT_PATTERN);
        assert!(multiline.is_match("line one\nline two\ttab"));
        assert!(!multiline.is_match("\n\t ") && !multiline.is_match("bell\u{7}"));
        assert_eq!(normalize_tag(" VIP "), Some("vip".to_owned()));
        assert_eq!(normalize_tag("A1:b.c-d_e"), Some("a1:b.c-d_e".to_owned()));
        for bad in ["-vip", "v ip", "", &"t".repeat(MAX_TAG_CHARS + 1)] {
            assert_eq!(normalize_tag(bad), None, "{bad:?}");
        }
        let phone = &*PHONE;
        assert!(phone.is_match("+44 20 7946 0000") && phone.is_match("(030) 123-45.6"));
        assert!(!phone.is_match("12") && !phone.is_match("44+1234") && !phone.is_match("12a45"));
        assert!(COUNTRY.is_match("gb") && !COUNTRY.is_match("GBR"));
    }

    #[test]
    fn date_and_token_patterns_enumerate_what_is_allowed() {
        let today = chrono::NaiveDate::from_ymd_opt(2026, 11, 25).unwrap();
        let dates = regex::Regex::new(&date_not_after_pattern(today)).unwrap();
        for ok in ["1800-01-01", "1999-12-31", "2025-12-31", "2026-10-31", "2026-11-01", "2026-11-25"] {
            assert!(dates.is_match(ok), "{ok}");
        }
        for bad in ["1799-12-31", "2026-11-26", "2026-12-01", "2027-01-01", "26-11-01"] {
            assert!(!dates.is_match(bad), "{bad}");
        }
        let january = chrono::NaiveDate::from_ymd_opt(2027, 1, 3).unwrap();
        let dates = regex::Regex::new(&date_not_after_pattern(january)).unwrap();
        assert!(dates.is_match("2027-01-03") && !dates.is_match("2027-01-04") && dates.is_match("2026-12-31"));
        let tokens = regex::Regex::new(&token_pattern(12)).unwrap();
        assert!(tokens.is_match("0:0") && tokens.is_match("11:18446744073709551"));
        assert!(!tokens.is_match("12:0") && !tokens.is_match("1:") && !tokens.is_match("01:2"));
    }
}
