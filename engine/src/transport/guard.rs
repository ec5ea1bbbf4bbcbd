//! The network guard: webhook targets in private, loopback, link-local and metadata ranges
//! are refused unless `network.allow` lists them, and those in `network.deny` always. Names
//! are checked on the addresses they resolve to, at connect time, and the checked address is
//! the one connected to.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Refusal of a target address. Its text does not name the address: a tenant learns that its
/// host was refused, not what an internal name resolves to (operators see it in `addr`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{}", if *.denied {
    "the target's address is in a range the operator refuses (network.deny)"
} else {
    "the target's address is in a private, loopback, link-local or reserved range; allow it with network.allow (HERALD_NETWORK_ALLOW)"
})]
pub struct Refused {
    /// The refused address.
    pub addr: IpAddr,
    /// Refused by `network.deny` (else as a special range `network.allow` does not list).
    pub denied: bool,
}

/// Decides which addresses webhook targets may have.
#[derive(Debug, Clone, Default)]
pub struct NetworkGuard {
    allow: Arc<Vec<IpNet>>,
    /// Ranges refused whatever `allow` says: public addresses the special ranges do not cover
    /// that are still the operator's own (Herald's hosts' global IPv6 addresses, a VPC's, the
    /// Kafka brokers').
    deny: Arc<Vec<IpNet>>,
}

fn special_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local() // includes 169.254.169.254, the cloud metadata address
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking, often internal
        || o == [168, 63, 129, 16] // Azure's host endpoint (wireserver, metadata)
        || o[0] >= 240 // reserved
}

/// The IPv4 address an IPv6 address carries, if it is one of the forms that reach it:
/// IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), IPv4-translated
/// (`::ffff:0:a.b.c.d`, which a host doing SIIT sends to the IPv4 address), 6to4
/// (`2002:AABB:CCDD::/48`) or Teredo (`2001:0::/32`, the client address inverted in the last 32 bits).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if (s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified()) || s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(v4(s[1], s[2]));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Some(v4(!s[6], !s[7]));
    }
    None
}

fn special_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local (fd00:ec2::254 metadata too)
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated, still routed in places)
        || (s[0] == 0x64 && s[1] == 0xff9b) // 64:ff9b::/96 NAT64 can reach anything
        || embedded_v4(ip).is_some_and(special_v4)
}

impl NetworkGuard {
    /// A guard that lets `allow` through.
    pub fn new(allow: Vec<IpNet>) -> Self {
        NetworkGuard { allow: Arc::new(allow), deny: Default::default() }
    }

    /// This guard, refusing `deny` too, whatever it allows.
    pub fn denying(self, deny: Vec<IpNet>) -> Self {
        NetworkGuard { deny: Arc::new(deny), ..self }
    }

    /// Whether `addr` may be connected to.
    pub fn check(&self, addr: IpAddr) -> Result<(), Refused> {
        // An IPv4-mapped IPv6 address is judged as the IPv4 address it carries (other
        // embeddings are judged by `special_v6`).
        let ip = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        // Every form that reaches an IPv4 address is judged by that address too.
        let carried = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let listed = |nets: &[IpNet]| {
            nets.iter().any(|n| n.contains(&ip) || n.contains(&addr) || carried.is_some_and(|c| n.contains(&c)))
        };
        if listed(&self.deny) {
            return Err(Refused { addr, denied: true });
        }
        let special = match ip {
            IpAddr::V4(v4) => special_v4(v4),
            IpAddr::V6(v6) => special_v6(v6),
        };
        if !special || self.allow.iter().any(|n| n.contains(&ip) || n.contains(&addr)) {
            Ok(())
        } else {
            Err(Refused { addr, denied: false })
        }
    }

    /// The address a URL's host spells when it is an IP literal (`[::1]` brackets allowed).
    pub fn literal(host: &str) -> Option<IpAddr> {
        unbracketed(host).parse().ok()
    }

    /// Checks a host as a URL writes it: an IP literal against the ranges now; a name passes
    /// here and is judged by what it resolves to when connecting.
    pub fn check_host(&self, host: &str) -> Result<(), Refused> {
        Self::literal(host).map_or(Ok(()), |ip| self.check(ip))
    }

    /// Resolves `host` and keeps only allowed addresses; refuses when none is left. The lookup
    /// counts as the tenant of the connection being made ([`for_tenant`]), if there is one.
    pub async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        self.resolve_for(current_tenant(), host, port).await
    }

    /// [`NetworkGuard::resolve`] for `tenant` (taken where a lookup is asked for, before it
    /// may be moved to another task).
    pub async fn resolve_for(
        &self,
        tenant: Option<Arc<str>>,
        host: &str,
        port: u16,
    ) -> std::io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = match Self::literal(host) {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => {
                let name = unbracketed(host).to_string();
                bounded_lookup(&LOOKUPS, tenant, move || {
                    std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port)).map(Iterator::collect)
                })
                .await?
            }
        };
        let mut refused = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check(a.ip()) {
                Ok(()) => true,
                Err(e) => {
                    refused = Some(e);
                    false
                }
            })
            .collect();
        match (allowed.is_empty(), refused) {
            (true, Some(e)) => Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e)),
            _ => Ok(allowed),
        }
    }
}

/// A URL's host without the brackets an IPv6 literal is written in (`[::1]` is `::1`): the
/// host itself, to name, parse or compare.
pub fn unbracketed(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Name lookups (the system's resolver: a blocking call) running at once, at most. Each holds
/// a thread of the runtime's blocking pool until the resolver answers — seconds, for a name
/// whose servers are slow or silent — however soon the connection that asked gave up waiting;
/// unbounded, a tenant's slow names took every thread of the pool, which reads of the embedded
/// log, the Kafka client's calls and history queries need too. A quarter of the pool's 512.
const LOOKUPS_AT_ONCE: usize = 128;

/// Of those, one tenant's at most: a tenant whose names never answer (about ten new
/// connections a second to names whose servers are silent kept all 128 taken) waits on its
/// own lookups, not every tenant's — other tenants' connections failed at the connect
/// timeout, counted against their endpoints' health.
const LOOKUPS_PER_TENANT: usize = 16;

static LOOKUPS: std::sync::LazyLock<crate::model::TakenInTurns> =
    std::sync::LazyLock::new(|| crate::model::TakenInTurns::new(LOOKUPS_AT_ONCE, LOOKUPS_PER_TENANT));

tokio::task_local! {
    /// The tenant whose connection is being made, for the lookups it needs (a resolver is
    /// called by the HTTP client, which knows no tenant).
    static TENANT: Arc<str>;
}

/// Runs `connecting` with its name lookups counted as `tenant`'s ([`LOOKUPS_PER_TENANT`]).
pub fn for_tenant<F: std::future::Future>(tenant: &str, connecting: F) -> impl std::future::Future<Output = F::Output> {
    TENANT.scope(Arc::from(tenant), connecting)
}

/// The tenant a lookup asked for now is for, if it is known.
pub fn current_tenant() -> Option<Arc<str>> {
    TENANT.try_with(Arc::clone).ok()
}

/// Runs `lookup` on the blocking pool in `tenant`'s turn of `lookups` (one of no known tenant
/// in a turn of the shared room only), the turn held by the lookup itself (not by the caller,
/// who may stop waiting).
async fn bounded_lookup<T: Send + 'static>(
    lookups: &'static crate::model::TakenInTurns,
    tenant: Option<Arc<str>>,
    lookup: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let turn = match tenant.as_deref() {
        Some(tenant) => lookups.turn(tenant).await,
        None => lookups.shared_turn().await,
    };
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        lookup()
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However many connections wait for names, at most [`LOOKUPS_AT_ONCE`] lookups hold
    /// blocking threads, and one whose caller stopped waiting still holds its room until it
    /// ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn name_lookups_hold_a_bounded_number_of_blocking_threads() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        static LIMITED: std::sync::LazyLock<crate::model::TakenInTurns> =
            std::sync::LazyLock::new(|| crate::model::TakenInTurns::new(4, 4));
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        let slow = || {
            let now = RUNNING.fetch_add(1, SeqCst) + 1;
            MOST.fetch_max(now, SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            RUNNING.fetch_sub(1, SeqCst);
            Ok(())
        };
        // Callers that give up at once: their lookups still run, within the bound.
        for _ in 0..8 {
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(1), bounded_lookup(&LIMITED, None, slow)).await;
        }
        let waiting: Vec<_> = (0..20).map(|_| tokio::spawn(bounded_lookup(&LIMITED, None, slow))).collect();
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert!(MOST.load(SeqCst) <= 4, "{} lookups at once", MOST.load(SeqCst));
        assert!(MOST.load(SeqCst) >= 2, "they do run side by side");
    }

    /// One tenant's lookups that never answer hold its own room, not everyone's: another
    /// tenant's lookup is made while they still hang (with one room for all, it waited for them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_s_hanging_lookups_do_not_hold_up_another_tenant_s() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        static ROOM: std::sync::LazyLock<crate::model::TakenInTurns> =
            std::sync::LazyLock::new(|| crate::model::TakenInTurns::new(4, 2));
        static RELEASED: AtomicBool = AtomicBool::new(false);
        static HANGING: AtomicUsize = AtomicUsize::new(0);
        let hang = || {
            HANGING.fetch_add(1, SeqCst);
            while !RELEASED.load(SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            HANGING.fetch_sub(1, SeqCst);
            Ok(())
        };
        let mallory: Arc<str> = Arc::from("mallory");
        let hung: Vec<_> = (0..8).map(|_| tokio::spawn(bounded_lookup(&ROOM, Some(mallory.clone()), hang))).collect();
        while HANGING.load(SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        let acme = bounded_lookup(&ROOM, Some(Arc::from("acme")), || Ok(HANGING.load(SeqCst)));
        let answered = tokio::time::timeout(std::time::Duration::from_secs(5), acme).await;
        RELEASED.store(true, SeqCst);
        assert_eq!(answered.ok().map(Result::unwrap), Some(2), "acme's lookup ran while mallory's two hung");
        for h in hung {
            h.await.unwrap().unwrap();
        }
    }

    /// `network.deny` refuses public addresses the special ranges do not cover (a dual-stack
    /// host's own global IPv6 address, a VPC's), in every form that reaches them, and beats
    /// `network.allow`.
    #[test]
    fn denied_ranges_are_refused_whatever_is_allowed() {
        let g = NetworkGuard::new(vec!["10.0.0.0/8".parse().unwrap()]).denying(vec![
            "2600:1f18::/32".parse().unwrap(),
            "203.0.113.0/24".parse().unwrap(),
            "10.9.0.0/16".parse().unwrap(),
        ]);
        for bad in ["2600:1f18:abcd::5", "203.0.113.7", "::ffff:203.0.113.7", "2002:cb00:7107::1", "10.9.1.1"] {
            let e = g.check(ip(bad)).unwrap_err();
            assert!(e.denied && e.to_string().contains("network.deny"), "{bad}: {e}");
        }
        for good in ["2600:1f19::1", "203.0.114.7", "10.1.1.1", "93.184.216.34"] {
            assert!(g.check(ip(good)).is_ok(), "{good}");
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_private_ranges_by_default() {
        let g = NetworkGuard::default();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1", // IPv4-compatible
            "::10.0.0.1",
            "2002:7f00:1::1",                       // 6to4 of 127.0.0.1
            "2002:a9fe:a9fe::",                     // 6to4 of 169.254.169.254
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo of 127.0.0.1
            "::ffff:0:7f00:1",                      // IPv4-translated (SIIT) of 127.0.0.1
            "::ffff:0:a9fe:a9fe",                   // IPv4-translated of 169.254.169.254
            "fec0::1",
            "168.63.129.16",
            "198.18.0.1",
        ] {
            let e = g.check(ip(bad)).unwrap_err();
            assert!(e.to_string().contains("network.allow"), "{e}");
        }
        for good in
            ["93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8", "::ffff:0:808:808", "2002:808:808::1", "2001:db8::1"]
        {
            assert!(g.check(ip(good)).is_ok(), "{good}");
        }
    }

    #[test]
    fn allow_lets_named_ranges_through() {
        let g = NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        assert!(g.check(ip("127.0.0.1")).is_ok());
        assert!(g.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(g.check(ip("::1")).is_ok());
        assert!(g.check(ip("10.0.0.1")).is_err());
    }

    #[tokio::test]
    async fn names_are_judged_by_what_they_resolve_to() {
        let g = NetworkGuard::default();
        let err = g.resolve("localhost", 80).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        let allowed = NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        assert!(!allowed.resolve("localhost", 80).await.unwrap().is_empty());
    }
}
