//! The event-type catalogue: the event types a platform publishes, each with a description, an
//! optional JSON Schema for its `data`, an example and a deprecation flag. Kept in the catalog
//! beside subscriptions, so every process holds the same catalogue and compiles each schema
//! once, when it applies the record. Ingest asks it whether an event's `data` fits its type
//! ([`EventTypes::check_event`]); subscriptions ask whether the types they name exist.

use crate::catalog::feed::Feed;
use crate::catalog::{Apply, CatalogError, Entry, Key, Kind};
use crate::log::LogRecord;
use crate::model::{now_ms, rfc3339_ms, Invalid};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Event types in the catalogue at most (each compiled schema is held in memory).
pub const MAX_EVENT_TYPES: usize = 10_000;

/// The largest definition (schema, example and description together, as JSON): well inside a
/// registry record, and small enough to compile at once.
pub const MAX_DEFINITION_BYTES: usize = 256 * 1024;

/// Why a catalogue change was refused.
#[derive(Debug, thiserror::Error)]
pub enum EventTypeError {
    /// A field is not valid.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// An event type of this name exists already.
    #[error("event type {0:?} exists already")]
    Exists(String),
    /// The catalogue holds [`MAX_EVENT_TYPES`] types.
    #[error("the catalogue holds its {MAX_EVENT_TYPES} event types")]
    Full,
    /// The catalog could not be written.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// An event's data could not be checked against its type's schema (the check failed in
    /// Herald, not the data).
    #[error("the data could not be checked against its type's schema: {0}")]
    Unchecked(String),
}

/// What a client sets on an event type (the create body besides `name`; PATCH replaces
/// fields, `null` clears one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventTypeSpec {
    /// What the event means, for the people who subscribe to it.
    pub description: String,
    /// A JSON Schema (draft 2020-12 unless `$schema` names another) for the event's `data`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// Whether ingest refuses events of this type whose `data` does not fit the schema (with
    /// `[ingest] validate = true`, every type with a schema is checked).
    pub validate: bool,
    /// Still published, but subscribers should move off it.
    pub deprecated: bool,
    /// An example `data` (it must fit the schema).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub example: Option<Value>,
}

/// An event type as stored and listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventType {
    /// The name events carry as their `type`.
    pub name: String,
    /// Everything else about it.
    #[serde(flatten)]
    pub spec: EventTypeSpec,
    /// When it was created, RFC 3339.
    pub created_at: String,
    /// When it last changed, RFC 3339.
    pub updated_at: String,
}

/// A catalogued type with its schema compiled.
struct Held {
    event_type: EventType,
    validator: Option<Arc<jsonschema::Validator>>,
}

/// The catalogue in memory, persisted in the registry topic.
pub struct EventTypes {
    feed: Arc<Feed>,
    types: RwLock<HashMap<String, Held>>,
    /// Held across a change's check and write, so two racing changes of one name cannot both
    /// pass the check (two creates, or a patch reviving what a delete removed).
    writes: tokio::sync::Mutex<()>,
    /// The list page as JSON, made once per change of the catalogue ([`EventTypes::page`]):
    /// made per request, each tenant key's `GET /v1/event-types` cloned every schema twice and
    /// serialized them, a catalogue of megabytes at the key's request rate.
    page: std::sync::Mutex<Option<bytes::Bytes>>,
    /// A document made from the catalogue ([`EventTypes::derived`]: the OpenAPI document with
    /// the types' examples), made once per change for the same reason.
    derived: std::sync::Mutex<Option<bytes::Bytes>>,
    /// Checks of large events, one at a time, tenants in turns ([`EventTypes::check_event`]).
    large_checks: crate::model::TakenInTurns,
}

/// Data a request may have checked where it is read, all its events together; the rest off
/// the runtime's threads, one event at a time: made a `Value` (small objects take tens of
/// times their text) and walked, a megabyte's check took about a hundred megabytes and
/// hundreds of milliseconds (a batch's events one after another on the thread as long).
pub const CHECKED_IN_PLACE: usize = 64 * 1024;

fn check_name(name: &str) -> Result<(), Invalid> {
    crate::model::check_event_type(name)
        .and_then(|_| crate::model::named_in_a_url(name))
        .map_err(|m| Invalid::new("name", m))
}

/// Compiles `schema`, refusing one that is not a JSON Schema or that refers outside itself
/// (no retriever is built in: Herald never fetches a schema from the network or disk).
/// Patterns run on the `regex` engine, in time linear in the string: on the backtracking one
/// (the default, for backreferences and lookaround) a pattern such as `(a*)*\1b` took a million
/// steps for each string of an event, on the request's thread, and an event of many strings
/// held it for minutes. Such patterns are refused here. Each compiled pattern is bounded too,
/// since a definition of 256 KiB can hold thousands.
fn compile(schema: &Value) -> Result<jsonschema::Validator, Invalid> {
    compile_with(schema, jsonschema::PatternOptions::regex().size_limit(PATTERN_BYTES).dfa_size_limit(PATTERN_BYTES))
}

/// Compiles `schema` with its patterns run as `patterns` says, each of its subschemas taking
/// a step of the check's budget (see [`with_steps`]).
fn compile_with<E>(schema: &Value, patterns: jsonschema::PatternOptions<E>) -> Result<jsonschema::Validator, Invalid> {
    let mut refs = Vec::new();
    let stepped = with_steps(schema, &mut refs);
    if let Some(to) = refs.iter().find(|to| !steps_where_it_points(schema, to)) {
        return Err(Invalid::new(
            "schema",
            format!("{to:?} names no subschema (a place such as `const` or `enum`, which hold data)"),
        ));
    }
    jsonschema::options()
        .with_pattern_options(patterns)
        .with_keyword(STEP, |_, _, _| Ok(Box::new(Step)))
        .build(&stepped)
        .map_err(|e| Invalid::new("schema", format!("not a usable JSON Schema: {e}")))
}

/// The keyword [`with_steps`] gives every subschema of a schema it compiles.
const STEP: &str = "$$herald-step";

/// Subschema checks a check may make whatever its data ([`fits`]), and more for each byte of
/// the data. A schema's cost is not bounded by its size: references in a diamond (3 KB of
/// `allOf`s, each naming the next twice) check one number 2^40 times, and alternatives
/// multiply the same way; such a check held a runtime thread for hours (two held every
/// tenant's publishing), or the one thread large events are checked on.
const STEPS_AT_LEAST: u64 = 100_000;
/// See [`STEPS_AT_LEAST`]: far more than a schema that checks each value a few ways takes.
const STEPS_PER_BYTE: u64 = 32;

thread_local! {
    /// The steps the check under way on this thread may still take.
    static STEPS_LEFT: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
}

/// Unwinds a check that ran out of steps (without the panic hook: nothing failed).
struct OutOfSteps;

/// A subschema checked: a step of the budget, or, with none left, the end of the check,
/// unwound at once ([`fits`] catches it): failing instead would let each subschema under way
/// check all its alternatives first, and a diamond of `anyOf`s stays exponential.
struct Step;

impl Step {
    fn take() {
        STEPS_LEFT.with(|left| match left.get() {
            0 => std::panic::resume_unwind(Box::new(OutOfSteps)),
            n => left.set(n - 1),
        })
    }
}

impl<'i> jsonschema::Keyword<'i> for Step {
    fn validate(&self, _: &'i Value) -> Result<(), jsonschema::ValidationError<'i>> {
        Step::take();
        Ok(())
    }

    fn is_valid(&self, _: &'i Value) -> bool {
        Step::take();
        true
    }
}

/// The subschema that takes a [`Step`]: the last of each subschema's `allOf` (last, so that
/// a `$ref` to `allOf/0` still names what it named). The library runs a subschema's keywords
/// cheapest first, custom ones last, and stops at the first that fails: a step beside the
/// others was never taken by a subschema that failed (alternatives failing in a diamond took
/// none). `allOf` comes before every keyword that applies more than one subschema to the
/// same value (`anyOf`, `oneOf`, `not`, `if`, `$ref`…), so each of those is preceded by a
/// step; what fails before it only looks deeper into the data, or into an `allOf` of its own.
fn step() -> Value {
    serde_json::json!({ STEP: true })
}

/// Keywords whose values [`with_steps`] leaves as written: values compared with the data,
/// which a step would change. (Annotations, `default` and `examples`, are walked as any
/// other keyword: a pointer may name a subschema written there.)
const AS_WRITTEN: [&str; 2] = ["const", "enum"];

/// Keywords whose values are maps, not subschemas: a key there is a name (of a property, a
/// definition, a vocabulary), and each value is walked.
const SUBSCHEMA_MAPS: [&str; 8] = [
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
    "dependencies",
    "dependentRequired",
    "$vocabulary",
];

/// Keywords naming another subschema, by URI: each is checked by [`compile_with`].
const REFERENCES: [&str; 3] = ["$ref", "$dynamicRef", "$recursiveRef"];

/// `schema` with [`step`] last in the `allOf` of each of its subschemas: every object in a
/// schema's place, and any other object but those [`AS_WRITTEN`], since a `$ref` may name a
/// subschema anywhere in the document; each `$ref` met is put in `refs`. What the schema says
/// is unchanged: the step always fits, and evaluates nothing.
fn with_steps(schema: &Value, refs: &mut Vec<String>) -> Value {
    fn each(v: &Value, refs: &mut Vec<String>) -> Value {
        match v {
            Value::Array(items) => Value::Array(items.iter().map(|i| with_steps(i, refs)).collect()),
            other => with_steps(other, refs),
        }
    }
    let Value::Object(map) = schema else { return schema.clone() };
    let mut out = serde_json::Map::with_capacity(map.len() + 1);
    for (keyword, value) in map {
        let value = match (keyword.as_str(), value) {
            (k, _) if AS_WRITTEN.contains(&k) => value.clone(),
            (k, Value::Object(schemas)) if SUBSCHEMA_MAPS.contains(&k) => {
                Value::Object(schemas.iter().map(|(name, s)| (name.clone(), each(s, refs))).collect())
            }
            ("allOf", Value::Array(all)) => {
                Value::Array(all.iter().map(|s| with_steps(s, refs)).chain(std::iter::once(step())).collect())
            }
            (k, Value::String(to)) if REFERENCES.contains(&k) => {
                refs.push(to.clone());
                value.clone()
            }
            _ => each(value, refs),
        };
        out.insert(keyword.clone(), value);
    }
    if !map.contains_key("allOf") {
        out.insert("allOf".into(), Value::Array(vec![step()]));
    }
    Value::Object(out)
}

/// Whether the reference `to` names a place [`with_steps`] gave steps to: a fragment is
/// walked from the document's root ([`stepped_at`]); one resolved against an `$id` (the
/// root's, or an embedded resource's: the walk finds no such place) may not pass through
/// `const` or `enum` at all.
fn steps_where_it_points(schema: &Value, to: &str) -> bool {
    let Some((base, written)) = to.split_once('#') else { return true };
    let pointer = percent_encoding::percent_decode_str(written).decode_utf8_lossy();
    let no_data_on_the_way = || !pointer.split('/').any(|segment| AS_WRITTEN.contains(&segment));
    if base.is_empty() && written.starts_with('/') {
        stepped_at(schema, &pointer).unwrap_or_else(no_data_on_the_way)
    } else {
        no_data_on_the_way()
    }
}

/// Whether the JSON Pointer `to` (a reference's fragment, `/…`, percent-decoded) names, from `schema`'s root,
/// a place [`with_steps`] gave steps to — not one it left as written: a pointer may name any
/// value, and the library compiles what it names as a subschema, so a diamond written inside
/// `default` was checked without a step. `None` if the root has no such place.
fn stepped_at(schema: &Value, to: &str) -> Option<bool> {
    let mut at = schema;
    // Where in the walk `at` is: a subschema (its keys are keywords), a map of subschemas
    // (its keys are names), or a keyword's value (a subschema, or an array of them).
    enum Place {
        Schema,
        Names,
        Value,
    }
    let mut place = Place::Schema;
    for segment in to.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if matches!(place, Place::Value) {
            match at {
                Value::Array(items) => {
                    let item = segment.parse::<usize>().ok().and_then(|i| items.get(i))?;
                    at = item;
                    place = Place::Schema;
                    continue;
                }
                _ => place = Place::Schema,
            }
        }
        // An array in an array is left as written; what names nothing from the root (a place
        // in an embedded resource's own pointers) is not known here.
        let map = match at {
            Value::Object(map) => map,
            Value::Array(_) => return Some(false),
            _ => return None,
        };
        let next = map.get(&segment)?;
        place = match place {
            Place::Names => Place::Value,
            _ if AS_WRITTEN.contains(&segment.as_str()) => return Some(false),
            _ if SUBSCHEMA_MAPS.contains(&segment.as_str()) => Place::Names,
            _ => Place::Value,
        };
        at = next;
    }
    Some(!matches!(place, Place::Names))
}

/// `said` without the [`step`]s [`with_steps`] added, where the library quotes a subschema
/// (`not`'s refusal does).
fn without_steps(said: &str) -> String {
    let step = format!(r#"{{"{STEP}":true}}"#);
    said.replace(&format!(r#","allOf":[{step}]"#), "")
        .replace(&format!(r#""allOf":[{step}],"#), "")
        .replace(&format!(r#""allOf":[{step}]"#), "")
        .replace(&format!(",{step}]"), "]")
}

/// The most memory one compiled `pattern` (and its search cache) may take.
const PATTERN_BYTES: usize = 256 * 1024;

/// Steps a backtracking `pattern` may take for one string (see [`compile_stored`]): a
/// hundredth of the engine's default.
const BACKTRACK_STEPS: usize = 10_000;

/// Compiles a schema stored before [`compile`] refused backtracking patterns: with the
/// backtracking engine, each match held to [`BACKTRACK_STEPS`] (one that runs out fails its
/// event, naming where), so a type whose schema has lookaround is still checked after an
/// upgrade rather than silently not at all. New and changed schemas get [`compile`].
fn compile_stored(schema: &Value) -> Result<jsonschema::Validator, Invalid> {
    compile(schema).or_else(|_| {
        let patterns = jsonschema::PatternOptions::fancy_regex()
            .backtrack_limit(BACKTRACK_STEPS)
            .size_limit(PATTERN_BYTES)
            .dfa_size_limit(PATTERN_BYTES);
        compile_with(schema, patterns)
    })
}

/// A JSON Pointer into `data` as a field path in this API's style (`data.items[0].sku`).
fn data_path(prefix: &str, pointer: &str) -> String {
    let mut path = if prefix.is_empty() { "data".to_string() } else { format!("{prefix}.data") };
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            path.push('.');
            path.push_str(&segment);
        }
    }
    path
}

/// The first way `data` (`size` bytes as text) does not fit `validator`, as an [`Invalid`]
/// naming where; or that checking it took more than its budget of steps ([`STEPS_AT_LEAST`]).
fn fits(validator: &jsonschema::Validator, data: &Value, size: usize, prefix: &str) -> Result<(), Invalid> {
    let steps = STEPS_AT_LEAST.saturating_add(STEPS_PER_BYTE.saturating_mul(size as u64));
    STEPS_LEFT.with(|left| left.set(steps));
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        validator.validate(data).map_err(|e| Invalid::new(data_path(prefix, e.instance_path().as_str()), said(&e)))
    }));
    STEPS_LEFT.with(|left| left.set(u64::MAX));
    match checked {
        Ok(checked) => checked,
        Err(unwound) if unwound.is::<OutOfSteps>() => Err(Invalid::new(
            data_path(prefix, ""),
            format!(
                "checking it against its type's schema took over {steps} steps: the schema is too costly to check \
                 (its references or alternatives multiply), which only the platform's admin can change"
            ),
        )),
        Err(unwound) => std::panic::resume_unwind(unwound),
    }
}

/// The most of a refusal's words: the library's quote the value that did not fit, and an
/// array where an object belongs came back whole (a 12 MiB event in a 12 MiB answer).
const MOST_SAID: usize = 1024;

/// What `e` says, within [`MOST_SAID`]: the value named, not quoted, when quoting it is too
/// long, and the rest cut (a schema's `enum` of thousands is quoted too).
fn said(e: &jsonschema::ValidationError<'_>) -> String {
    let mut said = without_steps(&e.to_string());
    if said.len() > MOST_SAID {
        said = without_steps(&e.masked_with("the value").to_string());
    }
    if said.len() > MOST_SAID {
        let mut end = MOST_SAID;
        while !said.is_char_boundary(end) {
            end -= 1;
        }
        said.truncate(end);
        said.push('…');
    }
    said
}

/// Whether `data` (JSON text) fits `validator`'s schema.
fn check(validator: &jsonschema::Validator, data: &[u8], prefix: &str) -> Result<(), Invalid> {
    let parsed: Value = serde_json::from_slice(data)
        .or_else(|e| serde_json::from_slice(&crate::canonical::without_lone_surrogates(data)).map_err(|_| e))
        .map_err(|e| Invalid::new(data_path(prefix, ""), e.to_string()))?;
    fits(validator, &parsed, data.len(), prefix)
}

/// Checks a spec: its schema compiles and its example fits it.
fn checked(spec: &EventTypeSpec) -> Result<Option<jsonschema::Validator>, Invalid> {
    if spec.description.len() > 4096 {
        return Err(Invalid::new("description", "must be at most 4096 bytes"));
    }
    let bytes = serde_json::to_vec(spec).map_or(usize::MAX, |b| b.len());
    if bytes > MAX_DEFINITION_BYTES {
        let message = format!("the definition is {bytes} bytes; at most {MAX_DEFINITION_BYTES}");
        return Err(Invalid::new(if spec.schema.is_some() { "schema" } else { "example" }, message));
    }
    let validator = spec.schema.as_ref().map(compile).transpose()?;
    if let (Some(v), Some(example)) = (&validator, &spec.example) {
        let size = serde_json::to_vec(example).map_or(usize::MAX, |b| b.len());
        fits(v, example, size, "").map_err(|e| Invalid::new(e.field.replacen("data", "example", 1), e.message))?;
    }
    if spec.validate && validator.is_none() {
        return Err(Invalid::new("validate", "needs a schema to validate against"));
    }
    Ok(validator)
}

impl EventTypes {
    /// Materialises the catalogue from `records`, the whole registry topic.
    pub fn load(feed: Arc<Feed>, records: &[LogRecord]) -> EventTypes {
        let types = EventTypes {
            feed,
            types: RwLock::default(),
            writes: tokio::sync::Mutex::new(()),
            page: Default::default(),
            derived: Default::default(),
            large_checks: Default::default(),
        };
        crate::catalog::load(&types, records, crate::catalog::Owner::EventTypes);
        types
    }

    async fn persist(&self, event_type: &EventType) -> Result<(), CatalogError> {
        let value = Bytes::from(serde_json::to_vec(event_type).expect("serializes"));
        self.feed.write(Key::event_type(&event_type.name).as_bytes(), value).await.map(|_| ())
    }

    /// Adds `name` to the catalogue.
    pub async fn create(&self, name: String, spec: EventTypeSpec) -> Result<EventType, EventTypeError> {
        check_name(&name)?;
        checked(&spec)?;
        let _writing = self.writes.lock().await;
        {
            let types = self.types.read().unwrap();
            if types.contains_key(&name) {
                return Err(EventTypeError::Exists(name));
            }
            if types.len() >= MAX_EVENT_TYPES {
                return Err(EventTypeError::Full);
            }
        }
        let now = rfc3339_ms(now_ms());
        let event_type = EventType { name, spec, created_at: now.clone(), updated_at: now };
        self.persist(&event_type).await?;
        Ok(event_type)
    }

    /// Changes `name`'s spec to what `change` makes of the current one; `None` when there is
    /// no such type. The read, the change and the write are one step against other writes.
    pub async fn update(
        &self,
        name: &str,
        change: impl FnOnce(&EventTypeSpec) -> Result<EventTypeSpec, Invalid>,
    ) -> Result<Option<EventType>, EventTypeError> {
        let _writing = self.writes.lock().await;
        let Some(current) = self.get(name) else { return Ok(None) };
        let spec = change(&current.spec)?;
        checked(&spec)?;
        let event_type = EventType { spec, updated_at: rfc3339_ms(now_ms()), ..current };
        self.persist(&event_type).await?;
        Ok(Some(event_type))
    }

    /// Removes `name`; `false` when there is no such type. Subscriptions naming it keep
    /// receiving events of that type: the catalogue describes, routing does not depend on it.
    pub async fn delete(&self, name: &str) -> Result<bool, CatalogError> {
        let _writing = self.writes.lock().await;
        if self.get(name).is_none() {
            return Ok(false);
        }
        self.feed.write(Key::event_type(name).as_bytes(), Bytes::new()).await?;
        Ok(true)
    }

    /// One type, as this process has applied it.
    pub fn get(&self, name: &str) -> Option<EventType> {
        self.types.read().unwrap().get(name).map(|h| h.event_type.clone())
    }

    /// The whole catalogue by name as the list answers it (`{"items","next":null}`), made
    /// once per change and shared.
    pub fn page(&self) -> bytes::Bytes {
        self.kept(&self.page, |items| serde_json::json!({ "items": items, "next": null }).to_string())
    }

    /// What `make` makes of every type (by name), made once per change and shared. (One
    /// document is kept: the OpenAPI document's examples are its one use.)
    pub fn derived(&self, make: impl FnOnce(Vec<&EventType>) -> String) -> bytes::Bytes {
        self.kept(&self.derived, make)
    }

    /// What `slot` keeps, or what `make` makes of every type (by name), then kept. Made and
    /// kept under the types' read lock: a change (under the write lock, which empties the
    /// slots) cannot land between the reading and the keeping, so what is kept is never older.
    fn kept(
        &self,
        slot: &std::sync::Mutex<Option<bytes::Bytes>>,
        make: impl FnOnce(Vec<&EventType>) -> String,
    ) -> bytes::Bytes {
        let types = self.types.read().unwrap();
        let mut kept = slot.lock().unwrap();
        if let Some(made) = &*kept {
            return made.clone();
        }
        let mut items: Vec<&EventType> = types.values().map(|h| &h.event_type).collect();
        items.sort_by(|a, b| a.name.cmp(&b.name));
        let made = bytes::Bytes::from(make(items));
        *kept = Some(made.clone());
        made
    }

    /// Every type, by name.
    pub fn list(&self) -> Vec<EventType> {
        let mut items: Vec<EventType> = self.types.read().unwrap().values().map(|h| h.event_type.clone()).collect();
        items.sort_by(|a, b| a.name.cmp(&b.name));
        items
    }

    /// Where in `names` the catalogue has no such type.
    pub fn unknown(&self, names: &[String]) -> Vec<usize> {
        let types = self.types.read().unwrap();
        (0..names.len()).filter(|&i| !types.contains_key(&names[i])).collect()
    }

    /// Whether the catalogue holds no type at all (a platform that does not use it).
    pub fn is_empty(&self) -> bool {
        self.types.read().unwrap().is_empty()
    }

    /// Whether an event of `tenant` and `event_type` with `data` may be accepted: it may unless
    /// the type has a schema, validation is on for it (or `always`), and `data` does not fit
    /// (`prefix` names the event's place in a batch). Checked in place while `in_place` (the
    /// request's bytes yet to be checked on the runtime's thread, from [`CHECKED_IN_PLACE`])
    /// holds it, else off the runtime's threads, one at a time, tenants in turns.
    pub async fn check_event(
        self: &Arc<Self>,
        event_type: &str,
        tenant: &str,
        data: bytes::Bytes,
        prefix: &str,
        always: bool,
        in_place: &mut usize,
    ) -> Result<(), EventTypeError> {
        let Some(validator) = self.validator(event_type, always) else { return Ok(()) };
        if data.len() <= *in_place {
            *in_place -= data.len();
            return Ok(check(&validator, &data, prefix)?);
        }
        let turn = self.large_checks.turn(tenant).await;
        let prefix = prefix.to_string();
        let checked = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            check(&validator, &data, &prefix)
        })
        .await;
        match checked {
            Ok(checked) => Ok(checked?),
            Err(e) => {
                tracing::error!(event_type, error = %e, "an event's schema check failed");
                Err(EventTypeError::Unchecked(e.to_string()))
            }
        }
    }

    /// The validator of `event_type` if its events are checked (validation on for it, or
    /// `always`).
    fn validator(&self, event_type: &str, always: bool) -> Option<Arc<jsonschema::Validator>> {
        match self.types.read().unwrap().get(event_type) {
            Some(Held { event_type: t, validator: Some(v) }) if always || t.spec.validate => Some(v.clone()),
            _ => None,
        }
    }
}

impl Apply for EventTypes {
    /// An event type, or a tombstone deleting one. A schema this version cannot compile
    /// (written by a newer one) keeps the type listed, unchecked.
    fn apply(&self, entry: Entry<'_>) {
        if entry.kind != Kind::EventType {
            return;
        }
        match serde_json::from_slice::<EventType>(&entry.record.value) {
            Ok(event_type) => {
                // Compiled before the lock is taken: ingest checks do not wait for it.
                let validator = event_type.spec.schema.as_ref().and_then(|s| match compile_stored(s) {
                    Ok(v) => Some(Arc::new(v)),
                    Err(e) => {
                        tracing::warn!(event_type = %event_type.name, error = %e.message, "a stored schema does not compile; not checked");
                        None
                    }
                });
                let mut types = self.types.write().unwrap();
                types.insert(entry.id, Held { event_type, validator });
                *self.page.lock().unwrap() = None;
                *self.derived.lock().unwrap() = None;
            }
            Err(_) => {
                let mut types = self.types.write().unwrap();
                types.remove(&entry.id);
                *self.page.lock().unwrap() = None;
                *self.derived.lock().unwrap() = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The list's page is made once and shared until the catalogue changes (made per request,
    /// each tenant key's list cloned and serialized every schema), and a change is in the next.
    #[test]
    fn the_list_page_is_made_once_per_change() {
        use crate::catalog::Key;
        use crate::log::stub::Stub;
        let record = |name: &str| LogRecord {
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: Key::event_type(name).into_bytes().into(),
            value: serde_json::to_vec(&json!({ "name": name, "created_at": "", "updated_at": "" })).unwrap().into(),
        };
        let (feed, _) = Feed::new(Arc::new(Stub::new(true, true)), "catalog".into(), 0);
        let types = EventTypes::load(Arc::new(feed), &[record("a.created")]);
        let first = types.page();
        assert_eq!(first.as_ptr(), types.page().as_ptr(), "shared, not made again");
        let made = std::cell::Cell::new(0);
        let derive = || {
            types.derived(|all| {
                made.set(made.get() + 1);
                all.len().to_string()
            })
        };
        assert_eq!((derive(), derive(), made.get()), ("1".into(), "1".into(), 1), "a derived document made once");
        crate::catalog::load(&types, &[record("b.created")], crate::catalog::Owner::EventTypes);
        assert_eq!((derive(), made.get()), ("2".into(), 2), "and made again after a change");
        let changed: Value = serde_json::from_slice(&types.page()).unwrap();
        let names: Vec<&str> =
            changed["items"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["a.created", "b.created"]);
    }

    /// A large event's check (its data made a `Value`, tens of times its size, and walked) is
    /// made off the runtime's threads: on one, a megabyte's took hundreds of milliseconds from
    /// every tenant's deliveries and requests there.
    #[tokio::test]
    async fn a_large_event_s_check_holds_no_runtime_thread() {
        use crate::catalog::Key;
        use crate::log::stub::Stub;
        let stored = json!({ "name": "big", "schema": { "type": "array", "items": { "type": "object" } },
            "validate": true, "created_at": "", "updated_at": "" });
        let record = LogRecord {
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: Key::event_type("big").into_bytes().into(),
            value: serde_json::to_vec(&stored).unwrap().into(),
        };
        let (feed, _) = Feed::new(Arc::new(Stub::new(true, true)), "catalog".into(), 0);
        let types = Arc::new(EventTypes::load(Arc::new(feed), &[record]));
        let data = bytes::Bytes::from(format!("[{}{{\"a\":0}}]", "{\"a\":0},".repeat(400_000)));
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    tokio::task::yield_now().await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        tokio::task::yield_now().await;
        let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
        let mut in_place = CHECKED_IN_PLACE;
        assert!(types.check_event("big", "t", data, "", false, &mut in_place).await.is_ok());
        let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(during > 10, "the runtime's thread went on meanwhile: {during} turns");
        // A batch's events, each small, are checked in place only up to the bound together.
        let small = bytes::Bytes::from(format!("[{}{{\"a\":0}}]", "{\"a\":0},".repeat(2_000)));
        let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
        let mut in_place = CHECKED_IN_PLACE;
        for _ in 0..100 {
            assert!(types.check_event("big", "t", small.clone(), "", false, &mut in_place).await.is_ok());
        }
        let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
        ticker.abort();
        assert!(during > 10, "the runtime's thread went on meanwhile: {during} turns");
    }

    /// A type stored before backtracking patterns were refused is still checked after an
    /// upgrade, each match bounded — not silently left unchecked.
    #[tokio::test]
    async fn a_stored_schema_with_lookaround_is_still_checked() {
        use crate::catalog::Key;
        use crate::log::stub::Stub;
        let schema = json!({ "type": "string", "pattern": "^(?!test)" });
        let stored =
            json!({ "name": "legacy", "schema": schema, "validate": true, "created_at": "", "updated_at": "" });
        let record = LogRecord {
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: Key::event_type("legacy").into_bytes().into(),
            value: serde_json::to_vec(&stored).unwrap().into(),
        };
        let (feed, _) = Feed::new(Arc::new(Stub::new(true, true)), "catalog".into(), 0);
        let types = Arc::new(EventTypes::load(Arc::new(feed), &[record]));
        let check = |data: &'static [u8]| {
            let types = types.clone();
            async move {
                types.check_event("legacy", "t", Bytes::from_static(data), "", false, &mut { CHECKED_IN_PLACE }).await
            }
        };
        assert!(check(br#""fine""#).await.is_ok());
        assert!(matches!(check(br#""testing""#).await, Err(EventTypeError::Invalid(i)) if i.field == "data"));
        assert_eq!(checked(&EventTypeSpec { schema: Some(schema), ..Default::default() }).unwrap_err().field, "schema");
    }

    #[test]
    fn pointers_become_field_paths() {
        assert_eq!(data_path("", ""), "data");
        assert_eq!(data_path("", "/items/0/sku"), "data.items[0].sku");
        assert_eq!(data_path("[3]", "/a~1b/c~0d"), "[3].data.a/b.c~d");
    }

    /// The step each subschema takes changes nothing a schema says: data (`const`, `enum`)
    /// and maps of subschemas (`properties`, `$defs`) are left as they are, and a `$ref` to
    /// a subschema anywhere still finds it.
    #[test]
    fn steps_leave_what_a_schema_says_as_it_is() {
        let schema = json!({
            "type": "object",
            "additionalProperties": false,
            "properties": { "a": { "const": { "x": 1 } }, "b": { "$ref": "#/$defs/small" } },
            "$defs": { "small": { "enum": [{ "y": 2 }] } }
        });
        let v = compile(&schema).unwrap();
        let fit = |data: Value| fits(&v, &data, data.to_string().len(), "");
        assert!(fit(json!({ "a": { "x": 1 }, "b": { "y": 2 } })).is_ok());
        assert_eq!(fit(json!({ "a": { "x": 1, STEP: true } })).unwrap_err().field, "data.a");
        assert_eq!(fit(json!({ "b": { "y": 2, STEP: true } })).unwrap_err().field, "data.b");
        assert_eq!(fit(json!({ STEP: true })).unwrap_err().field, "data");
        // A check out of steps leaves none spent for the next on this thread.
        assert!(fit(json!({ "a": { "x": 1 } })).is_ok());
        // Maps of names stay maps of names; a refusal quoting a subschema quotes it as written.
        let v = compile(&json!({ "dependentRequired": { "a": ["b"] }, "not": { "type": "string" } })).unwrap();
        assert!(fits(&v, &json!({ "a": 1, "b": 2 }), 16, "").is_ok());
        assert_eq!(fits(&v, &json!({ "a": 1 }), 8, "").unwrap_err().field, "data");
        let refused = fits(&v, &json!("x"), 3, "").unwrap_err().message;
        assert!(!refused.contains(STEP) && refused.contains(r#"{"type":"string"}"#), "{refused}");
        // A `$ref` to an `allOf`'s member names the member the schema's author wrote there.
        let v = compile(&json!({
            "$defs": { "int": { "allOf": [{ "type": "integer" }] } },
            "properties": { "n": { "$ref": "#/$defs/int/allOf/0" } }
        }))
        .unwrap();
        assert_eq!(fits(&v, &json!({ "n": "x" }), 9, "").unwrap_err().field, "data.n");
        // A reference into data (`const`) names no subschema: it would be checked without
        // steps, however it is written; a subschema written in an annotation has its steps.
        for to in ["#/const/d0", "json-schema:///#/const/d0"] {
            for keyword in ["$ref", "$dynamicRef"] {
                let hidden = json!({ keyword: to, "const": { "d0": { "type": "string" } } });
                assert_eq!(compile(&hidden).unwrap_err().field, "schema", "{keyword} {to}");
            }
        }
        let embedded = json!({
            "$ref": "#/$defs/e",
            "$defs": { "e": { "$id": "https://h.example/e", "$ref": "#/const/d0", "const": { "d0": {} } } }
        });
        assert_eq!(compile(&embedded).unwrap_err().field, "schema");
        let v = compile(&json!({ "$ref": "#/default/d0", "default": { "d0": { "type": "string" } } })).unwrap();
        assert!(fits(&v, &json!(1), 1, "").is_err());
        for named in [
            json!({ "$ref": "#/properties/const", "properties": { "const": { "type": "string" } } }),
            json!({ "$ref": "#/components/schemas/default", "components": { "schemas": { "default": {} } } }),
        ] {
            assert!(compile(&named).is_ok(), "{named}");
        }
        let v = compile(&json!({ "not": { "allOf": [{ "type": "string" }] } })).unwrap();
        let refused = fits(&v, &json!("x"), 3, "").unwrap_err().message;
        assert!(!refused.contains(STEP) && refused.contains(r#"{"allOf":[{"type":"string"}]}"#), "{refused}");
    }

    #[test]
    fn a_spec_needs_a_compiling_schema_and_a_fitting_example() {
        let schema = json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}});
        let ok = EventTypeSpec { schema: Some(schema.clone()), example: Some(json!({"id": 1})), ..Default::default() };
        assert!(checked(&ok).unwrap().is_some());
        let bad_example = EventTypeSpec { example: Some(json!({"id": "x"})), ..ok.clone() };
        assert_eq!(checked(&bad_example).unwrap_err().field, "example.id");
        let not_a_schema = EventTypeSpec { schema: Some(json!({"type": 12})), ..Default::default() };
        assert_eq!(checked(&not_a_schema).unwrap_err().field, "schema");
        let remote =
            EventTypeSpec { schema: Some(json!({"$ref": "https://example.com/s.json"})), ..Default::default() };
        let refused = checked(&remote).unwrap_err();
        assert_eq!(refused.field, "schema");
        // Refused because nothing may fetch it (the crate's HTTP and file retrieval are left
        // out), not because a fetch was tried and failed.
        assert!(refused.message.contains("resolve-http"), "{}", refused.message);
        let nothing_to_check = EventTypeSpec { validate: true, ..Default::default() };
        assert_eq!(checked(&nothing_to_check).unwrap_err().field, "validate");
    }

    #[test]
    fn names_follow_the_rule_events_follow() {
        assert!(check_name("order.created").is_ok());
        assert!(check_name("container.status.updated:v2").is_ok());
        for bad in ["", "a\nb", &"x".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
