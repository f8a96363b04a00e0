//! A server that writes down every request it gets (method, URI, headers) and answers with a
//! fixed reply, or with blobs a [`super::hostile::HostileFront`] handed it: the stand-in for
//! blob storage behind a redirect, for a token realm, for a foreign-layer URL. It binds any
//! loopback address (127.0.0.2 is "another host"), over TLS or plain HTTP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::Router;

use super::server::ServerTask;

/// Blobs by digest, put there by a front before it redirects to the recorder.
pub type BlobStore = Arc<Mutex<HashMap<String, Bytes>>>;

/// How the recorder answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// `GET .../blobs/<digest>`: the blob from the store (404 when absent).
    Blobs,
    /// The same status, headers and body for every request.
    Fixed {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
}

impl Answer {
    /// 500 with an empty body: for servers that must not be asked at all.
    pub fn refuse() -> Self {
        Answer::Fixed {
            status: 500,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// A redirect with `status` to `location`.
    pub fn redirect(status: u16, location: &str) -> Self {
        Answer::Fixed {
            status,
            headers: vec![("location".to_owned(), location.to_owned())],
            body: Bytes::new(),
        }
    }

    /// 200 with a JSON body.
    pub fn json(body: impl Into<Bytes>) -> Self {
        Answer::Fixed {
            status: 200,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: body.into(),
        }
    }
}

/// One request as the recorder saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    /// Header names in lower case, values lossy UTF-8.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

#[derive(Debug, Clone)]
struct RecorderState {
    answer: Answer,
    requests: Arc<Mutex<Vec<Recorded>>>,
    blobs: BlobStore,
}

/// The running recorder.
#[derive(Debug)]
pub struct Recorder {
    url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    blobs: BlobStore,
    _server: ServerTask,
}

impl Recorder {
    /// Listens on a fresh port of `ip`, over TLS when `tls` is given.
    pub async fn start(
        ip: IpAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        answer: Answer,
    ) -> anyhow::Result<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let requests = Arc::default();
        let blobs = BlobStore::default();
        let state = RecorderState {
            answer,
            requests: Arc::clone(&requests),
            blobs: Arc::clone(&blobs),
        };
        let router = Router::new().fallback(record).with_state(state);
        let server = ServerTask::start_on(ip, router, tls).await?;
        Ok(Self {
            url: format!("{scheme}://{}", server.addr()),
            requests,
            blobs,
            _server: server,
        })
    }

    /// `scheme://ip:port`, no trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `ip:port`.
    pub fn addr(&self) -> &str {
        self.url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, addr)| addr)
    }

    /// Where a front puts blobs for this recorder to serve.
    pub fn blob_store(&self) -> BlobStore {
        Arc::clone(&self.blobs)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

async fn record(State(state): State<RecorderState>, request: Request) -> Response {
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    state
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Recorded {
            method: request.method().to_string(),
            uri: request.uri().to_string(),
            headers,
        });
    match &state.answer {
        Answer::Blobs => {
            let digest = request
                .uri()
                .path()
                .rsplit_once("/blobs/")
                .map(|(_, digest)| digest.to_owned())
                .unwrap_or_default();
            let blob = state
                .blobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&digest)
                .cloned();
            match blob {
                Some(blob) => (
                    StatusCode::OK,
                    [("content-type", "application/octet-stream")],
                    blob,
                )
                    .into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }
        Answer::Fixed {
            status,
            headers,
            body,
        } => {
            let mut response = Response::new(Body::from(body.clone()));
            *response.status_mut() =
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::try_from(name.as_str()),
                    HeaderValue::try_from(value.as_str()),
                ) {
                    response.headers_mut().append(name, value);
                }
            }
            response
        }
    }
}
