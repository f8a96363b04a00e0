//! tonic clients over berthd's unix socket.

use std::path::Path;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A channel to the gRPC server on the unix socket `path` (connected now).
pub async fn connect_unix(path: &Path) -> anyhow::Result<Channel> {
    let path = path.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    });
    // The URI is required by tonic and ignored by the connector.
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(connector)
        .await
        .context("connecting to the unix socket")
}

/// `grpc.health.v1.Health/Check` for the whole server (service "").
pub async fn health(channel: Channel) -> anyhow::Result<ServingStatus> {
    service_health(channel, "").await
}

/// `grpc.health.v1.Health/Check` for one service ("" is the server as a whole).
pub async fn service_health(channel: Channel, service: &str) -> anyhow::Result<ServingStatus> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .context("calling grpc.health.v1.Health/Check")?;
    Ok(response.into_inner().status())
}
