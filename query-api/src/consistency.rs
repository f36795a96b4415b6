//! Read-your-writes: before answering a read that carries a token, wait until every projection
//! it reads has applied the token's offset in the token's partition. Projections publish their
//! checkpoints on a watch channel, so waiters wake on progress instead of polling.

use std::time::Duration;

use callisto_core::readmodel::Projection;
use callisto_core::token::ConsistencyToken;

/// Whether the answer may be stale: `true` when the wait for every token ran out.
pub async fn wait_for(tokens: &[ConsistencyToken], projections: &[&dyn Projection], limit: Duration) -> bool {
    if tokens.is_empty() {
        return false;
    }
    let deadline = tokio::time::Instant::now() + limit;
    for projection in projections {
        let mut progress = projection.progress();
        let reached = |checkpoints: &callisto_core::readmodel::Checkpoints| {
            tokens.iter().all(|t| checkpoints.get(&t.partition).is_some_and(|applied| *applied >= t.offset))
        };
        match tokio::time::timeout_at(deadline, progress.wait_for(reached)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                metrics::counter!("callisto_stale_reads_total", "projection" => projection.name()).increment(1);
                return true;
            }
        }
    }
    false
}
