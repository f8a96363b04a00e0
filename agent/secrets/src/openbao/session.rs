//! berth's own OpenBao token: how it is obtained, renewed and replaced.
//!
//! - AppRole (`role_id_file` + `secret_id_file`): `POST auth/approle/login`; the files are read
//!   again at every login, so an operator may rotate the secret id.
//! - `token_file`: the token in the file (put there by an operator or an OpenBao agent);
//!   `lookup-self` gives its TTL. The file is read again whenever the token is refused or expires.
//!
//! A task ([`keep_token_fresh`], owned by the store) logs in at start, then renews the token with
//! `POST auth/token/renew-self` at 2/3 of its TTL. When renewal fails, the token is not renewable,
//! or a renewal comes back short (the token is near its max TTL), it logs in again. While OpenBao
//! is down it retries with backoff; orders meanwhile fail fast with `Unavailable`, and the first
//! one after OpenBao is back logs in itself if the token has expired. The token lives only in
//! memory as a [`SecretString`]; it is never logged, never put into an error.

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng as _;
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::transport::{Answer, Transport};
use crate::SecretError;

/// A token closer than this to its expiry is not used; a new one is obtained first.
const EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// First and longest wait between login attempts while OpenBao is down.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How often a token that never expires (TTL 0) is looked at again.
const IDLE_RECHECK: Duration = Duration::from_secs(300);

/// Largest credential file berth reads.
const MAX_CREDENTIAL_FILE_BYTES: u64 = 64 * 1024;

/// How berth logs in to OpenBao (`[secrets.openbao]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// `token_file`: a token someone else obtains and renews or rotates.
    TokenFile(PathBuf),
    /// `role_id_file` + `secret_id_file`: AppRole login at `auth/approle`.
    AppRole {
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
    },
}

impl Login {
    pub(super) fn method(&self) -> &'static str {
        match self {
            Login::TokenFile(_) => "token_file",
            Login::AppRole { .. } => "approle",
        }
    }

    /// At start: the files exist and the secret ones (token, secret id) are private (no group or
    /// other access) and owned by the agent user.
    pub(super) fn check_files(&self) -> Result<(), SecretError> {
        match self {
            Login::TokenFile(path) => check_file(path, true),
            Login::AppRole {
                role_id_file,
                secret_id_file,
            } => {
                check_file(role_id_file, false)?;
                check_file(secret_id_file, true)
            }
        }
    }
}

/// A regular file; when `private`, mode without group/other bits and owned by this user.
fn check_file(path: &Path, private: bool) -> Result<(), SecretError> {
    let metadata = std::fs::metadata(path).map_err(|source| SecretError::Io {
        path: path.to_owned(),
        source,
    })?;
    check_metadata(path, &metadata, private)
}

fn check_metadata(
    path: &Path,
    metadata: &std::fs::Metadata,
    private: bool,
) -> Result<(), SecretError> {
    let refused = |reason| SecretError::CredentialFile {
        path: path.to_owned(),
        reason,
    };
    if !metadata.is_file() {
        return Err(refused("not a regular file"));
    }
    if metadata.len() > MAX_CREDENTIAL_FILE_BYTES {
        return Err(refused("larger than 64 KiB"));
    }
    if private {
        if metadata.mode() & 0o077 != 0 {
            return Err(refused("open to group or others (use mode 0600)"));
        }
        if metadata.uid() != nix::unistd::geteuid().as_raw() {
            return Err(refused("owned by another user"));
        }
    }
    Ok(())
}

/// Reads a credential file (checked again, it may have been replaced) into a zeroized buffer,
/// without surrounding whitespace.
async fn read_credential(path: &Path, private: bool) -> Result<Zeroizing<String>, SecretError> {
    let io_error = |source| SecretError::Io {
        path: path.to_owned(),
        source,
    };
    let metadata = tokio::fs::metadata(path).await.map_err(io_error)?;
    check_metadata(path, &metadata, private)?;
    let bytes = Zeroizing::new(tokio::fs::read(path).await.map_err(io_error)?);
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        io_error(io::Error::new(
            io::ErrorKind::InvalidData,
            "credential file is not UTF-8",
        ))
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SecretError::CredentialFile {
            path: path.to_owned(),
            reason: "empty",
        });
    }
    Ok(Zeroizing::new(trimmed.to_owned()))
}

/// One token of berth's, with what OpenBao said about its lifetime.
pub(super) struct Lease {
    token: SecretString,
    /// Counts tokens obtained; a renewal keeps the id.
    id: u64,
    /// When the TTL below was given.
    since: Instant,
    /// `None`: the token never expires.
    ttl: Option<Duration>,
    /// The TTL at login, to notice a renewal cut short by the max TTL.
    login_ttl: Option<Duration>,
    renewable: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("token", &"<redacted>")
            .field("id", &self.id)
            .field("ttl", &self.ttl)
            .field("renewable", &self.renewable)
            .finish_non_exhaustive()
    }
}

impl Lease {
    pub(super) fn token(&self) -> &SecretString {
        &self.token
    }

    pub(super) fn id(&self) -> u64 {
        self.id
    }

    fn expires_at(&self) -> Option<Instant> {
        self.ttl.map(|ttl| self.since + ttl)
    }

    /// Usable now: no expiry, or more than [`EXPIRY_MARGIN`] left.
    fn is_fresh(&self, now: Instant) -> bool {
        self.expires_at()
            .is_none_or(|expires_at| now + EXPIRY_MARGIN < expires_at)
    }

    /// When to renew: at 2/3 of the TTL.
    fn renew_at(&self) -> Option<Instant> {
        self.ttl.map(|ttl| self.since + ttl * 2 / 3)
    }

    /// A renewal that granted less than half the login TTL: the max TTL is near, log in again.
    fn is_cut_short(&self) -> bool {
        match (self.ttl, self.login_ttl) {
            (Some(ttl), Some(login_ttl)) => ttl < login_ttl / 2,
            _ => false,
        }
    }
}

/// berth's session with OpenBao: the current lease and how to get a new one.
pub(super) struct Session {
    login: Login,
    current: Mutex<Option<Arc<Lease>>>,
    /// One login at a time; callers that waited use the token the first one got.
    replacing: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("login", &self.login.method())
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(super) fn new(login: Login) -> Session {
        Session {
            login,
            current: Mutex::new(None),
            replacing: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
        }
    }

    pub(super) fn current(&self) -> Option<Arc<Lease>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn install(&self, lease: Arc<Lease>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(lease);
    }

    /// A usable lease: the current one, or a new one when there is none or it expired.
    pub(super) async fn token(&self, client: &Transport) -> Result<Arc<Lease>, SecretError> {
        let current = self.current();
        match current {
            Some(lease) if lease.is_fresh(Instant::now()) => Ok(lease),
            stale => self.replace(client, stale.map(|lease| lease.id)).await,
        }
    }

    /// Logs in again (AppRole) or reads `token_file` again, unless another task already
    /// replaced the lease `stale` (`None`: there was none) with a fresh one.
    pub(super) async fn replace(
        &self,
        client: &Transport,
        stale: Option<u64>,
    ) -> Result<Arc<Lease>, SecretError> {
        let _one_at_a_time = self.replacing.lock().await;
        if let Some(current) = self.current() {
            if Some(current.id) != stale && current.is_fresh(Instant::now()) {
                return Ok(current);
            }
        }
        let lease = Arc::new(self.obtain(client).await?);
        self.install(Arc::clone(&lease));
        Ok(lease)
    }

    async fn obtain(&self, client: &Transport) -> Result<Lease, SecretError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match &self.login {
            Login::AppRole {
                role_id_file,
                secret_id_file,
            } => {
                let role_id = read_credential(role_id_file, false).await?;
                let secret_id = read_credential(secret_id_file, true).await?;
                let body = approle_body(&role_id, &secret_id)?;
                let answer = client
                    .send(Method::POST, "auth/approle/login", None, Some(body))
                    .await?;
                let mut auth = match answer.status {
                    StatusCode::OK => auth_block(client, "auth/approle/login", &answer)?,
                    StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN => {
                        return Err(login_refused(
                            client,
                            "the approle role_id or secret_id is not valid",
                        ))
                    }
                    _ => {
                        return Err(login_refused(
                            client,
                            "auth/approle/login is not available (is approle enabled?)",
                        ))
                    }
                };
                let ttl = ttl_from_seconds(auth.lease_duration);
                info!(
                    method = "approle",
                    ttl_seconds = auth.lease_duration,
                    renewable = auth.renewable,
                    "logged in to openbao"
                );
                Ok(Lease {
                    token: SecretString::from(std::mem::take(&mut auth.client_token)),
                    id,
                    since: Instant::now(),
                    ttl,
                    login_ttl: ttl,
                    renewable: auth.renewable,
                })
            }
            Login::TokenFile(path) => {
                let token = read_credential(path, true).await?;
                let token = SecretString::from(token.as_str().to_owned());
                let answer = client
                    .send(Method::GET, "auth/token/lookup-self", Some(&token), None)
                    .await?;
                if answer.status == StatusCode::FORBIDDEN {
                    return Err(login_refused(
                        client,
                        "the token in token_file is expired or revoked",
                    ));
                }
                if !answer.status.is_success() {
                    return Err(backend(
                        client,
                        "auth/token/lookup-self",
                        "unexpected status",
                    ));
                }
                let lookup: LookupAnswer =
                    answer.json(client.address(), "auth/token/lookup-self")?;
                let ttl = ttl_from_seconds(lookup.data.ttl);
                info!(
                    method = "token_file",
                    ttl_seconds = lookup.data.ttl,
                    renewable = lookup.data.renewable,
                    "openbao token loaded"
                );
                Ok(Lease {
                    token,
                    id,
                    since: Instant::now(),
                    ttl,
                    login_ttl: ttl,
                    renewable: lookup.data.renewable,
                })
            }
        }
    }

    /// `POST auth/token/renew-self` for `lease`; installs the renewed lease unless it was
    /// replaced meanwhile.
    async fn renew(&self, client: &Transport, lease: &Lease) -> Result<Arc<Lease>, SecretError> {
        let answer = client
            .send(
                Method::POST,
                "auth/token/renew-self",
                Some(&lease.token),
                Some(Bytes::from_static(b"{}")),
            )
            .await?;
        if !answer.status.is_success() {
            return Err(login_refused(client, "renewing the token failed"));
        }
        let auth = auth_block(client, "auth/token/renew-self", &answer)?;
        let renewed = Arc::new(Lease {
            token: lease.token.clone(),
            id: lease.id,
            since: Instant::now(),
            ttl: ttl_from_seconds(auth.lease_duration),
            login_ttl: lease.login_ttl,
            renewable: auth.renewable,
        });
        debug!(ttl_seconds = auth.lease_duration, "openbao token renewed");
        let _one_at_a_time = self.replacing.lock().await;
        if self.current().is_some_and(|current| current.id == lease.id) {
            self.install(Arc::clone(&renewed));
        }
        Ok(renewed)
    }
}

/// Keeps berth's token valid for as long as the store lives (the store aborts it on drop).
pub(super) async fn keep_token_fresh(session: &Session, client: &Transport) {
    let mut backoff = RETRY_MIN;
    loop {
        let Some(lease) = session.current() else {
            match session.replace(client, None).await {
                Ok(_) => backoff = RETRY_MIN,
                Err(err) => {
                    warn!(error = %err, retry_in_ms = millis(backoff), "openbao login failed; retrying");
                    backoff = wait_then_grow(backoff).await;
                }
            }
            continue;
        };
        let Some(renew_at) = lease.renew_at() else {
            // A token without expiry; look again later (token_file may change).
            tokio::time::sleep(IDLE_RECHECK).await;
            continue;
        };
        tokio::time::sleep_until(renew_at).await;
        if !session
            .current()
            .is_some_and(|current| Arc::ptr_eq(&current, &lease))
        {
            // Replaced or renewed by someone else meanwhile: plan again.
            continue;
        }
        let log_in_again = if lease.renewable {
            match session.renew(client, &lease).await {
                Ok(renewed) if renewed.is_cut_short() => {
                    debug!("openbao token is near its max TTL; logging in again");
                    true
                }
                Ok(_) => false,
                Err(err) => {
                    warn!(error = %err, "openbao token renewal failed; logging in again");
                    true
                }
            }
        } else {
            true
        };
        if log_in_again {
            match session.replace(client, Some(lease.id)).await {
                Ok(_) => backoff = RETRY_MIN,
                Err(err) => {
                    warn!(error = %err, retry_in_ms = millis(backoff), "openbao login failed; retrying");
                    backoff = wait_then_grow(backoff).await;
                }
            }
        }
    }
}

/// Sleeps `backoff` (with up to 25 % jitter) and returns the next, doubled up to [`RETRY_MAX`].
async fn wait_then_grow(backoff: Duration) -> Duration {
    let jitter = backoff.mul_f64(rand::rng().random_range(0.0..0.25));
    tokio::time::sleep(backoff + jitter).await;
    (backoff * 2).min(RETRY_MAX)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// 0 means "never expires".
fn ttl_from_seconds(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

fn login_refused(client: &Transport, reason: &'static str) -> SecretError {
    SecretError::Login {
        address: client.address().to_owned(),
        reason,
    }
}

fn backend(client: &Transport, path: &str, reason: &'static str) -> SecretError {
    SecretError::Backend {
        address: client.address().to_owned(),
        path: path.to_owned(),
        reason,
    }
}

/// `{"role_id": .., "secret_id": ..}` in a zeroized buffer owned by the request body.
fn approle_body(role_id: &str, secret_id: &str) -> Result<Bytes, SecretError> {
    #[derive(Serialize)]
    struct AppRoleLogin<'a> {
        role_id: &'a str,
        secret_id: &'a str,
    }
    let mut buffer = Zeroizing::new(Vec::with_capacity(
        6 * (role_id.len() + secret_id.len()) + 64,
    ));
    serde_json::to_writer(&mut *buffer, &AppRoleLogin { role_id, secret_id }).map_err(|_| {
        SecretError::Invalid {
            field: "secret_id",
            reason: "cannot be encoded",
        }
    })?;
    Ok(Bytes::from_owner(buffer))
}

/// The `auth` block of a login or renewal answer.
fn auth_block(client: &Transport, path: &str, answer: &Answer) -> Result<AuthBlock, SecretError> {
    let parsed: AuthAnswer = answer.json(client.address(), path)?;
    parsed
        .auth
        .ok_or_else(|| backend(client, path, "the answer has no auth block"))
}

#[derive(Deserialize)]
struct AuthAnswer {
    auth: Option<AuthBlock>,
}

/// Holds the token while it is parsed; zeroized on drop.
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct AuthBlock {
    client_token: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

#[derive(Deserialize)]
struct LookupAnswer {
    data: LookupData,
}

/// `lookup-self` data; the answer also holds the token itself (`id`), which is not parsed.
#[derive(Deserialize)]
struct LookupData {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn lease(ttl: Option<u64>, login_ttl: Option<u64>) -> Lease {
        Lease {
            token: SecretString::from("s.token-marker"),
            id: 1,
            since: Instant::now(),
            ttl: ttl.map(Duration::from_secs),
            login_ttl: login_ttl.map(Duration::from_secs),
            renewable: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_two_thirds_and_expires_with_a_margin() {
        let lease = lease(Some(6), Some(6));
        let start = lease.since;
        assert_eq!(lease.renew_at(), Some(start + Duration::from_secs(4)));
        assert!(lease.is_fresh(start));
        assert!(lease.is_fresh(start + Duration::from_millis(4900)));
        assert!(!lease.is_fresh(start + Duration::from_secs(5)));
        assert!(!lease.is_cut_short());

        let forever = self::lease(None, None);
        assert_eq!(forever.renew_at(), None);
        assert!(forever.is_fresh(start + Duration::from_secs(1_000_000)));

        assert!(self::lease(Some(2), Some(6)).is_cut_short());
        assert!(!self::lease(Some(3), Some(6)).is_cut_short());
    }

    #[test]
    fn lease_and_session_debug_redact_the_token() {
        let lease = Arc::new(lease(Some(6), Some(6)));
        assert!(!format!("{lease:?}").contains("token-marker"));
        let session = Session::new(Login::TokenFile(PathBuf::from("/t")));
        session.install(lease);
        let debug = format!("{session:?}");
        assert!(!debug.contains("token-marker"), "{debug}");
        assert!(debug.contains("token_file"), "{debug}");
    }

    #[test]
    fn approle_body_is_json() {
        let body = approle_body("role-1", "se\"cret").unwrap();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["role_id"], "role-1");
        assert_eq!(value["secret_id"], "se\"cret");
    }

    #[test]
    fn auth_block_parses_a_login_answer() {
        let parsed: AuthAnswer = serde_json::from_str(
            r#"{"request_id":"x","auth":{"client_token":"s.abc","accessor":"a","policies":["default"],"lease_duration":6,"renewable":true},"data":null}"#,
        )
        .unwrap();
        let auth = parsed.auth.unwrap();
        assert_eq!(auth.lease_duration, 6);
        assert!(auth.renewable);
        assert_eq!(ttl_from_seconds(0), None);
    }

    #[tokio::test]
    async fn credential_files_must_be_private_and_non_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret-id");
        std::fs::write(&path, "  s3cret-marker\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_credential(&path, true).await.unwrap().as_str(),
            "s3cret-marker"
        );
        check_file(&path, true).unwrap();

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_credential(&path, true).await.unwrap_err();
        assert!(matches!(err, SecretError::CredentialFile { .. }), "{err:?}");
        assert!(!err.to_string().contains("s3cret-marker"));
        // The role id is not secret: group-readable is fine.
        read_credential(&path, false).await.unwrap();

        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_credential(&path, true).await,
            Err(SecretError::CredentialFile {
                reason: "empty",
                ..
            })
        ));
        assert!(matches!(
            check_file(&dir.path().join("missing"), true),
            Err(SecretError::Io { .. })
        ));
        assert!(matches!(
            check_file(dir.path(), false),
            Err(SecretError::CredentialFile { .. })
        ));
    }
}
