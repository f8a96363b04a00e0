//! Unpacking while the downloads go on: the image config is read first (it names each
//! layer's diff id, hence its chain id), then every layer is applied as its own bytes arrive
//! (into a staging snapshot when the snapshot below it is not committed yet), so only
//! commits are left when the last byte arrives. Snapshots are committed bottom-up; the
//! [`Ladder`] tells each layer when its parent is in.

use tokio::sync::watch;

use super::manifest::Manifest;
use super::{PullError, Puller, MAX_DOCUMENT};
use berth_core::order::ImageRef;
use berth_runtime::containerd::chain_ids;

/// How many layers, counted from the bottom, have their snapshot committed.
#[derive(Debug)]
pub(super) struct Ladder {
    committed: watch::Sender<usize>,
}

impl Ladder {
    pub(super) fn new() -> Self {
        Self {
            committed: watch::Sender::new(0),
        }
    }

    /// Whether the parent of layer `index` is committed (always, for the first layer).
    pub(super) fn parent_committed(&self, index: usize) -> bool {
        *self.committed.borrow() >= index
    }

    /// Waits until the parent of layer `index` is committed.
    pub(super) async fn wait_for_parent(&self, index: usize) {
        let mut committed = self.committed.subscribe();
        // The sender is `self`: the wait cannot fail while it lives.
        committed.wait_for(|count| *count >= index).await.ok();
    }

    /// Layer `index` is committed (so are all below it).
    pub(super) fn committed(&self, index: usize) {
        self.committed
            .send_modify(|count| *count = (*count).max(index + 1));
    }
}

/// The image config, parsed, and the layers' diff ids and chain ids.
pub(super) struct Layers {
    pub(super) config: oci_spec::image::ImageConfiguration,
    pub(super) diff_ids: Vec<String>,
    pub(super) chain_ids: Vec<String>,
}

impl Puller {
    /// Reads the committed config back and checks its diff ids against the manifest's layers.
    pub(super) async fn read_config(
        &self,
        image: &ImageRef,
        manifest: &Manifest,
    ) -> Result<Layers, PullError> {
        let config_bytes = self
            .containerd
            .read_blob(&manifest.config.digest, MAX_DOCUMENT)
            .await
            .map_err(|source| PullError::Containerd {
                image: image.to_string(),
                source,
            })?;
        let config: oci_spec::image::ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|source| PullError::Config {
                image: image.to_string(),
                source,
            })?;
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != manifest.layers.len() {
            return Err(PullError::Unsupported {
                image: image.to_string(),
                reason: super::manifest::ManifestError(
                    "the config's diff ids do not match the layers",
                ),
            });
        }
        let chain_ids = chain_ids(&diff_ids.iter().map(String::as_str).collect::<Vec<_>>());
        Ok(Layers {
            config,
            diff_ids,
            chain_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_layer_waits_for_its_parent_only() {
        let ladder = Ladder::new();
        assert!(ladder.parent_committed(0), "the first layer has no parent");
        assert!(!ladder.parent_committed(1));
        tokio::time::timeout(Duration::from_millis(50), ladder.wait_for_parent(1))
            .await
            .expect_err("layer 0 is not committed");
        ladder.committed(0);
        ladder.wait_for_parent(1).await;
        assert!(ladder.parent_committed(1));
        assert!(!ladder.parent_committed(2));
        ladder.committed(2);
        ladder.committed(1);
        assert!(ladder.parent_committed(3), "a late report does not go back");
    }
}
