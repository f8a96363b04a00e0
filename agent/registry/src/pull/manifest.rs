//! Manifests and indexes: parse, refuse ambiguous documents, pick this host's platform.

use serde::Deserialize;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Every manifest type berth accepts, for the Accept header.
pub const ACCEPTED: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Layer media types berth pulls: those containerd 1.6's differ applies, and Docker's
/// `tar.zstd`, which berth's own applier handles (on the Diff.Apply fallback, a containerd that
/// does not know it refuses the layer).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

/// A content descriptor as it appears in manifests and indexes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub urls: Option<Vec<String>>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: Option<u32>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// A parsed top-level document.
#[derive(Debug)]
pub enum Parsed {
    Index(Vec<Descriptor>),
    Manifest(Manifest),
}

/// An image manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// Why a document was refused. Reasons are fixed text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub &'static str);

pub fn parse(body: &[u8]) -> Result<Parsed, ManifestError> {
    let doc: Document =
        serde_json::from_slice(body).map_err(|_| ManifestError("not a valid manifest document"))?;
    if doc.schema_version != Some(2) {
        return Err(ManifestError(
            "only schema version 2 manifests are supported",
        ));
    }
    let is_index = doc.manifests.is_some();
    let is_manifest = doc.config.is_some() || doc.layers.is_some();
    if is_index && is_manifest {
        // CVE-2021-41190: a document must not be both.
        return Err(ManifestError(
            "ambiguous document: both manifests and layers",
        ));
    }
    if let Some(manifests) = doc.manifests {
        if let Some(mt) = &doc.media_type {
            if mt != OCI_INDEX && mt != DOCKER_LIST {
                return Err(ManifestError("index media type does not match its content"));
            }
        }
        return Ok(Parsed::Index(manifests));
    }
    let media_type = doc.media_type.unwrap_or_else(|| OCI_MANIFEST.to_owned());
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        return Err(ManifestError("unsupported manifest media type"));
    }
    let config = doc.config.ok_or(ManifestError("manifest has no config"))?;
    let layers = doc.layers.unwrap_or_default();
    if layers.is_empty() {
        return Err(ManifestError("manifest has no layers"));
    }
    for desc in std::iter::once(&config).chain(&layers) {
        check_digest(&desc.digest)?;
    }
    for layer in &layers {
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(ManifestError("unsupported layer media type"));
        }
        if layer.urls.as_ref().is_some_and(|urls| !urls.is_empty()) {
            return Err(ManifestError("foreign layer urls are refused"));
        }
    }
    Ok(Parsed::Manifest(Manifest {
        media_type,
        config,
        layers,
    }))
}

/// A body's `mediaType`, when it has one, must be the `Content-Type` it was served as
/// (CVE-2021-41190: no document may pass as another kind).
pub fn check_content_type(body: &[u8], content_type: Option<&str>) -> Result<(), ManifestError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct MediaType {
        media_type: Option<String>,
    }
    let declared = serde_json::from_slice::<MediaType>(body)
        .map_err(|_| ManifestError("not a valid manifest document"))?
        .media_type;
    match (declared, content_type) {
        (Some(declared), Some(served))
            if !served.is_empty() && served != "application/json" && declared != served =>
        {
            Err(ManifestError(
                "the document's mediaType differs from its Content-Type",
            ))
        }
        _ => Ok(()),
    }
}

/// `sha256:<64 lower-case hex>`, checked before a digest goes into a URL or a label.
pub fn check_digest(digest: &str) -> Result<(), ManifestError> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        Err(ManifestError("digest is not sha256:<64 lower-case hex>"))
    }
}

/// This host's platform in OCI terms.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    };
    ("linux", arch)
}

/// Picks the first manifest for `os/arch`, skipping attestations and unknown media types.
pub fn select_platform<'a>(
    entries: &'a [Descriptor],
    os: &str,
    arch: &str,
) -> Option<&'a Descriptor> {
    entries.iter().find(|entry| {
        (entry.media_type == OCI_MANIFEST || entry.media_type == DOCKER_MANIFEST)
            && entry.platform.as_ref().is_some_and(|p| {
                p.os == os
                    && p.architecture == arch
                    && p.variant
                        .as_deref()
                        .is_none_or(|v| arch != "arm64" || v == "v8")
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn parses_an_oci_manifest() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":10}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":20}}]}}"#,
            digest('a'),
            digest('b')
        );
        let Parsed::Manifest(m) = parse(body.as_bytes()).unwrap() else {
            panic!("not a manifest")
        };
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.config.size, 10);
    }

    #[test]
    fn refuses_ambiguous_and_hostile_documents() {
        let both = format!(
            r#"{{"schemaVersion":2,"manifests":[],"config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[]}}"#,
            digest('a')
        );
        parse(both.as_bytes()).unwrap_err();
        parse(b"{\"schemaVersion\":1}").unwrap_err();
        parse(b"not json").unwrap_err();
        let bad_digest = r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:../../etc","size":1},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:00","size":1}]}"#;
        parse(bad_digest.as_bytes()).unwrap_err();
        let foreign = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":1,"urls":["https://evil.example/x"]}}]}}"#,
            digest('a'),
            digest('b')
        );
        parse(foreign.as_bytes()).unwrap_err();
    }

    #[test]
    fn media_type_must_match_content_type() {
        let body = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        check_content_type(body.as_bytes(), Some(OCI_INDEX)).unwrap();
        check_content_type(body.as_bytes(), None).unwrap();
        check_content_type(body.as_bytes(), Some(OCI_MANIFEST)).unwrap_err();
        check_content_type(br#"{"schemaVersion":2}"#, Some(OCI_MANIFEST)).unwrap();
    }

    #[test]
    fn selects_the_host_platform_and_skips_attestations() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"unknown","os":"unknown"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            digest('a'),
            digest('b'),
            digest('c')
        );
        let Parsed::Index(entries) = parse(body.as_bytes()).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(
            select_platform(&entries, "linux", "amd64").unwrap().digest,
            digest('c')
        );
        assert_eq!(
            select_platform(&entries, "linux", "arm64").unwrap().digest,
            digest('b')
        );
        assert!(select_platform(&entries, "linux", "s390x").is_none());
    }
}
