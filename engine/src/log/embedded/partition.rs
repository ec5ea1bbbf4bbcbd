//! One partition of the embedded log: a directory of segment files, the append path used by
//! the group-commit writer, reads for consumers, reclaim (by consumer progress or by age) and
//! compaction.
//!
//! Appending is staged: a batch is written to its segment (a new one, when the active one is
//! full), then made durable (by the group journal's sync, or its own for a compacted topic),
//! and only then published to readers and installed as the writer's state. A failed write or
//! fsync rolls the file back and leaves the partition as it was, so an error can never leave
//! acknowledged records where readers will not find them.

use super::segment::{self, Decoded, Frame, INDEX_INTERVAL, MAX_FRAME};
use super::{Fault, Faults};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Most bytes read from a segment file at a time (a read's window is sized to what it hands out,
/// up to this).
const READ_WINDOW: usize = 256 * 1024;

/// Sealed segments of a compacted partition that trigger compacting them while running.
const COMPACT_AT_SEGMENTS: usize = 4;

/// Why an append was refused before anything was written.
#[derive(Debug)]
pub enum AppendError {
    /// A record is larger than a frame may be (it could never be read back).
    TooLarge {
        /// The record's size.
        bytes: usize,
    },
    /// Writing or syncing failed; nothing of the batch remains.
    Io(io::Error),
}

impl From<io::Error> for AppendError {
    fn from(e: io::Error) -> Self {
        AppendError::Io(e)
    }
}

/// A segment as readers see it: only durable bytes are counted in `len`.
#[derive(Debug, Clone)]
struct SegmentInfo {
    base: u64,
    path: PathBuf,
    /// Durable bytes in the file.
    len: u64,
    /// Offset after the last record in the segment (== base when empty).
    end: u64,
    /// Sparse (offset, position) index.
    index: Vec<(u64, u64)>,
    /// Newest append time in the segment, ms: retention by age drops whole segments.
    last_ms: i64,
    /// Damaged byte ranges found at open, skipped by readers.
    holes: Vec<(u64, u64)>,
}

/// The writer's view of the active segment; touched only by the writer thread.
struct Active {
    /// Opened on the first append, so an unused partition costs no file and no fsync.
    file: Option<File>,
    path: PathBuf,
    base: u64,
    len: u64,
    next_offset: u64,
    next_index_at: u64,
}

/// A batch written to its segment file but not yet durable nor visible.
pub struct Staged {
    first: u64,
    count: u64,
    /// The file written to and its path (a new segment when the active one was full).
    file: File,
    path: PathBuf,
    rolled: bool,
    base: u64,
    /// The file's length before the batch (where a rollback cuts it back to).
    start_len: u64,
    len: u64,
    next_index_at: u64,
    new_index: Vec<(u64, u64)>,
    last_ms: i64,
}

impl Staged {
    /// The segment file the batch was written to.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// That file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the batch created its file (a new segment, or a partition's first), whose
    /// directory entry must then be made durable too.
    pub fn created_file(&self) -> bool {
        self.rolled || self.start_len == 0
    }
}

/// One partition's files and state.
pub struct Partition {
    id: u32,
    /// Its topic's name, which the group journal knows it by.
    topic: String,
    /// Whether its appends are made durable through the group journal (every topic but the
    /// compacted ones, whose rare appends are synced each on its own).
    journaled: bool,
    dir: PathBuf,
    segment_bytes: u64,
    segments: Mutex<Vec<SegmentInfo>>,
    active: Mutex<Active>,
    durable: watch::Sender<u64>,
    faults: Faults,
    /// The last compaction's generation, for the compacted file's name.
    generation: std::sync::atomic::AtomicU64,
    /// The sealed segments (first base, end) a compaction last found too little to gain in:
    /// not read again until a segment is sealed (every flush read a large catalog whole).
    futile: Mutex<Option<(u64, u64)>>,
    /// The end as the open left it (see [`Partition::opened`]).
    end_at_open: std::sync::atomic::AtomicU64,
    /// Bytes per frame in the last batch appended, or in the last read window that fell
    /// short of its estimate (appends and every reader update it; it is only an estimate): a
    /// read sizes its window from it, so it copies about what it hands out (a fixed 256 KiB
    /// window copied ten times that when a shard had room for a few dozen records).
    frame_bytes: std::sync::atomic::AtomicUsize,
    /// Bytes read from segment files for readers, for tests of what a read copies against
    /// what it hands out (only tests count them: reads are the hot path).
    #[cfg(test)]
    read_bytes: std::sync::atomic::AtomicU64,
}

/// Where the last read of a reader stopped, so its next read starts at that frame instead of
/// at the sparse index entry before it, in a file it already has open.
pub struct ReadHint {
    /// The offset the hint is for.
    offset: u64,
    path: PathBuf,
    pos: u64,
    file: Arc<File>,
}

/// Where a read should start, found under the segments lock and used without it.
struct ReadPlan {
    path: PathBuf,
    pos: u64,
    /// The offset of the frame at `pos`.
    pos_offset: u64,
    limit: u64,
    seg_end: u64,
    next_base: Option<u64>,
    holes: Vec<(u64, u64)>,
    index: Vec<(u64, u64)>,
}

/// Whether a read may wait for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Read what the page cache holds and nothing else: `WouldBlock` if any of it would have
    /// to come from the disk (or the kernel cannot tell), so that the caller can read on a
    /// thread that may wait.
    No,
    /// Read from the disk when needed.
    Yes,
}

/// `n` bytes of `file` at `pos`, read into memory that is not zeroed first (zeroing a fresh
/// window per read was a measurable share of the reader's time). Positional, so readers
/// sharing an open file do not move each other's position.
pub(super) fn read_exact_at(file: &File, pos: u64, n: usize, wait: Wait) -> io::Result<Bytes> {
    use std::os::fd::AsRawFd;
    let flags = match wait {
        Wait::No => libc::RWF_NOWAIT,
        Wait::Yes => 0,
    };
    let mut buf = Vec::<u8>::with_capacity(n);
    while buf.len() < n {
        let spare = buf.spare_capacity_mut();
        let iov = libc::iovec { iov_base: spare.as_mut_ptr().cast(), iov_len: spare.len() };
        let at =
            libc::off_t::try_from(pos + buf.len() as u64).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the one iovec is the vector's unused capacity, which preadv2 writes at most
        // `iov_len` bytes of; only the count it reports is added to the length.
        let got = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, flags) };
        match got {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            k if k > 0 => unsafe { buf.set_len(buf.len() + k as usize) },
            _ => {
                let e = io::Error::last_os_error();
                match (e.raw_os_error(), wait) {
                    (Some(libc::EINTR), _) => continue,
                    // EAGAIN: not all cached. EOPNOTSUPP / EINVAL: a file system or kernel
                    // without RWF_NOWAIT, which cannot say; either way the caller waits elsewhere.
                    (Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL), Wait::No) => {
                        return Err(io::Error::from(io::ErrorKind::WouldBlock))
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(Bytes::from(buf))
}

/// Deletes a consumed segment a few MiB at a time, then its name (on the log's reaper thread).
/// Unlinking a whole 64 MiB segment held the file system's journal (15–50 ms on this ext4
/// disk, mounted with `discard`) and every append's `fdatasync` waited behind it: a stall each
/// time a partition's segment was consumed, which made most of the p99 of a steady run (1,300
/// single events/s, history off: p99 9–15 ms in five runs before, 5–7 ms in most runs after).
/// Only for segments every consumer has passed: no reader is in them, and a reader that was
/// would see the file shrink. Renamed out of the segments' names first, so a process killed
/// halfway leaves no shortened segment behind (`open` removes what it finds under that name).
pub(super) fn remove_in_steps(path: &Path) -> io::Result<()> {
    const STEP: u64 = 8 << 20;
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(5);
    let doomed = path.with_extension(DELETING);
    fs::rename(path, &doomed)?;
    let path = doomed.as_path();
    let file = OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    while len > STEP {
        len -= STEP;
        file.set_len(len)?;
        // Pacing, so each step's blocks are freed in a journal commit of their own.
        std::thread::sleep(PAUSE);
    }
    drop(file);
    fs::remove_file(path)
}

/// The extension of a segment being deleted in steps.
const DELETING: &str = "deleting";

/// Starts writing `file`'s dirty pages to the disk, waiting for nothing: a hint that spreads
/// a later sync's writeback out (`sync_file_range(SYNC_FILE_RANGE_WRITE)`); only that sync
/// makes anything durable. The log's segments and the history index's tables both use it.
pub fn start_write_back(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open descriptor, no memory passed.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to a new file at `scratch`, syncs it, renames it to `path` and syncs `dir`
/// (which holds both): a crash leaves the file that was at `path` (or none) or the whole new
/// one. Returns the new file, open for writing.
pub(super) fn replace_durably(dir: &Path, scratch: &Path, path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut file = crate::log::private::create(scratch)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(scratch, path)?;
    sync_dir(dir)?;
    Ok(file)
}

impl Partition {
    /// Opens (creating if needed) the partition in `dir`, validating every segment: damage in
    /// the middle of a segment is stepped over, a torn tail of the newest is cut off.
    pub fn open(
        id: u32,
        topic: &str,
        journaled: bool,
        dir: PathBuf,
        segment_bytes: u64,
        faults: Faults,
    ) -> io::Result<Self> {
        crate::log::private::create_dir(&dir)?;
        let mut files = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "compact" || e == DELETING) {
                // An interrupted compaction's scratch file, or a consumed segment whose
                // deletion was interrupted.
                fs::remove_file(&path)?;
            } else if let Some((base, generation)) = segment::parse_file_name(&path) {
                files.push((base, std::cmp::Reverse(generation), path));
            }
        }
        // By base; of two files with one base the newer compaction first, so the older file
        // (left by a compaction interrupted before it deleted it) is overlapped and removed.
        files.sort();
        let mut segments: Vec<SegmentInfo> = Vec::new();
        let newest = files.last().map(|(b, _, _)| *b);
        let count = files.len();
        for (i, (base, _, path)) in files.into_iter().enumerate() {
            if let Some(prev) = segments.last() {
                if base < prev.end || (base == prev.base && prev.len > 0) {
                    // Left over from a compaction that was interrupted after its rename:
                    // everything in it is already in the compacted segment.
                    tracing::warn!(path = %path.display(), "removing segment overlapped by compaction");
                    fs::remove_file(&path)?;
                    continue;
                }
            }
            let scan = segment::scan(&path, base)?;
            for (from, to) in &scan.holes {
                tracing::error!(path = %path.display(), from, to, "damaged bytes in a log segment; the records after them are kept");
            }
            let file_len = fs::metadata(&path)?.len();
            if Some(base) == newest && i + 1 == count && file_len > scan.valid_len {
                tracing::warn!(
                    path = %path.display(),
                    cut_bytes = file_len - scan.valid_len,
                    kept_bytes = scan.valid_len,
                    "log segment has a torn tail; cutting it off"
                );
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(scan.valid_len)?;
                f.sync_all()?;
            }
            let end = scan.last_offset.map_or(base, |o| o + 1);
            segments.push(SegmentInfo {
                base,
                path,
                len: scan.valid_len,
                end,
                index: scan.index,
                last_ms: scan.last_timestamp_ms,
                holes: scan.holes,
            });
        }
        // Empty old segments stay listed until the journal's restore has run
        // ([`Partition::drop_empty_sealed`]): a power cut can empty a segment whose records
        // the journal holds, and the restore starts at the partition's first segment.
        if segments.is_empty() {
            let path = dir.join(segment::file_name(0));
            segments.push(SegmentInfo {
                base: 0,
                path,
                len: 0,
                end: 0,
                index: Vec::new(),
                last_ms: 0,
                holes: Vec::new(),
            });
        }
        let tail = segments.last().unwrap().clone();
        let file = if tail.path.exists() { Some(OpenOptions::new().append(true).open(&tail.path)?) } else { None };
        let next_index_at = tail.index.last().map_or(0, |&(_, p)| p + INDEX_INTERVAL);
        let active = Active {
            file,
            path: tail.path.clone(),
            base: tail.base,
            len: tail.len,
            next_offset: tail.end,
            next_index_at,
        };
        let (durable, _) = watch::channel(tail.end);
        let generation = segments.iter().filter_map(|s| segment::parse_file_name(&s.path)).map(|(_, g)| g).max();
        Ok(Partition {
            id,
            topic: topic.to_string(),
            journaled,
            dir,
            segment_bytes,
            segments: Mutex::new(segments),
            active: Mutex::new(active),
            durable,
            faults,
            generation: generation.unwrap_or(0).into(),
            futile: Mutex::new(None),
            end_at_open: tail.end.into(),
            frame_bytes: std::sync::atomic::AtomicUsize::new(1024),
            #[cfg(test)]
            read_bytes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Settles the partition as the open leaves it (after the journal's restore): its newest
    /// segment made durable, its name too — records a crash left there past what the journal
    /// holds (a group written but not yet committed when the process was killed) are served
    /// from now on, so they must outlast a power cut: a consumer may commit past them, and
    /// had they been lost, the partition's next appends would take their offsets below that
    /// commit, never to be read — and its end noted, from which a reader whose committed
    /// offset is past the end starts (see `EmbeddedConsumer::reader`).
    pub fn opened(&self) -> io::Result<()> {
        let active = self.active.lock().unwrap();
        self.end_at_open.store(active.next_offset, std::sync::atomic::Ordering::Relaxed);
        match &active.file {
            // Its name with it: the partition's directory (its topic's holds the partition
            // directories, synced as they were made).
            Some(file) if active.len > 0 => {
                self.sync_file(file, &active.path, false).and_then(|()| sync_dir(&self.dir))
            }
            _ => Ok(()),
        }
    }

    /// The end as the open left it: every record past it was appended, and acknowledged, since.
    pub fn end_at_open(&self) -> u64 {
        self.end_at_open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Removes empty segments but the newest (the active one), once the journal's restore
    /// has refilled any a power cut emptied.
    pub fn drop_empty_sealed(&self) -> io::Result<()> {
        let _active = self.active.lock().unwrap();
        let mut segs = self.segments.lock().unwrap();
        let Some(newest) = segs.pop() else { return Ok(()) };
        let (empty, kept): (Vec<SegmentInfo>, Vec<SegmentInfo>) =
            std::mem::take(&mut *segs).into_iter().partition(|s| s.len == 0);
        *segs = kept;
        segs.push(newest);
        // Listed no more first: a file a failed removal leaves is an empty one the next open
        // finds again.
        for s in empty.iter().filter(|s| s.path.exists()) {
            fs::remove_file(&s.path)?;
        }
        if !empty.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Partition number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Its topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether its appends go through the group journal.
    pub fn journaled(&self) -> bool {
        self.journaled
    }

    /// Offset after the last durable record.
    pub fn end_offset(&self) -> u64 {
        *self.durable.borrow()
    }

    /// Watches the durable end offset.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// First offset still stored.
    pub fn start_offset(&self) -> u64 {
        self.segments.lock().unwrap()[0].base
    }

    fn fault(&self, fault: Fault<'_>) -> io::Result<()> {
        match &self.faults {
            Some(hook) => hook(fault),
            None => Ok(()),
        }
    }

    /// Writes `records` as one batch to the end of the partition (a new segment when the
    /// active one would grow past its size), without making it durable or visible yet. The
    /// frames are encoded onto the end of `out` and written from there, so the writer can
    /// hand the same bytes to the group journal. Called only by the writer thread; on error
    /// nothing of the batch remains (in the file or in `out`).
    pub fn stage(
        &self,
        records: &[(&[u8], &[u8])],
        timestamp_ms: i64,
        out: &mut BytesMut,
    ) -> Result<Staged, AppendError> {
        if let Some((k, v)) = records.iter().find(|(k, v)| 20 + k.len() + v.len() > MAX_FRAME) {
            return Err(AppendError::TooLarge { bytes: k.len() + v.len() });
        }
        let mut active = self.active.lock().unwrap();
        let size: u64 = records.iter().map(|(k, v)| (segment::FRAME_HEADER + 20 + k.len() + v.len()) as u64).sum();
        let first = active.next_offset;
        let rolled = active.len > 0 && active.len + size > self.segment_bytes;
        let (mut file, path, base, start_len, mut next_index_at) = if rolled {
            let path = self.dir.join(segment::file_name(first));
            let file = crate::log::private::options().create(true).append(true).open(&path)?;
            // Empty unless a refused group's roll left it (its removal failed): what it holds
            // was never acknowledged, and this segment's length and index count from 0.
            if file.metadata()?.len() > 0 {
                file.set_len(0)?;
            }
            (file, path, first, 0, 0)
        } else {
            let path = active.path.clone();
            if active.file.is_none() {
                active.file = Some(crate::log::private::options().create(true).append(true).open(&path)?);
            }
            let file = active.file.as_ref().expect("opened above").try_clone()?;
            // A rollback that could not cut the file back leaves bytes past the durable end:
            // cut them now, or refuse, rather than write after them.
            if file.metadata()?.len() != active.len {
                file.set_len(active.len)?;
            }
            (file, path, active.base, active.len, active.next_index_at)
        };
        drop(active);
        let at = out.len();
        out.reserve(size as usize);
        let mut new_index = Vec::new();
        for (i, (key, value)) in records.iter().enumerate() {
            let pos = start_len + (out.len() - at) as u64;
            if pos >= next_index_at {
                new_index.push((first + i as u64, pos));
                next_index_at = pos + INDEX_INTERVAL;
            }
            segment::encode(out, first + i as u64, timestamp_ms, key, value);
        }
        let written = self.fault(Fault::Write(&path)).and_then(|()| file.write_all(&out[at..]));
        let buf_len = (out.len() - at) as u64;
        if !records.is_empty() {
            self.frame_bytes.store(buf_len as usize / records.len(), std::sync::atomic::Ordering::Relaxed);
        }
        if written.is_err() {
            out.truncate(at);
        }
        let staged = Staged {
            first,
            count: records.len() as u64,
            file,
            path,
            rolled,
            base,
            start_len,
            len: start_len + buf_len,
            next_index_at,
            new_index,
            last_ms: timestamp_ms,
        };
        if let Err(e) = written {
            self.rollback(staged);
            return Err(e.into());
        }
        Ok(staged)
    }

    /// Makes a staged batch durable (and a new segment's directory entry with it).
    pub fn sync(&self, staged: &Staged) -> io::Result<()> {
        self.sync_file(&staged.file, &staged.path, staged.created_file())
    }

    /// Starts writing `file`'s dirty pages to the disk without waiting for them: a hint that
    /// spreads a checkpoint's writeback over the epoch (`journal::WRITE_BACK_EVERY`). Nothing
    /// counts on it; an I/O error it meets is reported by the checkpoint's sync.
    pub fn write_back(&self, file: &File, path: &Path) {
        if self.fault(Fault::WriteBack(path)).is_err() {
            return;
        }
        start_write_back(file);
    }

    /// Makes what was written to one of this partition's segment files durable, and its name
    /// too when the file is new.
    pub fn sync_file(&self, file: &File, path: &Path, created: bool) -> io::Result<()> {
        self.fault(Fault::Sync(path, file))?;
        file.sync_data()?;
        if created {
            // A new file: its name must be durable too. The first file of a partition also
            // makes the directories made without fsync at open durable.
            sync_dir(&self.dir)?;
            if let Some(topic_dir) = self.dir.parent() {
                sync_dir(topic_dir)?;
            }
        }
        Ok(())
    }

    /// Publishes a durable batch to readers and makes it the writer's state; returns the
    /// offset of its first record.
    pub fn publish(&self, staged: Staged) -> u64 {
        let end = staged.first + staged.count;
        {
            let mut active = self.active.lock().unwrap();
            if staged.rolled {
                active.file = Some(staged.file);
                active.path = staged.path.clone();
                active.base = staged.base;
            }
            active.len = staged.len;
            active.next_offset = end;
            active.next_index_at = staged.next_index_at;
        }
        {
            let mut segs = self.segments.lock().unwrap();
            if staged.rolled {
                segs.push(SegmentInfo {
                    base: staged.base,
                    path: staged.path,
                    len: 0,
                    end: staged.base,
                    index: Vec::new(),
                    last_ms: 0,
                    holes: Vec::new(),
                });
            }
            let seg = segs.last_mut().unwrap();
            seg.len = staged.len;
            seg.end = end;
            seg.last_ms = seg.last_ms.max(staged.last_ms);
            seg.index.extend(staged.new_index);
        }
        self.durable.send_replace(end);
        staged.first
    }

    /// Undoes a staged batch: the file is cut back to where it was (a new segment removed).
    pub fn rollback(&self, staged: Staged) {
        // The undo is made durable (failures only: rare): a compacted topic's share is synced
        // on its own before the group's journal entry, which may then fail, and a power cut
        // brought back a change whose writer was told it failed; a journaled share's records
        // are cut at the next open only when the journal holds that partition, and else
        // served (see [`Partition::opened`]) — a publish answered 5xx delivered after all.
        let undone = if staged.rolled {
            drop(staged.file);
            fs::remove_file(&staged.path).and_then(|()| sync_dir(&self.dir))
        } else {
            staged.file.set_len(staged.start_len).and_then(|()| self.sync_file(&staged.file, &staged.path, false))
        };
        if let Err(e) = undone {
            // The next stage cuts the file back before writing, or refuses.
            tracing::error!(partition = self.id, error = %e, "could not roll back a failed append yet");
        }
    }

    /// Cuts the partition back so that its next record gets offset `cut`: records at or after
    /// it are removed (files after it deleted, the one holding it cut short); past the end, a
    /// new segment starts at `cut`. For the group journal's recovery at open, before anything
    /// reads or writes the partition; `cut` is at or above the first offset stored.
    pub fn truncate_to(&self, cut: u64) -> io::Result<()> {
        let mut active = self.active.lock().unwrap();
        let mut segs = self.segments.lock().unwrap();
        let end = *self.durable.borrow();
        if cut > end {
            if let Some(empty) = segs.last().filter(|s| s.len == 0) {
                // Nothing in it (often not even a file): the new segment takes its place.
                let _ = fs::remove_file(&empty.path);
                segs.pop();
            }
            let path = self.dir.join(segment::file_name(cut));
            segs.push(SegmentInfo {
                base: cut,
                path: path.clone(),
                len: 0,
                end: cut,
                index: Vec::new(),
                last_ms: 0,
                holes: Vec::new(),
            });
            *active = Active { file: None, path, base: cut, len: 0, next_offset: cut, next_index_at: 0 };
        } else if cut < end {
            let mut removed = false;
            while segs.len() > 1 && segs.last().is_some_and(|s| s.base >= cut) {
                let doomed = segs.pop().expect("more than one");
                fs::remove_file(&doomed.path)?;
                removed = true;
            }
            if removed {
                sync_dir(&self.dir)?;
            }
            let seg = segs.last_mut().expect("a partition has a segment");
            let from = seg.index.iter().rev().find(|&&(o, _)| o < cut).map_or(0, |&(_, p)| p);
            let pos = if seg.base >= cut { 0 } else { segment::position_of(&seg.path, from, cut)? };
            let file = OpenOptions::new().append(true).open(&seg.path)?;
            file.set_len(pos)?;
            file.sync_all()?;
            seg.len = pos;
            seg.end = cut;
            seg.index.retain(|&(o, _)| o < cut);
            seg.holes.retain(|&(s, _)| s < pos);
            for hole in &mut seg.holes {
                hole.1 = hole.1.min(pos);
            }
            *active = Active {
                file: Some(file),
                path: seg.path.clone(),
                base: seg.base,
                len: pos,
                next_offset: cut,
                next_index_at: seg.index.last().map_or(0, |&(_, p)| p + INDEX_INTERVAL),
            };
        }
        drop((segs, active));
        self.durable.send_replace(cut);
        Ok(())
    }

    fn plan(&self, from: u64) -> ReadPlan {
        let segs = self.segments.lock().unwrap();
        let mut i = segs.partition_point(|s| s.base <= from).saturating_sub(1);
        // Skip segments that end at or before `from` (gaps left by compaction or truncation).
        while i + 1 < segs.len() && segs[i].end <= from {
            i += 1;
        }
        let seg = &segs[i];
        let at = seg.index.partition_point(|&(o, _)| o <= from);
        let (pos_offset, pos) = if at == 0 { (seg.base, 0) } else { seg.index[at - 1] };
        ReadPlan {
            path: seg.path.clone(),
            pos,
            pos_offset,
            limit: seg.len,
            seg_end: seg.end,
            next_base: segs.get(i + 1).map(|s| s.base),
            holes: seg.holes.clone(),
            index: if seg.holes.is_empty() { Vec::new() } else { seg.index.clone() },
        }
    }

    /// Reads durable records at or after `from`, up to `max` records and roughly
    /// `max_bytes`. Returns the records and the offset to read from next.
    pub fn read(&self, from: u64, max: usize, max_bytes: usize) -> io::Result<(Vec<Frame>, u64)> {
        self.read_on(from, max, max_bytes, &mut None, Wait::Yes)
    }

    /// Bytes read from segment files for readers so far.
    #[cfg(test)]
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`Partition::read`] for a reader that reads on from where it stopped: `hint` is where
    /// the last read stopped, used when it is for `from` and replaced by where this one stops.
    /// With [`Wait::No`], a read that would wait for the disk fails with `WouldBlock` and
    /// leaves `hint` as it was.
    pub fn read_on(
        &self,
        from: u64,
        max: usize,
        max_bytes: usize,
        hint: &mut Option<ReadHint>,
        wait: Wait,
    ) -> io::Result<(Vec<Frame>, u64)> {
        let from = from.max(self.start_offset());
        let mut plan = self.plan(from);
        if from >= plan.seg_end {
            // Nothing at or after `from` here: continue in the next segment, if any.
            *hint = None;
            return Ok((Vec::new(), plan.next_base.map_or(from, |b| b.max(from))));
        }
        self.fault(Fault::Read(&plan.path))?;
        let hinted = hint.take().filter(|h| h.offset == from && h.path == plan.path && h.pos <= plan.limit);
        let file = match &hinted {
            Some(h) => {
                plan.pos = h.pos;
                plan.pos_offset = from;
                h.file.clone()
            }
            None => match File::open(&plan.path) {
                Ok(f) => Arc::new(f),
                // Reclaimed or compacted between planning and opening: read again from the new start.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), from)),
                Err(e) => return Err(e),
            },
        };
        let (frames, next, stopped_at) = match self.read_planned(&file, &plan, from, max, max_bytes, wait) {
            Ok(read) => read,
            Err(e) => {
                *hint = hinted;
                return Err(e);
            }
        };
        if hinted.is_some() && frames.first().is_some_and(|f| f.offset != from) {
            // The hint did not lead to `from` (it should always): read as if there were none.
            return self.read_on(from, max, max_bytes, &mut None, wait);
        }
        *hint = stopped_at.map(|pos| ReadHint { offset: next, path: plan.path, pos, file });
        Ok((frames, next))
    }

    /// Reads from the planned segment; also returns the position after the last frame handed
    /// out, when the next read can start there.
    fn read_planned(
        &self,
        file: &File,
        plan: &ReadPlan,
        from: u64,
        max: usize,
        max_bytes: usize,
        wait: Wait,
    ) -> io::Result<(Vec<Frame>, u64, Option<u64>)> {
        let mut frames = Vec::new();
        let mut bytes = 0usize;
        let mut pos = plan.pos;
        let mut stopped_at = None;
        // A window about the size of what this read hands out (the frames before `from` it
        // must step over, and `max` more), bounded: every record handed out keeps its whole
        // window alive, and copying what is not handed out is wasted.
        let frame_bytes = self.frame_bytes.load(std::sync::atomic::Ordering::Relaxed).max(32);
        let wanted = (from.saturating_sub(plan.pos_offset) as usize).saturating_add(max).saturating_mul(frame_bytes);
        let mut window = (wanted.saturating_add(wanted / 8)).clamp(4096, READ_WINDOW).min(max_bytes.max(4096));
        // The offset after the last frame decoded (handed out or stepped over).
        let mut next_seen = plan.pos_offset;
        // `from < seg_end`, so a record at or after `from` lies in [pos, limit).
        'windows: while frames.len() < max && bytes < max_bytes && pos < plan.limit {
            if let Some(&(_, hole_end)) = plan.holes.iter().find(|&&(s, e)| s <= pos && pos < e) {
                pos = hole_end; // damaged at open: step over
                continue;
            }
            let hole_at = plan.holes.iter().map(|&(s, _)| s).filter(|&s| s > pos).min().unwrap_or(plan.limit);
            let n = ((hole_at.min(plan.limit) - pos) as usize).min(window);
            let buf = read_exact_at(file, pos, n, wait)?;
            #[cfg(test)]
            self.read_bytes.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let mut used = 0usize;
            let mut seen = 0usize;
            // Whether the window reaches the end of what may be read here: a frame that would
            // run on past it had its length damaged after the segment was validated, and
            // waiting for more of it (doubling the window) would spin for ever.
            let at_end = pos + buf.len() as u64 >= hole_at.min(plan.limit);
            loop {
                let decoded = match segment::decode(&buf.slice(used..)) {
                    Decoded::Incomplete if at_end && used < buf.len() => Decoded::Corrupt,
                    decoded => decoded,
                };
                match decoded {
                    Decoded::Frame(frame, size) => {
                        used += size;
                        seen += 1;
                        next_seen = frame.offset + 1;
                        if frame.offset >= from {
                            bytes += frame.value.len();
                            frames.push(frame);
                            stopped_at = Some(pos + used as u64);
                            if frames.len() >= max || bytes >= max_bytes {
                                break 'windows;
                            }
                        }
                    }
                    Decoded::Incomplete => break,
                    Decoded::Corrupt => {
                        // Damaged after it was validated at open (bit rot): never serve it;
                        // go on at the next frame the window shows, else the next indexed one.
                        let after = frames.last().map(|f: &Frame| f.offset);
                        let at = pos + used as u64;
                        tracing::error!(partition = self.id, path = %plan.path.display(), position = at, "corrupt frame in log segment; stepping over it");
                        let next = match segment::resync(&buf, used, after) {
                            Some(p) => Some(pos + p as u64),
                            // Not within this window (a small one): look through everything up
                            // to the next indexed frame (at most about the index's interval and
                            // a frame), as the scan at open would — jumping there skipped the
                            // valid frames between.
                            None => {
                                let indexed = self.index_after(plan, at);
                                let bound = indexed.unwrap_or(hole_at.min(plan.limit));
                                let wide = read_exact_at(file, at, (bound - at) as usize, wait)?;
                                segment::resync(&wide, 0, after).map(|p| at + p as u64).or(indexed)
                            }
                        };
                        stopped_at = None;
                        match next {
                            Some(p) => {
                                pos = p;
                                continue 'windows;
                            }
                            None => {
                                let next = frames.last().map_or(from, |f| f.offset + 1);
                                return Ok((frames, plan.next_base.unwrap_or(plan.seg_end).max(next), None));
                            }
                        }
                    }
                }
            }
            if used == 0 {
                window = window.saturating_mul(2); // one frame is larger than the window
            } else {
                // The estimate fell short (after a restart it is a default until the first
                // append): the next window holds what is still wanted at the size these
                // frames had, which becomes the estimate. The largest window instead read
                // 256 KiB for the frame or two still wanted, in every read of a drain.
                let frame_bytes = used / seen;
                self.frame_bytes.store(frame_bytes, std::sync::atomic::Ordering::Relaxed);
                let still = (from.saturating_sub(next_seen) as usize).saturating_add(max - frames.len());
                let wanted = still.saturating_mul(frame_bytes);
                // At least the frame it stopped in, when its header shows how large it is
                // (small frames before a large one would make the average too small).
                let partial = segment::frame_size(&buf[used..]).unwrap_or(0);
                window =
                    (wanted.saturating_add(wanted / 8)).clamp(4096, READ_WINDOW).min(max_bytes.max(4096)).max(partial);
            }
            pos += used as u64;
        }
        let next = frames.last().map_or(plan.seg_end, |f| f.offset + 1);
        Ok((frames, next, stopped_at))
    }

    /// The position of the first indexed frame after `pos` in the planned segment.
    fn index_after(&self, plan: &ReadPlan, pos: u64) -> Option<u64> {
        let index = if plan.index.is_empty() {
            let segs = self.segments.lock().unwrap();
            segs.iter().find(|s| s.path == plan.path).map(|s| s.index.clone()).unwrap_or_default()
        } else {
            plan.index.clone()
        };
        index.into_iter().map(|(_, p)| p).find(|&p| p > pos)
    }

    /// Takes sealed segments whose every record is below `below` (consumed by every group) out
    /// of the partition and returns their files, for the caller to delete with
    /// [`remove_in_steps`] where its pacing holds up nothing else.
    pub fn reclaim(&self, below: u64) -> Vec<PathBuf> {
        self.take_sealed_prefix(|s, next| next.base <= below && s.end <= below)
    }

    /// Deletes sealed segments whose newest record was appended before `cutoff_ms` (retention
    /// by age, for topics nobody consumes to the end: dead letters, history), and whose every
    /// record is below `read` when given (what the topic's own reader has read).
    pub fn reclaim_older(&self, cutoff_ms: i64, read: Option<u64>) -> io::Result<usize> {
        // At once: a scan of the dead letters may still be reading the file, and an unlinked
        // file stays whole for whoever has it open (a shrinking one would not).
        let doomed = self.take_sealed_prefix(|s, next| {
            s.last_ms < cutoff_ms && read.is_none_or(|read| next.base <= read && s.end <= read)
        });
        // Each tried: the list no longer has them, so one left behind here stays until a restart.
        let mut first_error = None;
        for path in &doomed {
            if let Err(e) = fs::remove_file(path) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(doomed.len()), Err)
    }

    /// Takes the longest prefix of sealed segments (never the active one) that `doomed`
    /// accepts, given each segment and the one after it, out of the partition: no read is
    /// planned against them from now on. Returns their files.
    fn take_sealed_prefix(&self, doomed: impl Fn(&SegmentInfo, &SegmentInfo) -> bool) -> Vec<PathBuf> {
        let mut segs = self.segments.lock().unwrap();
        let mut n = 0;
        while n + 1 < segs.len() && doomed(&segs[n], &segs[n + 1]) {
            n += 1;
        }
        segs.drain(..n).map(|s| s.path).collect()
    }

    /// Every durable record from `from` to the durable end, across segments.
    fn read_to_end(&self, from: u64) -> io::Result<Vec<Frame>> {
        let end = self.end_offset();
        let mut out = Vec::new();
        let mut next = from;
        while next < end {
            let (frames, after) = self.read(next, usize::MAX, usize::MAX)?;
            out.extend(frames);
            if after <= next {
                break;
            }
            next = after;
        }
        Ok(out)
    }

    /// Rewrites the partition keeping only the newest record per key, tombstones dropped
    /// (and always the last record, so the end offset never moves back). Offsets are
    /// preserved. Called at open, before anything else reads or writes the partition. Only an
    /// optimisation: a compacted file that cannot be written (a full disk) leaves the
    /// partition as it was, and Herald starts — then reclaims what is consumed, which is what
    /// frees the disk. A failure once the partition is the compacted file stops the open (a
    /// partition left beside old files an unlink missed could lose what is appended to it).
    pub fn compact(&self) -> io::Result<bool> {
        let all = self.read_to_end(0)?;
        let mut latest: HashMap<&[u8], usize> = HashMap::new();
        for (i, f) in all.iter().enumerate() {
            latest.insert(&f.key, i);
        }
        let keep: Vec<&Frame> = all
            .iter()
            .enumerate()
            .filter(|(i, f)| (latest[&f.key[..]] == *i && !f.value.is_empty()) || *i + 1 == all.len())
            .map(|(_, f)| f)
            .collect();
        if keep.len() * 2 + 16 > all.len() && self.segment_count() == 1 {
            return Ok(false);
        }
        let end = self.end_offset();
        let base = keep.first().map_or(end, |f| f.offset);
        let (path, info) = match self.write_compacted(base, &keep, end) {
            Ok(written) => written,
            Err(e) => {
                tracing::warn!(topic = %self.topic, partition = self.id, error = %e, "compaction at open failed; the partition is read uncompacted");
                return Ok(false);
            }
        };
        let file = OpenOptions::new().append(true).open(&path)?;
        let mut active = self.active.lock().unwrap();
        let mut segs = self.segments.lock().unwrap();
        *active = Active {
            file: Some(file),
            path: path.clone(),
            base,
            len: info.len,
            next_offset: end,
            next_index_at: info.index.last().map_or(0, |&(_, p)| p + INDEX_INTERVAL),
        };
        for s in segs.iter().filter(|s| s.path != path && s.path.exists()) {
            fs::remove_file(&s.path)?;
        }
        sync_dir(&self.dir)?;
        *segs = vec![info];
        Ok(true)
    }

    /// While running: rewrites the sealed segments (never the active one) of a compacted
    /// partition keeping, per key, only a record that is still its newest (tombstones are kept,
    /// so a follower behind them still learns of the delete). `false` when there was too
    /// little to gain.
    pub fn compact_sealed(&self) -> io::Result<bool> {
        let sealed: Vec<SegmentInfo> = {
            let segs = self.segments.lock().unwrap();
            if segs.len() <= COMPACT_AT_SEGMENTS {
                return Ok(false);
            }
            segs[..segs.len() - 1].to_vec()
        };
        let (first, sealed_end) = (sealed[0].base, sealed.last().expect("several").end);
        if *self.futile.lock().unwrap() == Some((first, sealed_end)) {
            return Ok(false);
        }
        let all = self.read_to_end(first)?;
        let mut latest: HashMap<&[u8], usize> = HashMap::new();
        for (i, f) in all.iter().enumerate() {
            latest.insert(&f.key, i);
        }
        let in_sealed = all.iter().take_while(|f| f.offset < sealed_end).count();
        let keep: Vec<&Frame> =
            all[..in_sealed].iter().enumerate().filter(|(i, f)| latest[&f.key[..]] == *i).map(|(_, f)| f).collect();
        if keep.len() * 2 > in_sealed {
            *self.futile.lock().unwrap() = Some((first, sealed_end));
            return Ok(false);
        }
        let (path, info) = self.write_compacted(first, &keep, sealed_end)?;
        let doomed: Vec<PathBuf> = {
            let mut segs = self.segments.lock().unwrap();
            let n = segs.iter().take_while(|s| s.base < sealed_end).count();
            if segs.first().map(|s| s.base) != Some(first) || n != sealed.len() {
                // Reclaimed meanwhile: leave it for next time.
                drop(segs);
                fs::remove_file(&path)?;
                return Ok(false);
            }
            let doomed = segs[..n].iter().map(|s| s.path.clone()).collect();
            segs.splice(..n, [info]);
            doomed
        };
        for p in doomed {
            fs::remove_file(p)?;
        }
        sync_dir(&self.dir)?;
        Ok(true)
    }

    /// Writes `keep` as the segment whose file name is `base`, ending at `end`, through a
    /// scratch file renamed into place (a crash leaves the old or the new).
    fn write_compacted(&self, base: u64, keep: &[&Frame], end: u64) -> io::Result<(PathBuf, SegmentInfo)> {
        let mut buf = BytesMut::new();
        let mut index = Vec::new();
        let mut next_index_at = 0u64;
        let mut last_ms = 0;
        for f in keep {
            if buf.len() as u64 >= next_index_at {
                index.push((f.offset, buf.len() as u64));
                next_index_at = buf.len() as u64 + INDEX_INTERVAL;
            }
            last_ms = last_ms.max(f.timestamp_ms);
            segment::encode(&mut buf, f.offset, f.timestamp_ms, &f.key, &f.value);
        }
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let path = self.dir.join(segment::compacted_name(base, generation));
        let scratch = self.dir.join(format!("{}.compact", segment::compacted_name(base, generation)));
        let written =
            self.fault(Fault::Write(&scratch)).and_then(|()| replace_durably(&self.dir, &scratch, &path, &buf));
        if let Err(e) = written {
            // Nothing lists either file yet: a full disk retried every flush left one more each time.
            let _ = fs::remove_file(&scratch);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        let info =
            SegmentInfo { base, path: path.clone(), len: buf.len() as u64, end, index, last_ms, holes: Vec::new() };
        Ok((path, info))
    }

    /// Number of segment files (for tests and metrics).
    pub fn segment_count(&self) -> usize {
        self.segments.lock().unwrap().len()
    }
}

/// Shared handle.
pub type PartitionRef = Arc<Partition>;
