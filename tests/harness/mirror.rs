//! Registry mirrors for berthd's `[[registry.mirror]]` tests:
//!
//! - [`ProxyMirror`]: `docker-registry` (distribution 2.8) in **proxy mode**, a pull-through
//!   cache of an upstream TLS registry (`proxy.remoteurl`, with `username`/`password` for a
//!   private upstream; it trusts the test CA through `SSL_CERT_FILE`), itself served over plain
//!   HTTP without auth.
//! - [`RecordingFront`]: a plain-HTTP front before a mirror that writes down every request
//!   (method, path, `Authorization`, `User-Agent`) and forwards it; 502 when the mirror behind it
//!   is down.

use std::fmt::Write as _;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context as _;
use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::Router;
use tempfile::TempDir;

use super::ca::TestCa;
use super::credentials::RegistryUser;
use super::process::Daemon;
use super::server::ServerTask;
use super::wait::{wait_for, STARTUP_TIMEOUT};
use super::{free_local_port, random_lowercase, temp_dir};

/// A running pull-through cache.
#[derive(Debug)]
pub struct ProxyMirror {
    daemon: Daemon,
    addr: String,
    _dir: TempDir,
}

impl ProxyMirror {
    /// `docker-registry serve` in proxy mode for `https://{upstream}`, logging in there as
    /// `user`; listens on plain HTTP at a free loopback port.
    pub async fn start(ca: &TestCa, upstream: &str, user: &RegistryUser) -> anyhow::Result<Self> {
        let dir = temp_dir("proxy-mirror")?;
        let port = free_local_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config_path = dir.path().join("config.yml");
        let mut yaml = String::new();
        let _ = write!(
            yaml,
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n  secret: {secret}\n\
             health:\n  storagedriver:\n    enabled: false\n\
             proxy:\n  remoteurl: https://{upstream}\n  username: {username}\n  password: {password}\n",
            storage = dir.path().join("storage").display(),
            secret = random_lowercase(32),
            username = user.username,
            password = user.password,
        );
        std::fs::write(&config_path, yaml)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut command = Command::new("docker-registry");
        command
            .arg("serve")
            .arg(&config_path)
            .env("SSL_CERT_FILE", ca.ca_pem_path());
        let daemon = Daemon::spawn(
            "docker-registry (proxy)",
            command,
            &dir.path().join("registry.log"),
        )
        .context("starting docker-registry in proxy mode (apt package docker-registry)")?;
        let client = reqwest::Client::new();
        wait_for(
            &format!("the proxy mirror at {addr} to answer /v2/"),
            STARTUP_TIMEOUT,
            || {
                let (daemon, client, addr) = (&daemon, &client, &addr);
                async move {
                    daemon.ensure_running()?;
                    Ok(
                        match client.get(format!("http://{addr}/v2/")).send().await {
                            Ok(response) if response.status().is_success() => Some(()),
                            _ => None,
                        },
                    )
                }
            },
        )
        .await
        .with_context(|| format!("proxy mirror log:\n{}", daemon.log_tail()))?;
        Ok(Self {
            daemon,
            addr,
            _dir: dir,
        })
    }

    /// `127.0.0.1:PORT` (plain HTTP).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// Stops the mirror (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&self) {
        self.daemon.stop();
    }
}

/// One request a [`RecordingFront`] saw.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub user_agent: Option<String>,
    /// What the client got back.
    pub status: u16,
}

#[derive(Debug, Clone)]
struct FrontState {
    client: reqwest::Client,
    upstream: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

/// A plain-HTTP front that records and forwards every request to `http://{upstream}`.
#[derive(Debug)]
pub struct RecordingFront {
    addr: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    _server: ServerTask,
}

impl RecordingFront {
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = FrontState {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            upstream: upstream.to_owned(),
            seen: Arc::clone(&seen),
        };
        let router = Router::new().fallback(forward).with_state(state);
        let server = ServerTask::start(router, None).await?;
        Ok(Self {
            addr: server.addr().to_string(),
            seen,
            _server: server,
        })
    }

    /// `127.0.0.1:PORT` (plain HTTP).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Requests whose path starts with `/v2/{repository}/{kind}/` (`manifests` or `blobs`).
    pub fn requests_for(&self, repository: &str, kind: &str) -> Vec<SeenRequest> {
        let prefix = format!("/v2/{repository}/{kind}/");
        self.seen()
            .into_iter()
            .filter(|request| request.path.starts_with(&prefix))
            .collect()
    }
}

const FORWARDED_REQUEST_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::ACCEPT,
    header::RANGE,
    header::USER_AGENT,
];

const FORWARDED_RESPONSE_HEADERS: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::WWW_AUTHENTICATE,
    header::LOCATION,
    HeaderName::from_static("docker-content-digest"),
];

async fn forward(State(state): State<FrontState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    let header_text = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let mut seen = SeenRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        authorization: header_text(&header::AUTHORIZATION),
        user_agent: header_text(&header::USER_AGENT),
        status: 0,
    };
    let mut outgoing = state.client.request(
        parts.method.clone(),
        format!("http://{}{path_and_query}", state.upstream),
    );
    for name in FORWARDED_REQUEST_HEADERS {
        if let Some(value) = parts.headers.get(&name) {
            outgoing = outgoing.header(name, value);
        }
    }
    let Ok(body) = to_bytes(body, 16 << 20).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let response = match outgoing.body(body).send().await {
        Ok(upstream) => {
            let mut builder = Response::builder().status(upstream.status().as_u16());
            for name in FORWARDED_RESPONSE_HEADERS {
                if let Some(value) = upstream.headers().get(&name) {
                    builder = builder.header(name, value);
                }
            }
            match upstream.bytes().await {
                Ok(bytes) => builder
                    .body(Body::from(bytes))
                    .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()),
                Err(_) => StatusCode::BAD_GATEWAY.into_response(),
            }
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    };
    seen.status = response.status().as_u16();
    state
        .seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(seen);
    response
}
