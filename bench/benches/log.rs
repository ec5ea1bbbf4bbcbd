//! Embedded-log throughput: durable (fsynced) appends of 1 KB records, alone and group
//! committed from many concurrent callers, and sequential reads.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald::log::embedded::{EmbeddedConfig, EmbeddedLog};
use herald::log::{Log, Record, TopicSpec};
use std::sync::Arc;
use std::time::Duration;

fn open(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Arc<EmbeddedLog> {
    rt.block_on(EmbeddedLog::open(EmbeddedConfig {
        dir: dir.to_path_buf(),
        segment_bytes: 64 << 20,
        flush_interval: Duration::from_millis(200),
        topics: vec![TopicSpec {
            name: "t".into(),
            partitions: 8,
            compacted: false,
            retention: None,
            retention_waits_for_reader: false,
            read_within: std::time::Duration::from_millis(50),
            keyed: false,
        }],
        journal_bytes: herald::log::embedded::DEFAULT_JOURNAL_BYTES,
        faults: None,
    }))
    .unwrap()
}

fn records(n: usize, value: &Bytes) -> Vec<Record> {
    (0..n).map(|i| Record { key: Bytes::from(format!("sub_{}", i % 64)), value: value.clone() }).collect()
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = open(&rt, dir.path());
    let value = Bytes::from(vec![b'x'; 1024]);
    let mut group = c.benchmark_group("log_append_1k");
    group.sample_size(20);

    group.throughput(Throughput::Elements(1));
    group.bench_function("one_record_per_append", |b| {
        b.to_async(&rt).iter(|| async { log.append("t", records(1, &value)).await.unwrap() })
    });

    group.throughput(Throughput::Elements(100));
    group.bench_function("batch_of_100", |b| {
        b.to_async(&rt).iter(|| async { log.append("t", records(100, &value)).await.unwrap() })
    });

    // 64 callers appending one record each at once: group commit turns them into few fsyncs.
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_concurrent_single_appends", |b| {
        b.to_async(&rt).iter(|| async {
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let log = log.clone();
                    let value = value.clone();
                    tokio::spawn(async move { log.append("t", records(1, &value)).await.unwrap() })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        })
    });
    group.finish();

    let mut group = c.benchmark_group("log_read_1k");
    group.sample_size(10);
    rt.block_on(async {
        for _ in 0..100 {
            log.append("t", records(100, &value)).await.unwrap();
        }
    });
    let total = rt.block_on(log.read_all("t")).unwrap().len();
    group.throughput(Throughput::Elements(total as u64));
    group.bench_function("read_all", |b| b.to_async(&rt).iter(|| async { log.read_all("t").await.unwrap().len() }));
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
