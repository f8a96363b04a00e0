//! How a credential is laid out as string fields, for both stores: a sealed file record's
//! plaintext and an OpenBao KV document hold `username` and `password` (docker, acr) or
//! `json_key` (gar), beside their own metadata fields.
//!
//! Encoding borrows the material and writes it into a zeroized buffer reserved large enough
//! that it never reallocates; decoding takes the material out of zeroize-on-drop fields
//! straight into [`SecretString`].

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{Credential, SecretError, SecretKind};

/// A credential's fields as written (borrowed), flattened into a store's document.
#[derive(Serialize)]
pub(crate) struct FieldsOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    json_key: Option<&'a str>,
}

impl<'a> FieldsOut<'a> {
    pub(crate) fn new(credential: &'a Credential) -> Self {
        match credential {
            Credential::UsernamePassword { username, password } => Self {
                username: Some(username),
                password: Some(password.expose_secret()),
                json_key: None,
            },
            Credential::JsonKey(json_key) => Self {
                username: None,
                password: None,
                json_key: Some(json_key.expose_secret()),
            },
        }
    }

    fn len(&self) -> usize {
        [self.username, self.password, self.json_key]
            .iter()
            .flatten()
            .map(|value| value.len())
            .sum()
    }
}

/// `document` as JSON in a zeroized buffer. `fields` is the credential it holds and
/// `other_text` the length of its other free-text fields: JSON escaping grows a string at most
/// six-fold (`\u00XX`), so reserving that up front means the buffer never reallocates and no
/// unzeroized copy of the material is left behind.
pub(crate) fn encode<T: Serialize>(
    document: &T,
    fields: &FieldsOut<'_>,
    other_text: usize,
) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let capacity = 6 * (fields.len() + other_text) + 256;
    let mut buffer = Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer(&mut *buffer, document).map_err(|_| SecretError::Invalid {
        field: "credential",
        reason: "cannot be encoded",
    })?;
    Ok(buffer)
}

/// A credential's fields as read, taken out of a store's document. Zeroized on drop.
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
pub(crate) struct FieldsIn {
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) json_key: Option<String>,
}

/// How strictly [`FieldsIn::into_credential`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading {
    /// berth's own sealed records: exactly the kind's fields.
    Exact,
    /// Documents a control plane or `bao kv put` may have written: the kind's fields, others
    /// ignored, and one trailing newline dropped from a username or password (as
    /// `berth secret ... --password-stdin` does).
    Lenient,
}

impl FieldsIn {
    /// The credential of a `kind` secret; the reason names a field, never its content.
    pub(crate) fn into_credential(
        mut self,
        kind: SecretKind,
        reading: Reading,
    ) -> Result<Credential, &'static str> {
        let exact = reading == Reading::Exact;
        match kind {
            SecretKind::Docker | SecretKind::Acr => {
                if exact && self.json_key.is_some() {
                    return Err("docker and acr secrets hold no json_key");
                }
                match (self.username.take(), self.password.take()) {
                    (Some(mut username), Some(mut password)) => {
                        if !exact {
                            strip_one_newline(&mut username);
                            strip_one_newline(&mut password);
                        }
                        Ok(Credential::UsernamePassword {
                            username,
                            password: SecretString::from(password),
                        })
                    }
                    (mut username, mut password) => {
                        username.zeroize();
                        password.zeroize();
                        Err("docker and acr secrets need fields username and password")
                    }
                }
            }
            SecretKind::Gar => {
                if exact && (self.username.is_some() || self.password.is_some()) {
                    return Err("gar secrets hold no username or password");
                }
                match self.json_key.take() {
                    Some(json_key) => Ok(Credential::JsonKey(SecretString::from(json_key))),
                    None => Err("gar secrets need field json_key"),
                }
            }
        }
    }
}

/// Drops one trailing `\n` (or `\r\n`); truncating keeps the buffer, so nothing is copied.
fn strip_one_newline(value: &mut String) {
    if value.ends_with("\r\n") {
        value.truncate(value.len() - 2);
    } else if value.ends_with('\n') {
        value.truncate(value.len() - 1);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every kind of secret.
    pub(crate) const KINDS: [SecretKind; 3] =
        [SecretKind::Docker, SecretKind::Acr, SecretKind::Gar];

    /// A valid credential of `kind` whose material needs JSON escaping.
    pub(crate) fn credential(kind: SecretKind) -> Credential {
        match kind {
            SecretKind::Docker | SecretKind::Acr => Credential::UsernamePassword {
                username: "robot$ci \"quoted\"".into(),
                password: SecretString::from("zz\u{1}pass\\word\u{e9}zz"),
            },
            SecretKind::Gar => {
                Credential::JsonKey(SecretString::from(crate::gar_key::tests::key_json(
                    crate::gar_key::tests::TEST_RSA_PEM,
                    "https://oauth2.googleapis.com/token",
                )))
            }
        }
    }

    /// Whether two credentials are of one type with the same material.
    pub(crate) fn same(left: &Credential, right: &Credential) -> bool {
        match (left, right) {
            (
                Credential::UsernamePassword { username, password },
                Credential::UsernamePassword {
                    username: other_username,
                    password: other_password,
                },
            ) => {
                username == other_username
                    && password.expose_secret() == other_password.expose_secret()
            }
            (Credential::JsonKey(key), Credential::JsonKey(other)) => {
                key.expose_secret() == other.expose_secret()
            }
            _ => false,
        }
    }

    #[test]
    fn every_kind_round_trips_in_both_readings() {
        for kind in KINDS {
            let written = credential(kind);
            let fields = FieldsOut::new(&written);
            let json = encode(&fields, &fields, 0).unwrap();
            for reading in [Reading::Exact, Reading::Lenient] {
                let read: FieldsIn = serde_json::from_slice(&json).unwrap();
                let read = read.into_credential(kind, reading).unwrap();
                assert!(same(&written, &read), "{kind} {reading:?}");
            }
        }
    }

    #[test]
    fn the_encoding_never_reallocates() {
        // Every byte escaped six-fold: the reserved capacity still holds it.
        let credential = Credential::UsernamePassword {
            username: "\u{1}".repeat(100),
            password: SecretString::from("\u{1}".repeat(1000)),
        };
        let fields = FieldsOut::new(&credential);
        let json = encode(&fields, &fields, 0).unwrap();
        assert!(json.len() > 6 * 1100);
        assert!(json.capacity() <= 6 * 1100 + 256);
    }

    #[test]
    fn exact_reading_refuses_fields_of_another_kind() {
        let both = || FieldsIn {
            username: Some("u".into()),
            password: Some("p".into()),
            json_key: Some("{}".into()),
        };
        for kind in KINDS {
            assert!(
                both().into_credential(kind, Reading::Exact).is_err(),
                "{kind}"
            );
            assert!(
                both().into_credential(kind, Reading::Lenient).is_ok(),
                "{kind}"
            );
        }
        let missing = FieldsIn {
            username: Some("u".into()),
            password: None,
            json_key: None,
        };
        let reason = missing
            .into_credential(SecretKind::Docker, Reading::Lenient)
            .unwrap_err();
        assert_eq!(
            reason,
            "docker and acr secrets need fields username and password"
        );
    }

    #[test]
    fn lenient_reading_drops_one_trailing_newline() {
        let read = FieldsIn {
            username: Some("u\n".into()),
            password: Some("p\r\n\n".into()),
            json_key: None,
        }
        .into_credential(SecretKind::Docker, Reading::Lenient)
        .unwrap();
        let Credential::UsernamePassword { username, password } = read else {
            panic!("docker reads as username and password");
        };
        assert_eq!(username, "u");
        assert_eq!(password.expose_secret(), "p\r\n");
    }
}
