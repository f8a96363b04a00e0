//! Builds layers and scratch directories for the layer tests.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use crate::apply::{apply_layer, Applied, LayerSpec, Limits, Target, Whiteouts};
use crate::compression::Compression;
use crate::digest::Sha256Digest;
use crate::error::ApplyError;

pub(crate) const MTIME: u64 = 1_600_000_000;

/// A tar being built, entry by entry.
pub(crate) struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

fn header(entry_type: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header.set_size(size);
    header
}

impl Layer {
    pub(crate) fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    pub(crate) fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut header = header(EntryType::Directory, mode, 0);
        self.builder
            .append_data(&mut header, path, &[][..])
            .unwrap();
        self
    }

    pub(crate) fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.file_with(path, data, 0o644, (0, 0), MTIME)
    }

    pub(crate) fn file_with(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        (uid, gid): (u64, u64),
        mtime: u64,
    ) -> &mut Self {
        let mut header = header(EntryType::Regular, mode, data.len() as u64);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(mtime);
        self.builder.append_data(&mut header, path, data).unwrap();
        self
    }

    pub(crate) fn owned_dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut header = header(EntryType::Directory, mode, 0);
        header.set_uid(uid);
        header.set_gid(gid);
        self.builder
            .append_data(&mut header, path, &[][..])
            .unwrap();
        self
    }

    pub(crate) fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut header = header(EntryType::Symlink, 0o777, 0);
        self.builder.append_link(&mut header, path, target).unwrap();
        self
    }

    pub(crate) fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.hardlink_with(path, target, 0o644, (0, 0), MTIME)
    }

    /// A hardlink entry with its own header's metadata (tar writers give it the inode's).
    pub(crate) fn hardlink_with(
        &mut self,
        path: &str,
        target: &str,
        mode: u32,
        (uid, gid): (u64, u64),
        mtime: u64,
    ) -> &mut Self {
        let mut header = header(EntryType::Link, mode, 0);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(mtime);
        self.builder.append_link(&mut header, path, target).unwrap();
        self
    }

    pub(crate) fn node(
        &mut self,
        path: &str,
        entry_type: EntryType,
        device: (u32, u32),
        mode: u32,
    ) -> &mut Self {
        let mut header = header(entry_type, mode, 0);
        header.set_device_major(device.0).unwrap();
        header.set_device_minor(device.1).unwrap();
        self.builder
            .append_data(&mut header, path, &[][..])
            .unwrap();
        self
    }

    /// PAX records (xattrs, times, long names) for the next entry.
    pub(crate) fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.builder
            .append_pax_extensions(records.iter().map(|(key, value)| (*key, *value)))
            .unwrap();
        self
    }

    /// An entry whose name and link name bytes are written as given, with
    /// no checks (for hostile names the builder refuses).
    pub(crate) fn raw(
        &mut self,
        entry_type: EntryType,
        name: &[u8],
        link: &[u8],
        data: &[u8],
    ) -> &mut Self {
        let mut header = header(entry_type, 0o644, data.len() as u64);
        let old = header.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    /// A raw, already-checksummed header and its data blocks.
    pub(crate) fn raw_blocks(&mut self, blocks: &[u8]) -> &mut Self {
        self.builder.get_mut().extend_from_slice(blocks);
        self
    }

    pub(crate) fn tar(&mut self) -> Vec<u8> {
        self.builder.finish().unwrap();
        self.builder.get_ref().clone()
    }

    pub(crate) fn blob(&mut self, compression: Compression) -> Blob {
        Blob::new(&self.tar(), compression)
    }
}

/// A compressed layer and its descriptor.
pub(crate) struct Blob {
    pub(crate) bytes: Vec<u8>,
    pub(crate) spec: LayerSpec,
}

pub(crate) fn compress(tar: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(tar).unwrap();
            encoder.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
    }
}

impl Blob {
    pub(crate) fn new(tar: &[u8], compression: Compression) -> Self {
        let bytes = compress(tar, compression);
        let spec = LayerSpec {
            compression,
            digest: Some(Sha256Digest::of(&bytes)),
            size: bytes.len() as u64,
            diff_id: Sha256Digest::of(tar),
        };
        Self { bytes, spec }
    }

    pub(crate) fn apply(&self, root: &Path, whiteouts: Whiteouts) -> Result<Applied, ApplyError> {
        self.apply_limited(root, whiteouts, &Limits::default())
    }

    pub(crate) fn apply_limited(
        &self,
        root: &Path,
        whiteouts: Whiteouts,
        limits: &Limits,
    ) -> Result<Applied, ApplyError> {
        let target = Target {
            root: root.to_path_buf(),
            whiteouts,
        };
        apply_layer(&self.bytes[..], &self.spec, &target, limits)
    }
}

/// A temp dir with `root/` to apply into and canaries around it that no
/// layer may touch.
pub(crate) struct Scratch {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) root: PathBuf,
    before: BTreeMap<PathBuf, String>,
    host_names: Vec<PathBuf>,
}

impl Scratch {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/canary"), b"canary").unwrap();
        std::fs::write(dir.path().join("canary"), b"canary").unwrap();
        let mut scratch = Self {
            dir,
            root,
            before: BTreeMap::new(),
            host_names: Vec::new(),
        };
        scratch.before = scratch.outside();
        scratch
    }

    /// A name that must never appear on the host (`/etc/<unique>` and the
    /// like); returned relative, for use in layer entries.
    pub(crate) fn host_name(&mut self, dir: &str) -> String {
        let unique = self
            .dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let name = format!("berth-unpack-canary-{unique}");
        self.host_names.push(Path::new(dir).join(&name));
        name
    }

    /// Everything in the temp dir outside the root, with type, mode, owner,
    /// size, mtime and contents.
    fn outside(&self) -> BTreeMap<PathBuf, String> {
        let mut seen = BTreeMap::new();
        let mut pending = vec![self.dir.path().to_path_buf()];
        while let Some(directory) = pending.pop() {
            for child in std::fs::read_dir(&directory).unwrap() {
                let path = child.unwrap().path();
                if path == self.root {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&path).unwrap();
                let contents = if meta.is_file() {
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned()
                } else {
                    String::new()
                };
                seen.insert(
                    path.clone(),
                    format!(
                        "{:o} {}:{} {} {} {} {contents}",
                        meta.mode(),
                        meta.uid(),
                        meta.gid(),
                        meta.len(),
                        meta.mtime(),
                        meta.nlink()
                    ),
                );
                if meta.is_dir() {
                    pending.push(path);
                }
            }
        }
        seen
    }

    /// Fails if anything outside the root changed or appeared.
    pub(crate) fn assert_outside_untouched(&self) {
        assert_eq!(
            self.outside(),
            self.before,
            "something outside the root changed"
        );
        for host_path in &self.host_names {
            assert!(
                std::fs::symlink_metadata(host_path).is_err(),
                "{} appeared on the host",
                host_path.display()
            );
        }
    }

    pub(crate) fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }
}

pub(crate) fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut value = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut value[..]) {
        Ok(length) => {
            value.truncate(length);
            Some(value)
        }
        Err(_) => None,
    }
}

pub(crate) fn read(path: &Path) -> String {
    String::from_utf8(std::fs::read(path).unwrap()).unwrap()
}
