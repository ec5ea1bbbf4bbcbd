//! Committed consumer offsets of the embedded log, one file per consumer group.
//!
//! A group's file holds two slots of the same size, each `magic u32 | len u32 | crc u32 |
//! seq u64 | JSON` (the CRC covers the sequence number and the JSON). A flush overwrites the
//! older slot in place and syncs its data: the file keeps its size and its blocks, so (on ext4
//! or xfs; a copy-on-write file system allocates anew) the sync writes one page and no file
//! system metadata — where replacing a file (write, sync, rename, directory sync) every
//! `log.flush_interval` made journal commits that slowed the appends' own syncs beside them.
//! A crash mid-write leaves that slot failing its check and the other one (the previous flush)
//! read: offsets may go back one flush, never forward past what was committed, so a crash
//! re-delivers and never skips. A slot too small for the JSON (many more topics or partitions)
//! makes the file be replaced once, atomically, with slots twice the size; so is a group's
//! first file. Files of the older format, `{group}.json` replaced whole, are read, and removed
//! once their group's new file is written; if both are there (a crash between the two, or an
//! older Herald run since), each partition takes the higher offset of the two, since both hold
//! only committed ones.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

type TopicOffsets = BTreeMap<String, BTreeMap<u32, u64>>;

/// Marks a slot that was written at all (a preallocated one is zeros).
const MAGIC: u32 = 0x4f46_5331;
/// Where a slot's fields are: `magic u32 | len u32 | crc u32 | seq u64`, then the JSON. The
/// CRC covers the sequence number and the JSON.
const LEN_AT: usize = 4;
const CRC_AT: usize = 8;
const SEQ_AT: usize = 12;
const HEADER: usize = SEQ_AT + 8;
/// The first file's slot: one page, room for a few hundred partitions' offsets.
const FIRST_SLOT: usize = 4096;
const EXTENSION: &str = "offsets";
const LEGACY_EXTENSION: &str = "json";
/// A file being written before its rename (either format's).
const SCRATCH_EXTENSION: &str = "tmp";

#[derive(Default)]
struct Group {
    offsets: TopicOffsets,
    dirty: bool,
}

/// All groups' committed offsets, cached in memory and flushed periodically.
pub struct OffsetStore {
    dir: PathBuf,
    groups: Mutex<HashMap<String, Group>>,
    /// The groups' open files, held for a whole flush, so a flush that returns has also waited
    /// for one under way (which may hold the latest commits).
    files: Mutex<Files>,
}

#[derive(Default)]
struct Files {
    open: HashMap<String, SlotFile>,
    /// Groups' files of the older format, removed once the group's new file holds what they held.
    carried_over: HashMap<String, PathBuf>,
}

/// A group's file of two slots, the next write going to the older one.
struct SlotFile {
    file: File,
    slot: usize,
    /// Sequence number of the newest valid slot; slot `seq % 2` holds it.
    seq: u64,
}

/// A group's file: `{group}.offsets`. Only names that are file names as they stand are taken
/// ([`OffsetStore::join`]): two names made into one file would have one group's writes go to a
/// file the other had replaced, and its offsets read back as the other's after a restart.
fn path_for(dir: &Path, group: &str) -> PathBuf {
    dir.join(format!("{group}.{EXTENSION}"))
}

fn is_file_stem(group: &str) -> bool {
    !group.is_empty()
        && !group.starts_with('.')
        && group.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Where a file is written before it is renamed to `path`.
fn scratch_for(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{SCRATCH_EXTENSION}"));
    PathBuf::from(name)
}

/// Moves a partition's offset to `next` if that is further: offsets only move forward.
/// Whether it moved.
fn advance(offsets: &mut TopicOffsets, topic: &str, partition: u32, next: u64) -> bool {
    let slot = offsets.entry(topic.to_string()).or_default().entry(partition).or_insert(0);
    let moved = next > *slot;
    *slot = (*slot).max(next);
    moved
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
}

/// One slot's bytes: header and JSON, not padded.
fn frame(seq: u64, body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER + body.len());
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(body);
    let crc = crc32fast::hash(&buf[SEQ_AT..]);
    buf[CRC_AT..SEQ_AT].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// The sequence number and JSON of a slot, if it holds a whole, unbroken write.
fn unframe(slot: &[u8]) -> Option<(u64, &[u8])> {
    let word = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().unwrap());
    if slot.len() < HEADER || word(0) != MAGIC {
        return None;
    }
    let len = word(LEN_AT) as usize;
    let body = slot.get(HEADER..HEADER.checked_add(len)?)?;
    (crc32fast::hash(&slot[SEQ_AT..HEADER + len]) == word(CRC_AT))
        .then(|| (u64::from_le_bytes(slot[SEQ_AT..HEADER].try_into().unwrap()), body))
}

impl SlotFile {
    /// Reads the newest valid slot of a group's file.
    fn open(path: &Path) -> io::Result<(SlotFile, TopicOffsets)> {
        let mut file = crate::log::private::options().read(true).write(true).open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        if bytes.is_empty() || bytes.len() % 2 != 0 {
            return Err(invalid(path, format_args!("{} bytes is not two slots", bytes.len())));
        }
        let slot = bytes.len() / 2;
        // A whole write in the slot its sequence number does not name is not one of ours: were
        // it taken, the next overwrite would go over the newest.
        let newest = bytes
            .chunks(slot)
            .enumerate()
            .filter_map(|(i, s)| unframe(s).filter(|(seq, _)| *seq % 2 == i as u64))
            .max_by_key(|(seq, _)| *seq)
            .ok_or_else(|| {
                invalid(path, "neither slot holds a whole write (remove the file to start the group from the beginning of its topics, which delivers everything retained again)")
            })?;
        let offsets = serde_json::from_slice(newest.1).map_err(|e| invalid(path, e))?;
        Ok((SlotFile { file, slot, seq: newest.0 }, offsets))
    }

    /// Writes a new file whose slots fit `body` (twice over, so it grows rarely), atomically.
    /// Its one write is sequence 1: sequence numbers only order the two slots of one file.
    fn create(dir: &Path, path: &Path, body: &[u8]) -> io::Result<SlotFile> {
        let seq = 1;
        let slot = (HEADER + body.len()).saturating_mul(2).next_power_of_two().max(FIRST_SLOT);
        let mut bytes = vec![0; 2 * slot];
        let at = (seq % 2) as usize * slot;
        let framed = frame(seq, body);
        bytes[at..at + framed.len()].copy_from_slice(&framed);
        let file = super::partition::replace_durably(dir, &scratch_for(path), path, &bytes)?;
        Ok(SlotFile { file, slot, seq })
    }

    /// Overwrites the older slot; on failure the sequence stays, so the next try goes to the
    /// same slot and the newest whole one is never the one written over.
    fn overwrite(&mut self, body: &[u8]) -> io::Result<()> {
        let seq = self.seq + 1;
        self.file.write_all_at(&frame(seq, body), (seq % 2) * self.slot as u64)?;
        self.file.sync_data()?;
        self.seq = seq;
        Ok(())
    }

    fn fits(&self, body: &[u8]) -> bool {
        HEADER + body.len() <= self.slot
    }
}

impl OffsetStore {
    /// Loads every group's file under `dir`, and files of the older format. Removing a file
    /// left over (a scratch file, an old file already carried over) needs no directory sync:
    /// if a crash brings one back, the next open removes it again.
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        crate::log::private::create_dir(&dir)?;
        let mut groups = HashMap::new();
        let mut files = Files::default();
        let mut legacy = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let (Some(stem), Some(extension)) = (path.file_stem(), path.extension()) else { continue };
            let name = stem.to_string_lossy().into_owned();
            if extension == EXTENSION {
                let (file, offsets) = SlotFile::open(&path)?;
                groups.insert(name.clone(), Group { offsets, dirty: false });
                files.open.insert(name, file);
            } else if extension == LEGACY_EXTENSION {
                legacy.push((name, path));
            } else if extension == SCRATCH_EXTENSION
                && [EXTENSION, LEGACY_EXTENSION].iter().any(|e| Path::new(stem).extension().is_some_and(|x| x == *e))
            {
                // A file whose rename a crash cut short: the one it was to replace (or none) stands.
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove a consumer offsets scratch file");
                }
            }
        }
        for (name, path) in legacy {
            let old: TopicOffsets = serde_json::from_slice(&fs::read(&path)?).map_err(|e| invalid(&path, e))?;
            let group = groups.entry(name.clone()).or_default();
            for (topic, partitions) in &old {
                // A topic joined and never committed is kept too: reclaim waits for it.
                group.offsets.entry(topic.clone()).or_default();
                for (&partition, &next) in partitions {
                    advance(&mut group.offsets, topic, partition, next);
                }
            }
            // Dirty, so the first flush writes the group's new file and then removes this one.
            group.dirty = true;
            files.carried_over.insert(name, path);
        }
        Ok(OffsetStore { dir, groups: Mutex::new(groups), files: Mutex::new(files) })
    }

    /// The committed offset of `group` on a partition (0 when never committed).
    pub fn get(&self, group: &str, topic: &str, partition: u32) -> u64 {
        let groups = self.groups.lock().unwrap();
        groups.get(group).and_then(|g| g.offsets.get(topic)).and_then(|t| t.get(&partition)).copied().unwrap_or(0)
    }

    /// Registers `group` as a consumer of `topic` so reclaim waits for it. The name must be
    /// a file name as it stands (letters, digits, `-`, `_`, `.`; not starting with `.`).
    pub fn join(&self, group: &str, topic: &str) -> io::Result<()> {
        if !is_file_stem(group) {
            let why = format!("consumer group {group:?}: only letters, digits, '-', '_' and '.' (not first)");
            return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        }
        let mut groups = self.groups.lock().unwrap();
        groups.entry(group.to_string()).or_default().offsets.entry(topic.to_string()).or_default();
        Ok(())
    }

    /// Records progress; offsets only move forward.
    pub fn commit(&self, group: &str, topic: &str, partition: u32, next: u64) {
        let mut groups = self.groups.lock().unwrap();
        let g = groups.entry(group.to_string()).or_default();
        if advance(&mut g.offsets, topic, partition, next) {
            g.dirty = true;
        }
    }

    /// Moves `group`'s offset on a partition back to `to`: for a commit past the partition's
    /// end (records lost below it), which would otherwise stand — every commit below it
    /// ignored, reclaim going by it past records not read yet, lag reading 0.
    pub fn rewind(&self, group: &str, topic: &str, partition: u32, to: u64) {
        let mut groups = self.groups.lock().unwrap();
        let g = groups.entry(group.to_string()).or_default();
        g.offsets.entry(topic.to_string()).or_default().insert(partition, to);
        g.dirty = true;
    }

    /// Lowest committed offset of any group consuming `topic` on `partition`, if any group does.
    pub fn min_committed(&self, topic: &str, partition: u32) -> Option<u64> {
        let groups = self.groups.lock().unwrap();
        groups.values().filter_map(|g| g.offsets.get(topic)).map(|t| t.get(&partition).copied().unwrap_or(0)).min()
    }

    /// Writes the groups that changed since the last flush. A group whose write fails stays
    /// marked, and so do the others: every one is tried, and the first error reported.
    pub fn flush(&self) -> io::Result<()> {
        let mut files = self.files.lock().unwrap();
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
            if let Err(e) = self.write(&mut files, &name, &offsets) {
                // Try again next time rather than lose the commit.
                if let Some(g) = self.groups.lock().unwrap().get_mut(&name) {
                    g.dirty = true;
                }
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn write(&self, files: &mut Files, name: &str, offsets: &TopicOffsets) -> io::Result<()> {
        let body = serde_json::to_vec(offsets).expect("offsets serialize");
        match files.open.get_mut(name).filter(|f| f.fits(&body)) {
            Some(file) => file.overwrite(&body)?,
            None => {
                // Forgotten before the new file is made: if making it fails after its rename,
                // the old handle would write to a file no longer in the directory, and succeed.
                files.open.remove(name);
                let file = SlotFile::create(&self.dir, &path_for(&self.dir, name), &body)?;
                files.open.insert(name.to_string(), file);
            }
        }
        if let Some(old) = files.carried_over.remove(name) {
            match fs::remove_file(&old) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    files.carried_over.insert(name.to_string(), old);
                    return Err(e);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn open(dir: &tempfile::TempDir) -> OffsetStore {
        OffsetStore::open(dir.path().to_path_buf()).unwrap()
    }

    #[test]
    fn commits_survive_reopen_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.commit("dispatch", "t", 3, 10);
        store.commit("dispatch", "t", 3, 7);
        store.flush().unwrap();
        let again = open(&dir);
        assert_eq!(again.get("dispatch", "t", 3), 10);
        assert_eq!(again.min_committed("t", 3), Some(10));
        assert_eq!(again.min_committed("other", 3), None);
    }

    #[test]
    fn a_group_whose_name_is_not_a_file_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        for bad in ["a/b", "", ".hidden", "a b", "ü"] {
            let err = store.join(bad, "t").expect_err(bad);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
        store.join("herald-dispatch", "t").unwrap();
        store.join("v1.group_2", "t").unwrap();
        assert_eq!(store.min_committed("t", 0), Some(0), "the good ones joined");
    }

    #[test]
    fn a_flush_overwrites_the_group_file_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.commit("dispatch", "t", 0, 1);
        store.flush().unwrap();
        let path = dir.path().join("dispatch.offsets");
        let first = fs::metadata(&path).unwrap();
        for next in 2..6 {
            store.commit("dispatch", "t", 0, next);
            store.flush().unwrap();
            let now = fs::metadata(&path).unwrap();
            assert_eq!((now.ino(), now.len()), (first.ino(), first.len()), "flush {next} replaced or grew the file");
            assert_eq!(open(&dir).get("dispatch", "t", 0), next);
        }
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["dispatch.offsets"]);
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_previous_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.commit("dispatch", "t", 0, 10);
        store.flush().unwrap();
        store.commit("dispatch", "t", 0, 20);
        store.flush().unwrap();
        // The second flush went to slot 0 (sequence 2); break its last byte, as a write cut
        // short by a crash would.
        let path = dir.path().join("dispatch.offsets");
        let mut bytes = fs::read(&path).unwrap();
        let slot = bytes.len() / 2;
        let len = u32::from_le_bytes(bytes[LEN_AT..CRC_AT].try_into().unwrap()) as usize;
        bytes[HEADER + len - 1] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let again = open(&dir);
        assert_eq!(again.get("dispatch", "t", 0), 10);
        // The next flush goes to the broken slot, not over the one that held.
        again.commit("dispatch", "t", 0, 30);
        again.flush().unwrap();
        assert_eq!(open(&dir).get("dispatch", "t", 0), 30);
        let bytes = fs::read(&path).unwrap();
        let (seq, held) = unframe(&bytes[slot..]).expect("slot 1 still whole");
        assert_eq!((seq, held), (1, &br#"{"t":{"0":10}}"#[..]));
        // Both slots broken is an error naming the file, not offsets back at zero.
        fs::write(&path, vec![7; bytes.len()]).unwrap();
        let err = OffsetStore::open(dir.path().to_path_buf()).err().expect("both slots broken");
        assert!(err.to_string().contains("dispatch.offsets"), "{err}");
    }

    #[test]
    fn a_failed_overwrite_is_tried_again_in_the_same_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.offsets");
        let mut file = SlotFile::create(dir.path(), &path, b"{}").unwrap();
        file.overwrite(b"{\"t\":{}}").unwrap();
        assert_eq!(file.seq, 2);
        // A handle that cannot write: the overwrite fails and the sequence stays.
        file.file = File::open(&path).unwrap();
        assert!(file.overwrite(b"{\"u\":{}}").is_err());
        assert_eq!(file.seq, 2, "the next try goes to slot 1 again, not over slot 0's sequence 2");
        let (reopened, offsets) = SlotFile::open(&path).unwrap();
        assert_eq!((reopened.seq, offsets.keys().map(String::as_str).collect::<Vec<_>>()), (2, vec!["t"]));
    }

    #[test]
    fn offsets_outgrowing_a_slot_move_to_a_larger_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.commit("dispatch", "t", 0, 1);
        store.flush().unwrap();
        let path = dir.path().join("dispatch.offsets");
        assert_eq!(fs::metadata(&path).unwrap().len(), 2 * FIRST_SLOT as u64);
        for partition in 0..2_000 {
            store.commit("dispatch", "a-rather-long-topic-name", partition, 1_000_000 + partition as u64);
        }
        store.flush().unwrap();
        assert!(fs::metadata(&path).unwrap().len() > 2 * FIRST_SLOT as u64);
        store.commit("dispatch", "t", 0, 2);
        store.flush().unwrap();
        let again = open(&dir);
        assert_eq!(again.get("dispatch", "t", 0), 2);
        assert_eq!(again.get("dispatch", "a-rather-long-topic-name", 1_999), 1_001_999);
    }

    #[test]
    fn files_of_the_older_format_are_read_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let names = |dir: &tempfile::TempDir| {
            let mut names: Vec<_> =
                fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            names.sort();
            names
        };
        fs::write(dir.path().join("dispatch.json"), br#"{"t":{"0":42}}"#).unwrap();
        fs::write(dir.path().join("retry.json"), br#"{"t":{"0":7,"1":3}}"#).unwrap();
        let store = open(&dir);
        assert_eq!((store.get("dispatch", "t", 0), store.get("retry", "t", 1)), (42, 3));
        store.commit("retry", "t", 0, 9);
        store.flush().unwrap();
        assert_eq!(names(&dir), ["dispatch.offsets", "retry.offsets"], "the old files are carried over and gone");
        drop(store);

        // An old file back beside a new one (a crash between the two, or an older Herald run
        // since), and scratch files a crash left: each partition takes the higher offset.
        fs::write(dir.path().join("retry.json"), br#"{"t":{"0":7,"1":5}}"#).unwrap();
        fs::write(dir.path().join("other.offsets.tmp"), b"half").unwrap();
        fs::write(dir.path().join("other.json.tmp"), b"half").unwrap();
        fs::write(dir.path().join("notes.tmp"), b"someone else's").unwrap();
        let store = open(&dir);
        assert_eq!((store.get("retry", "t", 0), store.get("retry", "t", 1)), (9, 5));
        store.flush().unwrap();
        assert_eq!(names(&dir), ["dispatch.offsets", "notes.tmp", "retry.offsets"]);
        assert_eq!(open(&dir).get("retry", "t", 1), 5);
    }

    #[test]
    fn a_failed_write_keeps_every_unwritten_group_for_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        for group in ["a", "b", "c"] {
            store.commit(group, "t", 0, 5);
        }
        // Group b's file cannot be written: a directory stands where its scratch file goes.
        let blocker = dir.path().join("b.offsets.tmp");
        fs::create_dir(&blocker).unwrap();
        assert!(store.flush().is_err());
        fs::remove_dir(&blocker).unwrap();
        store.flush().unwrap();
        let again = open(&dir);
        for group in ["a", "b", "c"] {
            assert_eq!(again.get(group, "t", 0), 5, "group {group} was written");
        }
    }
}
