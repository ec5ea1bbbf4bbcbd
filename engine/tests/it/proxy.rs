//! The egress proxy (`http.proxy`): webhooks leave through a real HTTP CONNECT proxy on
//! loopback, with its credentials, to the address the network guard checked; `no_proxy`
//! hosts go direct; the guard still refuses what it refuses.

use crate::support::{until, Receiver, TestHerald};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CONNECT proxy that asks for `credentials` (Basic, base64 of `user:password`) and notes
/// every target it was asked for.
struct ConnectProxy {
    addr: std::net::SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    async fn start(credentials: &'static str) -> ConnectProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let noted = asked.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                let noted = noted.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                        if client.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let target = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                    noted.lock().unwrap().push(target.clone());
                    let authorized = head
                        .lines()
                        .any(|l| l.eq_ignore_ascii_case(&format!("proxy-authorization: Basic {credentials}")));
                    if !head.starts_with("CONNECT ") || !authorized {
                        let _ = client.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
                        return;
                    }
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    let _ = client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        ConnectProxy { addr, asked }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn webhooks_leave_through_the_egress_proxy_to_the_checked_address() {
    // "herald:s3cret" in base64; the password is percent-encoded in the URL.
    let proxy = ConnectProxy::start("aGVyYWxkOnMzY3JldA==").await;
    let url = format!("http://herald:s3%63ret@{}", proxy.addr);
    let h = TestHerald::start_with(|c| {
        c.http.proxy = Some(url);
        c.http.no_proxy = vec!["127.0.0.2".into()];
    })
    .await;
    let rx = Receiver::start().await;
    // By name: the guard resolves it, and the proxy is asked for the checked address.
    let by_name = rx.url("/via-proxy").replace("127.0.0.1", "localhost");
    h.api.subscribe(json!({ "url": by_name, "events": ["a"] })).await;
    h.api.post("/v1/events", json!({ "id": "p1", "type": "a", "data": {} })).await;
    rx.wait_on("/via-proxy", 1).await;
    let port = rx.url("/").split(':').nth(2).unwrap().trim_end_matches('/').to_string();
    let asked = proxy.asked();
    assert!(asked.iter().any(|t| t == &format!("127.0.0.1:{port}")), "CONNECT to the checked address: {asked:?}");
    assert!(asked.iter().all(|t| !t.contains("localhost")), "the proxy never resolves names: {asked:?}");

    // A no_proxy host goes direct.
    let before = proxy.asked().len();
    let elsewhere = Receiver::start_on("127.0.0.2").await;
    h.api.subscribe(json!({ "url": elsewhere.url("/direct"), "events": ["b"] })).await;
    h.api.post("/v1/events", json!({ "id": "p2", "type": "b", "data": {} })).await;
    elsewhere.wait_on("/direct", 1).await;
    assert_eq!(proxy.asked().len(), before, "no_proxy hosts do not use the proxy");

    // The guard still applies to the final target: an address it refuses is never asked for.
    let (status, err) = h.api.post("/v1/subscriptions", json!({ "url": "http://10.1.2.3:9/x", "events": ["c"] })).await;
    assert_eq!(status, 400, "{err}");
    assert!(proxy.asked().iter().all(|t| !t.starts_with("10.")));
}

#[tokio::test]
async fn a_proxy_refusing_herald_s_credentials_fails_the_attempt_with_the_reason() {
    let proxy = ConnectProxy::start("aGVyYWxkOnMzY3JldA==").await;
    let url = format!("http://herald:wrong@{}", proxy.addr);
    let h = TestHerald::start_with(|c| c.http.proxy = Some(url)).await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/never") })).await;
    let (status, result) =
        h.api.post(&format!("/v1/subscriptions/{}/test", sub["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["delivered"], false, "{result}");
    assert!(result["error"].as_str().unwrap_or_default().to_lowercase().contains("proxy"), "{result}");
    until("the proxy asked", WAIT, || async { (!proxy.asked().is_empty()).then_some(()) }).await;
    assert!(rx.on("/never").is_empty());
}

#[tokio::test]
async fn an_unusable_proxy_setting_is_refused_at_start_naming_it() {
    let env = [("HERALD_HTTP_PROXY".to_string(), "socks5://127.0.0.1:1080".to_string())];
    let err = herald::config::Config::load(None, &env).unwrap_err().to_string();
    assert!(err.contains("http.proxy"), "{err}");
    let env = [("HERALD_HTTP_PROXY".to_string(), "http://proxy.internal:3128".to_string())];
    let config = herald::config::Config::load(None, &env).unwrap();
    assert_eq!(config.http.proxy.as_deref(), Some("http://proxy.internal:3128"));
}

#[tokio::test]
async fn a_subscription_chooses_its_egress_proxy_by_name_or_goes_direct() {
    let default = ConnectProxy::start("aGVyYWxkOnMzY3JldA==").await;
    let eu = ConnectProxy::start("ZXU6ZXU=").await; // "eu:eu"
    let (default_url, eu_url) = (format!("http://herald:s3cret@{}", default.addr), format!("http://eu:eu@{}", eu.addr));
    let h = TestHerald::start_with(move |c| {
        c.http.proxy = Some(default_url);
        c.http.proxies.insert("eu-static".into(), eu_url);
    })
    .await;
    let rx = Receiver::start().await;
    let port = rx.url("/").split(':').nth(2).unwrap().trim_end_matches('/').to_string();
    let checked = format!("127.0.0.1:{port}");
    let send = |id: &'static str, event: &'static str| {
        let api = h.api.clone();
        async move { api.post("/v1/events", json!({ "id": id, "type": event, "data": {} })).await }
    };

    // Named: through that proxy only.
    let sub = h.api.subscribe(json!({ "url": rx.url("/eu"), "events": ["eu"], "proxy": "eu-static" })).await;
    assert_eq!(sub["proxy"], "eu-static");
    send("e1", "eu").await;
    rx.wait_on("/eu", 1).await;
    assert_eq!(eu.asked(), std::slice::from_ref(&checked));
    assert!(default.asked().is_empty(), "{:?}", default.asked());

    // "none": straight to the receiver, past the default proxy.
    h.api.subscribe(json!({ "url": rx.url("/direct"), "events": ["direct"], "proxy": "none" })).await;
    send("e2", "direct").await;
    rx.wait_on("/direct", 1).await;
    assert!(default.asked().is_empty() && eu.asked().len() == 1);

    // Cleared with a merge patch: back to the default proxy.
    let path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    let (status, patched) = h.api.raw("PATCH", &path, Some(r#"{"proxy":null}"#.into()), Some(&h.api.token)).await;
    assert_eq!(status, 200, "{patched}");
    assert!(patched.get("proxy").is_none(), "{patched}");
    send("e3", "eu").await;
    rx.wait_on("/eu", 2).await;
    assert_eq!(default.asked(), [checked]);

    // A name the operator did not configure, or a proxy where none applies, is refused.
    let (status, err) = h.api.post("/v1/subscriptions", json!({ "url": rx.url("/x"), "proxy": "us" })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("proxy")), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("eu-static"), "{err}");
    // The egress is the operator's choice: a tenant key cannot set it, nor go around the proxy.
    let (_, tenant) = crate::support::tenant_with_key(&h.api, "Acme").await;
    let (status, err) = tenant.post("/v1/subscriptions", json!({ "url": rx.url("/t"), "proxy": "none" })).await;
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{err}");
    let own = tenant.subscribe(json!({ "url": rx.url("/t") })).await;
    let own_path = format!("/v1/subscriptions/{}", own["id"].as_str().unwrap());
    let (status, _) =
        tenant.raw("PATCH", &own_path, Some(r#"{"proxy":"eu-static"}"#.into()), Some(&tenant.token)).await;
    assert_eq!(status, 403);
    let amqp = json!({ "transport": "amqp", "proxy": "eu-static", "amqp": { "uri": "amqp://127.0.0.1:5672/%2f", "exchange": "x" } });
    let (status, err) = h.api.post("/v1/subscriptions", amqp).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("proxy")), "{err}");
}

#[tokio::test]
async fn an_https_receiver_is_reached_through_the_tunnel_with_end_to_end_tls() {
    let proxy = ConnectProxy::start("aGVyYWxkOnMzY3JldA==").await;
    let url = format!("http://herald:s3cret@{}", proxy.addr);
    let h = TestHerald::start_with(|c| c.http.proxy = Some(url)).await;
    // A receiver that checks Herald's client certificate: TLS runs inside the tunnel, between
    // Herald and the receiver, with the name in the URL.
    let pki = crate::tls::pki();
    let rx = crate::tls::tls_receiver(pki.server.clone()).await;
    let tls = json!({
        "ca_pem": crate::tls::text(&pki.ca),
        "client_cert_pem": crate::tls::text(&pki.client_cert),
        "client_key_pem": crate::tls::text(&pki.client_key),
    });
    let target = format!("https://localhost:{}/through", rx.port);
    h.api.subscribe(json!({ "url": target, "tls": tls })).await;
    h.api.post("/v1/events", json!({ "id": "tls-1", "type": "t", "data": {} })).await;
    let paths = rx.paths.clone();
    until("the https receiver reached", WAIT, || async {
        paths.lock().unwrap().contains(&"/through".to_string()).then_some(())
    })
    .await;
    assert_eq!(proxy.asked(), [format!("127.0.0.1:{}", rx.port)], "a tunnel to the checked address");
}
