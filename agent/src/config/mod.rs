//! Daemon configuration: typed, parsed and validated before anything is bound.
//!
//! Every key has a default (contract.md); unknown keys are refused with their line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use berth_core::host::Mirror;
pub use berth_registry::pull::policy::{PolicyConfig, VerifyKind};
use berth_secrets::provider::MatchImage;

pub(crate) mod settings;
pub(crate) use self::settings::Settings;

/// Where `berthd` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/berthd.toml";

/// Errors in reading or validating the daemon config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("config key {key}: reading {path}")]
    ReadFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The whole daemon config (`berthd.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: String,
    pub state_dir: PathBuf,
    pub socket_group: String,
    pub metrics_listen: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_client_ca: String,
    pub containerd: ContainerdConfig,
    pub secrets: SecretsConfig,
    pub registry: RegistryConfig,
    pub access: Vec<AccessConfig>,
    pub security: SecurityConfig,
    pub gc: GcConfig,
    pub policy: Vec<PolicyConfig>,
    /// "" = off; a path: one JSON line (0600) per credential use.
    pub audit_log: String,
    pub credential_provider: Vec<CredentialProviderConfig>,
    /// What validation parsed, kept so nothing is parsed twice.
    #[serde(skip)]
    pub(crate) parsed: Parsed,
}

/// The parts of the config that validation parses into typed values.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parsed {
    /// `[[registry.mirror]]`, in file order.
    pub(crate) mirrors: Vec<Mirror>,
    /// Each `[[credential_provider]]`'s `match_images`, in file order.
    pub(crate) match_images: Vec<Vec<MatchImage>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "unix:///run/berth/berthd.sock".to_owned(),
            state_dir: PathBuf::from("/var/lib/berth"),
            socket_group: String::new(),
            metrics_listen: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_client_ca: String::new(),
            containerd: ContainerdConfig::default(),
            secrets: SecretsConfig::default(),
            registry: RegistryConfig::default(),
            access: Vec::new(),
            security: SecurityConfig::default(),
            gc: GcConfig::default(),
            policy: Vec::new(),
            audit_log: String::new(),
            credential_provider: Vec::new(),
            parsed: Parsed::default(),
        }
    }
}

/// `[containerd]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdConfig {
    pub socket: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    /// false: compressed layer blobs are not kept in the content store once their snapshot is
    /// committed (like CRI's discard_unpacked_layers).
    pub keep_layer_blobs: bool,
    /// true: kept layer blobs stream into containerd's ingest while they download (through
    /// its Content API), so a download cut by a berthd crash resumes after the restart; false:
    /// berthd writes them into containerd's content directory itself, which costs containerd
    /// no CPU, and only a download cut while berthd runs is resumed.
    pub resumable_layer_blobs: bool,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "berth".to_owned(),
            snapshotter: "overlayfs".to_owned(),
            keep_layer_blobs: true,
            resumable_layer_blobs: false,
        }
    }
}

/// `[secrets]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    pub backend: SecretsBackend,
    pub key_file: PathBuf,
    pub openbao: OpenbaoConfig,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        Self {
            backend: SecretsBackend::File,
            key_file: PathBuf::from("/etc/berth/secrets.key"),
            openbao: OpenbaoConfig::default(),
        }
    }
}

/// `[secrets] backend`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretsBackend {
    File,
    Openbao,
}

/// `[secrets.openbao]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenbaoConfig {
    pub address: String,
    pub mount: String,
    pub prefix: String,
    pub token_file: String,
    pub role_id_file: String,
    pub secret_id_file: String,
    pub ca_file: String,
}

impl Default for OpenbaoConfig {
    fn default() -> Self {
        Self {
            address: "https://127.0.0.1:8200".to_owned(),
            mount: "secret".to_owned(),
            prefix: "berth".to_owned(),
            token_file: String::new(),
            role_id_file: String::new(),
            secret_id_file: String::new(),
            ca_file: String::new(),
        }
    }
}

impl OpenbaoConfig {
    /// `address` is http(s)://host[:port]; `mount` and `prefix` are plain path segments; exactly
    /// one way to authenticate: `token_file`, or `role_id_file` with `secret_id_file` (AppRole).
    fn validate(&self) -> Result<(), ConfigError> {
        let address = reqwest::Url::parse(&self.address)
            .map_err(|_| invalid("secrets.openbao.address", "expected http(s)://host[:port]"))?;
        if !matches!(address.scheme(), "http" | "https")
            || address.host_str().is_none_or(str::is_empty)
            || !address.username().is_empty()
            || address.password().is_some()
            || address.path() != "/"
            || address.query().is_some()
            || address.fragment().is_some()
        {
            return Err(invalid(
                "secrets.openbao.address",
                "expected http(s)://host[:port], without a path, user or query",
            ));
        }
        if !is_openbao_path(&self.mount) {
            return Err(invalid(
                "secrets.openbao.mount",
                "use segments of [A-Za-z0-9._-] separated by '/'",
            ));
        }
        if !is_openbao_path(&self.prefix) {
            return Err(invalid(
                "secrets.openbao.prefix",
                "use segments of [A-Za-z0-9._-] separated by '/'",
            ));
        }
        let token = !self.token_file.is_empty();
        let role_id = !self.role_id_file.is_empty();
        let secret_id = !self.secret_id_file.is_empty();
        match (token, role_id, secret_id) {
            (true, false, false) | (false, true, true) => {}
            (false, false, false) => {
                return Err(invalid(
                    "secrets.openbao",
                    "set token_file, or role_id_file and secret_id_file (AppRole)",
                ))
            }
            (true, _, _) => {
                return Err(invalid(
                    "secrets.openbao",
                    "set token_file or role_id_file + secret_id_file, not both",
                ))
            }
            (false, true, false) | (false, false, true) => {
                return Err(invalid(
                    "secrets.openbao",
                    "AppRole needs both role_id_file and secret_id_file",
                ))
            }
        }
        Ok(())
    }
}

/// `a`, `a/b`: non-empty segments of `[A-Za-z0-9._-]`, none of them `.` or `..`.
fn is_openbao_path(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
        })
}

/// `[registry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    pub plain_http: Vec<String>,
    pub ca_files: Vec<PathBuf>,
    pub max_concurrent_downloads: usize,
    pub connect_timeout_seconds: u64,
    pub read_timeout_seconds: u64,
    pub pull_deadline_seconds: u64,
    pub retries: u32,
    /// A blob download that receives no byte for this long is cut and resumed; 0 = off.
    pub stall_timeout_seconds: u64,
    /// Image pulls at once on this host; 0 = no limit.
    pub max_concurrent_pulls: usize,
    /// Download bandwidth of all pulls together; 0 = no limit.
    pub max_bytes_per_second: u64,
    pub mirror: Vec<MirrorConfig>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            plain_http: Vec::new(),
            ca_files: Vec::new(),
            max_concurrent_downloads: 4,
            connect_timeout_seconds: 10,
            read_timeout_seconds: 30,
            pull_deadline_seconds: 3600,
            retries: 5,
            stall_timeout_seconds: 60,
            max_concurrent_pulls: 0,
            max_bytes_per_second: 0,
            mirror: Vec::new(),
        }
    }
}

/// `[[registry.mirror]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub upstream: String,
    pub endpoint: String,
    #[serde(default)]
    pub credentials: bool,
}

/// `[[access]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    pub identity: String,
    #[serde(default)]
    pub projects: Vec<String>,
}

/// `[security]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    pub access_check_ttl_seconds: u64,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            access_check_ttl_seconds: 300,
        }
    }
}

/// `[gc]`: automatic removal of unused images under disk pressure.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    pub enabled: bool,
    /// The filesystem whose use is measured (containerd's root).
    pub path: PathBuf,
    pub high_percent: u8,
    pub low_percent: u8,
    pub min_age_seconds: u64,
    pub interval_seconds: u64,
    /// Globs on image references that are never removed.
    pub pinned: Vec<String>,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: PathBuf::from("/var/lib/containerd"),
            high_percent: 85,
            low_percent: 80,
            min_age_seconds: 300,
            interval_seconds: 60,
            pinned: Vec::new(),
        }
    }
}

impl GcConfig {
    /// `low_percent < high_percent <= 100`, a positive interval, an absolute path, and
    /// pinned globs that are not empty.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.high_percent == 0 || self.high_percent > 100 {
            return Err(invalid("gc.high_percent", "must be between 1 and 100"));
        }
        if self.low_percent >= self.high_percent {
            return Err(ConfigError::Invalid {
                key: "gc.low_percent",
                reason: format!(
                    "must be below gc.high_percent ({}), got {}",
                    self.high_percent, self.low_percent
                ),
            });
        }
        if self.interval_seconds == 0 {
            return Err(invalid("gc.interval_seconds", "must be at least 1"));
        }
        if !self.path.is_absolute() {
            return Err(invalid("gc.path", "must be an absolute path"));
        }
        if self.pinned.iter().any(|glob| glob.trim().is_empty()) {
            return Err(invalid("gc.pinned", "a pattern must not be empty"));
        }
        Ok(())
    }
}

/// `[[credential_provider]]`: a kubelet credential provider plugin
/// (`credentialprovider.kubelet.k8s.io/v1`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialProviderConfig {
    pub name: String,
    pub command: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    /// The only environment the plugin gets, beside `PATH`.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// kubelet's `matchImages` syntax.
    pub match_images: Vec<String>,
    /// Projects whose orders may use it; empty = none.
    #[serde(default)]
    pub projects: Vec<String>,
    #[serde(default = "default_provider_cache_seconds")]
    pub default_cache_seconds: u64,
    #[serde(default = "default_provider_timeout_seconds")]
    pub timeout_seconds: u64,
}

fn default_provider_cache_seconds() -> u64 {
    300
}

fn default_provider_timeout_seconds() -> u64 {
    10
}

/// Where the API listens, parsed from `listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl Config {
    /// Reads and validates the config at `path`. A missing file at the default path means
    /// "all defaults"; a missing file named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => {
                let mut config = Self::default();
                config.validate()?;
                Ok(config)
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses config text (the source is injectable so tests never touch the filesystem).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The parsed `listen` address.
    pub fn listen_addr(&self) -> Result<ListenAddr, ConfigError> {
        if let Some(path) = self.listen.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(invalid("listen", "a unix socket path must be absolute"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = self.listen.strip_prefix("tcp://") {
            let addr = addr
                .parse()
                .map_err(|_| invalid("listen", "expected tcp://IP:PORT"))?;
            return Ok(ListenAddr::Tcp(addr));
        }
        Err(invalid("listen", "expected unix:///path or tcp://IP:PORT"))
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        let listen = self.listen_addr()?;
        if matches!(listen, ListenAddr::Tcp(_))
            && (self.tls_cert.is_empty()
                || self.tls_key.is_empty()
                || self.tls_client_ca.is_empty())
        {
            return Err(invalid(
                "listen",
                "tcp:// requires tls_cert, tls_key and tls_client_ca (mTLS)",
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        if self.containerd.namespace.is_empty()
            || !self
                .containerd
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "containerd.namespace",
                "must be non-empty and use [A-Za-z0-9._-]",
            ));
        }
        if self.containerd.snapshotter.is_empty() {
            return Err(invalid("containerd.snapshotter", "must not be empty"));
        }
        if self.secrets.backend == SecretsBackend::Openbao {
            self.secrets.openbao.validate()?;
        }
        if self.registry.max_concurrent_downloads == 0 {
            return Err(invalid(
                "registry.max_concurrent_downloads",
                "must be at least 1",
            ));
        }
        if self.registry.pull_deadline_seconds == 0 {
            return Err(invalid(
                "registry.pull_deadline_seconds",
                "must be at least 1",
            ));
        }
        if self.registry.retries == 0 {
            return Err(invalid(
                "registry.retries",
                "counts attempts and must be at least 1",
            ));
        }
        self.parsed.mirrors = self.parse_mirrors()?;
        self.gc.validate()?;
        if !self.audit_log.is_empty() && !Path::new(&self.audit_log).is_absolute() {
            return Err(invalid("audit_log", "must be empty or an absolute path"));
        }
        self.parsed.match_images = self.parse_credential_providers()?;
        self.validate_policies()
    }

    /// `[[credential_provider]]`: a unique DNS-label name, an absolute command, well-formed
    /// `match_images`, a positive timeout.
    fn parse_credential_providers(&self) -> Result<Vec<Vec<MatchImage>>, ConfigError> {
        let mut names = Vec::new();
        let mut parsed = Vec::with_capacity(self.credential_provider.len());
        for (index, entry) in self.credential_provider.iter().enumerate() {
            let entry_err = |key: &'static str, reason: String| ConfigError::Invalid {
                key,
                reason: format!("entry {}: {reason}", index + 1),
            };
            if !berth_core::order::is_dns_label(&entry.name) {
                return Err(entry_err(
                    "credential_provider.name",
                    "must be a DNS label ([a-z0-9-], at most 63)".to_owned(),
                ));
            }
            if names.contains(&entry.name) {
                return Err(entry_err(
                    "credential_provider.name",
                    format!("{} is used twice", entry.name),
                ));
            }
            names.push(entry.name.clone());
            if !entry.command.is_absolute() {
                return Err(entry_err(
                    "credential_provider.command",
                    "must be an absolute path".to_owned(),
                ));
            }
            if entry.match_images.is_empty() {
                return Err(entry_err(
                    "credential_provider.match_images",
                    "needs at least one pattern".to_owned(),
                ));
            }
            let match_images = entry
                .match_images
                .iter()
                .map(|pattern| {
                    MatchImage::parse(pattern).map_err(|reason| {
                        entry_err(
                            "credential_provider.match_images",
                            format!("{pattern:?}: {reason}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if entry.timeout_seconds == 0 {
                return Err(entry_err(
                    "credential_provider.timeout_seconds",
                    "must be at least 1".to_owned(),
                ));
            }
            parsed.push(match_images);
        }
        Ok(parsed)
    }

    /// `[[policy]]`: patterns well formed, `cosign` with keys; `notation` is not supported yet
    /// and refused here rather than silently not enforced. Key files are read at start-up
    /// (`pull::policy::Policies::load`).
    fn validate_policies(&self) -> Result<(), ConfigError> {
        for (index, entry) in self.policy.iter().enumerate() {
            let entry_err = |key: &'static str, reason: String| ConfigError::Invalid {
                key,
                reason: format!("entry {}: {reason}", index + 1),
            };
            if entry.images.is_empty() {
                return Err(entry_err(
                    "policy.images",
                    "needs at least one pattern".to_owned(),
                ));
            }
            for pattern in &entry.images {
                berth_registry::pull::policy::ImageGlob::parse(pattern).map_err(|reason| {
                    entry_err("policy.images", format!("{pattern:?}: {reason}"))
                })?;
            }
            if entry.projects.is_empty() {
                return Err(entry_err(
                    "policy.projects",
                    "needs at least one pattern (\"*\" for every project)".to_owned(),
                ));
            }
            match entry.verify {
                VerifyKind::Cosign => {
                    if entry.keys.is_empty() {
                        return Err(entry_err(
                            "policy.keys",
                            "verify = \"cosign\" needs at least one PEM public key file".to_owned(),
                        ));
                    }
                    if !entry.trust_store.is_empty() || !entry.trusted_identities.is_empty() {
                        return Err(entry_err(
                            "policy.trust_store",
                            "trust_store and trusted_identities belong to verify = \"notation\""
                                .to_owned(),
                        ));
                    }
                }
                VerifyKind::Notation => {
                    return Err(entry_err(
                        "policy.verify",
                        "\"notation\" is not supported by this berthd yet; use \"cosign\""
                            .to_owned(),
                    ));
                }
                VerifyKind::None => {
                    if !entry.keys.is_empty() {
                        return Err(entry_err(
                            "policy.keys",
                            "verify = \"none\" takes no keys".to_owned(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// `[[registry.mirror]]`: upstream a registry host, endpoint an http(s) URL, no endpoint
    /// twice for one upstream.
    fn parse_mirrors(&self) -> Result<Vec<Mirror>, ConfigError> {
        let mut seen = Vec::new();
        let mut mirrors = Vec::with_capacity(self.registry.mirror.len());
        for (index, entry) in self.registry.mirror.iter().enumerate() {
            let mirror = Mirror::parse(&entry.upstream, &entry.endpoint, entry.credentials)
                .map_err(|reason| ConfigError::Invalid {
                    key: "registry.mirror",
                    reason: format!("entry {} ({}): {reason}", index + 1, entry.endpoint),
                })?;
            let key = (mirror.upstream.clone(), mirror.endpoint.to_string());
            if seen.contains(&key) {
                return Err(ConfigError::Invalid {
                    key: "registry.mirror",
                    reason: format!(
                        "entry {}: {} is already a mirror of {}",
                        index + 1,
                        key.1,
                        key.0
                    ),
                });
            }
            seen.push(key);
            mirrors.push(mirror);
        }
        Ok(mirrors)
    }
}

fn invalid(key: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests;
