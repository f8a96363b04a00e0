//! Registry authentication for one pull, from a stored credential.
//!
//! The distribution client follows the registry's challenge: Basic registries get the
//! credential on each request, Bearer registries get it at their token realm only.

use oci_client::secrets::RegistryAuth;
use secrecy::ExposeSecret as _;
use tracing::instrument;

use crate::secret::{Credential, SecretKind, StoredSecret};

/// A credential that cannot be used (yet) for a pull.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("secret {secret} is for {server}, not for registry {registry}")]
    WrongServer {
        secret: String,
        server: String,
        registry: String,
    },
    #[error("secret {secret} of kind {kind} cannot be used for pulls by this agent yet")]
    Unsupported { secret: String, kind: &'static str },
}

/// The registry authentication for pulling from `registry` with `secret`.
#[instrument(skip_all, fields(secret = %secret.meta.id, registry = %registry))]
pub(crate) fn registry_auth(
    secret: &StoredSecret,
    registry: &str,
) -> Result<RegistryAuth, AuthError> {
    if secret.meta.server != registry {
        return Err(AuthError::WrongServer {
            secret: secret.meta.id.to_string(),
            server: secret.meta.server.clone(),
            registry: registry.to_owned(),
        });
    }
    match (&secret.meta.kind, &secret.credential) {
        (
            SecretKind::Docker | SecretKind::Acr,
            Credential::UsernamePassword { username, password },
        ) => Ok(RegistryAuth::Basic(
            username.clone(),
            password.expose_secret().to_owned(),
        )),
        (kind, _) => Err(AuthError::Unsupported {
            secret: secret.meta.id.to_string(),
            kind: kind.as_str(),
        }),
    }
}
