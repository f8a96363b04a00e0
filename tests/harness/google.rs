//! A stand-in for Google's OAuth2 token endpoint (`https://oauth2.googleapis.com/token`), in
//! process over TLS on its own port, and the service-account JSON keys it knows (protocols.md §D;
//! golang/oauth2 `jwt/jwt.go`, Google's "OAuth 2.0 for Server to Server Applications").
//!
//! `POST /token`, form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>`.
//! The assertion must be an RS256 JWT (a `kid`, when present, equal to the key's
//! `private_key_id`) whose signature verifies with the PUBLIC key of the service account named
//! by `iss`, with `aud` = this endpoint's URL, a `scope` holding cloud-platform, integer `iat`
//! and `exp` with `0 < exp - iat <= 3600`, not expired and not issued in the future. Then
//! `{"access_token": "ya29.<random>", "expires_in": 3599, "token_type": "Bearer"}`; otherwise
//! 400 `{"error": "invalid_grant", ..}` (or `unsupported_grant_type`). Every key is a fresh RSA
//! 2048 key made by the test.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
use axum::{Form, Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    RsaKeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256,
};
use rsa::pkcs1::EncodeRsaPublicKey as _;
use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};
use serde_json::{json, Value};

use super::ca::TestCa;
use super::random_lowercase;
use super::server::ServerTask;
use super::token_server::{lock, unix_now};

/// The scope Artifact Registry needs.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// RFC 7523's grant type.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// What Google answers as `expires_in`.
pub const ACCESS_TOKEN_LIFETIME: u64 = 3599;

/// The longest an assertion may live (`exp - iat`).
pub const MAX_ASSERTION_LIFETIME: u64 = 3600;

/// How far in the future `iat` may be.
const CLOCK_SKEW: u64 = 60;

/// The running stand-in.
#[derive(Debug)]
pub struct GoogleOAuth {
    state: Arc<GoogleState>,
    token_uri: String,
    _server: ServerTask,
}

#[derive(Debug, Default)]
struct GoogleState {
    token_uri: OnceLock<String>,
    /// client_email -> its public key and key id.
    accounts: Mutex<HashMap<String, KnownAccount>>,
    /// access token -> (client_email, expiry in seconds since the epoch).
    access_tokens: Mutex<HashMap<String, (String, u64)>>,
    /// Token POSTs per claimed `iss` ("" when unreadable), refused ones included.
    requests: Mutex<BTreeMap<String, usize>>,
    /// Every assertion received (credential material: for leak scans).
    assertions: Mutex<Vec<String>>,
    /// Why assertions were refused (never material).
    refusals: Mutex<Vec<String>>,
}

#[derive(Debug, Clone)]
struct KnownAccount {
    private_key_id: String,
    /// PKCS#1 RSAPublicKey DER.
    public_key_der: Vec<u8>,
}

/// Decides, for the GAR realm, whose access token a registry login carries.
#[derive(Debug, Clone)]
pub struct GoogleTokens(Arc<GoogleState>);

impl GoogleTokens {
    /// The service account an unexpired `access_token` was issued to.
    pub fn owner(&self, access_token: &str) -> Option<String> {
        lock(&self.0.access_tokens)
            .get(access_token)
            .filter(|(_, expires_at)| *expires_at > unix_now())
            .map(|(email, _)| email.clone())
    }
}

impl GoogleOAuth {
    /// Starts on a fresh 127.0.0.1 port with the CA's server certificate.
    pub async fn start(ca: &TestCa) -> anyhow::Result<Self> {
        let state = Arc::new(GoogleState::default());
        let router = Router::new()
            .route("/token", post(token))
            .with_state(Arc::clone(&state));
        let server = ServerTask::start(router, Some(ca.rustls_server_config()?)).await?;
        let token_uri = format!("https://{}/token", server.addr());
        state
            .token_uri
            .set(token_uri.clone())
            .map_err(|_| anyhow::anyhow!("the token URI was set twice"))?;
        Ok(Self {
            state,
            token_uri,
            _server: server,
        })
    }

    /// `https://127.0.0.1:PORT/token`: every key's `token_uri`, and the assertions' `aud`.
    pub fn token_uri(&self) -> &str {
        &self.token_uri
    }

    /// A service account `<name>@berth-test.iam.gserviceaccount.com` with a fresh RSA 2048 key,
    /// known to this endpoint by its public key.
    pub async fn create_service_account(&self, name: &str) -> anyhow::Result<ServiceAccount> {
        let token_uri = self.token_uri.clone();
        let name = name.to_owned();
        let account =
            tokio::task::spawn_blocking(move || ServiceAccount::generate(&name, &token_uri))
                .await
                .context("generating a service-account key")??;
        lock(&self.state.accounts).insert(
            account.client_email.clone(),
            KnownAccount {
                private_key_id: account.private_key_id.clone(),
                public_key_der: account.public_key_der.clone(),
            },
        );
        Ok(account)
    }

    /// The handle the GAR realm uses to resolve access tokens.
    pub fn tokens(&self) -> GoogleTokens {
        GoogleTokens(Arc::clone(&self.state))
    }

    /// How many token POSTs claimed to be from `client_email`, refused ones included.
    pub fn token_requests_by(&self, client_email: &str) -> usize {
        lock(&self.state.requests)
            .get(client_email)
            .copied()
            .unwrap_or(0)
    }

    /// Every access token issued so far.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        lock(&self.state.access_tokens).keys().cloned().collect()
    }

    /// Every assertion received so far.
    pub fn received_assertions(&self) -> Vec<String> {
        lock(&self.state.assertions).clone()
    }

    /// Why assertions were refused so far.
    pub fn refusals(&self) -> Vec<String> {
        lock(&self.state.refusals).clone()
    }
}

/// An OAuth2 error answer, 400.
fn oauth_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn token(
    State(state): State<Arc<GoogleState>>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let field = |key: &str| {
        let mut values = form.iter().filter(|(name, _)| name == key);
        let first = values.next().map(|(_, value)| value.as_str());
        if values.next().is_some() {
            None
        } else {
            first
        }
    };
    let assertion = field("assertion").unwrap_or_default();
    let claimed_iss = jwt_part(assertion, 1)
        .and_then(|claims| claims["iss"].as_str().map(str::to_owned))
        .unwrap_or_default();
    *lock(&state.requests).entry(claimed_iss).or_default() += 1;
    if !assertion.is_empty() {
        lock(&state.assertions).push(assertion.to_owned());
    }
    if field("grant_type") != Some(JWT_BEARER_GRANT) {
        lock(&state.refusals).push("grant_type is not jwt-bearer".to_owned());
        return oauth_error("unsupported_grant_type", "Invalid grant_type.");
    }
    match verify(&state, assertion, unix_now()) {
        Ok(client_email) => {
            let access_token = format!("ya29.{}", random_lowercase(96));
            lock(&state.access_tokens).insert(
                access_token.clone(),
                (client_email, unix_now() + ACCESS_TOKEN_LIFETIME),
            );
            Json(json!({
                "access_token": access_token,
                "expires_in": ACCESS_TOKEN_LIFETIME,
                "token_type": "Bearer",
            }))
            .into_response()
        }
        Err(reason) => {
            lock(&state.refusals).push(reason.clone());
            oauth_error("invalid_grant", &reason)
        }
    }
}

/// One base64url (unpadded) JSON part of a JWT.
fn jwt_part(jwt: &str, index: usize) -> Option<Value> {
    let part = jwt.split('.').nth(index)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

/// The service account an assertion proves to be, or why it proves nothing.
fn verify(state: &GoogleState, assertion: &str, now: u64) -> Result<String, String> {
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header_part, claims_part, signature_part] = parts.as_slice() else {
        return Err("the assertion is not three dot-separated parts".to_owned());
    };
    let header = jwt_part(assertion, 0).ok_or("the JWT header is not base64url JSON")?;
    let claims = jwt_part(assertion, 1).ok_or("the JWT claims are not base64url JSON")?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {} is not RS256", header["alg"]));
    }
    let iss = claims["iss"].as_str().ok_or("no iss claim")?;
    let account = lock(&state.accounts)
        .get(iss)
        .cloned()
        .ok_or_else(|| format!("iss {iss} is no known service account"))?;
    if let Some(kid) = header.get("kid") {
        if kid.as_str() != Some(account.private_key_id.as_str()) {
            return Err(format!("kid {kid} is not {iss}'s private_key_id"));
        }
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature_part)
        .map_err(|_| "the signature is not base64url".to_owned())?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &account.public_key_der)
        .verify(
            format!("{header_part}.{claims_part}").as_bytes(),
            &signature,
        )
        .map_err(|_| format!("invalid JWT signature for {iss}"))?;
    let token_uri = state.token_uri.get().map(String::as_str);
    if claims["aud"].as_str() != token_uri {
        return Err(format!("aud {} is not {token_uri:?}", claims["aud"]));
    }
    let scope = claims["scope"].as_str().unwrap_or_default();
    if !scope.split_whitespace().any(|s| s == CLOUD_PLATFORM_SCOPE) {
        return Err(format!("scope {scope:?} lacks cloud-platform"));
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err("iat and exp must be integers".to_owned());
    };
    if exp <= iat || exp - iat > MAX_ASSERTION_LIFETIME {
        return Err(format!(
            "exp - iat = {} s",
            i128::from(exp) - i128::from(iat)
        ));
    }
    if exp <= now {
        return Err("the assertion has expired".to_owned());
    }
    if iat > now + CLOCK_SKEW {
        return Err("iat is in the future".to_owned());
    }
    Ok(iss.to_owned())
}

/// A service account and its JSON key. `Debug` leaves the private key out.
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: String,
    pub project_id: String,
    pub token_uri: String,
    private_key_pem: String,
    private_key_pkcs8: Vec<u8>,
    public_key_der: Vec<u8>,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .field("private_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// A fresh RSA 2048 key for `<name>@berth-test.iam.gserviceaccount.com` (blocking: key
    /// generation takes a moment).
    fn generate(name: &str, token_uri: &str) -> anyhow::Result<Self> {
        let key = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048)
            .context("generating an RSA 2048 key")?;
        let private_key_pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .context("encoding the key as PKCS#8 PEM")?
            .to_string();
        let private_key_pkcs8 = key
            .to_pkcs8_der()
            .context("encoding the key as PKCS#8 DER")?
            .as_bytes()
            .to_vec();
        let public_key_der = key
            .to_public_key()
            .to_pkcs1_der()
            .context("encoding the public key")?
            .as_bytes()
            .to_vec();
        let project_id = "berth-test".to_owned();
        Ok(Self {
            client_email: format!("{name}@{project_id}.iam.gserviceaccount.com"),
            private_key_id: hex::encode(rand::random::<[u8; 20]>()),
            project_id,
            token_uri: token_uri.to_owned(),
            private_key_pem,
            private_key_pkcs8,
            public_key_der,
        })
    }

    /// The JSON key file, with every field a real one has.
    pub fn json_key(&self) -> String {
        self.json_key_value().to_string()
    }

    /// The JSON key file without `field`.
    pub fn json_key_without(&self, field: &str) -> String {
        let mut key = self.json_key_value();
        if let Some(object) = key.as_object_mut() {
            object.remove(field);
        }
        key.to_string()
    }

    /// The JSON key file with `field` set to `value`.
    pub fn json_key_with(&self, field: &str, value: &str) -> String {
        let mut key = self.json_key_value();
        key[field] = Value::from(value);
        key.to_string()
    }

    fn json_key_value(&self) -> Value {
        json!({
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": "104242424242424242424",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!(
                "https://www.googleapis.com/robot/v1/metadata/x509/{}",
                self.client_email.replace('@', "%40")
            ),
            "universe_domain": "googleapis.com",
        })
    }

    /// Distinctive 40-character slices of the private key's base64 body (PEM lines are 64), as
    /// they appear in the PEM and in the JSON key alike: what a leak scan looks for.
    pub fn private_key_needles(&self) -> Vec<String> {
        let body: Vec<&str> = self
            .private_key_pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        [2, body.len() / 2, body.len().saturating_sub(3)]
            .iter()
            .filter_map(|index| body.get(*index))
            .filter_map(|line| line.get(12..52))
            .map(str::to_owned)
            .collect()
    }

    /// An RS256 JWT of `header` (alg set to RS256) and `claims`, signed with this key.
    pub fn sign_jwt(&self, header: &Value, claims: &Value) -> anyhow::Result<String> {
        let mut header = header.clone();
        header["alg"] = Value::from("RS256");
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
        );
        let key_pair = RsaKeyPair::from_pkcs8(&self.private_key_pkcs8)
            .map_err(|rejected| anyhow::anyhow!("loading the RSA key: {rejected}"))?;
        let mut signature = vec![0; key_pair.public().modulus_len()];
        key_pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|unspecified| anyhow::anyhow!("signing: {unspecified}"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }

    /// The assertion golang/oauth2 would send now (`iat` back-dated 10 s, one hour of life).
    pub fn assertion(&self) -> anyhow::Result<String> {
        let iat = unix_now() - 10;
        self.sign_jwt(
            &json!({"typ": "JWT", "kid": self.private_key_id}),
            &json!({
                "iss": self.client_email,
                "scope": CLOUD_PLATFORM_SCOPE,
                "aud": self.token_uri,
                "iat": iat,
                "exp": iat + MAX_ASSERTION_LIFETIME,
            }),
        )
    }
}
