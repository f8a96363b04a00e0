//! Component tests: the CLI against an in-process fake berthd on a temp unix socket, which
//! records every request and answers from a small in-memory state.

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
                signature: "not required".to_owned(),
            }),
        ];
        let events = events
            .into_iter()
            .map(|event| Ok(pb::PullEvent { event: Some(event) }))
            .collect::<Vec<_>>();
        Ok(Response::new(tokio_stream::iter(events)))
    }

    async fn explain_pull(
        &self,
        request: Request<pb::PullImageRequest>,
    ) -> Result<Response<pb::PullPlan>, Status> {
        let request = request.into_inner();
        self.state().pulls.push(request.clone());
        Ok(Response::new(pb::PullPlan {
            image: request.image,
            digest: "sha256:m".to_owned(),
            endpoint: "https://registry.example.com".to_owned(),
            credential: if request.pull_secret.is_empty() {
                "anonymous".to_owned()
            } else {
                request.pull_secret
            },
            realm: "https://auth.example.com/token".to_owned(),
            scope: "repository:team/app:pull".to_owned(),
            present: true,
            bytes_to_fetch: 0,
            access: "ok".to_owned(),
            policy: String::new(),
            signature: "not required".to_owned(),
        }))
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

    async fn prune_images(
        &self,
        _request: Request<pb::PruneImagesRequest>,
    ) -> Result<Response<pb::PruneImagesResponse>, Status> {
        Ok(Response::new(pb::PruneImagesResponse::default()))
    }

    async fn version(
        &self,
        _request: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        // As a berthd whose containerd does not answer.
        Ok(Response::new(pb::VersionResponse {
            version: "9.9.9".to_owned(),
            ..Default::default()
        }))
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cmd::{run_with, Cli, CmdError};

    struct Ran {
        result: Result<(), CmdError>,
        out: String,
        err: String,
    }

    async fn berth(daemon: &FakeDaemon, args: &[&str]) -> Ran {
        let line = ["berth", "--address", daemon.address.as_str()]
            .into_iter()
            .chain(args.iter().copied());
        let cli = Cli::try_parse_from(line).unwrap();
        let mut out = Vec::new();
        let mut err = Vec::new();
        let result = run_with(cli, &mut out, &mut err).await;
        Ran {
            result,
            out: String::from_utf8(out).unwrap(),
            err: String::from_utf8(err).unwrap(),
        }
    }

    fn running(id: &str, name: &str, project: &str) -> pb::Container {
        pb::Container {
            id: id.to_owned(),
            name: name.to_owned(),
            project: project.to_owned(),
            image: "registry.example.com/team/app:1".to_owned(),
            state: pb::ContainerState::Running as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn version_prints_the_cli_then_berthd_then_containerd() {
        let daemon = FakeDaemon::start();
        let ran = berth(&daemon, &["version"]).await;
        ran.result.unwrap();
        let cli = env!("CARGO_PKG_VERSION");
        assert_eq!(
            ran.out,
            format!("berth   {cli}\nberthd  9.9.9\ncontainerd not answering\n")
        );
        let ran = berth(&daemon, &["version", "--output", "json"]).await;
        ran.result.unwrap();
        let printed: serde_json::Value = serde_json::from_str(&ran.out).unwrap();
        assert_eq!(printed["berth"], cli);
        assert_eq!(printed["berthd"], "9.9.9");
        assert_eq!(printed["containerd"], "");
    }

    #[tokio::test]
    async fn explain_prints_the_plan_as_lines_or_json() {
        let daemon = FakeDaemon::start();
        let image = "registry.example.com/team/app:1";
        let ran = berth(
            &daemon,
            &[
                "explain",
                image,
                "--pull-secret",
                "secret-x",
                "--project",
                "team-a",
            ],
        )
        .await;
        ran.result.unwrap();
        assert!(ran.out.contains("credential     secret-x\n"), "{}", ran.out);
        assert!(ran.out.contains("present        true\n"), "{}", ran.out);
        assert_eq!(ran.out.lines().count(), 11, "{}", ran.out);
        let ran = berth(&daemon, &["explain", image, "--output", "json"]).await;
        ran.result.unwrap();
        let printed: serde_json::Value = serde_json::from_str(&ran.out).unwrap();
        assert_eq!(printed["credential"], "anonymous");
        assert_eq!(printed["bytes_to_fetch"], 0);
        assert_eq!(printed["scope"], "repository:team/app:pull");
        let state = daemon.state();
        assert_eq!(state.pulls[0].project, "team-a");
        assert_eq!(state.pulls[0].pull_secret, "secret-x");
    }

    #[tokio::test]
    async fn docker_secret_create_prints_the_id_alone() {
        let daemon = FakeDaemon::start();
        let ran = berth(
            &daemon,
            &[
                "secret",
                "docker",
                "create",
                "--name",
                "hub",
                "--server",
                "docker.io",
                "--username",
                "me",
                "--password",
                "pw-1",
                "--project",
                "team-a",
            ],
        )
        .await;
        ran.result.unwrap();
        assert_eq!(ran.out, "secret-1\n");
        assert!(ran.err.contains("--password-stdin"), "{}", ran.err);
        assert!(!ran.err.contains("pw-1"));
        let state = daemon.state();
        let request = &state.created_secrets[0];
        assert_eq!(request.project, "team-a");
        assert_eq!(request.name, "hub");
        assert_eq!(
            request.credential,
            Some(pb::create_secret_request::Credential::Docker(
                pb::DockerCredential {
                    server: "docker.io".to_owned(),
                    username: "me".to_owned(),
                    password: "pw-1".to_owned(),
                }
            ))
        );
    }

    #[tokio::test]
    async fn gar_secret_create_sends_the_key_file() {
        let daemon = FakeDaemon::start();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("sa.json");
        std::fs::write(&key, r#"{"type": "service_account"}"#).unwrap();
        let key = key.display().to_string();
        let ran = berth(
            &daemon,
            &[
                "--output",
                "json",
                "secret",
                "gar",
                "create",
                "--name",
                "gar",
                "--server",
                "europe-docker.pkg.dev",
                "--json_key",
                &key,
            ],
        )
        .await;
        ran.result.unwrap();
        let printed: serde_json::Value = serde_json::from_str(&ran.out).unwrap();
        assert_eq!(printed["id"], "secret-1");
        assert_eq!(printed["kind"], "gar");
        let state = daemon.state();
        let Some(pb::create_secret_request::Credential::Gar(gar)) =
            &state.created_secrets[0].credential
        else {
            panic!("{:?}", state.created_secrets);
        };
        assert_eq!(gar.json_key, r#"{"type": "service_account"}"#);
    }

    #[tokio::test]
    async fn docker_import_creates_one_secret_per_entry_and_reports_the_rest() {
        use base64::Engine as _;
        let daemon = FakeDaemon::start();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("me:pw");
        std::fs::write(
            &config,
            format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                    "myreg.azurecr.io": {{"identitytoken": "refresh-1"}},
                    "ghcr.io": {{}}
                }}, "credHelpers": {{"gcr.io": "gcloud"}}}}"#
            ),
        )
        .unwrap();
        let config = config.display().to_string();
        let ran = berth(
            &daemon,
            &["secret", "docker", "import", "--config", &config],
        )
        .await;
        ran.result.unwrap();
        assert_eq!(ran.out, "secret-1 docker.io\nsecret-2 myreg.azurecr.io\n");
        assert!(ran.err.contains("skipped ghcr.io"), "{}", ran.err);
        assert!(ran.err.contains("skipped gcr.io"), "{}", ran.err);
        assert!(!ran.err.contains("refresh-1"));
        {
            let state = daemon.state();
            let Some(pb::create_secret_request::Credential::Docker(token)) =
                &state.created_secrets[1].credential
            else {
                panic!("{:?}", state.created_secrets);
            };
            assert_eq!(token.username, "00000000-0000-0000-0000-000000000000");
            assert_eq!(token.password, "refresh-1");
            assert_eq!(state.created_secrets[1].name, "myreg.azurecr.io");
        }
        // Importing again: every name exists, so each entry fails and the run fails.
        let again = berth(
            &daemon,
            &["secret", "docker", "import", "--config", &config],
        )
        .await;
        let error = again.result.unwrap_err();
        assert!(matches!(
            error,
            CmdError::ImportIncomplete {
                failed: 2,
                total: 2
            }
        ));
        assert!(
            again.err.contains("docker.io: ALREADY_EXISTS"),
            "{}",
            again.err
        );
    }

    #[tokio::test]
    async fn secret_list_and_delete() {
        let daemon = FakeDaemon::start();
        daemon.state().secrets.push(pb::Secret {
            id: "secret-9".to_owned(),
            project: "default".to_owned(),
            name: "hub".to_owned(),
            kind: "docker".to_owned(),
            server: "docker.io".to_owned(),
            created_at: None,
        });
        let listed = berth(&daemon, &["secret", "list"]).await;
        listed.result.unwrap();
        assert!(
            listed
                .out
                .starts_with("ID        NAME  KIND    SERVER     CREATED\n"),
            "{}",
            listed.out
        );
        assert!(
            listed
                .out
                .contains("secret-9  hub   docker  docker.io  -\n"),
            "{}",
            listed.out
        );
        let deleted = berth(&daemon, &["secret", "delete", "secret-9"]).await;
        deleted.result.unwrap();
        assert_eq!(deleted.out, "secret-9\n");
        let missing = berth(&daemon, &["secret", "delete", "secret-9"]).await;
        let error = missing.result.unwrap_err();
        assert_eq!(error.describe(), "NOT_FOUND: secret secret-9 not found");
    }

    #[tokio::test]
    async fn service_create_sends_one_order() {
        let daemon = FakeDaemon::start();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        std::fs::write(
            &file,
            "version: v1\nkind: Service\nmetadata:\n  name: demo\ncontainer:\n  image: registry.example.com/t/app:1\n  pull_secret: secret-1\n  pull_policy: Never\n",
        )
        .unwrap();
        let file = file.display().to_string();
        let ran = berth(
            &daemon,
            &["service", "create", "--file", &file, "--project", "p1"],
        )
        .await;
        ran.result.unwrap();
        assert!(ran.out.starts_with("id:           c-1\n"), "{}", ran.out);
        let again = berth(
            &daemon,
            &[
                "service",
                "create",
                "--file",
                &file,
                "--order-id",
                "order-7",
            ],
        )
        .await;
        again.result.unwrap();
        let state = daemon.state();
        let first = &state.starts[0];
        assert!(first.order_id.starts_with("cli-"), "{}", first.order_id);
        assert_eq!(first.project, "p1");
        assert_eq!(first.name, "demo");
        let spec = first.container.as_ref().unwrap();
        assert_eq!(spec.image, "registry.example.com/t/app:1");
        assert_eq!(spec.pull_secret, "secret-1");
        assert_eq!(spec.pull_policy, pb::PullPolicy::Never as i32);
        assert_eq!(state.starts[1].order_id, "order-7");
        assert_eq!(state.starts[1].project, "default");
    }

    #[tokio::test]
    async fn ps_lists_the_project_as_text_or_json() {
        let daemon = FakeDaemon::start();
        daemon.state().containers.extend([
            running("c-1", "web", "default"),
            running("c-2", "db", "other"),
        ]);
        let text = berth(&daemon, &["ps"]).await;
        text.result.unwrap();
        assert_eq!(text.out.lines().count(), 2, "{}", text.out);
        assert!(text.out.starts_with("ID   NAME  IMAGE"), "{}", text.out);
        let json = berth(&daemon, &["ps", "--output", "json", "--project", "other"]).await;
        json.result.unwrap();
        let printed: serde_json::Value = serde_json::from_str(&json.out).unwrap();
        assert_eq!(printed.as_array().map(Vec::len), Some(1));
        assert_eq!(printed[0]["name"], "db");
        assert_eq!(printed[0]["state"], "RUNNING");
    }

    #[tokio::test]
    async fn get_stop_and_rm_find_a_container_by_id_or_name() {
        let daemon = FakeDaemon::start();
        daemon
            .state()
            .containers
            .push(running("c-1", "web", "default"));
        let by_name = berth(&daemon, &["get", "web", "--output", "json"]).await;
        by_name.result.unwrap();
        let printed: serde_json::Value = serde_json::from_str(&by_name.out).unwrap();
        assert_eq!(printed["id"], "c-1");
        let by_id = berth(&daemon, &["get", "c-1"]).await;
        by_id.result.unwrap();
        assert!(by_id.out.contains("name:         web\n"), "{}", by_id.out);

        let stopped = berth(&daemon, &["stop", "web", "--timeout", "3"]).await;
        stopped.result.unwrap();
        assert_eq!(stopped.out, "c-1\n");
        let removed = berth(&daemon, &["rm", "web", "--force"]).await;
        removed.result.unwrap();
        assert_eq!(removed.out, "c-1\n");
        {
            let state = daemon.state();
            assert_eq!(state.stops[0].id, "c-1");
            assert_eq!(state.stops[0].timeout_seconds, 3);
            assert_eq!(state.removes[0].id, "c-1");
            assert!(state.removes[0].force);
        }
        let gone = berth(&daemon, &["get", "web"]).await;
        let error = gone.result.unwrap_err();
        assert_eq!(
            error.describe(),
            "NOT_FOUND: container web not found in project default"
        );
    }

    #[tokio::test]
    async fn logs_print_the_file_and_follow_until_exit() {
        let daemon = FakeDaemon::start();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c-1.log");
        std::fs::write(&log, "one\n").unwrap();
        let mut container = running("c-1", "web", "default");
        container.log_path = log.display().to_string();
        daemon.state().containers.push(container);

        let printed = berth(&daemon, &["logs", "web"]).await;
        printed.result.unwrap();
        assert_eq!(printed.out, "one\n");

        // While following: on its next state check the container writes "two" and exits.
        let calls_so_far = daemon.state().get_calls;
        daemon.state().finish_on_get = Some((calls_so_far + 3, log.clone(), "two\n".to_owned()));
        let followed = berth(&daemon, &["logs", "-f", "web"]).await;
        followed.result.unwrap();
        assert_eq!(followed.out, "one\ntwo\n");
    }

    #[tokio::test]
    async fn pull_prints_one_line_per_event() {
        let daemon = FakeDaemon::start();
        let text = berth(
            &daemon,
            &[
                "pull",
                "registry.example.com/t/app:1",
                "--pull-secret",
                "secret-1",
            ],
        )
        .await;
        text.result.unwrap();
        assert_eq!(
            text.out,
            "resolved registry.example.com/t/app:1 sha256:m (1 layers, 30 bytes)\nlayer sha256:l 20/20 bytes\ndone sha256:m\n"
        );
        assert_eq!(daemon.state().pulls[0].pull_secret, "secret-1");
        let json = berth(
            &daemon,
            &["--output", "json", "pull", "registry.example.com/t/app:1"],
        )
        .await;
        json.result.unwrap();
        let lines: Vec<serde_json::Value> = json
            .out
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["done"]["digest"], "sha256:m");
    }
}
