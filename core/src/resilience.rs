//! How the read-model adapters call their servers (MongoDB, Elasticsearch): every call has a
//! timeout, transient failures are retried with jittered exponential back-off, and a circuit
//! breaker turns a server that keeps failing into an immediate, clear `Unavailable` (a 503 at
//! the query API, a pause in the projectors) until a probe succeeds again.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use failsafe::futures::CircuitBreaker as _;

use crate::readmodel::StoreError;

type Breaker =
    failsafe::StateMachine<failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>, ()>;

/// Bound on one attempt of a read serving an HTTP request, so a query API in front of a dead
/// server answers 503 within seconds (two attempts) until the breaker answers at once.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Consecutive failed calls (after their retries) that open the breaker.
const BREAKER_FAILURES: u32 = 5;

pub struct Guard {
    server: &'static str,
    timeout: Duration,
    attempts: usize,
    breaker: Breaker,
}

impl Guard {
    /// `timeout` bounds each attempt; `attempts` counts the first try.
    pub fn new(server: &'static str, timeout: Duration, attempts: usize) -> Self {
        // Whole seconds, first step halved and jittered: open for 1–2 s at first, up to 30 s.
        let backoff = failsafe::backoff::equal_jittered(Duration::from_secs(2), Duration::from_secs(30));
        let policy = failsafe::failure_policy::consecutive_failures(BREAKER_FAILURES, backoff);
        Self {
            server,
            timeout,
            attempts: attempts.max(1),
            breaker: failsafe::Config::new().failure_policy(policy).build(),
        }
    }

    /// Runs `op`, retrying `Unavailable` (which includes timeouts) behind the breaker. Refusals
    /// (`Rejected`, `InvalidRequest`) are answers, not outages: they neither retry nor trip it.
    pub async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let timeout = self.timeout;
        let attempt = || {
            let call = op();
            async move {
                match tokio::time::timeout(timeout, call).await {
                    Ok(result) => result,
                    Err(_) => Err(StoreError::Unavailable(format!("no answer within {timeout:?}"))),
                }
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .with_max_times(self.attempts - 1)
            .with_jitter();
        let retried = attempt.retry(backoff).when(|e| matches!(e, StoreError::Unavailable(_)));
        let is_outage = |e: &StoreError| matches!(e, StoreError::Unavailable(_));
        match self.breaker.call_with(is_outage, retried).await {
            Ok(value) => Ok(value),
            Err(failsafe::Error::Rejected) => Err(StoreError::Unavailable(format!(
                "{}: {what}: the server keeps failing; calls are paused until it recovers",
                self.server
            ))),
            Err(failsafe::Error::Inner(StoreError::Unavailable(e))) => {
                Err(StoreError::Unavailable(format!("{}: {what}: {e}", self.server)))
            }
            Err(failsafe::Error::Inner(other)) => Err(other),
        }
    }
}

/// Back-off for re-sending the items of a bulk request that the server asked to retry (429,
/// 5xx): a few jittered, growing pauses, then the caller gives up and reports an outage.
pub fn item_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(4)
        .with_jitter()
        .build()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn outages_are_retried_then_paused_and_refusals_pass_through() {
        let guard = Guard::new("test", Duration::from_millis(50), 3);
        let calls = AtomicUsize::new(0);
        let failing = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(StoreError::Unavailable("down".into()))
        };
        let error = guard.call("probe", failing).await.unwrap_err();
        assert!(error.to_string().contains("test: probe: down"), "{error}");
        assert_eq!(calls.load(Ordering::SeqCst), 3, "three attempts");

        // A hanging call is cut off by the timeout and counts as an outage.
        let started = Instant::now();
        let hanging = guard.call("hang", std::future::pending::<Result<(), StoreError>>).await.unwrap_err();
        assert!(hanging.to_string().contains("no answer within"), "{hanging}");
        assert!(started.elapsed() < Duration::from_secs(2));

        // A refusal is an answer: no retry, no breaker.
        calls.store(0, Ordering::SeqCst);
        let refused = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(StoreError::InvalidRequest("bad query".into()))
        };
        assert!(matches!(guard.call("query", refused).await, Err(StoreError::InvalidRequest(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Five failed calls in a row (the refusal showed the server alive, so counting starts
        // again) open the breaker: the next fails at once, without calling.
        for _ in 0..5 {
            let _ = guard.call("probe", failing).await;
        }
        calls.store(0, Ordering::SeqCst);
        let paused = guard.call("probe", failing).await.unwrap_err();
        assert!(paused.to_string().contains("paused"), "{paused}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        // After the breaker's back-off (1–2 s), a successful probe closes it again.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(guard.call("probe", || async { Ok::<_, StoreError>(7) }).await.unwrap(), 7);
    }
}
