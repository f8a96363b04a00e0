//! One error type for applying a layer, with a coarse [`ApplyErrorKind`] the
//! caller maps to a status code.

use std::io;

use crate::compression::Compression;
use crate::digest::{DigestError, Sha256Digest};

/// What went wrong, coarsely, so the caller can pick a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyErrorKind {
    /// The bytes are not the ones the descriptor promised (digest or size
    /// mismatch): `DATA_LOSS`.
    DataLoss,
    /// The layer or its descriptor is hostile or malformed (escaping paths,
    /// corrupt compression or tar, unsupported digest): `INVALID_ARGUMENT`.
    InvalidLayer,
    /// The layer is larger than the configured `Limits`.
    LimitExceeded,
    /// Reading the input or writing the root failed.
    Io,
}

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("compressed layer size mismatch: expected {expected} bytes, got {actual}")]
    CompressedSize { expected: u64, actual: u64 },
    #[error("compressed layer is longer than its descriptor size of {expected} bytes")]
    CompressedOverrun { expected: u64 },
    #[error("compressed layer digest mismatch: expected {expected}, got {actual}")]
    CompressedDigest {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("diff id (uncompressed tar digest) mismatch: expected {expected}, got {actual}")]
    DiffId {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("decompressing the {compression} layer stream")]
    Decompress {
        compression: Compression,
        #[source]
        source: io::Error,
    },
    #[error("parsing the layer's tar stream")]
    Tar {
        #[source]
        source: io::Error,
    },
    #[error("entry {path:?} escapes the root")]
    PathEscape { path: String },
    #[error("entry {path:?} has no usable name")]
    EmptyPath { path: String },
    #[error("entry {path:?} has unsupported tar type {type_flag:#04x}")]
    EntryType { path: String, type_flag: u8 },
    #[error("hardlink {path:?} points to {target:?}, which is not a file inside the root")]
    HardlinkTarget {
        path: String,
        target: String,
        #[source]
        source: Option<io::Error>,
    },
    #[error("entry {path:?} cannot be placed in the root")]
    Placement {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("entry {path:?} has an invalid header")]
    Header {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("layer has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("layer expands to more than {limit} uncompressed bytes")]
    TooLarge { limit: u64 },
    #[error("reading the layer stream")]
    Read {
        #[source]
        source: io::Error,
    },
    #[error("opening the root {root:?}")]
    Root {
        root: String,
        #[source]
        source: io::Error,
    },
    #[error("writing entry {path:?}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ApplyError {
    /// The coarse class of this error.
    pub fn kind(&self) -> ApplyErrorKind {
        match self {
            Self::CompressedSize { .. }
            | Self::CompressedOverrun { .. }
            | Self::CompressedDigest { .. }
            | Self::DiffId { .. } => ApplyErrorKind::DataLoss,
            Self::Digest(_)
            | Self::Decompress { .. }
            | Self::Tar { .. }
            | Self::PathEscape { .. }
            | Self::EmptyPath { .. }
            | Self::EntryType { .. }
            | Self::HardlinkTarget { .. }
            | Self::Placement { .. }
            | Self::Header { .. } => ApplyErrorKind::InvalidLayer,
            Self::TooManyEntries { .. } | Self::TooLarge { .. } => ApplyErrorKind::LimitExceeded,
            Self::Read { .. } | Self::Root { .. } | Self::Write { .. } => ApplyErrorKind::Io,
        }
    }

    /// The layer's bytes are not the ones its descriptor names.
    pub fn is_data_loss(&self) -> bool {
        self.kind() == ApplyErrorKind::DataLoss
    }
}
