//! The one digest algorithm layers are checked with: `sha256:<64 lowercase hex>`.

use std::fmt;
use std::sync::mpsc;
use std::thread;

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

/// SHA-256 on a thread of its own: the bytes are gathered into buffers of
/// `HASH_BUFFER_BYTES` and handed over, so the caller (inflating and writing
/// a layer) and the hashing run on two cores. The buffers go back and forth
/// between the two threads: at most `HASH_BUFFERS` + 1 exist.
pub(crate) enum BackgroundSha256 {
    Threaded {
        current: Vec<u8>,
        full: mpsc::SyncSender<Vec<u8>>,
        spare: mpsc::Receiver<Vec<u8>>,
        hasher: thread::JoinHandle<Sha256>,
    },
    /// No thread could be started: the same digest, hashed inline.
    Inline(Sha256),
}

const HASH_BUFFER_BYTES: usize = 256 << 10;
const HASH_BUFFERS: usize = 4;

impl BackgroundSha256 {
    pub(crate) fn new() -> Self {
        let (full, full_receiver) = mpsc::sync_channel::<Vec<u8>>(HASH_BUFFERS);
        let (spare_sender, spare) = mpsc::sync_channel::<Vec<u8>>(HASH_BUFFERS);
        let hasher = thread::Builder::new()
            .name("berth-sha256".to_owned())
            .spawn(move || {
                let mut hasher = Sha256::new();
                for mut buffer in full_receiver {
                    hasher.update(&buffer);
                    buffer.clear();
                    // A full spare queue, or a reader that is gone: the buffer is dropped.
                    spare_sender.try_send(buffer).ok();
                }
                hasher
            });
        match hasher {
            Ok(hasher) => Self::Threaded {
                current: Vec::with_capacity(HASH_BUFFER_BYTES),
                full,
                spare,
                hasher,
            },
            Err(_) => Self::Inline(Sha256::new()),
        }
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        let (current, full, spare) = match self {
            Self::Inline(hasher) => {
                hasher.update(data);
                return;
            }
            Self::Threaded {
                current,
                full,
                spare,
                ..
            } => (current, full, spare),
        };
        while !data.is_empty() {
            let take = (HASH_BUFFER_BYTES - current.len()).min(data.len());
            current.extend_from_slice(&data[..take]);
            data = &data[take..];
            if current.len() == HASH_BUFFER_BYTES {
                let next = spare
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(HASH_BUFFER_BYTES));
                // The hasher thread runs until `full` is dropped, in `finish`.
                full.send(std::mem::replace(current, next)).ok();
            }
        }
    }

    pub(crate) fn finish(self) -> Sha256Digest {
        match self {
            Self::Inline(hasher) => Sha256Digest::from_hasher(hasher),
            Self::Threaded {
                current,
                full,
                hasher,
                ..
            } => {
                full.send(current).ok();
                drop(full);
                match hasher.join() {
                    Ok(hasher) => Sha256Digest::from_hasher(hasher),
                    // The hasher thread has nothing that panics; if it did, the layer gets a
                    // digest no tar has, and is refused.
                    Err(_) => Sha256Digest([0xff; 32]),
                }
            }
        }
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
    fn the_background_hasher_gives_the_digest_of_all_it_was_given() {
        let data: Vec<u8> = (0..3 * HASH_BUFFER_BYTES + 12_345)
            .map(|i| u8::try_from(i % 251).unwrap_or(0))
            .collect();
        for step in [
            1,
            511,
            4096,
            HASH_BUFFER_BYTES,
            HASH_BUFFER_BYTES + 1,
            data.len(),
        ] {
            let mut hasher = BackgroundSha256::new();
            for chunk in data.chunks(step) {
                hasher.update(chunk);
            }
            assert_eq!(hasher.finish(), Sha256Digest::of(&data), "chunks of {step}");
        }
        assert_eq!(BackgroundSha256::new().finish(), Sha256Digest::of(b""));
    }

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
