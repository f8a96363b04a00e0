//! `docker-registry serve` (distribution 2.8) over TLS with htpasswd or token auth, on loopback,
//! always with our own config (Debian's default one points htpasswd at a directory).
//!
//! Token auth comes in three flavours, all verifying the same token server's JWTs: Docker (realm
//! `/token`, a fixed service), ACR (realm `/oauth2/token`, service = the registry's own
//! `host:port`, as `<name>.azurecr.io` is) and GAR (realm `/v2/token`; put a
//! [`super::proxy::ServicelessFront`] in front to hide the service from the challenge).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};
use reqwest::StatusCode;
use tempfile::TempDir;

use super::ca::TestCa;
use super::credentials::RegistryUser;
use super::process::Daemon;
use super::token_server::TokenServer;
use super::wait::{wait_for, STARTUP_TIMEOUT};
use super::{free_local_port, random_lowercase, temp_dir};

const REGISTRY_BINARY: &str = "docker-registry";

/// Tries at a free port, in case another test took the port between probe and bind.
const START_ATTEMPTS: usize = 3;

/// A running registry.
#[derive(Debug)]
pub struct Registry {
    daemon: Daemon,
    addr: String,
    _dir: TempDir,
}

impl Registry {
    /// A registry with `auth.htpasswd`: these users (bcrypt entries), any of them may push and pull.
    pub async fn start_htpasswd(ca: &TestCa, users: &[&RegistryUser]) -> anyhow::Result<Self> {
        let dir = temp_dir("registry")?;
        let htpasswd_path = dir.path().join("htpasswd");
        let mut entries = String::new();
        for user in users {
            let output = Command::new("htpasswd")
                .args(["-Bbn", &user.username, &user.password])
                .output()
                .context("running htpasswd (apt package apache2-utils)")?;
            if !output.status.success() {
                bail!(
                    "htpasswd failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            entries.push_str(String::from_utf8_lossy(&output.stdout).trim());
            entries.push('\n');
        }
        std::fs::write(&htpasswd_path, entries)
            .with_context(|| format!("writing {}", htpasswd_path.display()))?;
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: berth-test-registry\n    path: {}\n",
            htpasswd_path.display()
        );
        Self::start(ca, dir, |_| auth.clone()).await
    }

    /// A registry with `auth.token` pointing at `token_server`'s Docker realm.
    pub async fn start_token(ca: &TestCa, token_server: &TokenServer) -> anyhow::Result<Self> {
        let dir = temp_dir("registry")?;
        let auth = token_auth_yaml(token_server, &token_server.realm(), token_server.service());
        Self::start(ca, dir, |_| auth.clone()).await
    }

    /// An ACR-style registry: realm `token_server`'s `/oauth2/token`, service = this registry's
    /// `host:port` (registered with the token server).
    pub async fn start_acr(ca: &TestCa, token_server: &TokenServer) -> anyhow::Result<Self> {
        let dir = temp_dir("registry-acr")?;
        Self::start(ca, dir, |addr| {
            token_server.register_acr_service(addr);
            token_auth_yaml(token_server, &token_server.acr_realm(), addr)
        })
        .await
    }

    /// The registry behind a GAR-style front: realm `token_server`'s `/v2/token`, service its
    /// GAR service (which the front hides).
    pub async fn start_gar(ca: &TestCa, token_server: &TokenServer) -> anyhow::Result<Self> {
        let dir = temp_dir("registry-gar")?;
        let auth = token_auth_yaml(
            token_server,
            &token_server.gar_realm(),
            token_server.gar_service(),
        );
        Self::start(ca, dir, |_| auth.clone()).await
    }

    /// Starts at a free port; `auth_yaml` gives the `auth:` section for the address tried.
    async fn start(
        ca: &TestCa,
        dir: TempDir,
        auth_yaml: impl Fn(&str) -> String,
    ) -> anyhow::Result<Self> {
        let client = ca.http_client()?;
        let mut last_failure = None;
        for attempt in 0..START_ATTEMPTS {
            let port = free_local_port()?;
            let addr = format!("127.0.0.1:{port}");
            let config_path = dir.path().join("config.yml");
            std::fs::write(
                &config_path,
                config_yaml(ca, dir.path(), &addr, &auth_yaml(&addr)),
            )
            .with_context(|| format!("writing {}", config_path.display()))?;
            let mut command = Command::new(REGISTRY_BINARY);
            command.arg("serve").arg(&config_path);
            let log_path = dir.path().join(format!("registry-{attempt}.log"));
            let daemon = Daemon::spawn(REGISTRY_BINARY, command, &log_path)
                .context("starting docker-registry (apt package docker-registry)")?;
            let ready = wait_for(
                &format!("docker-registry at {addr} to answer /v2/ with 401"),
                STARTUP_TIMEOUT,
                || {
                    let (daemon, client, addr) = (&daemon, &client, &addr);
                    async move {
                        daemon.ensure_running()?;
                        match client.get(format!("https://{addr}/v2/")).send().await {
                            Ok(response) if response.status() == StatusCode::UNAUTHORIZED => {
                                Ok(Some(()))
                            }
                            Ok(response) => bail!("/v2/ answered {}", response.status()),
                            Err(_) => Ok(None),
                        }
                    }
                },
            )
            .await;
            match ready {
                Ok(()) => {
                    return Ok(Self {
                        daemon,
                        addr,
                        _dir: dir,
                    })
                }
                Err(failure) => last_failure = Some(failure),
            }
        }
        Err(last_failure.unwrap_or_else(|| anyhow::anyhow!("docker-registry did not start")))
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// How many times the registry served `repository`'s manifest with 200 (its log has one
    /// `response completed` line per request; logrus quotes a value only when it must).
    pub fn manifests_served(&self, repository: &str) -> usize {
        let uris = [
            format!("http.request.uri=/v2/{repository}/manifests/"),
            format!("http.request.uri=\"/v2/{repository}/manifests/"),
        ];
        self.log_text()
            .lines()
            .filter(|line| {
                line.contains("msg=\"response completed\"")
                    && uris.iter().any(|uri| line.contains(uri.as_str()))
                    && line.contains("http.response.status=200")
            })
            .count()
    }
}

fn token_auth_yaml(token_server: &TokenServer, realm: &str, service: &str) -> String {
    format!(
        "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {}\n    rootcertbundle: {}\n",
        token_server.issuer(),
        token_server.signing_cert_path().display()
    )
}

fn config_yaml(ca: &TestCa, dir: &Path, addr: &str, auth_yaml: &str) -> String {
    let mut yaml = String::new();
    let _ = write!(
        yaml,
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n  secret: {secret}\n  tls:\n    certificate: {certificate}\n    key: {key}\n\
         health:\n  storagedriver:\n    enabled: false\n",
        storage = dir.join("storage").display(),
        secret = random_lowercase(32),
        certificate = ca.server_cert_path().display(),
        key = ca.server_key_path().display(),
    );
    yaml.push_str(auth_yaml);
    yaml
}
