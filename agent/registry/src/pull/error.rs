//! What a pull can fail with, and how each failure is counted and retried.

use std::time::Duration;

use super::verify::Mismatch;
use super::{cosign, manifest};
use crate::auth::AuthError;
use berth_runtime::containerd::ContainerdError;
use berth_unpack::error::{ApplyError, ApplyErrorKind};

/// A failed pull. Messages name the image, registry, repository and secret id, never material.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(
        "registry {registry} refused access to repository {repository}{}",
        secret_suffix(secret)
    )]
    Denied {
        registry: String,
        repository: String,
        secret: Option<String>,
    },
    #[error("image {image} not found")]
    NotFound { image: String },
    #[error("image {image} has no manifest for {os}/{arch}")]
    NoPlatform {
        image: String,
        os: &'static str,
        arch: &'static str,
    },
    #[error("image {image} failed verification")]
    Mismatch {
        image: String,
        #[source]
        source: Mismatch,
    },
    #[error("image {image}: {reason}")]
    Unsupported {
        image: String,
        #[source]
        reason: manifest::ManifestError,
    },
    #[error("registry {registry} asked berth to come back in {} s", retry_after.as_secs())]
    Throttled {
        registry: String,
        retry_after: Duration,
    },
    #[error("a download from registry {registry} received nothing for {} s", stalled_for.as_secs())]
    Stalled {
        registry: String,
        stalled_for: Duration,
    },
    #[error("registry {registry} is not reachable")]
    Unreachable {
        registry: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("registry {registry} failed a request for repository {repository}")]
    Registry {
        registry: String,
        repository: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Auth(AuthError),
    #[error("setting up the registry client")]
    Client {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("image {image}: the config is not a valid image config")]
    Config {
        image: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("pulling {image} took longer than the pull deadline")]
    Deadline { image: String },
    #[error("image {image}: signature check refused {digest} under policy {policy}: {fault}")]
    Signature {
        image: String,
        digest: String,
        policy: String,
        fault: cosign::SignatureFault,
    },
    #[error(
        "image {image}: signature check of {digest} under policy {policy} failed: fetching {what} failed"
    )]
    SignatureFetch {
        image: String,
        digest: String,
        policy: String,
        what: String,
        #[source]
        source: Box<PullError>,
    },
    #[error("image {image}: applying layer {digest}")]
    Layer {
        image: String,
        digest: String,
        #[source]
        source: ApplyError,
    },
    #[error("writing image {image} into containerd")]
    Containerd {
        image: String,
        #[source]
        source: ContainerdError,
    },
}

impl PullError {
    /// The `result` label of `berth_pulls_total`.
    /// A signature policy refused the image or its signature could not be fetched.
    pub fn is_signature(&self) -> bool {
        matches!(
            self,
            PullError::Signature { .. } | PullError::SignatureFetch { .. }
        )
    }

    pub fn result_label(&self) -> &'static str {
        match self {
            PullError::Denied { .. } => "denied",
            PullError::NotFound { .. } | PullError::NoPlatform { .. } => "not_found",
            PullError::Mismatch { .. } => "data_loss",
            PullError::Layer { source, .. } => match source.kind() {
                ApplyErrorKind::DataLoss => "data_loss",
                ApplyErrorKind::InvalidLayer | ApplyErrorKind::LimitExceeded => "unsupported",
                ApplyErrorKind::Io => "error",
            },
            PullError::Unreachable { .. }
            | PullError::Throttled { .. }
            | PullError::Stalled { .. } => "unavailable",
            PullError::Deadline { .. } => "deadline",
            PullError::Unsupported { .. } | PullError::Config { .. } => "unsupported",
            PullError::Signature { .. } | PullError::SignatureFetch { .. } => "signature",
            PullError::Auth(err) if err.is_transient() => "unavailable",
            PullError::Auth(AuthError::Rejected { .. } | AuthError::Realm { .. }) => "denied",
            PullError::Auth(_)
            | PullError::Registry { .. }
            | PullError::Client { .. }
            | PullError::Containerd { .. } => "error",
        }
    }

    /// How long the registry asked berth to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PullError::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Worth another attempt: the registry was unreachable, overloaded or failing (5xx, 429).
    pub fn is_retryable(&self) -> bool {
        match self {
            PullError::Unreachable { .. }
            | PullError::Throttled { .. }
            | PullError::Stalled { .. } => true,
            PullError::Auth(err) => err.is_transient(),
            _ => false,
        }
    }
}

/// Runs `op` up to `attempts` times while the registry is unreachable, overloaded or failing.
pub(super) async fn retry<T, F, Fut>(attempts: u32, op: F) -> Result<T, PullError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PullError>>,
{
    berth_core::retry::retry_hinted(
        attempts,
        PullError::is_retryable,
        PullError::retry_after,
        op,
    )
    .await
}

fn secret_suffix(secret: &Option<String>) -> String {
    match secret {
        Some(id) => format!(" with secret {id}"),
        None => " without a credential".to_owned(),
    }
}
