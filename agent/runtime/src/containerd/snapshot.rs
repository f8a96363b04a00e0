//! Extraction snapshots: an active snapshot a layer is written into, committed as the layer's
//! chain id, or removed when the layer fails. Shared by containerd's applier (`Diff.Apply`, in
//! `image.rs`) and by berth's own, which writes straight into the overlay upperdir.

use std::collections::HashMap;
use std::path::PathBuf;

use containerd_client::services::v1::snapshots::{CommitSnapshotRequest, PrepareSnapshotRequest};
use containerd_client::types::Mount;
use rand::Rng as _;

use super::{Containerd, ContainerdError, Lease};

/// The label that names the chain id an extraction snapshot is for, as containerd's unpacker
/// writes it (the CRI and GC read it).
const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

/// An active snapshot prepared for one layer: `extract-<nonce> <chain id>`.
#[derive(Debug)]
pub struct Extraction {
    key: String,
    chain_id: String,
    mounts: Vec<Mount>,
}

/// What preparing an extraction found.
#[derive(Debug)]
pub enum Prepared {
    /// The snapshot is ready to be written.
    Ready(Extraction),
    /// The chain id is committed already (another client unpacked the layer meanwhile).
    Committed,
}

/// An overlayfs snapshot's directories, for writing a layer without mounting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayDirs {
    /// Where the layer's entries go: the upperdir, or for a first layer the bind source.
    pub upper: PathBuf,
    /// The parent layers' directories, topmost first (empty for a first layer).
    pub lowers: Vec<PathBuf>,
}

impl Extraction {
    /// The snapshot key (`extract-<nonce> <chain id>`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The directories of an overlayfs snapshot: containerd's prepare returns one `overlay`
    /// mount (`upperdir=`, `lowerdir=`), or for a layer without parent one `bind` mount of
    /// the snapshot's directory. Any other shape is refused with the reason.
    pub fn overlay_dirs(&self) -> Result<OverlayDirs, &'static str> {
        let [mount] = self.mounts.as_slice() else {
            return Err("the snapshot has not exactly one mount");
        };
        let dirs = overlay_dirs(mount)?;
        // A read-only view of containerd's root (systemd's ProtectSystem= without it in
        // ReadWritePaths=) is a reason to let containerd apply, not a failed pull.
        if rustix::fs::access(&dirs.upper, rustix::fs::Access::WRITE_OK).is_err() {
            return Err("berthd cannot write the snapshot's directory (read-only to it)");
        }
        Ok(dirs)
    }

    /// Moves what was applied into `staged`'s directory into this snapshot's empty upperdir,
    /// which takes the place (the directory itself, renamed: nothing is copied) with the
    /// owner and mode containerd gave the upperdir. Both are directories of one snapshotter,
    /// so on one filesystem. `staged` is left without its directory, to be removed.
    pub fn take_staged(&self, staged: &Extraction) -> Result<(), ContainerdError> {
        let failed = |reason| ContainerdError::Protocol {
            op: "snapshots.prepare",
            reason,
        };
        let dirs = self.overlay_dirs().map_err(failed)?;
        let from = staged.overlay_dirs().map_err(failed)?;
        let moved = (|| {
            let upper = rustix::fs::stat(&dirs.upper)?;
            rustix::fs::chown(
                &from.upper,
                Some(rustix::fs::Uid::from_raw(upper.st_uid)),
                Some(rustix::fs::Gid::from_raw(upper.st_gid)),
            )?;
            rustix::fs::chmod(
                &from.upper,
                rustix::fs::Mode::from_raw_mode(upper.st_mode & 0o7777),
            )?;
            // rename(2) replaces an empty directory, and only an empty one.
            rustix::fs::rename(&from.upper, &dirs.upper)
        })();
        moved.map_err(|source| ContainerdError::SnapshotDir {
            op: "moving a staged layer into its snapshot",
            source: source.into(),
        })
    }

    /// The mounts, for an applier that mounts them (`Diff.Apply`).
    pub fn mounts(&self) -> &[Mount] {
        &self.mounts
    }
}

fn overlay_dirs(mount: &Mount) -> Result<OverlayDirs, &'static str> {
    let absolute = |path: &str| {
        let path = PathBuf::from(path);
        if path.is_absolute() {
            Ok(path)
        } else {
            Err("the snapshot's directories are not absolute paths")
        }
    };
    match mount.r#type.as_str() {
        "bind" if !mount.options.iter().any(|option| option == "ro") => Ok(OverlayDirs {
            upper: absolute(&mount.source)?,
            lowers: Vec::new(),
        }),
        "overlay" => {
            let mut upper = None;
            let mut lowers = Vec::new();
            for option in &mount.options {
                if let Some(dir) = option.strip_prefix("upperdir=") {
                    upper = Some(absolute(dir)?);
                } else if let Some(dirs) = option.strip_prefix("lowerdir=") {
                    for dir in dirs.split(':') {
                        lowers.push(absolute(dir)?);
                    }
                }
            }
            match upper {
                Some(upper) => Ok(OverlayDirs { upper, lowers }),
                None => Err("the overlay mount has no upperdir"),
            }
        }
        "bind" => Err("the snapshot is a read-only bind mount"),
        _ => Err("the snapshot is neither an overlay nor a bind mount"),
    }
}

impl Containerd {
    /// Prepares an active snapshot `<kind>-<nonce> <chain id>` on `parent` under `lease`.
    async fn prepare_keyed(
        &self,
        lease: &Lease,
        kind: &str,
        chain_id: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Extraction, tonic::Status> {
        let nonce: u32 = rand::rng().random();
        let key = format!("{kind}-{nonce:08x} {chain_id}");
        let reply = self
            .snapshots()
            .prepare(self.request(
                PrepareSnapshotRequest {
                    snapshotter: self.snapshotter().to_owned(),
                    key: key.clone(),
                    parent: parent.to_owned(),
                    labels,
                },
                Some(lease),
            ))
            .await?;
        Ok(Extraction {
            key,
            chain_id: chain_id.to_owned(),
            mounts: reply.into_inner().mounts,
        })
    }

    /// Prepares the extraction snapshot for `chain_id` on `parent` (empty for a first layer)
    /// under `lease`.
    pub async fn prepare_extraction(
        &self,
        lease: &Lease,
        chain_id: &str,
        parent: &str,
    ) -> Result<Prepared, ContainerdError> {
        let prepared = self
            .prepare_keyed(lease, "extract", chain_id, parent, snapshot_ref(chain_id))
            .await;
        match prepared {
            Ok(extraction) => Ok(Prepared::Ready(extraction)),
            // Another client committed this chain id meanwhile ("target snapshot exists"): the
            // layer is unpacked, as containerd's own unpacker concludes.
            Err(status)
                if status.code() == tonic::Code::AlreadyExists
                    && self.snapshot_exists(chain_id).await? =>
            {
                Ok(Prepared::Committed)
            }
            Err(status) => Err(ContainerdError::rpc("snapshots.prepare")(status)),
        }
    }

    /// Prepares a snapshot without parent for `chain_id`'s layer to be applied into while the
    /// layer below is not committed yet ([`Extraction::take_staged`] moves it into the real
    /// extraction later). It is never committed; the lease collects it if berthd stops.
    pub async fn prepare_staging(
        &self,
        lease: &Lease,
        chain_id: &str,
    ) -> Result<Extraction, ContainerdError> {
        self.prepare_keyed(lease, "stage", chain_id, "", HashMap::new())
            .await
            .map_err(ContainerdError::rpc("snapshots.prepare"))
    }

    /// Commits a written extraction as its chain id. When someone committed that chain id
    /// meanwhile, theirs is as good as ours: ours is removed. On any other failure it is
    /// removed too.
    pub async fn commit_extraction(
        &self,
        lease: &Lease,
        extraction: Extraction,
    ) -> Result<(), ContainerdError> {
        let committed = self
            .snapshots()
            .commit(self.request(
                CommitSnapshotRequest {
                    snapshotter: self.snapshotter().to_owned(),
                    name: extraction.chain_id.clone(),
                    key: extraction.key.clone(),
                    labels: snapshot_ref(&extraction.chain_id),
                },
                Some(lease),
            ))
            .await;
        match committed {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                self.remove_snapshot(&extraction.key).await.ok();
                Ok(())
            }
            Err(status) => {
                self.remove_snapshot(&extraction.key).await.ok();
                Err(ContainerdError::rpc("snapshots.commit")(status))
            }
        }
    }

    /// Removes an extraction whose layer failed.
    pub async fn discard_extraction(&self, extraction: Extraction) -> Result<(), ContainerdError> {
        self.remove_snapshot(&extraction.key).await
    }

    /// Labels a layer blob with the diff id its snapshot was made from, so containerd (and
    /// `ctr`) see the layer as unpacked.
    pub async fn mark_layer_uncompressed(
        &self,
        digest: &str,
        diff_id: &str,
    ) -> Result<(), ContainerdError> {
        self.update_content_labels(digest, uncompressed_label(diff_id))
            .await
    }
}

/// `containerd.io/uncompressed` = the diff id, the label a kept layer blob carries.
pub fn uncompressed_label(diff_id: &str) -> HashMap<String, String> {
    HashMap::from([("containerd.io/uncompressed".to_owned(), diff_id.to_owned())])
}

fn snapshot_ref(chain_id: &str) -> HashMap<String, String> {
    HashMap::from([(LABEL_SNAPSHOT_REF.to_owned(), chain_id.to_owned())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: kind.to_owned(),
            source: source.to_owned(),
            target: String::new(),
            options: options.iter().map(|o| (*o).to_owned()).collect(),
        }
    }

    #[test]
    fn an_overlay_mount_gives_its_upperdir_and_lowerdirs() {
        let dirs = overlay_dirs(&mount(
            "overlay",
            "overlay",
            &[
                "index=off",
                "workdir=/s/3/work",
                "upperdir=/s/3/fs",
                "lowerdir=/s/2/fs:/s/1/fs",
            ],
        ))
        .unwrap();
        assert_eq!(dirs.upper, PathBuf::from("/s/3/fs"));
        assert_eq!(
            dirs.lowers,
            vec![PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")]
        );
    }

    #[test]
    fn a_first_layer_is_a_writable_bind_mount() {
        let dirs = overlay_dirs(&mount("bind", "/s/1/fs", &["rw", "rbind"])).unwrap();
        assert_eq!(dirs.upper, PathBuf::from("/s/1/fs"));
        assert!(dirs.lowers.is_empty());
    }

    #[test]
    fn other_shapes_are_refused() {
        let refused = |kind, source, options| overlay_dirs(&mount(kind, source, options));
        assert_eq!(
            refused("bind", "/s/1/fs", &["ro", "rbind"]),
            Err("the snapshot is a read-only bind mount")
        );
        assert_eq!(
            refused("overlay", "overlay", &["lowerdir=/a:/b"]),
            Err("the overlay mount has no upperdir")
        );
        assert_eq!(
            refused("overlay", "overlay", &["upperdir=relative"]),
            Err("the snapshot's directories are not absolute paths")
        );
        assert_eq!(
            refused("btrfs", "/dev/sda", &[]),
            Err("the snapshot is neither an overlay nor a bind mount")
        );
        let two = Extraction {
            key: "k".to_owned(),
            chain_id: "c".to_owned(),
            mounts: vec![mount("bind", "/a", &[]), mount("bind", "/b", &[])],
        };
        assert_eq!(
            two.overlay_dirs(),
            Err("the snapshot has not exactly one mount")
        );
    }
}
