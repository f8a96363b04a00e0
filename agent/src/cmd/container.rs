//! `berth ps | get | logs | stop | rm`: containers, addressed by id or by name in the project.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::transport::Channel;

use super::{output, unary, CmdError, Console};
use crate::api::pb;
use crate::api::pb::agent_client::AgentClient;

/// How often `logs -f` looks at the log file and the container's state.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// Margin added to the stop timeout for the StopContainer call itself.
const STOP_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub(super) struct TargetArgs {
    /// Container id, or name in the project.
    #[arg(value_name = "ID|NAME")]
    target: String,
}

#[derive(Debug, Args)]
pub(super) struct LogsArgs {
    /// Container id, or name in the project.
    #[arg(value_name = "ID|NAME")]
    target: String,
    /// Keep printing as the log grows, until the container has exited.
    #[arg(short, long)]
    follow: bool,
}

#[derive(Debug, Args)]
pub(super) struct StopArgs {
    /// Container id, or name in the project.
    #[arg(value_name = "ID|NAME")]
    target: String,
    /// Seconds between SIGTERM and SIGKILL (0: the daemon's default, 10 s).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    timeout: u32,
}

#[derive(Debug, Args)]
pub(super) struct RmArgs {
    /// Container id, or name in the project.
    #[arg(value_name = "ID|NAME")]
    target: String,
    /// Stop the container first if it is running.
    #[arg(short, long)]
    force: bool,
}

pub(super) async fn ps(console: &mut Console<'_>) -> Result<(), CmdError> {
    let mut client = AgentClient::new(console.channel().await?);
    let containers = client
        .list_containers(unary(pb::ListContainersRequest {
            project: console.project(),
        }))
        .await?
        .into_inner()
        .containers;
    if console.json() {
        let values = containers.iter().map(output::container_json).collect();
        output::write_json(console.out, &serde_json::Value::Array(values))
    } else {
        output::write_container_table(console.out, &containers)
    }
}

pub(super) async fn get(args: TargetArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let mut client = AgentClient::new(console.channel().await?);
    let container = resolve(&mut client, &console.project(), &args.target).await?;
    if console.json() {
        output::write_json(console.out, &output::container_json(&container))
    } else {
        output::write_container_detail(console.out, &container)
    }
}

pub(super) async fn stop(args: StopArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let mut client = AgentClient::new(console.channel().await?);
    let container = resolve(&mut client, &console.project(), &args.target).await?;
    let mut request = tonic::Request::new(pb::StopContainerRequest {
        id: container.id,
        timeout_seconds: args.timeout,
    });
    let grace = if args.timeout == 0 { 10 } else { args.timeout };
    request.set_timeout(Duration::from_secs(u64::from(grace)) + STOP_MARGIN);
    let stopped = client.stop_container(request).await?.into_inner();
    if console.json() {
        output::write_json(console.out, &output::container_json(&stopped))
    } else {
        output::write_line(console.out, &stopped.id)
    }
}

pub(super) async fn rm(args: RmArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let mut client = AgentClient::new(console.channel().await?);
    let container = resolve(&mut client, &console.project(), &args.target).await?;
    let mut request = tonic::Request::new(pb::RemoveContainerRequest {
        id: container.id.clone(),
        force: args.force,
    });
    // A forced remove may first wait out the default stop timeout.
    request.set_timeout(Duration::from_secs(10) + STOP_MARGIN);
    client.remove_container(request).await?;
    if console.json() {
        output::write_json(console.out, &serde_json::json!({ "id": container.id }))
    } else {
        output::write_line(console.out, &container.id)
    }
}

/// Finds a container by id first, then, if there is none, by name in `project`.
async fn resolve(
    client: &mut AgentClient<Channel>,
    project: &str,
    target: &str,
) -> Result<pb::Container, CmdError> {
    let by_id = client
        .get_container(unary(pb::GetContainerRequest {
            id: target.to_owned(),
            ..Default::default()
        }))
        .await;
    match by_id {
        Ok(response) => Ok(response.into_inner()),
        // A name can be an invalid id: fall back on both.
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::InvalidArgument
            ) =>
        {
            let by_name = client
                .get_container(unary(pb::GetContainerRequest {
                    id: String::new(),
                    project: project.to_owned(),
                    name: target.to_owned(),
                }))
                .await?;
            Ok(by_name.into_inner())
        }
        Err(status) => Err(status.into()),
    }
}

pub(super) async fn logs(args: LogsArgs, console: &mut Console<'_>) -> Result<(), CmdError> {
    let mut client = AgentClient::new(console.channel().await?);
    let container = resolve(&mut client, &console.project(), &args.target).await?;
    if container.log_path.is_empty() {
        return Err(CmdError::NoLogFile { id: container.id });
    }
    let path = PathBuf::from(&container.log_path);
    let mut log = LogReader::new(path);
    if !args.follow {
        return log.drain(console.out, false).await;
    }
    let mut state = container.state;
    loop {
        // The state is read before draining, so nothing written before the exit is missed.
        let finished = !is_live(state);
        log.drain(console.out, !finished).await?;
        if finished {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
        state = match client
            .get_container(unary(pb::GetContainerRequest {
                id: container.id.clone(),
                ..Default::default()
            }))
            .await
        {
            Ok(response) => response.into_inner().state,
            // Removed while we followed it: print what is left and stop.
            Err(status) if status.code() == tonic::Code::NotFound => {
                pb::ContainerState::Exited as i32
            }
            Err(status) => return Err(status.into()),
        };
    }
}

/// A container that may still write to its log (created and not yet started counts).
fn is_live(state: i32) -> bool {
    state == pb::ContainerState::Running as i32 || state == pb::ContainerState::Created as i32
}

/// Reads a log file from where it last stopped; starts over if the file was truncated.
#[derive(Debug)]
struct LogReader {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    offset: u64,
}

impl LogReader {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            offset: 0,
        }
    }

    /// Copies everything new to `out`. A missing file is an error unless `may_appear`.
    async fn drain(
        &mut self,
        out: &mut dyn std::io::Write,
        may_appear: bool,
    ) -> Result<(), CmdError> {
        let read_error = |path: &Path, source| CmdError::ReadFile {
            path: path.to_owned(),
            source,
        };
        if self.file.is_none() {
            match tokio::fs::File::open(&self.path).await {
                Ok(file) => self.file = Some(file),
                Err(error) if may_appear && error.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(())
                }
                Err(error) => return Err(read_error(&self.path, error)),
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let length = file
            .metadata()
            .await
            .map_err(|error| read_error(&self.path, error))?
            .len();
        if length < self.offset {
            file.seek(SeekFrom::Start(0))
                .await
                .map_err(|error| read_error(&self.path, error))?;
            self.offset = 0;
        }
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            let read = file
                .read(&mut buffer)
                .await
                .map_err(|error| read_error(&self.path, error))?;
            if read == 0 {
                break;
            }
            out.write_all(&buffer[..read]).map_err(CmdError::Output)?;
            self.offset += read as u64;
        }
        out.flush().map_err(CmdError::Output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn log_reader_prints_only_what_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut reader = LogReader::new(path.clone());
        let mut out = Vec::new();
        reader.drain(&mut out, true).await.unwrap();
        assert!(out.is_empty());
        std::fs::write(&path, "one\n").unwrap();
        reader.drain(&mut out, true).await.unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"two\n").unwrap();
        reader.drain(&mut out, true).await.unwrap();
        assert_eq!(out, b"one\ntwo\n");
    }

    #[tokio::test]
    async fn log_reader_starts_over_after_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        std::fs::write(&path, "a long first line\n").unwrap();
        let mut reader = LogReader::new(path.clone());
        let mut out = Vec::new();
        reader.drain(&mut out, false).await.unwrap();
        std::fs::write(&path, "new\n").unwrap();
        reader.drain(&mut out, false).await.unwrap();
        assert_eq!(out, b"a long first line\nnew\n");
    }

    #[tokio::test]
    async fn a_missing_log_names_the_path() {
        let mut reader = LogReader::new(PathBuf::from("/nonexistent/berth/c.log"));
        let error = reader.drain(&mut Vec::new(), false).await.unwrap_err();
        assert!(error.describe().contains("/nonexistent/berth/c.log"));
    }

    #[test]
    fn live_states() {
        assert!(is_live(pb::ContainerState::Running as i32));
        assert!(is_live(pb::ContainerState::Created as i32));
        assert!(!is_live(pb::ContainerState::Exited as i32));
        assert!(!is_live(pb::ContainerState::Unspecified as i32));
    }
}
