use super::*;
use bytes::Bytes;
use std::io::Write;

fn spec(name: &str, partitions: u32, compacted: bool) -> TopicSpec {
    TopicSpec { name: name.into(), partitions, compacted }
}

fn config(dir: &std::path::Path, segment_bytes: u64) -> EmbeddedConfig {
    EmbeddedConfig {
        dir: dir.to_path_buf(),
        segment_bytes,
        flush_interval: Duration::from_millis(20),
        topics: vec![spec("t", 2, false), spec("c", 1, true)],
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

#[tokio::test]
async fn a_corrupt_record_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let part = {
        let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
        log.append("t", (0..5).map(|i| rec("k", &format!("value-{i}"))).collect()).await.unwrap()[0].partition
    };
    let seg = dir.path().join(format!("topics/t/{part}/{}", segment::file_name(0)));
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff; // flip a byte inside the last record's value
    std::fs::write(&seg, bytes).unwrap();
    let log = EmbeddedLog::open(config(dir.path(), 1 << 20)).await.unwrap();
    let all = log.read_all("t").await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|r| r.value.starts_with(b"value-")));
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
