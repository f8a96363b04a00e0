//! Container records: the container's snapshot and its record, created under one lease.

use std::collections::HashMap;
use std::time::Duration;

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, DeleteContainerRequest, GetContainerRequest,
    ListContainersRequest, UpdateContainerRequest,
};

use super::{Containerd, ContainerdError};

/// The runtime every berth container runs under.
const RUNTIME: &str = "io.containerd.runc.v2";
/// The type URL containerd (and ctr) decode a runtime spec by.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// What a new container needs; the spec is already JSON, built by `spec.rs` without credentials.
#[derive(Debug)]
pub struct NewContainer<'a> {
    pub id: &'a str,
    pub image_name: &'a str,
    pub top_chain_id: &'a str,
    pub labels: HashMap<String, String>,
    pub spec_json: Vec<u8>,
}

/// A container record as berth reads it back.
#[derive(Debug, Clone)]
pub struct ContainerRecord {
    pub id: String,
    /// The image record the container was created from.
    pub image: String,
    pub labels: HashMap<String, String>,
    pub created_at: Option<prost_types::Timestamp>,
}

impl From<Container> for ContainerRecord {
    fn from(container: Container) -> Self {
        Self {
            id: container.id,
            image: container.image,
            labels: container.labels,
            created_at: container.created_at,
        }
    }
}

impl Containerd {
    /// Prepares the container's writable snapshot and creates its record. On failure nothing
    /// is left behind.
    pub async fn create_container(&self, new: NewContainer<'_>) -> Result<(), ContainerdError> {
        let lease = self
            .create_lease("create", Duration::from_secs(600))
            .await?;
        let result = self.create_container_leased(&new, &lease).await;
        if result.is_err() {
            // Only remove the snapshot if the record was not created by someone else with this id.
            if !matches!(&result, Err(err) if err.is_already_exists()) {
                self.remove_snapshot(new.id).await.ok();
            }
        }
        self.release(lease).await.ok();
        result
    }

    async fn create_container_leased(
        &self,
        new: &NewContainer<'_>,
        lease: &super::Lease,
    ) -> Result<(), ContainerdError> {
        if self.get_container(new.id).await?.is_some() {
            return Err(ContainerdError::Rpc {
                op: "containers.create",
                source: tonic::Status::already_exists("container exists"),
            });
        }
        let prepare = || async {
            self.snapshots()
                .prepare(self.request(
                    PrepareSnapshotRequest {
                        snapshotter: self.snapshotter().to_owned(),
                        key: new.id.to_owned(),
                        parent: new.top_chain_id.to_owned(),
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await
        };
        match prepare().await {
            Ok(_) => {}
            // A stale snapshot under this key (a crash between prepare and create; no container
            // has it, as checked above) is ours to replace.
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                self.remove_snapshot(new.id).await?;
                prepare()
                    .await
                    .map_err(ContainerdError::rpc("snapshots.prepare"))?;
            }
            Err(status) => return Err(ContainerdError::rpc("snapshots.prepare")(status)),
        }
        let container = Container {
            id: new.id.to_owned(),
            labels: new.labels.clone(),
            image: new.image_name.to_owned(),
            runtime: Some(Runtime {
                name: RUNTIME.to_owned(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.to_owned(),
                value: new.spec_json.clone(),
            }),
            snapshotter: self.snapshotter().to_owned(),
            snapshot_key: new.id.to_owned(),
            ..Default::default()
        };
        self.containers()
            .create(self.request(
                CreateContainerRequest {
                    container: Some(container),
                },
                Some(lease),
            ))
            .await
            .map_err(ContainerdError::rpc("containers.create"))?;
        Ok(())
    }

    pub async fn get_container(
        &self,
        id: &str,
    ) -> Result<Option<ContainerRecord>, ContainerdError> {
        let result = self
            .containers()
            .get(self.request(GetContainerRequest { id: id.to_owned() }, None))
            .await;
        match result {
            Ok(reply) => Ok(reply.into_inner().container.map(ContainerRecord::from)),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(ContainerdError::rpc("containers.get")(status)),
        }
    }

    /// Lists containers matching containerd filter expressions (OR between entries).
    pub async fn list_containers(
        &self,
        filters: Vec<String>,
    ) -> Result<Vec<ContainerRecord>, ContainerdError> {
        let reply = self
            .containers()
            .list(self.request(ListContainersRequest { filters }, None))
            .await
            .map_err(ContainerdError::rpc("containers.list"))?;
        Ok(reply
            .into_inner()
            .containers
            .into_iter()
            .map(ContainerRecord::from)
            .collect())
    }

    /// Sets (only) the given labels on a container record.
    pub async fn update_container_labels(
        &self,
        id: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let paths = labels.keys().map(|key| format!("labels.{key}")).collect();
        self.containers()
            .update(self.request(
                UpdateContainerRequest {
                    container: Some(Container {
                        id: id.to_owned(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("containers.update"))?;
        Ok(())
    }

    /// Removes the container's snapshot, then its record (the order Go's client uses).
    pub async fn delete_container(&self, id: &str) -> Result<(), ContainerdError> {
        self.remove_snapshot(id).await?;
        let result = self
            .containers()
            .delete(self.request(DeleteContainerRequest { id: id.to_owned() }, None))
            .await
            .map_err(ContainerdError::rpc("containers.delete"));
        super::ignore_not_found(result)
    }
}
