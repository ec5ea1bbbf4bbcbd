//! A log for unit tests of what sits on top of one: it keeps nothing and reads nothing.

use super::{Consumer, Log, LogError, LogRecord, PartitionReader, Position, Record};
use async_trait::async_trait;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// One partition per topic, always empty. Appends are kept (each one's records in `appends`)
/// when `taking`, refused as closed otherwise; reaching its end fails and it is not
/// ready when it is not `reachable` (a broker that is down). A `shared` one stands for a
/// broker: each query of a partition's end takes 20 ms, and is counted in `end_queries`
/// (the most running at once in `most_at_once`).
pub struct Stub {
    pub taking: bool,
    /// Appends to topics whose name holds this are refused as too large.
    pub too_large: Option<&'static str>,
    pub reachable: bool,
    pub shared: bool,
    pub appends: Mutex<Vec<Vec<Record>>>,
    pub end_queries: AtomicUsize,
    pub most_at_once: AtomicUsize,
    running: AtomicUsize,
    /// While set, appends wait (a stalled disk or broker); `started` counts those begun.
    pub stalled: std::sync::atomic::AtomicBool,
    pub started: AtomicUsize,
    resumed: tokio::sync::Notify,
    /// While set, a query of a partition's end never answers (a broker gone quiet).
    pub ends_hang: std::sync::atomic::AtomicBool,
}

impl Stub {
    pub fn new(taking: bool, reachable: bool) -> Stub {
        Stub {
            taking,
            too_large: None,
            reachable,
            shared: false,
            appends: Mutex::default(),
            end_queries: AtomicUsize::new(0),
            most_at_once: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            stalled: Default::default(),
            started: AtomicUsize::new(0),
            resumed: tokio::sync::Notify::new(),
            ends_hang: Default::default(),
        }
    }

    /// Lets stalled appends finish (and later ones run at once).
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
        self.resumed.notify_waiters();
    }

    /// This stub refusing appends to topics whose name holds `part` as too large.
    pub fn refusing_as_too_large(self, part: &'static str) -> Stub {
        Stub { too_large: Some(part), ..self }
    }

    /// This stub standing for a broker shared with other processes.
    pub fn sharing(self) -> Stub {
        Stub { shared: true, ..self }
    }
}

#[async_trait]
impl Log for Stub {
    fn partitions(&self, _: &str) -> Result<u32, LogError> {
        Ok(1)
    }
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        loop {
            let resumed = self.resumed.notified();
            if !self.stalled.load(Ordering::SeqCst) {
                break;
            }
            resumed.await;
        }
        if !self.taking {
            return Err(LogError::Closed);
        }
        if self.too_large.is_some_and(|t| topic.contains(t)) {
            return Err(LogError::TooLarge { bytes: 1, max: 0 });
        }
        let positions = (0..records.len() as u64).map(|offset| Position { partition: 0, offset }).collect();
        self.appends.lock().unwrap().push(records);
        Ok(positions)
    }
    async fn read_all(&self, _: &str) -> Result<Vec<LogRecord>, LogError> {
        Ok(Vec::new())
    }
    async fn read_partition(
        &self,
        _: &str,
        _: u32,
        _: u64,
        _: usize,
    ) -> Result<(Vec<LogRecord>, Option<u64>), LogError> {
        Ok((Vec::new(), None))
    }
    async fn end_offset(&self, _: &str, _: u32) -> Result<u64, LogError> {
        self.end_queries.fetch_add(1, Ordering::Relaxed);
        if self.ends_hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.shared {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_at_once.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
        }
        if self.reachable {
            Ok(0)
        } else {
            Err(LogError::Backend("the broker is unreachable".into()))
        }
    }
    async fn consume(&self, _: &str, _: &str) -> Result<Box<dyn Consumer>, LogError> {
        Err(LogError::Closed)
    }
    async fn follow(&self, _: &str, _: u32, _: u64) -> Result<Box<dyn PartitionReader>, LogError> {
        Err(LogError::Closed)
    }
    async fn ready(&self) -> bool {
        self.reachable
    }
    fn shared(&self) -> bool {
        self.shared
    }
    fn max_record_bytes(&self) -> Option<usize> {
        None
    }
    fn read_up_to(&self, _: &str, _: u32, _: u64) {}
    fn broken(&self) -> Option<String> {
        None
    }
    async fn close(&self) -> Result<(), LogError> {
        Ok(())
    }
}
