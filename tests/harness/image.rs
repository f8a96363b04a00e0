//! A tiny busybox OCI image, built in the test (no internet), pushed with oci-client.
//!
//! One gzip layer holds `bin/busybox` (from /bin/busybox, busybox-static) and the applet symlinks;
//! the config sets `Env: ["PATH=/bin"]` and the test's `Entrypoint`/`Cmd`. Optionally the manifest
//! is wrapped in an OCI index beside a bogus `linux/arm64` entry (listed first), so that platform
//! selection is exercised.

use std::io::Write as _;

use anyhow::{bail, Context as _};
use flate2::write::GzEncoder;
use flate2::Compression;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use reqwest::header::HeaderValue;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::ca::TestCa;
use super::credentials::RegistryUser;
use super::install_crypto_provider;

pub mod layered;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: [&str; 6] = ["sh", "echo", "cat", "sleep", "env", "ls"];

/// What to build: the config's `Entrypoint` and `Cmd`, and whether to wrap it in an index.
#[derive(Debug, Clone)]
pub struct TestImage {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    in_index: bool,
}

impl TestImage {
    /// The busybox image with this `Cmd` and no `Entrypoint`.
    pub fn busybox(cmd: &[&str]) -> Self {
        Self {
            entrypoint: Vec::new(),
            cmd: cmd.iter().map(|arg| (*arg).to_owned()).collect(),
            in_index: false,
        }
    }

    pub fn with_entrypoint(mut self, entrypoint: &[&str]) -> Self {
        self.entrypoint = entrypoint.iter().map(|arg| (*arg).to_owned()).collect();
        self
    }

    /// Push it as an OCI index: a bogus `linux/arm64` manifest first, then `linux/amd64`.
    pub fn in_index(mut self) -> Self {
        self.in_index = true;
        self
    }
}

/// Where an image went and what it is.
#[derive(Debug, Clone)]
pub struct PushedImage {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// The `linux/amd64` image manifest: what berthd reports as `image_digest`.
    pub manifest_digest: String,
    /// The index's digest, when the image was pushed in one.
    pub index_digest: Option<String>,
}

impl PushedImage {
    /// `registry/repository:tag`.
    pub fn reference(&self) -> String {
        self.reference_via(&self.registry)
    }

    /// The same repository and tag through another host (a proxy in front of the registry).
    pub fn reference_via(&self, host: &str) -> String {
        format!("{host}/{}:{}", self.repository, self.tag)
    }
}

/// One blob: its bytes and `sha256:<hex>` digest.
struct Blob {
    data: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(data: Vec<u8>) -> Self {
        let digest = sha256_digest(&data);
        Self { data, digest }
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.data.len()})
    }
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The uncompressed layer tar (fixed mtimes and owners, so every build is byte-identical).
fn layer_tar() -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (apt package busybox-static)"))?;
    let mut builder = tar::Builder::new(Vec::new());

    let mut directory = tar_header(tar::EntryType::Directory, 0o755, 0);
    builder.append_data(&mut directory, "bin/", std::io::empty())?;

    let mut binary = tar_header(tar::EntryType::Regular, 0o755, busybox.len());
    builder.append_data(&mut binary, "bin/busybox", busybox.as_slice())?;

    for applet in APPLETS {
        let mut link = tar_header(tar::EntryType::Symlink, 0o777, 0);
        builder.append_link(&mut link, format!("bin/{applet}"), "busybox")?;
    }
    builder.into_inner().context("finishing the layer tar")
}

fn tar_header(entry_type: tar::EntryType, mode: u32, size: usize) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_size(u64::try_from(size).unwrap_or(u64::MAX));
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header
}

fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data)?;
    encoder.finish().context("finishing the gzip stream")
}

/// The blobs and manifests of one image, ready to push.
struct BuiltImage {
    layer: Blob,
    /// (config, manifest) per platform; amd64 last.
    platforms: Vec<(Blob, Blob)>,
    index: Option<Blob>,
}

impl TestImage {
    fn build(&self) -> anyhow::Result<BuiltImage> {
        let tar = layer_tar()?;
        let diff_id = sha256_digest(&tar);
        let layer = Blob::new(gzip(&tar)?);
        let mut platforms = Vec::new();
        if self.in_index {
            // Same layer, labelled arm64, and a Cmd that says so if it ever runs.
            let wrong_cmd = vec![
                "sh".to_owned(),
                "-c".to_owned(),
                "echo wrong platform arm64".to_owned(),
            ];
            platforms.push(self.platform("arm64", &[], &wrong_cmd, &diff_id, &layer)?);
        }
        platforms.push(self.platform("amd64", &self.entrypoint, &self.cmd, &diff_id, &layer)?);
        let index = if self.in_index {
            let manifests: Vec<Value> = platforms
                .iter()
                .zip(["arm64", "amd64"])
                .map(|((_, manifest), architecture)| {
                    let mut descriptor = manifest.descriptor(MANIFEST_MEDIA_TYPE);
                    descriptor["platform"] = json!({"architecture": architecture, "os": "linux"});
                    descriptor
                })
                .collect();
            let index = json!({
                "schemaVersion": 2,
                "mediaType": INDEX_MEDIA_TYPE,
                "manifests": manifests,
            });
            Some(Blob::new(serde_json::to_vec(&index)?))
        } else {
            None
        };
        Ok(BuiltImage {
            layer,
            platforms,
            index,
        })
    }

    fn platform(
        &self,
        architecture: &str,
        entrypoint: &[String],
        cmd: &[String],
        diff_id: &str,
        layer: &Blob,
    ) -> anyhow::Result<(Blob, Blob)> {
        let mut container_config = json!({"Env": ["PATH=/bin"], "Cmd": cmd});
        if !entrypoint.is_empty() {
            container_config["Entrypoint"] = json!(entrypoint);
        }
        let config = json!({
            "architecture": architecture,
            "os": "linux",
            "config": container_config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "berth integration tests"}],
        });
        let config = Blob::new(serde_json::to_vec(&config)?);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(CONFIG_MEDIA_TYPE),
            "layers": [layer.descriptor(LAYER_MEDIA_TYPE)],
        });
        let manifest = Blob::new(serde_json::to_vec(&manifest)?);
        Ok((config, manifest))
    }
}

impl TestImage {
    /// The image as an OCI image-layout tar named `name` (for `ctr images import`), so harness
    /// self-tests can run it in containerd without a registry or berthd.
    pub fn oci_archive(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let built = self.build()?;
        let (top, media_type) = match &built.index {
            Some(index) => (index, INDEX_MEDIA_TYPE),
            None => {
                let (_, manifest) = built
                    .platforms
                    .last()
                    .context("an image has at least one platform")?;
                (manifest, MANIFEST_MEDIA_TYPE)
            }
        };
        let mut descriptor = top.descriptor(media_type);
        descriptor["annotations"] = json!({
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": name,
        });
        let index = json!({"schemaVersion": 2, "manifests": [descriptor]});

        let mut archive = tar::Builder::new(Vec::new());
        let mut append = |path: String, data: &[u8]| -> anyhow::Result<()> {
            let mut header = tar_header(tar::EntryType::Regular, 0o644, data.len());
            archive.append_data(&mut header, path, data)?;
            Ok(())
        };
        append(
            "oci-layout".to_owned(),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        append("index.json".to_owned(), &serde_json::to_vec(&index)?)?;
        let mut blobs = vec![&built.layer];
        for (config, manifest) in &built.platforms {
            blobs.push(config);
            blobs.push(manifest);
        }
        blobs.extend(built.index.as_ref());
        for blob in blobs {
            let hex = blob.digest.trim_start_matches("sha256:");
            append(format!("blobs/sha256/{hex}"), &blob.data)?;
        }
        archive.into_inner().context("finishing the OCI archive")
    }
}

/// An oci-client trusting the test CA; `plain_http` hosts are spoken to over HTTP.
pub fn oci_client(ca: &TestCa, plain_http: &[&str]) -> anyhow::Result<Client> {
    install_crypto_provider();
    let protocol = if plain_http.is_empty() {
        ClientProtocol::Https
    } else {
        ClientProtocol::HttpsExcept(plain_http.iter().map(|host| (*host).to_owned()).collect())
    };
    let config = ClientConfig {
        protocol,
        extra_root_certificates: vec![Certificate {
            encoding: CertificateEncoding::Pem,
            data: ca.ca_pem().as_bytes().to_vec(),
        }],
        ..ClientConfig::default()
    };
    Client::try_from(config).context("building the oci-client")
}

/// Builds `image` and pushes it to `registry/repository:tag` as `user`.
pub async fn push_image(
    ca: &TestCa,
    registry: &str,
    repository: &str,
    tag: &str,
    user: &RegistryUser,
    image: &TestImage,
) -> anyhow::Result<PushedImage> {
    let built = image.build()?;
    let client = oci_client(ca, &[])?;
    let reference: Reference = format!("{registry}/{repository}:{tag}")
        .parse()
        .with_context(|| format!("parsing {registry}/{repository}:{tag}"))?;
    let auth = RegistryAuth::Basic(user.username.clone(), user.password.clone());
    client
        .auth(&reference, &auth, RegistryOperation::Push)
        .await
        .with_context(|| format!("authenticating to push {reference}"))?;
    client
        .push_blob(&reference, built.layer.data.clone(), &built.layer.digest)
        .await
        .with_context(|| format!("pushing the layer of {reference}"))?;
    let manifest_type = HeaderValue::from_static(MANIFEST_MEDIA_TYPE);
    let mut manifest_digest = String::new();
    for (config, manifest) in &built.platforms {
        client
            .push_blob(&reference, config.data.clone(), &config.digest)
            .await
            .with_context(|| format!("pushing the config of {reference}"))?;
        let target = if built.index.is_some() {
            Reference::with_digest(
                registry.to_owned(),
                repository.to_owned(),
                manifest.digest.clone(),
            )
        } else {
            reference.clone()
        };
        client
            .push_manifest_raw(&target, manifest.data.clone(), manifest_type.clone())
            .await
            .with_context(|| format!("pushing the manifest {target}"))?;
        manifest_digest.clone_from(&manifest.digest);
    }
    if let Some(index) = &built.index {
        client
            .push_manifest_raw(
                &reference,
                index.data.clone(),
                HeaderValue::from_static(INDEX_MEDIA_TYPE),
            )
            .await
            .with_context(|| format!("pushing the index {reference}"))?;
    }
    Ok(PushedImage {
        registry: registry.to_owned(),
        repository: repository.to_owned(),
        tag: tag.to_owned(),
        manifest_digest,
        index_digest: built.index.map(|index| index.digest),
    })
}

/// What oci-client got back from a pull.
#[derive(Debug)]
pub struct PulledImage {
    /// The image manifest's digest.
    pub manifest_digest: String,
    pub layers: usize,
    /// The config's `config.Cmd`.
    pub cmd: Vec<String>,
}

/// Pulls `reference` with oci-client (digests verified), for harness self-tests.
pub async fn pull_image(
    ca: &TestCa,
    reference: &str,
    auth: Option<&RegistryUser>,
    plain_http: &[&str],
) -> anyhow::Result<PulledImage> {
    let client = oci_client(ca, plain_http)?;
    let parsed: Reference = reference
        .parse()
        .with_context(|| format!("parsing {reference}"))?;
    let auth = auth.map_or(RegistryAuth::Anonymous, |user| {
        RegistryAuth::Basic(user.username.clone(), user.password.clone())
    });
    let image = client
        .pull(&parsed, &auth, vec![LAYER_MEDIA_TYPE])
        .await
        .with_context(|| format!("pulling {reference}"))?;
    let Some(manifest_digest) = image.digest else {
        bail!("pulling {reference} gave no manifest digest");
    };
    let config: Value =
        serde_json::from_slice(&image.config.data).context("parsing the pulled config")?;
    let cmd = config["config"]["Cmd"]
        .as_array()
        .map(|args| {
            args.iter()
                .filter_map(|arg| arg.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(PulledImage {
        manifest_digest,
        layers: image.layers.len(),
        cmd,
    })
}
