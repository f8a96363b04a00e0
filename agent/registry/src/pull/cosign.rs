//! cosign signatures with public keys, offline (no Rekor entry is demanded): the two storage
//! schemes cosign 3 writes, parsed and verified here without any I/O.
//!
//! - The tag scheme (`cosign sign --new-bundle-format=false`): the tag `sha256-<hex>.sig` holds
//!   a manifest whose layers are simple-signing payloads
//!   (`application/vnd.dev.cosign.simplesigning.v1+json`: JSON with
//!   `critical.image.docker-manifest-digest` and `critical.identity.docker-reference`), each with
//!   its ECDSA signature over the payload bytes, base64 DER, in the layer annotation
//!   `dev.cosignproject.cosign/signature`.
//! - The OCI 1.1 referrers scheme (cosign 3's default): an artifact manifest of type
//!   `application/vnd.dev.sigstore.bundle.v0.3+json` whose `subject` is the image, with one layer:
//!   a sigstore bundle. For `cosign sign` it carries a DSSE envelope (`payloadType`
//!   `application/vnd.in-toto+json`) around an in-toto Statement v1 whose `predicateType` is
//!   `https://sigstore.dev/cosign/sign/v1` and whose `subject[].digest.sha256` is the image
//!   digest; the signature is ECDSA over the DSSE pre-authentication encoding (PAE).
//!
//! What is trusted: a signature that verifies under one of the policy's keys, over a payload
//! that names exactly the digest being run. The `docker-reference` identity is reported for the
//! log, never trusted.

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Media type of a simple-signing payload layer (tag scheme).
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 signature (tag scheme).
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Artifact type and layer media type of a sigstore bundle (referrers scheme).
pub const BUNDLE_V03: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// Prefix shared by every sigstore bundle media type version.
const BUNDLE_PREFIX: &str = "application/vnd.dev.sigstore.bundle";
const IN_TOTO_PAYLOAD: &str = "application/vnd.in-toto+json";
const IN_TOTO_STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
/// The predicate `cosign sign` puts in its statement (attestations carry others).
const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";

/// What is wrong with an image's signatures. Fixed text: it goes into the refusal message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureFault {
    #[error("no signature found")]
    Missing,
    #[error("signed by an unknown key (no signature verifies against the policy's keys, or a signed payload was altered)")]
    UnknownKey,
    #[error("the signed payload is for another digest, {found}")]
    OtherDigest { found: String },
    #[error("bad signature encoding: {0}")]
    Encoding(&'static str),
}

impl SignatureFault {
    /// The `result` label of `berth_signature_verifications_total`.
    pub fn result_label(&self) -> &'static str {
        match self {
            SignatureFault::Missing => "no_signature",
            SignatureFault::UnknownKey => "unknown_key",
            SignatureFault::OtherDigest { .. } => "wrong_digest",
            SignatureFault::Encoding(_) => "bad_encoding",
        }
    }

    /// How telling a fault is, to report the most specific one when every candidate failed.
    fn rank(&self) -> u8 {
        match self {
            SignatureFault::Missing => 0,
            SignatureFault::Encoding(_) => 1,
            SignatureFault::UnknownKey => 2,
            SignatureFault::OtherDigest { .. } => 3,
        }
    }

    /// The more telling of two faults.
    pub fn worst(self, other: SignatureFault) -> SignatureFault {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

/// The public keys of one policy; a valid signature by any one of them suffices.
#[derive(Clone)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
    /// sha256 over the keys' SubjectPublicKeyInfo DER, sorted: names the key set in caches.
    fingerprint: String,
}

impl std::fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKeys")
            .field("keys", &self.keys.len())
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// Why a key file was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM \"PUBLIC KEY\" (SubjectPublicKeyInfo) for ECDSA P-256, the key type cosign generate-key-pair writes")]
    Unsupported,
}

impl TrustedKeys {
    /// Parses PEM public keys (`-----BEGIN PUBLIC KEY-----`, ECDSA P-256).
    pub fn from_pems<'a>(
        pems: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, (usize, KeyError)> {
        let mut keys = Vec::new();
        let mut ders = Vec::new();
        for (index, pem) in pems.into_iter().enumerate() {
            let key = VerifyingKey::from_public_key_pem(pem.trim())
                .map_err(|_| (index, KeyError::Unsupported))?;
            ders.push(key.to_sec1_point(true).as_bytes().to_vec());
            keys.push(key);
        }
        ders.sort();
        let mut hasher = Sha256::new();
        for der in &ders {
            hasher.update(der);
        }
        Ok(Self {
            keys,
            fingerprint: hex::encode(hasher.finalize()),
        })
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The position of the first key under which `signature` verifies over `message`.
    fn verify(&self, message: &[u8], signature: &[u8]) -> Result<usize, SignatureFault> {
        // cosign writes ASN.1 DER; the raw r||s form is accepted too.
        let signature = Signature::from_der(signature)
            .or_else(|_| Signature::from_slice(signature))
            .map_err(|_| SignatureFault::Encoding("the signature is not an ECDSA signature"))?;
        self.keys
            .iter()
            .position(|key| key.verify(message, &signature).is_ok())
            .ok_or(SignatureFault::UnknownKey)
    }
}

/// A signature that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Which of the policy's keys (by position) signed.
    pub key: usize,
    /// The `docker-reference` the signer named (tag scheme), for the log only.
    pub identity: Option<String>,
}

#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    identity: Option<Identity>,
    image: CriticalImage,
}

#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: Option<String>,
}

#[derive(Deserialize)]
struct CriticalImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The digest a simple-signing payload signs, and the reference it names.
pub fn parse_simple_signing(payload: &[u8]) -> Result<(String, Option<String>), SignatureFault> {
    let parsed: SimpleSigning = serde_json::from_slice(payload).map_err(|_| {
        SignatureFault::Encoding("the payload is not a cosign simple-signing document")
    })?;
    Ok((
        parsed.critical.image.docker_manifest_digest,
        parsed
            .critical
            .identity
            .and_then(|identity| identity.docker_reference),
    ))
}

/// Tag scheme: `signature_b64` (the layer annotation) over `payload` (the layer blob, its
/// digest already checked) by one of `keys`, for `digest`.
pub fn verify_simple_signing(
    keys: &TrustedKeys,
    payload: &[u8],
    signature_b64: &str,
    digest: &str,
) -> Result<Verified, SignatureFault> {
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|_| SignatureFault::Encoding("the signature annotation is not base64"))?;
    let key = keys.verify(payload, &signature)?;
    let (signed, identity) = parse_simple_signing(payload)?;
    if signed != digest {
        return Err(SignatureFault::OtherDigest { found: signed });
    }
    Ok(Verified { key, identity })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    dsse_envelope: Option<Envelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    #[serde(rename = "_type")]
    statement_type: String,
    subject: Vec<StatementSubject>,
    predicate_type: String,
}

#[derive(Deserialize)]
struct StatementSubject {
    digest: std::collections::HashMap<String, String>,
}

/// DSSE's pre-authentication encoding: what the envelope's signatures sign.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut message = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    message.extend_from_slice(payload);
    message
}

/// Referrers scheme: a sigstore bundle (its blob digest already checked) whose DSSE envelope is
/// signed by one of `keys` and whose in-toto statement names `digest`. `Ok(None)`: a verified
/// bundle of another kind (an attestation), which is no signature of the image.
pub fn verify_bundle(
    keys: &TrustedKeys,
    bundle: &[u8],
    digest: &str,
) -> Result<Option<Verified>, SignatureFault> {
    let bundle: Bundle = serde_json::from_slice(bundle)
        .map_err(|_| SignatureFault::Encoding("the bundle is not sigstore bundle JSON"))?;
    if !bundle.media_type.starts_with(BUNDLE_PREFIX) {
        return Err(SignatureFault::Encoding(
            "the bundle's mediaType is not a sigstore bundle",
        ));
    }
    let envelope = bundle.dsse_envelope.ok_or(SignatureFault::Encoding(
        "the bundle has no DSSE envelope (only cosign sign's DSSE bundles are supported)",
    ))?;
    if envelope.payload_type != IN_TOTO_PAYLOAD {
        return Err(SignatureFault::Encoding(
            "the DSSE payload is not an in-toto statement",
        ));
    }
    let engine = base64::engine::general_purpose::STANDARD;
    let payload = engine
        .decode(envelope.payload.trim())
        .map_err(|_| SignatureFault::Encoding("the DSSE payload is not base64"))?;
    let message = pae(&envelope.payload_type, &payload);
    let mut fault = SignatureFault::Missing;
    let mut key = None;
    for signature in &envelope.signatures {
        let verified = engine
            .decode(signature.sig.trim())
            .map_err(|_| SignatureFault::Encoding("a DSSE signature is not base64"))
            .and_then(|signature| keys.verify(&message, &signature));
        match verified {
            Ok(index) => {
                key = Some(index);
                break;
            }
            Err(err) => fault = fault.worst(err),
        }
    }
    let Some(key) = key else {
        return Err(fault);
    };
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|_| SignatureFault::Encoding("the DSSE payload is not an in-toto statement"))?;
    if statement.statement_type != IN_TOTO_STATEMENT_V1
        || statement.predicate_type != COSIGN_SIGN_PREDICATE
    {
        return Ok(None);
    }
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let mut found = None;
    for subject in &statement.subject {
        match subject.digest.get("sha256") {
            Some(signed) if signed == hex => {
                return Ok(Some(Verified {
                    key,
                    identity: None,
                }))
            }
            Some(signed) => found = Some(format!("sha256:{signed}")),
            None => {}
        }
    }
    Err(match found {
        Some(found) => SignatureFault::OtherDigest { found },
        None => SignatureFault::Encoding("the in-toto statement names no sha256 subject"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::EncodePublicKey as _;

    const DIGEST: &str = "sha256:80d35dc3901d3ad1bf3d70b8e8576d2951bd4f9f2adcefb3deac28dab01f04dd";

    fn signing_key(seed: u8) -> SigningKey {
        let mut bytes = [0_u8; 32];
        bytes[31] = seed;
        bytes[0] = 0x11;
        SigningKey::from_slice(&bytes).unwrap()
    }

    fn pem(key: &SigningKey) -> String {
        key.verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
    }

    fn keys(signers: &[&SigningKey]) -> TrustedKeys {
        let pems: Vec<String> = signers.iter().map(|key| pem(key)).collect();
        TrustedKeys::from_pems(pems.iter().map(String::as_str)).unwrap()
    }

    fn sign(key: &SigningKey, message: &[u8]) -> String {
        let signature: Signature = key.sign(message);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }

    fn simple_signing(digest: &str) -> Vec<u8> {
        format!(r#"{{"critical":{{"identity":{{"docker-reference":"r.example/team/app"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#).into_bytes()
    }

    fn bundle(key: &SigningKey, statement: &str) -> Vec<u8> {
        let engine = base64::engine::general_purpose::STANDARD;
        let signature = sign(key, &pae(IN_TOTO_PAYLOAD, statement.as_bytes()));
        format!(
            r#"{{"mediaType":"{BUNDLE_V03}","verificationMaterial":{{"publicKey":{{"hint":"x"}}}},"dsseEnvelope":{{"payload":"{}","payloadType":"{IN_TOTO_PAYLOAD}","signatures":[{{"sig":"{signature}"}}]}}}}"#,
            engine.encode(statement)
        )
        .into_bytes()
    }

    fn statement(hex: &str, predicate: &str) -> String {
        format!(
            r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"digest":{{"sha256":"{hex}"}},"annotations":{{}}}}],"predicateType":"{predicate}","predicate":{{}}}}"#
        )
    }

    #[test]
    fn parses_the_simple_signing_payload_cosign_writes() {
        // As pushed by cosign 3.1.1 (`--new-bundle-format=false`).
        let payload = br#"{"critical":{"identity":{"docker-reference":"127.0.0.1:15916/t/app"},"image":{"docker-manifest-digest":"sha256:80d35dc3901d3ad1bf3d70b8e8576d2951bd4f9f2adcefb3deac28dab01f04dd"},"type":"cosign container image signature"},"optional":null}"#;
        let (digest, identity) = parse_simple_signing(payload).unwrap();
        assert_eq!(digest, DIGEST);
        assert_eq!(identity.as_deref(), Some("127.0.0.1:15916/t/app"));
        assert!(matches!(
            parse_simple_signing(b"{\"critical\":{}}"),
            Err(SignatureFault::Encoding(_))
        ));
    }

    #[test]
    fn the_pae_is_dsse_v1() {
        assert_eq!(
            pae("application/vnd.in-toto+json", b"hello"),
            b"DSSEv1 28 application/vnd.in-toto+json 5 hello".to_vec()
        );
    }

    #[test]
    fn a_simple_signing_signature_verifies_under_any_policy_key_only() {
        let (first, second, stranger) = (signing_key(1), signing_key(2), signing_key(3));
        let payload = simple_signing(DIGEST);
        let signature = sign(&second, &payload);
        let verified =
            verify_simple_signing(&keys(&[&first, &second]), &payload, &signature, DIGEST).unwrap();
        assert_eq!(verified.key, 1);
        assert_eq!(verified.identity.as_deref(), Some("r.example/team/app"));
        assert_eq!(
            verify_simple_signing(&keys(&[&first, &stranger]), &payload, &signature, DIGEST),
            Err(SignatureFault::UnknownKey)
        );
    }

    #[test]
    fn a_simple_signing_signature_refuses_tampering_and_other_digests() {
        let key = signing_key(1);
        let trusted = keys(&[&key]);
        let payload = simple_signing(DIGEST);
        let signature = sign(&key, &payload);
        let mut altered = payload.clone();
        let at = altered.len() - 10;
        altered[at] ^= 1;
        assert_eq!(
            verify_simple_signing(&trusted, &altered, &signature, DIGEST),
            Err(SignatureFault::UnknownKey)
        );
        let other = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            verify_simple_signing(&trusted, &payload, &signature, &other),
            Err(SignatureFault::OtherDigest {
                found: DIGEST.to_owned()
            })
        );
        assert!(matches!(
            verify_simple_signing(&trusted, &payload, "not base64!", DIGEST),
            Err(SignatureFault::Encoding(_))
        ));
        let garbage = base64::engine::general_purpose::STANDARD.encode([1_u8, 2, 3]);
        assert!(matches!(
            verify_simple_signing(&trusted, &payload, &garbage, DIGEST),
            Err(SignatureFault::Encoding(_))
        ));
    }

    #[test]
    fn a_bundle_verifies_over_the_pae_and_names_the_digest() {
        let (key, stranger) = (signing_key(1), signing_key(2));
        let hex = DIGEST.trim_start_matches("sha256:");
        let good = bundle(&key, &statement(hex, COSIGN_SIGN_PREDICATE));
        assert_eq!(
            verify_bundle(&keys(&[&stranger, &key]), &good, DIGEST)
                .unwrap()
                .unwrap()
                .key,
            1
        );
        assert_eq!(
            verify_bundle(&keys(&[&stranger]), &good, DIGEST),
            Err(SignatureFault::UnknownKey)
        );
        let other = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            verify_bundle(&keys(&[&key]), &good, &other),
            Err(SignatureFault::OtherDigest {
                found: DIGEST.to_owned()
            })
        );
        // An attestation signed by the same key is no signature of the image.
        let attestation = bundle(&key, &statement(hex, "https://slsa.dev/provenance/v1"));
        assert_eq!(
            verify_bundle(&keys(&[&key]), &attestation, DIGEST),
            Ok(None)
        );
        assert!(matches!(
            verify_bundle(&keys(&[&key]), b"{}", DIGEST),
            Err(SignatureFault::Encoding(_))
        ));
    }

    #[test]
    fn keys_parse_from_cosign_pem_and_others_are_refused() {
        // `cosign generate-key-pair` output (3.1.1).
        let cosign_pub = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEX7sj/CvdA5Yj07QSz8ZgAgRR58+X\nj/V4XdVrjwImpR4LiKIaEHxmwAd3QVtlqtr/7qgS3dmn2pL0j4jDf2SDEg==\n-----END PUBLIC KEY-----\n";
        let keys = TrustedKeys::from_pems([cosign_pub]).unwrap();
        assert_eq!(keys.fingerprint().len(), 64);
        assert_eq!(
            TrustedKeys::from_pems([cosign_pub, "not a key"]).unwrap_err(),
            (1, KeyError::Unsupported)
        );
        let (a, b) = (signing_key(1), signing_key(2));
        assert_eq!(
            super::tests::keys(&[&a, &b]).fingerprint(),
            super::tests::keys(&[&b, &a]).fingerprint(),
            "the key set's name does not depend on order"
        );
        assert_ne!(
            super::tests::keys(&[&a]).fingerprint(),
            super::tests::keys(&[&b]).fingerprint()
        );
    }

    #[test]
    fn faults_keep_the_most_telling() {
        assert_eq!(
            SignatureFault::Missing.worst(SignatureFault::UnknownKey),
            SignatureFault::UnknownKey
        );
        assert_eq!(
            SignatureFault::UnknownKey.worst(SignatureFault::Encoding("x")),
            SignatureFault::UnknownKey
        );
    }

    /// What cosign 3.1.1 pushed for `cosign sign --key cosign.key` (both schemes) of one image,
    /// with the public key it generated: berth accepts exactly what `cosign verify` accepted.
    #[test]
    fn verifies_what_the_real_cosign_signed() {
        let cosign_pub = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEX7sj/CvdA5Yj07QSz8ZgAgRR58+X\nj/V4XdVrjwImpR4LiKIaEHxmwAd3QVtlqtr/7qgS3dmn2pL0j4jDf2SDEg==\n-----END PUBLIC KEY-----\n";
        let trusted = TrustedKeys::from_pems([cosign_pub]).unwrap();
        let bundle = r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"publicKey":{"hint":"laEJZ3Z/PhUrbn22V9rTOl87idK9wb1hfkqeTMNfNls="}},"dsseEnvelope":{"payload":"eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjEiLCJzdWJqZWN0IjpbeyJkaWdlc3QiOnsic2hhMjU2IjoiODBkMzVkYzM5MDFkM2FkMWJmM2Q3MGI4ZTg1NzZkMjk1MWJkNGY5ZjJhZGNlZmIzZGVhYzI4ZGFiMDFmMDRkZCJ9LCJhbm5vdGF0aW9ucyI6e319XSwicHJlZGljYXRlVHlwZSI6Imh0dHBzOi8vc2lnc3RvcmUuZGV2L2Nvc2lnbi9zaWduL3YxIiwicHJlZGljYXRlIjp7fX0=","payloadType":"application/vnd.in-toto+json","signatures":[{"sig":"MEUCIQCWISVOKjcjWGcUoMC1LMRN/lI/Pt5L7XMvJ6Cw4S8CWwIgAQZR9qxYdi8eBAwKcn6s/wXGArNHrabb3/DK5QypCaw="}]}}"#;
        assert_eq!(
            verify_bundle(&trusted, bundle.as_bytes(), DIGEST)
                .unwrap()
                .unwrap()
                .key,
            0
        );
        let payload = br#"{"critical":{"identity":{"docker-reference":"127.0.0.1:15916/t/app"},"image":{"docker-manifest-digest":"sha256:80d35dc3901d3ad1bf3d70b8e8576d2951bd4f9f2adcefb3deac28dab01f04dd"},"type":"cosign container image signature"},"optional":null}"#;
        let signature = "MEUCIQD+B8T3ypwkKsNogeH71Vr7NV3BPPUJsSl2rXHmcGRWqwIgJHM5UOAakUBX/ujJX0fCky8fIqEpaDKUUpXCON6uXLA=";
        verify_simple_signing(&trusted, payload, signature, DIGEST).unwrap();
        let stranger = keys(&[&signing_key(9)]);
        assert_eq!(
            verify_simple_signing(&stranger, payload, signature, DIGEST),
            Err(SignatureFault::UnknownKey)
        );
        assert_eq!(
            verify_bundle(&stranger, bundle.as_bytes(), DIGEST),
            Err(SignatureFault::UnknownKey)
        );
    }
}
