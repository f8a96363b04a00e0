//! Which containerd the tests run: the system one (Debian 12's 1.6), or another build picked by
//! `BERTH_TEST_CONTAINERD_DIR`, a directory holding `containerd`, `ctr` and
//! `containerd-shim-runc-v2` (what `scripts/containerd.sh dir 1.7|2.1` prints).
//!
//! Each build runs with its own binaries: containerd finds its shim on `PATH`, so the chosen
//! directory goes first on the daemon's `PATH`; `ctr` is always the build's own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context as _};

/// The environment variable that picks a containerd build.
pub const DIR_VARIABLE: &str = "BERTH_TEST_CONTAINERD_DIR";

/// One containerd build: where its binaries are and what version it says it is.
#[derive(Debug, Clone)]
pub struct Build {
    dir: Option<PathBuf>,
    /// `(major, minor)` from `containerd --version`.
    pub version: (u32, u32),
    /// The whole version string, e.g. `2.1.9+unknown` or `1.6.20~ds1`.
    pub version_text: String,
}

impl Build {
    /// The build every test of this run uses (read once).
    pub fn current() -> anyhow::Result<&'static Build> {
        static BUILD: OnceLock<Result<Build, String>> = OnceLock::new();
        BUILD
            .get_or_init(|| {
                let dir = std::env::var_os(DIR_VARIABLE)
                    .filter(|value| !value.is_empty())
                    .map(PathBuf::from);
                Build::at(dir).map_err(|err| format!("{err:#}"))
            })
            .as_ref()
            .map_err(|message| anyhow::anyhow!("{message}"))
    }

    /// The build whose binaries are in `dir`, or the system's (`PATH`) for `None`.
    pub fn at(dir: Option<PathBuf>) -> anyhow::Result<Build> {
        if let Some(dir) = &dir {
            for binary in ["containerd", "ctr", "containerd-shim-runc-v2"] {
                if !dir.join(binary).is_file() {
                    bail!(
                        "{DIR_VARIABLE}={} has no {binary} (make it with scripts/containerd.sh)",
                        dir.display()
                    );
                }
            }
        }
        let mut build = Build {
            dir,
            version: (0, 0),
            version_text: String::new(),
        };
        let output = build
            .command("containerd")
            .arg("--version")
            .output()
            .context("running containerd --version (apt package containerd)")?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        // "containerd github.com/containerd/containerd/v2 2.1.9+unknown <commit>"
        let version_text = text
            .split_whitespace()
            .nth(2)
            .with_context(|| format!("unexpected containerd --version output {text:?}"))?
            .trim_start_matches('v')
            .to_owned();
        let mut parts = version_text
            .split(|c: char| !c.is_ascii_digit())
            .map(str::parse::<u32>);
        let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
            bail!("cannot read a version from containerd --version output {text:?}");
        };
        build.version = (major, minor);
        build.version_text = version_text;
        Ok(build)
    }

    /// A command for one of the build's binaries (`containerd`, `ctr`), with the build's
    /// directory first on `PATH` so containerd starts the build's own shim.
    pub fn command(&self, binary: &str) -> Command {
        let Some(dir) = &self.dir else {
            return Command::new(binary);
        };
        let mut command = Command::new(dir.join(binary));
        let mut path = OsString::from(dir.as_os_str());
        if let Some(system_path) = std::env::var_os("PATH") {
            path.push(":");
            path.push(system_path);
        }
        command.env("PATH", path);
        command
    }

    /// Like [`Self::command`], for async use.
    pub fn tokio_command(&self, binary: &str) -> tokio::process::Command {
        tokio::process::Command::from(self.command(binary))
    }

    /// The build `scripts/containerd.sh dir VERSION` prints, fetched from Debian on first use
    /// (1.4 is Debian 11's, a release berth refuses; 1.6 the system's; 1.7 and 2.1 the ones berth
    /// claims beside it).
    pub fn by_version(version: &str) -> anyhow::Result<Build> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/containerd.sh");
        let output = Command::new("bash")
            .arg(&script)
            .args(["dir", version])
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!(
                "{} dir {version} failed: {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        Build::at(Some(PathBuf::from(dir)))
    }

    /// `1.6.20`, `2.1.9`: the release, without Debian's or the build's suffix.
    pub fn release(&self) -> &str {
        let end = self
            .version_text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(self.version_text.len());
        &self.version_text[..end]
    }

    /// containerd 2.x reads config version 3 (and only migrates version 2 with a warning).
    pub fn is_v2(&self) -> bool {
        self.version.0 >= 2
    }
}
