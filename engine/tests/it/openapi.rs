//! The OpenAPI document against the server: every documented operation exists and answers
//! as documented, and random or malformed input at every one of them gets no 5xx and
//! appends nothing when it is rejected.

use crate::support::{spawn_herald, Api, TestHerald, TOKEN};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

fn document() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/herald.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Every (method, path template, operation) of the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            ops.push((method.to_uppercase(), path.clone(), op.clone()));
        }
    }
    ops
}

/// Appends to the topics a request writes to (deliveries: ingest and replay; subscriptions:
/// registry and tenants), from `/metrics`. Retry tiers and dead letters are left out: the
/// dispatcher writes those in the background for events an earlier request published.
async fn appends(api: &Api) -> f64 {
    let (_, text) = api.raw("GET", "/metrics", None, None).await;
    text.as_str()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("herald_log_append_seconds_count"))
        .filter(|l| l.contains("topic=\"herald.deliveries\"") || l.contains("topic=\"herald.subscriptions\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_served_document_is_the_file_and_every_operation_answers_as_documented() {
    let h = TestHerald::start().await;
    let (status, served) = h.api.raw("GET", "/v1/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let doc = document();
    assert_eq!(served, doc);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let ops = operations(&doc);
    assert!(ops.len() >= 17, "{} operations", ops.len());
    for (method, path, op) in ops {
        let concrete = path.replace("{id}", "nope").replace("{key_id}", "nope").replace("{name}", "nope");
        let body = op.get("requestBody").map(|_| Bytes::from_static(b"{}"));
        let (status, answer) = h.api.raw(&method, &concrete, body, Some(TOKEN)).await;
        assert_ne!(status, 405, "{method} {path} is not routed");
        assert_ne!(answer["error"]["message"], "route not found", "{method} {path} is not routed");
        let documented: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
        assert!(
            documented.iter().any(|c| *c == status.as_str()),
            "{method} {path} answered {status}, documented {documented:?}: {answer}"
        );
    }
}

/// Answers other tests meet on the way are in the document too, for a client generated from
/// it: a body that is not JSON by its type (`415`) or too large (`413`) at every operation
/// taking one; a static webhook's deletion and a resend to a disabled subscription (`409`).
#[tokio::test]
async fn refusals_met_past_the_first_checks_are_documented() {
    let rx = crate::support::Receiver::start().await;
    let webhook: herald::config::StaticWebhook =
        serde_json::from_value(json!({ "name": "erp", "endpoint": rx.url("/erp"), "secret": "file-secret" })).unwrap();
    let forward_secret = "f".repeat(32);
    let h = TestHerald::start_with(|c| {
        c.webhooks.push(webhook);
        c.edge.forward_secret = Some(forward_secret.clone());
    })
    .await;
    let doc = document();
    let documented = |method: &str, path: &str, status: u16| {
        doc["paths"][path][method.to_lowercase()]["responses"].get(status.to_string()).is_some()
    };
    let mut missing = Vec::new();
    let large = Bytes::from(format!("{{\"pad\":\"{}\"}}", "p".repeat(17 << 20)));
    // A forward carries an event and its delivery: it takes more.
    let larger = Bytes::from(format!("{{\"pad\":\"{}\"}}", "p".repeat(25 << 20)));
    for (method, path, op) in operations(&doc) {
        if op.get("requestBody").is_none() {
            continue;
        }
        // The edge forward is the processes' own, under their secret.
        let token = if path == "/v1/edge/forward" { forward_secret.as_str() } else { TOKEN };
        let concrete = path.replace("{id}", "nope").replace("{key_id}", "nope").replace("{name}", "nope");
        let plain = [("content-type", "text/plain")];
        let (status, _, err) =
            h.api.request_with(&method, &concrete, Some(Bytes::from_static(b"{}")), Some(token), &plain).await.unwrap();
        assert_eq!(status, 415, "{method} {path}: {err}");
        if !documented(&method, &path, 415) {
            missing.push(format!("{method} {path} 415"));
        }
        let large = if path == "/v1/edge/forward" { larger.clone() } else { large.clone() };
        let (status, err) = h.api.raw(&method, &concrete, Some(large), Some(token)).await;
        assert_eq!(status, 413, "{method} {path}: {err}");
        if !documented(&method, &path, 413) {
            missing.push(format!("{method} {path} 413"));
        }
    }
    let (status, err) = h.api.delete("/v1/subscriptions/static-erp").await;
    assert_eq!(status, 409, "{err}");
    if !documented("DELETE", "/v1/subscriptions/{id}", 409) {
        missing.push("DELETE /v1/subscriptions/{id} 409".into());
    }
    let sub = h.api.subscribe(json!({ "url": rx.url("/off"), "events": ["off"] })).await;
    let id = sub["id"].as_str().unwrap();
    assert_eq!(h.api.post("/v1/events", json!({ "id": "e-off", "type": "off", "data": {} })).await.0, 202);
    rx.wait_on("/off", 1).await;
    assert_eq!(h.api.patch(&format!("/v1/subscriptions/{id}"), json!({ "enabled": false })).await.0, 200);
    let (status, err) = h.api.post("/v1/events/e-off/resend", json!({ "subscription": id })).await;
    assert_eq!(status, 409, "{err}");
    if !documented("POST", "/v1/events/{id}/resend", 409) {
        missing.push("POST /v1/events/{id}/resend 409".into());
    }
    assert!(missing.is_empty(), "answered but not documented: {missing:?}");
}

/// A random JSON value, biased towards the field names an operation knows.
fn random_value(rng: &mut rand::rngs::StdRng, fields: &[String], depth: u32) -> Value {
    match rng.gen_range(0..if depth > 2 { 6 } else { 9 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.gen()),
        2 => json!(rng.gen_range(-1_000_000_000i64..1_000_000_000)),
        3 => json!(rng.gen::<f64>() * 1e12),
        4 => json!(
            [
                "",
                "x",
                "PT30S",
                "30s",
                "-5s",
                "http://127.0.0.1:1/x",
                "https://h.example.com",
                "whsec_AAAA",
                "hmac",
                "standard",
                "fixed",
                "exponential",
                "webhook",
                "amqp",
                "basic",
                "oauth2",
                "\u{0}\u{7}",
                "🦀",
                "a b",
                "../../etc/passwd"
            ][rng.gen_range(0..20)]
        ),
        5 => Value::String((0..rng.gen_range(0..300)).map(|_| rng.gen_range(' '..'\u{2FF}')).collect()),
        6 => Value::Array((0..rng.gen_range(0..4)).map(|_| random_value(rng, fields, depth + 1)).collect()),
        _ => {
            let mut obj = Map::new();
            for _ in 0..rng.gen_range(0..6) {
                let key = if !fields.is_empty() && rng.gen_bool(0.8) {
                    fields[rng.gen_range(0..fields.len())].clone()
                } else {
                    format!("k{}", rng.gen::<u8>())
                };
                obj.insert(key, random_value(rng, fields, depth + 1));
            }
            Value::Object(obj)
        }
    }
}

/// Every property name the document mentions, for realistic keys.
fn field_names(doc: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Object(props)) = m.get("properties") {
                    out.extend(props.keys().cloned());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc, &mut out);
    out.sort();
    out.dedup();
    out
}

#[tokio::test]
async fn random_and_malformed_input_at_every_operation_gets_no_5xx_and_appends_nothing_when_rejected() {
    // A process of its own: the metrics recorder is per process, and other tests' servers in
    // this one would move the append counts.
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    let doc = document();
    let fields = field_names(&doc);
    // Real ids, so bodies are judged past the lookup.
    let sub = api.subscribe(json!({ "url": "https://hooks.example.com/fuzz", "ordering": { "key": "/data/k" } })).await;
    let (_, tenant) = api.post("/v1/tenants", json!({ "name": "fuzz" })).await;
    api.post("/v1/event-types", json!({ "name": "fuzz.type", "schema": { "type": "object" }, "validate": true })).await;
    let (sub_id, tenant_id) = (sub["id"].as_str().unwrap().to_string(), tenant["id"].as_str().unwrap().to_string());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4e52_414c_4421);
    let mut requests = 0;
    let codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"].clone();
    let mut undocumented = std::collections::BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let concrete = path
            .replace("{id}", if path.contains("tenants") { &tenant_id } else { &sub_id })
            .replace("{key_id}", "key_nope")
            .replace("{name}", "fuzz.type");
        let cases = if op.get("requestBody").is_some() { 120 } else { 8 };
        for case in 0..cases {
            let body: Bytes = match case % 6 {
                0 => Bytes::from(b"{".to_vec()),
                1 => {
                    let full = random_value(&mut rng, &fields, 0).to_string();
                    let cut = rng.gen_range(0..=full.len());
                    Bytes::from(full.as_bytes()[..cut].to_vec())
                }
                2 => Bytes::from(vec![0xff, 0xfe, b'{', 0x80]),
                _ => {
                    let mut v = random_value(&mut rng, &fields, 1);
                    if rng.gen_bool(0.5) && path.ends_with("batch") {
                        v = Value::Array(vec![v]);
                    }
                    Bytes::from(v.to_string())
                }
            };
            let before = appends(&api).await;
            let (status, answer) = api.raw(&method, &concrete, Some(body.clone()), Some(TOKEN)).await;
            requests += 1;
            assert!(
                status.as_u16() < 500,
                "{method} {concrete} answered {status} to {:?}: {answer}",
                String::from_utf8_lossy(&body)
            );
            if status.is_client_error() {
                assert_eq!(
                    appends(&api).await,
                    before,
                    "{method} {concrete} appended for a rejected {:?}",
                    String::from_utf8_lossy(&body)
                );
                assert!(answer["error"]["code"].is_string(), "errors keep the contract's shape: {answer}");
                assert!(codes.as_array().unwrap().contains(&answer["error"]["code"]), "{answer} not in {codes}");
            }
            // What a client generated from the document expects to be answered.
            if op["responses"].get(status.as_str()).is_none() {
                undocumented.insert(format!("{method} {path} {status}"));
            }
        }
    }
    assert!(undocumented.is_empty(), "answered but not documented: {undocumented:?}");
    // The server is still well after it all.
    let (status, _) = api.raw("GET", "/readyz", None, None).await;
    assert_eq!(status, 200);
    eprintln!("openapi fuzz: {requests} requests, no 5xx");
}

/// Every path the README's API tables list is in the document: a client generated from it
/// had no edge agent's connection (`GET /v1/edge/connect`), which the README documents.
#[test]
fn every_path_the_readme_lists_is_documented() {
    let doc = document();
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let mut listed = 0;
    let mut missing = Vec::new();
    for row in readme.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split(" | ").next().unwrap();
        for (i, _) in first.match_indices("/v1/") {
            let path: String = first[i..].chars().take_while(|c| !matches!(c, '`' | '?' | ' ' | ',')).collect();
            listed += 1;
            if doc["paths"].get(&path).is_none() {
                missing.push(path);
            }
        }
    }
    assert!(listed >= 20, "{listed} paths read from the README's tables");
    assert!(missing.is_empty(), "listed in the README, not in the document: {missing:?}");
}

/// A list that takes a `cursor` documents a `next` to pass as one: the blocked keys' said
/// `next` was always null while their handler paged, and a strict generated client failed to
/// read the answer once more keys were blocked than a page holds.
#[test]
fn a_list_that_takes_a_cursor_documents_a_next_to_pass_as_one() {
    let doc = document();
    let mut lists = 0;
    for (method, path, op) in operations(&doc) {
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        if !params.iter().any(|p| p["name"] == "cursor") {
            continue;
        }
        lists += 1;
        let reference = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].as_str().unwrap();
        let schema = &doc["components"]["schemas"][reference.rsplit('/').next().unwrap()];
        let next = &schema["properties"]["next"]["type"];
        assert!(
            next == "string" || next.as_array().is_some_and(|t| t.contains(&json!("string"))),
            "{method} {path} takes a cursor, and documents next as {next}"
        );
    }
    assert!(lists >= 6, "{lists} lists take a cursor");
}

/// The ranges the document states are the ones the API enforces (`herald::model::range`, the
/// one place that decides them).
#[test]
fn every_documented_range_is_the_one_the_api_enforces() {
    use herald::config::HumanDuration;
    use herald::model::range;
    let doc = document();
    let s = &doc["components"]["schemas"];
    let duration = |v: &Value| serde_json::from_value::<HumanDuration>(v.clone()).unwrap().0;
    let durations = |field: &Value| (duration(&field["x-minimum"]), duration(&field["x-maximum"]));
    let numbers = |field: &Value| (field["minimum"].as_f64().unwrap(), field["maximum"].as_f64().unwrap());
    let exponential = &s["Retry"]["oneOf"][0]["properties"];
    let fixed = &s["Retry"]["oneOf"][1]["properties"];
    let as_f64 = |(a, b): (u32, u32)| (f64::from(a), f64::from(b));
    assert_eq!(durations(&exponential["initial"]), range::INITIAL);
    assert_eq!(durations(&exponential["max_interval"]), range::MAX_INTERVAL);
    assert_eq!(durations(&exponential["max_age"]), range::MAX_AGE);
    assert_eq!(durations(&fixed["interval"]), range::FIXED_INTERVAL);
    assert_eq!(numbers(&exponential["multiplier"]), range::MULTIPLIER);
    assert_eq!(numbers(&exponential["jitter"]), range::JITTER);
    assert_eq!(numbers(&exponential["max_attempts"]), as_f64(range::MAX_ATTEMPTS));
    assert_eq!(numbers(&fixed["max_attempts"]), as_f64(range::MAX_ATTEMPTS));
    for name in ["SubscriptionInput", "SubscriptionPatch", "Subscription"] {
        let p = &s[name]["properties"];
        assert_eq!(durations(&p["timeout"]), range::TIMEOUT, "{name}");
        assert_eq!(numbers(&p["rate_limit"]), range::RATE_LIMIT, "{name}");
        assert_eq!(numbers(&p["max_in_flight"]), as_f64(range::MAX_IN_FLIGHT), "{name}");
        assert_eq!(p["headers"]["maxProperties"], range::HEADERS, "{name}");
        assert_eq!(p["events"]["maxItems"], range::EVENTS, "{name}");
        assert_eq!(p["key"]["maxLength"], range::VALUE, "{name}");
        assert_eq!(p["url"]["maxLength"], range::URL, "{name}");
    }
}

/// What the server takes and answers for the contract's shapes is in the document, so a client
/// generated from it can make and read them: an AMQP subscription (`transport: amqp` and its
/// `amqp` target), the errors' codes and `retry_after`, and what an edge forward reports.
#[tokio::test]
async fn shapes_the_server_takes_and_answers_are_documented() {
    let doc = document();
    let schema = |name: &str| doc["components"]["schemas"][name].clone();
    let h = TestHerald::start_with(|c| {
        c.api.key_rate_limit = 1.0;
    })
    .await;
    let input = json!({ "transport": "amqp",
        "amqp": { "uri": "amqp://guest:guest@127.0.0.1:5672/%2f", "exchange": "herald.doc", "routing_keys": { "T": "t" } } });
    for key in input.as_object().unwrap().keys() {
        assert!(schema("SubscriptionInput")["properties"].get(key).is_some(), "SubscriptionInput lacks {key}");
    }
    assert!(schema("SubscriptionInput")["properties"]["transport"]["enum"]
        .as_array()
        .unwrap()
        .contains(&json!("amqp")));
    assert!(schema("SubscriptionPatch")["properties"].get("amqp").is_some(), "SubscriptionPatch lacks amqp");
    let required = schema("SubscriptionInput")["required"].as_array().cloned().unwrap_or_default();
    assert!(!required.contains(&json!("url")), "an AMQP subscription has no url to give");
    let (status, sub) = h.api.post("/v1/subscriptions", input).await;
    assert_eq!(status, 201, "{sub}");
    for key in sub.as_object().unwrap().keys() {
        assert!(schema("Subscription")["properties"].get(key).is_some(), "Subscription lacks {key}: {sub}");
    }
    for key in sub["amqp"].as_object().unwrap().keys() {
        assert!(schema("AmqpTarget")["properties"].get(key).is_some(), "AmqpTarget lacks {key}");
    }

    // Error codes: a name taken (409), and a key over its rate (429, with `retry_after`).
    let codes = schema("Error")["properties"]["error"]["properties"]["code"]["enum"].clone();
    h.api.post("/v1/event-types", json!({ "name": "doc.taken" })).await;
    let (status, err) = h.api.post("/v1/event-types", json!({ "name": "doc.taken" })).await;
    assert_eq!(status, 409, "{err}");
    assert!(codes.as_array().unwrap().contains(&err["error"]["code"]), "{err} not in {codes}");
    let (_, tenant) = h.api.post("/v1/tenants", json!({ "name": "Doc" })).await;
    let (_, key) = h.api.post(&format!("/v1/tenants/{}/keys", tenant["id"].as_str().unwrap()), json!({})).await;
    let tenant_api = Api::new(h.herald.addr, key["key"].as_str().unwrap());
    let mut throttled = None;
    for _ in 0..20 {
        let (status, body) = tenant_api.get("/v1/subscriptions").await;
        if status == 429 {
            throttled = Some(body);
            break;
        }
    }
    let throttled = throttled.expect("throttled");
    assert!(codes.as_array().unwrap().contains(&throttled["error"]["code"]), "{throttled}");
    assert!(throttled["error"]["retry_after"].as_u64().is_some_and(|s| s >= 1), "{throttled}");

    // An edge forward reports the agent's `Report`: its fields are the documented ones.
    let report = herald::transport::edge::protocol::Report {
        seq: 0,
        outcome: herald::model::Outcome::Delivered {
            status: 200,
            latency: std::time::Duration::from_millis(5),
            response: None,
        },
    };
    let report = serde_json::to_value(report).unwrap();
    let documented = schema("EdgeReport");
    for name in documented["required"].as_array().unwrap() {
        assert!(report.get(name.as_str().unwrap()).is_some(), "EdgeReport requires {name}: {report}");
    }
    for key in report.as_object().unwrap().keys() {
        assert!(documented["properties"].get(key).is_some(), "EdgeReport lacks {key}");
    }
    // Names of up to 200 characters (maxLength counts characters), whatever their bytes.
    let long = "名".repeat(200);
    let (status, body) = h.api.post("/v1/tenants", json!({ "name": long })).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = h.api.post("/v1/edge-devices", json!({ "name": long })).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = h.api.post("/v1/tenants", json!({ "name": "名".repeat(201) })).await;
    assert_eq!(status, 400);
    // Lists answer `{items, next}`: edge devices and event types on one page, the few tenants
    // here too.
    for path in ["/v1/tenants", "/v1/edge-devices", "/v1/event-types"] {
        let (status, list) = h.api.get(path).await;
        assert_eq!((status.as_u16(), list.get("next")), (200, Some(&Value::Null)), "{path}: {list}");
        assert!(list["items"].is_array(), "{path}: {list}");
    }
    // A test ping's answer: every field documented, a null only where the type admits one.
    let rx = crate::support::Receiver::start().await;
    let (_, hook) = h.api.post("/v1/subscriptions", json!({ "url": rx.url("/ping") })).await;
    let (status, test) =
        h.api.post(&format!("/v1/subscriptions/{}/test", hook["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(status, 200, "{test}");
    let documented = schema("TestResult");
    for (key, value) in test.as_object().unwrap() {
        let property = &documented["properties"][key];
        assert!(!property.is_null(), "TestResult lacks {key}");
        let admits_null = property["type"].as_array().is_some_and(|t| t.contains(&json!("null")));
        assert!(!value.is_null() || admits_null, "TestResult.{key} is null but typed {}", property["type"]);
    }
    let forward = &doc["paths"]["/v1/edge/forward"]["post"];
    assert!(!forward["summary"].as_str().unwrap().contains("(admin)"), "the forward secret, not the admin token");
}
