//! Query parameters. Each arrives as text and is parsed here, so a bad value is answered with a
//! 400 problem naming the parameter rather than a generic deserialization error.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use callisto_core::http::Problem;
use callisto_core::readmodel::Status;
use callisto_core::token::ConsistencyToken;
use serde::Deserialize;
use uuid::Uuid;

pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 100;
pub const MAX_QUERY_CHARS: usize = 1_000;
/// Deepest hit reachable by paging a search, as Elasticsearch's `max_result_window`.
pub const MAX_SEARCH_WINDOW: usize = 10_000;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only persons with this tag.
    pub tag: Option<String>,
    /// `active` or `archived`.
    pub status: Option<String>,
    /// 1–100, default 20.
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// A consistency token; same as the `Callisto-Consistency-Token` header.
    pub after: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TimelineParams {
    pub limit: Option<String>,
    pub cursor: Option<String>,
    pub after: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// Query-string syntax: terms, "phrases", AND/OR/NOT, field:term (fields: name, email,
    /// address, tag, text, status), prefix*. Empty matches everything.
    pub q: Option<String>,
    pub tag: Option<String>,
    pub status: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
    pub after: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GetParams {
    pub after: Option<String>,
}

/// A cursor the search returned: hits before it, then for key paging `~` and the sort key.
/// Opaque to clients, who pass back what `next_cursor` gave them.
pub const SEARCH_CURSOR_PATTERN: &str = r"^[0-9]{1,20}(?:~[A-Za-z0-9_\-]{1,1024})?$";
/// A timeline cursor: the log offset to continue after.
pub const OFFSET_CURSOR_PATTERN: &str = r"^[0-9]{1,19}$";

/// States the parsing rules below in the document.
pub fn declare(doc: &mut callisto_core::rules::DocumentRules, partitions: u32) {
    use callisto_core::rules;
    use serde_json::json;
    let token = rules::string(None, None, Some(&rules::token_pattern(partitions)));
    doc.parameter(
        "limit",
        None,
        json!({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}),
    )
    .parameter("status", None, json!({"type": "string", "enum": ["active", "archived"]}))
    .parameter("tag", None, rules::tag())
    .parameter("q", None, rules::string(None, Some(MAX_QUERY_CHARS), Some(rules::QUERY_PATTERN)))
    .parameter("cursor", Some("/v1/persons/{id}/timeline"), rules::string(None, None, Some(OFFSET_CURSOR_PATTERN)))
    .parameter("cursor", Some("/v1/search"), rules::string(None, None, Some(SEARCH_CURSOR_PATTERN)))
    .parameter("after", None, token.clone())
    .parameter("Callisto-Consistency-Token", None, token);
    // Person lists page by person id.
    doc.exact_parameter("/v1/persons", "cursor", json!({"type": "string", "format": "uuid"}));
}

fn bad(field: &str, message: impl Into<String>) -> Problem {
    let message = message.into();
    Problem::malformed(format!("{field}: {message}")).with_field(field, message)
}

pub fn limit(raw: Option<&str>) -> Result<usize, Problem> {
    let Some(raw) = raw else { return Ok(DEFAULT_LIMIT) };
    match raw.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(bad("limit", format!("must be an integer from 1 to {MAX_LIMIT}"))),
    }
}

pub fn status(raw: Option<&str>) -> Result<Option<Status>, Problem> {
    raw.map(|s| Status::parse(s).ok_or_else(|| bad("status", "must be active or archived"))).transpose()
}

/// Tags are stored lower-cased with the writer's character set; anything else cannot match.
pub fn tag(raw: Option<&str>) -> Result<Option<String>, Problem> {
    let Some(raw) = raw else { return Ok(None) };
    callisto_core::rules::normalize_tag(raw)
        .map(Some)
        .ok_or_else(|| bad("tag", "must be 1–64 letters, digits or _ . : -, starting with a letter or digit"))
}

pub fn person_cursor(raw: Option<&str>) -> Result<Option<Uuid>, Problem> {
    raw.map(|c| Uuid::parse_str(c).map_err(|_| bad("cursor", "is not a cursor this API returned"))).transpose()
}

pub fn offset_cursor(raw: Option<&str>) -> Result<Option<u64>, Problem> {
    raw.map(|c| c.parse::<u64>().map_err(|_| bad("cursor", "is not a cursor this API returned"))).transpose()
}

/// Where a search page starts: hits before it, and the index's sort key of the last one when
/// the index pages by key.
pub type SearchCursor = (usize, Option<Vec<serde_json::Value>>);

/// A search cursor is `<hits before>` or, for an index that pages by key,
/// `<hits before>~<base64url JSON sort key>`. Offset paging stops at [`MAX_SEARCH_WINDOW`];
/// key paging does not.
pub fn search_cursor(raw: Option<&str>) -> Result<SearchCursor, Problem> {
    let not_ours = || bad("cursor", "is not a cursor this API returned");
    let Some(raw) = raw else { return Ok((0, None)) };
    let (offset, key) = match raw.split_once('~') {
        Some((offset, key)) => (offset, Some(key)),
        None => (raw, None),
    };
    let offset = offset.parse::<usize>().map_err(|_| not_ours())?;
    match key {
        Some(key) => {
            let bytes = URL_SAFE_NO_PAD.decode(key).map_err(|_| not_ours())?;
            let key: Vec<serde_json::Value> = serde_json::from_slice(&bytes).map_err(|_| not_ours())?;
            Ok((offset, Some(key)))
        }
        None if offset <= MAX_SEARCH_WINDOW => Ok((offset, None)),
        None => Err(bad("cursor", format!("searches page at most {MAX_SEARCH_WINDOW} hits deep; refine the query"))),
    }
}

/// The cursor of the page after `reached` hits; `None` when offset paging hit its limit.
pub fn next_search_cursor(reached: usize, last_sort: Option<&[serde_json::Value]>) -> Option<String> {
    match last_sort {
        Some(key) => Some(format!("{reached}~{}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).ok()?))),
        None => (reached < MAX_SEARCH_WINDOW).then(|| reached.to_string()),
    }
}

pub fn query(raw: Option<&str>) -> Result<String, Problem> {
    let q = raw.unwrap_or_default();
    if q.chars().count() > MAX_QUERY_CHARS {
        return Err(bad("q", format!("must be at most {MAX_QUERY_CHARS} characters")));
    }
    if q.chars().any(char::is_control) {
        return Err(bad("q", "must not contain control characters"));
    }
    Ok(q.to_owned())
}

/// The tokens from the header and the `after` parameter. Given both, a read waits for both:
/// each names a write the caller wants to see.
pub fn token(header: Option<&str>, after: Option<&str>, partitions: u32) -> Result<Vec<ConsistencyToken>, Problem> {
    let parse = |field: &str, raw: &str| -> Result<ConsistencyToken, Problem> {
        let token: ConsistencyToken =
            raw.parse().map_err(|e: callisto_core::token::BadToken| bad(field, e.to_string()))?;
        if token.partition >= partitions {
            return Err(bad(
                field,
                format!("partition {} does not exist (the topic has {partitions})", token.partition),
            ));
        }
        Ok(token)
    };
    let from_header = header.map(|h| parse("Callisto-Consistency-Token", h)).transpose()?;
    let from_query = after.map(|a| parse("after", a)).transpose()?;
    Ok(from_header.into_iter().chain(from_query).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_cursors() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(Some("100")).unwrap(), 100);
        for bad in ["0", "101", "-1", "ten", ""] {
            assert!(limit(Some(bad)).is_err(), "{bad}");
        }
        assert!(person_cursor(Some("x")).is_err());
        assert!(offset_cursor(Some("-3")).is_err());
        assert!(search_cursor(Some("10001")).is_err());
        assert_eq!(search_cursor(Some("40")).unwrap(), (40, None));
        let keyed = next_search_cursor(20_000, Some(&[serde_json::json!(1.5), serde_json::json!("note:7")])).unwrap();
        assert_eq!(
            search_cursor(Some(&keyed)).unwrap(),
            (20_000, Some(vec![serde_json::json!(1.5), serde_json::json!("note:7")]))
        );
        assert!(search_cursor(Some("20~not-base64!")).is_err());
        assert!(search_cursor(Some("20~e30")).is_err(), "a JSON object is not a sort key");
        assert_eq!(next_search_cursor(MAX_SEARCH_WINDOW, None), None);
    }

    #[test]
    fn tokens() {
        let at = |partition, offset| ConsistencyToken { partition, offset };
        assert_eq!(token(Some("3:9"), None, 12).unwrap(), vec![at(3, 9)]);
        assert_eq!(token(None, Some("3:9"), 12).unwrap(), vec![at(3, 9)]);
        assert_eq!(token(Some("3:9"), Some("5:8"), 12).unwrap(), vec![at(3, 9), at(5, 8)], "both are waited for");
        assert!(token(Some("12:0"), None, 12).is_err(), "partition out of range");
        assert!(token(None, Some("nope"), 12).is_err());
        assert!(token(None, None, 12).unwrap().is_empty());
    }
}
