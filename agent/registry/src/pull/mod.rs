//! Pull: resolve the reference to this host's manifest, fetch config and layers concurrently,
//! verify every byte while streaming it into containerd, unpack, and only then write the image
//! record. A failed pull leaves no image record.

mod bandwidth;
mod blob;
mod cached;
pub mod cosign;
mod direct;
mod error;
mod explain;
mod feed;
mod layer;
pub mod manifest;
pub mod mirror;
pub mod policy;
pub mod registry;
pub mod signature;
mod stagger;
mod stall;
mod unpack;
pub mod verify;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryFutureExt as _;

use tokio::sync::mpsc;
use tracing::{info, instrument};

use crate::auth::{Authenticator, WireAuth};
use berth_core::locks::KeyedLocks;
use berth_core::metrics::{PullLabels, SharedMetrics};
use berth_core::order::ImageRef;
use berth_runtime::containerd::{Containerd, Lease};
use blob::Reporter;
use error::retry;
pub use error::PullError;
pub use layer::LayerSettings;
use layer::{LayerJob, LayerUnpacking, PullContext};
use manifest::{Descriptor, Manifest, Parsed};
pub use registry::RegistrySettings;
use registry::Session;
use signature::{Signatures, Subject};
use stagger::Stagger;
use unpack::Ladder;

/// Largest manifest, index or image config berth reads.
const MAX_DOCUMENT: u64 = 4 << 20;
/// Image label: the digest of the platform manifest the record's target resolves to.
pub const LABEL_MANIFEST: &str = "berth.dev/manifest";
/// Image label: "true" when the image was pulled with a credential.
pub const LABEL_PRIVATE: &str = "berth.dev/private";
/// Image label: unix seconds of the image's last pull or use by an order (see `run::gc`).
pub const LABEL_LAST_USED: &str = "berth.dev/last-used";

/// Unix seconds now, for [`LABEL_LAST_USED`].
pub fn unix_seconds_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Progress of one pull, for PullImage's stream.
#[derive(Debug, Clone)]
pub enum PullProgress {
    /// The pull waits for a turn (`max_concurrent_pulls`); `position` 1 is next.
    Queued { image: String, position: u32 },
    Resolved {
        image: String,
        digest: String,
        layers: u32,
        total_bytes: u64,
    },
    Layer {
        digest: String,
        done_bytes: u64,
        total_bytes: u64,
        cached: bool,
    },
    Done {
        digest: String,
        /// "verified" or "not required" (the signature policy).
        signature: &'static str,
    },
}

/// An image ready to run: its record exists and its layers are unpacked.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub name: String,
    pub manifest_digest: String,
    pub config: oci_spec::image::ImageConfiguration,
    pub top_chain_id: String,
    pub private: bool,
    /// [`LABEL_LAST_USED`] as the record had it (now, for a fresh pull); None without one.
    pub last_used: Option<u64>,
    /// The index the platform manifest was chosen from, when there was one.
    pub index_digest: Option<String>,
}

/// Pulls images into one containerd namespace.
#[derive(Debug, Clone)]
pub struct Puller {
    containerd: Containerd,
    http: reqwest::Client,
    authenticator: Arc<Authenticator>,
    /// One fetch per blob digest at a time: pulls of different tags of one image share blobs.
    blob_locks: Arc<KeyedLocks>,
    settings: Arc<RegistrySettings>,
    /// `max_bytes_per_second`, shared by every download of every pull.
    bandwidth: Arc<bandwidth::Bandwidth>,
    deadline: Duration,
    metrics: SharedMetrics,
    signatures: Arc<Signatures>,
    /// `keep_layer_blobs`, and whether berth writes overlay snapshots itself.
    layers: Arc<LayerUnpacking>,
}

/// What an image reference resolves to: the document the registry serves for it and, when that
/// is an index, the entry for this host's platform.
pub(super) struct Resolved {
    pub(super) top_bytes: bytes::Bytes,
    pub(super) top_digest: String,
    /// The index's entries, when the reference named an index.
    pub(super) index: Option<Vec<Descriptor>>,
    pub(super) manifest_bytes: bytes::Bytes,
    pub(super) manifest_digest: String,
    pub(super) manifest: Manifest,
}

/// Fetches `image`'s manifest; for an index, this host's platform entry, fetched by digest
/// and checked against that digest and size. Shared by pulls and ExplainPull.
pub(super) async fn resolve_manifest(
    image: &ImageRef,
    session: &Session,
    attempts: u32,
) -> Result<Resolved, PullError> {
    let (top_bytes, top_digest) = retry(attempts, || session.manifest(image.reference())).await?;
    let unsupported = |reason| PullError::Unsupported {
        image: image.to_string(),
        reason,
    };
    match manifest::parse(&top_bytes).map_err(unsupported)? {
        Parsed::Manifest(manifest) => Ok(Resolved {
            manifest_bytes: top_bytes.clone(),
            manifest_digest: top_digest.clone(),
            top_bytes,
            top_digest,
            index: None,
            manifest,
        }),
        Parsed::Index(entries) => {
            let (os, arch) = manifest::host_platform();
            let entry = manifest::select_platform(&entries, os, arch)
                .ok_or_else(|| PullError::NoPlatform {
                    image: image.to_string(),
                    os,
                    arch,
                })?
                .clone();
            manifest::check_digest(&entry.digest).map_err(unsupported)?;
            let child = session.reference_with_digest(&entry.digest);
            let (bytes, digest) = retry(attempts, || session.manifest(&child)).await?;
            verify::verify_bytes(&entry.digest, Some(entry.size), &bytes).map_err(|source| {
                PullError::Mismatch {
                    image: image.to_string(),
                    source,
                }
            })?;
            let Parsed::Manifest(manifest) = manifest::parse(&bytes).map_err(unsupported)? else {
                return Err(unsupported(manifest::ManifestError(
                    "nested indexes are not supported",
                )));
            };
            Ok(Resolved {
                top_bytes,
                top_digest,
                index: Some(entries),
                manifest_bytes: bytes,
                manifest_digest: digest,
                manifest,
            })
        }
    }
}

impl Puller {
    pub fn new(
        containerd: Containerd,
        settings: RegistrySettings,
        authenticator: Arc<Authenticator>,
        deadline: Duration,
        metrics: SharedMetrics,
    ) -> Result<Self, PullError> {
        Ok(Self {
            containerd,
            authenticator,
            blob_locks: Arc::default(),
            http: settings.http_client()?,
            bandwidth: Arc::new(bandwidth::Bandwidth::new(settings.max_bytes_per_second)),
            settings: Arc::new(settings),
            deadline,
            signatures: Arc::new(Signatures::new(
                policy::Policies::default(),
                Duration::from_secs(300),
                metrics.clone(),
            )),
            metrics,
            layers: Arc::default(),
        })
    }

    /// How layers are unpacked (`[containerd] keep_layer_blobs`, `resumable_layer_blobs`).
    pub fn with_layers(mut self, settings: LayerSettings) -> Self {
        self.layers = Arc::new(LayerUnpacking::new(settings));
        self
    }

    /// The signature policies (`[[policy]]`) and their cache.
    pub fn with_signatures(mut self, signatures: Signatures) -> Self {
        self.signatures = Arc::new(signatures);
        self
    }

    /// A session with `image`'s registry for `auth`, retried like any request.
    async fn open_session(
        &self,
        image: &ImageRef,
        auth: &WireAuth,
        secret_id: Option<&str>,
    ) -> Result<Session, PullError> {
        retry(self.settings.retries, || {
            Session::open(
                &self.settings,
                &self.http,
                &self.authenticator,
                image,
                auth.clone(),
                secret_id,
            )
        })
        .await
    }

    /// Pulls `image` with `auth` (anonymous when no secret), reporting progress if asked.
    #[instrument(skip_all, fields(image = %image))]
    pub async fn pull(
        &self,
        image: &ImageRef,
        project: &str,
        auth: WireAuth,
        secret_id: Option<&str>,
        progress: Option<mpsc::Sender<PullProgress>>,
    ) -> Result<PulledImage, PullError> {
        // With a secret the image is private; an anonymous pull may carry an anonymous token.
        let private = secret_id.is_some();
        let started = tokio::time::Instant::now();
        let _in_flight = InFlight::count(&self.metrics);
        let work = async {
            let attempts = self.settings.retries;
            let session = self.open_session(image, &auth, secret_id).await?;
            self.pull_from(
                image,
                project,
                &session,
                attempts,
                Privacy::Known(private),
                progress,
            )
            .await
        };
        let result = tokio::time::timeout(self.deadline, work)
            .await
            .map_err(|_| PullError::Deadline {
                image: image.to_string(),
            })
            .and_then(|result| result);
        self.record(image, started, &result);
        result
    }

    /// `berth_pull_duration_seconds` and `berth_pulls_total` for one finished pull.
    fn record(
        &self,
        image: &ImageRef,
        started: tokio::time::Instant,
        result: &Result<PulledImage, PullError>,
    ) {
        self.metrics
            .pull_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .pulls
            .get_or_create(&PullLabels {
                result: result
                    .as_ref()
                    .map_or_else(PullError::result_label, |_| "ok"),
                registry: image.registry().to_owned(),
            })
            .inc();
    }

    /// The pull itself through an open session (to the registry or a mirror): resolve, fetch
    /// and verify, unpack, write the image record under the image's own name.
    async fn pull_from(
        &self,
        image: &ImageRef,
        project: &str,
        session: &Session,
        attempts: u32,
        privacy: Privacy,
        progress: Option<mpsc::Sender<PullProgress>>,
    ) -> Result<PulledImage, PullError> {
        let Resolved {
            top_bytes,
            top_digest,
            index,
            manifest_bytes,
            manifest_digest,
            manifest,
        } = resolve_manifest(image, session, attempts).await?;
        let top_media_type = match (&index, &manifest) {
            (None, manifest) => manifest.media_type.clone(),
            (Some(_), _)
                if top_bytes
                    .windows(DOCKER_LIST_NEEDLE.len())
                    .any(|w| w == DOCKER_LIST_NEEDLE) =>
            {
                manifest::DOCKER_LIST.to_owned()
            }
            (Some(_), _) => manifest::OCI_INDEX.to_owned(),
        };
        // Signature policy, before a blob is fetched, unpacked or recorded: a refused image
        // leaves nothing behind.
        let index_digest = index.as_ref().map(|_| top_digest.clone());
        let signature = self
            .signatures
            .check(
                session,
                image,
                project,
                Subject {
                    manifest_digest: &manifest_digest,
                    index_digest: index_digest.as_deref(),
                },
                attempts,
            )
            .await?;
        let private = match privacy {
            Privacy::Known(private) => private,
            Privacy::AskUpstream => !self.upstream_serves_anonymously(image, &top_digest).await,
        };
        let total_bytes =
            manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
        info!(digest = %manifest_digest, layers = manifest.layers.len(), total_bytes, "resolved image");
        send(
            &progress,
            PullProgress::Resolved {
                image: image.to_string(),
                digest: manifest_digest.clone(),
                layers: u32::try_from(manifest.layers.len()).unwrap_or(u32::MAX),
                total_bytes,
            },
        )
        .await;

        let containerd_err = |source| PullError::Containerd {
            image: image.to_string(),
            source,
        };
        let lease = self
            .containerd
            .create_lease("pull", Duration::from_secs(3600) + self.deadline)
            .await
            .map_err(containerd_err)?;
        let result = self
            .store(
                image,
                session,
                &lease,
                Stored {
                    top: (&top_media_type, &top_digest, &top_bytes),
                    index: index.as_deref(),
                    manifest_digest: &manifest_digest,
                    manifest_bytes: &manifest_bytes,
                    manifest: &manifest,
                    private,
                },
                &progress,
            )
            .await;
        match &result {
            // The registry may answer again: the lease keeps the partial ingests until its
            // gc.expire passes, so the next order resumes them instead of fetching them whole.
            Err(err) if err.is_retryable() => {
                info!(lease = %lease.id(), "keeping the partial blobs of a failed pull for a retry");
            }
            Err(_) => {
                self.containerd.release_and_collect(lease).await.ok();
            }
            Ok(_) => {
                self.containerd.release(lease).await.ok();
            }
        }
        let (config, top_chain_id) = result?;
        send(
            &progress,
            PullProgress::Done {
                digest: manifest_digest.clone(),
                signature: signature.as_str(),
            },
        )
        .await;
        Ok(PulledImage {
            name: image.name(),
            manifest_digest,
            config,
            top_chain_id,
            private,
            last_used: Some(unix_seconds_now()),
            index_digest,
        })
    }

    async fn store(
        &self,
        image: &ImageRef,
        session: &Session,
        lease: &Lease,
        stored: Stored<'_>,
        progress: &Option<mpsc::Sender<PullProgress>>,
    ) -> Result<(oci_spec::image::ImageConfiguration, String), PullError> {
        let containerd_err = |source| PullError::Containerd {
            image: image.to_string(),
            source,
        };
        let source_label = distribution_source(image);
        let manifest = stored.manifest;
        if manifest.config.size > MAX_DOCUMENT {
            return Err(PullError::Unsupported {
                image: image.to_string(),
                reason: manifest::ManifestError("image config larger than 4 MiB"),
            });
        }
        // The config first: its diff ids name each layer's snapshot (chain id), which decides
        // whether the layer is needed at all and lets berth apply it while it downloads.
        let stagger = Stagger::new(
            manifest.layers.len() + 1,
            self.settings.max_concurrent_downloads,
        );
        let mut config_report =
            Reporter::new(progress, stagger.head_start(0, manifest.config.size));
        self.fetch_blob(
            image,
            session,
            lease,
            &manifest.config,
            &source_label,
            &mut config_report,
        )
        .await?;
        drop(config_report);
        let layers = self.read_config(image, manifest).await?;
        // Then the layers, concurrently but with staggered starts (see `stagger`), each applied
        // as soon as it arrives and the layer below it is committed.
        let ladder = Ladder::new();
        let downloads = tokio::sync::Semaphore::new(self.settings.max_concurrent_downloads.max(1));
        let cx = PullContext {
            image,
            session,
            lease,
            source_label: &source_label,
            ladder: &ladder,
            stagger: &stagger,
            downloads: &downloads,
            progress,
        };
        // Boxed as `dyn Send` futures: the compiler cannot prove `Send` for these borrowed
        // futures inside `try_join_all` on its own (rust-lang/rust#102211).
        let mut jobs: Vec<LayerFetch<'_>> = Vec::with_capacity(manifest.layers.len());
        for (index, desc) in manifest.layers.iter().enumerate() {
            let job = LayerJob {
                index,
                desc,
                diff_id: &layers.diff_ids[index],
                chain_id: &layers.chain_ids[index],
                parent: index
                    .checked_sub(1)
                    .and_then(|below| layers.chain_ids.get(below))
                    .map_or("", String::as_str),
            };
            let cx = &cx;
            jobs.push(Box::pin(self.pull_layer(cx, job).map_ok(|()| ())));
        }
        futures::future::try_join_all(jobs).await?;
        let top_chain_id = layers.chain_ids.last().cloned().unwrap_or_default();
        self.containerd
            .mark_unpacked(&manifest.config.digest, &top_chain_id)
            .await
            .map_err(containerd_err)?;
        let config = layers.config;

        // The manifest, then the index, each pointing at its children for the GC.
        let mut labels = HashMap::from([source_label.clone()]);
        labels.insert(
            "containerd.io/gc.ref.content.config".to_owned(),
            manifest.config.digest.clone(),
        );
        // Without kept layer blobs the manifest does not reference them (like CRI's
        // discard_unpacked_layers): one containerd applied anyway goes with the pull's lease.
        if self.layers.settings.keep_layer_blobs {
            for (i, layer) in manifest.layers.iter().enumerate() {
                labels.insert(
                    format!("containerd.io/gc.ref.content.l.{i}"),
                    layer.digest.clone(),
                );
            }
        }
        let manifest_guard = self
            .blob_locks
            .lock(stored.manifest_digest.to_owned())
            .await;
        self.containerd
            .write_small_blob(
                lease,
                &format!("manifest-{}", stored.manifest_digest),
                stored.manifest_digest,
                stored.manifest_bytes,
                labels,
            )
            .await
            .map_err(containerd_err)?;
        drop(manifest_guard);
        let (top_media_type, top_digest, top_bytes) = stored.top;
        if let Some(entries) = stored.index {
            let mut labels = HashMap::from([source_label.clone()]);
            for (i, entry) in entries.iter().enumerate() {
                if manifest::check_digest(&entry.digest).is_ok() {
                    labels.insert(
                        format!("containerd.io/gc.ref.content.m.{i}"),
                        entry.digest.clone(),
                    );
                }
            }
            let _index_guard = self.blob_locks.lock(top_digest.to_owned()).await;
            self.containerd
                .write_small_blob(
                    lease,
                    &format!("index-{top_digest}"),
                    top_digest,
                    top_bytes,
                    labels,
                )
                .await
                .map_err(containerd_err)?;
        }

        // Only now, with every blob verified and unpacked, does the image become visible.
        let image_labels = HashMap::from([
            (LABEL_MANIFEST.to_owned(), stored.manifest_digest.to_owned()),
            (LABEL_PRIVATE.to_owned(), stored.private.to_string()),
            (LABEL_LAST_USED.to_owned(), unix_seconds_now().to_string()),
        ]);
        let top_size = i64::try_from(top_bytes.len()).unwrap_or(i64::MAX);
        self.containerd
            .put_image(
                lease,
                &image.name(),
                (top_media_type, top_digest, top_size),
                image_labels,
            )
            .await
            .map_err(containerd_err)?;
        Ok((config, top_chain_id))
    }
}

/// An error that can end a pull before the puller runs (the registry's token endpoint refused
/// the credential, say), which `berth_pulls_total` must count all the same.
pub trait UncountedPull {
    /// The `result` label of `berth_pulls_total` for this error, or None when the puller
    /// counted it already or it was no pull failure (an invalid order).
    fn uncounted_pull_result(&self) -> Option<&'static str>;
}

/// How a pull decides the image record's `berth.dev/private` label.
#[derive(Debug, Clone, Copy)]
pub(super) enum Privacy {
    /// From the order: private when it came with a credential.
    Known(bool),
    /// An anonymous pull through a mirror: public only if the registry itself serves the
    /// manifest anonymously.
    AskUpstream,
}

/// Counts one pull in `berth_pulls_in_flight` for as long as it lives, also when the pull's
/// future is dropped mid-way.
#[derive(Debug)]
struct InFlight(SharedMetrics);

impl InFlight {
    fn count(metrics: &SharedMetrics) -> Self {
        metrics.pulls_in_flight.inc();
        Self(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.pulls_in_flight.dec();
    }
}

/// One layer's fetch and unpack.
type LayerFetch<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PullError>> + Send + 'a>>;

const DOCKER_LIST_NEEDLE: &[u8] = manifest::DOCKER_LIST.as_bytes();

/// What `store` writes besides the blobs.
struct Stored<'a> {
    top: (&'a str, &'a str, &'a [u8]),
    index: Option<&'a [Descriptor]>,
    manifest_digest: &'a str,
    manifest_bytes: &'a [u8],
    manifest: &'a Manifest,
    private: bool,
}

fn layer_progress(desc: &Descriptor, done_bytes: u64, cached: bool) -> PullProgress {
    PullProgress::Layer {
        digest: desc.digest.clone(),
        done_bytes,
        total_bytes: desc.size,
        cached,
    }
}

async fn send(progress: &Option<mpsc::Sender<PullProgress>>, event: PullProgress) {
    if let Some(sender) = progress {
        // A client that stopped listening does not stop the pull.
        sender.send(event).await.ok();
    }
}

/// `containerd.io/distribution.source.<host without port>` = repository, as ctr writes it.
fn distribution_source(image: &ImageRef) -> (String, String) {
    let registry = image.registry();
    let host = if registry.starts_with('[') {
        registry
            .split(']')
            .next()
            .map(|h| format!("{h}]"))
            .unwrap_or_default()
    } else {
        registry.split(':').next().unwrap_or(registry).to_owned()
    };
    (
        format!("containerd.io/distribution.source.{host}"),
        image.repository().to_owned(),
    )
}
