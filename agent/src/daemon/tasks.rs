//! berthd's tasks beside the API: the audit log's writer and its SIGHUP reopen, image GC, and
//! the metrics endpoint; each with the token that stops it.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::DaemonError;
use crate::audit::{AuditLog, AuditReopen, AuditWriter};
use crate::config::Settings;
use crate::run::Runner;
use berth_core::metrics::SharedMetrics;

/// The audit log's side of start-up: its writer (None when the log is off), the SIGHUP
/// handle, and the token that stops both.
#[derive(Debug)]
pub(super) struct AuditTasks {
    writer: Option<AuditWriter>,
    reopen: AuditReopen,
    stop: CancellationToken,
}

impl AuditTasks {
    /// Opens the audit log at `path` (empty: off): the handle orders write through, and the
    /// tasks' side of it.
    pub(super) fn open(path: &str, metrics: &SharedMetrics) -> (AuditLog, Self) {
        let stop = CancellationToken::new();
        let (log, reopen, writer) = AuditLog::open(path, metrics.clone(), stop.clone());
        (
            log,
            Self {
                writer,
                reopen,
                stop,
            },
        )
    }
}

/// The running tasks and their stop tokens, handed to [`super::shutdown::drain`].
#[derive(Debug)]
pub(super) struct Background {
    /// Orders (the API spawns them here), image GC and the metrics server.
    pub(super) tasks: TaskTracker,
    /// The audit log's own tracker: it stops only after the orders, whose lines it writes.
    pub(super) audit_tasks: TaskTracker,
    pub(super) audit_stop: CancellationToken,
    pub(super) gc_stop: CancellationToken,
    pub(super) metrics_stop: CancellationToken,
}

impl Background {
    /// Starts the audit writer, image GC (when configured) and the metrics server (when
    /// `metrics_listen` is set; binding it is the one thing that can fail).
    pub(super) async fn start(
        settings: &Settings,
        runner: &Runner,
        metrics: &SharedMetrics,
        audit: AuditTasks,
    ) -> Result<Self, DaemonError> {
        let tasks = TaskTracker::new();
        let audit_tasks = TaskTracker::new();
        if let Some(writer) = audit.writer {
            audit_tasks.spawn(writer.run());
            audit_tasks.spawn(reopen_on_sighup(audit.reopen, audit.stop.clone()));
        }
        let gc_stop = CancellationToken::new();
        if let Some(gc) = settings.gc.clone() {
            tasks.spawn(runner.clone().image_gc_loop(gc, gc_stop.clone()));
        }
        let metrics_stop = CancellationToken::new();
        if !settings.api.metrics_listen.is_empty() {
            serve_metrics(
                &settings.api.metrics_listen,
                runner.clone(),
                metrics.clone(),
                &tasks,
                metrics_stop.clone(),
            )
            .await?;
        }
        Ok(Self {
            tasks,
            audit_tasks,
            audit_stop: audit.stop,
            gc_stop,
            metrics_stop,
        })
    }
}

/// SIGHUP reopens the audit log (after logrotate moved it), until `stop`.
async fn reopen_on_sighup(reopen: AuditReopen, stop: CancellationToken) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            warn!(error = %err, "cannot listen for SIGHUP; the audit log will not be reopened");
            return;
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                reopen.reopen();
                info!("sighup: reopening the audit log");
            }
        }
    }
}

/// Serves Prometheus text at `http://<address>/metrics` until `stop` is cancelled.
async fn serve_metrics(
    address: &str,
    runner: Runner,
    metrics: SharedMetrics,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<(), DaemonError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| DaemonError::Io {
            path: PathBuf::from(address),
            source,
        })?;
    info!(address = %address, "metrics listening at /metrics");
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let runner = runner.clone();
            let metrics = metrics.clone();
            async move {
                if let Err(err) = runner.refresh_container_gauges().await {
                    warn!(error = %err, "containers gauge not refreshed");
                }
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    tasks.spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(err) = serve.await {
            warn!(error = %err, "metrics server stopped");
        }
    });
    Ok(())
}
