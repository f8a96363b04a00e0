//! Crashing, stopping and restarting a test's berthd on the same config, state dir and socket
//! (unix-socket listeners only), as systemd would after a crash or an upgrade.

use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context as _};
use nix::sys::signal::Signal;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{binary, Berthd};
use crate::harness::grpc::{connect_unix, health};
use crate::harness::process::Daemon;
use crate::harness::wait::{wait_for, STARTUP_TIMEOUT};

/// How long SIGKILL may take to end the process.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

impl Berthd {
    /// SIGKILL: a crash. Returns once the process is gone; nothing of berthd's runs any more.
    pub async fn kill9(&self) -> anyhow::Result<ExitStatus> {
        tokio::task::block_in_place(|| self.daemon.signal_and_wait(Signal::SIGKILL, KILL_TIMEOUT))
    }

    /// SIGTERM, then waits up to `timeout` for berthd to exit; returns its exit status.
    pub async fn terminate(&self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        tokio::task::block_in_place(|| self.daemon.signal_and_wait(Signal::SIGTERM, timeout))
    }

    /// Starts berthd again with the same config file (so the same state dir, socket and
    /// containerd), appending to the same log, and waits for SERVING. A berthd still running is
    /// stopped first (SIGTERM, then SIGKILL after a grace period).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.daemon.stop();
        let mut command = Command::new(binary("berthd")?);
        command
            .arg("--config")
            .arg(&self.config_path)
            .env("BERTH_LOG", "debug")
            .env_remove("RUST_LOG");
        let log_path = self.daemon.log_path().to_owned();
        self.daemon = Daemon::spawn("berthd", command, &log_path)?;
        self.wait_until_serving().await
    }

    /// Polls the health check on the unix socket until it answers SERVING.
    async fn wait_until_serving(&self) -> anyhow::Result<()> {
        if self.socket.as_os_str().is_empty() {
            bail!("restart supports unix-socket listeners only");
        }
        wait_for(
            "the restarted berthd's health check to answer SERVING",
            STARTUP_TIMEOUT,
            || async {
                self.daemon.ensure_running()?;
                // A crashed berthd leaves its socket file behind: connecting tells.
                let Ok(channel) = connect_unix(&self.socket).await else {
                    return Ok(None);
                };
                Ok(match health(channel).await {
                    Ok(ServingStatus::Serving) => Some(()),
                    _ => None,
                })
            },
        )
        .await
        .with_context(|| format!("berthd log:\n{}", self.daemon.log_tail()))
    }
}
