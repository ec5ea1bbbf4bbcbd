//! On-disk record framing for segment files, and the scan that validates a segment.
//!
//! A frame is `len u32 | crc32 u32 | offset u64 | timestamp i64 | key_len u32 | key | value`,
//! little-endian; `len` counts the bytes after the CRC and the CRC covers exactly them, so a
//! torn or flipped write anywhere in a frame is caught.

use bytes::{BufMut, Bytes, BytesMut};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Bytes before the body: length and checksum.
pub const FRAME_HEADER: usize = 8;
/// Fixed part of the body: offset, timestamp, key length.
const BODY_FIXED: usize = 20;
/// Largest accepted frame body, so a corrupt length cannot make us allocate gigabytes.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// One sparse-index entry per this many bytes of segment.
pub const INDEX_INTERVAL: u64 = 64 * 1024;

/// A decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Record offset.
    pub offset: u64,
    /// Append time in ms.
    pub timestamp_ms: i64,
    /// Key bytes.
    pub key: Bytes,
    /// Value bytes.
    pub value: Bytes,
}

/// Appends one encoded frame to `buf`.
pub fn encode(buf: &mut BytesMut, offset: u64, timestamp_ms: i64, key: &[u8], value: &[u8]) {
    let body_len = BODY_FIXED + key.len() + value.len();
    buf.reserve(FRAME_HEADER + body_len);
    buf.put_u32_le(body_len as u32);
    let crc_at = buf.len();
    buf.put_u32_le(0);
    let body_at = buf.len();
    buf.put_u64_le(offset);
    buf.put_i64_le(timestamp_ms);
    buf.put_u32_le(key.len() as u32);
    buf.put_slice(key);
    buf.put_slice(value);
    let crc = crc32fast::hash(&buf[body_at..]);
    buf[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Result of decoding at the start of a buffer.
pub enum Decoded {
    /// A valid frame and its total encoded size.
    Frame(Frame, usize),
    /// The buffer ends inside a frame: read more (or, at end of file, a torn tail).
    Incomplete,
    /// The bytes are not a valid frame.
    Corrupt,
}

/// Decodes the frame at the start of `buf` (a slice of a shared buffer, so key and value
/// are zero-copy views).
/// The whole size of the frame whose header starts `buf`, header included; `None` when the
/// header is not all there or gives a length no frame can have.
pub fn frame_size(buf: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
    (buf.len() >= FRAME_HEADER && (BODY_FIXED..=MAX_FRAME).contains(&len)).then_some(FRAME_HEADER + len)
}

pub fn decode(buf: &Bytes) -> Decoded {
    if buf.len() < FRAME_HEADER {
        return Decoded::Incomplete;
    }
    let Some(size) = frame_size(buf) else { return Decoded::Corrupt };
    let len = size - FRAME_HEADER;
    if buf.len() < size {
        return Decoded::Incomplete;
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    let body = &buf[FRAME_HEADER..FRAME_HEADER + len];
    if crc32fast::hash(body) != crc {
        return Decoded::Corrupt;
    }
    let offset = u64::from_le_bytes(body[0..8].try_into().unwrap());
    let timestamp_ms = i64::from_le_bytes(body[8..16].try_into().unwrap());
    let key_len = u32::from_le_bytes(body[16..20].try_into().unwrap()) as usize;
    if BODY_FIXED + key_len > len {
        return Decoded::Corrupt;
    }
    let key_at = FRAME_HEADER + BODY_FIXED;
    let frame = Frame {
        offset,
        timestamp_ms,
        key: buf.slice(key_at..key_at + key_len),
        value: buf.slice(key_at + key_len..FRAME_HEADER + len),
    };
    Decoded::Frame(frame, FRAME_HEADER + len)
}

/// File name of the segment whose first offset is `base`.
pub fn file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// File name of the `generation`th compaction of the segment at `base`: a new name, so a reader
/// that planned against the old file never opens the new one by mistake.
pub fn compacted_name(base: u64, generation: u64) -> String {
    format!("{base:020}.{generation}.log")
}

/// Parses a segment file name back to its base offset and compaction generation (0 for a
/// segment as appended).
pub fn parse_file_name(path: &Path) -> Option<(u64, u64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".log")?;
    match name.split_once('.') {
        Some((base, generation)) => Some((base.parse().ok()?, generation.parse().ok()?)),
        None => Some((name.parse().ok()?, 0)),
    }
}

/// What a scan of a segment file found.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Bytes up to the end of the last valid frame: anything after it is a torn or corrupt
    /// tail, which the active segment cuts off.
    pub valid_len: u64,
    /// Offset of the last valid frame, if any.
    pub last_offset: Option<u64>,
    /// Newest append time of a valid frame, ms (0 when none): for time-based retention.
    pub last_timestamp_ms: i64,
    /// Sparse index: (offset, file position) every [`INDEX_INTERVAL`] bytes.
    pub index: Vec<(u64, u64)>,
    /// Damaged byte ranges between valid frames, which readers skip.
    pub holes: Vec<(u64, u64)>,
}

/// Largest jump in offsets a frame found by resynchronising may make: a frame claiming more is
/// taken for noise that happens to checksum.
const MAX_OFFSET_GAP: u64 = 1 << 32;

/// The position of the next valid frame after damage at `from`, whose offset follows `after`
/// (a cheap plausibility check before the checksum keeps this linear in practice).
pub fn resync(buf: &Bytes, from: usize, after: Option<u64>) -> Option<usize> {
    (from + 1..buf.len().saturating_sub(FRAME_HEADER + BODY_FIXED)).find(|&p| {
        let offset = u64::from_le_bytes(buf[p + FRAME_HEADER..p + FRAME_HEADER + 8].try_into().unwrap());
        let plausible = after.is_none_or(|a| offset > a && offset - a < MAX_OFFSET_GAP);
        plausible && matches!(decode(&buf.slice(p..)), Decoded::Frame(..))
    })
}

/// Reads a whole segment, checking every frame's checksum and that offsets rise from `base`.
/// Damage in the middle is stepped over (a hole), so the valid frames after it are kept.
pub fn scan(path: &PathBuf, base: u64) -> io::Result<Scan> {
    let mut file = File::open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let buf = Bytes::from(bytes);
    let mut scan = Scan::default();
    let mut next_index_at = 0u64;
    let mut pos = 0usize;
    while pos < buf.len() {
        match decode(&buf.slice(pos..)) {
            Decoded::Frame(frame, size)
                if scan.last_offset.is_none_or(|l| frame.offset > l) && frame.offset >= base =>
            {
                if pos as u64 >= next_index_at {
                    scan.index.push((frame.offset, pos as u64));
                    next_index_at = pos as u64 + INDEX_INTERVAL;
                }
                scan.last_offset = Some(frame.offset);
                scan.last_timestamp_ms = scan.last_timestamp_ms.max(frame.timestamp_ms);
                pos += size;
                scan.valid_len = pos as u64;
            }
            // Damage (or a length that claims more than the file holds): step to the next
            // valid frame if there is one; otherwise this is the torn tail.
            _ => match resync(&buf, pos, scan.last_offset.or(base.checked_sub(1))) {
                Some(next) => {
                    scan.holes.push((pos as u64, next as u64));
                    pos = next;
                }
                None => break,
            },
        }
    }
    Ok(scan)
}

/// The position in the segment at `path` of its first frame whose offset is `offset` or more,
/// reading from `from` (a frame's position at or before it); the end of its valid frames if
/// there is none. Damage on the way is stepped over as [`scan`] does.
pub fn position_of(path: &Path, from: u64, offset: u64) -> io::Result<u64> {
    let mut file = File::open(path)?;
    io::Seek::seek(&mut file, io::SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let buf = Bytes::from(bytes);
    let (mut pos, mut valid, mut last) = (0usize, 0usize, None);
    while pos < buf.len() {
        match decode(&buf.slice(pos..)) {
            Decoded::Frame(frame, _) if frame.offset >= offset => return Ok(from + pos as u64),
            Decoded::Frame(frame, size) => {
                last = Some(frame.offset);
                pos += size;
                valid = pos;
            }
            _ => match resync(&buf, pos, last) {
                Some(next) => pos = next,
                None => break,
            },
        }
    }
    Ok(from + valid as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_frame() {
        let mut buf = BytesMut::new();
        encode(&mut buf, 42, 7, b"key", b"value");
        let bytes = buf.freeze();
        match decode(&bytes) {
            Decoded::Frame(f, size) => {
                assert_eq!(size, bytes.len());
                assert_eq!((f.offset, f.timestamp_ms), (42, 7));
                assert_eq!(&f.key[..], b"key");
                assert_eq!(&f.value[..], b"value");
            }
            _ => panic!("frame expected"),
        }
    }

    #[test]
    fn detects_a_flipped_bit_and_a_short_buffer() {
        let mut buf = BytesMut::new();
        encode(&mut buf, 1, 1, b"k", b"payload");
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(decode(&bad.freeze()), Decoded::Corrupt));
        let short = buf.freeze().slice(..10);
        assert!(matches!(decode(&short), Decoded::Incomplete));
    }

    #[test]
    fn scan_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(0));
        let mut buf = BytesMut::new();
        for i in 0..3 {
            encode(&mut buf, i, 0, b"k", b"v");
        }
        let good = buf.len() as u64;
        encode(&mut buf, 3, 0, b"k", b"torn-record");
        std::fs::write(&path, &buf[..buf.len() - 4]).unwrap();
        let scan = scan(&path, 0).unwrap();
        assert_eq!(scan.valid_len, good);
        assert_eq!(scan.last_offset, Some(2));
        assert!(scan.holes.is_empty());
    }

    #[test]
    fn scan_steps_over_damage_in_the_middle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(0));
        let mut buf = BytesMut::new();
        let mut starts = Vec::new();
        for i in 0..10 {
            starts.push(buf.len());
            encode(&mut buf, i, i as i64, b"key", format!("value-{i}").as_bytes());
        }
        let end = buf.len();
        buf[starts[4] + 12] ^= 0xff; // inside frame 4
        std::fs::write(&path, &buf).unwrap();
        let scan = scan(&path, 0).unwrap();
        assert_eq!(scan.last_offset, Some(9));
        assert_eq!(scan.valid_len, end as u64);
        assert_eq!(scan.holes, vec![(starts[4] as u64, starts[5] as u64)]);
        assert_eq!(scan.last_timestamp_ms, 9);
    }
}
