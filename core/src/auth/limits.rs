//! Rate limits as token buckets (governor's GCRA): one bucket per caller and budget, so a caller
//! hammering commands never slows its own reads or anybody else, plus one bucket per source
//! address for requests without valid credentials (credential guessing).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::{Limit, LimitSettings};

/// The route groups that each get their own budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    Commands,
    Reads,
    Search,
    Admin,
}

impl Budget {
    pub fn name(self) -> &'static str {
        match self {
            Self::Commands => "commands",
            Self::Reads => "reads",
            Self::Search => "search",
            Self::Admin => "admin",
        }
    }
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;
/// One limiter per (budget, limit), each keyed by caller.
type CallerLimiters = HashMap<(Budget, Limit), Arc<Keyed<String>>>;

/// What a bucket said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed { limit: u32, remaining: u32, reset_secs: u64 },
    Limited { limit: u32, retry_after_secs: u64 },
}

pub struct RateLimits {
    defaults: LimitSettings,
    /// Callers' buckets, one limiter per (budget, limit): keys with their own limit get theirs.
    callers: RwLock<CallerLimiters>,
    anonymous: Keyed<IpAddr>,
    clock: DefaultClock,
}

fn quota(limit: Limit) -> Quota {
    let per_second = NonZeroU32::new(limit.per_second).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_second).allow_burst(NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN))
}

impl RateLimits {
    /// The limits, with a background sweep that forgets idle buckets so memory stays bounded
    /// however many callers and addresses come and go.
    pub fn new(defaults: LimitSettings) -> Arc<Self> {
        let limits = Arc::new(Self {
            anonymous: RateLimiter::keyed(quota(defaults.anonymous)).with_middleware(),
            defaults,
            callers: RwLock::new(HashMap::new()),
            clock: DefaultClock::default(),
        });
        let weak: Weak<Self> = Arc::downgrade(&limits);
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    let Some(limits) = weak.upgrade() else { return };
                    limits.anonymous.retain_recent();
                    for limiter in limits.callers.read().expect("limits lock").values() {
                        limiter.retain_recent();
                    }
                }
            });
        }
        limits
    }

    pub fn default_for(&self, budget: Budget) -> Limit {
        match budget {
            Budget::Commands => self.defaults.commands,
            Budget::Reads => self.defaults.reads,
            Budget::Search => self.defaults.search,
            Budget::Admin => self.defaults.admin,
        }
    }

    /// Takes one token from `caller`'s `budget`; `own` replaces the default limit.
    pub fn check_caller(&self, budget: Budget, caller: &str, own: Option<Limit>) -> Verdict {
        let limit = own.unwrap_or_else(|| self.default_for(budget));
        let existing = self.callers.read().expect("limits lock").get(&(budget, limit)).cloned();
        let limiter = match existing {
            Some(limiter) => limiter,
            None => self
                .callers
                .write()
                .expect("limits lock")
                .entry((budget, limit))
                .or_insert_with(|| Arc::new(RateLimiter::keyed(quota(limit)).with_middleware()))
                .clone(),
        };
        self.verdict(limit, limiter.check_key(&caller.to_owned()))
    }

    /// Takes one token from the bucket of a source address that sent no valid credentials.
    pub fn check_anonymous(&self, source: IpAddr) -> Verdict {
        self.verdict(self.defaults.anonymous, self.anonymous.check_key(&source))
    }

    fn verdict(
        &self,
        limit: Limit,
        outcome: Result<governor::middleware::StateSnapshot, governor::NotUntil<<DefaultClock as Clock>::Instant>>,
    ) -> Verdict {
        match outcome {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = limit.burst.saturating_sub(remaining) as u64;
                Verdict::Allowed {
                    limit: limit.burst,
                    remaining,
                    reset_secs: missing.div_ceil(limit.per_second as u64),
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Verdict::Limited { limit: limit.burst, retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64 }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> LimitSettings {
        let limit = Limit { per_second: 1, burst: 3 };
        LimitSettings { commands: limit, reads: limit, search: limit, admin: limit, anonymous: limit }
    }

    #[tokio::test]
    async fn a_burst_over_the_budget_is_limited_without_touching_other_budgets_or_callers() {
        let limits = RateLimits::new(small());
        for expected_remaining in [2, 1, 0] {
            match limits.check_caller(Budget::Commands, "a", None) {
                Verdict::Allowed { remaining, limit, .. } => {
                    assert_eq!((remaining, limit), (expected_remaining, 3));
                }
                other => panic!("within the burst: {other:?}"),
            }
        }
        assert!(matches!(
            limits.check_caller(Budget::Commands, "a", None),
            Verdict::Limited { retry_after_secs: 1, .. }
        ));
        assert!(matches!(limits.check_caller(Budget::Reads, "a", None), Verdict::Allowed { .. }), "other budget");
        assert!(matches!(limits.check_caller(Budget::Commands, "b", None), Verdict::Allowed { .. }), "other caller");
        let own = Some(Limit { per_second: 100, burst: 100 });
        assert!(matches!(limits.check_caller(Budget::Commands, "a", own), Verdict::Allowed { limit: 100, .. }));
    }
}
