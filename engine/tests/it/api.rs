//! The API as a client meets it: auth, validation, errors, subscription management.

use crate::support::{tenant_with_key, until, Receiver, TestHerald, TOKEN};
use bytes::Bytes;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn requests_without_the_admin_token_are_refused_in_the_contract_shape() {
    let h = TestHerald::start().await;
    for token in [None, Some("wrong-token")] {
        let (status, body) = h.api.raw("GET", "/v1/subscriptions", None, token).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], "UNAUTHORIZED");
    }
    let (status, body) = h.api.raw("GET", "/healthz", None, None).await;
    assert_eq!((status.as_u16(), body["status"].as_str()), (200, Some("ok")));
    let (status, body) = h.api.raw("GET", "/readyz", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["log"], true);
    let (status, body) = h.api.get("/v1/nothing-here").await;
    assert_eq!((status.as_u16(), body["error"]["code"].as_str()), (404, Some("NOT_FOUND")));
}

/// The `Authorization` scheme is case-insensitive (RFC 9110 §11.1): `BEARER <token>`, as some
/// HTTP libraries and gateways write it, was answered `401` with the right token.
#[tokio::test]
async fn the_bearer_scheme_is_read_whatever_its_case() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = TestHerald::start().await;
    for scheme in ["BEARER", "bEaReR", "Bearer"] {
        let mut stream = tokio::net::TcpStream::connect(h.herald.addr).await.unwrap();
        let head = format!(
            "GET /v1/subscriptions HTTP/1.1\r\nhost: herald\r\nauthorization: {scheme} {TOKEN}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
        let said = String::from_utf8_lossy(&answer);
        assert!(said.starts_with("HTTP/1.1 200"), "{scheme}: {said}");
    }
}

#[tokio::test]
async fn invalid_events_name_the_field_and_append_nothing() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    h.api.subscribe(json!({ "url": rx.url("/in") })).await;
    let cases = [
        (json!({ "data": {} }), "type"),
        (json!({ "type": "", "data": {} }), "type"),
        (json!({ "type": "T" }), "data"),
        (json!({ "type": "T", "data": {}, "bogus": 1 }), "bogus"),
        (json!({ "type": "T", "data": {}, "id": "has space" }), "id"),
        (json!({ "type": "T", "data": {}, "tenant": "no/slash" }), "tenant"),
        (json!({ "type": 5, "data": {} }), "type"),
    ];
    for (body, field) in cases {
        let (status, err) = h.api.post("/v1/events", body.clone()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["code"], "VALIDATION_ERROR");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, err) = h.api.raw("POST", "/v1/events", Some(Bytes::from_static(b"{not json")), Some(TOKEN)).await;
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (400, Some("VALIDATION_ERROR")));
    // A field given twice is named, at the top and in a batch.
    for (body, field) in [
        (&b"{\"type\":\"A\",\"type\":\"B\",\"data\":{}}"[..], "type"),
        (&b"[{\"type\":\"A\",\"data\":{},\"data\":{}}]"[..], "[0].data"),
    ] {
        let path = if body[0] == b'[' { "/v1/events/batch" } else { "/v1/events" };
        let (status, err) = h.api.raw("POST", path, Some(Bytes::from_static(body)), Some(TOKEN)).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{err}");
    }
    // So on the bodies read as any JSON (a subscription, a change, an event type), nested too.
    let sub = h.api.subscribe(json!({ "url": "https://hooks.example.com/twice", "events": ["never.sent"] })).await;
    let patch_path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    for (method, path, body, field) in [
        ("POST", "/v1/subscriptions", r#"{"url":"https://h.example/a","url":"https://h.example/b"}"#, "url"),
        ("PATCH", patch_path.as_str(), r#"{"enabled":false,"enabled":true}"#, "enabled"),
        ("PATCH", patch_path.as_str(), r#"{"retry":{"max_attempts":2,"max_attempts":3}}"#, "retry.max_attempts"),
        ("POST", "/v1/event-types", r#"{"name":"twice.named","name":"other.name"}"#, "name"),
    ] {
        let (status, err) = h.api.raw(method, path, Some(Bytes::from(body)), Some(TOKEN)).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{body}: {err}");
    }
    let (_, unchanged) = h.api.get(&patch_path).await;
    assert_eq!(unchanged["enabled"], true, "nothing of a refused change applied");
    // One bad event rejects the whole batch: nothing of it is appended.
    let batch = json!([
        { "id": "good-1", "type": "T", "data": 1 },
        { "id": "bad", "data": 2 },
    ]);
    let (status, err) = h.api.post("/v1/events/batch", batch).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["field"], "[1].type");
    let (status, ok) = h
        .api
        .post(
            "/v1/events/batch",
            json!([{ "id": "after", "type": "T", "data": 3 }, { "id": "after-2", "type": "T", "data": 4 }]),
        )
        .await;
    assert_eq!(status, 202, "{ok}");
    assert_eq!(ok["deliveries"], 2);
    assert_eq!(ok["items"][1]["id"], "after-2");
    let got = rx.wait_on("/in", 2).await;
    let ids: Vec<&str> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert!(!ids.contains(&"good-1"), "a rejected batch appended an event: {ids:?}");
    let (status, _) = h.api.post("/v1/events/batch", json!([])).await;
    assert_eq!(status, 400);
    // A batch too long is refused at its first event past the bound, before the rest is read
    // (read whole first, a 16 MiB body of small events took some 200 MB to refuse): what
    // follows it, here not an event at all, is never looked at.
    let mut long: Vec<Value> = (0..1_001).map(|i| json!({ "type": "T", "data": i })).collect();
    long.push(json!(42));
    let (status, err) = h.api.post("/v1/events/batch", Value::Array(long)).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().starts_with("a batch holds 1 to 1000 events"), "{err}");
}

#[tokio::test]
async fn subscriptions_are_created_listed_read_and_deleted_without_leaking_secrets() {
    let h = TestHerald::start().await;
    let created = h
        .api
        .subscribe(json!({
            "url": "https://hooks.example.com/a", "tenant": "acme", "events": ["A"],
            "auth": { "type": "basic", "username": "u", "password": "hunter2" },
            "retry": { "policy": "fixed", "interval": "PT30M", "max_attempts": 5 },
            "timeout": "PT10S"
        }))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sub_"));
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(created["transport"], "webhook");
    assert_eq!(created["enabled"], true);
    assert_eq!(created["retry"]["interval"], "30m");
    let (status, got) = h.api.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(status, 200);
    assert!(got.get("secret").is_none());
    assert!(!got.to_string().contains("hunter2"));
    assert_eq!(got["auth"]["username"], "u");

    for i in 0..4 {
        h.api.subscribe(json!({ "url": format!("https://hooks.example.com/{i}"), "tenant": "globex" })).await;
    }
    let (_, page1) = h.api.get("/v1/subscriptions?tenant=globex&limit=3").await;
    assert_eq!(page1["items"].as_array().unwrap().len(), 3);
    let next = page1["next"].as_str().unwrap();
    let (_, page2) = h.api.get(&format!("/v1/subscriptions?tenant=globex&limit=3&cursor={next}")).await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert!(page2["next"].is_null());
    for (query, field) in [("limit=0", "limit"), ("limit=501", "limit"), ("bogus=1", "bogus"), ("limit=x", "limit")] {
        for path in ["/v1/subscriptions", "/v1/dlq"] {
            let (status, err) = h.api.get(&format!("{path}?{query}")).await;
            assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{path}?{query}: {err}");
        }
    }
    let (_, all) = h.api.get("/v1/subscriptions").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 5);
    assert!(!all.to_string().contains("whsec_"));

    let (status, _) = h.api.delete(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(status, 204);
    let (status, body) = h.api.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!((status.as_u16(), body["error"]["code"].as_str()), (404, Some("NOT_FOUND")));
    let (status, _) = h.api.delete(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn subscription_validation_names_the_field() {
    let h = TestHerald::start().await;
    h.api.subscribe(json!({ "url": "https://hooks.example.com/x", "tenant": "acme" })).await;
    let cases = [
        (json!({ "url": "https://hooks.example.com/x", "tenant": "acme" }), "url"),
        (json!({ "url": "ftp://hooks.example.com/x" }), "url"),
        (json!({ "url": "https://" }), "url"),
        (json!({ "url": "mailto:ops@example.com" }), "url"),
        (json!({ "url": "http://10.0.0.8/hook" }), "url"),
        (json!({ "url": "http://[fe80::1]/hook" }), "url"),
        (json!({ "url": "https://h.example.com", "secret": "whsec_***" }), "secret"),
        (
            json!({ "url": "https://h.example.com", "signature": { "scheme": "hmac", "header": "bad header" } }),
            "signature.header",
        ),
        (json!({ "url": "https://h.example.com", "signature": { "scheme": "rot13" } }), "signature.scheme"),
        (json!({ "url": "https://h.example.com", "timeout": "PT1H" }), "timeout"),
        (json!({ "url": "https://h.example.com", "timeout": "soon" }), "timeout"),
        (
            json!({ "url": "https://h.example.com", "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 0 } }),
            "retry.max_attempts",
        ),
        (json!({ "url": "https://h.example.com", "headers": { "Content-Length": "1" } }), "headers.Content-Length"),
        // Every `content-*` header is Herald's (the README says so): `gzip` over a plain body
        // failed every receiver that believed it.
        (
            json!({ "url": "https://h.example.com", "headers": { "Content-Encoding": "gzip" } }),
            "headers.Content-Encoding",
        ),
        // The subscription's own signature header: sent twice, the tenant's value first.
        (
            json!({ "url": "https://h.example.com", "signature": { "scheme": "hmac", "header": "x-hook-signature" },
                    "headers": { "X-Hook-Signature": "old" } }),
            "headers.X-Hook-Signature",
        ),
        // A signature in a trace-context header: traced events carry Herald's own as well.
        (
            json!({ "url": "https://h.example.com", "signature": { "scheme": "hmac", "header": "traceparent" } }),
            "signature.header",
        ),
        (json!({ "url": "https://h.example.com", "colour": "blue" }), "colour"),
        (json!({ "url": "https://h.example.com", "transport": "amqp" }), "amqp"),
        (json!({ "transport": "amqp", "amqp": { "uri": "http://x", "exchange": "e" } }), "amqp.uri"),
        (json!({ "transport": "amqp", "amqp": { "uri": "amqp://127.0.0.1", "exchange": "" } }), "amqp.exchange"),
        // A vhost the broker can have no name for: empty (a URI ending in `/`; the default is
        // `%2f`), past a short string's 255 bytes; and a login by client certificate, which
        // Herald never presents. Each was taken, and every delivery then failed.
        (json!({ "transport": "amqp", "amqp": { "uri": "amqp://127.0.0.1/", "exchange": "e" } }), "amqp.uri"),
        (
            json!({ "transport": "amqp", "amqp": { "uri": format!("amqp://127.0.0.1/{}", "v".repeat(300)), "exchange": "e" } }),
            "amqp.uri",
        ),
        (
            json!({ "transport": "amqp", "amqp": { "uri": "amqp://127.0.0.1/%2f?auth_mechanism=external", "exchange": "e" } }),
            "amqp.uri",
        ),
        (json!({ "url": "https://h.example.com", "amqp": { "uri": "amqp://127.0.0.1", "exchange": "e" } }), "amqp"),
    ];
    for (body, field) in cases {
        let (status, err) = h.api.post("/v1/subscriptions", body.clone()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["code"], "VALIDATION_ERROR", "{body}: {err}");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }
    let (_, err) = h.api.post("/v1/subscriptions", json!({ "url": "http://10.0.0.8/hook" })).await;
    assert!(err["error"]["message"].as_str().unwrap().contains("network.allow"), "{err}");
    // The same URL under another tenant is fine.
    h.api.subscribe(json!({ "url": "https://hooks.example.com/x", "tenant": "globex" })).await;
}

/// "A tenant cannot register the same URL twice" holds for every spelling of one target: a
/// fragment (never sent), escapes of plain characters, an empty query; and an AMQP
/// subscription's `url` is always its broker and exchange, so it cannot be named anything.
#[tokio::test]
async fn one_target_cannot_be_registered_twice_under_another_spelling() {
    let h = TestHerald::start().await;
    h.api.subscribe(json!({ "url": "https://hooks.example.com/x/y?a=1", "tenant": "acme" })).await;
    for url in [
        "https://hooks.example.com/x/y?a=1#again",
        "https://hooks.example.com/%78/y?a=1",
        "https://hooks.example.com/x/%79?%61=1",
        "HTTPS://Hooks.Example.com:443/x/y?a=1",
    ] {
        let (status, err) = h.api.post("/v1/subscriptions", json!({ "url": url, "tenant": "acme" })).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("url")), "{url}: {err}");
    }
    // Different targets stay different: an escaped slash is not a slash.
    h.api.subscribe(json!({ "url": "https://hooks.example.com/x%2Fy?a=1", "tenant": "acme" })).await;

    let amqp = |exchange: &str| json!({ "uri": "amqp://broker.example.com/%2f", "exchange": exchange });
    let first = h.api.subscribe(json!({ "transport": "amqp", "amqp": amqp("e1"), "tenant": "acme" })).await;
    assert_eq!(first["url"], "amqp://broker.example.com/%2f/e1", "{first}");
    let named = json!({ "transport": "amqp", "amqp": amqp("e2"), "url": "anything", "tenant": "acme" });
    let second = h.api.subscribe(named).await;
    assert_eq!(second["url"], "amqp://broker.example.com/%2f/e2", "{second}");
    let path = format!("/v1/subscriptions/{}", second["id"].as_str().unwrap());
    let (status, err) = h.api.patch(&path, json!({ "amqp": amqp("e1") })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("url")), "{err}");
    let (status, moved) = h.api.patch(&path, json!({ "amqp": amqp("e3") })).await;
    assert_eq!((status.as_u16(), moved["url"].as_str()), (200, Some("amqp://broker.example.com/%2f/e3")), "{moved}");
}

/// A user and password in a webhook URL are never sent as credentials (HTTP/1.1 drops them,
/// HTTP/2 would put them in `:authority`, which RFC 9113 forbids), and the URL is shown on
/// every read and in logs, unsealed: refused, pointing to `auth` — which seals the password.
#[tokio::test]
async fn credentials_in_a_webhook_url_are_refused_for_auth_basic() {
    let h = TestHerald::start().await;
    for url in ["https://user:pass@hooks.example.com/x", "https://user@hooks.example.com/x"] {
        let (status, err) = h.api.post("/v1/subscriptions", json!({ "url": url })).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("url")), "{url}: {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains("auth"), "{err}");
        assert!(!err.to_string().contains("pass@"), "the password is not echoed: {err}");
    }
    let sub = h.api.subscribe(json!({ "url": "https://hooks.example.com/x" })).await;
    let path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    let (status, err) = h.api.patch(&path, json!({ "url": "https://u:p@hooks.example.com/y" })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("url")), "{err}");
    // An OAuth token URL's too: stored unsealed, it was shown whole on every read.
    let auth = json!({ "type": "oauth2", "grant": "client_credentials", "token_url": "https://id:s3cret@idp.example.com/token", "client_id": "c", "client_secret": "s" });
    let (status, err) =
        h.api.post("/v1/subscriptions", json!({ "url": "https://hooks.example.com/z", "auth": auth })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("auth.token_url")), "{err}");
    assert!(!err.to_string().contains("s3cret"), "the password is not echoed: {err}");
}

#[tokio::test]
async fn subscriptions_survive_a_restart() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let keep = h.api.subscribe(json!({ "url": rx.url("/keep") })).await;
    let gone = h.api.subscribe(json!({ "url": rx.url("/gone") })).await;
    h.api.delete(&format!("/v1/subscriptions/{}", gone["id"].as_str().unwrap())).await;
    let h = h.restart().await;
    let api = &h.api;
    let (_, list) = api.get("/v1/subscriptions").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], keep["id"]);
    let (_, accepted) = api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    assert_eq!(accepted["deliveries"], 1);
    rx.wait_on("/keep", 1).await;
    h.herald.stop().await;
}

/// What an operator looks for in an incident — the disabled ones, the ones whose breaker is
/// open, one transport — is filtered by the server, so a page holds matches however many
/// subscriptions come between them, and a tenant's key still sees only its own.
#[tokio::test]
async fn the_subscription_list_is_filtered_by_the_server() {
    let h = TestHerald::start_with(|c| {
        c.health.breaker_failures = 2;
        c.health.breaker_pause = Duration::from_secs(600).into();
        c.health.breaker_max_pause = Duration::from_secs(600).into();
    })
    .await;
    let rx = Receiver::start().await;
    rx.respond_on("/down", 503);
    let (acme, acme_api) = tenant_with_key(&h.api, "Acme").await;
    let (globex, _) = tenant_with_key(&h.api, "Globex").await;
    let retry = json!({ "policy": "fixed", "interval": "50ms", "max_attempts": 100 });
    let api = &h.api;
    let sub = |body: Value| async move { api.subscribe(body).await["id"].as_str().unwrap().to_string() };
    // Many plain subscriptions between the ones looked for, in both tenants.
    for i in 0..30 {
        sub(json!({ "url": rx.url(&format!("/up/{i}")), "tenant": if i % 2 == 0 { &acme } else { &globex }, "events": ["Quiet"] }))
            .await;
    }
    let down = sub(json!({ "url": rx.url("/down"), "tenant": acme, "events": ["Order"], "retry": retry })).await;
    let off = sub(json!({ "url": rx.url("/off"), "tenant": acme, "enabled": false })).await;
    let off_globex = sub(json!({ "url": rx.url("/off-globex"), "tenant": globex, "enabled": false })).await;
    let amqp = sub(json!({
        "transport": "amqp", "tenant": globex, "events": ["Quiet"],
        "amqp": { "uri": "amqp://127.0.0.1:5672/%2f", "exchange": "x" }
    }))
    .await;
    let (status, device) = h.api.post("/v1/edge-devices", json!({ "name": "gw", "tenant": acme })).await;
    assert_eq!(status, 201, "{device}");
    let edge =
        sub(json!({ "url": "http://10.9.8.7/hook", "tenant": acme, "events": ["Quiet"], "via_edge": device["id"] }))
            .await;

    // Every page of a filtered list, followed to its end.
    async fn all(api: &crate::support::Api, query: &str) -> Vec<String> {
        let (mut ids, mut cursor) = (Vec::new(), None::<String>);
        loop {
            let after = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
            let (status, page) = api.get(&format!("/v1/subscriptions?{query}&limit=2{after}")).await;
            assert_eq!(status, 200, "{query}: {page}");
            ids.extend(page["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()));
            match page["next"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return ids,
            }
        }
    }
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(all(&h.api, "enabled=false").await, sorted(vec![off.clone(), off_globex.clone()]));
    assert_eq!(all(&h.api, &format!("enabled=false&tenant={acme}")).await, vec![off.clone()]);
    assert_eq!(all(&acme_api, "enabled=false").await, vec![off.clone()], "a tenant's key sees its own only");
    assert_eq!(all(&h.api, "transport=amqp").await, vec![amqp.clone()]);
    assert_eq!(all(&h.api, "transport=edge").await, vec![edge.clone()]);
    assert_eq!(all(&h.api, "transport=webhook&enabled=true").await.len(), 31, "the plain ones and the failing one");
    assert!(all(&h.api, "breaker=open").await.is_empty());

    // The failing endpoint's breaker opens after two failed attempts.
    let (status, _) =
        h.api.post("/v1/events", json!({ "id": "o-1", "tenant": acme, "type": "Order", "data": {} })).await;
    assert_eq!(status, 202);
    until("the failing endpoint's breaker open", Duration::from_secs(20), || async {
        (all(&h.api, "breaker=open").await == vec![down.clone()]).then_some(())
    })
    .await;
    assert_eq!(all(&h.api, "breaker=closed&enabled=false").await, sorted(vec![off.clone(), off_globex.clone()]));

    for (query, field) in [("transport=smtp", "transport"), ("enabled=maybe", "enabled"), ("breaker=ajar", "breaker")] {
        let (status, err) = h.api.get(&format!("/v1/subscriptions?{query}")).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{query}: {err}");
    }
}

/// Every text a tenant stores in a subscription is bounded and checked like at create: a
/// rotated secret (no placeholder, not megabytes), an AMQP URI, a PKCS#12 file.
#[tokio::test]
async fn stored_secrets_and_uris_are_bounded_wherever_they_come_in() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let sub =
        h.api.subscribe(json!({ "url": rx.url("/r"), "signature": { "scheme": "hmac", "header": "x-sig" } })).await;
    let rotate = format!("/v1/subscriptions/{}/rotate-secret", sub["id"].as_str().unwrap());
    for secret in ["a".repeat(2 << 20), "********".to_string()] {
        let (status, err) = h.api.post(&rotate, json!({ "secret": secret })).await;
        assert_eq!((status.as_u16(), &err["error"]["field"]), (400, &json!("secret")), "{}", err["error"]);
    }
    let uri = format!("amqp://guest:{}@127.0.0.1:5672/%2f", "p".repeat(1 << 20));
    let (status, err) =
        h.api.post("/v1/subscriptions", json!({ "transport": "amqp", "amqp": { "uri": uri, "exchange": "x" } })).await;
    assert_eq!((status.as_u16(), &err["error"]["field"]), (400, &json!("amqp.uri")), "{}", err["error"]);
    let p12 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, vec![0u8; 200 << 10]);
    let (status, err) = h
        .api
        .post("/v1/subscriptions", json!({ "url": "https://hooks.example/p12", "tls": { "client_p12": p12 } }))
        .await;
    assert_eq!(status, 400, "{}", err["error"]);
    assert!(err["error"]["message"].as_str().unwrap_or_default().contains("larger than"), "{}", err["error"]);
}

/// A path segment that is not UTF-8 is answered in the contract's shape, like any bad input.
#[tokio::test]
async fn a_path_that_is_not_utf8_is_a_json_error() {
    let h = TestHerald::start().await;
    for path in ["/v1/subscriptions/%FF", "/v1/events/%C3%28"] {
        let (status, body) = h.api.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "VALIDATION_ERROR", "{path}: {body}");
        assert_eq!(body["error"]["field"], "path", "{path}: {body}");
    }
}

/// Creates racing each other cannot take a tenant past its quota: the count is checked where
/// creates are made one at a time.
#[tokio::test]
async fn concurrent_creates_stop_at_the_quota() {
    let h = TestHerald::start_with(|c| c.quotas.subscriptions_per_tenant = 3).await;
    let creates = (0..12).map(|i| {
        let api = h.api.clone();
        async move { api.post("/v1/subscriptions", json!({ "url": format!("https://hooks.example/{i}") })).await.0 }
    });
    let statuses = futures::future::join_all(creates).await;
    let created = statuses.iter().filter(|s| s.as_u16() == 201).count();
    assert_eq!(created, 3, "{statuses:?}");
    assert!(statuses.iter().all(|s| matches!(s.as_u16(), 201 | 403)), "{statuses:?}");
}

/// Every error is the contract's JSON, these two included: a console asset's path that is not
/// UTF-8, and an agent's connection request without a WebSocket upgrade (a proxy that drops
/// the upgrade headers) — both answered in axum's plain text.
#[tokio::test]
async fn odd_console_paths_and_connections_without_an_upgrade_answer_json() {
    let h = TestHerald::start().await;
    let (status, err) = h.api.get("/console/assets/%FF").await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("path")), "{err}");
    let (status, device) = h.api.post("/v1/edge-devices", json!({ "name": "gw" })).await;
    assert_eq!(status, 201, "{device}");
    let token = device["token"].as_str().unwrap();
    let (status, err) = h.api.raw("GET", "/v1/edge/connect", None, Some(token)).await;
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (400, Some("VALIDATION_ERROR")), "{err}");
}

/// A cursor goes on with the list and filters it was made for (the README says so): given
/// back with other filters it was taken as a place in the other listing, skipping what came
/// before it there.
#[tokio::test]
async fn a_cursor_given_back_with_other_filters_is_refused() {
    let h = TestHerald::start().await;
    for i in 0..3 {
        let enabled = i != 1;
        h.api.subscribe(json!({ "url": format!("https://hooks.example.com/{i}"), "enabled": enabled })).await;
    }
    let (_, first) = h.api.get("/v1/subscriptions?enabled=true&limit=1").await;
    let next = first["next"].as_str().expect("more enabled ones").to_string();
    let (status, page) = h.api.get(&format!("/v1/subscriptions?enabled=true&limit=1&cursor={next}")).await;
    assert_eq!((status.as_u16(), page["items"].as_array().map(Vec::len)), (200, Some(1)), "{page}");
    for other in ["enabled=false&", "", "tenant=globex&", "transport=amqp&"] {
        let (status, err) = h.api.get(&format!("/v1/subscriptions?{other}limit=1&cursor={next}")).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{other}: {err}");
    }
    let (status, err) = h.api.get(&format!("/v1/dlq?cursor={next}")).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "another list's: {err}");
}

/// A stopping server stops listening before it drains its open requests: left listening, the
/// kernel went on completing connections no one would answer — health checks hung instead of
/// being refused, and load balancers kept sending publishes to it for the whole drain.
#[tokio::test]
async fn a_stopping_server_refuses_new_connections_while_it_drains() {
    let h = TestHerald::start().await;
    let addr = h.herald.addr;
    // A test ping to a receiver that never answers: a request under way for its 5 s timeout,
    // holding the drain open.
    let rx = Receiver::start().await;
    rx.behave("/hang", crate::support::Behaviour::Hang);
    let sub = h.api.subscribe(json!({ "url": rx.url("/hang"), "timeout": "5s" })).await;
    let (api, id) = (h.api.clone(), sub["id"].as_str().unwrap().to_string());
    let _ping = tokio::spawn(async move { api.post(&format!("/v1/subscriptions/{id}/test"), json!({})).await });
    rx.wait_on("/hang", 1).await;
    let stopping = tokio::spawn(async move { h.herald.stop().await });
    until("new connections refused while the drain goes on", Duration::from_secs(3), || async {
        tokio::net::TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    assert!(!stopping.is_finished(), "refused during the drain, not after it");
    stopping.await.unwrap();
}

/// A start refused for its port (in use) changes nothing first: it made and stored an admin
/// token it never printed (each later start found it "stored", and never printed it either),
/// and wrote the config file's webhooks to the catalog, before it found the port taken.
#[tokio::test]
async fn a_start_refused_for_its_port_leaves_nothing_behind() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::config(dir.path());
    config.listen = taken.local_addr().unwrap();
    config.admin_token = None;
    let refused = herald::server::start(config).await.err().expect("the port is taken");
    assert!(matches!(refused, herald::server::StartError::Listen { .. }), "{refused}");
    let made: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!made.iter().any(|n| n.to_string_lossy().contains("token")), "{made:?}");
}

/// A subscription the operator's settings have since outgrown (its egress proxy no longer
/// configured, its network no longer allowed) can still be disabled, or changed in what those
/// settings do not concern: they hold what a PATCH changes, not what it keeps. Its tenant
/// could neither disable it (`400` naming `proxy`, or `url`) nor repair it — only delete it.
#[tokio::test]
async fn a_subscription_the_settings_have_outgrown_can_still_be_disabled() {
    let h = TestHerald::start_with(|c| {
        c.http.proxies.insert("eu".into(), "http://127.0.0.1:9".into());
    })
    .await;
    let (tenant_id, _) = tenant_with_key(&h.api, "Acme").await;
    let rx = Receiver::start().await;
    let proxied = h.api.subscribe(json!({ "url": rx.url("/p"), "tenant": tenant_id, "proxy": "eu" })).await;
    let local = h.api.subscribe(json!({ "url": rx.url("/l"), "tenant": tenant_id })).await;
    let h = h
        .restart_with(|c| {
            c.http.proxies.clear();
            c.network.allow.clear();
        })
        .await;
    let (status, key) = h.api.post(&format!("/v1/tenants/{tenant_id}/keys"), json!({})).await;
    assert_eq!(status, 201, "{key}");
    let mut tenant = h.api.clone();
    tenant.token = key["key"].as_str().unwrap().to_string();
    let patch = |sub: &Value, body: Value| {
        let (tenant, path) = (tenant.clone(), format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap()));
        async move { tenant.raw("PATCH", &path, Some(body.to_string().into()), Some(&tenant.token)).await }
    };
    for sub in [&proxied, &local] {
        for body in [json!({}), json!({ "enabled": false }), json!({ "headers": { "x-team": "billing" } })] {
            let (status, got) = patch(sub, body.clone()).await;
            assert_eq!(status, 200, "{body}: {got}");
        }
        let (_, got) = h.api.get(&format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap())).await;
        assert_eq!(got["enabled"], false, "{got}");
        assert!(got["headers"].get("x-team").is_some(), "{got}");
    }
    // What a change does touch is held to today's settings.
    let (status, err) = patch(&local, json!({ "url": rx.url("/moved") })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("url")), "{err}");
    let path = format!("/v1/subscriptions/{}", proxied["id"].as_str().unwrap());
    let (status, err) = h.api.raw("PATCH", &path, Some(r#"{"proxy":"us"}"#.into()), Some(&h.api.token)).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("proxy")), "{err}");
}

/// The `default` tenant — what the admin's objects belong to when they name none — is a
/// tenant like the others to the operator: listed, given API keys and portal links. A portal
/// link for it was minted while a key was refused `404`, and the console's tenants page did
/// not show it at all.
#[tokio::test]
async fn the_default_tenant_is_listed_and_takes_keys() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let ours = h.api.subscribe(json!({ "url": rx.url("/ours") })).await;
    let (_, acme) = tenant_with_key(&h.api, "Acme").await;
    acme.subscribe(json!({ "url": rx.url("/theirs") })).await;

    let (status, key) = h.api.post("/v1/tenants/default/keys", json!({})).await;
    assert_eq!(status, 201, "{key}");
    let mut default = h.api.clone();
    default.token = key["key"].as_str().unwrap().to_string();
    let (status, subs) = default.get("/v1/subscriptions").await;
    assert_eq!(status, 200, "{subs}");
    let ids: Vec<&str> = subs["items"].as_array().unwrap().iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, [ours["id"].as_str().unwrap()], "the default tenant's own, only");

    let (_, tenants) = h.api.get("/v1/tenants").await;
    let items = tenants["items"].as_array().unwrap();
    assert_eq!(items[0]["id"], "default", "{tenants}");
    assert_eq!(items[0]["keys"][0]["id"], key["id"], "{tenants}");
    assert_eq!(items.len(), 2, "{tenants}");
    let (status, _) = h.api.delete(&format!("/v1/tenants/default/keys/{}", key["id"].as_str().unwrap())).await;
    assert_eq!(status, 204);
    assert_eq!(default.get("/v1/subscriptions").await.0, 401, "a revoked key is refused");
}
