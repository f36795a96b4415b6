//! Command bodies, their validation, and the events they become.
//!
//! Validation collects every invalid field, so a client fixes a form in one round trip.
//! Limits are enforced in characters, not bytes. [`declare`] states the same limits and
//! patterns (from [`callisto_core::rules`]) in the OpenAPI document.

use callisto_avro::Address;
use callisto_core::http::FieldError;
use callisto_core::rules::{self, DocumentRules};
use chrono::{NaiveDate, Utc};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_EMAIL_CHARS: usize = 254;
pub const MAX_PHONE_CHARS: usize = 32;
pub const MAX_ADDRESS_LINE_CHARS: usize = 200;
pub const MAX_CITY_CHARS: usize = 100;
pub const MAX_POSTCODE_CHARS: usize = 20;
pub const MAX_NOTE_CHARS: usize = 10_000;
pub const MAX_TAG_CHARS: usize = rules::MAX_TAG_CHARS;
pub const MAX_TAGS: usize = 50;
pub const MAX_REASON_CHARS: usize = 1_000;

/// Body of `POST /v1/persons`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterPerson {
    /// Optional client-chosen id; one is generated when absent.
    pub person_id: Option<Uuid>,
    /// 1–200 characters.
    pub given_name: String,
    /// 1–200 characters.
    pub family_name: String,
    pub email: Option<String>,
    /// Digits, spaces, `+ ( ) - .`; 3–32 characters.
    pub phone: Option<String>,
    /// `YYYY-MM-DD`, not in the future.
    pub date_of_birth: Option<String>,
    pub address: Option<AddressBody>,
    /// Up to 50 tags; see `TagBody` for the tag syntax.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Body of `PUT /v1/persons/{id}/name`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenamePerson {
    pub given_name: String,
    pub family_name: String,
}

/// Body of `PUT /v1/persons/{id}/contact`; at least one field. An absent field is unchanged.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeContact {
    pub email: Option<String>,
    pub phone: Option<String>,
}

/// A postal address; also the body of `PUT /v1/persons/{id}/address`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressBody {
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postcode: String,
    /// ISO 3166-1 alpha-2 code, e.g. `GB`.
    pub country: String,
}

/// Body of `POST /v1/persons/{id}/notes`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNote {
    /// 1–10,000 characters.
    pub text: String,
}

/// Body of `POST /v1/persons/{id}/tags`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagBody {
    /// 1–64 characters: letters, digits, `_ . : -`, starting with a letter or digit. Stored
    /// lower-cased, so `VIP` and `vip` are one tag.
    pub tag: String,
}

/// Body of `POST /v1/persons/{id}/archive`; may be empty.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchivePerson {
    pub reason: Option<String>,
}

/// Accumulates field errors while normalising values.
#[derive(Debug, Default)]
pub struct Checker {
    pub errors: Vec<FieldError>,
}

impl Checker {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError { field: field.to_owned(), message: message.into() });
    }

    /// A required, trimmed, non-empty text of at most `max` characters, without control
    /// characters (newlines allowed only where `multiline`).
    pub fn text(&mut self, field: &str, value: &str, max: usize, multiline: bool) -> String {
        let trimmed = value.trim();
        let chars = trimmed.chars().count();
        if chars == 0 {
            self.fail(field, "must not be empty");
        } else if chars > max {
            self.fail(field, format!("must be at most {max} characters, got {chars}"));
        } else if trimmed.chars().any(|c| c.is_control() && !(multiline && (c == '\n' || c == '\r' || c == '\t'))) {
            self.fail(field, "must not contain control characters");
        }
        trimmed.to_owned()
    }

    pub fn optional_text(&mut self, field: &str, value: Option<&str>, max: usize) -> Option<String> {
        value.map(|v| self.text(field, v, max, false))
    }

    pub fn email(&mut self, field: &str, value: Option<&str>) -> Option<String> {
        let value = value?.trim();
        if value.chars().count() > MAX_EMAIL_CHARS {
            self.fail(field, format!("must be at most {MAX_EMAIL_CHARS} characters"));
        } else if !email_address::EmailAddress::is_valid(value) {
            self.fail(field, "is not a valid email address");
        }
        Some(value.to_owned())
    }

    pub fn phone(&mut self, field: &str, value: Option<&str>) -> Option<String> {
        let value = value?.trim();
        if value.chars().count() > MAX_PHONE_CHARS {
            self.fail(field, format!("must be at most {MAX_PHONE_CHARS} characters"));
        } else if !rules::PHONE.is_match(value) {
            self.fail(field, "is not a phone number: use digits, spaces and + ( ) - .");
        }
        Some(value.to_owned())
    }

    pub fn date_of_birth(&mut self, field: &str, value: Option<&str>) -> Option<NaiveDate> {
        let value = value?;
        match NaiveDate::parse_from_str(value, "%Y-%m-%d") {
            Ok(date) if date > Utc::now().date_naive() => {
                self.fail(field, "must not be in the future");
                None
            }
            Ok(date) if date < NaiveDate::from_ymd_opt(rules::EARLIEST_BIRTH_YEAR, 1, 1).expect("valid date") => {
                self.fail(field, "must not be before 1800-01-01");
                None
            }
            Ok(date) => Some(date),
            Err(_) => {
                self.fail(field, format!("{value:?} is not a date in YYYY-MM-DD form"));
                None
            }
        }
    }

    pub fn address(&mut self, field: &str, body: &AddressBody) -> Address {
        let sub = |name: &str| format!("{field}.{name}");
        let country = body.country.trim().to_ascii_uppercase();
        if !rules::COUNTRY.is_match(&country) {
            self.fail(&sub("country"), "must be an ISO 3166-1 alpha-2 code such as GB");
        }
        Address {
            line1: self.text(&sub("line1"), &body.line1, MAX_ADDRESS_LINE_CHARS, false),
            line2: self.optional_text(&sub("line2"), body.line2.as_deref(), MAX_ADDRESS_LINE_CHARS),
            city: self.text(&sub("city"), &body.city, MAX_CITY_CHARS, false),
            postcode: self.text(&sub("postcode"), &body.postcode, MAX_POSTCODE_CHARS, false),
            country,
        }
    }

    pub fn tag(&mut self, field: &str, value: &str) -> String {
        rules::normalize_tag(value).unwrap_or_else(|| {
            self.fail(
                field,
                format!("must be 1–{MAX_TAG_CHARS} letters, digits or _ . : -, starting with a letter or digit"),
            );
            value.trim().to_ascii_lowercase()
        })
    }

    pub fn tags(&mut self, field: &str, values: &[String]) -> Vec<String> {
        if values.len() > MAX_TAGS {
            self.fail(field, format!("at most {MAX_TAGS} tags"));
        }
        let mut tags: Vec<String> = Vec::with_capacity(values.len());
        for (i, value) in values.iter().enumerate() {
            let tag = self.tag(&format!("{field}[{i}]"), value);
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
        tags
    }

    pub fn finish<T>(self, value: T) -> Result<T, Vec<FieldError>> {
        if self.errors.is_empty() { Ok(value) } else { Err(self.errors) }
    }
}

/// States the checks above in the document: lengths, patterns, formats, and the contact body's
/// "email, phone or both". `today` bounds dates of birth.
pub fn declare(doc: &mut DocumentRules, today: NaiveDate) {
    let name = rules::text(MAX_NAME_CHARS);
    let email = json!({"type": "string", "format": "email", "maxLength": MAX_EMAIL_CHARS});
    let phone = rules::string(None, Some(MAX_PHONE_CHARS), Some(rules::PHONE_PATTERN));
    let date_of_birth = json!({"type": "string", "format": "date", "pattern": rules::date_not_after_pattern(today)});
    doc.property("RegisterPerson", "given_name", name.clone())
        .property("RegisterPerson", "family_name", name.clone())
        .property("RegisterPerson", "email", email.clone())
        .property("RegisterPerson", "phone", phone.clone())
        .property("RegisterPerson", "date_of_birth", date_of_birth)
        .property("RegisterPerson", "tags", json!({"type": "array", "maxItems": MAX_TAGS, "items": rules::tag()}))
        .property("RenamePerson", "given_name", name.clone())
        .property("RenamePerson", "family_name", name)
        // Present means a value: null is not "unchanged" but no contact detail at all.
        .property("ChangeContact", "email", email)
        .property("ChangeContact", "phone", phone)
        .not_null("ChangeContact", "email")
        .not_null("ChangeContact", "phone")
        .component("ChangeContact", json!({"anyOf": [{"required": ["email"]}, {"required": ["phone"]}]}))
        .property("AddressBody", "line1", rules::text(MAX_ADDRESS_LINE_CHARS))
        .property("AddressBody", "line2", rules::text(MAX_ADDRESS_LINE_CHARS))
        .property("AddressBody", "city", rules::text(MAX_CITY_CHARS))
        .property("AddressBody", "postcode", rules::text(MAX_POSTCODE_CHARS))
        .property("AddressBody", "country", rules::string(None, None, Some(rules::COUNTRY_PATTERN)))
        .property("AddNote", "text", rules::string(Some(1), Some(MAX_NOTE_CHARS), Some(rules::MULTILINE_TEXT_PATTERN)))
        .property("TagBody", "tag", rules::tag())
        .property("ArchivePerson", "reason", rules::text(MAX_REASON_CHARS))
        .parameter("tag", Some("/v1/persons/{id}/tags/"), rules::tag())
        .parameter("Idempotency-Key", None, visible_ascii(MAX_IDEMPOTENCY_KEY_CHARS))
        .parameter("X-Correlation-Id", None, visible_ascii(MAX_CORRELATION_ID_CHARS));
}

/// Header values: 1 to `max` visible ASCII characters.
fn visible_ascii(max: usize) -> serde_json::Value {
    rules::string(Some(1), Some(max), Some(rules::VISIBLE_ASCII_PATTERN))
}

pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;
pub const MAX_CORRELATION_ID_CHARS: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_limits_count_characters() {
        let mut c = Checker::default();
        assert_eq!(c.text("n", "  Zoë  ", 3, false), "Zoë");
        assert!(c.errors.is_empty());
        c.text("n", "Zoëy", 3, false);
        c.text("n", "   ", 3, false);
        c.text("n", "a\u{0}b", 3, false);
        assert_eq!(c.errors.len(), 3);
        let mut c = Checker::default();
        c.text("n", "line\nbreak", 100, true);
        assert!(c.errors.is_empty(), "notes may span lines");
    }

    #[test]
    fn contact_and_dates() {
        let mut c = Checker::default();
        c.email("email", Some("ada@example.org"));
        c.phone("phone", Some("+44 (20) 7946-0000"));
        assert_eq!(c.date_of_birth("dob", Some("1990-02-28")), NaiveDate::from_ymd_opt(1990, 2, 28));
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        c.email("email", Some("not-an-email"));
        c.phone("phone", Some("12a"));
        c.phone("phone", Some("12+3"));
        c.date_of_birth("dob", Some("1990-02-30"));
        c.date_of_birth("dob", Some("3000-01-01"));
        let fields: Vec<_> = c.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["email", "phone", "phone", "dob", "dob"]);
    }

    #[test]
    fn tags_are_normalised_and_deduplicated() {
        let mut c = Checker::default();
        let tags = c.tags("tags", &["VIP".into(), "vip".into(), "team:blue".into()]);
        assert_eq!(tags, ["vip", "team:blue"]);
        c.tags("tags", &["-bad".into(), "has space".into(), String::new()]);
        assert_eq!(c.errors.len(), 3);
        assert_eq!(c.errors[0].field, "tags[0]");
    }
}
