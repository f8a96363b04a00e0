//! containerd over its gRPC API: content, images, snapshots, containers and tasks.
//!
//! Nothing here imports `secret` or `auth`: containerd never receives a credential.

mod blob_dir;
mod client;
mod container;
mod content;
mod image;
mod lease;
mod snapshot;
mod task;
mod version;

pub use blob_dir::{BlobDir, BlobFile, WrittenBlob};
pub use client::Containerd;
pub use container::{ContainerRecord, NewContainer};
pub use content::{BlobWriter, OpenedBlob};
pub use image::{chain_ids, ListedImage, UnpackLayer};
pub use lease::{rfc3339, Lease};
pub use snapshot::{uncompressed_label, Extraction, OverlayDirs, Prepared};
pub use version::{ContainerdVersion, MINIMUM as MINIMUM_VERSION};

/// A failed containerd call. The `Status` is kept as the source and never stringified into
/// messages; callers branch on [`ContainerdError::code`].
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("containerd at {socket} is not reachable")]
    Connect {
        socket: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("containerd {op} failed")]
    Rpc {
        op: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("containerd {op}: {reason}")]
    Protocol {
        op: &'static str,
        reason: &'static str,
    },
    /// A blob file berthd writes into containerd's content directory itself.
    #[error("containerd's content directory: {op} failed")]
    ContentFile {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A snapshot directory berthd writes a layer into itself.
    #[error("containerd's snapshot directory: {op} failed")]
    SnapshotDir {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer} unpacked to diff id {actual}, the image config says {expected}")]
    DiffIdMismatch {
        layer: String,
        expected: String,
        actual: String,
    },
}

impl ContainerdError {
    pub fn rpc(op: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |source| ContainerdError::Rpc { op, source }
    }

    /// The gRPC code of a failed call, if it was one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ContainerdError::Rpc { source, .. } => Some(source.code()),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }

    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(tonic::Code::AlreadyExists)
    }

    /// containerd could not be reached (socket gone, daemon restarting).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ContainerdError::Connect { .. })
            || self.code() == Some(tonic::Code::Unavailable)
    }
}

/// Tolerates NotFound: deleting what is already gone is success.
pub fn ignore_not_found<T>(result: Result<T, ContainerdError>) -> Result<(), ContainerdError> {
    match result {
        Ok(_) => Ok(()),
        Err(err) if err.is_not_found() => Ok(()),
        Err(err) => Err(err),
    }
}
