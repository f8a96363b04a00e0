//! Drives one order through all stages (secret -> auth -> pull -> containerd -> spec -> task),
//! and answers what berth knows about its containers. All state lives in containerd: labels on
//! the container record carry the order, so a restarted berthd finds everything again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::audit::AuditLog;
use berth_core::locks::{KeyedLocks, KeyedRwLocks};
use berth_core::metrics::{SharedMetrics, StateLabels};
use berth_core::order::{ImageRef, Order, OrderError};
use berth_registry::auth::{AuthError, Authenticator};
use berth_registry::pull::{PullError, Puller};
use berth_runtime::containerd::{
    ContainerRecord, Containerd, ContainerdError, ContainerdVersion, NewContainer,
};
use berth_runtime::spec::{self, SpecError, SpecInput};
use berth_secrets::provider::{CredentialProviders, ProviderError};
use berth_secrets::{SecretError, SecretStore};

mod audit;
pub(crate) mod code;
mod explain;
mod gc;
mod image;
mod prune;
mod queue;

use audit::audit_subject;
pub(crate) use explain::PullPlan;
pub(crate) use gc::GcSettings;
use image::AccessChecks;
use queue::PullQueue;

const LABEL_PROJECT: &str = "berth.dev/project";
const LABEL_NAME: &str = "berth.dev/name";
const LABEL_ORDER_ID: &str = "berth.dev/order-id";
const LABEL_ORDER_HASH: &str = "berth.dev/order-hash";
const LABEL_IMAGE: &str = "berth.dev/image";
const LABEL_IMAGE_DIGEST: &str = "berth.dev/image-digest";
const LABEL_STARTED_AT: &str = "berth.dev/started-at";

/// Longest containerd identifier.
const MAX_ID_LEN: usize = 76;
/// Default grace period between SIGTERM and SIGKILL.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed order or container operation. Mapped to a gRPC status once, in `api/status.rs`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error("building the runtime spec for {name}")]
    Spec {
        name: String,
        #[source]
        source: SpecError,
    },
    #[error("order {order_id} was already used for a different order")]
    OrderConflict { order_id: String },
    #[error("a container named {name} already exists in project {project}")]
    NameTaken { project: String, name: String },
    #[error("container {id} not found")]
    ContainerNotFound { id: String },
    #[error("container {id} is running; stop it first or remove with force")]
    StillRunning { id: String },
    #[error("image {image} is not present and the pull policy is NEVER")]
    ImageAbsent { image: String },
    #[error("container {id} failed to start")]
    Start {
        id: String,
        #[source]
        source: ContainerdError,
    },
    #[error("containerd failed while handling container {id}")]
    Containerd {
        id: String,
        #[source]
        source: ContainerdError,
    },
    #[error("containerd failed while pruning image {image}")]
    Prune {
        image: String,
        #[source]
        source: ContainerdError,
    },
    #[error("the order was cancelled while the pull of {image} waited for its turn")]
    Cancelled { image: String },
    #[error("measuring the disk use of {path}")]
    DiskUse {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("preparing the log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A pull that ended at the registry's token endpoint never reached the puller; it still counts
/// in `berth_pulls_total` (the puller counts its own failures).
impl berth_registry::pull::UncountedPull for RunError {
    fn uncounted_pull_result(&self) -> Option<&'static str> {
        let RunError::Auth(err) = self else {
            return None;
        };
        match err {
            AuthError::Rejected { .. } => Some("denied"),
            AuthError::Unreachable { .. }
            | AuthError::RegistryUnreachable { .. }
            | AuthError::TokenEndpointDown { .. } => Some("unavailable"),
            // An order pairing a secret with another host is invalid, not a failed pull.
            AuthError::WrongServer { .. } => None,
            AuthError::TokenResponse { .. }
            | AuthError::Challenge { .. }
            | AuthError::Realm { .. }
            | AuthError::KeyUnusable { .. }
            | AuthError::Key { .. }
            | AuthError::Client(_) => Some("error"),
        }
    }
}

/// A container's state as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContainerState {
    Unknown,
    Created,
    Running,
    Exited,
}

impl ContainerState {
    fn label(self) -> &'static str {
        match self {
            ContainerState::Unknown => "unknown",
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Exited => "exited",
        }
    }
}

/// What berth reports about one container.
#[derive(Debug, Clone)]
pub(crate) struct ContainerView {
    pub(crate) id: String,
    pub(crate) order_id: String,
    pub(crate) project: String,
    pub(crate) name: String,
    pub(crate) image: String,
    pub(crate) image_digest: String,
    pub(crate) state: ContainerState,
    pub(crate) exit_code: i32,
    pub(crate) log_path: PathBuf,
    pub(crate) created_at: Option<SystemTime>,
    pub(crate) started_at: Option<SystemTime>,
    pub(crate) finished_at: Option<SystemTime>,
}

/// How a container is named in a request.
#[derive(Debug, Clone)]
pub(crate) enum ContainerKey {
    Id(String),
    Name { project: String, name: String },
}

/// How long an order waits for a turn among the container starts in flight before it starts
/// anyway.
const START_TURN_WAIT: Duration = Duration::from_secs(5);

/// Runs orders against one containerd namespace.
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    containerd: Containerd,
    puller: Puller,
    secrets: Arc<SecretStore>,
    auth: Arc<Authenticator>,
    logs_dir: PathBuf,
    locks: Arc<KeyedLocks>,
    /// Per image: start orders using it share a read lock until their container record
    /// references it; pulls and prune take the write lock.
    image_locks: Arc<KeyedRwLocks>,
    metrics: SharedMetrics,
    access_checks: Arc<AccessChecks>,
    /// `max_concurrent_pulls`: the host's pull queue.
    pull_queue: Arc<PullQueue>,
    /// How stale an image's `berth.dev/last-used` may get before an order refreshes it.
    touch_every: Duration,
    /// `[[credential_provider]]`: credentials for orders without a pull secret.
    providers: Arc<CredentialProviders>,
    /// `audit_log`: one line per credential use.
    audit: AuditLog,
    /// Container starts in flight: as many as the host has CPUs. Each start is CPU-bound work
    /// of containerd, a new shim and runc (~70 ms of CPU): 20 at once took as long in all, and
    /// the first of them ran 0.45 s later than with turns.
    starts: Arc<tokio::sync::Semaphore>,
}

impl Runner {
    pub(crate) fn new(
        containerd: Containerd,
        puller: Puller,
        secrets: Arc<SecretStore>,
        auth: Arc<Authenticator>,
        logs_dir: PathBuf,
        metrics: SharedMetrics,
    ) -> Self {
        Self {
            containerd,
            puller,
            secrets,
            auth,
            logs_dir,
            locks: Arc::default(),
            image_locks: Arc::default(),
            metrics,
            access_checks: Arc::default(),
            pull_queue: Arc::default(),
            touch_every: Duration::from_secs(60),
            providers: Arc::default(),
            audit: AuditLog::default(),
            starts: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            )),
        }
    }

    /// Credential provider plugins for orders without a pull secret.
    pub(crate) fn with_credential_providers(mut self, providers: CredentialProviders) -> Self {
        self.providers = Arc::new(providers);
        self
    }

    /// Where credential uses are recorded.
    pub(crate) fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = audit;
        self
    }

    /// Images' last use is recorded finely enough for `[gc]`'s `min_age_seconds`.
    pub(crate) fn with_image_gc(mut self, settings: &GcSettings) -> Self {
        self.touch_every = settings.touch_every();
        self
    }

    /// At most `max` image pulls at once (0 = no limit); more wait their turn in order.
    pub(crate) fn with_max_concurrent_pulls(mut self, max: usize) -> Self {
        self.pull_queue = Arc::new(PullQueue::new(max));
        self
    }

    /// How long a positive access check of a cached private image is reused.
    pub(crate) fn with_access_check_ttl(mut self, ttl: Duration) -> Self {
        self.access_checks = Arc::new(AccessChecks::with_ttl(ttl));
        self
    }

    /// The containerd berthd talks to, if it answers within a second.
    pub(crate) async fn containerd_version(&self) -> Option<ContainerdVersion> {
        tokio::time::timeout(Duration::from_secs(1), self.containerd.version())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Starts the container an order asks for; the same order again returns the same container.
    /// `cancel` (the client went away) takes the order out of the pull queue while it waits
    /// there; nothing else stops it.
    #[instrument(skip_all, fields(order_id = %order.order_id, project = %order.project, name = %order.name))]
    pub(crate) async fn start(
        &self,
        order: Order,
        cancel: CancellationToken,
    ) -> Result<ContainerView, RunError> {
        let received = tokio::time::Instant::now();
        let _order_guard = self.locks.lock(format!("order/{}", order.order_id)).await;
        if let Some(existing) = self.find_order(&order).await? {
            info!(id = %existing.id, "order seen before; returning its container");
            return Ok(existing);
        }
        let id = container_id(&order.project, &order.name);
        let _name_guard = self.locks.lock(format!("container/{id}")).await;
        let containerd_err = |source| RunError::Containerd {
            id: id.clone(),
            source,
        };
        if self
            .containerd
            .get_container(&id)
            .await
            .map_err(containerd_err)?
            .is_some()
        {
            return Err(RunError::NameTaken {
                project: order.project.clone(),
                name: order.name.clone(),
            });
        }

        let secret = self
            .load_secret(&order.project, order.pull_secret.as_deref(), &order.image)
            .await?;
        // A read lock on the image, held until the container record references it, so neither
        // a pull nor a prune can take the image out from under this order; orders for a present
        // image go on side by side.
        let (image, image_guard) = self.ensure_image(&order, secret.as_ref(), &cancel).await?;
        // Under the image's read lock: the GC sees this use before it may remove the image.
        self.note_use(&image.name, image.last_used).await;

        let spec = spec::build(&SpecInput {
            container_id: &id,
            namespace: self.containerd.namespace(),
            image_config: &image.config,
            command: &order.command,
            args: &order.args,
            env: &order.env,
        })
        .and_then(|spec| spec::to_json(&spec))
        .map_err(|source| RunError::Spec {
            name: order.name.clone(),
            source,
        })?;
        let labels = HashMap::from([
            (LABEL_PROJECT.to_owned(), order.project.clone()),
            (LABEL_NAME.to_owned(), order.name.clone()),
            (LABEL_ORDER_ID.to_owned(), order.order_id.to_string()),
            (LABEL_ORDER_HASH.to_owned(), order.fingerprint()),
            (LABEL_IMAGE.to_owned(), order.image.name()),
            (LABEL_IMAGE_DIGEST.to_owned(), image.manifest_digest.clone()),
        ]);
        // A turn among the starts in flight; a start that hangs keeps its turn only so long, so
        // it never holds the others back for good. (The semaphore is never closed.)
        let _start_turn = tokio::time::timeout(START_TURN_WAIT, self.starts.acquire())
            .await
            .ok()
            .and_then(Result::ok);
        self.containerd
            .create_container(NewContainer {
                id: &id,
                image_name: &image.name,
                top_chain_id: &image.top_chain_id,
                labels,
                spec_json: spec,
            })
            .await
            .map_err(|source| {
                if source.is_already_exists() {
                    RunError::NameTaken {
                        project: order.project.clone(),
                        name: order.name.clone(),
                    }
                } else {
                    containerd_err(source)
                }
            })?;
        drop(image_guard);

        // From here on a failure removes the container again: no orphans.
        if let Err(err) = self.start_task(&id).await {
            warn!(id = %id, error = %err, "start failed; removing the container");
            self.containerd.delete_task(&id).await.ok();
            self.containerd.delete_container(&id).await.ok();
            return Err(err);
        }
        self.metrics
            .start_duration
            .observe(received.elapsed().as_secs_f64());
        info!(id = %id, digest = %image.manifest_digest, "container started");
        self.view_by_id(&id).await
    }

    /// Sets `berth_containers{state}` from containerd, for a scrape.
    pub(crate) async fn refresh_container_gauges(&self) -> Result<(), RunError> {
        let views = self.list(None).await?;
        self.metrics.containers.clear();
        for state in [
            ContainerState::Created,
            ContainerState::Running,
            ContainerState::Exited,
            ContainerState::Unknown,
        ] {
            let count = views.iter().filter(|view| view.state == state).count();
            self.metrics
                .containers
                .get_or_create(&StateLabels {
                    state: state.label(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    async fn start_task(&self, id: &str) -> Result<(), RunError> {
        let log_path = self.log_path(id);
        prepare_log(&log_path).await?;
        self.containerd
            .start_task(id, &log_path)
            .await
            .map_err(|source| RunError::Start {
                id: id.to_owned(),
                source,
            })?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.containerd
            .update_container_labels(
                id,
                HashMap::from([(LABEL_STARTED_AT.to_owned(), now.as_nanos().to_string())]),
            )
            .await
            .map_err(|source| RunError::Containerd {
                id: id.to_owned(),
                source,
            })
    }

    async fn find_order(&self, order: &Order) -> Result<Option<ContainerView>, RunError> {
        let filter = format!(
            "labels.\"{LABEL_ORDER_ID}\"=={}",
            quote(order.order_id.as_str())
        );
        let found = self
            .containerd
            .list_containers(vec![filter])
            .await
            .map_err(|source| RunError::Containerd {
                id: order.order_id.to_string(),
                source,
            })?;
        let Some(record) = found.into_iter().next() else {
            return Ok(None);
        };
        if record.labels.get(LABEL_ORDER_HASH) != Some(&order.fingerprint()) {
            return Err(RunError::OrderConflict {
                order_id: order.order_id.to_string(),
            });
        }
        Ok(Some(self.view(record).await?))
    }

    pub(crate) async fn get(&self, key: &ContainerKey) -> Result<ContainerView, RunError> {
        let id = match key {
            ContainerKey::Id(id) => id.clone(),
            ContainerKey::Name { project, name } => container_id(project, name),
        };
        self.view_by_id(&id).await
    }

    /// Containers of one project, or of every project.
    pub(crate) async fn list(&self, project: Option<&str>) -> Result<Vec<ContainerView>, RunError> {
        let filter = match project {
            Some(project) => format!("labels.\"{LABEL_PROJECT}\"=={}", quote(project)),
            None => format!("labels.\"{LABEL_PROJECT}\""),
        };
        let records = self
            .containerd
            .list_containers(vec![filter])
            .await
            .map_err(|source| RunError::Containerd {
                id: String::new(),
                source,
            })?;
        let mut views = Vec::with_capacity(records.len());
        for record in records {
            views.push(self.view(record).await?);
        }
        views.sort_by(|a, b| (&a.project, &a.name).cmp(&(&b.project, &b.name)));
        Ok(views)
    }

    /// SIGTERM, then SIGKILL after `timeout`.
    #[instrument(skip_all, fields(id = %id))]
    pub(crate) async fn stop(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<ContainerView, RunError> {
        let view = self.view_by_id(id).await?;
        let _guard = self.locks.lock(format!("container/{id}")).await;
        if view.state == ContainerState::Running {
            self.kill(id, timeout.unwrap_or(DEFAULT_STOP_TIMEOUT))
                .await?;
        }
        self.view_by_id(id).await
    }

    /// Deletes task, container, snapshot and log. A running container needs `force`.
    #[instrument(skip_all, fields(id = %id))]
    pub(crate) async fn remove(&self, id: &str, force: bool) -> Result<(), RunError> {
        let view = self.view_by_id(id).await?;
        let _guard = self.locks.lock(format!("container/{id}")).await;
        if view.state == ContainerState::Running {
            if !force {
                return Err(RunError::StillRunning { id: id.to_owned() });
            }
            self.kill(id, Duration::ZERO).await?;
        }
        let containerd_err = |source| RunError::Containerd {
            id: id.to_owned(),
            source,
        };
        self.containerd
            .delete_task(id)
            .await
            .map_err(containerd_err)?;
        self.containerd
            .delete_container(id)
            .await
            .map_err(containerd_err)?;
        match tokio::fs::remove_file(&view.log_path).await {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RunError::Log {
                    path: view.log_path,
                    source,
                })
            }
        }
        info!("container removed");
        Ok(())
    }

    async fn kill(&self, id: &str, grace: Duration) -> Result<(), RunError> {
        let containerd_err = |source| RunError::Containerd {
            id: id.to_owned(),
            source,
        };
        if !grace.is_zero() {
            self.containerd
                .kill_task(id, 15, false)
                .await
                .map_err(containerd_err)?;
            if tokio::time::timeout(grace, self.containerd.wait_task(id))
                .await
                .is_ok()
            {
                return Ok(());
            }
            info!(
                grace_seconds = grace.as_secs(),
                "no exit after SIGTERM; sending SIGKILL"
            );
        }
        self.containerd
            .kill_task(id, 9, true)
            .await
            .map_err(containerd_err)?;
        tokio::time::timeout(DEFAULT_STOP_TIMEOUT, self.containerd.wait_task(id))
            .await
            .map_err(|_| RunError::Containerd {
                id: id.to_owned(),
                source: ContainerdError::Protocol {
                    op: "tasks.wait",
                    reason: "the task did not exit after SIGKILL",
                },
            })?
            .map_err(containerd_err)?;
        Ok(())
    }

    async fn view_by_id(&self, id: &str) -> Result<ContainerView, RunError> {
        let record = self
            .containerd
            .get_container(id)
            .await
            .map_err(|source| RunError::Containerd {
                id: id.to_owned(),
                source,
            })?
            .filter(|record| record.labels.contains_key(LABEL_PROJECT))
            .ok_or_else(|| RunError::ContainerNotFound { id: id.to_owned() })?;
        self.view(record).await
    }

    async fn view(&self, record: ContainerRecord) -> Result<ContainerView, RunError> {
        let task = self
            .containerd
            .task_status(&record.id)
            .await
            .map_err(|source| RunError::Containerd {
                id: record.id.clone(),
                source,
            })?;
        let label = |key: &str| record.labels.get(key).cloned().unwrap_or_default();
        let started_at = record
            .labels
            .get(LABEL_STARTED_AT)
            .and_then(|nanos| nanos.parse::<u64>().ok())
            .map(|nanos| SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos));
        let (state, exit_code, finished_at) = match &task {
            Some(task) if task.running => (ContainerState::Running, 0, None),
            Some(task) if task.stopped => (
                ContainerState::Exited,
                i32::try_from(task.exit_status).unwrap_or(i32::MAX),
                task.exited_at.as_ref().and_then(timestamp_to_system),
            ),
            Some(_) => (ContainerState::Created, 0, None),
            None if started_at.is_some() => (ContainerState::Unknown, 0, None),
            None => (ContainerState::Created, 0, None),
        };
        Ok(ContainerView {
            log_path: self.log_path(&record.id),
            order_id: label(LABEL_ORDER_ID),
            project: label(LABEL_PROJECT),
            name: label(LABEL_NAME),
            image: label(LABEL_IMAGE),
            image_digest: label(LABEL_IMAGE_DIGEST),
            created_at: record.created_at.as_ref().and_then(timestamp_to_system),
            id: record.id,
            state,
            exit_code,
            started_at,
            finished_at,
        })
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.logs_dir.join(format!("{id}.log"))
    }
}

/// The per-image reader-writer lock key, shared by start orders, pulls and prune.
pub(crate) fn image_lock(image: &ImageRef) -> String {
    format!("image/{}", image.name())
}

/// `<project>.<name>`, or `<name>-<hash>` when that would pass containerd's 76 characters.
pub(crate) fn container_id(project: &str, name: &str) -> String {
    let id = format!("{project}.{name}");
    if id.len() <= MAX_ID_LEN {
        return id;
    }
    let hash = hex::encode(&Sha256::digest(format!("{project}/{name}"))[..6]);
    let keep = MAX_ID_LEN - hash.len() - 1;
    format!(
        "{}-{hash}",
        name[..name.len().min(keep)].trim_end_matches('-')
    )
}

/// A containerd filter string literal.
fn quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

fn timestamp_to_system(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    if secs == 0 && nanos == 0 {
        return None;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Starts the container's log file afresh (0600, under the 0700 logs dir).
async fn prepare_log(path: &Path) -> Result<(), RunError> {
    let log_err = |source| RunError::Log {
        path: path.to_owned(),
        source,
    };
    match tokio::fs::remove_file(path).await {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(log_err(err)),
    }
    tokio::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(log_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_are_stable_and_fit_containerd() {
        assert_eq!(container_id("default", "web"), "default.web");
        let long = "a".repeat(63);
        let id = container_id(&long, &long);
        assert!(id.len() <= MAX_ID_LEN, "{id}");
        assert_eq!(id, container_id(&long, &long));
        assert_ne!(id, container_id(&"b".repeat(63), &long));
    }

    #[test]
    fn filter_values_are_quoted() {
        assert_eq!(quote("o-1"), "\"o-1\"");
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
    }
}
