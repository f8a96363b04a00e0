//! berthd's lifecycle: prepare the state dir and secret store, bind the API, tell systemd when
//! it is ready (API bound and containerd answering), serve until shutdown, then drain.
//!
//! - `tasks`: what runs beside the API (audit writer, image GC, metrics endpoint).
//! - `serve`: the API server on its listener, and the readiness follow-up beside it (`ready`).
//! - `shutdown`: the drain once the API has closed.

mod ready;
mod serve;
mod shutdown;
mod tasks;

use std::future::Future;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use self::serve::Api;
use self::tasks::{AuditTasks, Background};
use crate::audit::AuditLog;
use crate::config::{Config, ConfigError, Settings};
use crate::run::Runner;
use berth_core::metrics::SharedMetrics;
use berth_registry::auth::Authenticator;
use berth_registry::pull::Puller;
use berth_runtime::containerd::{Containerd, MINIMUM_VERSION};
use berth_secrets::provider::CredentialProviders;
use berth_secrets::SecretStore;

/// Why berthd could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("preparing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the secret store")]
    Secrets(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("setting up the registry token client")]
    Auth(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("setting up containerd's client")]
    Containerd(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("setting up the API server")]
    Server(#[source] tonic::transport::Error),
    #[error("setting up server reflection")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("socket_group {group:?} does not exist")]
    Group { group: String },
    #[error("containerd at {socket} is version {version}; berth needs containerd {}.{} or newer", MINIMUM_VERSION.0, MINIMUM_VERSION.1)]
    UnsupportedContainerd { socket: String, version: String },
}

impl DaemonError {
    /// Exit status: 64 (EX_USAGE) for configuration errors, which a restart would not fix.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config(_)
            | DaemonError::Group { .. }
            | DaemonError::UnsupportedContainerd { .. } => 64,
            _ => 1,
        }
    }
}

/// Runs berthd until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    harden_process();
    let settings = Settings::from_config(&config)?;
    let metrics: SharedMetrics = Arc::default();
    let stores = Stores::open(&settings)?;
    let (audit_log, audit) = AuditTasks::open(&settings.api.audit_log, &metrics);
    let runner = build_runner(&settings, &stores, audit_log, metrics.clone())?;
    let background = Background::start(&settings, &runner, &metrics, audit).await?;
    let api = Api::bind(&settings.api, runner, stores.secrets, &background.tasks).await?;
    let result = api.serve(&stores.containerd, &metrics, shutdown).await;
    shutdown::drain(background).await;
    result
}

/// No core dumps (a crash must not write secrets to disk), and one TLS crypto provider for
/// every connection berthd makes (registries, token realms).
fn harden_process() {
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        warn!(error = %err, "could not disable core dumps");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The state berthd keeps and the stores it talks to: the private state and logs dirs, the
/// secret store, and containerd's client (not yet connected).
struct Stores {
    secrets: Arc<SecretStore>,
    containerd: Containerd,
}

impl Stores {
    fn open(settings: &Settings) -> Result<Self, DaemonError> {
        create_private_dir(&settings.orders.state_dir)?;
        create_private_dir(&settings.orders.logs_dir)?;
        let secrets = Arc::new(
            SecretStore::open(&settings.secrets)
                .map_err(|err| DaemonError::Secrets(Box::new(err)))?,
        );
        let containerd = Containerd::new(
            &settings.containerd.socket,
            &settings.containerd.namespace,
            &settings.containerd.snapshotter,
        )
        .map_err(|err| DaemonError::Containerd(Box::new(err)))?;
        Ok(Self {
            secrets,
            containerd,
        })
    }
}

/// The order runner and everything it drives: registry auth, the puller with its signature
/// policies, credential providers, the audit log and image GC.
fn build_runner(
    settings: &Settings,
    stores: &Stores,
    audit: AuditLog,
    metrics: SharedMetrics,
) -> Result<Runner, DaemonError> {
    let auth = Authenticator::new(&settings.auth, metrics.clone())
        .map_err(|err| DaemonError::Auth(Box::new(err)))?;
    let auth = Arc::new(auth);
    let puller = Puller::new(
        stores.containerd.clone(),
        settings.registry.clone(),
        auth.clone(),
        settings.orders.pull_deadline,
        metrics.clone(),
    )
    .map_err(|err| DaemonError::Auth(Box::new(err)))?
    .with_layers(settings.containerd.layers.clone())
    .with_signatures(berth_registry::pull::signature::Signatures::new(
        settings.policies.clone(),
        settings.orders.access_check_ttl,
        metrics.clone(),
    ));
    let providers = CredentialProviders::new(settings.providers.clone(), metrics.clone());
    let runner = Runner::new(
        stores.containerd.clone(),
        puller,
        stores.secrets.clone(),
        auth,
        settings.orders.logs_dir.clone(),
        metrics,
    )
    .with_access_check_ttl(settings.orders.access_check_ttl)
    .with_max_concurrent_pulls(settings.orders.max_concurrent_pulls)
    .with_credential_providers(providers)
    .with_audit(audit);
    Ok(match &settings.gc {
        Some(gc) => runner.with_image_gc(gc),
        None => runner,
    })
}

/// Creates `path` (and parents) with mode 0700 when missing; tightens an existing one.
fn create_private_dir(path: &Path) -> Result<(), DaemonError> {
    let io_err = |source| DaemonError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io_err)
}
