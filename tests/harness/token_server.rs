//! A Docker Registry v2 token server (docs/spec/auth/token.md), in process over TLS.
//!
//! `GET /token?service=..&scope=..(&scope=..)` with optional `Authorization: Basic`. A wrong
//! password (or an unknown user) gets 401; anyone else gets an ES256 JWT granting the intersection
//! of the requested scopes and the user's grants (anonymous: none), which is protocol-correct: the
//! registry then answers 401 `insufficient_scope`. The JWT's `kid` is the libtrust key id of the
//! signing key, whose self-signed certificate is the registry's `rootcertbundle` (protocols.md A6-A8).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::any;
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

/// Lifetime of every token, in seconds.
const EXPIRES_IN: u64 = 300;

/// A grant on every repository.
const ALL_REPOSITORIES: &str = "*";

/// What one user may do: repository name (or `*`) -> actions.
#[derive(Debug, Clone, Default)]
pub struct Grants(BTreeMap<String, BTreeSet<String>>);

impl Grants {
    /// No access to anything (the user still authenticates and gets an empty token).
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

/// The running token server.
#[derive(Debug)]
pub struct TokenServer {
    state: Arc<TokenState>,
    realm: String,
    signing_cert_path: PathBuf,
    _server: ServerTask,
    _dir: TempDir,
}

struct TokenState {
    issuer: String,
    service: String,
    kid: String,
    signer: EcdsaKeyPair,
    random: SystemRandom,
    users: Mutex<HashMap<String, (String, Grants)>>,
    /// Token requests per user name ("" for anonymous), failed ones included.
    requests: Mutex<HashMap<String, usize>>,
    /// Every token handed out, for leak scans.
    issued: Mutex<Vec<String>>,
}

impl std::fmt::Debug for TokenState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TokenState")
            .field("issuer", &self.issuer)
            .field("service", &self.service)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenServer {
    /// Starts on a fresh 127.0.0.1 port with the CA's server certificate, with these users.
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
            kid: libtrust_key_id(&signing_key.subject_public_key_info()),
            signer,
            random,
            users: Mutex::new(
                users
                    .iter()
                    .map(|(user, grants)| {
                        (
                            user.username.clone(),
                            (user.password.clone(), grants.clone()),
                        )
                    })
                    .collect(),
            ),
            requests: Mutex::default(),
            issued: Mutex::default(),
        });
        let router = Router::new()
            .route("/token", any(token))
            .with_state(Arc::clone(&state));
        let server = ServerTask::start(router, Some(ca.rustls_server_config()?)).await?;
        Ok(Self {
            realm: format!("https://{}/token", server.addr()),
            state,
            signing_cert_path,
            _server: server,
            _dir: dir,
        })
    }

    /// `https://127.0.0.1:PORT/token`: the registry's `auth.token.realm`.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The JWT audience and the challenge's `service`.
    pub fn service(&self) -> &str {
        &self.state.service
    }

    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// The PEM of the signing certificate: the registry's `rootcertbundle`.
    pub fn signing_cert_path(&self) -> &Path {
        &self.signing_cert_path
    }

    /// How many token requests `username` made ("" for anonymous), refused ones included.
    pub fn requests_by(&self, username: &str) -> usize {
        lock(&self.state.requests)
            .get(username)
            .copied()
            .unwrap_or(0)
    }

    /// Every token issued so far.
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.state.issued).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn token(
    State(state): State<Arc<TokenState>>,
    method: Method,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    if method != Method::GET {
        // The OAuth2 POST flow is not implemented; 404 is what tells a client to fall back to GET.
        return StatusCode::NOT_FOUND.into_response();
    }
    let credentials = basic_credentials(&headers);
    let username = credentials
        .as_ref()
        .map(|(username, _)| username.clone())
        .unwrap_or_default();
    *lock(&state.requests).entry(username.clone()).or_default() += 1;

    let grants = match &credentials {
        None => Grants::none(),
        Some((username, password)) => match lock(&state.users).get(username) {
            Some((expected, grants)) if expected == password => grants.clone(),
            _ => return unauthorized(),
        },
    };
    if query
        .iter()
        .any(|(key, value)| key == "service" && value != &state.service)
    {
        return (StatusCode::BAD_REQUEST, "unknown service").into_response();
    }
    let access: Vec<Value> = query
        .iter()
        .filter(|(key, _)| key == "scope")
        .flat_map(|(_, scope)| scope.split(' '))
        .filter_map(|scope| granted_access(scope, &grants))
        .collect();

    match state.mint(&username, access) {
        Ok(token) => {
            lock(&state.issued).push(token.clone());
            Json(json!({
                "token": token,
                "access_token": token,
                "expires_in": EXPIRES_IN,
                "issued_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }))
            .into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

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

impl TokenState {
    /// An ES256 JWT with integer times, a string `aud` and a raw `r||s` signature (protocols.md A7).
    fn mint(&self, subject: &str, access: Vec<Value>) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("reading the clock")?
            .as_secs();
        let header = json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let claims = json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + EXPIRES_IN,
            "nbf": now - 10,
            "iat": now,
            "jti": random_lowercase(16),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
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
}
