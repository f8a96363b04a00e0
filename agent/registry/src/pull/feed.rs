//! A layer's bytes on their way to berth's applier, which runs on a blocking thread: first
//! into a spool file while the layer's parent snapshot is not committed yet, then through a
//! bounded channel. The applier reads the spooled bytes first and then the channel, so it
//! sees the blob as one stream however it arrived.

use std::io::{self, Read, Seek as _, SeekFrom};
use std::path::Path;

use bytes::Bytes;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use berth_unpack::apply::{apply_layer, Applied, LayerSpec, Limits, Target};
use berth_unpack::error::ApplyError;

/// Chunks (of the HTTP body, typically 16 KiB to 1 MiB) queued for the applier before the
/// download waits for it.
const QUEUED_CHUNKS: usize = 16;

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

/// A spool file: created, then unlinked at once, so nothing is left behind whatever happens.
#[derive(Debug)]
pub(super) struct Spool {
    file: tokio::fs::File,
    written: u64,
}

impl Spool {
    /// An anonymous file in `dir` (created 0700 if missing).
    pub(super) async fn create(dir: &Path) -> io::Result<Self> {
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .await?;
        let nonce: u64 = rand_nonce();
        let path = dir.join(format!("layer-{nonce:016x}"));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await?;
        tokio::fs::remove_file(&path).await?;
        Ok(Self { file, written: 0 })
    }

    pub(super) async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.file.write_all(chunk).await?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    pub(super) fn written(&self) -> u64 {
        self.written
    }

    /// The spooled bytes, for the blocking reader (rewound there).
    async fn into_std(mut self) -> io::Result<(std::fs::File, u64)> {
        self.file.flush().await?;
        Ok((self.file.into_std().await, self.written))
    }
}

fn rand_nonce() -> u64 {
    use rand::Rng as _;
    rand::rng().random()
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
    /// Starts applying `layer` into `target`: the spooled bytes first, if any, then whatever
    /// is sent.
    pub(super) async fn start(
        spool: Option<Spool>,
        layer: LayerSpec,
        target: Target,
    ) -> io::Result<Self> {
        let spooled = match spool {
            Some(spool) => Some(spool.into_std().await?),
            None => None,
        };
        let (sender, receiver) = mpsc::channel(QUEUED_CHUNKS);
        let task = tokio::task::spawn_blocking(move || {
            let live = ChannelReader::new(receiver);
            match spooled {
                Some((mut file, written)) => {
                    file.seek(SeekFrom::Start(0))
                        .map_err(|source| ApplyError::Read { source })?;
                    let input = file.take(written).chain(live);
                    apply_layer(input, &layer, &target, &Limits::default())
                }
                None => apply_layer(live, &layer, &target, &Limits::default()),
            }
        });
        Ok(Self { sender, task })
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spool_leaves_no_file_and_reads_back_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(&dir.path().join("spool")).await.unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("spool")).unwrap().count(),
            0,
            "unlinked at once"
        );
        spool.write(b"hello ").await.unwrap();
        spool.write(b"world").await.unwrap();
        assert_eq!(spool.written(), 11);
        let (mut file, written) = spool.into_std().await.unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        let mut back = String::new();
        file.take(written).read_to_string(&mut back).unwrap();
        assert_eq!(back, "hello world");
    }
}
