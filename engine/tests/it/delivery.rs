//! Events published through the API arrive, signed, at loopback receivers.

use crate::support::verify::{hmac_sha256, standard};
use crate::support::{until, Receiver, TestHerald};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn the_receiver_check_accepts_the_published_test_vector() {
    let v = herald_load_tests::verify::Verifier::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let (id, body, sig) =
        ("msg_p5jXN8AQM9LWM0D4loKWxJek", br#"{"test": 2432232314}"#, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    assert!(v.verify(id, "1614265330", body, sig));
    assert!(!v.verify(id, "1614265331", body, sig));
}

#[tokio::test]
async fn events_reach_each_matching_subscription_once_signed_in_an_envelope() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let all = h.api.subscribe(json!({ "url": rx.url("/all"), "tenant": "acme" })).await;
    let orders =
        h.api.subscribe(json!({ "url": rx.url("/orders"), "tenant": "acme", "events": ["OrderCreated"] })).await;
    let _other = h.api.subscribe(json!({ "url": rx.url("/shipping"), "tenant": "acme", "events": ["Shipped"] })).await;
    let _foreign = h.api.subscribe(json!({ "url": rx.url("/foreign"), "tenant": "globex" })).await;

    let mut ids = Vec::new();
    for i in 0..20 {
        let (status, body) = h
            .api
            .post(
                "/v1/events",
                json!({ "type": "OrderCreated", "tenant": "acme", "data": { "orderId": format!("A-{i}") } }),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["deliveries"], 2, "fan-out to /all and /orders only: {body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let got_all = rx.wait_on("/all", 20).await;
    let got_orders = rx.wait_on("/orders", 20).await;
    for (got, sub) in [(&got_all, &all), (&got_orders, &orders)] {
        let verified = standard(sub["secret"].as_str().unwrap());
        let seen: HashSet<String> = got.iter().map(|r| r.header("webhook-id").to_string()).collect();
        assert_eq!(seen, ids.iter().cloned().collect(), "each event once");
        for r in got.iter() {
            assert!(verified(r));
            assert_eq!(r.header("content-type"), "application/json");
            let env = r.json();
            assert_eq!(env["id"], r.header("webhook-id"));
            assert_eq!(env["event"], "OrderCreated");
            assert_eq!(env["tenant"], "acme");
            assert!(env["data"]["orderId"].as_str().unwrap().starts_with("A-"));
            assert_eq!(env["deliveryAttempt"], 1);
            assert_eq!(env["pendingRetries"], 184, "the default policy: 185 attempts");
            assert!(env["sentAt"].as_str().unwrap().ends_with('Z'));
            assert!(env.get("changes").is_none());
        }
    }
    // A Shipped event reaches only /shipping; had earlier OrderCreated events leaked there,
    // they would have been read before it from the same partition.
    let (_, body) = h.api.post("/v1/events", json!({ "type": "Shipped", "tenant": "acme", "data": {} })).await;
    assert_eq!(body["deliveries"], 2);
    let shipped = rx.wait_on("/shipping", 1).await;
    assert_eq!(shipped.len(), 1);
    assert_eq!(shipped[0].json()["event"], "Shipped");
    assert!(rx.on("/foreign").is_empty(), "another tenant's subscription receives nothing");
    assert!(h.stop_and_read_dlq().await.is_empty());
}

#[tokio::test]
async fn hmac_schemes_raw_payloads_keys_and_headers_reach_the_receiver_exactly() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    h.api
        .subscribe(json!({
            "url": rx.url("/hex"), "secret": "opentrack-secret", "payload": "raw",
            "signature": { "scheme": "hmac", "header": "X-OpenTrack-Signature", "encoding": "hex" },
            "key": "k 1", "headers": { "X-Customer": "c-42" }
        }))
        .await;
    h.api
        .subscribe(json!({
            "url": rx.url("/b64"), "secret": "packsize-secret",
            "signature": { "scheme": "hmac", "header": "x-packsize-signature", "encoding": "base64" }
        }))
        .await;
    let none = h.api.subscribe(json!({ "url": rx.url("/none"), "signature": { "scheme": "none" } })).await;
    assert!(none["secret"].is_string());
    h.api
        .subscribe(json!({
            "url": rx.url("/bytes"), "secret": "bytes-secret", "payload": "raw_bytes",
            "signature": { "scheme": "hmac", "header": "X-Signature", "encoding": "base64" }
        }))
        .await;
    // `data` arrives in JavaScript's JSON.stringify form (what the guides' receivers verify),
    // or with `raw_bytes` byte for byte as sent.
    let body = r#"{"type":"OrderAccepted","id":"order-7-accepted","data":{ "orderId" : "7",  "total": 1.50 },"changes":[{"op":"replace"}]}"#;
    let (status, resp) = h.api.raw("POST", "/v1/events", Some(body.into()), Some(crate::support::TOKEN)).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["id"], "order-7-accepted");

    let hex = &rx.wait_on("/hex", 1).await[0];
    assert_eq!(&hex.body[..], br#"{"orderId":"7","total":1.5}"#);
    assert_eq!(hex.header("x-opentrack-signature"), hex::encode(hmac_sha256(b"opentrack-secret", &hex.body)));
    assert_eq!(hex.query.as_deref(), Some("key=k+1"));
    assert_eq!(hex.header("x-customer"), "c-42");
    assert_eq!(hex.header("webhook-id"), "order-7-accepted");
    assert!(hex.header("webhook-signature").is_empty());

    let b64 = &rx.wait_on("/b64", 1).await[0];
    assert_eq!(b64.header("x-packsize-signature"), B64.encode(hmac_sha256(b"packsize-secret", &b64.body)));
    let env = b64.json();
    assert_eq!(env["changes"][0]["op"], "replace");
    assert!(std::str::from_utf8(&b64.body).unwrap().contains(r#""data":{"orderId":"7","total":1.5}"#));

    let bytes = &rx.wait_on("/bytes", 1).await[0];
    assert_eq!(&bytes.body[..], br#"{ "orderId" : "7",  "total": 1.50 }"#);
    assert_eq!(bytes.header("x-signature"), B64.encode(hmac_sha256(b"bytes-secret", &bytes.body)));

    let plain = &rx.wait_on("/none", 1).await[0];
    assert!(plain.header("webhook-signature").is_empty());
    assert_eq!(plain.header("webhook-id"), "order-7-accepted");
}

#[tokio::test]
async fn failed_deliveries_are_dead_lettered_with_status_and_error() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/broken", 500);
    // One attempt only, so every failure is dead-lettered at once.
    let once = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    let broken = h.api.subscribe(json!({ "url": rx.url("/broken"), "retry": once })).await;
    let refused = h.api.subscribe(json!({ "url": "http://127.0.0.1:1/nothing-listens", "retry": once })).await;
    let ok = h.api.subscribe(json!({ "url": rx.url("/ok"), "retry": once })).await;
    rx.respond_on("/moved", 302);
    let moved = h.api.subscribe(json!({ "url": rx.url("/moved"), "retry": once })).await;
    for i in 0..5 {
        let (s, _) = h.api.post("/v1/events", json!({ "id": format!("e{i}"), "type": "T", "data": i })).await;
        assert_eq!(s, 202);
    }
    rx.wait_on("/ok", 5).await;
    rx.wait_on("/broken", 5).await;
    // Every failure is settled into the dead-letter topic, the refused ones included.
    let api = h.api.clone();
    until("15 dead letters", Duration::from_secs(20), || async {
        let (_, page) = api.get("/v1/dlq?limit=100").await;
        (page["items"].as_array().unwrap().len() >= 15).then_some(())
    })
    .await;
    // Paging across every partition reaches each entry exactly once.
    let mut all = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/dlq?limit=4&cursor={c}"),
            None => "/v1/dlq?limit=4".to_string(),
        };
        let (_, page) = api.get(&path).await;
        for item in page["items"].as_array().unwrap() {
            assert!(all.insert(item["id"].as_str().unwrap().to_string()), "listed twice: {item}");
        }
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(all.len(), 15);
    let (_, page) = api.get(&format!("/v1/dlq?subscription={}&limit=2", broken["id"].as_str().unwrap())).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let (_, rest) = api
        .get(&format!(
            "/v1/dlq?subscription={}&cursor={}",
            broken["id"].as_str().unwrap(),
            page["next"].as_str().unwrap()
        ))
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 3);
    assert!(rest["next"].is_null());
    let dlq = h.stop_and_read_dlq().await;
    let of = |sub: &serde_json::Value| {
        dlq.iter().filter(|d| d.subscription == sub["id"].as_str().unwrap()).cloned().collect::<Vec<_>>()
    };
    let broken_dl = of(&broken);
    assert_eq!(broken_dl.len(), 5, "{dlq:?}");
    assert!(broken_dl.iter().all(|d| d.last_status == Some(500) && d.attempts == 1 && d.event == "T"));
    let ids: HashSet<&str> = broken_dl.iter().map(|d| d.event_id.as_str()).collect();
    assert_eq!(ids, (0..5).map(|i| format!("e{i}")).collect::<HashSet<_>>().iter().map(|s| s.as_str()).collect());
    assert!(of(&ok).is_empty());
    // A redirect is not followed: it is a failure like any non-2xx.
    let moved_dl = of(&moved);
    assert_eq!(moved_dl.len(), 5);
    assert!(moved_dl.iter().all(|d| d.last_status == Some(302)));
    assert_eq!(rx.on("/moved").len(), 5);
    let refused_dl = of(&refused);
    assert_eq!(refused_dl.len(), 5, "{dlq:?}");
    assert!(refused_dl
        .iter()
        .all(|d| d.last_status.is_none() && d.last_error.as_deref().unwrap_or("").contains("onnect")));
}

#[tokio::test]
async fn a_malformed_record_is_dead_lettered_and_does_not_stop_its_partition() {
    use herald::log::Record;
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/p") })).await;
    let id = sub["id"].as_str().unwrap();
    // Garbage keyed like the subscription lands in its partition, ahead of a real event.
    let junk =
        Record { key: bytes::Bytes::from(id.to_string()), value: bytes::Bytes::from_static(b"\x07not a delivery") };
    h.herald.log().append("herald.deliveries", vec![junk]).await.unwrap();
    let (status, _) = h.api.post("/v1/events", json!({ "id": "after-junk", "type": "T", "data": {} })).await;
    assert_eq!(status, 202);
    let got = rx.wait_on("/p", 1).await;
    assert_eq!(got[0].header("webhook-id"), "after-junk");
    let dlq = h.stop_and_read_dlq().await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].subscription, id);
    assert!(dlq[0].last_error.as_deref().unwrap().contains("malformed delivery record"), "{:?}", dlq[0]);
}

#[tokio::test]
async fn a_repeated_event_id_is_accepted_once() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    h.api.subscribe(json!({ "url": rx.url("/idem") })).await;
    h.api.subscribe(json!({ "url": rx.url("/idem2") })).await;
    // A producer retrying after a timeout sends the same id again: same answer, no new deliveries.
    for _ in 0..2 {
        let (status, body) = h.api.post("/v1/events", json!({ "id": "dup-1", "type": "T", "data": 1 })).await;
        assert_eq!((status.as_u16(), body["id"].as_str(), body["deliveries"].as_u64()), (202, Some("dup-1"), Some(2)));
    }
    let (_, batch) = h
        .api
        .post(
            "/v1/events/batch",
            json!([{ "id": "dup-2", "type": "T", "data": 2 }, { "id": "dup-2", "type": "T", "data": 2 }, { "id": "dup-1", "type": "T", "data": 1 }]),
        )
        .await;
    let counts: Vec<u64> =
        batch["items"].as_array().unwrap().iter().map(|i| i["deliveries"].as_u64().unwrap()).collect();
    assert_eq!(counts, vec![2, 2, 2]);
    // Another tenant's event may use the same id.
    let (_, other) =
        h.api.post("/v1/events", json!({ "id": "dup-1", "type": "T", "tenant": "other", "data": 1 })).await;
    assert_eq!(other["deliveries"], 0);
    // The log holds each (event, subscription) delivery once.
    let records = h.herald.log().read_all("herald.deliveries").await.unwrap();
    let mut per_event = std::collections::HashMap::new();
    for r in records {
        let d = herald::model::Delivery::decode(r.value).unwrap();
        *per_event.entry(d.event_id).or_insert(0) += 1;
    }
    assert_eq!(per_event.get("dup-1"), Some(&2), "{per_event:?}");
    assert_eq!(per_event.get("dup-2"), Some(&2), "{per_event:?}");
    let got = rx.wait_on("/idem", 2).await;
    assert_eq!(got.len(), 2);
}

/// An id is the producer's idempotency key: the same id with other content within the window
/// is a mistake (two events given one id), answered `409` naming `id` — it was answered `202`
/// with the first event's count, and the second event was never sent. A repeat of the same
/// event is answered as the first even when the type's schema changed since, since its
/// deliveries are already going out.
#[tokio::test]
async fn an_event_id_reused_for_other_content_is_refused_and_a_repeat_is_not_checked_again() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    h.api.subscribe(json!({ "url": rx.url("/orders") })).await;
    let first = json!({ "id": "order-123", "type": "order.created", "data": { "id": "x" } });
    assert_eq!(h.api.post("/v1/events", first.clone()).await.0, 202);

    let other = json!({ "id": "order-123", "type": "order.cancelled", "data": { "id": "x" } });
    let (status, err) = h.api.post("/v1/events", other).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (409, Some("id")), "{err}");
    let changed = json!({ "id": "order-123", "type": "order.created", "data": { "id": "y" } });
    assert_eq!(h.api.post("/v1/events", changed).await.0, 409);
    // In a batch, the event is named, and nothing of the batch is accepted.
    let batch =
        json!([{ "id": "new-1", "type": "t", "data": {} }, { "id": "order-123", "type": "order.created", "data": 2 }]);
    let (status, err) = h.api.post("/v1/events/batch", batch).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (409, Some("[1].id")), "{err}");
    // Twice in one batch, differently: the second is named.
    let twice = json!([{ "id": "new-2", "type": "t", "data": 1 }, { "id": "new-2", "type": "t", "data": 2 }]);
    let (status, err) = h.api.post("/v1/events/batch", twice).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (409, Some("[1].id")), "{err}");

    // A retry re-serialized with its members in another order (from a hash map) is a repeat.
    for body in [
        r#"{"id":"ro-1","type":"t","data":{"a":1,"b":[2,{"c":3,"d":4}]}}"#,
        r#"{"data":{"b":[2,{"d":4,"c":3}],"a":1.0},"type":"t","id":"ro-1"}"#,
    ] {
        let (status, _, answer) = h
            .api
            .request_with("POST", "/v1/events", Some(body.into()), Some(crate::support::TOKEN), &[])
            .await
            .unwrap();
        assert_eq!((status.as_u16(), answer["deliveries"].as_u64()), (202, Some(1)), "{answer}");
    }

    // Data a `serde_json::Value` cannot hold as sent (an integer past 2^64, kept as written;
    // a lone surrogate; nesting past 128 levels) is compared too: the digest read it as
    // nothing, so another event under a used id was answered as the first and never sent.
    let deep = |leaf: &str| format!("{}{leaf}{}", "[".repeat(200), "]".repeat(200));
    for (a, b) in [
        ("123456789012345678901234".to_string(), "123456789012345678901235".to_string()),
        (r#""\ud800""#.to_string(), r#""\ud801""#.to_string()),
        (deep("1"), deep("2")),
    ] {
        let id = format!("odd-{}", a.len());
        let body = |data: &str| format!(r#"{{"id":"{id}","type":"t","data":{data}}}"#);
        let post = |body: String| {
            let api = h.api.clone();
            async move {
                api.request_with("POST", "/v1/events", Some(body.into()), Some(crate::support::TOKEN), &[])
                    .await
                    .unwrap()
            }
        };
        let (status, _, answer) = post(body(&a)).await;
        assert_eq!(status, 202, "{a}: {answer}");
        let (status, _, answer) = post(body(&b)).await;
        assert_eq!((status.as_u16(), answer["error"]["field"].as_str()), (409, Some("id")), "{b}: {answer}");
        let (status, _, answer) = post(body(&a)).await;
        assert_eq!(status, 202, "a repeat of {a}: {answer}");
    }

    // The type now has a schema the first event does not fit: its repeat is still the same
    // event, already accepted.
    let strict = json!({ "name": "order.created", "schema": { "type": "object", "properties": { "id": { "type": "integer" } } }, "validate": true });
    assert_eq!(h.api.post("/v1/event-types", strict).await.0, 201);
    let (status, body) = h.api.post("/v1/events", first).await;
    assert_eq!((status.as_u16(), body["deliveries"].as_u64()), (202, Some(1)), "{body}");
    let fresh = json!({ "id": "order-124", "type": "order.created", "data": { "id": "x" } });
    assert_eq!(h.api.post("/v1/events", fresh).await.0, 400, "a new event is checked");

    // Sent once: neither the reused id's second event nor the refused batch went out.
    let got = rx.wait_on("/orders", 5).await;
    assert_eq!(h.api.post("/v1/events", json!({ "id": "last", "type": "t", "data": {} })).await.0, 202);
    let got_all = rx.wait_on("/orders", 6).await;
    let mut ids: Vec<String> = got_all.iter().map(|r| r.header("webhook-id").to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["last", "odd-24", "odd-401", "odd-8", "order-123", "ro-1"], "{got:?}");
}
