//! The content store: blobs are streamed in under a lease, verified by containerd again at commit.

use std::collections::{HashMap, VecDeque};

use containerd_client::services::v1::{
    AbortRequest, Info, InfoRequest, ReadContentRequest, StatusRequest, UpdateRequest, WriteAction,
    WriteContentRequest, WriteContentResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::{Containerd, ContainerdError, Lease};

/// What opening a blob for writing found.
#[derive(Debug)]
pub enum OpenedBlob {
    /// The namespace has the blob already; nothing to fetch.
    Present,
    /// An ingest is open; it may already hold `offset()` bytes from an earlier attempt.
    Writer(Box<BlobWriter>),
}

/// One open ingest. containerd answers every request with the ingest's offset; up to `WINDOW`
/// writes are in flight before berth waits for the oldest answer, so containerd hashes and
/// writes one message while the next ones are on their way.
#[derive(Debug)]
pub struct BlobWriter {
    containerd: Containerd,
    reference: String,
    expected: String,
    total: i64,
    /// The offset containerd confirmed last.
    offset: i64,
    /// The offset after every write sent so far.
    sent: i64,
    /// The offsets containerd must confirm, oldest first, one per write in flight.
    in_flight: VecDeque<i64>,
    requests: mpsc::Sender<WriteContentRequest>,
    replies: Streaming<WriteContentResponse>,
}

impl Containerd {
    /// Opens (or re-opens) the ingest `reference` for the blob `digest` of `size` bytes.
    pub async fn open_blob(
        &self,
        lease: &Lease,
        reference: &str,
        digest: &str,
        size: u64,
    ) -> Result<OpenedBlob, ContainerdError> {
        let total = i64::try_from(size).map_err(|_| ContainerdError::Protocol {
            op: "content.write",
            reason: "blob size out of range",
        })?;
        let (requests, receiver) = mpsc::channel(WINDOW);
        // The first message must be queued before the call is awaited: containerd sends no
        // headers until it has read it.
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.to_owned(),
            total,
            expected: digest.to_owned(),
            ..Default::default()
        };
        requests
            .send(stat)
            .await
            .map_err(|_| closed("content.write"))?;
        let call = self
            .content()
            .write(self.request(ReceiverStream::new(receiver), Some(lease)))
            .await;
        let mut replies = match call {
            Ok(reply) => reply.into_inner(),
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                return Ok(OpenedBlob::Present)
            }
            Err(status) => return Err(ContainerdError::rpc("content.write")(status)),
        };
        let reply = match replies.message().await {
            Ok(Some(reply)) => reply,
            Ok(None) => return Err(closed("content.write")),
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                return Ok(OpenedBlob::Present)
            }
            Err(status) => return Err(ContainerdError::rpc("content.write")(status)),
        };
        Ok(OpenedBlob::Writer(Box::new(BlobWriter {
            containerd: self.clone(),
            reference: reference.to_owned(),
            expected: digest.to_owned(),
            total,
            offset: reply.offset,
            sent: reply.offset,
            in_flight: VecDeque::with_capacity(WINDOW),
            requests,
            replies,
        })))
    }

    /// Writes a small blob held in memory (manifest, index, config) and commits it.
    pub async fn write_small_blob(
        &self,
        lease: &Lease,
        reference: &str,
        digest: &str,
        data: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        match self
            .open_blob(lease, reference, digest, data.len() as u64)
            .await?
        {
            OpenedBlob::Present => self.update_content_labels(digest, labels).await,
            OpenedBlob::Writer(mut writer) => {
                writer.restart().await?;
                for chunk in data.chunks(super::content::CHUNK) {
                    writer.write(chunk.to_vec()).await?;
                }
                writer.commit(labels).await
            }
        }
    }

    /// Whether the namespace has the blob `digest` (committed; an open ingest does not count).
    pub async fn has_blob(&self, digest: &str) -> Result<bool, ContainerdError> {
        let result = self
            .content()
            .info(self.request(
                InfoRequest {
                    digest: digest.to_owned(),
                },
                None,
            ))
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(false),
            Err(status) => Err(ContainerdError::rpc("content.info")(status)),
        }
    }

    /// The bytes a partial ingest `reference` holds; 0 when there is none.
    pub async fn ingest_offset(&self, reference: &str) -> Result<u64, ContainerdError> {
        let result = self
            .content()
            .status(self.request(
                StatusRequest {
                    r#ref: reference.to_owned(),
                },
                None,
            ))
            .await;
        match result {
            Ok(reply) => Ok(reply
                .into_inner()
                .status
                .and_then(|status| u64::try_from(status.offset).ok())
                .unwrap_or(0)),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(0),
            Err(status) => Err(ContainerdError::rpc("content.status")(status)),
        }
    }

    /// Reads a whole blob of at most `limit` bytes; a longer one is refused once `limit` bytes
    /// have streamed in (one call, no separate Info round trip).
    pub async fn read_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>, ContainerdError> {
        let mut stream = self
            .content()
            .read(self.request(
                ReadContentRequest {
                    digest: digest.to_owned(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("content.read"))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(ContainerdError::rpc("content.read"))?
        {
            if (data.len() + chunk.data.len()) as u64 > limit {
                return Err(ContainerdError::Protocol {
                    op: "content.read",
                    reason: "blob larger than allowed",
                });
            }
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// Sets (only) the given labels on a blob.
    pub async fn update_content_labels(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|key| format!("labels.{key}")).collect();
        self.content()
            .update(self.request(
                UpdateRequest {
                    info: Some(Info {
                        digest: digest.to_owned(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("content.update"))?;
        Ok(())
    }

    /// Removes a partial ingest.
    pub async fn abort_ingest(&self, reference: &str) -> Result<(), ContainerdError> {
        let result = self
            .content()
            .abort(self.request(
                AbortRequest {
                    r#ref: reference.to_owned(),
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("content.abort"));
        super::ignore_not_found(result)
    }
}

/// Largest WRITE message; well under containerd's 16 MiB receive limit.
pub const CHUNK: usize = 1 << 20;
/// WRITE messages in flight per ingest before berth waits for containerd's answer.
const WINDOW: usize = 2;

impl BlobWriter {
    /// Bytes the ingest already holds.
    pub fn offset(&self) -> u64 {
        u64::try_from(self.offset).unwrap_or(0)
    }

    /// The next write starts the ingest over from byte 0. Waits for the writes in flight.
    pub async fn restart(&mut self) -> Result<(), ContainerdError> {
        self.flush().await?;
        self.offset = 0;
        self.sent = 0;
        Ok(())
    }

    /// Appends `data` after the bytes written so far. containerd's answer may come later: an
    /// error surfaces at a later write, `flush` or `commit`.
    pub async fn write(&mut self, data: Vec<u8>) -> Result<(), ContainerdError> {
        let len = i64::try_from(data.len()).map_err(|_| closed("content.write"))?;
        if self.in_flight.len() >= WINDOW {
            self.confirm_oldest().await?;
        }
        let request = WriteContentRequest {
            action: WriteAction::Write as i32,
            offset: self.sent,
            data,
            ..Default::default()
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| closed("content.write"))?;
        self.sent += len;
        self.in_flight.push_back(self.sent);
        Ok(())
    }

    /// Waits until containerd has confirmed every write sent.
    pub async fn flush(&mut self) -> Result<(), ContainerdError> {
        while !self.in_flight.is_empty() {
            self.confirm_oldest().await?;
        }
        Ok(())
    }

    async fn confirm_oldest(&mut self) -> Result<(), ContainerdError> {
        let reply = self
            .replies
            .message()
            .await
            .map_err(ContainerdError::rpc("content.write"))?
            .ok_or_else(|| closed("content.write"))?;
        let expected = self.in_flight.pop_front().unwrap_or(self.offset);
        if reply.offset != expected {
            return Err(ContainerdError::Protocol {
                op: "content.write",
                reason: "ingest offset did not advance by the bytes written",
            });
        }
        self.offset = reply.offset;
        Ok(())
    }

    /// Commits the ingest; containerd checks size and digest once more.
    pub async fn commit(mut self, labels: HashMap<String, String>) -> Result<(), ContainerdError> {
        self.flush().await?;
        let request = WriteContentRequest {
            action: WriteAction::Commit as i32,
            total: self.total,
            expected: self.expected.clone(),
            offset: self.offset,
            labels: labels.clone(),
            ..Default::default()
        };
        match self.exchange(request).await {
            Ok(_) => Ok(()),
            Err(err) if err.is_already_exists() => {
                self.containerd
                    .update_content_labels(&self.expected, labels)
                    .await
            }
            Err(err) => Err(err),
        }
    }

    /// Closes the stream and removes the ingest.
    pub async fn abort(self) -> Result<(), ContainerdError> {
        let BlobWriter {
            containerd,
            reference,
            requests,
            replies,
            ..
        } = self;
        drop(requests);
        drop(replies);
        containerd.abort_ingest(&reference).await
    }

    async fn exchange(
        &mut self,
        request: WriteContentRequest,
    ) -> Result<WriteContentResponse, ContainerdError> {
        self.requests
            .send(request)
            .await
            .map_err(|_| closed("content.write"))?;
        self.replies
            .message()
            .await
            .map_err(ContainerdError::rpc("content.write"))?
            .ok_or_else(|| closed("content.write"))
    }
}

fn closed(op: &'static str) -> ContainerdError {
    ContainerdError::Protocol {
        op,
        reason: "the stream ended early",
    }
}
