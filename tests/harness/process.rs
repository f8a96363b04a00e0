//! Child daemons that are always stopped: SIGTERM, a grace period, then SIGKILL, on `Drop` too.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

mod signal;

/// How long a daemon gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How much of a log the error messages quote.
const LOG_TAIL_BYTES: usize = 6000;

/// A long-running child process whose stdout and stderr go to a log file.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    /// `None` once stopped. A lock so that readiness probes can poll through `&self`.
    child: Mutex<Option<Child>>,
    log_path: PathBuf,
}

impl Daemon {
    /// Starts `command` with stdin closed and stdout + stderr appended to `log_path`.
    pub fn spawn(name: &str, mut command: Command, log_path: &Path) -> anyhow::Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening log file {}", log_path.display()))?;
        let log_for_stderr = log.try_clone().context("duplicating the log file handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_for_stderr))
            .spawn()
            .with_context(|| format!("spawning {name} ({command:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Mutex::new(Some(child)),
            log_path: log_path.to_owned(),
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far (lossy UTF-8; empty when unreadable).
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The end of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let start = text.len().saturating_sub(LOG_TAIL_BYTES);
        let start = (start..text.len())
            .find(|&index| text.is_char_boundary(index))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// `Err` (with the log tail) once the process has exited: for readiness probes.
    pub fn ensure_running(&self) -> anyhow::Result<()> {
        let exited = {
            let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
            let child = child
                .as_mut()
                .with_context(|| format!("{} was already stopped", self.name))?;
            child
                .try_wait()
                .with_context(|| format!("polling {}", self.name))?
        };
        if let Some(status) = exited {
            anyhow::bail!(
                "{} exited early with {status}; log {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// SIGTERM, up to `STOP_GRACE` to exit, then SIGKILL; reaps the child. Idempotent.
    pub fn stop(&self) -> Option<ExitStatus> {
        let mut child = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let Ok(raw_pid) = i32::try_from(child.id()) else {
            let _ = child.kill();
            return child.wait().ok();
        };
        let pid = Pid::from_raw(raw_pid);
        let _ = kill(pid, Signal::SIGTERM);
        if !exits_within(pid, STOP_GRACE) {
            let _ = kill(pid, Signal::SIGKILL);
        }
        child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits (without reaping, so the pid cannot be reused meanwhile) up to `grace` for `pid` to exit.
fn exits_within(pid: Pid, grace: Duration) -> bool {
    let (exited_sender, exited) = mpsc::channel();
    thread::spawn(move || {
        let status = waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
        let _ = exited_sender.send(status.is_ok());
    });
    exited.recv_timeout(grace).unwrap_or(false)
}

/// SIGKILLs every process (but this one) whose command line mentions `needle`: the containerd
/// shims that a test's containerd left behind, found by its temp dir in their arguments.
pub fn kill_processes_mentioning(needle: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let own_pid = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own_pid {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            if let Ok(raw_pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw_pid), Signal::SIGKILL);
            }
        }
    }
}
