//! Entry names, normalized, and their parent directories resolved inside
//! the root with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
//!
//! Why rustix's `openat2` rather than `cap-std`: `RESOLVE_IN_ROOT` gives
//! exactly containerd's `fs.RootPath` semantics (symlinks, absolute or
//! relative, are followed as if the root were `/`, and `..` stops at the
//! root) in the kernel, race-free, in one syscall, while cap-std's
//! resolution refuses absolute symlinks outright (so layers that work with
//! containerd would fail here). The kernels berth runs on (5.6+) all have
//! `openat2`. Everything after resolution is an `*at` call on the last
//! component relative to the parent's fd, never following a symlink there.

use std::cell::RefCell;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fd::OwnedFd;
use rustix::fs::{
    fchmod, fchown, fstat, futimens, mkdirat, openat, openat2, readlinkat, statat, unlinkat,
    AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Stat, Timestamps, CWD,
};
use rustix::fs::{Gid, Uid};
use rustix::io::Errno;

/// How many dangling symlinks one missing parent may pass through, as the
/// kernel's own limit on symlinks in one lookup.
const MAX_DANGLING_SYMLINKS: usize = 40;

/// How many times `openat2` is retried when the kernel saw a concurrent
/// rename and returned `EAGAIN`.
const RESOLVE_RETRIES: usize = 16;

/// A normalized, non-empty entry name: components joined with `/`, no
/// leading `/`, no `.` or empty components, every `..` folded away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryPath {
    joined: Vec<u8>,
    /// Where the last component starts in `joined`.
    name_start: usize,
}

/// What an entry name comes to once normalized.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Normalized {
    Path(EntryPath),
    /// `.`, `/`, `./` and friends: the root itself.
    Root,
    /// A `..` climbs above the root.
    Escapes,
    /// A NUL byte in the name.
    Invalid,
}

/// Normalizes a path the way a lookup from `/` sees it: `..` at the top
/// stays at the top.
fn clamp_to_root(raw: &[u8]) -> Vec<u8> {
    let mut components: Vec<&[u8]> = Vec::new();
    for component in raw.split(|byte| *byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                components.pop();
            }
            name => components.push(name),
        }
    }
    components.join(&b'/')
}

enum Walk {
    Opened(OwnedFd),
    Redirected(Vec<u8>),
}

/// Normalizes a tar entry name like containerd does (`filepath.Clean`, then
/// relative to the root), refusing a `..` that climbs above the root.
pub(crate) fn normalize(raw: &[u8]) -> Normalized {
    if raw.contains(&0) {
        return Normalized::Invalid;
    }
    let mut components: Vec<&[u8]> = Vec::new();
    for component in raw.split(|byte| *byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                if components.pop().is_none() {
                    return Normalized::Escapes;
                }
            }
            name => components.push(name),
        }
    }
    let Some((last, _)) = components.split_last() else {
        return Normalized::Root;
    };
    let joined = components.join(&b'/');
    let name_start = joined.len() - last.len();
    Normalized::Path(EntryPath { joined, name_start })
}

impl EntryPath {
    /// The parent's path relative to the root; empty for the root itself.
    pub(crate) fn parent(&self) -> &[u8] {
        self.joined[..self.name_start]
            .strip_suffix(b"/")
            .unwrap_or_default()
    }

    /// The last component.
    pub(crate) fn name(&self) -> &OsStr {
        OsStr::from_bytes(&self.joined[self.name_start..])
    }

    /// The whole path, relative to the root.
    pub(crate) fn joined_bytes(&self) -> &[u8] {
        &self.joined
    }

    pub(crate) fn display(&self) -> String {
        String::from_utf8_lossy(&self.joined).into_owned()
    }
}

/// The directory a layer is applied into, plus (for overlay upperdirs) the
/// lower directories whose metadata a missing parent copies.
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
    lowers: Lowers,
}

/// Where a missing parent directory gets its metadata.
#[derive(Debug)]
enum Lowers {
    /// From the topmost of these lower directories that has it.
    Open(Vec<OwnedFd>),
    /// From lowers that are not there yet: the directory is made 0755 and
    /// its path recorded for [`inherit_lower_metadata`].
    Deferred(RefCell<Vec<Vec<u8>>>),
}

impl Root {
    pub(crate) fn open(root: &Path, lowers: &[std::path::PathBuf]) -> io::Result<Self> {
        let directory = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = openat(CWD, root, directory, Mode::empty())?;
        let lowers = lowers
            .iter()
            .map(|lower| openat(CWD, lower, directory, Mode::empty()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            fd,
            lowers: Lowers::Open(lowers),
        })
    }

    /// A root whose lowers are not known yet: see [`Lowers::Deferred`].
    pub(crate) fn open_deferred(root: &Path) -> io::Result<Self> {
        let directory = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        Ok(Self {
            fd: openat(CWD, root, directory, Mode::empty())?,
            lowers: Lowers::Deferred(RefCell::new(Vec::new())),
        })
    }

    /// The missing parents made while the lowers were deferred, except those
    /// a directory entry of the layer then gave metadata of its own.
    pub(crate) fn into_implied_dirs(self) -> Vec<Vec<u8>> {
        match self.lowers {
            Lowers::Open(_) => Vec::new(),
            Lowers::Deferred(dirs) => dirs.into_inner(),
        }
    }

    /// A directory entry of the layer set the metadata of `path` itself.
    pub(crate) fn explicit_dir(&self, path: &[u8]) {
        if let Lowers::Deferred(dirs) = &self.lowers {
            dirs.borrow_mut().retain(|dir| dir != path);
        }
    }

    /// Opens the directory at `path` (relative, normalized) inside the root,
    /// following symlinks as if the root were `/`.
    pub(crate) fn open_dir(&self, path: &[u8]) -> io::Result<OwnedFd> {
        open_in_root(
            &self.fd,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
    }

    /// Opens the parent directory of `entry`, creating missing directories
    /// on the way like containerd's `mkparent`: 0755, or the mode, owner and
    /// times of the topmost lower directory at that path.
    pub(crate) fn parent_of(&self, entry: &EntryPath) -> io::Result<OwnedFd> {
        match self.open_dir(entry.parent()) {
            Err(err) if err.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => {
                self.make_parents(entry.parent())
            }
            other => other,
        }
    }

    /// Creates the missing directories of `parent`. A component that
    /// exists but cannot be opened is a dangling symlink: like containerd's
    /// `fs.RootPath`, its target (taken inside the root) is created instead.
    fn make_parents(&self, parent: &[u8]) -> io::Result<OwnedFd> {
        let mut path = parent.to_vec();
        for _ in 0..MAX_DANGLING_SYMLINKS {
            match self.walk_creating(&path)? {
                Walk::Opened(fd) => return Ok(fd),
                Walk::Redirected(redirected) => path = redirected,
            }
        }
        Err(Errno::LOOP.into())
    }

    fn walk_creating(&self, path: &[u8]) -> io::Result<Walk> {
        let mut current = self.open_dir(b"")?;
        let mut missing = false;
        let mut end = 0;
        for component in path.split(|byte| *byte == b'/') {
            end += component.len();
            let prefix = &path[..end];
            end += 1;
            if !missing {
                match self.open_dir(prefix) {
                    Ok(fd) => {
                        current = fd;
                        continue;
                    }
                    Err(err) if err.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => {
                        missing = true;
                    }
                    Err(err) => return Err(err),
                }
            }
            let name = OsStr::from_bytes(component);
            match mkdirat(&current, name, Mode::from_raw_mode(0o755)) {
                Ok(()) => {}
                Err(Errno::EXIST) => {
                    let rest = path.get(end..).unwrap_or_default();
                    return self.redirect(&current, name, rest).map(Walk::Redirected);
                }
                Err(err) => return Err(err.into()),
            }
            let created = openat(
                &current,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            match &self.lowers {
                Lowers::Open(lowers) => {
                    copy_lower_metadata(lowers, prefix, &created, true)?;
                }
                Lowers::Deferred(dirs) => {
                    // mkdirat's mode went through the umask; containerd's is 0755.
                    fchmod(&created, Mode::from_raw_mode(0o755))?;
                    dirs.borrow_mut().push(prefix.to_vec());
                }
            }
            current = created;
        }
        Ok(Walk::Opened(current))
    }

    /// The path to create instead of `directory/name/rest` when `name` is a
    /// dangling symlink: its target, taken inside the root.
    fn redirect(&self, directory: &OwnedFd, name: &OsStr, rest: &[u8]) -> io::Result<Vec<u8>> {
        let target = readlinkat(directory, name, Vec::new())?.into_bytes();
        let mut redirected = if target.starts_with(b"/") {
            Vec::new()
        } else {
            self.path_in_root(directory)?
        };
        redirected.push(b'/');
        redirected.extend_from_slice(&target);
        redirected.push(b'/');
        redirected.extend_from_slice(rest);
        Ok(clamp_to_root(&redirected))
    }

    /// Where an fd inside the root is, relative to the root, from procfs.
    fn path_in_root(&self, directory: &OwnedFd) -> io::Result<Vec<u8>> {
        let proc_path = |fd: &OwnedFd| format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
        let root = readlinkat(CWD, proc_path(&self.fd), Vec::new())?.into_bytes();
        let inside = readlinkat(CWD, proc_path(directory), Vec::new())?.into_bytes();
        match inside.strip_prefix(root.as_slice()) {
            Some(relative) => Ok(relative.to_vec()),
            None => Err(Errno::XDEV.into()),
        }
    }
}

/// Gives a directory the owner and mode (and with `times`, the times) of the
/// topmost lower directory at `prefix`, or 0755 when none has one; says
/// whether a lower had one.
fn copy_lower_metadata(
    lowers: &[OwnedFd],
    prefix: &[u8],
    created: &OwnedFd,
    times: bool,
) -> io::Result<bool> {
    for lower in lowers {
        let found = match open_in_root(lower, prefix, OFlags::PATH | OFlags::CLOEXEC) {
            Ok(found) => found,
            Err(err) if err.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => continue,
            Err(err) => return Err(err),
        };
        let lower_stat = fstat(&found)?;
        if FileType::from_raw_mode(lower_stat.st_mode) != FileType::Directory {
            // Replaced by a non-directory below: copy nothing.
            break;
        }
        fchown(
            created,
            Some(Uid::from_raw(lower_stat.st_uid)),
            Some(Gid::from_raw(lower_stat.st_gid)),
        )?;
        fchmod(created, Mode::from_raw_mode(lower_stat.st_mode & 0o7777))?;
        if !times {
            return Ok(true);
        }
        let times = Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: lower_stat.st_atime,
                tv_nsec: lower_stat.st_atime_nsec as i64,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: lower_stat.st_mtime,
                tv_nsec: lower_stat.st_mtime_nsec as i64,
            },
        };
        futimens(created, &times)?;
        return Ok(true);
    }
    // mkdirat's mode went through the umask; containerd's is 0755.
    fchmod(created, Mode::from_raw_mode(0o755))?;
    Ok(false)
}

/// Gives the missing parents a layer applied with deferred lowers made
/// (`implied`, relative to `root`) the owner and mode of the topmost of
/// `lowers` that has them, as an apply with those lowers would have. Their
/// times are not copied: the entries created inside moved them to the time
/// of the apply, as they do in an apply with the lowers. One that no lower
/// has takes the group of its parent when that is setgid, as it would have
/// been made in it. A path that is no longer a directory, or that passes a
/// symlink, is left alone. `implied` lists parents before their children.
pub(crate) fn inherit_lower_metadata(
    root: &Path,
    lowers: &[std::path::PathBuf],
    implied: &[Vec<u8>],
) -> io::Result<()> {
    if implied.is_empty() {
        return Ok(());
    }
    let Root { fd, lowers } = Root::open(root, lowers)?;
    let Lowers::Open(lowers) = lowers else {
        return Ok(());
    };
    for dir in implied {
        let resolve =
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_SYMLINKS;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let opened = match openat2(&fd, OsStr::from_bytes(dir), flags, Mode::empty(), resolve) {
            Ok(opened) => opened,
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
            Err(err) => return Err(err.into()),
        };
        if copy_lower_metadata(&lowers, dir, &opened, false)? {
            continue;
        }
        let parent_path = dir
            .iter()
            .rposition(|byte| *byte == b'/')
            .map_or(&b"."[..], |slash| &dir[..slash]);
        let parent = match openat2(
            &fd,
            OsStr::from_bytes(parent_path),
            flags,
            Mode::empty(),
            resolve,
        ) {
            Ok(parent) => parent,
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
            Err(err) => return Err(err.into()),
        };
        let parent_stat = fstat(&parent)?;
        if parent_stat.st_mode & 0o2000 != 0 {
            fchown(&opened, None, Some(Gid::from_raw(parent_stat.st_gid)))?;
        }
    }
    Ok(())
}

fn open_in_root(root: &OwnedFd, path: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
    let path = if path.is_empty() { &b"."[..] } else { path };
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let mut attempts = 0;
    loop {
        match openat2(root, OsStr::from_bytes(path), flags, Mode::empty(), resolve) {
            Err(Errno::AGAIN) if attempts < RESOLVE_RETRIES => attempts += 1,
            other => return Ok(other?),
        }
    }
}

/// `lstat` of `name` in `parent`; `None` when it does not exist.
pub(crate) fn lstat_at(parent: &OwnedFd, name: &OsStr) -> io::Result<Option<Stat>> {
    match statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(stat)),
        Err(Errno::NOENT) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

pub(crate) fn is_dir(stat: &Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::Directory
}

/// Removes `name` in `parent`, recursively when it is a directory; never
/// follows a symlink (a symlink is removed, not its target).
pub(crate) fn remove_all_at(parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(err) => return Err(err.into()),
    }
    let directory = openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for child in child_names(&directory)? {
        remove_all_at(&directory, OsStr::from_bytes(child.as_bytes()))?;
    }
    match unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// The names in a directory, without `.` and `..`, read before any change.
pub(crate) fn child_names(directory: &OwnedFd) -> io::Result<Vec<CString>> {
    let mut names = Vec::new();
    let mut reader = Dir::read_from(directory)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(raw: &str) -> (String, String) {
        match normalize(raw.as_bytes()) {
            Normalized::Path(entry) => (
                String::from_utf8(entry.parent().to_vec()).unwrap(),
                entry.name().to_str().unwrap().to_owned(),
            ),
            other => panic!("{raw:?} normalized to {other:?}"),
        }
    }

    #[test]
    fn normalizes_like_containerd() {
        assert_eq!(path("etc/passwd"), ("etc".into(), "passwd".into()));
        assert_eq!(path("/etc/passwd"), ("etc".into(), "passwd".into()));
        assert_eq!(path("./etc//x/"), ("etc".into(), "x".into()));
        assert_eq!(path("a/b/../c"), ("a".into(), "c".into()));
        assert_eq!(path("file"), ("".into(), "file".into()));
        assert_eq!(path("a/./b/./c"), ("a/b".into(), "c".into()));
    }

    #[test]
    fn refuses_escapes_and_nul() {
        assert_eq!(normalize(b"../etc/passwd"), Normalized::Escapes);
        assert_eq!(normalize(b"a/../../x"), Normalized::Escapes);
        assert_eq!(normalize(b"/../x"), Normalized::Escapes);
        assert_eq!(normalize(b"a\0b"), Normalized::Invalid);
        for root in ["", ".", "/", "./", "a/.."] {
            assert_eq!(normalize(root.as_bytes()), Normalized::Root, "{root:?}");
        }
    }

    #[test]
    fn resolves_symlinks_inside_the_root() {
        let scratch = tempfile::tempdir().unwrap();
        let root_dir = scratch.path().join("root");
        std::fs::create_dir_all(root_dir.join("real")).unwrap();
        std::os::unix::fs::symlink("/", root_dir.join("up")).unwrap();
        std::os::unix::fs::symlink("../../../real", root_dir.join("rel")).unwrap();
        let root = Root::open(&root_dir, &[]).unwrap();
        let Normalized::Path(entry) = normalize(b"up/real/file") else {
            panic!("normalize")
        };
        let parent = root.parent_of(&entry).unwrap();
        assert_eq!(
            fstat(&parent).unwrap().st_ino,
            std::fs::metadata(root_dir.join("real"))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap()
        );
        let Normalized::Path(entry) = normalize(b"rel/new/deeper/file") else {
            panic!("normalize")
        };
        root.parent_of(&entry).unwrap();
        assert!(root_dir.join("real/new/deeper").is_dir());
        assert!(!scratch.path().join("real").exists());
    }
}
