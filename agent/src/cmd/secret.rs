//! `berth secret ...`: create (docker, acr, gar), import a docker config.json, list and delete.
//!
//! Passwords and keys stay in zeroizing buffers until the request is built; they are never
//! printed and never part of an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{output, read_input, read_stdin, unary, CmdError, Console};
use crate::api::pb;
use crate::api::pb::create_secret_request::Credential;
use crate::api::pb::secrets_client::SecretsClient;

/// The username of a refresh-token credential (ACR and docker's `identitytoken`).
const REFRESH_TOKEN_USERNAME: &str = "00000000-0000-0000-0000-000000000000";

#[derive(Debug, Subcommand)]
pub(super) enum SecretCommand {
    /// Docker registry (username and password or token).
    #[command(subcommand)]
    Docker(DockerCommand),
    /// Azure Container Registry (service principal, or the all-zero GUID and a refresh token).
    #[command(subcommand)]
    Acr(AcrCommand),
    /// Google Artifact Registry (service-account JSON key).
    #[command(subcommand)]
    Gar(GarCommand),
    /// List the project's secrets (metadata only).
    List,
    /// Delete a secret.
    Delete {
        /// Secret id, as printed by create.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum DockerCommand {
    /// Store a username and password; prints the secret id.
    Create(PasswordCreateArgs),
    /// Store one secret per `auths` entry of a docker config.json.
    Import(ImportArgs),
}

#[derive(Debug, Subcommand)]
pub(super) enum AcrCommand {
    /// Store a username and password; prints the secret id.
    Create(PasswordCreateArgs),
}

#[derive(Debug, Subcommand)]
pub(super) enum GarCommand {
    /// Store a service-account JSON key; prints the secret id.
    Create(GarCreateArgs),
}

#[derive(Debug, Args)]
pub(super) struct PasswordCreateArgs {
    /// Secret name, unique in the project.
    #[arg(long)]
    name: String,
    /// Registry host[:port] (a URL is reduced to that).
    #[arg(long)]
    server: String,
    /// Registry username (for ACR: the service principal id, or the all-zero GUID with a
    /// refresh token as password).
    #[arg(long)]
    username: String,
    #[command(flatten)]
    password: PasswordSource,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct PasswordSource {
    /// Password on the command line (lands in shell history: prefer --password-stdin).
    #[arg(long, value_parser = parse_password)]
    password: Option<SecretString>,
    /// Read the password from stdin (one trailing newline is dropped).
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Debug, Args)]
pub(super) struct GarCreateArgs {
    /// Secret name, unique in the project.
    #[arg(long)]
    name: String,
    /// Registry host, e.g. europe-docker.pkg.dev.
    #[arg(long)]
    server: String,
    /// Service-account JSON key file, or - for stdin.
    #[arg(long = "json_key", visible_alias = "json-key", value_name = "FILE|-")]
    json_key: PathBuf,
}

#[derive(Debug, Args)]
pub(super) struct ImportArgs {
    /// Docker config file [default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn parse_password(value: &str) -> Result<SecretString, CmdError> {
    if value.is_empty() {
        return Err(CmdError::EmptyPassword);
    }
    Ok(SecretString::from(value))
}

pub(super) async fn run(command: SecretCommand, console: &mut Console<'_>) -> Result<(), CmdError> {
    match command {
        SecretCommand::Docker(DockerCommand::Create(args)) => {
            create_with_password(args, Kind::Docker, console).await
        }
        SecretCommand::Docker(DockerCommand::Import(args)) => import(args, console).await,
        SecretCommand::Acr(AcrCommand::Create(args)) => {
            create_with_password(args, Kind::Acr, console).await
        }
        SecretCommand::Gar(GarCommand::Create(args)) => create_gar(args, console).await,
        SecretCommand::List => list(console).await,
        SecretCommand::Delete { id } => delete(id, console).await,
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Docker,
    Acr,
}

async fn create_with_password(
    args: PasswordCreateArgs,
    kind: Kind,
    console: &mut Console<'_>,
) -> Result<(), CmdError> {
    let password = password_material(args.password, console).await?;
    let credential = match kind {
        Kind::Docker => Credential::Docker(pb::DockerCredential {
            server: args.server,
            username: args.username,
            password: password.as_str().to_owned(),
        }),
        Kind::Acr => Credential::Acr(pb::AcrCredential {
            server: args.server,
            username: args.username,
            password: password.as_str().to_owned(),
        }),
    };
    drop(password);
    create_and_print(args.name, credential, console).await
}

async fn create_gar(args: GarCreateArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let key = read_input(&args.json_key).await?;
    check_json_key(&args.json_key, &key)?;
    let credential = Credential::Gar(pb::GarCredential {
        server: args.server,
        json_key: key.as_str().to_owned(),
    });
    drop(key);
    create_and_print(args.name, credential, console).await
}

async fn create_and_print(
    name: String,
    credential: Credential,
    console: &mut Console<'_>,
) -> Result<(), CmdError> {
    let mut client = SecretsClient::new(console.channel().await?);
    let secret = client
        .create_secret(unary(pb::CreateSecretRequest {
            project: console.project(),
            name,
            credential: Some(credential),
        }))
        .await?
        .into_inner();
    if console.json() {
        output::write_json(console.out, &output::secret_json(&secret))
    } else {
        output::write_line(console.out, &secret.id)
    }
}

/// The password from `--password` (with a warning) or stdin.
async fn password_material(
    source: PasswordSource,
    console: &mut Console<'_>,
) -> Result<Zeroizing<String>, CmdError> {
    let password = match source.password {
        Some(password) => {
            console.warn(
                "warning: a password given with --password can land in your shell history; \
                 use --password-stdin",
            )?;
            Zeroizing::new(password.expose_secret().to_owned())
        }
        None => {
            let mut password = read_stdin().await?;
            strip_one_newline(&mut password);
            password
        }
    };
    if password.is_empty() {
        return Err(CmdError::EmptyPassword);
    }
    Ok(password)
}

/// Drops one trailing `\n` or `\r\n`, as `docker login --password-stdin` does.
fn strip_one_newline(text: &mut String) {
    if text.ends_with("\r\n") {
        text.truncate(text.len() - 2);
    } else if text.ends_with('\n') {
        text.truncate(text.len() - 1);
    }
}

/// Checks that a GAR key is a JSON object, without keeping or quoting any of its values.
fn check_json_key(path: &Path, key: &str) -> Result<(), CmdError> {
    serde_json::from_str::<serde::de::IgnoredAny>(key).map_err(|error| {
        CmdError::JsonKeyInvalid {
            path: path.to_owned(),
            line: error.line(),
            column: error.column(),
        }
    })?;
    if key.trim_start().starts_with('{') {
        Ok(())
    } else {
        Err(CmdError::JsonKeyNotObject {
            path: path.to_owned(),
        })
    }
}

async fn list(console: &mut Console<'_>) -> Result<(), CmdError> {
    let mut client = SecretsClient::new(console.channel().await?);
    let secrets = client
        .list_secrets(unary(pb::ListSecretsRequest {
            project: console.project(),
        }))
        .await?
        .into_inner()
        .secrets;
    if console.json() {
        let values = secrets.iter().map(output::secret_json).collect();
        output::write_json(console.out, &serde_json::Value::Array(values))
    } else {
        output::write_secret_table(console.out, &secrets)
    }
}

async fn delete(id: String, console: &mut Console<'_>) -> Result<(), CmdError> {
    let mut client = SecretsClient::new(console.channel().await?);
    client
        .delete_secret(unary(pb::DeleteSecretRequest {
            project: console.project(),
            id: id.clone(),
        }))
        .await?;
    if console.json() {
        output::write_json(console.out, &serde_json::json!({ "id": id }))
    } else {
        output::write_line(console.out, &id)
    }
}

async fn import(args: ImportArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let path = match args.config {
        Some(path) => path,
        None => default_docker_config().ok_or(CmdError::NoDockerConfig)?,
    };
    let text = read_input(&path).await?;
    let parsed = parse_docker_config(&path, &text)?;
    drop(text);
    for skipped in &parsed.skipped {
        console.warn(&format!("skipped {}: {}", skipped.server, skipped.reason))?;
    }
    if parsed.credentials.is_empty() {
        return Ok(());
    }
    let mut client = SecretsClient::new(console.channel().await?);
    let total = parsed.credentials.len();
    let mut failed = 0;
    let mut created = Vec::new();
    for credential in &parsed.credentials {
        let request = pb::CreateSecretRequest {
            project: console.project(),
            name: credential.server.clone(),
            credential: Some(Credential::Docker(pb::DockerCredential {
                server: credential.server.clone(),
                username: credential.username.clone(),
                password: credential.password.expose_secret().to_owned(),
            })),
        };
        match client.create_secret(unary(request)).await {
            Ok(response) => {
                let secret = response.into_inner();
                if !console.json() {
                    let server = if secret.server.is_empty() {
                        &credential.server
                    } else {
                        &secret.server
                    };
                    output::write_line(console.out, &format!("{} {server}", secret.id))?;
                }
                created.push(secret);
            }
            Err(status) => {
                failed += 1;
                let error = CmdError::from(status);
                console.warn(&format!("{}: {}", credential.server, error.describe()))?;
            }
        }
    }
    if console.json() {
        let values = created.iter().map(output::secret_json).collect();
        output::write_json(console.out, &serde_json::Value::Array(values))?;
    }
    if failed > 0 {
        return Err(CmdError::ImportIncomplete { failed, total });
    }
    Ok(())
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|dir| !dir.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|home| !home.is_empty())?;
    Some(PathBuf::from(home).join(".docker").join("config.json"))
}

/// The parts of a docker `config.json` the import reads; other keys are ignored.
#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

/// One `auths` entry; wiped when dropped.
#[derive(Deserialize, Default, Zeroize, ZeroizeOnDrop)]
struct DockerAuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// A credential found in a docker config, ready to be stored as a docker secret.
struct ImportedCredential {
    /// The registry host, normalised (`https://index.docker.io/v1/` -> `docker.io`); also the
    /// secret's name.
    server: String,
    username: String,
    password: SecretString,
}

impl std::fmt::Debug for ImportedCredential {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ImportedCredential")
            .field("server", &self.server)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// An entry the import leaves out, and why.
#[derive(Debug, PartialEq, Eq)]
struct Skipped {
    server: String,
    reason: String,
}

#[derive(Debug)]
struct DockerConfigImport {
    credentials: Vec<ImportedCredential>,
    skipped: Vec<Skipped>,
}

fn parse_docker_config(path: &Path, text: &str) -> Result<DockerConfigImport, CmdError> {
    let config: DockerConfigFile =
        serde_json::from_str(text).map_err(|error| CmdError::DockerConfigInvalid {
            path: path.to_owned(),
            line: error.line(),
            column: error.column(),
        })?;
    let mut credentials: Vec<ImportedCredential> = Vec::new();
    let mut skipped = Vec::new();
    for (key, entry) in &config.auths {
        let server = normalize_server(key);
        if server.is_empty() {
            skipped.push(Skipped {
                server: key.clone(),
                reason: "not a registry host".to_owned(),
            });
            continue;
        }
        if credentials.iter().any(|known| known.server == server) {
            skipped.push(Skipped {
                server: key.clone(),
                reason: format!("a credential for {server} was already imported"),
            });
            continue;
        }
        match entry_credential(entry) {
            Ok((username, password)) => credentials.push(ImportedCredential {
                server,
                username,
                password,
            }),
            Err(reason) => {
                let reason = match (&config.creds_store, reason) {
                    (Some(store), EntryProblem::Empty) => format!(
                        "no credential in the file (held by credsStore \"{store}\", not imported)"
                    ),
                    (_, problem) => problem.to_string(),
                };
                skipped.push(Skipped { server, reason });
            }
        }
    }
    if let Some(store) = &config.creds_store {
        skipped.push(Skipped {
            server: format!("credsStore \"{store}\""),
            reason: format!("credentials kept by docker-credential-{store} are not imported"),
        });
    }
    for (host, helper) in &config.cred_helpers {
        skipped.push(Skipped {
            server: normalize_server(host),
            reason: format!("credHelpers entry (docker-credential-{helper}) is not imported"),
        });
    }
    Ok(DockerConfigImport {
        credentials,
        skipped,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum EntryProblem {
    #[error("no credential in the entry")]
    Empty,
    #[error("auth is not valid base64")]
    AuthNotBase64,
    #[error("auth is not username:password")]
    AuthNotUserPassword,
    #[error("registrytoken entries are not supported")]
    RegistryToken,
}

/// Username and password of one entry: an `identitytoken` becomes a refresh-token credential
/// (the all-zero GUID as username); else `auth` (base64 `user:password`, split at the first
/// `:`); else `username`/`password`.
fn entry_credential(entry: &DockerAuthEntry) -> Result<(String, SecretString), EntryProblem> {
    let present = |field: &Option<String>| field.as_deref().is_some_and(|value| !value.is_empty());
    if let Some(token) = entry
        .identitytoken
        .as_deref()
        .filter(|token| !token.is_empty())
    {
        return Ok((REFRESH_TOKEN_USERNAME.to_owned(), SecretString::from(token)));
    }
    if let Some(auth) = entry.auth.as_deref().filter(|auth| !auth.trim().is_empty()) {
        let engine = GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        let decoded = Zeroizing::new(
            engine
                .decode(auth.trim())
                .map_err(|_| EntryProblem::AuthNotBase64)?,
        );
        let text = std::str::from_utf8(&decoded).map_err(|_| EntryProblem::AuthNotUserPassword)?;
        let (username, password) = text
            .split_once(':')
            .ok_or(EntryProblem::AuthNotUserPassword)?;
        if username.is_empty() || password.is_empty() {
            return Err(EntryProblem::AuthNotUserPassword);
        }
        return Ok((username.to_owned(), SecretString::from(password)));
    }
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        if !username.is_empty() && !password.is_empty() {
            return Ok((username.clone(), SecretString::from(password.as_str())));
        }
    }
    if present(&entry.registrytoken) {
        return Err(EntryProblem::RegistryToken);
    }
    Err(EntryProblem::Empty)
}

/// The secret's server as the daemon will store it; empty when it is not a registry host.
fn normalize_server(key: &str) -> String {
    berth_secrets::normalize_server(key.trim()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    fn parse(text: &str) -> DockerConfigImport {
        parse_docker_config(Path::new("/home/u/.docker/config.json"), text).unwrap()
    }

    #[test]
    fn strips_exactly_one_trailing_newline() {
        let cases = [
            ("secret\n", "secret"),
            ("secret\r\n", "secret"),
            ("secret", "secret"),
            ("secret\n\n", "secret\n"),
            ("secret\r\n\r\n", "secret\r\n"),
            ("sec\nret\n", "sec\nret"),
            ("secret\r", "secret\r"),
            ("\n", ""),
            ("", ""),
        ];
        for (input, expected) in cases {
            let mut text = input.to_owned();
            strip_one_newline(&mut text);
            assert_eq!(text, expected, "{input:?}");
        }
    }

    #[test]
    fn auth_is_split_at_the_first_colon() {
        let config = format!(
            r#"{{"auths": {{"registry.example.com": {{"auth": "{}"}}}}}}"#,
            encode("robot$team:pa:ss:word")
        );
        let parsed = parse(&config);
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let [credential] = parsed.credentials.as_slice() else {
            panic!("{:?}", parsed.credentials);
        };
        assert_eq!(credential.server, "registry.example.com");
        assert_eq!(credential.username, "robot$team");
        assert_eq!(credential.password.expose_secret(), "pa:ss:word");
    }

    #[test]
    fn docker_hub_keys_are_normalised() {
        let config = format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{}"}}}}}}"#,
            encode("me:pw")
        );
        let parsed = parse(&config);
        assert_eq!(parsed.credentials.len(), 1);
        assert_eq!(parsed.credentials[0].server, "docker.io");
        assert_eq!(
            normalize_server("https://Registry.Example.com:5000/v2/"),
            "registry.example.com:5000"
        );
        assert_eq!(normalize_server("registry-1.docker.io"), "docker.io");
        assert_eq!(normalize_server("HTTP://localhost:5000"), "localhost:5000");
        assert_eq!(normalize_server("ghcr.io"), "ghcr.io");
    }

    #[test]
    fn identity_token_becomes_a_refresh_token_credential() {
        let config = format!(
            r#"{{"auths": {{"myreg.azurecr.io": {{"auth": "{}", "identitytoken": "refresh-abc"}}}}}}"#,
            encode("00000000-0000-0000-0000-000000000000:")
        );
        let parsed = parse(&config);
        let [credential] = parsed.credentials.as_slice() else {
            panic!("{:?}", parsed.credentials);
        };
        assert_eq!(credential.server, "myreg.azurecr.io");
        assert_eq!(credential.username, REFRESH_TOKEN_USERNAME);
        assert_eq!(credential.password.expose_secret(), "refresh-abc");
    }

    #[test]
    fn creds_store_and_helpers_are_reported_as_skipped() {
        let config = r#"{
            "auths": {"https://index.docker.io/v1/": {}, "ghcr.io": {"auth": ""}},
            "credsStore": "desktop",
            "credHelpers": {"europe-docker.pkg.dev": "gcloud"},
            "psFormat": "table {{.ID}}"
        }"#;
        let parsed = parse(config);
        assert!(parsed.credentials.is_empty());
        let servers: Vec<&str> = parsed.skipped.iter().map(|s| s.server.as_str()).collect();
        assert_eq!(
            servers,
            [
                "ghcr.io",
                "docker.io",
                "credsStore \"desktop\"",
                "europe-docker.pkg.dev"
            ]
        );
        assert!(parsed.skipped[0].reason.contains("credsStore \"desktop\""));
        assert!(parsed.skipped[1].reason.contains("credsStore \"desktop\""));
        assert!(parsed.skipped[2]
            .reason
            .contains("docker-credential-desktop"));
        assert!(parsed.skipped[3]
            .reason
            .contains("docker-credential-gcloud"));
    }

    #[test]
    fn bad_entries_are_skipped_not_fatal() {
        let config = format!(
            r#"{{"auths": {{
                "a.example": {{"auth": "%%%not-base64"}},
                "b.example": {{"auth": "{}"}},
                "c.example": {{"username": "u", "password": "p"}},
                "d.example": {{"registrytoken": "t"}},
                "https://c.example/v2/": {{"auth": "{}"}}
            }}}}"#,
            encode("no-colon-here"),
            encode("x:y")
        );
        let parsed = parse(&config);
        let servers: Vec<&str> = parsed
            .credentials
            .iter()
            .map(|c| c.server.as_str())
            .collect();
        assert_eq!(servers, ["c.example"]);
        let reasons: Vec<String> = parsed
            .skipped
            .iter()
            .map(|s| format!("{}: {}", s.server, s.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                "a.example: auth is not valid base64",
                "b.example: auth is not username:password",
                "d.example: registrytoken entries are not supported",
                "https://c.example/v2/: a credential for c.example was already imported",
            ]
        );
    }

    #[test]
    fn unpadded_auth_is_accepted() {
        let unpadded = encode("me:pw").trim_end_matches('=').to_owned();
        let config = format!(r#"{{"auths": {{"r.example": {{"auth": "{unpadded}"}}}}}}"#);
        let parsed = parse(&config);
        assert_eq!(parsed.credentials[0].password.expose_secret(), "pw");
    }

    #[test]
    fn invalid_config_errors_name_the_path_and_never_the_content() {
        let config = r#"{"auths": {"r.example": "s3cr3t-value"}}"#;
        let error = parse_docker_config(Path::new("/tmp/cfg.json"), config).unwrap_err();
        let line = error.describe();
        assert!(line.contains("/tmp/cfg.json"), "{line}");
        assert!(!line.contains("s3cr3t"), "{line}");
    }

    #[test]
    fn imported_credential_debug_is_redacted() {
        let config = format!(
            r#"{{"auths": {{"r.example": {{"auth": "{}"}}}}}}"#,
            encode("me:topsecret")
        );
        let parsed = parse(&config);
        let debug = format!("{parsed:?}");
        assert!(debug.contains("r.example"));
        assert!(!debug.contains("topsecret"), "{debug}");
    }

    #[test]
    fn json_key_checks_never_quote_the_key() {
        let path = Path::new("/keys/sa.json");
        check_json_key(path, r#"{"type": "service_account", "private_key": "k"}"#).unwrap();
        let not_object = check_json_key(path, r#""private-key-material""#).unwrap_err();
        assert!(matches!(not_object, CmdError::JsonKeyNotObject { .. }));
        let broken = check_json_key(path, r#"{"private_key": "material"#).unwrap_err();
        let line = broken.describe();
        assert!(line.contains("/keys/sa.json"), "{line}");
        assert!(!line.contains("material"), "{line}");
    }

    #[test]
    fn empty_password_flag_is_refused() {
        assert!(matches!(parse_password(""), Err(CmdError::EmptyPassword)));
        assert_eq!(parse_password("pw").unwrap().expose_secret(), "pw");
    }
}
