//! The server's side of edge delivery: connected agents, and edge delivery as a transport.
//! A delivery is sent down its device's WebSocket and settled only when the agent reports
//! the outcome. An agent that is offline, has no room in its window, or does not answer in
//! time is a failed attempt, which the subscription's retry policy handles like any other.

use super::devices::EdgeDevice;
use super::protocol::{encode_delivery, Report, ToAgent, ToServer, MAX_WINDOW};
use crate::metrics as m;
use crate::model::Delivery;
use crate::registry::Target;
use crate::transport::Outcome;
use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};
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

/// Every connected agent, by device id.
#[derive(Default)]
pub struct EdgeHub {
    links: Mutex<HashMap<String, Arc<Link>>>,
    conns: AtomicU64,
}

fn failed(error: String, started: Instant) -> Outcome {
    Outcome::Failed { status: None, error, retry_after: None, latency: started.elapsed() }
}

impl EdgeHub {
    /// An empty hub.
    pub fn new() -> Arc<EdgeHub> {
        metrics::gauge!(m::EDGE_AGENTS).set(0.0);
        Arc::new(EdgeHub::default())
    }

    /// Agents connected now.
    pub fn connected(&self) -> usize {
        self.links.lock().unwrap().len()
    }

    /// Makes one attempt through `device`'s agent, waiting at most `timeout` plus a grace
    /// period for its report.
    pub async fn deliver(
        &self,
        device: &str,
        target: &Target,
        delivery: &Delivery,
        pending_retries: u32,
        timeout: Duration,
    ) -> Outcome {
        let started = Instant::now();
        let Some(link) = self.links.lock().unwrap().get(device).cloned() else {
            return failed(format!("edge device {device} is not connected"), started);
        };
        // Flow control: never more than the agent's window unanswered.
        let permit = match tokio::time::timeout(timeout, link.window.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => return failed(format!("edge device {device} had no room in its window"), started),
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
            Some(Err(_)) => failed(format!("edge device {device} disconnected before answering"), started),
            None if !sent => failed(format!("edge device {device} disconnected"), started),
            None => failed(format!("edge device {device} did not answer within {timeout:?}"), started),
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
        metrics::gauge!(m::EDGE_AGENTS).set(self.connected() as f64);
        tracing::info!(device = %device.id, "edge agent disconnected");
    }
}
