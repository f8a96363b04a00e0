//! Azure Container Registry's token endpoints (protocols.md §C; Azure/acr `docs/AAD-OAuth.md`,
//! `docs/Token-BasicAuth.md`). The service is the ACR registry's own `host:port`, registered by
//! [`super::super::registry::Registry::start_acr`].
//!
//! - `GET /oauth2/token?service=..&scope=..` with a service principal's Basic (app id + secret)
//!   -> `{"access_token": <registry JWT>}` (ACR documents no `expires_in`).
//! - `POST /oauth2/token`, form `grant_type=refresh_token&service=..&scope=..&refresh_token=..`
//!   (`scope` space-separated, possibly repeated) -> `{"access_token": <registry JWT>}` for a
//!   known refresh token of that service that has not expired; an expired one is refused the
//!   way the test chose ([`RefreshRejection`]), an unknown one with 401.
//! - `POST /oauth2/exchange`, form `grant_type=access_token&service=..&tenant=..&access_token=..`
//!   (an AAD access token) -> `{"refresh_token": <JWT>}`, valid 3 hours, as `az acr login
//!   --expose-token` shows it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::{Form, Json};
use serde_json::{json, Value};

use super::{
    basic_credentials, granted_scopes, lock, query_values, unix_now, Grants, TokenEndpoint,
    TokenServer, TokenState, Users,
};
use crate::harness::ca::TestCa;
use crate::harness::credentials::RegistryUser;
use crate::harness::random_lowercase;

/// How long an ACR refresh token lives (protocols.md §C5: 3 hours).
const REFRESH_TOKEN_LIFETIME: u64 = 3 * 3600;

/// How the refresh grant refuses a refresh token that has expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefreshRejection {
    /// 401 with distribution's `{"errors": [..]}` body.
    #[default]
    Unauthorized,
    /// 400 `{"error": "invalid_grant"}` (RFC 6749 §5.2).
    InvalidGrant,
}

/// What an AAD login yields: an access token for a tenant, to exchange for an ACR refresh token.
#[derive(Clone)]
pub struct AadLogin {
    /// The AAD identity's name (the request-count identity).
    pub identity: String,
    pub tenant: String,
    pub access_token: String,
}

impl std::fmt::Debug for AadLogin {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AadLogin")
            .field("identity", &self.identity)
            .field("tenant", &self.tenant)
            .field("access_token", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Default)]
pub(crate) struct AcrState {
    /// The services (registry `host:port`s) this server issues tokens for.
    services: Mutex<BTreeSet<String>>,
    /// Service principals: app id -> (secret, grants).
    principals: Users,
    /// AAD access token -> who it belongs to.
    aad_logins: Mutex<HashMap<String, AadIdentity>>,
    /// ACR refresh token -> what it stands for.
    refresh_tokens: Mutex<HashMap<String, RefreshRecord>>,
}

#[derive(Debug, Clone)]
struct AadIdentity {
    name: String,
    tenant: String,
    grants: Grants,
}

#[derive(Debug, Clone)]
struct RefreshRecord {
    identity: String,
    service: String,
    grants: Grants,
    expires_at: u64,
    rejection: RefreshRejection,
}

/// A random GUID, lower case, as Azure prints app ids and tenants.
pub fn random_guid() -> String {
    let hex = hex::encode(rand::random::<[u8; 16]>());
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

impl TokenServer {
    /// Issues ACR tokens for `service` (an ACR registry's `host:port`) from now on.
    pub fn register_acr_service(&self, service: &str) {
        lock(&self.state.acr.services).insert(service.to_owned());
    }

    /// Adds (or replaces) a service principal: app id (`user.username`) and client secret.
    pub fn add_acr_principal(&self, user: &RegistryUser, grants: Grants) {
        super::add_user(&self.state.acr.principals, user, grants);
    }

    /// An AAD identity named `identity` in a fresh tenant, and the access token its login gave.
    pub fn add_aad_identity(&self, identity: &str, grants: Grants) -> AadLogin {
        let login = AadLogin {
            identity: identity.to_owned(),
            tenant: random_guid(),
            access_token: format!("aad-{}", random_lowercase(48)),
        };
        lock(&self.state.acr.aad_logins).insert(
            login.access_token.clone(),
            AadIdentity {
                name: identity.to_owned(),
                tenant: login.tenant.clone(),
                grants,
            },
        );
        login
    }

    /// `POST /oauth2/exchange` for `login` at `service`, over HTTPS as any client would; returns
    /// the ACR refresh token (what `az acr login --expose-token` prints).
    pub async fn exchange_for_refresh_token(
        &self,
        ca: &TestCa,
        service: &str,
        login: &AadLogin,
    ) -> anyhow::Result<String> {
        let response = ca
            .http_client()?
            .post(self.acr_exchange_url())
            .form(&[
                ("grant_type", "access_token"),
                ("service", service),
                ("tenant", login.tenant.as_str()),
                ("access_token", login.access_token.as_str()),
            ])
            .send()
            .await
            .context("POST /oauth2/exchange")?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .context("reading the exchange answer")?;
        if !status.is_success() {
            bail!("POST /oauth2/exchange answered {status}: {body}");
        }
        body["refresh_token"]
            .as_str()
            .map(str::to_owned)
            .context("the exchange answer has no refresh_token")
    }

    /// Makes `refresh_token` expired: the refresh grant then refuses it with `rejection`.
    pub fn expire_refresh_token(
        &self,
        refresh_token: &str,
        rejection: RefreshRejection,
    ) -> anyhow::Result<()> {
        let mut records = lock(&self.state.acr.refresh_tokens);
        let record = records
            .get_mut(refresh_token)
            .context("no such refresh token was issued")?;
        record.expires_at = unix_now().saturating_sub(60);
        record.rejection = rejection;
        Ok(())
    }

    /// Every ACR refresh token issued so far.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        lock(&self.state.acr.refresh_tokens)
            .keys()
            .cloned()
            .collect()
    }
}

/// 401 in ACR's (distribution's) error format.
fn unauthorized(message: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]})),
    )
        .into_response()
}

/// An OAuth2 error (RFC 6749 §5.2), 400.
fn oauth_error(error: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": error}))).into_response()
}

/// The single value of `key`, if given exactly once.
fn single<'a>(pairs: &'a [(String, String)], key: &'a str) -> Option<&'a str> {
    let mut values = query_values(pairs, key);
    let value = values.next()?;
    values.next().is_none().then_some(value)
}

impl TokenState {
    fn acr_service_known(&self, service: Option<&str>) -> bool {
        service.is_some_and(|service| lock(&self.acr.services).contains(service))
    }

    /// `{"access_token": jwt}` for `identity` at `service`.
    fn acr_access_token(
        &self,
        identity: &str,
        service: &str,
        pairs: &[(String, String)],
        grants: &Grants,
    ) -> Response {
        let access = granted_scopes(query_values(pairs, "scope"), grants);
        match self.issue(identity, service, access) {
            Ok(token) => Json(json!({"access_token": token})).into_response(),
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    }
}

/// `GET /oauth2/token` with a service principal's Basic.
pub(super) async fn basic_token(
    State(state): State<Arc<TokenState>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let endpoint = TokenEndpoint::AcrBasic;
    let credentials = basic_credentials(&headers);
    let username = credentials
        .as_ref()
        .map(|(username, _)| username.clone())
        .unwrap_or_default();
    state.count(endpoint, &username);
    let service = single(&query, "service");
    if !state.acr_service_known(service) {
        state.refuse(endpoint, format!("unknown service {service:?}"));
        return oauth_error("invalid_request");
    }
    let grants = credentials.and_then(|(username, password)| {
        state.authenticate(&state.acr.principals, &username, &password)
    });
    let Some(grants) = grants else {
        state.refuse(
            endpoint,
            format!("unknown service principal or wrong secret for {username:?}"),
        );
        return unauthorized("authentication required");
    };
    state.acr_access_token(&username, service.unwrap_or_default(), &query, &grants)
}

/// `POST /oauth2/token` with `grant_type=refresh_token`.
pub(super) async fn refresh_token(
    State(state): State<Arc<TokenState>>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let endpoint = TokenEndpoint::AcrRefresh;
    let record = single(&form, "refresh_token")
        .and_then(|token| lock(&state.acr.refresh_tokens).get(token).cloned());
    state.count(
        endpoint,
        record
            .as_ref()
            .map_or("", |record| record.identity.as_str()),
    );
    if single(&form, "grant_type") != Some("refresh_token") {
        state.refuse(endpoint, "grant_type is not refresh_token".to_owned());
        return oauth_error("unsupported_grant_type");
    }
    let service = single(&form, "service");
    if !state.acr_service_known(service) {
        state.refuse(endpoint, format!("unknown service {service:?}"));
        return oauth_error("invalid_request");
    }
    let Some(record) = record else {
        state.refuse(endpoint, "unknown refresh token".to_owned());
        return unauthorized("invalid refresh token");
    };
    if service != Some(record.service.as_str()) {
        state.refuse(
            endpoint,
            format!(
                "refresh token of {} is for service {}, not {service:?}",
                record.identity, record.service
            ),
        );
        return unauthorized("refresh token is for another registry");
    }
    if record.expires_at <= unix_now() {
        state.refuse(
            endpoint,
            format!("expired refresh token of {}", record.identity),
        );
        return match record.rejection {
            RefreshRejection::Unauthorized => unauthorized("refresh token has expired"),
            RefreshRejection::InvalidGrant => oauth_error("invalid_grant"),
        };
    }
    state.acr_access_token(&record.identity, &record.service, &form, &record.grants)
}

/// `POST /oauth2/exchange`: an AAD access token for an ACR refresh token.
pub(super) async fn exchange(
    State(state): State<Arc<TokenState>>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let endpoint = TokenEndpoint::AcrExchange;
    let identity = single(&form, "access_token")
        .and_then(|token| lock(&state.acr.aad_logins).get(token).cloned());
    state.count(
        endpoint,
        identity
            .as_ref()
            .map_or("", |identity| identity.name.as_str()),
    );
    if single(&form, "grant_type") != Some("access_token") {
        state.refuse(endpoint, "grant_type is not access_token".to_owned());
        return oauth_error("unsupported_grant_type");
    }
    let service = single(&form, "service");
    if !state.acr_service_known(service) {
        state.refuse(endpoint, format!("unknown service {service:?}"));
        return oauth_error("invalid_request");
    }
    let Some(identity) = identity else {
        state.refuse(endpoint, "unknown AAD access token".to_owned());
        return unauthorized("invalid AAD access token");
    };
    if single(&form, "tenant") != Some(identity.tenant.as_str()) {
        state.refuse(endpoint, format!("wrong tenant for {}", identity.name));
        return unauthorized("the AAD access token is not from that tenant");
    }
    let service = service.unwrap_or_default();
    let now = unix_now();
    let expires_at = now + REFRESH_TOKEN_LIFETIME;
    let claims = json!({
        "jti": random_guid(),
        "sub": identity.name,
        "nbf": now - 10,
        "exp": expires_at,
        "iat": now,
        "iss": "Azure Container Registry",
        "aud": service,
        "version": "1.0",
        "grant_type": "refresh_token",
        "tenant": identity.tenant,
        "permissions": {"actions": ["read"], "notActions": null},
    });
    let Ok(refresh_token) = state.sign(&claims) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    lock(&state.acr.refresh_tokens).insert(
        refresh_token.clone(),
        RefreshRecord {
            identity: identity.name,
            service: service.to_owned(),
            grants: identity.grants,
            expires_at,
            rejection: RefreshRejection::default(),
        },
    );
    Json(json!({"refresh_token": refresh_token})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_look_like_azure_ids() {
        let guid = random_guid();
        let groups: Vec<usize> = guid.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{guid}");
        assert!(guid.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        assert_ne!(guid, random_guid());
    }

    #[test]
    fn single_refuses_repeated_fields() {
        let pairs = [
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
            ("b".to_owned(), "3".to_owned()),
        ];
        assert_eq!(single(&pairs, "a"), Some("1"));
        assert_eq!(single(&pairs, "b"), None);
        assert_eq!(single(&pairs, "c"), None);
    }
}
