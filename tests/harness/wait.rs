//! Polling against a deadline: the only way the harness and the tests wait for anything.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::time::{Instant, MissedTickBehavior};

/// How often a probe is retried.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Default deadline for a daemon to come up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Default deadline for an order to reach a final state.
pub const ORDER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `probe` until it yields `Some(value)`, failing once `timeout` has passed.
///
/// `Ok(None)` means "not yet" (retried); `Err` is fatal and returned at once (a daemon that exited,
/// say). The timeout error names `what` and, when the probe keeps a note of it, the last reason.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Some(value) = probe()
            .await
            .with_context(|| format!("while waiting for {what}"))?
        {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
    }
}

/// Polls `condition` until it is true, failing once `timeout` has passed (`Err` is fatal).
pub async fn assert_eventually<F, Fut>(
    what: &str,
    timeout: Duration,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    wait_for(what, timeout, || {
        let check = condition();
        async move { Ok(check.await?.then_some(())) }
    })
    .await
}
