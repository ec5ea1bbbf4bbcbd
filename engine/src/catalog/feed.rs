//! The registry topic as a feed: every process follows it and applies each record in log
//! order, its own writes included, so all processes hold the same subscriptions, tenants and
//! devices and settle a race (two creates of one URL) the same way. A write returns once this
//! process has applied it: read your writes.

use super::CatalogError;
use crate::log::{Log, LogError, LogRecord, Position, Record};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long a write may take to come back through the feed.
const SEEN_WITHIN: Duration = Duration::from_secs(15);

/// How long [`Feed::settled`] may hold a request up (the broker slow or unreachable) before
/// it goes by what this process knows.
const SETTLE_WITHIN: Duration = Duration::from_secs(2);

/// The least time between the starts of two of [`Feed::settled`]'s queries: under a stream of
/// requests (single-event publishes, say) they would otherwise run back to back (each a broker
/// request and a blocking-pool hop); spaced, more requests share each, for at most this much
/// more wait.
const SETTLE_SPACING: Duration = Duration::from_millis(2);

/// The least time between two warnings that requests go by what this process knows: with
/// the broker down every request would log one.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// After a wait that failed, how long requests go by what this process knows at once: with
/// the broker down, each would otherwise be held up the whole [`SETTLE_WITHIN`] (holding its
/// connection), though the last one's answer is a second old at most.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Writes to the registry topic and waits until they have been applied.
pub struct Feed {
    log: Arc<dyn Log>,
    topic: String,
    /// Offset of the next record to apply.
    applied: watch::Receiver<u64>,
    /// Queries of the topic's end started for [`Feed::settled`].
    started: AtomicU64,
    /// Those queries' progress; held while one runs, so they run one at a time.
    settling: tokio::sync::Mutex<Settling>,
    /// Requests that went by what this process knew, and when that was last logged.
    unsettled: std::sync::Mutex<Unsettled>,
}

/// [`Feed::settle`]'s failures since the last warning.
#[derive(Default)]
struct Unsettled {
    /// When the last wait failed.
    failed_at: Option<tokio::time::Instant>,
    /// When the last warning was logged.
    warned_at: Option<tokio::time::Instant>,
    /// Requests gone by what this process knew, not logged since.
    quiet: u64,
}

impl Unsettled {
    /// Whether a wait failed less than [`RETRY_AFTER`] ago (the next request need not wait).
    fn failing(&self) -> bool {
        self.failed_at.is_some_and(|at| tokio::time::Instant::now() < at + RETRY_AFTER)
    }

    /// One more request gone by what this process knows, after a wait of its own that
    /// failed (`waited`) or without one: `Some(requests not logged before it)` when it is to
    /// be logged (a failed wait, at most once per [`WARN_EVERY`]).
    fn failed(&mut self, waited: bool) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if waited {
            self.failed_at = Some(now);
        }
        if !waited || self.warned_at.is_some_and(|at| now < at + WARN_EVERY) {
            self.quiet += 1;
            return None;
        }
        self.warned_at = Some(now);
        Some(std::mem::take(&mut self.quiet))
    }
}

/// A query of the registry topic's end, run as a task of its own: a caller that gives up
/// (its request timed out, its client left) does not abandon it, and the next caller waits
/// for it rather than start another beside it — with the broker down, queries would
/// otherwise pile up on the blocking pool, each for the reader's whole timeout.
type EndQuery = Shared<BoxFuture<'static, Result<u64, String>>>;

/// Where [`Feed::settled`]'s queries are.
#[derive(Default)]
struct Settling {
    /// The number of the last query whose end this process has applied.
    applied: u64,
    /// When the last query started.
    started_at: Option<tokio::time::Instant>,
    /// The last query started, and its number.
    last: Option<(u64, EndQuery)>,
}

/// Advances a [`Feed`]: owned by the task that applies records.
pub struct Applied(watch::Sender<u64>);

impl Applied {
    /// Every record below `next` has been applied.
    pub fn set(&self, next: u64) {
        self.0.send_if_modified(|n| {
            let moved = next > *n;
            *n = (*n).max(next);
            moved
        });
    }
}

impl Feed {
    /// A feed on `topic` whose records below `next` are already applied.
    pub fn new(log: Arc<dyn Log>, topic: String, next: u64) -> (Feed, Applied) {
        let (tx, rx) = watch::channel(next);
        let (settling, unsettled) = Default::default();
        (Feed { log, topic, applied: rx, started: AtomicU64::new(0), settling, unsettled }, Applied(tx))
    }

    /// Appends one record and waits until the follower applied it; returns where it landed.
    pub async fn write(&self, key: &[u8], value: Bytes) -> Result<Position, CatalogError> {
        let rec = Record { key: Bytes::copy_from_slice(key), value };
        let pos = self.log.append(&self.topic, vec![rec]).await?.pop().ok_or(LogError::Closed)?;
        self.applied_up_to(pos.offset + 1).await?;
        Ok(pos)
    }

    /// Waits until every record appended to the registry topic before this call, by any
    /// process, has been applied here: a request waits for it ([`Feed::settle`]), so an
    /// event goes to every subscription whose create had returned when it came, whichever
    /// process made it, and a key revoked anywhere is refused everywhere; a delivery for a
    /// subscription not known here waits for it before deciding it was deleted. Only a
    /// shared log needs it (on the embedded one every record is this process's, applied
    /// before its write returned). Concurrent callers share the query of the topic's end:
    /// each needs one that started after it came — at worst the one running and the next,
    /// started at least [`SETTLE_SPACING`] apart — so a caller waits about two broker round
    /// trips, and a burst of them makes one query, not one apiece; a query that fails fails
    /// every caller waiting for it. Bounded by [`SETTLE_WITHIN`].
    pub async fn settled(&self) -> Result<(), CatalogError> {
        if !self.log.shared() {
            return Ok(());
        }
        let came = self.started.load(Ordering::Acquire);
        let settle = async {
            let mut settling = self.settling.lock().await;
            loop {
                if settling.applied > came {
                    return Ok(());
                }
                // The last query: its answer does if it started after this caller came; if
                // not, it still ends before another starts.
                if let Some((number, query)) = settling.last.clone() {
                    let end = query.await;
                    if number > came {
                        self.applied_up_to(end.map_err(LogError::Backend)?).await?;
                        settling.applied = settling.applied.max(number);
                        return Ok(());
                    }
                }
                if let Some(at) = settling.started_at {
                    tokio::time::sleep_until(at + SETTLE_SPACING).await;
                }
                settling.started_at = Some(tokio::time::Instant::now());
                let number = self.started.fetch_add(1, Ordering::AcqRel) + 1;
                let (log, topic) = (self.log.clone(), self.topic.clone());
                let query = tokio::spawn(async move { log.end_offset(&topic, 0).await.map_err(|e| e.to_string()) })
                    .map(|joined| joined.unwrap_or_else(|e| Err(e.to_string())))
                    .boxed()
                    .shared();
                settling.last = Some((number, query));
            }
        };
        tokio::time::timeout(SETTLE_WITHIN, settle)
            .await
            .unwrap_or(Err(CatalogError::NotSettled { within: SETTLE_WITHIN }))
    }

    /// [`Feed::settled`] for a caller that goes on either way — every API request, so that
    /// a call through this process sees whatever an earlier call changed through any other
    /// (behind a load balancer, a platform's calls land anywhere). When it cannot tell in
    /// time, the request goes by what this process knows: counted, and logged at most once
    /// per [`WARN_EVERY`]; for [`RETRY_AFTER`] after such a failure, requests go by it at once.
    pub async fn settle(&self) {
        if !self.log.shared() {
            return; // one process: nothing to wait for, nothing to count
        }
        let failing = self.unsettled.lock().unwrap().failing();
        let error = match failing {
            true => None,
            false => match self.settled().await {
                Ok(()) => return,
                Err(e) => Some(e),
            },
        };
        metrics::counter!(crate::metrics::CATALOG_UNSETTLED).increment(1);
        let quiet = self.unsettled.lock().unwrap().failed(error.is_some());
        if let (Some(e), Some(quiet)) = (error, quiet) {
            tracing::warn!(error = %e, not_logged_since = quiet, "requests go by the catalog this process knows");
        }
    }

    /// Waits (bounded) until every record below `next` has been applied here.
    async fn applied_up_to(&self, next: u64) -> Result<(), CatalogError> {
        let mut applied = self.applied.clone();
        let seen = tokio::time::timeout(SEEN_WITHIN, applied.wait_for(|n| *n >= next)).await.map(|r| r.is_ok());
        match seen {
            Ok(true) => Ok(()),
            // Appended all the same: not to be read as a write refused.
            Ok(false) | Err(_) => Err(CatalogError::NotReadBack { offset: next, within: SEEN_WITHIN }),
        }
    }
}

/// The next offset after `records` (the registry topic has one partition).
pub fn next_offset(records: &[LogRecord]) -> u64 {
    records.iter().map(|r| r.offset + 1).max().unwrap_or(0)
}

/// Follows the registry topic from `from`, handing each record to `router`, until the log
/// closes or `stop` turns true.
pub async fn follow(
    log: Arc<dyn Log>,
    topic: String,
    from: u64,
    applied: Applied,
    router: super::Router,
    mut stop: watch::Receiver<bool>,
) {
    let mut reader = loop {
        match log.follow(&topic, 0, from).await {
            Ok(r) => break r,
            Err(LogError::Closed) => return,
            Err(e) => tracing::error!(error = %e, "cannot follow the registry topic yet; retrying"),
        }
        if !crate::shutdown::sleep(Duration::from_secs(1), &mut stop).await {
            return;
        }
    };
    loop {
        let batch = tokio::select! {
            b = reader.next_batch(512) => b,
            _ = crate::shutdown::stopped(&mut stop) => return,
        };
        match batch {
            Ok(records) => {
                for rec in &records {
                    router.apply(rec);
                }
                if let Some(last) = records.last() {
                    applied.set(last.offset + 1);
                }
            }
            Err(LogError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "reading the registry topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Records a start reads of the catalog at a time.
const READ_PAGE: usize = 4096;

/// Reads the catalog from its start a page at a time, handing each page to `apply` in log
/// order, and returns where the next record will be. Read whole, on Kafka (which never
/// compacts the segment being written, up to a gigabyte or a week of changes) every version
/// of every subscription was held at once at each start; every record is still applied, in
/// order, as following applies it (a stale change after a delete is judged against it).
pub async fn read_in_pages(log: &dyn Log, topic: &str, mut apply: impl FnMut(&[LogRecord])) -> Result<u64, LogError> {
    let mut end = 0;
    for partition in 0..log.partitions(topic)? {
        let mut from = Some(0);
        while let Some(at) = from {
            let (records, next) = log.read_partition(topic, partition, at, READ_PAGE).await?;
            from = next;
            end = end.max(next_offset(&records));
            apply(&records);
        }
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::stub::Stub;

    /// A start reads the catalog a page at a time, every record in order: read whole, on
    /// Kafka (which never compacts the segment being written, up to a gigabyte or a week of
    /// changes) every version of every subscription was held at once, at every restart.
    #[tokio::test]
    async fn a_start_reads_the_catalog_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let spec =
            crate::log::TopicSpec { compacted: true, keyed: true, ..crate::log::TopicSpec::for_tests("catalog", 1) };
        let log = crate::log::embedded::EmbeddedLog::for_tests(dir.path(), vec![spec]).await;
        let record =
            |key: &'static str, value: String| Record { key: Bytes::from_static(key.as_bytes()), value: value.into() };
        for round in 0..3 {
            let versions = (0..2_000)
                .flat_map(|v| [record("sub_a", format!("a{round}-{v}")), record("sub_b", format!("b{round}-{v}"))]);
            log.append("catalog", versions.collect()).await.unwrap();
        }
        log.append("catalog", vec![record("sub_b", String::new()), record("tenant_c", "c".into())]).await.unwrap();
        let (mut largest, mut offsets, mut last) = (0, Vec::new(), None);
        let next = read_in_pages(&*log, "catalog", |page| {
            largest = largest.max(page.len());
            offsets.extend(page.iter().map(|r| r.offset));
            last = page.last().map(|r| (r.key.clone(), r.value.clone())).or(last.take());
        })
        .await
        .unwrap();
        assert!(largest <= READ_PAGE, "{largest} records held at once");
        assert_eq!(offsets, (0..12_002).collect::<Vec<u64>>(), "every record, in order");
        assert_eq!(last, Some((Bytes::from_static(b"tenant_c"), Bytes::from_static(b"c"))));
        assert_eq!(next, log.end_offset("catalog", 0).await.unwrap());
        log.close().await.unwrap();
    }

    fn stubbed(shared: bool, reachable: bool) -> (Arc<Feed>, Arc<Stub>) {
        let stub = Stub::new(true, reachable);
        let stub = Arc::new(if shared { stub.sharing() } else { stub });
        let (feed, _applied) = Feed::new(stub.clone(), "catalog".into(), 0);
        (Arc::new(feed), stub)
    }

    /// What fifty callers that come together get.
    async fn fifty_at_once(feed: &Arc<Feed>) -> Vec<Result<(), CatalogError>> {
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let feed = feed.clone();
                tokio::spawn(async move { feed.settled().await })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        answers
    }

    #[tokio::test]
    async fn requests_arriving_together_share_the_query_of_the_topics_end() {
        let (feed, stub) = stubbed(true, true);
        for settled in fifty_at_once(&feed).await {
            settled.unwrap();
        }
        // The first caller's query, and one that started after the other 49 came.
        assert_eq!(stub.end_queries.load(Ordering::Relaxed), 2);
        // A caller that comes once those finished needs one of its own.
        feed.settled().await.unwrap();
        assert_eq!(stub.end_queries.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_failed_query_fails_every_caller_waiting_for_it_and_one_given_up_is_not_run_twice() {
        let (feed, stub) = stubbed(true, false);
        for settled in fifty_at_once(&feed).await {
            assert!(settled.is_err());
        }
        assert_eq!(stub.end_queries.load(Ordering::Relaxed), 2, "the 49 waiting share the second's error");
        // Callers that give up while their query runs: the next waits for it, never beside it.
        let (feed, stub) = stubbed(true, true);
        for _ in 0..5 {
            let _ = tokio::time::timeout(Duration::from_millis(3), feed.settled()).await;
        }
        feed.settled().await.unwrap();
        assert_eq!(stub.most_at_once.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn only_a_shared_log_is_asked_and_an_unreachable_one_is_reported() {
        let (feed, stub) = stubbed(false, true);
        feed.settled().await.unwrap();
        assert_eq!(stub.end_queries.load(Ordering::Relaxed), 0, "one process: nothing to catch up with");
        let (feed, _) = stubbed(true, false);
        assert!(matches!(feed.settled().await, Err(CatalogError::Log(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_broker_down_requests_go_on_wait_once_a_second_and_warn_once_per_ten() {
        let (feed, stub) = stubbed(true, false);
        for _ in 0..20 {
            feed.settle().await; // returns: the request goes by what this process knows
        }
        assert_eq!(
            stub.end_queries.load(Ordering::Relaxed),
            1,
            "after a failed wait the next second's requests go at once"
        );
        assert_eq!(feed.unsettled.lock().unwrap().quiet, 19, "the first was logged, the others counted");
        tokio::time::advance(RETRY_AFTER).await;
        feed.settle().await;
        assert_eq!(stub.end_queries.load(Ordering::Relaxed), 2, "a second later, one waits again");
        assert_eq!(feed.unsettled.lock().unwrap().quiet, 20, "and is not logged within ten seconds");

        let mut unsettled = Unsettled::default();
        let logged: Vec<_> = (0..5).map(|_| unsettled.failed(true)).collect();
        assert_eq!(logged, [Some(0), None, None, None, None]);
        tokio::time::advance(WARN_EVERY).await;
        assert_eq!(unsettled.failed(false), None, "a request that did not wait is counted, not logged");
        assert_eq!(unsettled.failed(true), Some(5), "the next warning says how many were not logged");
        assert_eq!(unsettled.failed(true), None);
    }
}
