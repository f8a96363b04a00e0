//! `berth.v1.Agent`: start orders, pulls and container queries.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{info, instrument, Instrument as _};

use super::access::{Access, Allowed};
use super::convert;
use super::pb;
use super::status::{order_status, ApiError};
use crate::run::{ContainerKey, ContainerView, RunError, Runner};
use berth_core::order::{parse_dns_label, parse_project, ImageRef, Order};

#[derive(Debug)]
pub(crate) struct AgentService {
    runner: Runner,
    tasks: TaskTracker,
    access: Access,
}

impl AgentService {
    pub(crate) fn new(runner: Runner, tasks: TaskTracker, access: Access) -> Self {
        Self {
            runner,
            tasks,
            access,
        }
    }

    /// The container `id`, if the caller may see its project; NOT_FOUND otherwise, so ids of
    /// other projects cannot be probed.
    async fn visible<T>(&self, request: &Request<T>, id: &str) -> Result<ContainerView, Status> {
        if id.is_empty() {
            return Err(ApiError::Missing { field: "id" }.into());
        }
        let allowed = self.access.allowed(request)?;
        let view = self.runner.get(&ContainerKey::Id(id.to_owned())).await?;
        if !allowed.permits(&view.project) {
            return Err(RunError::ContainerNotFound { id: id.to_owned() }.into());
        }
        Ok(view)
    }
}

type PullStream = Pin<Box<dyn Stream<Item = Result<pb::PullEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    #[instrument(name = "order", skip_all, fields(order_id = %request.get_ref().order_id))]
    async fn start_container(
        &self,
        request: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let allowed = self.access.allowed(&request)?;
        let order = Order::parse(convert::raw_order(request.into_inner()).map_err(order_status)?)
            .map_err(order_status)?;
        if !allowed.permits(&order.project) {
            return Err(ApiError::ProjectDenied {
                project: order.project,
            }
            .into());
        }
        info!(project = %order.project, name = %order.name, image = %order.image, "start order received");
        // The order runs to completion even if the caller goes away, so nothing is half-done;
        // only an order still queued for a pull turn leaves the queue then.
        let runner = self.runner.clone();
        let cancel = CancellationToken::new();
        let _cancel_when_caller_leaves = cancel.clone().drop_guard();
        let work = self
            .tasks
            .spawn(async move { runner.start(order, cancel).await }.in_current_span());
        let view = work.await.map_err(|source| ApiError::TaskFailed {
            what: "order",
            source,
        })??;
        Ok(Response::new(convert::container(view)))
    }

    type PullImageStream = PullStream;

    #[instrument(name = "explain", skip_all)]
    async fn explain_pull(
        &self,
        request: Request<pb::PullImageRequest>,
    ) -> Result<Response<pb::PullPlan>, Status> {
        let project = parse_project(&request.get_ref().project).map_err(order_status)?;
        self.access.check(&request, &project)?;
        let request = request.into_inner();
        let image = ImageRef::parse(&request.image).map_err(order_status)?;
        let pull_secret = (!request.pull_secret.is_empty()).then_some(request.pull_secret);
        let runner = self.runner.clone();
        let plan = self
            .tasks
            .spawn(
                async move {
                    runner
                        .explain(&project, &image, pull_secret.as_deref())
                        .await
                }
                .in_current_span(),
            )
            .await
            .map_err(|source| ApiError::TaskFailed {
                what: "explain",
                source,
            })??;
        Ok(Response::new(convert::pull_plan(plan)))
    }

    #[instrument(skip_all, fields(image = %request.get_ref().image))]
    async fn pull_image(
        &self,
        request: Request<pb::PullImageRequest>,
    ) -> Result<Response<PullStream>, Status> {
        let project = parse_project(&request.get_ref().project).map_err(order_status)?;
        self.access.check(&request, &project)?;
        let request = request.into_inner();
        let image = ImageRef::parse(&request.image).map_err(order_status)?;
        let pull_secret = (!request.pull_secret.is_empty()).then_some(request.pull_secret);
        let (events, receiver) = mpsc::channel(64);
        let (progress, mut progress_rx) = mpsc::channel(64);
        let runner = self.runner.clone();
        self.tasks.spawn(
            async move {
                let forward_events = events.clone();
                let forward = async move {
                    while let Some(event) = progress_rx.recv().await {
                        forward_events
                            .send(Ok(convert::pull_event(event)))
                            .await
                            .ok();
                    }
                };
                // A client that goes away takes a queued pull out of the queue; a pull that has
                // its turn runs to the end.
                let cancel = CancellationToken::new();
                let pull = runner.pull(
                    &project,
                    &image,
                    pull_secret.as_deref(),
                    progress,
                    cancel.clone(),
                );
                let work = async { tokio::join!(pull, forward) };
                tokio::pin!(work);
                let (result, ()) = tokio::select! {
                    done = &mut work => done,
                    () = events.closed() => {
                        cancel.cancel();
                        work.await
                    }
                };
                if let Err(err) = result {
                    events.send(Err(Status::from(err))).await.ok();
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn get_container(
        &self,
        request: Request<pb::GetContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        if !request.get_ref().id.is_empty() {
            let view = self.visible(&request, &request.get_ref().id).await?;
            return Ok(Response::new(convert::container(view)));
        }
        let project = parse_project(&request.get_ref().project).map_err(order_status)?;
        self.access.check(&request, &project)?;
        let name = parse_dns_label(&request.get_ref().name, "name").map_err(order_status)?;
        let view = self
            .runner
            .get(&ContainerKey::Name { project, name })
            .await?;
        Ok(Response::new(convert::container(view)))
    }

    async fn list_containers(
        &self,
        request: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let allowed = self.access.allowed(&request)?;
        let request = request.into_inner();
        let project = if request.project.is_empty() {
            None
        } else {
            let project = parse_project(&request.project).map_err(order_status)?;
            if !allowed.permits(&project) {
                return Err(ApiError::ProjectDenied { project }.into());
            }
            Some(project)
        };
        let views = self.runner.list(project.as_deref()).await?;
        Ok(Response::new(pb::ListContainersResponse {
            containers: views
                .into_iter()
                .filter(|view| allowed.permits(&view.project))
                .map(convert::container)
                .collect(),
        }))
    }

    #[instrument(skip_all, fields(id = %request.get_ref().id))]
    async fn stop_container(
        &self,
        request: Request<pb::StopContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        self.visible(&request, &request.get_ref().id).await?;
        let request = request.into_inner();
        let timeout = (request.timeout_seconds > 0)
            .then(|| Duration::from_secs(u64::from(request.timeout_seconds)));
        let view = self.runner.stop(&request.id, timeout).await?;
        Ok(Response::new(convert::container(view)))
    }

    #[instrument(skip_all, fields(id = %request.get_ref().id))]
    async fn remove_container(
        &self,
        request: Request<pb::RemoveContainerRequest>,
    ) -> Result<Response<pb::RemoveContainerResponse>, Status> {
        self.visible(&request, &request.get_ref().id).await?;
        let request = request.into_inner();
        self.runner.remove(&request.id, request.force).await?;
        Ok(Response::new(pb::RemoveContainerResponse {}))
    }

    #[instrument(skip_all, fields(keep_bytes = request.get_ref().keep_bytes))]
    async fn prune_images(
        &self,
        request: Request<pb::PruneImagesRequest>,
    ) -> Result<Response<pb::PruneImagesResponse>, Status> {
        // Images are shared by every project: only a caller that may act for all of them prunes.
        if self.access.allowed(&request)? != Allowed::All {
            return Err(ApiError::PruneNeedsEveryProject.into());
        }
        let report = self
            .runner
            .prune_images(request.into_inner().keep_bytes)
            .await?;
        Ok(Response::new(pb::PruneImagesResponse {
            removed: report.removed,
            freed_bytes: report.freed_bytes,
        }))
    }

    async fn version(
        &self,
        _request: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        let containerd = self.runner.containerd_version().await;
        Ok(Response::new(pb::VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            containerd_version: containerd
                .as_ref()
                .map(|version| version.as_str().to_owned())
                .unwrap_or_default(),
            containerd_revision: containerd
                .as_ref()
                .map(|version| version.revision().to_owned())
                .unwrap_or_default(),
        }))
    }
}
