//! The client libraries against a real server: the Python package's own test suite
//! (`clients/python/test_herald_client.py`, run with `python3`), and the Rust crate's
//! receiver-side checks on webhooks Herald really sent.

use crate::support::{spawn_herald, until, Receiver, TestHerald, TOKEN};
use herald_client::verify::{self, Encoding};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn the_python_client_passes_its_tests_against_a_real_server() {
    if crate::support::on_kafka() {
        return; // a client of the API, the same on both backends
    }
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald(dir.path());
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    let run = tokio::process::Command::new("python3")
        .args(["-m", "unittest", "-v", "test_herald_client"])
        .current_dir(&python)
        .env("HERALD_URL", format!("http://{addr}"))
        .env("HERALD_TOKEN", TOKEN)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true)
        .output();
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(120), run).await.expect("bounded").expect("python3 runs");
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("Ran 8 tests"), "{report}");
}

#[tokio::test]
async fn the_rust_client_publishes_and_its_checks_accept_what_herald_signed() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let client = herald_client::Client::new(&h.api.base, TOKEN);
    let hmac = json!({ "url": rx.url("/hmac"), "secret": "rs-secret", "signature": { "scheme": "hmac", "header": "x-packsize-signature", "encoding": "hex" } });
    client.create_subscription(&hmac).await.unwrap();
    let standard = client.create_subscription(&json!({ "url": rx.url("/standard") })).await.unwrap();
    let accepted =
        client.publish(&herald_client::Event::new("order.created", json!({ "n": 1 })).id("rs-1")).await.unwrap();
    assert_eq!(accepted.deliveries, 2);

    let got = rx.wait_on("/hmac", 1).await;
    assert!(verify::hmac("rs-secret", &got[0].body, got[0].header("x-packsize-signature"), Encoding::Hex));
    assert!(!verify::hmac("rs-secret", b"{}", got[0].header("x-packsize-signature"), Encoding::Hex));
    let got = rx.wait_on("/standard", 1).await;
    let r = &got[0];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let secret = standard["secret"].as_str().unwrap();
    let check = |id: &str| {
        verify::standard(secret, id, r.header("webhook-timestamp"), &r.body, r.header("webhook-signature"), now, 300)
    };
    assert_eq!(check(r.header("webhook-id")), Ok(()));
    assert_eq!(check("another-id"), Err(verify::Rejected::Signature));

    // Every tenant, past the server's page of 50.
    let mut made = Vec::new();
    for n in 0..60 {
        made.push(client.create_tenant(&format!("Rust Co {n}")).await.unwrap().id);
    }
    let listed: Vec<_> =
        client.tenants().await.unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()).collect();
    assert!(made.iter().all(|id| listed.contains(id)), "{} listed", listed.len());

    // Listings filtered by the server.
    let off = client.create_subscription(&json!({ "url": rx.url("/off"), "enabled": false })).await.unwrap();
    let disabled = herald_client::SubscriptionFilter { enabled: Some(false), ..Default::default() };
    let page = client.subscriptions_where(&disabled, None).await.unwrap();
    assert_eq!((page.items.len(), &page.items[0]["id"], &page.next), (1, &off["id"], &None));
    let amqp = herald_client::SubscriptionFilter { transport: Some("amqp".into()), ..Default::default() };
    assert!(client.subscriptions_where(&amqp, None).await.unwrap().items.is_empty());
    let ajar = herald_client::SubscriptionFilter { breaker: Some("ajar".into()), ..Default::default() };
    let err = client.subscriptions_where(&ajar, None).await.unwrap_err();
    assert!(matches!(&err, herald_client::Error::Api { status: 400, field: Some(f), .. } if f == "breaker"), "{err}");

    // Events a page at a time, on from each page's cursor.
    client.publish(&herald_client::Event::new("order.created", json!({ "n": 2 })).id("rs-2")).await.unwrap();
    let listed = until("both events listed", Duration::from_secs(10), || async {
        let first = client.events(None, None, Some(1), None).await.unwrap();
        let cursor = first.next.clone()?;
        let second = client.events(None, None, Some(1), Some(&cursor)).await.unwrap();
        let ids: Vec<_> =
            first.items.iter().chain(&second.items).map(|e| e["id"].as_str().unwrap().to_string()).collect();
        (ids.len() == 2).then_some(ids)
    })
    .await;
    assert_eq!(listed, ["rs-2", "rs-1"], "newest first, one a page");

    // Refusals come typed, naming the field.
    let err = client.create_subscription(&json!({ "url": "not a url" })).await.unwrap_err();
    assert!(matches!(&err, herald_client::Error::Api { status: 400, field: Some(f), .. } if f == "url"), "{err}");
    assert!(err.is_refusal());
}
