//! The one translation from domain errors to gRPC status codes. Exhaustive, no `_` arms:
//! a new error variant must be placed here deliberately.

use tonic::{Code, Status};
use tracing::{error, info, warn};

use crate::auth::AuthError;
use crate::containerd::ContainerdError;
use crate::order::OrderError;
use crate::pull::PullError;
use crate::run::RunError;
use crate::secret::SecretError;

/// Refusals the API layer decides itself: who is calling, and what a request lacks before any
/// stage sees it. Mapped here with everything else.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("a client certificate is required")]
    NoClientCertificate,
    #[error("the client certificate does not parse")]
    UnreadableClientCertificate,
    #[error("this client may not act for project {project}")]
    ProjectDenied { project: String },
    #[error("pruning images needs access to every project")]
    PruneNeedsEveryProject,
    #[error("{field} is required")]
    Missing { field: &'static str },
    /// The task running an order (or an explain) ended without an answer: it panicked or was
    /// cancelled at shutdown.
    #[error("{what} task failed")]
    TaskFailed {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::NoClientCertificate | ApiError::UnreadableClientCertificate => {
                Status::unauthenticated(err.to_string())
            }
            ApiError::ProjectDenied { .. } | ApiError::PruneNeedsEveryProject => {
                info!(error = %err, "request refused");
                Status::permission_denied(err.to_string())
            }
            ApiError::Missing { .. } => Status::invalid_argument(err.to_string()),
            ApiError::TaskFailed { .. } => {
                error!(error = %chain(&err), "internal error");
                Status::internal("internal error; see the berthd log")
            }
        }
    }
}

impl From<RunError> for Status {
    fn from(err: RunError) -> Self {
        let code = run_code(&err);
        // Logged once, here, where the error is handled: with its sources (which, like the
        // message, never carry credential material).
        match code {
            Code::Internal => {
                error!(error = %chain(&err), "internal error");
                return Status::internal("internal error; see the berthd log");
            }
            Code::Unavailable | Code::DataLoss | Code::DeadlineExceeded => {
                warn!(code = ?code, error = %chain(&err), "request failed");
            }
            _ => info!(code = ?code, error = %chain(&err), "request refused"),
        }
        Status::new(code, err.to_string())
    }
}

impl From<SecretError> for Status {
    fn from(err: SecretError) -> Self {
        RunError::Secret(err).into()
    }
}

impl From<OrderError> for Status {
    fn from(err: OrderError) -> Self {
        RunError::Order(err).into()
    }
}

/// The code `err` is answered with (also the `result` of its audit line).
pub(crate) fn run_code(err: &RunError) -> Code {
    match err {
        RunError::Order(err) => order_code(err),
        RunError::Secret(err) => secret_code(err),
        RunError::Auth(err) => auth_code(err),
        RunError::Pull(err) => pull_code(err),
        RunError::Spec { .. } => Code::InvalidArgument,
        RunError::OrderConflict { .. } | RunError::NameTaken { .. } => Code::AlreadyExists,
        RunError::ContainerNotFound { .. } => Code::NotFound,
        RunError::StillRunning { .. } | RunError::ImageAbsent { .. } | RunError::Start { .. } => {
            Code::FailedPrecondition
        }
        RunError::Containerd { source, .. } | RunError::Prune { source, .. } => {
            containerd_code(source)
        }
        RunError::Cancelled { .. } => Code::Cancelled,
        // A plugin that failed, timed out or answered nonsense: it may answer later.
        RunError::Provider(_) => Code::Unavailable,
        RunError::Log { .. } | RunError::DiskUse { .. } => Code::Internal,
    }
}

fn order_code(err: &OrderError) -> Code {
    match err {
        OrderError::Missing { .. } | OrderError::Invalid { .. } | OrderError::Reference { .. } => {
            Code::InvalidArgument
        }
    }
}

fn secret_code(err: &SecretError) -> Code {
    match err {
        SecretError::NotFound { .. } => Code::NotFound,
        SecretError::NameTaken { .. } => Code::AlreadyExists,
        SecretError::Invalid { .. } => Code::InvalidArgument,
        SecretError::Io { .. } | SecretError::Corrupt { .. } | SecretError::Key { .. } => {
            Code::Internal
        }
        // OpenBao down, sealed or failing: transient, the caller may retry.
        SecretError::Unavailable { .. } => Code::Unavailable,
        // The agent's own OpenBao policy forbids the path (e.g. another project's secrets).
        SecretError::Denied { .. } => Code::PermissionDenied,
        // The agent's OpenBao login or the secret's layout needs an operator; retrying won't help.
        SecretError::Login { .. }
        | SecretError::CredentialFile { .. }
        | SecretError::Malformed { .. } => Code::FailedPrecondition,
        SecretError::Backend { .. } => Code::Internal,
    }
}

fn auth_code(err: &AuthError) -> Code {
    match err {
        AuthError::WrongServer { .. } | AuthError::Key { .. } => Code::InvalidArgument,
        AuthError::Rejected { .. } | AuthError::Realm { .. } => Code::PermissionDenied,
        AuthError::Unreachable { .. }
        | AuthError::RegistryUnreachable { .. }
        | AuthError::TokenEndpointDown { .. } => Code::Unavailable,
        AuthError::TokenResponse { .. }
        | AuthError::Challenge { .. }
        | AuthError::KeyUnusable { .. } => Code::FailedPrecondition,
        AuthError::Client(_) => Code::Internal,
    }
}

fn pull_code(err: &PullError) -> Code {
    match err {
        PullError::Denied { .. } => Code::PermissionDenied,
        PullError::NotFound { .. } | PullError::NoPlatform { .. } => Code::NotFound,
        PullError::Mismatch { .. } => Code::DataLoss,
        PullError::Unsupported { .. } | PullError::Config { .. } => Code::FailedPrecondition,
        PullError::Unreachable { .. } | PullError::Throttled { .. } | PullError::Stalled { .. } => {
            Code::Unavailable
        }
        // A signature policy refusal, or a signature fetch that failed for good.
        PullError::Signature { .. } | PullError::SignatureFetch { .. } => Code::FailedPrecondition,
        PullError::Deadline { .. } => Code::DeadlineExceeded,
        PullError::Registry { .. } | PullError::Client { .. } => Code::Internal,
        PullError::Containerd { source, .. } => containerd_code(source),
        PullError::Auth(err) => auth_code(err),
    }
}

fn containerd_code(err: &ContainerdError) -> Code {
    if err.is_unavailable() {
        Code::Unavailable
    } else {
        Code::Internal
    }
}

/// The error and its sources, for the log (sources never carry credential material).
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_refusals_get_their_codes_and_an_internal_one_says_nothing_more() {
        let cases = [
            (ApiError::NoClientCertificate, Code::Unauthenticated),
            (ApiError::UnreadableClientCertificate, Code::Unauthenticated),
            (
                ApiError::ProjectDenied {
                    project: "team-b".into(),
                },
                Code::PermissionDenied,
            ),
            (ApiError::PruneNeedsEveryProject, Code::PermissionDenied),
            (ApiError::Missing { field: "id" }, Code::InvalidArgument),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }

    #[tokio::test]
    async fn a_failed_order_task_is_internal_with_a_generic_message() {
        let panicked = tokio::spawn(async { panic!("order task blew up") })
            .await
            .unwrap_err();
        let status = Status::from(ApiError::TaskFailed {
            what: "order",
            source: panicked,
        });
        assert_eq!(status.code(), Code::Internal);
        assert!(
            !status.message().contains("blew up"),
            "{}",
            status.message()
        );
    }
    use crate::pull::verify::Mismatch;

    #[test]
    fn contract_codes() {
        let cases: Vec<(RunError, Code)> = vec![
            (
                OrderError::Missing { field: "name" }.into(),
                Code::InvalidArgument,
            ),
            (
                SecretError::NotFound {
                    id: "secret-x".into(),
                }
                .into(),
                Code::NotFound,
            ),
            (
                PullError::Denied {
                    registry: "r".into(),
                    repository: "a/b".into(),
                    secret: Some("secret-x".into()),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (
                PullError::NotFound {
                    image: "r/a:b".into(),
                }
                .into(),
                Code::NotFound,
            ),
            (
                PullError::Mismatch {
                    image: "r/a:b".into(),
                    source: Mismatch::TooLong {
                        digest: "sha256:x".into(),
                        expected: 1,
                    },
                }
                .into(),
                Code::DataLoss,
            ),
            (
                PullError::Unreachable {
                    registry: "r".into(),
                    source: "down".into(),
                }
                .into(),
                Code::Unavailable,
            ),
            (
                PullError::Deadline { image: "x".into() }.into(),
                Code::DeadlineExceeded,
            ),
            (
                PullError::Stalled {
                    registry: "r".into(),
                    stalled_for: std::time::Duration::from_secs(60),
                }
                .into(),
                Code::Unavailable,
            ),
            (RunError::Cancelled { image: "x".into() }, Code::Cancelled),
            (
                RunError::NameTaken {
                    project: "p".into(),
                    name: "n".into(),
                },
                Code::AlreadyExists,
            ),
            (
                RunError::OrderConflict {
                    order_id: "o".into(),
                },
                Code::AlreadyExists,
            ),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status: Status = err.into();
            assert_eq!(status.code(), code, "{text}");
        }
    }

    #[test]
    fn denied_names_registry_repository_and_secret() {
        let status: Status = RunError::from(PullError::Denied {
            registry: "reg.example:5000".into(),
            repository: "team/app".into(),
            secret: Some("secret-abc".into()),
        })
        .into();
        for needle in ["reg.example:5000", "team/app", "secret-abc"] {
            assert!(status.message().contains(needle), "{}", status.message());
        }
    }

    #[test]
    fn internal_errors_hide_their_details() {
        let status: Status = RunError::Log {
            path: "/secret/path".into(),
            source: std::io::Error::other("boom"),
        }
        .into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("/secret/path"));
    }
}
