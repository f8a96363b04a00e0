//! A containerd of the test's own: temp root, state, sockets and config (CRI off), one namespace.
//!
//! On `Drop` it removes every task and container it holds (so no shim or container outlives the
//! test), stops containerd, kills any process still naming its temp dir, unmounts what is left
//! under it, and removes the runc state of its namespace.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context as _};
use nix::mount::{umount2, MntFlags};
use tempfile::TempDir;

use super::process::{kill_processes_mentioning, Daemon};
use super::wait::{wait_for, STARTUP_TIMEOUT};
use super::{random_lowercase, temp_dir};

mod build;
mod restart;

pub use build::Build;

/// Upper bound on one `ctr` run.
const CTR_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the runc v2 shim keeps runc state (its default root), per namespace.
const RUNC_ROOT: &str = "/run/containerd/runc";

/// A running containerd.
#[derive(Debug)]
pub struct Containerd {
    daemon: Daemon,
    socket: PathBuf,
    namespace: String,
    build: Build,
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd (the build of this run, see [`Build::current`]) and waits until `ctr
    /// version` answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_build(Build::current()?).await
    }

    /// Starts the containerd of `build` and waits until `ctr version` answers.
    pub async fn start_build(build: &Build) -> anyhow::Result<Self> {
        Self::start_build_with_root(build, None).await
    }

    /// Starts containerd (the build of this run) with its root (content store, snapshots,
    /// metadata) at `root`, e.g. a small tmpfs, instead of under its temp dir.
    pub async fn start_with_root(root: &Path) -> anyhow::Result<Self> {
        Self::start_build_with_root(Build::current()?, Some(root)).await
    }

    async fn start_build_with_root(build: &Build, root: Option<&Path>) -> anyhow::Result<Self> {
        let dir = temp_dir("containerd")?;
        let socket = dir.path().join("containerd.sock");
        let config_path = dir.path().join("config.toml");
        let root = root.map_or_else(|| dir.path().join("root"), Path::to_owned);
        std::fs::write(&config_path, config_toml(build, dir.path(), &root, &socket))
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut command = build.command("containerd");
        command.arg("--config").arg(&config_path);
        let daemon = Daemon::spawn("containerd", command, &dir.path().join("containerd.log"))
            .context("starting containerd (apt package containerd)")?;
        let containerd = Self {
            daemon,
            socket,
            // Unique per test: the runc shim keeps state in /run/containerd/runc/<namespace>/<id>
            // whatever containerd's root, so two tests' containers with one id would collide.
            namespace: format!("berth-test-{}", random_lowercase(8)),
            build: build.clone(),
            dir,
        };
        wait_for(
            "containerd to answer `ctr version`",
            STARTUP_TIMEOUT,
            || {
                let containerd = &containerd;
                async move {
                    containerd.daemon.ensure_running()?;
                    let version = build
                        .tokio_command("ctr")
                        .arg("--address")
                        .arg(&containerd.socket)
                        .args(["--connect-timeout", "1s", "version"])
                        .kill_on_drop(true)
                        .output()
                        .await
                        .context("running ctr (apt package containerd)")?;
                    Ok(version.status.success().then_some(()))
                }
            },
        )
        .await?;
        Ok(containerd)
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The namespace berthd is configured with: `berth-test-<random>`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The build running: its binaries and version.
    pub fn build(&self) -> &Build {
        &self.build
    }

    /// containerd's root, state and logs all live under this dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// `ctr --address SOCK -n NAMESPACE ARGS...`.
    pub async fn ctr(&self, namespace: &str, args: &[&str]) -> anyhow::Result<Output> {
        let run = self
            .build
            .tokio_command("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", namespace])
            .args(args)
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(CTR_TIMEOUT, run)
            .await
            .with_context(|| format!("ctr {args:?} timed out"))?
            .with_context(|| format!("running ctr {args:?}"))
    }

    /// Like [`Self::ctr`] in the test namespace, failing on a non-zero exit; returns stdout.
    pub async fn ctr_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.ctr(&self.namespace, args).await?;
        if !output.status.success() {
            bail!(
                "ctr {args:?} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Blocking `ctr` for `Drop`; stdout lines, empty on any failure.
    fn ctr_lines_blocking(&self, namespace: Option<&str>, args: &[&str]) -> Vec<String> {
        let mut command = self.build.command("ctr");
        command.arg("--address").arg(&self.socket).args([
            "--connect-timeout",
            "2s",
            "--timeout",
            "20s",
        ]);
        if let Some(namespace) = namespace {
            command.args(["-n", namespace]);
        }
        match command.args(args).output() {
            Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Kills and deletes every task, then deletes every container, in every namespace.
    fn remove_workloads(&self) {
        for namespace in self.ctr_lines_blocking(None, &["namespaces", "ls", "-q"]) {
            let namespace = Some(namespace.as_str());
            for task in self.ctr_lines_blocking(namespace, &["tasks", "ls", "-q"]) {
                self.ctr_lines_blocking(namespace, &["tasks", "kill", "-s", "SIGKILL", &task]);
                self.ctr_lines_blocking(namespace, &["tasks", "rm", "-f", &task]);
            }
            for container in self.ctr_lines_blocking(namespace, &["containers", "ls", "-q"]) {
                self.ctr_lines_blocking(namespace, &["containers", "rm", &container]);
            }
        }
    }

    /// Lazily unmounts whatever is still mounted under the temp dir, deepest first.
    fn unmount_leftovers(&self) {
        let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let mut mount_points: Vec<String> = mountinfo
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .map(unescape_mount_path)
            .filter(|point| point.starts_with(&prefix))
            .collect();
        mount_points.sort_by_key(|point| std::cmp::Reverse(point.len()));
        for point in mount_points {
            let _ = umount2(Path::new(&point), MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_workloads();
        self.daemon.stop();
        kill_processes_mentioning(&self.dir.path().to_string_lossy());
        self.unmount_leftovers();
        let _ = std::fs::remove_dir_all(Path::new(RUNC_ROOT).join(&self.namespace));
    }
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> String {
    let mut path = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(index) = rest.find('\\') {
        path.push_str(&rest[..index]);
        let escaped = rest.get(index + 1..index + 4).unwrap_or("");
        match u8::from_str_radix(escaped, 8) {
            Ok(byte) if escaped.len() == 3 => {
                path.push(char::from(byte));
                rest = &rest[index + 4..];
            }
            _ => {
                path.push('\\');
                rest = &rest[index + 1..];
            }
        }
    }
    path.push_str(rest);
    path
}

fn config_toml(build: &Build, dir: &Path, root: &Path, socket: &Path) -> String {
    let dir = dir.display();
    let root = root.display();
    let socket = socket.display();
    // 2.x reads version 3 (it migrates version 2 with a warning); its CRI is three plugins, and
    // its NRI (on by default) would share /var/run/nri/nri.sock between the tests' containerds.
    let (version, disabled) = if build.is_v2() {
        (
            3,
            r#""io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri""#,
        )
    } else {
        (
            2,
            r#""io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri""#,
        )
    };
    format!(
        r#"version = {version}
root = "{root}"
state = "{dir}/state"
disabled_plugins = [{disabled}]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = "{dir}/debug.sock"
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
"#
    )
}
