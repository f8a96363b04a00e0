//! One layer of a pull. Skipped when its snapshot (its chain id) exists. Otherwise berth
//! applies it itself while it downloads, straight into the overlayfs snapshot's upperdir
//! (see `direct`), teeing the bytes into the content store when layer blobs are kept; when
//! berth cannot (another snapshotter, a media type it does not know, a snapshot mount of
//! another shape, or the blob is in the content store already) the blob goes into the content
//! store and containerd applies it (`Diff.Apply`), as before.

use tokio::sync::Semaphore;
use tracing::{debug, info, instrument};

use super::blob::Reporter;
use super::manifest::Descriptor;
use super::registry::Session;
use super::stagger::Stagger;
use super::unpack::Ladder;
use super::{PullError, Puller};
use berth_core::order::ImageRef;
use berth_runtime::containerd::{BlobDir, Containerd, Lease, UnpackLayer};
use berth_unpack::apply::LayerSpec;
use berth_unpack::compression::Compression;
use berth_unpack::digest::Sha256Digest;

/// What every layer of one pull shares.
pub(super) struct PullContext<'a> {
    pub(super) image: &'a ImageRef,
    pub(super) session: &'a Session,
    pub(super) lease: &'a Lease,
    pub(super) source_label: &'a (String, String),
    pub(super) ladder: &'a Ladder,
    pub(super) stagger: &'a Stagger,
    /// `max_concurrent_downloads`: a permit per download in progress.
    pub(super) downloads: &'a Semaphore,
    pub(super) progress: &'a Option<tokio::sync::mpsc::Sender<super::PullProgress>>,
}

/// One layer: its descriptor, where it sits, and what it must unpack to.
pub(super) struct LayerJob<'a> {
    pub(super) index: usize,
    pub(super) desc: &'a Descriptor,
    pub(super) diff_id: &'a str,
    pub(super) chain_id: &'a str,
    /// The chain id below; empty for the first layer.
    pub(super) parent: &'a str,
}

impl LayerJob<'_> {
    /// The layer's slot in the `Stagger` (slot 0 is the config).
    fn slot(&self) -> usize {
        self.index + 1
    }
}

/// How a direct apply ended without an error.
pub(super) enum Direct {
    /// The layer's snapshot is committed.
    Done,
    /// berth cannot apply this layer; containerd's applier will (the reason is logged).
    Fallback(&'static str),
}

impl Puller {
    /// Downloads and unpacks one layer; returns once its snapshot is committed.
    #[instrument(skip_all, fields(index = job.index, digest = %job.desc.digest))]
    pub(super) async fn pull_layer(
        &self,
        cx: &PullContext<'_>,
        job: LayerJob<'_>,
    ) -> Result<(), PullError> {
        let containerd_err = |source| PullError::Containerd {
            image: cx.image.to_string(),
            source,
        };
        // One unpack per chain id at a time: pulls of other tags of this image that need the
        // same layer wait here and then find its snapshot committed.
        let _snapshot_guard = self
            .blob_locks
            .lock(format!("snapshot/{}", job.chain_id))
            .await;
        let mut report = Reporter::new(
            cx.progress,
            cx.stagger.head_start(job.slot(), job.desc.size),
        );
        if self
            .containerd
            .snapshot_exists(job.chain_id)
            .await
            .map_err(containerd_err)?
        {
            debug!("layer snapshot exists; not downloading it");
            cx.ladder.committed(job.index);
            report.finished(job.desc, true).await;
            return Ok(());
        }
        cx.stagger.wait_turn(job.slot()).await;
        let reason = match self.direct_spec(&job) {
            Ok(spec) => match self.apply_direct(cx, &job, spec, &mut report).await? {
                Direct::Done => return Ok(()),
                Direct::Fallback(reason) => reason,
            },
            Err(reason) => reason,
        };
        info!(
            reason,
            media_type = %job.desc.media_type,
            "applying the layer with containerd's applier"
        );
        {
            let _permit = cx.downloads.acquire().await.ok();
            self.fetch_blob(
                cx.image,
                cx.session,
                cx.lease,
                job.desc,
                cx.source_label,
                &mut report,
            )
            .await?;
        }
        cx.ladder.wait_for_parent(job.index).await;
        let layer = UnpackLayer {
            media_type: job.desc.media_type.clone(),
            digest: job.desc.digest.clone(),
            size: i64::try_from(job.desc.size).unwrap_or(i64::MAX),
            diff_id: job.diff_id.to_owned(),
        };
        debug!("unpacking layer");
        self.containerd
            .unpack_layer(cx.lease, &layer, job.chain_id, job.parent)
            .await
            .map_err(containerd_err)?;
        debug!("layer unpacked");
        cx.ladder.committed(job.index);
        Ok(())
    }

    /// What berth's applier needs to apply `job`, or why it cannot.
    fn direct_spec(&self, job: &LayerJob<'_>) -> Result<LayerSpec, &'static str> {
        if self.containerd.snapshotter() != "overlayfs" {
            return Err("the snapshotter is not overlayfs");
        }
        if self.layers.overlay_unusable() {
            return Err("the overlayfs snapshots' mounts have an unexpected shape");
        }
        let compression = Compression::from_media_type(&job.desc.media_type)
            .ok_or("berth does not apply this media type")?;
        Sha256Digest::parse(&job.desc.digest).map_err(|_| "the layer digest is not sha256")?;
        let diff_id =
            Sha256Digest::parse(job.diff_id).map_err(|_| "the layer's diff id is not sha256")?;
        Ok(LayerSpec {
            compression,
            // The download hashes the blob (beside the apply, on another thread): see `direct`.
            digest: None,
            size: job.desc.size,
            diff_id,
        })
    }
}

/// How layers are unpacked: `[containerd] keep_layer_blobs` and `resumable_layer_blobs`.
#[derive(Debug, Clone)]
pub struct LayerSettings {
    /// true: the compressed layer blobs also go into the content store (teed while berth
    /// applies them) and stay there; false: only manifests and configs do (like CRI's
    /// `discard_unpacked_layers`).
    pub keep_layer_blobs: bool,
    /// `resumable_layer_blobs`: kept blobs stream into containerd's ingest as they download
    /// (resumable after a crash) instead of being written into its content directory.
    pub resumable_blobs: bool,
}

impl Default for LayerSettings {
    fn default() -> Self {
        Self {
            keep_layer_blobs: true,
            resumable_blobs: false,
        }
    }
}

/// The layer settings, and what the puller learned about the snapshotter.
#[derive(Debug, Default)]
pub(super) struct LayerUnpacking {
    pub(super) settings: LayerSettings,
    /// Set when a prepared overlayfs snapshot had mounts berth does not write into: from
    /// then on containerd applies every layer.
    overlay_unusable: std::sync::atomic::AtomicBool,
    /// containerd's content directory, if berthd writes kept layer blobs there itself:
    /// probed once, at the first layer that needs it.
    blob_dir: tokio::sync::OnceCell<Option<BlobDir>>,
}

impl LayerUnpacking {
    pub(super) fn new(settings: LayerSettings) -> Self {
        Self {
            settings,
            overlay_unusable: std::sync::atomic::AtomicBool::new(false),
            blob_dir: tokio::sync::OnceCell::new(),
        }
    }

    /// Where kept layer blobs are written: containerd's content directory when berthd can
    /// write it as containerd sees it, else `None` (they stream through `Content.Write`).
    pub(super) async fn blob_dir(&self, containerd: &Containerd) -> Option<BlobDir> {
        self.blob_dir
            .get_or_init(|| async {
                match containerd.blob_dir().await {
                    Ok(dir) => {
                        info!(dir = ?dir, "writing kept layer blobs into containerd's content directory");
                        Some(dir)
                    }
                    Err(reason) => {
                        info!(%reason, "kept layer blobs go through containerd's Content API");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    pub(super) fn overlay_unusable(&self) -> bool {
        self.overlay_unusable
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn set_overlay_unusable(&self) {
        self.overlay_unusable
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
