//! A busybox image with a big incompressible second layer, so that faults land mid-layer.
//!
//! Layer 0 is the busybox layer plus a marker file unique to the build; layer 1 holds
//! `random.bin` (random bytes, gzip without compression, so the blob is a little larger than the
//! data). Every build is therefore new to containerd: none of its blobs is present already.

use anyhow::Context as _;
use flate2::write::GzEncoder;
use flate2::Compression;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use reqwest::header::HeaderValue;
use serde_json::json;
use std::io::Write as _;

use super::{
    gzip, oci_client, tar_header, Blob, PushedImage, TestImage, APPLETS, BUSYBOX,
    CONFIG_MEDIA_TYPE, LAYER_MEDIA_TYPE, MANIFEST_MEDIA_TYPE,
};
use crate::harness::ca::TestCa;
use crate::harness::credentials::RegistryUser;
use crate::harness::random_lowercase;

/// [`TestImage`]'s config (Entrypoint, Cmd) over a unique busybox layer and a random layer.
#[derive(Debug, Clone)]
pub struct LayeredImage {
    base: TestImage,
    random_bytes: usize,
}

/// A blob as the registry serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
}

/// What was pushed: the reference, the config and both layers.
#[derive(Debug, Clone)]
pub struct PushedLayered {
    pub image: PushedImage,
    pub config: BlobInfo,
    /// `[busybox + marker, random]`.
    pub layers: Vec<BlobInfo>,
}

impl PushedLayered {
    /// The big random layer.
    pub fn random_layer(&self) -> &BlobInfo {
        &self.layers[1]
    }

    /// Config and layers: every blob berthd fetches.
    pub fn blobs(&self) -> Vec<&BlobInfo> {
        std::iter::once(&self.config).chain(&self.layers).collect()
    }

    /// Bytes of config and layers.
    pub fn total_bytes(&self) -> u64 {
        self.blobs().iter().map(|blob| blob.size).sum()
    }
}

impl TestImage {
    /// This image (its Entrypoint and Cmd; not wrapped in an index) with a second layer of
    /// `random_bytes` incompressible bytes.
    pub fn with_random_layer(self, random_bytes: usize) -> LayeredImage {
        LayeredImage {
            base: self,
            random_bytes,
        }
    }
}

fn info(blob: &Blob) -> BlobInfo {
    BlobInfo {
        digest: blob.digest.clone(),
        size: blob.data.len() as u64,
    }
}

/// The busybox layer tar with a marker file that makes it unique.
fn unique_base_tar() -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (apt package busybox-static)"))?;
    let marker = random_lowercase(24);
    let mut builder = tar::Builder::new(Vec::new());
    let mut directory = tar_header(tar::EntryType::Directory, 0o755, 0);
    builder.append_data(&mut directory, "bin/", std::io::empty())?;
    let mut binary = tar_header(tar::EntryType::Regular, 0o755, busybox.len());
    builder.append_data(&mut binary, "bin/busybox", busybox.as_slice())?;
    for applet in APPLETS {
        let mut link = tar_header(tar::EntryType::Symlink, 0o777, 0);
        builder.append_link(&mut link, format!("bin/{applet}"), "busybox")?;
    }
    let mut file = tar_header(tar::EntryType::Regular, 0o644, marker.len());
    builder.append_data(&mut file, "berth-image-id", marker.as_bytes())?;
    builder.into_inner().context("finishing the base layer tar")
}

/// A tar holding `random.bin` of `len` random bytes, gzipped without compression.
fn random_layer(len: usize) -> anyhow::Result<(Blob, String)> {
    let data = crate::harness::random_bytes(len);
    let mut builder = tar::Builder::new(Vec::new());
    let mut file = tar_header(tar::EntryType::Regular, 0o644, len);
    builder.append_data(&mut file, "random.bin", data.as_slice())?;
    let tar = builder
        .into_inner()
        .context("finishing the random layer tar")?;
    let diff_id = super::sha256_digest(&tar);
    let mut encoder = GzEncoder::new(Vec::new(), Compression::none());
    encoder.write_all(&tar)?;
    let gz = encoder.finish().context("finishing the gzip stream")?;
    Ok((Blob::new(gz), diff_id))
}

impl LayeredImage {
    /// Builds the image and pushes it to `registry/repository:tag` as `user`.
    pub async fn push(
        &self,
        ca: &TestCa,
        registry: &str,
        repository: &str,
        tag: &str,
        user: &RegistryUser,
    ) -> anyhow::Result<PushedLayered> {
        let base_tar = unique_base_tar()?;
        let base_diff_id = super::sha256_digest(&base_tar);
        let base = Blob::new(gzip(&base_tar)?);
        let (random, random_diff_id) = random_layer(self.random_bytes)?;

        let mut container_config = json!({"Env": ["PATH=/bin"], "Cmd": self.base.cmd});
        if !self.base.entrypoint.is_empty() {
            container_config["Entrypoint"] = json!(self.base.entrypoint);
        }
        let config = Blob::new(serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": container_config,
            "rootfs": {"type": "layers", "diff_ids": [base_diff_id, random_diff_id]},
            "history": [
                {"created_by": "berth integration tests: busybox"},
                {"created_by": "berth integration tests: random data"},
            ],
        }))?);
        let manifest = Blob::new(serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(CONFIG_MEDIA_TYPE),
            "layers": [base.descriptor(LAYER_MEDIA_TYPE), random.descriptor(LAYER_MEDIA_TYPE)],
        }))?);

        let client = oci_client(ca, &[])?;
        let reference: Reference = format!("{registry}/{repository}:{tag}")
            .parse()
            .with_context(|| format!("parsing {registry}/{repository}:{tag}"))?;
        let auth = RegistryAuth::Basic(user.username.clone(), user.password.clone());
        client
            .auth(&reference, &auth, RegistryOperation::Push)
            .await
            .with_context(|| format!("authenticating to push {reference}"))?;
        for blob in [&base, &random, &config] {
            client
                .push_blob(&reference, blob.data.clone(), &blob.digest)
                .await
                .with_context(|| format!("pushing blob {} of {reference}", blob.digest))?;
        }
        client
            .push_manifest_raw(
                &reference,
                manifest.data.clone(),
                HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
            )
            .await
            .with_context(|| format!("pushing the manifest of {reference}"))?;
        Ok(PushedLayered {
            image: PushedImage {
                registry: registry.to_owned(),
                repository: repository.to_owned(),
                tag: tag.to_owned(),
                manifest_digest: manifest.digest.clone(),
                index_digest: None,
            },
            config: info(&config),
            layers: vec![info(&base), info(&random)],
        })
    }
}
