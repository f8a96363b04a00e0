//! Unpacking while the download goes on: each layer is applied to the snapshotter as soon as it
//! and every layer below it are in containerd's content store, so only the last layer's unpack
//! is left when the last byte arrives.

use tokio::sync::mpsc;
use tracing::debug;

use super::manifest::Manifest;
use super::{PullError, Puller, MAX_DOCUMENT};
use berth_core::order::ImageRef;
use berth_runtime::containerd::{chain_ids, ContainerdError, Lease, UnpackLayer};

/// Which blobs of the manifest are committed: slot 0 is the config, slot i + 1 layer i.
#[derive(Debug)]
pub(super) struct Arrivals {
    committed: mpsc::UnboundedReceiver<usize>,
    done: Vec<bool>,
}

/// The sending half: one message per committed blob.
pub(super) type Committed = mpsc::UnboundedSender<usize>;

/// The slot of the image config.
pub(super) const CONFIG_SLOT: usize = 0;

/// The slot of layer `index`.
pub(super) const fn layer_slot(index: usize) -> usize {
    index + 1
}

impl Arrivals {
    /// Tracks the config and `layers` layers.
    pub(super) fn new(layers: usize) -> (Committed, Self) {
        let (sender, committed) = mpsc::unbounded_channel();
        (
            sender,
            Self {
                committed,
                done: vec![false; layers + 1],
            },
        )
    }

    /// Waits until blob `slot` is committed; false if the downloads ended without it.
    async fn wait(&mut self, slot: usize) -> bool {
        while !self.done.get(slot).copied().unwrap_or(false) {
            match self.committed.recv().await {
                Some(arrived) => {
                    if let Some(done) = self.done.get_mut(arrived) {
                        *done = true;
                    }
                }
                None => return false,
            }
        }
        true
    }
}

impl Puller {
    /// Reads the config once it is in, checks its diff ids against the layers, then applies the
    /// layers bottom-up as they arrive. Returns the config and the top chain id.
    pub(super) async fn unpack_as_layers_arrive(
        &self,
        image: &ImageRef,
        lease: &Lease,
        manifest: &Manifest,
        mut arrivals: Arrivals,
    ) -> Result<(oci_spec::image::ImageConfiguration, String), PullError> {
        let containerd_err = |source| PullError::Containerd {
            image: image.to_string(),
            source,
        };
        let never_arrived = || {
            containerd_err(ContainerdError::Protocol {
                op: "content.write",
                reason: "the downloads ended without a blob of the manifest",
            })
        };
        if !arrivals.wait(CONFIG_SLOT).await {
            return Err(never_arrived());
        }
        let config_bytes = self
            .containerd
            .read_blob(&manifest.config.digest, MAX_DOCUMENT)
            .await
            .map_err(containerd_err)?;
        let config: oci_spec::image::ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|source| PullError::Config {
                image: image.to_string(),
                source,
            })?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers.len() {
            return Err(PullError::Unsupported {
                image: image.to_string(),
                reason: super::manifest::ManifestError(
                    "the config's diff ids do not match the layers",
                ),
            });
        }
        let chain = chain_ids(&diff_ids.iter().map(String::as_str).collect::<Vec<_>>());
        let mut parent = String::new();
        for (index, ((layer, diff_id), chain_id)) in
            manifest.layers.iter().zip(diff_ids).zip(&chain).enumerate()
        {
            if !arrivals.wait(layer_slot(index)).await {
                return Err(never_arrived());
            }
            let layer = UnpackLayer {
                media_type: layer.media_type.clone(),
                digest: layer.digest.clone(),
                size: i64::try_from(layer.size).unwrap_or(i64::MAX),
                diff_id: diff_id.clone(),
            };
            // One unpack per chain id at a time: pulls of other tags of this image that need
            // the same layer wait here and then find its snapshot committed.
            let _snapshot_guard = self.blob_locks.lock(format!("snapshot/{chain_id}")).await;
            debug!(index, digest = %layer.digest, "unpacking layer");
            self.containerd
                .unpack_layer(lease, &layer, chain_id, &parent)
                .await
                .map_err(containerd_err)?;
            debug!(index, digest = %layer.digest, "layer unpacked");
            parent.clone_from(chain_id);
        }
        self.containerd
            .mark_unpacked(&manifest.config.digest, &parent)
            .await
            .map_err(containerd_err)?;
        Ok((config, parent))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_layer_is_ready_only_once_it_is_committed() {
        let (committed, mut arrivals) = Arrivals::new(3);
        committed.send(layer_slot(2)).unwrap();
        committed.send(CONFIG_SLOT).unwrap();
        assert!(arrivals.wait(CONFIG_SLOT).await);
        tokio::time::timeout(Duration::from_millis(50), arrivals.wait(layer_slot(0)))
            .await
            .expect_err("layer 0 has not arrived");
        committed.send(layer_slot(0)).unwrap();
        assert!(arrivals.wait(layer_slot(0)).await);
        assert!(
            arrivals.wait(layer_slot(2)).await,
            "seen while waiting for 0"
        );
        drop(committed);
        assert!(
            !arrivals.wait(layer_slot(1)).await,
            "the downloads ended without it"
        );
    }
}
