//! One download bandwidth for all pulls together (`[registry] max_bytes_per_second`).
//!
//! A token bucket on tokio time, kept as a schedule: every download charges the bytes it just
//! received, in quanta of equal size, each booked under a lock after every booking before it. A
//! download waits until a quantum is paid before it books the next one, and reads on only once
//! its whole chunk is paid (TCP backpressure then slows the sender). Bookings are served
//! strictly in the order they were made and each download holds at most one, so concurrent
//! downloads take turns quantum by quantum and share the rate evenly, however large their reads:
//! two pulls with as many downloads each get about half each. A crate such as
//! `governor` was considered: its waiters poll a shared clock in no particular order (fairness
//! comes only from jitter) and it runs on its own timer rather than tokio's, which tests pause.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The bucket's depth: what may pass at once after an idle spell, as a share of a second's rate.
const BURST_DIVISOR: u64 = 8;
/// The smallest depth, so that one network read never waits on itself.
const MIN_BURST_BYTES: u64 = 64 << 10;
/// Quanta are this share of a second's rate (about this many turns a second in all) ...
const QUANTA_PER_SECOND: u64 = 256;
/// ... and at least this large.
const MIN_QUANTUM_BYTES: u64 = 16 << 10;

/// The shared limit; unlimited when `max_bytes_per_second` is 0.
#[derive(Debug, Default)]
pub struct Bandwidth {
    bucket: Option<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    bytes_per_second: f64,
    /// How far ahead of now the schedule may run before a charge waits (the bucket's depth).
    burst: Duration,
    /// The size of one booking.
    quantum: u64,
    /// When every byte charged so far is paid for.
    paid_at: Mutex<Instant>,
}

impl Bandwidth {
    /// A limit of `bytes_per_second` for every download together; 0 = none.
    pub fn new(bytes_per_second: u64) -> Self {
        if bytes_per_second == 0 {
            return Self::default();
        }
        let burst_bytes = (bytes_per_second / BURST_DIVISOR).max(MIN_BURST_BYTES);
        #[allow(clippy::cast_precision_loss)] // byte rates are far below 2^52
        let rate = bytes_per_second as f64;
        #[allow(clippy::cast_precision_loss)]
        let burst = Duration::from_secs_f64(burst_bytes as f64 / rate);
        Self {
            bucket: Some(Bucket {
                bytes_per_second: rate,
                burst,
                quantum: (bytes_per_second / QUANTA_PER_SECOND).max(MIN_QUANTUM_BYTES),
                paid_at: Mutex::new(Instant::now()),
            }),
        }
    }

    /// Charges `bytes` that just arrived and waits until the limit allows them.
    pub async fn take(&self, bytes: usize) {
        let Some(bucket) = &self.bucket else {
            return;
        };
        let mut left = u64::try_from(bytes).unwrap_or(u64::MAX);
        while left > 0 {
            let quantum = left.min(bucket.quantum);
            left -= quantum;
            let ready_at = bucket.book(quantum);
            if ready_at > Instant::now() {
                tokio::time::sleep_until(ready_at).await;
            }
        }
    }
}

impl Bucket {
    /// Books `bytes` after every booking so far; returns when they may pass.
    fn book(&self, bytes: u64) -> Instant {
        let mut paid_at = self
            .paid_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        #[allow(clippy::cast_precision_loss)]
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second);
        // An idle bucket fills up to its depth, no further.
        let start = (*paid_at).max(now);
        *paid_at = start + cost;
        *paid_at - self.burst.min(*paid_at - now)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MIB: u64 = 1 << 20;

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let bandwidth = Bandwidth::new(0);
        let started = Instant::now();
        for _ in 0..1000 {
            bandwidth.take(1 << 20).await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn one_download_gets_the_rate() {
        let bandwidth = Bandwidth::new(4 * MIB);
        let started = Instant::now();
        for _ in 0..256 {
            bandwidth.take(64 << 10).await;
        }
        // 16 MiB at 4 MiB/s, less the bucket's depth (half a MiB).
        let took = started.elapsed().as_secs_f64();
        assert!((3.8..=4.0).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_downloads_share_it_evenly_and_finish_together() {
        let bandwidth = Arc::new(Bandwidth::new(4 * MIB));
        let started = Instant::now();
        let download = |chunk: usize| {
            let bandwidth = Arc::clone(&bandwidth);
            async move {
                let mut received = 0;
                while received < 8 * MIB {
                    bandwidth.take(chunk).await;
                    received += chunk as u64;
                }
                started.elapsed().as_secs_f64()
            }
        };
        // Different chunk sizes: the share follows bytes, not reads.
        let (a, b) = tokio::join!(
            tokio::spawn(download(16 << 10)),
            tokio::spawn(download(64 << 10))
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        // 16 MiB together at 4 MiB/s: about 4 s, both near the end.
        assert!(
            (3.5..=4.1).contains(&a) && (3.5..=4.1).contains(&b),
            "{a} {b}"
        );
        assert!((a - b).abs() < 0.3, "{a} {b}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_allows_only_its_depth_at_once() {
        let bandwidth = Bandwidth::new(8 * MIB);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let started = Instant::now();
        bandwidth.take(1 << 20).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "the depth passes at once"
        );
        bandwidth.take(1 << 20).await;
        let took = started.elapsed().as_secs_f64();
        assert!((0.12..=0.13).contains(&took), "{took}");
    }
}
