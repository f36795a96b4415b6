//! Scheduling priority for work that may lag behind the request path.
//!
//! `callisto dev` runs the search index in the same process as the HTTP API, where it shares the
//! cores with work that callers wait on: commands being acknowledged, reads, and the documents
//! projection that read-your-writes depends on. Full-text search is allowed to trail (its
//! freshness target is a second), while its indexing and segment merges are the heaviest CPU
//! users in the process. So a process that serves requests calls [`yield_to_requests`], and from
//! then on the search index's threads run at a higher nice value: under contention the kernel
//! gives the others the cores first, and when they are idle the index gets every cycle left.
//!
//! A process that only projects or rebuilds (`callisto projector`, `callisto replay`) leaves its
//! threads as they are: there, holding the index back would only leave cores idle at the end,
//! when the documents projection is done and the index is not.
//!
//! On Linux the nice value belongs to a thread, and threads it starts inherit it; that is how
//! tantivy's own indexing and merge threads end up at the lower priority.

use std::sync::atomic::{AtomicBool, Ordering};

static YIELD_TO_REQUESTS: AtomicBool = AtomicBool::new(false);

/// From now on, background threads of this process ([`enter_background`]) run below the request
/// path. Called by a process that serves requests beside its projectors.
pub fn yield_to_requests() {
    YIELD_TO_REQUESTS.store(true, Ordering::Relaxed);
}

/// Marks the calling thread as background work: in a process that [`yield_to_requests`], its
/// priority is lowered to [`BACKGROUND_NICE`], and threads it starts inherit that.
pub fn enter_background() {
    if YIELD_TO_REQUESTS.load(Ordering::Relaxed) {
        lower_current_thread(BACKGROUND_NICE);
    }
}

/// The nice value of background threads: when both are runnable, CFS gives a nice-0 thread
/// about nine times the CPU of a nice-10 one.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to at least `nice` (the threads it starts later inherit
/// it). A platform or sandbox that refuses leaves it as it is: priority is an optimisation,
/// never a reason to fail.
fn lower_current_thread(nice: i32) {
    // Never raise it: a process started at a higher nice value keeps it (and an unprivileged
    // one could not go lower anyway).
    let nice = current_nice().map_or(nice, |now| now.max(nice));
    let thread = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(thread), nice) {
        tracing::debug!(error = %e, nice, "could not lower a background thread's priority");
    }
}

/// The calling thread's nice value, where the platform reports one.
pub fn current_nice() -> Option<i32> {
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_thread_and_the_threads_it_starts_run_at_the_lower_priority() {
        let base = current_nice().expect("the platform reports nice values");
        let (lowered, started) = std::thread::spawn(move || {
            lower_current_thread(base + 5);
            (current_nice(), std::thread::spawn(current_nice).join().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(lowered, Some(base + 5));
        assert_eq!(started, Some(base + 5), "a thread started from it inherits the priority");
        assert_eq!(current_nice(), Some(base), "other threads are left alone");
    }
}
