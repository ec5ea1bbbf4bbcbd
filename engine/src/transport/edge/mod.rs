//! The edge transport: delivery through an agent inside the customer's network. The agent
//! holds a WebSocket to one Herald process (`protocol`); a delivery is sent down it and
//! settled only when the agent reports the outcome. Another process forwards its attempts to
//! the process the agent is connected to (the catalog records where that is). An agent that
//! is offline, has no room in its window, or does not answer in time is a failed attempt,
//! which the subscription's retry policy handles like any other.

pub mod protocol;

use crate::devices::{Devices, EdgeDevice, Presence};
use crate::metrics as m;
use crate::model::secret::revealing;
use crate::model::{Delivery, Failure, Outcome};
use crate::target::Target;
use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use protocol::{encode_delivery, Forward, Report, ToAgent, ToServer, FORWARD_PATH, MAX_WINDOW};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// Extra time an agent gets beyond the subscription's timeout, for the hop to it and back.
const GRACE: Duration = Duration::from_secs(5);
/// How often the server pings an agent (and checks its device still exists), and how long
/// silence may last before it is dropped.
const PING_EVERY: Duration = Duration::from_secs(15);
const SILENCE: Duration = Duration::from_secs(45);
/// How long one message may take to go out: an agent that stops reading its socket (it may
/// still write, so `SILENCE` never comes) fills it, and the connection ends after this.
const WRITE_STALL: Duration = SILENCE;
/// How often an agent's unreadable messages are logged at most.
const UNREADABLE_LOG_EVERY: Duration = Duration::from_secs(60);
/// How long the closing message may take (a stalled socket would hold the end for ever).
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// Forwards of edge attempts to other processes in flight at once, all tenants' and one
/// tenant's (see `EdgeHub::forwards`).
const FORWARDS_AT_ONCE: usize = 512;
const FORWARDS_PER_TENANT: usize = 64;

/// Frames an agent may send beyond one report for each delivery it was sent, and beyond
/// [`AGENT_FRAMES_PER_SECOND`] of its connection's life (a pong, a repeated hello): each is
/// read and parsed on the cores every tenant's deliveries share, up to a megabyte apiece, so
/// an agent sending what nobody asked for is disconnected (it reconnects, throttled).
const AGENT_SPARE_FRAMES: u64 = 64;
const AGENT_FRAMES_PER_SECOND: u64 = 2;

/// Bytes of deliveries one connection's queue may hold (a larger message goes alone): an
/// agent that reads slowly or not at all holds no more of Herald's memory than this (a window
/// of 4,096 events of 1 MiB each was 5.6 GiB). An attempt waits for room within its timeout,
/// as for a slot of the window, so a burst to an agent that reads is not refused.
const QUEUE_BYTES: usize = 8 << 20;
/// [`QUEUE_BYTES`] counted in KiB (the room's permits).
const QUEUE_KIB: u32 = (QUEUE_BYTES >> 10) as u32;

/// Bytes of deliveries all of one tenant's connections here may hold queued or being written,
/// together: bounded a connection only, a tenant's hundred devices whose agents stop reading
/// held 800 MiB of Herald's memory (each attempt gives its in-flight bytes back when it
/// times out, while its message stays queued).
const TENANT_QUEUE_BYTES: usize = 16 << 20;
const TENANT_QUEUE_KIB: u32 = (TENANT_QUEUE_BYTES >> 10) as u32;

/// A message's room: in its connection's queue and in its tenant's, held until it has been
/// written (or dropped unsent).
struct Room {
    _link: tokio::sync::OwnedSemaphorePermit,
    _tenant: tokio::sync::OwnedSemaphorePermit,
}

/// A delivery's message waiting to go out, with its room.
struct Outgoing {
    seq: u64,
    text: Message,
    room: Room,
}

/// One agent's live connection.
struct Link {
    conn: u64,
    /// Deliveries waiting to go out: at most the window, and [`QUEUE_BYTES`]. An attempt that
    /// times out frees its slot in the window while its message may still wait here (the
    /// socket is full), so the queue is bounded by itself, not by the window's permits; such
    /// a message is dropped when its turn comes, not sent (its attempt is already settled).
    tx: mpsc::Sender<Outgoing>,
    /// Room in the queue, in KiB ([`QUEUE_BYTES`]).
    room: Arc<Semaphore>,
    /// Room over the tenant's connections here, in KiB ([`TENANT_QUEUE_BYTES`]).
    tenant_room: Arc<Semaphore>,
    window: Arc<Semaphore>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Report>>>,
    seq: AtomicU64,
    /// Turns true when the connection must end (replaced, or its device deleted).
    close: watch::Sender<bool>,
}

/// Every agent connected to this process, by device id; and the way to the other processes'
/// agents.
pub struct EdgeHub {
    links: Mutex<HashMap<String, Arc<Link>>>,
    /// Each tenant's room ([`TENANT_QUEUE_BYTES`]), shared by its connections while any lives.
    tenant_rooms: Mutex<HashMap<String, std::sync::Weak<Semaphore>>>,
    conns: AtomicU64,
    devices: Arc<Devices>,
    /// This process's URL for the others, once it listens.
    advertised: std::sync::OnceLock<String>,
    /// Unique per process, so presence records of two processes never compare equal.
    process: String,
    /// Authenticates forwards between processes (all of them share it).
    forward_secret: String,
    /// Bytes of a receiver's answer the history keeps (`None`: no history).
    response_bytes: Option<usize>,
    /// Forwards in flight from this process ([`FORWARDS_AT_ONCE`], [`FORWARDS_PER_TENANT`] of
    /// a tenant's): each is a connection into the process holding the agent, counted in its
    /// `api.max_connections`, for up to twice the attempt's timeout — unbounded, one tenant's
    /// slow agents filled it, and every tenant's publishes and forwards there were refused.
    forwards: crate::model::TakenInTurns,
    /// Forwards to the other processes: `http://`, or `https://` for an `advertise_url` behind
    /// TLS (certificates public CAs sign).
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
}

impl EdgeHub {
    /// An empty hub; `forward_secret` authenticates forwards between processes;
    /// `response_bytes` is how much of a receiver's answer the history keeps.
    pub fn new(devices: Arc<Devices>, forward_secret: String, response_bytes: Option<usize>) -> Arc<EdgeHub> {
        metrics::gauge!(m::EDGE_AGENTS).set(0.0);
        metrics::gauge!(m::EDGE_IN_FLIGHT).set(0.0);
        Arc::new(EdgeHub {
            links: Mutex::default(),
            tenant_rooms: Mutex::default(),
            conns: AtomicU64::new(0),
            devices,
            advertised: std::sync::OnceLock::new(),
            process: uuid::Uuid::new_v4().simple().to_string(),
            forward_secret,
            response_bytes,
            forwards: crate::model::TakenInTurns::new(FORWARDS_AT_ONCE, FORWARDS_PER_TENANT),
            client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(
                hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build(),
            ),
        })
    }

    /// Sets the URL other processes reach this one at (once).
    pub fn advertise(&self, url: String) {
        let _ = self.advertised.set(url);
    }

    /// Whether `presented` is the secret forwards between processes carry.
    pub fn forward_allowed(&self, presented: &str) -> bool {
        crate::tenants::same_secret(presented, &self.forward_secret)
    }

    /// Agents connected now.
    pub fn connected(&self) -> usize {
        self.links.lock().unwrap().len()
    }

    /// Whether `device`'s agent is connected to this process.
    pub fn is_connected_here(&self, device: &str) -> bool {
        self.links.lock().unwrap().contains_key(device)
    }

    /// Ends `device`'s connection here, if it has one (its device was deleted).
    pub fn disconnect(&self, device: &str) {
        if let Some(link) = self.links.lock().unwrap().get(device) {
            link.close.send_replace(true);
        }
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
        if self.is_connected_here(device) {
            return self.deliver_here(device, target, delivery, pending_retries, timeout).await;
        }
        match self.devices.located(device) {
            // Another process's (told by the process, not the address: every process listening
            // on 0.0.0.0:8080 on a host of its own advertises the same one).
            Some(p) if !self.is_mine(&p.connection) => {
                self.forward(&p.url, device, target, delivery, pending_retries, timeout).await
            }
            _ => Outcome::failed(Failure::EdgeOffline { device: device.to_string() }, Duration::ZERO),
        }
    }

    /// Whether `device`'s agent has connected to another process since it connected here
    /// (its presence recorded at `own_at` in the catalog): the device's latest presence is that
    /// process's, recorded after (every process reads the same order). At most one connection
    /// lives per device, as within one process; the older one here was preferred for this
    /// process's attempts until silent for 45 s. One whose presence was not recorded is not
    /// judged (another's older presence, a crashed process's, would close it at each try).
    fn replaced_elsewhere(&self, device: &str, own_at: Option<u64>) -> bool {
        let Some(own_at) = own_at else { return false };
        self.devices.located_at(device).is_some_and(|(p, at)| at > own_at && !self.is_mine(&p.connection))
    }

    /// Whether a presence's `connection` is one of this process's.
    fn is_mine(&self, connection: &str) -> bool {
        connection.strip_prefix(self.process.as_str()).is_some_and(|rest| rest.starts_with('-'))
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
        let failed = |detail: String| Outcome::failed(Failure::Connect { detail }, started.elapsed());
        // Waited for within the attempt's timeout, as for a slot of an agent's window.
        let Ok(_turn) = tokio::time::timeout(timeout, self.forwards.turn(&target.sub.tenant)).await else {
            return Outcome::failed(Failure::EdgeBusy { device: device.to_string() }, started.elapsed());
        };
        let body = Forward {
            device: device.to_string(),
            subscription: target.sub.id.clone(),
            delivery: encode_delivery(delivery),
            pending_retries,
            timeout_ms: timeout.as_millis() as u64,
        };
        let request = http::Request::post(format!("{}{FORWARD_PATH}", url.trim_end_matches('/')))
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.forward_secret))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&body).expect("serializes"))));
        // What failed is on the tenant's record (the attempt's error, the dead letter's): the
        // process's address and the client's words are Herald's log's, not the tenant's.
        let unreached = |why: &str| {
            tracing::warn!(
                device,
                url,
                error = why,
                "forwarding an edge attempt to the process holding its agent failed"
            );
            failed(format!("forwarding to the Herald process holding edge device {device}'s agent: {why}"))
        };
        let Ok(request) = request else { return unreached("not a URL") };
        // The holder may wait up to `timeout` for a slot and room in the agent's queue, then
        // `timeout` and its grace for the answer: given up sooner, an attempt the agent then
        // made was recorded a timeout (and retried).
        let answer = tokio::time::timeout(timeout * 2 + GRACE * 2, async {
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
            Ok(Ok(report)) => report.into_outcome(self.response_bytes, started.elapsed()),
            Ok(Err(e)) => unreached(&e),
            Err(_) => Outcome::failed(super::http::timed_out(timeout), started.elapsed()),
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
        let offline = || Outcome::failed(Failure::EdgeOffline { device: device.to_string() }, started.elapsed());
        let busy = || Outcome::failed(Failure::EdgeBusy { device: device.to_string() }, started.elapsed());
        let Some(link) = self.links.lock().unwrap().get(device).cloned() else { return offline() };
        // Flow control: never more than the agent's window unanswered.
        let Ok(Ok(permit)) = tokio::time::timeout(timeout, link.window.clone().acquire_owned()).await else {
            return busy();
        };
        // Room in the queue for the message, taken before it is made (so attempts waiting for
        // room hold nothing more): its size from its parts — the subscription as sent, the
        // delivery record in base64 — measured, not made.
        let subscription = with_timeout(&target.sub, timeout);
        let sub_bytes = revealing(|| serde_json::to_vec(&subscription).map_or(0, |v| v.len()));
        let bytes = sub_bytes + delivery.encoded_len().div_ceil(3) * 4 + 128;
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, QUEUE_KIB);
        let left = timeout.saturating_sub(started.elapsed());
        let room = tokio::time::timeout(left, async {
            let link_room = link.room.clone().acquire_many_owned(kib).await?;
            let tenant_room = link.tenant_room.clone().acquire_many_owned(kib).await?;
            Ok::<_, tokio::sync::AcquireError>(Room { _link: link_room, _tenant: tenant_room })
        });
        let Ok(Ok(room)) = room.await else {
            return busy();
        };
        let seq = link.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        link.pending.lock().unwrap().insert(seq, tx);
        metrics::gauge!(m::EDGE_IN_FLIGHT).increment(1.0);
        let in_flight = InFlight { link: &link, seq };
        let msg = ToAgent::Deliver {
            seq,
            subscription: Box::new(subscription),
            delivery: encode_delivery(delivery),
            pending_retries,
        };
        // The agent needs the subscription's secrets to sign and authenticate.
        let text = revealing(|| serde_json::to_string(&msg).expect("serializes"));
        let queued = link.tx.try_send(Outgoing { seq, text: Message::Text(text.into()), room });
        let answer = match queued {
            Ok(()) => tokio::time::timeout(timeout + GRACE, rx).await.ok(),
            Err(_) => None,
        };
        drop(in_flight);
        drop(permit);
        let sent = match queued {
            Ok(()) => true,
            // Earlier attempts' messages still wait for a socket the agent does not read.
            Err(mpsc::error::TrySendError::Full(_)) => return busy(),
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        match answer {
            Some(Ok(report)) => {
                let outcome = report.into_outcome(self.response_bytes, started.elapsed());
                let rtt = started.elapsed().saturating_sub(outcome.latency());
                metrics::histogram!(m::EDGE_RTT_SECONDS).record(rtt.as_secs_f64());
                outcome
            }
            // Disconnected before answering, or while sending.
            Some(Err(_)) => offline(),
            None if !sent => offline(),
            None => Outcome::failed(super::http::timed_out(timeout), started.elapsed()),
        }
    }

    /// Serves one agent's connection until it closes, is replaced by a newer connection of
    /// the same device (at most one lives per device), or its device is deleted.
    pub async fn serve(self: Arc<Self>, device: EdgeDevice, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let window = match hello(&mut stream).await {
            Ok(window) => window,
            Err(why) => {
                // Said as it closes: dropped without a word, the agent took it for another
                // agent holding the device's token.
                let frame = axum::extract::ws::CloseFrame { code: 1008, reason: why.into() };
                let _ = tokio::time::timeout(CLOSE_WITHIN, sink.send(Message::Close(Some(frame)))).await;
                return;
            }
        };
        let (link, rx, close) = self.attach(&device, window);
        let (presence, announced_at) = self.announce(&device, &link).await.unzip();
        tokio::select! {
            _ = self.write(&device, &link, sink, rx, close, announced_at.flatten()) => {}
            _ = read(&link, &device, stream) => {}
        }
        self.detach(&device, &link, presence).await;
    }

    /// Registers a new connection for `device`, ending any older one.
    fn attach(&self, device: &EdgeDevice, window: u32) -> (Arc<Link>, mpsc::Receiver<Outgoing>, watch::Receiver<bool>) {
        let (close, closed) = watch::channel(false);
        let (tx, rx) = mpsc::channel(window as usize);
        let tenant_room = {
            let mut rooms = self.tenant_rooms.lock().unwrap();
            rooms.retain(|_, room| room.strong_count() > 0);
            let room = rooms.get(&device.tenant).and_then(std::sync::Weak::upgrade);
            room.unwrap_or_else(|| {
                let room = Arc::new(Semaphore::new(TENANT_QUEUE_KIB as usize));
                rooms.insert(device.tenant.clone(), Arc::downgrade(&room));
                room
            })
        };
        let link = Arc::new(Link {
            conn: self.conns.fetch_add(1, Ordering::Relaxed),
            tx,
            room: Arc::new(Semaphore::new(QUEUE_KIB as usize)),
            tenant_room,
            window: Arc::new(Semaphore::new(window as usize)),
            pending: Mutex::default(),
            seq: AtomicU64::new(0),
            close,
        });
        if let Some(old) = self.links.lock().unwrap().insert(device.id.clone(), link.clone()) {
            old.pending.lock().unwrap().clear();
            old.close.send_replace(true);
        }
        metrics::gauge!(m::EDGE_AGENTS).set(self.connected() as f64);
        tracing::info!(device = %device.id, tenant = %device.tenant, window, "edge agent connected");
        (link, rx, closed)
    }

    /// Tells the other processes where this agent is, so they can forward to it.
    /// Returns the presence, and where its record is in the catalog if it was recorded.
    async fn announce(&self, device: &EdgeDevice, link: &Link) -> Option<(Presence, Option<u64>)> {
        let url = self.advertised.get()?;
        let presence = Presence { url: url.clone(), connection: format!("{}-{}", self.process, link.conn) };
        let at = match self.devices.announce(&device.id, &presence).await {
            Ok(at) => Some(at),
            Err(e) => {
                tracing::warn!(device = %device.id, error = %e, "could not record where the edge agent is");
                None
            }
        };
        Some((presence, at))
    }

    /// Sends queued messages and pings until the socket fails, stalls for [`WRITE_STALL`], or
    /// the link must close (looked at while a message is going out too); drops the connection
    /// when its device no longer exists, or connected to another process after this one's
    /// presence, recorded at `announced_at` in the catalog.
    async fn write(
        &self,
        device: &EdgeDevice,
        link: &Link,
        mut sink: SplitSink<WebSocket, Message>,
        mut rx: mpsc::Receiver<Outgoing>,
        mut close: watch::Receiver<bool>,
        announced_at: Option<u64>,
    ) {
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m {
                    Some(out) => match link.unqueue(out) {
                        Some(taken) => taken,
                        None => continue,
                    },
                    None => break,
                },
                _ = ping.tick() => {
                    if self.devices.get(&device.id, None).is_none() {
                        tracing::info!(device = %device.id, "edge device deleted; closing its connection");
                        break;
                    }
                    if self.replaced_elsewhere(&device.id, announced_at) {
                        tracing::info!(device = %device.id, "edge device connected to another process since; closing this connection");
                        break;
                    }
                    (Message::Ping(Vec::new().into()), None)
                }
                _ = crate::shutdown::stopped(&mut close) => break,
            };
            let (msg, room) = msg;
            let sent = tokio::select! {
                sent = tokio::time::timeout(WRITE_STALL, sink.send(msg)) => matches!(sent, Ok(Ok(()))),
                _ = crate::shutdown::stopped(&mut close) => false,
            };
            drop(room); // held while the message is written
            if !sent {
                tracing::info!(device = %device.id, "edge agent not reading, gone, or to close; ending its connection");
                break;
            }
        }
        let _ = tokio::time::timeout(CLOSE_WITHIN, sink.send(Message::Close(None))).await;
    }

    /// Forgets a connection that ended: its waiting deliveries fail now (and go to their retry
    /// policy), and its presence is withdrawn unless a newer connection replaced it.
    async fn detach(&self, device: &EdgeDevice, link: &Arc<Link>, presence: Option<Presence>) {
        {
            let mut links = self.links.lock().unwrap();
            if links.get(&device.id).is_some_and(|l| l.conn == link.conn) {
                links.remove(&device.id);
            }
        }
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

/// An attempt waiting for its agent's report: forgotten when it ends however it ends — a
/// forwarding process that gave up cancels it, and its entry and the in-flight gauge stayed.
impl Link {
    /// Takes a message off the queue: its text and its room, to be given back once it is
    /// written; or `None` (its room given back) when its attempt has ended (timed out while
    /// the message waited) — sent all the same, the agent would deliver an attempt already
    /// recorded as failed, and its retry as well.
    fn unqueue(&self, out: Outgoing) -> Option<(Message, Option<Room>)> {
        self.pending.lock().unwrap().contains_key(&out.seq).then_some((out.text, Some(out.room)))
    }
}

struct InFlight<'a> {
    link: &'a Link,
    seq: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.link.pending.lock().unwrap().remove(&self.seq);
        metrics::gauge!(m::EDGE_IN_FLIGHT).decrement(1.0);
    }
}

/// The agent's first message: its window (clamped), or why it is not a hello.
async fn hello(stream: &mut SplitStream<WebSocket>) -> Result<u32, &'static str> {
    const EXPECTED: &str = r#"the first message must be {"type":"hello","window":N}, N a whole number from 1"#;
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ToServer>(&t) {
            Ok(ToServer::Hello { window }) => Ok(window.clamp(1, MAX_WINDOW)),
            _ => Err(EXPECTED),
        },
        Err(_) => Err(r#"no {"type":"hello","window":N} within 10 s"#),
        _ => Err(EXPECTED),
    }
}

/// What an agent may send: a report for each delivery it was sent, and the frames nobody asked
/// for (a pong, a repeated hello) from a bucket of [`AGENT_SPARE_FRAMES`] refilled at
/// [`AGENT_FRAMES_PER_SECOND`] — never more: an allowance growing with the connection's life
/// let an agent quiet for a day send 170,000 at once.
struct Allowance {
    frames: u64,
    unasked: u64,
    spare: f64,
    refilled: Instant,
}

impl Allowance {
    fn new(now: Instant) -> Allowance {
        Allowance { frames: 0, unasked: 0, spare: AGENT_SPARE_FRAMES as f64, refilled: now }
    }

    /// Counts a frame the agent sent when `sent` deliveries had been sent to it: whether it
    /// may.
    fn take(&mut self, sent: u64, now: Instant) -> bool {
        self.frames += 1;
        if self.frames - self.unasked <= sent {
            return true; // a report
        }
        self.unasked += 1;
        let refill = now.saturating_duration_since(self.refilled).as_secs_f64() * AGENT_FRAMES_PER_SECOND as f64;
        self.spare = (self.spare + refill).min(AGENT_SPARE_FRAMES as f64);
        self.refilled = now;
        if self.spare < 1.0 {
            return false;
        }
        self.spare -= 1.0;
        true
    }
}

/// Why an agent's message was not read, bounded: serde's message quotes what it did not
/// expect (an unknown `type` whole), and an agent's text is up to a megabyte a message.
fn unreadable(e: &serde_json::Error) -> String {
    crate::model::outcome::truncate(&e.to_string(), 256)
}

/// Hands each report to the delivery waiting for it, until the agent goes silent or closes.
async fn read(link: &Link, device: &EdgeDevice, mut stream: SplitStream<WebSocket>) {
    // Unreadable messages are logged once a minute at most, with how many came between: an
    // agent sending millions of them would otherwise write as many log lines.
    let mut unreadable_since: Option<(Instant, u64)> = None;
    let mut allowance = Allowance::new(Instant::now());
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(SILENCE, stream.next()).await {
        if !allowance.take(link.seq.load(Ordering::Relaxed), Instant::now()) {
            tracing::warn!(device = %device.id, frames = allowance.frames, "an edge agent sent more messages than it was sent deliveries; ending its connection");
            break;
        }
        match msg {
            Message::Text(t) => match serde_json::from_str::<ToServer>(&t) {
                Ok(ToServer::Outcome(report)) => {
                    if let Some(waiting) = link.pending.lock().unwrap().remove(&report.seq) {
                        let _ = waiting.send(report);
                    }
                }
                Ok(ToServer::Hello { .. }) => {}
                Err(e) => match &mut unreadable_since {
                    Some((at, skipped)) if at.elapsed() < UNREADABLE_LOG_EVERY => *skipped += 1,
                    _ => {
                        let skipped = unreadable_since.map_or(0, |(_, n)| n);
                        tracing::warn!(device = %device.id, error = %unreadable(&e), not_logged_before = skipped, "unreadable message from an edge agent");
                        unreadable_since = Some((Instant::now(), 0));
                    }
                },
            },
            Message::Close(_) => break,
            _ => {}
        }
    }
}

/// `sub` as the agent gets it: with the attempt's timeout, this server's default when the
/// subscription has none. The agent used its own (`--timeout`, 30 s), so against a server
/// whose default was shorter an attempt it delivered was counted a timeout here, and sent again.
fn with_timeout(sub: &crate::model::Subscription, timeout: Duration) -> crate::model::Subscription {
    let mut sub = sub.clone();
    sub.spec.timeout.get_or_insert(timeout.into());
    sub
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent's frames nobody asked for come from a bucket that refills but never holds
    /// more than [`AGENT_SPARE_FRAMES`]: after a quiet day it may send 64, not 170,000; its
    /// reports, one per delivery sent, always pass, however many frames came before.
    #[test]
    fn an_agent_s_spare_frames_do_not_pile_up() {
        let start = Instant::now();
        let mut allowance = Allowance::new(start);
        assert!(allowance.take(0, start), "a pong");
        for sent in 1..=10_000 {
            assert!(allowance.take(sent, start), "report {sent}");
        }
        let a_day_later = start + Duration::from_secs(86_400);
        let spare = (0..1_000).take_while(|_| allowance.take(10_000, a_day_later)).count();
        assert_eq!(spare, AGENT_SPARE_FRAMES as usize);
        let then = a_day_later + Duration::from_secs(1);
        assert!(allowance.take(10_000, then) && allowance.take(10_000, then), "refilled at 2 a second");
        assert!(!allowance.take(10_000, then));
    }

    /// An agent's unknown message type is not logged whole.
    #[test]
    fn why_a_message_was_unreadable_is_told_in_a_bounded_line() {
        let text = format!("{{\"type\":\"{}\"}}", "x".repeat(1 << 20));
        let e = serde_json::from_str::<ToServer>(&text).unwrap_err();
        assert!(unreadable(&e).len() <= 260, "{} bytes", unreadable(&e).len());
    }
    use crate::catalog::feed::Feed;
    use crate::log::stub::Stub;

    fn hub_and_target() -> (Arc<EdgeHub>, EdgeDevice, Target) {
        let (feed, applied) = Feed::new(Arc::new(Stub::new(true, true)), "catalog".into(), 0);
        applied.set(u64::MAX);
        let hub = EdgeHub::new(Arc::new(Devices::load(Arc::new(feed), &[])), "secret".into(), Some(1024));
        let device = EdgeDevice { id: "edg_1".into(), tenant: "t".into(), name: "n".into(), created_at: String::new() };
        let sub = crate::model::Subscription::unchecked(
            "sub_1".into(),
            "t".into(),
            crate::model::SubscriptionSpec { url: "http://10.0.0.1/".into(), ..Default::default() },
            crate::model::Secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
        );
        (hub, device, Target::compile(sub).unwrap())
    }

    /// Tenant `t`'s event `e{i}` for `target`, with `data`.
    fn event_for(target: &Target, i: usize, data: Bytes) -> Delivery {
        Delivery::first_attempt(format!("e{i}"), target.sub.id.clone(), "t".into(), "T".into(), data, 0)
    }

    /// The messages waiting in `rx`, taken off (their room still held), and their bytes.
    fn queued(rx: &mut mpsc::Receiver<Outgoing>) -> (Vec<Outgoing>, usize) {
        let mut taken = Vec::new();
        let mut bytes = 0;
        while let Ok(out) = rx.try_recv() {
            if let Message::Text(t) = &out.text {
                bytes += t.len();
            }
            taken.push(out);
        }
        (taken, bytes)
    }

    /// A forward that fails is on the tenant's record (the attempt's error, the dead letter's
    /// `last_error`): it named the internal address of the process holding the agent.
    #[tokio::test]
    async fn a_failed_forward_does_not_tell_the_tenant_where_herald_runs() {
        let (hub, _, target) = hub_and_target();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let delivery =
            Delivery::first_attempt("e".into(), "sub_1".into(), "t".into(), "T".into(), Bytes::from_static(b"{}"), 0);
        let outcome = hub.forward(&url, "edg_1", &target, &delivery, 0, Duration::from_secs(2)).await;
        let error = outcome.failure().expect("failed").to_string();
        assert!(!error.contains("127.0.0.1"), "{error}");
        assert!(error.contains("edg_1"), "{error}");
    }

    /// A device whose agent connected to another process since is replaced here too (its
    /// connection closed at the next ping): two live connections of one device, on two
    /// processes, split its deliveries for as long as both lasted. Only a presence recorded
    /// after this connection's own counts: one whose announcement failed would otherwise be
    /// closed at each try by an older presence (a crashed process's).
    #[test]
    fn a_connection_replaced_on_another_process_is_told_apart() {
        use crate::catalog::{Apply, Entry, Kind};
        let (hub, device, _) = hub_and_target();
        let present = |connection: String, offset: u64| {
            let presence = crate::devices::Presence { url: "http://herald".into(), connection };
            let value = Bytes::from(serde_json::to_vec(&presence).unwrap());
            let record = crate::log::LogRecord { partition: 0, offset, key: Bytes::new(), value, timestamp_ms: 0 };
            hub.devices.apply(Entry { kind: Kind::Presence, id: device.id.clone(), record: &record });
        };
        let (link, _rx, _close) = hub.attach(&device, 8);
        present("a-crashed-process-1".into(), 3);
        assert!(!hub.replaced_elsewhere(&device.id, None), "its own presence not recorded: not judged");
        present(format!("{}-{}", hub.process, link.conn), 5);
        assert!(!hub.replaced_elsewhere(&device.id, Some(5)), "its own presence");
        present("another-process-7".into(), 7);
        assert!(hub.replaced_elsewhere(&device.id, Some(5)));
    }

    /// One tenant's forwards to the process holding its agents are bounded: each is a
    /// connection into that process (counted in its `api.max_connections`) for up to twice
    /// the attempt's timeout, and a tenant's slow agents filled it for every tenant. Past
    /// [`FORWARDS_PER_TENANT`], an attempt waits for a turn within its timeout, then fails
    /// `edge_busy` — no connection made.
    #[tokio::test]
    async fn one_tenant_s_forwards_are_bounded() {
        let (hub, _, target) = hub_and_target();
        let holder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", holder.local_addr().unwrap());
        let accepted = Arc::new(AtomicU64::new(0));
        let silent = tokio::spawn({
            let accepted = accepted.clone();
            async move {
                let mut held = Vec::new();
                while let Ok((conn, _)) = holder.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    held.push(conn); // never answered
                }
            }
        });
        let target = Arc::new(target);
        let mut attempts: futures::stream::FuturesUnordered<_> = (0..FORWARDS_PER_TENANT + 36)
            .map(|i| {
                let (hub, target, url) = (hub.clone(), target.clone(), url.clone());
                async move {
                    let delivery = Delivery::first_attempt(
                        format!("e{i}"),
                        "sub_1".into(),
                        "t".into(),
                        "T".into(),
                        Bytes::new(),
                        0,
                    );
                    hub.forward(&url, "edg_1", &target, &delivery, 0, Duration::from_millis(300)).await.label()
                }
            })
            .collect();
        let first = tokio::time::timeout(Duration::from_secs(5), async {
            let mut ended = Vec::new();
            while ended.len() < 36 {
                ended.push(attempts.next().await.expect("more attempts"));
            }
            ended
        })
        .await
        .expect("the attempts past the bound ended within their timeout");
        assert!(first.iter().all(|l| *l == "edge_busy"), "{first:?}");
        assert!(
            accepted.load(Ordering::SeqCst) <= FORWARDS_PER_TENANT as u64,
            "{} connections",
            accepted.load(Ordering::SeqCst)
        );
        silent.abort();
    }

    /// An agent that does not read holds at most [`QUEUE_BYTES`] of messages, whatever its
    /// window: attempts past it are `edge_busy` at once. (Its window of 4,096 took 4,096
    /// messages of an event of a mebibyte each: 5.6 GiB.)
    #[tokio::test(start_paused = true)]
    async fn an_agent_that_does_not_read_holds_a_bounded_queue() {
        let (hub, device, target) = hub_and_target();
        let (_link, mut rx, _close) = hub.attach(&device, MAX_WINDOW);
        let data = Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(1 << 20)));
        let mut busy = 0;
        for i in 0..40 {
            let delivery = event_for(&target, i, data.clone());
            let outcome = hub.deliver_here("edg_1", &target, &delivery, 0, Duration::from_millis(1)).await;
            busy += usize::from(outcome.label() == "edge_busy");
        }
        let (_, held) = queued(&mut rx);
        assert!(held <= QUEUE_BYTES + (2 << 20), "{held} bytes queued");
        assert!(busy >= 30, "{busy} of 40 refused as busy");
    }

    /// All of a tenant's agents that do not read hold at most [`TENANT_QUEUE_BYTES`] of
    /// messages together: bounded a connection only, ten devices held 80 MiB, a hundred (the
    /// default cap of a tenant's devices) 800 MiB. Another tenant's room is its own.
    #[tokio::test(start_paused = true)]
    async fn a_tenant_s_agents_that_do_not_read_hold_a_bounded_queue_together() {
        let (hub, device, target) = hub_and_target();
        let data = Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(1 << 20)));
        let mut links = Vec::new();
        for d in 0..10 {
            let device = EdgeDevice { id: format!("edg_{d}"), ..device.clone() };
            links.push(hub.attach(&device, MAX_WINDOW));
            for i in 0..12 {
                let delivery = event_for(&target, i, data.clone());
                hub.deliver_here(&device.id, &target, &delivery, 0, Duration::from_millis(1)).await;
            }
        }
        // Taken off and kept: their room stays taken, as while the messages are written.
        let mut taken = Vec::new();
        let mut held = 0;
        for (_, rx, _) in &mut links {
            let (outs, bytes) = queued(rx);
            taken.extend(outs);
            held += bytes;
        }
        assert!(held <= (16 << 20) + (2 << 20), "{held} bytes queued (16 MiB and a message at most)");
        let other = EdgeDevice { id: "edg_other".into(), tenant: "t2".into(), ..device.clone() };
        let (_link, mut rx, _close) = hub.attach(&other, 8);
        let delivery = Delivery::first_attempt("e".into(), target.sub.id.clone(), "t2".into(), "T".into(), data, 0);
        hub.deliver_here("edg_other", &target, &delivery, 0, Duration::from_millis(1)).await;
        assert!(rx.try_recv().is_ok(), "another tenant's agent has room of its own");
    }

    /// A message's room is given back once it has been written, not as it is taken off the
    /// queue: the messages being written to agents that read slowly were counted nowhere.
    #[tokio::test(start_paused = true)]
    async fn a_message_holds_its_room_while_it_is_written() {
        let (hub, device, target) = hub_and_target();
        let (link, mut rx, _close) = hub.attach(&device, 8);
        let delivery =
            Delivery::first_attempt("e".into(), target.sub.id.clone(), "t".into(), "T".into(), Bytes::new(), 0);
        let attempt = hub.deliver_here("edg_1", &target, &delivery, 0, Duration::from_secs(30));
        let (_, taken) = tokio::join!(tokio::time::timeout(Duration::from_millis(50), attempt), async {
            let out = rx.recv().await.expect("queued");
            link.unqueue(out)
        });
        let (_, room) = taken.expect("its attempt waits");
        assert!(link.room.available_permits() < QUEUE_KIB as usize, "given back before it was written");
        drop(room);
        assert_eq!(link.room.available_permits(), QUEUE_KIB as usize);
        assert_eq!(link.tenant_room.available_permits(), TENANT_QUEUE_KIB as usize);
    }

    /// A message whose attempt ended while it waited in the queue is not sent: the agent
    /// would deliver an attempt already recorded as a timeout (and then its retry too).
    #[tokio::test(start_paused = true)]
    async fn a_message_whose_attempt_timed_out_in_the_queue_is_not_sent() {
        let (hub, device, target) = hub_and_target();
        let (link, mut rx, _close) = hub.attach(&device, 8);
        let delivery =
            Delivery::first_attempt("e".into(), target.sub.id.clone(), "t".into(), "T".into(), Bytes::new(), 0);
        let outcome = hub.deliver_here("edg_1", &target, &delivery, 0, Duration::from_millis(1)).await;
        assert_eq!(outcome.label(), "timeout");
        let queued = rx.try_recv().expect("its message waited in the queue");
        assert!(link.unqueue(queued).is_none(), "dropped, not sent");
        assert_eq!(link.room.available_permits(), QUEUE_KIB as usize, "its room given back");
    }

    /// A burst of large deliveries to an agent that reads at once waits for room in the queue
    /// rather than failing `edge_busy` (each such failure spends an attempt of its budget).
    #[tokio::test(start_paused = true)]
    async fn a_burst_to_an_agent_that_reads_waits_for_room_rather_than_failing() {
        let (hub, device, target) = hub_and_target();
        let (link, mut rx, _close) = hub.attach(&device, 64);
        let reader = tokio::spawn({
            let link = link.clone();
            async move {
                while let Some(out) = rx.recv().await {
                    let seq = out.seq;
                    if link.unqueue(out).is_some() {
                        tokio::time::sleep(Duration::from_millis(5)).await; // the socket
                        if let Some(waiting) = link.pending.lock().unwrap().remove(&seq) {
                            let outcome = Outcome::failed(Failure::EdgeOffline { device: "x".into() }, Duration::ZERO);
                            let _ = waiting.send(Report { seq, outcome });
                        }
                    }
                }
            }
        });
        let data = Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(512 << 10)));
        let target = Arc::new(target);
        let attempts = (0..64).map(|i| {
            let (hub, target, data) = (hub.clone(), target.clone(), data.clone());
            async move {
                let delivery =
                    Delivery::first_attempt(format!("e{i}"), target.sub.id.clone(), "t".into(), "T".into(), data, 0);
                hub.deliver_here("edg_1", &target, &delivery, 0, Duration::from_secs(30)).await.label()
            }
        });
        let labels = futures::future::join_all(attempts).await;
        assert!(labels.iter().all(|l| *l == "edge_offline"), "every attempt answered by the agent: {labels:?}");
        reader.abort();
    }

    /// An attempt cancelled while it waits for the agent (its forwarding process gave up)
    /// leaves nothing waiting behind it.
    #[tokio::test]
    async fn a_cancelled_attempt_leaves_no_pending_entry() {
        let (hub, device, target) = hub_and_target();
        let (link, _rx, _close) = hub.attach(&device, 8);
        let delivery =
            Delivery::first_attempt("e".into(), target.sub.id.clone(), "t".into(), "T".into(), Bytes::new(), 0);
        let attempt = hub.deliver_here("edg_1", &target, &delivery, 0, Duration::from_secs(30));
        assert!(tokio::time::timeout(Duration::from_millis(50), attempt).await.is_err(), "waiting for the agent");
        assert!(link.pending.lock().unwrap().is_empty(), "an entry left by the cancelled attempt");
    }
}
