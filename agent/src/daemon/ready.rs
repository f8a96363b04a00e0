//! Readiness: health SERVING and `READY=1` once containerd answers, then the systemd watchdog.

use std::time::Duration;

use tracing::{info, warn};

use super::DaemonError;
use crate::api::Health;
use berth_core::metrics::SharedMetrics;
use berth_runtime::containerd::Containerd;

/// Reports health SERVING and sends READY=1 once containerd answers (the API is bound before
/// this runs), with STATUS= lines on the way. A containerd older than berth supports is an
/// error: berthd stops rather than fail every order.
pub(super) async fn notify_when_ready(
    containerd: &Containerd,
    health: &Health,
    metrics: &SharedMetrics,
) -> Result<(), DaemonError> {
    let mut delay = Duration::from_millis(100);
    let mut reported = false;
    loop {
        match containerd.version().await {
            Ok(version) if !version.is_supported() => {
                let socket = containerd.socket().display().to_string();
                let status = format!("containerd {version} is not supported");
                sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]).ok();
                return Err(DaemonError::UnsupportedContainerd {
                    socket,
                    version: version.to_string(),
                });
            }
            Ok(version) => {
                info!(
                    containerd = %version,
                    revision = version.revision(),
                    socket = %containerd.socket().display(),
                    "containerd answered; ready"
                );
                metrics.containerd_version(version.as_str());
                let status = format!("serving; containerd {version}");
                health.set(true).await;
                sd_notify::notify(
                    false,
                    &[
                        sd_notify::NotifyState::Ready,
                        sd_notify::NotifyState::Status(&status),
                    ],
                )
                .ok();
                return Ok(());
            }
            Err(err) => {
                if !reported {
                    let status = format!(
                        "waiting for containerd at {}",
                        containerd.socket().display()
                    );
                    sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]).ok();
                    reported = true;
                }
                warn!(error = %err, socket = %containerd.socket().display(), "containerd not answering yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// With `WatchdogSec=` set, pings systemd at half the interval while the runtime is alive.
/// Never returns.
pub(super) async fn watchdog() {
    let interval = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    );
    let Some(interval) = interval else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval / 2).await;
        sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]).ok();
    }
}

/// The watchdog interval, as sd_watchdog_enabled(3) reads it: `WATCHDOG_USEC` set (and not 0),
/// and `WATCHDOG_PID` unset or this process. (sd-notify 0.4's `watchdog_enabled` also demands
/// `WATCHDOG_PID`, so a supervisor that sets only `WATCHDOG_USEC` got no pings.)
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec = usec?.trim().parse::<u64>().ok().filter(|usec| *usec > 0)?;
    match pid.map(|pid| pid.trim().parse::<u32>()) {
        None => Some(Duration::from_micros(usec)),
        Some(Ok(pid)) if pid == own_pid => Some(Duration::from_micros(usec)),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_follows_sd_watchdog_enabled() {
        let second = Some(Duration::from_secs(1));
        assert_eq!(watchdog_interval(Some("1000000"), None, 7), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("7"), 7), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("1000000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }
}
