//! berthd: the per-host agent daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use berth::config::{Config, DEFAULT_CONFIG_PATH};
use berth::telemetry::{self, LogFormat};
use clap::Parser;

/// Starts containers from a scheduler's orders and pulls their private images.
#[derive(Debug, Parser)]
#[command(name = "berthd", version)]
struct Args {
    /// Config file (TOML); every key has a default.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "plain")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = std::env::var("BERTH_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok();
    telemetry::init(filter.as_deref(), args.log_format);
    let (path, explicit) = match &args.config {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let config = match Config::load(&path, explicit) {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(error = %err, "refusing to start: bad config");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(berth::daemon::run(config, shutdown_signal())) {
        Ok(()) => {
            tracing::info!("berthd stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err_chain(&err), "berthd failed");
            ExitCode::from(err.exit_code())
        }
    }
}

/// The error with its sources, one line.
fn err_chain(err: &berth::daemon::DaemonError) -> anyhow::Error {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    anyhow::anyhow!(text)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
    }
}
