//! Group commit for the embedded stores: many writers, one transaction and one fsync.
//!
//! A durable redb commit costs an fsync, and redb runs one write transaction at a time, so
//! writers that each commit their own transaction queue behind each other's fsyncs. A
//! [`GroupCommit`] gives the store one writer thread instead: it takes every request queued
//! while the previous commit was syncing, hands them to the store's `commit` function in
//! arrival order (one transaction), and answers each caller once that commit is durable.
//!
//! A group whose commit fails is retried one request at a time, so a request the store
//! cannot take fails alone instead of failing everyone queued beside it.
//!
//! A store whose commits are not all durable (see the documents store) gives its writer an
//! [`IdleFlush`]: once no request has come for a while after a commit, the writer runs it, so
//! what was committed last becomes durable without waiting for the next request.
//!
//! A store whose callers do not wait on the commit for an answer to someone else (the documents
//! store, fed by projectors) may give its writer a [`WriterOptions::linger`]: while requests come
//! from several callers at once, commits start at most once per linger, so each takes more of
//! them. A commit's cost is mostly per transaction (copying the touched pages of every table,
//! writing them out), so under a steady stream of small batches fewer, larger commits do the same
//! work for less CPU, at the price of that much freshness. A lone request still commits at once.
//! The linger may grow with the load ([`Linger`]): above a rate of work the writer's commits
//! compete with the traffic that brings it for the same cores, and longer lingers then spend
//! less of them per unit of work, while a moderate load keeps the short one.

use tokio::sync::{mpsc, oneshot};

use crate::readmodel::StoreError;

struct Pending<R, T> {
    request: R,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

/// What the writer runs once it has been idle for `after` since its last commit, and again
/// when it stops.
pub struct IdleFlush {
    pub after: std::time::Duration,
    pub run: Box<dyn FnMut() + Send>,
}

/// What a writer does beyond committing what is queued.
pub struct WriterOptions<R> {
    /// Run once the writer has been idle after a commit.
    pub flush: Option<IdleFlush>,
    /// After a commit of more than one request, how long from its start the next commit waits:
    /// requests arriving meanwhile join the next group.
    pub linger: Option<Linger>,
    /// The work a request brings, in the unit of [`Linger::knee`] (1 per request by default).
    pub weigh: Weigh<R>,
}

/// How much work a request brings a writer (see [`Linger`]).
pub type Weigh<R> = fn(&R) -> usize;

impl<R> Default for WriterOptions<R> {
    fn default() -> Self {
        Self { flush: None, linger: None, weigh: |_| 1 }
    }
}

/// How long a writer lets requests gather after a commit shared by several callers: `least`
/// while the work arriving stays at or below `knee` per second, then in proportion to it, up
/// to `most`. The rate is the writer's own measure of what its groups brought over about the
/// last 100 ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Linger {
    pub least: std::time::Duration,
    pub most: std::time::Duration,
    /// Work per second (as [`WriterOptions::weigh`] counts it) above which the linger grows.
    pub knee: f64,
}

impl Linger {
    /// The same linger whatever the load.
    pub const fn fixed(linger: std::time::Duration) -> Self {
        Self { least: linger, most: linger, knee: f64::INFINITY }
    }

    /// The linger at `per_second` units of work arriving. Never panics: a rate too large to
    /// scale the linger by gets `most`, and one that is not a number gets `least`.
    pub fn at(&self, per_second: f64) -> std::time::Duration {
        if per_second.is_nan() || per_second <= self.knee {
            return self.least;
        }
        let most = self.most.max(self.least);
        std::time::Duration::try_from_secs_f64(self.least.as_secs_f64() * per_second / self.knee)
            .map_or(most, |scaled| scaled.clamp(self.least, most))
    }
}

/// The rate of work reaching a writer, as a moving average over about [`Self::WINDOW`]: each
/// group's work over the time since the group before it, weighted by how much of the window
/// that time covers, so an idle spell counts as the quiet it was; read at a later time, it has
/// decayed by the quiet since the last group.
#[derive(Debug, Default)]
struct WorkRate {
    per_second: f64,
    last: Option<std::time::Instant>,
}

impl WorkRate {
    const WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

    /// Records a group of `work` taken at `now`.
    fn record(&mut self, work: usize, now: std::time::Instant) {
        if let Some(last) = self.last.replace(now) {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            if elapsed > 0.0 {
                let share = 1.0 - (-elapsed / Self::WINDOW.as_secs_f64()).exp();
                self.per_second += share * (work as f64 / elapsed - self.per_second);
            }
        }
    }

    /// The rate as of `now`.
    fn per_second(&self, now: std::time::Instant) -> f64 {
        let quiet = self.last.map_or(0.0, |last| now.saturating_duration_since(last).as_secs_f64());
        self.per_second * (-quiet / Self::WINDOW.as_secs_f64()).exp()
    }
}

/// A writer thread committing requests of type `R` in groups, answering each with a `T`.
pub struct GroupCommit<R, T> {
    queue: Option<mpsc::Sender<Pending<R, T>>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl<R, T> std::fmt::Debug for GroupCommit<R, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl<R: Send + 'static, T: Send + 'static> GroupCommit<R, T> {
    /// Starts the writer thread `name` with `options`. `commit` applies a group in one
    /// transaction and returns one answer per request, in order; it runs on the writer thread,
    /// which may block.
    pub fn start<F>(
        name: &'static str,
        max_group: usize,
        options: WriterOptions<R>,
        mut commit: F,
    ) -> Result<Self, StoreError>
    where
        F: FnMut(&[R]) -> Result<Vec<T>, StoreError> + Send + 'static,
    {
        let max_group = max_group.max(1);
        let (queue, mut incoming) = mpsc::channel::<Pending<R, T>>(max_group);
        let WriterOptions { flush, linger, weigh } = options;
        // Waiting for a request with a time limit needs a timer.
        let mut idle = match flush {
            None => None,
            Some(flush) => {
                let clock = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                Some((flush, clock))
            }
        };
        let writer = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut group = Vec::with_capacity(max_group);
                let mut unflushed = false;
                // When the last commit started, and whether it took more than one request.
                let mut last: Option<(std::time::Instant, bool)> = None;
                let mut rate = WorkRate::default();
                loop {
                    let first = match &mut idle {
                        Some((flush, clock)) if unflushed => {
                            let waited =
                                clock.block_on(async { tokio::time::timeout(flush.after, incoming.recv()).await });
                            match waited {
                                Ok(next) => next,
                                Err(_) => {
                                    (flush.run)();
                                    unflushed = false;
                                    continue;
                                }
                            }
                        }
                        _ => incoming.blocking_recv(),
                    };
                    let Some(first) = first else { break };
                    unflushed = true;
                    group.push(first);
                    if let (Some(linger), Some((started, shared))) = (linger, last)
                        && shared
                        && let Some(rest) =
                            linger.at(rate.per_second(std::time::Instant::now())).checked_sub(started.elapsed())
                    {
                        std::thread::sleep(rest);
                    }
                    while group.len() < max_group {
                        match incoming.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    let (started, size) = (std::time::Instant::now(), group.len());
                    last = Some((started, size > 1));
                    if linger.is_some() {
                        rate.record(group.iter().map(|p| weigh(&p.request)).sum(), started);
                    }
                    answer(&mut commit, &mut group);
                    metrics::histogram!("callisto_store_group_commit_seconds", "writer" => name)
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("callisto_store_group_commit_size", "writer" => name).record(size as f64);
                }
                if let Some((flush, _)) = &mut idle
                    && unflushed
                {
                    (flush.run)();
                }
            })
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Self { queue: Some(queue), writer: Some(writer) })
    }

    /// Queues `request` for the next group and waits until its commit is durable.
    pub async fn submit(&self, request: R) -> Result<T, StoreError> {
        let closed = || StoreError::Unavailable("the store is closing".into());
        let queue = self.queue.as_ref().ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        queue.send(Pending { request, reply }).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

#[cfg(test)]
impl<R, T> GroupCommit<R, T> {
    /// Requests waiting for the writer to take them.
    fn queued(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.max_capacity() - q.capacity())
    }
}

/// Commits `group` and answers every request in it; on failure, each request alone.
fn answer<R, T, F>(commit: &mut F, group: &mut Vec<Pending<R, T>>)
where
    F: FnMut(&[R]) -> Result<Vec<T>, StoreError>,
{
    let (requests, replies): (Vec<R>, Vec<_>) = group.drain(..).map(|p| (p.request, p.reply)).unzip();
    match commit(&requests) {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(e) if requests.len() == 1 => {
            let _ = replies.into_iter().next().map(|reply| reply.send(Err(e)));
        }
        Err(_) => {
            for (request, reply) in requests.into_iter().zip(replies) {
                let alone = commit(std::slice::from_ref(&request))
                    .and_then(|mut answers| answers.pop().ok_or_else(|| StoreError::Unavailable("no answer".into())));
                let _ = reply.send(alone);
            }
        }
    }
}

impl<R, T> Drop for GroupCommit<R, T> {
    fn drop(&mut self) {
        // The writer commits what is queued and exits; joining it means the store's file is
        // released when the store is dropped.
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::GroupCommit;
    use crate::readmodel::StoreError;

    type Groups = Arc<Mutex<Vec<Vec<i64>>>>;

    /// A store that records each group it commits, refuses any group holding a negative
    /// number, and first waits until `open`, so requests pile up behind a commit in progress.
    fn store(groups: Groups, open: Arc<AtomicBool>, started: Arc<AtomicUsize>) -> Arc<GroupCommit<i64, i64>> {
        store_with(groups, open, started, super::WriterOptions::default())
    }

    /// [`store`], with the writer's `options`.
    fn store_with(
        groups: Groups,
        open: Arc<AtomicBool>,
        started: Arc<AtomicUsize>,
        options: super::WriterOptions<i64>,
    ) -> Arc<GroupCommit<i64, i64>> {
        let writer = GroupCommit::start("test-writer", 64, options, move |group: &[i64]| {
            started.fetch_add(1, Ordering::SeqCst);
            while !open.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            groups.lock().unwrap().push(group.to_vec());
            if group.iter().any(|n| *n < 0) {
                return Err(StoreError::Rejected(format!("negative in {group:?}")));
            }
            Ok(group.iter().map(|n| n * 10).collect())
        });
        Arc::new(writer.unwrap())
    }

    /// Submits `first`, and once its commit is held back, `then`; lets the commits go and
    /// returns every answer, `first`'s first, and the groups committed.
    async fn submit_behind_a_commit(first: i64, then: &[i64]) -> (Vec<Result<i64, String>>, Vec<Vec<i64>>) {
        let (groups, open, started) =
            (Groups::default(), Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let writer = store(groups.clone(), open.clone(), started.clone());
        let submit = |n: i64| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.submit(n).await.map_err(|e| e.to_string()) })
        };
        let mut pending = vec![submit(first)];
        // The writer has taken `first` and waits at the gate.
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pending.extend(then.iter().map(|n| submit(*n)));
        while writer.queued() < then.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        open.store(true, Ordering::SeqCst);
        let mut answers = Vec::new();
        for answer in pending {
            answers.push(answer.await.unwrap());
        }
        let groups = groups.lock().unwrap().clone();
        (answers, groups)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_queued_during_a_commit_share_the_next_one() {
        let (answers, groups) = submit_behind_a_commit(1, &[2, 3, 4, 5, 6, 7, 8, 9]).await;
        assert_eq!(answers, (1..=9).map(|n| Ok(n * 10)).collect::<Vec<_>>(), "each request gets its own answer");
        assert_eq!(groups.len(), 2, "the first commit, then one for the eight queued behind it: {groups:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_shared_commit_a_lingering_writer_gathers_what_arrives_within_the_linger() {
        let linger = super::Linger::fixed(Duration::from_secs(2));
        let options = super::WriterOptions { linger: Some(linger), ..Default::default() };
        // Requests arriving apart within the linger after a shared commit share one too.
        let groups = groups_after(options, [2, 3], Duration::from_millis(100)).await;
        assert_eq!(groups, vec![vec![1], vec![2, 3], vec![4, 5]]);
    }

    /// On a writer with `options`: commits `1`, then the two `queued` together behind a held
    /// commit, then `4` and, `gap` later, `5`. Returns the groups committed.
    async fn groups_after(options: super::WriterOptions<i64>, queued: [i64; 2], gap: Duration) -> Vec<Vec<i64>> {
        let (groups, open, started) =
            (Groups::default(), Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let writer = store_with(groups.clone(), open.clone(), started.clone(), options);
        let submit = |n: i64| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.submit(n).await.map_err(|e| e.to_string()) })
        };
        // Two requests queue behind a commit held back, so they share the next one.
        let first = submit(1);
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // One at a time, so the group's order is the order they were sent in.
        let mut answers = Vec::new();
        for n in queued {
            answers.push(submit(n));
            while writer.queued() < answers.len() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        open.store(true, Ordering::SeqCst);
        assert_eq!(first.await.unwrap(), Ok(10));
        for answer in answers {
            answer.await.unwrap().unwrap();
        }
        let fourth = submit(4);
        tokio::time::sleep(gap).await;
        let fifth = submit(5);
        assert_eq!((fourth.await.unwrap(), fifth.await.unwrap()), (Ok(40), Ok(50)));
        groups.lock().unwrap().clone()
    }

    /// A writer that lingers 20 ms up to a knee of 1,000 units a second and up to 2 s above it,
    /// each request weighing its own value.
    fn lingering_with_the_load() -> super::WriterOptions<i64> {
        let ms = Duration::from_millis;
        super::WriterOptions {
            linger: Some(super::Linger { least: ms(20), most: ms(2_000), knee: 1_000.0 }),
            weigh: |n: &i64| usize::try_from(*n).unwrap_or(0),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_lingers_longer_after_a_load_above_the_knee() {
        // Half a million units within well under a second: far above the knee, so the next
        // commit waits up to 2 s and the two requests 300 ms apart share it.
        let groups = groups_after(lingering_with_the_load(), [200_000, 300_000], Duration::from_millis(300)).await;
        assert_eq!(groups, vec![vec![1], vec![200_000, 300_000], vec![4, 5]]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_keeps_its_least_linger_below_the_knee() {
        // Five units: below the knee, the linger stays at 20 ms and the requests commit apart.
        let groups = groups_after(lingering_with_the_load(), [2, 3], Duration::from_millis(300)).await;
        assert_eq!(groups, vec![vec![1], vec![2, 3], vec![4], vec![5]]);
    }

    #[test]
    fn a_linger_grows_with_the_load_above_its_knee_up_to_its_most() {
        let ms = Duration::from_millis;
        let linger = super::Linger { least: ms(2), most: ms(10), knee: 4_000.0 };
        assert_eq!(linger.at(0.0), ms(2));
        assert_eq!(linger.at(4_000.0), ms(2), "at the knee");
        assert_eq!(linger.at(8_000.0), ms(4), "twice the knee, twice the linger");
        assert_eq!(linger.at(20_000.0), ms(10));
        assert_eq!(linger.at(1e9), ms(10), "never past the most");
        assert_eq!(linger.at(f64::INFINITY), ms(10), "too large to scale by");
        assert_eq!(linger.at(1e300), ms(10), "too large to scale by");
        assert_eq!(linger.at(f64::NAN), ms(2));
        assert_eq!(super::Linger::fixed(ms(2)).at(1e9), ms(2));
    }

    #[test]
    fn a_work_rate_follows_a_steady_rate_and_drops_after_a_quiet_spell() {
        let mut rate = super::WorkRate::default();
        let start = std::time::Instant::now();
        // 20 units every 2 ms for 0.8 s: 10,000 a second.
        for i in 0..400 {
            rate.record(20, start + Duration::from_millis(2 * i));
        }
        let last = start + Duration::from_millis(2 * 399);
        let steady = rate.per_second(last);
        assert!((9_900.0..=10_100.0).contains(&steady), "{steady}");
        // Read half a second later, or given one unit then, it has fallen well below.
        let later = last + Duration::from_millis(500);
        assert!(rate.per_second(later) < 100.0, "{}", rate.per_second(later));
        rate.record(1, later);
        assert!(rate.per_second(later) < 100.0, "{}", rate.per_second(later));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lingering_writer_commits_a_lone_request_at_once() {
        let groups = Groups::default();
        // Far longer than the wait below: a request that lingered would miss it.
        let options =
            super::WriterOptions { linger: Some(super::Linger::fixed(Duration::from_secs(30))), ..Default::default() };
        let writer = store_with(groups.clone(), Arc::new(AtomicBool::new(true)), Arc::default(), options);
        for n in 1..=3 {
            let answer = tokio::time::timeout(Duration::from_secs(10), writer.submit(n)).await;
            assert!(matches!(answer, Ok(Ok(_))), "request {n} was answered at once: {answer:?}");
        }
        assert_eq!(groups.lock().unwrap().clone(), vec![vec![1], vec![2], vec![3]]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_the_store_refuses_fails_alone() {
        let (answers, groups) = submit_behind_a_commit(0, &[3, -1, 4]).await;
        assert_eq!(answers[0], Ok(0));
        assert_eq!(answers[1], Ok(30));
        assert!(answers[2].as_ref().is_err_and(|e| e.contains("negative in [-1]")), "{answers:?}");
        assert_eq!(answers[3], Ok(40));
        assert!(groups.iter().any(|g| g.len() == 3), "the three shared a group first: {groups:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_writer_flushes_once_after_its_last_commit_and_again_when_it_stops() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let counted = flushes.clone();
        let flush = super::IdleFlush {
            after: Duration::from_millis(30),
            run: Box::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
            }),
        };
        let writer = GroupCommit::start(
            "test-flushing-writer",
            64,
            super::WriterOptions { flush: Some(flush), ..Default::default() },
            |group: &[i64]| Ok(group.to_vec()),
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(flushes.load(Ordering::SeqCst), 0, "nothing committed, nothing to flush");
        writer.submit(1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(flushes.load(Ordering::SeqCst), 1, "one flush for the idle spell, not one per wait");
        writer.submit(2).await.unwrap();
        drop(writer);
        assert_eq!(flushes.load(Ordering::SeqCst), 2, "what was committed last is flushed when the writer stops");
    }
}
