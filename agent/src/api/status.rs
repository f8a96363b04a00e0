//! The one translation from domain errors to gRPC status codes. Exhaustive, no `_` arms:
//! a new error variant must be placed here deliberately.

use tonic::{Code, Status};
use tracing::{error, info, warn};

use crate::run::code::run_code;
use crate::run::RunError;
use berth_core::order::OrderError;
use berth_secrets::SecretError;

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

/// A secret store's failure, answered as an order's would be.
pub(crate) fn secret_status(err: SecretError) -> Status {
    RunError::Secret(err).into()
}

/// An invalid order, answered as the runner's own refusals are.
pub(crate) fn order_status(err: OrderError) -> Status {
    RunError::Order(err).into()
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
    use berth_registry::pull::PullError;

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
    use berth_registry::pull::verify::Mismatch;
    use berth_unpack::digest::Sha256Digest;
    use berth_unpack::error::ApplyError;

    fn digest(hex_digit: char) -> Sha256Digest {
        Sha256Digest::parse(&format!("sha256:{}", hex_digit.to_string().repeat(64))).unwrap()
    }

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
            (
                PullError::Layer {
                    image: "r/a:b".into(),
                    digest: "sha256:x".into(),
                    source: ApplyError::DiffId {
                        expected: digest('a'),
                        actual: digest('b'),
                    },
                }
                .into(),
                Code::DataLoss,
            ),
            (
                PullError::Layer {
                    image: "r/a:b".into(),
                    digest: "sha256:x".into(),
                    source: ApplyError::PathEscape {
                        path: "../../etc/passwd".into(),
                    },
                }
                .into(),
                Code::InvalidArgument,
            ),
            (
                PullError::Containerd {
                    image: "r/a:b".into(),
                    source: berth_runtime::containerd::ContainerdError::DiffIdMismatch {
                        layer: "sha256:x".into(),
                        expected: "sha256:a".into(),
                        actual: "sha256:b".into(),
                    },
                }
                .into(),
                Code::DataLoss,
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

    #[test]
    fn openbao_errors_map_to_grpc_codes() {
        let address = "https://bao.example:8200".to_owned();
        let cases = [
            (
                SecretError::Unavailable {
                    address: address.clone(),
                    reason: "it is sealed",
                    source: None,
                },
                Code::Unavailable,
            ),
            (
                SecretError::Denied {
                    address: address.clone(),
                    path: "secret/data/berth/b/secret-x".to_owned(),
                },
                Code::PermissionDenied,
            ),
            (
                SecretError::Login {
                    address: address.clone(),
                    reason: "the approle role_id or secret_id is not valid",
                },
                Code::FailedPrecondition,
            ),
            (
                SecretError::Malformed {
                    id: "secret-x".to_owned(),
                    reason: "field kind is missing",
                },
                Code::FailedPrecondition,
            ),
            (
                SecretError::Backend {
                    address: address.clone(),
                    path: "p".to_owned(),
                    reason: "r",
                },
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let status = secret_status(err);
            assert_eq!(status.code(), code, "{status:?}");
            if code != Code::Internal {
                assert!(status.message().contains("openbao"), "{status:?}");
            }
        }
    }
}
