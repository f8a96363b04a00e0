//! Proxies in front of a TLS registry.
//!
//! - [`CorruptingProxy`] (plain HTTP) flips one byte in the body of every successful (200 or 206)
//!   `GET /v2/<name>/blobs/sha256:<hex>` (same length). berthd gets the proxy's address in
//!   `plain_http`, and image references and secrets name the proxy.
//! - [`ServicelessFront`] (TLS) is transparent except that it drops the `service` parameter from
//!   every `WWW-Authenticate` challenge, so that the registry looks like Google Artifact Registry,
//!   whose challenge is `Bearer realm="https://<host>/v2/token"` with no `service` (protocols.md
//!   A1); distribution itself always puts its configured service there.
//!
//! Every request is forwarded (method, path and query, `Authorization`, `Accept`, `Content-Type`,
//! `Range`, body) and the answer returned (status, headers, body).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::Router;

use super::ca::TestCa;
use super::server::ServerTask;

/// Largest request body forwarded.
const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;

/// Request headers passed on to the registry.
pub(super) const FORWARDED_REQUEST_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::ACCEPT,
    header::CONTENT_TYPE,
    header::RANGE,
];

/// Hop-by-hop response headers that are not passed back.
pub(super) const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// The running proxy.
#[derive(Debug)]
pub struct CorruptingProxy {
    addr: String,
    corrupted: Arc<AtomicUsize>,
    _server: ServerTask,
}

/// The running TLS front.
#[derive(Debug)]
pub struct ServicelessFront {
    addr: String,
    rewritten: Arc<AtomicUsize>,
    _server: ServerTask,
}

/// What a proxy does to what it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    CorruptBlobs,
    DropChallengeService,
}

#[derive(Debug, Clone)]
struct ProxyState {
    client: reqwest::Client,
    upstream: String,
    behaviour: Behaviour,
    /// Blobs corrupted, or challenges rewritten.
    changed: Arc<AtomicUsize>,
}

impl CorruptingProxy {
    /// Proxies to `https://{upstream}`, trusting the test CA.
    pub async fn start(ca: &TestCa, upstream: &str) -> anyhow::Result<Self> {
        let corrupted = Arc::new(AtomicUsize::new(0));
        let state = ProxyState {
            client: ca.http_client()?,
            upstream: upstream.to_owned(),
            behaviour: Behaviour::CorruptBlobs,
            changed: Arc::clone(&corrupted),
        };
        let router = Router::new().fallback(forward).with_state(state);
        let server = ServerTask::start(router, None).await?;
        Ok(Self {
            addr: server.addr().to_string(),
            corrupted,
            _server: server,
        })
    }

    /// `127.0.0.1:PORT` (plain HTTP).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How many blob bodies were corrupted so far.
    pub fn corrupted_blobs(&self) -> usize {
        self.corrupted.load(Ordering::SeqCst)
    }
}

impl ServicelessFront {
    /// Fronts `https://{upstream}` over TLS with the CA's server certificate.
    pub async fn start(ca: &TestCa, upstream: &str) -> anyhow::Result<Self> {
        let rewritten = Arc::new(AtomicUsize::new(0));
        let state = ProxyState {
            client: ca.http_client()?,
            upstream: upstream.to_owned(),
            behaviour: Behaviour::DropChallengeService,
            changed: Arc::clone(&rewritten),
        };
        let router = Router::new().fallback(forward).with_state(state);
        let server = ServerTask::start(router, Some(ca.rustls_server_config()?)).await?;
        Ok(Self {
            addr: server.addr().to_string(),
            rewritten,
            _server: server,
        })
    }

    /// `127.0.0.1:PORT` (TLS): what image references and secrets name.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How many challenges lost their `service` so far.
    pub fn rewritten_challenges(&self) -> usize {
        self.rewritten.load(Ordering::SeqCst)
    }
}

/// `challenge` without its `service` parameter. Parameters are `key="value"` (or `key=token`)
/// separated by commas; a quoted value may hold commas (`scope="repository:a:pull,push"`) and
/// backslash escapes, so the split respects quotes.
fn drop_service_param(challenge: &str) -> String {
    let Some((scheme, params)) = challenge.trim().split_once(' ') else {
        return challenge.to_owned();
    };
    let mut kept = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    let bytes = params.as_bytes();
    for (index, byte) in bytes.iter().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                kept.push(&params[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    kept.push(&params[start..]);
    let kept: Vec<&str> = kept
        .into_iter()
        .map(str::trim)
        .filter(|param| {
            !param.is_empty()
                && !param
                    .split_once('=')
                    .is_some_and(|(key, _)| key.trim().eq_ignore_ascii_case("service"))
        })
        .collect();
    format!("{scheme} {}", kept.join(","))
}

/// `GET /v2/<name>/blobs/sha256:<64 hex>`.
pub(super) fn is_blob_get(method: &Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return false;
    };
    let Some((name, digest)) = rest.rsplit_once("/blobs/") else {
        return false;
    };
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return false;
    };
    method == Method::GET
        && !name.is_empty()
        && hex.len() == 64
        && hex.bytes().all(|byte| byte.is_ascii_hexdigit())
}

async fn forward(State(state): State<ProxyState>, request: Request) -> Response {
    match forward_inner(&state, request).await {
        Ok(response) => response,
        Err(failure) => (StatusCode::BAD_GATEWAY, format!("proxy: {failure:#}")).into_response(),
    }
}

async fn forward_inner(state: &ProxyState, request: Request) -> anyhow::Result<Response> {
    let (parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    let url = format!("https://{}{path_and_query}", state.upstream);
    let mut upstream_request = state.client.request(parts.method.clone(), url);
    for name in FORWARDED_REQUEST_HEADERS {
        for value in parts.headers.get_all(&name) {
            upstream_request = upstream_request.header(name.clone(), value.clone());
        }
    }
    let body = to_bytes(body, MAX_REQUEST_BODY).await?;
    if !body.is_empty() {
        upstream_request = upstream_request.body(body);
    }
    let upstream_response = upstream_request.send().await?;

    let status = upstream_response.status();
    let headers = upstream_response.headers().clone();
    let mut body = upstream_response.bytes().await?.to_vec();
    // 206 too: a puller may ask for `Range: bytes=0-` (resumable downloads).
    let has_blob_bytes = status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT;
    if state.behaviour == Behaviour::CorruptBlobs
        && has_blob_bytes
        && is_blob_get(&parts.method, parts.uri.path())
        && !body.is_empty()
    {
        let middle = body.len() / 2;
        if let Some(byte) = body.get_mut(middle) {
            *byte ^= 0xff;
        }
        state.changed.fetch_add(1, Ordering::SeqCst);
    }

    let mut response = Response::builder().status(status);
    for (name, value) in &headers {
        if HOP_BY_HOP.contains(name) {
            continue;
        }
        if state.behaviour == Behaviour::DropChallengeService && name == header::WWW_AUTHENTICATE {
            let challenge = drop_service_param(value.to_str()?);
            response = response.header(name, challenge);
            state.changed.fetch_add(1, Ordering::SeqCst);
        } else {
            response = response.header(name, value);
        }
    }
    Ok(response.body(Body::from(body))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_blob_gets_are_corrupted() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert!(is_blob_get(
            &Method::GET,
            &format!("/v2/team/app/blobs/{digest}")
        ));
        assert!(!is_blob_get(
            &Method::HEAD,
            &format!("/v2/team/app/blobs/{digest}")
        ));
        assert!(!is_blob_get(
            &Method::GET,
            &format!("/v2/team/app/manifests/{digest}")
        ));
        assert!(!is_blob_get(&Method::GET, "/v2/team/app/blobs/uploads/"));
        assert!(!is_blob_get(&Method::GET, &format!("/v2//blobs/{digest}")));
    }

    #[test]
    fn the_service_parameter_is_dropped_and_nothing_else() {
        assert_eq!(
            drop_service_param(
                r#"Bearer realm="https://127.0.0.1:1/v2/token",service="berth-test-gar""#
            ),
            r#"Bearer realm="https://127.0.0.1:1/v2/token""#
        );
        assert_eq!(
            drop_service_param(
                r#"Bearer realm="https://h/v2/token",service="s",scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope""#
            ),
            r#"Bearer realm="https://h/v2/token",scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope""#
        );
        assert_eq!(
            drop_service_param(r#"Bearer service="a,\"b",realm="r""#),
            r#"Bearer realm="r""#
        );
        assert_eq!(
            drop_service_param(r#"Basic realm="berth""#),
            r#"Basic realm="berth""#
        );
    }
}
