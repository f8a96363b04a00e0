//! Images already in containerd: loading a pulled image for an order, and checking its
//! signature and a new credential's access to it again.

use super::manifest::{self, Parsed};
use super::signature::{SignatureStatus, Subject};
use super::{
    retry, PullError, PulledImage, Puller, LABEL_LAST_USED, LABEL_MANIFEST, LABEL_PRIVATE,
    MAX_DOCUMENT,
};
use crate::auth::WireAuth;
use berth_core::order::ImageRef;
use berth_runtime::containerd::ContainerdError;

impl Puller {
    /// The image as containerd has it, ready to run; None when it is absent or incomplete
    /// (then it is pulled again).
    pub async fn load(&self, image: &ImageRef) -> Result<Option<PulledImage>, PullError> {
        let containerd_err = |source| PullError::Containerd {
            image: image.to_string(),
            source,
        };
        let Some(record) = self
            .containerd
            .get_image(&image.name())
            .await
            .map_err(containerd_err)?
        else {
            return Ok(None);
        };
        let Some(manifest_digest) = record.labels.get(LABEL_MANIFEST).cloned() else {
            return Ok(None);
        };
        let index_digest = Some(record.target_digest.clone())
            .filter(|target| !target.is_empty() && *target != manifest_digest);
        let private = record
            .labels
            .get(LABEL_PRIVATE)
            .is_none_or(|v| v != "false");
        let last_used = record
            .labels
            .get(LABEL_LAST_USED)
            .and_then(|seconds| seconds.parse().ok());
        let Some(bytes) = self
            .read_document(&manifest_digest)
            .await
            .map_err(containerd_err)?
        else {
            return Ok(None);
        };
        let Ok(Parsed::Manifest(manifest)) = manifest::parse(&bytes) else {
            return Ok(None);
        };
        let Some(config_bytes) = self
            .read_document(&manifest.config.digest)
            .await
            .map_err(containerd_err)?
        else {
            return Ok(None);
        };
        let Ok(config) =
            serde_json::from_slice::<oci_spec::image::ImageConfiguration>(&config_bytes)
        else {
            return Ok(None);
        };
        let diff_ids: Vec<&str> = config
            .rootfs()
            .diff_ids()
            .iter()
            .map(String::as_str)
            .collect();
        let Some(top_chain_id) = berth_runtime::containerd::chain_ids(&diff_ids).pop() else {
            return Ok(None);
        };
        if !self
            .containerd
            .snapshot_exists(&top_chain_id)
            .await
            .map_err(containerd_err)?
        {
            return Ok(None);
        }
        Ok(Some(PulledImage {
            name: image.name(),
            manifest_digest,
            config,
            top_chain_id,
            private,
            last_used,
            index_digest,
        }))
    }

    async fn read_document(&self, digest: &str) -> Result<Option<Vec<u8>>, ContainerdError> {
        match self.containerd.read_blob(digest, MAX_DOCUMENT).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.is_not_found() => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Whether a `[[policy]]` demands a signature on `image` for `project`.
    pub fn signature_required(&self, image: &ImageRef, project: &str) -> bool {
        self.signatures.required(image, project).is_some()
    }

    /// Whether starting the cached `pulled` for `project` needs a signature verified now: a
    /// policy demands one and no positive result for it is remembered.
    pub fn signature_check_due(
        &self,
        image: &ImageRef,
        project: &str,
        pulled: &PulledImage,
    ) -> bool {
        self.signatures
            .required(image, project)
            .is_some_and(|(policy, keys)| {
                !self
                    .signatures
                    .recently_verified(&policy, &keys, &pulled.manifest_digest)
            })
    }

    /// Verifies the cached `pulled`'s signature against the policy in force now, fetched from
    /// the registry with `auth` (the order's credential).
    pub async fn check_cached_signature(
        &self,
        image: &ImageRef,
        project: &str,
        pulled: &PulledImage,
        auth: WireAuth,
        secret_id: Option<&str>,
    ) -> Result<SignatureStatus, PullError> {
        let work = async {
            let attempts = self.settings.retries;
            let session = self.open_session(image, &auth, secret_id).await?;
            self.signatures
                .check(
                    &session,
                    image,
                    project,
                    Subject {
                        manifest_digest: &pulled.manifest_digest,
                        index_digest: pulled.index_digest.as_deref(),
                    },
                    attempts,
                )
                .await
        };
        tokio::time::timeout(
            self.settings.read_timeout + self.settings.connect_timeout,
            work,
        )
        .await
        .map_err(|_| PullError::Deadline {
            image: image.to_string(),
        })?
    }

    /// Whether the registry, now, lets `auth` read `image`'s manifest. Used before a cached
    /// private image starts for an order.
    pub async fn check_access(
        &self,
        image: &ImageRef,
        auth: WireAuth,
        secret_id: Option<&str>,
    ) -> Result<(), PullError> {
        let work = async {
            let attempts = self.settings.retries;
            let session = self.open_session(image, &auth, secret_id).await?;
            retry(attempts, || session.manifest(image.reference()))
                .await
                .map(|_| ())
        };
        tokio::time::timeout(
            self.settings.read_timeout + self.settings.connect_timeout,
            work,
        )
        .await
        .map_err(|_| PullError::Deadline {
            image: image.to_string(),
        })?
    }
}
