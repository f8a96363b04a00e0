//! Signature policy at pull and at start: finds an image's cosign signatures through the same
//! session as the image itself (the order's credential, the same mirror, retries, redirect rules
//! and size limits), verifies them (`cosign`) against the policy in force, and remembers positive
//! results for a while. A signature artifact is only read: never unpacked, never an image record.
//!
//! Where signatures are looked for, for the platform manifest digest and then for the index that
//! names it (either one signed suffices):
//! 1. the referrers API (`GET /v2/<name>/referrers/<digest>`), or when the registry has none
//!    (distribution 2.8), the referrers tag fallback `sha256-<hex>` (an index); their sigstore
//!    bundle artifacts (`application/vnd.dev.sigstore.bundle.v0.3+json`);
//! 2. the tag `sha256-<hex>.sig` (cosign's tag scheme).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tracing::{debug, info, instrument};

use super::cosign::{self, SignatureFault, TrustedKeys, Verified};
use super::policy::{Policies, Policy, Verification};
use super::registry::Session;
use super::{manifest, retry, PullError};
use berth_core::metrics::{SharedMetrics, SignatureLabels};
use berth_core::order::ImageRef;

/// Largest signature payload or bundle berth reads.
const MAX_SIGNATURE_BLOB: u64 = 1 << 20;
/// At most this many signature artifacts are examined per digest (a registry could list more).
const MAX_CANDIDATES: usize = 16;
/// Positive results kept at most (the oldest go first).
const MAX_CACHED: usize = 4096;

/// What the signature policy said about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureStatus {
    /// No policy matches, or the matching one says `verify = "none"`.
    NotRequired,
    Verified,
}

impl SignatureStatus {
    /// As `Done.signature` carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureStatus::NotRequired => "not required",
            SignatureStatus::Verified => "verified",
        }
    }
}

/// The digests a signature may be on: the platform manifest that runs, and the index that
/// named it (when the image came through one).
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub manifest_digest: &'a str,
    pub index_digest: Option<&'a str>,
}

/// What a positive verification is remembered under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    digest: String,
    policy_entry: usize,
    policy_pattern: String,
    keys: String,
}

/// The policies in force and the positive results of recent verifications.
#[derive(Debug)]
pub struct Signatures {
    policies: Policies,
    ttl: Duration,
    passed: Mutex<HashMap<CacheKey, tokio::time::Instant>>,
    metrics: SharedMetrics,
}

impl Signatures {
    pub fn new(policies: Policies, ttl: Duration, metrics: SharedMetrics) -> Self {
        Self {
            policies,
            ttl,
            passed: Mutex::default(),
            metrics,
        }
    }

    /// The first pattern of the policy `image` in `project` matches (whatever it verifies).
    pub fn policy_pattern(&self, image: &ImageRef, project: &str) -> Option<String> {
        self.policies
            .for_image(image, project)
            .map(|policy| policy.pattern().to_owned())
    }

    /// The policy for `image` in `project` and the keys it demands; None when nothing is to be
    /// verified.
    pub fn required(
        &self,
        image: &ImageRef,
        project: &str,
    ) -> Option<(std::sync::Arc<Policy>, TrustedKeys)> {
        let policy = self.policies.for_image(image, project)?;
        match &policy.verification {
            Verification::None => None,
            Verification::Cosign(keys) => {
                let keys = keys.clone();
                Some((policy, keys))
            }
        }
    }

    fn key(policy: &Policy, keys: &TrustedKeys, digest: &str) -> CacheKey {
        CacheKey {
            digest: digest.to_owned(),
            policy_entry: policy.entry,
            policy_pattern: policy.pattern().to_owned(),
            keys: keys.fingerprint().to_owned(),
        }
    }

    /// Whether `digest` verified under this policy and key set within the TTL.
    pub fn recently_verified(&self, policy: &Policy, keys: &TrustedKeys, digest: &str) -> bool {
        let key = Self::key(policy, keys, digest);
        let mut passed = self
            .passed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        passed.retain(|_, at| now.duration_since(*at) < self.ttl);
        passed.contains_key(&key)
    }

    fn remember(&self, policy: &Policy, keys: &TrustedKeys, digest: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let mut passed = self
            .passed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if passed.len() >= MAX_CACHED {
            if let Some(oldest) = passed
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(key, _)| key.clone())
            {
                passed.remove(&oldest);
            }
        }
        passed.insert(Self::key(policy, keys, digest), tokio::time::Instant::now());
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .signature_verifications
            .get_or_create(&SignatureLabels { result })
            .inc();
    }
}

/// The parts of a signature manifest berth reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignatureManifest {
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<SignatureLayer>,
    #[serde(default)]
    layers: Vec<SignatureLayer>,
    #[serde(default)]
    manifests: Vec<SignatureLayer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignatureLayer {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

impl SignatureLayer {
    fn descriptor(&self) -> manifest::Descriptor {
        manifest::Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            urls: None,
            platform: None,
        }
    }
}

/// A fetch failed: transient failures and refusals of the credential keep their own code; the
/// rest refuse the image, saying which fetch failed.
fn fetch_failed(
    image: &ImageRef,
    digest: &str,
    policy: &Policy,
    what: String,
    err: PullError,
) -> PullError {
    match err {
        PullError::Denied { .. }
        | PullError::Auth(_)
        | PullError::Unreachable { .. }
        | PullError::Throttled { .. }
        | PullError::Stalled { .. }
        | PullError::Deadline { .. } => err,
        PullError::NotFound { .. }
        | PullError::NoPlatform { .. }
        | PullError::Mismatch { .. }
        | PullError::Unsupported { .. }
        | PullError::Registry { .. }
        | PullError::Client { .. }
        | PullError::Config { .. }
        | PullError::Containerd { .. }
        | PullError::Layer { .. }
        | PullError::Signature { .. }
        | PullError::SignatureFetch { .. } => PullError::SignatureFetch {
            image: image.to_string(),
            digest: digest.to_owned(),
            policy: policy.pattern().to_owned(),
            what,
            source: Box::new(err),
        },
    }
}

/// The `result` label for a verification that ended in `err`.
fn result_label(err: &PullError) -> &'static str {
    match err {
        PullError::Signature { fault, .. } => fault.result_label(),
        PullError::SignatureFetch { .. } => "fetch_failed",
        PullError::Denied { .. } => "denied",
        PullError::Auth(err) if !err.is_transient() => "denied",
        PullError::Unreachable { .. }
        | PullError::Throttled { .. }
        | PullError::Stalled { .. }
        | PullError::Deadline { .. }
        | PullError::Auth(_) => "unavailable",
        PullError::NotFound { .. }
        | PullError::NoPlatform { .. }
        | PullError::Mismatch { .. }
        | PullError::Unsupported { .. }
        | PullError::Registry { .. }
        | PullError::Client { .. }
        | PullError::Config { .. }
        | PullError::Layer { .. }
        | PullError::Containerd { .. } => "fetch_failed",
    }
}

impl Signatures {
    /// Verifies `subject` of `image` for `project` through `session`, when a policy demands it;
    /// counts the verification in `berth_signature_verifications_total` and remembers a
    /// positive result.
    #[instrument(skip_all, fields(image = %image, digest = %subject.manifest_digest))]
    pub async fn check(
        &self,
        session: &Session,
        image: &ImageRef,
        project: &str,
        subject: Subject<'_>,
        attempts: u32,
    ) -> Result<SignatureStatus, PullError> {
        let Some((policy, keys)) = self.required(image, project) else {
            return Ok(SignatureStatus::NotRequired);
        };
        let result = verify(session, image, &policy, &keys, subject, attempts).await;
        match &result {
            Ok((digest, verified)) => {
                self.count("verified");
                self.remember(&policy, &keys, subject.manifest_digest);
                info!(
                    policy = %policy.pattern(),
                    signed_digest = %digest,
                    key = verified.key,
                    identity = verified.identity.as_deref().unwrap_or(""),
                    "signature verified"
                );
            }
            Err(err) => self.count(result_label(err)),
        }
        result.map(|_| SignatureStatus::Verified)
    }
}

/// The first signature on the manifest digest, then on the index digest, that verifies.
async fn verify(
    session: &Session,
    image: &ImageRef,
    policy: &Policy,
    keys: &TrustedKeys,
    subject: Subject<'_>,
    attempts: u32,
) -> Result<(String, Verified), PullError> {
    let mut fault = SignatureFault::Missing;
    for digest in std::iter::once(subject.manifest_digest).chain(subject.index_digest) {
        let fetch_err =
            |what: String, err| fetch_failed(image, subject.manifest_digest, policy, what, err);
        match verify_digest(session, keys, digest, attempts, &fetch_err).await? {
            Ok(verified) => return Ok((digest.to_owned(), verified)),
            Err(other) => fault = fault.worst(other),
        }
    }
    Err(PullError::Signature {
        image: image.to_string(),
        digest: subject.manifest_digest.to_owned(),
        policy: policy.pattern().to_owned(),
        fault,
    })
}

/// Outer error: the fetch failed (the order fails so); inner: what is wrong with the signatures.
async fn verify_digest(
    session: &Session,
    keys: &TrustedKeys,
    digest: &str,
    attempts: u32,
    fetch_err: &impl Fn(String, PullError) -> PullError,
) -> Result<Result<Verified, SignatureFault>, PullError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let mut fault = SignatureFault::Missing;

    // 1. Sigstore bundles: referrers API, or its tag fallback.
    let referrers = match retry(attempts, || session.referrers(digest)).await {
        Ok(Some(index)) => Some(index),
        Ok(None) => {
            let tag = format!("sha256-{hex}");
            let reference = session.reference_with_tag(&tag);
            match retry(attempts, || session.manifest(&reference)).await {
                Ok((bytes, _)) => Some(bytes),
                Err(PullError::NotFound { .. }) => None,
                Err(err) => return Err(fetch_err(format!("the referrers tag {tag}"), err)),
            }
        }
        Err(err) => return Err(fetch_err(format!("the referrers of {digest}"), err)),
    };
    if let Some(index) = referrers {
        let index: SignatureManifest = serde_json::from_slice(&index).map_err(|_| {
            fetch_err(
                format!("the referrers of {digest}"),
                PullError::Unsupported {
                    image: String::new(),
                    reason: manifest::ManifestError("not an image index"),
                },
            )
        })?;
        let bundles = index.manifests.iter().filter(|entry| {
            // cosign 3 marks the tag fallback's entries with the empty type; the
            // artifact's own manifest says what it is.
            entry.media_type == manifest::OCI_MANIFEST
                && entry.artifact_type.as_deref().is_none_or(|artifact| {
                    artifact == cosign::BUNDLE_V03
                        || artifact == "application/vnd.oci.empty.v1+json"
                })
        });
        for entry in bundles.take(MAX_CANDIDATES) {
            let what = format!("the signature artifact {}", entry.digest);
            manifest::check_digest(&entry.digest).map_err(|reason| {
                fetch_err(
                    what.clone(),
                    PullError::Unsupported {
                        image: String::new(),
                        reason,
                    },
                )
            })?;
            let reference = session.reference_with_digest(&entry.digest);
            let (bytes, _) = retry(attempts, || session.manifest(&reference))
                .await
                .map_err(|err| fetch_err(what.clone(), err))?;
            let Ok(artifact) = serde_json::from_slice::<SignatureManifest>(&bytes) else {
                fault = fault.worst(SignatureFault::Encoding(
                    "a signature artifact is not an OCI manifest",
                ));
                continue;
            };
            let is_bundle = artifact.artifact_type.as_deref() == Some(cosign::BUNDLE_V03)
                || artifact
                    .config
                    .as_ref()
                    .and_then(|config| config.artifact_type.as_deref())
                    == Some(cosign::BUNDLE_V03);
            if !is_bundle {
                continue;
            }
            for layer in artifact
                .layers
                .iter()
                .filter(|layer| {
                    layer
                        .media_type
                        .starts_with("application/vnd.dev.sigstore.bundle")
                })
                .take(MAX_CANDIDATES)
            {
                let descriptor = layer.descriptor();
                let blob = retry(attempts, || {
                    session.small_blob(&descriptor, MAX_SIGNATURE_BLOB)
                })
                .await
                .map_err(|err| fetch_err(format!("the signature bundle {}", layer.digest), err))?;
                match cosign::verify_bundle(keys, &blob, digest) {
                    Ok(Some(verified)) => return Ok(Ok(verified)),
                    Ok(None) => {
                        debug!(bundle = %layer.digest, "skipping a bundle that is no image signature")
                    }
                    Err(other) => fault = fault.worst(other),
                }
            }
        }
    }

    // 2. The tag scheme.
    let tag = format!("sha256-{hex}.sig");
    let reference = session.reference_with_tag(&tag);
    let signatures = match retry(attempts, || session.manifest(&reference)).await {
        Ok((bytes, _)) => Some(bytes),
        Err(PullError::NotFound { .. }) => None,
        Err(err) => return Err(fetch_err(format!("the signature tag {tag}"), err)),
    };
    if let Some(bytes) = signatures {
        let Ok(signatures) = serde_json::from_slice::<SignatureManifest>(&bytes) else {
            return Ok(Err(fault.worst(SignatureFault::Encoding(
                "the signature tag is not an OCI manifest",
            ))));
        };
        for layer in signatures
            .layers
            .iter()
            .filter(|layer| layer.media_type == cosign::SIMPLE_SIGNING)
            .take(MAX_CANDIDATES)
        {
            let Some(signature) = layer.annotations.get(cosign::SIGNATURE_ANNOTATION) else {
                fault = fault.worst(SignatureFault::Encoding(
                    "a simple-signing layer has no signature annotation",
                ));
                continue;
            };
            let descriptor = layer.descriptor();
            let payload = retry(attempts, || {
                session.small_blob(&descriptor, MAX_SIGNATURE_BLOB)
            })
            .await
            .map_err(|err| fetch_err(format!("the signature payload {}", layer.digest), err))?;
            match cosign::verify_simple_signing(keys, &payload, signature, digest) {
                Ok(verified) => return Ok(Ok(verified)),
                Err(other) => fault = fault.worst(other),
            }
        }
    }
    Ok(Err(fault))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn positive_results_are_kept_per_digest_policy_and_key_set_for_the_ttl() {
        let policies = Policies::load(&[crate::pull::policy::PolicyConfig {
            images: vec!["r.example/**".to_owned()],
            projects: vec!["*".to_owned()],
            verify: crate::pull::policy::VerifyKind::None,
            keys: Vec::new(),
            trust_store: String::new(),
            trusted_identities: Vec::new(),
        }])
        .unwrap();
        let image = ImageRef::parse("r.example/app:1").unwrap();
        let policy = policies.for_image(&image, "default").unwrap();
        let pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEX7sj/CvdA5Yj07QSz8ZgAgRR58+X\nj/V4XdVrjwImpR4LiKIaEHxmwAd3QVtlqtr/7qgS3dmn2pL0j4jDf2SDEg==\n-----END PUBLIC KEY-----\n";
        let keys = TrustedKeys::from_pems([pem]).unwrap();
        let signatures = Signatures::new(
            policies.clone(),
            Duration::from_secs(300),
            SharedMetrics::default(),
        );
        assert!(!signatures.recently_verified(&policy, &keys, "sha256:a"));
        signatures.remember(&policy, &keys, "sha256:a");
        assert!(signatures.recently_verified(&policy, &keys, "sha256:a"));
        assert!(!signatures.recently_verified(&policy, &keys, "sha256:b"));
        tokio::time::advance(Duration::from_secs(301)).await;
        assert!(!signatures.recently_verified(&policy, &keys, "sha256:a"));
    }

    #[test]
    fn refusals_name_signature_digest_policy_and_fault() {
        let err = PullError::Signature {
            image: "r.example/app:1".into(),
            digest: "sha256:abc".into(),
            policy: "r.example/**".into(),
            fault: SignatureFault::Missing,
        };
        let text = err.to_string();
        for needle in [
            "signature",
            "sha256:abc",
            "r.example/**",
            "no signature found",
        ] {
            assert!(text.contains(needle), "{text}");
        }
        assert_eq!(result_label(&err), "no_signature");
    }
}
