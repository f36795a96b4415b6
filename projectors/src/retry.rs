//! Back-off with jitter (from `backon`), and a retry loop that gives up only on shutdown.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Exponential back-off from 50 ms to 5 s with full jitter, so paused workers do not retry in
/// lock-step against a recovering dependency.
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Calls `op` until it succeeds, sleeping with back-off between failures. Returns `None` only
/// when `shutdown` is cancelled first.
pub async fn until_ok<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    shutdown: &CancellationToken,
    mut op: impl FnMut() -> F,
) -> Option<T> {
    let mut delays = backoff();
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(what, failures, "recovered");
                }
                return Some(value);
            }
            Err(e) => {
                failures += 1;
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                // The first failures are routine (a busy store); say so loudly once it persists.
                if failures == 3 {
                    tracing::warn!(what, error = %e, "dependency failing; pausing with back-off");
                } else {
                    tracing::debug!(what, error = %e, ?delay, "retrying");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
