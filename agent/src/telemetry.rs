//! Tracing setup: the filter comes from `BERTH_LOG` (then `RUST_LOG`), output is plain text or
//! JSON on stderr, where journald collects it.

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Crates whose verbose levels could print wire data; they stay at `info` whatever the filter.
const CAPPED: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "reqwest",
    "rustls",
    "tonic",
    "tower",
    "oci_client",
];

/// Installs the global subscriber. `filter` is the `BERTH_LOG`/`RUST_LOG` value, if any.
pub fn init(filter: Option<&str>, format: LogFormat) {
    let mut env_filter =
        EnvFilter::try_new(filter.unwrap_or("info")).unwrap_or_else(|_| EnvFilter::new("info"));
    for target in CAPPED {
        if let Ok(directive) = format!("{target}=info").parse() {
            env_filter = env_filter.add_directive(directive);
        }
    }
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match (format, under_journald) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Plain, true) => builder.without_time().init(),
        (LogFormat::Plain, false) => builder.init(),
    }
}
