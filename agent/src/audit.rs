//! The audit trail (`audit_log`): one JSON object per line for every use of a credential: a
//! token request, a pull, an access check of a cached private image, a signature fetch.
//!
//! Lines carry who (project, order, which credential by id or provider name), where (registry,
//! repository, digest) and how it ended; never credential material. Orders hand their lines to
//! a bounded channel and go on: a dedicated task appends them (O_APPEND, 0600) and reopens the
//! file on SIGHUP (logrotate). A full channel or a failed write is logged and counted and
//! never fails or delays an order.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use berth_core::metrics::SharedMetrics;

/// Lines waiting for the writer; past this, lines are dropped (and counted), orders never wait.
const QUEUE: usize = 4096;

/// The credential an `anonymous` line names.
pub(crate) const ANONYMOUS: &str = "anonymous";

/// What a credential was used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AuditAction {
    Token,
    Pull,
    AccessCheck,
    Signature,
}

/// One audit line. Field names are the contract's.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AuditRecord {
    pub(crate) time: String,
    pub(crate) project: String,
    pub(crate) order_id: String,
    /// The secret id, `provider:<name>` or `anonymous`.
    pub(crate) credential: String,
    pub(crate) registry: String,
    pub(crate) repository: String,
    /// The platform manifest digest, when known; empty otherwise.
    pub(crate) digest: String,
    pub(crate) action: AuditAction,
    /// `ok` or the gRPC code name (`PERMISSION_DENIED`, ...).
    pub(crate) result: String,
}

/// Who a line is about: the order (or PullImage request) and the credential it uses.
#[derive(Debug, Clone)]
pub(crate) struct AuditSubject {
    pub(crate) project: String,
    /// Empty for PullImage and ExplainPull.
    pub(crate) order_id: String,
    pub(crate) credential: String,
}

/// The sending side, cheap to clone; a no-op when `audit_log` is off.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditLog {
    sender: Option<mpsc::Sender<AuditRecord>>,
    metrics: SharedMetrics,
}

/// Asks the writer to reopen the file (SIGHUP).
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditReopen(Arc<Notify>);

impl AuditReopen {
    pub(crate) fn reopen(&self) {
        self.0.notify_one();
    }
}

impl AuditLog {
    /// The log at `path` and its writer, which runs until `stop` is cancelled (then drains what
    /// is queued). None for an empty path: auditing is off.
    pub(crate) fn open(
        path: &str,
        metrics: SharedMetrics,
        stop: CancellationToken,
    ) -> (Self, AuditReopen, Option<AuditWriter>) {
        let reopen = AuditReopen::default();
        if path.is_empty() {
            return (
                Self {
                    sender: None,
                    metrics,
                },
                reopen,
                None,
            );
        }
        let (sender, receiver) = mpsc::channel(QUEUE);
        let writer = AuditWriter {
            path: PathBuf::from(path),
            receiver,
            reopen: reopen.0.clone(),
            stop,
            metrics: metrics.clone(),
        };
        (
            Self {
                sender: Some(sender),
                metrics,
            },
            reopen,
            Some(writer),
        )
    }

    /// Queues one line; never waits.
    pub(crate) fn record(
        &self,
        subject: &AuditSubject,
        registry: &str,
        repository: &str,
        digest: &str,
        action: AuditAction,
        result: &str,
    ) {
        let Some(sender) = &self.sender else {
            return;
        };
        let record = AuditRecord {
            time: berth_runtime::containerd::rfc3339(SystemTime::now()),
            project: subject.project.clone(),
            order_id: subject.order_id.clone(),
            credential: subject.credential.clone(),
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            digest: digest.to_owned(),
            action,
            result: result.to_owned(),
        };
        if sender.try_send(record).is_err() {
            self.metrics.audit_write_errors.inc();
            warn!("audit line dropped; the audit writer is behind or stopped");
        }
    }
}

/// Appends queued lines to the audit file; reopens it on request.
#[derive(Debug)]
pub(crate) struct AuditWriter {
    path: PathBuf,
    receiver: mpsc::Receiver<AuditRecord>,
    reopen: Arc<Notify>,
    stop: CancellationToken,
    metrics: SharedMetrics,
}

impl AuditWriter {
    pub(crate) async fn run(mut self) {
        let mut file = self.open().await;
        loop {
            tokio::select! {
                biased;
                () = self.reopen.notified() => {
                    debug!(path = %self.path.display(), "reopening the audit log");
                    file = self.open().await;
                }
                record = self.receiver.recv() => {
                    let Some(record) = record else { break };
                    self.write(&mut file, &record).await;
                }
                () = self.stop.cancelled() => {
                    self.receiver.close();
                    while let Some(record) = self.receiver.recv().await {
                        self.write(&mut file, &record).await;
                    }
                    break;
                }
            }
        }
    }

    async fn open(&self) -> Option<tokio::fs::File> {
        match tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .await
        {
            Ok(file) => Some(file),
            Err(err) => {
                self.metrics.audit_write_errors.inc();
                warn!(path = %self.path.display(), error = %err, "audit log cannot be opened");
                None
            }
        }
    }

    async fn write(&self, file: &mut Option<tokio::fs::File>, record: &AuditRecord) {
        if file.is_none() {
            // Opening failed before (a missing dir, say): try again for this line.
            *file = self.open().await;
        }
        let Some(handle) = file.as_mut() else {
            return;
        };
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(err) => {
                self.metrics.audit_write_errors.inc();
                warn!(error = %err, "audit line does not serialise");
                return;
            }
        };
        line.push(b'\n');
        // One write per line: with O_APPEND, lines never interleave.
        let result = async {
            handle.write_all(&line).await?;
            handle.flush().await
        }
        .await;
        if let Err(err) = result {
            self.metrics.audit_write_errors.inc();
            warn!(path = %self.path.display(), error = %err, "audit line not written");
            *file = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> AuditSubject {
        AuditSubject {
            project: "team-a".into(),
            order_id: "o-1".into(),
            credential: "provider:ecr".into(),
        }
    }

    #[tokio::test]
    async fn lines_are_appended_0600_and_follow_a_reopen() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let stop = CancellationToken::new();
        let (log, _, writer) = AuditLog::open(
            path.to_str().unwrap(),
            SharedMetrics::default(),
            stop.clone(),
        );
        // The writer's steps, driven by hand: no task, nothing to wait for.
        let mut writer = writer.unwrap();
        let mut file = writer.open().await;
        log.record(
            &subject(),
            "r:5000",
            "team/app",
            "",
            AuditAction::Token,
            "ok",
        );
        let record = writer.receiver.recv().await.unwrap();
        writer.write(&mut file, &record).await;
        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        // What SIGHUP does: reopen by path.
        file = writer.open().await;
        log.record(
            &subject(),
            "r:5000",
            "team/app",
            "sha256:ab",
            AuditAction::AccessCheck,
            "PERMISSION_DENIED",
        );
        let record = writer.receiver.recv().await.unwrap();
        writer.write(&mut file, &record).await;
        let old = std::fs::read_to_string(&rotated).unwrap();
        let line: serde_json::Value = serde_json::from_str(old.trim()).unwrap();
        assert_eq!(line["action"], "token");
        assert_eq!(line["credential"], "provider:ecr");
        assert_eq!(line["digest"], "");
        let new = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(new.trim()).unwrap();
        assert_eq!(line["action"], "access_check");
        assert_eq!(line["result"], "PERMISSION_DENIED");
        let keys: Vec<&String> = line.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 9, "{keys:?}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn the_writer_drains_its_queue_when_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let stop = CancellationToken::new();
        let (log, _, writer) = AuditLog::open(
            path.to_str().unwrap(),
            SharedMetrics::default(),
            stop.clone(),
        );
        for _ in 0..3 {
            log.record(&subject(), "r", "a", "", AuditAction::Pull, "ok");
        }
        stop.cancel();
        writer.unwrap().run().await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = SharedMetrics::default();
        let (log, _, _writer) = AuditLog::open(
            "/nonexistent/audit.log",
            metrics.clone(),
            CancellationToken::new(),
        );
        for _ in 0..QUEUE + 2 {
            log.record(&subject(), "r", "a", "", AuditAction::Pull, "ok");
        }
        assert_eq!(metrics.audit_write_errors.get(), 2);
    }

    #[test]
    fn off_means_no_writer() {
        let (log, _, writer) =
            AuditLog::open("", SharedMetrics::default(), CancellationToken::new());
        assert!(writer.is_none());
        log.record(&subject(), "r", "a", "", AuditAction::Pull, "ok");
    }
}
