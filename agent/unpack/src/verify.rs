//! Readers that check a layer while it streams: [`VerifyingReader`] on the
//! compressed blob (descriptor size, and digest unless the caller checks it)
//! and `DiffReader` on the uncompressed tar (diff id and the
//! uncompressed-size limit).
//!
//! Both keep what went wrong in their state, because the tar parser and the
//! decompressors above them wrap or replace the `io::Error`s they return;
//! `apply` reads the state back to build a precise [`ApplyError`].

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::digest::{BackgroundSha256, Sha256Digest};
use crate::error::ApplyError;

/// Reads a compressed layer blob and checks it against its descriptor:
/// every byte is counted, a byte past the descriptor size is an error (the
/// stream is never silently cut), and at the end of the input the size must
/// match, and the SHA-256 digest when one is expected (`None`: the caller
/// hashes the blob itself, e.g. on another thread while it downloads).
pub struct VerifyingReader<R> {
    inner: R,
    expected_digest: Option<Sha256Digest>,
    expected_size: u64,
    hasher: Option<Sha256>,
    bytes_read: u64,
    state: VerifyState,
}

#[derive(Debug, Clone, Copy)]
enum VerifyState {
    Reading,
    /// The input itself returned an error (network, pipe): not a verdict.
    InputFailed,
    Verified,
    Overrun,
    Short,
    DigestMismatch(Sha256Digest),
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, expected_digest: Option<Sha256Digest>, expected_size: u64) -> Self {
        Self {
            inner,
            expected_digest,
            expected_size,
            hasher: expected_digest.map(|_| Sha256::new()),
            bytes_read: 0,
            state: VerifyState::Reading,
        }
    }

    /// Compressed bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Reads whatever is left of the input and returns the verified size,
    /// or why the blob does not match its descriptor.
    pub fn finish(mut self) -> Result<u64, ApplyError> {
        self.drain()?;
        Ok(self.bytes_read)
    }

    /// Reads to the end of the input (never past the descriptor size) so the
    /// verdict covers the whole blob.
    pub(crate) fn drain(&mut self) -> Result<(), ApplyError> {
        let drained = io::copy(self, &mut io::sink());
        if let Some(failure) = self.verdict() {
            return Err(failure);
        }
        match drained {
            Ok(_) => Ok(()),
            Err(source) => Err(ApplyError::Read { source }),
        }
    }

    /// The mismatch found so far, if any.
    pub(crate) fn verdict(&self) -> Option<ApplyError> {
        match self.state {
            VerifyState::Reading | VerifyState::InputFailed | VerifyState::Verified => None,
            VerifyState::Overrun => Some(ApplyError::CompressedOverrun {
                expected: self.expected_size,
            }),
            VerifyState::Short => Some(ApplyError::CompressedSize {
                expected: self.expected_size,
                actual: self.bytes_read,
            }),
            VerifyState::DigestMismatch(actual) => self
                .expected_digest
                .map(|expected| ApplyError::CompressedDigest { expected, actual }),
        }
    }

    pub(crate) fn input_failed(&self) -> bool {
        matches!(self.state, VerifyState::InputFailed)
    }

    fn conclude(&mut self) -> io::Result<usize> {
        if self.bytes_read != self.expected_size {
            self.state = VerifyState::Short;
            return Err(mismatch_error());
        }
        let (Some(expected), Some(hasher)) = (self.expected_digest, self.hasher.take()) else {
            self.state = VerifyState::Verified;
            return Ok(0);
        };
        let actual = Sha256Digest::from_hasher(hasher);
        if actual == expected {
            self.state = VerifyState::Verified;
            Ok(0)
        } else {
            self.state = VerifyState::DigestMismatch(actual);
            Err(mismatch_error())
        }
    }

    fn read_input(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buffer) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    self.state = VerifyState::InputFailed;
                    return Err(err);
                }
                Ok(count) => return Ok(count),
            }
        }
    }
}

fn mismatch_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "layer blob does not match its descriptor",
    )
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self.state {
            VerifyState::Reading | VerifyState::InputFailed => {}
            VerifyState::Verified => return Ok(0),
            VerifyState::Overrun | VerifyState::Short | VerifyState::DigestMismatch(_) => {
                return Err(mismatch_error());
            }
        }
        if buffer.is_empty() {
            return Ok(0);
        }
        let remaining = self.expected_size - self.bytes_read;
        if remaining == 0 {
            // Anything after the descriptor size is refused, not cut off.
            let mut probe = [0u8; 1];
            return match self.read_input(&mut probe)? {
                0 => self.conclude(),
                _ => {
                    self.state = VerifyState::Overrun;
                    Err(mismatch_error())
                }
            };
        }
        let wanted = usize::try_from(remaining).map_or(buffer.len(), |left| left.min(buffer.len()));
        let count = self.read_input(&mut buffer[..wanted])?;
        if count == 0 {
            return self.conclude();
        }
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buffer[..count]);
        }
        self.bytes_read += count as u64;
        Ok(count)
    }
}

impl<R> fmt::Debug for VerifyingReader<R> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("VerifyingReader")
            .field("expected_digest", &self.expected_digest)
            .field("expected_size", &self.expected_size)
            .field("bytes_read", &self.bytes_read)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Hashes and counts the uncompressed tar stream, refusing to inflate past
/// the uncompressed-size limit.
pub(crate) struct DiffReader<R> {
    inner: R,
    hasher: BackgroundSha256,
    bytes_read: u64,
    limit: u64,
    state: DiffState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiffState {
    Reading,
    /// The decompressor (or the input under it) returned an error.
    InnerFailed,
    LimitExceeded,
}

impl<R: Read> DiffReader<R> {
    pub(crate) fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            hasher: BackgroundSha256::new(),
            bytes_read: 0,
            limit,
            state: DiffState::Reading,
        }
    }

    pub(crate) fn state(&self) -> DiffState {
        self.state
    }

    /// The digest and size of everything read, and the stream underneath.
    pub(crate) fn finish(self) -> (Sha256Digest, u64, R) {
        (self.hasher.finish(), self.bytes_read, self.inner)
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for DiffReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.state == DiffState::LimitExceeded {
            return Err(limit_error());
        }
        let count = match self.inner.read(buffer) {
            Ok(count) => count,
            Err(err) => {
                if err.kind() != io::ErrorKind::Interrupted {
                    self.state = DiffState::InnerFailed;
                }
                return Err(err);
            }
        };
        self.bytes_read += count as u64;
        if self.bytes_read > self.limit {
            self.state = DiffState::LimitExceeded;
            return Err(limit_error());
        }
        self.hasher.update(&buffer[..count]);
        Ok(count)
    }
}

fn limit_error() -> io::Error {
    io::Error::other("layer expands past the uncompressed size limit")
}

impl<R> fmt::Debug for DiffReader<R> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("DiffReader")
            .field("bytes_read", &self.bytes_read)
            .field("limit", &self.limit)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifying(data: &[u8], digest_of: &[u8], size: u64) -> VerifyingReader<&'static [u8]> {
        let leaked: &'static [u8] = Box::leak(data.to_vec().into_boxed_slice());
        VerifyingReader::new(leaked, Some(Sha256Digest::of(digest_of)), size)
    }

    #[test]
    fn without_an_expected_digest_only_the_size_is_checked() {
        let data = b"layer bytes";
        let counted = VerifyingReader::new(&data[..], None, data.len() as u64);
        assert_eq!(counted.finish().unwrap(), data.len() as u64);
        let short = VerifyingReader::new(&data[..], None, 20);
        assert!(matches!(
            short.finish(),
            Err(ApplyError::CompressedSize {
                expected: 20,
                actual: 11
            })
        ));
        let mut long = VerifyingReader::new(&data[..], None, 4);
        let mut out = Vec::new();
        long.read_to_end(&mut out).unwrap_err();
        assert!(matches!(
            long.verdict(),
            Some(ApplyError::CompressedOverrun { expected: 4 })
        ));
    }

    #[test]
    fn passes_matching_blob_through() {
        let data = b"layer bytes";
        let mut reader = verifying(data, data, data.len() as u64);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(reader.finish().unwrap(), data.len() as u64);
    }

    #[test]
    fn refuses_bytes_past_the_descriptor_size() {
        let data = b"layer bytes and more";
        let mut reader = verifying(data, &data[..11], 11);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap_err();
        assert!(out.len() <= 11);
        assert!(matches!(
            reader.verdict(),
            Some(ApplyError::CompressedOverrun { expected: 11 })
        ));
    }

    #[test]
    fn reports_short_blob_and_wrong_digest() {
        let data = b"short";
        let short = verifying(data, data, 10);
        assert!(matches!(
            short.finish(),
            Err(ApplyError::CompressedSize {
                expected: 10,
                actual: 5
            })
        ));

        let wrong = verifying(data, b"other", 5);
        let err = wrong.finish().unwrap_err();
        assert!(err.is_data_loss());
        let message = err.to_string();
        assert!(
            message.contains(&Sha256Digest::of(b"other").to_string()),
            "{message}"
        );
        assert!(
            message.contains(&Sha256Digest::of(data).to_string()),
            "{message}"
        );
    }

    #[test]
    fn diff_reader_hashes_and_limits() {
        let data = vec![7u8; 1000];
        let mut reader = DiffReader::new(&data[..], 1000);
        io::copy(&mut reader, &mut io::sink()).unwrap();
        let (digest, size, _) = reader.finish();
        assert_eq!((digest, size), (Sha256Digest::of(&data), 1000));

        let mut limited = DiffReader::new(&data[..], 999);
        io::copy(&mut limited, &mut io::sink()).unwrap_err();
        assert_eq!(limited.state(), DiffState::LimitExceeded);
    }
}
