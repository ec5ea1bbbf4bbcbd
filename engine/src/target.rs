//! A subscription compiled for delivery: parsed URI with its `key`, fixed headers, prepared
//! signing keys and admission state. Compiled once when the subscription is applied, so an
//! attempt does no parsing; and [`Target::sign`], the one function that turns a delivery into
//! the body and headers every transport sends.

use crate::admission::Admission;
use crate::config::HealthConfig;
use crate::model::{Auth, Credentials, Delivery, Invalid, Subscription, Tls};
use crate::payload::{self, Body};
use crate::signing::{self, Signer, SigningError};
use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use std::sync::Arc;

/// A subscription compiled for delivery.
pub struct Target {
    /// The subscription it was compiled from (what views and policies read).
    pub sub: Subscription,
    /// Signing keys prepared once, so an attempt only hashes.
    pub signer: Signer,
    /// Request URI, `key` query parameter included.
    pub uri: Uri,
    /// Fixed headers: custom ones, user agent, Basic auth.
    pub headers: HeaderMap,
    /// Its TLS options with their profile's key: a digest of its TLS material, worked out here
    /// once rather than at each send.
    pub tls: Option<Tls>,
    /// The key its OAuth tokens are cached under, likewise.
    pub credentials: Credentials,
    /// Admission control and health of the endpoint in this process: shared with the
    /// subscription's next versions while they keep its endpoint and limits (see
    /// [`Target::keeps_admission_of`]), so a change of its headers neither frees the slots its
    /// deliveries hold nor forgets an open breaker.
    pub admission: Arc<Admission>,
    /// The subscription's event types, hashed ([`type_hash`]): an event's type is looked for
    /// with one probe per subscription (a thousand subscriptions of a thousand names read every
    /// name of every one for each event: 2 ms an event on a worker, under the registry's lock;
    /// a binary search of each one's sorted names still took 0.7 ms).
    event_hashes: std::collections::HashSet<u64>,
    /// The indexes of its event types in their sorted order: a probe that finds the hash is
    /// confirmed by name (hashes can collide).
    events_sorted: Vec<u32>,
}

/// Printed with its subscription (whose secrets print redacted) and its URI without the query,
/// which holds the `key` in clear.
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let query = if self.uri.query().is_some() { "?…" } else { "" };
        let uri = format!(
            "{}://{}{}{query}",
            self.uri.scheme_str().unwrap_or_default(),
            self.uri.authority().map_or("", |a| a.as_str()),
            self.uri.path()
        );
        f.debug_struct("Target").field("sub", &self.sub).field("uri", &uri).finish_non_exhaustive()
    }
}

/// An event type's hash, as [`Target::wants_hashed`] takes it: worked out once per event, not
/// per subscription.
pub fn type_hash(event_type: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(event_type)
}

/// One attempt ready to send on any transport: the body and the headers that identify and
/// sign it, over exactly these bytes.
pub struct Signed {
    /// The body, shared with the log record (signed exactly as sent).
    pub body: Body,
    /// `content-type`, `webhook-id`, `webhook-timestamp` and the signature.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The signing time, ms since the epoch.
    pub at_ms: i64,
}

const USER_AGENT: &str = concat!("Herald/", env!("CARGO_PKG_VERSION"));

impl Target {
    /// Whether an event of `event_type`, whose [`type_hash`] is `hash`, goes to this
    /// subscription (as [`Subscription::wants`]).
    pub fn wants_hashed(&self, event_type: &str, hash: u64) -> bool {
        let spec = &self.sub.spec;
        spec.enabled
            && (spec.events.is_empty()
                || (self.event_hashes.contains(&hash)
                    && self
                        .events_sorted
                        .binary_search_by(|&i| spec.events[i as usize].as_str().cmp(event_type))
                        .is_ok()))
    }

    /// Compiles a stored subscription with default endpoint health settings.
    pub fn compile(sub: Subscription) -> Result<Target, Invalid> {
        Self::compile_with(sub, HealthConfig::default())
    }

    /// Compiles a stored subscription; fails only if it could never be delivered.
    pub fn compile_with(sub: Subscription, health: HealthConfig) -> Result<Target, Invalid> {
        let spec = &sub.spec;
        let mut signer = Signer::new(&spec.signature, &[&sub.secret]).map_err(|e| match e {
            SigningError::BadHeader(_) => Invalid::new("signature.header", e.to_string()),
            _ => Invalid::new("secret", e.to_string()),
        })?;
        for (previous, until) in sub.rotated_out(crate::model::now_ms()) {
            // Within its overlap, and only if the scheme can use it: after a change of scheme
            // (hmac to standard) a previous secret may be no key of the new one, and the
            // receiver verifies the new way anyway. Past its overlap it signs nothing.
            if let Ok(more) = signer.clone().with_previous(previous, until) {
                signer = more;
            }
        }
        let mut url = url::Url::parse(&spec.url).map_err(|e| Invalid::new("url", e.to_string()))?;
        if let Some(key) = &spec.key {
            url.query_pairs_mut().append_pair("key", key.expose());
        }
        let uri: Uri = url.as_str().parse().map_err(|_| Invalid::new("url", "not a valid request URI"))?;
        let mut headers = HeaderMap::new();
        // Not when the signature goes there: it is then that header's only value.
        if signer.header() != Some(&http::header::USER_AGENT) {
            headers.insert(http::header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        }
        for (name, value) in &spec.headers {
            let field = format!("headers.{name}");
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| Invalid::new(&field, "not a valid header name"))?;
            if signing::reserved(&name) {
                return Err(Invalid::new(&field, "this header is set by Herald and cannot be overridden"));
            }
            if signing::TRACE_HEADERS.contains(&name.as_str()) || signer.header() == Some(&name) {
                continue; // Herald's own (new subscriptions cannot set these: see `validate`)
            }
            if name == http::header::AUTHORIZATION && !matches!(spec.auth, Auth::None) {
                return Err(Invalid::new(&field, "auth sets this header; remove one of the two"));
            }
            let mut value =
                HeaderValue::from_str(value.expose()).map_err(|_| Invalid::new(&field, "not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        if let Auth::Basic { username, password } = &spec.auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{}", password.expose()));
            let mut value = HeaderValue::from_str(&format!("Basic {token}"))
                .map_err(|_| Invalid::new("auth.username", "not valid in a header"))?;
            value.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, value);
        }
        let admission = Arc::new(Admission::new(spec.max_in_flight, spec.rate_limit, health));
        let mut events_sorted: Vec<u32> = (0..spec.events.len() as u32).collect();
        events_sorted.sort_unstable_by(|&a, &b| spec.events[a as usize].cmp(&spec.events[b as usize]));
        let event_hashes = spec.events.iter().map(|e| type_hash(e)).collect();
        let tls = spec.tls.clone().map(Tls::new);
        let credentials = Credentials::of(&sub);
        Ok(Target { sub, signer, uri, headers, tls, credentials, admission, event_hashes, events_sorted })
    }

    /// Whether this version of a subscription takes over `older`'s admission: it is the same
    /// tenant's (a static webhook the config file moves keeps its id), reaches the same
    /// endpoint the same way, with the same limits, and was not just enabled again (an
    /// operator who enables an endpoint that was given up on gives it a fresh start, and an
    /// attempt judged by the old admission can no longer disable it: see
    /// `Registry::disable`).
    pub fn keeps_admission_of(&self, older: &Target) -> bool {
        let (new, old) = (&self.sub.spec, &older.sub.spec);
        self.sub.tenant == older.sub.tenant
            && new.url == old.url
            && new.transport == old.transport
            && new.via_edge == old.via_edge
            && new.proxy == old.proxy
            && new.max_in_flight == old.max_in_flight
            && new.rate_limit == old.rate_limit
            && (old.enabled || !new.enabled)
    }

    /// The body of `delivery`'s attempt and the headers that sign it, at `now_ms`: what every
    /// transport sends (a webhook as HTTP headers, AMQP as message headers, an edge agent
    /// through its own copy of this function).
    pub fn sign(&self, delivery: &Delivery, pending_retries: u32, now_ms: i64) -> Signed {
        let body = payload::build(self.sub.spec.payload, delivery, pending_retries, now_ms);
        let mut headers = vec![(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))];
        headers.extend(self.signer.headers(&delivery.event_id, now_ms / 1000, body.chunks()));
        if let Some((parent, state)) = crate::telemetry::headers(delivery.trace.as_ref()) {
            headers.push((http::header::HeaderName::from_static("traceparent"), parent));
            if let Some(state) = state {
                headers.push((http::header::HeaderName::from_static("tracestate"), state));
            }
        }
        Signed { body, headers, at_ms: now_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Secret, SignatureEncoding, SignatureSpec, SubscriptionSpec};

    /// A subscription stored before its own signature header was refused among its headers
    /// keeps delivering, with Herald's signature the only value of that header (sent twice,
    /// the tenant's first, receivers read `old` or `old, <signature>` and failed).
    #[test]
    fn a_stored_header_named_like_the_signature_is_not_sent() {
        let spec = SubscriptionSpec {
            url: "https://hooks.example.com/a".into(),
            signature: SignatureSpec::Hmac { header: "x-hook-signature".into(), encoding: SignatureEncoding::Hex },
            headers: [
                ("X-Hook-Signature".to_string(), Secret("old".into())),
                ("X-Team".to_string(), Secret("a".into())),
            ]
            .into(),
            ..SubscriptionSpec::default()
        };
        let sub = Subscription::unchecked("sub".into(), "t".into(), spec, Secret("s3cret".into()));
        let target = Target::compile(sub).unwrap();
        assert!(target.headers.get("x-hook-signature").is_none(), "{:?}", target.headers);
        assert!(target.headers.get("x-team").is_some());
    }

    /// A target printed (a `{:?}` in a log line, of it or of what holds it) shows none of its
    /// secrets: its URI holds the `key` in clear.
    #[test]
    fn a_target_printed_shows_no_secret() {
        let spec = SubscriptionSpec {
            url: "https://hooks.example.com/a?team=7".into(),
            key: Some(Secret("k3y-s3cret".into())),
            headers: [("X-Pass".to_string(), Secret("h3ader-s3cret".into()))].into(),
            ..SubscriptionSpec::default()
        };
        let sub = Subscription::unchecked(
            "sub".into(),
            "t".into(),
            spec,
            Secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
        );
        let printed = format!("{:?}", Target::compile(sub).unwrap());
        for secret in ["k3y-s3cret", "h3ader-s3cret", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("hooks.example.com"), "{printed}");
    }

    /// A static webhook the config file moved to another tenant keeps its id and URL, but not
    /// the other tenant's breaker, failure clock and slots: its deliveries were held behind
    /// them, and an attempt of the old tenant's could disable the new one's subscription.
    #[test]
    fn another_tenant_s_version_keeps_no_admission() {
        let spec = SubscriptionSpec { url: "https://hooks.example.com/a".into(), ..SubscriptionSpec::default() };
        let of = |tenant: &str| {
            let sub = Subscription::unchecked(
                "static-x".into(),
                tenant.into(),
                spec.clone(),
                Secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            );
            Target::compile(sub).unwrap()
        };
        assert!(of("a").keeps_admission_of(&of("a")));
        assert!(!of("b").keeps_admission_of(&of("a")));
    }
}
