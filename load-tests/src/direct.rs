//! Ingest straight into the log, bypassing the HTTP API: the generator does the fan-out
//! itself and appends delivery records to the deliveries topic, on Kafka (while Herald runs)
//! or into a stopped Herald's embedded data directory (to build a backlog).

use bytes::Bytes;
use herald::log::embedded::{EmbeddedConfig, EmbeddedLog};
use herald::log::kafka::{KafkaConfig, KafkaLog};
use herald::log::{Log, Record};
use herald::model::Delivery;
use herald::topics::Topics;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where to append.
#[derive(Debug, Clone)]
pub enum Target {
    /// Kafka bootstrap brokers.
    Kafka(String),
    /// A stopped Herald's data directory.
    Embedded(std::path::PathBuf),
}

/// Opens the log Herald uses at `target`, with its topic layout.
pub async fn open(target: &Target, prefix: &str, partitions: u32) -> anyhow::Result<(Arc<dyn Log>, Topics)> {
    let topics = Topics::new(prefix);
    let layout = herald::config::LogConfig { partitions, ..Default::default() };
    let specs = topics.specs(&layout, &Default::default());
    let log: Arc<dyn Log> = match target {
        Target::Kafka(brokers) => {
            KafkaLog::open(KafkaConfig {
                brokers: brokers.clone(),
                replication: -1,
                properties: Default::default(),
                topics: specs,
                drain: Duration::from_secs(1),
                retention: layout.retention.0,
                min_insync_replicas: layout.min_insync_replicas,
                max_record_bytes: herald::config::IngestConfig::default().max_record_bytes(),
            })
            .await?
        }
        Target::Embedded(dir) => {
            // Herald's own lock on the directory, held until this tool exits: opened beside a
            // running server, the log's start (the catalog's compaction, the journal's restore)
            // would rewrite that server's live files.
            let lock = herald::log::private::lock_dir(dir)
                .map_err(|e| anyhow::anyhow!("{}: {e} (stop Herald first)", dir.display()))?;
            std::mem::forget(lock);
            EmbeddedLog::open(EmbeddedConfig {
                dir: dir.join("log"),
                segment_bytes: 64 << 20,
                flush_interval: Duration::from_millis(200),
                topics: specs,
                journal_bytes: herald::log::embedded::DEFAULT_JOURNAL_BYTES,
                faults: None,
            })
            .await?
        }
    };
    Ok((log, topics))
}

/// Appends `events` events for each of `subscriptions` (id, tenant) with `size`-byte data,
/// `batch` records per append and `concurrency` appends at once. Returns records per second.
pub async fn publish(
    log: Arc<dyn Log>,
    topic: &str,
    subscriptions: &[(String, String)],
    events: u64,
    size: usize,
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    anyhow::ensure!(!subscriptions.is_empty(), "no subscriptions to deliver to");
    let next = Arc::new(AtomicU64::new(0));
    let subs = Arc::new(subscriptions.to_vec());
    let filler = "x".repeat(size.saturating_sub(60));
    let run = std::process::id();
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (log, topic, next, subs, filler) =
                (log.clone(), topic.to_string(), next.clone(), subs.clone(), filler.clone());
            tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(batch as u64, Ordering::Relaxed);
                    if first >= events {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let last = (first + batch as u64).min(events);
                    let now = herald::model::now_ms();
                    let mut records = Vec::with_capacity((last - first) as usize * subs.len());
                    for n in first..last {
                        let data = Bytes::from(format!(
                            "{{\"n\":{n},\"sentMs\":{},\"pad\":\"{filler}\"}}",
                            crate::sink::now_ms()
                        ));
                        for (id, tenant) in subs.iter() {
                            let d = Delivery::first_attempt(
                                format!("direct-{run}-{n}"),
                                id.clone(),
                                tenant.clone(),
                                "LoadTest".into(),
                                data.clone(),
                                now,
                            );
                            records.push(Record { key: Bytes::from(id.clone()), value: d.encode() });
                        }
                    }
                    log.append(&topic, records).await?;
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    log.close().await?;
    Ok((events * subscriptions.len() as u64) as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory a running Herald holds is not opened beside it.
    #[tokio::test]
    async fn a_directory_a_server_holds_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _server = herald::log::private::lock_dir(dir.path()).unwrap();
        let err = open(&Target::Embedded(dir.path().to_path_buf()), "herald.", 2).await.err().expect("refused");
        assert!(err.to_string().contains("stop Herald first"), "{err}");
    }
}
