//! One partition of the embedded log: a directory of segment files, the append path used by
//! the group-commit writer, reads for consumers, reclaim and compaction.

use super::segment::{self, Decoded, Frame, INDEX_INTERVAL};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Bytes read from a segment file at a time.
const READ_WINDOW: usize = 256 * 1024;

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
}

/// The writer's view of the active segment; touched only by the writer thread.
struct Active {
    /// Opened on the first append, so an unused partition costs no file and no fsync.
    file: Option<File>,
    base: u64,
    len: u64,
    next_offset: u64,
    next_index_at: u64,
}

/// One partition's files and state.
pub struct Partition {
    id: u32,
    dir: PathBuf,
    segment_bytes: u64,
    segments: Mutex<Vec<SegmentInfo>>,
    active: Mutex<Active>,
    durable: watch::Sender<u64>,
}

/// Where a read should start, found under the segments lock and used without it.
struct ReadPlan {
    path: PathBuf,
    pos: u64,
    limit: u64,
    seg_end: u64,
    next_base: Option<u64>,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Partition {
    /// Opens (creating if needed) the partition in `dir`, validating every segment and
    /// cutting off a torn or corrupt tail.
    pub fn open(id: u32, dir: PathBuf, segment_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "compact") {
                fs::remove_file(&path)?; // an interrupted compaction's scratch file
            } else if let Some(base) = segment::parse_file_name(&path) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let mut segments: Vec<SegmentInfo> = Vec::new();
        for base in bases {
            let path = dir.join(segment::file_name(base));
            if let Some(prev) = segments.last() {
                if base < prev.end {
                    // Left over from a compaction that was interrupted after its rename:
                    // everything in it is already in the compacted segment.
                    tracing::warn!(path = %path.display(), "removing segment overlapped by compaction");
                    fs::remove_file(&path)?;
                    continue;
                }
            }
            let scan = segment::scan(&path, base)?;
            if scan.garbage > 0 {
                tracing::warn!(
                    path = %path.display(),
                    cut_bytes = scan.garbage,
                    kept_bytes = scan.valid_len,
                    "log segment has a torn or corrupt tail; cutting it off"
                );
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(scan.valid_len)?;
                f.sync_all()?;
            }
            let end = scan.last_offset.map_or(base, |o| o + 1);
            segments.push(SegmentInfo { base, path, len: scan.valid_len, end, index: scan.index });
        }
        // Drop empty segments except the newest (which stays the active one).
        let last = segments.len().saturating_sub(1);
        let mut kept = Vec::with_capacity(segments.len());
        for (i, s) in segments.into_iter().enumerate() {
            if s.len == 0 && i != last {
                fs::remove_file(&s.path)?;
            } else {
                kept.push(s);
            }
        }
        let mut segments = kept;
        if segments.is_empty() {
            let path = dir.join(segment::file_name(0));
            segments.push(SegmentInfo { base: 0, path, len: 0, end: 0, index: Vec::new() });
        }
        let tail = segments.last().unwrap().clone();
        let file = if tail.path.exists() { Some(OpenOptions::new().append(true).open(&tail.path)?) } else { None };
        let next_index_at = tail.index.last().map_or(0, |&(_, p)| p + INDEX_INTERVAL);
        let active = Active { file, base: tail.base, len: tail.len, next_offset: tail.end, next_index_at };
        let (durable, _) = watch::channel(tail.end);
        Ok(Partition { id, dir, segment_bytes, segments: Mutex::new(segments), active: Mutex::new(active), durable })
    }

    /// Partition number.
    pub fn id(&self) -> u32 {
        self.id
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

    /// Writes `records` as one batch, fsyncs, and publishes them to readers. Returns the
    /// offset of the first record. Called only by the writer thread.
    pub fn append(&self, records: &[(&[u8], &[u8])], timestamp_ms: i64) -> io::Result<u64> {
        let mut guard = self.active.lock().unwrap();
        let active = &mut *guard;
        let size: u64 = records.iter().map(|(k, v)| (segment::FRAME_HEADER + 20 + k.len() + v.len()) as u64).sum();
        let first = active.next_offset;
        let rolled = active.len > 0 && active.len + size > self.segment_bytes;
        if rolled {
            let path = self.dir.join(segment::file_name(first));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            sync_dir(&self.dir)?;
            *active = Active { file: Some(file), base: first, len: 0, next_offset: first, next_index_at: 0 };
        }
        if active.file.is_none() {
            let path = self.dir.join(segment::file_name(active.base));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            // The partition's directories were made without fsync at open; make them durable
            // now that they hold data.
            sync_dir(&self.dir)?;
            if let Some(topic_dir) = self.dir.parent() {
                sync_dir(topic_dir)?;
                if let Some(topics) = topic_dir.parent() {
                    sync_dir(topics)?;
                }
            }
            active.file = Some(file);
        }
        let Some(file) = active.file.as_mut() else { unreachable!("opened above") };
        let mut buf = BytesMut::with_capacity(size as usize);
        let mut new_index = Vec::new();
        for (i, (key, value)) in records.iter().enumerate() {
            let pos = active.len + buf.len() as u64;
            if pos >= active.next_index_at {
                new_index.push((first + i as u64, pos));
                active.next_index_at = pos + INDEX_INTERVAL;
            }
            segment::encode(&mut buf, first + i as u64, timestamp_ms, key, value);
        }
        let written = file.write_all(&buf).and_then(|_| file.sync_data());
        if let Err(e) = written {
            // Leave nothing half-written behind the durable end.
            let _ = file.set_len(active.len);
            active.next_index_at = new_index.first().map_or(active.next_index_at, |&(_, p)| p);
            return Err(e);
        }
        active.len += buf.len() as u64;
        active.next_offset = first + records.len() as u64;
        let (base, len, end) = (active.base, active.len, active.next_offset);
        drop(guard);
        {
            let mut segs = self.segments.lock().unwrap();
            if rolled {
                let path = self.dir.join(segment::file_name(base));
                segs.push(SegmentInfo { base, path, len: 0, end: base, index: Vec::new() });
            }
            let seg = segs.last_mut().unwrap();
            seg.len = len;
            seg.end = end;
            seg.index.extend(new_index);
        }
        self.durable.send_replace(end);
        Ok(first)
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
        let pos = if at == 0 { 0 } else { seg.index[at - 1].1 };
        ReadPlan {
            path: seg.path.clone(),
            pos,
            limit: seg.len,
            seg_end: seg.end,
            next_base: segs.get(i + 1).map(|s| s.base),
        }
    }

    /// Reads durable records at or after `from`, up to `max` records and roughly
    /// `max_bytes`. Returns the records and the offset to read from next.
    pub fn read(&self, from: u64, max: usize, max_bytes: usize) -> io::Result<(Vec<Frame>, u64)> {
        let from = from.max(self.start_offset());
        let plan = self.plan(from);
        if from >= plan.seg_end {
            // Nothing at or after `from` here: continue in the next segment, if any.
            return Ok((Vec::new(), plan.next_base.map_or(from, |b| b.max(from))));
        }
        let file = match File::open(&plan.path) {
            Ok(f) => f,
            // Reclaimed between planning and opening: read again from the new start.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), from)),
            Err(e) => return Err(e),
        };
        let mut frames = Vec::new();
        let mut bytes = 0usize;
        let mut pos = plan.pos;
        // Read in modest windows: a big zeroed buffer per call costs more than a second read,
        // and every record handed out keeps its whole window alive.
        let mut window = READ_WINDOW.min(max_bytes.max(4096));
        // `from < seg_end`, so a record at or after `from` lies in [pos, limit).
        'windows: while frames.len() < max && bytes < max_bytes && pos < plan.limit {
            let n = ((plan.limit - pos) as usize).min(window);
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, pos)?;
            let buf = Bytes::from(buf);
            let mut used = 0usize;
            loop {
                match segment::decode(&buf.slice(used..)) {
                    Decoded::Frame(frame, size) => {
                        used += size;
                        if frame.offset >= from {
                            bytes += frame.value.len();
                            frames.push(frame);
                            if frames.len() >= max || bytes >= max_bytes {
                                break 'windows;
                            }
                        }
                    }
                    Decoded::Incomplete => break,
                    Decoded::Corrupt => {
                        // Damaged after it was validated at open (bit rot): never serve it.
                        tracing::error!(
                            partition = self.id,
                            path = %plan.path.display(),
                            position = pos + used as u64,
                            "corrupt frame in log segment; skipping the rest of the segment"
                        );
                        let next = frames.last().map_or(from, |f: &Frame| f.offset + 1);
                        return Ok((frames, plan.next_base.unwrap_or(plan.seg_end).max(next)));
                    }
                }
            }
            if used == 0 {
                window *= 2; // one frame is larger than the window
            }
            pos += used as u64;
        }
        let next = frames.last().map_or(plan.seg_end, |f| f.offset + 1);
        Ok((frames, next))
    }

    /// Deletes sealed segments whose every record is below `below`.
    pub fn reclaim(&self, below: u64) -> io::Result<usize> {
        let doomed: Vec<PathBuf> = {
            let mut segs = self.segments.lock().unwrap();
            let mut n = 0;
            while n + 1 < segs.len() && segs[n + 1].base <= below {
                n += 1;
            }
            segs.drain(..n).map(|s| s.path).collect()
        };
        for path in &doomed {
            fs::remove_file(path)?;
        }
        Ok(doomed.len())
    }

    /// Rewrites the partition keeping only the newest record per key (and always the last
    /// record, so the end offset never moves back). Offsets are preserved. Called at open.
    pub fn compact(&self) -> io::Result<bool> {
        let end = self.end_offset();
        let (all, _) = self.read(0, usize::MAX, usize::MAX)?;
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
        if keep.len() * 2 + 16 > all.len() {
            return Ok(false);
        }
        let base = keep.first().map_or(end, |f| f.offset);
        let mut buf = BytesMut::new();
        let mut index = Vec::new();
        let mut next_index_at = 0u64;
        for f in &keep {
            if buf.len() as u64 >= next_index_at {
                index.push((f.offset, buf.len() as u64));
                next_index_at = buf.len() as u64 + INDEX_INTERVAL;
            }
            segment::encode(&mut buf, f.offset, f.timestamp_ms, &f.key, &f.value);
        }
        let scratch = self.dir.join(format!("{}.compact", segment::file_name(base)));
        let mut file = File::create(&scratch)?;
        file.write_all(&buf)?;
        file.sync_all()?;
        let path = self.dir.join(segment::file_name(base));
        let mut active = self.active.lock().unwrap();
        let mut segs = self.segments.lock().unwrap();
        fs::rename(&scratch, &path)?;
        sync_dir(&self.dir)?;
        for s in segs.iter().filter(|s| s.path != path && s.path.exists()) {
            fs::remove_file(&s.path)?;
        }
        sync_dir(&self.dir)?;
        let len = buf.len() as u64;
        *segs = vec![SegmentInfo { base, path: path.clone(), len, end, index: index.clone() }];
        let next_index_at = index.last().map_or(0, |&(_, p)| p + INDEX_INTERVAL);
        *active = Active {
            file: Some(OpenOptions::new().append(true).open(&path)?),
            base,
            len,
            next_offset: end,
            next_index_at,
        };
        Ok(true)
    }

    /// Number of segment files (for tests and metrics).
    pub fn segment_count(&self) -> usize {
        self.segments.lock().unwrap().len()
    }
}

/// Shared handle.
pub type PartitionRef = Arc<Partition>;
