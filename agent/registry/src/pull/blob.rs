//! One blob from the registry into containerd's content store: verified while it streams,
//! resumed with a Range request after a cut, retried with backoff, committed only when whole.

use std::collections::HashMap;

use std::future::Future;

use bytes::Bytes;
use futures::StreamExt as _;
use tracing::{debug, instrument, warn};

use super::manifest::Descriptor;
use super::registry::Session;
use super::stagger::HeadStart;
use super::stall::StallClock;
use super::verify::Verifier;
use super::{layer_progress, send, PullError, PullProgress, Puller};
use berth_core::metrics::RegistryLabels;
use berth_core::order::ImageRef;
use berth_runtime::containerd::{BlobWriter, ContainerdError, Lease, OpenedBlob};

/// Size of containerd WRITE messages. With two in flight per blob (see `BlobWriter`), a download
/// holds about four of these; 512 KiB pulls as fast as 1 MiB (bench: 4 x 64 MiB in 1.40 s either
/// way) and keeps berthd under 45 MiB while pulling 1 GiB with four downloads.
const CHUNK: usize = 512 << 10;
/// Progress is reported at most every this many bytes per blob.
const PROGRESS_STEP: u64 = 4 << 20;

/// Where a blob's download reports how far it got: PullImage's progress events, and the head
/// start that lets the next layer's download begin.
pub(super) struct Reporter<'a> {
    events: &'a Option<tokio::sync::mpsc::Sender<PullProgress>>,
    head_start: HeadStart,
    last_event: u64,
}

impl<'a> Reporter<'a> {
    pub(super) fn new(
        events: &'a Option<tokio::sync::mpsc::Sender<PullProgress>>,
        head_start: HeadStart,
    ) -> Self {
        Self {
            events,
            head_start,
            last_event: 0,
        }
    }

    pub(super) async fn finished(&self, desc: &Descriptor, cached: bool) {
        send(self.events, layer_progress(desc, desc.size, cached)).await;
    }

    async fn seen(&mut self, desc: &Descriptor, seen: u64) {
        self.head_start.reached(seen);
        if seen.saturating_sub(self.last_event) >= PROGRESS_STEP {
            self.last_event = seen;
            send(self.events, layer_progress(desc, seen, false)).await;
        }
    }
}

/// How one streaming attempt ended badly.
pub(super) enum Failure {
    /// Worth another attempt (connection cut, timeout, 5xx, 429): resume where it stopped.
    Retry(PullError),
    /// Final: verification failed, or containerd refused.
    Fatal(PullError),
    /// The sink stopped taking bytes; its owner knows why (see `direct`).
    Stopped,
}

impl Puller {
    #[instrument(skip_all, fields(digest = %desc.digest, size = desc.size))]
    pub(super) async fn fetch_blob(
        &self,
        image: &ImageRef,
        session: &Session,
        lease: &Lease,
        desc: &Descriptor,
        source_label: &(String, String),
        report: &mut Reporter<'_>,
    ) -> Result<(), PullError> {
        let containerd_err = |source| PullError::Containerd {
            image: image.to_string(),
            source,
        };
        let labels = HashMap::from([source_label.clone()]);
        let reference = format!("berth-blob-{}", desc.digest);
        // containerd allows one writer per ingest ref: a second pull needing this blob (another
        // tag of the same image) waits here, then finds it present.
        let _blob_guard = self.blob_locks.lock(desc.digest.clone()).await;
        debug!("fetching blob");
        // One stall clock for the whole download, across its requests (see `stall`).
        let mut stall = StallClock::new(self.settings.stall_timeout);
        // The first pass may resume a partial ingest; if what it resumed turns out not to hash
        // to the digest (bytes from an interrupted attempt were bad), the second pass fetches
        // the whole blob again, verified from byte 0.
        for pass in 0..2 {
            let mut writer = match self
                .containerd
                .open_blob(lease, &reference, &desc.digest, desc.size)
                .await
                .map_err(containerd_err)?
            {
                OpenedBlob::Present => {
                    debug!("blob already in containerd");
                    self.containerd
                        .update_content_labels(&desc.digest, labels)
                        .await
                        .map_err(containerd_err)?;
                    report.finished(desc, true).await;
                    return Ok(());
                }
                OpenedBlob::Writer(writer) => writer,
            };
            let resumed = pass == 0 && writer.offset() > 0;
            if !resumed {
                writer.restart().await.map_err(containerd_err)?;
            }
            // Bytes already in the ingest are not fetched again; containerd re-hashes the whole
            // blob against its digest at commit.
            let mut verifier = Verifier::resume(&desc.digest, desc.size, writer.offset());
            if resumed {
                debug!(offset = writer.offset(), "resuming a partial ingest");
            }
            let mut sink = ContentSink::new(image, &mut writer);
            match self
                .stream_with_retries(
                    image,
                    session,
                    desc,
                    &mut sink,
                    &mut verifier,
                    report,
                    &mut stall,
                )
                .await
            {
                Ok(()) => {}
                // Out of attempts: the partial ingest stays (under the pull's lease) for the next order.
                Err(Failure::Retry(err)) => return Err(err),
                Err(Failure::Fatal(err)) => {
                    writer.abort().await.ok();
                    return Err(err);
                }
                // A content sink never stops on its own.
                Err(Failure::Stopped) => {
                    writer.abort().await.ok();
                    return Err(containerd_err(ContainerdError::Protocol {
                        op: "content.write",
                        reason: "the download was stopped",
                    }));
                }
            }
            if let Err(source) = verifier.finish() {
                writer.abort().await.ok();
                return Err(PullError::Mismatch {
                    image: image.to_string(),
                    source,
                });
            }
            match writer.commit(labels.clone()).await {
                Ok(()) => {
                    debug!("blob committed");
                    report.finished(desc, false).await;
                    return Ok(());
                }
                Err(err) if err.code() == Some(tonic::Code::FailedPrecondition) => {
                    // containerd's own size/digest check at commit failed.
                    self.containerd.abort_ingest(&reference).await.ok();
                    if resumed {
                        warn!("a resumed partial blob failed verification; fetching it whole");
                        continue;
                    }
                    return Err(PullError::Mismatch {
                        image: image.to_string(),
                        source: super::verify::Mismatch::Digest {
                            digest: desc.digest.clone(),
                            actual: "another digest (checked by containerd at commit)".to_owned(),
                        },
                    });
                }
                Err(err) => return Err(containerd_err(err)),
            }
        }
        Err(PullError::Mismatch {
            image: image.to_string(),
            source: super::verify::Mismatch::Digest {
                digest: desc.digest.clone(),
                actual: "another digest (checked by containerd at commit)".to_owned(),
            },
        })
    }

    /// Streams the rest of the blob into `sink`, resuming after retryable failures.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn stream_with_retries(
        &self,
        image: &ImageRef,
        session: &Session,
        desc: &Descriptor,
        sink: &mut impl Sink,
        verifier: &mut Verifier,
        report: &mut Reporter<'_>,
        stall: &mut StallClock,
    ) -> Result<(), Failure> {
        let mut attempt = 1;
        while verifier.seen() < desc.size {
            let outcome = self
                .stream_once(image, session, desc, sink, verifier, report, stall)
                .await;
            match outcome {
                Ok(()) => break,
                Err(Failure::Retry(err)) if attempt < self.settings.retries => {
                    warn!(attempt, offset = verifier.seen(), error = %err, "blob fetch interrupted; resuming");
                    tokio::time::sleep(berth_core::retry::delay(attempt, err.retry_after())).await;
                    attempt += 1;
                }
                Err(failure) => return Err(failure),
            }
        }
        Ok(())
    }

    /// One GET of the blob from the verifier's offset, streamed into `sink`. Only the waits on
    /// the registry run on the stall clock.
    #[allow(clippy::too_many_arguments)]
    async fn stream_once(
        &self,
        image: &ImageRef,
        session: &Session,
        desc: &Descriptor,
        sink: &mut impl Sink,
        verifier: &mut Verifier,
        report: &mut Reporter<'_>,
        stall: &mut StallClock,
    ) -> Result<(), Failure> {
        let offset = verifier.seen();
        let (mut stream, from_offset) = stall
            .wait(session.blob(desc, offset))
            .await
            .map_err(|_| self.stalled(image, stall, offset))?
            .map_err(classify)?;
        // The registry ignored the Range and sends the blob from byte 0: what the sink has is
        // skipped, so it still receives one continuous stream (the digest, checked over all of
        // it, tells whether the two responses agree).
        let mut skip = if !from_offset && offset > 0 {
            debug!(
                offset,
                "registry ignored the range request; skipping what arrived before"
            );
            offset
        } else {
            0
        };
        let bytes_counter = self
            .metrics
            .pull_bytes
            .get_or_create_owned(&RegistryLabels {
                registry: image.registry().to_owned(),
            });
        let result = loop {
            let Ok(next) = stall.wait(stream.next()).await else {
                break Err(self.stalled(image, stall, verifier.seen()));
            };
            match next {
                Some(Ok(mut chunk)) => {
                    if !chunk.is_empty() {
                        stall.progressed();
                    }
                    // `max_bytes_per_second`: the wait is berth's own, off the stall clock.
                    self.bandwidth.take(chunk.len()).await;
                    bytes_counter.inc_by(chunk.len() as u64);
                    if skip > 0 {
                        let skipped = chunk.len().min(usize::try_from(skip).unwrap_or(usize::MAX));
                        skip -= skipped as u64;
                        let _ = chunk.split_to(skipped);
                        if chunk.is_empty() {
                            continue;
                        }
                    }
                    if let Err(source) = verifier.update(&chunk) {
                        return Err(Failure::Fatal(PullError::Mismatch {
                            image: image.to_string(),
                            source,
                        }));
                    }
                    sink.write(chunk).await?;
                    report.seen(desc, verifier.seen()).await;
                }
                None => break Ok(()),
                // oci-client checks the digest at the end of a full response too; when every
                // byte arrived our own check gives the precise answer.
                Some(Err(_)) if verifier.seen() == desc.size => break Ok(()),
                Some(Err(err)) => {
                    break Err(Failure::Retry(PullError::Unreachable {
                        registry: image.registry().to_owned(),
                        source: Box::new(err),
                    }))
                }
            }
        };
        // What arrived is kept, so a retry resumes exactly where the sink ends.
        sink.flush().await?;
        match result {
            Ok(()) if verifier.seen() < desc.size => Err(Failure::Retry(PullError::Unreachable {
                registry: image.registry().to_owned(),
                source: "the blob response ended early".into(),
            })),
            other => other,
        }
    }
}

/// Where a blob's verified bytes go, in order: containerd's content store, berth's layer
/// applier, or both.
pub(super) trait Sink: Send {
    /// Takes the next chunk.
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), Failure>> + Send;
    /// Makes everything written so far durable where it goes (an attempt ends).
    fn flush(&mut self) -> impl Future<Output = Result<(), Failure>> + Send;
}

/// The content store as a sink: chunks are gathered into WRITE messages of exactly `CHUNK`.
pub(super) struct ContentSink<'w> {
    image: &'w ImageRef,
    writer: &'w mut BlobWriter,
    buffer: Vec<u8>,
}

impl<'w> ContentSink<'w> {
    pub(super) fn new(image: &'w ImageRef, writer: &'w mut BlobWriter) -> Self {
        Self {
            image,
            writer,
            buffer: Vec::with_capacity(CHUNK),
        }
    }

    fn failure(&self, source: ContainerdError) -> Failure {
        Failure::Fatal(PullError::Containerd {
            image: self.image.to_string(),
            source,
        })
    }
}

impl Sink for ContentSink<'_> {
    async fn write(&mut self, chunk: Bytes) -> Result<(), Failure> {
        // Fill the buffer to exactly CHUNK, so it never grows past its capacity.
        let mut rest: &[u8] = &chunk;
        while !rest.is_empty() {
            let take = (CHUNK - self.buffer.len()).min(rest.len());
            self.buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buffer.len() == CHUNK {
                let full = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
                if let Err(err) = self.writer.write(full).await {
                    return Err(self.failure(err));
                }
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Failure> {
        if !self.buffer.is_empty() {
            let rest = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
            if let Err(err) = self.writer.write(rest).await {
                return Err(self.failure(err));
            }
        }
        match self.writer.flush().await {
            Ok(()) => Ok(()),
            Err(err) => Err(self.failure(err)),
        }
    }
}

impl Puller {
    /// The download received nothing for the stall timeout: counted, logged, and cut, so that
    /// the next attempt resumes it from `offset`.
    fn stalled(&self, image: &ImageRef, stall: &StallClock, offset: u64) -> Failure {
        let stalled_for = stall.limit().unwrap_or_default();
        self.metrics
            .download_stalls
            .get_or_create(&RegistryLabels {
                registry: image.registry().to_owned(),
            })
            .inc();
        warn!(
            registry = %image.registry(),
            offset,
            stall_timeout_seconds = stalled_for.as_secs(),
            "blob download stalled; cutting it to resume"
        );
        Failure::Retry(PullError::Stalled {
            registry: image.registry().to_owned(),
            stalled_for,
        })
    }
}

fn classify(err: PullError) -> Failure {
    if err.is_retryable() {
        Failure::Retry(err)
    } else {
        Failure::Fatal(err)
    }
}
