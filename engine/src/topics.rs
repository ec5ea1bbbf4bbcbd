//! The topics Herald uses, under one prefix: fresh deliveries, one per retry tier, dead
//! letters and the catalog. Their names and layouts are decided here, from the tiers the retry
//! stage owns.

use crate::config::{Backend, HistoryConfig, LogConfig};
use crate::log::TopicSpec;
use crate::retry::tiers;
use std::time::Duration;

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
            delay: Duration::ZERO,
        };
        let mut specs = vec![
            data(&self.deliveries, None),
            data(&self.ordered, None),
            data(&self.dlq, Some(log.dlq_retention.0)),
            TopicSpec {
                name: self.subscriptions.clone(),
                partitions: 1,
                compacted: true,
                retention: None,
                delay: Duration::ZERO,
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
                // keeps all of the history; the embedded log's one reader keeps its index beside
                // it, so a day is enough to rebuild from.
                retention: Some(
                    match log.backend {
                        Backend::Embedded => history.retention.0.min(Duration::from_secs(86_400)),
                        Backend::Kafka => history.retention.0,
                    }
                    .max(Duration::from_secs(3600)),
                ),
                delay: Duration::ZERO,
            },
        ];
        specs.extend(self.tiers.iter().map(|(name, delay)| TopicSpec { delay: *delay, ..data(name, None) }));
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

    #[test]
    fn each_tier_s_topic_says_when_its_records_are_due_and_no_other_does() {
        let topics = Topics::new("herald.");
        let specs = topics.specs(&LogConfig::default(), &HistoryConfig::default());
        for (name, delay) in &topics.tiers {
            assert_eq!(specs.iter().find(|s| &s.name == name).map(|s| s.delay), Some(*delay), "{name}");
        }
        assert!(specs.iter().filter(|s| !topics.tiers.iter().any(|(n, _)| n == &s.name)).all(|s| s.delay.is_zero()));
    }
}
