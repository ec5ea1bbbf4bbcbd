//! The ordering key a subscription's JSON pointer (`ordering.key`) finds in an event.

use super::Json;
use crate::target::Target;
use serde::de::{Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// Bytes the raw walk ([`Keyed::walk`]) may read for one event, per byte of its `data` and
/// `changes`, past a first [`WALK_FREE`]: each pointer walks from the top, reading each level
/// it passes through whole, so many pointers deep into a large document read it many times.
const WALK_PER_BYTE: usize = 8;
const WALK_FREE: usize = 1 << 20;

/// The pointers of an event's ordered subscriptions, for [`Keyed::new`].
pub(super) fn pointers(targets: &[Arc<Target>]) -> Vec<&str> {
    targets.iter().filter_map(|t| t.sub.spec.ordering.as_ref().filter(|o| o.ordered())?.key.as_deref()).collect()
}

/// The parts of an event an ordering key can come from, and the keys subscriptions' pointers
/// found in it (each pointer looked up once for all of its subscriptions).
pub(super) struct Keyed<'a> {
    id: &'a str,
    event_type: &'a str,
    tenant: &'a str,
    ordering_key: Option<&'a str>,
    data: &'a Json,
    changes: Option<&'a Json>,
    /// The pointers the event's subscriptions name, all found in one pass over the event's
    /// text when the first is asked for.
    pointers: Vec<&'a str>,
    passed: bool,
    /// Bytes read for this event, by the pass and by walks.
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
        pointers: Vec<&'a str>,
    ) -> Self {
        Keyed {
            id,
            event_type,
            tenant,
            ordering_key,
            data,
            changes,
            pointers,
            passed: false,
            walked: 0,
            found: HashMap::new(),
        }
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
        if !self.passed {
            self.passed = true;
            self.pass();
        }
        if let Some(found) = self.found.get(pointer) {
            return found.clone();
        }
        let key = self.walk(pointer).filter(|k| crate::model::check_ordering_key(k).is_ok());
        self.found.insert(pointer.to_string(), key.clone());
        key
    }

    /// Finds every pointer into `data` and `changes` in one read of each — not a read per
    /// pointer: a tenant's subscriptions may name dozens — and never as a `Value` (small
    /// objects take about ninety times their text as its nodes). Keys are compared as bytes
    /// and what no pointer passes through is skipped unread, so data a `Value` cannot hold (a
    /// lone surrogate, nesting past 128 levels, a number past f64) elsewhere in the event hides
    /// no key. A part whose pass fails on such data on a pointer's own path leaves its
    /// pointers to [`Keyed::walk`].
    fn pass(&mut self) {
        for (part, json) in [("data", Some(self.data)), ("changes", self.changes)] {
            let mut tree = Tokens::default();
            for &pointer in &self.pointers {
                let mut tokens = pointer.strip_prefix('/').unwrap_or("\0").split('/');
                if tokens.next() == Some(part) {
                    tree.add(pointer, tokens);
                }
            }
            if tree.is_empty() {
                continue;
            }
            let Some(json) = json else {
                tree.settle(&mut self.found);
                continue;
            };
            let mut found = HashMap::new();
            let mut de = serde_json::Deserializer::from_slice(&json.canonical);
            let done = Pass { at: &tree, found: &mut found }.deserialize(&mut de).and_then(|()| de.end());
            self.walked = self.walked.saturating_add(json.canonical.len());
            if done.is_ok() {
                for (pointer, key) in found {
                    let key = key.filter(|k| crate::model::check_ordering_key(k).is_ok());
                    self.found.insert(pointer.to_string(), key);
                }
                tree.settle(&mut self.found);
            }
        }
    }

    /// Follows `pointer` through the event's JSON text a level at a time, each level read as
    /// raw members (keys compared as bytes, so a key a `String` cannot hold fails nothing),
    /// within the event's walking budget: for the event's own fields, and for a pointer
    /// [`Keyed::pass`] could not follow.
    fn walk(&mut self, pointer: &str) -> Option<String> {
        let mut tokens = pointer.strip_prefix('/')?.split('/').map(unescape);
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
                    if !is_index(&token) {
                        return None;
                    }
                    let items: Vec<&RawValue> = serde_json::from_str(here.get()).ok()?;
                    *items.get(token.parse::<usize>().ok()?)?
                }
                _ => return None,
            };
        }
        scalar(here.get())
    }
}

/// A pointer's token as the name it stands for (RFC 6901: `~1` is `/`, then `~0` is `~`).
fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// As RFC 6901 (and `Value::pointer`): an array index has no sign and no leading zero.
fn is_index(token: &str) -> bool {
    !(token.starts_with('+') || (token.starts_with('0') && token.len() > 1))
}

/// A key from a value's JSON text: a string as it is, a boolean's text, a number as `Value`
/// writes it (the text of one read as f64), or as given when f64 cannot hold it.
fn scalar(text: &str) -> Option<String> {
    match text.as_bytes().first()? {
        b'"' => serde_json::from_str::<String>(text).ok(),
        b't' | b'f' => Some(text.to_string()),
        b'-' | b'0'..=b'9' => {
            Some(serde_json::from_str::<serde_json::Number>(text).map_or_else(|_| text.to_string(), |n| n.to_string()))
        }
        _ => None,
    }
}

/// Pointers into one part of an event as a tree of their tokens (escapes decoded).
#[derive(Default)]
struct Tokens<'p> {
    /// The pointers that end here.
    ends: Vec<&'p str>,
    next: HashMap<Vec<u8>, Tokens<'p>>,
    /// The largest array index among `next`, so an array's later items are skipped unlooked.
    last_index: Option<usize>,
}

impl<'p> Tokens<'p> {
    fn add<'t>(&mut self, pointer: &'p str, mut tokens: impl Iterator<Item = &'t str>) {
        match tokens.next() {
            None => self.ends.push(pointer),
            Some(token) => {
                let token = unescape(token);
                if let Some(index) = token.parse::<usize>().ok().filter(|_| is_index(&token)) {
                    self.last_index = self.last_index.max(Some(index));
                }
                self.next.entry(token.into_bytes()).or_default().add(pointer, tokens);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty() && self.next.is_empty()
    }

    /// Every pointer at or below here not found: not in the event.
    fn settle(&self, found: &mut HashMap<String, Option<String>>) {
        for pointer in &self.ends {
            found.entry(pointer.to_string()).or_insert(None);
        }
        for next in self.next.values() {
            next.settle(found);
        }
    }

    /// Forgets what was found at or below here: a repeated member's last value is the one
    /// that counts, as `JSON.parse` keeps it.
    fn forget(&self, found: &mut HashMap<&'p str, Option<String>>) {
        for pointer in &self.ends {
            found.remove(pointer);
        }
        for next in self.next.values() {
            next.forget(found);
        }
    }
}

/// Reads one value at a node of [`Tokens`]: its members and items on a pointer's path are
/// followed, the rest skipped; what the pointers find goes in `found`.
struct Pass<'t, 'p, 'r> {
    at: &'t Tokens<'p>,
    found: &'r mut HashMap<&'p str, Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Pass<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(mut self, d: D) -> Result<(), D::Error> {
        if self.at.ends.is_empty() || !self.at.next.is_empty() {
            // Read once: where pointers end here and others go on below, a scalar is the key
            // of those ending here (a number read as f64: one past it fails the pass, and the
            // walk finds it as given).
            return d.deserialize_any(self);
        }
        // Pointers end here only: the value as text (any number, as given).
        let raw = <&RawValue>::deserialize(d)?;
        self.ends_with(scalar(raw.get()));
        Ok(())
    }
}

impl<'p> Pass<'_, 'p, '_> {
    /// What the pointers ending here find.
    fn ends_with(&mut self, key: Option<String>) {
        for &pointer in &self.at.ends {
            self.found.insert(pointer, key.clone());
        }
    }
}

impl<'de> Visitor<'de> for Pass<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.ends_with(None); // an object is no key
        while let Some(Key(key)) = map.next_key()? {
            match self.at.next.get(key.as_ref()) {
                Some(next) => {
                    next.forget(self.found);
                    map.next_value_seed(Pass { at: next, found: &mut *self.found })?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.ends_with(None); // an array is no key
        let mut index = 0usize;
        let mut name = String::new();
        while self.at.last_index.is_some_and(|last| index <= last) {
            name.clear();
            std::fmt::Write::write_fmt(&mut name, format_args!("{index}")).expect("a String takes it");
            let more = match self.at.next.get(name.as_bytes()) {
                Some(next) => seq.next_element_seed(Pass { at: next, found: &mut *self.found })?.is_some(),
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    // A value no pointer can go into (nothing below it is there), the key of those ending
    // here: a string as it is, a number or boolean as `Value` writes it.
    fn visit_bool<E>(mut self, v: bool) -> Result<(), E> {
        self.ends_with(Some(v.to_string()));
        Ok(())
    }
    fn visit_i64<E>(mut self, v: i64) -> Result<(), E> {
        self.ends_with(Some(v.to_string()));
        Ok(())
    }
    fn visit_u64<E>(mut self, v: u64) -> Result<(), E> {
        self.ends_with(Some(v.to_string()));
        Ok(())
    }
    fn visit_f64<E>(mut self, v: f64) -> Result<(), E> {
        self.ends_with(serde_json::Number::from_f64(v).map(|n| n.to_string()));
        Ok(())
    }
    fn visit_str<E>(mut self, v: &str) -> Result<(), E> {
        self.ends_with(Some(v.to_string()));
        Ok(())
    }
    fn visit_unit<E>(mut self) -> Result<(), E> {
        self.ends_with(None);
        Ok(())
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
                if key.as_ref() == self.0 {
                    found = Some(value);
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_str(object);
    de.deserialize_map(Find(name)).ok().flatten()
}

/// A member's key as bytes (borrowed from the text unless it has escapes): read so,
/// serde_json does not refuse an unpaired surrogate escape (which no pointer token, being
/// UTF-8, can name anyway).
struct Key<'de>(Cow<'de, [u8]>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v.as_bytes())))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_vec())))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.as_bytes().to_vec())))
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
            let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None, vec![pointer]);
            assert_eq!(keyed.find(pointer).as_deref(), Some("a"), "{:?}", data.canonical);
        }
        for data in [
            r#"{"n":[{"k":7},{"k":true}],"a/b":{"~":"s"}}"#,
            r#"{"n":[{"k":7},{"k":true}],"a/b":{"~":"s"},"z":"\ud800"}"#,
        ] {
            let data = Json::new(data).unwrap();
            let missing = ["/data/n/01/k", "/data/n/2/k", "/data/n", "/changes/x", "data/n", ""];
            let found = ["/data/n/0/k", "/data/n/1/k", "/data/a~1b/~0", "/tenant"];
            let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None, [&missing[..], &found].concat());
            assert_eq!(keyed.find("/data/n/0/k").as_deref(), Some("7"), "{data:?}");
            assert_eq!(keyed.find("/data/n/1/k").as_deref(), Some("true"));
            assert_eq!(keyed.find("/data/a~1b/~0").as_deref(), Some("s"));
            assert_eq!(keyed.find("/tenant").as_deref(), Some("t1"));
            for missing in missing {
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
        let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None, vec!["/data/id", "/data/rows/129999/a"]);
        assert_eq!(keyed.find("/data/id").as_deref(), Some("k"));
        assert_eq!(keyed.find("/data/rows/129999/a").as_deref(), Some("0"));
        assert_eq!(keyed.walked, data.canonical.len(), "read once");
        let small = Json::new(r#"{"id":"k","rows":[{"a":0}]}"#).unwrap();
        let mut keyed = Keyed::new("e1", "T", "t1", None, &small, None, vec!["/data/rows/0/a"]);
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
        let pointers: Vec<String> = (0..200).map(|i| format!("/data{}/k{i}", "/a".repeat(100))).collect();
        let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None, pointers.iter().map(|p| p.as_str()).collect());
        let started = std::time::Instant::now();
        for pointer in &pointers {
            assert_eq!(keyed.find(pointer), None);
        }
        assert_eq!(keyed.walked, data.canonical.len(), "read once");
        // Pointers the pass was not given (none is, but for a part it could not read) are
        // walked one at a time, within the budget.
        for i in 200..400 {
            keyed.find(&format!("/data{}/k{i}", "/a".repeat(100)));
        }
        assert!(keyed.walked <= data.canonical.len() * WALK_PER_BYTE + WALK_FREE, "{} bytes walked", keyed.walked);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }

    /// Every subscription's key is found in a large event, however many distinct pointers
    /// its tenant's subscriptions use: walked a pointer at a time, each read the levels it
    /// passed through whole, and past the budget (about eight pointers into a megabyte) the
    /// rest went unordered, ahead of their keys' held heads.
    #[test]
    fn many_pointers_into_a_large_event_are_all_found() {
        let pad = "x".repeat(16 << 10);
        let items: Vec<String> = (0..64).map(|i| format!(r#"{{"pad":"{pad}","id":"k{i}"}}"#)).collect();
        let data = Json::new(&format!(r#"{{"items":[{}]}}"#, items.join(","))).unwrap();
        let pointers: Vec<String> = (0..64).map(|i| format!("/data/items/{i}/id")).collect();
        let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None, pointers.iter().map(|p| p.as_str()).collect());
        for (i, pointer) in pointers.iter().enumerate() {
            assert_eq!(keyed.find(pointer), Some(format!("k{i}")), "pointer {i}");
        }
        assert_eq!(keyed.walked, data.canonical.len(), "read once");
    }

    /// Pointers that end where others go on are all found in one read: a value a pointer
    /// ends at was read again for those below it, so a tenant's pointers `/data`, `/data/a`,
    /// `/data/a/a`, … into an event as deep read it once per pointer (a megabyte event, a
    /// hundred pointers: 100 MiB of parsing on the publish path).
    #[test]
    fn pointers_ending_where_others_go_on_read_the_event_once() {
        let pad = "x".repeat(1 << 20);
        let text = format!("{}{{\"pad\":\"{pad}\",\"k\":1.50}}{}", "{\"a\":".repeat(100), "}".repeat(100));
        let data = Json::new(&text).unwrap();
        let pointers: Vec<String> = (0..=100).map(|depth| format!("/data{}", "/a".repeat(depth))).collect();
        let deepest = format!("/data{}/k", "/a".repeat(100));
        let mut asked: Vec<&str> = pointers.iter().map(|p| p.as_str()).collect();
        asked.push(&deepest);
        let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None, asked);
        assert_eq!(keyed.find(&deepest).as_deref(), Some("1.5"));
        for pointer in &pointers {
            assert_eq!(keyed.find(pointer), None, "{pointer}: an object is no key");
        }
        assert_eq!(keyed.walked, data.canonical.len(), "read once");
    }

    /// The pass finds what the walk finds: a repeated member's last value, a pointer ending
    /// where another goes on, an index as RFC 6901 writes one; and a pointer through data
    /// the pass cannot read (a lone surrogate on its path) is walked on its own.
    #[test]
    fn one_pass_finds_what_the_walk_finds() {
        let big = format!("1{}", "0".repeat(400));
        let text = format!(
            r#"{{"a":{{"b":"first"}},"a":{{"b":"last","c":{{"d":1.50}}}},"s":"\ud800","n":{big},"r":[0,{{"x":true}}],"z":"y"}}"#
        );
        let data = Json::new(&text).unwrap();
        let pointers = [
            "/data/a/b",
            "/data/a/c",
            "/data/a/c/d",
            "/data/n",
            "/data/r/1/x",
            "/data/r/01/x",
            "/data/z",
            "/changes/a",
        ];
        let expected = [Some("last"), None, Some("1.5"), Some(&big[..]), Some("true"), None, Some("y"), None];
        let mut keyed = Keyed::new("e1", "T", "t1", None, &data, None, pointers.to_vec());
        let mut walked = Keyed::new("e1", "T", "t1", None, &data, None, Vec::new());
        for (pointer, expected) in pointers.iter().zip(expected) {
            let walk = walked.walk(pointer).filter(|k| crate::model::check_ordering_key(k).is_ok());
            assert_eq!(walk.as_deref(), expected.filter(|k| k.len() <= 255), "{pointer} walked");
            assert_eq!(keyed.find(pointer), walk, "{pointer}");
        }
        assert_eq!(keyed.find("/data/a/b").as_deref(), Some("last"));
        assert_eq!(keyed.walked, data.canonical.len(), "read once");
        let mut through = Keyed::new("e1", "T", "t1", None, &data, None, vec!["/data/s/x", "/data/z"]);
        assert_eq!(through.find("/data/s/x"), None);
        assert_eq!(through.find("/data/z").as_deref(), Some("y"), "walked, when the pass fails");
    }
}
