//! gRPC clients no one here wrote, against the real berthd on its unix socket with their
//! default options (issue #13): Python grpcio, Node @grpc/grpc-js and grpcurl 1.8 (without
//! `-authority`). Each calls `grpc.health.v1.Health/Check`, `berth.v1.Agent/ListContainers` and
//! the server-streaming `berth.v1.Agent/PullImage` of an image on the token-auth registry.
//! grpcio and grpcurl 1.8 put the socket path in `:authority`, which h2 alone refuses; berthd's
//! unix front (`agent/src/api/front.rs`) makes it `localhost`.
//!
//! The clients come from `scripts/interop-clients.sh` (into `BERTH_INTEROP_DIR`, default
//! `/var/cache/berth-tools/interop`); a missing one fails the test and names the script.
//!
//! Also: the TCP (mTLS) listener still refuses a path as `:authority` (it has no front), and
//! the per-request cost of the tonic client over the socket, printed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use berth::api::pb::ListContainersRequest;
use serde_json::{json, Value};
use tokio::time::Instant;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::berthd::{Berthd, BerthdOptions};
use crate::harness::containerd::Containerd;
use crate::harness::free_local_port;
use crate::harness::grpcurl::{grpcurl_ok, grpcurl_path};
use crate::harness::host::{HostBerthd, HostEnvironment, OpsEnv};
use crate::harness::image::{PushedImage, TestImage};
use crate::harness::mtls::{ClientName, TestPki};
use crate::harness::wait::{wait_for, STARTUP_TIMEOUT};

/// Upper bound on one client run (it generates stubs, then pulls a small image).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);
const INTEROP_DIR_VARIABLE: &str = "BERTH_INTEROP_DIR";
const DEFAULT_INTEROP_DIR: &str = "/var/cache/berth-tools/interop";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

fn interop_dir() -> PathBuf {
    std::env::var_os(INTEROP_DIR_VARIABLE)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_INTEROP_DIR))
}

/// `path` when it exists; otherwise an error that says how to install it.
fn installed(path: PathBuf, what: &str) -> anyhow::Result<PathBuf> {
    if !path.exists() {
        bail!(
            "{what} is missing ({}): run scripts/interop-clients.sh (as root; it installs into \
             ${INTEROP_DIR_VARIABLE}, default {DEFAULT_INTEROP_DIR})",
            path.display()
        );
    }
    Ok(path)
}

/// berthd (the real binary) on containerd and a token-auth registry, with an image pushed
/// and a pull secret for it.
struct Setup {
    berthd: HostBerthd,
    image: PushedImage,
    secret: String,
    _env: OpsEnv,
}

impl Setup {
    async fn start(repository: &str) -> anyhow::Result<Self> {
        let env = OpsEnv::start().await?;
        let berthd = HostBerthd::start(&env.host_config(), &HostEnvironment::default()).await?;
        let image = env
            .push_image(repository, "v1", &TestImage::busybox(&["echo", "interop"]))
            .await?;
        let secret = berthd
            .create_docker_secret("reg", env.registry.addr(), &env.user)
            .await?;
        Ok(Self {
            berthd,
            image,
            secret,
            _env: env,
        })
    }

    /// Runs `program args... PROTO_DIR SOCKET IMAGE SECRET` with `envs` added; returns its
    /// stdout as JSON.
    async fn run_client(
        &self,
        program: &Path,
        args: &[&Path],
        envs: &[(&str, &Path)],
    ) -> anyhow::Result<Value> {
        let proto_dir = repo_root().join("proto");
        let run = tokio::process::Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .arg(&proto_dir)
            .arg(self.berthd.socket())
            .arg(self.image.reference())
            .arg(&self.secret)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(CLIENT_TIMEOUT, run)
            .await
            .with_context(|| format!("{} timed out", program.display()))?
            .with_context(|| format!("running {}", program.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "{} {args:?} failed ({}):\nstdout: {text}\nstderr: {}\nberthd log:\n{}",
                program.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr),
                self.berthd.log_tail()
            );
        }
        serde_json::from_str(text.trim())
            .with_context(|| format!("{} printed no JSON: {text}", program.display()))
    }

    /// What every client must have seen: SERVING, no containers, and a pull stream that
    /// resolved the pushed image and ended with its digest.
    fn check(&self, client: &str, result: &Value) {
        assert_eq!(result["health"], 1, "{client}: health SERVING: {result}");
        assert_eq!(result["containers"], 0, "{client}: {result}");
        let events: Vec<&str> = result["pull"]
            .as_array()
            .map(|events| events.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(events.first(), Some(&"resolved"), "{client}: {result}");
        assert_eq!(events.last(), Some(&"done"), "{client}: {result}");
        assert!(events.contains(&"layer"), "{client}: {result}");
        assert_eq!(
            result["digest"],
            self.image.manifest_digest.as_str(),
            "{client}: {result}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_python_grpcio_with_default_options() -> anyhow::Result<()> {
    let python = installed(interop_dir().join("venv/bin/python"), "Python grpcio")?;
    let setup = Setup::start("team/interop-python").await?;
    let script = repo_root().join("tests/interop/client.py");
    let result = setup.run_client(&python, &[&script], &[]).await?;
    setup.check("grpcio", &result);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_node_grpc_js_with_default_options() -> anyhow::Result<()> {
    let node_dir = interop_dir().join("node");
    installed(
        node_dir.join("node_modules/@grpc/grpc-js"),
        "Node @grpc/grpc-js",
    )?;
    installed(
        node_dir.join("node_modules/@grpc/proto-loader"),
        "Node @grpc/proto-loader",
    )?;
    let script = repo_root().join("tests/interop/client.js");
    let setup = Setup::start("team/interop-node").await?;
    let result = setup
        .run_client(
            Path::new("node"),
            &[&script],
            // The script lives in the repository, its modules in the cache dir.
            &[("NODE_PATH", &node_dir.join("node_modules"))],
        )
        .await?;
    setup.check("grpc-js", &result);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_grpcurl_without_authority() -> anyhow::Result<()> {
    grpcurl_path()?;
    let setup = Setup::start("team/interop-grpcurl").await?;
    let socket = setup.berthd.socket();

    let health: Value = serde_json::from_str(
        &grpcurl_ok(socket, &["-d", "{}"], &["grpc.health.v1.Health/Check"]).await?,
    )?;
    assert_eq!(health["status"], "SERVING");
    let listed: Value = serde_json::from_str(
        &grpcurl_ok(
            socket,
            &["-d", r#"{"project":"default"}"#],
            &["berth.v1.Agent/ListContainers"],
        )
        .await?,
    )?;
    assert_eq!(
        listed,
        json!({}),
        "no containers (proto3 JSON omits the empty list)"
    );

    let pull = json!({
        "project": "default",
        "image": setup.image.reference(),
        "pull_secret": setup.secret,
    });
    let stream = grpcurl_ok(
        socket,
        &["-d", &pull.to_string(), "-format-error"],
        &["berth.v1.Agent/PullImage"],
    )
    .await?;
    // One JSON object per event, pretty-printed back to back.
    let events: Vec<Value> = serde_json::Deserializer::from_str(&stream)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .with_context(|| format!("grpcurl printed: {stream}"))?;
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|event| event.as_object()?.keys().next().map(String::as_str))
        .collect();
    assert_eq!(kinds.first(), Some(&"resolved"), "{stream}");
    assert_eq!(kinds.last(), Some(&"done"), "{stream}");
    assert_eq!(
        events.last().map(|event| &event["done"]["digest"]),
        Some(&json!(setup.image.manifest_digest)),
        "{stream}"
    );
    Ok(())
}

/// Bytes that are not HTTP/2 on the unix socket: each such connection is closed, berthd keeps
/// answering, and its open file descriptors come back to where they were (no leak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_garbage_on_the_socket_closes_the_connection() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let env = OpsEnv::start().await?;
    let berthd = HostBerthd::start(&env.host_config(), &HostEnvironment::default()).await?;
    let fd_dir = PathBuf::from(format!("/proc/{}/fd", berthd.pid()?));
    let open_fds = || -> anyhow::Result<usize> { Ok(std::fs::read_dir(&fd_dir)?.count()) };
    let before = open_fds()?;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut bad_hpack = preface.clone();
    bad_hpack.extend(h2_frame(0x4, 0, 0, &[])?);
    bad_hpack.extend(h2_frame(0x1, 0x4, 1, &[0xff, 0x49])?); // index 200: in no table
    let mut oversized = preface.clone();
    oversized.extend([0xff, 0xff, 0xff, 0x1, 0, 0, 0, 0, 1]); // a 16 MiB HEADERS frame
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        &[0u8; 64],
        &bad_hpack,
        &oversized,
    ];
    for round in 0..40 {
        let sent = garbage[round % garbage.len()];
        let mut stream = tokio::net::UnixStream::connect(berthd.socket()).await?;
        stream.write_all(sent).await?;
        let mut drained = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut drained))
            .await
            .with_context(|| format!("berthd kept a connection open after {sent:?}"))?
            // Closed at end of stream (after what h2 wrote first) or with a reset: both fine.
            .ok();
    }
    assert_eq!(
        HealthClient::new(berthd.channel().await?)
            .check(HealthCheckRequest::default())
            .await?
            .into_inner()
            .status,
        1,
        "SERVING after the garbage"
    );
    wait_for(
        "berthd's open files to return to their count",
        STARTUP_TIMEOUT,
        || async {
            let now = open_fds()?;
            Ok((now <= before + 2).then_some(()))
        },
    )
    .await
    .with_context(|| format!("berthd had {before} files open before"))?;
    Ok(())
}

/// The TCP listener has no front: a path in `:authority` is refused there as before
/// (RST_STREAM with PROTOCOL_ERROR), while the same request with `localhost` is answered.
/// The frames are written by hand: neither tonic nor grpcurl sends a path over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_tcp_listener_still_refuses_a_path_authority() -> anyhow::Result<()> {
    let ca = crate::harness::ca::TestCa::generate()?;
    let containerd = Containerd::start().await?;
    let pki = TestPki::generate()?;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let server = pki.server("berthd", &[loopback])?;
    let client = pki.client("client", ClientName::Dns("scheduler.example"))?;
    let addr = SocketAddr::new(loopback, free_local_port()?);
    let options = BerthdOptions {
        listen: Some(format!("tcp://{addr}")),
        top_level_toml: format!(
            "tls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}",
            server.cert_path,
            server.key_path,
            pki.ca_pem_path()
        ),
        tables_toml: "[[access]]\nidentity = \"scheduler.example\"\nprojects = [\"*\"]\n"
            .to_owned(),
        ..BerthdOptions::default()
    };
    let berthd = Berthd::start(&containerd, &ca, &options).await?;
    let tls = pki.rustls_client_config(&client)?;
    let answered = wait_for("an answer over mTLS", STARTUP_TIMEOUT, || async {
        Ok(raw_request(&tls, addr, "localhost").await.ok())
    })
    .await
    .with_context(|| format!("berthd log:\n{}", berthd.log_tail()))?;
    assert_eq!(answered, Answer::Headers, "`localhost` over TCP");
    let refused = raw_request(&tls, addr, "/run/berth/berthd.sock").await?;
    assert_eq!(
        refused,
        Answer::Reset(1),
        "a path as :authority over TCP: RST_STREAM(PROTOCOL_ERROR)"
    );
    Ok(())
}

/// How the server answered stream 1.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Headers,
    Reset(u32),
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let len = u32::try_from(payload.len())?;
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    Ok(frame)
}

/// A health check on stream 1 of a new TLS connection, with `authority` as `:authority`
/// (HPACK literals without indexing); the server's first answer on that stream.
async fn raw_request(
    tls: &std::sync::Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    authority: &str,
) -> anyhow::Result<Answer> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0);
        for string in [name, value] {
            block.push(u8::try_from(string.len())?); // all under 127 bytes
            block.extend(string.as_bytes());
        }
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[])?);
    out.extend(h2_frame(0x1, 0x4, 1, &block)?);
    // An empty gRPC message (HealthCheckRequest{}) ends the stream.
    out.extend(h2_frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])?);
    stream.write_all(&out).await?;
    let read = async {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let count = stream.read(&mut buffer).await?;
            ensure!(
                count > 0,
                "the server closed the connection without answering"
            );
            seen.extend_from_slice(&buffer[..count]);
            let mut rest = seen.as_slice();
            while rest.len() >= 9 {
                let len = usize::try_from(u32::from_be_bytes([0, rest[0], rest[1], rest[2]]))?;
                if rest.len() < 9 + len {
                    break;
                }
                let stream_id = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
                match (rest[3], stream_id) {
                    (0x1, 1) => return Ok(Answer::Headers),
                    (0x3, 1) if len == 4 => {
                        return Ok(Answer::Reset(u32::from_be_bytes([
                            rest[9], rest[10], rest[11], rest[12],
                        ])))
                    }
                    (0x7, _) => bail!("GOAWAY from the server"),
                    _ => {}
                }
                rest = &rest[9 + len..];
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .context("no answer in 10 s")?
}

/// Per-request cost through the socket (and so the front): sequential health checks and
/// ListContainers with berth's own client (tonic), printed for the README and the issue.
/// Bounded loosely so that only a gross regression fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_per_request_cost_over_the_socket() -> anyhow::Result<()> {
    const REQUESTS: u32 = 2000;
    let env = OpsEnv::start().await?;
    let berthd = HostBerthd::start(&env.host_config(), &HostEnvironment::default()).await?;
    let channel = berthd.channel().await?;
    let mut health = HealthClient::new(channel.clone());
    let mut agent = berth::api::pb::agent_client::AgentClient::new(channel);
    // Warm-up: connection, first allocations.
    for _ in 0..50 {
        health.check(HealthCheckRequest::default()).await?;
    }
    let started = Instant::now();
    for _ in 0..REQUESTS {
        health.check(HealthCheckRequest::default()).await?;
    }
    let health_each = started.elapsed() / REQUESTS;
    let started = Instant::now();
    for _ in 0..REQUESTS {
        agent
            .list_containers(ListContainersRequest {
                project: "default".to_owned(),
            })
            .await?;
    }
    let list_each = started.elapsed() / REQUESTS;
    println!(
        "per request over the unix socket ({REQUESTS} sequential, tonic client, berthd {}): \
         Health/Check {health_each:?}, ListContainers {list_each:?}",
        crate::harness::berthd::bin_dir()?.display()
    );
    assert!(
        health_each < Duration::from_millis(5),
        "Health/Check took {health_each:?} per request"
    );
    Ok(())
}
