//! A small tmpfs of the test's own (e.g. a containerd root that fills up quickly), unmounted
//! and removed on `Drop`; and the use of a filesystem as `df` counts it.

use std::path::Path;

use anyhow::Context as _;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tempfile::TempDir;

use super::temp_dir;

/// A mounted tmpfs.
#[derive(Debug)]
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at a fresh temp dir.
    pub fn mount(bytes: u64) -> anyhow::Result<Self> {
        let dir = temp_dir("tmpfs")?;
        let options = format!("size={bytes},mode=0711");
        mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .with_context(|| format!("mounting a tmpfs at {}", dir.path().display()))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Use of the tmpfs in percent.
    pub fn use_percent(&self) -> anyhow::Result<f64> {
        use_percent(self.path())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}

/// `path`'s filesystem use in percent, as `df` counts it: used / (used + available).
pub fn use_percent(path: &Path) -> anyhow::Result<f64> {
    let stat =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    #[allow(clippy::useless_conversion)]
    let (blocks, free, available) = (
        u64::from(stat.blocks()),
        u64::from(stat.blocks_free()),
        u64::from(stat.blocks_available()),
    );
    let used = blocks - free;
    Ok(used as f64 * 100.0 / (used + available) as f64)
}
