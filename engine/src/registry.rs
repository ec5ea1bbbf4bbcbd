//! The subscription registry: validates subscriptions, keeps them in the log's compacted
//! `subscriptions` topic (the source of truth) and serves them from memory, compiled into
//! [`Target`]s that are ready to sign and send.

use crate::config::{HealthConfig, HumanDuration};
use crate::endpoint::Endpoint;
use crate::log::{Log, LogError, Record};
use crate::model::{
    new_id, now_ms, rfc3339_ms, Auth, RetrySpec, SignatureSpec, Subscription, SubscriptionInput, SubscriptionPatch,
    TransportKind,
};
use crate::signing::{generate_secret, Signer, SigningError};
use crate::transport::guard::NetworkGuard;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A subscription compiled for delivery.
#[derive(Debug)]
pub struct Target {
    /// The stored subscription.
    pub sub: Subscription,
    /// Prepared signing keys.
    pub signer: Signer,
    /// Request URI, `key` query parameter included.
    pub uri: Uri,
    /// Fixed headers: custom ones, user agent, Basic auth.
    pub headers: HeaderMap,
    /// Load on the endpoint in this process.
    pub endpoint: Endpoint,
}

/// A field that failed validation.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field, as a JSON path (`url`, `headers.x-foo`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid { field: field.into(), message: message.into() }
}

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request is not a valid subscription.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The registry topic could not be written or read.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Headers Herald sets itself; a subscription cannot override them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

const USER_AGENT: &str = concat!("Herald/", env!("CARGO_PKG_VERSION"));

/// Request timeouts a subscription may choose.
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(300));

impl Target {
    /// Compiles a stored subscription with default endpoint health settings.
    pub fn compile(sub: Subscription) -> Result<Target, Invalid> {
        Self::compile_with(sub, HealthConfig::default())
    }

    /// Compiles a stored subscription; fails only if it could never be delivered.
    pub fn compile_with(sub: Subscription, health: HealthConfig) -> Result<Target, Invalid> {
        let mut signer = Signer::new(&sub.signature, &[&sub.secret]).map_err(|e| match e {
            SigningError::BadHeader(_) => invalid("signature.header", e.to_string()),
            _ => invalid("secret", e.to_string()),
        })?;
        if let (Some(previous), Some(until)) = (&sub.previous_secret, sub.previous_secret_until) {
            signer = signer.with_previous(previous, until).map_err(|e| invalid("secret", e.to_string()))?;
        }
        let mut url = url::Url::parse(&sub.url).map_err(|e| invalid("url", e.to_string()))?;
        if let Some(key) = &sub.key {
            url.query_pairs_mut().append_pair("key", key.expose());
        }
        let uri: Uri = url.as_str().parse().map_err(|_| invalid("url", "not a valid request URI"))?;
        let mut headers = HeaderMap::new();
        headers.insert(http::header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        for (name, value) in &sub.headers {
            let field = format!("headers.{name}");
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid(&field, "not a valid header name"))?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(invalid(&field, "this header is set by Herald and cannot be overridden"));
            }
            let value = HeaderValue::from_str(value).map_err(|_| invalid(&field, "not a valid header value"))?;
            headers.insert(name, value);
        }
        if let Auth::Basic { username, password } = &sub.auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{}", password.expose()));
            let mut value = HeaderValue::from_str(&format!("Basic {token}"))
                .map_err(|_| invalid("auth.username", "not valid in a header"))?;
            value.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, value);
        }
        let endpoint = Endpoint::new(sub.max_in_flight, sub.rate_limit, health);
        Ok(Target { sub, signer, uri, headers, endpoint })
    }
}

fn check_duration(field: &str, d: Option<HumanDuration>, (min, max): (Duration, Duration)) -> Result<(), Invalid> {
    match d {
        Some(d) if d.0 < min || d.0 > max => {
            Err(invalid(field, format!("must be between {} and {}", HumanDuration(min), HumanDuration(max))))
        }
        _ => Ok(()),
    }
}

/// Checks a new subscription and fills in what the server decides.
pub fn validate(input: SubscriptionInput, tenant: String, guard: &NetworkGuard) -> Result<Subscription, Invalid> {
    validate_tenant(&tenant)?;
    let mut input = input;
    match input.transport {
        TransportKind::Webhook => {
            if input.amqp.is_some() {
                return Err(invalid("amqp", "only valid with transport \"amqp\""));
            }
        }
        TransportKind::Amqp => {
            let target = input
                .amqp
                .as_ref()
                .ok_or_else(|| invalid("amqp", "transport \"amqp\" needs amqp.uri and amqp.exchange"))?;
            crate::transport::amqp::validate(target).map_err(|(field, message)| invalid(field, message))?;
            if input.url.is_empty() {
                // The label of an AMQP subscription: broker and exchange, never the password.
                let mut uri = url::Url::parse(target.uri.expose()).map_err(|e| invalid("amqp.uri", e.to_string()))?;
                let _ = uri.set_password(None);
                let _ = uri.set_username("");
                input.url = format!("{}{}", uri.as_str().trim_end_matches('/'), format_args!("/{}", target.exchange));
            }
            validate_amqp_host(target, guard)?;
            return finish(input, tenant);
        }
    }
    if input.url.is_empty() {
        return Err(invalid("url", "required"));
    }
    let url = url::Url::parse(&input.url).map_err(|e| invalid("url", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("url", "must be an http or https URL"));
    }
    match url.host() {
        None => return Err(invalid("url", "must have a host")),
        Some(url::Host::Ipv4(ip)) => guard.check(ip.into()).map_err(|e| invalid("url", e.to_string()))?,
        Some(url::Host::Ipv6(ip)) => guard.check(ip.into()).map_err(|e| invalid("url", e.to_string()))?,
        Some(url::Host::Domain(_)) => {}
    }
    if input.url.len() > 2048 {
        return Err(invalid("url", "must be at most 2048 characters"));
    }
    if let Some(tls) = &input.tls {
        crate::transport::tls::client_config(Some(tls)).map_err(|e| invalid(e.field, e.message))?;
    }
    if let Auth::Oauth2 { grant, token_url, client_secret, username, password, .. } = &input.auth {
        let url = url::Url::parse(token_url).map_err(|e| invalid("auth.token_url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(invalid("auth.token_url", "must be an http or https URL with a host"));
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => {
                guard.check(ip.into()).map_err(|e| invalid("auth.token_url", e.to_string()))?
            }
            Some(url::Host::Ipv6(ip)) => {
                guard.check(ip.into()).map_err(|e| invalid("auth.token_url", e.to_string()))?
            }
            _ => {}
        }
        match grant.as_str() {
            "password" if username.is_none() || password.is_none() => {
                return Err(invalid("auth.username", "the password grant needs username and password"))
            }
            "client_credentials" if client_secret.is_none() => {
                return Err(invalid("auth.client_secret", "the client_credentials grant needs client_secret"))
            }
            "password" | "client_credentials" => {}
            _ => return Err(invalid("auth.grant", "must be \"password\" or \"client_credentials\"")),
        }
    }
    finish(input, tenant)
}

fn validate_amqp_host(target: &crate::model::AmqpTarget, guard: &NetworkGuard) -> Result<(), Invalid> {
    let uri = url::Url::parse(target.uri.expose()).map_err(|e| invalid("amqp.uri", e.to_string()))?;
    match uri.host() {
        Some(url::Host::Ipv4(ip)) => guard.check(ip.into()).map_err(|e| invalid("amqp.uri", e.to_string())),
        Some(url::Host::Ipv6(ip)) => guard.check(ip.into()).map_err(|e| invalid("amqp.uri", e.to_string())),
        _ => Ok(()),
    }
}

/// The checks every transport shares, then the stored form.
fn finish(input: SubscriptionInput, tenant: String) -> Result<Subscription, Invalid> {
    for (i, e) in input.events.iter().enumerate() {
        if e.is_empty() || e.len() > 256 {
            return Err(invalid(format!("events[{i}]"), "event types are 1 to 256 characters"));
        }
    }
    if input.key.as_ref().is_some_and(|k| k.expose().is_empty()) {
        return Err(invalid("key", "must not be empty"));
    }
    check_duration("timeout", input.timeout, TIMEOUT_RANGE)?;
    match &input.retry {
        Some(RetrySpec::Fixed { interval, max_attempts }) => {
            check_duration("retry.interval", Some(*interval), (Duration::from_millis(1), Duration::from_secs(86_400)))?;
            if !(1..=1000).contains(max_attempts) {
                return Err(invalid("retry.max_attempts", "must be between 1 and 1000"));
            }
        }
        Some(RetrySpec::Exponential { multiplier, jitter, max_attempts, .. }) => {
            if multiplier.is_some_and(|m| !(1.0..=10.0).contains(&m)) {
                return Err(invalid("retry.multiplier", "must be between 1 and 10"));
            }
            if jitter.is_some_and(|j| !(0.0..=1.0).contains(&j)) {
                return Err(invalid("retry.jitter", "must be between 0 and 1"));
            }
            if max_attempts.is_some_and(|m| !(1..=1000).contains(&m)) {
                return Err(invalid("retry.max_attempts", "must be between 1 and 1000"));
            }
        }
        None => {}
    }
    if input.max_in_flight.is_some_and(|m| m == 0 || m > 10_000) {
        return Err(invalid("max_in_flight", "must be between 1 and 10000"));
    }
    if input.rate_limit.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(invalid("rate_limit", "must be a positive number of deliveries per second"));
    }
    let secret = match (input.secret, &input.signature) {
        (Some(s), _) => s,
        (None, _) => generate_secret(),
    };
    let now = rfc3339_ms(now_ms());
    let sub = Subscription {
        id: new_id("sub"),
        tenant,
        url: input.url,
        events: input.events,
        transport: input.transport,
        secret,
        previous_secret: None,
        previous_secret_until: None,
        signature: input.signature,
        payload: input.payload,
        headers: input.headers,
        key: input.key,
        timeout: input.timeout,
        auth: input.auth,
        tls: input.tls,
        amqp: input.amqp,
        retry: input.retry,
        max_in_flight: input.max_in_flight,
        rate_limit: input.rate_limit,
        enabled: input.enabled.unwrap_or(true),
        disabled_reason: None,
        created_at: now.clone(),
        updated_at: now,
    };
    // Compiling checks the secret against the scheme, the headers and the URL once more.
    Target::compile(sub.clone())?;
    if matches!(sub.signature, SignatureSpec::Standard)
        && !sub.secret.expose().starts_with(crate::signing::SECRET_PREFIX)
    {
        return Err(invalid("secret", "a standard-scheme secret must start with \"whsec_\""));
    }
    Ok(sub)
}

/// Tenant names: 1 to 64 of letters, digits, `-`, `_`, `.`.
pub fn validate_tenant(tenant: &str) -> Result<(), Invalid> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 64
        && tenant.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid("tenant", "must be 1 to 64 letters, digits, '-', '_' or '.'"))
    }
}

#[derive(Default)]
struct State {
    by_id: HashMap<String, Arc<Target>>,
    by_tenant: HashMap<String, BTreeMap<String, Arc<Target>>>,
}

impl State {
    fn put(&mut self, target: Arc<Target>) {
        self.remove(&target.sub.id);
        self.by_tenant.entry(target.sub.tenant.clone()).or_default().insert(target.sub.id.clone(), target.clone());
        self.by_id.insert(target.sub.id.clone(), target);
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Target>> {
        let old = self.by_id.remove(id)?;
        if let Some(subs) = self.by_tenant.get_mut(&old.sub.tenant) {
            subs.remove(id);
        }
        Some(old)
    }
}

/// The in-memory registry backed by the `subscriptions` topic.
pub struct Registry {
    log: Arc<dyn Log>,
    topic: String,
    guard: NetworkGuard,
    health: HealthConfig,
    state: RwLock<State>,
    writes: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Materialises the registry from `topic`.
    pub async fn load(
        log: Arc<dyn Log>,
        topic: String,
        guard: NetworkGuard,
        health: HealthConfig,
    ) -> Result<Registry, LogError> {
        let records = log.read_all(&topic).await?;
        let registry = Registry {
            log,
            topic,
            guard,
            health,
            state: RwLock::new(State::default()),
            writes: tokio::sync::Mutex::new(()),
        };
        let count = records.len();
        for rec in &records {
            registry.apply(rec);
        }
        tracing::info!(subscriptions = registry.len(), records = count, "registry loaded");
        for target in registry.state.read().unwrap().by_id.values() {
            warn_trust_all(&target.sub);
        }
        Ok(registry)
    }

    /// Applies one record of the registry topic (a subscription, or a tombstone deleting
    /// one): the path both loading and, with several processes, tailing the topic take.
    pub fn apply(&self, rec: &crate::log::LogRecord) {
        if crate::tenants::owns(&rec.key) {
            return;
        }
        let id = String::from_utf8_lossy(&rec.key).into_owned();
        if rec.value.is_empty() {
            self.state.write().unwrap().remove(&id);
            return;
        }
        match serde_json::from_slice::<Subscription>(&rec.value)
            .map_err(|e| invalid("record", e.to_string()))
            .and_then(|sub| Target::compile_with(sub, self.health.clone()))
        {
            Ok(t) => self.state.write().unwrap().put(Arc::new(t)),
            Err(e) => {
                tracing::error!(subscription = %id, offset = rec.offset, error = %e, "skipping unreadable subscription record")
            }
        }
    }

    /// The network guard used to validate URLs.
    pub fn guard(&self) -> &NetworkGuard {
        &self.guard
    }

    async fn persist(&self, id: &str, value: Bytes) -> Result<(), LogError> {
        let rec = Record { key: Bytes::copy_from_slice(id.as_bytes()), value };
        self.log.append(&self.topic, vec![rec]).await.map(|_| ())
    }

    /// Validates and stores a new subscription for `tenant`. A tenant cannot register the
    /// same URL twice.
    pub async fn create(&self, input: SubscriptionInput, tenant: String) -> Result<Arc<Target>, RegistryError> {
        let sub = validate(input, tenant, &self.guard)?;
        let _serial = self.writes.lock().await;
        if self.has_url(&sub.tenant, &sub.url, None) {
            return Err(invalid("url", "this tenant already has a subscription for this URL").into());
        }
        let target = Arc::new(Target::compile_with(sub, self.health.clone())?);
        self.persist(&target.sub.id, Bytes::from(serde_json::to_vec(&target.sub).expect("serializes"))).await?;
        warn_trust_all(&target.sub);
        self.state.write().unwrap().put(target.clone());
        Ok(target)
    }

    /// Changes a subscription: the patch is applied to its stored fields and the result is
    /// validated like a new subscription. `None` when it does not exist (for `tenant`).
    pub async fn update(
        &self,
        id: &str,
        tenant: Option<&str>,
        patch: SubscriptionPatch,
    ) -> Result<Option<Arc<Target>>, RegistryError> {
        let _serial = self.writes.lock().await;
        let Some(current) = self.get(id).filter(|t| tenant.is_none_or(|x| t.sub.tenant == x)) else { return Ok(None) };
        let old = &current.sub;
        let mut input = old.as_input();
        let SubscriptionPatch {
            url,
            events,
            signature,
            payload,
            headers,
            key,
            timeout,
            auth,
            tls,
            retry,
            max_in_flight,
            rate_limit,
            enabled,
        } = patch;
        input.url = url.unwrap_or(input.url);
        input.events = events.unwrap_or(input.events);
        input.signature = signature.unwrap_or(input.signature);
        input.payload = payload.unwrap_or(input.payload);
        input.headers = headers.unwrap_or(input.headers);
        input.key = key.or(input.key);
        input.timeout = timeout.or(input.timeout);
        input.auth = auth.unwrap_or(input.auth);
        input.tls = tls.or(input.tls);
        input.retry = retry.or(input.retry);
        input.max_in_flight = max_in_flight.or(input.max_in_flight);
        input.rate_limit = rate_limit.or(input.rate_limit);
        input.enabled = enabled.or(input.enabled);
        let checked = validate(input, old.tenant.clone(), &self.guard)?;
        if !same_url(&checked.url, &old.url) && self.has_url(&old.tenant, &checked.url, Some(id)) {
            return Err(invalid("url", "this tenant already has a subscription for this URL").into());
        }
        let sub = Subscription {
            id: old.id.clone(),
            created_at: old.created_at.clone(),
            previous_secret: old.previous_secret.clone(),
            previous_secret_until: old.previous_secret_until,
            disabled_reason: if checked.enabled { None } else { old.disabled_reason.clone() },
            ..checked
        };
        Ok(Some(self.store(sub).await?))
    }

    /// Replaces a subscription's secret; the old one keeps signing (beside the new one) for
    /// `overlap`. `None` when it does not exist (for `tenant`).
    pub async fn rotate_secret(
        &self,
        id: &str,
        tenant: Option<&str>,
        new_secret: Option<crate::model::Secret>,
        overlap: std::time::Duration,
    ) -> Result<Option<Arc<Target>>, RegistryError> {
        let _serial = self.writes.lock().await;
        let Some(current) = self.get(id).filter(|t| tenant.is_none_or(|x| t.sub.tenant == x)) else { return Ok(None) };
        let mut sub = current.sub.clone();
        let now = now_ms();
        sub.previous_secret = Some(std::mem::replace(&mut sub.secret, new_secret.unwrap_or_else(generate_secret)));
        sub.previous_secret_until = Some(now + overlap.as_millis() as i64);
        sub.updated_at = rfc3339_ms(now);
        if matches!(sub.signature, SignatureSpec::Standard)
            && !sub.secret.expose().starts_with(crate::signing::SECRET_PREFIX)
        {
            return Err(invalid("secret", "a standard-scheme secret must start with \"whsec_\"").into());
        }
        Ok(Some(self.store(sub).await?))
    }

    /// Compiles, persists and serves a changed subscription (caller holds `writes`).
    async fn store(&self, sub: Subscription) -> Result<Arc<Target>, RegistryError> {
        let target = Arc::new(Target::compile_with(sub, self.health.clone())?);
        self.persist(&target.sub.id, Bytes::from(serde_json::to_vec(&target.sub).expect("serializes"))).await?;
        warn_trust_all(&target.sub);
        self.state.write().unwrap().put(target.clone());
        Ok(target)
    }

    fn has_url(&self, tenant: &str, url: &str, except: Option<&str>) -> bool {
        let state = self.state.read().unwrap();
        state
            .by_tenant
            .get(tenant)
            .is_some_and(|subs| subs.values().any(|t| Some(t.sub.id.as_str()) != except && same_url(&t.sub.url, url)))
    }

    /// Disables a subscription, recording why (e.g. the receiver answered 410 Gone).
    pub async fn disable(&self, id: &str, reason: String) -> Result<bool, RegistryError> {
        let _serial = self.writes.lock().await;
        let Some(current) = self.get(id) else { return Ok(false) };
        if !current.sub.enabled {
            return Ok(true);
        }
        let mut sub = current.sub.clone();
        sub.enabled = false;
        sub.disabled_reason = Some(reason);
        sub.updated_at = rfc3339_ms(now_ms());
        let target = Arc::new(Target::compile_with(sub, self.health.clone())?);
        self.persist(id, Bytes::from(serde_json::to_vec(&target.sub).expect("serializes"))).await?;
        tracing::warn!(subscription = %id, reason = target.sub.disabled_reason.as_deref().unwrap_or(""), "subscription disabled");
        self.state.write().unwrap().put(target);
        Ok(true)
    }

    /// Deletes a subscription; `false` when it did not exist.
    pub async fn delete(&self, id: &str) -> Result<bool, RegistryError> {
        let _serial = self.writes.lock().await;
        if !self.state.read().unwrap().by_id.contains_key(id) {
            return Ok(false);
        }
        self.persist(id, Bytes::new()).await?;
        self.state.write().unwrap().remove(id);
        Ok(true)
    }

    /// A subscription by id.
    pub fn get(&self, id: &str) -> Option<Arc<Target>> {
        self.state.read().unwrap().by_id.get(id).cloned()
    }

    /// The enabled subscriptions of `tenant` that want `event_type`.
    pub fn matching(&self, tenant: &str, event_type: &str) -> Vec<Arc<Target>> {
        let state = self.state.read().unwrap();
        state
            .by_tenant
            .get(tenant)
            .map_or_else(Vec::new, |subs| subs.values().filter(|t| t.sub.wants(event_type)).cloned().collect())
    }

    /// A page of subscriptions in id order after `after`, of one tenant or all.
    pub fn list(&self, tenant: Option<&str>, after: Option<&str>, limit: usize) -> (Vec<Arc<Target>>, Option<String>) {
        let state = self.state.read().unwrap();
        let mut all: Vec<&Arc<Target>> = match tenant {
            Some(t) => state.by_tenant.get(t).map_or_else(Vec::new, |m| m.values().collect()),
            None => state.by_id.values().collect(),
        };
        all.sort_by(|a, b| a.sub.id.cmp(&b.sub.id));
        let page: Vec<Arc<Target>> =
            all.into_iter().filter(|t| after.is_none_or(|a| t.sub.id.as_str() > a)).take(limit + 1).cloned().collect();
        if page.len() > limit {
            let mut page = page;
            page.truncate(limit);
            let next = page.last().map(|t| t.sub.id.clone());
            (page, next)
        } else {
            (page, None)
        }
    }

    /// Makes the registry match the config file's webhooks: each is created or updated as
    /// `static-<name>`; static subscriptions no longer in the file are deleted.
    pub async fn sync_static(&self, webhooks: &[crate::config::StaticWebhook]) -> Result<(), RegistryError> {
        let _serial = self.writes.lock().await;
        let mut wanted = std::collections::HashSet::new();
        for (i, w) in webhooks.iter().enumerate() {
            // Name the setting as the file spells it.
            let at = |e: Invalid| {
                let key = match e.field.as_str() {
                    "url" => "endpoint",
                    "timeout" => "connection_timeout",
                    "tls.ca_file" => "trust_file",
                    "tls.client_cert_file" => "client_cert",
                    "tls.client_key_file" => "key_file",
                    "tls.key_password" => "key_password",
                    other => other,
                };
                Invalid { field: format!("webhooks[{i}].{key}"), message: e.message }
            };
            let id = format!("{STATIC_PREFIX}{}", w.name);
            if !wanted.insert(id.clone()) {
                return Err(at(invalid("name", "two webhooks have this name")).into());
            }
            let input = static_input(w);
            let mut sub =
                validate(input, w.tenant.clone().unwrap_or_else(|| "default".into()), &self.guard).map_err(at)?;
            sub.id = id.clone();
            if let Some(current) = self.get(&id) {
                sub.created_at = current.sub.created_at.clone();
                if current.sub.as_input() == sub.as_input() && current.sub.tenant == sub.tenant {
                    continue; // unchanged
                }
            }
            self.store(sub).await?;
            tracing::info!(subscription = %id, "static webhook from the config file");
        }
        let stale: Vec<String> = self
            .state
            .read()
            .unwrap()
            .by_id
            .keys()
            .filter(|id| id.starts_with(STATIC_PREFIX) && !wanted.contains(*id))
            .cloned()
            .collect();
        for id in stale {
            self.persist(&id, Bytes::new()).await?;
            self.state.write().unwrap().remove(&id);
            tracing::info!(subscription = %id, "static webhook removed from the config file; deleted");
        }
        Ok(())
    }

    /// Subscriptions whose circuit breaker is open now.
    pub fn breakers_open(&self) -> usize {
        self.state.read().unwrap().by_id.values().filter(|t| t.endpoint.is_open()).count()
    }

    /// Number of subscriptions, and of those disabled.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.read().unwrap();
        (state.by_id.len(), state.by_id.values().filter(|t| !t.sub.enabled).count())
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.state.read().unwrap().by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Id prefix of subscriptions declared in the config file.
pub const STATIC_PREFIX: &str = "static-";

/// A config-file webhook as a creation request: HMAC in `X-Signature`, raw payloads.
fn static_input(w: &crate::config::StaticWebhook) -> SubscriptionInput {
    use crate::model::{PayloadFormat, Secret, SignatureEncoding, TlsOptions};
    let tls = (w.trust_all || w.trust_file.is_some() || w.client_cert.is_some()).then(|| TlsOptions {
        ca_file: w.trust_file.clone(),
        client_cert_file: w.client_cert.clone(),
        client_key_file: w.key_file.clone(),
        key_password: w.key_password.clone().map(Secret),
        trust_all: w.trust_all,
    });
    let encoding =
        if w.signature_encoding.as_deref() == Some("hex") { SignatureEncoding::Hex } else { SignatureEncoding::Base64 };
    let (signature, secret) = match &w.secret {
        Some(s) => (SignatureSpec::Hmac { header: "X-Signature".into(), encoding }, Some(Secret(s.clone()))),
        None => (SignatureSpec::None, None),
    };
    SubscriptionInput {
        tenant: w.tenant.clone(),
        url: w.endpoint.clone(),
        events: w.events.clone(),
        transport: TransportKind::Webhook,
        secret,
        signature,
        payload: PayloadFormat::Raw,
        headers: Default::default(),
        key: w.key.clone().map(Secret),
        timeout: Some(w.connection_timeout.unwrap_or(HumanDuration(Duration::from_secs(30)))),
        auth: Auth::None,
        tls,
        amqp: None,
        retry: None,
        max_in_flight: None,
        rate_limit: None,
        enabled: Some(w.enabled),
    }
}

/// `trust_all` turns off server verification: say so loudly, at creation and every start.
fn warn_trust_all(sub: &Subscription) {
    if sub.tls.as_ref().is_some_and(|t| t.trust_all) {
        tracing::warn!(subscription = %sub.id, url = %sub.url, "tls.trust_all is set: server certificates are NOT verified for this subscription");
    }
}

/// URLs compare equal after parsing (so `HTTPS://Host/` equals `https://host/`).
fn same_url(a: &str, b: &str) -> bool {
    match (url::Url::parse(a), url::Url::parse(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Secret;

    fn input(url: &str) -> SubscriptionInput {
        serde_json::from_value(serde_json::json!({ "url": url })).unwrap()
    }

    #[test]
    fn urls_must_be_http_with_a_host_and_not_private_literals() {
        let g = NetworkGuard::default();
        assert_eq!(validate(input("ftp://x.example/"), "t".into(), &g).unwrap_err().field, "url");
        assert_eq!(validate(input("not a url"), "t".into(), &g).unwrap_err().field, "url");
        let e = validate(input("http://127.0.0.1:9/"), "t".into(), &g).unwrap_err();
        assert!(e.message.contains("network.allow"), "{e}");
        let allowed = NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(validate(input("http://127.0.0.1:9/"), "t".into(), &allowed).is_ok());
    }

    #[test]
    fn a_generated_secret_is_returned_and_reserved_headers_refused() {
        let sub = validate(input("https://hooks.example/x"), "t".into(), &NetworkGuard::default()).unwrap();
        assert!(sub.secret.expose().starts_with("whsec_"));
        let mut bad = input("https://hooks.example/x");
        bad.headers.insert("Webhook-Signature".into(), "forged".into());
        assert_eq!(validate(bad, "t".into(), &NetworkGuard::default()).unwrap_err().field, "headers.Webhook-Signature");
    }

    #[test]
    fn the_key_goes_into_the_query_string() {
        let mut i = input("https://hooks.example/x?a=1");
        i.key = Some(Secret("s3cr3t key".into()));
        let t = Target::compile(validate(i, "t".into(), &NetworkGuard::default()).unwrap()).unwrap();
        assert_eq!(t.uri.to_string(), "https://hooks.example/x?a=1&key=s3cr3t+key");
    }
}
