//! Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`), in the two
//! forms a target takes them:
//! - overlay upperdir: a 0:0 character device named NAME, and the
//!   `trusted.overlay.opaque=y` xattr on the directory (containerd's
//!   `OverlayConvertWhiteout`);
//! - a full tree: NAME removed recursively, and every entry of the directory
//!   that this layer did not write removed (containerd's default applier,
//!   which tracks what the layer unpacked).
//!
//! A whiteout is never created as a regular file.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;

use rustix::fd::OwnedFd;
use rustix::fs::{
    chownat, fsetxattr, fstat, mknodat, openat, AtFlags, FileType, Gid, Mode, OFlags, Uid,
    XattrFlags,
};

use crate::resolve::{child_names, is_dir, lstat_at, remove_all_at};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// AUFS keeps its own metadata under names with this prefix.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What an entry's last component says about whiteouts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WhiteoutName<'a> {
    /// An ordinary entry.
    None,
    /// `.wh..wh..opq`: the directory hides everything below it.
    Opaque,
    /// `.wh.NAME`: NAME is deleted.
    Delete(&'a OsStr),
    /// Other `.wh..wh.*` AUFS metadata: skipped, as Docker does.
    AufsMetadata,
    /// `.wh.`, `.wh..` or `.wh...`: names nothing that can be deleted.
    Invalid,
}

pub(crate) fn classify(name: &OsStr) -> WhiteoutName<'_> {
    let bytes = name.as_bytes();
    if bytes == OPAQUE_MARKER {
        return WhiteoutName::Opaque;
    }
    if bytes.starts_with(WHITEOUT_META_PREFIX) {
        return WhiteoutName::AufsMetadata;
    }
    match bytes.strip_prefix(WHITEOUT_PREFIX) {
        None => WhiteoutName::None,
        Some(b"" | b"." | b"..") => WhiteoutName::Invalid,
        Some(original) => WhiteoutName::Delete(OsStr::from_bytes(original)),
    }
}

/// The entries a layer wrote, as (directory device, directory inode, name),
/// so an opaque marker in a full tree keeps them. Keyed by the directory's
/// identity rather than by path text, so writes through in-root symlinks
/// count where they landed.
#[derive(Debug, Default)]
pub(crate) struct Written {
    entries: HashSet<(u64, u64, Box<[u8]>)>,
}

impl Written {
    pub(crate) fn record(&mut self, parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
        let stat = fstat(parent)?;
        self.entries
            .insert((stat.st_dev, stat.st_ino, name.as_bytes().into()));
        Ok(())
    }

    fn contains(&self, device: u64, inode: u64, name: &[u8]) -> bool {
        self.entries.contains(&(device, inode, Box::from(name)))
    }
}

/// Overlay upperdir: `NAME` becomes a 0:0 character device owned like the
/// whiteout entry.
pub(crate) fn overlay_delete(
    parent: &OwnedFd,
    original: &OsStr,
    uid: Uid,
    gid: Gid,
) -> io::Result<()> {
    remove_all_at(parent, original)?;
    mknodat(
        parent,
        original,
        FileType::CharacterDevice,
        Mode::empty(),
        0,
    )?;
    chownat(
        parent,
        original,
        Some(uid),
        Some(gid),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Overlay upperdir: the directory hides its lowers.
pub(crate) fn overlay_opaque(directory: &OwnedFd) -> io::Result<()> {
    Ok(fsetxattr(
        directory,
        OVERLAY_OPAQUE_XATTR,
        b"y",
        XattrFlags::empty(),
    )?)
}

/// Full tree: `NAME` is removed, recursively.
pub(crate) fn tree_delete(parent: &OwnedFd, original: &OsStr) -> io::Result<()> {
    remove_all_at(parent, original)
}

/// Full tree: everything in `directory` this layer did not write is removed;
/// directories it wrote are kept and cleared the same way.
pub(crate) fn tree_opaque(directory: &OwnedFd, written: &Written) -> io::Result<()> {
    let stat = fstat(directory)?;
    for child in child_names(directory)? {
        let name = OsStr::from_bytes(child.as_bytes());
        if !written.contains(stat.st_dev, stat.st_ino, child.as_bytes()) {
            remove_all_at(directory, name)?;
            continue;
        }
        if lstat_at(directory, name)?.as_ref().is_some_and(is_dir) {
            let subdirectory = openat(
                directory,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            tree_opaque(&subdirectory, written)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_names() {
        let name = |text: &'static str| classify(OsStr::new(text));
        assert_eq!(name("file"), WhiteoutName::None);
        assert_eq!(name(".whatever"), WhiteoutName::None);
        assert_eq!(name(".wh..wh..opq"), WhiteoutName::Opaque);
        assert_eq!(name(".wh.file"), WhiteoutName::Delete(OsStr::new("file")));
        assert_eq!(
            name(".wh..hidden"),
            WhiteoutName::Delete(OsStr::new(".hidden"))
        );
        assert_eq!(name(".wh..wh.plnk"), WhiteoutName::AufsMetadata);
        assert_eq!(name(".wh."), WhiteoutName::Invalid);
        assert_eq!(name(".wh.."), WhiteoutName::Invalid);
        assert_eq!(name(".wh..."), WhiteoutName::Invalid);
    }
}
