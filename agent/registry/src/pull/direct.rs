//! berth's own apply of one layer while it downloads: the download (blob.rs, with its
//! retries, Range resumes, stall clock and bandwidth limit) feeds a `Feeder`, which streams
//! the bytes into `berth_unpack`'s applier, which writes the overlay upperdir and checks size
//! and diff id; the download itself hashes the compressed bytes against the layer digest,
//! beside the applier's thread. Every layer applies as it downloads: into its extraction snapshot when its
//! parent is committed, else into a staging snapshot of its own, whose directory is renamed
//! into the extraction once the parent is committed (the directories the layer only implies
//! then take their metadata from the lowers). A layer that fails leaves no snapshot behind.
//! With `keep_layer_blobs` the same bytes go into the content store.

use bytes::Bytes;
use tracing::debug;

use super::blob::{ContentSink, Failure, Reporter, Sink};
use super::feed::Applier;
use super::layer::{Direct, LayerJob, PullContext};
use super::manifest::Descriptor;
use super::stall::StallClock;
use super::verify::Verifier;
use super::{PullError, Puller};
use berth_core::order::ImageRef;
use berth_runtime::containerd::{
    uncompressed_label, BlobFile, BlobWriter, ContainerdError, Extraction, OpenedBlob, Prepared,
};
use berth_unpack::apply::{inherit_lower_metadata, LayerSpec, Target, Whiteouts};
use berth_unpack::error::ApplyError;

/// Why the feeder stopped the download (the download then ends with `Failure::Stopped`).
enum Stop {
    /// The snapshot cannot be written by berth: containerd applies the layer.
    Fallback(&'static str),
    /// Someone else committed the layer's chain id meanwhile.
    Committed,
    /// The applier stopped reading: it failed (its error is collected at the end).
    Applier,
}

/// Where the bytes go.
enum Feed {
    /// Not started yet.
    Idle,
    /// The applier runs: into the layer's own extraction snapshot, or, when the parent was
    /// not committed at the start, into a staging snapshot that is moved into the extraction
    /// once it is (`staged`).
    Applying {
        applier: Applier,
        snapshot: Extraction,
        staged: bool,
    },
    /// Stopped; nothing more is taken.
    Stopped,
}

/// How an applied layer ends.
enum Finished {
    /// Ready to commit; `staging` is the emptied staging snapshot, to remove.
    Ready {
        extraction: Extraction,
        staging: Option<Extraction>,
    },
    /// Someone else committed the chain id meanwhile.
    Committed,
    /// The extraction cannot be written by berth: containerd applies the layer.
    Fallback(&'static str),
}

/// The applier side of a layer's download.
struct Feeder<'a> {
    puller: &'a Puller,
    cx: &'a PullContext<'a>,
    job: &'a LayerJob<'a>,
    spec: LayerSpec,
    feed: Feed,
    stop: Option<Stop>,
}

/// Where a kept layer blob goes while it downloads.
enum Kept<'w> {
    /// A file berthd writes into containerd's content directory itself (`BlobDir`).
    File(BlobFile),
    /// containerd's ingest, through `Content.Write`.
    Ingest(ContentSink<'w>),
}

/// The sink of a direct apply: the feeder, and the content store when blobs are kept.
struct LayerSink<'a, 'w> {
    kept: Option<Kept<'w>>,
    feeder: Feeder<'a>,
}

/// Docker's zstd layer type, which berth applies itself on every containerd.
const DOCKER_TAR_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

impl Sink for LayerSink<'_, '_> {
    async fn write(&mut self, chunk: Bytes) -> Result<(), Failure> {
        match &mut self.kept {
            Some(Kept::Ingest(content)) => content.write(chunk.clone()).await?,
            Some(Kept::File(file)) => {
                if let Err(source) = file.write(chunk.clone()).await {
                    return Err(self.feeder.fatal_containerd(ContainerdError::ContentFile {
                        op: "write",
                        source,
                    }));
                }
            }
            None => {}
        }
        self.feeder.feed(chunk).await
    }

    async fn flush(&mut self) -> Result<(), Failure> {
        match &mut self.kept {
            Some(Kept::Ingest(content)) => content.flush().await,
            Some(Kept::File(_)) | None => Ok(()),
        }
    }
}

impl<'a> Feeder<'a> {
    fn image(&self) -> &ImageRef {
        self.cx.image
    }

    fn containerd_error(&self, source: ContainerdError) -> PullError {
        PullError::Containerd {
            image: self.image().to_string(),
            source,
        }
    }

    fn fatal_containerd(&self, source: ContainerdError) -> Failure {
        Failure::Fatal(self.containerd_error(source))
    }

    fn stopped(&mut self, stop: Stop) -> Failure {
        self.stop = Some(stop);
        Failure::Stopped
    }

    async fn feed(&mut self, chunk: Bytes) -> Result<(), Failure> {
        match &mut self.feed {
            Feed::Applying { applier, .. } => {
                if applier.send(chunk).await.is_err() {
                    return Err(self.stopped(Stop::Applier));
                }
                Ok(())
            }
            Feed::Idle | Feed::Stopped => Err(Failure::Stopped),
        }
    }

    /// Starts the applier: into the layer's extraction snapshot when its parent is committed,
    /// else into a staging snapshot, so that layers apply side by side as they download.
    async fn start(&mut self) -> Result<(), Failure> {
        let containerd = &self.puller.containerd;
        let staged = !self.cx.ladder.parent_committed(self.job.index);
        let snapshot = if staged {
            containerd
                .prepare_staging(self.cx.lease, self.job.chain_id)
                .await
                .map_err(|err| self.fatal_containerd(err))?
        } else {
            let prepared = containerd
                .prepare_extraction(self.cx.lease, self.job.chain_id, self.job.parent)
                .await;
            match prepared {
                Ok(Prepared::Ready(extraction)) => extraction,
                Ok(Prepared::Committed) => return Err(self.stopped(Stop::Committed)),
                Err(err) => return Err(self.fatal_containerd(err)),
            }
        };
        let dirs = match snapshot.overlay_dirs() {
            Ok(dirs) => dirs,
            Err(reason) => {
                containerd.discard_extraction(snapshot).await.ok();
                self.puller.layers.set_overlay_unusable();
                return Err(self.stopped(Stop::Fallback(reason)));
            }
        };
        debug!(staged, upper = %dirs.upper.display(), "applying the layer as it downloads");
        let whiteouts = if staged {
            Whiteouts::OverlayDeferred
        } else {
            Whiteouts::Overlay {
                lowers: dirs.lowers,
            }
        };
        let target = Target {
            root: dirs.upper,
            whiteouts,
        };
        self.feed = Feed::Applying {
            applier: Applier::start(self.spec.clone(), target),
            snapshot,
            staged,
        };
        Ok(())
    }

    /// Ends the stream and waits for the applier. A staged layer then waits for its parent's
    /// snapshot and moves into its own extraction. On any failure the snapshots are removed.
    async fn finish(mut self) -> Result<Finished, PullError> {
        let image = self.image().to_string();
        let containerd = &self.puller.containerd;
        let layer_err = |source| PullError::Layer {
            image: image.clone(),
            digest: self.job.desc.digest.clone(),
            source,
        };
        let Feed::Applying {
            applier,
            snapshot,
            staged,
        } = std::mem::replace(&mut self.feed, Feed::Stopped)
        else {
            return Err(layer_err(ApplyError::Read {
                source: std::io::Error::other("the layer was never applied"),
            }));
        };
        let applied = match applier.finish().await {
            Ok(applied) => applied,
            Err(source) => {
                containerd.discard_extraction(snapshot).await.ok();
                return Err(layer_err(source));
            }
        };
        debug!(
            entries = applied.entries,
            uncompressed = applied.uncompressed_size,
            staged,
            "layer applied"
        );
        if !staged {
            return Ok(Finished::Ready {
                extraction: snapshot,
                staging: None,
            });
        }
        debug!("waiting for the parent snapshot");
        self.cx.ladder.wait_for_parent(self.job.index).await;
        let adopted = self.adopt(&snapshot, &applied.implied_dirs).await;
        match adopted {
            // The emptied staging snapshot is removed after the commit, off its path.
            Ok(extraction) => Ok(Finished::Ready {
                extraction,
                staging: Some(snapshot),
            }),
            Err(finished) => {
                containerd.discard_extraction(snapshot).await.ok();
                finished
            }
        }
    }

    /// Prepares the layer's extraction on its committed parent and moves the staged layer
    /// into it; or how the layer ends otherwise.
    async fn adopt(
        &self,
        staging: &Extraction,
        implied_dirs: &[std::path::PathBuf],
    ) -> Result<Extraction, Result<Finished, PullError>> {
        let containerd = &self.puller.containerd;
        let extraction = match containerd
            .prepare_extraction(self.cx.lease, self.job.chain_id, self.job.parent)
            .await
        {
            Ok(Prepared::Ready(extraction)) => extraction,
            Ok(Prepared::Committed) => return Err(Ok(Finished::Committed)),
            Err(source) => return Err(Err(self.containerd_error(source))),
        };
        let dirs = match extraction.overlay_dirs() {
            Ok(dirs) => dirs,
            Err(reason) => {
                containerd.discard_extraction(extraction).await.ok();
                self.puller.layers.set_overlay_unusable();
                return Err(Ok(Finished::Fallback(reason)));
            }
        };
        let moved = extraction.take_staged(staging).and_then(|()| {
            inherit_lower_metadata(&dirs.upper, &dirs.lowers, implied_dirs).map_err(|source| {
                ContainerdError::SnapshotDir {
                    op: "giving a staged layer's implied directories their lower's metadata",
                    source,
                }
            })
        });
        if let Err(source) = moved {
            containerd.discard_extraction(extraction).await.ok();
            return Err(Err(self.containerd_error(source)));
        }
        Ok(extraction)
    }

    /// The download failed: stops the applier and removes the snapshot. Returns the
    /// applier's own error, which explains a `Stop::Applier`.
    async fn abandon(self) -> Option<ApplyError> {
        match self.feed {
            Feed::Applying {
                applier, snapshot, ..
            } => {
                let applied = applier.finish().await;
                self.puller
                    .containerd
                    .discard_extraction(snapshot)
                    .await
                    .ok();
                applied.err()
            }
            Feed::Idle | Feed::Stopped => None,
        }
    }
}

impl Puller {
    /// Downloads `job`'s blob and applies it into its snapshot as it arrives.
    pub(super) async fn apply_direct(
        &self,
        cx: &PullContext<'_>,
        job: &LayerJob<'_>,
        spec: LayerSpec,
        report: &mut Reporter<'_>,
    ) -> Result<Direct, PullError> {
        let image = cx.image;
        let desc = job.desc;
        let containerd_err = |source| PullError::Containerd {
            image: image.to_string(),
            source,
        };
        // A layer type containerd's applier may not know (Docker's tar.zstd: containerd 1.6
        // and 1.7 refuse it) is never handed to it: berth downloads and applies it even when
        // the content store has the blob already.
        let berth_only = desc.media_type == DOCKER_TAR_ZSTD;
        // A blob containerd has already (another namespace pulled it, or an older berthd kept
        // it) is applied from there rather than downloaded again.
        if !berth_only
            && self
                .containerd
                .has_blob(&desc.digest)
                .await
                .map_err(containerd_err)?
        {
            return Ok(Direct::Fallback("the layer blob is in the content store"));
        }
        let keep = self.layers.settings.keep_layer_blobs;
        let reference = format!("berth-blob-{}", desc.digest);
        // A partial download an earlier order left (it failed, or berthd stopped) is resumed
        // where it ended rather than fetched whole; berth's applier would need every byte.
        if !berth_only
            && self
                .containerd
                .ingest_offset(&reference)
                .await
                .map_err(containerd_err)?
                > 0
        {
            return Ok(Direct::Fallback(
                "a partial download of the blob is in the content store",
            ));
        }
        // One writer per blob: containerd allows one per ingest ref, and two files of the same
        // blob would be written for nothing.
        let _blob_guard = if keep {
            Some(self.blob_locks.lock(desc.digest.clone()).await)
        } else {
            None
        };
        let blob_dir = if keep && !self.layers.settings.resumable_blobs {
            self.layers.blob_dir(&self.containerd).await
        } else {
            None
        };
        let mut writer: Option<Box<BlobWriter>> = None;
        let mut file: Option<BlobFile> = None;
        if let Some(dir) = blob_dir {
            // Stored while this download waited for the blob's lock (another image with this
            // layer on other parents): as with the ingest below.
            let stored = self
                .containerd
                .has_blob(&desc.digest)
                .await
                .map_err(containerd_err)?;
            if stored && !berth_only {
                return Ok(Direct::Fallback("the layer blob is in the content store"));
            }
            if !stored {
                let created = dir.create().map_err(|source| {
                    containerd_err(ContainerdError::ContentFile {
                        op: "create",
                        source,
                    })
                })?;
                file = Some(created);
            }
        } else if keep {
            match self
                .containerd
                .open_blob(cx.lease, &reference, &desc.digest, desc.size)
                .await
                .map_err(containerd_err)?
            {
                // Stored meanwhile (the same layer twice in one image): berth applies its own
                // download, without writing the blob again.
                OpenedBlob::Present if berth_only => {}
                OpenedBlob::Present => {
                    return Ok(Direct::Fallback("the layer blob is in the content store"))
                }
                OpenedBlob::Writer(mut opened) => {
                    // The applier needs every byte: a partial ingest is started over.
                    if opened.offset() > 0 {
                        debug!(offset = opened.offset(), "starting a partial ingest over");
                    }
                    opened.restart().await.map_err(containerd_err)?;
                    writer = Some(opened);
                }
            }
        }
        let permit = cx.downloads.acquire().await.ok();
        let kept = match (file, writer.as_deref_mut()) {
            (Some(file), _) => Some(Kept::File(file)),
            (None, Some(writer)) => Some(Kept::Ingest(ContentSink::new(image, writer))),
            (None, None) => None,
        };
        let mut sink = LayerSink {
            kept,
            feeder: Feeder {
                puller: self,
                cx,
                job,
                spec,
                feed: Feed::Idle,
                stop: None,
            },
        };
        // The download checks size and digest, hashing the compressed bytes as they arrive,
        // beside the applier, which only inflates, hashes the tar and writes; nothing is
        // committed unless both digests match.
        let mut verifier = Verifier::new(&desc.digest, desc.size);
        let mut stall = StallClock::new(self.settings.stall_timeout);
        let started = sink.feeder.start().await;
        let streamed = match started {
            Ok(()) => {
                self.stream_with_retries(
                    image,
                    cx.session,
                    desc,
                    &mut sink,
                    &mut verifier,
                    report,
                    &mut stall,
                )
                .await
            }
            Err(failure) => Err(failure),
        };
        drop(permit);
        let LayerSink { kept, mut feeder } = sink;
        let file = match kept {
            Some(Kept::File(file)) => Some(file),
            Some(Kept::Ingest(_)) | None => None,
        };
        let streamed = match streamed {
            Ok(()) => verifier.finish().map_err(|source| {
                Failure::Fatal(PullError::Mismatch {
                    image: image.to_string(),
                    source,
                })
            }),
            Err(failure) => Err(failure),
        };
        if let Err(failure) = streamed {
            let stop = feeder.stop.take();
            let applier_error = feeder.abandon().await;
            // Out of attempts, the partial ingest stays (under the pull's lease) for the next
            // order to resume; after any other failure it goes.
            if let Some(writer) = writer {
                if !matches!(failure, Failure::Retry(_)) {
                    writer.abort().await.ok();
                }
            }
            if let (Some(file), Failure::Retry(_)) = (file, &failure) {
                self.keep_partial(cx, &reference, desc, file).await;
            }
            return match (failure, stop) {
                (Failure::Stopped, Some(Stop::Fallback(reason))) => Ok(Direct::Fallback(reason)),
                (Failure::Stopped, Some(Stop::Committed)) => {
                    cx.ladder.committed(job.index);
                    report.finished(desc, true).await;
                    Ok(Direct::Done)
                }
                (Failure::Retry(err) | Failure::Fatal(err), _) => Err(err),
                (Failure::Stopped, Some(Stop::Applier) | None) => Err(PullError::Layer {
                    image: image.to_string(),
                    digest: desc.digest.clone(),
                    source: applier_error.unwrap_or(ApplyError::Read {
                        source: std::io::Error::other("the applier stopped"),
                    }),
                }),
            };
        }
        let (extraction, staging) = match feeder.finish().await {
            Ok(Finished::Ready {
                extraction,
                staging,
            }) => (extraction, staging),
            Ok(Finished::Committed) => {
                if let Some(writer) = writer {
                    writer.abort().await.ok();
                }
                cx.ladder.committed(job.index);
                report.finished(desc, true).await;
                return Ok(Direct::Done);
            }
            Ok(Finished::Fallback(reason)) => {
                if let Some(writer) = writer {
                    writer.abort().await.ok();
                }
                return Ok(Direct::Fallback(reason));
            }
            Err(err) => {
                if let Some(writer) = writer {
                    writer.abort().await.ok();
                }
                return Err(err);
            }
        };
        let committed = self
            .containerd
            .commit_extraction(cx.lease, extraction)
            .await
            .map_err(containerd_err);
        if let Err(err) = committed {
            if let Some(writer) = writer {
                writer.abort().await.ok();
            }
            return Err(err);
        }
        // The layer above may go live now: it needs the snapshot, not the blob, whose commit
        // (synced to disk first) runs beside it.
        cx.ladder.committed(job.index);
        if let Some(staging) = staging {
            self.containerd.discard_extraction(staging).await.ok();
        }
        let mut labels = uncompressed_label(job.diff_id);
        labels.insert(cx.source_label.0.clone(), cx.source_label.1.clone());
        if let Some(writer) = writer {
            writer.commit(labels).await.map_err(containerd_err)?;
        } else if let Some(file) = file {
            let written = file.finish().await.map_err(|source| {
                containerd_err(ContainerdError::ContentFile {
                    op: "write",
                    source,
                })
            })?;
            self.containerd
                .store_blob_file(
                    cx.lease,
                    &reference,
                    &desc.digest,
                    desc.size,
                    written,
                    labels,
                )
                .await
                .map_err(containerd_err)?;
        }
        report.finished(desc, false).await;
        Ok(Direct::Done)
    }

    /// A download that failed for now leaves what it received in containerd's ingest, as the
    /// streamed path does, so the next order resumes it. Best effort: the next order fetches
    /// the whole blob otherwise.
    async fn keep_partial(
        &self,
        cx: &PullContext<'_>,
        reference: &str,
        desc: &Descriptor,
        file: BlobFile,
    ) {
        let kept = match file.finish().await {
            Ok(written) => self
                .containerd
                .keep_partial_blob(cx.lease, reference, &desc.digest, desc.size, written)
                .await
                .map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(error) = kept {
            debug!(%error, "the partial download could not be kept for a resume");
        }
    }
}
