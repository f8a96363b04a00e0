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
pub(crate) mod file;
pub(crate) mod gar_key;
pub(crate) mod openbao;
pub(crate) mod provider;
mod record;

use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::SystemTime;

use rand::Rng;
use secrecy::SecretString;
use tracing::instrument;

use crate::config::{Config, SecretsBackend};
use crate::order::is_dns_label;

pub(crate) use self::file::FileStore;
pub(crate) use self::openbao::OpenbaoStore;

/// Longest accepted username, password or JSON key, in bytes.
pub(crate) const MAX_MATERIAL_BYTES: usize = 64 * 1024;

/// Longest normalised `server` (`host[:port]`), in bytes.
const MAX_SERVER_BYTES: usize = 255;

/// The prefix of every secret id.
const ID_PREFIX: &str = "secret-";

/// Number of random characters in a generated id.
const ID_RANDOM_CHARS: usize = 16;

/// Longest random part accepted by [`SecretId::parse`].
const ID_MAX_RANDOM_CHARS: usize = 64;

/// The Docker Hub host every alias is reduced to.
const DOCKER_HUB: &str = "docker.io";

/// Docker Hub's other names (without a port).
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// How a secret authenticates to its registry (see `auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SecretKind {
    /// Username and password, exchanged at the registry's token realm.
    Docker,
    /// Azure Container Registry: service principal, or the all-zero GUID with a refresh token.
    Acr,
    /// Google Artifact Registry: a service-account JSON key.
    Gar,
}

impl SecretKind {
    pub(crate) fn as_str(self) -> &'static str {
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
pub(crate) struct SecretId(String);

impl SecretId {
    /// Validates an id given by a client: `^secret-[a-z0-9]{1,64}$`.
    pub(crate) fn parse(input: &str) -> Result<SecretId, SecretError> {
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
    pub(crate) fn generate() -> SecretId {
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
    pub(crate) fn provider(name: &str) -> SecretId {
        SecretId(format!("provider:{name}"))
    }

    pub(crate) fn as_str(&self) -> &str {
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
pub(crate) struct SecretMeta {
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
pub(crate) enum Credential {
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
pub(crate) struct NewSecret {
    pub project: String,
    pub name: String,
    pub kind: SecretKind,
    /// A host, `host:port` or URL; normalised on create.
    pub server: String,
    pub credential: Credential,
}

/// A secret read back from the store.
#[derive(Debug)]
pub(crate) struct StoredSecret {
    pub meta: SecretMeta,
    pub credential: Credential,
}

/// Errors of the secret store. No variant carries credential material.
#[derive(thiserror::Error, Debug)]
pub(crate) enum SecretError {
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

/// The configured backend.
#[derive(Debug)]
pub(crate) enum SecretStore {
    File(FileStore),
    Openbao(OpenbaoStore),
}

impl SecretStore {
    /// Opens the backend `[secrets] backend` names. Blocking; call once at start, inside the
    /// runtime (the openbao backend spawns its token renewal, which ends when the store drops).
    /// OpenBao being down is no error here: berthd starts and logs in once it answers.
    pub(crate) fn open(config: &Config) -> Result<SecretStore, SecretError> {
        match config.secrets.backend {
            SecretsBackend::File => Ok(SecretStore::File(FileStore::open(
                &config.state_dir,
                &config.secrets.key_file,
            )?)),
            SecretsBackend::Openbao => Ok(SecretStore::Openbao(OpenbaoStore::open(
                &openbao::OpenbaoSettings::from_config(config)?,
            )?)),
        }
    }

    /// Validates and stores a new secret; returns its metadata with the new id.
    #[instrument(skip_all, fields(project = %new.project, name = %new.name, kind = %new.kind))]
    pub(crate) async fn create(&self, new: NewSecret) -> Result<SecretMeta, SecretError> {
        let new = validate_new(new)?;
        match self {
            SecretStore::File(store) => store.create(new).await,
            SecretStore::Openbao(store) => store.create(new).await,
        }
    }

    /// The secret `id` of `project`; an id of another project is [`SecretError::NotFound`].
    #[instrument(skip_all, fields(project = %project, secret_id = %id))]
    pub(crate) async fn get(
        &self,
        project: &str,
        id: &SecretId,
    ) -> Result<StoredSecret, SecretError> {
        validate_project(project)?;
        match self {
            SecretStore::File(store) => store.get(project, id).await,
            SecretStore::Openbao(store) => store.get(project, id).await,
        }
    }

    /// Metadata of every secret of `project`, sorted by name.
    #[instrument(skip_all, fields(project = %project))]
    pub(crate) async fn list(&self, project: &str) -> Result<Vec<SecretMeta>, SecretError> {
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
    pub(crate) async fn delete(&self, project: &str, id: &SecretId) -> Result<(), SecretError> {
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
pub(crate) fn is_secret_name(input: &str) -> bool {
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

/// Reduces a registry server given as a host, `host:port` or URL to `host[:port]`.
///
/// The scheme (http or https) and any path are dropped, the host is lower-cased, and Docker Hub's
/// names (`docker.io`, `index.docker.io`, `registry-1.docker.io`) become `docker.io`. Userinfo,
/// queries, fragments, bad characters, bad ports and results over 255 bytes are refused.
pub(crate) fn normalize_server(input: &str) -> Result<String, SecretError> {
    let invalid = |reason| SecretError::Invalid {
        field: "server",
        reason,
    };
    if input.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if input.len() > 4 * MAX_SERVER_BYTES {
        return Err(invalid("longer than 255 bytes"));
    }
    let without_scheme = match input.split_once("://") {
        Some((scheme, rest)) => {
            if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http") {
                rest
            } else {
                return Err(invalid("scheme must be http or https"));
            }
        }
        None => input,
    };
    if without_scheme.contains(['?', '#']) {
        return Err(invalid("must not contain a query or fragment"));
    }
    let authority = without_scheme
        .split_once('/')
        .map_or(without_scheme, |(authority, _path)| authority);
    if authority.contains('@') {
        return Err(invalid("must not contain a username or password"));
    }
    if authority.is_empty() {
        return Err(invalid("has no host"));
    }

    let (host, port) =
        split_host_port(authority).ok_or_else(|| invalid("port must be 1 to 65535"))?;
    let host =
        normalize_host(host).ok_or_else(|| invalid("host must be a DNS name or an IP address"))?;

    let server = match port {
        None if DOCKER_HUB_ALIASES.contains(&host.as_str()) => DOCKER_HUB.to_owned(),
        None => host,
        Some(port) => format!("{host}:{port}"),
    };
    if server.len() > MAX_SERVER_BYTES {
        return Err(invalid("longer than 255 bytes"));
    }
    Ok(server)
}

/// Splits `host[:port]` (host may be a bracketed IPv6 literal). `None`: a malformed port.
fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if authority.starts_with('[') {
        match authority.split_once(']') {
            Some((_, "")) => (authority, None),
            Some((bracketed, rest)) => {
                let port = rest.strip_prefix(':')?;
                (&authority[..=bracketed.len()], Some(port))
            }
            None => (authority, None),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    match port {
        None => Some((host, None)),
        Some(port) => {
            if port.is_empty() || port.len() > 5 || !port.bytes().all(|byte| byte.is_ascii_digit())
            {
                return None;
            }
            let port: u16 = port.parse().ok()?;
            (port != 0).then_some((host, Some(port)))
        }
    }
}

/// A lower-cased DNS name, IPv4 address, or bracketed IPv6 literal; `None` when malformed.
fn normalize_host(host: &str) -> Option<String> {
    if let Some(inner) = host.strip_prefix('[') {
        let address: Ipv6Addr = inner.strip_suffix(']')?.parse().ok()?;
        return Some(format!("[{address}]"));
    }
    let host = host.to_ascii_lowercase();
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 63
            && bytes
                .iter()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || *byte == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-')
    };
    host.split('.').all(label_ok).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_server_table() {
        let accepted = [
            ("reg.example", "reg.example"),
            ("reg.example:5000", "reg.example:5000"),
            ("REG.Example:5000", "reg.example:5000"),
            ("https://reg.example:5000/v2/", "reg.example:5000"),
            ("HTTPS://Reg.Example", "reg.example"),
            ("http://127.0.0.1:5000", "127.0.0.1:5000"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("reg.example/v2/", "reg.example"),
            ("https://reg.example:443", "reg.example:443"),
            ("reg.example:05000", "reg.example:5000"),
            ("localhost", "localhost"),
            ("[::1]:5000", "[::1]:5000"),
            ("https://[0:0:0:0:0:0:0:1]/v2/", "[::1]"),
            ("docker.io", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("https://index.docker.io/v1/", "docker.io"),
            ("https://registry-1.docker.io/v2/", "docker.io"),
            ("Docker.IO", "docker.io"),
            ("docker.io:443", "docker.io:443"),
            ("europe-west1-docker.pkg.dev", "europe-west1-docker.pkg.dev"),
            ("myregistry.azurecr.io", "myregistry.azurecr.io"),
        ];
        for (input, expected) in accepted {
            assert_eq!(
                normalize_server(input).unwrap(),
                expected,
                "input {input:?}"
            );
        }

        let refused = [
            "",
            "https://",
            "/v2/",
            "ftp://reg.example",
            "https://user:pass@reg.example",
            "user@reg.example",
            "reg.example:",
            "reg.example:0",
            "reg.example:65536",
            "reg.example:http",
            "reg.example:1:2",
            "reg_example",
            "reg example",
            "reg.example.",
            "-reg.example",
            "reg-.example",
            "reg..example",
            "rég.example",
            "https://reg.example/v2/?x=1",
            "reg.example#frag",
            "[::1",
            "[not-ip]:5000",
            "[::1]5000",
        ];
        for input in refused {
            assert!(
                matches!(
                    normalize_server(input),
                    Err(SecretError::Invalid {
                        field: "server",
                        ..
                    })
                ),
                "input {input:?} should be refused"
            );
        }

        let long_label = "a".repeat(63);
        let too_long = [long_label.as_str(); 5].join(".");
        assert_eq!(too_long.len(), 319);
        normalize_server(&too_long).unwrap_err();
        let just_fits = [long_label.as_str(); 4].join(".");
        assert_eq!(normalize_server(&just_fits).unwrap().len(), 255);
    }

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
