//! The loopback webhook receiver: records every request and answers as each path is told to
//! (a status, failing the first attempts, hanging, Retry-After).

use super::eventually;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }
}

/// How the receiver answers on a path.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Always this status.
    Status(u16),
    /// The first `n` requests of each event id get `status`, later ones 200.
    FailFirst { n: usize, status: u16 },
    /// Never answer.
    Hang,
    /// 200, after this long (an endpoint that keeps up only slowly).
    Slow(Duration),
    /// `status` with `Retry-After: secs`, for the first request of each event id.
    RetryAfter { status: u16, secs: u64 },
}

/// Serves HTTP/1 on `listener` with `handler`, a task per connection, for the test's life.
pub fn serve_http1<F, Fut>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

/// A loopback webhook receiver.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    behaviours: Arc<Mutex<HashMap<String, Behaviour>>>,
    pub arrived: Arc<Notify>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_on("127.0.0.1").await
    }

    /// A receiver on another loopback address (`127.0.0.2`), so a test can let Herald reach
    /// it alone while the rest of loopback stays closed.
    pub async fn start_on(ip: &str) -> Receiver {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Receiver {
            addr,
            seen: Default::default(),
            status: Arc::new(AtomicU16::new(200)),
            behaviours: Default::default(),
            arrived: Arc::new(Notify::new()),
        };
        let state = r.clone();
        serve_http1(listener, move |req| state.clone().answer(req));
        r
    }

    /// Records a request and answers it as the path's behaviour says.
    async fn answer(self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let state = self;
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let path = parts.uri.path().to_string();
        let id = parts.headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let behaviour = state.behaviours.lock().unwrap().get(&path).copied();
        let earlier = {
            let mut seen = state.seen.lock().unwrap();
            let earlier = seen.iter().filter(|r| r.path == path && r.header("webhook-id") == id).count();
            seen.push(Received {
                path,
                query: parts.uri.query().map(str::to_string),
                headers: parts.headers,
                body,
                at: Instant::now(),
            });
            earlier
        };
        state.arrived.notify_waiters();
        let mut response = Response::builder();
        let status = match behaviour {
            None => state.status.load(Ordering::SeqCst),
            Some(Behaviour::Status(s)) => s,
            Some(Behaviour::FailFirst { n, status }) => {
                if earlier < n {
                    status
                } else {
                    200
                }
            }
            Some(Behaviour::Hang) => std::future::pending().await,
            Some(Behaviour::Slow(after)) => {
                tokio::time::sleep(after).await; // the endpoint's own pace
                200
            }
            Some(Behaviour::RetryAfter { status, secs }) => {
                if earlier == 0 {
                    response = response.header("retry-after", secs.to_string());
                    status
                } else {
                    200
                }
            }
        };
        response.status(status).body(Full::new(Bytes::from_static(b"ok"))).unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn respond_on(&self, path: &str, status: u16) {
        self.behave(path, Behaviour::Status(status));
    }

    pub fn behave(&self, path: &str, behaviour: Behaviour) {
        self.behaviours.lock().unwrap().insert(path.to_string(), behaviour);
    }

    pub fn all(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    pub fn on(&self, path: &str) -> Vec<Received> {
        self.all().into_iter().filter(|r| r.path == path).collect()
    }

    /// Waits until `n` requests have reached `path`.
    pub async fn wait_on(&self, path: &str, n: usize) -> Vec<Received> {
        eventually(&format!("{n} requests on {path}"), Duration::from_secs(20), || {
            let got = self.on(path);
            (got.len() >= n).then_some(got)
        })
        .await
    }
}
