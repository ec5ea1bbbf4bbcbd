//! The topics Herald uses, under one prefix: fresh deliveries, one per retry tier, dead
//! letters and the catalog. Their names and layouts are decided here, from the tiers the retry
//! stage owns.

use crate::config::{Backend, HistoryConfig, LogConfig};
use crate::log::TopicSpec;
use crate::retry::tiers;
use std::time::Duration;

/// How soon a reader should see a fresh delivery (see [`TopicSpec::read_within`]): on Kafka a
/// dispatcher's idle fetch waits this long at the broker.
const FRESH: Duration = Duration::from_millis(50);

/// The catalog's: a registry write returns once its own process has read it back, and writes
/// are made one at a time, so on a broker slow to answer a waiting fetch when records arrive
/// each would wait up to this long.
const CATALOG: Duration = Duration::from_millis(20);

/// The history topic's: each process's index follows every partition with a consumer of its
/// own, and an idle one fetched again 50 times a second at 20 ms; at 100 ms an idle Herald with
/// history on had tansu take 10 % of a core instead of 15 %, and a Kafka run at its peak
/// delivered 0.85–0.97 of history off instead of 0.75–0.83 (BENCHMARKS.md, "Kafka against the
/// embedded log"). A lookup of an event just accepted waits for the index: on tansu it took up
/// to 17 ms at 100 ms (40–155 ms at 500 ms).
const HISTORY: Duration = Duration::from_millis(100);

/// A UTC day: what the history index expires at once.
const DAY: Duration = Duration::from_secs(86_400);

/// A retry tier's: a tenth of its delay, from [`FRESH`] to 500 ms. A record in a tier is not
/// due before the tier's delay and is held until then, so a wait shorter than the delay costs
/// no delivery time on any broker; sixteen tiers, empty most of the time, each fetched 20
/// times a second at 50 ms.
fn tier(delay: Duration) -> Duration {
    (delay / 10).clamp(FRESH, Duration::from_millis(500))
}

/// The topic names Herald uses, under one prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    /// Fresh deliveries, keyed by subscription.
    pub deliveries: String,
    /// Ordered subscriptions' deliveries and their keys' markers, keyed by subscription.
    pub ordered: String,
    /// Dead letters.
    pub dlq: String,
    /// The compacted catalog: subscriptions, tenants, keys, edge devices. Named for what it
    /// first held; the name is kept so existing data and clusters keep working.
    pub subscriptions: String,
    /// Delivery history: events, attempts and state changes, keyed by subscription.
    pub history: String,
    /// Retry tiers: topic name and fixed delay, shortest first.
    pub tiers: Vec<(String, Duration)>,
    /// The prefix all names share.
    pub prefix: String,
}

impl Topics {
    /// Names under `prefix` (default `herald.`).
    pub fn new(prefix: &str) -> Self {
        Topics {
            deliveries: format!("{prefix}deliveries"),
            ordered: format!("{prefix}ordered"),
            dlq: format!("{prefix}dlq"),
            subscriptions: format!("{prefix}subscriptions"),
            history: format!("{prefix}history"),
            tiers: tiers::TIERS.iter().map(|&d| (tiers::topic(prefix, d), d)).collect(),
            prefix: prefix.to_string(),
        }
    }

    /// Every topic with its layout: data topics get `log.partitions` partitions; the catalog
    /// one, compacted; dead letters are kept for `log.dlq_retention`; deliveries and tiers until
    /// consumed (and on Kafka at most `log.retention`); history for `history.retention` (it is
    /// there even when history is off, so turning it on needs no new topic).
    pub fn specs(&self, log: &LogConfig, history: &HistoryConfig) -> Vec<TopicSpec> {
        let data = |name: &String, retention: Option<Duration>| TopicSpec {
            name: name.clone(),
            partitions: log.partitions,
            compacted: false,
            retention,
            retention_waits_for_reader: false,
            read_within: FRESH,
            keyed: false,
        };
        let mut specs = vec![
            data(&self.deliveries, None),
            TopicSpec { keyed: true, ..data(&self.ordered, None) },
            // Keyed: a subscription's dead letters are looked for in its partition only (its
            // list, its replay), so raising `log.partitions` hid the older ones from both.
            TopicSpec { keyed: true, ..data(&self.dlq, Some(log.dlq_retention.0)) },
            TopicSpec {
                name: self.subscriptions.clone(),
                partitions: 1,
                compacted: true,
                retention: None,
                retention_waits_for_reader: false,
                read_within: CATALOG,
                keyed: false,
            },
            TopicSpec {
                name: self.history.clone(),
                // One process reads the embedded log: one partition, one fsync per group
                // commit. On Kafka the records spread like deliveries.
                partitions: match log.backend {
                    Backend::Embedded => 1,
                    Backend::Kafka => log.partitions,
                },
                compacted: false,
                // On Kafka a process joining later builds its index from the topic, so the topic
                // keeps all of the history the indexes keep — a day more than the retention,
                // since an index expires whole UTC days (with exactly the retention, a process
                // that built its index later lacked the oldest day the others still showed);
                // the embedded log's one reader keeps its index beside it, so a day is enough
                // to rebuild from — of what that reader has read: what it had not when Herald
                // stopped waits for it, however long Herald stays down.
                retention: Some(
                    match log.backend {
                        Backend::Embedded => history.retention.0.min(DAY),
                        Backend::Kafka => history.retention.0.saturating_add(DAY),
                    }
                    .max(Duration::from_secs(3600)),
                ),
                retention_waits_for_reader: log.backend == Backend::Embedded && history.enabled(),
                read_within: HISTORY,
                keyed: false,
            },
        ];
        specs
            .extend(self.tiers.iter().map(|(name, delay)| TopicSpec { read_within: tier(*delay), ..data(name, None) }));
        specs
    }

    /// Every topic the dispatcher consumes, with its short name for metrics and the delay
    /// its records wait (fresh deliveries, then each tier).
    pub fn sources(&self) -> Vec<(String, String, Duration)> {
        let mut sources = vec![
            (self.deliveries.clone(), "deliveries".to_string(), Duration::ZERO),
            (self.ordered.clone(), "ordered".to_string(), Duration::ZERO),
        ];
        sources.extend(self.tiers.iter().map(|(topic, delay)| (topic.clone(), tiers::label(*delay), *delay)));
        sources
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Indexes expire whole UTC days, so they keep up to a day past the retention: on Kafka the
    /// topic keeps that day too, so a process that builds its index later answers the same.
    #[test]
    fn kafka_keeps_the_history_a_day_past_its_retention() {
        let topics = Topics::new("herald.");
        let log = LogConfig { backend: Backend::Kafka, ..LogConfig::default() };
        let history = HistoryConfig::default();
        let specs = topics.specs(&log, &history);
        let spec = specs.iter().find(|s| s.name == topics.history).unwrap();
        assert_eq!(spec.retention, Some(history.retention.0 + DAY));
    }

    /// Raising `log.partitions` on an embedded data dir leaves the dead-letter topic with the
    /// partitions it has: a subscription's dead letters are found in the partition its id
    /// hashes to, and over more partitions the older ones were in none that was looked in.
    #[tokio::test]
    async fn the_dead_letter_topic_keeps_its_partitions_when_log_partitions_is_raised() {
        use crate::log::embedded::{EmbeddedConfig, EmbeddedLog};
        use crate::log::Log;
        let dir = tempfile::tempdir().unwrap();
        let topics = Topics::new("herald.");
        let open = |partitions: u32| {
            let log = LogConfig { partitions, ..LogConfig::default() };
            let config = EmbeddedConfig {
                dir: dir.path().to_path_buf(),
                segment_bytes: 1 << 20,
                flush_interval: Duration::from_secs(3600),
                topics: topics.specs(&log, &HistoryConfig::default()),
                journal_bytes: crate::log::embedded::DEFAULT_JOURNAL_BYTES,
                faults: None,
            };
            EmbeddedLog::open(config)
        };
        drop(open(2).await.unwrap());
        let log = open(8).await.unwrap();
        assert_eq!(log.partitions(&topics.dlq).unwrap(), 2, "the dead letters' partitions kept");
        assert_eq!(log.partitions(&topics.deliveries).unwrap(), 8, "new deliveries spread wider");
    }

    #[test]
    fn a_tier_is_read_well_before_its_records_are_due_and_the_catalog_at_once() {
        let topics = Topics::new("herald.");
        let specs = topics.specs(&LogConfig::default(), &HistoryConfig::default());
        let within = |name: &String| specs.iter().find(|s| &s.name == name).map(|s| s.read_within).unwrap();
        for (name, delay) in &topics.tiers {
            assert!(within(name) < *delay, "{name}: read within {:?}", within(name));
            assert!(within(name) >= FRESH, "{name}");
        }
        let ms = Duration::from_millis;
        assert_eq!(tier(ms(2_000)), ms(200));
        assert_eq!(tier(Duration::from_secs(14_400)), ms(500));
        assert_eq!(within(&topics.deliveries), FRESH);
        assert_eq!(within(&topics.subscriptions), CATALOG);
        assert_eq!(within(&topics.history), HISTORY);
    }
}
