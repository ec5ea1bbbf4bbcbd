//! Edge devices: objects of a tenant, kept in the catalog. Each has its own token, shown once
//! at creation and stored as a SHA-256; a presented token names its device
//! (`he.<device id>.<secret>`). The catalog also records which Herald process a device's agent
//! is connected to (its presence), so any process can reach it.

use crate::catalog::feed::Feed;
use crate::catalog::{Apply, CatalogError, Entry, Key, Kind, Owner};
use crate::log::LogRecord;
use crate::model::{new_id, now_ms, rfc3339_ms};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Which Herald process a device's agent is connected to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// That process's URL, as other processes reach it.
    pub url: String,
    /// The connection, unique across processes.
    pub connection: String,
}

/// A presence withdrawn: it removes the device's presence only while that is still this
/// connection's. An empty tombstone, written after a check, removed whatever was there by the
/// time it was applied — a newer connection's presence, announced meanwhile (an agent that
/// reconnected before its old connection was found dead), which then stayed unknown to the
/// other processes.
#[derive(Debug, Serialize, Deserialize)]
struct Withdrawn {
    withdrawn: String,
}

/// An edge device as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeDevice {
    /// Id (`edg_…`); subscriptions name it in `via_edge`.
    pub id: String,
    /// The tenant whose subscriptions may deliver through it.
    pub tenant: String,
    /// A name for people (where it runs).
    pub name: String,
    /// When it was created, RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    device: EdgeDevice,
    sha256: String,
}

/// Every tenant's edge devices, in memory, persisted in the registry topic.
pub struct Devices {
    feed: Arc<Feed>,
    /// Held while a create counts the tenant's devices and writes, so racing creates cannot
    /// pass a quota together.
    creates: tokio::sync::Mutex<()>,
    state: RwLock<HashMap<String, Stored>>,
    /// Each device's presence, with its record's offset in the catalog (a device's records
    /// are in one partition, in the order every process reads them).
    presence: RwLock<HashMap<String, (Presence, u64)>>,
}

impl Devices {
    /// Materialises the devices from `records`, the whole registry topic.
    pub fn load(feed: Arc<Feed>, records: &[LogRecord]) -> Devices {
        let devices = Devices {
            feed,
            creates: tokio::sync::Mutex::new(()),
            state: RwLock::default(),
            presence: RwLock::default(),
        };
        crate::catalog::load(&devices, records, Owner::Devices);
        devices
    }

    /// Creates a device for `tenant`, unless it has `max` already (`None`); returns it and its
    /// token, which is never shown again.
    pub async fn create(
        &self,
        tenant: &str,
        name: String,
        max: usize,
    ) -> Result<Option<(EdgeDevice, String)>, CatalogError> {
        let _one_at_a_time = self.creates.lock().await;
        if self.count_of(tenant) >= max {
            return Ok(None);
        }
        let device =
            EdgeDevice { id: new_id("edg"), tenant: tenant.to_string(), name, created_at: rfc3339_ms(now_ms()) };
        let (token, sha256) = crate::tenants::new_token("he", &device.id);
        let stored = Stored { device: device.clone(), sha256 };
        self.feed
            .write(Key::device(&device.id).as_bytes(), Bytes::from(serde_json::to_vec(&stored).expect("serializes")))
            .await?;
        Ok(Some((device, token)))
    }

    /// A device by id, if it exists (and belongs to `tenant`, when given).
    pub fn get(&self, id: &str, tenant: Option<&str>) -> Option<EdgeDevice> {
        let state = self.state.read().unwrap();
        state.get(id).map(|s| s.device.clone()).filter(|d| tenant.is_none_or(|t| d.tenant == t))
    }

    /// How many devices `tenant` has.
    fn count_of(&self, tenant: &str) -> usize {
        self.state.read().unwrap().values().filter(|s| s.device.tenant == tenant).count()
    }

    /// The devices of `tenant`, or of every tenant, by id.
    pub fn list(&self, tenant: Option<&str>) -> Vec<EdgeDevice> {
        let state = self.state.read().unwrap();
        let mut out: Vec<EdgeDevice> =
            state.values().map(|s| s.device.clone()).filter(|d| tenant.is_none_or(|t| d.tenant == t)).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Deletes a device of `tenant` (any tenant's when `None`); `false` when there is none.
    pub async fn delete(&self, id: &str, tenant: Option<&str>) -> Result<bool, CatalogError> {
        if self.get(id, tenant).is_none() {
            return Ok(false);
        }
        // Its presence too: a withdrawal is a record of its own, which compaction would keep
        // for ever (one more for every device made and deleted, read at every start).
        self.feed.write(Key::presence(id).as_bytes(), Bytes::new()).await?;
        self.feed.write(Key::device(id).as_bytes(), Bytes::new()).await?;
        Ok(true)
    }

    /// Where `device`'s agent was last seen connecting, if anywhere.
    pub fn located(&self, device: &str) -> Option<Presence> {
        self.located_at(device).map(|(p, _)| p)
    }

    /// [`Devices::located`], with where its record is in the catalog.
    pub fn located_at(&self, device: &str) -> Option<(Presence, u64)> {
        self.presence.read().unwrap().get(device).cloned()
    }

    /// Forgets every presence read so far: at the start of the only process of a log no other
    /// shares (embedded), each is a dead run's — kept, a device read `connected` and its
    /// attempts were forwarded to that run's address (dead, and shown in the history).
    pub fn forget_presences(&self) {
        self.presence.write().unwrap().clear();
    }

    /// Records that `device`'s agent is connected at `presence`; returns where its record is
    /// in the catalog.
    pub async fn announce(&self, device: &str, presence: &Presence) -> Result<u64, CatalogError> {
        let value = Bytes::from(serde_json::to_vec(presence).expect("serializes"));
        self.feed.write(Key::presence(device).as_bytes(), value).await.map(|at| at.offset)
    }

    /// Withdraws `presence` of `device`, unless a newer connection has replaced it (checked
    /// again where the withdrawal is applied: see [`Withdrawn`]).
    pub async fn withdraw(&self, device: &str, presence: &Presence) -> Result<(), CatalogError> {
        if self.located(device).as_ref() != Some(presence) {
            return Ok(());
        }
        let value = serde_json::to_vec(&Withdrawn { withdrawn: presence.connection.clone() }).expect("serializes");
        self.feed.write(Key::presence(device).as_bytes(), Bytes::from(value)).await.map(|_| ())
    }

    /// The device a presented token belongs to, if the token is valid.
    pub fn authenticate(&self, presented: &str) -> Option<EdgeDevice> {
        let (id, matches) = crate::tenants::parse_token(presented, "he")?;
        let state = self.state.read().unwrap();
        let stored = state.get(id)?;
        matches(&stored.sha256).then(|| stored.device.clone())
    }
}

impl Apply for Devices {
    /// A device, a presence, or a tombstone deleting one.
    fn apply(&self, entry: Entry<'_>) {
        let value = &entry.record.value;
        match entry.kind {
            Kind::Presence => {
                let mut presence = self.presence.write().unwrap();
                if let Ok(p) = serde_json::from_slice::<Presence>(value) {
                    presence.insert(entry.id, (p, entry.record.offset));
                } else if let Ok(w) = serde_json::from_slice::<Withdrawn>(value) {
                    if presence.get(&entry.id).is_some_and(|(p, _)| p.connection == w.withdrawn) {
                        presence.remove(&entry.id);
                    }
                } else {
                    presence.remove(&entry.id);
                }
            }
            Kind::Device => {
                let mut state = self.state.write().unwrap();
                match serde_json::from_slice::<Stored>(value) {
                    Ok(d) => state.insert(entry.id, d),
                    Err(_) => state.remove(&entry.id),
                };
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::stub::Stub;

    /// The old connection's withdrawal, checked against the presence it saw, is applied after
    /// a newer connection announced itself: the newer presence stays.
    #[tokio::test]
    async fn a_withdrawal_applied_after_a_newer_announce_leaves_the_newer_presence() {
        let stub = Arc::new(Stub::new(true, true));
        let (feed, applied) = Feed::new(stub.clone(), "catalog".into(), 0);
        applied.set(u64::MAX); // nobody follows here: records are applied by hand below
        let devices = Devices::load(Arc::new(feed), &[]);
        let apply = |value: Bytes| {
            let record = LogRecord { partition: 0, offset: 0, key: Bytes::new(), value, timestamp_ms: 0 };
            devices.apply(Entry { kind: Kind::Presence, id: "edg_1".into(), record: &record });
        };
        let at = |connection: &str| Presence { url: "http://herald-a".into(), connection: connection.into() };
        apply(Bytes::from(serde_json::to_vec(&at("old")).unwrap()));
        devices.withdraw("edg_1", &at("old")).await.unwrap(); // checked: still "old"
        let withdrawal = stub.appends.lock().unwrap().last().unwrap()[0].value.clone();
        apply(Bytes::from(serde_json::to_vec(&at("new")).unwrap())); // announced meanwhile
        apply(withdrawal);
        assert_eq!(devices.located("edg_1"), Some(at("new")));
        // Its own withdrawal removes a presence; so does a tombstone.
        devices.withdraw("edg_1", &at("new")).await.unwrap();
        apply(stub.appends.lock().unwrap().last().unwrap()[0].value.clone());
        assert_eq!(devices.located("edg_1"), None);
        apply(Bytes::from(serde_json::to_vec(&at("newer")).unwrap()));
        apply(Bytes::new());
        assert_eq!(devices.located("edg_1"), None);
    }

    /// A deleted device leaves nothing in the catalog that compaction keeps: its presence (a
    /// withdrawal, the newest record of its key) is deleted with it.
    #[tokio::test]
    async fn deleting_a_device_deletes_its_presence_record_too() {
        let stub = Arc::new(Stub::new(true, true));
        let (feed, applied) = Feed::new(stub.clone(), "catalog".into(), 0);
        applied.set(u64::MAX);
        let devices = Devices::load(Arc::new(feed), &[]);
        let (device, _) = devices.create("acme", "edge".into(), 10).await.unwrap().unwrap();
        let created = stub.appends.lock().unwrap().last().unwrap()[0].clone();
        let key = |k: String| Bytes::from(k.into_bytes());
        let record = LogRecord { partition: 0, offset: 0, key: created.key, value: created.value, timestamp_ms: 0 };
        devices.apply(Entry { kind: Kind::Device, id: device.id.clone(), record: &record });
        assert!(devices.delete(&device.id, Some("acme")).await.unwrap());
        let appends = stub.appends.lock().unwrap();
        let newest = |k: &Bytes| appends.iter().flatten().rev().find(|r| r.key == k).map(|r| r.value.clone());
        assert_eq!(newest(&key(Key::device(&device.id))), Some(Bytes::new()), "the device's tombstone");
        assert_eq!(newest(&key(Key::presence(&device.id))), Some(Bytes::new()), "its presence's tombstone");
    }
}
