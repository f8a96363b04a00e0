//! The retry policy shared by every request berth sends out (registries, token realms):
//! exponential backoff with jitter, and a loop that retries only what its caller calls
//! retryable.

use std::future::Future;
use std::time::Duration;

use rand::Rng as _;

/// First retry delay; doubled per attempt up to [`MAX_BACKOFF`], with jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// 200 ms, 400 ms, ... up to 8 s, each between half and all of that.
pub fn backoff(attempt: u32) -> Duration {
    let full = BASE_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let jitter = rand::rng().random_range(0.5..=1.0);
    full.mul_f64(jitter)
}

/// The wait before attempt `attempt + 1`: the backoff, or longer if the server asked for it
/// (`Retry-After`, already capped by the caller).
pub fn delay(attempt: u32, asked: Option<Duration>) -> Duration {
    backoff(attempt).max(asked.unwrap_or_default())
}

/// Runs `op` up to `attempts` times while it fails with an error `retryable` accepts.
pub async fn retry<T, E, F, Fut>(attempts: u32, retryable: fn(&E) -> bool, op: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retry_hinted(attempts, retryable, |_| None, op).await
}

/// Like [`retry`], waiting at least as long as `asked` says the server wants (`Retry-After`).
pub async fn retry_hinted<T, E, F, Fut>(
    attempts: u32,
    retryable: fn(&E) -> bool,
    asked: fn(&E) -> Option<Duration>,
    mut op: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(err) if retryable(&err) && attempt < attempts => {
                tracing::warn!(attempt, error = %err, "request failed; retrying");
                tokio::time::sleep(delay(attempt, asked(&err))).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..20 {
            let delay = backoff(attempt);
            let full = BASE_BACKOFF
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF);
            assert!(
                delay <= full && delay >= full / 2,
                "attempt {attempt}: {delay:?}"
            );
        }
        assert!(backoff(30) <= MAX_BACKOFF);
    }

    #[test]
    fn a_servers_retry_after_lengthens_the_wait() {
        assert!(delay(1, Some(Duration::from_secs(5))) >= Duration::from_secs(5));
        assert!(delay(1, None) <= BASE_BACKOFF);
        assert!(
            delay(20, Some(Duration::from_secs(1))) >= MAX_BACKOFF / 2,
            "a short hint never shortens the backoff"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_only_what_is_retryable_and_stops_at_the_limit() {
        let mut calls = 0;
        let result: Result<(), String> = retry(
            3,
            |e: &String| e == "again",
            || {
                calls += 1;
                async { Err("again".to_owned()) }
            },
        )
        .await;
        assert_eq!(result.unwrap_err(), "again");
        assert_eq!(calls, 3);
        let mut calls = 0;
        let result: Result<(), String> = retry(
            3,
            |e: &String| e == "again",
            || {
                calls += 1;
                async { Err("final".to_owned()) }
            },
        )
        .await;
        assert_eq!(result.unwrap_err(), "final");
        assert_eq!(calls, 1);
    }
}
