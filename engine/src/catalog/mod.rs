//! The catalog: the compacted registry topic (`<prefix>subscriptions`) that holds every
//! subscription, tenant, API key, edge device, edge presence and event type, followed by every process
//! (`feed`). One router decides, from a record's key, which owner applies it; each owner
//! writes its records under the key the [`Key`] functions make.

pub mod feed;

use crate::log::{LogError, LogRecord};
use std::sync::Arc;
use std::time::Duration;

/// Why the catalog could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The log refused the write or read.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The write landed, but this process did not read it back in time (it follows the topic).
    #[error("the registry did not read back up to offset {offset} within {}s", within.as_secs())]
    NotReadBack {
        /// The offset waited for.
        offset: u64,
        /// How long it waited.
        within: Duration,
    },
    /// This process could not tell, in time, that it had read every record in the topic.
    #[error("the registry could not catch up with the topic within {}s", within.as_secs())]
    NotSettled {
        /// How long it waited.
        within: Duration,
    },
}

/// Who owns a catalog record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A subscription (keyed by its bare id).
    Subscriptions,
    /// A tenant or an API key.
    Tenants,
    /// An edge device or where its agent is connected.
    Devices,
    /// An entry of the event-type catalogue.
    EventTypes,
}

const TENANT: &str = "tenant/";
const API_KEY: &str = "key/";
const DEVICE: &str = "edge/";
const PRESENCE: &str = "edge-at/";
const EVENT_TYPE: &str = "event-type/";

/// The catalog's record keys: the one place that spells them.
pub struct Key;

impl Key {
    /// A tenant's record.
    pub fn tenant(id: &str) -> String {
        format!("{TENANT}{id}")
    }

    /// An API key's record.
    pub fn api_key(id: &str) -> String {
        format!("{API_KEY}{id}")
    }

    /// An edge device's record.
    pub fn device(id: &str) -> String {
        format!("{DEVICE}{id}")
    }

    /// The record of where a device's agent is connected.
    pub fn presence(device: &str) -> String {
        format!("{PRESENCE}{device}")
    }

    /// An event type's record.
    pub fn event_type(name: &str) -> String {
        format!("{EVENT_TYPE}{name}")
    }

    /// What a record key names: its owner, its kind's prefix stripped, and the id.
    pub fn parse(key: &[u8]) -> (Owner, Kind, String) {
        let key = String::from_utf8_lossy(key);
        for (prefix, owner, kind) in [
            (TENANT, Owner::Tenants, Kind::Tenant),
            (API_KEY, Owner::Tenants, Kind::ApiKey),
            (PRESENCE, Owner::Devices, Kind::Presence),
            (DEVICE, Owner::Devices, Kind::Device),
            (EVENT_TYPE, Owner::EventTypes, Kind::EventType),
        ] {
            if let Some(id) = key.strip_prefix(prefix) {
                return (owner, kind, id.to_string());
            }
        }
        (Owner::Subscriptions, Kind::Subscription, key.into_owned())
    }
}

/// The kind of object a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A subscription, keyed by its bare id (older records have no prefix).
    Subscription,
    /// A tenant (`tenant/…`).
    Tenant,
    /// An API key's digest (`key/…`).
    ApiKey,
    /// An edge device and its token digest (`edge/…`).
    Device,
    /// An edge agent's presence.
    Presence,
    /// An event type (`event-type/…`).
    EventType,
}

/// A record as its owner gets it: what it is, its id, and its value (empty: deleted).
pub struct Entry<'a> {
    /// What the record holds.
    pub kind: Kind,
    /// The object's id.
    pub id: String,
    /// The record itself (its offset orders racing writes).
    pub record: &'a LogRecord,
}

/// An owner of catalog records: applies each of its own, in log order.
pub trait Apply: Send + Sync {
    /// Applies one record (a tombstone when `entry.record.value` is empty).
    fn apply(&self, entry: Entry<'_>);
}

/// Hands each record to its owner.
#[derive(Clone)]
pub struct Router {
    subscriptions: Arc<dyn Apply>,
    tenants: Arc<dyn Apply>,
    devices: Arc<dyn Apply>,
    event_types: Arc<dyn Apply>,
}

impl Router {
    /// A router to the four owners.
    pub fn new(
        subscriptions: Arc<dyn Apply>,
        tenants: Arc<dyn Apply>,
        devices: Arc<dyn Apply>,
        event_types: Arc<dyn Apply>,
    ) -> Router {
        Router { subscriptions, tenants, devices, event_types }
    }

    /// Applies one record through its owner.
    pub fn apply(&self, record: &LogRecord) {
        let (owner, kind, id) = Key::parse(&record.key);
        let entry = Entry { kind, id, record };
        match owner {
            Owner::Subscriptions => self.subscriptions.apply(entry),
            Owner::Tenants => self.tenants.apply(entry),
            Owner::Devices => self.devices.apply(entry),
            Owner::EventTypes => self.event_types.apply(entry),
        }
    }
}

/// Applies the records of `records` that `owner` owns to it: loading at start-up takes the
/// same path as following.
pub fn load(apply: &dyn Apply, records: &[LogRecord], owner: Owner) {
    for record in records {
        let (of, kind, id) = Key::parse(&record.key);
        if of == owner {
            apply.apply(Entry { kind, id, record });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_owner() {
        assert_eq!(Key::parse(Key::tenant("ten_1").as_bytes()), (Owner::Tenants, Kind::Tenant, "ten_1".into()));
        assert_eq!(Key::parse(Key::api_key("key_1").as_bytes()), (Owner::Tenants, Kind::ApiKey, "key_1".into()));
        assert_eq!(Key::parse(Key::device("edg_1").as_bytes()), (Owner::Devices, Kind::Device, "edg_1".into()));
        assert_eq!(Key::parse(Key::presence("edg_1").as_bytes()), (Owner::Devices, Kind::Presence, "edg_1".into()));
        assert_eq!(
            Key::parse(Key::event_type("order.created").as_bytes()),
            (Owner::EventTypes, Kind::EventType, "order.created".into())
        );
        assert_eq!(Key::parse(b"sub_1"), (Owner::Subscriptions, Kind::Subscription, "sub_1".into()));
        assert_eq!(Key::parse(b"static-erp"), (Owner::Subscriptions, Kind::Subscription, "static-erp".into()));
    }
}
