//! An order's pull secret as the puller carries it. Only `auth` looks inside: the puller asks
//! it what each endpoint may be sent, and never sees a username, a password or a key.

use super::{WireAuth, REFRESH_TOKEN_USERNAME};
use berth_secrets::{Credential, SecretKind, StoredSecret};

/// The order's secret, if it has one, sealed for the puller.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderCredential<'a>(Option<&'a StoredSecret>);

impl<'a> OrderCredential<'a> {
    /// Wraps the secret an order is pulled with (None: anonymous).
    pub fn new(secret: Option<&'a StoredSecret>) -> Self {
        Self(secret)
    }

    /// Whether the order has a secret (the image is then recorded private).
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// The secret's id, for messages and the audit log (never material).
    pub fn secret_id(&self) -> Option<String> {
        self.0.map(|secret| secret.meta.id.to_string())
    }

    /// Whether the secret (if any) was made for `registry`: a secret for another server never
    /// reaches a mirror; the upstream path refuses it.
    pub fn fits(&self, registry: &str) -> bool {
        self.0.is_none_or(|secret| secret.meta.server == registry)
    }

    /// What a mirror is sent, and the id of the secret that goes with it: anonymous unless the
    /// mirror's entry says `credentials = true` and the secret holds a username and password
    /// (Docker, ACR service principal; not refresh tokens, not GAR keys).
    pub fn for_mirror(&self, credentials: bool) -> (WireAuth, Option<String>) {
        if !credentials {
            return (WireAuth::anonymous(), None);
        }
        match self.0.map(|secret| (secret.meta.kind, &secret.credential)) {
            Some((
                SecretKind::Docker | SecretKind::Acr,
                Credential::UsernamePassword { username, password },
            )) if username != REFRESH_TOKEN_USERNAME => {
                (WireAuth::basic(username, password), self.secret_id())
            }
            Some(_) | None => (WireAuth::anonymous(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;
    use crate::auth::wire::Wire;
    use berth_secrets::{SecretId, SecretMeta};

    fn secret(kind: SecretKind, username: &str) -> StoredSecret {
        StoredSecret {
            meta: SecretMeta {
                id: SecretId::parse("secret-abc").unwrap(),
                project: "default".into(),
                name: "n".into(),
                kind,
                server: "r.example".into(),
                created_at: std::time::SystemTime::UNIX_EPOCH,
            },
            credential: Credential::UsernamePassword {
                username: username.to_owned(),
                password: "zzpasszz".into(),
            },
        }
    }

    #[test]
    fn mirrors_get_a_username_and_password_or_nothing() {
        let docker = secret(SecretKind::Docker, "u");
        assert!(matches!(
            OrderCredential::new(Some(&docker)).for_mirror(true),
            (WireAuth(Wire::Basic { username, password }), Some(id))
                if username == "u" && password.expose_secret() == "zzpasszz" && id == "secret-abc"
        ));
        assert!(matches!(
            OrderCredential::new(Some(&docker)).for_mirror(false),
            (WireAuth(Wire::Anonymous), None)
        ));
        let refresh = secret(SecretKind::Acr, REFRESH_TOKEN_USERNAME);
        assert!(matches!(
            OrderCredential::new(Some(&refresh)).for_mirror(true),
            (WireAuth(Wire::Anonymous), None)
        ));
        assert!(matches!(
            OrderCredential::new(None).for_mirror(true),
            (WireAuth(Wire::Anonymous), None)
        ));
    }

    #[test]
    fn a_secret_fits_its_own_server_only() {
        let docker = secret(SecretKind::Docker, "u");
        assert!(OrderCredential::new(Some(&docker)).fits("r.example"));
        assert!(!OrderCredential::new(Some(&docker)).fits("other.example"));
        assert!(OrderCredential::new(None).fits("other.example"));
        assert!(!format!("{:?}", OrderCredential::new(Some(&docker))).contains("zzpasszz"));
    }
}
