//! The subscription registry: keeps subscriptions in the log's compacted `subscriptions`
//! topic (the source of truth) and serves them from memory, validated (`validate`) and
//! compiled into [`Target`]s that are ready to sign and send (`target`).

pub mod feed;
mod target;
mod validate;

pub use target::Target;
pub use validate::{validate, validate_tenant, Invalid, STATIC_PREFIX};

use crate::config::HealthConfig;
use crate::log::{LogError, LogRecord, Position};
use crate::model::{now_ms, rfc3339_ms, SignatureSpec, Subscription, SubscriptionInput, SubscriptionPatch};
use crate::signing::generate_secret;
use crate::transport::guard::NetworkGuard;
use bytes::Bytes;
use feed::Feed;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use validate::{invalid, static_input};

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

#[derive(Default)]
struct State {
    by_id: HashMap<String, Arc<Target>>,
    by_tenant: HashMap<String, BTreeMap<String, Arc<Target>>>,
    /// Offset of the record each subscription was last applied from.
    version: HashMap<String, u64>,
    /// (tenant, URL as parsed) → the subscription holding it; a tenant has each URL once.
    by_url: HashMap<(String, String), String>,
}

impl State {
    fn put(&mut self, target: Arc<Target>, offset: u64) {
        self.remove(&target.sub.id);
        self.version.insert(target.sub.id.clone(), offset);
        self.by_url.insert((target.sub.tenant.clone(), url_key(&target.sub.url)), target.sub.id.clone());
        self.by_tenant.entry(target.sub.tenant.clone()).or_default().insert(target.sub.id.clone(), target.clone());
        self.by_id.insert(target.sub.id.clone(), target);
    }

    /// Another subscription of `tenant` with `url`, if any (one lookup: this runs for every
    /// record applied, at start-up too).
    fn url_holder(&self, tenant: &str, url: &str, except: &str) -> Option<&str> {
        self.by_url.get(&(tenant.to_string(), url_key(url))).map(String::as_str).filter(|id| *id != except)
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Target>> {
        self.version.remove(id);
        let old = self.by_id.remove(id)?;
        let key = (old.sub.tenant.clone(), url_key(&old.sub.url));
        if self.by_url.get(&key).is_some_and(|holder| holder == id) {
            self.by_url.remove(&key);
        }
        if let Some(subs) = self.by_tenant.get_mut(&old.sub.tenant) {
            subs.remove(id);
        }
        Some(old)
    }
}

/// The in-memory registry backed by the `subscriptions` topic.
pub struct Registry {
    feed: Arc<Feed>,
    guard: NetworkGuard,
    health: HealthConfig,
    state: RwLock<State>,
    writes: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Materialises the registry from `records`, the whole registry topic (also read for tenants).
    pub fn load(feed: Arc<Feed>, records: &[LogRecord], guard: NetworkGuard, health: HealthConfig) -> Registry {
        let registry =
            Registry { feed, guard, health, state: RwLock::new(State::default()), writes: tokio::sync::Mutex::new(()) };
        let count = records.len();
        for rec in records {
            registry.apply(rec);
        }
        tracing::info!(subscriptions = registry.len(), records = count, "registry loaded");
        for target in registry.state.read().unwrap().by_id.values() {
            warn_trust_all(&target.sub);
        }
        registry
    }

    /// Applies one record of the registry topic (a subscription, or a tombstone deleting
    /// one): the path both loading and following the topic take, in log order. A record
    /// giving a tenant a URL another of its subscriptions already has is ignored, so two
    /// processes racing to create the same URL agree that the first in the log won.
    pub fn apply(&self, rec: &crate::log::LogRecord) {
        if crate::tenants::owns(&rec.key) || crate::edge::devices::owns(&rec.key) {
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
            Ok(t) => {
                let mut state = self.state.write().unwrap();
                if let Some(holder) = state.url_holder(&t.sub.tenant, &t.sub.url, &t.sub.id) {
                    tracing::warn!(subscription = %id, holder, offset = rec.offset, "ignoring a subscription record: its tenant already has this URL");
                    return;
                }
                state.put(Arc::new(t), rec.offset);
            }
            Err(e) => {
                tracing::error!(subscription = %id, offset = rec.offset, error = %e, "skipping unreadable subscription record")
            }
        }
    }

    /// The network guard used to validate URLs.
    pub fn guard(&self) -> &NetworkGuard {
        &self.guard
    }

    async fn persist(&self, id: &str, value: Bytes) -> Result<Position, LogError> {
        self.feed.write(id.as_bytes(), value).await
    }

    /// Writes `sub` and returns it as applied, or `None` when the log holds a conflicting
    /// record (another subscription took its URL first).
    async fn write(&self, sub: &Subscription) -> Result<Option<Arc<Target>>, LogError> {
        let pos = self.persist(&sub.id, Bytes::from(serde_json::to_vec(sub).expect("serializes"))).await?;
        let state = self.state.read().unwrap();
        Ok(state.by_id.get(&sub.id).filter(|_| state.version.get(&sub.id) == Some(&pos.offset)).cloned())
    }

    fn url_taken() -> RegistryError {
        invalid("url", "this tenant already has a subscription for this URL").into()
    }

    /// Validates and stores a new subscription for `tenant`. A tenant cannot register the
    /// same URL twice.
    pub async fn create(&self, input: SubscriptionInput, tenant: String) -> Result<Arc<Target>, RegistryError> {
        let sub = validate(input, tenant, &self.guard)?;
        let _serial = self.writes.lock().await;
        if self.has_url(&sub.tenant, &sub.url, None) {
            return Err(Self::url_taken());
        }
        self.store(sub).await
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
            via_edge,
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
        input.via_edge = match via_edge {
            Some(d) if d.is_empty() => None,
            Some(d) => Some(d),
            None => input.via_edge,
        };
        let checked = validate(input, old.tenant.clone(), &self.guard)?;
        if !same_url(&checked.url, &old.url) && self.has_url(&old.tenant, &checked.url, Some(id)) {
            return Err(Self::url_taken());
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
        Target::compile_with(sub.clone(), self.health.clone())?;
        let current = self.get(&sub.id);
        let Some(target) = self.write(&sub).await? else {
            // Lost a race for the URL: write back what stands (withdraw a new one), so it
            // stays the newest record.
            match current {
                Some(c) => {
                    self.persist(&c.sub.id, Bytes::from(serde_json::to_vec(&c.sub).expect("serializes"))).await?
                }
                None => self.persist(&sub.id, Bytes::new()).await?,
            };
            return Err(Self::url_taken());
        };
        warn_trust_all(&target.sub);
        Ok(target)
    }

    fn has_url(&self, tenant: &str, url: &str, except: Option<&str>) -> bool {
        self.state.read().unwrap().url_holder(tenant, url, except.unwrap_or_default()).is_some()
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
        let reason = sub.disabled_reason.clone().unwrap_or_default();
        self.write(&sub).await?;
        tracing::warn!(subscription = %id, reason, "subscription disabled");
        Ok(true)
    }

    /// Deletes a subscription; `false` when it did not exist.
    pub async fn delete(&self, id: &str) -> Result<bool, RegistryError> {
        let _serial = self.writes.lock().await;
        if !self.state.read().unwrap().by_id.contains_key(id) {
            return Ok(false);
        }
        self.persist(id, Bytes::new()).await?;
        Ok(true)
    }

    /// A subscription by id, catching up with the registry topic first when it is unknown
    /// here: another process may have just created it. `None` when it does not exist.
    pub async fn get_current(&self, id: &str) -> Option<Arc<Target>> {
        if let Some(t) = self.get(id) {
            return Some(t);
        }
        if let Err(e) = self.feed.catch_up().await {
            tracing::warn!(subscription = %id, error = %e, "could not catch up with the registry topic");
        }
        self.get(id)
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
            let at = |e: Invalid| Invalid { field: w.setting(i, &e.field), message: e.message };
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

/// `trust_all` turns off server verification: say so loudly, at creation and every start.
fn warn_trust_all(sub: &Subscription) {
    if sub.tls.as_ref().is_some_and(|t| t.trust_all) {
        tracing::warn!(subscription = %sub.id, url = %sub.url, "tls.trust_all is set: server certificates are NOT verified for this subscription");
    }
}

/// URLs compare equal after parsing (so `HTTPS://Host/` equals `https://host/`).
fn same_url(a: &str, b: &str) -> bool {
    url_key(a) == url_key(b)
}

/// A URL as parsed (`HTTPS://Host/` becomes `https://host/`), or as given when it does not
/// parse.
fn url_key(url: &str) -> String {
    url::Url::parse(url).map_or_else(|_| url.to_string(), String::from)
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
