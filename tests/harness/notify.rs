//! A stand-in for systemd's notification socket: a unix datagram socket the test binds and
//! hands to berthd as `NOTIFY_SOCKET`, recording every `sd_notify` message with the time it
//! arrived.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;
use tokio::net::UnixDatagram;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::temp_dir;
use super::wait::wait_for;

/// One datagram: `KEY=VALUE` lines, in order.
#[derive(Debug, Clone)]
pub struct Notification {
    pub at: Instant,
    pub fields: Vec<(String, String)>,
}

impl Notification {
    /// The value of `key` in this datagram.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }
}

/// The bound socket and what arrived on it; stops listening on `Drop`.
#[derive(Debug)]
pub struct NotifySocket {
    path: PathBuf,
    received: Arc<Mutex<Vec<Notification>>>,
    task: JoinHandle<()>,
    _dir: TempDir,
}

impl NotifySocket {
    pub fn bind() -> anyhow::Result<Self> {
        let dir = temp_dir("notify")?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path)
            .with_context(|| format!("binding the datagram socket {}", path.display()))?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        let task = tokio::spawn(async move {
            let mut buffer = vec![0u8; 64 * 1024];
            while let Ok(length) = socket.recv(&mut buffer).await {
                let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
                let fields = text
                    .lines()
                    .filter(|line| !line.is_empty())
                    .map(|line| match line.split_once('=') {
                        Some((key, value)) => (key.to_owned(), value.to_owned()),
                        None => (line.to_owned(), String::new()),
                    })
                    .collect();
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Notification {
                        at: Instant::now(),
                        fields,
                    });
            }
        });
        Ok(Self {
            path,
            received,
            task,
            _dir: dir,
        })
    }

    /// What `NOTIFY_SOCKET` is set to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every datagram so far, in arrival order.
    pub fn messages(&self) -> Vec<Notification> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The datagrams so far that carry `key`.
    pub fn with_key(&self, key: &str) -> Vec<Notification> {
        self.messages()
            .into_iter()
            .filter(|message| message.get(key).is_some())
            .collect()
    }

    /// Waits until a datagram carrying `key=value` has arrived; returns it.
    pub async fn wait_for(
        &self,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> anyhow::Result<Notification> {
        wait_for(
            &format!("{key}={value} on NOTIFY_SOCKET"),
            timeout,
            || async {
                Ok(self
                    .messages()
                    .into_iter()
                    .find(|message| message.get(key) == Some(value)))
            },
        )
        .await
        .with_context(|| format!("received so far: {:?}", self.summary()))
    }

    /// Waits until a datagram whose `key` starts with `prefix` has arrived; returns it.
    pub async fn wait_for_prefix(
        &self,
        key: &str,
        prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<Notification> {
        wait_for(
            &format!("{key}={prefix}… on NOTIFY_SOCKET"),
            timeout,
            || async {
                Ok(self.messages().into_iter().find(|message| {
                    message
                        .get(key)
                        .is_some_and(|value| value.starts_with(prefix))
                }))
            },
        )
        .await
        .with_context(|| format!("received so far: {:?}", self.summary()))
    }

    /// `KEY=VALUE|KEY=VALUE` per datagram, for assertion messages.
    pub fn summary(&self) -> Vec<String> {
        self.messages()
            .iter()
            .map(|message| {
                message
                    .fields
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}
