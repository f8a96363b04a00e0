//! berthd's lifecycle: prepare the state dir and secret store, bind the API, tell systemd when
//! it is ready (API bound and containerd answering), serve until shutdown, then drain.

use std::future::Future;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::api::pb::agent_server::AgentServer;
use crate::api::pb::secrets_server::SecretsServer;
use crate::api::{pb, Access, AgentService, Health, SecretsService, UnixFront};
use crate::audit::{AuditLog, AuditReopen};
use crate::config::settings::ApiSettings;
use crate::config::{Config, ConfigError, ListenAddr, Settings};
use berth_registry::auth::Authenticator;
use berth_runtime::containerd::{Containerd, MINIMUM_VERSION};
use berth_secrets::provider::CredentialProviders;

use crate::run::Runner;
use berth_core::metrics::SharedMetrics;
use berth_registry::pull::Puller;
use berth_secrets::SecretStore;

/// How long in-flight orders may run on after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

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
    // A crash must not write secrets to disk.
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        warn!(error = %err, "could not disable core dumps");
    }
    // One TLS crypto provider for every connection berthd makes (registries, token realms).
    let _ = rustls::crypto::ring::default_provider().install_default();

    let settings = Settings::from_config(&config)?;
    let listen = settings.api.listen.clone();
    create_private_dir(&settings.orders.state_dir)?;
    create_private_dir(&settings.orders.logs_dir)?;
    let secrets = Arc::new(
        SecretStore::open(&settings.secrets).map_err(|err| DaemonError::Secrets(Box::new(err)))?,
    );
    let metrics: SharedMetrics = Arc::default();
    let containerd = Containerd::new(
        &settings.containerd.socket,
        &settings.containerd.namespace,
        &settings.containerd.snapshotter,
    )
    .map_err(|err| DaemonError::Containerd(Box::new(err)))?;
    let audit_stop = CancellationToken::new();
    let (audit, audit_reopen, audit_writer) =
        AuditLog::open(&settings.api.audit_log, metrics.clone(), audit_stop.clone());
    let runner = build_runner(
        &settings,
        containerd.clone(),
        secrets.clone(),
        audit,
        metrics.clone(),
    )?;
    let gc = settings.gc.clone();
    let tasks = TaskTracker::new();
    // The audit log's own tracker: it stops only after the orders, whose lines it writes.
    let audit_tasks = TaskTracker::new();
    if let Some(writer) = audit_writer {
        audit_tasks.spawn(writer.run());
        audit_tasks.spawn(reopen_on_sighup(audit_reopen, audit_stop.clone()));
    }
    let gc_stop = CancellationToken::new();
    if let Some(settings) = gc {
        tasks.spawn(runner.clone().image_gc_loop(settings, gc_stop.clone()));
    }
    let metrics_stop = CancellationToken::new();
    if !settings.api.metrics_listen.is_empty() {
        serve_metrics(
            &settings.api.metrics_listen,
            runner.clone(),
            metrics.clone(),
            &tasks,
            metrics_stop.clone(),
        )
        .await?;
    }

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(reporter).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(DaemonError::Reflection)?;
    // grpcurl 1.8 speaks only v1alpha.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(DaemonError::Reflection)?;

    let access = match listen {
        ListenAddr::Unix(_) => Access::Local,
        ListenAddr::Tcp(_) => Access::mtls(&settings.api.access),
    };
    let mut builder = Server::builder();
    if let ListenAddr::Tcp(_) = listen {
        builder = builder
            .tls_config(tls_config(&settings.api)?)
            .map_err(DaemonError::Server)?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AgentServer::new(AgentService::new(
            runner,
            tasks.clone(),
            access.clone(),
        )))
        .add_service(SecretsServer::new(SecretsService::new(secrets, access)));

    // Runs beside the server and ends with it, whether or not containerd ever answered.
    // Ends early only when containerd turns out to be a version berth does not run on.
    let ready = async {
        notify_when_ready(&containerd, &health, &metrics).await?;
        tokio::join!(watchdog(), health.follow(&containerd, &metrics));
        Ok(())
    };
    let result = match listen {
        ListenAddr::Unix(path) => {
            let listener = bind_unix(&path, &settings.api.socket_group)?;
            info!(socket = %path.display(), "api listening");
            // Every unix connection goes through the front that addresses its requests to
            // `localhost` (api/front.rs); TCP connections reach h2 as they are.
            let incoming =
                UnixListenerStream::new(listener).map(|accepted| accepted.map(UnixFront::new));
            let serve = router.serve_with_incoming_shutdown(incoming, shutdown);
            let result = tokio::select! {
                result = serve => result.map_err(DaemonError::Server),
                result = ready => result,
            };
            std::fs::remove_file(&path).ok();
            result
        }
        ListenAddr::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Io {
                    path: PathBuf::from(addr.to_string()),
                    source,
                })?;
            info!(address = %addr, "api listening (mTLS)");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let serve = router.serve_with_incoming_shutdown(incoming, shutdown);
            tokio::select! {
                result = serve => result.map_err(DaemonError::Server),
                result = ready => result,
            }
        }
    };
    sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping; waiting for in-flight orders"),
        ],
    )
    .ok();
    info!("api closed; waiting for in-flight orders");
    metrics_stop.cancel();
    gc_stop.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        warn!("in-flight orders still running at the end of the grace period");
    }
    audit_stop.cancel();
    audit_tasks.close();
    audit_tasks.wait().await;
    result
}

/// SIGHUP reopens the audit log (after logrotate moved it), until `stop`.
/// The order runner and everything it drives: registry auth, the puller with its signature
/// policies, credential providers, the audit log and image GC.
fn build_runner(
    settings: &Settings,
    containerd: Containerd,
    secrets: Arc<SecretStore>,
    audit: AuditLog,
    metrics: SharedMetrics,
) -> Result<Runner, DaemonError> {
    let auth = Authenticator::new(&settings.auth, metrics.clone())
        .map_err(|err| DaemonError::Auth(Box::new(err)))?;
    let auth = Arc::new(auth);
    let puller = Puller::new(
        containerd.clone(),
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
        containerd,
        puller,
        secrets,
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

async fn reopen_on_sighup(reopen: AuditReopen, stop: CancellationToken) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            warn!(error = %err, "cannot listen for SIGHUP; the audit log will not be reopened");
            return;
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                reopen.reopen();
                info!("sighup: reopening the audit log");
            }
        }
    }
}

/// Serves Prometheus text at `http://<address>/metrics` until `stop` is cancelled.
async fn serve_metrics(
    address: &str,
    runner: Runner,
    metrics: SharedMetrics,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<(), DaemonError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| DaemonError::Io {
            path: PathBuf::from(address),
            source,
        })?;
    info!(address = %address, "metrics listening at /metrics");
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let runner = runner.clone();
            let metrics = metrics.clone();
            async move {
                if let Err(err) = runner.refresh_container_gauges().await {
                    warn!(error = %err, "containers gauge not refreshed");
                }
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    tasks.spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(err) = serve.await {
            warn!(error = %err, "metrics server stopped");
        }
    });
    Ok(())
}

/// Reports health SERVING and sends READY=1 once containerd answers (the API is bound before
/// this runs), with STATUS= lines on the way. A containerd older than berth supports is an
/// error: berthd stops rather than fail every order.
async fn notify_when_ready(
    containerd: &Containerd,
    health: &Health,
    metrics: &SharedMetrics,
) -> Result<(), DaemonError> {
    let mut delay = Duration::from_millis(100);
    let mut reported = false;
    loop {
        match containerd.version().await {
            Ok(version) if !version.is_supported() => {
                let socket = containerd.socket().display().to_string();
                let status = format!("containerd {version} is not supported");
                sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]).ok();
                return Err(DaemonError::UnsupportedContainerd {
                    socket,
                    version: version.to_string(),
                });
            }
            Ok(version) => {
                info!(
                    containerd = %version,
                    revision = version.revision(),
                    socket = %containerd.socket().display(),
                    "containerd answered; ready"
                );
                metrics.containerd_version(version.as_str());
                let status = format!("serving; containerd {version}");
                health.set(true).await;
                sd_notify::notify(
                    false,
                    &[
                        sd_notify::NotifyState::Ready,
                        sd_notify::NotifyState::Status(&status),
                    ],
                )
                .ok();
                return Ok(());
            }
            Err(err) => {
                if !reported {
                    let status = format!(
                        "waiting for containerd at {}",
                        containerd.socket().display()
                    );
                    sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]).ok();
                    reported = true;
                }
                warn!(error = %err, socket = %containerd.socket().display(), "containerd not answering yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// With `WatchdogSec=` set, pings systemd at half the interval while the runtime is alive.
/// Never returns.
async fn watchdog() {
    let interval = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    );
    let Some(interval) = interval else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval / 2).await;
        sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]).ok();
    }
}

/// The watchdog interval, as sd_watchdog_enabled(3) reads it: `WATCHDOG_USEC` set (and not 0),
/// and `WATCHDOG_PID` unset or this process. (sd-notify 0.4's `watchdog_enabled` also demands
/// `WATCHDOG_PID`, so a supervisor that sets only `WATCHDOG_USEC` got no pings.)
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec = usec?.trim().parse::<u64>().ok().filter(|usec| *usec > 0)?;
    match pid.map(|pid| pid.trim().parse::<u32>()) {
        None => Some(Duration::from_micros(usec)),
        Some(Ok(pid)) if pid == own_pid => Some(Duration::from_micros(usec)),
        Some(_) => None,
    }
}

fn tls_config(config: &ApiSettings) -> Result<ServerTlsConfig, DaemonError> {
    let read = |path: &str| {
        std::fs::read(path).map_err(|source| DaemonError::Io {
            path: PathBuf::from(path),
            source,
        })
    };
    let identity = Identity::from_pem(read(&config.tls_cert)?, read(&config.tls_key)?);
    Ok(ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(read(&config.tls_client_ca)?)))
}

/// Binds the API socket: stale socket removed, parent dir created, mode 0660, optional group.
fn bind_unix(path: &Path, group: &str) -> Result<tokio::net::UnixListener, DaemonError> {
    let io_err = |source| DaemonError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_err(err)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io_err)?;
    if !group.is_empty() {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| DaemonError::Group {
                group: group.to_owned(),
            })?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|errno| io_err(std::io::Error::from(errno)))?;
    }
    Ok(listener)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_follows_sd_watchdog_enabled() {
        let second = Some(Duration::from_secs(1));
        assert_eq!(watchdog_interval(Some("1000000"), None, 7), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("7"), 7), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("1000000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }
}
