//! Committed consumer offsets of the embedded log, one JSON file per consumer group,
//! replaced atomically (write, fsync, rename) so a crash leaves the old or the new file.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Mutex;

type TopicOffsets = BTreeMap<String, BTreeMap<u32, u64>>;

#[derive(Default)]
struct Group {
    offsets: TopicOffsets,
    dirty: bool,
}

/// All groups' committed offsets, cached in memory and flushed periodically.
pub struct OffsetStore {
    dir: PathBuf,
    groups: Mutex<HashMap<String, Group>>,
    /// Held for a whole flush, so a flush that returns has also waited for one under way
    /// (which may hold the latest commits).
    flushing: Mutex<()>,
}

fn file_for(dir: &std::path::Path, group: &str) -> PathBuf {
    let safe: String = group
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    dir.join(format!("{safe}.json"))
}

impl OffsetStore {
    /// Loads every group file under `dir`.
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        crate::log::private::create_dir(&dir)?;
        let mut groups = HashMap::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                let offsets: TopicOffsets = serde_json::from_slice(&fs::read(&path)?)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?;
                groups.insert(name, Group { offsets, dirty: false });
            }
        }
        Ok(OffsetStore { dir, groups: Mutex::new(groups), flushing: Mutex::new(()) })
    }

    /// The committed offset of `group` on a partition (0 when never committed).
    pub fn get(&self, group: &str, topic: &str, partition: u32) -> u64 {
        let groups = self.groups.lock().unwrap();
        groups.get(group).and_then(|g| g.offsets.get(topic)).and_then(|t| t.get(&partition)).copied().unwrap_or(0)
    }

    /// Registers `group` as a consumer of `topic` so reclaim waits for it.
    pub fn join(&self, group: &str, topic: &str) {
        let mut groups = self.groups.lock().unwrap();
        groups.entry(group.to_string()).or_default().offsets.entry(topic.to_string()).or_default();
    }

    /// Records progress; offsets only move forward.
    pub fn commit(&self, group: &str, topic: &str, partition: u32, next: u64) {
        let mut groups = self.groups.lock().unwrap();
        let g = groups.entry(group.to_string()).or_default();
        let slot = g.offsets.entry(topic.to_string()).or_default().entry(partition).or_insert(0);
        if next > *slot {
            *slot = next;
            g.dirty = true;
        }
    }

    /// Lowest committed offset of any group consuming `topic` on `partition`, if any group does.
    pub fn min_committed(&self, topic: &str, partition: u32) -> Option<u64> {
        let groups = self.groups.lock().unwrap();
        groups.values().filter_map(|g| g.offsets.get(topic)).map(|t| t.get(&partition).copied().unwrap_or(0)).min()
    }

    /// Writes the groups that changed since the last flush. A group whose write fails stays
    /// marked, and so do the others: every one is tried, and the first error reported.
    pub fn flush(&self) -> io::Result<()> {
        let _one_at_a_time = self.flushing.lock().unwrap();
        let pending: Vec<(String, TopicOffsets)> = {
            let mut groups = self.groups.lock().unwrap();
            groups
                .iter_mut()
                .filter(|(_, g)| g.dirty)
                .map(|(name, g)| {
                    g.dirty = false;
                    (name.clone(), g.offsets.clone())
                })
                .collect()
        };
        let mut first_error = None;
        for (name, offsets) in pending {
            if let Err(e) = self.write(&name, &offsets) {
                // Try again next time rather than lose the commit.
                if let Some(g) = self.groups.lock().unwrap().get_mut(&name) {
                    g.dirty = true;
                }
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn write(&self, name: &str, offsets: &TopicOffsets) -> io::Result<()> {
        let path = file_for(&self.dir, name);
        let tmp = path.with_extension("json.tmp");
        let mut f = crate::log::private::create(&tmp)?;
        f.write_all(&serde_json::to_vec(offsets).expect("offsets serialize"))?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_survive_reopen_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = OffsetStore::open(dir.path().to_path_buf()).unwrap();
        store.commit("dispatch", "t", 3, 10);
        store.commit("dispatch", "t", 3, 7);
        store.flush().unwrap();
        let again = OffsetStore::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(again.get("dispatch", "t", 3), 10);
        assert_eq!(again.min_committed("t", 3), Some(10));
        assert_eq!(again.min_committed("other", 3), None);
    }

    #[test]
    fn a_failed_write_keeps_every_unwritten_group_for_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = OffsetStore::open(dir.path().to_path_buf()).unwrap();
        for group in ["a", "b", "c"] {
            store.commit(group, "t", 0, 5);
        }
        // Group b's file cannot be written: a directory stands where its scratch file goes.
        let blocker = dir.path().join("b.json.tmp");
        std::fs::create_dir(&blocker).unwrap();
        assert!(store.flush().is_err());
        std::fs::remove_dir(&blocker).unwrap();
        store.flush().unwrap();
        let again = OffsetStore::open(dir.path().to_path_buf()).unwrap();
        for group in ["a", "b", "c"] {
            assert_eq!(again.get(group, "t", 0), 5, "group {group} was written");
        }
    }
}
