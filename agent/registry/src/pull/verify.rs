//! Every byte is checked: the running size never passes the descriptor's, and the digest of
//! the whole blob must match before it is committed.

use sha2::{Digest as _, Sha256};

/// A verification failure: the content is not what the descriptor promised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("{digest}: more than the {expected} bytes its descriptor declares")]
    TooLong { digest: String, expected: u64 },
    #[error("{digest}: {actual} bytes, its descriptor declares {expected}")]
    TooShort {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("{digest}: content hashes to {actual}")]
    Digest { digest: String, actual: String },
}

/// Hashes a blob as it streams past.
#[derive(Debug)]
pub struct Verifier {
    digest: String,
    size: u64,
    seen: u64,
    hasher: Sha256,
    /// False when resuming bytes this process never saw: then only the size is checked here
    /// and containerd checks the digest of the whole blob at commit.
    hashing: bool,
}

impl Verifier {
    pub fn new(digest: &str, size: u64) -> Self {
        Self {
            digest: digest.to_owned(),
            size,
            seen: 0,
            hasher: Sha256::new(),
            hashing: true,
        }
    }

    /// Continues a blob of which `offset` bytes are already stored.
    pub fn resume(digest: &str, size: u64, offset: u64) -> Self {
        let mut verifier = Self::new(digest, size);
        verifier.seen = offset.min(size);
        verifier.hashing = offset == 0;
        verifier
    }

    /// Feeds the next chunk; refuses the first byte past the declared size.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), Mismatch> {
        self.seen += chunk.len() as u64;
        if self.seen > self.size {
            return Err(Mismatch::TooLong {
                digest: self.digest.clone(),
                expected: self.size,
            });
        }
        if self.hashing {
            self.hasher.update(chunk);
        }
        Ok(())
    }

    /// Bytes seen so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Checks the size and the digest of the whole blob.
    pub fn finish(&self) -> Result<(), Mismatch> {
        if self.seen != self.size {
            return Err(Mismatch::TooShort {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.seen,
            });
        }
        if !self.hashing {
            return Ok(());
        }
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if actual != self.digest {
            return Err(Mismatch::Digest {
                digest: self.digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// Checks a blob held whole in memory.
pub fn verify_bytes(digest: &str, size: Option<u64>, data: &[u8]) -> Result<(), Mismatch> {
    let mut verifier = Verifier::new(digest, size.unwrap_or(data.len() as u64));
    verifier.update(data)?;
    verifier.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn accepts_exact_content_in_chunks() {
        let data = b"hello, layer";
        let mut verifier = Verifier::new(&digest_of(data), data.len() as u64);
        for chunk in data.chunks(5) {
            verifier.update(chunk).unwrap();
        }
        assert_eq!(verifier.seen(), data.len() as u64);
        verifier.finish().unwrap();
    }

    #[test]
    fn a_resumed_blob_still_checks_its_size() {
        let mut verifier = Verifier::resume(&digest_of(b"abcdef"), 6, 4);
        assert_eq!(verifier.seen(), 4);
        verifier.update(b"ef").unwrap();
        verifier.finish().unwrap();
        let mut long = Verifier::resume(&digest_of(b"abcdef"), 6, 4);
        assert!(matches!(long.update(b"efg"), Err(Mismatch::TooLong { .. })));
        let fresh = Verifier::resume(&digest_of(b"abc"), 3, 0);
        assert!(matches!(fresh.finish(), Err(Mismatch::TooShort { .. })));
    }

    #[test]
    fn stops_at_the_first_byte_past_the_size() {
        let mut verifier = Verifier::new(&digest_of(b"abc"), 3);
        verifier.update(b"ab").unwrap();
        assert!(matches!(
            verifier.update(b"cd"),
            Err(Mismatch::TooLong { .. })
        ));
    }

    #[test]
    fn refuses_short_and_flipped_content() {
        let mut short = Verifier::new(&digest_of(b"abc"), 3);
        short.update(b"ab").unwrap();
        assert!(matches!(short.finish(), Err(Mismatch::TooShort { .. })));
        assert!(matches!(
            verify_bytes(&digest_of(b"abc"), Some(3), b"abd"),
            Err(Mismatch::Digest { .. })
        ));
        verify_bytes(&digest_of(b"abc"), None, b"abc").unwrap();
    }
}
