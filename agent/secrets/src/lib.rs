//! The pull-secret store: registry credentials kept per project, looked up by id.
//!
//! A secret is created once (through the `Secrets` API), then referenced by id from start and pull
//! orders of the same project. An id from another project is reported exactly like an unknown id,
//! so ids cannot be probed across projects. Material comes back only as [`secrecy::SecretString`]
//! (redacted `Debug`, zeroized on drop); metadata ([`SecretMeta`]) never carries material.
//!
//! Backends, chosen by `[secrets] backend` and dispatched by [`SecretStore`]:
//! [`file::FileStore`] (embedded default: one AES-256-GCM record per secret under the state dir)
//! and [`openbao::OpenbaoStore`] (fleet: OpenBao/Vault KV v2, read on every use, nothing on disk).

mod disk;
mod fields;
pub mod file;
pub mod gar_key;
pub mod openbao;
pub mod provider;
mod record;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::SystemTime;

use rand::Rng;
use secrecy::SecretString;
use tracing::instrument;

use berth_core::order::is_dns_label;

pub use self::file::FileStore;

/// Reduces a registry server to `host[:port]` ([`berth_core::host::normalize_server`]); a
/// refusal is an invalid `server` field.
pub fn normalize_server(input: &str) -> Result<String, SecretError> {
    berth_core::host::normalize_server(input).map_err(|err| SecretError::Invalid {
        field: "server",
        reason: err.0,
    })
}
pub use self::openbao::{Login, OpenbaoSettings, OpenbaoStore};

/// Longest accepted username, password or JSON key, in bytes.
pub const MAX_MATERIAL_BYTES: usize = 64 * 1024;

/// The prefix of every secret id.
const ID_PREFIX: &str = "secret-";

/// Number of random characters in a generated id.
const ID_RANDOM_CHARS: usize = 16;

/// Longest random part accepted by [`SecretId::parse`].
const ID_MAX_RANDOM_CHARS: usize = 64;

/// How a secret authenticates to its registry (see `auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecretKind {
    /// Username and password, exchanged at the registry's token realm.
    Docker,
    /// Azure Container Registry: service principal, or the all-zero GUID with a refresh token.
    Acr,
    /// Google Artifact Registry: a service-account JSON key.
    Gar,
}

impl SecretKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::Docker => "docker",
            SecretKind::Acr => "acr",
            SecretKind::Gar => "gar",
        }
    }
}

impl fmt::Display for SecretKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SecretKind {
    type Err = SecretError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        match input {
            "docker" => Ok(SecretKind::Docker),
            "acr" => Ok(SecretKind::Acr),
            "gar" => Ok(SecretKind::Gar),
            _ => Err(SecretError::Invalid {
                field: "kind",
                reason: "must be docker, acr or gar",
            }),
        }
    }
}

/// A secret id: `secret-` followed by lower-case letters and digits. Ids are not secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretId(String);

impl SecretId {
    /// Validates an id given by a client: `^secret-[a-z0-9]{1,64}$`.
    pub fn parse(input: &str) -> Result<SecretId, SecretError> {
        let valid = input.strip_prefix(ID_PREFIX).is_some_and(|random| {
            (1..=ID_MAX_RANDOM_CHARS).contains(&random.len())
                && random
                    .bytes()
                    .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit())
        });
        if valid {
            Ok(SecretId(input.to_owned()))
        } else {
            Err(SecretError::Invalid {
                field: "id",
                reason: "must be secret- followed by 1 to 64 lower-case letters or digits",
            })
        }
    }

    /// A fresh id with 16 random characters (about 82 bits).
    pub fn generate() -> SecretId {
        const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng();
        let mut id = String::with_capacity(ID_PREFIX.len() + ID_RANDOM_CHARS);
        id.push_str(ID_PREFIX);
        for _ in 0..ID_RANDOM_CHARS {
            id.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
        }
        SecretId(id)
    }

    /// The name a `[[credential_provider]]`'s credential goes by: `provider:<name>`. Never a
    /// valid id for [`SecretId::parse`], so no client can name it as a pull secret.
    pub fn provider(name: &str) -> SecretId {
        SecretId(format!("provider:{name}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What may be shown about a secret: everything but the material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretMeta {
    pub id: SecretId,
    pub project: String,
    pub name: String,
    pub kind: SecretKind,
    /// `host[:port]`, as returned by [`normalize_server`].
    pub server: String,
    /// Whole seconds (the store keeps unix seconds).
    pub created_at: SystemTime,
}

/// The material of a secret. `Debug` prints the username but never the password or key.
#[derive(Clone)]
pub enum Credential {
    /// docker and acr: a username and a password (or an ACR refresh token).
    UsernamePassword {
        username: String,
        password: SecretString,
    },
    /// gar: the service-account key JSON text.
    JsonKey(SecretString),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::UsernamePassword { username, .. } => f
                .debug_struct("UsernamePassword")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credential::JsonKey(_) => f.debug_tuple("JsonKey").field(&"<redacted>").finish(),
        }
    }
}

/// A create request, before validation.
#[derive(Debug)]
pub struct NewSecret {
    pub project: String,
    pub name: String,
    pub kind: SecretKind,
    /// A host, `host:port` or URL; normalised on create.
    pub server: String,
    pub credential: Credential,
}

/// A secret read back from the store.
#[derive(Debug)]
pub struct StoredSecret {
    pub meta: SecretMeta,
    pub credential: Credential,
}

/// Errors of the secret store. No variant carries credential material.
#[derive(thiserror::Error, Debug)]
pub enum SecretError {
    /// Unknown id, or an id that belongs to another project (ids cannot be probed).
    #[error("secret {id} not found")]
    NotFound { id: String },
    #[error("a secret named {name} already exists in this project")]
    NameTaken { name: String },
    /// `reason` is fixed text; it never repeats the input.
    #[error("invalid {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
    #[error("secret store i/o failed on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The record fails to authenticate: wrong key, tampered, or moved to another project or id.
    #[error("secret record {id} failed to authenticate or decode")]
    Corrupt { id: String },
    #[error("key file {path} refused: {reason}")]
    Key { path: PathBuf, reason: &'static str },
    /// OpenBao cannot serve now: unreachable, timed out, sealed, or failing (5xx). Transient.
    #[error("secret store openbao at {address} is unavailable: {reason}")]
    Unavailable {
        address: String,
        reason: &'static str,
        #[source]
        source: Option<reqwest::Error>,
    },
    /// OpenBao refused berth's (valid) token access to `path`: the agent's policy forbids it.
    #[error("openbao at {address} denied berth access to {path}; check the agent's policy")]
    Denied { address: String, path: String },
    /// berth could not log in to OpenBao: the AppRole or token it was given is refused.
    #[error("openbao at {address} refused berth's login: {reason}")]
    Login {
        address: String,
        reason: &'static str,
    },
    /// An OpenBao credential file (token, role id, secret id) that berth will not use.
    #[error("openbao credential file {path} refused: {reason}")]
    CredentialFile { path: PathBuf, reason: &'static str },
    /// OpenBao answered something berth does not understand (wrong mount type, bad JSON).
    #[error("openbao at {address} gave an unexpected answer for {path}: {reason}")]
    Backend {
        address: String,
        path: String,
        reason: &'static str,
    },
    /// A secret in OpenBao (written by a control plane) that does not follow berth's layout.
    #[error("secret {id} in openbao does not follow berth's layout: {reason}")]
    Malformed { id: String, reason: &'static str },
}

/// Where pull secrets live (`[secrets]`), made once at start-up from the daemon's config.
#[derive(Debug, Clone)]
pub enum SecretSettings {
    /// Sealed files under `state_dir`, with the key at `key_file`.
    File {
        state_dir: std::path::PathBuf,
        key_file: std::path::PathBuf,
    },
    /// OpenBao or Vault KV v2.
    Openbao(OpenbaoSettings),
}

/// The configured backend.
#[derive(Debug)]
pub enum SecretStore {
    File(FileStore),
    Openbao(OpenbaoStore),
}

impl SecretStore {
    /// Opens the backend the settings name. Blocking; call once at start, inside the runtime
    /// (the openbao backend spawns its token renewal, which ends when the store drops).
    /// OpenBao being down is no error here: berthd starts and logs in once it answers.
    pub fn open(settings: &SecretSettings) -> Result<SecretStore, SecretError> {
        match settings {
            SecretSettings::File {
                state_dir,
                key_file,
            } => Ok(SecretStore::File(FileStore::open(state_dir, key_file)?)),
            SecretSettings::Openbao(settings) => {
                Ok(SecretStore::Openbao(OpenbaoStore::open(settings)?))
            }
        }
    }

    /// Validates and stores a new secret; returns its metadata with the new id.
    #[instrument(skip_all, fields(project = %new.project, name = %new.name, kind = %new.kind))]
    pub async fn create(&self, new: NewSecret) -> Result<SecretMeta, SecretError> {
        let new = validate_new(new)?;
        match self {
            SecretStore::File(store) => store.create(new).await,
            SecretStore::Openbao(store) => store.create(new).await,
        }
    }

    /// The secret `id` of `project`; an id of another project is [`SecretError::NotFound`].
    #[instrument(skip_all, fields(project = %project, secret_id = %id))]
    pub async fn get(&self, project: &str, id: &SecretId) -> Result<StoredSecret, SecretError> {
        validate_project(project)?;
        match self {
            SecretStore::File(store) => store.get(project, id).await,
            SecretStore::Openbao(store) => store.get(project, id).await,
        }
    }

    /// Metadata of every secret of `project`, sorted by name.
    #[instrument(skip_all, fields(project = %project))]
    pub async fn list(&self, project: &str) -> Result<Vec<SecretMeta>, SecretError> {
        validate_project(project)?;
        let mut metas = match self {
            SecretStore::File(store) => store.list(project).await?,
            SecretStore::Openbao(store) => store.list(project).await?,
        };
        metas.sort_by(|left, right| {
            left.name
                .cmp(&right.name)
                .then_with(|| left.id.cmp(&right.id))
        });
        Ok(metas)
    }

    /// Removes the secret `id` of `project`.
    #[instrument(skip_all, fields(project = %project, secret_id = %id))]
    pub async fn delete(&self, project: &str, id: &SecretId) -> Result<(), SecretError> {
        validate_project(project)?;
        match self {
            SecretStore::File(store) => store.delete(project, id).await,
            SecretStore::Openbao(store) => store.delete(project, id).await,
        }
    }
}

/// Checks a create request and normalises its server.
fn validate_new(new: NewSecret) -> Result<NewSecret, SecretError> {
    validate_project(&new.project)?;
    if !is_secret_name(&new.name) {
        return Err(SecretError::Invalid {
            field: "name",
            reason: "use 1-253 of [a-z0-9.:_-], starting and ending with a letter or digit",
        });
    }
    let server = normalize_server(&new.server)?;
    validate_credential(new.kind, &new.credential)?;
    Ok(NewSecret { server, ..new })
}

fn validate_project(project: &str) -> Result<(), SecretError> {
    if is_dns_label(project) {
        Ok(())
    } else {
        Err(SecretError::Invalid {
            field: "project",
            reason: "must be a DNS label: lower-case letters, digits and '-', at most 63",
        })
    }
}

fn validate_credential(kind: SecretKind, credential: &Credential) -> Result<(), SecretError> {
    use secrecy::ExposeSecret;

    match (kind, credential) {
        (
            SecretKind::Docker | SecretKind::Acr,
            Credential::UsernamePassword { username, password },
        ) => {
            check_material("username", username)?;
            check_material("password", password.expose_secret())
        }
        (SecretKind::Gar, Credential::JsonKey(json_key)) => {
            check_material("json_key", json_key.expose_secret())?;
            gar_key::parse(json_key)
                .map(drop)
                .map_err(|err| SecretError::Invalid {
                    field: "json_key",
                    reason: err.reason,
                })
        }
        (SecretKind::Docker | SecretKind::Acr, Credential::JsonKey(_)) => {
            Err(SecretError::Invalid {
                field: "credential",
                reason: "docker and acr secrets take a username and a password",
            })
        }
        (SecretKind::Gar, Credential::UsernamePassword { .. }) => Err(SecretError::Invalid {
            field: "credential",
            reason: "gar secrets take a json key",
        }),
    }
}

/// Non-empty and at most [`MAX_MATERIAL_BYTES`]; the value itself never goes into the error.
fn check_material(field: &'static str, value: &str) -> Result<(), SecretError> {
    if value.is_empty() {
        Err(SecretError::Invalid {
            field,
            reason: "must not be empty",
        })
    } else if value.len() > MAX_MATERIAL_BYTES {
        Err(SecretError::Invalid {
            field,
            reason: "longer than 64 KiB",
        })
    } else {
        Ok(())
    }
}

/// Secret names are DNS-label-like but may also be a registry host (`docker import` names
/// secrets after their host): `[a-z0-9]([a-z0-9.:_-]{0,251}[a-z0-9])?`.
pub fn is_secret_name(input: &str) -> bool {
    let bytes = input.as_bytes();
    let alphanumeric = |byte: &u8| byte.is_ascii_lowercase() || byte.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= 253
                && alphanumeric(first)
                && alphanumeric(last)
                && bytes
                    .iter()
                    .all(|byte| alphanumeric(byte) || matches!(byte, b'-' | b'.' | b':' | b'_'))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_ids() {
        let id = SecretId::generate();
        assert_eq!(id.as_str().len(), ID_PREFIX.len() + ID_RANDOM_CHARS);
        assert_eq!(SecretId::parse(id.as_str()).unwrap(), id);
        assert_ne!(SecretId::generate(), id);
        assert_eq!(id.to_string(), id.as_str());

        SecretId::parse("secret-a").unwrap();
        SecretId::parse(&format!("secret-{}", "a".repeat(64))).unwrap();
        for bad in [
            "",
            "secret-",
            "secret-ABC",
            "secret-../x",
            "Secret-abc",
            "abc",
            "secret-a/b",
            "secret-a.sealed",
        ] {
            assert!(SecretId::parse(bad).is_err(), "{bad:?}");
        }
        SecretId::parse(&format!("secret-{}", "a".repeat(65))).unwrap_err();
    }

    #[test]
    fn kinds_round_trip() {
        for kind in [SecretKind::Docker, SecretKind::Acr, SecretKind::Gar] {
            assert_eq!(kind.as_str().parse::<SecretKind>().unwrap(), kind);
        }
        "Docker".parse::<SecretKind>().unwrap_err();
        "".parse::<SecretKind>().unwrap_err();
    }

    #[test]
    fn secret_names_may_be_registry_hosts() {
        for good in ["reg", "docker.io", "registry.example.com:5000", "a_b-c"] {
            assert!(is_secret_name(good), "{good:?}");
        }
        for bad in ["", "-a", "a.", "A", "a b", "../x", "a/b", &"a".repeat(254)] {
            assert!(!is_secret_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn dns_labels() {
        for good in ["a", "default", "team-a", "a1", "0", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good:?}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "../x", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
    }

    #[test]
    fn credential_debug_redacts() {
        let password = "hunter2-password-marker";
        let credential = Credential::UsernamePassword {
            username: "robot".to_owned(),
            password: SecretString::from(password),
        };
        let debug = format!("{credential:?}");
        assert!(debug.contains("robot"));
        assert!(!debug.contains(password));

        let json_key = Credential::JsonKey(SecretString::from("{\"private_key\":\"key-marker\"}"));
        assert!(!format!("{json_key:?}").contains("key-marker"));

        let new = NewSecret {
            project: "default".to_owned(),
            name: "n".to_owned(),
            kind: SecretKind::Docker,
            server: "reg.example".to_owned(),
            credential,
        };
        assert!(!format!("{new:?}").contains(password));
    }

    #[test]
    fn validation_errors_leave_material_out() {
        // Not a valid host name either, so it is refused as a server too.
        let password = "hunter2_Pa55!marker";
        let new = |kind, project: &str, name: &str, server: &str, credential| NewSecret {
            project: project.to_owned(),
            name: name.to_owned(),
            kind,
            server: server.to_owned(),
            credential,
        };
        let user_pass = |username: &str, password: &str| Credential::UsernamePassword {
            username: username.to_owned(),
            password: SecretString::from(password),
        };
        let cases = [
            new(
                SecretKind::Docker,
                "Bad",
                "n",
                "reg.example",
                user_pass("u", password),
            ),
            new(
                SecretKind::Docker,
                "p",
                "Bad Name",
                "reg.example",
                user_pass("u", password),
            ),
            new(
                SecretKind::Docker,
                "p",
                "n",
                password,
                user_pass("u", password),
            ),
            new(
                SecretKind::Docker,
                "p",
                "n",
                "reg.example",
                user_pass("", password),
            ),
            new(
                SecretKind::Docker,
                "p",
                "n",
                "reg.example",
                user_pass("u", ""),
            ),
            new(
                SecretKind::Acr,
                "p",
                "n",
                "reg.example",
                user_pass(
                    "u",
                    &format!("{password}{}", "x".repeat(MAX_MATERIAL_BYTES)),
                ),
            ),
            new(
                SecretKind::Gar,
                "p",
                "n",
                "reg.example",
                user_pass("u", password),
            ),
            new(
                SecretKind::Docker,
                "p",
                "n",
                "reg.example",
                Credential::JsonKey(SecretString::from(password)),
            ),
            new(
                SecretKind::Gar,
                "p",
                "n",
                "reg.example",
                Credential::JsonKey(SecretString::from("")),
            ),
        ];
        for case in cases {
            let error = validate_new(case).unwrap_err();
            assert!(matches!(error, SecretError::Invalid { .. }), "{error:?}");
            assert!(!error.to_string().contains(password), "{error}");
            assert!(!format!("{error:?}").contains(password), "{error:?}");
        }
        let accepted = validate_new(new(
            SecretKind::Docker,
            "p",
            "n",
            "https://Reg.Example/v2/",
            user_pass("u", password),
        ))
        .unwrap();
        assert_eq!(accepted.server, "reg.example");
    }
}
