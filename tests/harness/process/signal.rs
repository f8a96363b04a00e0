//! Signals for a running [`Daemon`] beyond `stop`: a crash (SIGKILL) or a graceful stop
//! (SIGTERM) whose exit status the test reads.

use std::process::ExitStatus;
use std::sync::PoisonError;
use std::time::Duration;

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{exits_within, Daemon};

impl Daemon {
    /// Sends `signal`, waits up to `timeout` for the process to exit, reaps it and returns its
    /// exit status. Fails (leaving it running) when it does not exit in time. Blocks the thread:
    /// call it from `tokio::task::block_in_place` in async code.
    pub fn signal_and_wait(&self, signal: Signal, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut slot = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let child = slot
            .as_mut()
            .with_context(|| format!("{} was already stopped", self.name))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        kill(pid, signal).with_context(|| format!("sending {signal} to {}", self.name))?;
        if !exits_within(pid, timeout) {
            bail!(
                "{} did not exit within {timeout:?} of {signal}; log {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        }
        let status = child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        slot.take();
        Ok(status)
    }
}
