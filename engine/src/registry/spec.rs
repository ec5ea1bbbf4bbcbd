//! Reading a subscription spec from the API: strictly (an unknown field is refused, naming it,
//! while stored records stay lenient for rolling upgrades), and PATCH as a JSON Merge Patch
//! (RFC 7396) onto the stored spec: `null` clears a field, objects merge member by member.

use crate::model::secret::revealing;
use crate::model::{Invalid, Secret, SubscriptionSpec};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

/// What a create body holds besides the spec: the owner (admin only) and the signing secret.
#[derive(Debug, Default)]
pub struct CreateExtras {
    /// `tenant`, when given.
    pub tenant: Option<String>,
    /// `secret`, when given.
    pub secret: Option<Secret>,
}

/// Fields of tagged objects whose change replaces the object instead of merging into it: a
/// merge of `{"policy":"fixed",…}` into an exponential policy would otherwise keep the
/// exponential fields and be refused for them.
const TAGS: &[&str] = &["type", "scheme", "policy"];

/// Reads `T` from `value`, refusing unknown fields and naming the first bad one as a path.
/// Unknown fields are found by reading the value and writing it back: a member the input has
/// and the read-back lacks was not understood. (serde's own `deny_unknown_fields` would make
/// stored records of a newer version unreadable, and does not reach inside tagged enums.)
pub fn strict<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, Invalid> {
    let parsed: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        Invalid::new(if path == "." { String::new() } else { path }, e.into_inner().to_string())
    })?;
    let read = revealing(|| serde_json::to_value(&parsed)).expect("what was read serializes");
    match first_unknown(value, &read, "") {
        Some(field) => Err(Invalid::new(field, "unknown field")),
        None => Ok(parsed),
    }
}

/// The path of the first member of `given` that `read` lacks (`null` members are the
/// absence of a value, not a field).
fn first_unknown(given: &Value, read: &Value, path: &str) -> Option<String> {
    let join = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match (given, read) {
        (Value::Object(given), Value::Object(read)) => {
            given.iter().filter(|(_, v)| !v.is_null()).find_map(|(k, v)| match read.get(k) {
                None => Some(join(k)),
                Some(r) => first_unknown(v, r, &join(k)),
            })
        }
        (Value::Array(given), Value::Array(read)) => {
            given.iter().zip(read).enumerate().find_map(|(i, (g, r))| first_unknown(g, r, &format!("{path}[{i}]")))
        }
        _ => None,
    }
}

/// A create body: the spec, plus `tenant` and `secret`.
pub fn create_body(mut body: Value) -> Result<(CreateExtras, SubscriptionSpec), Invalid> {
    let Some(object) = body.as_object_mut() else { return Err(Invalid::new("", "the body must be a JSON object")) };
    let mut extras = CreateExtras::default();
    if let Some(tenant) = object.remove("tenant") {
        extras.tenant = Some(strict(&tenant).map_err(|e| Invalid::new("tenant", e.message))?);
    }
    if let Some(secret) = object.remove("secret") {
        extras.secret = Some(strict(&secret).map_err(|e| Invalid::new("secret", e.message))?);
    }
    Ok((extras, strict(&body)?))
}

/// `current` with `patch` merged in (RFC 7396), read back strictly like a create body.
pub fn patched(current: &SubscriptionSpec, patch: &Value) -> Result<SubscriptionSpec, Invalid> {
    if !patch.is_object() {
        return Err(Invalid::new("", "a patch is a JSON object of the fields to change"));
    }
    // One header named twice in the patch: which it meant is not for the merge to guess.
    if let Some(Value::Object(headers)) = patch.get("headers") {
        let mut names = std::collections::HashSet::new();
        if let Some(name) = headers.keys().find(|name| !names.insert(name.to_ascii_lowercase())) {
            let message = "this header is given twice (header names are case-insensitive)";
            return Err(Invalid::new(format!("headers.{name}"), message));
        }
    }
    let mut merged = revealing(|| serde_json::to_value(current)).expect("a spec serializes");
    merge(&mut merged, patch, Level::Spec);
    let mut spec: SubscriptionSpec = strict(&merged)?;
    keep_amqp_password(&mut spec, current);
    Ok(spec)
}

/// An AMQP URI sent back as views show it — the stored one, its password the placeholder (an
/// edit of the exchange in the console sends the whole `amqp` object) — keeps the stored
/// password. One naming anything else with the placeholder is refused by the checks.
fn keep_amqp_password(spec: &mut SubscriptionSpec, current: &SubscriptionSpec) {
    let (Some(new), Some(old)) = (spec.amqp.as_mut(), current.amqp.as_ref()) else { return };
    let (Ok(mut given), Ok(stored)) = (url::Url::parse(new.uri.expose()), url::Url::parse(old.uri.expose())) else {
        return;
    };
    if given.password() != Some(crate::model::secret::REDACTED) {
        return;
    }
    if given.set_password(stored.password()).is_ok() && given == stored {
        new.uri = old.uri.clone();
    }
}

/// Where a merge is: the spec itself, one of its tagged objects (`auth`, `signature`,
/// `retry`), the `headers` map (whose names are case-insensitive), or anything else (maps
/// whose keys are the client's).
#[derive(Clone, Copy, PartialEq)]
enum Level {
    Spec,
    Tagged,
    Headers,
    Other,
}

/// The spec's fields whose objects carry a tag (`type`, `scheme`, `policy`).
const TAGGED: [&str; 3] = ["auth", "signature", "retry"];

/// RFC 7396 JSON Merge Patch, except that a tagged object (`auth`, `signature`, `retry`) whose
/// tag (`type`, `scheme`, `policy`) changes is replaced rather than merged — only those: a
/// `headers` map with a header named `type` changed lost every other header.
fn merge(target: &mut Value, patch: &Value, level: Level) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    let retagged = level == Level::Tagged
        && target.as_object().is_some_and(|t| {
            TAGS.iter().any(|tag| patch.get(*tag).is_some_and(|new| t.get(*tag).is_some_and(|old| old != new)))
        });
    if !target.is_object() || retagged {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object");
    for (key, value) in patch {
        if level == Level::Headers {
            // `X-Token` patches the `x-token` set before: one header, sent once.
            target.retain(|name, _| name == key || !name.eq_ignore_ascii_case(key));
        }
        if value.is_null() {
            target.remove(key);
        } else {
            let child = match level {
                Level::Spec if TAGGED.contains(&key.as_str()) => Level::Tagged,
                Level::Spec if key == "headers" => Level::Headers,
                _ => Level::Other,
            };
            merge(target.entry(key.clone()).or_insert(Value::Null), value, child);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_named_wherever_they_are() {
        assert_eq!(strict::<SubscriptionSpec>(&json!({"url": "x", "colour": 1})).unwrap_err().field, "colour");
        let nested = json!({"url": "x", "auth": {"type": "basic", "username": "u", "password": "p", "otp": 1}});
        assert_eq!(strict::<SubscriptionSpec>(&nested).unwrap_err().field, "auth.otp");
        let wrong = strict::<SubscriptionSpec>(&json!({"url": "x", "max_in_flight": "many"})).unwrap_err();
        assert_eq!(wrong.field, "max_in_flight");
    }

    /// Only the tagged objects are replaced on a new tag: a header named `type` is the
    /// client's, and changing it keeps the other headers.
    #[test]
    fn a_header_named_like_a_tag_is_merged_like_any_other() {
        let current = strict::<SubscriptionSpec>(
            &json!({"url": "https://h.example/x", "headers": {"type": "json", "authorization": "Bearer t"}}),
        )
        .unwrap();
        for patch in [json!({"headers": {"type": "xml"}}), json!({"headers": {"type": null}})] {
            let patched = patched(&current, &patch).unwrap();
            assert!(patched.headers.contains_key("authorization"), "{patch}: {:?}", patched.headers.keys());
        }
    }

    #[test]
    fn a_patch_clears_with_null_merges_objects_and_replaces_on_a_new_tag() {
        let current = strict::<SubscriptionSpec>(&json!({
            "url": "https://a.example/", "rate_limit": 5.0, "timeout": "10s", "headers": {"A": "1", "B": "2"},
            "retry": {"policy": "exponential", "initial": "1s", "max_attempts": 5}
        }))
        .unwrap();
        let spec =
            patched(&current, &json!({"rate_limit": null, "timeout": null, "headers": {"A": null, "C": "3"}})).unwrap();
        assert_eq!((spec.rate_limit, spec.timeout), (None, None));
        assert_eq!(spec.headers.keys().collect::<Vec<_>>(), ["B", "C"]);
        assert_eq!(spec.headers["B"].expose(), "2", "unchanged secrets survive the merge");
        let fixed = patched(&current, &json!({"retry": {"policy": "fixed", "interval": "5s", "max_attempts": 3}}));
        assert!(matches!(fixed.unwrap().retry, Some(crate::model::RetrySpec::Fixed { .. })));
        let more = patched(&current, &json!({"retry": {"max_attempts": 9}})).unwrap();
        assert!(matches!(more.retry, Some(crate::model::RetrySpec::Exponential { max_attempts: Some(9), .. })));
        assert_eq!(patched(&current, &json!({"tenant": "other"})).unwrap_err().field, "tenant");
    }

    #[test]
    fn a_create_body_splits_into_owner_secret_and_spec() {
        let (extras, spec) = create_body(json!({"url": "https://a.example/", "tenant": "t", "secret": "s"})).unwrap();
        assert_eq!(extras.tenant.as_deref(), Some("t"));
        assert_eq!(extras.secret.unwrap().expose(), "s");
        assert_eq!(spec.url, "https://a.example/");
        assert_eq!(create_body(json!({"url": "x", "tenant": 5})).unwrap_err().field, "tenant");
    }
}
