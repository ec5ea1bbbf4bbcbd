//! Tenants and their API keys, kept in the catalog beside the subscriptions. A key is shown
//! once; only its SHA-256 is stored. A presented key names its id (`hk.<key id>.<secret>`), so
//! checking it is one lookup and one constant-time comparison.

use crate::catalog::feed::Feed;
use crate::catalog::{Apply, CatalogError, Entry, Key, Kind};
use crate::log::LogRecord;
use crate::model::{new_id, now_ms, rfc3339_ms};
use bytes::Bytes;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The tenant of objects the admin creates without naming one, and of events it publishes so.
pub const DEFAULT_TENANT: &str = "default";

/// What the ids of tenants made through the API begin with (`ten_…`).
const ID_PREFIX: &str = "ten";

/// Whether `name` is spelled as a tenant's id (the default tenant's, or one made through the
/// API): what a folder of the TLS directory named so belongs to.
pub fn looks_like_tenant_id(name: &str) -> bool {
    name == DEFAULT_TENANT || name.strip_prefix(ID_PREFIX).is_some_and(|rest| rest.starts_with('_'))
}

/// A tenant: the owner of subscriptions, API keys and edge devices, and the scope a key sees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tenant {
    /// Id (`ten_…`); subscriptions and events name it as their `tenant`.
    pub id: String,
    /// A name for people; ids are what the API matches on.
    pub name: String,
    /// When it was created, RFC 3339; none for the default tenant, which always was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Portal links minted before this time (RFC 3339) are refused: when its links were last
    /// revoked, none if never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal_links_from: Option<String>,
}

/// How far ahead of the revoking process's clock a revocation of portal links reaches: how far
/// apart two processes' clocks may be for a link minted before it to be refused everywhere.
const PORTAL_CLOCKS_APART_MS: i64 = 60_000;

/// Since when a tenant's portal links are taken after a revocation at `now_ms` (this process's
/// clock): a while ahead of it, and never earlier than the revocation before — made through a
/// process whose clock runs behind, a second revocation moved it back, and links minted after
/// the first (dated at its time) worked again.
fn revoked_from(now_ms: i64, before: Option<i64>) -> i64 {
    (now_ms + PORTAL_CLOCKS_APART_MS).max(before.map_or(i64::MIN, |from| from + 1))
}

impl Tenant {
    /// The [`DEFAULT_TENANT`], never created: listed and given keys like the others (stored
    /// only once something of its own is set, such as a revocation of its portal links).
    fn default_tenant() -> Tenant {
        Tenant {
            id: DEFAULT_TENANT.to_string(),
            name: DEFAULT_TENANT.to_string(),
            created_at: None,
            portal_links_from: None,
        }
    }

    /// Since when its portal links are taken (ms), if they were ever revoked.
    pub fn portal_links_from_ms(&self) -> Option<i64> {
        let from = self.portal_links_from.as_deref()?;
        chrono::DateTime::parse_from_rfc3339(from).ok().map(|t| t.timestamp_millis())
    }

    /// Whether a portal link of this tenant minted at `issued_ms` is still taken.
    pub fn takes_portal_link(&self, issued_ms: i64) -> bool {
        self.portal_links_from_ms().is_none_or(|from| issued_ms >= from)
    }
}

/// An API key as listed: which one, since when; the key itself is never shown again.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    /// Key id (`key_…`), what revoking names.
    pub id: String,
    /// When it was issued, RFC 3339.
    pub created_at: String,
}

/// A tenant with its keys, as `GET /v1/tenants` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TenantKeys {
    /// The tenant's id, name and creation time.
    #[serde(flatten)]
    pub tenant: Tenant,
    /// Its live keys, oldest first.
    pub keys: Vec<KeyInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    id: String,
    tenant: String,
    sha256: String,
    created_at: String,
}

#[derive(Default)]
struct State {
    tenants: HashMap<String, Tenant>,
    keys: HashMap<String, StoredKey>,
}

/// Tenants and keys in memory, persisted in the registry topic.
pub struct Tenants {
    feed: Arc<Feed>,
    state: RwLock<State>,
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new bearer token `<kind>.<id>.<secret>` naming `id`, and the SHA-256 of its secret, the
/// only part stored. API keys (`hk`) and edge-device tokens (`he`) are made this way.
pub fn new_token(kind: &str, id: &str) -> (String, String) {
    let mut raw = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut raw);
    let secret = hex::encode(raw);
    (format!("{kind}.{id}.{secret}"), digest(&secret))
}

/// The id a presented `<kind>.<id>.<secret>` token names, if it is one, with a check of its
/// secret against a stored SHA-256 (constant time).
pub fn parse_token<'a>(presented: &'a str, kind: &str) -> Option<(&'a str, impl Fn(&str) -> bool + 'a)> {
    let mut parts = presented.splitn(3, '.');
    let (Some(k), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next()) else { return None };
    (k == kind).then_some((id, move |sha256: &str| same_secret(sha256, &digest(secret))))
}

/// Compares two secrets without leaking where, or whether in length, they differ: both are
/// hashed to fixed-length digests, compared byte for byte without stopping early.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tenants {
    /// Materialises tenants and keys from `records`, the whole registry topic.
    pub fn load(feed: Arc<Feed>, records: &[LogRecord]) -> Tenants {
        let tenants = Tenants { state: RwLock::new(State::default()), feed };
        crate::catalog::load(&tenants, records, crate::catalog::Owner::Tenants);
        tenants
    }

    async fn persist(&self, key: String, value: Bytes) -> Result<(), CatalogError> {
        self.feed.write(key.as_bytes(), value).await.map(|_| ())
    }

    /// Creates a tenant, durably in the catalog.
    pub async fn create(&self, name: String) -> Result<Tenant, CatalogError> {
        let tenant =
            Tenant { id: new_id(ID_PREFIX), name, created_at: Some(rfc3339_ms(now_ms())), portal_links_from: None };
        self.persist(Key::tenant(&tenant.id), Bytes::from(serde_json::to_vec(&tenant).expect("serializes"))).await?;
        Ok(tenant)
    }

    /// A tenant by id, as this process has applied it (the default tenant always).
    pub fn get(&self, id: &str) -> Option<Tenant> {
        let stored = self.state.read().unwrap().tenants.get(id).cloned();
        stored.or_else(|| (id == DEFAULT_TENANT).then(Tenant::default_tenant))
    }

    /// Refuses every portal link of `tenant` minted until now, durably in the catalog (every
    /// process refuses them once it has read it, as a revoked key); `false` when there is no
    /// such tenant.
    pub async fn revoke_portal_links(&self, tenant: &str) -> Result<bool, CatalogError> {
        let Some(mut t) = self.get(tenant) else { return Ok(false) };
        // A link is dated by the clock of the process that minted it: one minted just before
        // by a process whose clock runs ahead of this one's would be dated after "now" here,
        // and taken for the rest of its lifetime (a week at most). So refused from a while
        // ahead; a link minted after this is dated no earlier (`api::portal::mint`), and works.
        t.portal_links_from = Some(rfc3339_ms(revoked_from(now_ms(), t.portal_links_from_ms())));
        self.persist(Key::tenant(&t.id), Bytes::from(serde_json::to_vec(&t).expect("serializes"))).await?;
        Ok(true)
    }

    /// A page of tenants — the default one first, then oldest first — with their keys' ids and
    /// creation times (never their digests): up to `limit` of those whose name holds `name`
    /// (any case), after the tenant `after`; and the last one's id if more follow. `None` when
    /// `after` names no tenant.
    pub fn list(
        &self,
        name: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Option<(Vec<TenantKeys>, Option<String>)> {
        let state = self.state.read().unwrap();
        let default = state.tenants.get(DEFAULT_TENANT).cloned().unwrap_or_else(Tenant::default_tenant);
        let mut all: Vec<&Tenant> =
            std::iter::once(&default).chain(state.tenants.values().filter(|t| t.id != DEFAULT_TENANT)).collect();
        // The default tenant has no creation time, and so comes first.
        fn order(t: &Tenant) -> (Option<&str>, &str) {
            (t.created_at.as_deref(), t.id.as_str())
        }
        all.sort_by(|a, b| order(a).cmp(&order(b)));
        let from = match after {
            Some(id) => Some(order(all.iter().find(|t| t.id == id)?)),
            None => None,
        };
        let name = name.map(str::to_lowercase);
        let mut page: Vec<&Tenant> = all
            .iter()
            .copied()
            .filter(|t| from.is_none_or(|from| order(t) > from))
            .filter(|t| name.as_ref().is_none_or(|name| t.name.to_lowercase().contains(name)))
            .take(limit + 1)
            .collect();
        let next = (page.len() > limit).then(|| {
            page.truncate(limit);
            page[limit - 1].id.clone()
        });
        // Keys grouped in one pass over them, for this page's tenants only (each tenant
        // filtering every key was tenants × keys).
        let mut by_tenant: HashMap<&str, Vec<KeyInfo>> = page.iter().map(|t| (t.id.as_str(), Vec::new())).collect();
        for k in state.keys.values() {
            if let Some(keys) = by_tenant.get_mut(k.tenant.as_str()) {
                keys.push(KeyInfo { id: k.id.clone(), created_at: k.created_at.clone() });
            }
        }
        let items = page
            .into_iter()
            .map(|t| {
                let mut keys = by_tenant.remove(t.id.as_str()).unwrap_or_default();
                keys.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
                TenantKeys { tenant: t.clone(), keys }
            })
            .collect();
        Some((items, next))
    }

    /// Issues a key for `tenant`: returns its id and the key, which is never shown again.
    pub async fn issue_key(&self, tenant: &str) -> Result<(String, String), CatalogError> {
        let id = new_id("key");
        let (key, sha256) = new_token("hk", &id);
        let stored = StoredKey { id: id.clone(), tenant: tenant.to_string(), sha256, created_at: rfc3339_ms(now_ms()) };
        self.persist(Key::api_key(&id), Bytes::from(serde_json::to_vec(&stored).expect("serializes"))).await?;
        Ok((id, key))
    }

    /// Revokes a key of `tenant`; `false` when there is no such key.
    pub async fn revoke_key(&self, tenant: &str, key_id: &str) -> Result<bool, CatalogError> {
        let exists = self.state.read().unwrap().keys.get(key_id).is_some_and(|k| k.tenant == tenant);
        if exists {
            self.persist(Key::api_key(key_id), Bytes::new()).await?;
        }
        Ok(exists)
    }

    /// The tenant a presented key belongs to, if the key is valid.
    pub fn authenticate(&self, presented: &str) -> Option<String> {
        let (id, matches) = parse_token(presented, "hk")?;
        let state = self.state.read().unwrap();
        let key = state.keys.get(id)?;
        matches(&key.sha256).then(|| key.tenant.clone())
    }
}

impl Apply for Tenants {
    /// A tenant, a key, or a tombstone deleting one.
    fn apply(&self, entry: Entry<'_>) {
        let value = &entry.record.value;
        let mut state = self.state.write().unwrap();
        match entry.kind {
            Kind::Tenant => match serde_json::from_slice::<Tenant>(value) {
                Ok(t) => {
                    state.tenants.insert(entry.id, t);
                }
                Err(_) => {
                    state.tenants.remove(&entry.id);
                }
            },
            Kind::ApiKey => match serde_json::from_slice::<StoredKey>(value) {
                Ok(k) => {
                    state.keys.insert(entry.id, k);
                }
                Err(_) => {
                    state.keys.remove(&entry.id);
                }
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    /// A revocation reaches ahead of its clock, and past the one before whatever its clock.
    #[test]
    fn a_revocation_of_portal_links_never_moves_back() {
        let minute = super::PORTAL_CLOCKS_APART_MS;
        assert_eq!(super::revoked_from(1_000, None), 1_000 + minute);
        let first = super::revoked_from(100_000, None);
        // The second through a process whose clock runs 30 s behind, 10 s after the first.
        let second = super::revoked_from(80_000, Some(first));
        assert!(second > first, "{second} after {first}: a link dated at the first is refused");
        assert_eq!(super::revoked_from(200_000, Some(first)), 200_000 + minute);
    }
}
