//! The webhook transport: a pooled hyper client over rustls whose resolver is the network
//! guard, so every connection goes to an address that was checked. Redirects are not
//! followed; any 2xx is success.

use super::guard::{NetworkGuard, Refused};
use super::tls::{client_config, file_stamps, TlsError};
use crate::model::{Failure, Outcome, ProfileKey, Response, Tls};
use crate::payload::Body;
use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use http::{HeaderMap, Request, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Connections kept open for reuse in all, by default (see [`KeptConnections`]); fewer where
/// the open-files limit leaves fewer descriptors free (`server`).
pub const KEPT_CONNECTIONS: usize = 4096;

/// How much of a response body is read (to keep the connection reusable) before giving up.
const RESPONSE_READ_LIMIT: usize = crate::config::MAX_RESPONSE_BYTES;

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
        let (guard, tenant) = (self.guard.clone(), super::guard::current_tenant());
        Box::pin(async move { guard.resolve_for(tenant, name.as_str(), 0).await.map(|v| v.into_iter()) })
    }
}

type Connector = Bounded<hyper_rustls::HttpsConnector<Route>>;

/// A connector whose every connection is made within a time: TCP, a proxy's CONNECT and the
/// TLS handshake together (`http.connect_timeout`). A request's own timeout does not cover
/// them all: a request that takes a pooled connection while its new one is still being made
/// leaves that one to hyper-util's background, bounded by nothing else, so a receiver that
/// accepts and then says nothing kept a socket of Herald's for ever, one per such overlap.
///
/// Each connection it makes is counted in [`KeptConnections`], as its tenant's (the one
/// connecting, `guard::for_tenant`), and is kept for reuse only within their bounds.
#[derive(Clone)]
pub struct Bounded<C> {
    inner: C,
    within: Duration,
    kept: Arc<KeptConnections>,
}

/// Webhook connections open, in all and by tenant, and how many of them may be kept open for
/// reuse: one made past the bound in all, or past its tenant's share while more than half
/// the bound is open (a lone busy tenant may keep half), is closed after its request instead
/// of waiting in its pool. Pools keep up to `http.pool_max_idle_per_host` idle connections for
/// each host, for `http.pool_idle_timeout`: a tenant whose subscriptions name many hosts (one name each,
/// under a wildcard of its own) kept a descriptor open for each for 90 s, without bound —
/// until every tenant's new connections, the API's and the log's files failed.
#[derive(Debug)]
pub struct KeptConnections {
    most: usize,
    per_tenant: usize,
    /// Open in all, and by tenant (connections of no known tenant count in all only).
    open: Mutex<(usize, HashMap<Arc<str>, usize>)>,
}

impl KeptConnections {
    /// Up to `most` kept in all, a quarter of them of one tenant's once half are open.
    pub fn new(most: usize) -> Self {
        KeptConnections { most, per_tenant: (most / 4).max(1), open: Default::default() }
    }

    /// Counts a connection of `tenant`'s as open until the returned count is dropped, and
    /// says whether it is kept for reuse: only within the bound, and within the tenant's
    /// share once half the bound is open, itself counted.
    fn opened(self: &Arc<Self>, tenant: Option<Arc<str>>) -> OpenConnection {
        let mut open = self.open.lock().unwrap();
        open.0 += 1;
        let mine = tenant.as_ref().map_or(0, |t| {
            let n = open.1.entry(t.clone()).or_default();
            *n += 1;
            *n
        });
        let keep = open.0 <= self.most && (mine <= self.per_tenant || open.0 <= self.most / 2);
        OpenConnection { keep, tenant, of: self.clone() }
    }
}

/// A connection counted in [`KeptConnections`] while it is open.
struct OpenConnection {
    keep: bool,
    tenant: Option<Arc<str>>,
    of: Arc<KeptConnections>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().unwrap();
        open.0 -= 1;
        if let Some(t) = &self.tenant {
            if let Some(n) = open.1.get_mut(t) {
                *n -= 1;
                if *n == 0 {
                    open.1.remove(t);
                }
            }
        }
    }
}

/// A webhook connection, counted while open; one past the bounds of [`KeptConnections`] tells
/// its pool not to keep it (hyper-util's poison: not reused, closed once its request ends).
pub struct Counted<T> {
    io: T,
    count: OpenConnection,
}

impl<T: hyper_util::client::legacy::connect::Connection> hyper_util::client::legacy::connect::Connection
    for Counted<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let connected = self.io.connected();
        if !self.count.keep {
            connected.poison();
        }
        connected
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl<C> tower::Service<Uri> for Bounded<C>
where
    C: tower::Service<Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = Counted<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let (connecting, within) = (self.inner.call(dst), self.within);
        // Taken here, in the request's task: the connection may be finished in another.
        let (kept, tenant) = (self.kept.clone(), super::guard::current_tenant());
        Box::pin(async move {
            match tokio::time::timeout(within, connecting).await {
                Ok(made) => made.map(|io| Counted { io, count: kept.opened(tenant) }).map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {} ms (TCP, proxy and TLS)", within.as_millis()),
                )) as BoxError),
            }
        })
    }
}

/// Client settings shared by every request.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// Connections kept open for reuse in all (a quarter of them one tenant's): see
    /// [`KeptConnections`].
    pub kept_connections: usize,
    /// Bytes of each response body kept in the attempt's outcome, for the history; `None`
    /// when no history is kept: then a response's headers and body are not copied at all,
    /// only its status and `Retry-After` read (the copies were ~2 % of a delivery's CPU).
    pub response_bytes: Option<usize>,
    /// Where TLS files named by subscriptions may be read (none: content only).
    pub tls_files_dir: Option<std::path::PathBuf>,
    /// The egress proxy, if webhooks go through one.
    pub proxy: Option<Proxy>,
    /// More proxies a subscription may name (`http.proxies`).
    pub proxies: std::collections::BTreeMap<String, Proxy>,
}

/// Which way a subscription's requests leave: its `proxy` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress<'a> {
    /// As configured for all (`http.proxy`, or direct without one).
    Default,
    /// Straight to the receiver (`"proxy": "none"`).
    Direct,
    /// Through the proxy of this name in `http.proxies`.
    Named(&'a str),
}

impl<'a> Egress<'a> {
    /// The egress a subscription's `proxy` field asks for.
    pub fn of(proxy: Option<&'a str>) -> Egress<'a> {
        match proxy {
            None => Egress::Default,
            Some(crate::config::DIRECT_EGRESS) => Egress::Direct,
            Some(name) => Egress::Named(name),
        }
    }
}

/// An egress proxy (`http.proxy`) and the hosts that bypass it (`http.no_proxy`).
#[derive(Debug, Clone)]
pub struct Proxy {
    /// The proxy's address (`http://host:port`), credentials taken out.
    uri: Uri,
    /// `Proxy-Authorization` from the URL's credentials.
    auth: Option<http::HeaderValue>,
    no_proxy: Vec<crate::config::NoProxy>,
}

impl Proxy {
    /// A proxy from its URL (checked when the configuration was loaded) and the `no_proxy`
    /// list.
    pub fn parse(url: &str, no_proxy: &[String]) -> Option<Proxy> {
        let parsed = url::Url::parse(url).ok()?;
        let host = parsed.host_str()?;
        let port = parsed.port_or_known_default().unwrap_or(80);
        let uri: Uri = format!("http://{host}:{port}").parse().ok()?;
        let auth = match (parsed.username(), parsed.password()) {
            ("", None) => None,
            (user, password) => {
                let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
                let pair = format!("{}:{}", decode(user), decode(password.unwrap_or("")));
                let token = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pair);
                let mut value = http::HeaderValue::from_str(&format!("Basic {token}")).ok()?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        // Read once (the start refused any entry of no form): not at every attempt.
        let no_proxy = no_proxy.iter().filter_map(|e| crate::config::NoProxy::parse(e)).collect();
        Some(Proxy { uri, auth, no_proxy })
    }

    /// Whether `host` is reached without the proxy: NO_PROXY's forms, as curl reads them — a
    /// name and every name under it, `.domain` or `*.domain` for the names under it, `*` for
    /// every host, and an address or a range (`10.0.0.0/8`) for a URL naming an address in it
    /// (a range never matched, and those hosts went through the proxy).
    fn bypassed(&self, host: &str) -> bool {
        let host = super::guard::unbracketed(host).to_ascii_lowercase();
        let address = host.parse::<std::net::IpAddr>().ok();
        self.no_proxy.iter().any(|rule| rule.matches(&host, address))
    }
}

/// How a connection is made: straight to the guarded address, or through the egress proxy
/// with a CONNECT tunnel to that same guarded address (the proxy never resolves the target's
/// name, so it cannot be steered elsewhere by DNS after the guard's check). TLS, when the
/// target is https, runs inside the tunnel, end to end with the receiver.
#[derive(Clone)]
pub struct Route {
    direct: HttpConnector<GuardedResolver>,
    proxy: Option<(Proxy, hyper_util::client::legacy::connect::proxy::Tunnel<HttpConnector>, NetworkGuard)>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Route {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let host = dst.host().unwrap_or_default().to_string();
        match &self.proxy {
            Some((proxy, tunnel, guard)) if !proxy.bypassed(&host) => {
                let (tunnel, guard, tenant) = (tunnel.clone(), guard.clone(), super::guard::current_tenant());
                let port = dst.port_u16().unwrap_or(if dst.scheme_str() == Some("https") { 443 } else { 80 });
                Box::pin(async move {
                    let addr = *guard.resolve_for(tenant, &host, port).await?.first().ok_or("no address")?;
                    let target: Uri = format!("http://{addr}").parse()?;
                    let stream = tower::ServiceExt::oneshot(tunnel, target).await?;
                    Ok(stream)
                })
            }
            _ => {
                let direct = self.direct.clone();
                Box::pin(async move { Ok(tower::ServiceExt::oneshot(direct, dst).await?) })
            }
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            kept_connections: KEPT_CONNECTIONS,
            response_bytes: Some(1024),
            tls_files_dir: None,
            proxy: None,
            proxies: Default::default(),
        }
    }
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

/// What a pool is kept by: the TLS profile (none: the default) and the egress route.
type PoolKey = (Option<ProfileKey>, String);

/// The pools of other TLS profiles and egresses, when each was last used, and the files each
/// was built from.
/// Each profile's pool, when last used, its files, and the tenant whose subscription made it.
type Profiles = HashMap<PoolKey, (Arc<Pool>, Instant, Files, String)>;

/// The files a profile's pool was built from ([`file_stamps`]), and when they were last
/// looked at.
#[derive(Debug, Clone)]
struct Files {
    stamps: Vec<(std::path::PathBuf, Option<(u64, std::time::SystemTime)>)>,
    looked: Instant,
}

impl Files {
    /// The files `tls` names under `dir`, as they are now.
    fn look(tls: Option<&Tls>, dir: Option<&std::path::Path>) -> Files {
        Files { stamps: tls.map(|t| file_stamps(&t.options, dir)).unwrap_or_default(), looked: Instant::now() }
    }
}

/// How often the files of a profile in use are looked at again.
const FILES_LOOKED_AT_EVERY: Duration = Duration::from_secs(30);

/// How long a custom TLS profile's pool is kept without use.
const PROFILE_IDLE: Duration = Duration::from_secs(600);

/// Custom profiles one tenant's subscriptions may have made and kept at once: past it, its
/// least recently used one is dropped (with its pool's idle connections) for the next. Kept
/// by age alone, a tenant changing `ca_pem` at its request rate made some fifty a second, each
/// a pool with its roots and an open connection, for ten minutes: memory and descriptors
/// every tenant needs.
const TENANT_PROFILES: usize = 32;

/// Pooled HTTP(S) clients: one for the default TLS profile and egress, one per other pair of
/// TLS profile and egress route.
#[derive(Clone)]
pub struct HttpTransport {
    default: Arc<Pool>,
    /// Custom profiles and when each was last used: one unused for `PROFILE_IDLE` (its
    /// subscriptions deleted or changed) is dropped when another is built, so tenants cannot
    /// grow this map without bound.
    profiles: Arc<Mutex<Profiles>>,
    /// Builds of profiles with a PKCS#12 file, one at a time, tenants in turns (see
    /// [`HttpTransport::build`]).
    heavy_builds: crate::model::TakenInTurns,
    /// Profiles being built, and those whose build failed lately.
    builds: Arc<Mutex<HashMap<PoolKey, Build>>>,
    guard: NetworkGuard,
    settings: HttpSettings,
    /// Connections open and kept, over every pool (see [`KeptConnections`]).
    kept: Arc<KeptConnections>,
}

/// A profile's build, shared by the attempts waiting for it.
type SharedBuild = Shared<BoxFuture<'static, Result<Arc<Pool>, Failure>>>;

/// A profile's build under way, or how it failed.
enum Build {
    Running(SharedBuild),
    Failed(Instant, Failure),
}

/// How long a profile whose build failed is not built again (its attempts fail at once): long
/// enough that a broken PKCS#12 file costs one key derivation per interval, not one per
/// attempt; short, since a file fixed in place keeps its profile's key.
const FAILED_BUILD_KEPT: Duration = Duration::from_secs(5);

/// A pool as [`HttpTransport::pool_for`] finds it.
enum Found<'a> {
    Ready(Cow<'a, Arc<Pool>>),
    /// Not built yet (or dropped after a while unused): its key and proxy, to build it.
    Missing(PoolKey, Option<Proxy>),
}

fn pool(
    guard: &NetworkGuard,
    settings: &HttpSettings,
    kept: &Arc<KeptConnections>,
    proxy: Option<&Proxy>,
    tls: rustls::ClientConfig,
) -> Pool {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver { guard: guard.clone() });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    let proxy = proxy.cloned().map(|p| {
        // The proxy is the operator's: reached by its own name, not through the guard.
        let mut to_proxy = HttpConnector::new();
        to_proxy.set_nodelay(true);
        to_proxy.set_connect_timeout(Some(settings.connect_timeout));
        let mut tunnel = hyper_util::client::legacy::connect::proxy::Tunnel::new(p.uri.clone(), to_proxy);
        if let Some(auth) = p.auth.clone() {
            tunnel = tunnel.with_auth(auth);
        }
        (p, tunnel, guard.clone())
    });
    // HTTP/1.1 only, a connection to each attempt at a time. Over HTTP/2 a pool has one
    // connection per host, shared by every tenant whose subscriptions name it: one tenant's
    // slow endpoint on a shared host (a hosted inbox, an integration platform) filled the
    // streams the receiver allows and another tenant's attempts there queued behind them
    // until they timed out; the shared connection was never closed for the bounds of
    // [`KeptConnections`], and one gone silent (a NAT's state dropped) took every tenant's
    // attempts to that host with it, where a timed-out HTTP/1.1 request ends its own.
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(Route { direct: http, proxy });
    let connector = Bounded { inner: connector, within: settings.connect_timeout, kept: kept.clone() };
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
        let tls = client_config(None, None).expect("the default TLS profile builds");
        let kept = Arc::new(KeptConnections::new(settings.kept_connections));
        let default = Arc::new(pool(&guard, settings, &kept, settings.proxy.as_ref(), tls));
        HttpTransport {
            default,
            profiles: Default::default(),
            heavy_builds: Default::default(),
            builds: Default::default(),
            guard,
            settings: settings.clone(),
            kept,
        }
    }

    /// The pool for a TLS profile and an egress, waiting at most `within` for it to be built
    /// (on first use, see [`HttpTransport::build`]). The default one is lent, not cloned: a
    /// client's clone (its connector, resolver and proxy settings, each a shared count both
    /// cores write) was about 2 % of Herald's CPU (`perf`), and `Client::request` already
    /// makes one per delivery. Either way only a pointer: what a send holds, every delivery's
    /// future carries (a client by value is about 700 bytes; see `Deliverer::deliver`).
    async fn pool_for(
        &self,
        tls: Option<&Tls>,
        egress: Egress<'_>,
        within: Duration,
        tenant: &str,
    ) -> Result<Cow<'_, Arc<Pool>>, Failure> {
        match self.find(tls, egress)? {
            Found::Ready(pool) => Ok(pool),
            // Boxed: rare, and it would add to every delivery's future.
            Found::Missing(key, proxy) => Box::pin(self.build(key, proxy, tls, within, tenant)).await.map(Cow::Owned),
        }
    }

    /// The pool for a TLS profile and an egress if it is built.
    fn find(&self, tls: Option<&Tls>, egress: Egress<'_>) -> Result<Found<'_>, Failure> {
        if tls.is_none() && egress == Egress::Default {
            return Ok(Found::Ready(Cow::Borrowed(&self.default)));
        }
        let proxy = match egress {
            Egress::Default => self.settings.proxy.as_ref(),
            Egress::Direct => None,
            Egress::Named(name) => Some(self.settings.proxies.get(name).ok_or_else(|| Failure::Unusable {
                detail: format!("no egress proxy named {name:?} is configured (http.proxies)"),
            })?),
        };
        let route = match egress {
            Egress::Default => String::new(),
            Egress::Direct => crate::config::DIRECT_EGRESS.into(),
            Egress::Named(name) => format!("={name}"),
        };
        let key = (tls.map(|t| t.key.clone()), route);
        let mut profiles = self.profiles.lock().unwrap();
        if let Some((p, used, files, _)) = profiles.get_mut(&key) {
            *used = Instant::now();
            if files.stamps.is_empty() || files.looked.elapsed() < FILES_LOOKED_AT_EVERY {
                return Ok(Found::Ready(Cow::Owned(p.clone())));
            }
            // A file replaced in place (a renewed certificate) was used as it was when the
            // pool was built, for as long as the pool was in use — past the old one's expiry.
            let now = Files::look(tls, self.settings.tls_files_dir.as_deref());
            if now.stamps == files.stamps {
                *files = now;
                return Ok(Found::Ready(Cow::Owned(p.clone())));
            }
            profiles.remove(&key);
        }
        Ok(Found::Missing(key, proxy.cloned()))
    }

    /// Builds a profile's pool off the runtime's threads: its material may be files to read,
    /// and opening a PKCS#12 file is key derivation, up to a second of CPU. On a runtime
    /// thread, a tenant's few such subscriptions held every tenant's deliveries (and timers)
    /// for as long; these builds go one at a time, as the registry's checks of them do. The
    /// build runs on by itself and settles the cache, so an attempt that stops waiting for it
    /// (at `within`, its timeout) leaves it built for the next.
    async fn build(
        &self,
        key: PoolKey,
        proxy: Option<Proxy>,
        tls: Option<&Tls>,
        within: Duration,
        tenant: &str,
    ) -> Result<Arc<Pool>, Failure> {
        // One build of a profile at a time, shared by every attempt waiting for it; one that
        // failed is not tried again for a while: each try of a broken PKCS#12 file was a
        // second of key derivation, queued behind every other tenant's.
        let shared = {
            let mut builds = self.builds.lock().unwrap();
            match builds.get(&key) {
                Some(Build::Running(running)) => running.clone(),
                Some(Build::Failed(at, failure)) if at.elapsed() < FAILED_BUILD_KEPT => return Err(failure.clone()),
                _ => {
                    if let Some((pool, ..)) = self.profiles.lock().unwrap().get(&key) {
                        return Ok(pool.clone()); // built since it was looked for
                    }
                    builds.retain(|_, b| !matches!(b, Build::Failed(at, _) if at.elapsed() >= FAILED_BUILD_KEPT));
                    let running = self.start_build(key.clone(), proxy, tls.cloned(), tenant);
                    builds.insert(key, Build::Running(running.clone()));
                    running
                }
            }
        };
        let unready = || Failure::Unready { after_ms: crate::model::whole_millis(within) };
        tokio::time::timeout(within, shared).await.unwrap_or_else(|_| Err(unready()))
    }

    /// Runs a profile's build in a task of its own (see [`HttpTransport::build`]), which
    /// settles `builds` when it ends.
    fn start_build(&self, key: PoolKey, proxy: Option<Proxy>, tls: Option<Tls>, tenant: &str) -> SharedBuild {
        let heavy =
            tls.as_ref().is_some_and(|t| t.options.client_p12.is_some() || t.options.client_cert_file.is_some());
        let this = self.clone();
        let tenant = tenant.to_string();
        let task = tokio::spawn(async move {
            let one = match heavy {
                true => Some(this.heavy_builds.turn(&tenant).await),
                false => None,
            };
            let (builder, key_built) = (this.clone(), key.clone());
            let built = tokio::task::spawn_blocking(move || {
                let _one = one;
                let this = builder;
                let dir = this.settings.tls_files_dir.as_deref();
                // Looked at before they are read: a file replaced meanwhile is read again later.
                let files = Files::look(tls.as_ref(), dir);
                let config = client_config(tls.as_ref().map(|t| &t.options), dir)
                    .map_err(|e: TlsError| Failure::Unusable { detail: e.to_string() })?;
                let built = Arc::new(pool(&this.guard, &this.settings, &this.kept, proxy.as_ref(), config));
                let mut profiles = this.profiles.lock().unwrap();
                profiles.retain(|_, (_, used, ..)| used.elapsed() < PROFILE_IDLE);
                if !profiles.contains_key(&key_built) {
                    let mine = profiles.iter().filter(|(_, (.., by))| *by == tenant);
                    if mine.clone().count() >= TENANT_PROFILES {
                        if let Some(oldest) = mine.min_by_key(|(_, (_, used, ..))| *used).map(|(k, _)| k.clone()) {
                            profiles.remove(&oldest);
                        }
                    }
                }
                let entry = profiles.entry(key_built).or_insert((built, Instant::now(), files, tenant));
                Ok(entry.0.clone())
            })
            .await
            .unwrap_or_else(|e| Err(Failure::Unusable { detail: format!("building the TLS profile failed: {e}") }));
            let mut builds = this.builds.lock().unwrap();
            match &built {
                Ok(_) => builds.remove(&key),
                Err(failure) => builds.insert(key, Build::Failed(Instant::now(), failure.clone())),
            };
            built
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(Failure::Unusable { detail: format!("building the TLS profile failed: {e}") }))
        }
        .boxed()
        .shared()
    }

    /// Refuses IP-literal hosts outside the guard (names are checked by the resolver).
    fn check_literal(&self, uri: &Uri) -> Result<(), Failure> {
        self.guard.check_host(uri.host().unwrap_or_default()).map_err(|e| Failure::Refused { detail: e.to_string() })
    }

    /// A request whose whole (small) response body is wanted, e.g. an OAuth token request.
    pub async fn exchange(
        &self,
        request: Request<Body>,
        timeout: Duration,
        tls: Option<&Tls>,
        egress: Egress<'_>,
        tenant: &str,
    ) -> Result<(u16, Bytes), Failure> {
        let started = Instant::now();
        self.check_literal(request.uri())?;
        let client = self.pool_for(tls, egress, timeout, tenant).await?;
        let call = async {
            // Its name lookups are counted as the tenant's, as a webhook's are (`send`): a token
            // fetch runs in a task of its own, outside the delivery's.
            let sent = super::guard::for_tenant(tenant, client.request(request));
            let response = sent.await.map_err(|e| classify(&e))?;
            let status = response.status().as_u16();
            let body = http_body_util::Limited::new(response.into_body(), 1 << 20)
                .collect()
                .await
                .map_err(|e| Failure::Connect { detail: e.to_string() })?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(timeout.saturating_sub(started.elapsed()), call).await.map_err(|_| timed_out(timeout))?
    }

    /// Sends one request and reports what happened. Never panics, never hangs past `timeout`.
    pub async fn send(&self, req: WebhookRequest, tls: Option<&Tls>, egress: Egress<'_>, tenant: &str) -> Outcome {
        let started = Instant::now();
        if let Err(refused) = self.check_literal(&req.uri) {
            return Outcome::failed(refused, started.elapsed());
        }
        // Not `pool_for`: its future would add to every delivery's, for a path taken once a profile.
        let client = match self.find(tls, egress) {
            Ok(Found::Ready(c)) => c,
            Ok(Found::Missing(key, proxy)) => match Box::pin(self.build(key, proxy, tls, req.timeout, tenant)).await {
                Ok(built) => Cow::Owned(built),
                Err(failure) => return Outcome::failed(failure, started.elapsed()),
            },
            Err(failure) => return Outcome::failed(failure, started.elapsed()),
        };
        // Taken apart, so that only `timeout`, not the whole request's room, is held across
        // the send's awaits.
        let WebhookRequest { uri, headers, body, timeout } = req;
        let mut request = Request::post(uri).body(body).expect("method, uri and body are valid");
        *request.headers_mut() = headers;
        let keep = self.settings.response_bytes;
        let latency = || started.elapsed();
        // The timeout counts from the start: building a profile's pool took some of it.
        let deadline = tokio::time::Instant::now() + timeout.saturating_sub(started.elapsed());
        // Its name lookups are counted as the tenant's (see `guard::for_tenant`).
        let sent = super::guard::for_tenant(tenant, client.request(request));
        let response = match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Outcome::failed(classify(&e), latency()),
            Err(_) => return Outcome::failed(timed_out(timeout), latency()),
        };
        let (parts, mut body) = response.into_parts();
        // The answer is in. A little of the body is read, within what is left of the timeout,
        // so the connection can be reused and its start kept; a body that stalls ends that
        // (dropping the connection), not the answer: a 200 whose body never ends was taken.
        let mut kept = BytesMut::new();
        let mut cut = false;
        let reading = async {
            let mut read = 0usize;
            while read < RESPONSE_READ_LIMIT {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        let Some(data) = frame.data_ref() else { continue };
                        read += data.len();
                        let room = keep.unwrap_or(0).saturating_sub(kept.len());
                        cut |= data.len() > room;
                        kept.extend_from_slice(&data[..data.len().min(room)]);
                    }
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, reading).await;
        let status = parts.status.as_u16();
        let kept = if cut { crate::model::outcome::whole_characters(kept.freeze()) } else { kept.freeze() };
        let response = keep.map(|_| Response::new(status, &parts.headers, kept));
        if (200..300).contains(&status) {
            return Outcome::Delivered { status, latency: latency(), response };
        }
        let failure = Failure::Status { status, retry_after_ms: retry_after(&parts.headers) };
        Outcome::Failed { failure, latency: latency(), response }
    }
}

/// The receiver's `Retry-After` in ms, when it gave one in seconds.
fn retry_after(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Past u64 (20 digits and more): the longest wait, capped where it is used.
        return Some(value.parse::<u64>().map_or(u64::MAX, |seconds| seconds.saturating_mul(1000)));
    }
    // Or an HTTP date (RFC 9110 allows both): the wait until then, none if it has passed.
    let at = httpdate::parse_http_date(value).ok()?;
    let wait = at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    Some(crate::model::whole_millis(wait))
}

/// A timeout failure of `timeout`.
pub(crate) fn timed_out(timeout: Duration) -> Failure {
    Failure::Timeout { after_ms: crate::model::whole_millis(timeout) }
}

/// `e` as a `T`, or the `T` an `io::Error` wraps (whose `source` skips it).
fn found<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    e.downcast_ref::<T>().or_else(|| e.downcast_ref::<std::io::Error>()?.get_ref()?.downcast_ref::<T>())
}

/// What kind of failure a client error is: the guard's refusal, TLS, or the connection.
fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    let mut tls = false;
    while let Some(s) = source {
        detail = format!("{detail}: {s}");
        if let Some(refused) = found::<Refused>(s) {
            return Failure::Refused { detail: refused.to_string() };
        }
        tls |= found::<rustls::Error>(s).is_some();
        source = s.source();
    }
    if tls {
        Failure::Tls { detail }
    } else {
        Failure::Connect { detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TlsOptions;

    /// NO_PROXY's forms as curl reads them: a range and a wildcard were kept and never matched,
    /// and those hosts went through the proxy.
    #[test]
    fn no_proxy_takes_names_domains_wildcards_addresses_and_ranges() {
        let rules: Vec<String> =
            ["hooks.internal", ".corp.example", "*.svc.local", "10.0.0.0/8", "192.0.2.7", "fd00::/8"]
                .map(Into::into)
                .to_vec();
        let proxy = Proxy::parse("http://proxy.example:3128", &rules).unwrap();
        for direct in [
            "hooks.internal",
            "a.hooks.internal",
            "x.corp.example",
            "a.svc.local",
            "10.1.2.3",
            "192.0.2.7",
            "[fd00::1]",
        ] {
            assert!(proxy.bypassed(direct), "{direct}");
        }
        for proxied in
            ["internal", "corp-example.com", "svc.local.evil", "11.0.0.1", "192.0.2.8", "[2001:db8::1]", "10.example"]
        {
            assert!(!proxy.bypassed(proxied), "{proxied}");
        }
        assert!(Proxy::parse("http://proxy.example:3128", &["*".to_string()]).unwrap().bypassed("anything.example"));
    }

    /// A send finds its pool by the profile key its target worked out once: worked out at
    /// each send, digesting the options (certificates included) took 47 µs of a delivery for
    /// a tenant's CA bundle of 64 KiB.
    #[test]
    fn a_send_finds_its_pool_without_digesting_its_tls_material() {
        let http = HttpTransport::new(NetworkGuard::new(Vec::new()), &HttpSettings::default());
        let tls = Tls::new(TlsOptions { ca_pem: Some("x".repeat(65_536)), ..TlsOptions::default() });
        let digests = || crate::model::DIGESTS.with(|n| n.get());
        let before = digests();
        for _ in 0..10 {
            assert!(matches!(http.find(Some(&tls), Egress::Default), Ok(Found::Missing(..))));
        }
        assert_eq!(digests(), before, "the options were digested again");
    }

    /// A CA file replaced in place (renewed) is read again once the profile's files are next
    /// looked at: before, the pool built from the old file served for as long as it was used.
    #[tokio::test]
    async fn a_profile_whose_file_was_replaced_is_built_again() {
        let dir = tempfile::tempdir().unwrap();
        let ca = |name: &str| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
        };
        std::fs::write(dir.path().join("ca.pem"), ca("first")).unwrap();
        let settings = HttpSettings { tls_files_dir: Some(dir.path().to_path_buf()), ..HttpSettings::default() };
        let http = HttpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]), &settings);
        let tls = Tls::new(TlsOptions { ca_file: Some("ca.pem".into()), ..TlsOptions::default() });
        let Ok(Found::Missing(key, proxy)) = http.find(Some(&tls), Egress::Default) else { panic!("not built yet") };
        http.build(key, proxy, Some(&tls), Duration::from_secs(10), "t").await.unwrap();
        assert!(matches!(http.find(Some(&tls), Egress::Default), Ok(Found::Ready(_))));
        std::fs::write(dir.path().join("ca.pem"), ca("renewed, with a longer name")).unwrap();
        // Until the files are next looked at, the pool stands.
        assert!(matches!(http.find(Some(&tls), Egress::Default), Ok(Found::Ready(_))));
        for (_, _, files, _) in http.profiles.lock().unwrap().values_mut() {
            files.looked -= FILES_LOOKED_AT_EVERY;
        }
        assert!(matches!(http.find(Some(&tls), Egress::Default), Ok(Found::Missing(..))), "built again");
    }

    #[test]
    fn retry_after_reads_seconds_or_a_date_wherever_the_header_is() {
        let mut headers = HeaderMap::new();
        for i in 0..40 {
            headers.insert(http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(), "v".parse().unwrap());
        }
        assert_eq!(retry_after(&headers), None);
        // After more headers than a kept response holds (it used to be read from those).
        headers.insert(http::header::RETRY_AFTER, " 7 ".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(7_000));
        // Seconds past u64 are the longest wait (capped where it is used), not none at all.
        headers.insert(http::header::RETRY_AFTER, "99999999999999999999".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(u64::MAX));
        for unusable in ["-1", "1.5", "", "Wed, 32 Oct 2026 07:28:00 GMT"] {
            headers.insert(http::header::RETRY_AFTER, unusable.parse().unwrap());
            assert_eq!(retry_after(&headers), None, "{unusable:?}");
        }
        // An HTTP date: the wait until then (a past one: none).
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        headers.insert(http::header::RETRY_AFTER, soon.parse().unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!((118_000..=120_000).contains(&wait), "{wait}");
        headers.insert(http::header::RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(0));
    }

    /// A connection made for a request that then took a pooled one (hyper-util goes on making
    /// it, in the background, for the pool) is bounded by `connect_timeout` too, TLS included:
    /// a receiver that accepts and then says nothing cannot keep a socket of Herald's for
    /// ever per overlap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_left_to_the_background_is_bounded_by_the_connect_timeout() {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use tokio::io::AsyncReadExt;
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, silent_closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (count, closed) = (accepted.clone(), silent_closed.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                if count.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The first connection answers, slowly: 300 ms a request.
                    let tls = acceptor.accept(stream).await.unwrap();
                    let svc = hyper::service::service_fn(|_req| async {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new()))
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc),
                    );
                } else {
                    // Later ones are taken and never answered: no TLS handshake comes back.
                    let closed = closed.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                        closed.store(true, Ordering::SeqCst);
                    });
                }
            }
        });
        let settings = HttpSettings { connect_timeout: Duration::from_millis(500), ..HttpSettings::default() };
        let http = HttpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]), &settings);
        let tls = Tls::new(TlsOptions { ca_pem: Some(ca.pem()), ..Default::default() });
        let request = |path: &str| WebhookRequest {
            uri: format!("https://localhost:{port}{path}").parse().unwrap(),
            headers: HeaderMap::new(),
            body: Body::new([Bytes::from_static(b"{}")]),
            timeout: Duration::from_secs(2),
        };
        let first = http.send(request("/a"), Some(&tls), Egress::Direct, "t");
        let second = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            http.send(request("/b"), Some(&tls), Egress::Direct, "t").await
        };
        let (a, b) = tokio::join!(first, second);
        assert!(matches!(a, Outcome::Delivered { .. }) && matches!(b, Outcome::Delivered { .. }), "{a:?} {b:?}");
        assert!(accepted.load(Ordering::SeqCst) >= 2, "the second request opened a connection of its own");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !silent_closed.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the connection left to the background is still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A receiver that answers 200 and then stalls its body took the event: the attempt is
    /// delivered (its body's start kept), not a timeout to be sent again.
    #[tokio::test]
    async fn a_status_whose_body_stalls_is_the_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab").await;
                    let _ = stream.read(&mut buf).await; // held until Herald lets go
                });
            }
        });
        let settings = HttpSettings { response_bytes: Some(64), ..HttpSettings::default() };
        let http = HttpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]), &settings);
        let request = WebhookRequest {
            uri: format!("http://127.0.0.1:{port}/hook").parse().unwrap(),
            headers: HeaderMap::new(),
            body: Body::new([Bytes::from_static(b"{}")]),
            timeout: Duration::from_millis(300),
        };
        match http.send(request, None, Egress::Direct, "t").await {
            Outcome::Delivered { status: 200, response: Some(r), .. } => assert_eq!(&r.body[..], b"ab"),
            other => panic!("{other:?}"),
        }
    }

    /// A tenant's connections are kept for reuse up to its share of the bound (or half of it,
    /// while fewer are open), and the rest closed once their request ends — another tenant's
    /// still kept: a tenant naming many hosts kept a descriptor open for each, up to 90 s,
    /// without bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_keeps_its_share_of_connections_open_and_no_more() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // Receivers on three ports (three hosts to the pools), counting connections made and
        // open.
        let (made, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut ports = Vec::new();
        for _ in 0..3 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(listener.local_addr().unwrap().port());
            let (made, open) = (made.clone(), open.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    made.fetch_add(1, Ordering::SeqCst);
                    open.fetch_add(1, Ordering::SeqCst);
                    let open = open.clone();
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new()))
                    });
                    tokio::spawn(async move {
                        let served = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                        let _ = served.await;
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        }
        // Four kept in all: one of a tenant's once two are open.
        let settings = HttpSettings { kept_connections: 4, ..HttpSettings::default() };
        let http = HttpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]), &settings);
        let request = |port: u16| WebhookRequest {
            uri: format!("http://127.0.0.1:{port}/hook").parse().unwrap(),
            headers: HeaderMap::new(),
            body: Body::new([Bytes::from_static(b"{}")]),
            timeout: Duration::from_secs(5),
        };
        for &port in &ports {
            let sent = http.send(request(port), None, Egress::Direct, "greedy").await;
            assert!(matches!(sent, Outcome::Delivered { .. }), "{sent:?}");
        }
        assert_eq!(made.load(Ordering::SeqCst), 3);
        let deadline = Instant::now() + Duration::from_secs(10);
        while open.load(Ordering::SeqCst) > 2 {
            assert!(Instant::now() < deadline, "{} of the tenant's connections kept open", open.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Another tenant's connection is kept, and the first tenant's kept one too: a request
        // of each is served without a new connection (one sent before the last one's
        // connection was back in its pool makes one; a connection not kept never is).
        for (tenant, port) in [("other", ports[2]), ("greedy", ports[0])] {
            let reused = async {
                loop {
                    let before = made.load(Ordering::SeqCst);
                    let sent = http.send(request(port), None, Egress::Direct, tenant).await;
                    assert!(matches!(sent, Outcome::Delivered { .. }), "{sent:?}");
                    if made.load(Ordering::SeqCst) == before {
                        break;
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(10), reused).await.expect("a connection of the tenant's kept");
        }
    }

    /// One tenant's custom TLS profiles are kept up to a bound, its least recently used
    /// dropped first — another tenant's stay: a tenant changing its `ca_pem` at its request
    /// rate made a pool each time, kept ten minutes.
    #[tokio::test]
    async fn a_tenant_keeps_a_bounded_number_of_tls_profiles() {
        let http =
            HttpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]), &HttpSettings::default());
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap().cert.pem();
        let tls = |i: usize| Tls::new(TlsOptions { ca_pem: Some(format!("{ca}\n# {i}\n")), ..Default::default() });
        let request = || WebhookRequest {
            uri: "https://127.0.0.1:9/hook".parse().unwrap(),
            headers: HeaderMap::new(),
            body: Body::new([Bytes::from_static(b"{}")]),
            timeout: Duration::from_secs(2),
        };
        http.send(request(), Some(&tls(1000)), Egress::Direct, "other").await;
        for i in 0..TENANT_PROFILES + 20 {
            http.send(request(), Some(&tls(i)), Egress::Direct, "many").await;
        }
        let profiles = http.profiles.lock().unwrap();
        let of = |tenant: &str| profiles.values().filter(|(.., by)| by == tenant).count();
        assert_eq!((of("many"), of("other")), (TENANT_PROFILES, 1));
    }

    /// An attempt whose TLS profile is still being built when its timeout runs out (behind
    /// another tenant's PKCS#12 build: key derivation, one at a time) was never sent: it is
    /// Herald's own wait, not held against the endpoint's health nor timed as a request.
    #[tokio::test]
    async fn an_attempt_that_waited_for_its_tls_profile_is_herald_s_own_wait() {
        let http =
            HttpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]), &HttpSettings::default());
        let another_s = http.heavy_builds.turn("another").await;
        let tls = Tls::new(TlsOptions { client_cert_file: Some("client.pem".into()), ..Default::default() });
        let request = WebhookRequest {
            uri: "https://127.0.0.1:9/hook".parse().unwrap(),
            headers: HeaderMap::new(),
            body: Body::new([Bytes::from_static(b"{}")]),
            timeout: Duration::from_millis(200),
        };
        let outcome = http.send(request, Some(&tls), Egress::Direct, "t").await;
        drop(another_s);
        let Outcome::Failed { failure, .. } = &outcome else { panic!("{outcome:?}") };
        assert_eq!(failure.label(), "timeout", "{failure}");
        assert!(failure.heralds_own() && failure.never_sent(), "{failure:?}");
        assert!(failure.to_string().contains("TLS profile"), "says what it waited for: {failure}");
    }

    /// A profile whose build fails is not built again at each attempt (a broken PKCS#12
    /// file's is a second of key derivation, queued before every other tenant's builds):
    /// attempts within a while fail at once with the same reason.
    #[tokio::test]
    async fn a_profile_that_failed_to_build_is_not_built_again_at_once() {
        let http =
            HttpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]), &HttpSettings::default());
        let tls = Tls::new(TlsOptions { ca_pem: Some("not a certificate".into()), ..Default::default() });
        let request = || WebhookRequest {
            uri: "https://127.0.0.1:9/hook".parse().unwrap(),
            headers: HeaderMap::new(),
            body: Body::new([Bytes::from_static(b"{}")]),
            timeout: Duration::from_secs(2),
        };
        let attempts =
            futures::future::join_all((0..20).map(|_| http.send(request(), Some(&tls), Egress::Direct, "t"))).await;
        for outcome in &attempts {
            assert!(matches!(outcome, Outcome::Failed { failure: Failure::Unusable { .. }, .. }), "{outcome:?}");
        }
        let builds = http.builds.lock().unwrap();
        assert_eq!(builds.len(), 1, "one build for the profile");
        assert!(matches!(builds.values().next(), Some(Build::Failed(..))), "remembered as failed");
    }
}
