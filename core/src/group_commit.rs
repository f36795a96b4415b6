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

use tokio::sync::{mpsc, oneshot};

use crate::readmodel::StoreError;

struct Pending<R, T> {
    request: R,
    reply: oneshot::Sender<Result<T, StoreError>>,
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
    /// Starts the writer thread `name`. `commit` applies a group in one transaction and returns
    /// one answer per request, in order; it runs on the writer thread, which may block.
    pub fn start<F>(name: &str, max_group: usize, mut commit: F) -> Result<Self, StoreError>
    where
        F: FnMut(&[R]) -> Result<Vec<T>, StoreError> + Send + 'static,
    {
        let max_group = max_group.max(1);
        let (queue, mut incoming) = mpsc::channel::<Pending<R, T>>(max_group);
        let writer = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut group = Vec::with_capacity(max_group);
                while let Some(first) = incoming.blocking_recv() {
                    group.push(first);
                    while group.len() < max_group {
                        match incoming.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    answer(&mut commit, &mut group);
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
