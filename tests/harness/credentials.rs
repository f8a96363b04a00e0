//! Registry users with long, unique passwords, so that a leak scan that finds nothing means something.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::random_lowercase;

/// A registry user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryUser {
    pub username: String,
    pub password: String,
}

impl RegistryUser {
    /// `username` with a fresh password `pw-<24 random chars>`.
    pub fn generate(username: &str) -> Self {
        Self {
            username: username.to_owned(),
            password: format!("pw-{}", random_lowercase(24)),
        }
    }

    /// The same user name with another fresh password: a credential the registry refuses.
    pub fn with_wrong_password(&self) -> Self {
        Self::generate(&self.username)
    }

    /// `base64(user:pass)`, as sent in `Authorization: Basic`.
    pub fn basic_auth_base64(&self) -> String {
        STANDARD.encode(format!("{}:{}", self.username, self.password))
    }

    /// Every form in which this credential must never appear outside berthd's encrypted store.
    pub fn leak_needles(&self) -> Vec<String> {
        vec![self.password.clone(), self.basic_auth_base64()]
    }
}

impl std::fmt::Debug for RegistryUser {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RegistryUser")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}
