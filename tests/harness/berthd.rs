//! The real `berthd` and `berth` binaries: a daemon per test on a temp unix socket, and the CLI.
//!
//! The binaries are looked up next to the test executable (`target/debug/deps/integration-*` ->
//! `target/debug/`), or in `$BERTH_BIN_DIR`. Build them first: `cargo build -p berth --bins`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use berth::api::pb::agent_client::AgentClient;
use berth::api::pb::secrets_client::SecretsClient;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt as _;
use tonic::transport::Channel;

use super::credentials::RegistryUser;
use tonic_health::pb::health_check_response::ServingStatus;

use super::ca::TestCa;
use super::containerd::Containerd;
use super::grpc::{connect_unix, health};
use super::process::Daemon;
use super::temp_dir;
use super::wait::{wait_for, STARTUP_TIMEOUT};

mod lifecycle;

/// Overrides where `berthd` and `berth` are found.
const BIN_DIR_VARIABLE: &str = "BERTH_BIN_DIR";

/// Upper bound on one CLI run.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// The dir holding `berthd` and `berth`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_VARIABLE) {
        return Ok(PathBuf::from(dir));
    }
    let executable = std::env::current_exe().context("locating the test executable")?;
    // .../target/debug/deps/integration-<hash> -> .../target/debug
    executable
        .parent()
        .and_then(Path::parent)
        .map(Path::to_owned)
        .with_context(|| format!("no target dir above {}", executable.display()))
}

/// The path of the binary `name`, failing loudly (with the build command) when it is missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build it with `cargo build -p berth --bins` (or set {BIN_DIR_VARIABLE})",
            path.display()
        );
    }
    Ok(path)
}

/// What varies between tests' daemons.
#[derive(Debug, Clone, Default)]
pub struct BerthdOptions {
    /// `[registry] plain_http`: hosts spoken to over plain HTTP (the corrupting proxies).
    pub plain_http: Vec<String>,
    /// `listen` in place of the temp unix socket (`tcp://IP:PORT`); readiness is then a TCP
    /// connect, and the caller checks health itself (over mTLS).
    pub listen: Option<String>,
    /// Top-level keys written before every table: `socket_group`, `tls_cert`, ...
    pub top_level_toml: String,
    /// `[registry] ca_files` beside the test CA.
    pub extra_ca_files: Vec<PathBuf>,
    /// Tables appended at the end: `[[access]]`, `[security]`, ...
    pub tables_toml: String,
    /// More `[registry]` keys (`retries = 5`, `read_timeout_seconds = 2`, ...), one per line.
    pub registry_toml: String,
    /// More `[containerd]` keys (`keep_layer_blobs = false`, ...), one per line.
    pub containerd_toml: String,
}

/// A running berthd.
#[derive(Debug)]
pub struct Berthd {
    daemon: Daemon,
    socket: PathBuf,
    state_dir: PathBuf,
    config_path: PathBuf,
    _dir: TempDir,
}

impl Berthd {
    /// Writes a config for `containerd` (its socket and namespace) trusting `ca`, starts berthd
    /// with `BERTH_LOG=debug`, and waits until its health check answers SERVING.
    pub async fn start(
        containerd: &Containerd,
        ca: &TestCa,
        options: &BerthdOptions,
    ) -> anyhow::Result<Self> {
        Self::start_with_secrets(containerd, ca, options, None).await
    }

    /// [`Self::start`], with `secrets_toml` (when given) in place of the `[secrets]` section of
    /// the file backend: the openbao backend, say.
    pub async fn start_with_secrets(
        containerd: &Containerd,
        ca: &TestCa,
        options: &BerthdOptions,
        secrets_toml: Option<&str>,
    ) -> anyhow::Result<Self> {
        let berthd = binary("berthd")?;
        let dir = temp_dir("berthd")?;
        let socket = dir.path().join("berthd.sock");
        let state_dir = dir.path().join("state");
        let config_path = dir.path().join("berthd.toml");
        let config = config_toml(&ConfigPaths {
            socket: &socket,
            state_dir: &state_dir,
            key_file: &dir.path().join("secrets.key"),
            containerd_socket: containerd.socket(),
            namespace: containerd.namespace(),
            ca_file: ca.ca_pem_path(),
            plain_http: &options.plain_http,
            secrets_toml,
            options,
        })?;
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;

        let mut command = Command::new(&berthd);
        command
            .arg("--config")
            .arg(&config_path)
            .env("BERTH_LOG", "debug")
            .env_remove("RUST_LOG");
        let daemon = Daemon::spawn("berthd", command, &dir.path().join("berthd.log"))?;
        let berthd = Self {
            daemon,
            socket,
            state_dir,
            config_path,
            _dir: dir,
        };
        let tcp = options
            .listen
            .as_deref()
            .and_then(|listen| listen.strip_prefix("tcp://"));
        wait_for(
            "berthd's health check to answer SERVING",
            STARTUP_TIMEOUT,
            || {
                let berthd = &berthd;
                async move {
                    berthd.daemon.ensure_running()?;
                    if let Some(addr) = tcp {
                        return Ok(tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()));
                    }
                    if !berthd.socket.exists() {
                        return Ok(None);
                    }
                    let Ok(channel) = connect_unix(&berthd.socket).await else {
                        return Ok(None);
                    };
                    Ok(match health(channel).await {
                        Ok(ServingStatus::Serving) => Some(()),
                        _ => None,
                    })
                }
            },
        )
        .await
        .with_context(|| format!("berthd log:\n{}", berthd.daemon.log_tail()))?;
        Ok(berthd)
    }

    /// The gRPC unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Everything berthd wrote to stdout and stderr (debug level).
    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// The last few KiB of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        self.daemon.log_tail()
    }

    pub fn log_path(&self) -> &Path {
        self.daemon.log_path()
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        connect_unix(&self.socket).await
    }

    pub async fn agent(&self) -> anyhow::Result<AgentClient<Channel>> {
        Ok(AgentClient::new(self.channel().await?))
    }

    pub async fn secrets(&self) -> anyhow::Result<SecretsClient<Channel>> {
        Ok(SecretsClient::new(self.channel().await?))
    }

    /// The server-wide health status.
    pub async fn health(&self) -> anyhow::Result<ServingStatus> {
        health(self.channel().await?).await
    }

    /// `grpc.health.v1.Health/Check` for one service, e.g. `berth.v1.Agent`.
    pub async fn service_health(&self, service: &str) -> anyhow::Result<ServingStatus> {
        super::grpc::service_health(self.channel().await?, service).await
    }

    /// `berth --socket <sock> ARGS...`, with `stdin` fed to it when given.
    pub async fn cli(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
        run_cli(&self.socket, args, stdin).await
    }

    /// [`Self::cli`] that must succeed; returns stdout.
    pub async fn cli_ok(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let output = self.cli(args, stdin).await?;
        if !output.status.success() {
            bail!(
                "berth {args:?} failed ({}):\nstdout: {}\nstderr: {}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

struct ConfigPaths<'a> {
    socket: &'a Path,
    state_dir: &'a Path,
    key_file: &'a Path,
    containerd_socket: &'a Path,
    namespace: &'a str,
    ca_file: &'a Path,
    plain_http: &'a [String],
    secrets_toml: Option<&'a str>,
    options: &'a BerthdOptions,
}

/// A TOML basic string (a JSON string is one).
fn toml_string(value: &str) -> anyhow::Result<String> {
    Ok(serde_json::to_string(value)?)
}

fn toml_path(path: &Path) -> anyhow::Result<String> {
    toml_string(&path.to_string_lossy())
}

fn config_toml(paths: &ConfigPaths<'_>) -> anyhow::Result<String> {
    let plain_http = paths
        .plain_http
        .iter()
        .map(|host| toml_string(host))
        .collect::<anyhow::Result<Vec<_>>>()?
        .join(", ");
    let mut ca_files = vec![toml_path(paths.ca_file)?];
    for path in &paths.options.extra_ca_files {
        ca_files.push(toml_path(path)?);
    }
    let listen = match &paths.options.listen {
        Some(listen) => listen.clone(),
        None => format!("unix://{}", paths.socket.display()),
    };
    Ok(format!(
        "listen = {listen}\n\
         {top_level}\n\
         state_dir = {state_dir}\n\
         \n\
         [containerd]\n\
         socket = {containerd_socket}\n\
         namespace = {namespace}\n\
         {containerd}\n\
         \n\
         {secrets}\n\
         \n\
         [registry]\n\
         ca_files = [{ca_file}]\n\
         plain_http = [{plain_http}]\n\
         {registry}\n\
         {tables}\n",
        listen = toml_string(&listen)?,
        top_level = paths.options.top_level_toml.trim_end(),
        tables = paths.options.tables_toml.trim_end(),
        registry = paths.options.registry_toml.trim_end(),
        containerd = paths.options.containerd_toml.trim_end(),
        state_dir = toml_path(paths.state_dir)?,
        containerd_socket = toml_path(paths.containerd_socket)?,
        namespace = toml_string(paths.namespace)?,
        secrets = match paths.secrets_toml {
            Some(secrets) => secrets.trim_end().to_owned(),
            None => format!(
                "[secrets]\nbackend = \"file\"\nkey_file = {}",
                toml_path(paths.key_file)?
            ),
        },
        ca_file = ca_files.join(", "),
    ))
}

/// `berth --socket <socket> ARGS...` with `stdin` fed to it when given; stdout and stderr piped
/// (so the CLI sees no terminal).
pub async fn run_cli(socket: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
    let berth = binary("berth")?;
    let mut command = tokio::process::Command::new(&berth);
    command
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning berth {args:?}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .context("writing the CLI's stdin")?;
        drop(pipe);
    }
    tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("berth {args:?} timed out"))?
        .with_context(|| format!("running berth {args:?}"))
}

/// `Secrets/CreateSecret` (project "default") for a Docker credential; returns the id.
pub async fn create_docker_secret(
    mut secrets: SecretsClient<Channel>,
    name: &str,
    server: &str,
    user: &RegistryUser,
) -> anyhow::Result<String> {
    use berth::api::pb::create_secret_request::Credential;
    use berth::api::pb::{CreateSecretRequest, DockerCredential};
    let secret = secrets
        .create_secret(CreateSecretRequest {
            project: String::new(),
            name: name.to_owned(),
            credential: Some(Credential::Docker(DockerCredential {
                server: server.to_owned(),
                username: user.username.clone(),
                password: user.password.clone(),
            })),
        })
        .await
        .with_context(|| format!("creating secret {name} for {server}"))?
        .into_inner();
    Ok(secret.id)
}
