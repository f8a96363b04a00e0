//! Registry token servers (docs/spec/auth/token.md and the ACR and GAR variants), in process over
//! TLS on one port, all minting the ES256 JWTs distribution 2.8 verifies.
//!
//! - Docker, `GET /token?service=..&scope=..(&scope=..)` with optional `Authorization: Basic`. A
//!   wrong password (or an unknown user) gets 401; anyone else gets a JWT granting the
//!   intersection of the requested scopes and the user's grants (anonymous: none), which is
//!   protocol-correct: the registry then answers 401 `insufficient_scope`. `POST` gets 404, which
//!   tells an OAuth2 client to fall back to `GET` (oauth.md).
//! - ACR ([`acr`], protocols.md §C): `GET /oauth2/token` with a service principal's Basic,
//!   `POST /oauth2/token` with `grant_type=refresh_token`, `POST /oauth2/exchange` (AAD access
//!   token -> ACR refresh token). The service is each ACR registry's own `host:port`.
//! - GAR ([`gar`], protocols.md §D): `GET /v2/token` with Basic `oauth2accesstoken:<Google access
//!   token>` (issued by [`super::google::GoogleOAuth`]); the service may be absent.
//!
//! The JWT's `kid` is the libtrust key id of the signing key, whose self-signed certificate is
//! every token registry's `rootcertbundle` (protocols.md A6-A8). Requests are counted per endpoint
//! and identity, so tests can assert caching; every token handed out is kept for leak scans.

pub mod acr;
pub mod gar;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData as _};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

use super::ca::TestCa;
use super::credentials::RegistryUser;
use super::server::ServerTask;
use super::{random_lowercase, temp_dir};

pub use acr::RefreshRejection;

/// Lifetime of every registry token, in seconds.
pub const EXPIRES_IN: u64 = 300;

/// A grant on every repository.
const ALL_REPOSITORIES: &str = "*";

/// The `users` entry (empty user name and password) holding what anonymous requests get.
const ANONYMOUS: &str = "";

/// What one identity may do: repository name (or `*`) -> actions.
#[derive(Debug, Clone, Default)]
pub struct Grants(BTreeMap<String, BTreeSet<String>>);

impl Grants {
    /// No access to anything (the identity still authenticates and gets an empty token).
    pub fn none() -> Self {
        Self::default()
    }

    /// `pull` on `repository` (`*` for all).
    pub fn pull(mut self, repository: &str) -> Self {
        self.add(repository, &["pull"]);
        self
    }

    /// `pull` and `push` on every repository.
    pub fn push_all(mut self) -> Self {
        self.add(ALL_REPOSITORIES, &["pull", "push"]);
        self
    }

    fn add(&mut self, repository: &str, actions: &[&str]) {
        self.0
            .entry(repository.to_owned())
            .or_default()
            .extend(actions.iter().map(|action| (*action).to_owned()));
    }

    fn actions_on(&self, repository: &str) -> BTreeSet<String> {
        [repository, ALL_REPOSITORIES]
            .iter()
            .filter_map(|name| self.0.get(*name))
            .flatten()
            .cloned()
            .collect()
    }
}

/// The token endpoints, for request counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenEndpoint {
    /// `GET /token` (Docker; Basic). Identity: the user name, "" for anonymous.
    Docker,
    /// `GET /oauth2/token` (ACR; a service principal's Basic). Identity: the user name.
    AcrBasic,
    /// `POST /oauth2/token` (ACR; `grant_type=refresh_token`). Identity: the AAD identity the
    /// refresh token was issued to, "" for an unknown refresh token.
    AcrRefresh,
    /// `POST /oauth2/exchange` (ACR; AAD access token -> refresh token). Identity: the AAD
    /// identity, "" for an unknown access token.
    AcrExchange,
    /// `GET /v2/token` (GAR; Basic `oauth2accesstoken:<Google access token>`). Identity: the
    /// service account's email, else the Basic user name.
    Gar,
}

/// Basic users of one realm: user name -> (password, grants).
type Users = Mutex<HashMap<String, (String, Grants)>>;

/// The running token server.
#[derive(Debug)]
pub struct TokenServer {
    state: Arc<TokenState>,
    addr: String,
    signing_cert_path: PathBuf,
    _server: ServerTask,
    _dir: TempDir,
}

pub(crate) struct TokenState {
    issuer: String,
    /// The Docker registry's service (its JWT audience).
    service: String,
    /// The GAR registry's configured service; its challenge does not show it.
    gar_service: String,
    kid: String,
    signer: EcdsaKeyPair,
    random: SystemRandom,
    users: Users,
    acr: acr::AcrState,
    gar: gar::GarState,
    /// Token requests per (endpoint, identity), refused ones included.
    requests: Mutex<BTreeMap<(TokenEndpoint, String), usize>>,
    /// Every registry token handed out, for leak scans.
    issued: Mutex<Vec<String>>,
    /// Why requests were refused (no secrets), for failure messages.
    refusals: Mutex<Vec<String>>,
}

impl std::fmt::Debug for TokenState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TokenState")
            .field("issuer", &self.issuer)
            .field("service", &self.service)
            .field("gar_service", &self.gar_service)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenServer {
    /// Starts on a fresh 127.0.0.1 port with the CA's server certificate, with these Docker users.
    pub async fn start(ca: &TestCa, users: &[(&RegistryUser, Grants)]) -> anyhow::Result<Self> {
        let dir = temp_dir("token-server")?;
        let signing_key = KeyPair::generate().context("generating the token signing key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "berth test token signer");
        let signing_cert = params
            .self_signed(&signing_key)
            .context("self-signing the token signing certificate")?;
        let signing_cert_path = dir.path().join("token-signing.pem");
        std::fs::write(&signing_cert_path, signing_cert.pem())
            .with_context(|| format!("writing {}", signing_cert_path.display()))?;

        let random = SystemRandom::new();
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            signing_key.serialized_der(),
            &random,
        )
        .map_err(|rejected| anyhow::anyhow!("loading the token signing key: {rejected}"))?;

        let state = Arc::new(TokenState {
            issuer: "berth-test-issuer".to_owned(),
            service: "berth-test-registry".to_owned(),
            gar_service: "berth-test-gar".to_owned(),
            kid: libtrust_key_id(&signing_key.subject_public_key_info()),
            signer,
            random,
            users: Mutex::default(),
            acr: acr::AcrState::default(),
            gar: gar::GarState::default(),
            requests: Mutex::default(),
            issued: Mutex::default(),
            refusals: Mutex::default(),
        });
        for (user, grants) in users {
            add_user(&state.users, user, grants.clone());
        }
        let router = Router::new()
            .route("/token", any(docker_token))
            .route(
                "/oauth2/token",
                get(acr::basic_token).post(acr::refresh_token),
            )
            .route("/oauth2/exchange", post(acr::exchange))
            .route("/v2/token", get(gar::token))
            .with_state(Arc::clone(&state));
        let server = ServerTask::start(router, Some(ca.rustls_server_config()?)).await?;
        Ok(Self {
            addr: server.addr().to_string(),
            state,
            signing_cert_path,
            _server: server,
            _dir: dir,
        })
    }

    /// `https://127.0.0.1:PORT/token`: the Docker registry's `auth.token.realm`.
    pub fn realm(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    /// `https://127.0.0.1:PORT/oauth2/token`: an ACR registry's `auth.token.realm`.
    pub fn acr_realm(&self) -> String {
        format!("https://{}/oauth2/token", self.addr)
    }

    /// `https://127.0.0.1:PORT/oauth2/exchange`.
    pub fn acr_exchange_url(&self) -> String {
        format!("https://{}/oauth2/exchange", self.addr)
    }

    /// `https://127.0.0.1:PORT/v2/token`: the GAR registry's `auth.token.realm`.
    pub fn gar_realm(&self) -> String {
        format!("https://{}/v2/token", self.addr)
    }

    /// The Docker registry's JWT audience and challenge `service`.
    pub fn service(&self) -> &str {
        &self.state.service
    }

    /// The GAR registry's JWT audience (configured in the registry, dropped from its challenge).
    pub fn gar_service(&self) -> &str {
        &self.state.gar_service
    }

    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// The PEM of the signing certificate: every token registry's `rootcertbundle`.
    pub fn signing_cert_path(&self) -> &Path {
        &self.signing_cert_path
    }

    /// Adds (or replaces) a Docker user.
    pub fn add_user(&self, user: &RegistryUser, grants: Grants) {
        add_user(&self.state.users, user, grants);
    }

    /// What a token request without credentials gets on the Docker realm (a public repository).
    pub fn grant_anonymous(&self, grants: Grants) {
        lock(&self.state.users).insert(ANONYMOUS.to_owned(), (String::new(), grants));
    }

    /// How many `GET /token` requests `username` made ("" for anonymous), refused ones included.
    pub fn requests_by(&self, username: &str) -> usize {
        self.requests(TokenEndpoint::Docker, username)
    }

    /// How many requests `identity` made to `endpoint` (see [`TokenEndpoint`]), refused ones
    /// included.
    pub fn requests(&self, endpoint: TokenEndpoint, identity: &str) -> usize {
        lock(&self.state.requests)
            .get(&(endpoint, identity.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Every request count so far, as `endpoint identity: count` lines (for failure messages).
    pub fn request_summary(&self) -> String {
        lock(&self.state.requests)
            .iter()
            .map(|((endpoint, identity), count)| format!("{endpoint:?} {identity:?}: {count}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every registry token issued so far (all realms).
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.state.issued).clone()
    }

    /// Why requests were refused so far (never secret material).
    pub fn refusals(&self) -> Vec<String> {
        lock(&self.state.refusals).clone()
    }
}

fn add_user(users: &Users, user: &RegistryUser, grants: Grants) {
    lock(users).insert(user.username.clone(), (user.password.clone(), grants));
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

impl TokenState {
    fn count(&self, endpoint: TokenEndpoint, identity: &str) {
        *lock(&self.requests)
            .entry((endpoint, identity.to_owned()))
            .or_default() += 1;
    }

    fn refuse(&self, endpoint: TokenEndpoint, reason: String) {
        lock(&self.refusals).push(format!("{endpoint:?}: {reason}"));
    }

    /// The grants of a Basic user of `users` whose password matches.
    fn authenticate(&self, users: &Users, username: &str, password: &str) -> Option<Grants> {
        match lock(users).get(username) {
            Some((expected, grants)) if expected == password => Some(grants.clone()),
            _ => None,
        }
    }

    /// A registry JWT for `audience` granting `access`, remembered for leak scans.
    fn issue(&self, subject: &str, audience: &str, access: Vec<Value>) -> anyhow::Result<String> {
        let now = unix_now();
        let token = self.sign(&json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + EXPIRES_IN,
            "nbf": now - 10,
            "iat": now,
            "jti": random_lowercase(16),
            "access": access,
        }))?;
        lock(&self.issued).push(token.clone());
        Ok(token)
    }

    /// An ES256 JWT of `claims` with a raw `r||s` signature and the libtrust `kid` (protocols.md
    /// A7); callers keep times integers and `aud` a string.
    fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let header = json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
        );
        let signature = self
            .signer
            .sign(&self.random, signing_input.as_bytes())
            .map_err(|unspecified| anyhow::anyhow!("signing a token: {unspecified}"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

async fn docker_token(
    State(state): State<Arc<TokenState>>,
    method: Method,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    if method != Method::GET {
        // The OAuth2 POST flow is not implemented; 404 is what tells a client to fall back to GET.
        state.refuse(
            TokenEndpoint::Docker,
            format!("{method} answered 404 (no OAuth2 form flow: fall back to GET)"),
        );
        return StatusCode::NOT_FOUND.into_response();
    }
    let credentials = basic_credentials(&headers);
    let username = credentials
        .as_ref()
        .map(|(username, _)| username.clone())
        .unwrap_or_default();
    state.count(TokenEndpoint::Docker, &username);

    let grants = match &credentials {
        // Anonymous: what `grant_anonymous` gave (by default nothing).
        None => state
            .authenticate(&state.users, ANONYMOUS, "")
            .unwrap_or_default(),
        Some((username, password)) => match state.authenticate(&state.users, username, password) {
            Some(grants) => grants,
            None => {
                state.refuse(
                    TokenEndpoint::Docker,
                    format!("unknown user or wrong password for {username:?}"),
                );
                return unauthorized();
            }
        },
    };
    if query
        .iter()
        .any(|(key, value)| key == "service" && value != &state.service)
    {
        state.refuse(TokenEndpoint::Docker, "unknown service".to_owned());
        return (StatusCode::BAD_REQUEST, "unknown service").into_response();
    }
    let access = granted_scopes(query_values(&query, "scope"), &grants);
    match state.issue(&username, &state.service, access) {
        Ok(token) => Json(json!({
            "token": token,
            "access_token": token,
            "expires_in": EXPIRES_IN,
            "issued_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }))
        .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The values of every `key` parameter.
fn query_values<'a>(
    pairs: &'a [(String, String)],
    key: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    pairs
        .iter()
        .filter(move |(name, _)| name == key)
        .map(|(_, value)| value.as_str())
}

/// The access entries granted for these `scope` values (each may hold several space-separated
/// scopes, as in the OAuth2 POST form; the GET form repeats the parameter instead).
fn granted_scopes<'a>(scopes: impl Iterator<Item = &'a str>, grants: &Grants) -> Vec<Value> {
    scopes
        .flat_map(|scope| scope.split(' '))
        .filter(|scope| !scope.is_empty())
        .filter_map(|scope| granted_access(scope, grants))
        .collect()
}

/// 401 in distribution's error format.
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"berth-test-token\"")],
        Json(json!({"errors": [{"code": "UNAUTHORIZED", "message": "authentication failed"}]})),
    )
        .into_response()
}

/// `Authorization: Basic base64(user:pass)`, when present and well formed.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some((username.to_owned(), password.to_owned()))
}

/// The access entry for one requested `type:name:actions` scope: the actions both requested and
/// granted, or `None` when that is nothing. The name may hold a `:` (a registry port), so the type
/// is split off at the first `:` and the actions at the last.
fn granted_access(scope: &str, grants: &Grants) -> Option<Value> {
    let (resource_type, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if resource_type != "repository" {
        return None;
    }
    let allowed = grants.actions_on(name);
    let actions: Vec<&str> = actions
        .split(',')
        .filter(|action| allowed.contains(*action))
        .collect();
    if actions.is_empty() {
        return None;
    }
    Some(json!({"type": resource_type, "name": name, "actions": actions}))
}

/// The libtrust key id (protocols.md A8): SHA-256 of the SubjectPublicKeyInfo DER, first 30 bytes,
/// RFC 4648 base32 (48 chars, no padding), in 12 groups of 4 joined by `:`.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let encoded = data_encoding::BASE32_NOPAD.encode(&digest[..30]);
    encoded
        .as_bytes()
        .chunks(4)
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    use super::*;

    /// The P-256 key from docs/spec/auth/jwt.md, whose kid the doc (and protocols.md A8) gives.
    #[test]
    fn libtrust_key_id_matches_the_jwt_md_vector() {
        let x = URL_SAFE_NO_PAD
            .decode("m7zUpx3b-zmVE5cymSs64POG9QcyEpJaYCD82-549_Q")
            .unwrap();
        let y = URL_SAFE_NO_PAD
            .decode("dU3biz8sZ_8GPB-odm8Wxz3lNDr1xcAQQPQaOcr1fmc")
            .unwrap();
        // SubjectPublicKeyInfo { id-ecPublicKey, prime256v1 } with the uncompressed point 04||x||y.
        let mut spki = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
        spki.push(0x04);
        spki.extend_from_slice(&x);
        spki.extend_from_slice(&y);
        assert_eq!(
            libtrust_key_id(&spki),
            "PYYO:TEWU:V7JH:26JV:AQTZ:LJC3:SXVJ:XGHA:34F2:2LAQ:ZRMK:Z7Q6"
        );
    }

    #[test]
    fn grants_are_the_intersection_of_request_and_permission() {
        let grants = Grants::none().pull("team/app");
        assert_eq!(
            granted_access("repository:team/app:pull,push", &grants),
            Some(json!({"type": "repository", "name": "team/app", "actions": ["pull"]}))
        );
        assert_eq!(granted_access("repository:other/app:pull", &grants), None);
        assert_eq!(granted_access("registry:catalog:*", &grants), None);
        let everything = Grants::none().push_all();
        assert_eq!(
            granted_access("repository:127.0.0.1:5000/app:push,pull", &everything),
            Some(
                json!({"type": "repository", "name": "127.0.0.1:5000/app", "actions": ["push", "pull"]})
            )
        );
    }

    #[test]
    fn space_separated_and_repeated_scopes_are_both_read() {
        let grants = Grants::none().pull("a/one").pull("a/two");
        let form = [
            (
                "scope".to_owned(),
                "repository:a/one:pull repository:x/no:pull".to_owned(),
            ),
            ("service".to_owned(), "s".to_owned()),
            ("scope".to_owned(), "repository:a/two:pull".to_owned()),
        ];
        let access = granted_scopes(query_values(&form, "scope"), &grants);
        assert_eq!(
            access,
            vec![
                json!({"type": "repository", "name": "a/one", "actions": ["pull"]}),
                json!({"type": "repository", "name": "a/two", "actions": ["pull"]}),
            ]
        );
    }
}
