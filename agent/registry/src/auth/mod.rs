//! Registry authentication for one pull, from a stored credential.
//!
//! The registry's challenge decides: a Basic registry gets the credential (or a Google access
//! token as `oauth2accesstoken`) on each request; a Bearer registry gets a token from its
//! realm, asked for with Basic (docker, ACR service principal), the OAuth2 refresh grant (ACR
//! refresh token, Docker identity token: the all-zero GUID username) or, for GAR, Basic with a
//! Google access token. Tokens are cached in memory per (registry, repository, secret) until
//! shortly before they expire; they are never written anywhere.

pub mod challenge;
mod google;
mod order_credential;
mod realm;
mod token;
mod wire;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use tokio::time::Instant;
use tracing::{debug, instrument};

use berth_core::metrics::{RegistryLabels, SharedMetrics};
use berth_core::order::ImageRef;
use berth_secrets::{gar_key, Credential, SecretKind, StoredSecret};
pub use order_credential::OrderCredential;
use token::{Endpoint, Token};
use wire::Wire;
pub use wire::WireAuth;

/// The username that marks the password as an OAuth2 refresh token (ACR; Docker identity tokens).
pub const REFRESH_TOKEN_USERNAME: &str = "00000000-0000-0000-0000-000000000000";

/// Why a credential could not be turned into registry access. Never carries material.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("secret {secret} is for {server}, not for registry {registry}")]
    WrongServer {
        secret: String,
        server: String,
        registry: String,
    },
    #[error(
        "registry {registry} refused the credential of secret {secret} for repository {repository}"
    )]
    Rejected {
        registry: String,
        repository: String,
        secret: String,
    },
    #[error("token endpoint {host} is not reachable")]
    Unreachable {
        host: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {registry} is not reachable")]
    RegistryUnreachable {
        registry: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("token endpoint {realm} of registry {registry} answered {status}")]
    TokenEndpointDown {
        realm: String,
        registry: String,
        status: u16,
    },
    #[error("token endpoint {realm} of registry {registry}, for repository {repository} with secret {secret}: {reason}")]
    TokenResponse {
        realm: String,
        registry: String,
        repository: String,
        secret: String,
        reason: &'static str,
    },
    #[error("registry {registry}: {reason}")]
    Challenge {
        registry: String,
        reason: &'static str,
    },
    #[error(
        "registry {registry} named a token realm berth will not send credentials to: {reason}"
    )]
    Realm {
        registry: String,
        reason: &'static str,
    },
    #[error("secret {secret} holds a service-account key that cannot sign")]
    KeyUnusable { secret: String },
    #[error("secret {secret} holds an invalid service-account key")]
    Key {
        secret: String,
        #[source]
        source: gar_key::KeyError,
    },
    #[error("setting up the token client")]
    Client(#[source] reqwest::Error),
}

impl AuthError {
    /// The registry or token endpoint may answer if asked again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AuthError::RegistryUnreachable { .. }
                | AuthError::Unreachable { .. }
                | AuthError::TokenEndpointDown { .. }
        )
    }
}

/// Settings shared with the registry client: which hosts speak plain HTTP, which CAs to trust.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub plain_http: Vec<String>,
    pub ca_pems: Vec<Vec<u8>>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Attempts per request (connection errors, timeouts, 429 and 5xx are retried).
    pub retries: u32,
}

/// Registry authentication ready for one pull, and whether it came from the cache (a refused
/// cached token is dropped and asked for again, once).
#[derive(Debug)]
pub struct Grant {
    pub auth: WireAuth,
    pub cached: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    registry: String,
    repository: String,
    secret: String,
}

#[derive(Debug)]
struct Cached {
    auth: WireAuth,
    expires_at: Instant,
}

/// Turns stored credentials into registry authentication, with a token cache.
#[derive(Debug)]
pub struct Authenticator {
    http: reqwest::Client,
    retries: u32,
    metrics: SharedMetrics,
    plain_http: Vec<String>,
    tokens: Mutex<HashMap<CacheKey, Cached>>,
    google: Mutex<HashMap<String, Cached>>,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings, metrics: SharedMetrics) -> Result<Self, AuthError> {
        let mut certificates = Vec::new();
        for pem in &settings.ca_pems {
            certificates
                .extend(reqwest::Certificate::from_pem_bundle(pem).map_err(AuthError::Client)?);
        }
        let http = reqwest::Client::builder()
            // Credentials go to the realm the registry named, never to where it redirects.
            .redirect(reqwest::redirect::Policy::none())
            .tls_certs_merge(certificates)
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.read_timeout)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(AuthError::Client)?;
        Ok(Self {
            http,
            retries: settings.retries.max(1),
            metrics,
            plain_http: settings.plain_http.clone(),
            tokens: Mutex::default(),
            google: Mutex::default(),
        })
    }

    /// Registry authentication for pulling `image` with `secret` (anonymous without one).
    #[instrument(skip_all, fields(image = %image, secret = secret.map(|s| s.meta.id.to_string()).unwrap_or_default()))]
    pub async fn grant(
        &self,
        secret: Option<&StoredSecret>,
        image: &ImageRef,
    ) -> Result<Grant, AuthError> {
        let Some(secret) = secret else {
            return self.anonymous(image).await;
        };
        let registry = image.registry();
        if secret.meta.server != registry {
            return Err(AuthError::WrongServer {
                secret: secret.meta.id.to_string(),
                server: secret.meta.server.clone(),
                registry: registry.to_owned(),
            });
        }
        let key = CacheKey {
            registry: registry.to_owned(),
            repository: image.repository().to_owned(),
            secret: secret.meta.id.to_string(),
        };
        if let Some(auth) = lookup(&self.tokens, &key) {
            debug!("registry token from cache");
            self.metrics
                .token_cache_hits
                .get_or_create(&RegistryLabels {
                    registry: registry.to_owned(),
                })
                .inc();
            return Ok(Grant { auth, cached: true });
        }
        let (auth, lifetime) = self.authenticate(secret, image).await?;
        let auth = store(&self.tokens, key, auth, lifetime);
        Ok(Grant {
            auth,
            cached: false,
        })
    }

    /// Drops a cached token the registry refused.
    pub fn forget(&self, secret: &StoredSecret, image: &ImageRef) {
        let key = CacheKey {
            registry: image.registry().to_owned(),
            repository: image.repository().to_owned(),
            secret: secret.meta.id.to_string(),
        };
        lock(&self.tokens).remove(&key);
        lock(&self.google).remove(secret.meta.id.as_str());
    }

    /// What a session with `host` sends for `repository`. `auth` is the order's grant for its
    /// own registry (kept as it is when `host` is that registry), or what a mirror may be sent:
    /// Basic credentials are exchanged at that host's own challenge, and an anonymous session
    /// answers it too (both after the realm checks).
    pub async fn session_auth(
        &self,
        auth: WireAuth,
        own_registry: bool,
        host: &str,
        plain: bool,
        repository: &str,
        attempts: u32,
    ) -> Result<WireAuth, AuthError> {
        match auth.0 {
            Wire::Bearer(_) | Wire::Basic { .. } if own_registry => Ok(auth),
            Wire::Basic { username, password } => {
                self.grant_at(
                    host,
                    plain,
                    repository,
                    Some((&username, &password)),
                    attempts,
                )
                .await
            }
            Wire::Anonymous => self.grant_at(host, plain, repository, None, attempts).await,
            Wire::Bearer(token) => Ok(WireAuth::bearer(token)),
        }
    }

    /// Authentication at `host` (a mirror, or the registry itself) for `repository`, with
    /// `basic` credentials or anonymously, answering `host`'s own challenge after the same realm
    /// checks as every other token request. Not cached: mirrors are tried rarely.
    pub async fn grant_at(
        &self,
        host: &str,
        plain: bool,
        repository: &str,
        basic: Option<(&str, &SecretString)>,
        attempts: u32,
    ) -> Result<WireAuth, AuthError> {
        let challenge =
            berth_core::retry::retry(attempts, AuthError::is_transient, || self.ping(host, plain))
                .await?;
        let Some(challenge::Challenge::Bearer { realm, service }) = challenge else {
            // No challenge, or Basic: the credential (if any) goes to the host itself.
            return Ok(match basic {
                Some((username, password)) => WireAuth::basic(username, password),
                None => WireAuth::anonymous(),
            });
        };
        let plain_hosts: Vec<String> = if plain {
            vec![host.to_owned()]
        } else {
            Vec::new()
        };
        let url = realm::check(&realm, host, &plain_hosts)?;
        let endpoint = Endpoint {
            url,
            registry: host,
            repository,
            secret: "(mirror credential)",
        };
        let scope = format!("repository:{repository}:pull");
        let token = match basic {
            Some((username, password)) => {
                self.metrics.token_request(host, "mirror");
                endpoint
                    .get_with_basic(&self.http, service.as_deref(), &scope, username, password)
                    .await?
            }
            None => {
                self.metrics.token_request(host, "anonymous");
                endpoint
                    .get_anonymous(&self.http, service.as_deref(), &scope)
                    .await?
            }
        };
        Ok(WireAuth::bearer(token.value))
    }

    /// The token realm `host` (the registry, or a mirror) names in its challenge, after the
    /// same checks as every token request; None when it asks for Basic or nothing. For
    /// ExplainPull: nothing is sent but the `/v2/` ping.
    pub async fn realm_at(&self, host: &str, plain: bool) -> Result<Option<String>, AuthError> {
        match self.challenge_at(host, plain).await? {
            Some(challenge::Challenge::Bearer { realm, .. }) => {
                let plain_hosts: Vec<String> = if plain {
                    vec![host.to_owned()]
                } else {
                    Vec::new()
                };
                let url = realm::check(&realm, host, &plain_hosts)?;
                Ok(Some(url.to_string()))
            }
            Some(challenge::Challenge::Basic) | None => Ok(None),
        }
    }

    /// Anonymous access: berth asks the registry's token realm itself, checked like any realm,
    /// for an anonymous token, so a hostile registry cannot make berthd send a request to any
    /// realm it names (SSRF).
    async fn anonymous(&self, image: &ImageRef) -> Result<Grant, AuthError> {
        let registry = image.registry();
        let auth = match self.challenge(registry).await? {
            Some(challenge::Challenge::Bearer { realm, service }) => {
                let url = realm::check(&realm, registry, &self.plain_http)?;
                let endpoint = Endpoint {
                    url,
                    registry,
                    repository: image.repository(),
                    secret: "(anonymous)",
                };
                self.metrics.token_request(registry, "anonymous");
                let scope = format!("repository:{}:pull", image.repository());
                let token = endpoint
                    .get_anonymous(&self.http, service.as_deref(), &scope)
                    .await?;
                WireAuth::bearer(token.value)
            }
            Some(challenge::Challenge::Basic) | None => WireAuth::anonymous(),
        };
        Ok(Grant {
            auth,
            cached: false,
        })
    }

    async fn authenticate(
        &self,
        secret: &StoredSecret,
        image: &ImageRef,
    ) -> Result<(WireAuth, Duration), AuthError> {
        let registry = image.registry();
        let secret_id = secret.meta.id.to_string();
        let challenge = self.challenge(registry).await?;
        let scope = format!("repository:{}:pull", image.repository());
        // The credential presented to the registry or its realm as Basic, if any.
        let (username, password) = match (&secret.meta.kind, &secret.credential) {
            (
                SecretKind::Docker | SecretKind::Acr,
                Credential::UsernamePassword { username, password },
            ) => (username.clone(), password.clone()),
            (SecretKind::Gar, Credential::JsonKey(json)) => {
                let access = self.google_access_token(&secret_id, json, image).await?;
                (google::ACCESS_TOKEN_USERNAME.to_owned(), access)
            }
            _ => {
                return Err(AuthError::KeyUnusable { secret: secret_id });
            }
        };
        let Some(challenge) = challenge else {
            // The registry asks for nothing: present the credential as Basic anyway.
            return Ok((
                WireAuth(Wire::Basic { username, password }),
                Duration::from_secs(300),
            ));
        };
        match challenge {
            challenge::Challenge::Basic => Ok((
                WireAuth(Wire::Basic { username, password }),
                Duration::from_secs(300),
            )),
            challenge::Challenge::Bearer { realm, service } => {
                let url = realm::check(&realm, registry, &self.plain_http)?;
                let endpoint = Endpoint {
                    url,
                    registry,
                    repository: image.repository(),
                    secret: &secret_id,
                };
                let kind = match (secret.meta.kind, username == REFRESH_TOKEN_USERNAME) {
                    (_, true) => "acr_refresh",
                    (SecretKind::Docker, false) => "docker",
                    (SecretKind::Acr, false) => "acr",
                    (SecretKind::Gar, false) => "gar",
                };
                self.metrics.token_request(registry, kind);
                let token: Token = if username == REFRESH_TOKEN_USERNAME {
                    endpoint
                        .post_refresh(&self.http, service.as_deref(), &scope, &username, &password)
                        .await?
                } else {
                    endpoint
                        .get_with_basic(
                            &self.http,
                            service.as_deref(),
                            &scope,
                            &username,
                            &password,
                        )
                        .await?
                };
                debug!(
                    lifetime_seconds = token.lifetime.as_secs(),
                    "registry token issued"
                );
                Ok((WireAuth::bearer(token.value), token.lifetime))
            }
        }
    }

    /// Asks the registry what it wants: None when `/v2/` answers 2xx (no auth needed), the
    /// challenge when it answers 401. Connection errors, timeouts, 429 and 5xx are retried and
    /// end as RegistryUnreachable; nothing is cached from such an answer.
    async fn challenge(&self, registry: &str) -> Result<Option<challenge::Challenge>, AuthError> {
        let plain = self.plain_http.iter().any(|host| host == registry);
        self.challenge_at(registry, plain).await
    }

    async fn challenge_at(
        &self,
        registry: &str,
        plain: bool,
    ) -> Result<Option<challenge::Challenge>, AuthError> {
        berth_core::retry::retry(self.retries, AuthError::is_transient, || {
            self.ping(registry, plain)
        })
        .await
    }

    async fn ping(
        &self,
        registry: &str,
        plain: bool,
    ) -> Result<Option<challenge::Challenge>, AuthError> {
        let scheme = if plain { "http" } else { "https" };
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let url = format!("{scheme}://{host}/v2/");
        let unreachable =
            |source: Box<dyn std::error::Error + Send + Sync>| AuthError::RegistryUnreachable {
                registry: registry.to_owned(),
                source,
            };
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| unreachable(Box::new(source)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(None);
        }
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(unreachable(format!("/v2/ answered {status}").into()));
        }
        if status != reqwest::StatusCode::UNAUTHORIZED {
            return Err(AuthError::Challenge {
                registry: registry.to_owned(),
                reason: "its /v2/ endpoint answered neither 2xx nor 401",
            });
        }
        let header = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| AuthError::Challenge {
                registry: registry.to_owned(),
                reason: "401 without a WWW-Authenticate challenge",
            })?;
        challenge::parse(header)
            .map(Some)
            .map_err(|_| AuthError::Challenge {
                registry: registry.to_owned(),
                reason: "its WWW-Authenticate header does not parse",
            })
    }

    /// A Google access token for the key in `json`, cached per secret.
    async fn google_access_token(
        &self,
        secret_id: &str,
        json: &SecretString,
        image: &ImageRef,
    ) -> Result<SecretString, AuthError> {
        if let Some(WireAuth(Wire::Bearer(token))) = lookup(&self.google, secret_id) {
            return Ok(token);
        }
        let key = gar_key::parse(json).map_err(|source| AuthError::Key {
            secret: secret_id.to_owned(),
            source,
        })?;
        let url = reqwest::Url::parse(&key.token_uri).map_err(|_| AuthError::KeyUnusable {
            secret: secret_id.to_owned(),
        })?;
        let assertion = google::assertion(&key, secret_id, SystemTime::now())?;
        let endpoint = Endpoint {
            url,
            registry: image.registry(),
            repository: image.repository(),
            secret: secret_id,
        };
        self.metrics.token_request(image.registry(), "google");
        let token = endpoint.post_jwt_assertion(&self.http, &assertion).await?;
        let value = token.value.clone();
        lock(&self.google).insert(
            secret_id.to_owned(),
            Cached {
                auth: WireAuth::bearer(token.value),
                expires_at: expiry(token.lifetime),
            },
        );
        Ok(value)
    }
}

fn lock<K, V>(map: &Mutex<HashMap<K, V>>) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Cached entries are used until shortly before they expire: a tenth of their life, at most 30 s.
fn expiry(lifetime: Duration) -> Instant {
    let margin = (lifetime / 10).min(Duration::from_secs(30));
    Instant::now() + lifetime.saturating_sub(margin)
}

/// A live cache entry (expired ones are dropped on the way), cloned: the secret stays a
/// `SecretString` in both copies.
fn lookup<K, Q>(map: &Mutex<HashMap<K, Cached>>, key: &Q) -> Option<WireAuth>
where
    K: std::borrow::Borrow<Q> + Eq + std::hash::Hash,
    Q: Eq + std::hash::Hash + ?Sized,
{
    let mut map = lock(map);
    map.retain(|_, cached| cached.expires_at > Instant::now());
    map.get(key).map(|cached| cached.auth.clone())
}

fn store(
    map: &Mutex<HashMap<CacheKey, Cached>>,
    key: CacheKey,
    auth: WireAuth,
    lifetime: Duration,
) -> WireAuth {
    let result = auth.clone();
    lock(map).insert(
        key,
        Cached {
            auth,
            expires_at: expiry(lifetime),
        },
    );
    result
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    fn key() -> CacheKey {
        CacheKey {
            registry: "r".into(),
            repository: "a/b".into(),
            secret: "secret-x".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cached_tokens_expire_shortly_before_their_lifetime() {
        let map = Mutex::default();
        store(
            &map,
            key(),
            WireAuth::bearer(SecretString::from("t")),
            Duration::from_secs(300),
        );
        tokio::time::advance(Duration::from_secs(269)).await;
        assert!(
            matches!(lookup(&map, &key()), Some(WireAuth(Wire::Bearer(t))) if t.expose_secret() == "t")
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            lookup(&map, &key()).is_none(),
            "300 s token is dropped 30 s early"
        );

        store(
            &map,
            key(),
            WireAuth::bearer(SecretString::from("t")),
            Duration::from_secs(60),
        );
        tokio::time::advance(Duration::from_secs(53)).await;
        assert!(lookup(&map, &key()).is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            lookup(&map, &key()).is_none(),
            "60 s token is dropped 6 s early"
        );
    }

    #[test]
    fn cached_auth_debug_is_redacted() {
        let auth = WireAuth::basic("u", &SecretString::from("zzpasszz"));
        assert!(!format!("{auth:?}").contains("zzpasszz"));
    }
}
