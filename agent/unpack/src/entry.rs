//! One tar entry: its header read into a [`Header`], then created relative to
//! its parent's fd with `*at` calls, never following a symlink at the last
//! component, with containerd's metadata order: owner, xattrs, mode (after
//! chown, which clears setuid and file capabilities), times.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fd::OwnedFd;
use rustix::fs::{
    chmodat, chownat, fchmod, fchown, fsetxattr, futimens, linkat, lsetxattr, makedev, mkdirat,
    mknodat, openat, symlinkat, utimensat, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps,
    XattrFlags,
};
use rustix::fs::{Gid, Uid};
use rustix::io::Errno;
use tar::EntryType;

use crate::error::ApplyError;
use crate::resolve::{is_dir, lstat_at, normalize, remove_all_at, EntryPath, Normalized, Root};

const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular { sparse: bool },
    Directory,
    Symlink { target: Vec<u8> },
    Hardlink { target: Vec<u8> },
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
}

/// An entry's type and metadata, read from its (PAX-extended) header.
#[derive(Debug)]
pub(crate) struct Header {
    pub(crate) kind: Kind,
    mode: u32,
    pub(crate) uid: Uid,
    pub(crate) gid: Gid,
    pub(crate) times: Timestamps,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Why an entry could not be written: a problem with the stream it is read
/// from (classified by `apply`, which sees the readers), or one of its own.
#[derive(Debug)]
pub(crate) enum EntryFailure {
    Stream(io::Error),
    Apply(ApplyError),
}

impl From<ApplyError> for EntryFailure {
    fn from(err: ApplyError) -> Self {
        Self::Apply(err)
    }
}

/// Reads the header of `entry`; `None` for a PAX global header, which
/// carries nothing containerd applies.
pub(crate) fn read_header<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &str,
) -> Result<Option<Header>, ApplyError> {
    let header_error = |source: io::Error| ApplyError::Header {
        path: path.to_owned(),
        source,
    };
    let tar_header = entry.header();
    let entry_type = tar_header.entry_type();
    let device = |header: &tar::Header| -> io::Result<(u32, u32)> {
        Ok((
            header.device_major()?.unwrap_or(0),
            header.device_minor()?.unwrap_or(0),
        ))
    };
    let link_target = |entry: &tar::Entry<'_, R>| -> Vec<u8> {
        entry
            .link_name_bytes()
            .map(|target| target.into_owned())
            .unwrap_or_default()
    };
    let kind = match entry_type {
        EntryType::Regular | EntryType::Continuous => Kind::Regular { sparse: false },
        EntryType::GNUSparse => Kind::Regular { sparse: true },
        EntryType::Directory => Kind::Directory,
        EntryType::Symlink => Kind::Symlink {
            target: link_target(entry),
        },
        EntryType::Link => Kind::Hardlink {
            target: link_target(entry),
        },
        EntryType::Char => {
            let (major, minor) = device(tar_header).map_err(header_error)?;
            Kind::CharDevice { major, minor }
        }
        EntryType::Block => {
            let (major, minor) = device(tar_header).map_err(header_error)?;
            Kind::BlockDevice { major, minor }
        }
        EntryType::Fifo => Kind::Fifo,
        EntryType::XGlobalHeader => return Ok(None),
        other => {
            return Err(ApplyError::EntryType {
                path: path.to_owned(),
                type_flag: other.as_byte(),
            })
        }
    };
    let id = |value: io::Result<u64>| -> Result<u32, ApplyError> {
        let value = value.map_err(header_error)?;
        u32::try_from(value).map_err(|_| {
            header_error(io::Error::new(
                io::ErrorKind::InvalidData,
                "owner id does not fit 32 bits",
            ))
        })
    };
    let raw = tar_header.as_old();
    let mode = lenient(tar_header.mode(), &raw.mode).map_err(header_error)? & 0o7777;
    let uid = Uid::from_raw(id(lenient(tar_header.uid(), &raw.uid))?);
    let gid = Gid::from_raw(id(lenient(tar_header.gid(), &raw.gid))?);
    let header_mtime = lenient(tar_header.mtime(), &raw.mtime).map_err(header_error)?;
    let mut mtime = Timespec {
        tv_sec: i64::try_from(header_mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let mut atime = None;
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions().map_err(header_error)? {
        for extension in extensions {
            let extension = extension.map_err(header_error)?;
            let key = extension.key_bytes();
            if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if !name.is_empty() {
                    xattrs.push((name.to_vec(), extension.value_bytes().to_vec()));
                }
            } else if key == b"mtime" {
                mtime = parse_pax_time(extension.value_bytes()).ok_or_else(|| {
                    header_error(io::Error::new(io::ErrorKind::InvalidData, "bad PAX mtime"))
                })?;
            } else if key == b"atime" {
                atime = parse_pax_time(extension.value_bytes());
            }
        }
    }
    // containerd: atime is the later of the access and modification times.
    let atime = atime
        .filter(|atime| (atime.tv_sec, atime.tv_nsec) > (mtime.tv_sec, mtime.tv_nsec))
        .unwrap_or(mtime);
    Ok(Some(Header {
        kind,
        mode,
        uid,
        gid,
        times: Timestamps {
            last_access: atime,
            last_modification: mtime,
        },
        xattrs,
    }))
}

/// An empty numeric field (all NULs or spaces) reads as 0, as Go's
/// archive/tar, which containerd uses, reads it; the tar crate refuses it.
fn lenient<T: Default>(parsed: io::Result<T>, field: &[u8]) -> io::Result<T> {
    match parsed {
        Err(_) if field.iter().all(|byte| *byte == 0 || *byte == b' ') => Ok(T::default()),
        other => other,
    }
}

/// A PAX time: decimal seconds, optionally negative, with a fraction.
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let seconds: i64 = whole.parse().ok()?;
    if !fraction.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let mut nanos: i64 = 0;
    for position in 0..9 {
        let digit = fraction
            .as_bytes()
            .get(position)
            .map_or(0, |byte| byte - b'0');
        nanos = nanos * 10 + i64::from(digit);
    }
    Some(match (negative, nanos) {
        (false, _) => Timespec {
            tv_sec: seconds,
            tv_nsec: nanos,
        },
        (true, 0) => Timespec {
            tv_sec: -seconds,
            tv_nsec: 0,
        },
        (true, _) => Timespec {
            tv_sec: -seconds - 1,
            tv_nsec: 1_000_000_000 - nanos,
        },
    })
}

/// Where one entry goes: its parent directory's fd and its last component.
#[derive(Debug)]
pub(crate) struct Placement<'a> {
    pub(crate) root: &'a Root,
    pub(crate) parent: &'a OwnedFd,
    pub(crate) path: &'a EntryPath,
}

impl Placement<'_> {
    fn name(&self) -> &OsStr {
        self.path.name()
    }

    fn failed(&self, source: io::Error) -> ApplyError {
        placement_error(self.path.display(), source)
    }
}

/// Maps a failed syscall on an entry: errors a layer can cause by its
/// shape (a parent that is a file, a symlink loop, a dangling symlink in
/// the way) are the layer's fault; anything else is I/O.
pub(crate) fn placement_error(path: String, source: io::Error) -> ApplyError {
    let layer_shaped = [
        Errno::NOTDIR,
        Errno::LOOP,
        Errno::NAMETOOLONG,
        Errno::EXIST,
        Errno::INVAL,
        Errno::XDEV,
    ]
    .iter()
    .any(|errno| source.raw_os_error() == Some(errno.raw_os_error()));
    if layer_shaped {
        ApplyError::Placement { path, source }
    } else {
        ApplyError::Write { path, source }
    }
}

/// Creates one entry (replacing what is there, except that a directory over
/// a directory keeps it and updates its metadata). Directory times are left
/// to the caller, which sets them after the whole layer.
pub(crate) fn create(
    place: &Placement<'_>,
    header: &Header,
    data: &mut impl Read,
    buffer: &mut [u8],
) -> Result<(), EntryFailure> {
    let existing = lstat_at(place.parent, place.name()).map_err(|err| place.failed(err))?;
    let keep_directory = header.kind == Kind::Directory && existing.as_ref().is_some_and(is_dir);
    if existing.is_some() && !keep_directory {
        remove_all_at(place.parent, place.name()).map_err(|err| place.failed(err))?;
    }
    match &header.kind {
        Kind::Regular { sparse } => write_regular(place, header, data, buffer, *sparse),
        Kind::Directory => Ok(make_directory(place, header, keep_directory)?),
        Kind::Symlink { target } => Ok(make_symlink(place, header, target)?),
        Kind::Hardlink { target } => Ok(make_hardlink(place, header, target)?),
        Kind::CharDevice { major, minor } => Ok(make_node(
            place,
            header,
            FileType::CharacterDevice,
            makedev(*major, *minor),
        )?),
        Kind::BlockDevice { major, minor } => Ok(make_node(
            place,
            header,
            FileType::BlockDevice,
            makedev(*major, *minor),
        )?),
        Kind::Fifo => Ok(make_node(place, header, FileType::Fifo, 0)?),
    }
}

fn write_regular(
    place: &Placement<'_>,
    header: &Header,
    data: &mut impl Read,
    buffer: &mut [u8],
    sparse: bool,
) -> Result<(), EntryFailure> {
    let fd = openat(
        place.parent,
        place.name(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|err| place.failed(err.into()))?;
    let mut file = File::from(fd);
    let mut length: u64 = 0;
    let mut hole = false;
    loop {
        let count = match data.read(buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(EntryFailure::Stream(err)),
        };
        let chunk = &buffer[..count];
        length += count as u64;
        // GNU sparse entries read as zeros in their holes: skip over those
        // so the file stays sparse.
        if sparse && chunk.iter().all(|byte| *byte == 0) {
            file.seek(SeekFrom::Current(i64::try_from(count).unwrap_or(i64::MAX)))
                .map_err(|err| place.failed(err))?;
            hole = true;
        } else {
            file.write_all(chunk).map_err(|err| place.failed(err))?;
            hole = false;
        }
    }
    if hole {
        file.set_len(length).map_err(|err| place.failed(err))?;
    }
    fchown(&file, Some(header.uid), Some(header.gid)).map_err(|err| place.failed(err.into()))?;
    for (name, value) in &header.xattrs {
        skip_unsupported(
            fsetxattr(&file, OsStr::from_bytes(name), value, XattrFlags::empty()),
            false,
        )
        .map_err(|err| place.failed(err))?;
    }
    fchmod(&file, Mode::from_raw_mode(header.mode)).map_err(|err| place.failed(err.into()))?;
    futimens(&file, &header.times).map_err(|err| place.failed(err.into()))?;
    Ok(())
}

fn make_directory(place: &Placement<'_>, header: &Header, exists: bool) -> Result<(), ApplyError> {
    let failed = |err: Errno| place.failed(err.into());
    if !exists {
        mkdirat(place.parent, place.name(), Mode::from_raw_mode(0o700)).map_err(failed)?;
    }
    let directory = openat(
        place.parent,
        place.name(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(failed)?;
    fchown(&directory, Some(header.uid), Some(header.gid)).map_err(failed)?;
    for (name, value) in &header.xattrs {
        skip_unsupported(
            fsetxattr(
                &directory,
                OsStr::from_bytes(name),
                value,
                XattrFlags::empty(),
            ),
            false,
        )
        .map_err(|err| place.failed(err))?;
    }
    fchmod(&directory, Mode::from_raw_mode(header.mode)).map_err(failed)?;
    Ok(())
}

fn make_symlink(place: &Placement<'_>, header: &Header, target: &[u8]) -> Result<(), ApplyError> {
    let failed = |err: Errno| place.failed(err.into());
    symlinkat(OsStr::from_bytes(target), place.parent, place.name()).map_err(failed)?;
    // A symlink has no mode of its own to set.
    set_metadata_at(place, header, false)
}

/// A hardlink shares the target's inode. As containerd's applier does, the
/// link entry's own header is then applied to that inode: owner (which on
/// Linux clears the setuid bit and file capabilities), xattrs, mode (unless
/// the target is a symlink) and times, so both unpack a layer alike.
fn make_hardlink(place: &Placement<'_>, header: &Header, target: &[u8]) -> Result<(), ApplyError> {
    let refused = |source: Option<io::Error>| ApplyError::HardlinkTarget {
        path: place.path.display(),
        target: String::from_utf8_lossy(target).into_owned(),
        source,
    };
    let Normalized::Path(target_path) = normalize(target) else {
        return Err(refused(None));
    };
    let target_parent = place
        .root
        .open_dir(target_path.parent())
        .map_err(|err| refused(Some(err)))?;
    let target_is_symlink = match lstat_at(&target_parent, target_path.name()) {
        Ok(Some(stat)) if !is_dir(&stat) => {
            FileType::from_raw_mode(stat.st_mode) == FileType::Symlink
        }
        Ok(_) => return Err(refused(None)),
        Err(err) => return Err(refused(Some(err))),
    };
    // Flags 0: link the target itself, even when it is a symlink (as
    // os.Link does), never what it points to.
    linkat(
        &target_parent,
        target_path.name(),
        place.parent,
        place.name(),
        AtFlags::empty(),
    )
    .map_err(|err| place.failed(err.into()))?;
    // The name was just linked to a file that is not a symlink (then its mode is
    // set, which changes that inode and follows nothing) or to a symlink.
    set_metadata_at(place, header, !target_is_symlink)
}

fn make_node(
    place: &Placement<'_>,
    header: &Header,
    file_type: FileType,
    device: rustix::fs::Dev,
) -> Result<(), ApplyError> {
    let failed = |err: Errno| place.failed(err.into());
    mknodat(
        place.parent,
        place.name(),
        file_type,
        Mode::from_raw_mode(0o600),
        device,
    )
    .map_err(failed)?;
    // The node was just made by mknodat, so it is not a symlink.
    set_metadata_at(place, header, true)
}

/// Applies an entry's owner, xattrs, mode (when `chmod`: the entry is known
/// not to be a symlink, so `chmodat` follows nothing) and times to the name
/// it was just created under, in containerd's order (chown clears set-id
/// bits and capabilities, so the mode comes after it).
fn set_metadata_at(place: &Placement<'_>, header: &Header, chmod: bool) -> Result<(), ApplyError> {
    let failed = |err: Errno| place.failed(err.into());
    chownat(
        place.parent,
        place.name(),
        Some(header.uid),
        Some(header.gid),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(failed)?;
    set_xattrs_at(place, header)?;
    if chmod {
        chmodat(
            place.parent,
            place.name(),
            Mode::from_raw_mode(header.mode),
            AtFlags::empty(),
        )
        .map_err(failed)?;
    }
    utimensat(
        place.parent,
        place.name(),
        &header.times,
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(failed)?;
    Ok(())
}

/// Sets xattrs on an entry that cannot be opened safely (a symlink, a
/// device, a fifo) through `/proc/self/fd/<parent>/<name>` with `lsetxattr`,
/// which does not follow the last component.
fn set_xattrs_at(place: &Placement<'_>, header: &Header) -> Result<(), ApplyError> {
    if header.xattrs.is_empty() {
        return Ok(());
    }
    let mut path = PathBuf::from(format!(
        "/proc/self/fd/{}",
        place.parent.as_fd().as_raw_fd()
    ));
    path.push(place.name());
    for (name, value) in &header.xattrs {
        skip_unsupported(
            lsetxattr(&path, OsStr::from_bytes(name), value, XattrFlags::empty()),
            true,
        )
        .map_err(|err| place.failed(err))?;
    }
    Ok(())
}

/// containerd logs and skips xattrs the filesystem does not support; on a
/// symlink, device or fifo the kernel also refuses `user.*` with `EPERM`.
fn skip_unsupported(result: Result<(), Errno>, special: bool) -> io::Result<()> {
    match result {
        Ok(()) | Err(Errno::NOTSUP) => Ok(()),
        Err(Errno::PERM) if special => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Sets a directory's times after the layer is written, re-resolving its
/// parent and never following a symlink that replaced it since.
pub(crate) fn set_directory_times(
    root: &Root,
    path: &EntryPath,
    times: &Timestamps,
) -> Result<(), ApplyError> {
    let parent = root
        .open_dir(path.parent())
        .map_err(|err| placement_error(path.display(), err))?;
    match utimensat(&parent, path.name(), times, AtFlags::SYMLINK_NOFOLLOW) {
        // Removed again later in the layer.
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(err) => Err(placement_error(path.display(), err.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_numeric_fields_read_as_zero() {
        let parsed: io::Result<u64> = Err(io::Error::other("not a number"));
        assert_eq!(lenient(parsed, &[0u8; 8]).unwrap(), 0);
        let parsed: io::Result<u64> = Err(io::Error::other("not a number"));
        lenient(parsed, b"12x4567\0").unwrap_err();
        assert_eq!(lenient(Ok(7u64), b"0000007\0").unwrap(), 7);
    }

    #[test]
    fn pax_times() {
        let time = |text: &str| parse_pax_time(text.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(time("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(time("12.123456789123"), Some((12, 123_456_789)));
        assert_eq!(time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(time("-3"), Some((-3, 0)));
        assert_eq!(time("x"), None);
        assert_eq!(time("1.x"), None);
    }
}
