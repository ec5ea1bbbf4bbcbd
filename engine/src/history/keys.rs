//! The index's keys. Every part is length-prefixed, so no id can run into the next part, and
//! times are big-endian (newest-first ones inverted), so a prefix scan walks what a query
//! wants in order. Each key lives in the keyspace of one UTC day: an attempt's keys in the day
//! it was made, an event's (and its deliveries' states) in the day it was accepted.

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

/// A key under construction.
pub struct Key(Vec<u8>);

impl Key {
    /// A key of kind `tag`.
    pub fn new(tag: u8) -> Key {
        let mut v = Vec::with_capacity(64);
        v.push(tag);
        Key(v)
    }

    /// Adds a length-prefixed part.
    pub fn part(mut self, s: &str) -> Key {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(&s.as_bytes()[..len as usize]);
        self
    }

    /// Adds a time, oldest first.
    pub fn time(mut self, ms: i64) -> Key {
        self.0.extend_from_slice(&(ms.max(0) as u64).to_be_bytes());
        self
    }

    /// Adds a time, newest first.
    pub fn newest_first(mut self, ms: i64) -> Key {
        self.0.extend_from_slice(&(u64::MAX - ms.max(0) as u64).to_be_bytes());
        self
    }

    /// The bytes.
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Attempts of a tenant, newest first: `a | tenant | -at | attempt` → the attempt's view.
pub const ATTEMPT: u8 = b'a';
/// Attempts of a subscription, newest first: `s | subscription | -at | attempt` → tenant.
pub const BY_SUBSCRIPTION: u8 = b's';
/// Attempts of an event: `e | tenant | event | -at | attempt` → subscription.
pub const BY_EVENT: u8 = b'e';
/// An event: `v | tenant | event` → its record.
pub const EVENT: u8 = b'v';
/// Events of a tenant, newest first: `t | tenant | -accepted | event` → type.
pub const EVENTS: u8 = b't';
/// A delivery's latest state: `d | tenant | event | subscription` → state.
pub const STATE: u8 = b'd';
/// Events of a subscription, by time accepted: `r | subscription | accepted | event` → tenant.
pub const RECOVERY: u8 = b'r';

/// Reads the length-prefixed part at `at` of `key`; returns it and where the next part starts.
pub fn read_part(key: &[u8], at: usize) -> Option<(&str, usize)> {
    let len = u16::from_be_bytes(key.get(at..at + 2)?.try_into().ok()?) as usize;
    let text = std::str::from_utf8(key.get(at + 2..at + 2 + len)?).ok()?;
    Some((text, at + 2 + len))
}

/// Reads the 8-byte time at `at`.
pub fn read_time(key: &[u8], at: usize) -> Option<u64> {
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
    fn newer_times_sort_first_and_parts_cannot_run_together() {
        let older = Key::new(ATTEMPT).part("t").newest_first(1000).part("x").done();
        let newer = Key::new(ATTEMPT).part("t").newest_first(2000).part("x").done();
        assert!(newer < older);
        let a = Key::new(EVENT).part("ab").part("c").done();
        let b = Key::new(EVENT).part("a").part("bc").done();
        assert_ne!(a, b);
        assert_eq!(read_part(&a, 1), Some(("ab", 5)));
        assert_eq!(day_of_name(&day_name(day(86_400_000 * 3 + 5))), Some(3));
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
    }
}
