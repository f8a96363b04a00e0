//! Token endpoints: the Docker token GET with Basic, the OAuth2 refresh-token POST (ACR, Docker
//! identity tokens) and the Google JWT-bearer POST. Responses are read with a size cap, and
//! redirects are never followed.

use std::time::Duration;

use futures::StreamExt as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::AuthError;

/// Largest token response berth reads.
const MAX_RESPONSE: usize = 1 << 20;
/// Lifetime assumed when the response names none (token.md: 60 s).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);

/// A token and how long it lives.
#[derive(Debug)]
pub(super) struct Token {
    pub(super) value: SecretString,
    pub(super) lifetime: Duration,
}

#[derive(Deserialize)]
struct Response {
    token: Option<SecretString>,
    access_token: Option<SecretString>,
    expires_in: Option<u64>,
}

/// Where a token request goes and on whose behalf (for error messages).
#[derive(Debug, Clone)]
pub(super) struct Endpoint<'a> {
    pub(super) url: reqwest::Url,
    pub(super) registry: &'a str,
    pub(super) repository: &'a str,
    pub(super) secret: &'a str,
}

impl Endpoint<'_> {
    fn rejected(&self) -> AuthError {
        AuthError::Rejected {
            registry: self.registry.to_owned(),
            repository: self.repository.to_owned(),
            secret: self.secret.to_owned(),
        }
    }

    fn unreachable(&self, source: reqwest::Error) -> AuthError {
        AuthError::Unreachable {
            host: self.realm_name(),
            source,
        }
    }

    fn bad_response(&self, reason: &'static str) -> AuthError {
        AuthError::TokenResponse {
            realm: self.realm_name(),
            registry: self.registry.to_owned(),
            repository: self.repository.to_owned(),
            secret: self.secret.to_owned(),
            reason,
        }
    }

    /// `host[:port]` of the token endpoint, for messages.
    fn realm_name(&self) -> String {
        match (self.url.host_str(), self.url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            _ => String::new(),
        }
    }

    /// `GET realm?service=..&scope=..` without credentials: an anonymous token (token.md).
    pub(super) async fn get_anonymous(
        &self,
        http: &reqwest::Client,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token, AuthError> {
        let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(service) = service {
            query.push(("service", service));
        }
        self.send(http.get(self.url.clone()).query(&query)).await
    }

    /// `GET realm?service=..&scope=..` with Basic credentials (distribution token.md).
    pub(super) async fn get_with_basic(
        &self,
        http: &reqwest::Client,
        service: Option<&str>,
        scope: &str,
        username: &str,
        password: &SecretString,
    ) -> Result<Token, AuthError> {
        let mut query: Vec<(&str, &str)> = vec![("scope", scope), ("account", username)];
        if let Some(service) = service {
            query.push(("service", service));
        }
        let request = http.get(self.url.clone()).query(&query).header(
            reqwest::header::AUTHORIZATION,
            super::wire::basic_header(username, password),
        );
        self.send(request).await
    }

    /// `POST realm` with `grant_type=refresh_token` (oauth.md; ACR's refresh-token flow).
    /// Token servers that do not implement POST answer 404 (or 405): then, as oauth.md says,
    /// the GET form is used, with the refresh token as Basic credentials under `username`.
    pub(super) async fn post_refresh(
        &self,
        http: &reqwest::Client,
        service: Option<&str>,
        scope: &str,
        username: &str,
        refresh_token: &SecretString,
    ) -> Result<Token, AuthError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("service", service.unwrap_or_default()),
            ("scope", scope),
            ("client_id", "berth"),
            ("refresh_token", refresh_token.expose_secret()),
        ];
        let response = http
            .post(self.url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|err| self.unreachable(err))?;
        if matches!(response.status().as_u16(), 404 | 405) {
            return self
                .get_with_basic(http, service, scope, username, refresh_token)
                .await;
        }
        self.read(response).await
    }

    /// `POST token_uri` with the JWT-bearer grant (RFC 7523; Google service accounts).
    pub(super) async fn post_jwt_assertion(
        &self,
        http: &reqwest::Client,
        assertion: &SecretString,
    ) -> Result<Token, AuthError> {
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.expose_secret()),
        ];
        self.send(http.post(self.url.clone()).form(&form)).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Token, AuthError> {
        let response = request.send().await.map_err(|err| self.unreachable(err))?;
        self.read(response).await
    }

    /// A token from a response, or what its status means.
    async fn read(&self, response: reqwest::Response) -> Result<Token, AuthError> {
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED
            || status == reqwest::StatusCode::FORBIDDEN
            || status == reqwest::StatusCode::BAD_REQUEST
        {
            // OAuth2 servers answer a bad grant (expired refresh token, bad assertion) with 400.
            return Err(self.rejected());
        }
        if status.is_redirection() {
            return Err(self.bad_response("the token endpoint answered with a redirect"));
        }
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(AuthError::TokenEndpointDown {
                realm: self.realm_name(),
                registry: self.registry.to_owned(),
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(self.bad_response("the token endpoint does not answer this request"));
        }
        let mut body = Zeroizing::new(Vec::new());
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| self.unreachable(err))?;
            if body.len() + chunk.len() > MAX_RESPONSE {
                return Err(self.bad_response("token response larger than 1 MiB"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_response(&body)
            .ok_or_else(|| self.bad_response("token response is not valid token JSON"))
    }
}

/// `token` and/or `access_token`; `expires_in` defaults to 60 s and is never taken below it.
/// A token that could not be written into an `Authorization` header (empty, or with control
/// or non-ASCII bytes) counts as none.
pub(super) fn parse_response(body: &[u8]) -> Option<Token> {
    let response: Response = serde_json::from_slice(body).ok()?;
    let usable = |token: &SecretString| {
        let token = token.expose_secret();
        !token.is_empty() && token.bytes().all(|byte| (0x20..0x7f).contains(&byte))
    };
    let value = response
        .access_token
        .filter(usable)
        .or(response.token.filter(usable))?;
    let lifetime = response
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIFETIME)
        .max(DEFAULT_LIFETIME);
    Some(Token { value, lifetime })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses() {
        let t = parse_response(br#"{"token":"a","access_token":"a","expires_in":300}"#).unwrap();
        assert_eq!(t.value.expose_secret(), "a");
        assert_eq!(t.lifetime, Duration::from_secs(300));
        let t = parse_response(br#"{"access_token":"b"}"#).unwrap();
        assert_eq!(t.value.expose_secret(), "b");
        assert_eq!(t.lifetime, DEFAULT_LIFETIME);
        let t = parse_response(br#"{"token":"c","expires_in":5}"#).unwrap();
        assert_eq!(t.lifetime, DEFAULT_LIFETIME, "never below 60 s");
        assert!(parse_response(br#"{"expires_in":5}"#).is_none());
        assert!(parse_response(br#"{"token":""}"#).is_none());
        assert!(parse_response(br#"{"token":"a\nb"}"#).is_none());
        assert!(parse_response(br#"{"token":"a\nb","access_token":"d"}"#).is_some());
        assert!(parse_response(b"<html>").is_none());
        assert!(
            !format!("{:?}", parse_response(br#"{"token":"zzsecretzz"}"#)).contains("zzsecretzz")
        );
    }
}
