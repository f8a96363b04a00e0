//! Canaries outside containerd's root that a hostile layer aims at: a dir holding a file and a
//! subdir, whose every byte and every bit of metadata (mode, owner, size, mtime, ctime, inode,
//! link count, xattrs, names) is recorded when planted and compared later. A link made to the
//! file changes its link count and ctime; a write, chmod or chown changes ctime; an entry
//! created in the dir changes its listing. Also [`HostRoots`]: the names in `/` and `/etc`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use super::random_lowercase;

/// One planted canary dir (removed on `Drop`), or a watched host file (left alone).
#[derive(Debug)]
pub struct Canary {
    dir: PathBuf,
    planted: BTreeMap<PathBuf, String>,
    owned: bool,
}

/// Everything about `path` a write, link, chmod, chown, rename or removal would change.
fn describe(path: &Path) -> anyhow::Result<String> {
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let content = if meta.is_file() {
        hex::encode(Sha256::digest(std::fs::read(path)?))
    } else {
        String::new()
    };
    let mut names = vec![0_u8; 4096];
    let listed = rustix::fs::llistxattr(path, &mut names).unwrap_or(0);
    Ok(format!(
        "mode {:o} owner {}:{} size {} mtime {}.{} ctime {}.{} ino {} nlink {} sha256 {content} xattrs {:?}",
        meta.mode(),
        meta.uid(),
        meta.gid(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.ino(),
        meta.nlink(),
        String::from_utf8_lossy(&names[..listed]),
    ))
}

fn record(dir: &Path) -> anyhow::Result<BTreeMap<PathBuf, String>> {
    let mut found = BTreeMap::new();
    found.insert(dir.to_owned(), describe(dir)?);
    if !std::fs::symlink_metadata(dir)?.is_dir() {
        return Ok(found);
    }
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in
            std::fs::read_dir(&next).with_context(|| format!("listing {}", next.display()))?
        {
            let path = entry?.path();
            if std::fs::symlink_metadata(&path)?.is_dir() {
                pending.push(path.clone());
            }
            found.insert(path.clone(), describe(&path)?);
        }
    }
    Ok(found)
}

impl Canary {
    /// Plants `berth-canary-<random>` in `parent`: a file `canary` and a dir `nest` holding a
    /// file `egg`.
    pub fn plant(parent: &Path) -> anyhow::Result<Self> {
        let dir = parent.join(format!("berth-canary-{}", random_lowercase(10)));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("canary"),
            format!("canary {}\n", random_lowercase(16)),
        )?;
        std::fs::create_dir(dir.join("nest"))?;
        std::fs::write(dir.join("nest/egg"), b"egg\n")?;
        let planted = record(&dir)?;
        Ok(Self {
            dir,
            planted,
            owned: true,
        })
    }

    /// Watches an existing host path (a file such as `/etc/passwd`, or a dir and all below it).
    pub fn watch(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            dir: path.to_owned(),
            planted: record(path)?,
            owned: false,
        })
    }

    /// The canary dir (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The canary dir without its leading `/`: where an escape clamped to a root lands.
    pub fn dir_in_root(&self) -> String {
        self.dir
            .to_string_lossy()
            .trim_start_matches('/')
            .to_owned()
    }

    /// Fails with every change since planting.
    pub fn assert_untouched(&self) -> anyhow::Result<()> {
        let now = record(&self.dir)?;
        let mut changes = Vec::new();
        for path in self
            .planted
            .keys()
            .chain(now.keys())
            .collect::<BTreeSet<_>>()
        {
            match (self.planted.get(path), now.get(path)) {
                (Some(before), Some(after)) if before != after => {
                    changes.push(format!("{}: was {before}\n    now {after}", path.display()))
                }
                (Some(_), None) => changes.push(format!("{}: removed", path.display())),
                (None, Some(after)) => {
                    changes.push(format!("{}: appeared ({after})", path.display()));
                }
                _ => {}
            }
        }
        anyhow::ensure!(
            changes.is_empty(),
            "the canary {} was touched:\n{}",
            self.dir.display(),
            changes.join("\n")
        );
        Ok(())
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The names in `/` and `/etc`, to see that nothing new appeared there.
#[derive(Debug, PartialEq, Eq)]
pub struct HostRoots(BTreeMap<&'static str, BTreeSet<String>>);

impl HostRoots {
    pub fn list() -> anyhow::Result<Self> {
        let mut roots = BTreeMap::new();
        for dir in ["/", "/etc"] {
            let names = std::fs::read_dir(dir)
                .with_context(|| format!("listing {dir}"))?
                .map(|entry| entry.map(|entry| entry.file_name().to_string_lossy().into_owned()))
                .collect::<Result<BTreeSet<_>, _>>()?;
            roots.insert(dir, names);
        }
        Ok(Self(roots))
    }

    /// Fails naming what appeared in `/` or `/etc` since `self` was listed.
    pub fn assert_nothing_new(&self) -> anyhow::Result<()> {
        let now = Self::list()?;
        let mut appeared = Vec::new();
        for (dir, names) in &now.0 {
            let before = self.0.get(dir).cloned().unwrap_or_default();
            appeared.extend(
                names
                    .difference(&before)
                    .map(|name| format!("{dir}: {name}")),
            );
        }
        anyhow::ensure!(appeared.is_empty(), "new entries on the host: {appeared:?}");
        Ok(())
    }
}
