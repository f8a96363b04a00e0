//! HTTP to OpenBao's API (`<address>/v1/<path>`), without a session: the client and the
//! session's logins both speak through it.
//!
//! berth's token goes in `X-Vault-Token` (a sensitive header) to `address` only: redirects are
//! not followed (a standby that redirects counts as unavailable). Answers are read whole into
//! zeroized buffers, since a KV read carries material and a login answer carries a token.
//! Transport failures, 5xx, 429 and a sealed server become [`SecretError::Unavailable`]; other
//! statuses are returned for the caller to judge.

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret as _, SecretString};
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::OpenbaoSettings;
use crate::SecretError;

/// The largest answer berth reads (a listing of many ids, or a secret with a 64 KiB key).
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// The token header of OpenBao and Vault.
const TOKEN_HEADER: &str = "X-Vault-Token";

/// One OpenBao answer, read whole. The body may hold material or a token: zeroized on drop.
pub(super) struct Answer {
    pub status: StatusCode,
    pub body: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl Answer {
    /// Whether the body mentions `needle` (for OpenBao's error texts: "sealed", "check-and-set").
    pub(super) fn mentions(&self, needle: &str) -> bool {
        let needle = needle.as_bytes();
        self.body
            .windows(needle.len())
            .any(|window| window.eq_ignore_ascii_case(needle))
    }

    /// The body as JSON; a body that does not parse is [`SecretError::Backend`].
    pub(super) fn json<T: DeserializeOwned>(
        &self,
        address: &str,
        path: &str,
    ) -> Result<T, SecretError> {
        serde_json::from_slice(&self.body).map_err(|_| SecretError::Backend {
            address: address.to_owned(),
            path: path.to_owned(),
            reason: "the answer is not the JSON berth expects",
        })
    }
}

/// The HTTP side of the OpenBao client.
#[derive(Debug)]
pub(super) struct Transport {
    http: reqwest::Client,
    /// `http(s)://host[:port]`, no trailing slash.
    address: String,
}

impl Transport {
    pub(super) fn new(settings: &OpenbaoSettings) -> Result<Transport, SecretError> {
        let backend = |reason| SecretError::Backend {
            address: settings.address.clone(),
            path: String::new(),
            reason,
        };
        let mut certificates = Vec::new();
        for pem in &settings.ca_pems {
            certificates.extend(
                reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|_| backend("a CA file is not a PEM certificate bundle"))?,
            );
        }
        let http = reqwest::Client::builder()
            // The token goes to `address` and nowhere else.
            .redirect(reqwest::redirect::Policy::none())
            .tls_certs_merge(certificates)
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| backend("the http client cannot be set up"))?;
        Ok(Transport {
            http,
            address: settings.address.clone(),
        })
    }

    pub(super) fn address(&self) -> &str {
        &self.address
    }

    /// One HTTP exchange with `<address>/v1/<path>`, with `token` when given. Unreachable, timed
    /// out, sealed, 5xx, 429 and redirects are [`SecretError::Unavailable`].
    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<Bytes>,
    ) -> Result<Answer, SecretError> {
        let url = format!("{}/v1/{path}", self.address);
        let mut request = self
            .http
            .request(method, url)
            .header("X-Vault-Request", "true");
        if let Some(token) = token {
            let mut value =
                HeaderValue::from_str(token.expose_secret()).map_err(|_| SecretError::Login {
                    address: self.address.clone(),
                    reason: "the token is not a valid header value",
                })?;
            value.set_sensitive(true);
            request = request.header(TOKEN_HEADER, value);
        }
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let response = request.send().await.map_err(|source| {
            let reason = if source.is_timeout() {
                "timed out"
            } else {
                "unreachable"
            };
            self.unavailable(reason, Some(source))
        })?;
        let status = response.status();
        let body = read_body(response).await.map_err(|failure| match failure {
            BodyFailure::Cut(source) => self.unavailable("the answer was cut off", Some(source)),
            BodyFailure::TooLarge => SecretError::Backend {
                address: self.address.clone(),
                path: path.to_owned(),
                reason: "the answer is larger than 8 MiB",
            },
        })?;
        let answer = Answer { status, body };
        if let Some(reason) = unavailable_reason(&answer) {
            return Err(self.unavailable(reason, None));
        }
        Ok(answer)
    }

    fn unavailable(&self, reason: &'static str, source: Option<reqwest::Error>) -> SecretError {
        SecretError::Unavailable {
            address: self.address.clone(),
            reason,
            source,
        }
    }
}

/// Why an answer means OpenBao cannot serve now, if it does.
fn unavailable_reason(answer: &Answer) -> Option<&'static str> {
    let status = answer.status;
    if status == StatusCode::SERVICE_UNAVAILABLE && answer.mentions("sealed") {
        Some("it is sealed")
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        Some("it answered 503 (standby or not ready)")
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        Some("it answered 429 (rate limited or standby)")
    } else if status.is_server_error() {
        Some("it answered with a server error")
    } else if status.is_redirection() {
        Some("it redirected berth to another node (point address at the active node)")
    } else {
        None
    }
}

enum BodyFailure {
    Cut(reqwest::Error),
    TooLarge,
}

/// Reads the whole body into a zeroized buffer. When the buffer must grow, the old one is
/// zeroized as it is replaced, so no copy of the material is left behind.
async fn read_body(mut response: reqwest::Response) -> Result<Zeroizing<Vec<u8>>, BodyFailure> {
    let hint = response
        .content_length()
        .and_then(|length| usize::try_from(length).ok())
        .unwrap_or(4096)
        .min(MAX_ANSWER_BYTES);
    let mut body = Zeroizing::new(Vec::with_capacity(hint));
    while let Some(chunk) = response.chunk().await.map_err(BodyFailure::Cut)? {
        let needed = body.len() + chunk.len();
        if needed > MAX_ANSWER_BYTES {
            return Err(BodyFailure::TooLarge);
        }
        if needed > body.capacity() {
            let capacity = needed.max(body.capacity() * 2).min(MAX_ANSWER_BYTES);
            let mut grown = Zeroizing::new(Vec::with_capacity(capacity));
            grown.extend_from_slice(&body);
            body = grown;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    #[test]
    fn statuses_that_mean_unavailable() {
        assert_eq!(
            unavailable_reason(&answer(503, r#"{"errors":["Vault is sealed"]}"#)),
            Some("it is sealed")
        );
        for status in [500, 502, 503, 504, 429, 307] {
            assert!(
                unavailable_reason(&answer(status, "{}")).is_some(),
                "{status}"
            );
        }
        for status in [200, 204, 400, 403, 404, 405] {
            assert!(
                unavailable_reason(&answer(status, "{}")).is_none(),
                "{status}"
            );
        }
    }

    #[test]
    fn answer_debug_hides_the_body() {
        let answer = answer(200, r#"{"auth":{"client_token":"s.token-marker"}}"#);
        let debug = format!("{answer:?}");
        assert!(!debug.contains("token-marker"), "{debug}");
        assert!(answer.mentions("CLIENT_TOKEN"));
        assert!(!answer.mentions("sealed"));
    }
}
