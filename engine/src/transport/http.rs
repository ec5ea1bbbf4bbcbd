//! The webhook transport: a pooled hyper client over rustls whose resolver is the network
//! guard, so every connection goes to an address that was checked. Redirects are not
//! followed; any 2xx is success.

use super::guard::NetworkGuard;
use super::Outcome;
use crate::payload::Body;
use http::{HeaderMap, Request, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
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

/// The pooled HTTP(S) client.
#[derive(Clone)]
pub struct HttpTransport {
    client: Client<Connector, Body>,
    guard: NetworkGuard,
}

fn tls_config() -> rustls::ClientConfig {
    use hyper_rustls::ConfigBuilderExt;
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_webpki_roots()
        .with_no_client_auth()
}

impl HttpTransport {
    /// A client whose connections pass `guard`.
    pub fn new(guard: NetworkGuard, settings: &HttpSettings) -> Self {
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { guard: guard.clone() });
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        HttpTransport { client, guard }
    }

    /// Sends one request and reports what happened. Never panics, never hangs past `timeout`.
    pub async fn send(&self, req: WebhookRequest) -> Outcome {
        let started = Instant::now();
        // IP-literal hosts skip the resolver, so they are checked here.
        if let Some(ip) =
            req.uri.host().and_then(|h| h.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok())
        {
            if let Err(refused) = self.guard.check(ip) {
                return Outcome::failed(None, refused.to_string(), started.elapsed());
            }
        }
        let mut request = Request::post(req.uri).body(req.body).expect("method, uri and body are valid");
        *request.headers_mut() = req.headers;
        let exchange = async {
            let response = self.client.request(request).await?;
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
