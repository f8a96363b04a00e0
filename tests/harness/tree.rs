//! What an unpack left on disk: a committed snapshot mounted read-only ([`SnapshotView`]), read
//! entry by entry into a [`Tree`] (type, mode, owner, size, content digest, link target, device
//! numbers, xattrs, mtime, hardlink groups), and a readable [`Tree::diff`] of two trees.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use nix::mount::{umount2, MntFlags};
use sha2::{Digest as _, Sha256};

use super::containerd::Containerd;
use super::random_lowercase;

/// What kind of entry, with what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File { size: u64, sha256: String },
    Dir,
    Symlink(PathBuf),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
}

/// One entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Every xattr the kernel lists (overlayfs hides its own `trusted.overlay.*`).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }
}

/// A whole tree: entries by path relative to the root, and the hardlink groups (paths of one
/// non-directory inode, when more than one path names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub entries: BTreeMap<PathBuf, Node>,
    pub hardlinks: BTreeSet<Vec<PathBuf>>,
}

/// Which differences [`Tree::diff`] tolerates.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tolerance {
    /// Directory mtimes are not compared.
    pub dir_mtimes: bool,
    /// The mtimes of overlay whiteouts (char devices 0:0, in a raw layer dir) are not compared.
    pub whiteout_mtimes: bool,
}

fn xattrs(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut names = vec![0_u8; 64 * 1024];
    let listed = rustix::fs::llistxattr(path, &mut names)
        .with_context(|| format!("listing xattrs of {}", path.display()))?;
    let mut values = BTreeMap::new();
    for name in names[..listed].split(|byte| *byte == 0) {
        if name.is_empty() {
            continue;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let mut value = vec![0_u8; 64 * 1024];
        let len = rustix::fs::lgetxattr(path, name.as_str(), &mut value)
            .with_context(|| format!("reading xattr {name} of {}", path.display()))?;
        value.truncate(len);
        values.insert(name, value);
    }
    Ok(values)
}

fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

fn device(rdev: u64) -> (u32, u32) {
    (rustix::fs::major(rdev), rustix::fs::minor(rdev))
}

impl Tree {
    /// Reads every entry under `root` (not following symlinks; the root itself is not an entry).
    pub fn scan(root: &Path) -> anyhow::Result<Self> {
        let mut entries = BTreeMap::new();
        let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
        let mut pending = vec![root.to_owned()];
        while let Some(dir) = pending.pop() {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
            {
                let path = entry?.path();
                let meta = std::fs::symlink_metadata(&path)
                    .with_context(|| format!("stat {}", path.display()))?;
                let file_type = meta.file_type();
                let kind = if file_type.is_dir() {
                    pending.push(path.clone());
                    Kind::Dir
                } else if file_type.is_file() {
                    Kind::File {
                        size: meta.len(),
                        sha256: file_sha256(&path)?,
                    }
                } else if file_type.is_symlink() {
                    Kind::Symlink(std::fs::read_link(&path)?)
                } else if file_type.is_char_device() {
                    let (major, minor) = device(meta.rdev());
                    Kind::Char(major, minor)
                } else if file_type.is_block_device() {
                    let (major, minor) = device(meta.rdev());
                    Kind::Block(major, minor)
                } else if file_type.is_fifo() {
                    Kind::Fifo
                } else {
                    Kind::Socket
                };
                let relative = path
                    .strip_prefix(root)
                    .context("invariant: scanned paths are under the root")?
                    .to_owned();
                if !file_type.is_dir() && meta.nlink() > 1 {
                    inodes
                        .entry((meta.dev(), meta.ino()))
                        .or_default()
                        .push(relative.clone());
                }
                entries.insert(
                    relative,
                    Node {
                        kind,
                        mode: meta.mode() & 0o7777,
                        uid: meta.uid(),
                        gid: meta.gid(),
                        mtime: (meta.mtime(), meta.mtime_nsec()),
                        xattrs: xattrs(&path)?,
                    },
                );
            }
        }
        let hardlinks = inodes
            .into_values()
            .filter(|paths| paths.len() > 1)
            .map(|mut paths| {
                paths.sort();
                paths
            })
            .collect();
        Ok(Self { entries, hardlinks })
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        self.entries.get(Path::new(path))
    }

    /// The names directly inside `dir` (`""` for the root).
    pub fn children(&self, dir: &str) -> BTreeSet<String> {
        let dir = Path::new(dir);
        self.entries
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .collect()
    }

    /// Every difference between `self` (labelled `left`) and `other` (`right`), one per line.
    pub fn diff(&self, left: &str, other: &Self, right: &str, tolerance: Tolerance) -> Vec<String> {
        let mut lines = Vec::new();
        let paths: BTreeSet<&PathBuf> = self.entries.keys().chain(other.entries.keys()).collect();
        for path in paths {
            let shown = path.display();
            match (self.entries.get(path), other.entries.get(path)) {
                (Some(mine), None) => lines.push(format!("{shown}: only in {left} ({mine})")),
                (None, Some(theirs)) => lines.push(format!("{shown}: only in {right} ({theirs})")),
                (Some(mine), Some(theirs)) => {
                    let mut field = |name: &str, a: String, b: String| {
                        if a != b {
                            lines.push(format!("{shown}: {name}: {left} {a}, {right} {b}"));
                        }
                    };
                    field(
                        "kind",
                        format!("{:?}", mine.kind),
                        format!("{:?}", theirs.kind),
                    );
                    field(
                        "mode",
                        format!("{:o}", mine.mode),
                        format!("{:o}", theirs.mode),
                    );
                    field("uid", mine.uid.to_string(), theirs.uid.to_string());
                    field("gid", mine.gid.to_string(), theirs.gid.to_string());
                    field(
                        "xattrs",
                        format_xattrs(&mine.xattrs),
                        format_xattrs(&theirs.xattrs),
                    );
                    let both = |kind: &Kind| mine.kind == *kind && theirs.kind == *kind;
                    let skip_mtime = (tolerance.dir_mtimes && both(&Kind::Dir))
                        || (tolerance.whiteout_mtimes && both(&Kind::Char(0, 0)));
                    if !skip_mtime {
                        field(
                            "mtime",
                            format!("{}.{:09}", mine.mtime.0, mine.mtime.1),
                            format!("{}.{:09}", theirs.mtime.0, theirs.mtime.1),
                        );
                    }
                }
                (None, None) => {}
            }
        }
        for group in self.hardlinks.difference(&other.hardlinks) {
            lines.push(format!("hardlink group only in {left}: {group:?}"));
        }
        for group in other.hardlinks.difference(&self.hardlinks) {
            lines.push(format!("hardlink group only in {right}: {group:?}"));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_dir_is_the_bind_source_or_the_first_lower() {
        assert_eq!(
            layer_dir_of("mount -t bind /s/1/fs /t -o rbind,ro"),
            Some(PathBuf::from("/s/1/fs"))
        );
        assert_eq!(
            layer_dir_of(
                "mount -t overlay overlay /t -o index=off,lowerdir=/s/3/fs:/s/2/fs:/s/1/fs"
            ),
            Some(PathBuf::from("/s/3/fs"))
        );
        assert_eq!(layer_dir_of("mount -t tmpfs x /t"), None);
    }
}

fn format_xattrs(xattrs: &BTreeMap<String, Vec<u8>>) -> String {
    let shown: Vec<String> = xattrs
        .iter()
        .map(|(name, value)| format!("{name}={}", hex::encode(value)))
        .collect();
    format!("{{{}}}", shown.join(", "))
}

impl fmt::Display for Node {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{:?} mode {:o} {}:{}",
            self.kind, self.mode, self.uid, self.gid
        )
    }
}

/// A committed snapshot mounted read-only through a `ctr snapshots view`, under containerd's
/// temp dir; on `Drop` it is unmounted and the view removed (if the GC has not already).
#[derive(Debug)]
pub struct SnapshotView<'a> {
    containerd: &'a Containerd,
    namespace: String,
    key: String,
    target: PathBuf,
    /// The snapshot's own dir (its layer alone, as the applier wrote it): the bind source, or
    /// the first `lowerdir`.
    layer_dir: PathBuf,
}

/// The top layer's dir in a mount command ctr printed for a view.
fn layer_dir_of(command: &str) -> Option<PathBuf> {
    let words: Vec<&str> = command.split_whitespace().collect();
    if let Some(options) = words
        .iter()
        .skip_while(|word| **word != "-o")
        .nth(1)
        .filter(|_| words.get(2) == Some(&"overlay"))
    {
        let lowers = options
            .split(',')
            .find_map(|option| option.strip_prefix("lowerdir="))?;
        return lowers.split(':').next().map(PathBuf::from);
    }
    // mount -t bind SOURCE TARGET -o rbind,ro
    (words.get(2) == Some(&"bind"))
        .then(|| words.get(3).map(PathBuf::from))
        .flatten()
}

impl<'a> SnapshotView<'a> {
    /// Mounts snapshot `name` (a chain id) of `namespace` read-only.
    pub async fn mount(
        containerd: &'a Containerd,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Self> {
        let key = format!("berth-view-{}", random_lowercase(10));
        let target = containerd.dir().join("views").join(&key);
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        // `view --target` prints the mount command at once: ctr's own lease ends when it exits
        // and the GC may then drop the view's record, but a read-only view mounts only its
        // parents' dirs, which stay.
        let target_arg = target.to_string_lossy().into_owned();
        let created = containerd
            .ctr(
                namespace,
                &["snapshots", "view", "--target", &target_arg, &key, name],
            )
            .await?;
        let command = String::from_utf8_lossy(&created.stdout).into_owned();
        if !created.status.success() || !command.starts_with("mount ") {
            bail!(
                "ctr -n {namespace} snapshots view {key} {name}: {command}{}",
                String::from_utf8_lossy(&created.stderr)
            );
        }
        let layer_dir = layer_dir_of(&command)
            .with_context(|| format!("no layer dir in the mount command {command:?}"))?;
        let view = Self {
            containerd,
            namespace: namespace.to_owned(),
            key,
            target,
            layer_dir,
        };
        let mounted = tokio::process::Command::new("sh")
            .args(["-c", &command])
            .output()
            .await
            .context("running the mount command ctr printed")?;
        if !mounted.status.success() {
            bail!(
                "{command}: {}",
                String::from_utf8_lossy(&mounted.stderr).trim()
            );
        }
        Ok(view)
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    pub fn scan(&self) -> anyhow::Result<Tree> {
        Tree::scan(&self.target)
    }

    /// The snapshot's own layer dir, read raw: overlay whiteouts (char 0:0) and opaque dirs
    /// (`trusted.overlay.opaque=y`) show here, where the merged mount hides them.
    pub fn scan_layer(&self) -> anyhow::Result<Tree> {
        Tree::scan(&self.layer_dir)
    }
}

impl Drop for SnapshotView<'_> {
    fn drop(&mut self) {
        let _ = umount2(&self.target, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.target);
        let _ = self
            .containerd
            .build()
            .command("ctr")
            .arg("--address")
            .arg(self.containerd.socket())
            .args(["-n", &self.namespace, "snapshots", "rm", &self.key])
            .output();
    }
}
