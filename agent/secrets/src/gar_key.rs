//! Google service-account JSON keys: checked when a `gar` secret is created, read when one is used.

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

/// The parts of a service-account key berth uses. `Debug` leaves the private key out.
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: String,
    pub private_key: SecretString,
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("private_key", &"<redacted>")
            .field("token_uri", &self.token_uri)
            .finish()
    }
}

/// Why a key is refused; names the field, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("json_key: {reason}")]
pub struct KeyError {
    pub reason: &'static str,
}

#[derive(Deserialize)]
struct RawKey {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<SecretString>,
    token_uri: Option<String>,
}

/// Parses and checks a key: a `service_account` with client_email, private_key (an RSA key in
/// PEM that parses), private_key_id and an https (or loopback http) token_uri.
pub fn parse(json: &SecretString) -> Result<ServiceAccountKey, KeyError> {
    let raw: RawKey = serde_json::from_str(json.expose_secret()).map_err(|_| KeyError {
        reason: "not a JSON object",
    })?;
    if raw.kind.as_deref() != Some("service_account") {
        return Err(KeyError {
            reason: "type must be \"service_account\"",
        });
    }
    let client_email = raw
        .client_email
        .filter(|email| email.contains('@'))
        .ok_or(KeyError {
            reason: "client_email is missing or not an email address",
        })?;
    let private_key_id = raw
        .private_key_id
        .filter(|id| !id.is_empty())
        .ok_or(KeyError {
            reason: "private_key_id is missing",
        })?;
    let private_key = raw.private_key.ok_or(KeyError {
        reason: "private_key is missing",
    })?;
    jsonwebtoken::EncodingKey::from_rsa_pem(private_key.expose_secret().as_bytes()).map_err(
        |_| KeyError {
            reason: "private_key is not an RSA private key in PEM",
        },
    )?;
    let token_uri = raw.token_uri.ok_or(KeyError {
        reason: "token_uri is missing",
    })?;
    let uri = reqwest::Url::parse(&token_uri).map_err(|_| KeyError {
        reason: "token_uri is not a URL",
    })?;
    let loopback = uri.host_str().is_some_and(|host| {
        host == "localhost"
            || host
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    if !(uri.scheme() == "https" || (uri.scheme() == "http" && loopback))
        || !uri.username().is_empty()
    {
        return Err(KeyError {
            reason: "token_uri must be an https URL without user info",
        });
    }
    Ok(ServiceAccountKey {
        client_email,
        private_key_id,
        private_key,
        token_uri,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A throwaway 2048-bit RSA key, made for these tests only.
    pub const TEST_RSA_PEM: &str = include_str!("testdata/rsa2048.pem");

    pub fn key_json(private_key: &str, token_uri: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "kid-1",
            "private_key": private_key,
            "client_email": "puller@p.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": token_uri,
        })
        .to_string()
    }

    #[test]
    fn accepts_a_service_account_key() {
        let key = parse(&SecretString::from(key_json(
            TEST_RSA_PEM,
            "https://oauth2.googleapis.com/token",
        )))
        .unwrap();
        assert_eq!(key.client_email, "puller@p.iam.gserviceaccount.com");
        assert_eq!(key.private_key_id, "kid-1");
        assert!(!format!("{key:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn names_the_field_that_is_wrong_and_never_echoes_the_key() {
        let cases = [
            ("not json".to_owned(), "JSON"),
            (
                key_json(
                    "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
                    "https://t",
                ),
                "private_key",
            ),
            (key_json(TEST_RSA_PEM, "ftp://t"), "token_uri"),
            (key_json(TEST_RSA_PEM, "http://evil.example/t"), "token_uri"),
            (
                serde_json::json!({"type": "service_account", "private_key": TEST_RSA_PEM})
                    .to_string(),
                "client_email",
            ),
            (
                serde_json::json!({"type": "authorized_user"}).to_string(),
                "type",
            ),
        ];
        for (json, field) in cases {
            let err = parse(&SecretString::from(json)).unwrap_err();
            assert!(err.to_string().contains(field), "{err} should name {field}");
            assert!(!err.to_string().contains("BEGIN"), "{err}");
        }
    }
}
