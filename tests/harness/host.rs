//! berthd as a host service runs it: a config the test writes whole (`metrics_listen`,
//! `[[registry.mirror]]`, a containerd socket that may not exist yet) and the environment
//! systemd gives a `Type=notify` service (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
//! Plus [`OpsEnv`]: a CA, containerd and a token-auth registry for the operations tests.
//!
//! The process is spawned directly (not through [`super::process::Daemon`]) so that the test
//! knows its pid and can signal it; `Drop` stops it (SIGTERM, then SIGKILL after a grace period).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use berth::api::pb::agent_client::AgentClient;
use berth::api::pb::secrets_client::SecretsClient;
use berth::api::pb::{
    Container, ContainerState, GetContainerRequest, PullPolicy, StartContainerRequest,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use super::berthd::binary;
use super::ca::TestCa;
use super::containerd::Containerd;
use super::credentials::RegistryUser;
use super::env::start_request;
use super::grpc::{connect_unix, health};
use super::image::{push_image, PushedImage, TestImage};
use super::registry::Registry;
use super::token_server::{Grants, TokenServer};
use super::wait::{wait_for, ORDER_TIMEOUT, STARTUP_TIMEOUT};
use super::{random_lowercase, temp_dir};

/// Between SIGTERM and SIGKILL on `Drop`.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// One `[[registry.mirror]]` entry.
#[derive(Debug, Clone)]
pub struct MirrorEntry {
    pub upstream: String,
    pub endpoint: String,
    pub credentials: bool,
}

/// What goes into the config berthd is started with.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub containerd_socket: PathBuf,
    pub namespace: String,
    /// `[registry] ca_files`.
    pub ca_files: Vec<PathBuf>,
    /// `metrics_listen`, e.g. `127.0.0.1:PORT`; empty: off.
    pub metrics_listen: String,
    /// `[registry] plain_http`.
    pub plain_http: Vec<String>,
    /// More `[registry]` keys, one `key = value` per line.
    pub registry_toml: String,
    pub mirrors: Vec<MirrorEntry>,
    /// Tables appended at the end (`[[policy]]`, `[security]`, ...).
    pub tables_toml: String,
    /// More top-level keys (`audit_log = "..."`), one `key = value` per line.
    pub top_level_toml: String,
}

impl HostConfig {
    /// berthd on `containerd` trusting `ca`, everything else default.
    pub fn new(containerd: &Containerd, ca: &TestCa) -> Self {
        Self::for_socket(containerd.socket(), containerd.namespace(), ca)
    }

    /// berthd on a containerd socket that need not exist yet.
    pub fn for_socket(socket: &Path, namespace: &str, ca: &TestCa) -> Self {
        Self {
            containerd_socket: socket.to_owned(),
            namespace: namespace.to_owned(),
            ca_files: vec![ca.ca_pem_path().to_owned()],
            metrics_listen: String::new(),
            plain_http: Vec::new(),
            registry_toml: String::new(),
            mirrors: Vec::new(),
            tables_toml: String::new(),
            top_level_toml: String::new(),
        }
    }
}

/// How the process is started, beside its config.
#[derive(Debug, Clone, Default)]
pub struct HostEnvironment {
    /// Extra environment variables (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, ...).
    pub vars: Vec<(String, String)>,
    /// Sets `WATCHDOG_PID` to berthd's own pid (as systemd does), through `sh -c 'export
    /// WATCHDOG_PID=$$; exec berthd ...'`.
    pub watchdog_pid_is_self: bool,
    /// `--log-format json`.
    pub json_logs: bool,
}

/// A running berthd with its own temp dir (socket, state, config, log).
#[derive(Debug)]
pub struct HostBerthd {
    child: Option<Child>,
    socket: PathBuf,
    log_path: PathBuf,
    metrics_listen: String,
    _dir: TempDir,
}

/// A TOML basic string (a JSON string is one).
fn toml_string(value: &str) -> anyhow::Result<String> {
    Ok(serde_json::to_string(value)?)
}

fn toml_list(values: &[String]) -> anyhow::Result<String> {
    Ok(values
        .iter()
        .map(|value| toml_string(value))
        .collect::<anyhow::Result<Vec<_>>>()?
        .join(", "))
}

fn config_toml(config: &HostConfig, dir: &Path, socket: &Path) -> anyhow::Result<String> {
    let ca_files: Vec<String> = config
        .ca_files
        .iter()
        .map(|path| path.to_string_lossy().into_owned())
        .collect();
    let mut text = format!(
        "listen = {listen}\nstate_dir = {state}\nmetrics_listen = {metrics}\n{top}\n\n\
         [containerd]\nsocket = {containerd}\nnamespace = {namespace}\n\n\
         [secrets]\nbackend = \"file\"\nkey_file = {key}\n\n\
         [registry]\nca_files = [{ca_files}]\nplain_http = [{plain_http}]\n{registry}\n",
        listen = toml_string(&format!("unix://{}", socket.display()))?,
        state = toml_string(&dir.join("state").to_string_lossy())?,
        metrics = toml_string(&config.metrics_listen)?,
        top = config.top_level_toml.trim_end(),
        containerd = toml_string(&config.containerd_socket.to_string_lossy())?,
        namespace = toml_string(&config.namespace)?,
        key = toml_string(&dir.join("secrets.key").to_string_lossy())?,
        ca_files = toml_list(&ca_files)?,
        plain_http = toml_list(&config.plain_http)?,
        registry = config.registry_toml.trim_end(),
    );
    for mirror in &config.mirrors {
        text.push_str(&format!(
            "\n[[registry.mirror]]\nupstream = {}\nendpoint = {}\ncredentials = {}\n",
            toml_string(&mirror.upstream)?,
            toml_string(&mirror.endpoint)?,
            mirror.credentials
        ));
    }
    if !config.tables_toml.is_empty() {
        text.push('\n');
        text.push_str(config.tables_toml.trim_end());
        text.push('\n');
    }
    Ok(text)
}

impl HostBerthd {
    /// Writes the config and starts berthd (`BERTH_LOG=debug`); does not wait for anything.
    pub fn spawn(config: &HostConfig, environment: &HostEnvironment) -> anyhow::Result<Self> {
        let berthd = binary("berthd")?;
        let dir = temp_dir("host-berthd")?;
        let socket = dir.path().join("berthd.sock");
        let config_path = dir.path().join("berthd.toml");
        let log_path = dir.path().join("berthd.log");
        std::fs::write(&config_path, config_toml(config, dir.path(), &socket)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut command = if environment.watchdog_pid_is_self {
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg("export WATCHDOG_PID=$$; exec \"$@\"")
                .arg("sh")
                .arg(&berthd);
            command
        } else {
            Command::new(&berthd)
        };
        command.arg("--config").arg(&config_path);
        if environment.json_logs {
            command.args(["--log-format", "json"]);
        }
        command
            .env("BERTH_LOG", "debug")
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (key, value) in &environment.vars {
            command.env(key, value);
        }
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {}", berthd.display()))?;
        Ok(Self {
            child: Some(child),
            socket,
            log_path,
            metrics_listen: config.metrics_listen.clone(),
            _dir: dir,
        })
    }

    /// [`Self::spawn`], then waits until the health check answers SERVING.
    pub async fn start(config: &HostConfig, environment: &HostEnvironment) -> anyhow::Result<Self> {
        let mut berthd = Self::spawn(config, environment)?;
        berthd.wait_serving().await?;
        Ok(berthd)
    }

    /// Polls the health check until SERVING (fails at once if berthd exited).
    pub async fn wait_serving(&mut self) -> anyhow::Result<()> {
        self.wait_health(ServingStatus::Serving).await
    }

    /// Polls the health check until it answers `wanted` (fails at once if berthd exited).
    pub async fn wait_health(&mut self, wanted: ServingStatus) -> anyhow::Result<()> {
        let socket = self.socket.clone();
        let result = wait_for(
            &format!("berthd's health check to answer {wanted:?}"),
            STARTUP_TIMEOUT,
            || {
                let exited = self.exit_status();
                let socket = socket.clone();
                async move {
                    if let Some(status) = exited? {
                        bail!("berthd exited with {status}");
                    }
                    if !socket.exists() {
                        return Ok(None);
                    }
                    Ok((health_of(&socket).await == Some(wanted)).then_some(()))
                }
            },
        )
        .await;
        result.with_context(|| format!("berthd log:\n{}", self.log_tail()))
    }

    /// `Some(status)` once berthd has exited.
    pub fn exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => child.try_wait().context("polling berthd"),
            None => bail!("berthd was already stopped"),
        }
    }

    /// berthd's pid (also after an `exec` from `sh`).
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .context("berthd was already stopped")
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let pid = i32::try_from(self.pid()?).context("pid out of range")?;
        kill(Pid::from_raw(pid), Signal::SIGTERM).context("sending SIGTERM")?;
        let status = wait_for("berthd to exit after SIGTERM", timeout, || {
            let status = self.exit_status();
            async move { status }
        })
        .await?;
        self.child = None;
        Ok(status)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `metrics_listen` as configured.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics_listen
    }

    pub fn log_text(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let start = text.len().saturating_sub(6000);
        let start = (start..text.len())
            .find(|&index| text.is_char_boundary(index))
            .unwrap_or(text.len());
        text[start..].to_owned()
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

    /// `berth --socket <sock> ARGS...`, `stdin` fed to it when given.
    pub async fn cli(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
        crate::harness::berthd::run_cli(&self.socket, args, stdin).await
    }

    /// [`Self::cli`] that must succeed; returns stdout.
    pub async fn cli_ok(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let output = self.cli(args, stdin).await?;
        if !output.status.success() {
            bail!(
                "berth {args:?} failed ({}):\nstdout: {}\nstderr: {}\nberthd log:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl HostBerthd {
    /// `Secrets/CreateSecret` (project "default") for a Docker credential; returns the id.
    pub async fn create_docker_secret(
        &self,
        name: &str,
        server: &str,
        user: &RegistryUser,
    ) -> anyhow::Result<String> {
        crate::harness::berthd::create_docker_secret(self.secrets().await?, name, server, user)
            .await
    }

    /// `Agent/StartContainer`; the status is returned as is.
    pub async fn start_container(
        &self,
        request: StartContainerRequest,
    ) -> anyhow::Result<Result<Container, tonic::Status>> {
        Ok(self
            .agent()
            .await?
            .start_container(request)
            .await
            .map(tonic::Response::into_inner))
    }

    /// Polls `Agent/GetContainer` until the container `id` is EXITED.
    pub async fn wait_until_exited(&self, id: &str) -> anyhow::Result<Container> {
        let agent = self.agent().await?;
        wait_for(&format!("container {id} to exit"), ORDER_TIMEOUT, || {
            let mut agent = agent.clone();
            async move {
                let container = agent
                    .get_container(GetContainerRequest {
                        id: id.to_owned(),
                        ..GetContainerRequest::default()
                    })
                    .await
                    .with_context(|| format!("getting container {id}"))?
                    .into_inner();
                Ok((container.state() == ContainerState::Exited).then_some(container))
            }
        })
        .await
        .with_context(|| format!("berthd log:\n{}", self.log_tail()))
    }

    /// Starts `image` (with `pull_policy`) under a fresh order id and name, waits for it to
    /// exit 0, and returns it.
    pub async fn run_to_completion(
        &self,
        image: &str,
        pull_secret: &str,
        pull_policy: PullPolicy,
    ) -> anyhow::Result<Container> {
        let suffix = random_lowercase(8);
        let mut request = start_request(
            &format!("order-{suffix}"),
            &format!("run-{suffix}"),
            image,
            pull_secret,
        );
        if let Some(spec) = request.container.as_mut() {
            spec.pull_policy = pull_policy as i32;
        }
        let started = match self.start_container(request).await? {
            Ok(container) => container,
            Err(status) => bail!(
                "starting {image} failed: {status:?}\nberthd log:\n{}",
                self.log_tail()
            ),
        };
        let exited = self.wait_until_exited(&started.id).await?;
        if exited.exit_code != 0 {
            bail!("{image} exited with {}", exited.exit_code);
        }
        Ok(exited)
    }
}

/// The server-wide health status, or None when the socket does not answer yet.
pub async fn health_of(socket: &Path) -> Option<ServingStatus> {
    let channel = connect_unix(socket).await.ok()?;
    health(channel).await.ok()
}

impl Drop for HostBerthd {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Ok(raw_pid) = i32::try_from(child.id()) {
            let pid = Pid::from_raw(raw_pid);
            let _ = kill(pid, Signal::SIGTERM);
            // Waits without reaping (so the pid cannot be reused) in a thread, bounded.
            let (exited_sender, exited) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let status = waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
                let _ = exited_sender.send(status.is_ok());
            });
            if exited.recv_timeout(STOP_GRACE).unwrap_or(false) {
                let _ = child.wait();
                return;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// CA, containerd, a token server and a token-auth registry: what the operations tests run
/// berthd against. Drops berthd-independent pieces in a safe order (registry before CA).
#[derive(Debug)]
pub struct OpsEnv {
    pub registry: Registry,
    pub token_server: TokenServer,
    pub containerd: Containerd,
    pub ca: TestCa,
    /// May pull every repository (berthd's secrets hold it).
    pub user: RegistryUser,
    /// Pushes.
    pub pusher: RegistryUser,
    scratch: TempDir,
}

impl OpsEnv {
    pub async fn start() -> anyhow::Result<Self> {
        let ca = TestCa::generate()?;
        let user = RegistryUser::generate("berth-user");
        let pusher = RegistryUser::generate("berth-pusher");
        let token_server = TokenServer::start(
            &ca,
            &[
                (&user, Grants::none().pull("*")),
                (&pusher, Grants::none().push_all()),
            ],
        )
        .await?;
        let (containerd, registry) = tokio::try_join!(
            Containerd::start(),
            Registry::start_token(&ca, &token_server)
        )?;
        Ok(Self {
            registry,
            token_server,
            containerd,
            ca,
            user,
            pusher,
            scratch: temp_dir("ops-scratch")?,
        })
    }

    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// Builds `image` and pushes it to the registry as the pusher.
    pub async fn push_image(
        &self,
        repository: &str,
        tag: &str,
        image: &TestImage,
    ) -> anyhow::Result<PushedImage> {
        push_image(
            &self.ca,
            self.registry.addr(),
            repository,
            tag,
            &self.pusher,
            image,
        )
        .await
    }

    /// A config for berthd on this env's containerd, trusting its CA.
    pub fn host_config(&self) -> HostConfig {
        HostConfig::new(&self.containerd, &self.ca)
    }
}
