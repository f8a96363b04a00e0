//! The gRPC code of each error a run can end with: the API answers with it (`api/status.rs`
//! builds the `Status`), and the audit log records its name as the `result`.

use tonic::Code;

use super::RunError;
use berth_core::order::OrderError;
use berth_registry::auth::AuthError;
use berth_registry::pull::PullError;
use berth_runtime::containerd::ContainerdError;
use berth_secrets::SecretError;
use berth_unpack::error::ApplyErrorKind;

/// The canonical name of the code `err` is answered with: an audit line's `result`.
pub(crate) fn audit_result(err: &RunError) -> &'static str {
    crate::code_name::code_name(run_code(err))
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
        PullError::Layer { source, .. } => match source.kind() {
            ApplyErrorKind::DataLoss => Code::DataLoss,
            // A hostile or malformed layer, or one past the applier's limits.
            ApplyErrorKind::InvalidLayer | ApplyErrorKind::LimitExceeded => Code::InvalidArgument,
            ApplyErrorKind::Io => Code::Internal,
        },
        PullError::Auth(err) => auth_code(err),
    }
}

fn containerd_code(err: &ContainerdError) -> Code {
    if matches!(err, ContainerdError::DiffIdMismatch { .. }) {
        // containerd's applier found the layer is not the one the config names.
        Code::DataLoss
    } else if err.is_unavailable() {
        Code::Unavailable
    } else {
        Code::Internal
    }
}
