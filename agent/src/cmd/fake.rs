//! An in-process fake berthd on a temp unix socket, for the CLI's component tests: it records
//! every request and answers from a small in-memory state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tonic::{Request, Response, Status};

use crate::api::pb;

/// What the fake holds and what it was asked.
#[derive(Debug, Default)]
pub(super) struct FakeState {
    pub(super) containers: Vec<pb::Container>,
    pub(super) secrets: Vec<pb::Secret>,
    pub(super) starts: Vec<pb::StartContainerRequest>,
    pub(super) created_secrets: Vec<pb::CreateSecretRequest>,
    pub(super) stops: Vec<pb::StopContainerRequest>,
    pub(super) removes: Vec<pb::RemoveContainerRequest>,
    pub(super) pulls: Vec<pb::PullImageRequest>,
    pub(super) get_calls: usize,
    /// On this GetContainer call: append `text` to `path` and mark every container EXITED.
    pub(super) finish_on_get: Option<(usize, PathBuf, String)>,
}

#[derive(Debug, Clone, Default)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
}

impl Fake {
    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .expect("invariant: no test panics while holding the lock")
    }
}

/// A running fake daemon; stops when dropped.
#[derive(Debug)]
pub(super) struct FakeDaemon {
    pub(super) address: String,
    state: Arc<Mutex<FakeState>>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl FakeDaemon {
    pub(super) fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("berthd.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind fake socket");
        let fake = Fake::default();
        let state = fake.state.clone();
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let served = tonic::transport::Server::builder()
                .add_service(pb::agent_server::AgentServer::new(fake.clone()))
                .add_service(pb::secrets_server::SecretsServer::new(fake))
                .serve_with_incoming(incoming)
                .await;
            served.expect("fake daemon serves");
        });
        Self {
            address: format!("unix://{}", path.display()),
            state,
            server,
            _dir: dir,
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .expect("invariant: no test panics while holding the lock")
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn project_or_default(project: &str) -> String {
    if project.is_empty() {
        "default".to_owned()
    } else {
        project.to_owned()
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for Fake {
    async fn start_container(
        &self,
        request: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        state.starts.push(request.clone());
        let container = pb::Container {
            id: format!("c-{}", state.starts.len()),
            order_id: request.order_id,
            project: project_or_default(&request.project),
            name: request.name,
            image: request.container.map(|spec| spec.image).unwrap_or_default(),
            state: pb::ContainerState::Running as i32,
            ..Default::default()
        };
        state.containers.push(container.clone());
        Ok(Response::new(container))
    }

    type PullImageStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::PullEvent, Status>>>;

    async fn pull_image(
        &self,
        request: Request<pb::PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let request = request.into_inner();
        self.state().pulls.push(request.clone());
        use pb::pull_event::Event;
        let events = vec![
            Event::Resolved(pb::Resolved {
                image: request.image,
                digest: "sha256:m".to_owned(),
                layers: 1,
                total_bytes: 30,
            }),
            Event::Layer(pb::LayerProgress {
                digest: "sha256:l".to_owned(),
                done_bytes: 20,
                total_bytes: 20,
                cached: false,
            }),
            Event::Done(pb::Done {
                digest: "sha256:m".to_owned(),
            }),
        ];
        let events = events
            .into_iter()
            .map(|event| Ok(pb::PullEvent { event: Some(event) }))
            .collect::<Vec<_>>();
        Ok(Response::new(tokio_stream::iter(events)))
    }

    async fn get_container(
        &self,
        request: Request<pb::GetContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        state.get_calls += 1;
        if let Some((call, path, text)) = state.finish_on_get.clone() {
            if call == state.get_calls {
                let mut log = std::fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .expect("open log");
                std::io::Write::write_all(&mut log, text.as_bytes()).expect("append log");
                for container in &mut state.containers {
                    container.state = pb::ContainerState::Exited as i32;
                }
            }
        }
        let found = if request.id.is_empty() {
            let project = project_or_default(&request.project);
            state
                .containers
                .iter()
                .find(|container| container.project == project && container.name == request.name)
        } else {
            state
                .containers
                .iter()
                .find(|container| container.id == request.id)
        };
        match found {
            Some(container) => Ok(Response::new(container.clone())),
            None if request.id.is_empty() => Err(Status::not_found(format!(
                "container {} not found in project {}",
                request.name, request.project
            ))),
            None => Err(Status::not_found(format!(
                "container {} not found",
                request.id
            ))),
        }
    }

    async fn list_containers(
        &self,
        request: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let project = project_or_default(&request.into_inner().project);
        let containers = self
            .state()
            .containers
            .iter()
            .filter(|container| container.project == project)
            .cloned()
            .collect();
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    async fn stop_container(
        &self,
        request: Request<pb::StopContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        state.stops.push(request.clone());
        let container = state
            .containers
            .iter_mut()
            .find(|container| container.id == request.id)
            .ok_or_else(|| Status::not_found("no such container"))?;
        container.state = pb::ContainerState::Exited as i32;
        container.exit_code = 143;
        Ok(Response::new(container.clone()))
    }

    async fn remove_container(
        &self,
        request: Request<pb::RemoveContainerRequest>,
    ) -> Result<Response<pb::RemoveContainerResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        state.removes.push(request.clone());
        state
            .containers
            .retain(|container| container.id != request.id);
        Ok(Response::new(pb::RemoveContainerResponse {}))
    }
}

#[tonic::async_trait]
impl pb::secrets_server::Secrets for Fake {
    async fn create_secret(
        &self,
        request: Request<pb::CreateSecretRequest>,
    ) -> Result<Response<pb::Secret>, Status> {
        use pb::create_secret_request::Credential;
        let request = request.into_inner();
        let mut state = self.state();
        let project = project_or_default(&request.project);
        if state
            .secrets
            .iter()
            .any(|secret| secret.project == project && secret.name == request.name)
        {
            return Err(Status::already_exists(format!(
                "secret {} already exists",
                request.name
            )));
        }
        let (kind, server) = match &request.credential {
            Some(Credential::Docker(docker)) => ("docker", docker.server.clone()),
            Some(Credential::Acr(acr)) => ("acr", acr.server.clone()),
            Some(Credential::Gar(gar)) => ("gar", gar.server.clone()),
            None => return Err(Status::invalid_argument("credential is required")),
        };
        state.created_secrets.push(request.clone());
        let secret = pb::Secret {
            id: format!("secret-{}", state.created_secrets.len()),
            project,
            name: request.name,
            kind: kind.to_owned(),
            server,
            created_at: None,
        };
        state.secrets.push(secret.clone());
        Ok(Response::new(secret))
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let project = project_or_default(&request.into_inner().project);
        let secrets = self
            .state()
            .secrets
            .iter()
            .filter(|secret| secret.project == project)
            .cloned()
            .collect();
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }

    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        let before = state.secrets.len();
        state.secrets.retain(|secret| secret.id != request.id);
        if state.secrets.len() == before {
            return Err(Status::not_found(format!(
                "secret {} not found",
                request.id
            )));
        }
        Ok(Response::new(pb::DeleteSecretResponse {}))
    }
}
