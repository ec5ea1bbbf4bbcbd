//! The server's side of edge delivery: connected agents, and edge delivery as a transport.
//! A delivery is sent down its device's WebSocket and settled only when the agent reports
//! the outcome. An agent that is offline, has no room in its window, or does not answer in
//! time is a failed attempt, which the subscription's retry policy handles like any other.

use super::devices::{Devices, EdgeDevice, Presence};
use super::protocol::{encode_delivery, Forward, Report, ToAgent, ToServer, FORWARD_PATH, MAX_WINDOW};
use crate::metrics as m;
use crate::model::Delivery;
use crate::registry::Target;
use crate::transport::Outcome;
use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Extra time an agent gets beyond the subscription's timeout, for the hop to it and back.
const GRACE: Duration = Duration::from_secs(5);
/// How often the server pings an agent, and how long silence may last before it is dropped.
const PING_EVERY: Duration = Duration::from_secs(15);
const SILENCE: Duration = Duration::from_secs(45);

struct Link {
    conn: u64,
    tx: mpsc::UnboundedSender<Message>,
    window: Arc<Semaphore>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Report>>>,
    seq: AtomicU64,
}

/// Every agent connected to this process, by device id; and the way to the other processes'
/// agents.
pub struct EdgeHub {
    links: Mutex<HashMap<String, Arc<Link>>>,
    conns: AtomicU64,
    devices: Arc<Devices>,
    /// This process's URL for the others, once it listens.
    advertised: std::sync::OnceLock<String>,
    /// Unique per process, so presence records of two processes never compare equal.
    process: String,
    admin_token: String,
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl EdgeHub {
    /// An empty hub. `admin_token` authenticates forwards between processes (which share it).
    pub fn new(devices: Arc<Devices>, admin_token: String) -> Arc<EdgeHub> {
        metrics::gauge!(m::EDGE_AGENTS).set(0.0);
        Arc::new(EdgeHub {
            links: Mutex::default(),
            conns: AtomicU64::new(0),
            devices,
            advertised: std::sync::OnceLock::new(),
            process: uuid::Uuid::new_v4().simple().to_string(),
            admin_token,
            client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
        })
    }

    /// Sets the URL other processes reach this one at (once).
    pub fn advertise(&self, url: String) {
        let _ = self.advertised.set(url);
    }

    /// Agents connected now.
    pub fn connected(&self) -> usize {
        self.links.lock().unwrap().len()
    }

    /// Makes one attempt through `device`'s agent: here when it is connected here, else
    /// through the process it is connected to.
    pub async fn deliver(
        &self,
        device: &str,
        target: &Target,
        delivery: &Delivery,
        pending_retries: u32,
        timeout: Duration,
    ) -> Outcome {
        if self.links.lock().unwrap().contains_key(device) {
            return self.deliver_here(device, target, delivery, pending_retries, timeout).await;
        }
        match self.devices.located(device) {
            Some(p) if self.advertised.get() != Some(&p.url) => {
                self.forward(&p.url, device, target, delivery, pending_retries, timeout).await
            }
            _ => Outcome::failed(None, format!("edge device {device} is not connected"), Duration::ZERO),
        }
    }

    /// Asks the process at `url`, which holds `device`'s agent, to make the attempt.
    async fn forward(
        &self,
        url: &str,
        device: &str,
        target: &Target,
        delivery: &Delivery,
        pending_retries: u32,
        timeout: Duration,
    ) -> Outcome {
        let started = Instant::now();
        let body = Forward {
            device: device.to_string(),
            subscription: target.sub.id.clone(),
            delivery: encode_delivery(delivery),
            pending_retries,
            timeout_ms: timeout.as_millis() as u64,
        };
        let request = http::Request::post(format!("{}{FORWARD_PATH}", url.trim_end_matches('/')))
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.admin_token))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&body).expect("serializes"))));
        let Ok(request) = request else {
            return Outcome::failed(None, format!("bad forward URL {url}"), started.elapsed());
        };
        let answer = tokio::time::timeout(timeout + GRACE * 2, async {
            let response = self.client.request(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
            if !status.is_success() {
                return Err(format!("answered {status}"));
            }
            serde_json::from_slice::<Report>(&bytes).map_err(|e| e.to_string())
        })
        .await;
        match answer {
            Ok(Ok(report)) => report.outcome(),
            Ok(Err(e)) => Outcome::failed(
                None,
                format!("forwarding to the process holding edge device {device} ({url}): {e}"),
                started.elapsed(),
            ),
            Err(_) => Outcome::failed(None, format!("forwarding to {url} timed out"), started.elapsed()),
        }
    }

    /// Makes one attempt through `device`'s agent connected here, waiting at most `timeout`
    /// plus a grace period for its report.
    pub async fn deliver_here(
        &self,
        device: &str,
        target: &Target,
        delivery: &Delivery,
        pending_retries: u32,
        timeout: Duration,
    ) -> Outcome {
        let started = Instant::now();
        let Some(link) = self.links.lock().unwrap().get(device).cloned() else {
            return Outcome::failed(None, format!("edge device {device} is not connected"), started.elapsed());
        };
        // Flow control: never more than the agent's window unanswered.
        let permit = match tokio::time::timeout(timeout, link.window.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                return Outcome::failed(
                    None,
                    format!("edge device {device} had no room in its window"),
                    started.elapsed(),
                )
            }
        };
        let seq = link.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        link.pending.lock().unwrap().insert(seq, tx);
        let msg = ToAgent::Deliver {
            seq,
            subscription: Box::new(target.sub.clone()),
            delivery: encode_delivery(delivery),
            pending_retries,
        };
        let in_flight = metrics::gauge!(m::EDGE_IN_FLIGHT, "device" => device.to_string());
        in_flight.increment(1.0);
        let sent = link.tx.send(Message::Text(serde_json::to_string(&msg).expect("serializes").into())).is_ok();
        let answer = if sent { tokio::time::timeout(timeout + GRACE, rx).await.ok() } else { None };
        link.pending.lock().unwrap().remove(&seq);
        in_flight.decrement(1.0);
        drop(permit);
        match answer {
            Some(Ok(report)) => {
                let rtt = started.elapsed().saturating_sub(Duration::from_millis(report.latency_ms));
                metrics::histogram!(m::EDGE_RTT_SECONDS).record(rtt.as_secs_f64());
                report.outcome()
            }
            Some(Err(_)) => {
                Outcome::failed(None, format!("edge device {device} disconnected before answering"), started.elapsed())
            }
            None if !sent => Outcome::failed(None, format!("edge device {device} disconnected"), started.elapsed()),
            None => Outcome::failed(
                None,
                format!("edge device {device} did not answer within {timeout:?}"),
                started.elapsed(),
            ),
        }
    }

    /// Serves one agent's connection until it closes. The agent speaks first (`hello`); a
    /// newer connection of the same device replaces an older one.
    pub async fn serve(self: Arc<Self>, device: EdgeDevice, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let window = match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ToServer>(&t) {
                Ok(ToServer::Hello { window }) => window.clamp(1, MAX_WINDOW),
                _ => return,
            },
            _ => return,
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let link = Arc::new(Link {
            conn: self.conns.fetch_add(1, Ordering::Relaxed),
            tx,
            window: Arc::new(Semaphore::new(window as usize)),
            pending: Mutex::default(),
            seq: AtomicU64::new(0),
        });
        if let Some(old) = self.links.lock().unwrap().insert(device.id.clone(), link.clone()) {
            old.pending.lock().unwrap().clear();
        }
        metrics::gauge!(m::EDGE_AGENTS).set(self.connected() as f64);
        tracing::info!(device = %device.id, tenant = %device.tenant, window, "edge agent connected");
        // Tell the other processes where this agent is, so they can forward to it.
        let presence = self
            .advertised
            .get()
            .map(|url| Presence { url: url.clone(), connection: format!("{}-{}", self.process, link.conn) });
        if let Some(p) = &presence {
            if let Err(e) = self.devices.announce(&device.id, p).await {
                tracing::warn!(device = %device.id, error = %e, "could not record where the edge agent is");
            }
        }
        let writer = async {
            let mut ping = tokio::time::interval(PING_EVERY);
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => match m { Some(m) => m, None => break },
                    _ = ping.tick() => Message::Ping(Vec::new().into()),
                };
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
        };
        let reader = async {
            while let Ok(Some(Ok(msg))) = tokio::time::timeout(SILENCE, stream.next()).await {
                match msg {
                    Message::Text(t) => match serde_json::from_str::<ToServer>(&t) {
                        Ok(ToServer::Outcome(report)) => {
                            if let Some(waiting) = link.pending.lock().unwrap().remove(&report.seq) {
                                let _ = waiting.send(report);
                            }
                        }
                        Ok(ToServer::Hello { .. }) => {}
                        Err(e) => {
                            tracing::warn!(device = %device.id, error = %e, "unreadable message from an edge agent")
                        }
                    },
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        };
        tokio::select! {
            _ = writer => {}
            _ = reader => {}
        }
        {
            let mut links = self.links.lock().unwrap();
            if links.get(&device.id).is_some_and(|l| l.conn == link.conn) {
                links.remove(&device.id);
            }
        }
        // Deliveries still waiting for this connection fail now and go to their retry policy.
        link.pending.lock().unwrap().clear();
        if let Some(p) = &presence {
            if let Err(e) = self.devices.withdraw(&device.id, p).await {
                tracing::warn!(device = %device.id, error = %e, "could not withdraw the edge agent's presence");
            }
        }
        metrics::gauge!(m::EDGE_AGENTS).set(self.connected() as f64);
        tracing::info!(device = %device.id, "edge agent disconnected");
    }
}
