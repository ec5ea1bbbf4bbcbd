//! Topic set-up: create the missing topics (the registry's compacted), check the settings of
//! those made before (by an operator, or an older Herald), then learn each topic's real
//! partition count from the cluster's metadata.

use super::{kafka_error, KafkaConfig};
use crate::log::{LogError, TopicSpec};
use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// What the cluster's topics are like, once [`ensure`]d.
pub(super) struct Laid {
    /// Every topic's partition count.
    pub partitions: HashMap<String, u32>,
    /// The record limits (`max.message.bytes`) of topics made before, as the broker reports
    /// them: below Herald's (made by hand), or above it (made under a larger
    /// `ingest.max_event_bytes`, whose events may still be in them).
    pub record_limits: HashMap<String, usize>,
}

/// Creates missing topics and returns every topic's partition count.
pub(super) async fn ensure(config: &KafkaConfig) -> Result<Laid, LogError> {
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(config.client().create().map_err(kafka_error)?);
    let Cluster { partitions: existing, replicas, broker } = cluster(&admin).await?;
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
    let made_before: Vec<&TopicSpec> = config.topics.iter().filter(|t| existing.contains_key(&t.name)).collect();
    let record_limits = check_settings(&admin, broker, config, &made_before, &replicas).await?;
    let mut counts = HashMap::new();
    let deadline = tokio::time::Instant::now() + METADATA_TIMEOUT;
    loop {
        let Cluster { partitions: now, replicas: copies, .. } = cluster(&admin).await?;
        let absent: Vec<&str> =
            config.topics.iter().map(|t| t.name.as_str()).filter(|n| !now.contains_key(*n)).collect();
        if absent.is_empty() {
            // Made here at the broker's default replication: Herald set no
            // `min.insync.replicas` (it does at `log.replication` 2 or more), so the broker's
            // default decides how many copies `acks=all` waits for — one, on Apache Kafka.
            let copied: Vec<&str> = if config.replication < 2 {
                missing
                    .iter()
                    .filter(|t| copies.get(&t.name).is_some_and(|r| *r >= 2))
                    .map(|t| t.name.as_str())
                    .collect()
            } else {
                Vec::new()
            };
            if !copied.is_empty() {
                tracing::warn!(
                    topics = %copied.join(", "),
                    "topics made with several copies at the broker's default replication, without min.insync.replicas: \
                     unless the broker's default is 2 or more, a record is acknowledged by the leader alone once the others \
                     fall behind; set log.replication (Herald then sets log.min_insync_replicas)"
                );
            }
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
            return Ok(Laid { partitions: counts, record_limits });
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
        settings.push(("retention.ms", retention(config, t).as_millis().to_string()));
    }
    if config.replication >= 2 {
        let min = config.min_insync_replicas.min(config.replication as u32);
        settings.push(("min.insync.replicas", min.to_string()));
    }
    settings
}

/// How long a topic that is not compacted keeps its records: its own retention, else
/// `log.retention`.
fn retention(config: &KafkaConfig, t: &TopicSpec) -> Duration {
    t.retention.unwrap_or(config.retention)
}

/// Herald sets a topic's settings only when it makes it: one made before keeps its own. Those
/// that would lose acknowledged records are refused — a catalog that deletes by age drops the
/// subscriptions and keys older than its retention; a data topic that compacts keeps only the
/// newest record per key (deliveries are keyed by subscription). Those that only cost
/// something are logged: a shorter retention than Herald would set, a smaller record limit
/// (larger events are then refused at publish). A broker that cannot describe topics' settings
/// (librdkafka's mock cluster) is logged and trusted. Returns the record limits
/// (`max.message.bytes`) below Herald's, which the producer's batches must fit too.
async fn check_settings(
    admin: &AdminClient<DefaultClientContext>,
    broker: Option<i32>,
    config: &KafkaConfig,
    topics: &[&TopicSpec],
    replicas: &HashMap<String, usize>,
) -> Result<HashMap<String, usize>, LogError> {
    // Asked of one broker, named (`broker`, from the metadata already read): without a broker
    // among the resources librdkafka asks the controller, and a cluster that names none (the
    // mock) would hold the start for the whole timeout. Any broker answers a topic's settings.
    let Some(broker) = broker.filter(|_| !topics.is_empty()) else {
        return Ok(HashMap::new());
    };
    let mut resources: Vec<ResourceSpecifier> = topics.iter().map(|t| ResourceSpecifier::Topic(&t.name)).collect();
    resources.push(ResourceSpecifier::Broker(broker));
    let opts = AdminOptions::new().request_timeout(Some(Timeout::After(METADATA_TIMEOUT)));
    let described = match admin.describe_configs(&resources, &opts).await {
        Ok(described) => described,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the settings of existing topics; using them as they are");
            return Ok(HashMap::new());
        }
    };
    let mut limits = HashMap::new();
    for (t, result) in topics.iter().zip(described) {
        let settings = match result {
            Ok(settings) if settings.specifier == OwnedResourceSpecifier::Topic(t.name.clone()) => settings,
            Ok(other) => {
                tracing::warn!(topic = %t.name, answered = ?other.specifier, "the broker answered another resource; using the topic as it is");
                continue;
            }
            Err(code) => {
                tracing::warn!(topic = %t.name, error = %code, "could not read the topic's settings; using it as it is");
                continue;
            }
        };
        let value = |name: &str| settings.get(name).and_then(|e| e.value.as_deref());
        if let Some(limit) = value("max.message.bytes").and_then(|v| v.parse::<usize>().ok()) {
            limits.insert(t.name.clone(), limit);
        }
        match judge(config, t, replicas.get(&t.name).copied().unwrap_or(0), value) {
            Judgement::Fits => {}
            Judgement::Costs(costs) => {
                for cost in costs {
                    tracing::warn!(topic = %t.name, "{cost}");
                }
            }
            Judgement::Loses(why) => return Err(LogError::Backend(format!("topic {}: {why}", t.name))),
        }
    }
    Ok(limits)
}

/// What an existing topic's settings mean for Herald's records.
#[derive(Debug, PartialEq)]
enum Judgement {
    Fits,
    /// It works, at a cost said in each line.
    Costs(Vec<String>),
    /// It would lose acknowledged records: Herald does not start on it.
    Loses(String),
}

/// Judges one topic's settings, `value` giving each as the broker reports it (a broker may
/// leave some out: what is not reported is not judged).
fn judge<'a>(
    config: &KafkaConfig,
    t: &TopicSpec,
    replicas: usize,
    value: impl Fn(&str) -> Option<&'a str>,
) -> Judgement {
    let policy = value("cleanup.policy").map(|p| p.split(',').map(str::trim).collect::<Vec<_>>());
    if let Some(policy) = &policy {
        if t.compacted && policy.as_slice() != ["compact"] {
            return Judgement::Loses(format!(
                "cleanup.policy is {:?}: the catalog must be compacted and never deleted by age, or subscriptions, \
                 tenants and keys older than its retention are lost (kafka-configs --alter --add-config cleanup.policy=compact)",
                policy.join(",")
            ));
        }
        if !t.compacted && policy.contains(&"compact") {
            return Judgement::Loses(format!(
                "cleanup.policy is {:?}: compaction keeps only the newest record of each key and would drop \
                 deliveries and dead letters (kafka-configs --alter --add-config cleanup.policy=delete)",
                policy.join(",")
            ));
        }
    }
    let mut costs = Vec::new();
    if !t.compacted {
        let wanted = retention(config, t).as_millis();
        // A topic kept for less by its own setting (dead letters, `log.dlq_retention`) is held
        // to that.
        let least = crate::config::MIN_LOG_RETENTION.as_millis().min(wanted);
        if let Some(ms) = value("retention.ms").and_then(|v| v.parse::<i64>().ok()) {
            if ms >= 0 && (ms as u128) < least {
                // A retry waits unread in its tier up to 4 h: the broker would delete it first.
                return Judgement::Loses(format!(
                    "retention.ms is {ms}, shorter than the {least} ms a retry may wait in its tier unread: \
                     acknowledged events would be deleted before they are delivered \
                     (kafka-configs --alter --add-config retention.ms={wanted})"
                ));
            }
            if ms >= 0 && (ms as u128) < wanted {
                costs.push(format!(
                    "retention.ms is {ms}, shorter than the {wanted} Herald would set: its records are deleted sooner \
                     (a retry or dead letter older than that is lost)"
                ));
            }
        }
        if let Some(bytes) = value("retention.bytes").and_then(|v| v.parse::<i64>().ok()).filter(|b| *b >= 0) {
            // Deletes the oldest records once a partition holds this much, read or not: a
            // backlog would lose its oldest acknowledged events.
            return Judgement::Loses(format!(
                "retention.bytes is {bytes}: the broker would delete the oldest records of a partition past that size, \
                 delivered or not (kafka-configs --alter --add-config retention.bytes=-1)"
            ));
        }
    }
    // Copies a producer's `acks=all` waits for: with one, the leader acknowledges alone once
    // the others fall behind, and a 202 is lost with its disk.
    if replicas >= 2 && value("min.insync.replicas").and_then(|v| v.parse::<u32>().ok()) == Some(1) {
        costs.push(format!(
            "min.insync.replicas is 1 with {replicas} copies: a record is acknowledged by the leader alone once the others \
             fall behind, and lost with that broker's disk (kafka-configs --alter --add-config min.insync.replicas=2)"
        ));
    }
    if let Some(max) = value("max.message.bytes").and_then(|v| v.parse::<usize>().ok()) {
        if max < config.max_record_bytes {
            costs.push(format!(
                "max.message.bytes is {max}, less than the {} Herald's largest record needs: larger events are refused",
                config.max_record_bytes
            ));
        }
    }
    if costs.is_empty() {
        Judgement::Fits
    } else {
        Judgement::Costs(costs)
    }
}

/// What one look at the cluster's metadata tells: each topic's partition count, and the id
/// of one of its brokers, if it names any.
struct Cluster {
    partitions: HashMap<String, u32>,
    /// Each topic's copies of a partition (the fewest any of its partitions has).
    replicas: HashMap<String, usize>,
    broker: Option<i32>,
}

async fn cluster(admin: &Arc<AdminClient<DefaultClientContext>>) -> Result<Cluster, LogError> {
    let admin = admin.clone();
    tokio::task::spawn_blocking(move || {
        let md = admin.inner().fetch_metadata(None, Timeout::After(METADATA_TIMEOUT)).map_err(kafka_error)?;
        let partitions = md
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| (t.name().to_string(), t.partitions().len() as u32))
            .collect();
        let replicas = md
            .topics()
            .iter()
            .filter_map(|t| Some((t.name().to_string(), t.partitions().iter().map(|p| p.replicas().len()).min()?)))
            .collect();
        Ok(Cluster { partitions, replicas, broker: md.brokers().first().map(|b| b.id()) })
    })
    .await
    .map_err(|e| LogError::Backend(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KafkaConfig {
        KafkaConfig {
            brokers: String::new(),
            replication: 1,
            properties: Default::default(),
            topics: Vec::new(),
            drain: Duration::from_secs(1),
            retention: Duration::from_secs(86_400),
            min_insync_replicas: 1,
            max_record_bytes: 1 << 20,
        }
    }

    fn topic(compacted: bool) -> TopicSpec {
        TopicSpec {
            name: "t".into(),
            partitions: 1,
            compacted,
            retention: None,
            retention_waits_for_reader: false,
            read_within: Duration::from_millis(20),
            keyed: true,
        }
    }

    fn judged(t: &TopicSpec, settings: &[(&'static str, &'static str)]) -> Judgement {
        judged_with_copies(t, 1, settings)
    }

    /// [`judged`] of a topic whose partitions have `replicas` copies.
    fn judged_with_copies(t: &TopicSpec, replicas: usize, settings: &[(&'static str, &'static str)]) -> Judgement {
        judge(&config(), t, replicas, |name| settings.iter().find(|(k, _)| *k == name).map(|(_, v)| *v))
    }

    /// A topic of several copies that takes a record with one in sync is said to cost
    /// durability (acknowledged by the leader alone, lost with its disk); one copy is all a
    /// single broker has, and is not.
    #[test]
    fn one_copy_in_sync_of_several_is_said() {
        let one = [("min.insync.replicas", "1")];
        let with = |replicas| judged_with_copies(&topic(false), replicas, &one);
        assert!(matches!(with(3), Judgement::Costs(c) if c[0].contains("min.insync.replicas is 1 with 3 copies")));
        assert_eq!(with(1), Judgement::Fits);
        assert_eq!(judged_with_copies(&topic(false), 3, &[("min.insync.replicas", "2")]), Judgement::Fits);
    }

    #[test]
    fn a_catalog_deleted_by_age_or_a_data_topic_compacted_is_refused() {
        assert!(matches!(judged(&topic(true), &[("cleanup.policy", "delete")]), Judgement::Loses(_)));
        assert!(matches!(judged(&topic(true), &[("cleanup.policy", "compact,delete")]), Judgement::Loses(_)));
        assert!(matches!(judged(&topic(false), &[("cleanup.policy", "delete, compact")]), Judgement::Loses(_)));
        assert_eq!(judged(&topic(true), &[("cleanup.policy", "compact"), ("retention.ms", "1000")]), Judgement::Fits);
        assert_eq!(judged(&topic(false), &[("cleanup.policy", "delete"), ("retention.ms", "-1")]), Judgement::Fits);
        // What a broker leaves out is not judged.
        assert_eq!(judged(&topic(true), &[]), Judgement::Fits);
    }

    /// A retry waits unread in its tier up to 4 h, and a backlog may be large: a topic that
    /// deletes sooner than that, or by size, loses acknowledged events.
    #[test]
    fn a_data_topic_that_deletes_before_a_retry_is_due_or_by_size_is_refused() {
        assert!(matches!(judged(&topic(false), &[("retention.ms", "3600000")]), Judgement::Loses(_)));
        assert!(matches!(judged(&topic(false), &[("retention.bytes", "1073741824")]), Judgement::Loses(_)));
        assert_eq!(judged(&topic(false), &[("retention.bytes", "-1")]), Judgement::Fits);
        let dead_letters = TopicSpec { retention: Some(Duration::from_secs(3600)), ..topic(false) };
        assert_eq!(judged(&dead_letters, &[("retention.ms", "3600000")]), Judgement::Fits, "as Herald made it");
    }

    #[test]
    fn a_shorter_retention_or_a_smaller_record_limit_is_said() {
        let Judgement::Costs(costs) =
            judged(&topic(false), &[("retention.ms", "43200000"), ("max.message.bytes", "1000")])
        else {
            panic!("costs said")
        };
        assert_eq!(costs.len(), 2, "{costs:?}");
        assert!(costs[0].contains("retention.ms is 43200000"), "{costs:?}");
        assert!(costs[1].contains("max.message.bytes is 1000"), "{costs:?}");
        assert_eq!(judged(&topic(false), &[("retention.ms", "86400000")]), Judgement::Fits);
    }
}
