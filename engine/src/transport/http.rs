//! The webhook transport: a pooled hyper client over rustls whose resolver is the network
//! guard, so every connection goes to an address that was checked. Redirects are not
//! followed; any 2xx is success.

use super::guard::NetworkGuard;
use super::tls::{client_config, ProfileKey, TlsError};
use super::Outcome;
use crate::model::TlsOptions;
use crate::payload::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How much of a response body is read (to keep the connection reusable) before giving up.
const RESPONSE_READ_LIMIT: usize = 64 * 1024;

/// A DNS resolver that returns only addresses the guard allows.
#[derive(Clone)]
pub struct GuardedResolver {
    guard: NetworkGuard,
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = self.guard.clone();
        Box::pin(async move { guard.resolve(name.as_str(), 0).await.map(|v| v.into_iter()) })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>;

/// Client settings shared by every request.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host.
    pub pool_max_idle_per_host: usize,
}

/// One webhook request, ready to send.
pub struct WebhookRequest {
    /// Target, `key` query parameter included.
    pub uri: Uri,
    /// Every header, signature included.
    pub headers: HeaderMap,
    /// The body whose bytes were signed.
    pub body: Body,
    /// Whole-request deadline.
    pub timeout: Duration,
}

type Pool = Client<Connector, Body>;

/// Pooled HTTP(S) clients: one for the default TLS profile, one per custom profile.
#[derive(Clone)]
pub struct HttpTransport {
    default: Pool,
    profiles: Arc<Mutex<HashMap<ProfileKey, Pool>>>,
    guard: NetworkGuard,
    settings: HttpSettings,
}

fn pool(guard: &NetworkGuard, settings: &HttpSettings, tls: rustls::ClientConfig) -> Pool {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver { guard: guard.clone() });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

impl HttpTransport {
    /// Clients whose connections pass `guard`.
    pub fn new(guard: NetworkGuard, settings: &HttpSettings) -> Self {
        let default = pool(&guard, settings, client_config(None).expect("the default TLS profile builds"));
        HttpTransport { default, profiles: Default::default(), guard, settings: settings.clone() }
    }

    /// The pool for a TLS profile, built on first use.
    fn pool_for(&self, tls: Option<&TlsOptions>) -> Result<Pool, TlsError> {
        let Some(opts) = tls else { return Ok(self.default.clone()) };
        let key = ProfileKey::of(opts);
        if let Some(p) = self.profiles.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let built = pool(&self.guard, &self.settings, client_config(Some(opts))?);
        Ok(self.profiles.lock().unwrap().entry(key).or_insert(built).clone())
    }

    /// Refuses IP-literal hosts outside the guard (names are checked by the resolver).
    fn check_literal(&self, uri: &Uri) -> Result<(), String> {
        self.guard.check_host(uri.host().unwrap_or_default()).map_err(|e| e.to_string())
    }

    /// A POST whose whole (small) response body is wanted, e.g. an OAuth token request.
    pub async fn exchange(
        &self,
        uri: Uri,
        headers: HeaderMap,
        body: Body,
        timeout: Duration,
        tls: Option<&TlsOptions>,
    ) -> Result<(u16, Bytes), String> {
        self.check_literal(&uri)?;
        let client = self.pool_for(tls).map_err(|e| e.to_string())?;
        let mut request = Request::post(uri).body(body).expect("method, uri and body are valid");
        *request.headers_mut() = headers;
        let call = async {
            let response = client.request(request).await.map_err(|e| describe(&e))?;
            let status = response.status().as_u16();
            let body = http_body_util::Limited::new(response.into_body(), 1 << 20)
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| format!("timed out after {}", humantime::format_duration(timeout)))?
    }

    /// Sends one request and reports what happened. Never panics, never hangs past `timeout`.
    pub async fn send(&self, req: WebhookRequest, tls: Option<&TlsOptions>) -> Outcome {
        let started = Instant::now();
        if let Err(refused) = self.check_literal(&req.uri) {
            return Outcome::failed(None, refused, started.elapsed());
        }
        let client = match self.pool_for(tls) {
            Ok(c) => c,
            Err(e) => return Outcome::failed(None, e.to_string(), started.elapsed()),
        };
        let mut request = Request::post(req.uri).body(req.body).expect("method, uri and body are valid");
        *request.headers_mut() = req.headers;
        let exchange = async {
            let response = client.request(request).await?;
            let status = response.status();
            let retry_after = response.headers().get(http::header::RETRY_AFTER).cloned();
            // Read a little of the body so the connection can be reused; ignore the rest.
            let mut body = response.into_body();
            let mut read = 0usize;
            while read < RESPONSE_READ_LIMIT {
                match body.frame().await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                    _ => break,
                }
            }
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after))
        };
        match tokio::time::timeout(req.timeout, exchange).await {
            Ok(Ok((status, retry_after))) => Outcome::from_status(status, retry_after.as_ref(), started.elapsed()),
            Ok(Err(e)) => Outcome::failed(None, describe(&e), started.elapsed()),
            Err(_) => Outcome::failed(
                None,
                format!("timed out after {}", humantime::format_duration(req.timeout)),
                started.elapsed(),
            ),
        }
    }
}

/// The most specific message of a client error chain (e.g. "connection refused").
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}
