//! Stall detection per blob download (`[registry] stall_timeout_seconds`).
//!
//! The clock runs only while the download waits on the registry (for a response, or for the
//! next body bytes), and restarts at every byte that arrives. It keeps running across the
//! download's requests: a registry that answers each request and then sends nothing is as
//! stalled as one that holds a single connection open. Time berth spends elsewhere (writing into
//! containerd, committing, waiting for its bandwidth share, backing off between attempts) does
//! not count, so a busy berthd never takes its own slowness for a stall; and a registry that
//! trickles even one byte a second is not stalled (the pull deadline bounds it).
//! Each download has its own clock: one stalled blob is cut and resumed alone.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// One download's stall clock.
#[derive(Debug)]
pub(super) struct StallClock {
    limit: Option<Duration>,
    /// Time spent waiting on the registry since the last byte arrived.
    waited: Duration,
}

/// The download received no byte for the whole stall timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stalled;

impl StallClock {
    /// A clock that fires after `limit` without a byte; `None` never fires.
    pub(super) fn new(limit: Option<Duration>) -> Self {
        Self {
            limit,
            waited: Duration::ZERO,
        }
    }

    /// The timeout this clock fires at.
    pub(super) fn limit(&self) -> Option<Duration> {
        self.limit
    }

    /// Runs `network` (a request to the registry, or the wait for the next body bytes) for at
    /// most what is left of the timeout. After a stall the clock starts again from zero, for
    /// the attempt that resumes the download.
    pub(super) async fn wait<T>(&mut self, network: impl Future<Output = T>) -> Result<T, Stalled> {
        let Some(limit) = self.limit else {
            return Ok(network.await);
        };
        let left = limit.saturating_sub(self.waited);
        let started = Instant::now();
        match tokio::time::timeout(left, network).await {
            Ok(value) => {
                self.waited += started.elapsed();
                Ok(value)
            }
            Err(_) => {
                self.waited = Duration::ZERO;
                Err(Stalled)
            }
        }
    }

    /// Bytes arrived: the clock starts again.
    pub(super) fn progressed(&mut self) {
        self.waited = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn silence_longer_than_the_limit_is_a_stall() {
        let mut clock = StallClock::new(Some(LIMIT));
        let started = Instant::now();
        let result = clock.wait(std::future::pending::<()>()).await;
        assert_eq!(result, Err(Stalled));
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_never_a_stall() {
        let mut clock = StallClock::new(Some(LIMIT));
        // One byte every 9 s for far longer than the limit.
        for _ in 0..100 {
            clock
                .wait(tokio::time::sleep(Duration::from_secs(9)))
                .await
                .expect("a byte arrived within the limit");
            clock.progressed();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_adds_up_across_requests_until_a_byte_arrives() {
        let mut clock = StallClock::new(Some(LIMIT));
        // Two responses that each end after 4 s without a byte: 8 s of silence.
        for _ in 0..2 {
            clock
                .wait(tokio::time::sleep(Duration::from_secs(4)))
                .await
                .unwrap();
        }
        let started = Instant::now();
        assert_eq!(clock.wait(std::future::pending::<()>()).await, Err(Stalled));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // The resumed attempt gets the whole limit again.
        clock
            .wait(tokio::time::sleep(Duration::from_secs(9)))
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn time_outside_the_waits_does_not_count() {
        let mut clock = StallClock::new(Some(LIMIT));
        clock
            .wait(tokio::time::sleep(Duration::from_secs(5)))
            .await
            .unwrap();
        clock.progressed();
        // berthd busy elsewhere (containerd, bandwidth, backoff) for a long time.
        tokio::time::sleep(Duration::from_secs(60)).await;
        clock
            .wait(tokio::time::sleep(Duration::from_secs(9)))
            .await
            .expect("only the 9 s of waiting count");
    }

    #[tokio::test(start_paused = true)]
    async fn off_never_fires() {
        let mut clock = StallClock::new(None);
        clock
            .wait(tokio::time::sleep(Duration::from_secs(100_000)))
            .await
            .unwrap();
        assert_eq!(clock.limit(), None);
    }
}
