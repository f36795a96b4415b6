//! How the read-model adapters call their servers (MongoDB, Elasticsearch): every call has a
//! timeout, transient failures are retried with jittered exponential back-off, and a circuit
//! breaker turns a server that keeps failing into an immediate, clear `Unavailable` (a 503 at
//! the query API, a pause in the projectors) until a probe succeeds again.
//!
//! Every breaker reports its state as `callisto_breaker_state{dependency, calls}` (0 closed,
//! 1 half-open, 2 open) and the calls it refused as `callisto_breaker_rejections_total`, so an
//! operator sees which dependency Callisto has stopped calling.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use failsafe::futures::CircuitBreaker as _;

use crate::readmodel::StoreError;

/// A circuit breaker that opens after consecutive failures and reports its state as metrics.
pub type Breaker = failsafe::StateMachine<
    failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::EqualJittered>,
    BreakerMetrics,
>;

/// A breaker for calls to `dependency` (`calls` tells apart two breakers in front of one
/// server, such as reads and writes) that opens after `failures` consecutive failed calls.
pub fn breaker(dependency: &'static str, calls: &'static str, failures: u32) -> Breaker {
    // failsafe's jittered back-off works in whole seconds and halves the first step: a 1 s start
    // could open the breaker for 0 s, so 2 s (open for 1–2 s at first) is the smallest useful one.
    let backoff = failsafe::backoff::equal_jittered(Duration::from_secs(2), Duration::from_secs(30));
    let policy = failsafe::failure_policy::consecutive_failures(failures, backoff);
    failsafe::Config::new().failure_policy(policy).instrument(BreakerMetrics::new(dependency, calls)).build()
}

/// Publishes a breaker's transitions. The gauge is set when the breaker is built, so a scrape
/// shows every breaker, closed ones included.
#[derive(Debug, Clone)]
pub struct BreakerMetrics {
    dependency: &'static str,
    calls: &'static str,
}

/// `callisto_breaker_state` values.
pub const BREAKER_CLOSED: f64 = 0.0;
pub const BREAKER_HALF_OPEN: f64 = 1.0;
pub const BREAKER_OPEN: f64 = 2.0;

impl BreakerMetrics {
    pub fn new(dependency: &'static str, calls: &'static str) -> Self {
        // Breakers are built while a service starts, before its router installs the recorder;
        // installing it here keeps their first state from being dropped.
        crate::telemetry::prometheus();
        let metrics = Self { dependency, calls };
        metrics.state(BREAKER_CLOSED);
        metrics
    }

    fn state(&self, value: f64) {
        metrics::gauge!("callisto_breaker_state", "dependency" => self.dependency, "calls" => self.calls).set(value);
    }
}

impl failsafe::Instrument for BreakerMetrics {
    fn on_call_rejected(&self) {
        metrics::counter!("callisto_breaker_rejections_total", "dependency" => self.dependency, "calls" => self.calls)
            .increment(1);
    }

    fn on_open(&self) {
        tracing::warn!(dependency = self.dependency, calls = self.calls, "circuit breaker opened");
        self.state(BREAKER_OPEN);
    }

    fn on_half_open(&self) {
        self.state(BREAKER_HALF_OPEN);
    }

    fn on_closed(&self) {
        self.state(BREAKER_CLOSED);
    }
}

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
    /// `timeout` bounds each attempt; `attempts` counts the first try. `calls` names this
    /// guard's share of the server's traffic in metrics (`reads`, `writes`, `all`).
    pub fn new(server: &'static str, calls: &'static str, timeout: Duration, attempts: usize) -> Self {
        Self { server, timeout, attempts: attempts.max(1), breaker: breaker(server, calls, BREAKER_FAILURES) }
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
        crate::telemetry::prometheus();
        let guard = Guard::new("test", "all", Duration::from_millis(50), 3);
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
        assert_eq!(scraped("callisto_breaker_state"), Some(BREAKER_OPEN), "an open breaker shows as 2");
        assert!(scraped("callisto_breaker_rejections_total").is_some_and(|n| n >= 1.0));

        // After the breaker's back-off (1–2 s), a successful probe closes it again.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(guard.call("probe", || async { Ok::<_, StoreError>(7) }).await.unwrap(), 7);
        assert_eq!(scraped("callisto_breaker_state"), Some(BREAKER_CLOSED), "closed again after a good probe");
    }

    /// The value of `name` for this test's breaker in a Prometheus scrape.
    fn scraped(name: &str) -> Option<f64> {
        let series = format!("{name}{{dependency=\"test\",calls=\"all\"}} ");
        let scrape = crate::telemetry::prometheus().render();
        scrape.lines().find_map(|line| line.strip_prefix(&series)).map(|value| value.parse().unwrap())
    }
}
