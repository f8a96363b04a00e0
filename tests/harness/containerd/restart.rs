//! Stopping and starting the test's containerd under a running berthd: same config, root,
//! state and sockets, so its shims (and the containers they run) are picked up again.

use anyhow::Context as _;

use super::Containerd;
use crate::harness::process::Daemon;
use crate::harness::wait::{wait_for, STARTUP_TIMEOUT};

impl Containerd {
    /// Stops containerd (SIGTERM; SIGKILL after a grace period). The shims are separate
    /// processes: running containers keep running.
    pub fn stop_daemon(&self) {
        self.daemon.stop();
    }

    /// Starts containerd again on its config and waits until `ctr version` answers.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.daemon.stop();
        let config_path = self.dir.path().join("config.toml");
        let mut command = self.build.command("containerd");
        command.arg("--config").arg(&config_path);
        let log_path = self.daemon.log_path().to_owned();
        self.daemon =
            Daemon::spawn("containerd", command, &log_path).context("starting containerd again")?;
        wait_for(
            "the restarted containerd to answer `ctr version`",
            STARTUP_TIMEOUT,
            || async {
                self.daemon.ensure_running()?;
                let version = self
                    .build
                    .tokio_command("ctr")
                    .arg("--address")
                    .arg(&self.socket)
                    .args(["--connect-timeout", "1s", "version"])
                    .kill_on_drop(true)
                    .output()
                    .await
                    .context("running ctr")?;
                Ok(version.status.success().then_some(()))
            },
        )
        .await
    }
}
