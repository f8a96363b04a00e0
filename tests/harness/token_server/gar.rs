//! Google Artifact Registry's token endpoint (protocols.md §A1, §D): the realm of a challenge
//! without `service`. `GET /v2/token?scope=..` (a `service` parameter may be absent or empty)
//! with Basic `oauth2accesstoken:<access token>` -> `{"token": <registry JWT>, "expires_in": ..}`
//! granting what the access token's service account was granted. The access token must be one
//! the Google stand-in ([`GoogleOAuth`]) issued and that has not expired; anything else gets 401.
//! Other Basic users (the harness's pusher) are accepted too; anonymous gets an empty grant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::bail;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use serde_json::json;

use super::{
    basic_credentials, granted_scopes, lock, query_values, unauthorized, Grants, TokenEndpoint,
    TokenServer, TokenState, Users, EXPIRES_IN,
};
use crate::harness::credentials::RegistryUser;
use crate::harness::google::{GoogleOAuth, GoogleTokens, ServiceAccount};

/// The registry user name that carries a Google access token as the password.
pub const ACCESS_TOKEN_USERNAME: &str = "oauth2accesstoken";

#[derive(Debug, Default)]
pub(crate) struct GarState {
    /// The Google stand-in whose access tokens are accepted.
    google: OnceLock<GoogleTokens>,
    /// Service-account email -> its grants (its IAM roles on repositories).
    accounts: Mutex<HashMap<String, Grants>>,
    /// Plain Basic users (the harness's pusher).
    users: Users,
}

impl TokenServer {
    /// Accepts access tokens issued by `google` (once per token server).
    pub fn trust_google(&self, google: &GoogleOAuth) -> anyhow::Result<()> {
        if self.state.gar.google.set(google.tokens()).is_err() {
            bail!("the token server already trusts a Google stand-in");
        }
        Ok(())
    }

    /// What `account` may do in the GAR registry.
    pub fn grant_service_account(&self, account: &ServiceAccount, grants: Grants) {
        lock(&self.state.gar.accounts).insert(account.client_email.clone(), grants);
    }

    /// Adds (or replaces) a plain Basic user of the GAR realm.
    pub fn add_gar_user(&self, user: &RegistryUser, grants: Grants) {
        super::add_user(&self.state.gar.users, user, grants);
    }
}

/// `GET /v2/token`.
pub(super) async fn token(
    State(state): State<Arc<TokenState>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let endpoint = TokenEndpoint::Gar;
    let (identity, grants) = match basic_credentials(&headers) {
        None => {
            state.count(endpoint, "");
            (String::new(), Grants::none())
        }
        Some((username, access_token)) if username == ACCESS_TOKEN_USERNAME => {
            let owner = state
                .gar
                .google
                .get()
                .and_then(|google| google.owner(&access_token));
            let Some(email) = owner else {
                state.count(endpoint, &username);
                state.refuse(
                    endpoint,
                    "oauth2accesstoken with an unknown or expired access token".to_owned(),
                );
                return unauthorized();
            };
            state.count(endpoint, &email);
            let grants = lock(&state.gar.accounts)
                .get(&email)
                .cloned()
                .unwrap_or_default();
            (email, grants)
        }
        Some((username, password)) => {
            state.count(endpoint, &username);
            match state.authenticate(&state.gar.users, &username, &password) {
                Some(grants) => (username, grants),
                None => {
                    state.refuse(
                        endpoint,
                        format!("unknown user or wrong password for {username:?}"),
                    );
                    return unauthorized();
                }
            }
        }
    };
    if query_values(&query, "service")
        .any(|service| !service.is_empty() && service != state.gar_service)
    {
        state.refuse(endpoint, "unknown service".to_owned());
        return (StatusCode::BAD_REQUEST, "unknown service").into_response();
    }
    let access = granted_scopes(query_values(&query, "scope"), &grants);
    match state.issue(&identity, &state.gar_service, access) {
        Ok(token) => Json(json!({
            "token": token,
            "expires_in": EXPIRES_IN,
            "issued_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }))
        .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
