//! berth's own apply of one layer while it downloads: the download (blob.rs, with its
//! retries, Range resumes, stall clock and bandwidth limit) feeds a `Feeder`, which spools
//! the bytes until the parent snapshot is committed, then prepares the layer's extraction
//! snapshot and streams the spooled and the remaining bytes into `berth_unpack`'s applier,
//! which writes the overlay upperdir and checks digest, size and diff id. A layer that fails
//! leaves no snapshot behind. With `keep_layer_blobs` the same bytes go into the content store.

use bytes::Bytes;
use tracing::debug;

use super::blob::{ContentSink, Failure, Reporter, Sink};
use super::feed::{Applier, Spool};
use super::layer::{Direct, LayerJob, PullContext};
use super::stall::StallClock;
use super::verify::Verifier;
use super::{PullError, Puller};
use berth_core::order::ImageRef;
use berth_runtime::containerd::{uncompressed_label, BlobWriter, Extraction, OpenedBlob, Prepared};
use berth_unpack::apply::{LayerSpec, Target, Whiteouts};
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
    /// The parent is not committed yet: the bytes are spooled (the file is made on the first).
    Spooling(Option<Spool>),
    /// The applier runs and receives the rest.
    Live {
        applier: Applier,
        extraction: Extraction,
    },
    /// Stopped; nothing more is taken.
    Stopped,
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

/// The sink of a direct apply: the feeder, and the content store when blobs are kept.
struct LayerSink<'a, 'w> {
    content: Option<ContentSink<'w>>,
    feeder: Feeder<'a>,
}

/// Docker's zstd layer type, which berth applies itself on every containerd.
const DOCKER_TAR_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

impl Sink for LayerSink<'_, '_> {
    async fn write(&mut self, chunk: Bytes) -> Result<(), Failure> {
        if let Some(content) = &mut self.content {
            content.write(chunk.clone()).await?;
        }
        self.feeder.feed(chunk).await
    }

    async fn flush(&mut self) -> Result<(), Failure> {
        match &mut self.content {
            Some(content) => content.flush().await,
            None => Ok(()),
        }
    }
}

impl<'a> Feeder<'a> {
    fn image(&self) -> &ImageRef {
        self.cx.image
    }

    fn fatal_containerd(&self, source: berth_runtime::containerd::ContainerdError) -> Failure {
        Failure::Fatal(PullError::Containerd {
            image: self.image().to_string(),
            source,
        })
    }

    fn fatal_spool(&self, source: std::io::Error) -> Failure {
        Failure::Fatal(PullError::Spool {
            image: self.image().to_string(),
            source,
        })
    }

    fn stopped(&mut self, stop: Stop) -> Failure {
        self.stop = Some(stop);
        Failure::Stopped
    }

    async fn feed(&mut self, chunk: Bytes) -> Result<(), Failure> {
        if matches!(self.feed, Feed::Spooling(_)) && self.cx.ladder.parent_committed(self.job.index)
        {
            self.go_live().await?;
        }
        match &mut self.feed {
            Feed::Live { applier, .. } => {
                if applier.send(chunk).await.is_err() {
                    return Err(self.stopped(Stop::Applier));
                }
                Ok(())
            }
            Feed::Spooling(spool) => {
                let spool = match spool {
                    Some(spool) => spool,
                    None => {
                        let created = Spool::create(&self.puller.layers.settings.spool_dir).await;
                        match created {
                            Ok(created) => spool.insert(created),
                            Err(err) => return Err(self.fatal_spool(err)),
                        }
                    }
                };
                if let Err(err) = spool.write(&chunk).await {
                    return Err(self.fatal_spool(err));
                }
                Ok(())
            }
            Feed::Stopped => Err(Failure::Stopped),
        }
    }

    /// Prepares the extraction snapshot and starts the applier on what is spooled so far.
    async fn go_live(&mut self) -> Result<(), Failure> {
        let Feed::Spooling(spool) = std::mem::replace(&mut self.feed, Feed::Stopped) else {
            return Ok(());
        };
        let containerd = &self.puller.containerd;
        let prepared = containerd
            .prepare_extraction(self.cx.lease, self.job.chain_id, self.job.parent)
            .await;
        let extraction = match prepared {
            Ok(Prepared::Ready(extraction)) => extraction,
            Ok(Prepared::Committed) => return Err(self.stopped(Stop::Committed)),
            Err(err) => return Err(self.fatal_containerd(err)),
        };
        let dirs = match extraction.overlay_dirs() {
            Ok(dirs) => dirs,
            Err(reason) => {
                containerd.discard_extraction(extraction).await.ok();
                self.puller.layers.set_overlay_unusable();
                return Err(self.stopped(Stop::Fallback(reason)));
            }
        };
        let spooled = spool.as_ref().map_or(0, Spool::written);
        debug!(spooled, upper = %dirs.upper.display(), "applying the layer into its snapshot");
        let target = Target {
            root: dirs.upper,
            whiteouts: Whiteouts::Overlay {
                lowers: dirs.lowers,
            },
        };
        match Applier::start(spool, self.spec.clone(), target).await {
            Ok(applier) => {
                self.feed = Feed::Live {
                    applier,
                    extraction,
                };
                Ok(())
            }
            Err(err) => {
                containerd.discard_extraction(extraction).await.ok();
                Err(self.fatal_spool(err))
            }
        }
    }

    /// Ends the stream and waits for the applier: the applied snapshot, or why not (the
    /// snapshot is then removed).
    async fn finish(self) -> Result<Extraction, PullError> {
        let image = self.image().to_string();
        let Feed::Live {
            applier,
            extraction,
        } = self.feed
        else {
            return Err(PullError::Layer {
                image,
                digest: self.job.desc.digest.clone(),
                source: ApplyError::Read {
                    source: std::io::Error::other("the layer was never applied"),
                },
            });
        };
        match applier.finish().await {
            Ok(applied) => {
                debug!(
                    entries = applied.entries,
                    uncompressed = applied.uncompressed_size,
                    "layer applied"
                );
                Ok(extraction)
            }
            Err(source) => {
                self.puller
                    .containerd
                    .discard_extraction(extraction)
                    .await
                    .ok();
                Err(PullError::Layer {
                    image,
                    digest: self.job.desc.digest.clone(),
                    source,
                })
            }
        }
    }

    /// The download failed: stops the applier and removes the snapshot. Returns the
    /// applier's own error, which explains a `Stop::Applier`.
    async fn abandon(self) -> Option<ApplyError> {
        match self.feed {
            Feed::Live {
                applier,
                extraction,
            } => {
                let applied = applier.finish().await;
                self.puller
                    .containerd
                    .discard_extraction(extraction)
                    .await
                    .ok();
                applied.err()
            }
            Feed::Spooling(_) | Feed::Stopped => None,
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
        // containerd allows one writer per ingest ref.
        let _blob_guard = if keep {
            Some(self.blob_locks.lock(desc.digest.clone()).await)
        } else {
            None
        };
        let mut writer: Option<Box<BlobWriter>> = None;
        if keep {
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
        let mut sink = LayerSink {
            content: writer
                .as_deref_mut()
                .map(|writer| ContentSink::new(image, writer)),
            feeder: Feeder {
                puller: self,
                cx,
                job,
                spec,
                feed: Feed::Spooling(None),
                stop: None,
            },
        };
        // Only the size is checked here; the applier checks the digest (and containerd again
        // at commit when the blob is kept).
        let mut verifier = Verifier::counting(&desc.digest, desc.size);
        let mut stall = StallClock::new(self.settings.stall_timeout);
        let started = if cx.ladder.parent_committed(job.index) {
            sink.feeder.go_live().await
        } else {
            Ok(())
        };
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
        let mut feeder = sink.feeder;
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
        if matches!(feeder.feed, Feed::Spooling(_)) {
            debug!("layer downloaded before its parent was committed; waiting for it");
            cx.ladder.wait_for_parent(job.index).await;
            if let Err(failure) = feeder.go_live().await {
                let stop = feeder.stop.take();
                if let Some(writer) = writer {
                    writer.abort().await.ok();
                }
                return match (failure, stop) {
                    (Failure::Stopped, Some(Stop::Fallback(reason))) => {
                        Ok(Direct::Fallback(reason))
                    }
                    (Failure::Stopped, _) => {
                        cx.ladder.committed(job.index);
                        report.finished(desc, true).await;
                        Ok(Direct::Done)
                    }
                    (Failure::Retry(err) | Failure::Fatal(err), _) => Err(err),
                };
            }
        }
        let extraction = match feeder.finish().await {
            Ok(extraction) => extraction,
            Err(err) => {
                if let Some(writer) = writer {
                    writer.abort().await.ok();
                }
                return Err(err);
            }
        };
        self.containerd
            .commit_extraction(cx.lease, extraction)
            .await
            .map_err(containerd_err)?;
        if let Some(writer) = writer {
            let mut labels = uncompressed_label(job.diff_id);
            labels.insert(cx.source_label.0.clone(), cx.source_label.1.clone());
            writer.commit(labels).await.map_err(containerd_err)?;
        }
        cx.ladder.committed(job.index);
        report.finished(desc, false).await;
        Ok(Direct::Done)
    }
}
