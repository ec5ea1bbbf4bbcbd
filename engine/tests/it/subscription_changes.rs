//! Changing subscriptions: PATCH, secret rotation with an overlap, and test pings.

use crate::support::{until, Receiver, TestHerald};
use herald_load_tests::verify::Verifier;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn patch_changes_what_is_delivered_and_validates_like_create() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/a"), "events": ["A"] })).await;
    let id = sub["id"].as_str().unwrap();
    h.api.subscribe(json!({ "url": rx.url("/taken") })).await;

    let (status, changed) = h
        .api
        .raw(
            "PATCH",
            &format!("/v1/subscriptions/{id}"),
            Some(json!({ "events": ["B"], "url": rx.url("/b") }).to_string().into()),
            Some(crate::support::TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["events"], json!(["B"]));
    assert_eq!(changed["id"], id);
    assert!(changed.get("secret").is_none());
    let (_, a) = h.api.post("/v1/events", json!({ "type": "A", "data": {} })).await;
    let (_, b) = h.api.post("/v1/events", json!({ "id": "after-patch", "type": "B", "data": {} })).await;
    assert_eq!((a["deliveries"].as_u64(), b["deliveries"].as_u64()), (Some(1), Some(2)), "A only reaches /taken now");
    let got = rx.wait_on("/b", 1).await;
    assert_eq!(got[0].header("webhook-id"), "after-patch");
    assert!(rx.on("/a").is_empty());

    let patch = |body: serde_json::Value| {
        let api = h.api.clone();
        let path = format!("/v1/subscriptions/{id}");
        async move { api.raw("PATCH", &path, Some(body.to_string().into()), Some(crate::support::TOKEN)).await }
    };
    for (body, field) in [
        (json!({ "url": rx.url("/taken") }), "url"),
        (json!({ "url": "ftp://x" }), "url"),
        (json!({ "timeout": "PT1H" }), "timeout"),
        (json!({ "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 0 } }), "retry.max_attempts"),
        (json!({ "tenant": "other" }), "tenant"),
    ] {
        let (status, err) = patch(body.clone()).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{body}: {err}");
    }
    let (status, _) =
        h.api.raw("PATCH", "/v1/subscriptions/sub_missing", Some("{}".into()), Some(crate::support::TOKEN)).await;
    assert_eq!(status, 404);
    // Disabling and enabling again.
    let (_, off) = patch(json!({ "enabled": false })).await;
    assert_eq!(off["enabled"], false);
    let (_, none) = h.api.post("/v1/events", json!({ "type": "B", "data": {} })).await;
    assert_eq!(none["deliveries"], 1);
    let (_, on) = patch(json!({ "enabled": true })).await;
    assert_eq!(on["enabled"], true);
    assert!(on.get("disabled_reason").is_none());
}

#[tokio::test]
async fn rotation_sends_both_signatures_during_the_overlap_then_only_the_new_one() {
    let h = TestHerald::start_with(|c| c.signing.rotation_overlap = Duration::from_secs(2).into()).await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/r") })).await;
    let id = sub["id"].as_str().unwrap();
    let old = Verifier::new(sub["secret"].as_str().unwrap()).unwrap();
    let (status, rotated) =
        h.api.raw("POST", &format!("/v1/subscriptions/{id}/rotate-secret"), None, Some(crate::support::TOKEN)).await;
    assert_eq!(status, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_ne!(new_secret, sub["secret"].as_str().unwrap());
    assert!(rotated["previous_secret_expires_at"].is_string());
    let new = Verifier::new(new_secret).unwrap();
    let check = |r: &crate::support::Received, v: &Verifier, sig: &str| {
        v.verify(r.header("webhook-id"), r.header("webhook-timestamp"), &r.body, sig)
    };

    h.api.post("/v1/events", json!({ "id": "during", "type": "T", "data": {} })).await;
    let during = rx.wait_on("/r", 1).await.remove(0);
    let sigs: Vec<&str> = during.header("webhook-signature").split(' ').collect();
    assert_eq!(sigs.len(), 2, "both signatures during the overlap");
    assert!(check(&during, &new, sigs[0]) && !check(&during, &old, sigs[0]), "the new secret signs first");
    assert!(check(&during, &old, sigs[1]), "the old secret still signs");

    // After the overlap only the new secret signs.
    let api = h.api.clone();
    let mut n = 0;
    let after = until("a delivery after the overlap", Duration::from_secs(10), || {
        n += 1;
        let (api, rx, id) = (api.clone(), rx.clone(), format!("after-{n}"));
        async move {
            api.post("/v1/events", json!({ "id": id, "type": "T", "data": {} })).await;
            let r = rx.wait_on("/r", 1).await.into_iter().find(|r| r.header("webhook-id") == id)?;
            (!r.header("webhook-signature").contains(' ')).then_some(r)
        }
    })
    .await;
    assert!(check(&after, &new, after.header("webhook-signature")));
    assert!(!check(&after, &old, after.header("webhook-signature")));
    // A rotation to a chosen secret is checked like one given at creation.
    let (status, err) =
        h.api.post(&format!("/v1/subscriptions/{id}/rotate-secret"), json!({ "secret": "not-whsec" })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("secret")));
}

#[tokio::test]
async fn the_test_endpoint_sends_a_signed_ping_and_reports_the_outcome() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/broken", 500);
    let ok = h.api.subscribe(json!({ "url": rx.url("/ok") })).await;
    let broken = h.api.subscribe(json!({ "url": rx.url("/broken") })).await;
    let (status, report) =
        h.api.post(&format!("/v1/subscriptions/{}/test", ok["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!((report["delivered"].as_bool(), report["status"].as_u64()), (Some(true), Some(200)), "{report}");
    let ping = &rx.on("/ok")[0];
    assert_eq!(ping.json()["event"], "herald.ping");
    let v = Verifier::new(ok["secret"].as_str().unwrap()).unwrap();
    assert!(v.verify(
        ping.header("webhook-id"),
        ping.header("webhook-timestamp"),
        &ping.body,
        ping.header("webhook-signature")
    ));
    let (_, report) =
        h.api.post(&format!("/v1/subscriptions/{}/test", broken["id"].as_str().unwrap()), json!({})).await;
    assert_eq!((report["delivered"].as_bool(), report["status"].as_u64()), (Some(false), Some(500)), "{report}");
    let (status, _) = h.api.post("/v1/subscriptions/sub_nope/test", json!({})).await;
    assert_eq!(status, 404);
}
