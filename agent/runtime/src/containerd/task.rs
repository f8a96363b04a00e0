//! Tasks: the running process of a container, its exit status, and stopping it.

use std::path::Path;

use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::services::v1::{
    CreateTaskRequest, DeleteTaskRequest, GetRequest, KillRequest, StartRequest, WaitRequest,
};
use containerd_client::types::v1::Status;

use super::{Containerd, ContainerdError};

/// A task's state as containerd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStatus {
    pub running: bool,
    pub stopped: bool,
    pub exit_status: u32,
    pub exited_at: Option<prost_types::Timestamp>,
}

impl Containerd {
    /// Creates and starts the container's task with stdout and stderr appended to `log_path`.
    /// If start fails, the task is deleted again.
    pub async fn start_task(&self, id: &str, log_path: &Path) -> Result<u32, ContainerdError> {
        let rootfs = self
            .snapshots()
            .mounts(self.request(
                MountsRequest {
                    snapshotter: self.snapshotter().to_owned(),
                    key: id.to_owned(),
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("snapshots.mounts"))?
            .into_inner()
            .mounts;
        let log_uri = format!("file://{}", log_path.display());
        self.tasks()
            .create(self.request(
                CreateTaskRequest {
                    container_id: id.to_owned(),
                    rootfs,
                    stdout: log_uri.clone(),
                    stderr: log_uri,
                    ..Default::default()
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("tasks.create"))?;
        let started = self
            .tasks()
            .start(self.request(
                StartRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("tasks.start"));
        match started {
            Ok(reply) => Ok(reply.into_inner().pid),
            Err(err) => {
                self.delete_task(id).await.ok();
                Err(err)
            }
        }
    }

    /// The container's task, or None when it has none.
    pub async fn task_status(&self, id: &str) -> Result<Option<TaskStatus>, ContainerdError> {
        let result = self
            .tasks()
            .get(self.request(
                GetRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await;
        let process = match result {
            Ok(reply) => reply.into_inner().process,
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(ContainerdError::rpc("tasks.get")(status)),
        };
        Ok(process.map(|process| {
            let status = Status::try_from(process.status).unwrap_or(Status::Unknown);
            TaskStatus {
                running: matches!(status, Status::Running | Status::Paused | Status::Pausing),
                stopped: status == Status::Stopped,
                exit_status: process.exit_status,
                exited_at: process.exited_at,
            }
        }))
    }

    pub async fn kill_task(&self, id: &str, signal: u32, all: bool) -> Result<(), ContainerdError> {
        let result = self
            .tasks()
            .kill(self.request(
                KillRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                    signal,
                    all,
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("tasks.kill"));
        super::ignore_not_found(result)
    }

    /// Waits for the task to exit and returns its exit status.
    pub async fn wait_task(&self, id: &str) -> Result<u32, ContainerdError> {
        let reply = self
            .tasks()
            .wait(self.request(
                WaitRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("tasks.wait"))?;
        Ok(reply.into_inner().exit_status)
    }

    pub async fn delete_task(&self, id: &str) -> Result<(), ContainerdError> {
        let result = self
            .tasks()
            .delete(self.request(
                DeleteTaskRequest {
                    container_id: id.to_owned(),
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("tasks.delete"));
        super::ignore_not_found(result)
    }
}
