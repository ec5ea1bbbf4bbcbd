use super::*;
use bytes::Bytes;
use std::collections::HashMap;
use std::io::Write;

fn spec(name: &str, partitions: u32, compacted: bool) -> TopicSpec {
    TopicSpec {
        name: name.into(),
        partitions,
        compacted,
        retention: None,
        retention_waits_for_reader: false,
        read_within: Duration::from_millis(50),
        keyed: false,
    }
}

fn config(dir: &std::path::Path, segment_bytes: u64) -> EmbeddedConfig {
    EmbeddedConfig {
        dir: dir.to_path_buf(),
        segment_bytes,
        flush_interval: Duration::from_millis(20),
        topics: vec![spec("t", 2, false), spec("c", 1, true)],
        journal_bytes: DEFAULT_JOURNAL_BYTES,
        faults: None,
    }
}

fn rec(key: &str, value: &str) -> Record {
    Record { key: Bytes::from(key.to_string()), value: Bytes::from(value.to_string()) }
}

async fn take(reader: &mut Box<dyn PartitionReader>, n: usize) -> Vec<LogRecord> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(5), reader.next_batch(n - out.len()))
            .await
            .expect("records within 5 s")
            .unwrap();
        out.extend(batch);
    }
    out
}

/// One batch of at most `n` records.
async fn some(reader: &mut Box<dyn PartitionReader>, n: usize) -> Vec<LogRecord> {
    tokio::time::timeout(Duration::from_secs(5), reader.next_batch(n)).await.expect("records within 5 s").unwrap()
}

async fn readers(log: &EmbeddedLog, group: &str, topic: &str) -> Vec<Box<dyn PartitionReader>> {
    let mut consumer = log.consume(group, topic).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..log.partitions(topic).unwrap() {
        match consumer.next_assignment().await {
            Some(Assignment::Assigned(r)) => out.push(r),
            _ => panic!("assignment expected"),
        }
    }
    out.sort_by_key(|r| r.partition());
    out
}

#[tokio::test]
async fn appended_records_survive_reopen_in_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
        let positions = log.append("t", (0..100).map(|i| rec("same-key", &format!("v{i}"))).collect()).await.unwrap();
        assert!(positions.windows(2).all(|w| w[1].offset == w[0].offset + 1 && w[0].partition == w[1].partition));
    }
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    let all = log.read_all("t").await.unwrap();
    let values: Vec<String> = all.iter().map(|r| String::from_utf8(r.value.to_vec()).unwrap()).collect();
    assert_eq!(values, (0..100).map(|i| format!("v{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_on_open_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let part = {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
        log.append("t", (0..10).map(|i| rec("k", &format!("v{i}"))).collect()).await.unwrap()[0].partition
    };
    let seg = dir.path().join(format!("topics/t/{part}/{}", segment::file_name(0)));
    // Half a frame, as a crash mid-write leaves it.
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    drop(f);
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    assert_eq!(log.read_all("t").await.unwrap().len(), 10);
    let p = log.append("t", vec![rec("k", "after")]).await.unwrap();
    assert_eq!(p[0].offset, 10);
    let all = log.read_all("t").await.unwrap();
    assert_eq!(&all.last().unwrap().value[..], b"after");
}

/// Opens the log once more and closes it: the group journal's records are written back and
/// it starts a new epoch, so the records written so far are only in their segments — as
/// records synced long ago are, which is where damage found at open (bit rot) can be.
async fn settle_journal(dir: &std::path::Path, cfg: EmbeddedConfig) {
    let log = EmbeddedLog::open(cfg).await.unwrap();
    assert!(!log.read_all("t").await.unwrap().is_empty());
    assert!(dir.join("journal").is_dir());
}

/// Five small records (`value-0` … `value-4`, frames of 36 bytes: header 8, fixed body 20, key
/// 1, value 7) appended and settled into one partition's first segment: that partition, and
/// the segment's path.
async fn five_settled_records(dir: &std::path::Path) -> (u32, std::path::PathBuf) {
    let part = {
        let log = EmbeddedLog::open(config(dir, 1 << 20)).await.unwrap();
        log.append("t", (0..5).map(|i| rec("k", &format!("value-{i}"))).collect()).await.unwrap()[0].partition
    };
    settle_journal(dir, config(dir, 1 << 20)).await;
    (part, dir.join(format!("topics/t/{part}/{}", segment::file_name(0))))
}

#[tokio::test]
async fn a_corrupt_record_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (_, seg) = five_settled_records(dir.path()).await;
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff; // flip a byte inside the last record's value
    std::fs::write(&seg, bytes).unwrap();
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    let all = log.read_all("t").await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|r| r.value.starts_with(b"value-")));
}

/// A frame whose length is damaged after the segment was validated, so that it claims to run
/// past the segment's end, is stepped over like any damage: a read that waited for the rest of
/// it doubled its window for ever and never returned.
#[tokio::test]
async fn a_frame_whose_length_runs_past_the_end_does_not_hang_a_read() {
    let dir = tempfile::tempdir().unwrap();
    let (p, seg) = five_settled_records(dir.path()).await;
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    // The last of the five 36-byte frames starts at 144.
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 180);
    let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_at(&file, &1000u32.to_le_bytes(), 144).unwrap();
    let part = log.partition("t", p).unwrap().clone();
    // On a thread of its own, so that a read that never returns fails the test instead of
    // holding up the runtime's shutdown.
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(part.read_on(0, 10, 1 << 20, &mut None, Wait::Yes)));
    let (frames, _) = result.recv_timeout(Duration::from_secs(20)).expect("the read returned").unwrap();
    assert_eq!(frames.iter().map(|f| f.offset).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
}

/// A frame damaged while running, read through a window too small to show the next frame:
/// the read goes on at the next frame, not at the next indexed one (64 KiB on) or the end of
/// the segment, which skipped the valid records between.
#[tokio::test]
async fn damage_found_while_running_skips_only_the_damaged_frame() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    let value = "v".repeat(3000);
    let p = log.append("t", (0..5).map(|_| rec("k", &value)).collect()).await.unwrap()[0].partition;
    let seg = dir.path().join(format!("topics/t/{p}/{}", segment::file_name(0)));
    let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_at(&file, b"#", 1000).unwrap(); // inside record 0's value
    let part = log.partition("t", p).unwrap().clone();
    let (frames, next) = part.read_on(0, 1, 1 << 20, &mut None, Wait::Yes).unwrap();
    let got: Vec<u64> = frames.iter().map(|f| f.offset).collect();
    assert!(got == [1] || (got.is_empty() && next == 1), "read {got:?}, next {next}");
    let (frames, _) = part.read_on(1, 10, 1 << 20, &mut None, Wait::Yes).unwrap();
    assert_eq!(frames.iter().map(|f| f.offset).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn consumers_resume_from_their_committed_offset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
        log.append("t", (0..20).map(|i| rec("k", &i.to_string())).collect()).await.unwrap();
        let mut rs = readers(&log, "g", "t").await;
        let r = rs.iter_mut().find(|r| r.committer().end_offset() == 20).unwrap();
        let got = take(r, 20).await;
        assert_eq!(got.len(), 20);
        r.committer().commit(12);
        log.close().await.unwrap();
    }
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    let mut rs = readers(&log, "g", "t").await;
    let r = rs.iter_mut().find(|r| r.committer().end_offset() == 20).unwrap();
    let got = take(r, 8).await;
    assert_eq!(got[0].offset, 12);
    assert_eq!(&got[0].value[..], b"12");
}

#[tokio::test]
async fn consumed_segments_are_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(config(dir.path(), 2048)).await.unwrap();
    let value = "x".repeat(500);
    let part = log.append("t", vec![rec("k", &value)]).await.unwrap()[0].partition;
    for _ in 0..30 {
        log.append("t", vec![rec("k", &value)]).await.unwrap();
    }
    assert!(log.segment_count("t", part).unwrap() > 5);
    let mut rs = readers(&log, "g", "t").await;
    let r = &mut rs[part as usize];
    take(r, 31).await;
    r.committer().commit(31);
    log.flush().await.unwrap();
    assert_eq!(log.segment_count("t", part).unwrap(), 1);
    // What is left still reads, and the consumer goes on after new appends.
    log.append("t", vec![rec("k", "tail")]).await.unwrap();
    let got = take(r, 1).await;
    assert_eq!(&got[0].value[..], b"tail");
}

#[tokio::test]
async fn consumed_segments_larger_than_a_deletion_step_are_removed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(config(dir.path(), 20 << 20)).await.unwrap();
    let value = "x".repeat(1 << 20);
    let part = log.append("t", vec![rec("k", &value)]).await.unwrap()[0].partition;
    for _ in 0..44 {
        log.append("t", vec![rec("k", &value)]).await.unwrap();
    }
    let pdir = dir.path().join("topics/t").join(part.to_string());
    let files = || {
        let mut names: Vec<String> =
            std::fs::read_dir(&pdir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    assert_eq!(log.segment_count("t", part).unwrap(), 3);
    assert_eq!(files().len(), 3);
    let mut rs = readers(&log, "g", "t").await;
    let r = &mut rs[part as usize];
    take(r, 45).await;
    r.committer().commit(45);
    log.flush().await.unwrap();
    assert_eq!(log.segment_count("t", part).unwrap(), 1);
    // The reaper thread deletes them paced, after the flush: both 20 MiB segments go from
    // the disk, not left behind shrunk or renamed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while files().len() > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = files();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with(".log"), "{left:?}");
    log.append("t", vec![rec("k", "tail")]).await.unwrap();
    assert_eq!(&take(r, 1).await[0].value[..], b"tail");
}

#[tokio::test]
async fn a_segment_whose_deletion_was_interrupted_is_removed_at_open_and_nothing_else_moves() {
    let dir = tempfile::tempdir().unwrap();
    let part = {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
        let part = log.append("t", vec![rec("k", "kept")]).await.unwrap()[0].partition;
        log.close().await.unwrap();
        part
    };
    // What a process killed between two steps leaves: a shortened consumed segment, renamed.
    let pdir = dir.path().join("topics/t").join(part.to_string());
    let leftover = pdir.join("00000000000000000000.deleting");
    std::fs::write(&leftover, b"half a frame").unwrap();
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    assert!(!leftover.exists());
    assert_eq!(log.segment_count("t", part).unwrap(), 1);
    let mut rs = readers(&log, "g", "t").await;
    assert_eq!(&take(&mut rs[part as usize], 1).await[0].value[..], b"kept");
}

#[tokio::test]
async fn a_compacted_topic_keeps_the_newest_value_per_key() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
        for round in 0..20 {
            let recs = (0..5).map(|k| rec(&format!("k{k}"), &format!("r{round}"))).collect();
            log.append("c", recs).await.unwrap();
        }
        log.append("c", vec![rec("k0", "")]).await.unwrap(); // tombstone
    }
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    let all = log.read_all("c").await.unwrap();
    // k1..k4 with their last value, plus the final tombstone kept so offsets never go back.
    assert_eq!(all.len(), 5, "{all:?}");
    assert!(all[..4].iter().all(|r| &r.value[..] == b"r19"));
    assert_eq!(all.last().unwrap().offset, 100);
    let p = log.append("c", vec![rec("k9", "new")]).await.unwrap();
    assert_eq!(p[0].offset, 101);
}

#[tokio::test]
async fn concurrent_appends_are_group_committed_and_all_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(config(dir.path(), 1 << 16)).await.unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append("t", vec![rec(&format!("k{i}"), "v"); 10]).await.unwrap() })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap().len();
    }
    assert_eq!(total, 640);
    assert_eq!(log.read_all("t").await.unwrap().len(), 640);
}

fn config_with(dir: &std::path::Path, segment_bytes: u64, faults: Faults) -> EmbeddedConfig {
    EmbeddedConfig { faults, ..config(dir, segment_bytes) }
}

/// A config whose flusher only runs when the test calls `flush`.
fn quiet(dir: &std::path::Path, segment_bytes: u64) -> EmbeddedConfig {
    EmbeddedConfig { flush_interval: Duration::from_secs(3600), ..config(dir, segment_bytes) }
}

/// Every (key, value) of the compacted topic `c`, as read.
async fn latest(log: &EmbeddedLog) -> HashMap<String, String> {
    log.read_all("c")
        .await
        .unwrap()
        .into_iter()
        .map(|r| (String::from_utf8(r.key.to_vec()).unwrap(), String::from_utf8(r.value.to_vec()).unwrap()))
        .fold(HashMap::new(), |mut m, (k, v)| {
            if v.is_empty() {
                m.remove(&k);
            } else {
                m.insert(k, v);
            }
            m
        })
}

#[tokio::test]
async fn compaction_keeps_every_keys_newest_value_across_many_small_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected: HashMap<String, String> = HashMap::new();
    let end = {
        let log = EmbeddedLog::open(quiet(dir.path(), 4096)).await.unwrap();
        for round in 0..6 {
            for k in 0..150 {
                let (key, value) = (format!("key-{k}"), format!("round-{round}-{}", "x".repeat(k % 40)));
                log.append("c", vec![rec(&key, &value)]).await.unwrap();
                expected.insert(key, value);
            }
        }
        for k in (0..150).step_by(7) {
            log.append("c", vec![rec(&format!("key-{k}"), "")]).await.unwrap(); // tombstones
            expected.remove(&format!("key-{k}"));
        }
        // A late update of a key that was first written long ago.
        log.append("c", vec![rec("key-1", "late")]).await.unwrap();
        expected.insert("key-1".into(), "late".into());
        assert!(log.segment_count("c", 0).unwrap() > 10, "{} segments", log.segment_count("c", 0).unwrap());
        log.end_offset("c", 0).await.unwrap()
    };
    let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
    assert_eq!(latest(&log).await, expected, "compaction at open lost or revived records");
    assert_eq!(log.end_offset("c", 0).await.unwrap(), end, "the end offset never moves back");
    assert!(log.segment_count("c", 0).unwrap() <= 2);
    let p = log.append("c", vec![rec("key-new", "v")]).await.unwrap();
    assert_eq!(p[0].offset, end);
    // Reopened once more, nothing changes.
    drop(log);
    let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
    expected.insert("key-new".into(), "v".into());
    assert_eq!(latest(&log).await, expected);
}

#[tokio::test]
async fn sealed_segments_are_compacted_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(quiet(dir.path(), 4096)).await.unwrap();
    let mut expected = HashMap::new();
    for round in 0..20 {
        for k in 0..20 {
            let (key, value) = (format!("k{k}"), format!("r{round}-{}", "y".repeat(40)));
            log.append("c", vec![rec(&key, &value)]).await.unwrap();
            expected.insert(key, value);
        }
    }
    let before = log.segment_count("c", 0).unwrap();
    log.flush().await.unwrap();
    let after = log.segment_count("c", 0).unwrap();
    assert!(after < before / 2, "{before} segments became {after}");
    assert_eq!(latest(&log).await, expected);
    // A follower from the start still reads every key's newest value.
    let mut reader = log.follow("c", 0, 0).await.unwrap();
    let stored = log.read_all("c").await.unwrap().len();
    let followed: HashMap<String, String> = take(&mut reader, stored)
        .await
        .into_iter()
        .map(|r| (String::from_utf8(r.key.to_vec()).unwrap(), String::from_utf8(r.value.to_vec()).unwrap()))
        .collect();
    assert_eq!(followed, expected);
}

/// A catalog whose sealed segments compaction cannot shrink (every key written once) is not
/// read whole again at every flush (every 200 ms) until another segment is sealed.
#[tokio::test]
async fn a_catalog_compaction_cannot_shrink_is_not_read_again_at_every_flush() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let counted = reads.clone();
    let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| {
        if let Fault::Read(path) = fault {
            if path.components().any(|c| c.as_os_str() == "c") {
                counted.fetch_add(1, SeqCst);
            }
        }
        Ok(())
    }));
    let log = EmbeddedLog::open(EmbeddedConfig { faults, ..quiet(dir.path(), 2048) }).await.unwrap();
    for k in 0..200 {
        log.append("c", vec![rec(&format!("k{k}"), &"y".repeat(60))]).await.unwrap();
    }
    assert!(log.segment_count("c", 0).unwrap() > 5);
    log.flush().await.unwrap();
    let after_first = reads.load(SeqCst);
    assert!(after_first > 0, "the first flush looks");
    for _ in 0..3 {
        log.flush().await.unwrap();
    }
    assert_eq!(reads.load(SeqCst), after_first, "nothing read again while no segment was sealed");
    for k in 0..200 {
        log.append("c", vec![rec(&format!("k{k}"), "newer")]).await.unwrap();
    }
    log.flush().await.unwrap();
    assert!(reads.load(SeqCst) > after_first, "a segment sealed since: looked at again");
}

/// One step of the flush failing (here the catalog's compaction, which cannot read its
/// segments) does not keep the others from running: offsets are still saved and consumed
/// segments still reclaimed — on a full disk that is what frees space.
#[tokio::test]
async fn a_failing_compaction_does_not_stop_offsets_or_reclaim() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let broken = Arc::new(AtomicBool::new(false));
    let b = broken.clone();
    let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| match fault {
        Fault::Read(path) if b.load(SeqCst) && path.components().any(|c| c.as_os_str() == "c") => {
            Err(std::io::Error::other("injected EIO"))
        }
        _ => Ok(()),
    }));
    let part = {
        let log = EmbeddedLog::open(EmbeddedConfig { faults, ..quiet(dir.path(), 2048) }).await.unwrap();
        for round in 0..20 {
            for k in 0..20 {
                log.append("c", vec![rec(&format!("k{k}"), &format!("r{round}-{}", "y".repeat(40)))]).await.unwrap();
            }
        }
        let value = "x".repeat(500);
        let part = log.append("t", vec![rec("k", &value)]).await.unwrap()[0].partition;
        for _ in 0..30 {
            log.append("t", vec![rec("k", &value)]).await.unwrap();
        }
        let mut rs = readers(&log, "g", "t").await;
        take(&mut rs[part as usize], 31).await;
        rs[part as usize].committer().commit(31);
        broken.store(true, SeqCst);
        assert!(log.flush().await.is_err(), "the compaction's failure is reported");
        assert_eq!(log.segment_count("t", part).unwrap(), 1, "consumed segments reclaimed all the same");
        drop(rs);
        // Still failing at the close's own flush: the offsets were saved all the same.
        assert!(log.close().await.is_err());
        part
    };
    let log = EmbeddedLog::open(quiet(dir.path(), 2048)).await.unwrap();
    log.append("t", vec![rec("k", "tail")]).await.unwrap();
    let mut rs = readers(&log, "g", "t").await;
    let got = take(&mut rs[part as usize], 1).await;
    assert_eq!((got[0].offset, &got[0].value[..]), (31, &b"tail"[..]), "the group resumes where it committed");
}

/// A compaction at open that cannot write (a full disk) does not stop the log opening: the
/// catalog is read as it is, uncompacted. Herald could not start on a full disk, and only a
/// running Herald reclaims consumed segments — it stayed down until files were deleted by hand.
#[tokio::test]
async fn a_compaction_at_open_that_cannot_write_does_not_stop_the_log_opening() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected: HashMap<String, String> = HashMap::new();
    {
        let log = EmbeddedLog::open(quiet(dir.path(), 2048)).await.unwrap();
        for round in 0..10 {
            for k in 0..20 {
                let (key, value) = (format!("k{k}"), format!("r{round}-{}", "y".repeat(40)));
                log.append("c", vec![rec(&key, &value)]).await.unwrap();
                expected.insert(key, value);
            }
        }
        assert!(log.segment_count("c", 0).unwrap() > 1);
    }
    let faults: Faults = Some(Arc::new(|fault: Fault<'_>| match fault {
        Fault::Write(path) if path.extension().is_some_and(|e| e == "compact") => {
            Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
        }
        _ => Ok(()),
    }));
    let log =
        EmbeddedLog::open(EmbeddedConfig { faults, ..quiet(dir.path(), 2048) }).await.expect("opens on a full disk");
    assert_eq!(latest(&log).await, expected, "the catalog as it was");
    assert!(log.segment_count("c", 0).unwrap() > 1, "left uncompacted");
    let scratch = std::fs::read_dir(dir.path().join("topics/c/0")).unwrap().flatten();
    assert!(!scratch.into_iter().any(|e| e.path().extension().is_some_and(|x| x == "compact")), "no scratch file left");
    log.append("c", vec![rec("k0", "after")]).await.expect("writes go on");
}

/// The directories made at open are synced, bottom up, so their entries survive a power cut on
/// any file system (the partitions' own with their first file).
#[tokio::test]
async fn opening_makes_the_directories_it_made_durable() {
    let dir = tempfile::tempdir().unwrap();
    let synced = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = synced.clone();
    let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| {
        if let Fault::SyncDir(path) = fault {
            seen.lock().unwrap().push(path.to_path_buf());
        }
        Ok(())
    }));
    let log = EmbeddedLog::open(config_with(dir.path(), 1 << 20, faults)).await.unwrap();
    let synced = synced.lock().unwrap().clone();
    for d in
        [dir.path().join("topics/t"), dir.path().join("topics/c"), dir.path().join("topics"), dir.path().to_path_buf()]
    {
        assert!(synced.contains(&d), "{} not synced: {synced:?}", d.display());
    }
    log.close().await.unwrap();
}

/// Faults that fail writes or fsyncs on demand.
#[derive(Default)]
struct Switch {
    fail_writes_to_new_segments: std::sync::atomic::AtomicBool,
    disk_full: std::sync::atomic::AtomicBool,
    fail_syncs: std::sync::atomic::AtomicBool,
    fail_segment_syncs: std::sync::atomic::AtomicBool,
}

fn faults(switch: &Arc<Switch>) -> Faults {
    use std::sync::atomic::Ordering::SeqCst;
    let s = switch.clone();
    Some(Arc::new(move |fault: Fault<'_>| match fault {
        Fault::Write(_) if s.disk_full.load(SeqCst) => Err(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        Fault::Write(path) if s.fail_writes_to_new_segments.load(SeqCst) && !path.ends_with(segment::file_name(0)) => {
            Err(std::io::Error::other("injected EIO"))
        }
        Fault::Sync(..) if s.fail_syncs.load(SeqCst) => Err(std::io::Error::other("injected fsync failure")),
        Fault::Sync(path, _) if s.fail_segment_syncs.load(SeqCst) && path.extension().is_some_and(|e| e == "log") => {
            Err(std::io::Error::other("injected segment fsync failure"))
        }
        _ => Ok(()),
    }))
}

#[tokio::test]
async fn a_failed_write_right_after_a_roll_loses_no_acknowledged_record() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let switch = Arc::new(Switch::default());
    let value = "v".repeat(600);
    let mut acknowledged = Vec::new();
    {
        let log = EmbeddedLog::open(config_with(dir.path(), 4096, faults(&switch))).await.unwrap();
        for i in 0..6 {
            log.append("c", vec![rec("k", &format!("{i}-{value}"))]).await.unwrap();
            acknowledged.push(i);
        }
        // The next append rolls to a new segment, and that write fails.
        switch.fail_writes_to_new_segments.store(true, SeqCst);
        let failed = log.append("c", vec![rec("k", &format!("lost-{value}"))]).await;
        assert!(matches!(failed, Err(LogError::Io(_))), "{failed:?}");
        switch.fail_writes_to_new_segments.store(false, SeqCst);
        for i in 6..20 {
            log.append("c", vec![rec("k", &format!("{i}-{value}"))]).await.unwrap();
            acknowledged.push(i);
        }
        let read: Vec<String> =
            log.read_all("c").await.unwrap().iter().map(|r| String::from_utf8_lossy(&r.value).into()).collect();
        assert_eq!(read.len(), 20, "every acknowledged record reads back at once");
    }
    let log = EmbeddedLog::open(config_with(dir.path(), 1 << 20, None)).await.unwrap();
    let read = log.read_all("c").await.unwrap();
    let values: Vec<String> =
        read.iter().map(|r| String::from_utf8_lossy(&r.value).split('-').next().unwrap().to_string()).collect();
    // Compaction at open keeps the newest of key "k" only; the offsets never skipped one.
    assert_eq!(values, vec!["19".to_string()]);
    assert_eq!(read[0].offset, 19, "offsets stayed contiguous: the failed write took none");
}

#[tokio::test]
async fn a_failed_fsync_rolls_back_the_whole_group_and_appends_resume() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let switch = Arc::new(Switch::default());
    let log = EmbeddedLog::open(config_with(dir.path(), 1 << 20, faults(&switch))).await.unwrap();
    log.append("t", (0..10).map(|i| rec(&format!("k{i}"), "before")).collect()).await.unwrap();
    switch.fail_syncs.store(true, SeqCst);
    let failed = log.append("t", (0..10).map(|i| rec(&format!("k{i}"), "refused")).collect()).await;
    assert!(failed.is_err());
    switch.fail_syncs.store(false, SeqCst);
    log.append("t", (0..10).map(|i| rec(&format!("k{i}"), "after")).collect()).await.unwrap();
    let values: Vec<Vec<u8>> = log.read_all("t").await.unwrap().into_iter().map(|r| r.value.to_vec()).collect();
    assert_eq!(values.len(), 20);
    assert!(values.iter().all(|v| v == b"before" || v == b"after"), "nothing of the refused group remains");
    drop(log);
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    assert_eq!(log.read_all("t").await.unwrap().len(), 20);
}

/// A group touching many partitions is one journal entry: durable whole, or, when the
/// journal's sync fails, refused whole.
#[tokio::test]
async fn a_group_over_many_partitions_is_durable_whole_or_refused_whole() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let failing = fail.clone();
    let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| match fault {
        Fault::Sync(path, _) if failing.load(SeqCst) && path.extension().is_some_and(|e| e == "journal") => {
            Err(std::io::Error::other("injected fsync failure"))
        }
        _ => Ok(()),
    }));
    let partitions = 48;
    let cfg =
        EmbeddedConfig { topics: vec![spec("wide", partitions, false)], ..config_with(dir.path(), 1 << 20, faults) };
    let log = EmbeddedLog::open(cfg.clone()).await.unwrap();
    let batch = |tag: &str| (0..2000).map(|i| rec(&format!("k{i}"), tag)).collect::<Vec<_>>();
    let positions = log.append("wide", batch("first")).await.unwrap();
    let touched: std::collections::HashSet<u32> = positions.iter().map(|p| p.partition).collect();
    assert_eq!(touched.len(), partitions as usize, "the group touched every partition");
    fail.store(true, SeqCst);
    assert!(log.append("wide", batch("refused")).await.is_err(), "a failed journal sync refuses the group");
    fail.store(false, SeqCst);
    log.append("wide", batch("after")).await.unwrap();
    drop(log);
    let log = EmbeddedLog::open(cfg).await.unwrap();
    let values: Vec<Vec<u8>> = log.read_all("wide").await.unwrap().into_iter().map(|r| r.value.to_vec()).collect();
    assert_eq!(values.len(), 4000);
    assert!(values.iter().all(|v| v == b"first" || v == b"after"), "nothing of the refused group remains");
}

/// Every (partition, offset, value) of topic `t`, as read.
async fn contents(log: &EmbeddedLog) -> Vec<(u32, u64, String)> {
    let mut all: Vec<(u32, u64, String)> = log
        .read_all("t")
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.partition, r.offset, String::from_utf8(r.value.to_vec()).unwrap()))
        .collect();
    all.sort();
    all
}

/// The segment files of topic `t`'s partition `p`, oldest first.
fn segment_files(dir: &std::path::Path, p: u32) -> Vec<std::path::PathBuf> {
    segment_files_in(&dir.join("topics").join("t").join(p.to_string()))
}

/// Segments are not synced with each group, only the group journal is: what a power cut takes
/// from segment files that were never synced comes back from the journal at the next open.
/// Here partition 0 loses every file and partition 1 a zeroed stretch in each file and its
/// newest file's tail — and every acknowledged record reads back at its offset.
#[tokio::test]
async fn acknowledged_records_whose_segments_never_reached_the_disk_come_back_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let value = "v".repeat(300);
    let mut acknowledged = Vec::new();
    {
        let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
        for g in 0..60 {
            let batch: Vec<Record> =
                (0..5).map(|i| rec(&format!("k{}", g * 5 + i), &format!("{g}-{i}-{value}"))).collect();
            let values: Vec<String> = batch.iter().map(|r| String::from_utf8(r.value.to_vec()).unwrap()).collect();
            let positions = log.append("t", batch).await.unwrap();
            for (p, v) in positions.into_iter().zip(values) {
                acknowledged.push((p.partition, p.offset, v));
            }
        }
        acknowledged.sort();
        assert_eq!(contents(&log).await, acknowledged);
    }
    assert!(segment_files(dir.path(), 0).len() > 2 && segment_files(dir.path(), 1).len() > 2, "segments rolled");
    // The power cut: partition 0's files never reached the disk, partition 1's only in part.
    for file in segment_files(dir.path(), 0) {
        std::fs::remove_file(file).unwrap();
    }
    let files = segment_files(dir.path(), 1);
    for file in &files {
        let mut bytes = std::fs::read(file).unwrap();
        let (from, to) = (bytes.len() / 3, bytes.len() / 2);
        bytes[from..to].fill(0);
        std::fs::write(file, &bytes).unwrap();
    }
    let newest = files.last().unwrap();
    let len = std::fs::metadata(newest).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(newest).unwrap().set_len(len / 2).unwrap();

    let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
    assert_eq!(contents(&log).await, acknowledged, "every acknowledged record is back, at its offset");
    let next = log.append("t", vec![rec("k0", "after")]).await.unwrap();
    let end = acknowledged.iter().filter(|(p, _, _)| *p == next[0].partition).map(|(_, o, _)| o + 1).max().unwrap();
    assert_eq!(next[0].offset, end, "offsets go on from the restored end");
    drop(log);
    // Restored records are synced: opening again (the journal now starts a new epoch) changes nothing.
    let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
    assert_eq!(contents(&log).await.len(), acknowledged.len() + 1);
}

/// A power cut that keeps a segment file's name but none of its bytes (ext4's delayed
/// allocation) in the partition's first file: the open dropped it as an empty old segment
/// before the journal's restore, which then began at the next file and left the first one's
/// acknowledged records out — lost.
#[tokio::test]
async fn a_first_segment_a_power_cut_emptied_comes_back_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let acknowledged = {
        let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
        append_pairs(&log, 60, &"p".repeat(400)).await
    };
    for p in 0..2 {
        let files = segment_files(dir.path(), p);
        assert!(files.len() >= 3, "segments rolled");
        std::fs::OpenOptions::new().write(true).open(&files[0]).unwrap().set_len(0).unwrap();
    }
    let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
    assert_eq!(contents(&log).await, acknowledged, "every acknowledged record is back, at its offset");
    drop(log);
    let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
    assert_eq!(contents(&log).await, acknowledged, "and stays so at the next open");
}

/// Segment files and the length each had when a sync of it last started, noted by a fault
/// hook: what a power cut would leave of them. `fail_journal_sync` fails the journal's syncs.
struct PowerCut {
    /// Per file name: bytes a sync covered, and of which file (its inode).
    synced: Arc<std::sync::Mutex<HashMap<std::path::PathBuf, (u64, u64)>>>,
    fail_journal_sync: Arc<std::sync::atomic::AtomicBool>,
}

impl PowerCut {
    fn new() -> (PowerCut, Faults) {
        let cut = PowerCut { synced: Arc::default(), fail_journal_sync: Arc::default() };
        let (noted, failing) = (cut.synced.clone(), cut.fail_journal_sync.clone());
        let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| {
            if let Fault::Sync(path, file) = fault {
                if path.extension().is_some_and(|e| e == "log") {
                    use std::os::unix::fs::MetadataExt;
                    let meta = file.metadata().unwrap();
                    let mut noted = noted.lock().unwrap();
                    let at = noted.entry(path.to_path_buf()).or_default();
                    // A sync of another file than the one now behind the name covers nothing of it.
                    *at = if at.1 == meta.ino() { (at.0.max(meta.len()), at.1) } else { (meta.len(), meta.ino()) };
                } else if failing.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    return Err(std::io::Error::other("injected journal fsync failure"));
                }
            }
            Ok(())
        }));
        (cut, faults)
    }

    /// Cuts every segment file of `topic` back to what a sync covered, and removes those never
    /// synced; how many files it changed.
    fn strike(&self, dir: &std::path::Path, topic: &str) -> usize {
        let synced = self.synced.lock().unwrap().clone();
        let mut changed = 0;
        for part in std::fs::read_dir(dir.join("topics").join(topic)).unwrap() {
            for file in std::fs::read_dir(part.unwrap().path()).unwrap() {
                use std::os::unix::fs::MetadataExt;
                let file = file.unwrap().path();
                let meta = std::fs::metadata(&file).unwrap();
                let len = meta.len();
                match synced.get(&file).filter(|(_, ino)| *ino == meta.ino()) {
                    None => std::fs::remove_file(&file).unwrap(),
                    Some(&(durable, _)) if durable < len => {
                        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(durable).unwrap()
                    }
                    Some(_) => continue,
                }
                changed += 1;
            }
        }
        changed
    }
}

/// Appends `groups` groups of two records to topic `t` (keys `k{g}-{i}`, values `{g}-{i}-{pad}`),
/// one append each; every acknowledged (partition, offset, value), sorted.
async fn append_pairs(log: &EmbeddedLog, groups: usize, pad: &str) -> Vec<(u32, u64, String)> {
    let mut acknowledged = Vec::new();
    for g in 0..groups {
        let batch: Vec<Record> = (0..2).map(|i| rec(&format!("k{g}-{i}"), &format!("{g}-{i}-{pad}"))).collect();
        let values: Vec<String> = batch.iter().map(|r| String::from_utf8(r.value.to_vec()).unwrap()).collect();
        for (p, v) in log.append("t", batch).await.unwrap().into_iter().zip(values) {
            acknowledged.push((p.partition, p.offset, v));
        }
    }
    acknowledged.sort();
    acknowledged
}

/// With a small journal the writer turns between its two files many times, checkpointing
/// segments on the way. A power cut then takes from every segment file what no sync had
/// covered: every acknowledged record comes back, from the journal, at its offset.
#[tokio::test]
async fn a_power_cut_after_many_journal_turns_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let (cut, faults) = PowerCut::new();
    let cfg = EmbeddedConfig { journal_bytes: 16 << 10, ..config_with(dir.path(), 8192, faults) };
    let acknowledged = {
        let log = EmbeddedLog::open(cfg.clone()).await.unwrap();
        append_pairs(&log, 500, &"p".repeat(400)).await
    };
    assert!(cut.synced.lock().unwrap().len() > 4, "checkpoints synced segments");
    assert!(cut.strike(dir.path(), "t") > 0, "the power cut took something");
    let cfg = EmbeddedConfig { faults: None, ..cfg };
    let log = EmbeddedLog::open(cfg.clone()).await.unwrap();
    assert_eq!(contents(&log).await, acknowledged, "every acknowledged record is back, at its offset");
    drop(log);
    let log = EmbeddedLog::open(cfg).await.unwrap();
    assert_eq!(contents(&log).await, acknowledged, "and stays so");
}

/// The epoch's segment pages are handed to the disk as the journal fills, not all at the
/// checkpoint (whose one burst of writeback held up the group commits' syncs queued behind it):
/// here no turn comes (the journal's default size), yet every segment file written is
/// written back early, and not one is synced by it.
#[tokio::test]
async fn segment_files_are_written_back_as_the_journal_fills_before_any_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let written_back = Arc::new(std::sync::Mutex::new(std::collections::HashSet::<std::path::PathBuf>::new()));
    let segment_syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (seen, syncs) = (written_back.clone(), segment_syncs.clone());
    let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| {
        match fault {
            Fault::WriteBack(path) => {
                seen.lock().unwrap().insert(path.to_path_buf());
            }
            Fault::Sync(path, _) if path.extension().is_some_and(|e| e == "log") => {
                syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            _ => {}
        }
        Ok(())
    }));
    let log = EmbeddedLog::open(config_with(dir.path(), 64 << 20, faults)).await.unwrap();
    // About 3 MiB through the journal, over both partitions of `t`.
    let acknowledged = append_pairs(&log, 400, &"w".repeat(4000)).await;
    assert_eq!(acknowledged.len(), 800);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while written_back.lock().unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "segments written back: {:?}", written_back.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let files = written_back.lock().unwrap().clone();
    assert!(files.iter().all(|p| p.extension().is_some_and(|e| e == "log")), "{files:?}");
    assert_eq!(segment_syncs.load(std::sync::atomic::Ordering::SeqCst), 0, "no checkpoint came, so nothing was synced");
}

/// A clean close checkpoints everything: a power cut right after it finds every segment file
/// synced whole, and the next open writes nothing back (it used to rewrite up to both journal
/// files' worth at every start) — shown by an open that succeeds while writes to segments fail.
#[tokio::test]
async fn a_clean_close_leaves_nothing_for_the_next_open_to_write_back() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let (cut, power_cut) = PowerCut::new();
    let refuse_segment_writes = Arc::new(AtomicBool::new(false));
    let refusing = refuse_segment_writes.clone();
    let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| match fault {
        Fault::Write(path) if refusing.load(SeqCst) && path.extension().is_some_and(|e| e == "log") => {
            Err(std::io::Error::other("injected EIO"))
        }
        _ => power_cut.as_ref().unwrap()(fault),
    }));
    let cfg = EmbeddedConfig { journal_bytes: 16 << 10, ..config_with(dir.path(), 8192, faults) };
    let acknowledged = {
        let log = EmbeddedLog::open(cfg.clone()).await.unwrap();
        let acknowledged = append_pairs(&log, 100, &"q".repeat(400)).await;
        log.close().await.unwrap();
        acknowledged
    };
    assert_eq!(cut.strike(dir.path(), "t"), 0, "the close synced every segment file whole");
    refuse_segment_writes.store(true, SeqCst);
    let log = EmbeddedLog::open(cfg.clone()).await.expect("an open with nothing to write back");
    assert_eq!(contents(&log).await, acknowledged);
    refuse_segment_writes.store(false, SeqCst);
    let next = log.append("t", vec![rec("k0-0", "after")]).await.unwrap();
    let end = acknowledged.iter().filter(|(p, _, _)| *p == next[0].partition).map(|(_, o, _)| o + 1).max().unwrap();
    assert_eq!(next[0].offset, end, "appends go on after a clean close");
    // Dropped without a close (as a crash would leave it): the next open writes back again.
    drop(log);
    refuse_segment_writes.store(true, SeqCst);
    let written_back = EmbeddedLog::open(cfg).await.err().expect("the journal's last record is written back at open");
    assert!(written_back.to_string().contains("injected EIO"), "{written_back}");
}

/// A group refused after it rolled a new segment (its journal sync failed) removes that file;
/// the next roll creates a file of the same name, which the checkpoints must sync — not the
/// removed one noted under that name — or a power cut after two turns loses what it holds.
#[tokio::test]
async fn a_segment_created_again_after_a_refused_roll_is_checkpointed() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let (cut, faults) = PowerCut::new();
    let cfg = EmbeddedConfig {
        journal_bytes: 16 << 10,
        topics: vec![spec("t", 1, false)],
        ..config_with(dir.path(), 4096, faults)
    };
    let value = "r".repeat(600);
    let mut acknowledged = Vec::new();
    {
        let log = EmbeddedLog::open(cfg.clone()).await.unwrap();
        let mut refused = 0;
        for g in 0..300 {
            let before = log.segment_count("t", 0).unwrap();
            // Refuse the group that rolls the partition's second segment.
            if g == 6 {
                cut.fail_journal_sync.store(true, SeqCst);
            }
            match log.append("t", vec![rec(&format!("k{g}"), &format!("{g}-{value}"))]).await {
                Ok(p) => acknowledged.push((p[0].partition, p[0].offset, format!("{g}-{value}"))),
                Err(_) => {
                    refused += 1;
                    assert_eq!(log.segment_count("t", 0).unwrap(), before, "the refused group's segment is gone");
                }
            }
        }
        assert_eq!(refused, 1);
        acknowledged.sort();
    }
    cut.strike(dir.path(), "t");
    let log = EmbeddedLog::open(EmbeddedConfig { faults: None, ..cfg }).await.unwrap();
    let read = contents(&log).await;
    let missing: Vec<u64> = acknowledged.iter().filter(|r| !read.contains(r)).map(|r| r.1).collect();
    assert_eq!(missing, Vec::<u64>::new(), "acknowledged offsets lost");
    assert_eq!(read, acknowledged, "every acknowledged record is back, at its offset");
}

/// A checkpoint whose segment sync fails cannot be retried (a second `fdatasync` would report
/// success for pages that never reached the disk): at the writer's next turn the journal
/// refuses that group and every later one, even once syncs work again, and a restart brings
/// back every acknowledged record from the journal.
#[tokio::test]
async fn a_failed_checkpoint_refuses_appends_until_a_restart_restores_the_log() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let switch = Arc::new(Switch::default());
    let cfg = EmbeddedConfig { journal_bytes: 16 << 10, ..config_with(dir.path(), 8192, faults(&switch)) };
    let value = "w".repeat(500);
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    {
        let log = EmbeddedLog::open(cfg.clone()).await.unwrap();
        for g in 0..200 {
            if g == 100 {
                switch.fail_segment_syncs.store(true, SeqCst);
            }
            match log.append("t", vec![rec(&format!("k{g}"), &format!("{g}-{value}"))]).await {
                Ok(p) => acknowledged.push((p[0].partition, p[0].offset, format!("{g}-{value}"))),
                Err(_) => {
                    refused.push(g);
                    switch.fail_segment_syncs.store(false, SeqCst);
                }
            }
        }
        assert!(!refused.is_empty() && refused[0] >= 100, "refused from the failed checkpoint on: {refused:?}");
        assert_eq!(refused.len(), 200 - refused[0], "and every group after it");
        assert!(!log.ready().await, "the log reports itself not ready");
        assert!(log.broken().is_some(), "and broken: only a restart mends it");
        acknowledged.sort();
        assert_eq!(contents(&log).await, acknowledged);
    }
    let log = EmbeddedLog::open(cfg).await.unwrap();
    assert_eq!(contents(&log).await, acknowledged, "restored: every acknowledged record once, at its offset");
    assert!(log.ready().await && log.broken().is_none());
    log.append("t", vec![rec("k", "after")]).await.unwrap();
}

#[tokio::test]
async fn a_full_disk_refuses_appends_and_they_resume_with_space() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let switch = Arc::new(Switch::default());
    let log = EmbeddedLog::open(config_with(dir.path(), 1 << 20, faults(&switch))).await.unwrap();
    log.append("t", vec![rec("k", "one")]).await.unwrap();
    switch.disk_full.store(true, SeqCst);
    match log.append("t", vec![rec("k", "two")]).await {
        Err(LogError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::StorageFull),
        other => panic!("a full disk expected, got {other:?}"),
    }
    // Reads go on meanwhile.
    assert_eq!(log.read_all("t").await.unwrap().len(), 1);
    switch.disk_full.store(false, SeqCst);
    log.append("t", vec![rec("k", "three")]).await.unwrap();
    let values: Vec<Vec<u8>> = log.read_all("t").await.unwrap().into_iter().map(|r| r.value.to_vec()).collect();
    assert_eq!(values, vec![b"one".to_vec(), b"three".to_vec()]);
}

#[tokio::test]
async fn a_record_larger_than_a_frame_is_refused_and_nothing_breaks() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
        log.append("t", vec![rec("k", "small")]).await.unwrap();
        let huge = Record { key: Bytes::from_static(b"k"), value: Bytes::from(vec![b'x'; segment::MAX_FRAME]) };
        assert!(matches!(log.append("t", vec![huge]).await, Err(LogError::TooLarge { .. })));
        log.append("t", vec![rec("k", "after")]).await.unwrap();
    }
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    let values: Vec<Vec<u8>> = log.read_all("t").await.unwrap().into_iter().map(|r| r.value.to_vec()).collect();
    assert_eq!(values, vec![b"small".to_vec(), b"after".to_vec()]);
}

#[tokio::test]
async fn damage_in_the_middle_of_a_sealed_segment_keeps_the_records_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let part = {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 14)).await.unwrap();
        let positions = log
            .append("t", (0..60).map(|i| rec("same", &format!("value-{i:03}-{}", "z".repeat(600)))).collect())
            .await
            .unwrap();
        for i in 60..80 {
            log.append("t", vec![rec("same", &format!("value-{i:03}-{}", "z".repeat(600)))]).await.unwrap();
        }
        positions[0].partition
    };
    settle_journal(dir.path(), config(dir.path(), 1 << 14)).await;
    let seg = dir.path().join(format!("topics/t/{part}/{}", segment::file_name(0)));
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    let log = EmbeddedLog::open(config(dir.path(), 1 << 14)).await.unwrap();
    let offsets: Vec<u64> = log.read_all("t").await.unwrap().iter().map(|r| r.offset).collect();
    assert_eq!(offsets.len(), 79, "only the damaged record is lost: {offsets:?}");
    assert_eq!(offsets.last(), Some(&79));
}

#[tokio::test]
async fn dead_letters_past_their_retention_are_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = quiet(dir.path(), 4096);
    cfg.topics.push(TopicSpec { retention: Some(Duration::from_millis(1)), ..spec("d", 1, false) });
    let log = EmbeddedLog::open(cfg).await.unwrap();
    for i in 0..40 {
        log.append("d", vec![rec("k", &format!("{i}-{}", "d".repeat(500)))]).await.unwrap();
    }
    assert!(log.segment_count("d", 0).unwrap() > 5);
    tokio::time::sleep(Duration::from_millis(5)).await; // let the records age past 1 ms
    log.flush().await.unwrap();
    assert_eq!(log.segment_count("d", 0).unwrap(), 1, "only the active segment remains");
}

/// A wall clock stepped forward past the dead letters' retention does not reclaim them all at
/// the next flush (a VM booted with a bad clock before NTP): reclaiming goes by the time
/// counted since the log opened, with an hour's slack.
#[tokio::test]
async fn a_clock_stepped_forward_does_not_reclaim_every_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = quiet(dir.path(), 4096);
    cfg.topics.push(TopicSpec { retention: Some(Duration::from_secs(14 * 86_400)), ..spec("d", 1, false) });
    let log = EmbeddedLog::open(cfg).await.unwrap();
    for i in 0..40 {
        log.append("d", vec![rec("k", &format!("{i}-{}", "d".repeat(500)))]).await.unwrap();
    }
    let segments = log.segment_count("d", 0).unwrap();
    assert!(segments > 5);
    log.flush_at(now_ms() + 30 * 86_400_000).await.unwrap();
    assert_eq!(log.segment_count("d", 0).unwrap(), segments, "every dead letter kept");
}

#[tokio::test]
async fn lowering_the_partition_count_keeps_every_partition_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
        log.append("t", (0..50).map(|i| rec(&format!("key-{i}"), "v")).collect()).await.unwrap();
    }
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.topics[0].partitions = 1;
    let log = EmbeddedLog::open(cfg).await.unwrap();
    assert_eq!(log.partitions("t").unwrap(), 2);
    assert_eq!(log.read_all("t").await.unwrap().len(), 50);
}

#[tokio::test]
async fn raising_the_partition_count_keeps_a_keyed_topic_s_partitions() {
    // Ordered deliveries and their keys' markers must stay in the partition whose sequencer
    // holds the key: with more partitions, a key's new deliveries and markers hashed elsewhere
    // and overtook (or never settled) what waited in the old one.
    let dir = tempfile::tempdir().unwrap();
    let keyed = |partitions| TopicSpec { keyed: true, ..spec("o", partitions, false) };
    {
        let mut cfg = config(dir.path(), 1 << 20);
        cfg.topics.push(keyed(2));
        let log = EmbeddedLog::open(cfg).await.unwrap();
        log.append("o", (0..50).map(|i| rec(&format!("key-{i}"), "v")).collect()).await.unwrap();
    }
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.topics[0].partitions = 8;
    cfg.topics.push(keyed(8));
    let log = EmbeddedLog::open(cfg).await.unwrap();
    assert_eq!(log.partitions("o").unwrap(), 2, "a keyed topic keeps the partitions it has");
    assert_eq!(log.partitions("t").unwrap(), 8, "others spread new records over more");
    let fresh = tempfile::tempdir().unwrap();
    let mut cfg = config(fresh.path(), 1 << 20);
    cfg.topics.push(keyed(8));
    assert_eq!(EmbeddedLog::open(cfg).await.unwrap().partitions("o").unwrap(), 8, "a new one gets the configured");
}

/// Readers read on from where their last read stopped, with windows sized from the last
/// batch's frames: records of sizes far from that estimate, small reads, segments rolling and
/// a compaction replacing the file under a reader must still hand out every record, in order.
#[tokio::test]
async fn small_reads_of_records_of_any_size_hand_out_every_record_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(quiet(dir.path(), 64 * 1024)).await.unwrap();
    let size = |i: usize| [3, 9000, 40, 1, 70_000, 500][i % 6];
    let value = |i: usize| format!("{i:06}-{}", "z".repeat(size(i)));
    let partition = log.append("t", vec![rec("k", &value(0))]).await.unwrap()[0].partition;
    let mut reader = log.follow("t", partition, 0).await.unwrap();
    let mut got = Vec::new();
    let mut sent = 1;
    for round in 0..30 {
        // One record an append, so the estimate the next read uses is the last record's size.
        for i in sent..sent + 7 {
            log.append("t", vec![rec("k", &value(i))]).await.unwrap();
        }
        sent += 7;
        while got.len() < sent {
            got.extend(some(&mut reader, (round % 4) + 1).await);
        }
    }
    let values: Vec<String> = got.iter().map(|r| String::from_utf8(r.value.to_vec()).unwrap()).collect();
    assert_eq!(values, (0..sent).map(value).collect::<Vec<_>>());
    assert!(log.segment_count("t", partition).unwrap() > 3, "the reads crossed segments");

    // A compacted topic: a follower between reads when its segment is compacted away.
    let mut follower = log.follow("c", 0, 0).await.unwrap();
    for round in 0..20 {
        let batch = (0..10).map(|k| rec(&format!("k{k}"), &format!("r{round}-{}", "y".repeat(300)))).collect();
        log.append("c", batch).await.unwrap();
    }
    let first = take(&mut follower, 3).await;
    log.flush().await.unwrap(); // compacts the sealed segments
    let stored = log.read_all("c").await.unwrap();
    let rest_from = first.last().unwrap().offset + 1;
    let mut rest = Vec::new();
    let want = stored.iter().filter(|r| r.offset >= rest_from).count();
    while rest.len() < want {
        rest.extend(some(&mut follower, 2).await);
    }
    let offsets: Vec<u64> = rest.iter().map(|r| r.offset).collect();
    let expected: Vec<u64> = stored.iter().map(|r| r.offset).filter(|o| *o >= rest_from).collect();
    assert_eq!(offsets, expected, "after the compaction the follower reads what the partition holds, in order");
}

/// The files under `dir`.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Drops every file under `dir` from the page cache (they are synced, so the kernel can).
/// Pages just written can sit in another CPU's page batch, where the kernel does not drop
/// them yet: asked again until a read that may not wait finds none of the files' first pages.
fn evict_from_page_cache(dir: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut any = false;
        for path in files_under(dir) {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: an advisory call on a descriptor held open here.
            assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
            any |= file.metadata().unwrap().len() > 0 && partition::read_exact_at(&file, 0, 1, Wait::No).is_ok();
        }
        if !any {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the log's files stay in the page cache");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// After a restart a partition's estimate of a frame's size is the default, here too small,
/// so a read's first window falls a frame or two short: the next window must be sized for
/// what is still wanted, not the largest there is (256 KiB read for one more frame made a
/// backlog drain copy ~20 times what it handed out).
#[tokio::test]
async fn reads_after_a_restart_copy_about_what_they_hand_out() {
    let dir = tempfile::tempdir().unwrap();
    let value = |i: usize| format!("{i:06}-{}", "x".repeat(1150));
    let partition = {
        let log = EmbeddedLog::open(quiet(dir.path(), 4 << 20)).await.unwrap();
        let partition = log.append("t", vec![rec("k", &value(0))]).await.unwrap()[0].partition;
        for chunk in 0..4 {
            log.append("t", (chunk * 100 + 1..=chunk * 100 + 100).map(|i| rec("k", &value(i))).collect())
                .await
                .unwrap();
        }
        log.close().await.unwrap();
        partition
    };
    let log = EmbeddedLog::open(quiet(dir.path(), 4 << 20)).await.unwrap();
    let part = log.partition("t", partition).unwrap().clone();
    let (mut hint, mut from, mut handed) = (None, 0, 0u64);
    while from < 401 {
        let (frames, next) = part.read_on(from, 4, 1 << 20, &mut hint, Wait::Yes).unwrap();
        assert_eq!(frames.first().map(|f| f.offset), Some(from));
        handed += frames.iter().map(|f| f.value.len() as u64).sum::<u64>();
        from = next;
    }
    let read = part.read_bytes();
    assert!(read < handed * 2, "read {read} bytes from the segment to hand out {handed}");
}

/// Readers read what the page cache holds on the runtime's own thread and only go to a
/// blocking thread for what must come from the disk: a log evicted from the cache is still
/// read whole, in order, and a read that may not wait says so and keeps where it was.
#[tokio::test]
async fn records_no_longer_in_the_page_cache_are_read_from_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(quiet(dir.path(), 256 * 1024)).await.unwrap();
    let value = |i: usize| format!("{i:06}-{}", "x".repeat(1000));
    let partition = log.append("t", vec![rec("k", &value(0))]).await.unwrap()[0].partition;
    for chunk in 0..10 {
        log.append("t", (chunk * 100 + 1..=chunk * 100 + 100).map(|i| rec("k", &value(i))).collect()).await.unwrap();
    }
    let mut reader = log.follow("t", partition, 0).await.unwrap();
    let mut got = some(&mut reader, 50).await;
    evict_from_page_cache(dir.path());

    // Straight at the partition: not cached, so a read that may not wait refuses, and the
    // reader's place (its hint) survives the refusal; waiting, it reads; then it is cached.
    let part = log.partition("t", partition).unwrap().clone();
    let mut hint = None;
    part.read_on(0, 10, 1 << 20, &mut hint, Wait::Yes).unwrap();
    assert!(hint.is_some(), "a read that stopped leaves a hint");
    evict_from_page_cache(dir.path());
    let refused = part.read_on(10, 10, 1 << 20, &mut hint, Wait::No).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::WouldBlock);
    assert!(hint.is_some(), "the hint is kept");
    let (frames, _) = part.read_on(10, 10, 1 << 20, &mut hint, Wait::Yes).unwrap();
    assert_eq!(frames.iter().map(|f| f.offset).collect::<Vec<_>>(), (10..20).collect::<Vec<_>>());
    let (again, _) = part.read_on(10, 10, 1 << 20, &mut None, Wait::No).unwrap();
    assert_eq!(again.len(), 10, "what was just read is cached, and read without waiting");

    // The reader itself: everything after where it stopped, in order, from a cold log.
    evict_from_page_cache(dir.path());
    got.extend(take(&mut reader, 1001 - got.len()).await);
    let values: Vec<String> = got.iter().map(|r| String::from_utf8(r.value.to_vec()).unwrap()).collect();
    assert_eq!(values, (0..=1000).map(value).collect::<Vec<_>>());
}

/// A crash while a group is being written leaves that group's frames in the segment past the
/// journal's last record; a power cut may at the same time have kept them from the disk while
/// losing an earlier, acknowledged stretch (writeback goes in any order). The journal holds
/// every acknowledged record since its checkpoint, so what lies past its last one was never
/// acknowledged: the partition is restored from the journal, not left as it is.
#[tokio::test]
async fn a_damaged_stretch_behind_a_group_in_flight_is_restored_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EmbeddedConfig { topics: vec![spec("t", 1, false)], ..config_with(dir.path(), 64 << 20, None) };
    let mut acknowledged = Vec::new();
    {
        let log = EmbeddedLog::open(cfg.clone()).await.unwrap();
        for g in 0..40 {
            let value = format!("{g}-{}", "p".repeat(200));
            let p = log.append("t", vec![rec(&format!("k{g}"), &value)]).await.unwrap();
            acknowledged.push((p[0].partition, p[0].offset, value));
        }
    }
    let file = segment_files(dir.path(), 0).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n / 3..n / 2].fill(0);
    let mut in_flight = BytesMut::new();
    segment::encode(&mut in_flight, 40, crate::model::now_ms(), b"k", b"in-flight");
    bytes.extend_from_slice(&in_flight);
    std::fs::write(&file, bytes).unwrap();
    let log = EmbeddedLog::open(cfg).await.unwrap();
    assert_eq!(contents(&log).await, acknowledged, "every acknowledged record is back; the group in flight is not");
}

/// A segment reclaimed by retention between a read's planning and its opening of the file: the
/// read goes on from the partition's new start, not reporting the partition's end (the
/// dead-letter list and replay read this way, and stopped early, missing live entries).
#[tokio::test]
async fn a_segment_reclaimed_under_a_read_does_not_end_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let part: Arc<std::sync::OnceLock<PartitionRef>> = Arc::default();
    let (hook_part, struck) = (part.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| {
        if let (Fault::Read(path), Some(p)) = (fault, hook_part.get()) {
            let first = path.file_name().is_some_and(|n| n == segment::file_name(0).as_str());
            if first && !struck.swap(true, std::sync::atomic::Ordering::SeqCst) {
                p.reclaim_older(i64::MAX, None).unwrap();
            }
        }
        Ok(())
    }));
    let mut cfg = EmbeddedConfig { faults, ..quiet(dir.path(), 4096) };
    cfg.topics.push(TopicSpec { retention: Some(Duration::from_secs(3600)), ..spec("d", 1, false) });
    let log = EmbeddedLog::open(cfg).await.unwrap();
    for i in 0..40 {
        log.append("d", vec![rec("k", &format!("{i}-{}", "d".repeat(500)))]).await.unwrap();
    }
    assert!(log.segment_count("d", 0).unwrap() > 5);
    part.set(log.topic("d").unwrap()[0].clone()).ok().unwrap();
    let (records, _) = log.read_partition("d", 0, 0, 100).await.unwrap();
    assert!(!records.is_empty(), "the read went on from the new start");
    assert_eq!(records.last().map(|r| r.offset), Some(39));
}

/// A group refused after it started a new segment removes that file; if the removal failed
/// (EIO), the next group starting that segment must not append after the refused frames —
/// the segment's length and index count from its start, so readers would be served the
/// refused records at the acknowledged offsets.
#[tokio::test]
async fn a_new_segment_starts_empty_even_where_a_refused_one_was_left() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let (cut, faults) = PowerCut::new();
    let cfg = EmbeddedConfig { topics: vec![spec("t", 1, false)], ..config_with(dir.path(), 4096, faults) };
    let log = EmbeddedLog::open(cfg).await.unwrap();
    let value = "r".repeat(600);
    // Six records fill the first segment; the seventh group rolls the second, and is refused.
    for g in 0..6u64 {
        log.append("t", vec![rec(&format!("k{g}"), &format!("{g}-{value}"))]).await.unwrap();
    }
    let g = 6u64;
    let before = log.segment_count("t", 0).unwrap();
    cut.fail_journal_sync.store(true, SeqCst);
    assert!(log.append("t", vec![rec("k6", &format!("6-{value}"))]).await.is_err());
    assert_eq!(log.segment_count("t", 0).unwrap(), before, "the refused roll's segment is gone");
    // The refused group would have started segment `g` (one record a group, from offset 0).
    let stale = dir.path().join("topics").join("t").join("0").join(segment::file_name(g));
    if !stale.exists() {
        let mut frame = BytesMut::new();
        segment::encode(&mut frame, g, crate::model::now_ms(), b"k", b"stale");
        std::fs::write(&stale, &frame).unwrap();
    }
    let acked = format!("acked-{value}");
    let p = log.append("t", vec![rec("k", &acked)]).await.unwrap();
    assert_eq!(p[0].offset, g);
    let (read, _) = log.read_partition("t", 0, g, 1).await.unwrap();
    assert_eq!(read.first().map(|r| String::from_utf8_lossy(&r.value).into_owned()), Some(acked));
}

/// A group a crash (SIGKILL) cut off after its records reached the segment file but before
/// its journal entry: those records were never acknowledged, yet the next open serves them.
/// Served, they are made durable before anything can commit past them: left in the page cache
/// only, a consumer group committed past them, a power cut took them, and the partition's
/// next acknowledged appends got their offsets again — below the committed offset, never
/// delivered.
#[tokio::test]
async fn records_a_crash_left_unjournaled_are_made_durable_before_they_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (cut, faults) = PowerCut::new();
    let cfg = config_with(dir.path(), 1 << 20, faults);
    let (p, end) = {
        let log = EmbeddedLog::open(cfg.clone()).await.unwrap();
        let at = log.append("t", vec![rec("k", "one"), rec("k", "two"), rec("k", "three")]).await.unwrap();
        log.close().await.unwrap();
        (at[0].partition, at.iter().filter(|a| a.partition == at[0].partition).map(|a| a.offset + 1).max().unwrap())
    };
    // What the killed writer left: one more frame in the partition's file, no journal entry.
    let newest = segment_files(dir.path(), p).pop().unwrap();
    let mut frame = BytesMut::new();
    segment::encode(&mut frame, end, now_ms(), b"k", b"never acknowledged");
    std::fs::OpenOptions::new().append(true).open(&newest).unwrap().write_all(&frame).unwrap();
    {
        let log = EmbeddedLog::open(cfg.clone()).await.unwrap();
        let mut rs = readers(&log, "g", "t").await;
        let got = take(&mut rs[p as usize], end as usize + 1).await;
        assert_eq!(got.last().unwrap().value, Bytes::from_static(b"never acknowledged"), "served after the crash");
        rs[p as usize].committer().commit(end + 1);
        log.flush().await.unwrap();
    }
    cut.strike(dir.path(), "t"); // the power cut: what no sync covered is gone
    let log = EmbeddedLog::open(EmbeddedConfig { faults: None, ..cfg }).await.unwrap();
    let acked = log.append("t", vec![rec("k", "acked")]).await.unwrap();
    assert_eq!(acked[0].partition, p);
    let mut rs = readers(&log, "g", "t").await;
    let next = tokio::time::timeout(Duration::from_secs(2), rs[p as usize].next_batch(10)).await;
    let next = next.expect("the acknowledged record is read, not waited past").unwrap();
    assert_eq!(next[0].value, Bytes::from_static(b"acked"));
}

/// A committed offset past a partition's end (its records lost to something the log could not
/// guard against: a file removed by hand, a disk that lied about a sync) is read from the end:
/// a reader waiting at the committed offset skipped every record appended below it.
#[tokio::test]
async fn a_committed_offset_past_the_end_is_read_from_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
        let at = log.append("t", vec![rec("k", "one")]).await.unwrap();
        let rs = readers(&log, "g", "t").await;
        rs[at[0].partition as usize].committer().commit(100);
        log.close().await.unwrap();
        at[0].partition
    };
    let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
    let mut rs = readers(&log, "g", "t").await;
    let acked = log.append("t", vec![rec("k", "acked")]).await.unwrap();
    assert_eq!((acked[0].partition, acked[0].offset), (p, 1));
    let next = tokio::time::timeout(Duration::from_secs(2), rs[p as usize].next_batch(1)).await;
    let next = next.expect("the record appended below the committed offset is read").unwrap();
    assert_eq!(next.iter().map(|r| r.value.clone()).collect::<Vec<_>>(), [Bytes::from_static(b"acked")]);
    // The commit is where the reader is, not the lost one: the records past it are kept
    // (reclaim goes by the lowest commit) and read after a restart.
    let pad = "p".repeat(200);
    for i in 0..40 {
        log.append("t", vec![rec("k", &format!("{i}-{pad}"))]).await.unwrap();
    }
    rs[p as usize].committer().commit(2);
    let segments = log.segment_count("t", p).unwrap();
    assert!(segments > 2, "{segments} segments");
    log.flush().await.unwrap();
    assert_eq!(log.segment_count("t", p).unwrap(), segments, "records not read yet were reclaimed");
    drop(rs);
    log.close().await.unwrap();
    let log = EmbeddedLog::open(config(dir.path(), 4096)).await.unwrap();
    let mut rs = readers(&log, "g", "t").await;
    assert_eq!(some(&mut rs[p as usize], 1).await[0].offset, 2, "read again from the commit");
}

/// A compacted topic's share (a catalog change) is synced on its own before the group's
/// journal entry; when that entry then fails, the share is rolled back — and the rollback is
/// made durable too: left in the page cache, a power cut brought back a change whose writer was
/// told it failed (a subscription's creation answered 5xx and retried became two).
#[test]
fn a_compacted_share_rolled_back_after_its_sync_stays_rolled_back_after_a_power_cut() {
    // A journaled share alike: its bytes may reach the disk by the OS's own writeback, and the
    // journal may hold nothing of its partition to cut them at the next open.
    for journaled in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        // What each sync of the segment made durable: the file's bytes as they were then.
        let durable: Arc<std::sync::Mutex<Option<Vec<u8>>>> = Arc::default();
        let image = durable.clone();
        let faults: Faults = Some(Arc::new(move |fault: Fault<'_>| {
            if let Fault::Sync(path, _) = fault {
                if path.extension().is_some_and(|e| e == "log") {
                    *image.lock().unwrap() = Some(std::fs::read(path).unwrap());
                }
            }
            Ok(())
        }));
        let at = dir.path().join("catalog");
        let part = Partition::open(0, "catalog", journaled, at.clone(), 1 << 20, faults.clone()).unwrap();
        let mut buf = BytesMut::new();
        let first = part.stage(&[(b"k".as_slice(), b"kept".as_slice())], now_ms(), &mut buf).unwrap();
        part.sync(&first).unwrap();
        part.publish(first);
        let refused = part.stage(&[(b"k".as_slice(), b"refused".as_slice())], now_ms(), &mut buf).unwrap();
        part.sync(&refused).unwrap(); // on disk, then the group's journal entry failed
        part.rollback(refused);
        let path = segment_files_in(&at).pop().unwrap();
        drop(part);
        // The power cut: the segment is what its last sync made durable.
        std::fs::write(&path, durable.lock().unwrap().as_ref().unwrap()).unwrap();
        let part = Partition::open(0, "catalog", journaled, at, 1 << 20, None).unwrap();
        assert_eq!(part.end_offset(), 1, "the refused append came back (journaled: {journaled})");
    }
}

/// The segment files in a partition's directory, oldest first.
fn segment_files_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}
