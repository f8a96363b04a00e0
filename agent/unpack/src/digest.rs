//! The one digest algorithm layers are checked with: `sha256:<64 lowercase hex>`.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// A digest string that is not a usable `sha256:` digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("malformed digest {digest:?}")]
    Malformed { digest: String },
    #[error("unsupported digest algorithm in {digest:?}")]
    Unsupported { digest: String },
}

/// A SHA-256 content digest, written `sha256:<hex>` as in OCI descriptors.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// Parses `sha256:<64 lowercase hex digits>`. Any other algorithm is
    /// [`DigestError::Unsupported`]; a bad encoding is [`DigestError::Malformed`].
    pub fn parse(text: &str) -> Result<Self, DigestError> {
        let Some((algorithm, encoded)) = text.split_once(':') else {
            return Err(DigestError::Malformed {
                digest: text.to_owned(),
            });
        };
        if algorithm != "sha256" {
            return Err(DigestError::Unsupported {
                digest: text.to_owned(),
            });
        }
        let lowercase_hex = encoded
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
        let mut bytes = [0u8; 32];
        if !lowercase_hex || hex::decode_to_slice(encoded, &mut bytes).is_err() {
            return Err(DigestError::Malformed {
                digest: text.to_owned(),
            });
        }
        Ok(Self(bytes))
    }

    /// The digest of `data`, for callers and tests that hold a whole blob.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    pub(crate) fn from_hasher(hasher: Sha256) -> Self {
        Self(hasher.finalize().into())
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, formatter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApplyErrorKind;

    #[test]
    fn parses_and_prints_sha256() {
        let text = format!("sha256:{}", "ab".repeat(32));
        let digest = Sha256Digest::parse(&text).unwrap();
        assert_eq!(digest.to_string(), text);
        assert_eq!(
            Sha256Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn refuses_other_algorithms_and_bad_hex() {
        let sha512 = format!("sha512:{}", "ab".repeat(64));
        assert!(matches!(
            Sha256Digest::parse(&sha512),
            Err(DigestError::Unsupported { .. })
        ));
        for bad in [
            "sha256".to_owned(),
            "sha256:abc".to_owned(),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "zz".repeat(32)),
            format!("sha256:{}", "ab".repeat(33)),
        ] {
            let err = crate::error::ApplyError::from(Sha256Digest::parse(&bad).unwrap_err());
            assert_eq!(err.kind(), ApplyErrorKind::InvalidLayer, "{bad}");
        }
    }
}
