//! Per-stage settings, made once at start-up from a validated [`Config`]. Each stage takes only
//! its own: the secret store [`SecretSettings`] and the credential providers, registry auth
//! [`AuthSettings`], the puller [`RegistrySettings`] and signature [`Policies`], containerd
//! [`ContainerdSettings`], the orders [`OrderSettings`], the API [`ApiSettings`].
//!
//! This is the one place that reads the files the config names (CA bundles, policy keys); a
//! file that cannot be read stops berthd at start, before anything is bound.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_registry::auth::AuthSettings;
use berth_registry::pull::policy::{Policies, PolicyError};
use berth_registry::pull::{LayerSettings, RegistrySettings};
use berth_secrets::provider::ProviderSettings;
use berth_secrets::{Login, OpenbaoSettings, SecretSettings};

use super::{AccessConfig, Config, ConfigError, ListenAddr, SecretsBackend};
use crate::run::GcSettings;

/// Everything berthd's stages need, typed.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) api: ApiSettings,
    pub(crate) secrets: SecretSettings,
    pub(crate) providers: Vec<ProviderSettings>,
    pub(crate) auth: AuthSettings,
    pub(crate) registry: RegistrySettings,
    pub(crate) policies: Policies,
    pub(crate) containerd: ContainerdSettings,
    pub(crate) orders: OrderSettings,
    /// `[gc]`, when enabled.
    pub(crate) gc: Option<GcSettings>,
}

/// The API side: where to listen and who may call.
#[derive(Debug, Clone)]
pub(crate) struct ApiSettings {
    pub(crate) listen: ListenAddr,
    pub(crate) socket_group: String,
    pub(crate) tls_cert: String,
    pub(crate) tls_key: String,
    pub(crate) tls_client_ca: String,
    pub(crate) access: Vec<AccessConfig>,
    /// `host:port` of the Prometheus endpoint; empty = off.
    pub(crate) metrics_listen: String,
    /// The audit log's path; empty = off.
    pub(crate) audit_log: String,
}

/// `[containerd]`
#[derive(Debug, Clone)]
pub(crate) struct ContainerdSettings {
    pub(crate) socket: PathBuf,
    pub(crate) namespace: String,
    pub(crate) snapshotter: String,
    /// The puller's layer settings: `keep_layer_blobs`, `resumable_layer_blobs`.
    pub(crate) layers: LayerSettings,
}

/// How orders run.
#[derive(Debug, Clone)]
pub(crate) struct OrderSettings {
    pub(crate) state_dir: PathBuf,
    /// Containers' log files.
    pub(crate) logs_dir: PathBuf,
    pub(crate) pull_deadline: Duration,
    pub(crate) access_check_ttl: Duration,
    pub(crate) max_concurrent_pulls: usize,
}

impl Settings {
    /// The settings of a validated config; reads the CA and key files it names (blocking).
    pub(crate) fn from_config(config: &Config) -> Result<Settings, ConfigError> {
        let registry = &config.registry;
        let ca_pems = read_all("registry.ca_files", &registry.ca_files)?;
        let connect_timeout = Duration::from_secs(registry.connect_timeout_seconds);
        let read_timeout = Duration::from_secs(registry.read_timeout_seconds);
        let secrets = match config.secrets.backend {
            SecretsBackend::File => SecretSettings::File {
                state_dir: config.state_dir.clone(),
                key_file: config.secrets.key_file.clone(),
            },
            SecretsBackend::Openbao => {
                let section = &config.secrets.openbao;
                let login = if section.token_file.is_empty() {
                    Login::AppRole {
                        role_id_file: PathBuf::from(&section.role_id_file),
                        secret_id_file: PathBuf::from(&section.secret_id_file),
                    }
                } else {
                    Login::TokenFile(PathBuf::from(&section.token_file))
                };
                let mut ca_pems = ca_pems.clone();
                if !section.ca_file.is_empty() {
                    ca_pems.push(read(
                        "secrets.openbao.ca_file",
                        Path::new(&section.ca_file),
                    )?);
                }
                SecretSettings::Openbao(OpenbaoSettings {
                    address: section.address.trim_end_matches('/').to_owned(),
                    mount: section.mount.clone(),
                    prefix: section.prefix.clone(),
                    login,
                    ca_pems,
                    connect_timeout,
                    request_timeout: read_timeout,
                })
            }
        };
        let providers = config
            .credential_provider
            .iter()
            .zip(&config.parsed.match_images)
            .map(|(entry, match_images)| ProviderSettings {
                name: entry.name.clone(),
                command: entry.command.clone(),
                args: entry.args.clone(),
                env: entry.env.clone(),
                match_images: match_images.clone(),
                projects: entry.projects.clone(),
                default_cache: Duration::from_secs(entry.default_cache_seconds),
                timeout: Duration::from_secs(entry.timeout_seconds),
            })
            .collect();
        let policies = Policies::load(&config.policy).map_err(|err| match err {
            PolicyError::Invalid { key, reason } => ConfigError::Invalid { key, reason },
            PolicyError::Read { path, source } => ConfigError::ReadFile {
                key: "policy.keys",
                path,
                source,
            },
        })?;
        let gc = &config.gc;
        Ok(Settings {
            api: ApiSettings {
                listen: config.listen_addr()?,
                socket_group: config.socket_group.clone(),
                tls_cert: config.tls_cert.clone(),
                tls_key: config.tls_key.clone(),
                tls_client_ca: config.tls_client_ca.clone(),
                access: config.access.clone(),
                metrics_listen: config.metrics_listen.clone(),
                audit_log: config.audit_log.clone(),
            },
            secrets,
            providers,
            auth: AuthSettings {
                plain_http: registry.plain_http.clone(),
                ca_pems: ca_pems.clone(),
                connect_timeout,
                read_timeout,
                retries: registry.retries,
            },
            registry: RegistrySettings {
                plain_http: registry.plain_http.clone(),
                ca_pems,
                connect_timeout,
                read_timeout,
                max_concurrent_downloads: registry.max_concurrent_downloads,
                retries: registry.retries,
                stall_timeout: (registry.stall_timeout_seconds > 0)
                    .then(|| Duration::from_secs(registry.stall_timeout_seconds)),
                max_bytes_per_second: registry.max_bytes_per_second,
                mirrors: config.parsed.mirrors.clone(),
            },
            policies,
            containerd: ContainerdSettings {
                socket: config.containerd.socket.clone(),
                namespace: config.containerd.namespace.clone(),
                snapshotter: config.containerd.snapshotter.clone(),
                layers: LayerSettings {
                    keep_layer_blobs: config.containerd.keep_layer_blobs,
                    resumable_blobs: config.containerd.resumable_layer_blobs,
                },
            },
            orders: OrderSettings {
                state_dir: config.state_dir.clone(),
                logs_dir: config.state_dir.join("logs"),
                pull_deadline: Duration::from_secs(registry.pull_deadline_seconds),
                access_check_ttl: Duration::from_secs(config.security.access_check_ttl_seconds),
                max_concurrent_pulls: registry.max_concurrent_pulls,
            },
            gc: gc.enabled.then(|| GcSettings {
                path: gc.path.clone(),
                high_percent: gc.high_percent,
                low_percent: gc.low_percent,
                min_age: Duration::from_secs(gc.min_age_seconds),
                interval: Duration::from_secs(gc.interval_seconds),
                pinned: gc.pinned.clone(),
            }),
        })
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::ReadFile {
        key,
        path: path.to_owned(),
        source,
    })
}

fn read_all(key: &'static str, paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, ConfigError> {
    paths.iter().map(|path| read(key, path)).collect()
}
