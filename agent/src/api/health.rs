//! gRPC health follows containerd: SERVING while containerd answers, NOT_SERVING (for the
//! server as a whole and for each berth service) before it first answers and while it does
//! not, so a scheduler's health check sees what its next order would meet. systemd's STATUS=
//! says the same.

use std::time::Duration;

use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use super::pb::agent_server::AgentServer;
use super::pb::secrets_server::SecretsServer;
use super::{AgentService, SecretsService};
use berth_core::metrics::SharedMetrics;
use berth_runtime::containerd::{Containerd, ContainerdVersion};

/// How often containerd is asked whether it answers, and how long an answer may take.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The names whose status berthd reports: "" (the server) and its two services.
const SERVICES: [&str; 3] = [
    "",
    <AgentServer<AgentService> as NamedService>::NAME,
    <SecretsServer<SecretsService> as NamedService>::NAME,
];

/// berthd's side of `grpc.health.v1.Health`.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// Reports NOT_SERVING until [`Health::set`] says otherwise.
    pub(crate) async fn new(reporter: HealthReporter) -> Self {
        let health = Self { reporter };
        health.set(false).await;
        health
    }

    /// Reports every service as serving or not.
    pub(crate) async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in SERVICES {
            self.reporter.set_service_status(service, status).await;
        }
    }

    /// Asks containerd every [`PROBE_INTERVAL`] and reports the change, here and in systemd's
    /// STATUS=, when it stops or starts answering. Starts from "serving" (the caller saw
    /// containerd answer). A containerd that comes back is asked its version again (it may
    /// have been upgraded); one berth does not support counts as not answering. Never returns.
    pub(crate) async fn follow(&self, containerd: &Containerd, metrics: &SharedMetrics) {
        let mut serving = true;
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let version = tokio::time::timeout(PROBE_INTERVAL, containerd.version())
                .await
                .ok()
                .and_then(Result::ok);
            let answers = version
                .as_ref()
                .is_some_and(ContainerdVersion::is_supported);
            if answers == serving {
                continue;
            }
            let socket = containerd.socket().display();
            let status = match &version {
                Some(version) if answers => {
                    info!(%socket, containerd = %version, revision = version.revision(), "containerd answers again; health SERVING");
                    metrics.containerd_version(version.as_str());
                    format!("serving; containerd {version}")
                }
                Some(version) => {
                    error!(%socket, containerd = %version, "containerd is back as a version berth does not support; health NOT_SERVING");
                    format!("containerd {version} at {socket} is not supported")
                }
                None => {
                    warn!(%socket, "containerd is not answering; health NOT_SERVING");
                    format!("containerd at {socket} not answering")
                }
            };
            self.set(answers).await;
            sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]).ok();
            serving = answers;
        }
    }
}
