//! Image cleanup: image records that no container references are deleted, oldest first, until the
//! unused images take at most a byte budget. Each delete runs containerd's GC synchronously,
//! which removes their blobs and snapshots unless a remaining image or a container still uses
//! them. An image in use is never deleted: usage is checked again under the image's lock, right
//! before its delete.

use std::collections::{HashMap, HashSet};

use tracing::{info, instrument};

use super::{RunError, Runner, LABEL_IMAGE};
use berth_registry::pull::manifest::{self, Manifest, Parsed};
use berth_runtime::containerd::{Containerd, ContainerdError, ListedImage};

/// Largest manifest or index read while sizing an image.
const MAX_DOCUMENT: u64 = 4 << 20;

/// What a prune removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PruneReport {
    /// Image names, in the order they were deleted.
    pub(crate) removed: Vec<String>,
    /// Bytes of the blobs that no remaining image references.
    pub(crate) freed_bytes: u64,
}

/// One image as the selection sees it: its age and its blobs (digest -> size).
#[derive(Debug, Clone)]
struct SizedImage {
    name: String,
    /// (seconds, nanos) of the record's creation; unknown sorts first.
    created: (i64, i32),
    blobs: HashMap<String, u64>,
}

impl Runner {
    /// Deletes images no container references, oldest first, until the unused ones take at most
    /// `keep_bytes` (0: every unused image).
    #[instrument(skip_all, fields(keep_bytes = keep_bytes))]
    pub(crate) async fn prune_images(&self, keep_bytes: u64) -> Result<PruneReport, RunError> {
        let listed = self
            .containerd
            .list_images()
            .await
            .map_err(prune_error(""))?;
        let in_use = self.images_in_use().await?;
        let mut images = Vec::with_capacity(listed.len());
        for image in &listed {
            let blobs = image_blobs(&self.containerd, image)
                .await
                .map_err(prune_error(&image.name))?;
            images.push(SizedImage {
                name: image.name.clone(),
                created: image
                    .created_at
                    .as_ref()
                    .map_or((i64::MIN, 0), |ts| (ts.seconds, ts.nanos)),
                blobs,
            });
        }
        let planned = plan(&images, &in_use, keep_bytes);

        let mut removed = Vec::with_capacity(planned.len());
        for name in planned {
            // Orders for this image wait while it goes; one may have used it since the listing.
            let _image_guard = self.image_locks.write(format!("image/{name}")).await;
            if self.images_in_use().await?.contains(&name) {
                info!(image = %name, "image came into use; keeping it");
                continue;
            }
            self.containerd
                .delete_image(&name)
                .await
                .map_err(prune_error(&name))?;
            info!(image = %name, "unused image removed");
            removed.push(name);
        }
        let freed_bytes = freed(&images, &removed);
        info!(removed = removed.len(), freed_bytes, "image prune finished");
        Ok(PruneReport {
            removed,
            freed_bytes,
        })
    }

    /// Names of the images some container of the namespace was created from (berth's or not).
    pub(super) async fn images_in_use(&self) -> Result<HashSet<String>, RunError> {
        let containers = self
            .containerd
            .list_containers(Vec::new())
            .await
            .map_err(prune_error(""))?;
        let mut names = HashSet::new();
        for container in containers {
            if let Some(image) = container.labels.get(LABEL_IMAGE) {
                names.insert(image.clone());
            }
            if !container.image.is_empty() {
                names.insert(container.image);
            }
        }
        Ok(names)
    }
}

pub(super) fn prune_error(image: &str) -> impl FnOnce(ContainerdError) -> RunError {
    let image = image.to_owned();
    move |source| RunError::Prune { image, source }
}

/// The images to delete, in order: every unused one when `keep_bytes` is 0; otherwise the
/// oldest unused ones until the bytes only unused images hold are at most `keep_bytes`.
fn plan(images: &[SizedImage], in_use: &HashSet<String>, keep_bytes: u64) -> Vec<String> {
    let used_blobs: HashSet<&str> = images
        .iter()
        .filter(|image| in_use.contains(&image.name))
        .flat_map(|image| image.blobs.keys().map(String::as_str))
        .collect();
    let mut unused: Vec<&SizedImage> = images
        .iter()
        .filter(|image| !in_use.contains(&image.name))
        .collect();
    unused.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    if keep_bytes == 0 {
        return unused.into_iter().map(|image| image.name.clone()).collect();
    }
    let mut planned = Vec::new();
    let mut remaining = unused.as_slice();
    while let Some((oldest, rest)) = remaining.split_first() {
        if exclusive_bytes(remaining, &used_blobs) <= keep_bytes {
            break;
        }
        planned.push(oldest.name.clone());
        remaining = rest;
    }
    planned
}

/// Bytes of the blobs of `images` (each counted once) that no image in use references.
fn exclusive_bytes(images: &[&SizedImage], used_blobs: &HashSet<&str>) -> u64 {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for image in images {
        for (digest, size) in &image.blobs {
            if !used_blobs.contains(digest.as_str()) {
                seen.insert(digest, *size);
            }
        }
    }
    seen.values().sum()
}

/// Bytes of the blobs of the removed images that no remaining image references.
fn freed(images: &[SizedImage], removed: &[String]) -> u64 {
    let (gone, kept): (Vec<&SizedImage>, Vec<&SizedImage>) = images
        .iter()
        .partition(|image| removed.contains(&image.name));
    let kept_blobs: HashSet<&str> = kept
        .iter()
        .flat_map(|image| image.blobs.keys().map(String::as_str))
        .collect();
    exclusive_bytes(&gone, &kept_blobs)
}

/// Every blob an image record reaches that the content store has: the top object, the platform
/// manifests of an index, and their configs and layers.
async fn image_blobs(
    containerd: &Containerd,
    image: &ListedImage,
) -> Result<HashMap<String, u64>, ContainerdError> {
    let mut blobs = HashMap::from([(image.target_digest.clone(), image.target_size)]);
    let Some(top) = read_document(containerd, &image.target_digest).await? else {
        return Ok(blobs);
    };
    match manifest::parse(&top) {
        Ok(Parsed::Manifest(manifest)) => add_manifest(&mut blobs, &manifest),
        Ok(Parsed::Index(entries)) => {
            for entry in entries {
                let Some(bytes) = read_document(containerd, &entry.digest).await? else {
                    continue;
                };
                blobs.insert(entry.digest.clone(), entry.size);
                if let Ok(Parsed::Manifest(manifest)) = manifest::parse(&bytes) {
                    add_manifest(&mut blobs, &manifest);
                }
            }
        }
        Err(_) => {}
    }
    Ok(blobs)
}

fn add_manifest(blobs: &mut HashMap<String, u64>, manifest: &Manifest) {
    for desc in std::iter::once(&manifest.config).chain(&manifest.layers) {
        blobs.insert(desc.digest.clone(), desc.size);
    }
}

/// A manifest or index from the content store; None when absent (or too large to be one).
async fn read_document(
    containerd: &Containerd,
    digest: &str,
) -> Result<Option<Vec<u8>>, ContainerdError> {
    match containerd.read_blob(digest, MAX_DOCUMENT).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.is_not_found() => Ok(None),
        Err(ContainerdError::Protocol { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, created: i64, blobs: &[(&str, u64)]) -> SizedImage {
        SizedImage {
            name: name.to_owned(),
            created: (created, 0),
            blobs: blobs
                .iter()
                .map(|(digest, size)| ((*digest).to_owned(), *size))
                .collect(),
        }
    }

    fn in_use(names: &[&str]) -> HashSet<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn zero_removes_every_unused_image_oldest_first() {
        let images = [
            image("new", 30, &[("c", 30)]),
            image("used", 5, &[("u", 100)]),
            image("old", 10, &[("a", 10)]),
            // Shares its only blob with the image in use: still removed with a budget of 0.
            image("shared", 20, &[("u", 100)]),
        ];
        assert_eq!(
            plan(&images, &in_use(&["used"]), 0),
            ["old", "shared", "new"]
        );
    }

    #[test]
    fn a_budget_stops_once_the_unused_images_fit() {
        let images = [
            image("a", 1, &[("a", 10)]),
            image("b", 2, &[("b", 20)]),
            image("c", 3, &[("c", 30)]),
        ];
        let none = in_use(&[]);
        assert_eq!(plan(&images, &none, 35), ["a", "b"]);
        assert_eq!(plan(&images, &none, 50), ["a"]);
        assert!(plan(&images, &none, 60).is_empty());
        assert!(plan(&images, &none, 1000).is_empty());
    }

    #[test]
    fn blobs_of_images_in_use_do_not_count_against_the_budget() {
        let images = [
            image("used", 1, &[("base", 100), ("u", 5)]),
            image("old", 2, &[("base", 100), ("x", 10)]),
            image("new", 3, &[("base", 100), ("y", 10)]),
        ];
        // Unused bytes: x + y = 20 (base is in use).
        assert!(plan(&images, &in_use(&["used"]), 20).is_empty());
        assert_eq!(plan(&images, &in_use(&["used"]), 15), ["old"]);
    }

    #[test]
    fn images_in_use_are_never_planned() {
        let images = [image("used", 1, &[("u", 1000)])];
        assert!(plan(&images, &in_use(&["used"]), 0).is_empty());
        assert!(plan(&images, &in_use(&["used"]), 1).is_empty());
    }

    #[test]
    fn freed_counts_blobs_no_remaining_image_holds() {
        let images = [
            image("kept", 1, &[("base", 100), ("k", 5)]),
            image("gone", 2, &[("base", 100), ("g", 7), ("h", 3)]),
        ];
        assert_eq!(freed(&images, &["gone".to_owned()]), 10);
        assert_eq!(freed(&images, &[]), 0);
        assert_eq!(freed(&images, &["gone".to_owned(), "kept".to_owned()]), 115);
    }
}
