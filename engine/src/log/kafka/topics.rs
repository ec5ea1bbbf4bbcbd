//! Topic set-up: create the missing topics (the registry's compacted), then learn each
//! topic's real partition count from the cluster's metadata.

use super::{kafka_error, KafkaConfig};
use crate::log::{LogError, TopicSpec};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates missing topics and returns every topic's partition count.
pub(super) async fn ensure(config: &KafkaConfig) -> Result<HashMap<String, u32>, LogError> {
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(config.client().create().map_err(kafka_error)?);
    let existing = partition_counts(&admin).await?;
    let missing: Vec<_> = config.topics.iter().filter(|t| !existing.contains_key(&t.name)).collect();
    if !missing.is_empty() {
        let settings: Vec<Vec<(&str, String)>> = missing.iter().map(|t| topic_settings(config, t)).collect();
        let new: Vec<NewTopic> = missing
            .iter()
            .zip(&settings)
            .map(|(t, settings)| {
                settings.iter().fold(
                    NewTopic::new(&t.name, t.partitions as i32, TopicReplication::Fixed(config.replication)),
                    |topic, (k, v)| topic.set(k, v),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Timeout::After(METADATA_TIMEOUT)));
        match admin.create_topics(&new, &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(name) => tracing::info!(topic = %name, "created topic"),
                        // Another process created it first.
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => {
                            return Err(LogError::Backend(format!("creating topic {name}: {code}")));
                        }
                    }
                }
            }
            // A broker without CreateTopics: the metadata check below says which are missing.
            Err(e) => tracing::warn!(error = %e, "could not create topics"),
        }
    }
    let mut counts = HashMap::new();
    let deadline = tokio::time::Instant::now() + METADATA_TIMEOUT;
    loop {
        let now = partition_counts(&admin).await?;
        let absent: Vec<&str> =
            config.topics.iter().map(|t| t.name.as_str()).filter(|n| !now.contains_key(*n)).collect();
        if absent.is_empty() {
            for t in &config.topics {
                let n = now[&t.name];
                if t.compacted && n != 1 {
                    // The catalog is written to and read in order from partition 0: records
                    // hashed to the others would reach no process (until it restarted).
                    return Err(LogError::Backend(format!(
                        "topic {} has {n} partitions: the catalog needs exactly one partition (make it with one, compacted)",
                        t.name
                    )));
                }
                if n != t.partitions && !t.compacted {
                    tracing::warn!(topic = %t.name, partitions = n, configured = t.partitions, "topic exists with a different partition count; using it as it is");
                }
                counts.insert(t.name.clone(), n);
            }
            return Ok(counts);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(LogError::Backend(format!("topics missing and not creatable: {}", absent.join(", "))));
        }
        // Newly created topics take a moment to appear in metadata.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a durable deployment needs of each topic: the catalog compacted (kept forever, newest
/// per key); dead letters kept for their retention; deliveries and tiers for `log.retention`
/// (they are consumed long before); every topic with `min.insync.replicas` so `acks=all` means
/// more than one copy; records up to the largest event plus room for metadata.
pub(super) fn topic_settings(config: &KafkaConfig, t: &TopicSpec) -> Vec<(&'static str, String)> {
    let mut settings = vec![("max.message.bytes", config.max_record_bytes.to_string())];
    if t.compacted {
        settings.push(("cleanup.policy", "compact".to_string()));
    } else {
        let keep = t.retention.unwrap_or(config.retention);
        settings.push(("retention.ms", keep.as_millis().to_string()));
    }
    if config.replication >= 2 {
        let min = config.min_insync_replicas.min(config.replication as u32);
        settings.push(("min.insync.replicas", min.to_string()));
    }
    settings
}

async fn partition_counts(admin: &Arc<AdminClient<DefaultClientContext>>) -> Result<HashMap<String, u32>, LogError> {
    let admin = admin.clone();
    tokio::task::spawn_blocking(move || {
        let md = admin.inner().fetch_metadata(None, Timeout::After(METADATA_TIMEOUT)).map_err(kafka_error)?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| (t.name().to_string(), t.partitions().len() as u32))
            .collect())
    })
    .await
    .map_err(|e| LogError::Backend(e.to_string()))?
}
