//! Graceful shutdown is a `watch` channel of `bool` handed to every long-running task:
//! `true` means stop taking new work, finish (within a bound) and return.

use tokio::sync::watch;

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
