//! [`apply_layer`]: verify, inflate, hash and apply one layer in one pass.
//!
//! The reader chain is
//! `tar::Archive<DiffReader<Decoder<VerifyingReader<input>>>>`: the tar crate
//! only parses (its `unpack` is never called); every entry is written by
//! `entry` relative to a parent resolved inside the root. After
//! the tar's end block the rest of both streams is read, so the digests
//! cover the whole blob and the whole tar.

use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::Timestamps;

use crate::compression::{Compression, Decoder};
use crate::digest::Sha256Digest;
use crate::entry::{self, create, placement_error, read_header, EntryFailure, Kind, Placement};
use crate::error::ApplyError;
use crate::resolve::{normalize, EntryPath, Normalized, Root};
use crate::verify::{DiffReader, DiffState, VerifyingReader};
use crate::whiteout::{self, WhiteoutName, Written};

/// File data is copied through a buffer this large: few syscalls, and the
/// decompressor fills it in big steps.
const COPY_BUFFER_BYTES: usize = 1 << 20;

/// The descriptor of the layer being applied.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    pub compression: Compression,
    /// Digest of the blob as downloaded (the descriptor's `digest`), checked
    /// by the applier; `None` when the caller checks it (and commits nothing
    /// unless it matched), so the hashing can run beside the apply.
    pub digest: Option<Sha256Digest>,
    /// Size of the blob as downloaded (the descriptor's `size`).
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids[i]`).
    pub diff_id: Sha256Digest,
}

/// Where a layer is written and how its whiteouts are expressed.
#[derive(Debug, Clone)]
pub struct Target {
    pub root: PathBuf,
    pub whiteouts: Whiteouts,
}

/// How whiteouts land in the target.
#[derive(Debug, Clone)]
pub enum Whiteouts {
    /// The root is an overlayfs upperdir, written directly; `lowers` are the
    /// lowerdirs, topmost first, whose directories a missing parent copies.
    Overlay { lowers: Vec<PathBuf> },
    /// The root is an overlayfs upperdir whose lowers are not final yet (the
    /// layer below is still being applied): a missing parent is made 0755
    /// and listed in [`Applied::implied_dirs`], for
    /// [`inherit_lower_metadata`] once the lowers are there.
    OverlayDeferred,
    /// The root is a full tree (a mounted snapshot of any snapshotter):
    /// whiteouts remove what they name.
    Remove,
}

/// Bounds on what one layer may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tar entries, whiteouts and directories included.
    pub max_entries: u64,
    /// Bytes of uncompressed tar, headers and padding included.
    pub max_uncompressed_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 4_000_000,
            max_uncompressed_bytes: 64 << 30,
        }
    }
}

/// What an applied layer was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub diff_id: Sha256Digest,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub entries: u64,
    /// With [`Whiteouts::OverlayDeferred`]: the missing parents made, relative
    /// to the root, that still need their lowers' owner and mode.
    pub implied_dirs: Vec<PathBuf>,
}

type LayerStream<R> = DiffReader<Decoder<VerifyingReader<R>>>;

/// Applies one layer read from `input` into `target`.
///
/// Blocking: run it on a blocking thread (`spawn_blocking`, fed through
/// `tokio_util::io::SyncIoBridge`). On error the target holds a partial
/// layer and the caller discards it; nothing is ever written outside
/// `target.root`.
pub fn apply_layer(
    input: impl Read,
    layer: &LayerSpec,
    target: &Target,
    limits: &Limits,
) -> Result<Applied, ApplyError> {
    let root = match &target.whiteouts {
        Whiteouts::Overlay { lowers } => Root::open(&target.root, lowers),
        Whiteouts::OverlayDeferred => Root::open_deferred(&target.root),
        Whiteouts::Remove => Root::open(&target.root, &[]),
    }
    .map_err(|source| ApplyError::Root {
        root: target.root.display().to_string(),
        source,
    })?;
    let verifier = VerifyingReader::new(input, layer.digest, layer.size);
    let decoder =
        Decoder::new(layer.compression, verifier).map_err(|source| ApplyError::Decompress {
            compression: layer.compression,
            source,
        })?;
    let mut archive = tar::Archive::new(DiffReader::new(decoder, limits.max_uncompressed_bytes));
    let overlay = !matches!(target.whiteouts, Whiteouts::Remove);
    let written = write_entries(&mut archive, &root, overlay, limits);
    let mut stream = archive.into_inner();
    let entries = match written {
        Ok(entries) => entries,
        Err(failure) => return Err(explain(stream, failure, layer, limits)),
    };
    // Tar padding and anything after the end blocks belong to the diff id.
    if let Err(source) = io::copy(&mut stream, &mut io::sink()) {
        return Err(explain(stream, EntryFailure::Stream(source), layer, limits));
    }
    let (diff_id, uncompressed_size, decoder) = stream.finish();
    let mut verifier = decoder.into_inner();
    verifier.drain()?;
    if diff_id != layer.diff_id {
        return Err(ApplyError::DiffId {
            expected: layer.diff_id,
            actual: diff_id,
        });
    }
    let implied_dirs = root
        .into_implied_dirs()
        .into_iter()
        .map(|dir| PathBuf::from(std::ffi::OsString::from_vec(dir)))
        .collect();
    Ok(Applied {
        diff_id,
        compressed_size: verifier.bytes_read(),
        uncompressed_size,
        entries,
        implied_dirs,
    })
}

/// Completes a layer applied with [`Whiteouts::OverlayDeferred`] once its
/// lowers are there (`root` may have moved since): the missing parents it
/// made get the owner and mode of the topmost lower directory at their path,
/// as [`Whiteouts::Overlay`] with these lowers would have given them.
pub fn inherit_lower_metadata(
    root: &Path,
    lowers: &[PathBuf],
    implied_dirs: &[PathBuf],
) -> io::Result<()> {
    let implied: Vec<Vec<u8>> = implied_dirs
        .iter()
        .map(|dir| dir.as_os_str().as_bytes().to_vec())
        .collect();
    crate::resolve::inherit_lower_metadata(root, lowers, &implied)
}

fn write_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    root: &Root,
    overlay: bool,
    limits: &Limits,
) -> Result<u64, EntryFailure> {
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    let mut directories: Vec<(EntryPath, Timestamps)> = Vec::new();
    let mut written = Written::default();
    let mut count: u64 = 0;
    for entry in archive.entries().map_err(EntryFailure::Stream)? {
        let mut entry = entry.map_err(EntryFailure::Stream)?;
        count += 1;
        if count > limits.max_entries {
            return Err(ApplyError::TooManyEntries {
                limit: limits.max_entries,
            }
            .into());
        }
        let raw_path = entry.path_bytes().into_owned();
        let display = String::from_utf8_lossy(&raw_path).into_owned();
        let path = match normalize(&raw_path) {
            Normalized::Path(path) => path,
            // containerd ignores entries that resolve to the root itself.
            Normalized::Root => continue,
            Normalized::Escapes => return Err(ApplyError::PathEscape { path: display }.into()),
            Normalized::Invalid => return Err(ApplyError::EmptyPath { path: display }.into()),
        };
        let Some(header) = read_header(&mut entry, &display)? else {
            continue;
        };
        let whiteout = whiteout::classify(path.name());
        match whiteout {
            WhiteoutName::None => {}
            WhiteoutName::AufsMetadata => continue,
            WhiteoutName::Invalid => return Err(ApplyError::EmptyPath { path: display }.into()),
            WhiteoutName::Opaque | WhiteoutName::Delete(_) => {}
        }
        let parent = root
            .parent_of(&path)
            .map_err(|err| placement_error(display.clone(), err))?;
        let whiteout_result = match (whiteout, overlay) {
            (WhiteoutName::Opaque, true) => Some(whiteout::overlay_opaque(&parent)),
            (WhiteoutName::Opaque, false) => Some(whiteout::tree_opaque(&parent, &written)),
            (WhiteoutName::Delete(original), true) => Some(whiteout::overlay_delete(
                &parent, original, header.uid, header.gid,
            )),
            (WhiteoutName::Delete(original), false) => {
                Some(whiteout::tree_delete(&parent, original))
            }
            _ => None,
        };
        if let Some(result) = whiteout_result {
            result.map_err(|err| placement_error(display, err))?;
            continue;
        }
        let place = Placement {
            root,
            parent: &parent,
            path: &path,
        };
        create(&place, &header, &mut entry, &mut buffer)?;
        if !overlay {
            written
                .record(&parent, path.name())
                .map_err(|err| placement_error(display, err))?;
        }
        if header.kind == Kind::Directory {
            root.explicit_dir(path.joined_bytes());
            directories.push((path, header.times));
        }
    }
    // After the children, so creating them does not move the times again.
    for (path, times) in &directories {
        entry::set_directory_times(root, path, times)?;
    }
    Ok(count)
}

/// Turns a failure into the most precise error: a blob that does not match
/// its descriptor comes first (even a hostile-looking entry may just be
/// corruption), then an input failure, the size limit, a decompression or
/// tar error, and finally the entry's own error.
fn explain<R: Read>(
    stream: LayerStream<R>,
    failure: EntryFailure,
    layer: &LayerSpec,
    limits: &Limits,
) -> ApplyError {
    let diff_state = stream.state();
    let mut verifier = stream.into_inner().into_inner();
    if let Some(mismatch) = verifier.verdict() {
        return mismatch;
    }
    let error = match failure {
        EntryFailure::Apply(error) => error,
        EntryFailure::Stream(source) if verifier.input_failed() => {
            return ApplyError::Read { source };
        }
        EntryFailure::Stream(source) => match diff_state {
            DiffState::LimitExceeded => ApplyError::TooLarge {
                limit: limits.max_uncompressed_bytes,
            },
            DiffState::InnerFailed => ApplyError::Decompress {
                compression: layer.compression,
                source,
            },
            DiffState::Reading => ApplyError::Tar { source },
        },
    };
    // Read the rest of the blob (never past its descriptor size): if it
    // does not match, that is the error to report.
    match verifier.drain() {
        Err(mismatch) if mismatch.is_data_loss() => mismatch,
        _ => error,
    }
}
