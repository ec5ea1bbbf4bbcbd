//! The ordering key a subscription's JSON pointer (`ordering.key`) finds in an event.

use super::Json;
use crate::target::Target;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::collections::HashMap;

/// Bytes the raw walk ([`Keyed::walk`]) may read for one event, per byte of its `data` and
/// `changes`, past a first [`WALK_FREE`]: each pointer walks from the top, reading each level
/// it passes through whole, so many pointers deep into a large document read it many times.
const WALK_PER_BYTE: usize = 8;
const WALK_FREE: usize = 1 << 20;

/// Events whose `data` and `changes` come to more bytes than this have their keys found by
/// the walk only: as a `Value`, small objects take about ninety times their text (a megabyte
/// event, ~90 MiB of nodes, held while its publish waits for room in the ingest budget).
const PARSED_UP_TO: usize = 16 << 10;

/// The parts of an event an ordering key can come from, and the keys subscriptions' pointers
/// found in it (each pointer looked up once for all of its subscriptions).
pub(super) struct Keyed<'a> {
    id: &'a str,
    event_type: &'a str,
    tenant: &'a str,
    ordering_key: Option<&'a str>,
    data: &'a Json,
    changes: Option<&'a Json>,
    /// The event as a `Value`, parsed at the first pointer: `Some(None)` when its data holds
    /// what a `Value` cannot (a lone surrogate, nesting past 128 levels, a number past f64).
    parsed: Option<Option<serde_json::Value>>,
    /// Bytes the raw walk has read for this event.
    walked: usize,
    found: HashMap<String, Option<String>>,
}

impl<'a> Keyed<'a> {
    pub(super) fn new(
        id: &'a str,
        event_type: &'a str,
        tenant: &'a str,
        ordering_key: Option<&'a str>,
        data: &'a Json,
        changes: Option<&'a Json>,
    ) -> Self {
        Keyed { id, event_type, tenant, ordering_key, data, changes, parsed: None, walked: 0, found: HashMap::new() }
    }

    /// The key `target` orders this event's delivery by: none for an unordered subscription;
    /// the event's own `ordering_key`, else what the subscription's `ordering.key` pointer finds
    /// in the event (a string, or a number's or boolean's text). An event without one is
    /// delivered unordered.
    pub(super) fn key_for(&mut self, target: &Target) -> Option<String> {
        let ordering = target.sub.spec.ordering.as_ref().filter(|o| o.ordered())?;
        if let Some(key) = self.ordering_key {
            return Some(key.to_string());
        }
        self.find(ordering.key.as_deref()?)
    }

    /// What JSON pointer `pointer` finds in the event (`{id, type, tenant, data, changes}`), if
    /// it is a valid ordering key.
    fn find(&mut self, pointer: &str) -> Option<String> {
        if let Some(found) = self.found.get(pointer) {
            return found.clone();
        }
        let key = self.look_up(pointer).filter(|k| crate::model::check_ordering_key(k).is_ok());
        self.found.insert(pointer.to_string(), key.clone());
        key
    }

    /// The event parsed once as a `Value`, for a small event whose data a `Value` holds; else
    /// [`Keyed::walk`] — so a large event is not made a tree ninety times its size, and data a
    /// `Value` cannot hold elsewhere in the event does not hide a key that is there (read as
    /// null, the key was not found and the delivery went out unordered, ahead of the key's held
    /// head).
    fn look_up(&mut self, pointer: &str) -> Option<String> {
        let (id, event_type, tenant, data, changes) = (self.id, self.event_type, self.tenant, self.data, self.changes);
        if data.canonical.len() + changes.map_or(0, |c| c.canonical.len()) > PARSED_UP_TO {
            return self.walk(pointer);
        }
        let parsed = self.parsed.get_or_insert_with(|| {
            let json = |j: &Json| serde_json::from_slice::<serde_json::Value>(&j.canonical).ok();
            let changes = match changes {
                Some(c) => Some(json(c)?),
                None => None,
            };
            Some(serde_json::json!({
                "id": id, "type": event_type, "tenant": tenant, "data": json(data)?, "changes": changes,
            }))
        });
        match parsed {
            Some(event) => match event.pointer(pointer)? {
                serde_json::Value::String(s) => Some(s.clone()),
                v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(v.to_string()),
                _ => None,
            },
            None => self.walk(pointer),
        }
    }

    /// Follows `pointer` through the event's JSON text a level at a time, each level read as
    /// raw members (keys compared as bytes, so a key a `String` cannot hold fails nothing),
    /// within the event's walking budget.
    fn walk(&mut self, pointer: &str) -> Option<String> {
        let mut tokens = pointer.strip_prefix('/')?.split('/').map(|t| t.replace("~1", "/").replace("~0", "~"));
        let top = tokens.next()?;
        let plain = |text: &str, rest: Option<String>| rest.is_none().then(|| text.to_string());
        let json = match top.as_str() {
            "id" => return plain(self.id, tokens.next()),
            "type" => return plain(self.event_type, tokens.next()),
            "tenant" => return plain(self.tenant, tokens.next()),
            "data" => self.data,
            "changes" => self.changes?,
            _ => return None,
        };
        let budget = (self.data.canonical.len() + self.changes.map_or(0, |c| c.canonical.len()))
            .saturating_mul(WALK_PER_BYTE)
            .saturating_add(WALK_FREE);
        let mut here: &RawValue = serde_json::from_slice(&json.canonical).ok()?;
        for token in tokens {
            let level = here.get().len();
            if self.walked.saturating_add(level) > budget {
                tracing::debug!(event = self.id, pointer, "an ordering key's walk went past its budget");
                return None;
            }
            self.walked += level;
            here = match here.get().as_bytes().first()? {
                b'{' => member(here.get(), token.as_bytes())?,
                b'[' => {
                    // As RFC 6901 (and `Value::pointer`): no sign, no leading zero.
                    if token.starts_with('+') || (token.starts_with('0') && token.len() > 1) {
                        return None;
                    }
                    let items: Vec<&RawValue> = serde_json::from_str(here.get()).ok()?;
                    *items.get(token.parse::<usize>().ok()?)?
                }
                _ => return None,
            };
        }
        let text = here.get();
        match text.as_bytes().first()? {
            b'"' => serde_json::from_str::<String>(text).ok(),
            b't' | b'f' => Some(text.to_string()),
            // As `Value` writes them (the text of one read as f64), or as given.
            b'-' | b'0'..=b'9' => Some(
                serde_json::from_str::<serde_json::Number>(text).map_or_else(|_| text.to_string(), |n| n.to_string()),
            ),
            _ => None,
        }
    }
}

/// The value of member `name` (its key's bytes, escapes decoded) of the JSON object `object`;
/// the last, when a key repeats, as `JSON.parse` keeps it.
fn member<'t>(object: &'t str, name: &[u8]) -> Option<&'t RawValue> {
    struct Find<'n>(&'n [u8]);
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = Option<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(Key(key)) = map.next_key()? {
                let value: &'de RawValue = map.next_value()?;
                if key == self.0 {
                    found = Some(value);
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_str(object);
    de.deserialize_map(Find(name)).ok().flatten()
}

/// A member's key as bytes: read so, serde_json does not refuse an unpaired surrogate escape
/// (which no pointer token, being UTF-8, can name anyway).
struct Key(Vec<u8>);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct Bytes;
        impl Visitor<'_> for Bytes {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Key, E> {
                Ok(Key(v.to_vec()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.as_bytes().to_vec()))
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ordering key is found wherever the rest of the event holds what serde's `Value`
    /// cannot (a lone surrogate, in a value or a key, nesting past its 128 levels, a number
    /// past f64): read whole, such data read as null, the key was not found and the delivery
    /// went out unordered, ahead of the key's held head.
    #[test]
    fn ordering_keys_are_found_beside_data_a_value_cannot_hold() {
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        for (data, pointer) in [
            (r#"{"key":"a","note":"\ud800"}"#.to_string(), "/data/key"),
            (format!(r#"{{"deep":{deep},"key":"a"}}"#), "/data/key"),
            (format!(r#"{{"big":1{},"key":"a"}}"#, "0".repeat(400)), "/data/key"),
            (r#"{"\ud800":0,"key":"a"}"#.to_string(), "/data/key"),
            (r#"{"x":{"\udc00":1,"k":"a","q\"":2},"n":"\ud800"}"#.to_string(), "/data/x/k"),
        ] {
            let data = Json::new(&data).unwrap();
            let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None);
            assert_eq!(keyed.find(pointer).as_deref(), Some("a"), "{:?}", data.canonical);
        }
        for data in [
            r#"{"n":[{"k":7},{"k":true}],"a/b":{"~":"s"}}"#,
            r#"{"n":[{"k":7},{"k":true}],"a/b":{"~":"s"},"z":"\ud800"}"#,
        ] {
            let data = Json::new(data).unwrap();
            let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None);
            assert_eq!(keyed.find("/data/n/0/k").as_deref(), Some("7"), "{data:?}");
            assert_eq!(keyed.find("/data/n/1/k").as_deref(), Some("true"));
            assert_eq!(keyed.find("/data/a~1b/~0").as_deref(), Some("s"));
            assert_eq!(keyed.find("/tenant").as_deref(), Some("t1"));
            for missing in ["/data/n/01/k", "/data/n/2/k", "/data/n", "/changes/x", "data/n", ""] {
                assert_eq!(keyed.find(missing), None, "{missing}");
            }
        }
    }

    /// A large event's key is found by the walk, not in a `Value` of the whole event: small
    /// objects take about ninety times their text as a `Value`'s nodes, and a tenant's ordered
    /// subscription made each of its megabyte events a tree of ~90 MiB, held through the wait
    /// for room in the ingest budget — one per request the API was serving.
    #[test]
    fn a_large_event_s_key_is_found_without_parsing_it_whole() {
        let rows = vec![r#"{"a":0}"#; 130_000].join(",");
        let data = Json::new(&format!(r#"{{"id":"k","rows":[{rows}]}}"#)).unwrap();
        let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None);
        assert_eq!(keyed.find("/data/id").as_deref(), Some("k"));
        assert_eq!(keyed.find("/data/rows/129999/a").as_deref(), Some("0"));
        assert!(keyed.parsed.is_none(), "parsed whole");
        let small = Json::new(r#"{"id":"k","rows":[{"a":0}]}"#).unwrap();
        let mut keyed = Keyed::new("e1", "T", "t1", None, &small, None);
        assert_eq!(keyed.find("/data/rows/0/a").as_deref(), Some("0"));
    }

    /// Many pointers deep into a large event a `Value` cannot hold read it a bounded number
    /// of times, however many subscriptions ask.
    #[test]
    fn walking_many_pointers_through_a_large_event_is_bounded() {
        let pad = "x".repeat(1 << 20);
        let nested =
            format!("{}{{\"pad\":\"{pad}\",\"k\":\"a\",\"n\":\"\\ud800\"}}{}", "{\"a\":".repeat(100), "}".repeat(100));
        let data = Json::new(&nested).unwrap();
        let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None);
        let started = std::time::Instant::now();
        for i in 0..200 {
            keyed.find(&format!("/data{}/k{i}", "/a".repeat(100)));
        }
        assert!(keyed.walked <= data.canonical.len() * WALK_PER_BYTE + WALK_FREE, "{} bytes walked", keyed.walked);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
