//! A hostile registry front: a TLS server that forwards to a real registry (as
//! [`super::proxy`] does) but misbehaves in one chosen way, as a compromised or malicious
//! registry could: it redirects blob GETs to another host, names a token realm of its choice in
//! its challenge (at once, or only after the first one), adds foreign-layer `urls` to
//! manifests, serves a manifest past 4 MiB, or appends bytes to blobs. It counts what it did, so
//! a test knows the hostile path was taken.
//!
//! Image references and secrets name the front; its certificate is the test CA's (127.0.0.1)
//! or, for another address, one from [`super::mtls::TestPki`].

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::Router;
use serde_json::{json, Value};

use super::ca::TestCa;
use super::image::{sha256_digest, MANIFEST_MEDIA_TYPE};
use super::random_lowercase;
use super::recorder::BlobStore;
use super::server::ServerTask;

/// Largest request body forwarded.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// What the hostile manifest is padded to (past berthd's 4 MiB cap).
pub const HUGE_MANIFEST_BYTES: usize = 5 << 20;

/// What gets appended to blobs by [`Hostility::AppendToBlobs`].
const APPENDED: &[u8] = b"bytes past the descriptor's size";

/// Request headers passed on to the registry.
const FORWARDED_REQUEST_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::ACCEPT,
    header::CONTENT_TYPE,
    header::RANGE,
];

/// Response headers not passed back (hop-by-hop, or recomputed for a changed body).
const DROPPED_RESPONSE_HEADERS: [HeaderName; 6] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::CONTENT_LENGTH,
];

/// The one way the front misbehaves.
#[derive(Debug, Clone)]
pub enum Hostility {
    /// Successful blob GETs: the blob goes into `store` (a recorder's), and the answer is
    /// `307 Location: {target}/v2/<name>/blobs/<digest>?X-Signature=...`, as registries backed by
    /// S3, GCS or Azure Blob answer. Every response also sets a cookie.
    RedirectBlobs { target: String, store: BlobStore },
    /// `GET /v2/` answers 401 with this `WWW-Authenticate`; everything else is forwarded.
    Challenge(String),
    /// The first `GET /v2/` is forwarded; every later one answers 401 with this challenge.
    ChallengeAfterFirst(String),
    /// Image manifests get `urls: [url]` on every layer (Docker-Content-Digest recomputed).
    ForeignLayerUrls(String),
    /// Manifest GETs answer an image manifest of [`HUGE_MANIFEST_BYTES`].
    HugeManifest,
    /// Successful blob GETs get bytes appended past the descriptor's size.
    AppendToBlobs,
}

#[derive(Debug, Clone)]
struct FrontState {
    client: reqwest::Client,
    upstream: String,
    hostility: Hostility,
    cookie: String,
    base_requests: Arc<AtomicUsize>,
    acts: Arc<AtomicUsize>,
}

/// The running front.
#[derive(Debug)]
pub struct HostileFront {
    addr: String,
    cookie: String,
    acts: Arc<AtomicUsize>,
    _server: ServerTask,
}

impl HostileFront {
    /// Fronts `https://{upstream}` on 127.0.0.1 with the test CA's server certificate.
    pub async fn start(ca: &TestCa, upstream: &str, hostility: Hostility) -> anyhow::Result<Self> {
        Self::start_on(
            IpAddr::from([127, 0, 0, 1]),
            ca.rustls_server_config()?,
            ca,
            upstream,
            hostility,
        )
        .await
    }

    /// Fronts `https://{upstream}` (trusting `ca`) on a fresh port of `ip`, presenting `tls`.
    pub async fn start_on(
        ip: IpAddr,
        tls: Arc<rustls::ServerConfig>,
        ca: &TestCa,
        upstream: &str,
        hostility: Hostility,
    ) -> anyhow::Result<Self> {
        let acts = Arc::new(AtomicUsize::new(0));
        let cookie = format!("berth-front-session={}", random_lowercase(20));
        let state = FrontState {
            client: ca.http_client()?,
            upstream: upstream.to_owned(),
            hostility,
            cookie: cookie.clone(),
            base_requests: Arc::default(),
            acts: Arc::clone(&acts),
        };
        let router = Router::new().fallback(front).with_state(state);
        let server = ServerTask::start_on(ip, router, Some(tls)).await?;
        Ok(Self {
            addr: server.addr().to_string(),
            cookie,
            acts,
            _server: server,
        })
    }

    /// `IP:PORT`: what image references and secrets name.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The cookie every response of a [`Hostility::RedirectBlobs`] front sets (`name=value`).
    pub fn cookie(&self) -> &str {
        &self.cookie
    }

    /// How many times the front misbehaved (redirects, challenges, rewrites).
    pub fn acts(&self) -> usize {
        self.acts.load(Ordering::SeqCst)
    }
}

/// `GET /v2/<name>/blobs/sha256:<hex>` -> (name, digest).
fn blob_get(method: &Method, path: &str) -> Option<(String, String)> {
    let (name, digest) = path.strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
    let valid = digest
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|byte| byte.is_ascii_hexdigit()));
    (method == Method::GET && !name.is_empty() && valid)
        .then(|| (name.to_owned(), digest.to_owned()))
}

/// `GET /v2/<name>/manifests/<reference>`.
fn is_manifest_get(method: &Method, path: &str) -> bool {
    method == Method::GET
        && path
            .strip_prefix("/v2/")
            .and_then(|rest| rest.rsplit_once("/manifests/"))
            .is_some_and(|(name, reference)| !name.is_empty() && !reference.is_empty())
}

fn challenge_response(challenge: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge.to_owned())],
        Body::from(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#),
    )
        .into_response()
}

/// An image manifest padded with an annotation to [`HUGE_MANIFEST_BYTES`].
fn huge_manifest() -> Response {
    let zero = format!("sha256:{}", "0".repeat(64));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": zero, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": zero, "size": 2}],
        "annotations": {"padding": "a".repeat(HUGE_MANIFEST_BYTES)},
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, MANIFEST_MEDIA_TYPE)],
        Body::from(manifest.to_string()),
    )
        .into_response()
}

async fn front(State(state): State<FrontState>, request: Request) -> Response {
    let cookie = state.cookie.clone();
    let set_cookie = matches!(state.hostility, Hostility::RedirectBlobs { .. });
    let mut response = match front_inner(&state, request).await {
        Ok(response) => response,
        Err(failure) => (StatusCode::BAD_GATEWAY, format!("front: {failure:#}")).into_response(),
    };
    if set_cookie {
        if let Ok(value) = format!("{cookie}; Path=/").parse() {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

async fn front_inner(state: &FrontState, request: Request) -> anyhow::Result<Response> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let is_base = method == Method::GET && (path == "/v2/" || path == "/v2");
    match &state.hostility {
        Hostility::Challenge(challenge) if is_base => {
            state.acts.fetch_add(1, Ordering::SeqCst);
            return Ok(challenge_response(challenge));
        }
        Hostility::ChallengeAfterFirst(challenge)
            if is_base && state.base_requests.fetch_add(1, Ordering::SeqCst) >= 1 =>
        {
            state.acts.fetch_add(1, Ordering::SeqCst);
            return Ok(challenge_response(challenge));
        }
        Hostility::HugeManifest if is_manifest_get(&method, &path) => {
            state.acts.fetch_add(1, Ordering::SeqCst);
            return Ok(huge_manifest());
        }
        _ => {}
    }

    let (status, mut headers, mut body) = forward(state, request).await?;
    let ok = status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT;
    match &state.hostility {
        Hostility::RedirectBlobs { target, store } => {
            if let (true, Some((name, digest))) =
                (status == StatusCode::OK, blob_get(&method, &path))
            {
                store
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(digest.clone(), Bytes::from(body));
                state.acts.fetch_add(1, Ordering::SeqCst);
                let location = format!(
                    "{target}/v2/{name}/blobs/{digest}?X-Signature={}",
                    random_lowercase(16)
                );
                return Ok((
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, location)],
                    Body::empty(),
                )
                    .into_response());
            }
        }
        Hostility::AppendToBlobs => {
            if ok && blob_get(&method, &path).is_some() {
                body.extend_from_slice(APPENDED);
                state.acts.fetch_add(1, Ordering::SeqCst);
            }
        }
        Hostility::ForeignLayerUrls(url) => {
            if status == StatusCode::OK && is_manifest_get(&method, &path) {
                if let Some(rewritten) = add_layer_urls(&body, url) {
                    headers.insert("docker-content-digest", sha256_digest(&rewritten).parse()?);
                    body = rewritten;
                    state.acts.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        Hostility::Challenge(_) | Hostility::ChallengeAfterFirst(_) | Hostility::HugeManifest => {}
    }
    let mut response = Response::builder().status(status);
    for (name, value) in &headers {
        if !DROPPED_RESPONSE_HEADERS.contains(name) {
            response = response.header(name, value);
        }
    }
    Ok(response.body(Body::from(body))?)
}

/// The manifest `body` with `urls: [url]` on every layer; None when it has no layers.
fn add_layer_urls(body: &[u8], url: &str) -> Option<Vec<u8>> {
    let mut manifest: Value = serde_json::from_slice(body).ok()?;
    let layers = manifest.get_mut("layers")?.as_array_mut()?;
    for layer in layers.iter_mut() {
        layer["urls"] = json!([url]);
    }
    serde_json::to_vec(&manifest).ok()
}

async fn forward(
    state: &FrontState,
    request: Request,
) -> anyhow::Result<(StatusCode, HeaderMap, Vec<u8>)> {
    let (parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    let url = format!("https://{}{path_and_query}", state.upstream);
    let mut upstream = state.client.request(parts.method.clone(), url);
    for name in FORWARDED_REQUEST_HEADERS {
        for value in parts.headers.get_all(&name) {
            upstream = upstream.header(name.clone(), value.clone());
        }
    }
    let body = to_bytes(body, MAX_BODY).await?;
    if !body.is_empty() {
        upstream = upstream.body(body);
    }
    let response = upstream.send().await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await?.to_vec();
    Ok((status, headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_and_manifest_paths() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            blob_get(&Method::GET, &format!("/v2/team/app/blobs/{digest}")),
            Some(("team/app".to_owned(), digest.clone()))
        );
        assert_eq!(
            blob_get(&Method::HEAD, &format!("/v2/a/blobs/{digest}")),
            None
        );
        assert_eq!(blob_get(&Method::GET, "/v2/a/blobs/uploads/"), None);
        assert!(is_manifest_get(&Method::GET, "/v2/team/app/manifests/v1"));
        assert!(!is_manifest_get(&Method::GET, "/v2/"));
    }

    #[test]
    fn layer_urls_are_added_to_every_layer() {
        let body = br#"{"schemaVersion":2,"config":{},"layers":[{"digest":"a"},{"digest":"b"}]}"#;
        let rewritten: Value =
            serde_json::from_slice(&add_layer_urls(body, "https://x/y").unwrap()).unwrap();
        for layer in rewritten["layers"].as_array().unwrap() {
            assert_eq!(layer["urls"], json!(["https://x/y"]));
        }
        assert!(add_layer_urls(br#"{"manifests":[]}"#, "u").is_none());
    }
}
