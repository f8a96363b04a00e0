//! Image records (GC roots) and unpacking layers into the snapshotter.

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::{RemoveSnapshotRequest, StatSnapshotRequest};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, DeleteImageRequest, GetImageRequest, Image,
    ListImagesRequest, UpdateImageRequest,
};
use containerd_client::types::Descriptor;
use sha2::{Digest as _, Sha256};

use super::snapshot::Prepared;
use super::{Containerd, ContainerdError, Lease};

/// An image record as berth reads it back.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    pub labels: HashMap<String, String>,
    /// The record's target: an index or the platform manifest.
    pub target_digest: String,
}

/// An image record as listed for cleanup: its name, top descriptor and age.
#[derive(Debug, Clone)]
pub struct ListedImage {
    pub name: String,
    /// The top object: an index or a manifest.
    pub target_digest: String,
    pub target_size: u64,
    pub created_at: Option<prost_types::Timestamp>,
    pub updated_at: Option<prost_types::Timestamp>,
    pub labels: HashMap<String, String>,
}

/// One layer to unpack: its blob descriptor and the diff id the image config promises.
#[derive(Debug, Clone)]
pub struct UnpackLayer {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    pub diff_id: String,
}

impl Containerd {
    pub async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, ContainerdError> {
        let result = self
            .images()
            .get(self.request(
                GetImageRequest {
                    name: name.to_owned(),
                },
                None,
            ))
            .await;
        let image = match result {
            Ok(reply) => reply.into_inner().image,
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(ContainerdError::rpc("images.get")(status)),
        };
        Ok(image.map(|image| ImageRecord {
            target_digest: image.target.map(|target| target.digest).unwrap_or_default(),
            labels: image.labels,
        }))
    }

    /// Every image record of the namespace.
    pub async fn list_images(&self) -> Result<Vec<ListedImage>, ContainerdError> {
        let images = self
            .images()
            .list(self.request(
                ListImagesRequest {
                    filters: Vec::new(),
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("images.list"))?
            .into_inner()
            .images;
        Ok(images
            .into_iter()
            .map(|image| {
                let target = image.target.unwrap_or_default();
                ListedImage {
                    name: image.name,
                    target_digest: target.digest,
                    target_size: u64::try_from(target.size).unwrap_or(0),
                    created_at: image.created_at,
                    updated_at: image.updated_at,
                    labels: image.labels,
                }
            })
            .collect())
    }

    /// Deletes an image record and waits for containerd's GC, which then removes the content
    /// and snapshots nothing else references. Deleting an absent image is success.
    pub async fn delete_image(&self, name: &str) -> Result<(), ContainerdError> {
        let result = self
            .images()
            .delete(self.request(
                DeleteImageRequest {
                    name: name.to_owned(),
                    sync: true,
                    target: None,
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("images.delete"));
        super::ignore_not_found(result)
    }

    /// Sets (only) the given labels on an image record; an absent image is success. The record
    /// is read first and sent whole: containerd 2.x's images.update dereferences the target
    /// before it looks at the field mask (an update without one crashed containerd 2.1).
    pub async fn update_image_labels(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let found = self
            .images()
            .get(self.request(
                GetImageRequest {
                    name: name.to_owned(),
                },
                None,
            ))
            .await;
        let mut image = match found {
            Ok(reply) => match reply.into_inner().image {
                Some(image) => image,
                None => return Ok(()),
            },
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(()),
            Err(status) => return Err(ContainerdError::rpc("images.get")(status)),
        };
        let paths = labels.keys().map(|key| format!("labels.{key}")).collect();
        image.labels.extend(labels);
        let result = self
            .images()
            .update(self.request(
                UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask { paths }),
                    source_date_epoch: None,
                },
                None,
            ))
            .await
            .map(|_| ())
            .map_err(ContainerdError::rpc("images.update"));
        super::ignore_not_found(result)
    }

    /// Creates the image record, or points an existing one at the new target.
    pub async fn put_image(
        &self,
        lease: &Lease,
        name: &str,
        target: (&str, &str, i64),
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let (media_type, digest, size) = target;
        let image = Image {
            name: name.to_owned(),
            labels,
            target: Some(Descriptor {
                media_type: media_type.to_owned(),
                digest: digest.to_owned(),
                size,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        let created = self
            .images()
            .create(self.request(
                CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
                Some(lease),
            ))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                self.images()
                    .update(self.request(
                        UpdateImageRequest {
                            image: Some(image),
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec!["target".to_owned(), "labels".to_owned()],
                            }),
                            source_date_epoch: None,
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(ContainerdError::rpc("images.update"))?;
                Ok(())
            }
            Err(status) => Err(ContainerdError::rpc("images.create")(status)),
        }
    }

    /// Applies one layer on top of `parent` (empty for the first) as snapshot `chain_id`, unless
    /// that snapshot exists already; the applied layer's diff id is checked.
    pub async fn unpack_layer(
        &self,
        lease: &Lease,
        layer: &UnpackLayer,
        chain_id: &str,
        parent: &str,
    ) -> Result<(), ContainerdError> {
        if self.snapshot_exists(chain_id).await? {
            return Ok(());
        }
        self.apply_layer(lease, layer, chain_id, parent).await
    }

    /// Marks the image unpacked: its config references the top snapshot for the GC.
    pub async fn mark_unpacked(
        &self,
        config_digest: &str,
        top_chain_id: &str,
    ) -> Result<(), ContainerdError> {
        let labels = HashMap::from([(
            format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter()),
            top_chain_id.to_owned(),
        )]);
        self.update_content_labels(config_digest, labels).await
    }

    pub async fn snapshot_exists(&self, key: &str) -> Result<bool, ContainerdError> {
        let result = self
            .snapshots()
            .stat(self.request(
                StatSnapshotRequest {
                    snapshotter: self.snapshotter().to_owned(),
                    key: key.to_owned(),
                },
                None,
            ))
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(false),
            Err(status) => Err(ContainerdError::rpc("snapshots.stat")(status)),
        }
    }

    async fn apply_layer(
        &self,
        lease: &Lease,
        layer: &UnpackLayer,
        chain_id: &str,
        parent: &str,
    ) -> Result<(), ContainerdError> {
        let extraction = match self.prepare_extraction(lease, chain_id, parent).await? {
            Prepared::Ready(extraction) => extraction,
            Prepared::Committed => return Ok(()),
        };
        let applied = self
            .diff()
            .apply(self.request(
                ApplyRequest {
                    diff: Some(Descriptor {
                        media_type: layer.media_type.clone(),
                        digest: layer.digest.clone(),
                        size: layer.size,
                        annotations: HashMap::new(),
                    }),
                    mounts: extraction.mounts().to_vec(),
                    payloads: HashMap::new(),
                    sync_fs: false,
                },
                Some(lease),
            ))
            .await
            .map_err(ContainerdError::rpc("diff.apply"));
        let applied = match applied {
            Ok(reply) => reply
                .into_inner()
                .applied
                .map(|d| d.digest)
                .unwrap_or_default(),
            Err(err) => {
                self.discard_extraction(extraction).await.ok();
                return Err(err);
            }
        };
        if applied != layer.diff_id {
            self.discard_extraction(extraction).await.ok();
            return Err(ContainerdError::DiffIdMismatch {
                layer: layer.digest.clone(),
                expected: layer.diff_id.clone(),
                actual: applied,
            });
        }
        self.commit_extraction(lease, extraction).await?;
        self.mark_layer_uncompressed(&layer.digest, &layer.diff_id)
            .await
    }

    pub async fn remove_snapshot(&self, key: &str) -> Result<(), ContainerdError> {
        let result = self
            .snapshots()
            .remove(self.request(
                RemoveSnapshotRequest {
                    snapshotter: self.snapshotter().to_owned(),
                    key: key.to_owned(),
                },
                None,
            ))
            .await
            .map_err(ContainerdError::rpc("snapshots.remove"));
        super::ignore_not_found(result)
    }
}

/// OCI chain ids: `chain[0] = diff[0]`; `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[&str]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => (*diff_id).to_owned(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {diff_id}")))
            ),
        };
        chain.push(next);
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chain = chain_ids(&[&a, &b]);
        assert_eq!(chain[0], a);
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(format!("{a} {b}"))));
        assert_eq!(chain[1], expected);
        assert!(chain_ids(&[]).is_empty());
    }
}
