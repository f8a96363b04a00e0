//! Layer tars written entry by entry, with nothing sanitized: any name (`../x`, `/abs`), any
//! link target, devices, fifos, set-id modes, owners, PAX records (`SCHILY.xattr.*`, `path`,
//! `mtime`), GNU long names and links, and an old-style GNU sparse file. Each layer is compressed
//! in one of the formats images carry, and [`push_layers`] pushes them as one image (an OCI
//! manifest) with the config's `diff_ids` computed here, so a test knows every chain id.

use std::io::Write as _;

use anyhow::Context as _;
use flate2::write::GzEncoder;
use flate2::Compression;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use reqwest::header::HeaderValue;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use super::ca::TestCa;
use super::credentials::RegistryUser;
use super::image::{
    oci_client, sha256_digest, PushedImage, CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE,
};

/// Where every entry's mtime starts unless the entry says otherwise.
pub const BASE_MTIME: u64 = 1_700_000_000;

/// How a layer blob is encoded, and the media type that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    /// `application/vnd.oci.image.layer.v1.tar`
    OciTar,
    /// `application/vnd.oci.image.layer.v1.tar+gzip`
    OciGzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`
    OciZstd,
    /// `application/vnd.docker.image.rootfs.diff.tar.gzip`
    DockerGzip,
    /// `application/vnd.docker.image.rootfs.diff.tar.zstd` (containerd 1.6 cannot apply it)
    DockerZstd,
}

impl LayerFormat {
    pub fn media_type(self) -> &'static str {
        match self {
            Self::OciTar => "application/vnd.oci.image.layer.v1.tar",
            Self::OciGzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Self::OciZstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Self::DockerGzip => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Self::DockerZstd => "application/vnd.docker.image.rootfs.diff.tar.zstd",
        }
    }

    fn encode(self, tar: &[u8]) -> anyhow::Result<Vec<u8>> {
        match self {
            Self::OciTar => Ok(tar.to_vec()),
            Self::OciGzip | Self::DockerGzip => {
                let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
                encoder.write_all(tar)?;
                encoder.finish().context("finishing a gzip layer")
            }
            Self::OciZstd | Self::DockerZstd => {
                zstd::encode_all(tar, 3).context("compressing a zstd layer")
            }
        }
    }
}

/// Owner, mode and mtime of one entry.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

impl Meta {
    pub const fn mode(mode: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
            mtime: BASE_MTIME,
        }
    }

    pub const fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub const fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }
}

/// One layer's tar, entry by entry. Names are written as given (no normalization); names over
/// 100 bytes get a GNU long-name entry, link targets over 100 bytes a GNU long-link entry.
pub struct LayerTar {
    builder: tar::Builder<Vec<u8>>,
    /// PAX records for the next entry.
    pending_pax: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for LayerTar {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LayerTar")
            .field("bytes", &self.builder.get_ref().len())
            .field("pending_pax", &self.pending_pax.len())
            .finish()
    }
}

impl Default for LayerTar {
    fn default() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
            pending_pax: Vec::new(),
        }
    }
}

/// `bytes` into a NUL-padded header field, which must be long enough.
fn set_field(field: &mut [u8], bytes: &[u8]) -> anyhow::Result<()> {
    anyhow::ensure!(
        bytes.len() <= field.len(),
        "{} bytes do not fit a {}-byte field",
        bytes.len(),
        field.len()
    );
    field.fill(0);
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// `value` as 11 octal digits and a NUL (a 12-byte numeric field).
fn octal12(value: u64) -> [u8; 12] {
    let mut field = [0_u8; 12];
    field[..11].copy_from_slice(format!("{value:011o}").as_bytes());
    field
}

/// One PAX record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

impl LayerTar {
    /// A PAX record (`SCHILY.xattr.user.x`, `path`, `mtime`, ...) for the next entry.
    pub fn pax(&mut self, key: &str, value: &[u8]) -> &mut Self {
        self.pending_pax.push((key.to_owned(), value.to_vec()));
        self
    }

    /// An extended attribute for the next entry, as `SCHILY.xattr.<name>`.
    pub fn xattr(&mut self, name: &str, value: &[u8]) -> &mut Self {
        self.pax(&format!("SCHILY.xattr.{name}"), value)
    }

    fn flush_pax(&mut self, name: &[u8]) -> anyhow::Result<()> {
        if self.pending_pax.is_empty() {
            return Ok(());
        }
        let records: Vec<u8> = self
            .pending_pax
            .drain(..)
            .flat_map(|(key, value)| pax_record(&key, &value))
            .collect();
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::XHeader);
        let short: Vec<u8> = name.iter().copied().take(80).collect();
        let mut pax_name = b"PaxHeaders/".to_vec();
        pax_name.extend(short);
        set_field(&mut header.as_old_mut().name, &pax_name)?;
        header.set_mode(0o644);
        header.set_mtime(BASE_MTIME);
        header.set_size(records.len() as u64);
        header.set_cksum();
        self.builder.append(&header, records.as_slice())?;
        Ok(())
    }

    fn gnu_long(&mut self, entry_type: EntryType, value: &[u8]) -> anyhow::Result<()> {
        let mut data = value.to_vec();
        data.push(0);
        let mut header = Header::new_gnu();
        header.set_entry_type(entry_type);
        set_field(&mut header.as_old_mut().name, b"././@LongLink")?;
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder.append(&header, data.as_slice())?;
        Ok(())
    }

    /// Appends one entry with `name` and `link` exactly as given.
    pub fn raw(
        &mut self,
        entry_type: EntryType,
        name: &[u8],
        link: &[u8],
        meta: Meta,
        data: &[u8],
    ) -> anyhow::Result<&mut Self> {
        self.raw_with(entry_type, name, link, meta, data, |_| {})
    }

    fn raw_with(
        &mut self,
        entry_type: EntryType,
        name: &[u8],
        link: &[u8],
        meta: Meta,
        data: &[u8],
        adjust: impl FnOnce(&mut Header),
    ) -> anyhow::Result<&mut Self> {
        self.flush_pax(name)?;
        if name.len() > 100 {
            self.gnu_long(EntryType::GNULongName, name)?;
        }
        if link.len() > 100 {
            self.gnu_long(EntryType::GNULongLink, link)?;
        }
        let mut header = Header::new_gnu();
        header.set_entry_type(entry_type);
        set_field(&mut header.as_old_mut().name, &name[..name.len().min(100)])?;
        set_field(
            &mut header.as_old_mut().linkname,
            &link[..link.len().min(100)],
        )?;
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(data.len() as u64);
        adjust(&mut header);
        header.set_cksum();
        self.builder.append(&header, data)?;
        Ok(self)
    }

    pub fn dir(&mut self, name: &str, meta: Meta) -> anyhow::Result<&mut Self> {
        let name = if name.ends_with('/') {
            name.to_owned()
        } else {
            format!("{name}/")
        };
        self.raw(EntryType::Directory, name.as_bytes(), b"", meta, b"")
    }

    pub fn file(&mut self, name: &str, meta: Meta, data: &[u8]) -> anyhow::Result<&mut Self> {
        self.raw(EntryType::Regular, name.as_bytes(), b"", meta, data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> anyhow::Result<&mut Self> {
        self.raw(
            EntryType::Symlink,
            name.as_bytes(),
            target.as_bytes(),
            Meta::mode(0o777),
            b"",
        )
    }

    /// A hardlink whose own header says mode 0644, owner 0:0.
    pub fn hardlink(&mut self, name: &str, target: &str) -> anyhow::Result<&mut Self> {
        self.hardlink_with(name, target, Meta::mode(0o644))
    }

    /// A hardlink whose header carries `meta` (tar and Go's archive/tar copy the target's).
    pub fn hardlink_with(
        &mut self,
        name: &str,
        target: &str,
        meta: Meta,
    ) -> anyhow::Result<&mut Self> {
        self.raw(
            EntryType::Link,
            name.as_bytes(),
            target.as_bytes(),
            meta,
            b"",
        )
    }

    /// A char or block device (`entry_type` Char or Block) or a fifo (major and minor 0).
    pub fn node(
        &mut self,
        name: &str,
        entry_type: EntryType,
        (major, minor): (u32, u32),
        meta: Meta,
    ) -> anyhow::Result<&mut Self> {
        self.raw_with(entry_type, name.as_bytes(), b"", meta, b"", |header| {
            let _ = header.set_device_major(major);
            let _ = header.set_device_minor(minor);
        })
    }

    /// An empty file `.wh.<base>` beside `path`: deletes `path` from the layers below.
    pub fn whiteout(&mut self, path: &str) -> anyhow::Result<&mut Self> {
        let (parent, base) = path.rsplit_once('/').unwrap_or(("", path));
        let name = if parent.is_empty() {
            format!(".wh.{base}")
        } else {
            format!("{parent}/.wh.{base}")
        };
        self.file(&name, Meta::mode(0o644), b"")
    }

    /// `dir/.wh..wh..opq`: hides everything the layers below put in `dir`.
    pub fn opaque(&mut self, dir: &str) -> anyhow::Result<&mut Self> {
        self.file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            Meta::mode(0o644),
            b"",
        )
    }

    /// An entry named through a PAX `path` record (the ustar name field holds a stand-in).
    pub fn pax_long_file(&mut self, name: &str, meta: Meta, data: &[u8]) -> anyhow::Result<()> {
        self.pax("path", name.as_bytes());
        self.flush_pax(name.as_bytes())?;
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::Regular);
        set_field(&mut header.as_old_mut().name, b"pax-name-stand-in")?;
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder.append(&header, data)?;
        Ok(())
    }

    /// An old-style GNU sparse file (type `S`): `chunks` are (offset, bytes) in order; the file's
    /// size is the end of the last chunk, and everything between chunks is a hole.
    pub fn gnu_sparse(
        &mut self,
        name: &str,
        meta: Meta,
        chunks: &[(u64, &[u8])],
    ) -> anyhow::Result<&mut Self> {
        anyhow::ensure!(chunks.len() <= 4, "at most 4 chunks fit the GNU header");
        self.flush_pax(name.as_bytes())?;
        let stored: Vec<u8> = chunks.iter().flat_map(|(_, data)| data.to_vec()).collect();
        let real_size = chunks
            .last()
            .map_or(0, |(offset, data)| offset + data.len() as u64);
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::GNUSparse);
        set_field(&mut header.as_old_mut().name, name.as_bytes())?;
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(stored.len() as u64);
        let gnu = header
            .as_gnu_mut()
            .context("invariant: a new_gnu header is GNU")?;
        for (slot, (offset, data)) in gnu.sparse.iter_mut().zip(chunks) {
            slot.offset = octal12(*offset);
            slot.numbytes = octal12(data.len() as u64);
        }
        gnu.realsize = octal12(real_size);
        gnu.isextended = [0];
        header.set_cksum();
        self.builder.append(&header, stored.as_slice())?;
        Ok(self)
    }

    /// The finished tar (two zero blocks at the end).
    pub fn finish(self) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(
            self.pending_pax.is_empty(),
            "PAX records without an entry after them"
        );
        self.builder.into_inner().context("finishing a layer tar")
    }
}

/// One layer as pushed: its tar, how it was encoded, the blob.
#[derive(Debug, Clone)]
pub struct Layer {
    pub format: LayerFormat,
    pub diff_id: String,
    pub blob: Vec<u8>,
    pub digest: String,
}

impl Layer {
    pub fn new(tar: &[u8], format: LayerFormat) -> anyhow::Result<Self> {
        let blob = format.encode(tar)?;
        Ok(Self {
            format,
            diff_id: sha256_digest(tar),
            digest: sha256_digest(&blob),
            blob,
        })
    }
}

/// The chain ids of `diff_ids`, bottom first (OCI image spec, config.md).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {diff_id}").as_bytes()))
            ),
        };
        chain.push(next);
    }
    chain
}

/// An image of layers as pushed.
#[derive(Debug, Clone)]
pub struct PushedLayers {
    pub image: PushedImage,
    /// One per layer, bottom first: the snapshot names an unpack commits.
    pub chain_ids: Vec<String>,
}

impl PushedLayers {
    /// The top snapshot's name.
    pub fn top_chain_id(&self) -> &str {
        self.chain_ids.last().map_or("", String::as_str)
    }
}

fn descriptor(media_type: &str, digest: &str, size: usize) -> Value {
    json!({"mediaType": media_type, "digest": digest, "size": size})
}

/// Pushes `layers` (bottom first) as `registry/repository:tag`: an OCI manifest and a linux/amd64
/// config whose `diff_ids` are the layers' tars.
pub async fn push_layers(
    ca: &TestCa,
    registry: &str,
    repository: &str,
    tag: &str,
    user: &RegistryUser,
    layers: &[Layer],
) -> anyhow::Result<PushedLayers> {
    let diff_ids: Vec<String> = layers.iter().map(|layer| layer.diff_id.clone()).collect();
    let history: Vec<Value> = layers
        .iter()
        .map(|layer| json!({"created_by": format!("berth layer corpus ({:?})", layer.format)}))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }))?;
    let config_digest = sha256_digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, &config_digest, config.len()),
        "layers": layers
            .iter()
            .map(|layer| descriptor(layer.format.media_type(), &layer.digest, layer.blob.len()))
            .collect::<Vec<_>>(),
    }))?;
    let manifest_digest = sha256_digest(&manifest);

    let client = oci_client(ca, &[])?;
    let reference: Reference = format!("{registry}/{repository}:{tag}")
        .parse()
        .with_context(|| format!("parsing {registry}/{repository}:{tag}"))?;
    let auth = RegistryAuth::Basic(user.username.clone(), user.password.clone());
    client
        .auth(&reference, &auth, RegistryOperation::Push)
        .await
        .with_context(|| format!("authenticating to push {reference}"))?;
    for layer in layers {
        client
            .push_blob(&reference, layer.blob.clone(), &layer.digest)
            .await
            .with_context(|| format!("pushing layer {} of {reference}", layer.digest))?;
    }
    client
        .push_blob(&reference, config, &config_digest)
        .await
        .with_context(|| format!("pushing the config of {reference}"))?;
    client
        .push_manifest_raw(
            &reference,
            manifest,
            HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
        )
        .await
        .with_context(|| format!("pushing the manifest of {reference}"))?;
    Ok(PushedLayers {
        image: PushedImage {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.to_owned(),
            manifest_digest,
            index_digest: None,
        },
        chain_ids: chain_ids(&diff_ids),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        // As Go's archive/tar writes them: the shortest length that counts itself.
        assert_eq!(pax_record("path", b"a"), b"9 path=a\n");
        assert_eq!(pax_record("k", &[b'x'; 5]), b"11 k=xxxxx\n");
        let long = pax_record("k", &[b'x'; 95]);
        assert_eq!(long.len(), 102);
        assert!(long.starts_with(b"102 k="));
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let diff_ids = vec!["sha256:a".to_owned(), "sha256:b".to_owned()];
        let chain = chain_ids(&diff_ids);
        assert_eq!(chain[0], "sha256:a");
        assert_eq!(
            chain[1],
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(b"sha256:a sha256:b"))
            )
        );
    }
}
