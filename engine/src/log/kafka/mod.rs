//! The Kafka backend: the same [`Log`] interface on a Kafka cluster through librdkafka, so
//! any number of `herald` processes share the partitions of one consumer group per topic.
//!
//! Appends go through one idempotent producer (`acks=all`) to the partition the Java-compatible
//! murmur2 hash of the key picks, and return once the broker acknowledged them. Consumers
//! use cooperative rebalancing (`group`), and reads of a whole topic or a page of one
//! partition use a group-less reader (`reader`).

mod group;
mod reader;
mod topics;

use super::{partition_for, Consumer, Log, LogError, LogRecord, PartitionReader, Position, Record, TopicSpec};
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Settings Herald itself decides; the pass-through table cannot change them, because the
/// delivery guarantees depend on them (`auto.offset.reset`: a group that started at the end
/// would skip what was accepted before its first assignment).
const FIXED: &[&str] =
    &["enable.idempotence", "acks", "enable.auto.offset.store", "group.id", "bootstrap.servers", "auto.offset.reset"];

/// How to reach the cluster and lay out the topics.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `host:port` list.
    pub brokers: String,
    /// Replication factor for topics Herald creates; -1 leaves it to the broker's default.
    pub replication: i32,
    /// librdkafka settings passed through to every client (SASL, TLS, tuning).
    pub properties: BTreeMap<String, String>,
    /// The topics to use, created when missing.
    pub topics: Vec<TopicSpec>,
    /// How long a revoked partition may take to finish its in-flight deliveries.
    pub drain: Duration,
    /// `retention.ms` of topics without one of their own (deliveries, tiers).
    pub retention: Duration,
    /// `min.insync.replicas` of the topics created (when `replication` is at least 2).
    pub min_insync_replicas: u32,
    /// The largest record Herald writes: topics and the producer are set to take it.
    pub max_record_bytes: usize,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Property values may be passwords: only their names are shown.
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("replication", &self.replication)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KafkaConfig {
    /// A client config: brokers, then the pass-through properties (`_` may stand for `.` so
    /// they can be given as environment variables).
    fn client(&self) -> ClientConfig {
        self.layered(&[], &[])
    }

    /// A client config in layers: `defaults`, then brokers and the pass-through properties,
    /// then `fixed`, which nothing overrides.
    fn layered(&self, defaults: &[(&str, &str)], fixed: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        c.set("bootstrap.servers", &self.brokers).set("client.id", "herald");
        for (k, v) in &self.properties {
            let key = k.replace('_', ".");
            if !FIXED.contains(&key.as_str()) {
                c.set(key, v);
            }
        }
        for (k, v) in fixed {
            c.set(*k, *v);
        }
        c
    }
}

/// The error as text. A setting the client refused is named, its value not shown (the
/// client's own text holds it whole, and settings hold SASL passwords).
pub(crate) fn kafka_error(e: KafkaError) -> LogError {
    match e {
        KafkaError::ClientConfig(_, description, key, value) => {
            let description = if value.is_empty() { description } else { description.replace(&value, "…") };
            LogError::Backend(format!("the Kafka client refused its setting `{key}` (value not shown): {description}"))
        }
        e => LogError::Backend(e.to_string()),
    }
}

/// The log on a Kafka cluster: one producer, consumer groups per topic, readers for pages.
pub struct KafkaLog {
    config: KafkaConfig,
    producer: FutureProducer,
    partitions: HashMap<String, u32>,
    /// Topics made before this start, and their record limits as the broker reports them
    /// (the others were made with Herald's own: [`record_limit`]).
    record_limits: HashMap<String, usize>,
    /// An append failed, and no readiness look has found the cluster up since: an append
    /// looks again (at most once a second, shared) before it waits on the producer.
    down: std::sync::atomic::AtomicBool,
    reader: Arc<Mutex<reader::Reader>>,
    /// Answers `end_offset` apart from `reader`, whose page reads hold its lock (for seconds
    /// on a gap): every API request waits for a query of the registry topic's end.
    watermarks: Arc<reader::Reader>,
    /// Per topic, the client its followers share.
    followers: Mutex<HashMap<String, Arc<reader::Followed>>>,
    closed: watch::Sender<bool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Whether a fatal producer error was logged (once).
    told_broken: std::sync::atomic::AtomicBool,
    /// The broker's last answer to a readiness look, and when (see [`Log::ready`]).
    readiness: Arc<tokio::sync::Mutex<Option<(std::time::Instant, bool)>>>,
    /// Readiness looks made at the broker.
    ready_probes: std::sync::atomic::AtomicUsize,
}

/// How long a readiness look at the broker is answered from.
const READY_SEEN_FOR: Duration = Duration::from_secs(1);

/// The producer's batches (`batch.size`), unless a topic's record limit is smaller.
const BATCH_SIZE: usize = 1_000_000;

/// `batch.size` for topics whose smallest record limit (`max.message.bytes`, made before
/// Herald) is `smallest`: the broker holds a whole batch to the limit, and refuses every record
/// of one past it — small events of many tenants refused as too large, together.
fn batch_size(smallest: Option<usize>) -> usize {
    // Room for the batch's own header (61 bytes) and its records' framing.
    smallest.map_or(BATCH_SIZE, |limit| limit.saturating_sub(1024).clamp(1, BATCH_SIZE))
}

/// The record limit of Herald's topic `t`: as the broker reported it for one made before this
/// start, else Herald's own, which it was made with.
fn record_limit(config: &KafkaConfig, record_limits: &HashMap<String, usize>, t: &TopicSpec) -> usize {
    record_limits.get(&t.name).copied().unwrap_or(config.max_record_bytes)
}

/// Every topic's record limit.
fn record_limits_of<'a>(
    config: &'a KafkaConfig,
    record_limits: &'a HashMap<String, usize>,
) -> impl Iterator<Item = usize> + 'a {
    config.topics.iter().map(move |t| record_limit(config, record_limits, t))
}

/// The largest record the producer sends (`message.max.bytes`): the largest of the topics'
/// limits, at least Herald's own. Records accepted under a larger `ingest.max_event_bytes`
/// stay in the topics made then, and their retries and dead letters are written again after
/// the limit is lowered — refused by the producer's own check, a retry was dead-lettered and
/// its payload dropped, though the topic takes it. The broker still holds each topic to its
/// own limit.
fn largest_record(config: &KafkaConfig, record_limits: &HashMap<String, usize>) -> usize {
    record_limits_of(config, record_limits).fold(config.max_record_bytes, usize::max)
}

impl KafkaLog {
    /// Connects, creates missing topics and learns every topic's partition count.
    pub async fn open(config: KafkaConfig) -> Result<Arc<KafkaLog>, LogError> {
        let topics::Laid { partitions, record_limits } = topics::ensure(&config).await?;
        // Batches fit the smallest limit, of topics made this start (Herald's own) too.
        let batch = batch_size(record_limits_of(&config, &record_limits).min()).to_string();
        let largest = largest_record(&config, &record_limits).to_string();
        // Throughput defaults the pass-through table may change; the guarantees it may not.
        let producer: FutureProducer = config
            .layered(
                &[
                    ("linger.ms", "5"),
                    ("batch.num.messages", "10000"),
                    ("batch.size", &batch),
                    ("message.timeout.ms", "30000"),
                    ("message.max.bytes", &largest),
                    ("queue.buffering.max.messages", "1000000"),
                ],
                &[("enable.idempotence", "true"), ("acks", "all")],
            )
            .create()
            .map_err(kafka_error)?;
        let reader = reader::Reader::new(&config)?;
        let watermarks = Arc::new(reader::Reader::new(&config)?);
        tracing::info!(brokers = %config.brokers, topics = partitions.len(), "kafka log open");
        Ok(Arc::new(KafkaLog {
            config,
            producer,
            partitions,
            record_limits,
            down: Default::default(),
            reader: Arc::new(Mutex::new(reader)),
            watermarks,
            followers: Mutex::default(),
            closed: watch::channel(false).0,
            threads: Mutex::new(Vec::new()),
            told_broken: Default::default(),
            readiness: Default::default(),
            ready_probes: Default::default(),
        }))
    }
}

impl KafkaLog {
    /// An append's error, typed: a record the broker or producer refuses for its size cannot
    /// be retried into success.
    /// `e` of an append of a record of `bytes` to `topic`; one too large says the topic's limit.
    fn append_error(&self, topic: &str, e: KafkaError, bytes: usize) -> LogError {
        // librdkafka reports its own size check with the broker's code, 10.
        match e.rdkafka_error_code() {
            Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge) => {
                let max = self.record_limits.get(topic).copied().unwrap_or(self.config.max_record_bytes);
                LogError::TooLarge { bytes, max }
            }
            _ => kafka_error(e),
        }
    }

    /// How `topic` is laid out, if it is one of Herald's.
    fn spec(&self, topic: &str) -> Option<&TopicSpec> {
        self.config.topics.iter().find(|t| t.name == topic)
    }

    /// Whether `topic` is compacted: its offsets have gaps that are not to be read again.
    fn compacted(&self, topic: &str) -> bool {
        self.spec(topic).is_some_and(|t| t.compacted)
    }

    /// How long an idle fetch of `topic` may wait at the broker (its spec's `read_within`;
    /// librdkafka's own 500 ms default for a topic without one).
    fn read_within(&self, topic: &str) -> Duration {
        self.spec(topic).map_or(Duration::from_millis(500), |t| t.read_within)
    }

    /// Refuses a partition `topic` does not have.
    fn existing(&self, topic: &str, partition: u32) -> Result<(), LogError> {
        if partition >= self.partitions(topic)? {
            return Err(LogError::UnknownTopic(format!("{topic}/{partition}")));
        }
        Ok(())
    }

    /// Runs `read` with the group-less reader on a blocking thread, for a partition that exists.
    async fn with_reader<T: Send + 'static>(
        &self,
        topic: &str,
        partition: u32,
        read: impl FnOnce(&mut reader::Reader, &str) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        self.existing(topic, partition)?;
        let (reader, topic) = (self.reader.clone(), topic.to_string());
        blocking(move || read(&mut reader.lock().unwrap(), &topic)).await
    }
}

/// Runs `call` on a blocking thread (librdkafka's calls block the caller); a panic there is
/// reported as the backend's error.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(call).await.map_err(|e| LogError::Backend(e.to_string()))?
}

#[async_trait]
impl Log for KafkaLog {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.partitions.get(topic).copied().ok_or_else(|| LogError::UnknownTopic(topic.to_string()))
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if *self.closed.borrow() {
            return Err(LogError::Closed);
        }
        // While the cluster is down each append waited out the producer's message timeout
        // (30 s) before it failed, holding its request's share of the ingest budget.
        if self.down.load(std::sync::atomic::Ordering::Relaxed) && !self.ready().await {
            return Err(LogError::Backend("the Kafka cluster cannot be reached; try again".into()));
        }
        let n = self.partitions(topic)?;
        let now = crate::model::now_ms();
        let mut pending = Vec::with_capacity(records.len());
        for r in &records {
            let partition = partition_for(&r.key, n) as i32;
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).key(&r.key[..]).partition(partition).timestamp(now);
            // An empty value is a deletion (the catalog's): sent as no value at all, the
            // tombstone Kafka's compaction drops in time — an empty one is kept as the key's
            // newest record for good. Read back, no value is an empty one.
            if !r.value.is_empty() {
                record = record.payload(&r.value[..]);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                        // The local queue is full: let the producer drain a little.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(self.append_error(topic, e, r.value.len())),
                }
            }
        }
        let mut positions = Vec::with_capacity(pending.len());
        for (delivery, record) in futures::future::join_all(pending).await.into_iter().zip(&records) {
            match delivery {
                Ok(Ok(d)) => positions.push(Position { partition: d.partition as u32, offset: d.offset as u64 }),
                Ok(Err((e, _))) => {
                    let error = self.append_error(topic, e, record.value.len());
                    if !matches!(error, LogError::TooLarge { .. }) {
                        self.down.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Err(error);
                }
                Err(_) => return Err(LogError::Closed),
            }
        }
        Ok(positions)
    }

    async fn read_all(&self, topic: &str) -> Result<Vec<LogRecord>, LogError> {
        let mut out = Vec::new();
        for p in 0..self.partitions(topic)? {
            let mut from = Some(0);
            while let Some(at) = from {
                let (records, next) = self.read_partition(topic, p, at, 10_000).await?;
                out.extend(records);
                from = next;
            }
        }
        Ok(out)
    }

    async fn read_partition(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<(Vec<LogRecord>, Option<u64>), LogError> {
        let contiguous = !self.compacted(topic);
        self.with_reader(topic, partition, move |r, topic| r.read(topic, partition, from, max, contiguous)).await
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.existing(topic, partition)?;
        let (watermarks, topic) = (self.watermarks.clone(), topic.to_string());
        blocking(move || watermarks.end_offset(&topic, partition)).await
    }

    fn shared(&self) -> bool {
        true
    }

    /// The smallest limit of Herald's topics (those made this start take Herald's own).
    fn max_record_bytes(&self) -> Option<usize> {
        Some(record_limits_of(&self.config, &self.record_limits).min().unwrap_or(self.config.max_record_bytes))
    }

    async fn consume(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, LogError> {
        self.partitions(topic)?;
        let (consumer, thread) = group::GroupConsumer::join(
            &self.config,
            group,
            topic,
            self.read_within(topic),
            self.closed.subscribe(),
            self.config.drain,
        )?;
        self.threads.lock().unwrap().push(thread);
        Ok(Box::new(consumer))
    }

    async fn follow(&self, topic: &str, partition: u32, from: u64) -> Result<Box<dyn PartitionReader>, LogError> {
        self.existing(topic, partition)?;
        let closed = self.closed.subscribe();
        let client = || reader::Followed::new(&self.config, topic, !self.compacted(topic), self.read_within(topic));
        let shared = {
            let mut followers = self.followers.lock().unwrap();
            match followers.get(topic) {
                Some(shared) => shared.clone(),
                None => followers.entry(topic.to_string()).or_insert(client()?).clone(),
            }
        };
        if let Some(follower) = shared.follow(partition, from, closed.clone())? {
            return Ok(Box::new(follower));
        }
        // Its follower on the shared client still lives: a client of its own.
        match client()?.follow(partition, from, closed)? {
            Some(follower) => Ok(Box::new(follower)),
            None => Err(LogError::Backend(format!("cannot follow {topic}/{partition}"))),
        }
    }

    /// The broker keeps such a topic for all of its `retention.ms`, whoever has read it.
    fn read_up_to(&self, _topic: &str, _partition: u32, _offset: u64) {}

    async fn ready(&self) -> bool {
        if *self.closed.borrow() {
            return false;
        }
        if self.broken().is_some() {
            return false;
        }
        // One look at the broker a second, shared: `/readyz` needs no token, and each call
        // was a metadata request to the cluster holding a blocking thread for up to 2 s — a
        // flood of them amplified onto the brokers and starved the pool every request's
        // catalog check uses.
        let mut seen = self.readiness.clone().lock_owned().await;
        if let Some((at, ready)) = *seen {
            if at.elapsed() < READY_SEEN_FOR {
                return ready;
            }
        }
        self.ready_probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let producer = self.producer.clone();
        let topic = self.config.topics.first().map(|t| t.name.clone()).unwrap_or_default();
        // The look and the note of its answer in a task of their own, holding the lock: a
        // caller that goes (a client that closed its connection) neither lets the next caller
        // start another look meanwhile nor leaves the answer unnoted.
        let look = tokio::spawn(async move {
            let ready = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(Some(&topic), Timeout::After(Duration::from_secs(2))).is_ok()
            })
            .await
            .unwrap_or(false);
            *seen = Some((std::time::Instant::now(), ready));
            ready
        });
        let ready = look.await.unwrap_or(false);
        // Seen up, appends go straight to the producer again. Seen down, nothing changes: a
        // look can time out behind a busy broker's produce requests, and only an append that
        // failed (after the producer's own patience) makes appends look first.
        if ready {
            self.down.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        ready
    }

    /// A fatal error of the idempotent producer (a sequence it cannot safely repair) fails
    /// every append from then on: the process is broken (`/healthz` answers 503, so an
    /// orchestrator restarts it) and not ready.
    fn broken(&self) -> Option<String> {
        let (code, reason) = self.producer.client().fatal_error()?;
        if !self.told_broken.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(%code, reason, "the Kafka producer hit a fatal error; every append fails until Herald restarts");
        }
        Some(format!("the Kafka producer hit a fatal error ({code}: {reason}); restart Herald"))
    }

    /// Stops every consumer (committing what was stored) and flushes the producer.
    async fn close(&self) -> Result<(), LogError> {
        self.closed.send_replace(true);
        // Each shared client closes with the last of its followers.
        self.followers.lock().unwrap().clear();
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock().unwrap());
        let producer = self.producer.clone();
        blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            producer.flush(Timeout::After(Duration::from_secs(10))).map_err(kafka_error)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::PartitionReader;

    #[test]
    fn the_pass_through_table_cannot_change_what_the_guarantees_rest_on() {
        let properties = [("auto_offset_reset", "latest"), ("acks", "1"), ("linger.ms", "50")];
        let config = KafkaConfig {
            brokers: "b:9092".into(),
            replication: 1,
            properties: properties.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            topics: Vec::new(),
            drain: Duration::from_secs(1),
            retention: Duration::from_secs(86_400),
            min_insync_replicas: 1,
            max_record_bytes: 1 << 20,
        };
        let c = config.layered(&[("auto.offset.reset", "earliest"), ("linger.ms", "5")], &[("acks", "all")]);
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("linger.ms"), Some("50"), "tuning passes through");
    }

    const PARTITIONS: u32 = 4;

    /// A log on librdkafka's mock cluster with one topic, `t`.
    async fn open(
        cluster: &rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    ) -> Arc<KafkaLog> {
        open_with(cluster, &[]).await
    }

    /// As [`open`], with `properties` passed through to the clients as well.
    async fn open_with(
        cluster: &rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        properties: &[(&str, &str)],
    ) -> Arc<KafkaLog> {
        cluster.create_topic("t", PARTITIONS as i32, 1).unwrap();
        let topic = TopicSpec {
            name: "t".into(),
            partitions: PARTITIONS,
            compacted: false,
            retention: None,
            retention_waits_for_reader: false,
            read_within: Duration::from_millis(20),
            keyed: false,
        };
        KafkaLog::open(KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            replication: 1,
            // One fetch takes a partition's whole stretch, as a broker with a backlog hands out.
            properties: [("max.partition.fetch.bytes", &*(16 << 20).to_string())]
                .iter()
                .chain(properties)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            topics: vec![topic],
            drain: Duration::from_secs(1),
            retention: Duration::from_secs(3600),
            min_insync_replicas: 1,
            max_record_bytes: 1 << 20,
        })
        .await
        .unwrap()
    }

    /// The offsets and values of `n` records `reader` hands out, within a deadline.
    async fn read(reader: &mut Box<dyn PartitionReader>, n: usize) -> Vec<(u64, String)> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), async {
            while got.len() < n {
                for r in reader.next_batch(100).await.unwrap() {
                    got.push((r.offset, String::from_utf8(r.value.to_vec()).unwrap()));
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} records within 20 s; got {got:?}"));
        got
    }

    /// The producer's batches fit the smallest record limit of the topics made before Herald:
    /// the broker refuses a whole batch past a topic's `max.message.bytes`, and batches of up
    /// to a megabyte on a topic made with 256 KiB refused many tenants' small events as too
    /// large, together.
    #[test]
    fn batches_fit_the_smallest_record_limit_of_the_topics() {
        // A topic made this start, under a lowered limit, beside one made before with more.
        let config = |max_record_bytes: usize| KafkaConfig {
            brokers: String::new(),
            replication: 1,
            properties: BTreeMap::new(),
            topics: ["old", "new"]
                .map(|n| TopicSpec {
                    name: n.into(),
                    partitions: 1,
                    compacted: false,
                    retention: None,
                    retention_waits_for_reader: false,
                    read_within: Duration::from_millis(100),
                    keyed: false,
                })
                .to_vec(),
            drain: Duration::from_secs(1),
            retention: Duration::from_secs(3600),
            min_insync_replicas: 1,
            max_record_bytes,
        };
        let made_before = HashMap::from([("old".to_string(), 2 << 20)]);
        let lowered = config(320 << 10);
        assert!(batch_size(record_limits_of(&lowered, &made_before).min()) < 320 << 10);
        assert_eq!(largest_record(&lowered, &made_before), 2 << 20, "the old topic's records still go");
        assert_eq!(batch_size(None), BATCH_SIZE);
        assert!(batch_size(Some(262_144)) < 262_144);
        assert_eq!(batch_size(Some(8 << 20)), BATCH_SIZE);
        assert_eq!(batch_size(Some(10)), 1);
    }

    /// A setting the Kafka client refuses is named, its value not shown: an operator's
    /// `sasl.jaas.config` copied from a Java client (not a librdkafka setting) printed its
    /// password in Herald's start-up error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_client_setting_is_named_without_its_value() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let secret = r#"org.apache.kafka.common.security.plain.PlainLoginModule required password="hunter2";"#;
        let config = KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            replication: 1,
            properties: BTreeMap::from([("sasl.jaas.config".to_string(), secret.to_string())]),
            topics: Vec::new(),
            drain: Duration::from_secs(1),
            retention: Duration::from_secs(3600),
            min_insync_replicas: 1,
            max_record_bytes: 1 << 20,
        };
        let error = KafkaLog::open(config).await.err().expect("refused").to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("sasl.jaas.config"), "{error}");
    }

    /// A fatal error of the idempotent producer fails every append for good: the log says it
    /// is not ready (the broker is reachable, so the metadata check alone said it was).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fatal_producer_error_makes_the_log_not_ready() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let log = open(&cluster).await;
        assert!(log.ready().await);
        let reason = std::ffi::CString::new("injected").unwrap();
        // SAFETY: the producer's handle is live for the call; the reason is a valid C string.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                log.producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
        assert!(!log.ready().await);
        assert!(log.broken().is_some_and(|why| why.contains("restart")), "{:?}", log.broken());
    }

    /// Once an append has failed for the cluster being down, the next are refused at once —
    /// while it stays down, each waited out the producer's whole message timeout (30 s) before
    /// its `503`, holding its request's share of the ingest budget — and taken again once the
    /// cluster is back. A look that finds it down alone changes nothing (a busy broker can
    /// keep a look waiting past its 2 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_are_refused_at_once_while_the_cluster_is_seen_down() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let log = open_with(&cluster, &[("message.timeout.ms", "6000")]).await;
        let one = || vec![Record { key: "k".into(), value: "v".into() }];
        log.append("t", one()).await.unwrap();
        cluster.broker_down(1).unwrap();
        assert!(!log.ready().await, "the cluster is down");
        // A look alone refuses nothing: this append waits on the producer before it fails.
        let started = std::time::Instant::now();
        assert!(log.append("t", one()).await.is_err());
        assert!(started.elapsed() >= Duration::from_secs(5), "refused after {:?}", started.elapsed());
        // Once one has failed, the next is refused at once.
        let started = std::time::Instant::now();
        assert!(log.append("t", one()).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(4), "refused after {:?}", started.elapsed());
        cluster.broker_up(1).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while log.append("t", one()).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "appends taken again once the cluster is back");
        }
        log.close().await.unwrap();
    }

    /// `/readyz` needs no token: a thousand at once make one look at the broker, not a
    /// thousand metadata requests each holding a blocking thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_asked_at_once_looks_at_the_broker_once() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let log = open(&cluster).await;
        let asked: Vec<_> = (0..1000)
            .map(|_| {
                let log = log.clone();
                tokio::spawn(async move { log.ready().await })
            })
            .collect();
        for a in asked {
            assert!(a.await.unwrap());
        }
        let probes = log.ready_probes.load(std::sync::atomic::Ordering::Relaxed);
        assert!(probes <= 2, "{probes} looks at the broker");
        // Callers that go at once (clients that closed their connections) do not start a look
        // each: the one under way notes its answer for the next.
        drop(cluster);
        *log.readiness.lock().await = None; // the last answer gone stale
        let before = log.ready_probes.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..50 {
            let _ = tokio::time::timeout(Duration::from_millis(5), log.ready()).await;
        }
        let looks = log.ready_probes.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(looks <= 2, "{looks} looks for 50 callers that went");
    }

    /// A page of large records stops at about [`crate::log::PAGE_BYTES`], with where to go
    /// on: 1,024 dead letters of 1 MiB events were a gigabyte in one read (or a read that
    /// timed out every time).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_page_of_large_records_is_bounded_in_bytes() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let log = open(&cluster).await;
        let value = "v".repeat(512 << 10);
        let positions = log
            .append("t", (0..20).map(|_| Record { key: "k".into(), value: value.clone().into() }).collect())
            .await
            .unwrap();
        let p = positions[0].partition;
        // (The mock cluster keeps about the last 5 MiB of a partition: the page starts there.)
        let (page, next) = log.read_partition("t", p, 0, 1024).await.unwrap();
        let bytes: usize = page.iter().map(|r| r.value.len()).sum();
        assert!(bytes <= crate::log::PAGE_BYTES + value.len(), "{bytes} bytes in one page");
        let last = page.last().unwrap().offset;
        assert!(last < 19 && next == Some(last + 1), "cut before the end, with where to go on: {next:?}");
        let (rest, end) = log.read_partition("t", p, last + 1, 1024).await.unwrap();
        assert_eq!((rest.last().map(|r| r.offset), end), (Some(19), None), "the rest on the next page");
        log.close().await.unwrap();
    }

    /// A batch of large records holds about [`crate::log::BATCH_BYTES`], as the embedded
    /// log's do: a retry tier's shard keeps what it reads until due (up to four hours), and
    /// 256 fetched records of a megabyte each were 256 MB per tier and partition.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_large_records_is_bounded_in_bytes() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let log = open(&cluster).await;
        let value = "v".repeat(60 << 10);
        let positions = log
            .append("t", (0..60).map(|_| Record { key: "k".into(), value: value.clone().into() }).collect())
            .await
            .unwrap();
        let mut reader = log.follow("t", positions[0].partition, 0).await.unwrap();
        let (mut read, mut largest) = (0, 0);
        while read < 60 {
            let batch = tokio::time::timeout(Duration::from_secs(20), reader.next_batch(256)).await.unwrap().unwrap();
            read += batch.len();
            largest = largest.max(batch.iter().map(|r| r.value.len()).sum::<usize>());
        }
        assert!(largest <= crate::log::BATCH_BYTES + value.len(), "{largest} bytes in one batch");
        log.close().await.unwrap();
    }

    /// The readers of every partition of `t`, as the group assigns them, within a deadline.
    async fn assigned(consumer: &mut Box<dyn crate::log::Consumer>) -> Vec<Box<dyn PartitionReader>> {
        let mut readers = Vec::new();
        while readers.len() < PARTITIONS as usize {
            match tokio::time::timeout(Duration::from_secs(20), consumer.next_assignment()).await {
                Ok(Some(crate::log::Assignment::Assigned(reader))) => readers.push(reader),
                _ => panic!("{} of {PARTITIONS} partitions assigned", readers.len()),
            }
        }
        readers
    }

    /// A held reader (its shard keeps records not due for hours) lets go of what the client
    /// fetched ahead, and fetches no more: it stayed, up to 16 MiB a partition of each retry
    /// tier, for as long as the hold. Read again, it goes on from where it was.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_reader_keeps_nothing_fetched_ahead_and_goes_on_where_it_was() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let log = open_with(&cluster, &[("statistics.interval.ms", "100")]).await;
        let value = "v".repeat(30 << 10);
        let records = (0..120).map(|i| Record { key: "k".into(), value: format!("{i}-{value}").into() }).collect();
        let p = log.append("t", records).await.unwrap()[0].partition;
        let mut consumer = log.consume("g", "t").await.unwrap();
        let mut reader = assigned(&mut consumer).await.into_iter().find(|r| r.partition() == p).unwrap();
        assert_eq!(reader.next_batch(1).await.unwrap()[0].offset, 0);
        let prefetched = || group::PREFETCHED.lock().unwrap().get(&("t".to_string(), p as i32)).copied().unwrap_or(0);
        let until = |what: &str, done: &dyn Fn(u64) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !done(prefetched()) {
                assert!(std::time::Instant::now() < deadline, "{what}: {} bytes fetched ahead", prefetched());
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        until("the client fetches ahead", &|bytes| bytes > 1 << 20);
        reader.hold();
        until("a held reader lets go of what was fetched ahead", &|bytes| bytes < 256 << 10);
        let rest = read(&mut reader, 119).await;
        assert_eq!(rest.iter().map(|(o, _)| *o).collect::<Vec<_>>(), (1..120).collect::<Vec<u64>>());
        assert!(rest[0].1.starts_with("1-"), "the records as written");
        // Held again and again between reads: every record once, in order.
        let more = (120..170).map(|i| Record { key: "k".into(), value: format!("{i}").into() }).collect();
        log.append("t", more).await.unwrap();
        let mut offsets = Vec::new();
        while offsets.len() < 50 {
            reader.hold();
            reader.hold();
            let batch = tokio::time::timeout(Duration::from_secs(20), reader.next_batch(7)).await.unwrap().unwrap();
            offsets.extend(batch.iter().map(|r| r.offset));
        }
        assert_eq!(offsets, (120..170).collect::<Vec<u64>>());
        drop(reader);
        log.close().await.unwrap();
    }

    /// The reader after a held one (its worker died, or the partition was revoked and came
    /// back) reads the partition: the client keeps a pause with the partition, not the
    /// reader, and the next one waited for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_after_a_held_one_reads_the_partition() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let log = open(&cluster).await;
        let records = (0..20).map(|i| Record { key: "k".into(), value: format!("{i}").into() }).collect();
        let p = log.append("t", records).await.unwrap()[0].partition;
        let mut consumer = log.consume("g", "t").await.unwrap();
        let mut readers = assigned(&mut consumer).await;
        let at = readers.iter().position(|r| r.partition() == p).unwrap();
        let mut reader = readers.swap_remove(at);
        assert_eq!(reader.next_batch(1).await.unwrap()[0].offset, 0);
        reader.hold();
        drop(reader);
        let mut again = consumer.reopen(p).await.unwrap();
        let got = read(&mut again, 20).await;
        assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), (0..20).collect::<Vec<u64>>());
        drop((again, readers));
        log.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_topics_partitions_are_followed_through_one_client_each_from_its_own_offset() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let log = open(&cluster).await;
        // Three records in each partition, named for it.
        let keys: Vec<String> = (0..PARTITIONS)
            .map(|p| (0..).map(|i| format!("k{i}")).find(|k| partition_for(k.as_bytes(), PARTITIONS) == p).unwrap())
            .collect();
        for (p, key) in keys.iter().enumerate() {
            let records =
                (0..3).map(|i| Record { key: key.clone().into(), value: format!("p{p}-{i}").into() }).collect();
            log.append("t", records).await.unwrap();
        }
        let expected =
            |p: u32, from: u64| -> Vec<(u64, String)> { (from..3).map(|i| (i, format!("p{p}-{i}"))).collect() };

        // Each partition from an offset of its own, all through one client.
        let mut readers = Vec::new();
        for p in 0..PARTITIONS {
            readers.push(log.follow("t", p, u64::from(p % 3)).await.unwrap());
        }
        let shared = log.followers.lock().unwrap().get("t").cloned().unwrap();
        assert_eq!((log.followers.lock().unwrap().len(), shared.following()), (1, PARTITIONS as usize));
        for (p, reader) in readers.iter_mut().enumerate() {
            let p = p as u32;
            assert_eq!(read(reader, 3 - (p % 3) as usize).await, expected(p, u64::from(p % 3)), "partition {p}");
        }
        // Records appended later reach the partition's own follower.
        log.append("t", vec![Record { key: keys[2].clone().into(), value: "p2-3".into() }]).await.unwrap();
        assert_eq!(read(&mut readers[2], 1).await, vec![(3, "p2-3".to_string())]);

        // A follower dropped gives its partition back: followed again, it starts where asked.
        drop(readers.remove(0));
        assert_eq!(shared.following(), PARTITIONS as usize - 1);
        let mut again = log.follow("t", 0, 1).await.unwrap();
        assert_eq!(read(&mut again, 2).await, expected(0, 1));
        assert_eq!(shared.following(), PARTITIONS as usize);
        // A partition whose follower lives is followed again through a client of its own.
        let mut second = log.follow("t", 0, 0).await.unwrap();
        assert_eq!(read(&mut second, 3).await, expected(0, 0));
        assert_eq!((log.followers.lock().unwrap().len(), shared.following()), (1, PARTITIONS as usize));
        assert!(log.follow("t", PARTITIONS, 0).await.is_err(), "a partition the topic does not have");
        drop((readers, again, second));
        assert_eq!(shared.following(), 0);
        // An offset past the partition's end (a topic made again, an index kept): read from
        // the start, as the topic's readers are set to.
        let mut reset = log.follow("t", 1, 100).await.unwrap();
        assert_eq!(read(&mut reset, 3).await, expected(1, 0));
        log.close().await.unwrap();
    }
}
