//! `[registry] max_concurrent_pulls`: image pulls at once on this host, all projects together.
//! A pull past the limit waits for a turn, first come first served (tokio's `Semaphore` queues
//! its waiters in order). The queue sits inside the image's pull mutex, so orders for an image
//! that is already queued or pulling wait on that one flight and never queue twice. A waiting
//! order whose client goes away leaves the queue; a pull that has its turn runs to the end.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

use berth_core::metrics::SharedMetrics;

/// The host's pull queue; no limit by default.
#[derive(Debug, Default)]
pub(crate) struct PullQueue {
    turns: Option<Arc<Semaphore>>,
    /// Pulls waiting now (for the position a newcomer is told).
    waiting: AtomicU32,
}

/// A pull's turn: the next queued pull goes when this is dropped.
#[derive(Debug)]
pub(crate) struct PullTurn {
    _permit: Option<OwnedSemaphorePermit>,
}

/// The order was cancelled while its pull waited for a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeftQueue;

impl PullQueue {
    /// At most `max` pulls at once; 0 = no limit.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            turns: (max > 0).then(|| Arc::new(Semaphore::new(max))),
            waiting: AtomicU32::new(0),
        }
    }

    /// Waits for a turn. When the pull has to wait, `queued` is called once first with its
    /// place in the line (1 = next). Gives up, leaving the queue, when `cancel` fires first.
    pub(crate) async fn turn<F, Fut>(
        &self,
        metrics: &SharedMetrics,
        cancel: &CancellationToken,
        queued: F,
    ) -> Result<PullTurn, LeftQueue>
    where
        F: FnOnce(u32) -> Fut,
        Fut: Future<Output = ()>,
    {
        let Some(turns) = &self.turns else {
            return Ok(PullTurn { _permit: None });
        };
        match Arc::clone(turns).try_acquire_owned() {
            Ok(permit) => {
                return Ok(PullTurn {
                    _permit: Some(permit),
                })
            }
            // The semaphore is never closed.
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => {}
        }
        let _waiting = Waiting::count(self, metrics);
        let position = self.waiting.load(Ordering::SeqCst);
        // Queue first, then tell: the acquire future holds its place once first polled.
        let acquire = Arc::clone(turns).acquire_owned();
        tokio::pin!(acquire);
        tokio::select! {
            biased;
            permit = &mut acquire => {
                return permit.map(|permit| PullTurn { _permit: Some(permit) }).map_err(|_| LeftQueue);
            }
            () = std::future::ready(()) => {}
        }
        queued(position).await;
        tokio::select! {
            permit = acquire => permit.map(|permit| PullTurn { _permit: Some(permit) }).map_err(|_| LeftQueue),
            () = cancel.cancelled() => Err(LeftQueue),
        }
    }
}

/// Counts one pull in the queue (and `berth_pulls_queued`) while it waits, also when its future
/// is dropped.
struct Waiting<'a> {
    queue: &'a PullQueue,
    metrics: SharedMetrics,
}

impl<'a> Waiting<'a> {
    fn count(queue: &'a PullQueue, metrics: &SharedMetrics) -> Self {
        queue.waiting.fetch_add(1, Ordering::SeqCst);
        metrics.pulls_queued.inc();
        Self {
            queue,
            metrics: metrics.clone(),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.pulls_queued.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_millis(50);

    async fn no_event(_: u32) {}

    #[tokio::test]
    async fn no_limit_never_queues() {
        let queue = PullQueue::new(0);
        let metrics = SharedMetrics::default();
        let cancel = CancellationToken::new();
        let mut turns = Vec::new();
        for _ in 0..100 {
            turns.push(
                queue
                    .turn(&metrics, &cancel, |_| async { panic!("queued") })
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(metrics.pulls_queued.get(), 0);
    }

    #[tokio::test]
    async fn waiting_pulls_go_first_come_first_served() {
        let queue = Arc::new(PullQueue::new(1));
        let metrics = SharedMetrics::default();
        let cancel = CancellationToken::new();
        let first = queue.turn(&metrics, &cancel, no_event).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let positions = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for name in ["a", "b", "c"] {
            let (queue, task_metrics, cancel) = (queue.clone(), metrics.clone(), cancel.clone());
            let (order, positions) = (order.clone(), positions.clone());
            waiters.push(tokio::spawn(async move {
                let turn = queue
                    .turn(&task_metrics, &cancel, |position| {
                        positions.lock().unwrap().push((name, position));
                        async {}
                    })
                    .await
                    .unwrap();
                order.lock().unwrap().push(name);
                drop(turn);
            }));
            // Each is in the queue before the next arrives.
            while metrics.pulls_queued.get() < i64::try_from(waiters.len()).unwrap() {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(*positions.lock().unwrap(), [("a", 1), ("b", 2), ("c", 3)]);
        assert_eq!(metrics.pulls_queued.get(), 3);
        drop(first);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a", "b", "c"]);
        assert_eq!(metrics.pulls_queued.get(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let queue = PullQueue::new(1);
        let metrics = SharedMetrics::default();
        let first = queue
            .turn(&metrics, &CancellationToken::new(), no_event)
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let waiting = queue.turn(&metrics, &cancel, no_event);
        tokio::pin!(waiting);
        tokio::time::timeout(WAIT, &mut waiting)
            .await
            .expect_err("the only turn is taken");
        assert_eq!(metrics.pulls_queued.get(), 1);
        cancel.cancel();
        assert_eq!(waiting.await.unwrap_err(), LeftQueue);
        assert_eq!(metrics.pulls_queued.get(), 0);
        drop(first);
        // The turn it would have had is free.
        tokio::time::timeout(
            WAIT,
            queue.turn(&metrics, &CancellationToken::new(), no_event),
        )
        .await
        .expect("free")
        .unwrap();
    }
}
