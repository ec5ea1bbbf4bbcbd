//! Graceful shutdown is a `watch` channel of `bool` handed to every long-running task:
//! `true` means stop taking new work, finish (within a bound) and return.

use tokio::sync::watch;

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps for `pause` unless `stop` comes first: true if the pause ran out, false on stop —
/// the wait every retrying or polling task makes between tries.
pub async fn sleep(pause: std::time::Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => true,
        _ = stopped(stop) => false,
    }
}
