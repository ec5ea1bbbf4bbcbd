//! Receivers behind TLS, client certificates and OAuth: real servers on loopback, with a
//! test PKI generated for the run.

use crate::support::{serve_http1, until, Receiver, TestHerald};
use base64::Engine;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A test CA, a server certificate for `localhost`, and a client certificate as PEM files
/// and as a password-protected PKCS#12 file.
pub(crate) struct Pki {
    _dir: tempfile::TempDir,
    pub(crate) ca: PathBuf,
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
    client_p12: PathBuf,
    pub(crate) server: Arc<rustls::ServerConfig>,
    /// The same certificate, no client certificate asked for, offering HTTP/2 and HTTP/1.1.
    pub(crate) open_server: Arc<rustls::ServerConfig>,
}

const P12_PASSWORD: &str = "p12-pass";

pub(crate) fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "Herald Test CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&server_key, &ca).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params.distinguished_name.push(DnType::CommonName, "herald-client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &ca).unwrap();

    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("client.pem"), client_cert.pem()).unwrap();
    std::fs::write(path("client.key"), client_key.serialize_pem()).unwrap();
    let mut store = p12_keystore::KeyStore::new();
    let chain = p12_keystore::PrivateKeyChain::new(
        b"herald-client".to_vec(),
        p12_keystore::PrivateKey::from_der(&client_key.serialize_der()).unwrap(),
        vec![p12_keystore::Certificate::from_der(client_cert.der()).unwrap()],
    );
    store.add_entry("client", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    std::fs::write(path("client.p12"), store.writer(P12_PASSWORD).write().unwrap()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let cert = || vec![CertificateDer::from(server_cert.der().to_vec())];
    let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert(), key())
        .unwrap();
    let mut open_server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(cert(), key())
        .unwrap();
    open_server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Pki {
        ca: path("ca.pem"),
        client_cert: path("client.pem"),
        client_key: path("client.key"),
        client_p12: path("client.p12"),
        server: Arc::new(server),
        open_server: Arc::new(open_server),
        _dir: dir,
    }
}

/// An HTTPS receiver that requires a client certificate signed by the test CA.
pub(crate) struct TlsReceiver {
    pub(crate) port: u16,
    pub(crate) paths: Arc<Mutex<Vec<String>>>,
    /// (path?query, x-signature, body) of every request.
    requests: Arc<Mutex<Vec<(String, String, Bytes)>>>,
    refused_handshakes: Arc<AtomicUsize>,
}

pub(crate) async fn tls_receiver(config: Arc<rustls::ServerConfig>) -> TlsReceiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let paths: Arc<Mutex<Vec<String>>> = Default::default();
    let requests: Arc<Mutex<Vec<(String, String, Bytes)>>> = Default::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (seen, refused_count, log) = (paths.clone(), refused.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (acceptor, seen, refused, log) = (acceptor.clone(), seen.clone(), refused_count.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    refused.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (seen, log) = (seen.clone(), log.clone());
                    async move {
                        seen.lock().unwrap().push(req.uri().path().to_string());
                        let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                        let sig = req
                            .headers()
                            .get("x-signature")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        log.lock().unwrap().push((target, sig, body));
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    TlsReceiver { port, paths, requests, refused_handshakes: refused }
}

/// An HTTPS receiver speaking HTTP/2 when the client offers it (at most `streams` requests at
/// once on a connection) and HTTP/1.1 otherwise; requests to `/slow` are answered once
/// `release` is sent.
struct H2Receiver {
    port: u16,
    /// (path, HTTP version) of every request, as it arrives.
    seen: Arc<Mutex<Vec<(String, http::Version)>>>,
    release: tokio::sync::watch::Sender<bool>,
}

async fn h2_receiver(config: Arc<rustls::ServerConfig>, streams: u32) -> H2Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<(String, http::Version)>>> = Default::default();
    let (release, released) = tokio::sync::watch::channel(false);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (acceptor, log, released) = (acceptor.clone(), log.clone(), released.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (log, mut released) = (log.clone(), released.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        log.lock().unwrap().push((path.clone(), req.version()));
                        let _ = req.into_body().collect().await;
                        if path == "/slow" {
                            let _ = tokio::time::timeout(Duration::from_secs(60), released.wait_for(|r| *r)).await;
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let mut builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder.max_concurrent_streams(streams).serve_connection(io, svc).await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                }
            });
        }
    });
    H2Receiver { port, seen, release }
}

/// Webhooks go over HTTP/1.1, a connection to each attempt at a time, even to a receiver that
/// offers HTTP/2: over HTTP/2 every tenant's requests to one host shared one connection (one
/// per host in each pool), so one tenant's slow endpoint on a shared host (a hosted webhook
/// inbox, an integration platform) filled the streams the receiver allows and another
/// tenant's attempts to its own endpoint there waited behind them until they timed out.
#[tokio::test]
async fn one_tenant_s_slow_requests_to_a_shared_host_do_not_hold_another_s() {
    let pki = pki();
    let rx = h2_receiver(pki.open_server.clone(), 1).await;
    let h = TestHerald::start().await;
    let (acme_id, acme) = crate::support::tenant_with_key(&h.api, "Acme").await;
    let (globex_id, globex) = crate::support::tenant_with_key(&h.api, "Globex").await;
    let url = |path: &str| format!("https://localhost:{}{path}", rx.port);
    let tls = json!({ "ca_pem": text(&pki.ca) });
    let once = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    acme.subscribe(json!({ "url": url("/slow"), "tls": tls, "retry": once, "timeout": "60s" })).await;
    globex.subscribe(json!({ "url": url("/fast"), "tls": tls, "retry": once, "timeout": "60s" })).await;
    let publish = |tenant: &str| h.api.post("/v1/events", json!({ "type": "T", "tenant": tenant, "data": {} }));
    assert_eq!(publish(&acme_id).await.0, 202);
    let seen = rx.seen.clone();
    let arrived = |path: &'static str| {
        let seen = seen.clone();
        move || {
            let seen = seen.clone();
            async move { seen.lock().unwrap().iter().any(|(p, _)| p == path).then_some(()) }
        }
    };
    until("the slow endpoint's request arrived", Duration::from_secs(15), arrived("/slow")).await;
    assert_eq!(publish(&globex_id).await.0, 202);
    until("another tenant's event delivered while the slow request is held", Duration::from_secs(10), arrived("/fast"))
        .await;
    let versions: HashSet<http::Version> = rx.seen.lock().unwrap().iter().map(|(_, v)| *v).collect();
    assert_eq!(versions, HashSet::from([http::Version::HTTP_11]), "webhooks are sent over HTTP/1.1");
    rx.release.send_replace(true);
}

#[tokio::test]
async fn mutual_tls_delivers_with_the_client_certificate_and_fails_without_it() {
    let pki = pki();
    let rx = tls_receiver(pki.server.clone()).await;
    let h = TestHerald::start().await;
    let url = |path: &str| format!("https://localhost:{}{path}", rx.port);
    let once = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    // Certificates and keys as content: a tenant never names a file on Herald's server.
    let (ca, cert, key) = (text(&pki.ca), text(&pki.client_cert), text(&pki.client_key));
    let p12 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&pki.client_p12).unwrap());
    let subs = [
        ("/pem", json!({ "ca_pem": ca, "client_cert_pem": cert, "client_key_pem": key })),
        ("/p12", json!({ "ca_pem": ca, "client_p12": p12, "key_password": P12_PASSWORD })),
        ("/trust-all", json!({ "trust_all": true, "client_cert_pem": cert, "client_key_pem": key })),
        ("/no-client-cert", json!({ "ca_pem": ca })),
    ];
    for (path, tls) in &subs {
        h.api.subscribe(json!({ "url": url(path), "tls": tls, "retry": once })).await;
    }
    h.api.subscribe(json!({ "url": url("/unknown-ca"), "retry": once })).await;
    let (_, accepted) = h.api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    assert_eq!(accepted["deliveries"], 5);

    let paths = rx.paths.clone();
    let got = until("three certificate-holding subscriptions delivered", Duration::from_secs(15), || async {
        let got: HashSet<String> = paths.lock().unwrap().iter().cloned().collect();
        (got.len() >= 3).then_some(got)
    })
    .await;
    assert_eq!(got, ["/pem", "/p12", "/trust-all"].iter().map(|s| s.to_string()).collect());
    let api = h.api.clone();
    let dlq = until("two refused deliveries dead-lettered", Duration::from_secs(15), || async {
        let (_, page) = api.get("/v1/dlq").await;
        let items = page["items"].as_array().unwrap().clone();
        (items.len() >= 2).then_some(items)
    })
    .await;
    let errors: Vec<String> = dlq.iter().map(|e| e["last_error"].as_str().unwrap().to_lowercase()).collect();
    assert!(errors.iter().any(|e| e.contains("unknownissuer") || e.contains("unknown issuer")), "{errors:?}");
    assert!(
        rx.refused_handshakes.load(Ordering::SeqCst) >= 1,
        "the receiver refused the handshake without a client certificate"
    );
    assert!(!rx.paths.lock().unwrap().iter().any(|p| p == "/no-client-cert" || p == "/unknown-ca"));
}

pub(crate) fn text(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test]
async fn unusable_tls_settings_are_refused_naming_the_field() {
    let pki = pki();
    let h = TestHerald::start().await;
    let p12 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&pki.client_p12).unwrap());
    let cases = [
        (json!({ "ca_pem": "not a certificate" }), "tls.ca_pem"),
        (json!({ "ca_pem": text(&pki.client_key) }), "tls.ca_pem"),
        (json!({ "client_p12": p12, "key_password": "wrong" }), "tls.key_password"),
        (json!({ "client_p12": "***not base64***" }), "tls.client_p12"),
        (json!({ "client_cert_pem": text(&pki.client_cert) }), "tls.client_key_pem"),
        (json!({ "client_key_pem": text(&pki.client_key) }), "tls.client_cert_pem"),
        (json!({ "bogus": true }), "tls.bogus"),
    ];
    for (tls, field) in cases {
        let (status, err) =
            h.api.post("/v1/subscriptions", json!({ "url": "https://hooks.example.com/x", "tls": tls })).await;
        assert_eq!(status, 400, "{tls}: {err}");
        assert_eq!(err["error"]["field"], field, "{tls}: {err}");
    }
    // The key, the PKCS#12 content and its password are secrets: never shown back.
    let sub = h
        .api
        .subscribe(json!({ "url": "https://hooks.example.com/p12", "tls": { "client_p12": p12, "key_password": P12_PASSWORD } }))
        .await;
    let (_, got) = h.api.get(&format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap())).await;
    assert!(!got.to_string().contains(P12_PASSWORD) && !got.to_string().contains(&p12[..40]), "{got}");
}

#[tokio::test]
async fn a_tenant_cannot_make_herald_read_its_files() {
    let pki = pki();
    let h = TestHerald::start().await;
    let (_, tenant) = h.api.post("/v1/tenants", json!({ "name": "Mallory" })).await;
    let (_, key) = h.api.post(&format!("/v1/tenants/{}/keys", tenant["id"].as_str().unwrap()), json!({})).await;
    let mallory = crate::support::Api::new(h.herald.addr, key["key"].as_str().unwrap());
    let operator_cert = pki.client_cert.display().to_string();
    for tls in [
        json!({ "ca_file": "/dev/zero" }),
        json!({ "ca_file": "/etc/passwd" }),
        json!({ "client_cert_file": operator_cert, "client_key_file": pki.client_key.display().to_string() }),
    ] {
        let started = std::time::Instant::now();
        let (status, err) =
            mallory.post("/v1/subscriptions", json!({ "url": "https://hooks.example.com/m", "tls": tls })).await;
        assert_eq!(status, 400, "{tls}: {err}");
        assert!(err["error"]["field"].as_str().unwrap().ends_with("_file"), "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains("content"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(2), "refused at once, nothing read");
    }
    // With a TLS directory the operator chose, files under it may be named, and only those.
    let dir = pki.ca.parent().unwrap().to_path_buf();
    let h = TestHerald::start_with(|c| c.http.tls_files_dir = Some(dir.clone())).await;
    let ok = json!({ "url": "https://hooks.example.com/f", "tls": { "ca_file": "ca.pem" } });
    assert_eq!(h.api.post("/v1/subscriptions", ok).await.0, 201);
    for escape in ["../../../etc/passwd", "/dev/zero", "missing.pem"] {
        let (status, err) = h
            .api
            .post("/v1/subscriptions", json!({ "url": "https://hooks.example.com/e", "tls": { "ca_file": escape } }))
            .await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("tls.ca_file")), "{escape}: {err}");
        assert!(!err["error"]["message"].as_str().unwrap().contains("No such file"), "{err}");
    }
}

/// A token endpoint: client credentials in Basic auth (or user and password in the form),
/// issuing `tok-1`, `tok-2`, … and remembering which are valid.
pub(crate) struct TokenServer {
    pub(crate) url: String,
    pub(crate) issued: Arc<AtomicUsize>,
    pub(crate) valid: Arc<Mutex<HashSet<String>>>,
    /// How long it takes to answer, ms.
    pub(crate) delay: Arc<AtomicUsize>,
}

pub(crate) async fn token_server() -> TokenServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let issued = Arc::new(AtomicUsize::new(0));
    let valid: Arc<Mutex<HashSet<String>>> = Default::default();
    let delay = Arc::new(AtomicUsize::new(0));
    let (count, tokens, pause) = (issued.clone(), valid.clone(), delay.clone());
    serve_http1(listener, move |req: Request<hyper::body::Incoming>| {
        let (count, tokens, pause) = (count.clone(), tokens.clone(), pause.load(Ordering::SeqCst));
        async move {
            tokio::time::sleep(Duration::from_millis(pause as u64)).await;
            let basic = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_string());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let form: std::collections::HashMap<String, String> =
                url::form_urlencoded::parse(&body).into_owned().collect();
            let client_ok = basic.as_deref() == Some("Basic Y2xpZW50LTE6Y2xpZW50LXNlY3JldA=="); // client-1:client-secret
            let user_ok = form.get("grant_type").map(String::as_str) != Some("password")
                || (form.get("username").map(String::as_str) == Some("alice")
                    && form.get("password").map(String::as_str) == Some("wonderland"));
            if !client_ok || !user_ok {
                return Response::builder().status(401).body(Full::new(Bytes::new())).unwrap();
            }
            let token = format!("tok-{}", count.fetch_add(1, Ordering::SeqCst) + 1);
            tokens.lock().unwrap().insert(token.clone());
            let body = json!({ "access_token": token, "token_type": "Bearer", "expires_in": 3600 }).to_string();
            Response::builder().header("content-type", "application/json").body(Full::new(Bytes::from(body))).unwrap()
        }
    });
    TokenServer { url, issued, valid, delay }
}

/// A receiver that accepts only currently valid bearer tokens (401 otherwise).
pub(crate) async fn bearer_receiver(valid: Arc<Mutex<HashSet<String>>>) -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<(String, String)>>> = Default::default();
    let log = seen.clone();
    serve_http1(listener, move |req: Request<hyper::body::Incoming>| {
        let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let (auth, id) = (header("authorization"), header("webhook-id"));
        log.lock().unwrap().push((id, auth.clone()));
        let ok = auth.strip_prefix("Bearer ").is_some_and(|t| valid.lock().unwrap().contains(t));
        async move { Response::builder().status(if ok { 200 } else { 401 }).body(Full::new(Bytes::new())).unwrap() }
    });
    (url, seen)
}

/// A subscription to `receiver` taking its tokens from `token_url` as client-1 (the token
/// server's), one attempt a delivery.
async fn oauth_subscription(api: &crate::support::Api, receiver: &str, token_url: &str) {
    api.subscribe(json!({
        "url": receiver,
        "auth": { "type": "oauth2", "grant": "client_credentials", "token_url": token_url, "client_id": "client-1", "client_secret": "client-secret" },
        "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 1 }
    }))
    .await;
}

#[tokio::test]
async fn oauth2_tokens_are_fetched_cached_and_refreshed_once_after_a_401() {
    let tokens = token_server().await;
    let (receiver, seen) = bearer_receiver(tokens.valid.clone()).await;
    let h = TestHerald::start().await;
    oauth_subscription(&h.api, &receiver, &tokens.url).await;
    for i in 0..5 {
        h.api.post("/v1/events", json!({ "id": format!("o-{i}"), "type": "T", "data": i })).await;
    }
    let log = seen.clone();
    until("five deliveries", Duration::from_secs(10), || async { (log.lock().unwrap().len() >= 5).then_some(()) })
        .await;
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 1, "one token, cached for every delivery");
    assert!(seen.lock().unwrap().iter().all(|(_, auth)| auth == "Bearer tok-1"));

    // The receiver revokes the token: Herald's next delivery gets a 401, fetches a new
    // token once and sends again.
    tokens.valid.lock().unwrap().clear();
    h.api.post("/v1/events", json!({ "id": "o-after-revoke", "type": "T", "data": {} })).await;
    let log = seen.clone();
    until("the retried request with the new token", Duration::from_secs(10), || async {
        (log.lock().unwrap().iter().filter(|(id, _)| id == "o-after-revoke").count() >= 2).then_some(())
    })
    .await;
    let attempts: Vec<String> =
        seen.lock().unwrap().iter().filter(|(id, _)| id == "o-after-revoke").map(|(_, a)| a.clone()).collect();
    assert_eq!(attempts, vec!["Bearer tok-1".to_string(), "Bearer tok-2".to_string()]);
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 2);
    let (_, dlq) = h.api.get("/v1/dlq").await;
    assert!(dlq["items"].as_array().unwrap().is_empty(), "{dlq}");
}

#[tokio::test]
async fn oauth2_password_grant_and_basic_auth_reach_the_receiver() {
    let tokens = token_server().await;
    let (receiver, seen) = bearer_receiver(tokens.valid.clone()).await;
    let h = TestHerald::start().await;
    h.api
        .subscribe(json!({
            "url": receiver,
            "auth": { "type": "oauth2", "grant": "password", "token_url": tokens.url, "client_id": "client-1",
                      "client_secret": "client-secret", "username": "alice", "password": "wonderland" }
        }))
        .await;
    let basic_rx = Receiver::start().await;
    h.api
        .subscribe(
            json!({ "url": basic_rx.url("/basic"), "auth": { "type": "basic", "username": "u", "password": "p" } }),
        )
        .await;
    h.api.post("/v1/events", json!({ "id": "pw-1", "type": "T", "data": {} })).await;
    let log = seen.clone();
    until("the password-grant delivery", Duration::from_secs(10), || async {
        (!log.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    assert_eq!(seen.lock().unwrap()[0], ("pw-1".to_string(), "Bearer tok-1".to_string()));
    let basic = basic_rx.wait_on("/basic", 1).await;
    assert_eq!(basic[0].header("authorization"), "Basic dTpw");
    // A password grant without a user is refused when the subscription is created.
    let (status, err) = h
        .api
        .post("/v1/subscriptions", json!({ "url": "https://hooks.example.com/o", "auth": { "type": "oauth2", "grant": "password", "token_url": tokens.url, "client_id": "c" } }))
        .await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("auth.username")));
}

#[tokio::test]
async fn a_static_webhook_from_the_config_file_is_delivered_with_its_key_secret_timeout_and_tls() {
    use base64::Engine;
    use hmac::Mac;
    let pki = pki();
    let rx = tls_receiver(pki.server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    let toml = format!(
        r#"
[[webhooks]]
name = "erp"
enabled = true
endpoint = "https://localhost:{port}/erp/hooks"
key = "erp-key"
connection_timeout = "PT5S"
secret = "erp-secret"
events = ["OrderCreated", "OrderAccepted"]
trust_file = "{ca}"
client_cert = "{cert}"
key_file = "{key}"
"#,
        port = rx.port,
        ca = pki.ca.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display()
    );
    std::fs::write(&file, toml).unwrap();
    let env: Vec<(String, String)> = [
        ("HERALD_ADMIN_TOKEN", crate::support::TOKEN),
        ("HERALD_NETWORK_ALLOW", "127.0.0.0/8"),
        ("HERALD_LISTEN", "127.0.0.1:0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut config = herald::config::Config::load(Some(&file), &env).unwrap();
    config.data_dir = dir.path().join("data");
    let herald = herald::server::start(config.clone()).await.unwrap();
    let api = crate::support::Api::new(herald.addr, crate::support::TOKEN);

    let (status, sub) = api.get("/v1/subscriptions/static-erp").await;
    assert_eq!(status, 200, "{sub}");
    assert_eq!((sub["timeout"].as_str(), sub["payload"].as_str()), (Some("5s"), Some("raw")));
    let data = r#"{"orderId":"42","eventType":"OrderCreated"}"#;
    let body = format!(r#"{{"type":"OrderCreated","data":{data}}}"#);
    let (_, accepted) = api.raw("POST", "/v1/events", Some(body.into()), Some(crate::support::TOKEN)).await;
    assert_eq!(accepted["deliveries"], 1);
    let (_, shipped) = api.post("/v1/events", json!({ "type": "OrderShipped", "data": {} })).await;
    assert_eq!(shipped["deliveries"], 0, "only the configured events");
    let requests = rx.requests.clone();
    let (target, signature, got) = until("the static webhook's delivery", Duration::from_secs(10), || async {
        requests.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(target, "/erp/hooks?key=erp-key");
    assert_eq!(&got[..], data.as_bytes(), "the producer's data, exactly");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"erp-secret").unwrap();
    mac.update(&got);
    assert_eq!(signature, base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    herald.stop().await;

    // Taken out of the file, the webhook is deleted at the next start; a bad one stops the start.
    let mut without = config.clone();
    without.webhooks.clear();
    let herald = herald::server::start(without).await.unwrap();
    let api = crate::support::Api::new(herald.addr, crate::support::TOKEN);
    assert_eq!(api.get("/v1/subscriptions/static-erp").await.0, 404);
    herald.stop().await;
    let mut bad = config.clone();
    bad.webhooks[0].endpoint = "ftp://nowhere".into();
    let err = herald::server::start(bad).await.err().expect("a bad webhook stops the start").to_string();
    assert!(err.contains("webhooks[0].endpoint"), "{err}");
    // Settings that would be dropped or read otherwise than written stop it too: an encoding
    // other than hex or base64 (`HEX` was signed in base64), a key without its certificate
    // (no certificate was presented, and nothing said).
    let mut bad = config.clone();
    bad.webhooks[0].signature_encoding = Some("hexadecimal".into());
    let err = herald::server::start(bad).await.err().expect("an unknown encoding stops the start").to_string();
    assert!(err.contains("webhooks[0].signature_encoding"), "{err}");
    let mut bad = config.clone();
    bad.webhooks[0].client_cert = None;
    let err =
        herald::server::start(bad).await.err().expect("a key without its certificate stops the start").to_string();
    assert!(err.contains("webhooks[0].key_file"), "{err}");
}

/// A PKCS#12 file names its own key derivation work: rounds for each key inside, up to a
/// million each. A hundred copies of one real key at 20,000 rounds (26 KiB) would keep the
/// API's thread busy for seconds, and every delivery worker that first uses the subscription
/// again; a file asking for more than a client's ever does is refused before any of it runs.
#[tokio::test]
async fn a_pkcs12_file_asking_for_too_much_key_derivation_is_refused_unopened() {
    use der::{Decode, Encode};
    let h = TestHerald::start().await;
    let key = KeyPair::generate().unwrap().serialize_der();
    let params = pkcs5::pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(20_000, &[7; 16], [9; 16]).unwrap();
    let shrouded = pkcs12::pbe_params::EncryptedPrivateKeyInfo {
        encryption_algorithm: cms::cert::x509::spki::AlgorithmIdentifierOwned {
            oid: der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.5.13"),
            parameters: Some(der::Any::from_der(&params.to_der().unwrap()).unwrap()),
        },
        encrypted_data: der::asn1::OctetString::new(params.encrypt("pw", &key).unwrap()).unwrap(),
    };
    let bag = pkcs12::SafeBag {
        bag_id: pkcs12::PKCS_12_PKCS8_KEY_BAG_OID,
        bag_value: shrouded.to_der().unwrap(),
        bag_attributes: None,
    };
    let data = der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
    let part = |bytes: Vec<u8>| cms::content_info::ContentInfo {
        content_type: data,
        content: der::Any::from_der(&der::asn1::OctetString::new(bytes).unwrap().to_der().unwrap()).unwrap(),
    };
    let safes = vec![part(vec![bag; 100].to_der().unwrap())];
    let pfx =
        pkcs12::Pfx { version: pkcs12::pfx::Version::V3, auth_safe: part(safes.to_der().unwrap()), mac_data: None };
    let p12 = base64::engine::general_purpose::STANDARD.encode(pfx.to_der().unwrap());
    let (status, err) = h
        .api
        .post(
            "/v1/subscriptions",
            json!({ "url": "https://hooks.example.com/x", "tls": { "client_p12": p12, "key_password": "pw" } }),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["field"], "tls.client_p12", "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("rounds of key derivation"), "{err}");
}

/// A subscription naming TLS files delivers through an edge agent too: the agent reads them
/// under its own `--tls-files-dir`, as the server does (it had none, so every attempt failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_agent_reads_tls_files_under_its_own_directory() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("default")).unwrap();
    std::fs::copy(&pki.ca, dir.path().join("ca.pem")).unwrap();
    std::fs::copy(&pki.client_cert, dir.path().join("default/client.pem")).unwrap();
    std::fs::copy(&pki.client_key, dir.path().join("default/client.key")).unwrap();
    let h = TestHerald::start_with(|c| c.http.tls_files_dir = Some(dir.path().to_path_buf())).await;
    let (status, device) = h.api.post("/v1/edge-devices", json!({ "name": "office", "tenant": "default" })).await;
    assert_eq!(status, 201, "{device}");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(herald::agent::run(
        herald::agent::AgentConfig {
            server: h.api.base.clone(),
            token: device["token"].as_str().unwrap().to_string(),
            window: 8,
            allow: vec!["0.0.0.0/0".parse().unwrap()],
            default_timeout: Duration::from_secs(10),
            tls_files_dir: Some(dir.path().to_path_buf()),
        },
        stopped,
    ));
    let rx = tls_receiver(pki.server.clone()).await;
    let files = json!({ "ca_file": "ca.pem", "client_cert_file": "default/client.pem", "client_key_file": "default/client.key" });
    let url = format!("https://localhost:{}/edge", rx.port);
    h.api.subscribe(json!({ "url": url, "via_edge": device["id"], "tls": files })).await;
    h.api.post("/v1/events", json!({ "id": "through-the-agent", "type": "T", "data": {} })).await;
    let paths = rx.paths.clone();
    until("the event through the agent, over mutual TLS", Duration::from_secs(20), || {
        let arrived = paths.lock().unwrap().iter().any(|p| p == "/edge");
        async move { arrived.then_some(()) }
    })
    .await;
    stop.send_replace(true);
    agent.await.unwrap().unwrap();
}

/// Checking a PKCS#12 file (its key derivation) takes a good part of a second: a tenant's
/// changes of such a subscription are checked outside the registry's write lock, one at a time
/// on a blocking thread, so another tenant's create does not wait behind them (it waited for
/// every one of them in turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_s_pkcs12_checks_do_not_hold_up_another_tenant_s_changes() {
    use base64::Engine;
    use rustls::pki_types::pem::PemObject;
    let _alone = PKCS12_HEAVY.lock().await;
    let pki = pki();
    let h = TestHerald::start().await;
    let (_, other) = crate::support::tenant_with_key(&h.api, "Globex").await;
    let key = std::fs::read(&pki.client_key).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key).unwrap();
    let cert = std::fs::read(&pki.client_cert).unwrap();
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(&cert).unwrap();
    let mut store = p12_keystore::KeyStore::new();
    let chain = p12_keystore::PrivateKeyChain::new(
        b"heavy".to_vec(),
        p12_keystore::PrivateKey::from_der(key.secret_der()).unwrap(),
        vec![p12_keystore::Certificate::from_der(&cert).unwrap()],
    );
    store.add_entry("client", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    let heavy = store.writer("pw").encryption_iterations(20_000).mac_iterations(20_000).write().unwrap();
    let p12 = base64::engine::general_purpose::STANDARD.encode(heavy);
    let tls = json!({ "client_p12": p12, "key_password": "pw" });
    let sub = h.api.subscribe(json!({ "url": "https://hooks.example.com/heavy", "tls": tls })).await;
    let path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    let started = std::time::Instant::now();
    let patches: Vec<_> = (0..6)
        .map(|i| {
            let (api, path) = (h.api.clone(), path.clone());
            tokio::spawn(async move { api.patch(&path, json!({ "rate_limit": 10 + i })).await })
        })
        .collect();
    let bystander = std::time::Instant::now();
    let (status, _) = other.post("/v1/subscriptions", json!({ "url": "https://hooks.example.com/bystander" })).await;
    let waited = bystander.elapsed();
    assert_eq!(status, 201);
    // Another tenant's own PKCS#12 subscription is checked in its turn among tenants, not
    // behind every check the first tenant queued (one queue for all let one tenant's flood
    // of creates hold every other tenant's such changes until they timed out). Twelve: in its
    // turn it waits about one of them, behind all it waited thirteen — measured against the
    // flood's own time (the changes above keep their PKCS#12 as it stood, checked no more, so
    // they are no yardstick; against them, six let a busy machine's scheduling fail it).
    let flooding = std::time::Instant::now();
    let creates: Vec<_> = (0..12)
        .map(|i| {
            let (api, tls) = (h.api.clone(), tls.clone());
            let url = format!("https://hooks.example.com/flood-{i}");
            tokio::spawn(async move { api.post("/v1/subscriptions", json!({ "url": url, "tls": tls })).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await; // lets the flood queue first: pacing, not synchronisation
    let heavy_bystander = std::time::Instant::now();
    let (status, body) = other
        .post("/v1/subscriptions", json!({ "url": "https://hooks.example.com/heavy-bystander", "tls": tls }))
        .await;
    let heavy_waited = heavy_bystander.elapsed();
    assert_eq!(status, 201, "{body}");
    for p in patches {
        let (status, body) = p.await.unwrap();
        assert_eq!(status, 200, "changes of one subscription in one process go one after another: {body}");
    }
    for c in creates {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    let flood = flooding.elapsed();
    let patching = started.elapsed();
    eprintln!(
        "PKCS#12: six changes and twelve creates took {patching:?} (the creates {flood:?}); another tenant's create meanwhile {waited:?}, its PKCS#12 one {heavy_waited:?}"
    );
    assert!(waited < patching / 3, "another tenant's create waited {waited:?} of the changes' {patching:?}");
    assert!(
        heavy_waited < flood / 3,
        "another tenant's PKCS#12 create waited {heavy_waited:?} of the flood's {flood:?}"
    );
}

/// `tls` options of a PKCS#12 file of the test client's certificate and key, named `name`, at
/// 30,000 rounds (a good part of a second to open).
/// Held by the tests whose PKCS#12 key derivation takes seconds of CPU, or that time what
/// another tenant waits beside it: run side by side on two cores, one's derivation was the
/// other's wait.
static PKCS12_HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn heavy_p12(pki: &Pki, name: &str) -> serde_json::Value {
    p12_of(pki, name, 30_000)
}

/// [`heavy_p12`] with `iterations` of key derivation.
fn p12_of(pki: &Pki, name: &str, iterations: u32) -> serde_json::Value {
    use rustls::pki_types::pem::PemObject;
    let key = std::fs::read(&pki.client_key).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key).unwrap();
    let cert = std::fs::read(&pki.client_cert).unwrap();
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(&cert).unwrap();
    let mut store = p12_keystore::KeyStore::new();
    let chain = p12_keystore::PrivateKeyChain::new(
        name.as_bytes().to_vec(),
        p12_keystore::PrivateKey::from_der(key.secret_der()).unwrap(),
        vec![p12_keystore::Certificate::from_der(&cert).unwrap()],
    );
    store.add_entry("client", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    let heavy = store.writer("pw").encryption_iterations(iterations).mac_iterations(iterations).write().unwrap();
    json!({ "client_p12": base64::engine::general_purpose::STANDARD.encode(heavy), "key_password": "pw" })
}

/// Opening a PKCS#12 file is key derivation (up to a second of CPU a file): a delivery's first
/// use of such a profile builds it on a blocking thread, one at a time — on the runtime's
/// threads, a tenant's few such subscriptions held every other tenant's publishes and
/// deliveries for as long.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_tenant_s_pkcs12_profiles_do_not_hold_up_another_tenant_s_deliveries() {
    let _alone = PKCS12_HEAVY.lock().await;
    let pki = pki();
    let h = TestHerald::start().await;
    let (acme_id, acme) = crate::support::tenant_with_key(&h.api, "Acme").await;
    let (globex_id, globex) = crate::support::tenant_with_key(&h.api, "Globex").await;
    let tls = |name: &str| heavy_p12(&pki, name);
    let started = std::time::Instant::now();
    let mut heavy_ids = Vec::new();
    for i in 0..2 {
        let sub = json!({
            "url": format!("https://localhost:1/heavy{i}"), "tls": tls(&format!("heavy{i}")), "events": ["Heavy"],
            "retry": { "policy": "fixed", "interval": "1h", "max_attempts": 2 }
        });
        heavy_ids.push(acme.subscribe(sub).await["id"].as_str().unwrap().to_string());
    }
    let check = started.elapsed() / 2; // one file's check (opening it for a profile is about as much again)
    let rx = Receiver::start().await;
    globex.subscribe(json!({ "url": rx.url("/bystander") })).await;
    // Herald runs on this test's one runtime thread. Another tenant's events go one after
    // another while the two profiles are built (about four checks' time): each is sent at once.
    let api = h.api.clone();
    let heavy =
        tokio::spawn(
            async move { api.post("/v1/events", json!({ "type": "Heavy", "tenant": acme_id, "data": {} })).await },
        );
    let building = std::time::Instant::now();
    let mut longest = Duration::ZERO;
    let mut n = 0;
    while building.elapsed() < check * 4 {
        let sent = std::time::Instant::now();
        let id = format!("bystander-{n}");
        let (status, _) =
            h.api.post("/v1/events", json!({ "id": id, "type": "T", "tenant": globex_id, "data": {} })).await;
        assert_eq!(status, 202);
        n += 1;
        rx.wait_on("/bystander", n).await;
        longest = longest.max(sent.elapsed());
    }
    assert_eq!(heavy.await.unwrap().0, 202);
    for sub in &heavy_ids {
        until("the PKCS#12 subscription's attempt (its receiver is not there)", Duration::from_secs(30), || async {
            let (_, attempts) = h.api.get(&format!("/v1/attempts?subscription={sub}")).await;
            (attempts["items"][0]["outcome"] == "connect_error").then_some(())
        })
        .await;
    }
    eprintln!(
        "PKCS#12 profiles: one file's check {check:?}; another tenant's {n} events each delivered within {longest:?}"
    );
    assert!(longest < check / 4, "another tenant's event waited {longest:?}; one PKCS#12 check takes {check:?}");
}

/// An attempt whose timeout ran out while its TLS profile was still being built was never
/// sent: it reads `timeout` in the history, but `herald_attempts_total` counts it apart
/// (`tls_unready`), out of the error ratio as Herald's other own waits are — it was counted a
/// receiver's `timeout`, and one tenant's slow builds paged for every other's endpoints.
#[tokio::test]
async fn an_attempt_whose_tls_profile_was_not_ready_is_not_counted_a_receiver_s_timeout() {
    let _alone = PKCS12_HEAVY.lock().await;
    let pki = pki();
    // A process of its own: the metrics recorder is per process, and other tests count
    // timeouts.
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr) = crate::support::spawn_herald(dir.path());
    let api = crate::support::Api::new(addr, crate::support::TOKEN);
    let started = std::time::Instant::now();
    let sub = api
        .subscribe(json!({ "url": "https://localhost:1/slow-profile", "tls": p12_of(&pki, "slow", 150_000),
                           "timeout": "100ms", "retry": { "policy": "fixed", "interval": "1h", "max_attempts": 2 } }))
        .await;
    let check = started.elapsed();
    assert!(check > Duration::from_millis(200), "the file's check took {check:?}: not slower than the timeout");
    let (status, _) = api.post("/v1/events", json!({ "id": "unready", "type": "T", "data": {} })).await;
    assert_eq!(status, 202);
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let attempt = until("the attempt", Duration::from_secs(60), || async {
        let (_, attempts) = api.get(&format!("/v1/attempts?subscription={sub_id}")).await;
        attempts["items"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    assert_eq!(attempt["outcome"], "timeout", "{attempt}");
    assert!(attempt["error"].as_str().unwrap_or_default().contains("before it was sent"), "{attempt}");
    let m = crate::support::metrics::scrape(&api).await;
    let counted = |outcome| m.value("herald_attempts_total", &[("transport", "webhook"), ("outcome", outcome)]);
    assert_eq!((counted("tls_unready"), counted("timeout")), (1.0, 0.0));
}

/// A delivery's first use of a PKCS#12 profile builds it, one build at a time — queued per
/// tenant first, so another tenant's build waits for one of the first tenant's, not for every
/// one its subscriptions asked for at once (with one queue for all, the bystander's attempt
/// waited for all six, and a short timeout failed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_s_pkcs12_builds_do_not_queue_another_tenant_s_behind_all_of_them() {
    let _alone = PKCS12_HEAVY.lock().await;
    let pki = pki();
    let h = TestHerald::start().await;
    let (acme_id, acme) = crate::support::tenant_with_key(&h.api, "Acme").await;
    let (globex_id, globex) = crate::support::tenant_with_key(&h.api, "Globex").await;
    let tls = |name: &str| heavy_p12(&pki, name);
    let retry = json!({ "policy": "fixed", "interval": "1h", "max_attempts": 2 });
    for i in 0..6 {
        let sub = json!({ "url": format!("https://localhost:1/heavy{i}"), "tls": tls(&format!("heavy{i}")),
                          "events": ["Heavy"], "retry": retry });
        acme.subscribe(sub).await;
    }
    let started = std::time::Instant::now();
    let bystander = globex
        .subscribe(json!({ "url": "https://localhost:1/globex", "tls": tls("globex"), "events": ["G"],
                           "timeout": "60s", "retry": retry }))
        .await;
    let check = started.elapsed(); // one file's check (opening it for a profile is about as much again)
    let (status, _) = h.api.post("/v1/events", json!({ "type": "Heavy", "tenant": acme_id, "data": {} })).await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(50)).await; // lets Acme's builds queue first: pacing, not synchronisation
    let (status, _) =
        h.api.post("/v1/events", json!({ "id": "g", "type": "G", "tenant": globex_id, "data": {} })).await;
    assert_eq!(status, 202);
    let sub = bystander["id"].as_str().unwrap().to_string();
    let attempt = until("the other tenant's attempt", Duration::from_secs(60), || async {
        let (_, attempts) = h.api.get(&format!("/v1/attempts?subscription={sub}")).await;
        attempts["items"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    let took = Duration::from_millis(attempt["duration_ms"].as_u64().unwrap());
    eprintln!("PKCS#12 builds: one file's check {check:?}; another tenant's attempt beside six builds {took:?}");
    // Two derivations (one of Acme's, then its own) with the fix; seven behind one queue.
    assert!(took < check * 3, "another tenant's attempt took {took:?}; one PKCS#12 check takes {check:?}");
}

/// Client certificates and keys under the operator's TLS directory belong to a tenant: each
/// tenant names only files in its own folder (`<dir>/<tenant>/`), so no tenant can present
/// another's identity to a receiver that trusts it. CA files, public, may lie anywhere in it.
#[tokio::test]
async fn a_tenant_names_only_its_own_client_certificate_files() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let h = TestHerald::start_with(|c| c.http.tls_files_dir = Some(dir.path().to_path_buf())).await;
    let mut keys = Vec::new();
    for name in ["Acme", "Mallory"] {
        let (_, tenant) = h.api.post("/v1/tenants", json!({ "name": name })).await;
        let id = tenant["id"].as_str().unwrap().to_string();
        let (_, key) = h.api.post(&format!("/v1/tenants/{id}/keys"), json!({})).await;
        keys.push((id, crate::support::Api::new(h.herald.addr, key["key"].as_str().unwrap())));
    }
    let ((acme_id, acme), (mallory_id, mallory)) = (keys[0].clone(), keys[1].clone());
    std::fs::create_dir_all(dir.path().join(&acme_id)).unwrap();
    std::fs::create_dir_all(dir.path().join(&mallory_id)).unwrap();
    std::fs::copy(&pki.client_cert, dir.path().join(&acme_id).join("client.pem")).unwrap();
    std::fs::copy(&pki.client_key, dir.path().join(&acme_id).join("client.key")).unwrap();
    std::fs::copy(&pki.ca, dir.path().join("ca.pem")).unwrap();
    let files = |prefix: &str| json!({ "ca_file": "ca.pem", "client_cert_file": format!("{prefix}client.pem"), "client_key_file": format!("{prefix}client.key") });
    let url = |n: &str| format!("https://hooks.example.com/{n}");
    let (status, err) =
        acme.post("/v1/subscriptions", json!({ "url": url("acme"), "tls": files(&format!("{acme_id}/")) })).await;
    assert_eq!(status, 201, "{err}");
    for prefix in [format!("{acme_id}/"), format!("{mallory_id}/../{acme_id}/"), String::new()] {
        let (status, err) =
            mallory.post("/v1/subscriptions", json!({ "url": url("borrowed"), "tls": files(&prefix) })).await;
        assert_eq!(status, 400, "{prefix}: {err}");
        assert_eq!(err["error"]["field"], "tls.client_cert_file", "{prefix}: {err}");
    }
    // Another tenant's files are never opened: a file there and one that is not get the same
    // answer (else the answers told which exist — and, for PKCS#12, whether a password was
    // right), and no answer names the operator's directory.
    let mut answers = Vec::new();
    for name in ["client.pem", "missing.pem"] {
        let tls = json!({ "client_cert_file": format!("{acme_id}/{name}"), "client_key_file": format!("{acme_id}/client.key") });
        let (status, err) = mallory.post("/v1/subscriptions", json!({ "url": url("probe"), "tls": tls })).await;
        assert_eq!(status, 400, "{err}");
        assert!(!err.to_string().contains(&*dir.path().to_string_lossy()), "no server path: {err}");
        answers.push((err["error"]["field"].clone(), err["error"]["message"].clone()));
    }
    assert_eq!(answers[0], answers[1], "the same answer whether the file is there or not");
    // A CA file may lie anywhere in the directory, but not in another tenant's folder (its
    // answers listed that folder's files: one there, one not, one holding no certificate).
    let mut answers = Vec::new();
    for name in ["client.pem", "client.key", "missing.pem"] {
        let tls = json!({ "ca_file": format!("{acme_id}/{name}") });
        let (status, err) = mallory.post("/v1/subscriptions", json!({ "url": url("ca-probe"), "tls": tls })).await;
        assert_eq!(status, 400, "{name}: {err}");
        answers.push((err["error"]["field"].clone(), err["error"]["message"].clone()));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "one answer for all: {answers:?}");
    // So is the folder of a tenant the admin named (its id any name, not `ten_…`), while a
    // folder no tenant is named for is shared.
    std::fs::create_dir_all(dir.path().join("globex")).unwrap();
    std::fs::copy(&pki.client_cert, dir.path().join("globex/client.pem")).unwrap();
    std::fs::create_dir_all(dir.path().join("shared")).unwrap();
    std::fs::copy(&pki.ca, dir.path().join("shared/ca.pem")).unwrap();
    h.api.subscribe(json!({ "url": url("globex"), "tenant": "globex" })).await;
    let mut answers = Vec::new();
    for name in ["globex/client.pem", "globex/missing.pem", "shared/../globex/client.pem", "shared/../globex/nope.pem"]
    {
        let tls = json!({ "ca_file": name });
        let (status, err) = mallory.post("/v1/subscriptions", json!({ "url": url("globex-probe"), "tls": tls })).await;
        assert_eq!(status, 400, "{name}: {err}");
        answers.push((err["error"]["field"].clone(), err["error"]["message"].clone()));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "one answer for all: {answers:?}");
    let shared = json!({ "url": url("shared"), "tls": { "ca_file": "shared/ca.pem" } });
    let (status, err) = mallory.post("/v1/subscriptions", shared).await;
    assert_eq!(status, 201, "a folder no tenant is named for is shared: {err}");
    let (status, err) = acme
        .post(
            "/v1/subscriptions",
            json!({ "url": url("own-ca"), "tls": { "ca_file": format!("{acme_id}/client.pem") } }),
        )
        .await;
    assert_eq!(status, 201, "a tenant's own folder is its own: {err}");
    let (status, err) =
        mallory.post("/v1/subscriptions", json!({ "url": url("own"), "tls": { "ca_file": "nowhere.pem" } })).await;
    assert_eq!(status, 400, "{err}");
    assert!(!err.to_string().contains(&*dir.path().to_string_lossy()), "no server path: {err}");
    // The operator's own request for Mallory is held to Mallory's folder too.
    let (status, err) = h
        .api
        .post(
            "/v1/subscriptions",
            json!({ "url": url("admin"), "tenant": mallory_id, "tls": files(&format!("{acme_id}/")) }),
        )
        .await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("tls.client_cert_file")), "{err}");
}

fn client_credentials(token_url: &str) -> serde_json::Value {
    json!({ "type": "oauth2", "grant": "client_credentials", "token_url": token_url, "client_id": "client-1", "client_secret": "client-secret" })
}

/// A token endpoint slower than the subscription's timeout: the attempts waiting for it fail,
/// but the one fetch goes on and its token serves the next attempt — not a fresh fetch per
/// attempt, each dropped at its timeout, and never a token.
#[tokio::test]
async fn a_token_endpoint_slower_than_the_timeout_still_yields_one_token() {
    let tokens = token_server().await;
    tokens.delay.store(600, Ordering::SeqCst);
    let (receiver, seen) = bearer_receiver(tokens.valid.clone()).await;
    let h = TestHerald::start().await;
    h.api
        .subscribe(json!({
            "url": receiver, "timeout": "300ms", "auth": client_credentials(&tokens.url),
            "retry": { "policy": "fixed", "interval": "100ms", "max_attempts": 20 }
        }))
        .await;
    h.api.post("/v1/events", json!({ "id": "slow-token", "type": "T", "data": {} })).await;
    until("delivered with a token", Duration::from_secs(15), || async {
        seen.lock().unwrap().iter().any(|(id, auth)| id == "slow-token" && auth == "Bearer tok-1").then_some(())
    })
    .await;
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 1, "one fetch");
}

/// An OAuth attempt is within the subscription's timeout, its token fetch included: 400 ms for
/// the token and 400 ms for the receiver do not fit in 500 ms.
#[tokio::test]
async fn an_oauth_attempt_is_within_its_timeout_token_included() {
    let tokens = token_server().await;
    tokens.delay.store(400, Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = format!("http://{}/slow", listener.local_addr().unwrap());
    serve_http1(listener, |_req: Request<hyper::body::Incoming>| async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        Response::new(Full::new(Bytes::new()))
    });
    let h = TestHerald::start().await;
    h.api
        .subscribe(json!({
            "url": receiver, "timeout": "500ms", "auth": client_credentials(&tokens.url),
            "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 1 }
        }))
        .await;
    h.api.post("/v1/events", json!({ "id": "late", "type": "T", "data": {} })).await;
    let dead = until("dead-lettered", Duration::from_secs(15), || async {
        let (_, page) = h.api.get("/v1/dlq").await;
        page["items"].as_array().and_then(|items| items.first().cloned())
    })
    .await;
    assert_eq!(dead["last_error"], "timed out after 500ms", "{dead}");
}

/// Every process keeps every subscription in memory, so what one may carry is bounded: AMQP
/// keeps no TLS or auth settings it could not use, inline PEM is what a chain needs, and a
/// whole subscription is at most a few hundred KiB (a tenant's quota of them then bounds
/// what it can hold in every process).
#[tokio::test]
async fn a_subscription_carries_a_bounded_amount_of_tenant_material() {
    let pki = pki();
    let ca = std::fs::read_to_string(&pki.ca).unwrap();
    let h = TestHerald::start().await;
    let (_, mallory) = crate::support::tenant_with_key(&h.api, "Mallory").await;
    let amqp = json!({ "uri": "amqp://broker.example.com/%2f", "exchange": "x" });
    let padded = |bytes: usize| format!("{ca}{}", "A".repeat(bytes));
    let url = "https://hooks.example.com/m";
    let headers: serde_json::Map<String, serde_json::Value> =
        (0..32).map(|i| (format!("X-H{i}"), json!("v".repeat(4096)))).collect();
    let events: Vec<String> = (0..1000).map(|i| format!("{}.{i}", "e".repeat(200))).collect();
    for (body, field) in [
        (json!({ "transport": "amqp", "amqp": amqp, "tls": { "ca_pem": padded(3_900_000) } }), "tls"),
        (
            json!({ "transport": "amqp", "amqp": amqp, "auth": { "type": "basic", "username": "u", "password": "p" } }),
            "auth",
        ),
        (json!({ "url": url, "tls": { "ca_pem": padded(1_000_000) } }), "tls.ca_pem"),
        (json!({ "url": url, "headers": headers, "events": events }), "events"),
    ] {
        let (status, err) = mallory.post("/v1/subscriptions", body).await;
        let shown = err.to_string().chars().take(300).collect::<String>();
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{shown}");
    }
    // What a receiver's chain needs is still taken.
    let (status, err) =
        mallory.post("/v1/subscriptions", json!({ "url": url, "tls": { "ca_pem": padded(10_000) } })).await;
    assert_eq!(status, 201, "{err}");
}

/// A failure's text is bounded wherever it comes from: a receiver trusted through its own CA
/// presented a certificate naming thousands of other hosts, and the refusal (which lists them)
/// went whole into every attempt's record and dead letter — tens of kilobytes a time in the
/// shared history.
#[tokio::test]
async fn a_receiver_cannot_make_an_attempt_s_error_text_large() {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "A tenant's CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = (0..2000).map(|i| format!("host-{i}.not-this-one.example")).collect();
    let cert = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let rx = tls_receiver(Arc::new(server)).await;
    let h = TestHerald::start().await;
    let once = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    let url = format!("https://localhost:{}/x", rx.port);
    h.api.subscribe(json!({ "url": url, "tls": { "ca_pem": ca.pem() }, "retry": once })).await;
    h.api.post("/v1/events", json!({ "id": "named-many", "type": "T", "data": {} })).await;
    let api = h.api.clone();
    let dead = until("the refused delivery dead-lettered", Duration::from_secs(15), || async {
        let (_, page) = api.get("/v1/dlq").await;
        page["items"].as_array().unwrap().first().cloned()
    })
    .await;
    let error = dead["last_error"].as_str().unwrap();
    assert!(error.contains("not valid for name") || error.contains("NotValidForName"), "{error}");
    // 1 KiB, the ellipsis that says it was cut and the failure's kind before it.
    let most = 1024 + 64;
    assert!(error.len() <= most, "the dead letter's error is {} bytes", error.len());
    let recorded = until("the attempt on record", Duration::from_secs(15), || async {
        let (_, attempts) = api.get("/v1/attempts?event=named-many").await;
        attempts["items"][0]["error"].as_str().map(str::to_string)
    })
    .await;
    assert!(recorded.len() <= most, "the attempt's error is {} bytes", recorded.len());
}

/// Many requests refused with one revoked token each fetch a token at most once between them:
/// a 401 for the old token arriving after the new one was cached threw the new one away, so
/// with an identity provider that keeps one token of a client valid, each fetch revoked the
/// token the requests before were sent again with, and deliveries failed on 401 after all.
#[tokio::test]
async fn late_refusals_of_a_revoked_token_do_not_throw_away_the_new_one() {
    let tokens = token_server().await;
    let (issued, revoked_up_to) = (tokens.issued.clone(), Arc::new(AtomicUsize::new(0)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = format!("http://{}/api", listener.local_addr().unwrap());
    let delivered: Arc<Mutex<HashSet<String>>> = Default::default();
    let (ok_ids, revoked, seq) = (delivered.clone(), revoked_up_to.clone(), Arc::new(AtomicUsize::new(0)));
    serve_http1(listener, move |req: Request<hyper::body::Incoming>| {
        let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let (auth, id) = (header("authorization"), header("webhook-id"));
        let n: usize = auth.strip_prefix("Bearer tok-").and_then(|n| n.parse().ok()).unwrap_or(0);
        // Only the newest token is valid (each fetch revokes the one before), and none revoked.
        let ok = n == issued.load(Ordering::SeqCst) && n > revoked.load(Ordering::SeqCst);
        // Answers spread over half a second: refusals arrive after the new token is in.
        let wait = Duration::from_millis(60 * (seq.fetch_add(1, Ordering::SeqCst) % 10) as u64);
        let ok_ids = ok_ids.clone();
        async move {
            tokio::time::sleep(wait).await;
            if ok {
                ok_ids.lock().unwrap().insert(id);
            }
            Response::builder().status(if ok { 200 } else { 401 }).body(Full::new(Bytes::new())).unwrap()
        }
    });
    let h = TestHerald::start().await;
    oauth_subscription(&h.api, &receiver, &tokens.url).await;
    h.api.post("/v1/events", json!({ "id": "first", "type": "T", "data": {} })).await;
    let seen = delivered.clone();
    until("the first delivery", Duration::from_secs(10), || async {
        seen.lock().unwrap().contains("first").then_some(())
    })
    .await;
    revoked_up_to.store(1, Ordering::SeqCst);
    let batch: Vec<_> = (0..10).map(|i| json!({ "id": format!("after-{i}"), "type": "T", "data": i })).collect();
    assert_eq!(h.api.post("/v1/events/batch", json!(batch)).await.0, 202);
    let (seen, api) = (delivered.clone(), h.api.clone());
    until("every delivery settled", Duration::from_secs(20), || async {
        let (_, dlq) = api.get("/v1/dlq").await;
        let dead = dlq["items"].as_array().map_or(0, Vec::len);
        (seen.lock().unwrap().len() + dead >= 11).then_some(())
    })
    .await;
    let (_, dlq) = h.api.get("/v1/dlq").await;
    assert!(dlq["items"].as_array().unwrap().is_empty(), "refused with a token fetched for them: {dlq}");
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 2, "one token fetched after the revocation");
}
