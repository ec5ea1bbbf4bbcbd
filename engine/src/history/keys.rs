//! The index's keys: short and fixed-width, so the store compares 8-byte words rather than long
//! ids. Ids appear as 64-bit hashes (XXH3, stable across versions), and every lookup checks
//! the record it finds against the ids it asked for, so a collision can only cost a skipped
//! entry, never a wrong answer. Times are big-endian (newest-first ones inverted), so a prefix
//! scan walks what a query wants in order. Each key lives in the keyspace of one UTC day: an
//! attempt's in the day it was made, an event's (and its deliveries' states) in the day the
//! event was accepted.

/// The keyspace of the day `ms` falls in.
pub fn day(ms: i64) -> u32 {
    (ms.max(0) / 86_400_000) as u32
}

/// The name of day `day`'s keyspace.
pub fn day_name(day: u32) -> String {
    format!("day-{day:06}")
}

/// The day a keyspace name stands for.
pub fn day_of_name(name: &str) -> Option<u32> {
    name.strip_prefix("day-")?.parse().ok()
}

/// The 64-bit hash an id appears as in keys.
pub fn hash(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

/// A key under construction.
pub struct Key(Vec<u8>);

impl Key {
    /// A key of kind `tag`.
    pub fn new(tag: u8) -> Key {
        let mut v = Vec::with_capacity(40);
        v.push(tag);
        Key(v)
    }

    /// Adds an id, as its hash.
    pub fn id(self, id: &str) -> Key {
        self.word(hash(id))
    }

    /// Adds a 64-bit word.
    pub fn word(mut self, w: u64) -> Key {
        self.0.extend_from_slice(&w.to_be_bytes());
        self
    }

    /// Adds a time, oldest first.
    pub fn time(self, ms: i64) -> Key {
        self.word(ms.max(0) as u64)
    }

    /// Adds a time, newest first.
    pub fn newest_first(self, ms: i64) -> Key {
        self.word(u64::MAX - ms.max(0) as u64)
    }

    /// Adds a 32-bit number.
    pub fn number(mut self, n: u32) -> Key {
        self.0.extend_from_slice(&n.to_be_bytes());
        self
    }

    /// The bytes.
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Attempts of a tenant, newest first: `a | tenant | -at | attempt` → the attempt's record.
pub const ATTEMPT: u8 = b'a';
/// Attempts of a subscription, newest first: `s | subscription | -at | attempt` → the tenant's
/// hash (with the time and attempt, the `a` key).
pub const BY_SUBSCRIPTION: u8 = b's';
/// A version of a delivery's state, by subscription and time accepted (so a subscription's
/// events of a window are one range): `d | subscription | accepted | event | at | attempt` →
/// the state.
pub const STATE: u8 = b'd';
/// An event: `v | tenant | event` → its record.
pub const EVENT: u8 = b'v';
/// Events of a tenant, newest first: `t | tenant | -accepted | event` → id and type.
pub const EVENTS: u8 = b't';

/// Reads the 64-bit word at `at` of `key`.
pub fn read_word(key: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(at..at + 8)?.try_into().ok()?))
}

/// The smallest key after every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_times_sort_first_and_ids_are_stable_words() {
        let older = Key::new(ATTEMPT).id("t").newest_first(1000).id("x").done();
        let newer = Key::new(ATTEMPT).id("t").newest_first(2000).id("x").done();
        assert!(newer < older);
        assert_eq!(older.len(), 25);
        // The hash is part of the stored format: it must not change between versions.
        assert_eq!(hash("sub_0"), xxhash_rust::xxh3::xxh3_64(b"sub_0"));
        assert_eq!(read_word(&older, 9), Some(u64::MAX - 1000));
        assert_eq!(day_of_name(&day_name(day(86_400_000 * 3 + 5))), Some(3));
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
    }
}
