//! A layer's bytes on their way to berth's applier, which runs on a blocking thread, through
//! a bounded channel.

use std::io::{self, Read};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use berth_unpack::apply::{apply_layer, Applied, LayerSpec, Limits, Target};
use berth_unpack::error::ApplyError;

/// Chunks (of the HTTP body, typically 16 KiB to 1 MiB) queued for the applier before the
/// download waits for it. Every layer in download has an applier, so this bounds memory:
/// with `max_concurrent_downloads = 4`, 16 chunks took a 1 GiB pull's peak RSS from 53 to
/// 69 MiB, and 4 are as fast.
const QUEUED_CHUNKS: usize = 4;

/// The blocking side: the channel's chunks as a `Read`.
#[derive(Debug)]
pub(super) struct ChannelReader {
    receiver: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    fn new(receiver: mpsc::Receiver<Bytes>) -> Self {
        Self {
            receiver,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => self.current = chunk,
                // The sender is gone: the download ended (whole or not; the applier's size and
                // digest checks tell).
                None => return Ok(0),
            }
        }
        let take = out.len().min(self.current.len());
        out[..take].copy_from_slice(&self.current.split_to(take));
        Ok(take)
    }
}

/// The applier running on a blocking thread, and the channel that feeds it.
#[derive(Debug)]
pub(super) struct Applier {
    sender: mpsc::Sender<Bytes>,
    task: JoinHandle<Result<Applied, ApplyError>>,
}

/// The applier stopped reading before the download ended.
#[derive(Debug)]
pub(super) struct Stopped;

impl Applier {
    /// Starts applying `layer` into `target`, from what is sent.
    pub(super) fn start(layer: LayerSpec, target: Target) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUED_CHUNKS);
        let task = tokio::task::spawn_blocking(move || {
            apply_layer(
                ChannelReader::new(receiver),
                &layer,
                &target,
                &Limits::default(),
            )
        });
        Self { sender, task }
    }

    /// Hands the applier the next chunk; waits while it is `QUEUED_CHUNKS` behind.
    pub(super) async fn send(&self, chunk: Bytes) -> Result<(), Stopped> {
        self.sender.send(chunk).await.map_err(|_| Stopped)
    }

    /// Ends the stream and waits for the applier's verdict.
    pub(super) async fn finish(self) -> Result<Applied, ApplyError> {
        let Self { sender, task } = self;
        drop(sender);
        match task.await {
            Ok(result) => result,
            Err(join) => Err(ApplyError::Read {
                source: io::Error::other(join),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_sees_the_chunks_in_order_then_the_end() {
        let (sender, receiver) = mpsc::channel(2);
        let reader = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            ChannelReader::new(receiver)
                .read_to_end(&mut all)
                .map(|_| all)
        });
        for chunk in [&b"ab"[..], b"", b"cde", b"f"] {
            sender.send(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        drop(sender);
        assert_eq!(reader.await.unwrap().unwrap(), b"abcdef");
    }
}
