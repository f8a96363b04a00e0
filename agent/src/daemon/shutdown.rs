//! The shutdown sequence, once the API has closed: stop GC and metrics, give in-flight orders
//! the grace period, then stop the audit log after the orders whose lines it writes.

use std::time::Duration;

use tracing::{info, warn};

use super::tasks::Background;

/// How long in-flight orders may run on after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Tells systemd berthd is stopping and drains `background`.
pub(super) async fn drain(background: Background) {
    sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping; waiting for in-flight orders"),
        ],
    )
    .ok();
    info!("api closed; waiting for in-flight orders");
    background.metrics_stop.cancel();
    background.gc_stop.cancel();
    background.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, background.tasks.wait())
        .await
        .is_err()
    {
        warn!("in-flight orders still running at the end of the grace period");
    }
    background.audit_stop.cancel();
    background.audit_tasks.close();
    background.audit_tasks.wait().await;
}
