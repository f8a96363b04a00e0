//! Stacked layers where later ones delete, replace and make opaque what
//! earlier ones wrote: applied into one tree, and as overlay upperdirs that
//! are then really mounted.

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::{Path, PathBuf};

    use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};

    use crate::apply::Whiteouts;
    use crate::compression::Compression;
    use crate::tests::fixture::{xattr, Blob, Layer};

    fn layers() -> [Blob; 3] {
        let first = Layer::new()
            .owned_dir("etc", 0o751, 3, 4)
            .file("etc/a", b"one")
            .file("etc/b", b"b")
            .dir("opt", 0o755)
            .file("opt/x", b"x")
            .file("opt/sub/y", b"y")
            .dir("var", 0o755)
            .file("var/old", b"old")
            .blob(Compression::Gzip);
        // No "etc" entry: the upperdir's etc copies the lower one.
        let second = Layer::new()
            .file("etc/.wh.a", b"")
            .file("etc/b", b"b2")
            .dir("opt", 0o755)
            .file("opt/.wh..wh..opq", b"")
            .file("opt/new", b"new")
            .dir("var/old", 0o755)
            .file("var/old/inner", b"i")
            .blob(Compression::Zstd);
        let third = Layer::new()
            .file(".wh.var", b"")
            .file("etc/a", b"back")
            .file("opt/x", b"x3")
            .blob(Compression::Gzip);
        [first, second, third]
    }

    /// Every path under `root` with its type and contents.
    fn tree(root: &Path) -> BTreeMap<String, String> {
        let mut seen = BTreeMap::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(directory) = pending.pop() {
            for child in std::fs::read_dir(&directory).unwrap() {
                let path = child.unwrap().path();
                let relative = path.strip_prefix(root).unwrap().display().to_string();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    seen.insert(relative, "dir".to_owned());
                    pending.push(path);
                } else {
                    seen.insert(
                        relative,
                        String::from_utf8(std::fs::read(&path).unwrap()).unwrap(),
                    );
                }
            }
        }
        seen
    }

    fn expected(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(path, contents)| ((*path).to_owned(), (*contents).to_owned()))
            .collect()
    }

    fn after_second() -> BTreeMap<String, String> {
        expected(&[
            ("etc", "dir"),
            ("etc/b", "b2"),
            ("opt", "dir"),
            ("opt/new", "new"),
            ("var", "dir"),
            ("var/old", "dir"),
            ("var/old/inner", "i"),
        ])
    }

    fn after_third() -> BTreeMap<String, String> {
        expected(&[
            ("etc", "dir"),
            ("etc/a", "back"),
            ("etc/b", "b2"),
            ("opt", "dir"),
            ("opt/new", "new"),
            ("opt/x", "x3"),
        ])
    }

    #[test]
    fn tree_mode_deletes_replaces_and_hides() {
        let scratch = tempfile::tempdir().unwrap();
        let root = scratch.path();
        let [first, second, third] = layers();
        first.apply(root, Whiteouts::Remove).unwrap();
        assert_eq!(tree(root).len(), 9);
        second.apply(root, Whiteouts::Remove).unwrap();
        assert_eq!(tree(root), after_second());
        third.apply(root, Whiteouts::Remove).unwrap();
        assert_eq!(tree(root), after_third());
    }

    #[test]
    fn tree_mode_opaque_keeps_what_the_same_layer_wrote() {
        let scratch = tempfile::tempdir().unwrap();
        let root = scratch.path();
        Layer::new()
            .file("d/old", b"old")
            .file("d/keep/old", b"old")
            .blob(Compression::None)
            .apply(root, Whiteouts::Remove)
            .unwrap();
        // The marker comes after the entries it must keep.
        Layer::new()
            .file("d/new", b"new")
            .dir("d/keep", 0o755)
            .file("d/keep/new", b"new")
            .file("d/.wh..wh..opq", b"")
            .blob(Compression::None)
            .apply(root, Whiteouts::Remove)
            .unwrap();
        assert_eq!(
            tree(root),
            expected(&[
                ("d", "dir"),
                ("d/new", "new"),
                ("d/keep", "dir"),
                ("d/keep/new", "new"),
            ])
        );
    }

    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = unmount(&self.0, UnmountFlags::DETACH);
        }
    }

    fn mount_overlay(lowers: &[&Path], merged: &Path) -> Mounted {
        let lowerdir = lowers
            .iter()
            .map(|lower| lower.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let options = std::ffi::CString::new(format!("lowerdir={lowerdir}")).unwrap();
        mount(
            "overlay",
            merged,
            "overlay",
            MountFlags::RDONLY,
            options.as_c_str(),
        )
        .unwrap();
        Mounted(merged.to_path_buf())
    }

    #[test]
    fn overlay_mode_upperdirs_mount_to_the_same_view() {
        let scratch = tempfile::tempdir().unwrap();
        let upper = |index: usize| scratch.path().join(format!("upper{index}"));
        for index in 1..=3 {
            std::fs::create_dir(upper(index)).unwrap();
        }
        let merged = scratch.path().join("merged");
        std::fs::create_dir(&merged).unwrap();
        let [first, second, third] = layers();
        first
            .apply(&upper(1), Whiteouts::Overlay { lowers: Vec::new() })
            .unwrap();
        second
            .apply(
                &upper(2),
                Whiteouts::Overlay {
                    lowers: vec![upper(1)],
                },
            )
            .unwrap();
        third
            .apply(
                &upper(3),
                Whiteouts::Overlay {
                    lowers: vec![upper(2), upper(1)],
                },
            )
            .unwrap();

        // What the upperdir itself holds.
        let whiteout = std::fs::symlink_metadata(upper(2).join("etc/a")).unwrap();
        assert!(whiteout.file_type().is_char_device());
        assert_eq!(whiteout.rdev(), 0);
        assert!(!upper(2).join("etc/.wh.a").exists());
        assert!(!upper(2).join("opt/.wh..wh..opq").exists());
        assert_eq!(
            xattr(&upper(2).join("opt"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        let etc = std::fs::metadata(upper(2).join("etc")).unwrap();
        assert_eq!((etc.mode() & 0o7777, etc.uid(), etc.gid()), (0o751, 3, 4));
        assert!(std::fs::symlink_metadata(upper(3).join("var"))
            .unwrap()
            .file_type()
            .is_char_device());

        {
            let _mounted = mount_overlay(&[&upper(2), &upper(1)], &merged);
            assert_eq!(tree(&merged), after_second());
        }
        let _mounted = mount_overlay(&[&upper(3), &upper(2), &upper(1)], &merged);
        assert_eq!(tree(&merged), after_third());
    }

    #[test]
    fn a_layer_applied_before_its_lowers_ends_as_if_applied_on_them() {
        let scratch = tempfile::tempdir().unwrap();
        let upper = |index: usize| scratch.path().join(format!("upper{index}"));
        std::fs::create_dir(upper(1)).unwrap();
        let staging = scratch.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let [first, second, _] = layers();
        // The child first, with no lower in sight; its parent after.
        let applied = second.apply(&staging, Whiteouts::OverlayDeferred).unwrap();
        first
            .apply(&upper(1), Whiteouts::Overlay { lowers: Vec::new() })
            .unwrap();
        assert_eq!(
            applied.implied_dirs,
            vec![PathBuf::from("etc"), PathBuf::from("var")],
            "opt has an entry of its own"
        );
        let etc = std::fs::metadata(staging.join("etc")).unwrap();
        assert_eq!((etc.mode() & 0o7777, etc.uid(), etc.gid()), (0o755, 0, 0));

        std::fs::rename(&staging, upper(2)).unwrap();
        crate::apply::inherit_lower_metadata(&upper(2), &[upper(1)], &applied.implied_dirs)
            .unwrap();
        let etc = std::fs::metadata(upper(2).join("etc")).unwrap();
        assert_eq!((etc.mode() & 0o7777, etc.uid(), etc.gid()), (0o751, 3, 4));
        let merged = scratch.path().join("merged");
        std::fs::create_dir(&merged).unwrap();
        let _mounted = mount_overlay(&[&upper(2), &upper(1)], &merged);
        assert_eq!(tree(&merged), after_second());
    }

    #[test]
    fn implied_directories_end_alike_with_deferred_and_with_known_lowers() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let path = scratch.path().join(name);
            std::fs::create_dir(&path).unwrap();
            path
        };
        let lower = dir("lower");
        Layer::new()
            .owned_dir("a", 0o700, 5, 6)
            .owned_dir("a/b", 0o2750, 7, 8)
            .blob(Compression::Gzip)
            .apply(&lower, Whiteouts::Overlay { lowers: Vec::new() })
            .unwrap();
        // a/b and a/b/c are implied; "a" comes after its children, with metadata of its own.
        let child = Layer::new()
            .file("a/b/c/file", b"f")
            .owned_dir("a", 0o711, 9, 10)
            .blob(Compression::Gzip);
        let known = dir("known");
        child
            .apply(
                &known,
                Whiteouts::Overlay {
                    lowers: vec![lower.clone()],
                },
            )
            .unwrap();
        let deferred = dir("deferred");
        let applied = child.apply(&deferred, Whiteouts::OverlayDeferred).unwrap();
        assert_eq!(
            applied.implied_dirs,
            vec![PathBuf::from("a/b"), PathBuf::from("a/b/c")]
        );
        crate::apply::inherit_lower_metadata(&deferred, &[lower], &applied.implied_dirs).unwrap();
        for root in [&known, &deferred] {
            let meta = |path: &str| {
                let meta = std::fs::metadata(root.join(path)).unwrap();
                (meta.mode() & 0o7777, meta.uid(), meta.gid())
            };
            assert_eq!(meta("a"), (0o711, 9, 10), "the entry's own, in {root:?}");
            assert_eq!(meta("a/b"), (0o2750, 7, 8), "the lower's, in {root:?}");
            assert_eq!(
                meta("a/b/c"),
                (0o755, 0, 8),
                "no lower has it; made in a setgid directory, in {root:?}"
            );
        }
    }
}
