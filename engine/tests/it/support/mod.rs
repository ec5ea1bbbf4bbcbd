//! Test fixtures, one file per job: the real server in-process or as a child process
//! (`server`), the one loopback receiver that records every request (`receiver`), a small API
//! client (`api`), reading `/metrics` (`metrics`) and checking signatures as a receiver would
//! (`verify`). Waiting is always on a condition with a deadline (`until`, `eventually`).

mod api;
pub mod metrics;
mod receiver;
mod server;
pub mod verify;

pub use api::{tenant_with_key, Api};
pub use receiver::{serve_http1, Behaviour, Received, Receiver};
pub use server::*;

use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-admin-token-0123456789";

/// Held by every test that uses the RabbitMQ on loopback, since one of them restarts it.
pub static RABBITMQ: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `check` until it returns `Some`, or panics after `timeout` naming `what`.
/// Faults for the embedded log making each sync take `delay` while `slow` is set (a disk
/// that has slowed down), and a handle to set it.
pub fn slow_syncs(delay: Duration) -> (herald::log::embedded::Faults, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let slow = std::sync::Arc::new(AtomicBool::new(false));
    let flag = slow.clone();
    let faults: herald::log::embedded::Faults =
        Some(std::sync::Arc::new(move |fault: herald::log::embedded::Fault<'_>| {
            if matches!(fault, herald::log::embedded::Fault::Sync(..)) && flag.load(Ordering::SeqCst) {
                std::thread::sleep(delay);
            }
            Ok(())
        }));
    (faults, slow)
}

pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
