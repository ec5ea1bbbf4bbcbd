//! Validation: the one place that decides whether a subscription spec is acceptable, whether
//! it comes from the API (create or PATCH) or from the config file. Every error names its
//! field, and every number and duration has a range (the OpenAPI document states the same), so
//! no stored setting can reach arithmetic that overflows.

use crate::config::{HumanDuration, StaticWebhook};
use crate::model::{
    new_id, now_ms, rfc3339_ms, Auth, Invalid, PayloadFormat, RetrySpec, Secret, SignatureEncoding, SignatureSpec,
    Subscription, SubscriptionSpec, TlsOptions, TransportKind,
};
use crate::signing::generate_secret;
use crate::target::Target;
use crate::transport::guard::NetworkGuard;
use std::time::Duration;

pub use crate::model::range;

fn check_duration(field: &str, d: Option<HumanDuration>, (min, max): (Duration, Duration)) -> Result<(), Invalid> {
    match d {
        Some(d) if d.0 < min || d.0 > max => {
            Err(Invalid::new(field, format!("must be between {} and {}", HumanDuration(min), HumanDuration(max))))
        }
        _ => Ok(()),
    }
}

fn check_number<T: PartialOrd + std::fmt::Display>(
    field: &str,
    v: Option<T>,
    (min, max): (T, T),
) -> Result<(), Invalid> {
    match v {
        Some(v) if !(min <= v && v <= max) => Err(Invalid::new(field, format!("must be between {min} and {max}"))),
        _ => Ok(()),
    }
}

fn check_len(field: &str, text: &str, max: usize) -> Result<(), Invalid> {
    if text.len() > max {
        return Err(Invalid::new(field, format!("must be at most {max} bytes")));
    }
    Ok(())
}

/// A secret the client sent: not empty, not the `********` a view shows, bounded.
pub(crate) fn check_secret(field: &str, secret: &Secret) -> Result<(), Invalid> {
    if secret.expose().is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if secret.is_placeholder() {
        return Err(Invalid::new(field, "this is the placeholder views show; send the value, or leave the field out"));
    }
    check_len(field, secret.expose(), range::VALUE)
}

/// What acceptance depends on besides the spec: the network guard, and where TLS files may be.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Which addresses targets may have.
    pub guard: NetworkGuard,
    /// `http.tls_files_dir`.
    pub tls_files_dir: Option<std::path::PathBuf>,
    /// The names in `http.proxies`, what a subscription's `proxy` may name.
    pub proxies: Vec<String>,
    /// Folders of the TLS directory that are tenants' though not spelt as tenant ids (the
    /// admin names tenants freely: `acme`): a CA file is not looked for in another tenant's.
    pub tenant_folders: Vec<String>,
}

/// Checks a spec, new or changing `previous`, and fills in what follows from it (an AMQP
/// subscription's `url` label). The operator's settings that can change under a stored
/// subscription — the network guard, the egress proxies' names, the TLS files — hold what a
/// change sets, not what it keeps: else a subscription those settings have outgrown could not
/// even be disabled (its own checks are made again where it is delivered).
pub fn check(
    spec: &mut SubscriptionSpec,
    previous: Option<&SubscriptionSpec>,
    rules: &Rules,
    tenant: &str,
) -> Result<(), Invalid> {
    // Through an edge device the target is reached from the customer's network, where
    // private addresses are the point: Herald's own network guard does not apply.
    let open = NetworkGuard::new(vec!["0.0.0.0/0".parse().expect("net"), "::/0".parse().expect("net")]);
    if spec.via_edge.as_ref().is_some_and(|d| d.is_empty() || d.len() > 64) {
        return Err(Invalid::new("via_edge", "must name an edge device"));
    }
    let kept = |same: fn(&SubscriptionSpec, &SubscriptionSpec) -> bool| kept(previous, spec, same);
    let headers_set = !kept(|p, s| p.headers == s.headers);
    let signature_set = !kept(|p, s| p.signature == s.signature);
    let guard_unless = |same: fn(&SubscriptionSpec, &SubscriptionSpec) -> bool| {
        if spec.via_edge.is_some() || kept(same) {
            &open
        } else {
            &rules.guard
        }
    };
    match spec.transport {
        TransportKind::Webhook => {
            let guards = (guard_unless(|p, s| p.url == s.url), guard_unless(|p, s| p.auth == s.auth));
            let files =
                (!kept(|p, s| p.tls == s.tls)).then_some((rules.tls_files_dir.as_deref(), &rules.tenant_folders[..]));
            check_webhook(spec, guards, files, tenant)?
        }
        TransportKind::Amqp => {
            // A stored subscription made before `key` was refused here keeps it (never sent)
            // through a change of anything else, disabling it included.
            let new_key = spec.key.is_some() && !kept(|p, s| p.key == s.key);
            let new_headers = !kept(|p, s| p.headers == s.headers);
            let new_uri = !kept(|p, s| p.amqp.as_ref().map(|a| &a.uri) == s.amqp.as_ref().map(|a| &a.uri));
            check_amqp(spec, guard_unless(|p, s| p.amqp == s.amqp), new_key, new_headers, new_uri)?
        }
    }
    let kept_proxy = previous.and_then(|p| p.proxy.as_deref()).filter(|p| spec.proxy.as_deref() == Some(*p));
    check_proxy(spec, &rules.proxies, kept_proxy)?;
    if headers_set {
        check_header_names(spec)?;
    }
    check_common(spec, headers_set, signature_set)
}

/// Refuses two header names that differ only in case: one header, sent once (a subscription
/// stored with both keeps them through changes of anything else).
fn check_header_names(spec: &SubscriptionSpec) -> Result<(), Invalid> {
    let mut names = std::collections::HashSet::new();
    match spec.headers.keys().find(|name| !names.insert(name.to_ascii_lowercase())) {
        Some(name) => Err(Invalid::new(
            format!("headers.{name}"),
            "this header is given twice (header names are case-insensitive)",
        )),
        None => Ok(()),
    }
}

/// Whether what `same` compares is kept from `previous` as it stood, so not held again to
/// checks it passed then (or to bounds added since): only on the same transport and route — a
/// webhook changed into an AMQP subscription (or the reverse) brings its fields to another
/// transport's rules, which they never met. The one rule for every such check.
pub fn kept(
    previous: Option<&SubscriptionSpec>,
    spec: &SubscriptionSpec,
    same: impl Fn(&SubscriptionSpec, &SubscriptionSpec) -> bool,
) -> bool {
    previous.is_some_and(|p| p.transport == spec.transport && p.via_edge == spec.via_edge && same(p, spec))
}

/// One text field of a spec, if given.
type Field = fn(&SubscriptionSpec) -> Option<&str>;

/// What the API takes from a tenant beyond [`check`], for a new spec or one changing
/// `previous`: only what the request changes is held to it, so a subscription stored before a
/// bound existed can still be changed (disabled, say) as it stands, and the config file's
/// static webhooks (whose files are read into content) are not held to it. A URL never has a
/// `#fragment` (never sent, it spelt one target twice); inline PEM is at most
/// [`MAX_INLINE`](crate::transport::tls::MAX_INLINE) bytes a field; and a whole subscription at
/// most [`range::SUBSCRIPTION_BYTES`] as stored (every process keeps every subscription in
/// memory, so a tenant's quota of them bounds what it holds there), naming the largest part.
pub fn check_tenant_input(spec: &SubscriptionSpec, previous: Option<&SubscriptionSpec>) -> Result<(), Invalid> {
    let changed = |f: Field| !kept(previous, spec, |p, s| f(p) == f(s));
    let new_url = (spec.transport == TransportKind::Webhook && changed(|s| Some(s.url.as_str())))
        .then(|| url::Url::parse(&spec.url).ok())
        .flatten();
    if let Some(url) = new_url {
        if url.fragment().is_some() {
            return Err(Invalid::new("url", "must not have a #fragment (it is never sent)"));
        }
        // Never sent as credentials (HTTP/1.1 drops them; HTTP/2 would put them in
        // `:authority`, which RFC 9113 forbids), and a URL is shown on every read and in logs,
        // unsealed.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Invalid::new(
                "url",
                "must not hold a user or password (they are never sent as credentials): use \"auth\": {\"type\": \"basic\", …}, which keeps the password sealed",
            ));
        }
    }
    // A token URL's likewise: stored unsealed and shown on every read (the client's secret
    // has its own field, sealed). Held to what is set, as the URL is.
    if let Auth::Oauth2 { token_url, .. } = &spec.auth {
        let was = |s: &SubscriptionSpec| match &s.auth {
            Auth::Oauth2 { token_url, .. } => Some(token_url.clone()),
            _ => None,
        };
        let new = previous.is_none_or(|p| was(p).as_deref() != Some(token_url.as_str()));
        if new && url::Url::parse(token_url).is_ok_and(|u| !u.username().is_empty() || u.password().is_some()) {
            return Err(Invalid::new(
                "auth.token_url",
                "must not hold a user or password (shown on every read): use client_id and client_secret, which keeps the secret sealed",
            ));
        }
    }
    // A fixed schedule spans at most six days, its deadline a day later (a day apart a
    // thousand times was three years of retries). Held to what is set: one stored before keeps
    // its schedule, cut where the policy's deadline falls (`retry::policy`).
    if let Some(RetrySpec::Fixed { interval, max_attempts }) = &spec.retry {
        let span = interval.0.saturating_mul(max_attempts.saturating_sub(1));
        let most = range::FIXED_SPAN;
        if span > most && previous.is_none_or(|p| p.retry != spec.retry) {
            return Err(Invalid::new(
                "retry.max_attempts",
                format!(
                    "a fixed schedule spans at most {} (interval × (max_attempts − 1)), its last attempt then due a day before the longest max_age; this one spans {}",
                    HumanDuration(most),
                    HumanDuration(span)
                ),
            ));
        }
    }
    let max = crate::transport::tls::MAX_INLINE;
    let pem: [(&str, Field); 3] = [
        ("tls.ca_pem", |s| s.tls.as_ref()?.ca_pem.as_deref()),
        ("tls.client_cert_pem", |s| s.tls.as_ref()?.client_cert_pem.as_deref()),
        ("tls.client_key_pem", |s| Some(s.tls.as_ref()?.client_key_pem.as_ref()?.expose())),
    ];
    for (field, get) in pem {
        if get(spec).is_some_and(|p| p.len() > max) && changed(get) {
            return Err(Invalid::new(field, format!("larger than {max} bytes")));
        }
    }
    let sizes = |s: &SubscriptionSpec| -> Vec<(String, usize)> {
        let stored = crate::model::secret::revealing(|| serde_json::to_value(s)).unwrap_or_default();
        let fields = stored.as_object().cloned().unwrap_or_default();
        fields.into_iter().map(|(k, v)| (k.clone(), k.len() + v.to_string().len())).collect()
    };
    let parts = sizes(spec);
    let total: usize = parts.iter().map(|(_, n)| n).sum();
    let before: Option<usize> = previous.map(|p| sizes(p).iter().map(|(_, n)| n).sum());
    if total <= range::SUBSCRIPTION_BYTES || before.is_some_and(|b| total <= b) {
        return Ok(());
    }
    let largest = parts.iter().max_by_key(|(_, n)| *n).map_or("", |(k, _)| k.as_str());
    Err(Invalid::new(
        largest,
        format!("a subscription is at most {} KiB in all; this is the largest part", range::SUBSCRIPTION_BYTES >> 10),
    ))
}

/// `guards` are the URL's and the OAuth token URL's; `files` the TLS directory, `None` when
/// the TLS settings are kept as they stood (not read again), with [`Rules::tenant_folders`].
fn check_webhook(
    spec: &SubscriptionSpec,
    (guard, auth_guard): (&NetworkGuard, &NetworkGuard),
    files: Option<(Option<&std::path::Path>, &[String])>,
    tenant: &str,
) -> Result<(), Invalid> {
    if spec.amqp.is_some() {
        return Err(Invalid::new("amqp", "only valid with transport \"amqp\""));
    }
    if spec.url.is_empty() {
        return Err(Invalid::new("url", "required"));
    }
    check_len("url", &spec.url, range::URL)?;
    let url = url::Url::parse(&spec.url).map_err(|e| Invalid::new("url", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Invalid::new("url", "must be an http or https URL"));
    }
    let host = url.host_str().ok_or_else(|| Invalid::new("url", "must have a host"))?;
    guard.check_host(host).map_err(|e| Invalid::new("url", e.to_string()))?;
    if let (Some(tls), Some((files, tenant_folders))) = (&spec.tls, files) {
        // The folder first: another tenant's file is never opened (what opening it answered
        // told whether it exists, and for PKCS#12 whether a password guessed was right).
        crate::transport::tls::check_tenant_files(tls, files, tenant, tenant_folders)
            .map_err(|e| Invalid::new(e.field, e.message))?;
        crate::transport::tls::client_config(Some(tls), files).map_err(|e| Invalid::new(e.field, e.message))?;
    }
    check_auth(&spec.auth, auth_guard)
}

fn check_auth(auth: &Auth, guard: &NetworkGuard) -> Result<(), Invalid> {
    match auth {
        Auth::None => Ok(()),
        Auth::Basic { username, password } => {
            check_len("auth.username", username, range::VALUE)?;
            // A token alone as the user is Basic with an empty password (RFC 7617 allows it).
            match password.expose().is_empty() && !username.is_empty() {
                true => Ok(()),
                false => check_secret("auth.password", password),
            }
        }
        Auth::Oauth2 { grant, token_url, client_id, client_secret, username, password, scope } => {
            check_len("auth.token_url", token_url, range::URL)?;
            let url =
                url::Url::parse(token_url).map_err(|e| Invalid::new("auth.token_url", format!("not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(Invalid::new("auth.token_url", "must be an http or https URL with a host"));
            }
            let host = url.host_str().unwrap_or_default();
            guard.check_host(host).map_err(|e| Invalid::new("auth.token_url", e.to_string()))?;
            check_len("auth.client_id", client_id, range::VALUE)?;
            check_len("auth.scope", scope.as_deref().unwrap_or_default(), range::VALUE)?;
            check_len("auth.username", username.as_deref().unwrap_or_default(), range::VALUE)?;
            if let Some(s) = client_secret {
                check_secret("auth.client_secret", s)?;
            }
            if let Some(p) = password {
                check_secret("auth.password", p)?;
            }
            match grant.as_str() {
                "password" if username.is_none() || password.is_none() => {
                    Err(Invalid::new("auth.username", "the password grant needs username and password"))
                }
                "client_credentials" if client_secret.is_none() => {
                    Err(Invalid::new("auth.client_secret", "the client_credentials grant needs client_secret"))
                }
                "password" | "client_credentials" => Ok(()),
                _ => Err(Invalid::new("auth.grant", "must be \"password\" or \"client_credentials\"")),
            }
        }
    }
}

fn check_amqp(
    spec: &mut SubscriptionSpec,
    guard: &NetworkGuard,
    new_key: bool,
    new_headers: bool,
    new_uri: bool,
) -> Result<(), Invalid> {
    let target = spec
        .amqp
        .as_ref()
        .ok_or_else(|| Invalid::new("amqp", "transport \"amqp\" needs amqp.uri and amqp.exchange"))?;
    // What AMQP cannot use is not kept (every process holds every subscription).
    if spec.tls.is_some() {
        return Err(Invalid::new("tls", "only valid for webhooks (an amqps:// URI connects to the broker with TLS)"));
    }
    if spec.auth != Auth::None {
        return Err(Invalid::new("auth", "only valid for webhooks (the broker's credentials go in amqp.uri)"));
    }
    if new_key {
        return Err(Invalid::new("key", "only valid for webhooks (a query parameter of the URL)"));
    }
    // They go in the message's content header, which must fit one frame (at least 8 KiB).
    if new_headers && crate::transport::amqp::header_bytes(&spec.headers) > crate::transport::amqp::HEADER_BYTES {
        return Err(Invalid::new(
            "headers",
            format!("at most {} bytes in all for AMQP (names and values)", crate::transport::amqp::HEADER_BYTES),
        ));
    }
    check_len("amqp.uri", target.uri.expose(), range::URL)?;
    crate::transport::amqp::validate(target).map_err(|(field, message)| Invalid::new(field, message))?;
    // Refused since: a stored subscription's URI is kept through a change of anything else
    // (it can still be disabled), as its `key` is.
    if new_uri {
        crate::transport::amqp::validate_new_uri(target).map_err(|(field, message)| Invalid::new(field, message))?;
    }
    let mut uri = url::Url::parse(target.uri.expose()).map_err(|e| Invalid::new("amqp.uri", e.to_string()))?;
    if uri.password() == Some(crate::model::secret::REDACTED) {
        return Err(Invalid::new(
            "amqp.uri",
            "its password is the placeholder views show; send the password (or the stored URI unchanged but for it)",
        ));
    }
    guard.check_host(uri.host_str().unwrap_or_default()).map_err(|e| Invalid::new("amqp.uri", e.to_string()))?;
    // The label of an AMQP subscription, always made here (a PATCH of the exchange moves it,
    // and one given cannot name anything else): broker and exchange, never the password.
    let _ = uri.set_password(None);
    let _ = uri.set_username("");
    spec.url = format!("{}/{}", uri.as_str().trim_end_matches('/'), target.exchange);
    check_len("url", &spec.url, range::URL)
}

/// `proxy` names a configured egress proxy, or `none`, for a webhook Herald itself sends;
/// `kept`, the name a change leaves as it stood, whether or not it is still configured.
fn check_proxy(spec: &SubscriptionSpec, proxies: &[String], kept: Option<&str>) -> Result<(), Invalid> {
    let Some(proxy) = &spec.proxy else { return Ok(()) };
    if spec.transport != TransportKind::Webhook {
        return Err(Invalid::new("proxy", "only webhooks go through an egress proxy"));
    }
    if spec.via_edge.is_some() {
        return Err(Invalid::new("proxy", "an edge device delivers from the customer's network; no proxy applies"));
    }
    if proxy != crate::config::DIRECT_EGRESS && !proxies.contains(proxy) && kept != Some(proxy.as_str()) {
        let known = if proxies.is_empty() { "none is configured".to_string() } else { proxies.join(", ") };
        return Err(Invalid::new(
            "proxy",
            format!("no egress proxy of this name (\"none\", or one of http.proxies: {known})"),
        ));
    }
    Ok(())
}

/// Whether a header (lower case) says how the body is framed or coded, or asks the receiver
/// to answer before it: Herald's to set, and any other value breaks every request
/// (`Content-Encoding: <a signature>` is a 415 at ordinary receivers, `Expect` a 417).
fn frames_the_body(lower: &str) -> bool {
    lower.starts_with("content-") || lower == "expect"
}

/// The checks every transport shares.
/// `headers_set` and `signature_set` say whether those are being set (a create, or a change
/// of them): refusals added since a subscription was stored apply to what is set, and one
/// stored before keeps delivering and takes changes of anything else.
fn check_common(spec: &SubscriptionSpec, headers_set: bool, signature_set: bool) -> Result<(), Invalid> {
    if spec.events.len() > range::EVENTS {
        return Err(Invalid::new("events", format!("at most {} event types", range::EVENTS)));
    }
    for (i, e) in spec.events.iter().enumerate() {
        crate::model::check_event_type(e).map_err(|m| Invalid::new(format!("events[{i}]"), m))?;
    }
    if spec.headers.len() > range::HEADERS {
        return Err(Invalid::new("headers", format!("at most {} headers", range::HEADERS)));
    }
    let signature_header = match &spec.signature {
        SignatureSpec::Hmac { header, .. } => Some(header.to_ascii_lowercase()),
        _ => None,
    };
    // Nor a trace-context header for the signature: traced events carry Herald's own as well.
    if signature_set && signature_header.as_deref().is_some_and(|h| crate::signing::TRACE_HEADERS.contains(&h)) {
        return Err(Invalid::new("signature.header", "Herald sets the trace context of traced events itself"));
    }
    if signature_set && signature_header.as_deref().is_some_and(frames_the_body) {
        return Err(Invalid::new("signature.header", "this header says how the body is sent: choose another name"));
    }
    for (name, value) in &spec.headers {
        let field = format!("headers.{name}");
        let lower = name.to_ascii_lowercase();
        // Checked here, on what tenants write (headers or a signature being set), not where
        // stored subscriptions are compiled: those keep delivering (Herald's own header is the
        // one sent) and take changes of anything else.
        if headers_set && crate::signing::TRACE_HEADERS.contains(&lower.as_str()) {
            return Err(Invalid::new(&field, "Herald sets the trace context of traced events itself"));
        }
        if (headers_set && frames_the_body(&lower))
            || ((headers_set || signature_set) && signature_header.as_ref() == Some(&lower))
        {
            return Err(Invalid::new(&field, "this header is set by Herald and cannot be overridden"));
        }
        check_len(&field, name, crate::signing::MAX_HEADER_NAME)?;
        check_secret(&field, value)?;
    }
    if let Some(key) = &spec.key {
        check_secret("key", key)?;
    }
    if let Some(tls) = &spec.tls {
        if let Some(p) = &tls.key_password {
            check_secret("tls.key_password", p)?;
        }
    }
    check_duration("timeout", spec.timeout, range::TIMEOUT)?;
    check_retry(spec.retry.as_ref())?;
    check_number("max_in_flight", spec.max_in_flight, range::MAX_IN_FLIGHT)?;
    if spec.rate_limit.is_some_and(|r| !r.is_finite()) {
        return Err(Invalid::new("rate_limit", "must be a number of deliveries per second"));
    }
    check_number("rate_limit", spec.rate_limit, range::RATE_LIMIT)?;
    check_ordering(spec.ordering.as_ref())
}

/// `ordering.key` is a JSON pointer into the event's fields.
fn check_ordering(ordering: Option<&crate::model::OrderingSpec>) -> Result<(), Invalid> {
    let Some(pointer) = ordering.and_then(|o| o.key.as_deref()) else { return Ok(()) };
    check_len("ordering.key", pointer, crate::model::MAX_ORDERING_KEY_LEN)?;
    let first = pointer.strip_prefix('/').map(|p| p.split('/').next().unwrap_or(""));
    if !matches!(first, Some("data" | "changes" | "id" | "type" | "tenant")) {
        return Err(Invalid::new(
            "ordering.key",
            "must be a JSON pointer into the event: /data/…, /changes/…, /id, /type or /tenant",
        ));
    }
    Ok(())
}

fn check_retry(retry: Option<&RetrySpec>) -> Result<(), Invalid> {
    match retry {
        Some(RetrySpec::Fixed { interval, max_attempts }) => {
            check_duration("retry.interval", Some(*interval), range::FIXED_INTERVAL)?;
            check_number("retry.max_attempts", Some(*max_attempts), range::MAX_ATTEMPTS)
        }
        Some(RetrySpec::Exponential { initial, multiplier, max_interval, jitter, max_attempts, max_age }) => {
            check_duration("retry.initial", *initial, range::INITIAL)?;
            check_duration("retry.max_interval", *max_interval, range::MAX_INTERVAL)?;
            check_duration("retry.max_age", *max_age, range::MAX_AGE)?;
            check_number("retry.multiplier", *multiplier, range::MULTIPLIER)?;
            check_number("retry.jitter", *jitter, range::JITTER)?;
            check_number("retry.max_attempts", *max_attempts, range::MAX_ATTEMPTS)
        }
        None => Ok(()),
    }
}

/// A new subscription of `tenant` from a checked spec, with `secret` or a generated one.
/// Compiling it checks the secret against the scheme, the headers and the URL once more.
pub fn new_subscription(
    tenant: String,
    spec: SubscriptionSpec,
    secret: Option<Secret>,
) -> Result<Subscription, Invalid> {
    validate_tenant(&tenant)?;
    if let Some(s) = &secret {
        check_secret("secret", s)?;
    }
    let now = rfc3339_ms(now_ms());
    let sub = Subscription {
        id: new_id("sub"),
        tenant,
        spec,
        secret: secret.unwrap_or_else(generate_secret),
        previous_secret: None,
        previous_secret_until: None,
        earlier_secrets: Vec::new(),
        based_on: None,
        disabled_reason: None,
        created_at: now.clone(),
        updated_at: now,
    };
    Target::compile(sub.clone())?;
    Ok(sub)
}

/// Tenant names: 1 to 64 of letters, digits, `-`, `_`, `.`; not `.` or `..` (a tenant names
/// its folder of the TLS directory, and a path segment of the API).
pub fn validate_tenant(tenant: &str) -> Result<(), Invalid> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 64
        && tenant.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && tenant != "."
        && tenant != "..";
    if ok {
        Ok(())
    } else {
        Err(Invalid::new("tenant", "must be 1 to 64 letters, digits, '-', '_' or '.', and not '.' or '..'"))
    }
}

/// Id prefix of subscriptions declared in the config file.
pub const STATIC_PREFIX: &str = "static-";

/// A config-file webhook as a spec and its secret: HMAC in `X-Signature`, raw payloads. Its TLS
/// files are the operator's own: read now (boundedly) into content, so no delivery reads a file.
pub fn static_spec(w: &StaticWebhook) -> Result<(SubscriptionSpec, Option<Secret>), Invalid> {
    // Read as written or not at all: a key without its certificate was dropped (no
    // certificate presented, nothing said), an encoding spelt `HEX` signed in base64.
    if w.client_cert.is_none() && (w.key_file.is_some() || w.key_password.is_some()) {
        let field = if w.key_file.is_some() { "tls.client_key_file" } else { "tls.key_password" };
        return Err(Invalid::new(field, "needs the client certificate it goes with (client_cert)"));
    }
    let encoding = match w.signature_encoding.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("base64") => SignatureEncoding::Base64,
        Some("hex") => SignatureEncoding::Hex,
        Some(_) => return Err(Invalid::new("signature_encoding", "must be \"base64\" or \"hex\"")),
    };
    let path = |p: &Option<String>| p.as_ref().map(std::path::PathBuf::from);
    let files = crate::transport::tls::inline_files(
        path(&w.trust_file).as_ref(),
        path(&w.client_cert).as_ref(),
        path(&w.key_file).as_ref(),
    )
    .map_err(|e| Invalid::new(e.field, e.message))?;
    let tls = (w.trust_all || w.trust_file.is_some() || w.client_cert.is_some()).then(|| TlsOptions {
        key_password: w.key_password.clone().map(Secret),
        trust_all: w.trust_all,
        ..files
    });
    let (signature, secret) = match &w.secret {
        Some(s) => (SignatureSpec::Hmac { header: "X-Signature".into(), encoding }, Some(Secret(s.clone()))),
        None => (SignatureSpec::None, None),
    };
    let (url, auth) = endpoint_credentials(&w.endpoint);
    let spec = SubscriptionSpec {
        url,
        auth,
        events: w.events.clone(),
        signature,
        payload: PayloadFormat::Raw,
        key: w.key.clone().map(Secret),
        timeout: Some(w.connection_timeout.unwrap_or(HumanDuration(Duration::from_secs(30)))),
        tls,
        enabled: w.enabled,
        ..SubscriptionSpec::default()
    };
    Ok((spec, secret))
}

/// A file webhook's endpoint without the user and password it may hold, and those as HTTP
/// Basic credentials: HTTP never sends a URL's user information, and a URL is shown on every
/// read and stored unsealed (the API refuses such URLs; a config file is the operator's, and
/// the formats it follows take them as credentials).
fn endpoint_credentials(endpoint: &str) -> (String, Auth) {
    let Ok(mut url) = url::Url::parse(endpoint) else { return (endpoint.to_string(), Auth::None) };
    if url.username().is_empty() && url.password().is_none() {
        return (endpoint.to_string(), Auth::None);
    }
    let decoded = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let auth = Auth::Basic {
        username: decoded(url.username()),
        password: Secret(decoded(url.password().unwrap_or_default())),
    };
    let _ = url.set_username("");
    let _ = url.set_password(None);
    (url.into(), auth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> SubscriptionSpec {
        super::super::spec::strict(&v).unwrap()
    }

    fn checked(v: serde_json::Value) -> Result<SubscriptionSpec, Invalid> {
        let mut s = spec(v);
        check(&mut s, None, &Rules::default(), "t").map(|()| s)
    }

    /// Two spellings of one header are refused where they are set, and kept through other
    /// changes by a subscription stored with both (disabling it was refused for them).
    #[test]
    fn a_header_named_twice_is_refused_as_it_is_set() {
        let both = json!({ "url": "https://a.example/", "headers": { "X-Token": "a", "x-token": "b" } });
        assert_eq!(checked(both.clone()).unwrap_err().field, "headers.x-token");
        let stored = spec(both.clone());
        let mut disabled = spec(both);
        disabled.enabled = false;
        assert_eq!(check(&mut disabled, Some(&stored), &Rules::default(), "t"), Ok(()));
    }

    /// A header that says how the body is framed or coded (`Content-Encoding`, `Content-Range`)
    /// or asks the receiver to answer before it (`Expect`) is refused as the `hmac` signature's
    /// header, as it is as a custom header: every request carried the signature in it, and
    /// ordinary receivers answered each 415, 400 or 417 until the subscription was disabled.
    #[test]
    fn a_header_that_frames_the_body_is_refused_for_the_signature_and_as_a_custom_header() {
        for name in ["Content-Encoding", "content-range", "Expect"] {
            let signed = json!({ "url": "https://a.example/", "signature": { "scheme": "hmac", "header": name } });
            assert_eq!(checked(signed).unwrap_err().field, "signature.header", "{name}");
            let custom = json!({ "url": "https://a.example/", "headers": { name: "v" } });
            assert_eq!(checked(custom).unwrap_err().field, format!("headers.{name}"), "{name}");
        }
        let fine =
            json!({ "url": "https://a.example/", "signature": { "scheme": "hmac", "header": "X-Content-Signature" } });
        assert!(checked(fine).is_ok());
        // Stored before they were refused: kept through a change of anything else.
        for stored in [
            json!({ "url": "https://a.example/", "signature": { "scheme": "hmac", "header": "Content-Signature" } }),
            json!({ "url": "https://a.example/", "headers": { "Expect": "x" } }),
            json!({ "url": "https://a.example/", "headers": { "Content-Language": "en" } }),
            json!({ "url": "https://a.example/", "headers": { "traceparent": "x" } }),
            json!({ "url": "https://a.example/", "signature": { "scheme": "hmac", "header": "traceparent" } }),
            json!({ "url": "https://a.example/", "signature": { "scheme": "hmac", "header": "X-Sig" }, "headers": { "X-Sig": "v" } }),
        ] {
            let stored = spec(stored);
            let mut disabled = stored.clone();
            disabled.enabled = false;
            assert_eq!(check(&mut disabled, Some(&stored), &Rules::default(), "t"), Ok(()), "{stored:?}");
        }
    }

    /// An AMQP subscription's `key` (a URL's query parameter) and headers past what a message's
    /// content header holds are refused as they are set, and kept through other changes by a
    /// subscription stored before (disabling it was refused for its `key`).
    #[test]
    fn an_amqp_subscription_s_key_and_headers_are_held_as_they_are_set() {
        let amqp = json!({ "transport": "amqp", "amqp": { "uri": "amqp://u:p@broker.example/vh", "exchange": "x" } });
        let with = |extra: serde_json::Value| {
            let mut v = amqp.clone();
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            spec(v)
        };
        let rules = Rules { guard: NetworkGuard::new(vec!["0.0.0.0/0".parse().unwrap()]), ..Rules::default() };
        let keyed = with(json!({ "key": "k-1" }));
        assert_eq!(check(&mut keyed.clone(), None, &rules, "t").unwrap_err().field, "key");
        let mut disabled = with(json!({ "key": "k-1", "enabled": false }));
        assert!(check(&mut disabled, Some(&keyed), &rules, "t").is_ok(), "kept through a change of another field");
        let big = with(json!({ "headers": { "X-Big": "v".repeat(crate::transport::amqp::HEADER_BYTES) } }));
        assert_eq!(check(&mut big.clone(), None, &rules, "t").unwrap_err().field, "headers");
        assert!(check(&mut with(json!({ "headers": { "X-Customer": "c-42" } })), None, &rules, "t").is_ok());
    }

    /// The bounds on what a tenant sends hold for new input only: a subscription stored
    /// before them (or a static webhook whose CA file is a system bundle, read into content)
    /// still delivers and can still be changed as it stands; making it larger is refused.
    #[test]
    fn tenant_input_bounds_hold_for_what_a_request_changes() {
        let pem =
            "-----BEGIN CERTIFICATE-----\n".to_string() + &"QUJD\n".repeat(40_000) + "-----END CERTIFICATE-----\n";
        let big = spec(json!({ "url": "https://h.example/#x", "tls": { "ca_pem": pem } }));
        let field = |r: Result<(), Invalid>| r.err().map(|e| e.field);
        assert_eq!(field(check_tenant_input(&big, None)), Some("url".into()));
        let stored = spec(json!({ "url": "https://h.example/", "tls": { "ca_pem": pem } }));
        assert_eq!(field(check_tenant_input(&stored, None)), Some("tls.ca_pem".into()));
        let disabled = spec(json!({ "url": "https://h.example/#x", "tls": { "ca_pem": pem }, "enabled": false }));
        assert_eq!(check_tenant_input(&disabled, Some(&big)), Ok(()), "changed as it stands");
        let grown = spec(json!({ "url": "https://h.example/#x", "tls": { "ca_pem": pem.clone() + &pem } }));
        assert_eq!(field(check_tenant_input(&grown, Some(&big))), Some("tls.ca_pem".into()));
        // So with a fixed schedule past six days: refused when set, kept when stored before
        // the bound (its PATCH of `enabled` was refused, the subscription not even disabled).
        let long = json!({ "policy": "fixed", "interval": "P1D", "max_attempts": 1000 });
        let stored = spec(json!({ "url": "https://h.example/", "retry": long }));
        let held =
            |s: &SubscriptionSpec, p| check(&mut s.clone(), p, &Rules::default(), "t").and(check_tenant_input(s, p));
        assert_eq!(field(held(&stored, None)), Some("retry.max_attempts".into()));
        let disabled = spec(json!({ "url": "https://h.example/", "retry": long, "enabled": false }));
        assert_eq!(held(&disabled, Some(&stored)), Ok(()), "changed as it stands");
        let changed = spec(
            json!({ "url": "https://h.example/", "retry": { "policy": "fixed", "interval": "P1D", "max_attempts": 999 } }),
        );
        assert_eq!(field(held(&changed, Some(&stored))), Some("retry.max_attempts".into()));
        let days = |n: u32| {
            spec(
                json!({ "url": "https://h.example/", "retry": { "policy": "fixed", "interval": "P1D", "max_attempts": n } }),
            )
        };
        assert_eq!(held(&days(7), None), Ok(()), "six days");
        assert_eq!(field(held(&days(8), None)), Some("retry.max_attempts".into()), "seven days");
    }

    #[test]
    fn urls_must_be_http_with_a_host_and_not_private_literals() {
        assert_eq!(checked(json!({"url": "ftp://x.example/"})).unwrap_err().field, "url");
        assert_eq!(checked(json!({"url": "not a url"})).unwrap_err().field, "url");
        let e = checked(json!({"url": "http://127.0.0.1:9/"})).unwrap_err();
        assert!(e.message.contains("network.allow"), "{e}");
        let mut s = spec(json!({"url": "http://127.0.0.1:9/"}));
        let rules = Rules { guard: NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]), ..Rules::default() };
        assert!(check(&mut s, None, &rules, "t").is_ok());
    }

    #[test]
    fn every_number_and_duration_has_a_range() {
        for (body, field) in [
            (json!({"url": "https://a.example/", "rate_limit": 1e-20}), "rate_limit"),
            (json!({"url": "https://a.example/", "max_in_flight": 0}), "max_in_flight"),
            (json!({"url": "https://a.example/", "timeout": "P3650D"}), "timeout"),
            (
                json!({"url": "https://a.example/", "retry": {"policy": "exponential", "initial": "P999D", "jitter": 0}}),
                "retry.initial",
            ),
            (
                json!({"url": "https://a.example/", "retry": {"policy": "exponential", "max_interval": "P99D"}}),
                "retry.max_interval",
            ),
            (
                json!({"url": "https://a.example/", "retry": {"policy": "exponential", "max_age": "P30D"}}),
                "retry.max_age",
            ),
            (
                json!({"url": "https://a.example/", "retry": {"policy": "fixed", "interval": "1ms", "max_attempts": 2}}),
                "retry.interval",
            ),
            (json!({"url": "https://a.example/", "key": "********"}), "key"),
        ] {
            assert_eq!(checked(body.clone()).unwrap_err().field, field, "{body}");
        }
        let headers: serde_json::Map<_, _> = (0..65).map(|i| (format!("X-{i}"), json!("v"))).collect();
        assert_eq!(checked(json!({"url": "https://a.example/", "headers": headers})).unwrap_err().field, "headers");
    }

    #[test]
    fn a_generated_secret_is_given_and_reserved_headers_refused() {
        let sub =
            new_subscription("t".into(), checked(json!({"url": "https://hooks.example/x"})).unwrap(), None).unwrap();
        assert!(sub.secret.expose().starts_with("whsec_"));
        let bad =
            checked(json!({"url": "https://hooks.example/x", "headers": {"Webhook-Signature": "forged"}})).unwrap();
        assert_eq!(new_subscription("t".into(), bad, None).unwrap_err().field, "headers.Webhook-Signature");
        let plain = checked(json!({"url": "https://hooks.example/x"})).unwrap();
        assert_eq!(new_subscription("t".into(), plain, Some(Secret("no-prefix".into()))).unwrap_err().field, "secret");
    }

    #[test]
    fn the_key_goes_into_the_query_string() {
        let s = checked(json!({"url": "https://hooks.example/x?a=1", "key": "s3cr3t key"})).unwrap();
        let t = Target::compile(new_subscription("t".into(), s, None).unwrap()).unwrap();
        assert_eq!(t.uri.to_string(), "https://hooks.example/x?a=1&key=s3cr3t+key");
    }

    #[test]
    fn a_tenant_is_no_path_of_its_own() {
        for ok in ["acme", "a.b", "t-1_x", "..a"] {
            assert!(validate_tenant(ok).is_ok(), "{ok}");
        }
        for bad in [".", "..", "", "a/b", &"x".repeat(65)] {
            assert!(validate_tenant(bad).is_err(), "{bad}");
        }
    }
}
