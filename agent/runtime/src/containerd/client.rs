//! The connection to containerd and the namespace/lease metadata every call carries.

use std::path::{Path, PathBuf};

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::introspection_client::IntrospectionClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::{ContainerdError, ContainerdVersion, Lease};

/// A cheap-to-clone handle on one containerd namespace.
#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    snapshotter: String,
    socket: PathBuf,
}

impl Containerd {
    /// A lazily connecting channel: containerd may restart under us; each call reconnects.
    pub fn new(socket: &Path, namespace: &str, snapshotter: &str) -> Result<Self, ContainerdError> {
        let path = socket.to_owned();
        let endpoint =
            Endpoint::try_from("http://[::]:50051").map_err(|source| ContainerdError::Connect {
                socket: socket.display().to_string(),
                source,
            })?;
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }));
        Ok(Self {
            channel,
            namespace: namespace.to_owned(),
            snapshotter: snapshotter.to_owned(),
            socket: socket.to_owned(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Asks containerd for its version: the liveness check used before READY and by health.
    pub async fn version(&self) -> Result<ContainerdVersion, ContainerdError> {
        let reply = VersionClient::new(self.channel.clone())
            .version(tonic::Request::new(()))
            .await
            .map_err(ContainerdError::rpc("version"))?
            .into_inner();
        ContainerdVersion::parse(&reply.version, &reply.revision).ok_or(ContainerdError::Protocol {
            op: "version",
            reason: "the version has no major.minor number",
        })
    }

    /// A request in this namespace, optionally under a lease.
    pub(super) fn request<T>(&self, message: T, lease: Option<&Lease>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = MetadataValue::try_from(self.namespace.as_str()) {
            request.metadata_mut().insert("containerd-namespace", value);
        }
        if let Some(lease) = lease {
            if let Ok(value) = MetadataValue::try_from(lease.id()) {
                request.metadata_mut().insert("containerd-lease", value);
            }
        }
        request
    }

    pub(super) fn content(&self) -> ContentClient<Channel> {
        // Blobs are written in 1 MiB messages; reads of configs are small.
        ContentClient::new(self.channel.clone()).max_decoding_message_size(32 << 20)
    }

    pub(super) fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }

    pub(super) fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    pub(super) fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }

    pub(super) fn introspection(&self) -> IntrospectionClient<Channel> {
        IntrospectionClient::new(self.channel.clone())
    }

    pub(super) fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }

    pub(super) fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }

    pub(super) fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }
}
