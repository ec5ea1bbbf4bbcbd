//! The group journal: what makes a group commit durable with one `fdatasync`.
//!
//! Before it, every group synced each partition it touched: with one event per request from
//! 32 producers a group holds about two events, and fanned out to eight subscriptions it
//! touched two or three delivery partitions (more with history on), each its own `fdatasync`
//! on a thread that had to be woken — the extra kernel work that made an event for eight
//! subscriptions dearer than one for one (BENCHMARKS.md, "CPU per event"). Now the writer
//! encodes a group's records once, writes them to their segments (not synced) and, as one
//! entry, to the journal, and syncs only the journal. The segments are synced later, a
//! journal file's worth at a time, on a thread of their own (a checkpoint), and a restart
//! writes back from the journal whatever of them did not reach the disk.
//!
//! Two files take turns. While one is written, the other's epoch is checkpointed; a file is
//! written again only once its epoch's checkpoint is done, so every record not in the two
//! files' entries is in a synced segment. A file starts with a marker — an entry whose body is
//! a random salt, written and synced before anything else of its epoch — and every later entry's
//! checksum covers that salt: what follows the last entry of the epoch (an older epoch's bytes,
//! events' payloads among them) can never pass for an entry, however it was crafted. An entry
//! is `magic u32 | len u32 | crc u32 | epoch u64 | shares`, a share `topic_len u16 | topic |
//! partition u32 | frames_len u32 | frames` (segment frames, as the segment holds them). A file
//! is overwritten in place from its start (cheaper to sync than growing a file).
//!
//! A checkpoint that fails cannot be retried (after a failed `fdatasync` Linux marks the pages
//! clean, so a second one reports success for data that never reached the disk): the journal
//! then refuses every group until a restart, which writes the segments back from the journal.

use super::partition::{PartitionRef, Staged};
use super::segment::{self, Decoded, Frame};
use super::{Fault, Faults};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes a journal file is written to before the writer turns to the other one. A turn waits
/// for the other file's checkpoint, so a file must last longer than a checkpoint takes: with
/// 8 MiB files, batches of 100 events to 8 subscriptions lost up to half their rate against
/// the build before the journal (three alternated pairs, 9,283–18,419 against 16,415–20,034
/// deliveries/s); with 32 MiB they were level (BENCHMARKS.md, "CPU per event"). A restart
/// writes back at most two files' worth.
pub const DEFAULT_BYTES: u64 = 32 << 20;

/// Journal bytes between two early write-backs of the epoch's segment files. A checkpoint that
/// found a whole journal file's worth of segment pages still dirty sent them to the disk in
/// one burst (10–25 ms of syncs every second or two at 2,000 events/s × 8), and the group
/// commits' `fdatasync`s queued behind it: in a steady run every other second's p99 was 10–20
/// ms against 4–5 between checkpoints. Handing the pages to the disk as they accumulate
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on the checkpoint thread, which starts writeback
/// and waits for nothing) leaves the checkpoint little to wait for: one binary, three
/// alternated pairs, end-to-end p99 9, 6, 8 ms against 29, 14, 12 with history off and 16, 16,
/// 24 against 51, 20, 40 with it on (BENCHMARKS.md, "Latency at half load", thirtieth
/// session). What is durable, and when, does not change: only the checkpoint's sync counts.
const WRITE_BACK_EVERY: u64 = 1 << 20;

const FILES: [&str; 2] = ["0.journal", "1.journal"];
const MAGIC: u32 = 0x4c4e_4a48; // "HJNL"
/// `magic | len | crc | epoch`.
const HEADER: usize = 4 + 4 + 4 + 8;
/// A marker entry: the header and its salt.
const MARKER: usize = HEADER + 8;
/// Most bytes a group's entry may hold (its length is a `u32`).
const MAX_ENTRY: usize = u32::MAX as usize;

/// One partition's records found in the journal, in the order they were appended.
pub struct Replay {
    /// The topic's name.
    pub topic: String,
    /// The partition's number.
    pub partition: u32,
    /// Its frames, oldest first.
    pub frames: Vec<Frame>,
}

/// A segment file written to in the current epoch, synced at the epoch's checkpoint.
#[derive(Clone)]
struct Dirty {
    part: PartitionRef,
    path: PathBuf,
    file: Arc<File>,
    /// A file created in this epoch: its directory entry is synced too.
    created: bool,
}

/// Where a checkpoint's outcome is sent.
type Done = std::sync::mpsc::Sender<io::Result<()>>;

/// What the checkpoint thread is given to do.
enum Job {
    /// Sync these files, then send the outcome.
    Checkpoint(Vec<Dirty>, Done),
    /// Start writing these files' dirty pages back ([`WRITE_BACK_EVERY`]); the flag is the
    /// journal's note that one is queued, cleared as it starts.
    WriteBack(Vec<Dirty>, Arc<AtomicBool>),
}

/// The journal as the writer thread owns it.
pub struct Journal {
    files: [File; 2],
    paths: [PathBuf; 2],
    /// The epoch of each file's marker (`None`: no valid marker, found at open).
    file_epochs: [Option<u64>; 2],
    /// The file being written, where, its epoch and its marker's salt.
    current: usize,
    pos: u64,
    epoch: u64,
    salt: u64,
    /// A refused entry at `pos` that could not be voided yet: the next entry overwrites it, or
    /// a turn voids it first.
    void_pending: bool,
    /// Why the journal cannot go on (a checkpoint failed): every group is refused.
    poisoned: Option<String>,
    /// Set with `poisoned`, for the log's readiness.
    failed: Arc<AtomicBool>,
    capacity: u64,
    faults: Faults,
    /// Segment files written since the current file's epoch began.
    dirty: HashMap<PathBuf, Dirty>,
    /// Each file's last epoch's checkpoint, until it is known to be done.
    pending: [Option<std::sync::mpsc::Receiver<io::Result<()>>>; 2],
    checkpoints: std::sync::mpsc::Sender<Job>,
    /// Journal bytes written since the last early write-back was asked for.
    since_write_back: u64,
    /// An early write-back is queued and not started: none more is asked for until it is (a
    /// checkpoint under way holds the thread, and asking again would only repeat it).
    write_back_queued: Arc<AtomicBool>,
}

impl Journal {
    /// Opens the journal in `dir` and returns what its entries hold, per partition, for the
    /// log to write back into its segments before [`Journal::start`].
    pub fn open(dir: &Path, capacity: u64, faults: Faults) -> io::Result<(Journal, Vec<Replay>)> {
        crate::log::private::create_dir(dir)?;
        let paths = FILES.map(|f| dir.join(f));
        let open = |p: &Path| crate::log::private::options().read(true).write(true).create(true).open(p);
        let files = [open(&paths[0])?, open(&paths[1])?];
        super::partition::sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            super::partition::sync_dir(parent)?;
        }
        let mut epochs = Vec::new();
        let mut file_epochs = [None, None];
        for (i, file) in files.iter().enumerate() {
            let entries = read_entries(file)?;
            file_epochs[i] = entries.as_ref().map(|(e, _)| *e);
            epochs.extend(entries);
        }
        // Oldest epoch first; within one, in the order written.
        epochs.sort_by_key(|(epoch, _)| *epoch);
        let last_epoch = epochs.last().map_or(0, |(e, _)| *e);
        let mut replay: Vec<Replay> = Vec::new();
        let mut at: HashMap<(String, u32), usize> = HashMap::new();
        for (_, entries) in epochs {
            for (topic, partition, frames) in entries.into_iter().flat_map(decode_shares) {
                let i = *at.entry((topic.clone(), partition)).or_insert_with(|| {
                    replay.push(Replay { topic, partition, frames: Vec::new() });
                    replay.len() - 1
                });
                let kept = &mut replay[i].frames;
                for frame in frames {
                    // An entry whose group was refused after it was written (its sync failed)
                    // is followed by the next group's entry for the same offsets: the later wins.
                    let from = kept.partition_point(|f| f.offset < frame.offset);
                    kept.truncate(from);
                    kept.push(frame);
                }
            }
        }
        let (checkpoints, jobs) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("herald-log-checkpoint".into()).spawn(move || checkpoint_loop(jobs))?;
        let journal = Journal {
            files,
            paths,
            file_epochs,
            current: 0,
            pos: 0,
            epoch: last_epoch,
            salt: 0,
            void_pending: false,
            poisoned: None,
            failed: Arc::default(),
            capacity,
            faults,
            dirty: HashMap::new(),
            pending: [None, None],
            checkpoints,
            since_write_back: 0,
            write_back_queued: Arc::default(),
        };
        Ok((journal, replay))
    }

    /// Starts a new epoch in both files once what [`Journal::open`] returned is durable in the
    /// segments: a marker at each start makes everything after it an older epoch's. The file
    /// with the older epoch is marked first: a crash in between leaves the newer epoch's
    /// entries, which put back everything after the older one's anyway, whereas the older ones
    /// alone would cut a partition back to before the newer records.
    pub fn start(&mut self) -> io::Result<()> {
        self.epoch += 1;
        let mut order = [0, 1];
        order.sort_by_key(|&i| self.file_epochs[i]);
        for i in order {
            let salt = self.mark(i)?;
            if i == 0 {
                self.salt = salt;
            }
        }
        self.current = 0;
        self.pos = MARKER as u64;
        Ok(())
    }

    /// A checkpoint of everything, at a clean close: waits for the checkpoints under way, syncs
    /// the segment files written since, then starts a new epoch in both files, so that, if
    /// nothing is appended after it, the next open finds no entries and writes nothing back (it
    /// used to rewrite up to both files' worth, 64 MiB, at every start). Entries may follow; a
    /// crash at any point leaves what [`Journal::open`] restores from. A refused entry that
    /// cannot be voided yet is an error that changes nothing (as for a turn); any later failure
    /// poisons the journal, as a failed checkpoint does, and leaves it for the next open.
    pub fn clear(&mut self) -> io::Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(io::Error::other(format!("the log journal was not cleared: {why}")));
        }
        self.void_refused()?;
        self.checkpointed(0)?;
        self.checkpointed(1)?;
        if let Err(e) = self.sync_written().and_then(|()| self.start()) {
            return Err(self.poison(e));
        }
        Ok(())
    }

    /// Writes and syncs the current epoch's marker, with a fresh salt, at the start of file `i`.
    fn mark(&mut self, i: usize) -> io::Result<u64> {
        let salt = rand::random::<u64>();
        let mut marker = BytesMut::with_capacity(MARKER);
        marker.put_bytes(0, HEADER);
        marker.put_u64_le(salt);
        let bytes = seal(&mut marker, self.epoch, None);
        self.fault(Fault::Write(&self.paths[i]))?;
        self.files[i].write_all_at(bytes, 0)?;
        self.fault(Fault::Sync(&self.paths[i], &self.files[i]))?;
        self.files[i].sync_data()?;
        self.file_epochs[i] = Some(self.epoch);
        Ok(salt)
    }

    /// Writes a group's entry (built with [`begin`], [`begin_share`], [`end_share`]) and makes
    /// it durable. On an error nothing is counted as written, and the next entry takes its
    /// place; an entry written whose sync failed is voided first, so that a crash before the
    /// next entry does not bring the refused group back.
    pub fn commit(&mut self, entry: &mut BytesMut) -> io::Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(io::Error::other(format!("the log cannot take appends until Herald restarts: {why}")));
        }
        if entry.len() > MAX_ENTRY {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a log group over 4 GiB"));
        }
        if self.pos + entry.len() as u64 > self.capacity && self.pos > MARKER as u64 {
            self.turn()?;
        }
        let bytes = seal(entry, self.epoch, Some(self.salt));
        let (file, path) = (&self.files[self.current], &self.paths[self.current]);
        self.fault(Fault::Write(path))?;
        file.write_all_at(bytes, self.pos)?;
        let synced = self.fault(Fault::Sync(path, file)).and_then(|()| file.sync_data());
        if let Err(e) = synced {
            // Complete in the page cache, so it could reach the disk later: void its magic.
            let voided = file.write_all_at(&[0; 4], self.pos).and_then(|()| {
                self.fault(Fault::Sync(path, file))?;
                file.sync_data()
            });
            self.void_pending = voided.is_err();
            return Err(e);
        }
        self.pos += bytes.len() as u64;
        self.void_pending = false;
        self.since_write_back += bytes.len() as u64;
        if self.since_write_back >= WRITE_BACK_EVERY {
            self.write_back_early();
        }
        Ok(())
    }

    /// Asks the checkpoint thread to start writing back the epoch's segment files
    /// ([`WRITE_BACK_EVERY`]), unless it has not yet started the last such request.
    fn write_back_early(&mut self) {
        self.since_write_back = 0;
        if self.dirty.is_empty() || self.write_back_queued.swap(true, Ordering::Relaxed) {
            return;
        }
        let files = self.dirty.values().cloned().collect();
        // Only fails once the thread is gone, and then the checkpoint reports it.
        let _ = self.checkpoints.send(Job::WriteBack(files, self.write_back_queued.clone()));
    }

    /// Remembers a share's segment file for the current epoch's checkpoint (call before the
    /// group's entry is committed; a share of a group then refused costs a needless sync). A
    /// file the share created replaces one noted under its name: a refused group that rolled a
    /// segment removed its file, and the next roll creates another file with that name.
    pub fn written(&mut self, part: &PartitionRef, staged: &Staged) -> io::Result<()> {
        let created = staged.created_file();
        match self.dirty.get_mut(staged.path()) {
            Some(_) if !created => {}
            _ => {
                let file = Arc::new(staged.file().try_clone()?);
                let path = staged.path().to_path_buf();
                self.dirty.insert(path.clone(), Dirty { part: part.clone(), path, file, created });
            }
        }
        Ok(())
    }

    /// The segment files noted since the epoch began, taken for a checkpoint.
    fn take_written(&mut self) -> Vec<Dirty> {
        self.dirty.drain().map(|(_, d)| d).collect()
    }

    /// Syncs the segment files noted so far, here and now (at open, for what was written back).
    pub fn sync_written(&mut self) -> io::Result<()> {
        sync_all(self.take_written())
    }

    /// Turns to the other file: its last epoch's checkpoint must be done; this epoch's starts,
    /// and the other file gets the next epoch's marker. A refused entry left at the end of this
    /// file is voided first (if that fails, the group is refused and nothing has changed). A
    /// failed checkpoint, or a marker that cannot be written, poisons the journal.
    fn turn(&mut self) -> io::Result<()> {
        self.void_refused()?;
        let other = 1 - self.current;
        self.checkpointed(other)?;
        let dirty = self.take_written();
        let (tx, rx) = std::sync::mpsc::channel();
        if let Err(std::sync::mpsc::SendError(Job::Checkpoint(dirty, tx))) =
            self.checkpoints.send(Job::Checkpoint(dirty, tx))
        {
            let _ = tx.send(sync_all(dirty));
        }
        self.pending[self.current] = Some(rx);
        self.epoch += 1;
        match self.mark(other) {
            Ok(salt) => self.salt = salt,
            Err(e) => return Err(self.poison(e)),
        }
        self.current = other;
        self.pos = MARKER as u64;
        Ok(())
    }

    /// Waits for the checkpoint of file `i`'s last epoch, if one is under way; a failed one
    /// poisons the journal.
    fn checkpointed(&mut self, i: usize) -> io::Result<()> {
        if let Some(done) = self.pending[i].take() {
            let outcome = done.recv().unwrap_or_else(|_| Err(io::Error::other("the log checkpoint thread is gone")));
            if let Err(e) = outcome {
                return Err(self.poison(e));
            }
        }
        Ok(())
    }

    /// Voids a refused entry left at the end of the current file (before the file's epoch can
    /// end with it: a crash must not bring its group back).
    fn void_refused(&mut self) -> io::Result<()> {
        if self.void_pending {
            let (file, path) = (&self.files[self.current], &self.paths[self.current]);
            file.write_all_at(&[0; 4], self.pos)?;
            self.fault(Fault::Sync(path, file))?;
            file.sync_data()?;
            self.void_pending = false;
        }
        Ok(())
    }

    /// Refuses every group from now on; the journal keeps what a restart needs.
    fn poison(&mut self, e: io::Error) -> io::Error {
        tracing::error!(error = %e, "the log journal cannot go on: appends are refused until Herald restarts, which restores the log from it");
        self.poisoned = Some(e.to_string());
        self.failed.store(true, Ordering::Relaxed);
        e
    }

    /// Whether the journal was poisoned (appends refused until a restart), to be read from
    /// other threads.
    pub fn failed(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    fn fault(&self, fault: Fault<'_>) -> io::Result<()> {
        match &self.faults {
            Some(hook) => hook(fault),
            None => Ok(()),
        }
    }
}

/// Syncs a checkpoint's segment files one after another (the disk is the limit, not the
/// thread), then the directories of files created; and starts early write-backs.
fn checkpoint_loop(jobs: std::sync::mpsc::Receiver<Job>) {
    for job in jobs {
        match job {
            Job::Checkpoint(dirty, done) => {
                let _ = done.send(sync_all(dirty));
            }
            Job::WriteBack(dirty, queued) => {
                queued.store(false, Ordering::Relaxed);
                for d in dirty {
                    d.part.write_back(&d.file, &d.path);
                }
            }
        }
    }
}

/// Syncs every file; the first error, if any (the rest are still tried).
fn sync_all(dirty: Vec<Dirty>) -> io::Result<()> {
    let mut failed = Ok(());
    for d in dirty {
        let synced =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.part.sync_file(&d.file, &d.path, d.created)))
                .unwrap_or_else(|_| Err(io::Error::other("log checkpoint panicked")));
        if let Err(e) = synced {
            tracing::error!(path = %d.path.display(), error = %e, "syncing a log segment at a checkpoint failed");
            if failed.is_ok() {
                failed = Err(e);
            }
        }
    }
    failed
}

/// Starts an entry in `buf` (cleared).
pub fn begin(buf: &mut BytesMut) {
    buf.clear();
    buf.put_bytes(0, HEADER);
}

/// Starts a share of `topic`'s `partition`; the frames follow (appended by the partition's
/// stage), then [`end_share`] with what this returns.
pub fn begin_share(buf: &mut BytesMut, topic: &str, partition: u32) -> usize {
    buf.put_u16_le(topic.len() as u16);
    buf.put_slice(topic.as_bytes());
    buf.put_u32_le(partition);
    buf.put_u32_le(0);
    buf.len()
}

/// Ends the share whose frames started at `frames_at`.
pub fn end_share(buf: &mut BytesMut, frames_at: usize) {
    let len = (buf.len() - frames_at) as u32;
    buf[frames_at - 4..frames_at].copy_from_slice(&len.to_le_bytes());
}

/// Whether an entry has any share.
pub fn has_shares(buf: &BytesMut) -> bool {
    buf.len() > HEADER
}

/// The longest topic name a share can carry.
pub const MAX_TOPIC: usize = u16::MAX as usize;

/// Fills in the entry's header; the bytes to write. The checksum covers the epoch, the body
/// and, but for a marker, the salt of the file's marker.
fn seal(buf: &mut BytesMut, epoch: u64, salt: Option<u64>) -> &[u8] {
    let len = (buf.len() - HEADER) as u32;
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&len.to_le_bytes());
    buf[12..20].copy_from_slice(&epoch.to_le_bytes());
    let crc = checksum(salt, &buf[12..]);
    buf[8..12].copy_from_slice(&crc.to_le_bytes());
    &buf[..]
}

fn checksum(salt: Option<u64>, bytes: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    if let Some(salt) = salt {
        crc.update(&salt.to_le_bytes());
    }
    crc.update(bytes);
    crc.finalize()
}

/// The valid entries of one file: its marker's epoch and the entries after it of that epoch
/// whose checksums carry its salt; `None` without a valid marker at its start.
fn read_entries(file: &File) -> io::Result<Option<(u64, Vec<Bytes>)>> {
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut &*file, &mut bytes)?;
    let buf = Bytes::from(bytes);
    let mut pos = 0usize;
    let mut marker: Option<(u64, u64)> = None;
    let mut bodies = Vec::new();
    while pos + HEADER <= buf.len() {
        let word = |at: usize| u32::from_le_bytes(buf[pos + at..pos + at + 4].try_into().expect("four bytes"));
        let (magic, len, crc) = (word(0), word(4) as usize, word(8));
        let epoch = u64::from_le_bytes(buf[pos + 12..pos + 20].try_into().expect("eight bytes"));
        let end = pos + HEADER + len;
        if magic != MAGIC || end > buf.len() {
            break; // a torn last entry, or an older epoch's bytes
        }
        match marker {
            None if len == 8 && checksum(None, &buf[pos + 12..end]) == crc => {
                let salt = u64::from_le_bytes(buf[pos + HEADER..end].try_into().expect("eight bytes"));
                marker = Some((epoch, salt));
            }
            Some((e, salt)) if e == epoch && checksum(Some(salt), &buf[pos + 12..end]) == crc => {
                bodies.push(buf.slice(pos + HEADER..end));
            }
            _ => break,
        }
        pos = end;
    }
    Ok(marker.map(|(e, _)| (e, bodies)))
}

/// The shares of one entry's body: (topic, partition, frames).
fn decode_shares(body: Bytes) -> Vec<(String, u32, Vec<Frame>)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 2 <= body.len() {
        let topic_len = u16::from_le_bytes([body[pos], body[pos + 1]]) as usize;
        let at = pos + 2 + topic_len;
        if at + 8 > body.len() {
            break;
        }
        let topic = String::from_utf8_lossy(&body[pos + 2..at]).into_owned();
        let partition = u32::from_le_bytes(body[at..at + 4].try_into().expect("four bytes"));
        let len = u32::from_le_bytes(body[at + 4..at + 8].try_into().expect("four bytes")) as usize;
        let frames_at = at + 8;
        if frames_at + len > body.len() {
            break;
        }
        let frames_buf = body.slice(frames_at..frames_at + len);
        let mut frames = Vec::new();
        let mut used = 0;
        while let Decoded::Frame(frame, size) = segment::decode(&frames_buf.slice(used..)) {
            frames.push(frame);
            used += size;
        }
        out.push((topic, partition, frames));
        pos = frames_at + len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of one share of topic `t` with frames at `offsets`.
    fn entry(partition: u32, offsets: std::ops::Range<u64>) -> BytesMut {
        let mut buf = BytesMut::new();
        begin(&mut buf);
        let at = begin_share(&mut buf, "t", partition);
        for o in offsets {
            segment::encode(&mut buf, o, 7, b"k", format!("v{o}").as_bytes());
        }
        end_share(&mut buf, at);
        buf
    }

    fn offsets(replay: &[Replay], partition: u32) -> Vec<u64> {
        replay.iter().filter(|r| r.partition == partition).flat_map(|r| r.frames.iter().map(|f| f.offset)).collect()
    }

    /// Entries come back per partition in order. A group whose sync failed is voided, so
    /// that it does not come back, and the next entry takes its place; a torn entry at the end,
    /// and what follows the newest epoch's entries in a file being rewritten, are not read.
    #[test]
    fn recovery_reads_whole_entries_of_the_current_epochs_only() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let fail = Arc::new(AtomicBool::new(false));
        let failing = fail.clone();
        let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| match fault {
            Fault::Sync(..) if failing.load(SeqCst) => Err(io::Error::other("injected fsync failure")),
            _ => Ok(()),
        }));
        {
            let (mut journal, replay) = Journal::open(&path, 1 << 20, faults.clone()).unwrap();
            assert!(replay.is_empty());
            journal.start().unwrap();
            journal.commit(&mut entry(0, 0..3)).unwrap();
            journal.commit(&mut entry(1, 0..2)).unwrap();
            journal.commit(&mut entry(0, 3..5)).unwrap();
            fail.store(true, SeqCst);
            assert!(journal.commit(&mut entry(0, 5..9)).is_err(), "its sync failed: refused");
            fail.store(false, SeqCst);
        }
        let (_, replay) = Journal::open(&path, 1 << 20, faults.clone()).unwrap();
        assert_eq!(offsets(&replay, 0), vec![0, 1, 2, 3, 4], "the refused group does not come back");
        {
            let (mut journal, _) = Journal::open(&path, 1 << 20, faults.clone()).unwrap();
            journal.start().unwrap();
            journal.commit(&mut entry(0, 5..6)).unwrap();
            // A torn entry: only its first half reached the file.
            let mut torn = entry(1, 2..40);
            let bytes = seal(&mut torn, journal.epoch, Some(journal.salt)).to_vec();
            journal.files[0].write_all_at(&bytes[..bytes.len() / 2], journal.pos).unwrap();
        }
        let (mut journal, replay) = Journal::open(&path, 1 << 20, None).unwrap();
        assert_eq!(offsets(&replay, 0), vec![5], "a new epoch: the old one is not read again");
        assert_eq!(offsets(&replay, 1), Vec::<u64>::new(), "the torn entry is not read");
        journal.start().unwrap();
        journal.commit(&mut entry(1, 2..3)).unwrap();
        drop(journal);
        let (_, replay) = Journal::open(&path, 1 << 20, None).unwrap();
        assert_eq!(offsets(&replay, 0), Vec::<u64>::new());
        assert_eq!(offsets(&replay, 1), vec![2]);
    }

    /// Bytes after the last entry that look like an entry of the current epoch — as an event's
    /// payload from an older epoch could be made to — are not read: they lack the marker's salt.
    #[test]
    fn an_entry_forged_without_the_salt_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut journal, _) = Journal::open(&path, 1 << 20, None).unwrap();
            journal.start().unwrap();
            journal.commit(&mut entry(0, 0..2)).unwrap();
            let mut forged = entry(0, 2..4);
            let bytes = seal(&mut forged, journal.epoch, None).to_vec();
            journal.files[0].write_all_at(&bytes, journal.pos).unwrap();
        }
        let (_, replay) = Journal::open(&path, 1 << 20, None).unwrap();
        assert_eq!(offsets(&replay, 0), vec![0, 1]);
    }

    /// Past its size the journal turns to the other file, whose old epoch is then stale; both
    /// files' current entries are read back, oldest epoch first.
    #[test]
    fn entries_across_a_turn_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut journal, _) = Journal::open(&path, 4096, None).unwrap();
        journal.start().unwrap();
        for g in 0..100u64 {
            journal.commit(&mut entry(0, g * 3..g * 3 + 3)).unwrap();
        }
        assert!(journal.epoch >= 3, "the journal turned more than once");
        drop(journal);
        let (_, replay) = Journal::open(&path, 4096, None).unwrap();
        let got = offsets(&replay, 0);
        assert!(!got.is_empty());
        assert_eq!(got.last(), Some(&299), "the newest entry is read");
        assert!(got[0] > 0, "the oldest epoch was rewritten, and is not read");
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "oldest first, contiguous: {got:?}");
    }
}
