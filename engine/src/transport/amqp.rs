//! The AMQP 0.9.1 transport: publishes a delivery to the subscriber's exchange with a routing
//! key per event type. One connection per tenant and broker URI (so one tenant's broker trouble
//! cannot fail another's publishes; a tenant's exchanges on one broker share it, and a tenant
//! has at most [`TENANT_BROKERS`] open), re-opened on the next publish after it
//! fails (so delivery resumes by itself when a broker comes back). Every publish is mandatory
//! and persistent and waits for its own confirm, on a confirm-mode channel that carries no
//! other publish until then; many are in flight at once, one per channel, up to a pool of
//! channels per connection.
//!
//! One publish per channel because of how a refusal comes back: RabbitMQ returns an
//! unroutable message (`basic.return`, no delivery tag) before confirming it, and lapin hands
//! a channel's returns to its confirms in the order the confirms complete — with several
//! unconfirmed on one channel, and acks that cover several tags at once, that is often
//! another publish's, counting a routed message unroutable and, worse, an unroutable one
//! delivered. Alone on its channel, a publish's return is its own. A channel whose publish
//! timed out or failed is closed, not reused, so a late confirm cannot be taken for the
//! next publish's (and lapin forgets the confirm it still waits for).
//!
//! The connection goes to the address the network guard checked, whatever the URI spells
//! (an IPv6 literal, or a name that resolves again differently): Herald makes the TCP
//! connection itself and hands it to lapin, with TLS verified against the URI's host name.
//! Opening is shared by every publish waiting for it, with no lock held while it runs.

use super::guard::NetworkGuard;
use super::http::timed_out;
use crate::model::{AmqpTarget, Delivery, Failure, Outcome};
use crate::target::{Signed, Target};
use futures::future::{BoxFuture, FutureExt, Shared};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::{AsyncTcpStream, TLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Channels per connection, so publishes in flight at once per tenant and broker.
const CHANNELS: usize = 256;

/// The most closing a channel that is not reused may take (a broker that never answers the
/// close leaves lapin's record of that channel, not a task).
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// Brokers unused this long are closed and forgotten (their subscriptions may be gone).
const IDLE: Duration = Duration::from_secs(600);

/// Bytes of a subscription's own headers (names and values) an AMQP message carries at most:
/// with the signature's and the properties they fit the content header's one frame, which a
/// broker may hold to 8 KiB. Larger sets, stored before this bound, go without them.
pub const HEADER_BYTES: usize = 4096;

/// Bytes of a subscription's own headers as an AMQP message carries them (names and values),
/// held to [`HEADER_BYTES`].
pub fn header_bytes(headers: &std::collections::BTreeMap<String, crate::model::Secret>) -> usize {
    headers.iter().map(|(name, value)| name.len() + value.expose().len()).sum()
}

/// Broker connections one tenant may have open at once. Each is a thread of lapin's and up to
/// 64 frames of buffers (8 MiB at [`FRAME_MAX`]): a tenant's thousand subscriptions, each to
/// another broker URI, took a thousand threads and gigabytes. Past it, the tenant's least
/// recently used connection with nothing in flight is closed to make room; with none, the
/// attempt fails `broker_busy` and is retried, not held against the endpoint's health.
pub const TENANT_BROKERS: usize = 16;

/// The most one opening of a broker's connection may take, whatever waits for it (attempts
/// wait for it at most their own timeout, and leave it shared for the next ones).
const OPEN_WITHIN: Duration = Duration::from_secs(60);

/// Longest AMQP short string (exchange names, routing keys, header names, message ids).
pub const SHORT_STRING: usize = 255;

struct Link {
    conn: Connection,
    /// Confirm-mode channels with no publish in flight (at most `CHANNELS`: one is opened
    /// only when none is idle, by a publish holding one of the window's permits).
    idle: Mutex<Vec<Channel>>,
    /// Its socket, cut [`CLOSE_WITHIN`] after the link is dropped (lapin closes it first if
    /// the broker answers the close): held for its `Drop`.
    _socket: Severs,
}

/// A hold on a broker connection's socket, from which it can be cut whatever lapin's thread
/// is doing. lapin runs each connection on a thread of its own, and dropping the connection —
/// or the opening of it, at its bound — only leaves that thread waiting: for a handshake a
/// silent peer never answers, or a close a broker under a resource alarm never reads. Each
/// such thread and socket stayed for as long as the peer kept the socket up (a tenant's URI at
/// a proxy with no broker behind it left one a minute, for good). Cut, the thread's reads and
/// writes fail and it ends.
#[derive(Default)]
struct Socket(Mutex<SocketState>);

#[derive(Default)]
struct SocketState {
    /// A duplicate of the connection's socket (the same socket: shutting it down shuts
    /// lapin's), once connected.
    held: Option<std::net::TcpStream>,
    /// Cut already: a socket connected after is cut at once.
    cut: bool,
}

impl Socket {
    /// Keeps a duplicate of `stream`'s socket — cut at once if the socket was cut meanwhile
    /// (the opening given up before its connect returned).
    fn hold(&self, stream: &tokio::net::TcpStream) -> std::io::Result<()> {
        use std::os::fd::AsFd;
        let dup = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
        let mut state = self.0.lock().unwrap();
        if state.cut {
            let _ = dup.shutdown(std::net::Shutdown::Both);
        } else {
            state.held = Some(dup);
        }
        Ok(())
    }

    /// Shuts the socket down both ways and lets go of the duplicate.
    fn cut(&self) {
        let mut state = self.0.lock().unwrap();
        state.cut = true;
        if let Some(dup) = state.held.take() {
            let _ = dup.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Cuts its socket when dropped: at once for an opening that did not become a [`Link`] (given
/// up at its bound, or failed); for a link's, once lapin has closed the connection (the close
/// sent as the connection is dropped, and answered: the duplicate kept the socket up after
/// lapin let go of its own) or [`CLOSE_WITHIN`] after the drop, whichever comes first.
struct Severs {
    /// `None` once handed on to the link ([`Severs::into_link`]).
    socket: Option<Arc<Socket>>,
    /// The link's connection, whose close is waited for (an opening's: none).
    link: Option<lapin::ConnectionStatus>,
}

impl Severs {
    /// This opening's hold, handed on to the link it became. While the link is kept, its
    /// socket is cut once lapin reports the connection closed or failed (a broker restarted,
    /// a heartbeat missed): the duplicate held it open, half-closed, until the link was next
    /// used or found idle.
    fn into_link(mut self, conn: &Connection) -> Severs {
        let (socket, status) = (self.socket.take(), conn.status().clone());
        if let (Some(held), Ok(runtime)) = (&socket, tokio::runtime::Handle::try_current()) {
            let (held, status) = (Arc::downgrade(held), status.clone());
            drop(runtime.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let Some(socket) = held.upgrade() else { return }; // the link went: cut by its drop
                    if status.closed() || status.errored() {
                        return socket.cut();
                    }
                }
            }));
        }
        Severs { socket, link: Some(status) }
    }
}

impl Drop for Severs {
    fn drop(&mut self) {
        let Some(socket) = self.socket.take() else { return };
        let (Some(status), Ok(runtime)) = (self.link.take(), tokio::runtime::Handle::try_current()) else {
            return socket.cut();
        };
        drop(runtime.spawn(async move {
            let by = tokio::time::Instant::now() + CLOSE_WITHIN;
            while !(status.closed() || status.errored()) && tokio::time::Instant::now() < by {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            socket.cut();
        }));
    }
}

impl Link {
    /// A confirm-mode channel with nothing in flight: an idle one, or one opened now.
    async fn channel(&self) -> Result<Channel, lapin::Error> {
        loop {
            let idle = self.idle.lock().unwrap().pop();
            match idle {
                Some(channel) if channel.status().connected() => return Ok(channel),
                Some(_closed) => continue,
                None => break,
            }
        }
        let channel = self.conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(channel)
    }

    /// A channel whose publish is confirmed, for the next publish.
    fn put_back(&self, channel: Channel) {
        if channel.status().connected() {
            self.idle.lock().unwrap().push(channel);
        }
    }

    /// Closes a channel that may still have a publish in flight, in the background.
    fn discard(channel: Channel) {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLOSE_WITHIN, channel.close(200, ShortString::from("not reused"))).await;
        });
    }
}

type Opening = Shared<BoxFuture<'static, Result<Arc<Link>, Failure>>>;

enum State {
    Closed,
    Opening(Opening),
    Open(Arc<Link>),
}

struct Broker {
    /// Whose subscriptions publish through it.
    tenant: String,
    state: Mutex<State>,
    window: Arc<Semaphore>,
    /// Permits of `window` taken out for good, for a broker allowing fewer channels.
    held_back: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl Broker {
    /// Nothing in flight, and not being opened: an opening left by an attempt that stopped
    /// waiting runs on (lapin's thread and socket with it) until it ends, and closing it to
    /// open another left one behind each time. One that has ended counts as unused.
    fn unused(&self) -> bool {
        self.window.available_permits() + self.held_back.load(Ordering::Relaxed) >= CHANNELS
            && !matches!(&*self.state.lock().unwrap(), State::Opening(f) if f.peek().is_none())
    }
}

/// Publishers pooled per tenant and broker URI (a tenant's exchanges on one broker share its
/// connection; another tenant's publishes never fill its window).
#[derive(Clone)]
pub struct AmqpTransport {
    brokers: Arc<Mutex<HashMap<String, Arc<Broker>>>>,
    guard: NetworkGuard,
    /// [`OPEN_WITHIN`], but in tests.
    open_within: Duration,
}

/// Checks an AMQP target as a subscription is created: the field of a bad value and why.
pub fn validate(target: &AmqpTarget) -> Result<(), (&'static str, String)> {
    let uri = url::Url::parse(target.uri.expose()).map_err(|e| ("amqp.uri", format!("not a URI: {e}")))?;
    if !matches!(uri.scheme(), "amqp" | "amqps") {
        return Err(("amqp.uri", "must be an amqp:// or amqps:// URI".into()));
    }
    if uri.host_str().is_none_or(str::is_empty) {
        return Err(("amqp.uri", "must have a host".into()));
    }
    lapin_uri(&uri).map_err(|e| ("amqp.uri", e))?;
    if target.exchange.trim().is_empty() || target.exchange.len() > SHORT_STRING {
        return Err(("amqp.exchange", format!("name the exchange to publish to (1 to {SHORT_STRING} characters)")));
    }
    if target.routing_keys.len() > 1000 {
        return Err(("amqp.routing_keys", "at most 1000 routing keys".into()));
    }
    if target.routing_keys.iter().any(|(t, k)| k.len() > SHORT_STRING || t.len() > 256) {
        return Err(("amqp.routing_keys", format!("routing keys are at most {SHORT_STRING} characters")));
    }
    Ok(())
}

/// Checks a new or changed URI's vhost, frame size and login (a broker would refuse the first
/// and last at every connection): [`validate`]'s checks that came later, so a stored
/// subscription keeps its URI through a change of anything else.
pub fn validate_new_uri(target: &AmqpTarget) -> Result<(), (&'static str, String)> {
    let uri = url::Url::parse(target.uri.expose()).map_err(|e| ("amqp.uri", format!("not a URI: {e}")))?;
    let read = lapin_uri(&uri).map_err(|e| ("amqp.uri", e))?;
    // The vhost goes on the wire as a short string; an empty one (a URI ending in `/`) names
    // no vhost a broker has. Each was taken, and every delivery failed.
    if read.vhost.is_empty() {
        return Err((
            "amqp.uri",
            "names an empty vhost (the URI ends in `/`); the default vhost `/` is written `%2f`".into(),
        ));
    }
    if read.vhost.len() > SHORT_STRING {
        return Err(("amqp.uri", format!("the vhost must be at most {SHORT_STRING} bytes")));
    }
    if read.query.frame_max.is_some_and(|f| !FRAME_MAX_RANGE.contains(&f)) {
        return Err((
            "amqp.uri",
            format!("frame_max must be {} to {} bytes", FRAME_MAX_RANGE.start(), FRAME_MAX_RANGE.end()),
        ));
    }
    // A login by client certificate: Herald presents none to a broker.
    if read.query.auth_mechanism == Some(lapin::uri::SASLMechanism::External) {
        return Err((
            "amqp.uri",
            "auth_mechanism external needs a client certificate, which Herald does not present to brokers".into(),
        ));
    }
    Ok(())
}

/// A place among `broker`'s publishes in flight, waited for until `deadline`. One not had in
/// time was never sent: `BrokerWindowFull` (`broker_busy`), not a timeout — the window is the
/// tenant's for that broker, and one subscription's slow queue filling it had every other
/// subscription's attempts there counted against their own health (breaker, pace, disabling).
async fn window_place(
    broker: &Broker,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<OwnedSemaphorePermit, Failure> {
    match tokio::time::timeout_at(deadline, broker.window.clone().acquire_owned()).await {
        Ok(Ok(slot)) => Ok(slot),
        Ok(Err(_)) => Err(Failure::Broker { detail: "the broker's publisher was closed".into() }),
        Err(_) => Err(Failure::BrokerWindowFull { after_ms: timeout.as_millis() as u64 }),
    }
}

/// Seconds between heartbeats Herald asks for when a URI names none (or 0): lapin declares a
/// connection dead after two missed, so a broker gone silent (paused, its host gone without a
/// reset) is found within a minute; with none, never, and every publish waited its timeout.
const HEARTBEAT: u16 = 30;

/// The largest frames Herald asks for (RabbitMQ's default): the broker may choose smaller.
const FRAME_MAX: u32 = 128 << 10;

/// The frame sizes a URI may ask for, and the least a broker may choose (the protocol's own
/// least is 4,096): a broker's frame size sizes lapin's buffers (32 frames each way, every byte
/// written), so one a tenant's broker chose — 0, "no limit", made them 137 GB each and the
/// process died — or a tiny one (a 12 MiB event in a million frames) is not taken.
const FRAME_MAX_RANGE: std::ops::RangeInclusive<u32> = 8192..=(1 << 20);

/// The URI as lapin reads it, with its host replaced (lapin's parser loses IPv6 literals, and
/// the connection goes to the checked address anyway) and a frame size always asked for.
fn lapin_uri(uri: &url::Url) -> Result<AMQPUri, String> {
    let mut placeholder = uri.clone();
    placeholder.set_host(Some("broker.invalid")).map_err(|e| e.to_string())?;
    placeholder.as_str().parse::<AMQPUri>().map_err(|e| format!("not a valid AMQP URI: {e}"))
}

/// The name a TLS connection to the broker checks its certificate against (`amqps://` only):
/// an IPv6 literal's brackets are the URI's, not the name's (rustls refused "[::1]", every try).
fn tls_name(uri: &url::Url) -> Option<String> {
    (uri.scheme() == "amqps").then(|| super::guard::unbracketed(uri.host_str().unwrap_or_default()).to_string())
}

/// [`lapin_uri`] for a connection: the frame size the URI asks for, at least the range's
/// least and at most [`FRAME_MAX`] — never left to the broker, which lapin then takes whatever
/// it is. Not larger, though a URI may ask up to the range's most: lapin's buffers are 64
/// frames, written in full, so a tenant's 1 MiB frames made every connection 64 MiB.
fn connecting_uri(uri: &url::Url) -> Result<AMQPUri, String> {
    let mut read = lapin_uri(uri)?;
    let asked = read.query.frame_max.unwrap_or(FRAME_MAX);
    read.query.frame_max = Some(asked.clamp(*FRAME_MAX_RANGE.start(), FRAME_MAX));
    // And a heartbeat, at most a minute apart (lapin takes the broker's if it is shorter).
    read.query.heartbeat = Some(match read.query.heartbeat {
        None | Some(0) => HEARTBEAT,
        Some(asked) => asked.min(60),
    });
    Ok(read)
}

impl AmqpTransport {
    /// Publishers whose broker hosts pass `guard`.
    pub fn new(guard: NetworkGuard) -> Self {
        Self::with_times(guard, IDLE, OPEN_WITHIN)
    }

    /// Publishers whose brokers are closed once unused for `idle`: looked for a quarter of it
    /// apart, for as long as a clone of the transport is kept. They were looked for only as
    /// another broker was opened, so in a steady pool a deleted subscription's broker — or a
    /// changed URI's, logged in with the old password — stayed connected for good.
    /// The opening of a connection is bounded by `open_within`.
    fn with_times(guard: NetworkGuard, idle: Duration, open_within: Duration) -> Self {
        let brokers: Arc<Mutex<HashMap<String, Arc<Broker>>>> = Default::default();
        let pool = Arc::downgrade(&brokers);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut every = tokio::time::interval(idle / 4);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(brokers) = pool.upgrade() else { break };
                    // Dropped with their connections, which lapin closes.
                    let unused: Vec<Arc<Broker>> = {
                        let mut brokers = brokers.lock().unwrap();
                        let idle_ones: Vec<String> = brokers
                            .iter()
                            .filter(|(_, b)| b.last_used.lock().unwrap().elapsed() >= idle && b.unused())
                            .map(|(k, _)| k.clone())
                            .collect();
                        idle_ones.iter().filter_map(|k| brokers.remove(k)).collect()
                    };
                    drop(unused);
                }
            });
        }
        AmqpTransport { brokers, guard, open_within }
    }

    /// The publisher of `tenant`'s broker `uri`, made if need be within the tenant's
    /// [`TENANT_BROKERS`], with a place in its window when one is free now — taken under the
    /// map's lock, so that the broker cannot be closed to make room between the two.
    fn broker(&self, tenant: &str, uri: &str) -> Result<(Arc<Broker>, Option<OwnedSemaphorePermit>), Failure> {
        let mut brokers = self.brokers.lock().unwrap();
        let key = format!("{tenant}\n{uri}");
        if let Some(broker) = brokers.get(&key) {
            *broker.last_used.lock().unwrap() = Instant::now();
            return Ok((broker.clone(), broker.window.clone().try_acquire_owned().ok()));
        }
        let mine: Vec<(&String, &Arc<Broker>)> = brokers.iter().filter(|(_, b)| b.tenant == tenant).collect();
        if mine.len() >= TENANT_BROKERS {
            let oldest = mine
                .iter()
                .filter(|(_, b)| b.unused())
                .min_by_key(|(_, b)| *b.last_used.lock().unwrap())
                .map(|(k, _)| (*k).clone());
            match oldest {
                // Dropped with its connection, which lapin closes.
                Some(k) => drop(brokers.remove(&k)),
                None => return Err(Failure::BrokerBusy { open: mine.len() }),
            }
        }
        let broker = Arc::new(Broker {
            tenant: tenant.to_string(),
            state: Mutex::new(State::Closed),
            window: Arc::new(Semaphore::new(CHANNELS)),
            held_back: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        });
        brokers.insert(key, broker.clone());
        let slot = broker.window.clone().try_acquire_owned().ok();
        Ok((broker, slot))
    }

    /// The address to connect to: the broker's host must pass the network guard like a
    /// webhook's, and the checked address itself is connected to.
    async fn address(&self, uri: &url::Url) -> Result<SocketAddr, Failure> {
        let host = uri.host_str().unwrap_or_default();
        let port = uri.port().unwrap_or(if uri.scheme() == "amqps" { 5671 } else { 5672 });
        let refused = |e: &dyn std::fmt::Display| Failure::Refused { detail: e.to_string() };
        if let Some(ip) = NetworkGuard::literal(host) {
            self.guard.check(ip).map_err(|e| refused(&e))?;
            return Ok(SocketAddr::new(ip, port));
        }
        let addrs = self.guard.resolve(host, port).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => refused(&e),
            _ => Failure::Connect { detail: format!("resolving {host}: {e}") },
        })?;
        addrs.first().copied().ok_or_else(|| Failure::Connect { detail: format!("{host} resolves to no address") })
    }

    /// Opens a connection to the broker of `uri` (its channels are opened as publishes need them).
    async fn open(self, uri: String) -> Result<Arc<Link>, Failure> {
        let parsed = url::Url::parse(&uri).map_err(|e| Failure::Unusable { detail: format!("amqp.uri: {e}") })?;
        let amqp_uri = connecting_uri(&parsed).map_err(|detail| Failure::Unusable { detail })?;
        let addr = self.address(&parsed).await?;
        let tls_name = tls_name(&parsed);
        let runtime = lapin::runtime::default_runtime().map_err(|e| Failure::Broker { detail: e.to_string() })?;
        // Cut if this opening ends without a link (its bound reached, a failure).
        let socket = Arc::new(Socket::default());
        let severs = Severs { socket: Some(socket.clone()), link: None };
        // A TLS failure is `tls_error`, as a webhook's is; lapin's error does not tell it apart.
        let tls_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let in_tls = tls_failed.clone();
        let connect = async move |_uri, runtime| {
            let stream: AsyncTcpStream<async_compat::Compat<tokio::net::TcpStream>> =
                AsyncTcpStream::connect(&runtime, addr).await?;
            if let AsyncTcpStream::Plain(plain) = &stream {
                socket.hold(plain.get_ref())?;
            }
            Ok(match &tls_name {
                Some(name) => stream
                    .into_tls(name, TLSConfig::default())
                    .await
                    .inspect_err(|_| in_tls.store(true, Ordering::Relaxed))?,
                None => stream,
            })
        };
        let connecting = |e: lapin::Error| {
            if tls_failed.load(Ordering::Relaxed) {
                Failure::Tls { detail: format!("with the broker: {e}") }
            } else {
                Failure::Connect { detail: format!("connecting to the broker: {e}") }
            }
        };
        let conn = Connection::connector(amqp_uri, runtime, connect, ConnectionProperties::default())
            .await
            .map_err(connecting)?;
        let frame_max = conn.configuration().frame_max();
        if frame_max < *FRAME_MAX_RANGE.start() {
            let _ = conn.close(0, "frame_max too small".into()).await;
            return Err(Failure::Broker {
                detail: format!(
                    "the broker chose frames of {frame_max} bytes; Herald needs at least {}",
                    FRAME_MAX_RANGE.start()
                ),
            });
        }
        let _socket = severs.into_link(&conn);
        Ok(Arc::new(Link { conn, idle: Mutex::new(Vec::new()), _socket }))
    }

    /// The broker's connection: open, or being opened (shared), or opened now; waited for
    /// until `deadline`, the attempt's.
    async fn link(
        &self,
        broker: &Broker,
        uri: &str,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Arc<Link>, Failure> {
        let opening = {
            let mut state = broker.state.lock().unwrap();
            match &*state {
                State::Open(link) if link.conn.status().connected() => return Ok(link.clone()),
                // One that ended with a failure nobody took (its attempts stopped waiting) is
                // not this attempt's answer: the broker is tried again.
                State::Opening(f) if !matches!(f.peek(), Some(Err(_))) => f.clone(),
                _ => {
                    // Bounded on its own: a peer that accepts and never speaks AMQP (a proxy
                    // with no broker behind it) would hold it, and every attempt after, for as
                    // long as its socket stays up; at most one opening is left behind a period.
                    // Its name lookup counted as the broker's tenant's (`guard::for_tenant`).
                    let open = super::guard::for_tenant(&broker.tenant, self.clone().open(uri.to_string()));
                    let within = self.open_within;
                    let f = async move {
                        tokio::time::timeout(within, open).await.unwrap_or_else(|_| {
                            Err(Failure::Connect { detail: format!("no AMQP handshake within {within:?}") })
                        })
                    }
                    .boxed()
                    .shared();
                    // Driven to its end by a task of its own: a shared future moves only while
                    // polled, and with no attempt after this one waiting on it (the subscription
                    // deleted, its URI changed), its bound never came — lapin's thread and
                    // socket were kept, and the broker, never unused, was never closed to make
                    // room (a tenant's 16 such URIs made every other broker of its `broker_busy`).
                    tokio::spawn(f.clone().map(drop));
                    *state = State::Opening(f.clone());
                    f
                }
            }
        };
        let opened = match tokio::time::timeout_at(deadline, opening.clone()).await {
            Ok(opened) => opened,
            // Still opening, and left so for the next attempt to wait on: lapin's connection
            // thread goes on with the handshake whatever becomes of this attempt (a silent
            // peer holds it until the socket fails), so opening anew would leave a thread and
            // a socket behind each attempt.
            Err(_) => return Err(timed_out(timeout)),
        };
        let mut state = broker.state.lock().unwrap();
        let ours = matches!(&*state, State::Opening(f) if f.ptr_eq(&opening));
        match opened {
            Ok(link) => {
                if ours {
                    *state = State::Open(link.clone());
                    // A broker that allows fewer channels than the window: publishes beyond
                    // them wait for a permit rather than fail to open a channel.
                    let allowed = match link.conn.configuration().channel_max() {
                        0 => CHANNELS,
                        n => usize::from(n).min(CHANNELS),
                    };
                    // (Only permits free now are taken: the rest at the next opening.)
                    let held_back = broker.held_back.load(Ordering::Relaxed);
                    if CHANNELS - allowed > held_back {
                        let taken = broker.window.forget_permits(CHANNELS - allowed - held_back);
                        broker.held_back.fetch_add(taken, Ordering::Relaxed);
                    }
                }
                Ok(link)
            }
            Err(failure) => {
                if ours {
                    *state = State::Closed;
                }
                Err(failure)
            }
        }
    }

    /// Forgets `dead`, the connection a publish found gone — only if it is still the
    /// broker's: another attempt may have begun opening the next one (or stored it), which
    /// was dropped, so connections churned and for a while outnumbered the tenant's cap.
    fn forget(broker: &Broker, dead: *const Link) {
        let mut state = broker.state.lock().unwrap();
        if matches!(&*state, State::Open(link) if std::ptr::eq(Arc::as_ptr(link), dead)) {
            *state = State::Closed;
        }
    }

    /// Publishes the signed attempt of `delivery` and waits for the broker's confirm.
    pub async fn publish(&self, target: &Target, delivery: &Delivery, signed: Signed, timeout: Duration) -> Outcome {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let failed = |failure: Failure| Outcome::failed(failure, started.elapsed());
        let Some(amqp) = &target.sub.spec.amqp else {
            return failed(Failure::Unusable { detail: "the subscription has no amqp settings".into() });
        };
        let uri = amqp.uri.expose();
        let (broker, free) = match self.broker(&target.sub.tenant, uri) {
            Ok(found) => found,
            Err(f) => return failed(f),
        };
        // Within the attempt's time: one that waited past it would still publish (lapin sends
        // on the first poll), then count a timeout, and be sent again. (Waited for only with
        // the window full, when the broker is in use and not closed to make room.)
        let _slot = match free {
            Some(slot) => slot,
            None => match window_place(&broker, deadline, timeout).await {
                Ok(slot) => slot,
                Err(f) => return failed(f),
            },
        };
        let link = match self.link(&broker, uri, deadline, timeout).await {
            Ok(link) => link,
            Err(f) => return failed(f),
        };
        // A broker under a resource alarm reads no publishes until it is over: one sent now
        // would wait its whole timeout, its payload queued in lapin for as long as the alarm
        // lasts (a tenant's broker can keep one for ever). Failed at once; retried later.
        if link.conn.status().blocked() {
            return failed(Failure::Broker {
                detail: "the broker has blocked publishing (connection.blocked: a resource alarm)".into(),
            });
        }
        let routing_key =
            amqp.routing_keys.get(&delivery.event_type).cloned().unwrap_or_else(|| delivery.event_type.clone());
        // Short strings on the wire: checked at ingest and creation, and again here for records
        // written before those checks, since an over-long one would fail the whole channel.
        if [&routing_key, &delivery.event_id, &delivery.event_type].iter().any(|s| s.len() > SHORT_STRING) {
            let detail = format!("the event id, type and routing key must be at most {SHORT_STRING} bytes for AMQP");
            return failed(Failure::Unusable { detail });
        }
        let mut headers = FieldTable::default();
        // The subscription's own headers, named in lower case (a headers exchange routes on
        // them), then the signature's, which they cannot override (`validate` refuses those
        // names) — within what a content header's frame holds (see [`HEADER_BYTES`]).
        let own = &target.sub.spec.headers;
        if header_bytes(own) <= HEADER_BYTES {
            for (name, value) in own {
                let value = AMQPValue::LongString(LongString::from(value.expose().to_string()));
                headers.insert(ShortString::from(name.to_ascii_lowercase()), value);
            }
        }
        for (name, value) in &signed.headers {
            if name != http::header::CONTENT_TYPE {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                headers.insert(ShortString::from(name.as_str()), AMQPValue::LongString(LongString::from(value)));
            }
        }
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(delivery.event_id.clone()))
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2)
            .with_timestamp(signed.at_ms.max(0) as u64 / 1000)
            .with_type(ShortString::from(delivery.event_type.clone()))
            .with_headers(headers);
        let payload = signed.body.to_bytes();
        let channel = match tokio::time::timeout_at(deadline, link.channel()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                if !link.conn.status().connected() {
                    Self::forget(&broker, Arc::as_ptr(&link));
                }
                return failed(Failure::Broker { detail: format!("opening a channel: {e}") });
            }
            Err(_) => return failed(timed_out(timeout)),
        };
        if tokio::time::Instant::now() >= deadline {
            link.put_back(channel);
            return failed(timed_out(timeout));
        }
        let publish = async {
            let confirm = channel
                .basic_publish(
                    ShortString::from(amqp.exchange.clone()),
                    ShortString::from(routing_key.clone()),
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    &payload,
                    properties,
                )
                .await?;
            confirm.await
        };
        let confirmed = tokio::time::timeout_at(deadline, publish).await;
        let outcome = match &confirmed {
            Err(_) => failed(timed_out(timeout)),
            // A closed channel (e.g. the exchange does not exist) or connection.
            Ok(Err(e)) => failed(Failure::Broker { detail: e.to_string() }),
            Ok(Ok(confirmation)) if confirmation.is_nack() => failed(Failure::Nacked),
            Ok(Ok(lapin::Confirmation::Ack(Some(_)))) => {
                failed(Failure::Unroutable { exchange: amqp.exchange.clone(), routing_key })
            }
            Ok(Ok(_)) => Outcome::Delivered { status: 200, latency: started.elapsed(), response: None },
        };
        match confirmed {
            Ok(Ok(_)) => link.put_back(channel),
            // Not reused: a late confirm would be taken for the next publish's. A dead
            // connection is found by its heartbeat and reopened by the next attempt; a live
            // one is kept, since dropping it would leave lapin's thread waiting for a slow
            // broker's close-ok, one for each timed-out attempt.
            _ => {
                Link::discard(channel);
                if !link.conn.status().connected() {
                    Self::forget(&broker, Arc::as_ptr(&link));
                }
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant's connections are closed to make room only when nothing uses them: not with
    /// a publish in flight, nor while being opened (an opening runs on when its attempt stops
    /// waiting, lapin's thread and socket with it: closed to open another, each left one
    /// behind). Another tenant's room is its own.
    #[tokio::test]
    async fn room_is_made_only_from_the_tenant_s_unused_connections() {
        let amqp = AmqpTransport::new(NetworkGuard::new(Vec::new()));
        let uri = |i: usize| format!("amqp://broker.example/vh?heartbeat={i}");
        let mut held = Vec::new();
        for i in 0..TENANT_BROKERS {
            let (broker, slot) = amqp.broker("t", &uri(i)).unwrap();
            assert!(slot.is_some(), "a place in the window with the broker");
            if i % 2 == 0 {
                held.push(slot); // a publish in flight
            } else {
                let opening: Opening = futures::future::pending().boxed().shared();
                *broker.state.lock().unwrap() = State::Opening(opening);
            }
        }
        assert!(matches!(amqp.broker("t", &uri(99)), Err(Failure::BrokerBusy { open: TENANT_BROKERS })));
        assert!(amqp.broker("other", &uri(99)).is_ok(), "another tenant's room is its own");
        held.pop(); // one publish ends: its connection makes room
        assert!(amqp.broker("t", &uri(99)).is_ok());
        assert_eq!(amqp.brokers.lock().unwrap().values().filter(|b| b.tenant == "t").count(), TENANT_BROKERS);
    }

    /// A broker nobody publishes to is forgotten (its connection closed) once unused for its
    /// idle time, with nothing else happening: it was only looked at as another broker was
    /// opened, so a deleted subscription's connection — or a changed URI's, logged in with the
    /// old password — stayed open for as long as the pool saw no new URI.
    #[tokio::test]
    async fn a_broker_unused_for_its_idle_time_is_forgotten_with_nothing_else_happening() {
        let amqp = AmqpTransport::with_times(NetworkGuard::new(Vec::new()), Duration::from_millis(200), OPEN_WITHIN);
        drop(amqp.broker("t", "amqp://broker.example/vh").unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !amqp.brokers.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the unused broker is still pooled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An opening its attempt stopped waiting for ends within its bound with nobody waiting
    /// on it, and its broker can then be closed to make room: it was driven only by attempts'
    /// waits, so with none after it (the subscription deleted, its URI changed) it never
    /// ended — lapin's thread and socket kept, the broker never unused, and a tenant's 16 such
    /// URIs left every other broker of its `broker_busy` until a restart. The next attempt
    /// opens anew rather than take the old opening's failure.
    #[tokio::test]
    async fn an_opening_nobody_waits_for_still_ends_and_gives_its_room_back() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let (accepted, mut connections) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((socket, _)) = silent.accept().await {
                let _ = accepted.send(socket); // kept open, never answered
            }
        });
        let guard = NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let amqp = AmqpTransport::with_times(guard, Duration::from_secs(3600), Duration::from_secs(2));
        let uri = format!("amqp://u:p@127.0.0.1:{port}/vh");
        let (broker, slot) = amqp.broker("t", &uri).unwrap();
        let wait = Duration::from_millis(50);
        let gave_up = amqp.link(&broker, &uri, tokio::time::Instant::now() + wait, wait).await;
        assert!(matches!(gave_up, Err(Failure::Timeout { .. })), "{:?}", gave_up.err());
        drop(slot);
        assert!(!broker.unused(), "still opening");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !broker.unused() {
            assert!(Instant::now() < deadline, "the opening nobody waits for never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut first = connections.recv().await.unwrap();
        // And its socket is closed: lapin's thread waited on the silent peer for as long as
        // it kept the socket up — a thread and a socket left behind every opening's bound.
        let mut sent = Vec::new(); // the protocol header, then nothing
        let read = tokio::io::AsyncReadExt::read_to_end(&mut first, &mut sent);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), read).await.is_ok(),
            "the given-up opening's socket is open"
        );
        // The next attempt tries the broker again.
        let again = amqp.link(&broker, &uri, tokio::time::Instant::now() + wait, wait).await;
        assert!(matches!(again, Err(Failure::Timeout { .. })), "{:?}", again.err());
        let second = tokio::time::timeout(Duration::from_secs(5), connections.recv()).await;
        assert!(second.is_ok_and(|s| s.is_some()), "no new connection to the broker");
        drop(first);
    }

    /// An attempt that waited its whole timeout for a place in its broker's window was never
    /// sent: `broker_busy`, not held against its subscription (it read `timeout`, and another
    /// subscription's slow queue opened this one's breaker).
    #[tokio::test]
    async fn an_attempt_that_found_no_place_in_the_window_was_never_sent() {
        let amqp = AmqpTransport::new(NetworkGuard::new(Vec::new()));
        let (broker, slot) = amqp.broker("t", "amqp://broker.example/vh").unwrap();
        let _full = (slot, broker.window.clone().try_acquire_many_owned((CHANNELS - 1) as u32).unwrap());
        let wait = Duration::from_millis(30);
        let failure = window_place(&broker, tokio::time::Instant::now() + wait, wait).await.unwrap_err();
        assert_eq!(failure.label(), "broker_busy", "{failure}");
        assert!(failure.never_sent(), "{failure}");
    }

    /// A publish that found its connection dead forgets that one only: an opening begun
    /// meanwhile by another attempt is kept (it was dropped, so connections churned).
    #[tokio::test]
    async fn a_dead_connection_is_forgotten_without_the_opening_after_it() {
        let amqp = AmqpTransport::new(NetworkGuard::new(Vec::new()));
        let (broker, _) = amqp.broker("t", "amqp://broker.example/vh").unwrap();
        let opening: Opening = futures::future::pending().boxed().shared();
        *broker.state.lock().unwrap() = State::Opening(opening.clone());
        let dead: *const Link = std::ptr::dangling();
        AmqpTransport::forget(&broker, dead);
        assert!(matches!(&*broker.state.lock().unwrap(), State::Opening(f) if f.ptr_eq(&opening)));
    }

    /// Herald always asks for a frame size, within bounds: left to the broker, lapin took
    /// whatever it chose — 0 ("no limit") sized its buffers at 137 GB each and the process
    /// died; a URI's tiny one split a 12 MiB event into a million frames.
    #[test]
    fn the_frame_size_is_asked_for_within_bounds() {
        let uri = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(connecting_uri(&uri("amqp://h/vh")).unwrap().query.frame_max, Some(FRAME_MAX));
        assert_eq!(connecting_uri(&uri("amqp://h/vh?frame_max=21")).unwrap().query.frame_max, Some(8192));
        assert_eq!(connecting_uri(&uri("amqp://h/vh?frame_max=0")).unwrap().query.frame_max, Some(8192));
        assert_eq!(connecting_uri(&uri("amqp://h/vh?frame_max=65536")).unwrap().query.frame_max, Some(65536));
        // A heartbeat is always asked for, at most a minute apart: left to a broker that
        // proposes none (or a URI's `heartbeat=0`), a broker that went silent — paused, its
        // host gone — was never found dead, and every publish to it waited its whole timeout.
        assert_eq!(connecting_uri(&uri("amqp://h/vh")).unwrap().query.heartbeat, Some(HEARTBEAT));
        assert_eq!(connecting_uri(&uri("amqp://h/vh?heartbeat=0")).unwrap().query.heartbeat, Some(HEARTBEAT));
        assert_eq!(connecting_uri(&uri("amqp://h/vh?heartbeat=600")).unwrap().query.heartbeat, Some(60));
        assert_eq!(connecting_uri(&uri("amqp://h/vh?heartbeat=5")).unwrap().query.heartbeat, Some(5));
        let asked_a_megabyte = connecting_uri(&uri("amqp://h/vh?frame_max=1048576")).unwrap();
        assert_eq!(asked_a_megabyte.query.frame_max, Some(FRAME_MAX), "lapin's buffers are 64 frames");
        assert_eq!(validate_new_uri(&target("amqp://h/vh?frame_max=21", "x")).unwrap_err().0, "amqp.uri");
        assert_eq!(validate_new_uri(&target("amqp://h/vh?frame_max=0", "x")).unwrap_err().0, "amqp.uri");
        assert!(validate(&target("amqp://h/vh?frame_max=131072", "x")).is_ok());
        // An IPv6 literal's brackets are the URI's: the TLS name is the address.
        assert_eq!(tls_name(&uri("amqps://[::1]:5671/vh")).as_deref(), Some("::1"));
        assert_eq!(tls_name(&uri("amqps://broker.example/vh")).as_deref(), Some("broker.example"));
        assert_eq!(tls_name(&uri("amqp://broker.example/vh")), None);
    }
    use crate::model::Secret;

    fn target(uri: &str, exchange: &str) -> AmqpTarget {
        AmqpTarget { uri: Secret(uri.into()), exchange: exchange.into(), routing_keys: Default::default() }
    }

    #[tokio::test]
    async fn the_address_connected_to_is_the_one_the_guard_checked() {
        let allowed = AmqpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]));
        let at = |u: &str| url::Url::parse(u).unwrap();
        assert_eq!(
            allowed.address(&at("amqp://user:pw@localhost:5673/%2f")).await.unwrap().to_string(),
            "127.0.0.1:5673"
        );
        let strict = AmqpTransport::new(NetworkGuard::default());
        for refused in ["amqp://localhost/", "amqp://127.0.0.1/", "amqp://[::1]/", "amqps://[::ffff:127.0.0.1]/vh"] {
            let e = strict.address(&at(refused)).await.unwrap_err();
            assert!(matches!(e, Failure::Refused { .. }), "{refused}: {e:?}");
        }
        // An IPv6 literal is kept as the address (lapin's own parser would turn it into localhost).
        let v6 = AmqpTransport::new(NetworkGuard::new(vec!["::/0".parse().unwrap()]));
        assert_eq!(
            v6.address(&at("amqp://u:p@[2001:db8::7]:5679/vh")).await.unwrap().to_string(),
            "[2001:db8::7]:5679"
        );
        let parsed = lapin_uri(&at("amqp://u:p@[2001:db8::7]:5679/vh")).unwrap();
        assert_eq!((parsed.authority.userinfo.username.as_str(), parsed.vhost.as_str()), ("u", "vh"));
    }

    #[test]
    fn targets_are_validated_naming_the_field() {
        assert!(validate(&target("amqp://h/vh", "x")).is_ok());
        assert!(validate(&target("amqp://u:p@[2001:db8::1]:5672/vh", "x")).is_ok());
        assert_eq!(validate(&target("http://h", "x")).unwrap_err().0, "amqp.uri");
        assert_eq!(validate(&target("amqp://", "x")).unwrap_err().0, "amqp.uri");
        assert_eq!(validate(&target("amqp://h", " ")).unwrap_err().0, "amqp.exchange");
        assert_eq!(validate(&target("amqp://h", &"x".repeat(256))).unwrap_err().0, "amqp.exchange");
    }
}
