//! The subscription registry: subscriptions kept in the catalog (the source of truth) and
//! served from memory, checked (`validate`), read from the API strictly and patched as a JSON
//! Merge Patch (`spec`), and compiled into [`Target`]s that are ready to sign and send.

pub mod spec;
mod validate;

pub use validate::{range, validate_tenant, Rules, STATIC_PREFIX};

use crate::catalog::feed::Feed;
use crate::catalog::{Apply, CatalogError, Entry, Kind, Owner};
use crate::config::{HealthConfig, StaticWebhook};
use crate::log::LogRecord;
use crate::model::{now_ms, rfc3339_ms, Invalid, Secret, Subscription, SubscriptionSpec};
use crate::signing::generate_secret;
use crate::target::Target;
use crate::tenants::DEFAULT_TENANT;
use crate::transport::guard::NetworkGuard;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

/// Why a subscription could not be created or changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request is not a valid subscription.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The catalog could not be written or read back.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The tenant has as many subscriptions as it may.
    #[error("this tenant has its {0} subscriptions")]
    Quota(usize),
    /// Deleted (by another process) while it was being changed.
    #[error("the subscription was deleted meanwhile")]
    Deleted,
    /// Changed by another request (through another process) while this change was made:
    /// this change, made from the version before, is not applied.
    #[error("the subscription was changed meanwhile by another request; read it again and retry")]
    Conflict,
}

/// How long a delete is remembered to judge late changes by: far longer than any process
/// takes to read the catalog's newest records (a late change comes from one that had not).
const DELETE_REMEMBERED: std::time::Duration = std::time::Duration::from_secs(600);

/// What became of a subscription record this process wrote.
#[derive(Debug)]
enum Written {
    /// Applied, and still the subscription's newest.
    Applied(Arc<Target>),
    /// Ignored: another subscription of its tenant took its URL first.
    UrlTaken,
    /// Applied or not, a newer record of the subscription (another process's) followed it.
    Superseded,
    /// Ignored: made from a version before the subscription was deleted.
    Deleted,
    /// Ignored: made from a version another change had replaced.
    Conflict,
}

/// Times a change is checked again because another landed while it was checked, at most.
const UPDATE_TRIES: usize = 4;

/// Times what stands is written back after an ignored record, at most (each try loses only to
/// another change landing first).
const WRITE_BACK_TRIES: usize = 8;

/// What the registry knows of a subscription id.
pub enum Lookup {
    /// The subscription, current.
    Found(Arc<Target>),
    /// Deleted (or never existed): the registry has read the whole catalog and it is not there.
    Deleted,
    /// Not known yet: the catalog could not be caught up with, or its record is unreadable
    /// (written by a newer version). Its deliveries must wait, not be dropped.
    Unknown,
}

#[derive(Default)]
struct State {
    by_id: HashMap<String, Arc<Target>>,
    /// Every subscription again in id order, so that a page of all tenants' starts where the
    /// last ended instead of sorting them all (`by_id` stays the deliveries' one lookup).
    in_order: BTreeMap<String, Arc<Target>>,
    by_tenant: HashMap<String, BTreeMap<String, Arc<Target>>>,
    /// Offset of the record each subscription was last applied from.
    version: HashMap<String, u64>,
    /// (tenant, URL as parsed) → the subscription holding it; a tenant has each URL once.
    by_url: HashMap<(String, String), String>,
    /// (tenant, URL as a receiver gets it: [`target_key`]) → the subscriptions holding it
    /// (more than one only among records stored before that rule): what a create or a change
    /// of URL is checked against in one lookup — normalising every URL of the tenant instead,
    /// under the lock every change waits for, let one tenant's changes hold every tenant's.
    by_target: HashMap<(String, String), BTreeSet<String>>,
    /// Ids whose newest record this process cannot read, with their tenant when the record
    /// names one.
    unreadable: HashMap<String, Option<String>>,
    /// The same by tenant: what a publish of the tenant's looks up (`Registry::unreadable_of`).
    unreadable_by_tenant: HashMap<String, BTreeSet<String>>,
    /// Those of them it cannot read for a sealed secret no installed key opens.
    unopened: HashSet<String>,
    /// Ids whose newest record was ignored (its tenant's URL held by another), and its offset.
    ignored: HashMap<String, u64>,
    /// Deleted ids, the offset of their tombstone and when it was applied (what a late change
    /// is judged by; forgotten after [`DELETE_REMEMBERED`], swept as the map doubles).
    deleted: HashMap<String, (u64, std::time::Instant)>,
    /// The size of `deleted` at which it is swept next.
    sweep_deleted_at: usize,
    /// Ids whose newest record was ignored as a change of a deleted one, and its offset.
    stale: HashMap<String, u64>,
    /// Records of an id ignored as made from a replaced version (their offsets, the newest
    /// few): each writer learns its own, however many processes raced.
    conflicted: HashMap<String, Vec<u64>>,
    /// The offset the current content of an id was first applied from: records since that
    /// only restated it (write-backs, reseals), and a change made from any of them is made
    /// from the current content.
    since: HashMap<String, u64>,
    /// The first record of an id this process read: a change made from an older version (the
    /// catalog compacted before this process read it) cannot be judged here, and is applied.
    first_seen: HashMap<String, u64>,
}

/// Ignored records remembered per id (see `State::conflicted`).
const CONFLICTS_REMEMBERED: usize = 8;

/// Whether two records of a subscription hold the same content (what it was made from aside):
/// every field compared, so one added later is not left out.
fn same_content(a: &Subscription, b: &Subscription) -> bool {
    *a == Subscription { based_on: a.based_on, ..b.clone() }
}

impl State {
    fn put(&mut self, target: Arc<Target>, offset: u64) {
        self.remove(&target.sub.id);
        self.version.insert(target.sub.id.clone(), offset);
        self.by_url.insert((target.sub.tenant.clone(), url_key(&target.sub.spec.url)), target.sub.id.clone());
        self.by_target
            .entry((target.sub.tenant.clone(), target_key(&target.sub.spec.url)))
            .or_default()
            .insert(target.sub.id.clone());
        self.by_tenant.entry(target.sub.tenant.clone()).or_default().insert(target.sub.id.clone(), target.clone());
        self.in_order.insert(target.sub.id.clone(), target.clone());
        self.by_id.insert(target.sub.id.clone(), target);
    }

    /// Another subscription of `tenant` with `url`, if any (one lookup: this runs for every
    /// record applied, at start-up too).
    fn url_holder(&self, tenant: &str, url: &str, except: &str) -> Option<&str> {
        self.by_url.get(&(tenant.to_string(), url_key(url))).map(String::as_str).filter(|id| *id != except)
    }

    /// `id`'s newest record cannot be read here; `tenant` is the one it names, if any.
    fn unreadable_now(&mut self, id: String, tenant: Option<String>) {
        self.readable_again(&id);
        if let Some(t) = &tenant {
            self.unreadable_by_tenant.entry(t.clone()).or_default().insert(id.clone());
        }
        self.unreadable.insert(id, tenant);
    }

    /// `id`'s newest record can be read (applied or ignored), or it is gone.
    fn readable_again(&mut self, id: &str) {
        self.unopened.remove(id);
        if let Some(Some(tenant)) = self.unreadable.remove(id) {
            if let Some(ids) = self.unreadable_by_tenant.get_mut(&tenant) {
                ids.remove(id);
                if ids.is_empty() {
                    self.unreadable_by_tenant.remove(&tenant);
                }
            }
        }
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Target>> {
        self.version.remove(id);
        self.readable_again(id);
        self.ignored.remove(id);
        self.stale.remove(id);
        let old = self.by_id.remove(id)?;
        self.in_order.remove(id);
        let key = (old.sub.tenant.clone(), url_key(&old.sub.spec.url));
        if self.by_url.get(&key).is_some_and(|holder| holder == id) {
            self.by_url.remove(&key);
        }
        let key = (old.sub.tenant.clone(), target_key(&old.sub.spec.url));
        if let Some(holders) = self.by_target.get_mut(&key) {
            holders.remove(id);
            if holders.is_empty() {
                self.by_target.remove(&key);
            }
        }
        if let Some(subs) = self.by_tenant.get_mut(&old.sub.tenant) {
            subs.remove(id);
            if subs.is_empty() {
                self.by_tenant.remove(&old.sub.tenant);
            }
        }
        Some(old)
    }
}

/// The in-memory registry backed by the catalog.
pub struct Registry {
    feed: Arc<Feed>,
    rules: Rules,
    health: HealthConfig,
    state: RwLock<State>,
    /// Taken to share by a change of one tenant's subscriptions, whole by one of any
    /// tenant's (the config file's webhooks, resealing, forgetting what no key opens).
    everyone: tokio::sync::RwLock<()>,
    /// One tenant's changes at a time: its quota and its URLs are judged under its turn.
    /// Other tenants' go on meanwhile — under one lock for all, a tenant changing its
    /// subscriptions at its request rate (a catalog write of tens of ms each, on Kafka) held
    /// every other tenant's changes, and Herald's own disabling of their endpoints, which a
    /// delivery's settlement waits for.
    tenants: crate::model::TakenInTurns,
    /// Checks of a PKCS#12 file (its key derivation: up to a second of CPU), one at a time on
    /// a blocking thread, tenants in turns, never in a tenant's turn of changes: under it, one tenant's
    /// PATCHes of such a subscription held every tenant's changes (and Herald's own
    /// disabling) for minutes.
    heavy_checks: crate::model::TakenInTurns,
    /// One change of a subscription at a time, its check and its write: changes of one
    /// subscription made at once would each find another's written meanwhile and check again.
    changing: crate::model::TakenInTurns,
}

impl Apply for Registry {
    /// A subscription, or a tombstone deleting one, in log order: the path both loading and
    /// following take. A record giving a tenant a URL another of its subscriptions already
    /// has is ignored, so processes racing to create one URL agree that the first in the log
    /// won; so is a change made from a version another change has replaced since (two
    /// processes changing one subscription at once: each record is the whole subscription,
    /// and the later one undid the other's change while both answered 200).
    fn apply(&self, entry: Entry<'_>) {
        if entry.kind != Kind::Subscription {
            return;
        }
        let (id, rec) = (entry.id, entry.record);
        if rec.value.is_empty() {
            let mut state = self.state.write().unwrap();
            state.remove(&id);
            state.conflicted.remove(&id);
            state.since.remove(&id);
            state.first_seen.remove(&id);
            state.deleted.insert(id, (rec.offset, std::time::Instant::now()));
            if state.deleted.len() >= state.sweep_deleted_at {
                state.deleted.retain(|_, (_, at)| at.elapsed() < DELETE_REMEMBERED);
                state.sweep_deleted_at = (2 * state.deleted.len()).max(1024);
            }
            return;
        }
        let compiled = crate::model::secret::reading_stored(|| serde_json::from_slice::<Subscription>(&rec.value))
            .map_err(|e| Invalid::new("record", e.to_string()))
            .and_then(|sub| Target::compile_with(sub, self.health.clone()));
        match compiled {
            Ok(mut t) => {
                let mut state = self.state.write().unwrap();
                // Readable, whatever becomes of it below (applied, or ignored for a conflict):
                // an unreadable record before it no longer holds its tenant's publishes back.
                state.readable_again(&id);
                let first = *state.first_seen.entry(id.clone()).or_insert(rec.offset);
                let restates = state.by_id.get(&id).is_some_and(|c| same_content(&c.sub, &t.sub));
                let deleted_after = |base: u64| state.deleted.get(&id).is_some_and(|&(at, _)| at > base);
                if t.sub.based_on.is_some_and(deleted_after) {
                    tracing::warn!(subscription = %id, offset = rec.offset, "ignoring a change of a subscription deleted after the version it was made from");
                    state.stale.insert(id, rec.offset);
                    return;
                }
                if let (Some(base), Some(&current)) = (t.sub.based_on, state.version.get(&id)) {
                    // Judged against where the current content began; a record restating it
                    // is no change, and a base older than anything read here cannot be judged.
                    let since = state.since.get(&id).copied().unwrap_or(current);
                    if !restates && base < since && base >= first {
                        tracing::warn!(subscription = %id, offset = rec.offset, base, since, "ignoring a change made from a version another change replaced");
                        let ignored = state.conflicted.entry(id).or_default();
                        ignored.push(rec.offset);
                        if ignored.len() > CONFLICTS_REMEMBERED {
                            ignored.remove(0);
                        }
                        return;
                    }
                }
                if let Some(holder) = state.url_holder(&t.sub.tenant, &t.sub.spec.url, &t.sub.id) {
                    tracing::warn!(subscription = %id, holder, offset = rec.offset, "ignoring a subscription record: its tenant already has this URL");
                    state.ignored.insert(id, rec.offset);
                    return;
                }
                if let Some(older) = state.by_id.get(&id).filter(|older| t.keeps_admission_of(older)) {
                    t.admission = older.admission.clone();
                }
                let since = if restates { state.since.get(&id).copied() } else { None };
                state.put(Arc::new(t), rec.offset);
                state.since.insert(id, since.unwrap_or(rec.offset));
            }
            Err(e) => {
                tracing::error!(subscription = %id, offset = rec.offset, error = %e, "unreadable subscription record; its deliveries wait");
                // Its tenant, read as loosely as can be, for publishes to refuse (see
                // `unreadable_of`); a record naming none holds nobody's back (said here).
                let tenant = serde_json::from_slice::<serde_json::Value>(&rec.value)
                    .ok()
                    .and_then(|v| v.get("tenant").and_then(|t| t.as_str()).map(str::to_string));
                if tenant.is_none() {
                    tracing::error!(subscription = %id, "the unreadable record names no tenant: publishes are fanned out without it");
                }
                let mut state = self.state.write().unwrap();
                state.remove(&id);
                let unopened = e.to_string().contains(crate::model::secret::UNOPENED);
                state.unreadable_now(id.clone(), tenant);
                if unopened {
                    state.unopened.insert(id);
                }
            }
        }
    }
}

impl Registry {
    /// Materialises the registry from `records`, the whole catalog (also read for tenants).
    pub fn load(feed: Arc<Feed>, records: &[LogRecord], rules: Rules, health: HealthConfig) -> Registry {
        let registry = Registry::empty(feed, rules, health);
        crate::catalog::load(&registry, records, Owner::Subscriptions);
        registry.loaded();
        registry
    }

    /// A registry holding nothing yet: the catalog's records are applied to it as they are
    /// read ([`crate::catalog::load`]), then [`Registry::loaded`] says what it holds.
    pub fn empty(feed: Arc<Feed>, rules: Rules, health: HealthConfig) -> Registry {
        Registry {
            feed,
            rules,
            health,
            state: RwLock::new(State::default()),
            everyone: Default::default(),
            tenants: crate::model::TakenInTurns::per_key(1),
            heavy_checks: Default::default(),
            changing: crate::model::TakenInTurns::per_key(1),
        }
    }

    /// Says what a start loaded, and warns of each subscription trusting every certificate.
    pub fn loaded(&self) {
        tracing::info!(subscriptions = self.len(), "registry loaded");
        for target in self.state.read().unwrap().by_id.values() {
            warn_trust_all(&target.sub);
        }
    }

    /// The network guard used to validate URLs.
    pub fn guard(&self) -> &NetworkGuard {
        &self.rules.guard
    }

    /// Writes `sub` and says what became of it. A change of a subscription deleted meanwhile
    /// (by another process) is followed by what stands again — the delete, or the subscription
    /// made again under that id since — so that it is the newest record: compaction keeps
    /// only that, and must not keep the change.
    async fn write(&self, sub: &Subscription) -> Result<Written, CatalogError> {
        let pos = self.feed.write(sub.id.as_bytes(), Bytes::from(sub.stored())).await?;
        let written = self.written(&sub.id, pos.offset);
        if matches!(written, Written::Deleted | Written::Conflict | Written::UrlTaken) {
            // Until what is written back is applied: another change landing first makes it a
            // conflict too, and an ignored record left newest is what a process loading after
            // compaction would apply.
            for _ in 0..WRITE_BACK_TRIES {
                let pos = self.feed.write(sub.id.as_bytes(), self.standing(&sub.id)).await?;
                if !matches!(self.written(&sub.id, pos.offset), Written::Conflict) {
                    break;
                }
            }
        }
        Ok(written)
    }

    /// What stands for `id`, as a record to write back after one of its records was ignored,
    /// so that the newest record is what stands (compaction keeps only the newest): the
    /// subscription made from its current version, or a tombstone.
    fn standing(&self, id: &str) -> Bytes {
        self.restated(id).map_or_else(Bytes::new, |sub| Bytes::from(sub.stored()))
    }

    /// `id` as it stands here, as a change of the version it is at (`based_on`): a change
    /// landing meanwhile makes a record of it a conflict, not undone by it.
    fn restated(&self, id: &str) -> Option<Subscription> {
        self.current(id).map(|(current, version)| Subscription { based_on: version, ..current.sub.clone() })
    }

    /// The version `id` is at here: what a change of it is made from.
    fn version_of(&self, id: &str) -> Option<u64> {
        self.state.read().unwrap().version.get(id).copied()
    }

    /// `id` as this process has it, and the version that is, read together (read apart, a
    /// record applied between them made a change of one version's content claim the next's).
    fn current(&self, id: &str) -> Option<(Arc<Target>, Option<u64>)> {
        let state = self.state.read().unwrap();
        state.by_id.get(id).map(|t| (t.clone(), state.version.get(id).copied()))
    }

    /// What became of `id`'s record at `offset`, once the registry has read that far (the
    /// catalog is applied a batch at a time, so another process's newer record of the same
    /// subscription may have been applied after it).
    fn written(&self, id: &str, offset: u64) -> Written {
        let state = self.state.read().unwrap();
        if let Some(t) = state.by_id.get(id).filter(|_| state.version.get(id) == Some(&offset)) {
            return Written::Applied(t.clone());
        }
        if state.ignored.get(id) == Some(&offset) {
            return Written::UrlTaken;
        }
        if state.stale.get(id) == Some(&offset) {
            return Written::Deleted;
        }
        if state.conflicted.get(id).is_some_and(|ignored| ignored.contains(&offset)) {
            return Written::Conflict;
        }
        Written::Superseded
    }

    fn url_taken() -> RegistryError {
        Invalid::new("url", "this tenant already has a subscription for this URL").into()
    }

    /// The turn of `tenant`'s changes (see `tenants`); the config file's webhooks and the
    /// like, which change any tenant's, wait for every turn.
    async fn turn_of(&self, tenant: &str) -> (crate::model::Turn, tokio::sync::RwLockReadGuard<'_, ()>) {
        // The tenant's turn first: waiting for it while holding the shared side, a queued
        // change of everyone's (fair, so it holds back new readers) waited for the whole of one
        // tenant's queue, and every other tenant behind it.
        let turn = self.tenants.turn(tenant).await;
        (turn, self.everyone.read().await)
    }

    /// The turn of the tenant subscription `id` belongs to ([`Registry::turn_of`]), looked at
    /// again once held: the config file's webhooks may have moved it to another tenant
    /// meanwhile. `None` when there is no such subscription.
    /// Whether `id` is, as far as this process knows, another tenant's than `tenant` (or no
    /// one's): answered "not found" before any turn is taken, so a tenant cannot queue in
    /// another's turns (nor time them) with ids not its own.
    fn not_of(&self, id: &str, tenant: Option<&str>) -> bool {
        let Some(tenant) = tenant else { return false };
        let owner = self.get(id).map(|t| t.sub.tenant.clone()).or_else(|| self.unreadable_tenant(id));
        owner.is_none_or(|owner| owner != tenant)
    }

    async fn turn_of_owner(&self, id: &str) -> Option<(crate::model::Turn, tokio::sync::RwLockReadGuard<'_, ()>)> {
        // One this process cannot read is its record's tenant's (its tenant may delete it).
        let owner = |registry: &Registry| {
            registry.get(id).map(|t| t.sub.tenant.clone()).or_else(|| registry.unreadable_tenant(id))
        };
        let mut tenant = owner(self)?;
        loop {
            let turn = self.turn_of(&tenant).await;
            match owner(self) {
                Some(now) if now != tenant => tenant = now,
                Some(_) => return Some(turn),
                None => return None,
            }
        }
    }

    /// Checks and stores a new subscription of `tenant`, with `secret` or a generated one,
    /// unless the tenant has `max` already (counted in the tenant's turn, which its creates
    /// take one at a time, so racing creates cannot pass it). A tenant cannot register the same URL twice.
    pub async fn create(
        &self,
        tenant: String,
        spec: SubscriptionSpec,
        secret: Option<Secret>,
        max: usize,
    ) -> Result<Arc<Target>, RegistryError> {
        let spec = self.checked(spec, None, &tenant).await?;
        let sub = validate::new_subscription(tenant, spec, secret)?;
        let _turn = self.turn_of(&sub.tenant).await;
        if self.count_of(&sub.tenant) >= max {
            return Err(RegistryError::Quota(max));
        }
        if self.has_url(&sub.tenant, &sub.spec.url, None) {
            return Err(Self::url_taken());
        }
        self.store(sub).await
    }

    /// Changes a subscription: `patch` (a JSON Merge Patch) is merged into its spec and the
    /// result checked like a new one. `None` when it does not exist (for `tenant`).
    pub async fn update(
        &self,
        id: &str,
        tenant: Option<&str>,
        patch: &serde_json::Value,
    ) -> Result<Option<Arc<Target>>, RegistryError> {
        if self.not_of(id, tenant) {
            return Ok(None);
        }
        let _one = self.changing.turn(id).await;
        self.update_checked(id, tenant, patch).await
    }

    /// [`Self::update`], the only change of `id` under way here. Checked before taking its
    /// tenant's turn, from the version read then; if another change lands meanwhile (another
    /// process's), checked again from that one.
    async fn update_checked(
        &self,
        id: &str,
        tenant: Option<&str>,
        patch: &serde_json::Value,
    ) -> Result<Option<Arc<Target>>, RegistryError> {
        for _ in 0..UPDATE_TRIES {
            let Some((current, base)) = self.current(id).filter(|(t, _)| tenant.is_none_or(|x| t.sub.tenant == x))
            else {
                return Ok(None);
            };
            let old = &current.sub;
            let spec = self.checked(spec::patched(&old.spec, patch)?, Some(&old.spec), &old.tenant).await?;
            let _turn = self.turn_of(&old.tenant).await;
            if self.version_of(id) != base {
                continue;
            }
            if !same_url(&spec.url, &old.spec.url) && self.has_url(&old.tenant, &spec.url, Some(id)) {
                return Err(Self::url_taken());
            }
            let disabled_reason = if spec.enabled { None } else { old.disabled_reason.clone() };
            if spec == old.spec && disabled_reason == old.disabled_reason {
                // Nothing to change: nothing written (each record stays in the catalog until
                // compaction, and every process applies it — a tenant PATCHing `{}` at its
                // request rate grew the catalog every start reads).
                return Ok(Some(current));
            }
            let sub =
                Subscription { disabled_reason, updated_at: rfc3339_ms(now_ms()), spec, based_on: base, ..old.clone() };
            return Ok(Some(self.store(sub).await?));
        }
        Err(RegistryError::Conflict)
    }

    /// `spec` checked (against `previous` for a change) for `tenant`: at once, or, when it
    /// carries a PKCS#12 file, on a blocking thread, one such check at a time.
    async fn checked(
        &self,
        spec: SubscriptionSpec,
        previous: Option<&SubscriptionSpec>,
        tenant: &str,
    ) -> Result<SubscriptionSpec, RegistryError> {
        fn check(
            mut spec: SubscriptionSpec,
            previous: Option<&SubscriptionSpec>,
            rules: &Rules,
            tenant: &str,
        ) -> Result<SubscriptionSpec, Invalid> {
            validate::check(&mut spec, previous, rules, tenant)?;
            validate::check_tenant_input(&spec, previous)?;
            Ok(spec)
        }
        // TLS settings kept as they stood are not checked again (see `validate::check`).
        let kept = validate::kept(previous, &spec, |p, s| p.tls == s.tls);
        // The folder a CA file lies in (as opening it resolves it), when a tenant of this
        // registry's is named so.
        let folder = spec.tls.as_ref().filter(|_| !kept).and_then(|t| t.ca_file.as_deref()).and_then(|path| {
            let first = crate::transport::tls::folder_under(self.rules.tls_files_dir.as_deref()?, path)?;
            self.state.read().unwrap().by_tenant.contains_key(&first).then_some(first)
        });
        let rules = match folder {
            Some(f) => std::borrow::Cow::Owned(Rules { tenant_folders: vec![f], ..self.rules.clone() }),
            None => std::borrow::Cow::Borrowed(&self.rules),
        };
        // A PKCS#12 file comes as content or as a client certificate file; kept as it stood,
        // it is not opened again.
        if kept || spec.tls.as_ref().is_none_or(|t| t.client_p12.is_none() && t.client_cert_file.is_none()) {
            return Ok(check(spec, previous, &rules, tenant)?);
        }
        // Held by the check itself: a request cancelled meanwhile (its timeout, a client gone)
        // let the next start while its derivation went on.
        let turn = self.heavy_checks.turn(tenant).await;
        let (rules, previous, tenant) = (rules.into_owned(), previous.cloned(), tenant.to_string());
        let checked = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            check(spec, previous.as_ref(), &rules, &tenant)
        })
        .await
        .map_err(|e| Invalid::new("tls.client_p12", format!("could not be checked: {e}")))?;
        Ok(checked?)
    }

    /// Replaces a subscription's secret; the old one keeps signing (beside the new one) for
    /// `overlap`, and those rotated out before it until their own overlaps end. `None` when it does not exist (for `tenant`).
    pub async fn rotate_secret(
        &self,
        id: &str,
        tenant: Option<&str>,
        new_secret: Option<Secret>,
        overlap: std::time::Duration,
    ) -> Result<Option<Arc<Target>>, RegistryError> {
        if self.not_of(id, tenant) {
            return Ok(None);
        }
        if let Some(s) = &new_secret {
            validate::check_secret("secret", s)?;
        }
        let Some(_turn) = self.turn_of_owner(id).await else { return Ok(None) };
        let Some((current, version)) = self.current(id).filter(|(t, _)| tenant.is_none_or(|x| t.sub.tenant == x))
        else {
            return Ok(None);
        };
        let mut sub = current.sub.clone();
        let now = now_ms();
        let until = now.saturating_add(overlap.as_millis().min(i64::MAX as u128) as i64);
        sub.rotate(new_secret.unwrap_or_else(generate_secret), now, until);
        sub.updated_at = rfc3339_ms(now);
        sub.based_on = version;
        Ok(Some(self.store(sub).await?))
    }

    /// Compiles (the last check: secret against scheme, headers, URL), persists and serves a
    /// changed subscription (caller holds its tenant's turn, [`Registry::turn_of`]).
    async fn store(&self, sub: Subscription) -> Result<Arc<Target>, RegistryError> {
        Target::compile_with(sub.clone(), self.health.clone())?;
        let target = match self.write(&sub).await? {
            Written::Applied(target) => target,
            // Lost a race for the URL (what stands was written back: a new one withdrawn).
            Written::UrlTaken => return Err(Self::url_taken()),
            Written::Deleted => return Err(RegistryError::Deleted),
            Written::Conflict => return Err(RegistryError::Conflict),
            // Another process changed it right after, from this change: the newest stands.
            Written::Superseded => match self.get(&sub.id) {
                Some(newer) => newer,
                None => return Err(RegistryError::Deleted),
            },
        };
        warn_trust_all(&target.sub);
        Ok(target)
    }

    /// Whether another subscription of `tenant` has `url`, however either is spelled.
    fn has_url(&self, tenant: &str, url: &str, except: Option<&str>) -> bool {
        let state = self.state.read().unwrap();
        let except = except.unwrap_or_default();
        if state.url_holder(tenant, url, except).is_some() {
            return true;
        }
        let holders = state.by_target.get(&(tenant.to_string(), target_key(url)));
        holders.is_some_and(|ids| ids.iter().any(|id| id != except))
    }

    /// Disables a subscription for what an attempt on `judged` (the version it was made
    /// with) found, recording why (the receiver answered 410 Gone, or kept failing). Only while
    /// the subscription still has `judged`'s admission: an attempt that ends after an operator
    /// enabled it again, or pointed it elsewhere, judged an endpoint that is no longer the
    /// subscription's. `false` when it is not disabled.
    pub async fn disable(&self, judged: &Target, reason: String) -> Result<bool, RegistryError> {
        let id = &judged.sub.id;
        let _turn = self.turn_of(&judged.sub.tenant).await;
        let Some((current, version)) = self.current(id).filter(|(c, _)| Arc::ptr_eq(&c.admission, &judged.admission))
        else {
            return Ok(false);
        };
        if !current.sub.spec.enabled {
            return Ok(true);
        }
        let mut sub = current.sub.clone();
        sub.spec.enabled = false;
        sub.disabled_reason = Some(reason.clone());
        sub.updated_at = rfc3339_ms(now_ms());
        sub.based_on = version;
        if !matches!(self.write(&sub).await?, Written::Applied(_)) {
            return Ok(false);
        }
        tracing::warn!(subscription = %id, reason, "subscription disabled");
        Ok(true)
    }

    /// Deletes a subscription; `false` when it did not exist.
    pub async fn delete(&self, id: &str) -> Result<bool, RegistryError> {
        let Some(_turn) = self.turn_of_owner(id).await else { return Ok(false) };
        let known = {
            let state = self.state.read().unwrap();
            state.by_id.contains_key(id) || state.unreadable.contains_key(id)
        };
        if !known {
            return Ok(false);
        }
        self.feed.write(id.as_bytes(), Bytes::new()).await?;
        Ok(true)
    }

    /// Deletes the subscriptions whose secrets no installed key opens (the key is lost for
    /// good: `secret_key_lost`); how many.
    pub async fn forget_unopened(&self) -> Result<usize, RegistryError> {
        let _alone = self.everyone.write().await;
        let ids: Vec<String> = self.state.read().unwrap().unopened.iter().cloned().collect();
        for id in &ids {
            self.feed.write(id.as_bytes(), Bytes::new()).await?;
        }
        Ok(ids.len())
    }

    /// What the registry knows of `id`, catching up with the catalog first when it is not
    /// here: another process may have just created it.
    pub async fn lookup(&self, id: &str) -> Lookup {
        if let Some(t) = self.get(id) {
            return Lookup::Found(t);
        }
        // Boxed: rare, and nine tenths of this future's size, which every delivery's future
        // carries (see `Deliverer::deliver`).
        Box::pin(self.lookup_all(&[id])).await.pop().unwrap_or(Lookup::Unknown)
    }

    /// [`Registry::lookup`] of each of `ids`, catching up with the catalog once for all of
    /// them (asked one by one, an event's thousand deleted subscriptions made a thousand
    /// queries, each up to its own wait when the catalog could not be read).
    pub async fn lookup_all(&self, ids: &[&str]) -> Vec<Lookup> {
        if ids.iter().any(|id| self.get(id).is_none()) {
            if let Err(e) = self.feed.settled().await {
                let missing: Vec<&str> = ids.iter().copied().filter(|id| self.get(id).is_none()).collect();
                tracing::warn!(
                    error = %e, missing = missing.len(), subscription = %missing.first().copied().unwrap_or_default(),
                    "could not catch up with the catalog; a subscription not here is taken as not known yet"
                );
                return ids.iter().map(|id| self.get(id).map_or(Lookup::Unknown, Lookup::Found)).collect();
            }
        }
        let state = self.state.read().unwrap();
        ids.iter()
            .map(|id| match state.by_id.get(*id) {
                Some(t) => Lookup::Found(t.clone()),
                None if state.unreadable.contains_key(*id) => Lookup::Unknown,
                None => Lookup::Deleted,
            })
            .collect()
    }

    /// Whether this process has applied the catalog up to its end (as `lookup` waits for
    /// before it takes a subscription missing here for deleted).
    pub async fn caught_up(&self) -> bool {
        self.feed.settled().await.is_ok()
    }

    /// How many subscriptions hold a sealed secret no installed key opens.
    pub fn unopened(&self) -> usize {
        self.state.read().unwrap().unopened.len()
    }

    /// Whether the subscription's latest record could not be read here (written by a newer
    /// version): not deleted, but not known either.
    pub fn unreadable(&self, id: &str) -> bool {
        self.state.read().unwrap().unreadable.contains_key(id)
    }

    /// A subscription of `tenant`'s whose latest record this process cannot read, if there is
    /// one: what an event of the tenant would be fanned out to is not known here.
    pub fn unreadable_of(&self, tenant: &str) -> Option<String> {
        let state = self.state.read().unwrap();
        state.unreadable_by_tenant.get(tenant).and_then(|ids| ids.iter().next().cloned())
    }

    /// The tenant a subscription this process cannot read names, if it is one such.
    pub fn unreadable_tenant(&self, id: &str) -> Option<String> {
        self.state.read().unwrap().unreadable.get(id).cloned().flatten()
    }

    /// A subscription by id, as this process has it now.
    pub fn get(&self, id: &str) -> Option<Arc<Target>> {
        self.state.read().unwrap().by_id.get(id).cloned()
    }

    /// The enabled subscriptions of `tenant` that want `event_type`.
    pub fn matching(&self, tenant: &str, event_type: &str) -> Vec<Arc<Target>> {
        let hash = crate::target::type_hash(event_type);
        let state = self.state.read().unwrap();
        state
            .by_tenant
            .get(tenant)
            .map_or_else(Vec::new, |subs| subs.values().filter(|t| t.wants_hashed(event_type, hash)).cloned().collect())
    }

    /// A page of subscriptions in id order after `after`, of one tenant or all: up to `limit`
    /// of those `wanted` keeps, looking at no more than `scan` (a filter few match must not
    /// make one request walk every subscription under the registry's lock). The id to go on
    /// after comes back while any are left to look at — so a page may hold fewer than
    /// `limit`, even none, and still not be the last.
    pub fn list(
        &self,
        tenant: Option<&str>,
        after: Option<&str>,
        limit: usize,
        scan: usize,
        wanted: impl Fn(&Target) -> bool,
    ) -> (Vec<Arc<Target>>, Option<String>) {
        let state = self.state.read().unwrap();
        let from = (after.map_or(Bound::Unbounded, Bound::Excluded), Bound::Unbounded);
        let subs = match tenant {
            Some(t) => state.by_tenant.get(t),
            None => Some(&state.in_order),
        };
        let (mut page, mut last) = (Vec::new(), None);
        for (looked, (id, target)) in subs.into_iter().flat_map(|m| m.range::<str, _>(from)).enumerate() {
            if page.len() == limit || looked == scan {
                return (page, last.map(str::to_string));
            }
            last = Some(id.as_str());
            if wanted(target) {
                page.push(target.clone());
            }
        }
        (page, None)
    }

    /// Makes the registry match the config file's webhooks: each is created or updated as
    /// `static-<name>`; static subscriptions no longer in the file are deleted.
    pub async fn sync_static(&self, webhooks: &[StaticWebhook]) -> Result<(), RegistryError> {
        let _alone = self.everyone.write().await;
        let mut wanted = HashSet::new();
        // Every one checked before any is written: a refused later one left the earlier ones'
        // changes in the catalog, for processes still running to deliver to.
        let (mut checked, mut urls) = (Vec::new(), HashSet::new());
        for (i, w) in webhooks.iter().enumerate() {
            // Name the setting as the file spells it.
            let at = |e: Invalid| Invalid { field: w.setting(i, &e.field), message: e.message };
            let id = format!("{STATIC_PREFIX}{}", w.name);
            if !wanted.insert(id.clone()) {
                return Err(at(Invalid::new("name", "two webhooks have this name")).into());
            }
            let (mut spec, secret) = validate::static_spec(w).map_err(at)?;
            let tenant = w.tenant.clone().unwrap_or_else(|| DEFAULT_TENANT.into());
            validate::check(&mut spec, None, &self.rules, &tenant).map_err(at)?;
            // A URL the tenant holds already — through the API, or in an earlier webhook of the
            // file — is refused by the write, after the ones before it were written.
            if self.has_url(&tenant, &spec.url, Some(&id)) || !urls.insert((tenant.clone(), target_key(&spec.url))) {
                return Err(at(Invalid::new("url", "another subscription of the tenant has this URL")).into());
            }
            let mut made = validate::new_subscription(tenant, spec, secret.clone()).map_err(at)?;
            made.id = id;
            checked.push((made, secret));
        }
        for (made, secret) in checked {
            let id = made.id.clone();
            // A change of what stands, made from the version read: one landing meanwhile (a
            // PATCH, or the same change by a process starting beside this one) makes it a
            // conflict, not undone by it — then looked at again from that one.
            for tries_left in (0..UPDATE_TRIES).rev() {
                let mut sub = made.clone();
                if let Some((current, version)) = self.current(&id) {
                    // Unsigned webhooks have a generated secret nobody uses: it does not count.
                    let same_secret = secret.as_ref().is_none_or(|s| *s == current.sub.secret);
                    if same_secret && current.sub.spec == sub.spec && current.sub.tenant == sub.tenant {
                        break;
                    }
                    sub.created_at = current.sub.created_at.clone();
                    sub.based_on = version;
                }
                match self.store(sub).await {
                    Err(RegistryError::Conflict) if tries_left > 0 => continue,
                    stored => stored?,
                };
                tracing::info!(subscription = %id, "static webhook from the config file");
                break;
            }
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
            self.feed.write(id.as_bytes(), Bytes::new()).await?;
            tracing::info!(subscription = %id, "static webhook removed from the config file; deleted");
        }
        Ok(())
    }

    /// Rewrites every subscription whose stored record (in `records`, the catalog as read at
    /// start) is not sealed with the current key: after a key is set, or rotated.
    pub async fn reseal(&self, records: &[LogRecord]) -> Result<(), RegistryError> {
        let mut stale = HashSet::new();
        for rec in records.iter().filter(|r| crate::catalog::Key::parse(&r.key).1 == Kind::Subscription) {
            let id = String::from_utf8_lossy(&rec.key).into_owned();
            let secret = serde_json::from_slice::<serde_json::Value>(&rec.value)
                .ok()
                .and_then(|v| v.get("secret").and_then(|s| s.as_str()).map(str::to_string));
            match secret {
                Some(s) if !crate::model::secret::sealed_with_current(&s) => stale.insert(id),
                _ => stale.remove(&id),
            };
        }
        let _alone = self.everyone.write().await;
        let n = stale.len();
        for id in stale {
            // Made from the version read here (see `restated`): a PATCH landing meanwhile
            // through another process is not undone everywhere.
            if let Some(sub) = self.restated(&id) {
                self.write(&sub).await?;
            }
        }
        if n > 0 {
            tracing::info!(subscriptions = n, "sealed the secrets of subscriptions stored as text or with an old key");
        }
        Ok(())
    }

    /// Subscriptions whose circuit breaker is open or half-open now.
    pub fn breakers_open(&self) -> usize {
        self.state.read().unwrap().by_id.values().filter(|t| t.sub.spec.enabled && t.admission.not_closed()).count()
    }

    /// Number of subscriptions, and of those disabled.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.read().unwrap();
        (state.by_id.len(), state.by_id.values().filter(|t| !t.sub.spec.enabled).count())
    }

    /// Number of subscriptions of `tenant`.
    pub fn count_of(&self, tenant: &str) -> usize {
        self.state.read().unwrap().by_tenant.get(tenant).map_or(0, BTreeMap::len)
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
    if sub.spec.tls.as_ref().is_some_and(|t| t.trust_all) {
        // Not its URL: a file's webhook may carry a password in it.
        tracing::warn!(subscription = %sub.id, "tls.trust_all is set: server certificates are NOT verified for this subscription");
    }
}

/// URLs compare equal as a receiver gets them (see [`target_key`]).
fn same_url(a: &str, b: &str) -> bool {
    target_key(a) == target_key(b)
}

/// A URL as parsed (`HTTPS://Host/` becomes `https://host/`), or as given when it does not
/// parse: the key records are applied by, so that every process, of every version, agrees on
/// which of two records holding one URL was first. A request is held to [`target_key`] too.
fn url_key(url: &str) -> String {
    url::Url::parse(url).map_or_else(|_| url.to_string(), String::from)
}

/// A URL as a receiver gets it, so that one target has one key however it is spelled: parsed
/// (`HTTPS://Host:443/` is `https://host/`), without a fragment (never sent), escapes of
/// unreserved characters decoded and other escapes' hex in capitals (RFC 3986 §6.2.2), an empty
/// query dropped; as given when it does not parse. What a create or a change of URL is held to
/// (records are applied by [`url_key`]: ones stored before this rule stay as they were).
fn target_key(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else { return url.to_string() };
    parsed.set_fragment(None);
    let path = normalized_escapes(parsed.path());
    let query = parsed.query().map(normalized_escapes).filter(|q| !q.is_empty());
    parsed.set_path(&path);
    parsed.set_query(query.as_deref());
    parsed.into()
}

/// `text` with `%xx` escapes of unreserved characters decoded and the rest in capitals.
fn normalized_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at + 1..at + 3).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        match escape.map(|h| u8::from_str_radix(h, 16).unwrap_or(0)) {
            Some(b) if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => out.push(b as char),
            Some(_) => out.push_str(&rest[at..at + 3].to_ascii_uppercase()),
            None => out.push('%'),
        }
        rest = &rest[at + if escape.is_some() { 3 } else { 1 }..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
impl Registry {
    /// An empty registry on a stub catalog (taking writes, reachable): for other modules'
    /// unit tests.
    pub(crate) fn stubbed() -> Registry {
        let stub = Arc::new(crate::log::stub::Stub::new(true, true));
        let (feed, _applied) = Feed::new(stub, "catalog".into(), 0);
        Registry::load(Arc::new(feed), &[], Rules::default(), HealthConfig::default())
    }

    /// Holds a subscription of `tenant` made from `spec` (its JSON), as if read from the
    /// catalog: for other modules' unit tests.
    pub(crate) fn hold(&self, tenant: &str, spec: &serde_json::Value) -> Arc<Target> {
        let spec = spec::strict(spec).expect("a valid spec");
        let target = Arc::new(Target::compile(validate::new_subscription(tenant.into(), spec, None).unwrap()).unwrap());
        let mut state = self.state.write().unwrap();
        let offset = state.by_id.len() as u64;
        state.put(target.clone(), offset);
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::stub::Stub;

    /// A subscription trusting every certificate is said so at each start, without its URL's
    /// password: a file's webhook may carry one (only the API refuses them), and it was logged
    /// whole at every start.
    #[test]
    fn the_trust_all_warning_does_not_log_a_url_s_password() {
        let registry = Registry::stubbed();
        let url = "https://erp:s3cret@erp.example/n";
        let target = registry.hold("t", &serde_json::json!({ "url": url, "tls": { "trust_all": true } }));
        let seen = crate::telemetry::logged("info", || warn_trust_all(&target.sub));
        assert_eq!(seen.len(), 1, "said so: {seen:?}");
        assert!(!seen[0].2.contains("s3cret"), "{}", seen[0].2);
    }

    /// A registry on a log shared with other processes (Kafka) or not (embedded), whose
    /// broker is reachable or not.
    fn registry(shared: bool, reachable: bool) -> Registry {
        let stub = Stub::new(false, reachable);
        let stub = if shared { stub.sharing() } else { stub };
        let (feed, _applied) = Feed::new(Arc::new(stub), "catalog".into(), 0);
        Registry::load(Arc::new(feed), &[], Rules::default(), HealthConfig::default())
    }

    /// An event is matched by one probe of each subscription's hashed names, not by reading
    /// every name of every subscription of its tenant: what matches is what each
    /// subscription's own `wants` says, through changes of types, enabling and removal.
    #[test]
    fn matching_finds_what_each_subscription_wants_and_no_more() {
        let registry = registry(false, true);
        let put = |id: &str, tenant: &str, spec: serde_json::Value, offset: u64| {
            let mut sub = validate::new_subscription(tenant.into(), spec::strict(&spec).unwrap(), None).unwrap();
            sub.id = id.into();
            registry.state.write().unwrap().put(Arc::new(Target::compile(sub).unwrap()), offset);
        };
        put("s1", "t", serde_json::json!({ "url": "https://h.example/1", "events": ["B", "A"] }), 1);
        put("s2", "t", serde_json::json!({ "url": "https://h.example/2" }), 2);
        put("s3", "t", serde_json::json!({ "url": "https://h.example/3", "events": ["B"], "enabled": false }), 3);
        put("s4", "u", serde_json::json!({ "url": "https://h.example/4", "events": ["A"] }), 4);
        let names: Vec<String> = (0..1000).rev().map(|i| format!("never.{i:05}")).collect();
        put("s5", "t", serde_json::json!({ "url": "https://h.example/5", "events": names }), 5);
        let ids = |tenant: &str, ty: &str| -> Vec<String> {
            let found: Vec<String> = registry.matching(tenant, ty).iter().map(|t| t.sub.id.clone()).collect();
            let state = registry.state.read().unwrap();
            let wanted: Vec<String> =
                state.by_tenant[tenant].values().filter(|t| t.sub.wants(ty)).map(|t| t.sub.id.clone()).collect();
            assert_eq!(found, wanted, "{tenant}/{ty}: the search agrees with each subscription's own wants");
            found
        };
        assert_eq!(ids("t", "A"), ["s1", "s2"]);
        assert_eq!(ids("t", "B"), ["s1", "s2"]);
        assert_eq!(ids("t", "C"), ["s2"]);
        for i in [0, 7, 500, 999] {
            assert_eq!(ids("t", &format!("never.{i:05}")), ["s2", "s5"]);
        }
        assert_eq!(ids("t", "never.01000"), ["s2"]);
        assert_eq!(ids("u", "A"), ["s4"]);
        put("s1", "t", serde_json::json!({ "url": "https://h.example/1", "events": ["C"] }), 6);
        assert_eq!(ids("t", "A"), ["s2"]);
        assert_eq!(ids("t", "C"), ["s1", "s2"]);
        put("s3", "t", serde_json::json!({ "url": "https://h.example/3", "events": ["B"] }), 7);
        assert_eq!(ids("t", "B"), ["s2", "s3"]);
        registry.state.write().unwrap().remove("s1");
        assert_eq!(ids("t", "C"), ["s2"]);
    }

    /// A page looks at no more than its scan: one that found too few says where to go on.
    #[test]
    fn a_filtered_list_looks_at_a_bounded_number_per_page_and_goes_on_to_the_end() {
        let registry = registry(false, true);
        for i in 0..25 {
            let spec = spec::strict(
                &serde_json::json!({ "url": format!("https://hooks.example/{i}"), "enabled": i % 7 != 3 }),
            )
            .unwrap();
            let target =
                Target::compile(validate::new_subscription(format!("t{}", i % 2), spec, None).unwrap()).unwrap();
            registry.state.write().unwrap().put(Arc::new(target), i);
        }
        // Counts what each call looks at.
        let looked = std::cell::Cell::new(0);
        let disabled = |t: &Target| {
            looked.set(looked.get() + 1);
            !t.sub.spec.enabled
        };
        for (tenant, expected) in [(None, 4), (Some("t0"), 2), (Some("t1"), 2)] {
            let (mut found, mut after) = (Vec::new(), None::<String>);
            loop {
                looked.set(0);
                let (page, next) = registry.list(tenant, after.as_deref(), 1, 5, disabled);
                assert!(page.len() <= 1 && looked.get() <= 5, "{} looked at for a page", looked.get());
                found.extend(page.iter().map(|t| t.sub.id.clone()));
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            assert_eq!(found.len(), expected, "{tenant:?}: {found:?}");
            assert!(found.windows(2).all(|w| w[0] < w[1]), "in id order, each once: {found:?}");
        }
        let (all, next) = registry.list(None, None, 500, 10_000, |_| true);
        assert_eq!((all.len(), next), (25, None));
        assert!(all.windows(2).all(|w| w[0].sub.id < w[1].sub.id));
        let (rest, next) = registry.list(None, Some(&all[19].sub.id), 500, 10_000, |_| true);
        assert_eq!((rest.len(), next), (5, None));
    }

    /// A record this process wrote, followed in the same read by another process's newer
    /// record of the same subscription, was superseded — not refused for its URL (then the
    /// writer would write back what it had read before, undoing the newer one).
    #[test]
    fn a_write_followed_by_a_newer_one_is_superseded_and_one_refused_for_its_url_is_told_apart() {
        let registry = registry(false, true);
        let record = |offset: u64, id: &str, url: &str| {
            let spec = spec::strict(&serde_json::json!({ "url": url })).unwrap();
            let mut sub = validate::new_subscription("t".into(), spec, None).unwrap();
            sub.id = id.into();
            LogRecord {
                partition: 0,
                offset,
                timestamp_ms: 0,
                key: Bytes::copy_from_slice(id.as_bytes()),
                value: Bytes::from(sub.stored()),
            }
        };
        let apply = |rec: &LogRecord, id: &str| {
            registry.apply(Entry { kind: Kind::Subscription, id: id.into(), record: rec });
        };
        apply(&record(5, "sub_a", "https://hooks.example/1"), "sub_a");
        assert!(matches!(registry.written("sub_a", 5), Written::Applied(_)));
        // Another process's change of the same subscription, read in the same batch.
        apply(&record(6, "sub_a", "https://hooks.example/2"), "sub_a");
        assert!(matches!(registry.written("sub_a", 5), Written::Superseded), "{:?}", registry.written("sub_a", 5));
        // A new subscription with the URL sub_a holds now is refused.
        apply(&record(7, "sub_b", "https://hooks.example/2"), "sub_b");
        assert!(matches!(registry.written("sub_b", 7), Written::UrlTaken));
    }

    /// A change made from a version another change has replaced is ignored (and told to its
    /// writer as a conflict); what it was made from is the whole subscription, so applying it
    /// would undo the other change. What stands, written back from the current version, applies.
    #[test]
    fn a_change_from_a_replaced_version_is_a_conflict_and_what_stands_written_back_applies() {
        let registry = registry(false, true);
        let record = change_of_c;
        let apply = |rec: &LogRecord| apply_c(&registry, rec);
        apply(&record(5, 1, None));
        apply(&record(6, 2, Some(5))); // A's change
        apply(&record(7, 3, Some(5))); // B's, made from the version A's replaced
        assert!(matches!(registry.written("sub_c", 7), Written::Conflict));
        assert_eq!(registry.get("sub_c").unwrap().sub.spec.max_in_flight, Some(2), "A's change stands");
        let standing = LogRecord { offset: 8, value: registry.standing("sub_c"), ..record(8, 0, None) };
        apply(&standing);
        assert!(matches!(registry.written("sub_c", 8), Written::Applied(_)));
        assert_eq!(registry.get("sub_c").unwrap().sub.spec.max_in_flight, Some(2));
    }

    /// Applies a record of `sub_c`, as the catalog's follower does.
    fn apply_c(registry: &Registry, rec: &LogRecord) {
        registry.apply(Entry { kind: Kind::Subscription, id: "sub_c".into(), record: rec });
    }

    /// A record of `sub_c` at `offset` with `max_in_flight`, made from `based_on`.
    fn change_of_c(offset: u64, max_in_flight: u32, based_on: Option<u64>) -> LogRecord {
        let spec =
            spec::strict(&serde_json::json!({ "url": "https://hooks.example/c", "max_in_flight": max_in_flight }))
                .unwrap();
        let mut sub = validate::new_subscription("t".into(), spec, None).unwrap();
        (sub.id, sub.based_on, sub.created_at, sub.updated_at) =
            ("sub_c".into(), based_on, "then".into(), format!("at {offset}"));
        LogRecord {
            partition: 0,
            offset,
            timestamp_ms: 0,
            key: Bytes::from_static(b"sub_c"),
            value: Bytes::from(sub.stored()),
        }
    }

    /// Three processes change one subscription from one version: the two that lost each learn
    /// it (one slot per id told the first of them it was superseded, and it answered 200).
    #[test]
    fn every_change_that_lost_a_race_is_told_so() {
        let registry = registry(false, true);
        let apply = |rec: &LogRecord| apply_c(&registry, rec);
        apply(&change_of_c(5, 1, None));
        for (offset, n) in [(6, 2), (7, 3), (8, 4)] {
            apply(&change_of_c(offset, n, Some(5)));
        }
        assert!(matches!(registry.written("sub_c", 7), Written::Conflict));
        assert!(matches!(registry.written("sub_c", 8), Written::Conflict));
        assert_eq!(registry.get("sub_c").unwrap().sub.spec.max_in_flight, Some(2));
    }

    /// A record restating what stands (a write-back, a reseal) is no change: one made from the
    /// version before it is still made from the current content, and applies.
    #[test]
    fn a_restatement_does_not_make_a_change_from_the_version_before_it_a_conflict() {
        let registry = registry(false, true);
        let apply = |rec: &LogRecord| apply_c(&registry, rec);
        apply(&change_of_c(5, 1, None));
        apply(&change_of_c(6, 2, Some(5)));
        let restated = LogRecord { offset: 8, value: registry.standing("sub_c"), ..change_of_c(8, 0, None) };
        apply(&restated);
        apply(&change_of_c(9, 3, Some(6)));
        assert!(matches!(registry.written("sub_c", 9), Written::Applied(_)));
        assert_eq!(registry.get("sub_c").unwrap().sub.spec.max_in_flight, Some(3));
    }

    /// A process that read the catalog after compaction (its first record of the id is newer
    /// than what the next change was made from) cannot judge that change, and applies it as
    /// every process that read the whole history does: they do not part for good.
    #[test]
    fn a_change_made_before_what_this_process_first_read_is_applied() {
        let registry = registry(false, true);
        let apply = |rec: &LogRecord| apply_c(&registry, rec);
        apply(&change_of_c(51, 2, Some(40))); // all compaction left
        apply(&change_of_c(60, 3, Some(50)));
        assert!(matches!(registry.written("sub_c", 60), Written::Applied(_)));
    }

    /// Records are applied by the URL as parsed, as every version did: two subscriptions a
    /// tenant made before fragments were refused (`/hook#a`, `/hook#b`) both stay (one being
    /// dropped at the next start would drop its deliveries); a new one for that target, however
    /// spelled, is refused.
    #[tokio::test]
    async fn subscriptions_stored_before_the_stricter_url_rule_stay() {
        let registry = registry(false, true);
        for (offset, id, url) in [(1, "sub_a", "https://h.example/hook#a"), (2, "sub_b", "https://h.example/hook#b")] {
            let spec = spec::strict(&serde_json::json!({ "url": url })).unwrap();
            let mut sub = validate::new_subscription("t".into(), spec, None).unwrap();
            sub.id = id.into();
            let rec = LogRecord {
                partition: 0,
                offset,
                timestamp_ms: 0,
                key: Bytes::copy_from_slice(id.as_bytes()),
                value: Bytes::from(sub.stored()),
            };
            registry.apply(Entry { kind: Kind::Subscription, id: id.into(), record: &rec });
        }
        assert!(registry.get("sub_a").is_some() && registry.get("sub_b").is_some());
        for url in ["https://h.example/hook", "https://h.example/%68ook"] {
            let spec = spec::strict(&serde_json::json!({ "url": url })).unwrap();
            let err = registry.create("t".into(), spec, None, 100).await.expect_err("refused");
            assert!(matches!(err, RegistryError::Invalid(ref i) if i.field == "url"), "{url}: {err}");
        }
    }

    /// A static webhook changed in the config file is written as a change of the version this
    /// process read (`based_on`): one landing meanwhile through another process (a PATCH, a
    /// breaker disabling it) makes it a conflict. Written with none, it undid that change in
    /// every process.
    #[tokio::test]
    async fn a_static_webhook_changed_in_the_file_is_written_as_a_change_of_what_was_read() {
        let stub = Arc::new(Stub::new(true, true));
        let (feed, applied) = Feed::new(stub.clone(), "catalog".into(), 0);
        applied.set(u64::MAX); // nobody follows here: records are applied by hand below
        let registry = Registry::load(Arc::new(feed), &[], Rules::default(), HealthConfig::default());
        let webhook = |endpoint: &str| -> StaticWebhook {
            serde_json::from_value(serde_json::json!({ "name": "x", "endpoint": endpoint })).unwrap()
        };
        let last = || {
            let appends = stub.appends.lock().unwrap();
            let rec = appends.last().unwrap()[0].clone();
            LogRecord { partition: 0, offset: 5, timestamp_ms: 0, key: rec.key, value: rec.value }
        };
        // What each write then became is not the point (nothing applies records here but
        // this test): what was written is.
        let _ = registry.sync_static(&[webhook("https://h.example/1")]).await;
        let made = last();
        registry.apply(Entry { kind: Kind::Subscription, id: "static-x".into(), record: &made });
        let _ = registry.sync_static(&[webhook("https://h.example/2")]).await;
        let changed: serde_json::Value = serde_json::from_slice(&last().value).unwrap();
        assert_eq!(changed["based_on"], 5, "{changed}");
    }

    /// Another tenant's id answers at once, without a place in its owner's queues: a tenant
    /// rotating or patching ids not its own waited in their owner's turn (and the owner's
    /// next change behind it), and how long it waited told whether the owner was writing.
    #[tokio::test]
    async fn another_tenant_s_id_takes_no_turn_of_its_owner() {
        use std::time::Duration;
        let registry = Registry::stubbed();
        let theirs = registry.hold("acme", &serde_json::json!({ "url": "https://h.example/1" }));
        let id = theirs.sub.id.clone();
        let _acme_writing = registry.turn_of("acme").await;
        let _acme_changing = registry.changing.turn(&id).await;
        let soon = Duration::from_secs(2);
        let rotated = tokio::time::timeout(soon, registry.rotate_secret(&id, Some("mallory"), None, soon)).await;
        assert!(matches!(rotated, Ok(Ok(None))), "{rotated:?}");
        let patch = serde_json::json!({ "enabled": false });
        let patched = tokio::time::timeout(soon, registry.update(&id, Some("mallory"), &patch)).await;
        assert!(matches!(patched, Ok(Ok(None))), "{patched:?}");
    }

    /// One tenant's change waiting on the catalog does not hold another tenant's: under one
    /// lock for every tenant's changes, a tenant writing at its request rate (tens of ms a
    /// write on Kafka) held every other's creates and changes — and Herald's own disabling of
    /// their endpoints, which deliveries' settlements wait for.
    #[tokio::test]
    async fn a_tenant_s_change_waiting_on_the_catalog_does_not_hold_another_tenant_s() {
        use std::sync::atomic::Ordering;
        use std::time::Duration;
        let stub = Arc::new(Stub::new(true, true));
        let (feed, applied) = Feed::new(stub.clone(), "catalog".into(), 0);
        applied.set(u64::MAX);
        let registry = Arc::new(Registry::load(Arc::new(feed), &[], Rules::default(), HealthConfig::default()));
        stub.stalled.store(true, Ordering::SeqCst);
        let create = |tenant: &str, url: &str| {
            let (registry, tenant) = (registry.clone(), tenant.to_string());
            let spec = spec::strict(&serde_json::json!({ "url": url })).unwrap();
            tokio::spawn(async move { registry.create(tenant, spec, None, 100).await.map(|_| ()) })
        };
        let waits_until = |n: usize| {
            let stub = stub.clone();
            async move {
                while stub.started.load(Ordering::SeqCst) < n {
                    tokio::task::yield_now().await;
                }
            }
        };
        let first = create("mallory", "https://h.example/1");
        tokio::time::timeout(Duration::from_secs(10), waits_until(1)).await.expect("the first write began");
        let second = create("acme", "https://h.example/2");
        let other = tokio::time::timeout(Duration::from_secs(10), waits_until(2)).await;
        stub.resume();
        other.expect("another tenant's write began while the first waited on the catalog");
        // Whatever each became (nothing applies records here), both ended.
        let _ = (first.await.unwrap(), second.await.unwrap());
        // One tenant's own changes still take their turns: its second waits for its first.
        stub.stalled.store(true, Ordering::SeqCst);
        let first = create("mallory", "https://h.example/3");
        tokio::time::timeout(Duration::from_secs(10), waits_until(3)).await.expect("its write began");
        let second = create("mallory", "https://h.example/4");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(stub.started.load(Ordering::SeqCst), 3, "the tenant's second change waits for its first");
        stub.resume();
        let _ = (first.await.unwrap(), second.await.unwrap());
    }

    /// A subscription whose newest record cannot be read holds its tenant's publishes back
    /// only until a record of it can be read — applied or ignored — or it is deleted; one
    /// naming no tenant holds nobody's.
    #[test]
    fn an_unreadable_subscription_holds_its_tenant_back_only_while_it_is_unreadable() {
        let registry = registry(false, true);
        let apply = |offset: u64, id: &str, value: Vec<u8>| {
            let rec = LogRecord {
                partition: 0,
                offset,
                timestamp_ms: 0,
                key: Bytes::copy_from_slice(id.as_bytes()),
                value: Bytes::from(value),
            };
            registry.apply(Entry { kind: Kind::Subscription, id: id.into(), record: &rec });
        };
        let unreadable =
            |id: &str| serde_json::json!({ "id": id, "tenant": "t", "auth": { "type": "v9" } }).to_string();
        let readable = |id: &str, url: &str| {
            let spec = spec::strict(&serde_json::json!({ "url": url })).unwrap();
            let mut sub = validate::new_subscription("t".into(), spec, None).unwrap();
            sub.id = id.into();
            sub.stored()
        };
        apply(1, "sub_a", readable("sub_a", "https://h.example/a"));
        apply(2, "sub_b", unreadable("sub_b").into_bytes());
        assert_eq!(registry.unreadable_of("t").as_deref(), Some("sub_b"));
        assert_eq!(registry.unreadable_of("u"), None, "another tenant's go on");
        // Readable again, though ignored (its URL is sub_a's).
        apply(3, "sub_b", readable("sub_b", "https://h.example/a"));
        assert_eq!(registry.unreadable_of("t"), None, "a readable record, ignored, ends it");
        apply(4, "sub_b", unreadable("sub_b").into_bytes());
        assert!(registry.unreadable_of("t").is_some());
        apply(5, "sub_b", Vec::new());
        assert_eq!(registry.unreadable_of("t"), None, "a tombstone ends it");
        apply(6, "sub_c", b"not json".to_vec());
        assert!(registry.unreadable("sub_c") && registry.unreadable_of("t").is_none(), "names no tenant");
    }

    /// The config file's webhooks are all checked before any is written: a refused later one
    /// left the earlier ones' changes in the catalog (a start refused, yet processes still
    /// running delivered to an endpoint from the refused file).
    #[tokio::test]
    async fn no_static_webhook_is_written_when_another_is_refused() {
        let stub = Arc::new(Stub::new(true, true));
        let (feed, applied) = Feed::new(stub.clone(), "catalog".into(), 0);
        applied.set(u64::MAX);
        let registry = Registry::load(Arc::new(feed), &[], Rules::default(), HealthConfig::default());
        let webhook = |name: &str, endpoint: &str| -> StaticWebhook {
            serde_json::from_value(serde_json::json!({ "name": name, "endpoint": endpoint })).unwrap()
        };
        for second in [webhook("b", "not a url"), webhook("b", "https://h.example/1")] {
            let refused = registry.sync_static(&[webhook("a", "https://h.example/1"), second]).await;
            assert!(refused.is_err());
            assert!(stub.appends.lock().unwrap().is_empty(), "nothing written");
        }
    }

    /// Process A deletes a subscription while process B, not having read the tombstone yet,
    /// writes a change of it (a PATCH, a rotation, disabling it after a 410): B's record,
    /// made from the version before the delete, must not bring it back in every process.
    #[test]
    fn a_change_made_from_a_version_before_a_delete_does_not_bring_it_back() {
        let registry = registry(true, true);
        let spec = spec::strict(&serde_json::json!({ "url": "https://hooks.example/1" })).unwrap();
        let mut sub = validate::new_subscription("t".into(), spec, None).unwrap();
        sub.id = "sub_a".into();
        let record = |offset: u64, value: Vec<u8>| LogRecord {
            partition: 0,
            offset,
            timestamp_ms: 0,
            key: Bytes::from_static(b"sub_a"),
            value: Bytes::from(value),
        };
        let apply =
            |rec: &LogRecord| registry.apply(Entry { kind: Kind::Subscription, id: "sub_a".into(), record: rec });
        apply(&record(5, sub.stored()));
        apply(&record(6, Vec::new()));
        let mut changed: serde_json::Value = serde_json::from_slice(&sub.stored()).unwrap();
        changed["enabled"] = false.into();
        changed["based_on"] = 5.into();
        apply(&record(7, serde_json::to_vec(&changed).unwrap()));
        assert!(registry.get("sub_a").is_none(), "the deleted subscription came back");
        assert!(matches!(registry.written("sub_a", 7), Written::Deleted));
        // A subscription made again under the same id (a static webhook back in the file) is.
        apply(&record(8, sub.stored()));
        assert!(registry.get("sub_a").is_some());
    }

    #[tokio::test]
    async fn an_unknown_subscription_is_deleted_only_once_the_whole_catalog_was_read() {
        assert!(matches!(registry(true, true).lookup("sub_gone").await, Lookup::Deleted));
        assert!(matches!(registry(true, false).lookup("sub_not_read_yet").await, Lookup::Unknown));
        // One process writes every record of an unshared log, and read them all at start.
        assert!(matches!(registry(false, false).lookup("sub_gone").await, Lookup::Deleted));
    }
}
