//! The API server: health, reflection and berth's services on the configured listener (a unix
//! socket through the HTTP/2 front, or TCP with mTLS), served beside the readiness follow-up
//! until shutdown.

use std::future::Future;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt as _;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Router;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::info;

use super::ready::{notify_when_ready, watchdog};
use super::DaemonError;
use crate::api::pb::agent_server::AgentServer;
use crate::api::pb::secrets_server::SecretsServer;
use crate::api::{pb, Access, AgentService, Health, SecretsService, UnixFront};
use crate::config::settings::ApiSettings;
use crate::config::ListenAddr;
use crate::run::Runner;
use berth_core::metrics::SharedMetrics;
use berth_runtime::containerd::Containerd;
use berth_secrets::SecretStore;

/// The bound API, ready to serve.
pub(super) struct Api {
    router: Router,
    health: Health,
    listener: Listener,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Listener {
    Unix(PathBuf, tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Api {
    /// Builds the services (orders go to `runner` and are spawned on `tasks`) and binds the
    /// listener: a unix socket (mode 0660, `socket_group`), or TCP with mTLS.
    pub(super) async fn bind(
        settings: &ApiSettings,
        runner: Runner,
        secrets: Arc<SecretStore>,
        tasks: &TaskTracker,
    ) -> Result<Self, DaemonError> {
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

        let access = match settings.listen {
            ListenAddr::Unix(_) => Access::Local,
            ListenAddr::Tcp(_) => Access::mtls(&settings.access),
        };
        let mut builder = Server::builder();
        if let ListenAddr::Tcp(_) = settings.listen {
            builder = builder
                .tls_config(tls_config(settings)?)
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

        let listener = match &settings.listen {
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path, &settings.socket_group)?;
                info!(socket = %path.display(), "api listening");
                Listener::Unix(path.clone(), listener)
            }
            ListenAddr::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Io {
                        path: PathBuf::from(addr.to_string()),
                        source,
                    })?;
                info!(address = %addr, "api listening (mTLS)");
                Listener::Tcp(listener)
            }
        };
        Ok(Self {
            router,
            health,
            listener,
        })
    }

    /// Serves until `shutdown` resolves. Beside the server runs the readiness follow-up, which
    /// ends with it whether or not containerd ever answered, and early only when containerd
    /// turns out to be a version berth does not run on. The unix socket is removed after.
    pub(super) async fn serve(
        self,
        containerd: &Containerd,
        metrics: &SharedMetrics,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DaemonError> {
        let Self {
            router,
            health,
            listener,
        } = self;
        let ready = async {
            notify_when_ready(containerd, &health, metrics).await?;
            tokio::join!(watchdog(), health.follow(containerd, metrics));
            Ok(())
        };
        match listener {
            Listener::Unix(path, listener) => {
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
            Listener::Tcp(listener) => {
                let incoming = TcpListenerStream::new(listener);
                let serve = router.serve_with_incoming_shutdown(incoming, shutdown);
                tokio::select! {
                    result = serve => result.map_err(DaemonError::Server),
                    result = ready => result,
                }
            }
        }
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
