//! A fault-injecting proxy: plain HTTP in front of a TLS registry, forwarding as
//! [`super::proxy::CorruptingProxy`] does (same headers both ways), with faults a test programs
//! per request kind, and a record of every request it got.
//!
//! berthd gets the proxy's address in `plain_http`; image references and secrets name the proxy.
//! A test adds rules with [`FaultProxy::inject`]: a [`Target`] (a blob, every blob, manifests, the
//! `/v2/` ping, anything), a [`Fault`] and how many times it applies. The first matching rule
//! that has uses left decides what happens to a request; a request no rule matches is forwarded
//! untouched. Faults:
//! - [`Fault::Status`]: answer 503, 429 (optionally with `Retry-After`), ... instead of forwarding;
//! - [`Fault::CutAfter`]: forward, then cut the connection after N bytes of the body;
//! - [`Fault::StallAfter`]: forward, send N bytes, then hold the connection (and then cut it);
//! - [`Fault::StallHeaders`]: hold the request before any response header (then answer 504);
//! - [`Fault::IgnoreRange`]: drop the `Range` header, so the registry answers 200 with the whole
//!   blob;
//! - [`Fault::Throttle`]: forward the body at a fixed rate;
//! - [`Fault::Trickle`]: forward the body a few bytes at a time, once a second.
//!
//! Every request is recorded ([`RequestRecord`]): method, path, the `Range` it carried, the status
//! answered, the fault applied, and the body bytes actually handed to the connection, so tests
//! can check that a retry after a cut fetched only the rest of a blob.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::Router;
use tokio::time::Instant;

use super::ca::TestCa;
use super::proxy::{is_blob_get, FORWARDED_REQUEST_HEADERS, HOP_BY_HOP};
use super::server::ServerTask;

/// Largest request body forwarded.
const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;

/// Size of the body pieces handed to the connection.
const PIECE: usize = 64 * 1024;

/// How long a cut waits after the last piece, so the connection flushes it before it closes.
const FLUSH_BEFORE_CUT: Duration = Duration::from_millis(100);

/// Which requests a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `GET /v2/<name>/blobs/<digest>` of this digest.
    Blob(String),
    /// Every blob GET.
    AnyBlob,
    /// `GET /v2/<name>/manifests/<ref>`.
    Manifests,
    /// `GET /v2/` (the version check and auth challenge).
    Ping,
    /// Requests whose path contains this text (`.sig`, `/referrers/`, ...).
    PathContains(String),
    /// Every request.
    Any,
}

impl Target {
    fn matches(&self, method: &Method, path: &str) -> bool {
        match self {
            Target::Blob(digest) => {
                is_blob_get(method, path) && path.ends_with(&format!("/blobs/{digest}"))
            }
            Target::AnyBlob => is_blob_get(method, path),
            Target::Manifests => path.starts_with("/v2/") && path.contains("/manifests/"),
            Target::Ping => path == "/v2/" || path == "/v2",
            Target::PathContains(text) => path.contains(text.as_str()),
            Target::Any => true,
        }
    }
}

/// What the proxy does to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer `code` (with `Retry-After: <seconds>` when given) without asking the registry.
    Status {
        code: u16,
        retry_after_seconds: Option<u32>,
    },
    /// Forward, send this many body bytes, then cut the connection.
    CutAfter(u64),
    /// Forward, send `bytes` body bytes, hold the connection for `stall`, then cut it.
    StallAfter { bytes: u64, stall: Duration },
    /// Hold the request for this long before any response header, then answer 504.
    StallHeaders(Duration),
    /// Forward without the `Range` header: the registry answers 200 with the whole blob.
    IgnoreRange,
    /// Forward, with the body's byte at this offset flipped (same length).
    FlipByte(u64),
    /// Forward, sending the body at this many bytes per second.
    Throttle { bytes_per_second: u64 },
    /// Forward, sending `bytes_per_second` bytes of the body once a second: a connection that
    /// never goes quiet for more than a second, yet gets nowhere.
    Trickle { bytes_per_second: u64 },
}

impl Fault {
    /// 503 Service Unavailable.
    pub fn unavailable() -> Self {
        Fault::Status {
            code: 503,
            retry_after_seconds: None,
        }
    }

    /// 429 Too Many Requests with `Retry-After: <seconds>`.
    pub fn too_many_requests(retry_after_seconds: u32) -> Self {
        Fault::Status {
            code: 429,
            retry_after_seconds: Some(retry_after_seconds),
        }
    }
}

/// How many matching requests a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Times {
    Once,
    N(usize),
    Always,
}

#[derive(Debug, Clone)]
struct Rule {
    target: Target,
    fault: Fault,
    /// `None`: every time.
    remaining: Option<usize>,
}

/// One request the proxy got, and what it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The `Range` header berthd sent (also when [`Fault::IgnoreRange`] dropped it).
    pub range: Option<String>,
    /// 0 until the status is known.
    pub status: u16,
    pub fault: Option<Fault>,
    /// Body bytes handed to the connection.
    pub bytes_sent: u64,
    /// Length of the whole body the proxy had to send (0 for a faulted status).
    pub body_len: u64,
    /// When the request arrived, since the proxy started.
    pub arrived: Duration,
    /// When the body was done (sent, cut, or given up), since the proxy started.
    pub finished: Option<Duration>,
}

impl RequestRecord {
    /// The first byte asked for: `N` of `Range: bytes=N-`, 0 without a Range.
    pub fn range_start(&self) -> u64 {
        self.range
            .as_deref()
            .and_then(|range| range.strip_prefix("bytes="))
            .and_then(|range| range.split('-').next())
            .and_then(|start| start.parse().ok())
            .unwrap_or(0)
    }

    fn is_blob_get_of(&self, digest: &str) -> bool {
        self.method == "GET" && self.path.ends_with(&format!("/blobs/{digest}"))
    }
}

#[derive(Debug, Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    records: Mutex<Vec<RequestRecord>>,
}

impl Shared {
    /// The fault of the first matching rule with uses left, using one.
    fn take_fault(&self, method: &Method, path: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        let rule = rules
            .iter_mut()
            .find(|rule| rule.remaining != Some(0) && rule.target.matches(method, path))?;
        if let Some(remaining) = rule.remaining.as_mut() {
            *remaining -= 1;
        }
        Some(rule.fault)
    }

    fn record(&self, record: RequestRecord) -> usize {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        records.push(record);
        records.len() - 1
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut RequestRecord)) {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(record) = records.get_mut(index) {
            change(record);
        }
    }
}

#[derive(Debug, Clone)]
struct ProxyState {
    client: reqwest::Client,
    upstream: String,
    shared: Arc<Shared>,
    epoch: Instant,
}

/// The running proxy; stops (connections included) on `Drop`.
#[derive(Debug)]
pub struct FaultProxy {
    addr: String,
    shared: Arc<Shared>,
    _server: ServerTask,
}

impl FaultProxy {
    /// Proxies plain HTTP to `https://{upstream}`, trusting the test CA.
    pub async fn start(ca: &TestCa, upstream: &str) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        let state = ProxyState {
            client: ca.http_client()?,
            upstream: upstream.to_owned(),
            shared: Arc::clone(&shared),
            epoch: Instant::now(),
        };
        let router = Router::new().fallback(handle).with_state(state);
        let server = ServerTask::start(router, None).await?;
        Ok(Self {
            addr: server.addr().to_string(),
            shared,
            _server: server,
        })
    }

    /// `127.0.0.1:PORT` (plain HTTP).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Adds a rule after the existing ones.
    pub fn inject(&self, target: Target, fault: Fault, times: Times) {
        let remaining = match times {
            Times::Once => Some(1),
            Times::N(count) => Some(count),
            Times::Always => None,
        };
        self.shared
            .rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Rule {
                target,
                fault,
                remaining,
            });
    }

    /// Removes every rule: from now on everything is forwarded untouched.
    pub fn clear(&self) {
        self.shared
            .rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forgets the requests recorded so far.
    pub fn forget_requests(&self) {
        self.shared
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The GETs of blob `digest`, in arrival order.
    pub fn blob_gets(&self, digest: &str) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|record| record.is_blob_get_of(digest))
            .collect()
    }

    /// Makes the first GET of blob `digest` send `bytes` body bytes, then hold the connection
    /// for a minute (and then cut it).
    pub fn stall_blob_once(&self, digest: &str, bytes: u64) {
        self.inject(
            Target::Blob(digest.to_owned()),
            Fault::StallAfter {
                bytes,
                stall: Duration::from_secs(60),
            },
            Times::Once,
        );
    }

    /// The two GETs of blob `digest` after the first was stopped (stalled or cut) at
    /// `stopped_at` body bytes: checks that the first stopped there and the second resumed with
    /// a Range from inside what had arrived, not from the start.
    pub fn gets_resumed_after(
        &self,
        digest: &str,
        stopped_at: u64,
    ) -> anyhow::Result<(RequestRecord, RequestRecord)> {
        let log = self.describe();
        let [first, second]: [RequestRecord; 2] = self
            .blob_gets(digest)
            .try_into()
            .map_err(|_| anyhow::anyhow!("one stopped GET, one resumed GET:\n{log}"))?;
        anyhow::ensure!(
            first.bytes_sent == stopped_at,
            "the first GET did not stop at {stopped_at}:\n{log}"
        );
        let resumed_from = second.range_start();
        anyhow::ensure!(
            resumed_from > 0 && resumed_from <= stopped_at,
            "the retry must resume from what arrived (<= {stopped_at}), not restart:\n{log}"
        );
        Ok((first, second))
    }

    /// Every request so far, one a line, for assertion messages.
    pub fn describe(&self) -> String {
        self.requests()
            .iter()
            .map(|r| {
                format!(
                    "{:>8.3}s {} {} range={:?} -> {} fault={:?} sent={}/{}",
                    r.arrived.as_secs_f64(),
                    r.method,
                    r.path,
                    r.range,
                    r.status,
                    r.fault,
                    r.bytes_sent,
                    r.body_len
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Body bytes sent for blob `digest`, over all its GETs.
    pub fn blob_bytes_sent(&self, digest: &str) -> u64 {
        self.blob_gets(digest)
            .iter()
            .map(|record| record.bytes_sent)
            .sum()
    }

    /// Requests whose path contains `needle`.
    pub fn requests_to(&self, needle: &str) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|record| record.path.contains(needle))
            .collect()
    }
}

async fn handle(State(state): State<ProxyState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    let range = parts
        .headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let fault = state.shared.take_fault(&parts.method, parts.uri.path());
    let index = state.shared.record(RequestRecord {
        method: parts.method.to_string(),
        path: path.clone(),
        range,
        status: 0,
        fault,
        bytes_sent: 0,
        body_len: 0,
        arrived: state.epoch.elapsed(),
        finished: None,
    });
    let finish = |status: u16| {
        let at = state.epoch.elapsed();
        state.shared.update(index, |record| {
            record.status = status;
            record.finished = Some(at);
        });
    };

    match fault {
        Some(Fault::Status {
            code,
            retry_after_seconds,
        }) => {
            finish(code);
            return status_response(code, retry_after_seconds);
        }
        Some(Fault::StallHeaders(stall)) => {
            tokio::time::sleep(stall).await;
            finish(504);
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        _ => {}
    }

    let url = format!("https://{}{path}", state.upstream);
    let mut upstream_request = state.client.request(parts.method.clone(), url);
    for name in FORWARDED_REQUEST_HEADERS {
        if name == header::RANGE && fault == Some(Fault::IgnoreRange) {
            continue;
        }
        for value in parts.headers.get_all(&name) {
            upstream_request = upstream_request.header(name.clone(), value.clone());
        }
    }
    let upstream = async {
        let body = to_bytes(body, MAX_REQUEST_BODY).await?;
        if !body.is_empty() {
            upstream_request = upstream_request.body(body);
        }
        let response = upstream_request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        anyhow::Ok((status, headers, body))
    };
    let (status, headers, body) = match upstream.await {
        Ok(answer) => answer,
        Err(failure) => {
            finish(502);
            return (StatusCode::BAD_GATEWAY, format!("proxy: {failure:#}")).into_response();
        }
    };
    state.shared.update(index, |record| {
        record.status = status.as_u16();
        record.body_len = body.len() as u64;
    });
    let body = match fault {
        Some(Fault::FlipByte(at)) => flip_byte(body, at),
        _ => body,
    };

    let mut response = Response::builder().status(status);
    for (name, value) in &headers {
        if !HOP_BY_HOP.contains(name) {
            response = response.header(name, value);
        }
    }
    let plan = Plan::for_fault(fault, body.len());
    let feed = Feed {
        data: body,
        position: 0,
        plan,
        state: state.clone(),
        index,
        done: false,
    };
    let stream = futures::stream::unfold(feed, Feed::next);
    response
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `body` with the byte at `at` inverted (unchanged when `at` is past its end).
fn flip_byte(body: Bytes, at: u64) -> Bytes {
    let mut flipped = body.to_vec();
    if let Some(byte) = usize::try_from(at).ok().and_then(|at| flipped.get_mut(at)) {
        *byte = !*byte;
    }
    Bytes::from(flipped)
}

fn status_response(code: u16, retry_after_seconds: Option<u32>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let error_code = if code == 429 {
        "TOOMANYREQUESTS"
    } else {
        "UNAVAILABLE"
    };
    let body = format!(
        r#"{{"errors":[{{"code":"{error_code}","message":"injected by the fault proxy"}}]}}"#
    );
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = retry_after_seconds {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// How a forwarded body is sent.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Send up to here, then stop the way `stop` says (when it is before the end).
    stop_at: usize,
    stop: Stop,
    bytes_per_second: Option<u64>,
    /// Size of the pieces handed to the connection.
    piece: usize,
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    Cut,
    Stall(Duration),
}

impl Plan {
    fn for_fault(fault: Option<Fault>, len: usize) -> Self {
        let at = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX).min(len);
        let whole = Self {
            stop_at: len,
            stop: Stop::Cut,
            bytes_per_second: None,
            piece: PIECE,
        };
        match fault {
            Some(Fault::CutAfter(bytes)) => Self {
                stop_at: at(bytes),
                ..whole
            },
            Some(Fault::StallAfter { bytes, stall }) => Self {
                stop_at: at(bytes),
                stop: Stop::Stall(stall),
                ..whole
            },
            Some(Fault::Throttle { bytes_per_second }) => Self {
                bytes_per_second: Some(bytes_per_second.max(1)),
                ..whole
            },
            Some(Fault::Trickle { bytes_per_second }) => Self {
                bytes_per_second: Some(bytes_per_second.max(1)),
                piece: usize::try_from(bytes_per_second.max(1)).unwrap_or(PIECE),
                ..whole
            },
            _ => whole,
        }
    }
}

/// The body stream's state: what is left to send and where to count it.
struct Feed {
    data: Bytes,
    position: usize,
    plan: Plan,
    state: ProxyState,
    index: usize,
    done: bool,
}

impl Feed {
    async fn next(mut self) -> Option<(std::io::Result<Bytes>, Self)> {
        if self.done {
            return None;
        }
        if self.position < self.plan.stop_at {
            let end = (self.position + self.plan.piece).min(self.plan.stop_at);
            let piece = self.data.slice(self.position..end);
            if let Some(rate) = self.plan.bytes_per_second {
                let seconds = piece.len() as f64 / rate as f64;
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            }
            self.position = end;
            let sent = piece.len() as u64;
            self.state
                .shared
                .update(self.index, |record| record.bytes_sent += sent);
            return Some((Ok(piece), self));
        }
        self.done = true;
        let cut = self.plan.stop_at < self.data.len();
        if cut {
            match self.plan.stop {
                Stop::Cut => tokio::time::sleep(FLUSH_BEFORE_CUT).await,
                Stop::Stall(stall) => tokio::time::sleep(stall).await,
            }
        }
        let at = self.state.epoch.elapsed();
        self.state
            .shared
            .update(self.index, |record| record.finished = Some(at));
        if cut {
            Some((Err(std::io::Error::other("cut by the fault proxy")), self))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_their_requests_only() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let blob = format!("/v2/team/app/blobs/{digest}");
        assert!(Target::Blob(digest.clone()).matches(&Method::GET, &blob));
        assert!(!Target::Blob(format!("sha256:{}", "cd".repeat(32))).matches(&Method::GET, &blob));
        assert!(Target::AnyBlob.matches(&Method::GET, &blob));
        assert!(!Target::AnyBlob.matches(&Method::GET, "/v2/team/app/manifests/v1"));
        assert!(Target::Manifests.matches(&Method::GET, "/v2/team/app/manifests/v1"));
        assert!(!Target::Manifests.matches(&Method::GET, &blob));
        assert!(Target::Ping.matches(&Method::GET, "/v2/"));
        assert!(!Target::Ping.matches(&Method::GET, &blob));
        assert!(Target::Any.matches(&Method::GET, "/anything"));
    }

    #[test]
    fn rules_apply_in_order_and_run_out() {
        let shared = Shared::default();
        shared.rules.lock().unwrap().extend([
            Rule {
                target: Target::AnyBlob,
                fault: Fault::CutAfter(10),
                remaining: Some(1),
            },
            Rule {
                target: Target::Any,
                fault: Fault::IgnoreRange,
                remaining: None,
            },
        ]);
        let blob = format!("/v2/a/blobs/sha256:{}", "ab".repeat(32));
        assert_eq!(
            shared.take_fault(&Method::GET, &blob),
            Some(Fault::CutAfter(10))
        );
        assert_eq!(
            shared.take_fault(&Method::GET, &blob),
            Some(Fault::IgnoreRange)
        );
        assert_eq!(
            shared.take_fault(&Method::GET, "/v2/"),
            Some(Fault::IgnoreRange)
        );
    }

    #[test]
    fn range_starts_parse() {
        let mut record = RequestRecord {
            method: "GET".into(),
            path: "/v2/a/blobs/x".into(),
            range: Some("bytes=1234-".into()),
            status: 206,
            fault: None,
            bytes_sent: 0,
            body_len: 0,
            arrived: Duration::ZERO,
            finished: None,
        };
        assert_eq!(record.range_start(), 1234);
        record.range = None;
        assert_eq!(record.range_start(), 0);
    }
}
