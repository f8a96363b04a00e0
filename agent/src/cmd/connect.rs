//! Dials berthd: over its unix socket (`unix:///path` or a bare `/path`) or plain `http://host:port`.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use super::CmdError;

/// How long dialling the daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the daemon listens, parsed from `--address`/`--socket`.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Unix(PathBuf),
    Http(String),
}

fn parse_address(address: &str) -> Result<Target, CmdError> {
    let invalid = || CmdError::InvalidAddress {
        address: address.to_owned(),
    };
    let path = if let Some(rest) = address.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = address.strip_prefix("unix:") {
        rest
    } else if address.starts_with('/') || address.starts_with("./") {
        address
    } else if address.starts_with("http://") {
        return Ok(Target::Http(address.to_owned()));
    } else {
        return Err(invalid());
    };
    if path.is_empty() {
        return Err(invalid());
    }
    Ok(Target::Unix(PathBuf::from(path)))
}

/// Opens a channel to berthd at `address`: `unix:///path`, a bare `/path`, or `http://host:port`.
/// Fails when the daemon cannot be reached within 10 s.
pub async fn connect(address: &str) -> Result<Channel, CmdError> {
    let connect_error = |source| CmdError::Connect {
        address: address.to_owned(),
        source,
    };
    match parse_address(address)? {
        Target::Http(url) => {
            let endpoint = Endpoint::from_shared(url)
                .map_err(connect_error)?
                .connect_timeout(CONNECT_TIMEOUT);
            endpoint.connect().await.map_err(connect_error)
        }
        Target::Unix(path) => {
            // The URI is a placeholder: every connection goes to the socket.
            let endpoint =
                Endpoint::from_static("http://[::]:50051").connect_timeout(CONNECT_TIMEOUT);
            endpoint
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(connect_error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("unix:///run/berth/berthd.sock").unwrap(),
            Target::Unix(PathBuf::from("/run/berth/berthd.sock"))
        );
        assert_eq!(
            parse_address("/tmp/b.sock").unwrap(),
            Target::Unix(PathBuf::from("/tmp/b.sock"))
        );
        assert_eq!(
            parse_address("unix:/tmp/b.sock").unwrap(),
            Target::Unix(PathBuf::from("/tmp/b.sock"))
        );
        assert_eq!(
            parse_address("http://127.0.0.1:7443").unwrap(),
            Target::Http("http://127.0.0.1:7443".to_owned())
        );
        for bad in ["", "unix://", "tcp://127.0.0.1:1", "berthd.sock", "ftp://x"] {
            let error = parse_address(bad).unwrap_err();
            assert!(matches!(error, CmdError::InvalidAddress { .. }), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_missing_socket_names_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix://{}/absent.sock", dir.path().display());
        let error = connect(&address).await.unwrap_err();
        let line = error.describe();
        assert!(
            line.starts_with(&format!("connecting to berthd at {address}")),
            "{line}"
        );
    }

    #[tokio::test]
    async fn connects_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berthd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let (_reporter, health) = tonic_health::server::health_reporter();
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(incoming)
                .await
        });
        let channel = connect(&path.display().to_string()).await.unwrap();
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let response = client
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        assert_eq!(
            response.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        server.abort();
    }
}
