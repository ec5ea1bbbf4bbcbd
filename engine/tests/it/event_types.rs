//! The event-type catalogue through the API: the admin defines types with schemas, tenants
//! read them, ingest refuses `data` that does not fit (naming where) and loses nothing, and
//! subscriptions naming uncatalogued types are warned or refused.

use crate::support::{tenant_with_key, Receiver, TestHerald};
use serde_json::json;

fn order_created() -> serde_json::Value {
    json!({
        "name": "order.created",
        "description": "An order was placed.",
        "schema": {
            "type": "object",
            "required": ["id", "items"],
            "properties": {
                "id": { "type": "integer" },
                "items": { "type": "array", "items": { "type": "object", "required": ["sku"], "properties": { "sku": { "type": "string" } } } }
            }
        },
        "example": { "id": 1001, "items": [{ "sku": "BOX-40" }] },
        "validate": true
    })
}

#[tokio::test]
async fn the_admin_keeps_a_catalogue_that_tenants_read_and_ingest_checks() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;

    let (status, created) = h.api.post("/v1/event-types", order_created()).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["name"], "order.created");
    assert!(created["created_at"].is_string());
    let (status, again) = h.api.post("/v1/event-types", order_created()).await;
    assert_eq!((status.as_u16(), again["error"]["code"].as_str()), (409, Some("CONFLICT")), "{again}");

    // The served OpenAPI document shows the catalogue's examples on `POST /v1/events`.
    let (_, doc) = h.api.get("/v1/openapi.json").await;
    let examples = &doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["examples"];
    assert_eq!(examples["order.created"]["value"]["data"]["id"], 1001, "{examples}");
    let (_, public) = h.api.raw("GET", "/v1/openapi.json", None, None).await;
    let public_examples =
        &public["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["examples"];
    assert!(public_examples.is_null(), "without a token the catalogue stays private: {public_examples}");

    // Bad definitions are refused, naming the field.
    let mut bad_example = order_created();
    bad_example["name"] = json!("order.bad");
    bad_example["example"] = json!({ "id": 1, "items": [{ "sku": 7 }] });
    let (status, err) = h.api.post("/v1/event-types", bad_example).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("example.items[0].sku")), "{err}");
    let not_a_schema = json!({ "name": "x", "schema": { "type": "integer", "minimum": "zero" } });
    let (status, err) = h.api.post("/v1/event-types", not_a_schema).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("schema")), "{err}");
    let unknown = json!({ "name": "x", "colour": "red" });
    let (status, err) = h.api.post("/v1/event-types", unknown).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("colour")), "{err}");

    // Tenants read the catalogue; only the admin changes it.
    let (_, tenant) = tenant_with_key(&h.api, "Acme").await;
    let (status, listed) = tenant.get("/v1/event-types").await;
    assert_eq!(status, 200);
    assert_eq!(listed["items"][0]["name"], "order.created", "{listed}");
    assert_eq!(tenant.get("/v1/event-types/order.created").await.1["example"]["id"], 1001);
    assert_eq!(tenant.post("/v1/event-types", json!({ "name": "mine" })).await.0, 403);
    assert_eq!(tenant.delete("/v1/event-types/order.created").await.0, 403);
    assert_eq!(h.api.get("/v1/event-types/nope").await.0, 404);

    // Ingest: data that does not fit is refused with the path, and nothing of the request is
    // accepted; data that fits is delivered.
    h.api.subscribe(json!({ "url": rx.url("/orders"), "events": ["order.created"] })).await;
    let bad = json!({ "id": "o-bad", "type": "order.created", "data": { "id": 1, "items": [{ "sku": 5 }] } });
    let (status, err) = h.api.post("/v1/events", bad).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("data.items[0].sku")), "{err}");
    let fitting = json!({ "id": "o-batch", "type": "order.created", "data": { "id": 2, "items": [{ "sku": "A" }] } });
    let missing = json!({ "id": "o-missing", "type": "order.created", "data": { "items": [] } });
    let (status, err) = h.api.post("/v1/events/batch", json!([fitting, missing])).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("[1].data")), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("id"), "{err}");
    let good = json!({ "id": "o-good", "type": "order.created", "data": { "id": 2, "items": [{ "sku": "A" }] } });
    let (status, _) = h.api.post("/v1/events", good).await;
    assert_eq!(status, 202);
    let (status, _) = h.api.post("/v1/events", json!({ "type": "not.catalogued", "data": { "anything": true } })).await;
    assert_eq!(status, 202, "types outside the catalogue are not checked");

    // PATCH replaces fields (a schema whole), `null` clears; turning validation off lets any
    // data of the type through.
    let (status, patched) = h
        .api
        .raw(
            "PATCH",
            "/v1/event-types/order.created",
            Some(r#"{"validate":false,"deprecated":true,"description":null}"#.into()),
            Some(&h.api.token),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!((patched["deprecated"].as_bool(), patched["description"].as_str()), (Some(true), Some("")));
    assert!(patched["schema"].is_object(), "untouched fields stay: {patched}");
    let (status, _) =
        h.api.post("/v1/events", json!({ "id": "o-free", "type": "order.created", "data": { "free": "form" } })).await;
    assert_eq!(status, 202);
    let got = rx.wait_on("/orders", 2).await;
    let mut ids: Vec<&str> = got.iter().map(|r| r.header("webhook-id")).collect();
    ids.sort();
    assert_eq!(ids, ["o-free", "o-good"], "only events that fit (or were not checked) were ever accepted");
    let (status, err) = h
        .api
        .raw("PATCH", "/v1/event-types/order.created", Some(r#"{"name":"renamed"}"#.into()), Some(&h.api.token))
        .await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("name")));

    // The catalogue is in the registry topic: it survives a restart.
    let h = h.restart().await;
    let (_, kept) = h.api.get("/v1/event-types/order.created").await;
    assert_eq!((kept["deprecated"].as_bool(), kept["validate"].as_bool()), (Some(true), Some(false)), "{kept}");
    assert_eq!(h.api.delete("/v1/event-types/order.created").await.0, 204);
    assert_eq!(h.api.get("/v1/event-types").await.1["items"], json!([]));
}

#[tokio::test]
async fn ingest_validate_checks_every_type_with_a_schema() {
    let h = TestHerald::start_with(|c| c.ingest.validate = true).await;
    let mut lenient = order_created();
    lenient["validate"] = json!(false);
    assert_eq!(h.api.post("/v1/event-types", lenient).await.0, 201);
    let (status, err) =
        h.api.post("/v1/events", json!({ "type": "order.created", "data": { "id": "one", "items": [] } })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("data.id")), "{err}");
}

#[tokio::test]
async fn subscriptions_naming_uncatalogued_types_are_warned_or_refused() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    // An empty catalogue warns no one: the platform does not keep one.
    let sub = h.api.subscribe(json!({ "url": rx.url("/a"), "events": ["anything"] })).await;
    assert!(sub.get("warnings").is_none(), "{sub}");
    assert_eq!(h.api.post("/v1/event-types", order_created()).await.0, 201);
    let sub = h.api.subscribe(json!({ "url": rx.url("/b"), "events": ["order.created", "order.shiped"] })).await;
    assert_eq!(sub["warnings"].as_array().map(Vec::len), Some(1), "{sub}");
    assert!(sub["warnings"][0].as_str().unwrap().starts_with("events[1]"), "{sub}");
    let path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    let (status, fixed) =
        h.api.raw("PATCH", &path, Some(r#"{"events":["order.created"]}"#.into()), Some(&h.api.token)).await;
    assert_eq!(status, 200);
    assert!(fixed.get("warnings").is_none(), "{fixed}");

    let strict = TestHerald::start_with(|c| c.ingest.unknown_types = herald::config::UnknownTypes::Reject).await;
    assert_eq!(strict.api.post("/v1/event-types", order_created()).await.0, 201);
    let body = json!({ "url": rx.url("/c"), "events": ["order.created", "order.shiped"] });
    let (status, err) = strict.api.post("/v1/subscriptions", body).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("events[1]")), "{err}");
}

/// A schema's `pattern` with a backreference or lookaround ran on a backtracking engine: each
/// string of an event could take a million steps (135 ms here; 20 strings, 2.7 s) on the
/// request's thread, and a batch of them held one of the runtime's threads for minutes, every
/// tenant's publishes and deliveries queued behind it. Patterns run in linear time now; those
/// that need backtracking are refused when the type is made, naming the schema.
#[tokio::test]
async fn a_pattern_that_backtracks_is_refused_and_patterns_run_in_linear_time() {
    let h = TestHerald::start().await;
    let strings = |pattern: &str| json!({ "type": "array", "items": { "type": "string", "pattern": pattern } });
    let (status, err) = h
        .api
        .post("/v1/event-types", json!({ "name": "slow.type", "schema": strings("(a*)*\\1b"), "validate": true }))
        .await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("schema")), "{err}");
    let (status, made) = h
        .api
        .post("/v1/event-types", json!({ "name": "nested.type", "schema": strings("^(a*)*b$"), "validate": true }))
        .await;
    assert_eq!(status, 201, "{made}");
    let data: Vec<String> = (0..300).map(|i| format!("{}{i}", "a".repeat(28))).collect();
    let started = std::time::Instant::now();
    let (status, body) = h.api.post("/v1/events", json!({ "type": "nested.type", "data": data })).await;
    let took = started.elapsed();
    assert_eq!((status.as_u16(), body["error"]["field"].as_str()), (400, Some("data[0]")), "{body}");
    assert!(took < std::time::Duration::from_secs(5), "answered in {took:?}");
}

/// A schema whose check costs more than its data can justify (here references in a diamond:
/// 2^40 checks of one value, in 3 KB) is stopped at its budget and the event refused, naming
/// `data` (the example, naming `example`): the check ran for hours on the request's thread,
/// and two such requests stopped every tenant's publishing. Alternatives that all fail
/// (`anyOf` over a type the data is not) are stopped too: a step taken only by a subschema
/// that fit left them exponential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_too_costly_to_check_is_stopped_and_says_so() {
    let h = TestHerald::start().await;
    let within = std::time::Duration::from_secs(10);
    for (n, (combine, leaf)) in
        [("allOf", json!({ "type": ["integer", "array"] })), ("anyOf", json!({ "type": "string" }))]
            .into_iter()
            .enumerate()
    {
        let mut defs = serde_json::Map::new();
        for i in 0..40 {
            let next = format!("#/$defs/d{}", i + 1);
            defs.insert(format!("d{i}"), json!({ combine: [{ "$ref": next }, { "$ref": next }] }));
        }
        defs.insert("d40".into(), leaf);
        let schema = json!({ "$defs": defs, "$ref": "#/$defs/d0" });
        let name = format!("costly.{n}");
        let made =
            h.api.post("/v1/event-types", json!({ "name": name, "schema": schema, "example": 1, "validate": true }));
        let (status, err) = tokio::time::timeout(within, made).await.expect("the example's check stops");
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("example")), "{combine}: {err}");
        let made = h.api.post("/v1/event-types", json!({ "name": name, "schema": schema, "validate": true }));
        let (status, made) = tokio::time::timeout(within, made).await.unwrap();
        assert_eq!(status, 201, "{made}");
        for data in [json!(1), json!((0..20_000).collect::<Vec<_>>())] {
            let published = h.api.post("/v1/events", json!({ "type": name, "data": data }));
            let (status, err) = tokio::time::timeout(within, published).await.expect("the check stops");
            let said: String = err.to_string().chars().take(500).collect();
            assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("data")), "{combine}: {said}");
            assert!(err["error"]["message"].as_str().unwrap().contains("too costly"), "{combine}: {said}");
        }
    }
    // The same diamond written in an annotation (`default`) or in data (`const`), named by a
    // reference: the library compiles what a pointer names, and there it took no steps. In
    // an annotation it has its steps now; in data (which a step would change) it is refused.
    for (place, field) in [("default", "example"), ("const", "schema")] {
        let mut hidden = serde_json::Map::new();
        for i in 0..40 {
            let next = format!("#/{place}/d{}", i + 1);
            hidden.insert(format!("d{i}"), json!({ "anyOf": [{ "$ref": next }, { "$ref": next }] }));
        }
        hidden.insert("d40".into(), json!({ "type": "string" }));
        for reference in ["$ref", "$dynamicRef"] {
            let schema = json!({ reference: format!("#/{place}/d0"), place: hidden });
            let made = h.api.post("/v1/event-types", json!({ "name": "hidden", "schema": schema, "example": 1 }));
            let (status, err) = tokio::time::timeout(within, made).await.expect("refused at once");
            let said = format!("{place} {reference}: {err}");
            assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{said}");
        }
    }
    let (status, body) = h.api.post("/v1/events", json!({ "type": "plain", "data": {} })).await;
    assert_eq!(status, 202, "{body}");
}

/// A refusal says what did not fit in a few lines, not the data again: the library's words
/// quote the value, and an array of 20,000 numbers where an object belongs came back whole in
/// the error (a 12 MiB event in a 12 MiB answer, and in the producer's logs).
#[tokio::test]
async fn a_refusal_does_not_quote_the_data_whole() {
    let h = TestHerald::start().await;
    let (status, made) = h
        .api
        .post("/v1/event-types", json!({ "name": "shaped", "schema": { "type": "object" }, "validate": true }))
        .await;
    assert_eq!(status, 201, "{made}");
    let data: Vec<u32> = (0..20_000).collect();
    let (status, err) = h.api.post("/v1/events", json!({ "type": "shaped", "data": data })).await;
    let said = err.to_string();
    assert_eq!(
        (status.as_u16(), err["error"]["field"].as_str()),
        (400, Some("data")),
        "{}",
        &said[..said.len().min(500)]
    );
    assert!(said.len() < 2048, "{} bytes: {}", said.len(), &said[..500]);
    assert!(said.contains("object"), "{said}");
}

/// Names and ids a URL cannot name (`.` and `..`: clients resolve them away, `%2E` too) are
/// refused where they are made — an event type, an event's id — and only there: such an
/// event type was made and never read, changed or deleted again, and such an event never
/// looked up, resent or recovered by its id.
#[tokio::test]
async fn names_a_url_cannot_name_are_refused() {
    let h = TestHerald::start().await;
    for name in [".", ".."] {
        let (status, err) = h.api.post("/v1/event-types", json!({ "name": name })).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("name")), "{name}: {err}");
        let (status, err) = h.api.post("/v1/events", json!({ "id": name, "type": "t", "data": {} })).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("id")), "{name}: {err}");
        // An event's type is no URL's: events may carry it, and subscriptions name it (one
        // stored so takes changes), and lookups by query still find what was made before.
        let (status, body) = h.api.post("/v1/events", json!({ "type": name, "data": {} })).await;
        assert_eq!(status, 202, "{name}: {body}");
        let sub = h
            .api
            .subscribe(json!({ "url": format!("https://example.com/hook/{}", name.len()), "events": [name] }))
            .await;
        let (status, body) = h
            .api
            .patch(&format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap()), json!({ "enabled": false }))
            .await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(h.api.get(&format!("/v1/attempts?event={name}")).await.0, 200);
    }
    let (status, made) =
        h.api.post("/v1/event-types", json!({ "name": "...", "description": "three dots name it" })).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(h.api.get("/v1/event-types/...").await.0, 200);
}

/// Data ingest takes — a lone surrogate (`"\ud800"`), as JavaScript's JSON does — fits a
/// schema that takes any string: it was refused as "lone leading surrogate" once the type
/// had a schema, the same event accepted without one.
#[tokio::test]
async fn data_with_a_lone_surrogate_is_checked_not_refused() {
    let h = TestHerald::start().await;
    let schema = json!({ "type": "object", "properties": { "s": { "type": "string", "maxLength": 1 } } });
    let (status, made) =
        h.api.post("/v1/event-types", json!({ "name": "text", "schema": schema, "validate": true })).await;
    assert_eq!(status, 201, "{made}");
    for (data, accepted) in
        [(r#"{"s":"\ud800"}"#, true), (r#"{"s":"\udc00\ud800"}"#, false), (r#"{"s":"\ud83d\ude00"}"#, true)]
    {
        let body = format!(r#"{{"type":"text","data":{data}}}"#);
        let (status, answer) =
            h.api.raw("POST", "/v1/events", Some(bytes::Bytes::from(body)), Some(crate::support::TOKEN)).await;
        assert_eq!(status.as_u16() == 202, accepted, "{data}: {answer}");
    }
}
