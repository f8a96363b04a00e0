//! Private files on disk for the `file` store: 0700 directories, 0600 files written atomically,
//! and the key file (32 random bytes, 0600, made on first start, refused when it is the wrong size,
//! open to group or others, or owned by another user).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::{RngCore, TryRngCore};
use zeroize::Zeroizing;

use super::SecretError;

/// Length of the key in `key_file` (AES-256).
const KEY_BYTES: usize = 32;

/// Reads the key from `key_file`, first creating it (and its parent, 0700) when it is missing.
pub(super) fn load_or_create_key(
    key_file: &Path,
) -> Result<Zeroizing<[u8; KEY_BYTES]>, SecretError> {
    if !key_file.exists() {
        create_key_file(key_file)?;
    }
    read_key_file(key_file)
}

/// Creates `dir` (and missing parents) with mode 0700.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), SecretError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| SecretError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Writes `bytes` to a 0600 temp file in `dir`, syncs it, renames it to `path`, syncs `dir`.
pub(super) fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SecretError> {
    let temp_path = temp_path_for(path);
    let result = write_new_file(&temp_path, bytes)
        .and_then(|()| fs::rename(&temp_path, path))
        .map_err(|source| SecretError::Io {
            path: path.to_owned(),
            source,
        });
    if result.is_err() {
        // Best effort: the temp file may not exist, and the original error is what matters.
        let _ = fs::remove_file(&temp_path);
    }
    result?;
    sync_dir(dir)
}

/// A hidden sibling of `path` with a random suffix (never parsed as a record).
fn temp_path_for(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".tmp-{:016x}", rand::rng().next_u64()));
    path.with_file_name(name)
}

/// Creates `path` (it must not exist) with mode 0600 and writes and syncs `bytes`.
fn write_new_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), SecretError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| SecretError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Creates `key_file` with 32 random bytes, mode 0600, and its parent (0700) when missing. The key
/// is written to a temp file and hard-linked into place, so a crash never leaves a short key and
/// a key created concurrently is never replaced.
fn create_key_file(key_file: &Path) -> Result<(), SecretError> {
    let parent = match key_file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    create_private_dir(&parent)?;
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    rand::rngs::OsRng
        .try_fill_bytes(&mut key[..])
        .map_err(|_| SecretError::Key {
            path: key_file.to_owned(),
            reason: "the operating system's random source failed",
        })?;
    let temp_path = temp_path_for(key_file);
    let io_error = |source| SecretError::Io {
        path: key_file.to_owned(),
        source,
    };
    let written =
        write_new_file(&temp_path, &key[..]).and_then(|()| fs::hard_link(&temp_path, key_file));
    // The temp name is ours alone; once linked (or failed) it is not needed.
    let _ = fs::remove_file(&temp_path);
    match written {
        Ok(()) => {}
        // Someone else created it meanwhile; read_key_file checks theirs.
        Err(source) if source.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(source) => return Err(io_error(source)),
    }
    sync_dir(&parent)
}

/// Reads and checks the key: a regular file of exactly 32 bytes, mode without group or other
/// bits, owned by the effective user.
fn read_key_file(key_file: &Path) -> Result<Zeroizing<[u8; KEY_BYTES]>, SecretError> {
    let refuse = |reason| SecretError::Key {
        path: key_file.to_owned(),
        reason,
    };
    let io_error = |source| SecretError::Io {
        path: key_file.to_owned(),
        source,
    };
    let mut file = File::open(key_file).map_err(io_error)?;
    let metadata = file.metadata().map_err(io_error)?;
    if !metadata.is_file() {
        return Err(refuse("not a regular file"));
    }
    if metadata.uid() != nix::unistd::geteuid().as_raw() {
        return Err(refuse("not owned by the user berthd runs as"));
    }
    if metadata.mode() & 0o077 != 0 {
        return Err(refuse(
            "readable or writable by group or others (want 0600)",
        ));
    }
    if metadata.len() != KEY_BYTES as u64 {
        return Err(refuse("not exactly 32 bytes"));
    }
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    file.read_exact(&mut key[..]).map_err(io_error)?;
    let mut extra = [0u8; 1];
    if file.read(&mut extra).map_err(io_error)? != 0 {
        return Err(refuse("not exactly 32 bytes"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn key_file_created_0600_with_32_bytes() {
        let temp = tempfile::tempdir().unwrap();
        let key_file = temp.path().join("etc").join("secrets.key");
        let key = load_or_create_key(&key_file).unwrap();
        assert_ne!(*key, [0u8; KEY_BYTES]);
        assert_eq!(mode(key_file.parent().unwrap()), 0o700);
        let metadata = fs::metadata(&key_file).unwrap();
        assert_eq!(metadata.len(), 32);
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&key_file).unwrap(), key.as_slice());
        // Loading again keeps the key.
        assert_eq!(*load_or_create_key(&key_file).unwrap(), *key);
        // No temp file left beside it.
        assert_eq!(fs::read_dir(key_file.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn key_file_refused() {
        let temp = tempfile::tempdir().unwrap();
        let key_file = temp.path().join("secrets.key");

        fs::write(&key_file, [7u8; 32]).unwrap();
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
        let error = load_or_create_key(&key_file).unwrap_err();
        assert!(matches!(error, SecretError::Key { .. }), "{error:?}");

        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load_or_create_key(&key_file),
            Err(SecretError::Key { .. })
        ));

        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
        load_or_create_key(&key_file).unwrap();

        for wrong_len in [0usize, 16, 31, 33, 64] {
            fs::write(&key_file, vec![7u8; wrong_len]).unwrap();
            assert!(
                matches!(load_or_create_key(&key_file), Err(SecretError::Key { .. })),
                "length {wrong_len}"
            );
        }

        // Owned by another user (only root can hand a file to someone else).
        fs::write(&key_file, [7u8; 32]).unwrap();
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&key_file, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(matches!(
                load_or_create_key(&key_file),
                Err(SecretError::Key { .. })
            ));
        }

        let directory = temp.path().join("key-dir");
        fs::create_dir(&directory).unwrap();
        fs::set_permissions(&directory, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(
            load_or_create_key(&directory),
            Err(SecretError::Key { .. })
        ));
    }

    #[test]
    fn atomic_write_leaves_only_the_target() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("a").join("b");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let path = dir.join("record");
        write_atomically(&dir, &path, b"first").unwrap();
        write_atomically(&dir, &path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }
}
