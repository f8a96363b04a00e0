//! Hostile layers: nothing may be written, changed or removed outside the
//! root, whatever the names, links and types say.

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use tar::EntryType;

    use crate::apply::{Limits, Whiteouts};
    use crate::compression::Compression;
    use crate::error::{ApplyError, ApplyErrorKind};
    use crate::tests::fixture::{read, Layer, Scratch};

    fn both_modes() -> [Whiteouts; 2] {
        [Whiteouts::Remove, Whiteouts::Overlay { lowers: Vec::new() }]
    }

    #[test]
    fn dotdot_names_are_refused() {
        for name in [
            &b"../escape"[..],
            b"a/../../escape",
            b"/../escape",
            b"./../canary",
        ] {
            for whiteouts in both_modes() {
                let scratch = Scratch::new();
                let err = Layer::new()
                    .raw(EntryType::Regular, name, b"", b"pwned")
                    .blob(Compression::Gzip)
                    .apply(&scratch.root, whiteouts)
                    .unwrap_err();
                assert!(matches!(err, ApplyError::PathEscape { .. }), "{err:?}");
                assert_eq!(err.kind(), ApplyErrorKind::InvalidLayer);
                scratch.assert_outside_untouched();
            }
        }
    }

    #[test]
    fn absolute_names_land_inside_the_root() {
        let mut scratch = Scratch::new();
        let unique = scratch.host_name("/");
        Layer::new()
            .raw(
                EntryType::Regular,
                format!("/{unique}").as_bytes(),
                b"",
                b"inside",
            )
            .blob(Compression::None)
            .apply(&scratch.root, Whiteouts::Remove)
            .unwrap();
        assert_eq!(read(&scratch.path(&unique)), "inside");
        scratch.assert_outside_untouched();
    }

    #[test]
    fn writes_through_a_symlink_to_slash_stay_inside() {
        for whiteouts in both_modes() {
            let mut scratch = Scratch::new();
            let unique = scratch.host_name("/etc");
            Layer::new()
                .symlink("escape", "/")
                .file(&format!("escape/etc/{unique}"), b"inside")
                .symlink("absolute", scratch.dir.path().to_str().unwrap())
                .file("absolute/canary", b"pwned")
                .file("absolute/outside/new", b"pwned")
                .blob(Compression::Gzip)
                .apply(&scratch.root, whiteouts)
                .unwrap();
            assert_eq!(read(&scratch.path(&format!("etc/{unique}"))), "inside");
            let inside = scratch
                .root
                .join(scratch.dir.path().strip_prefix("/").unwrap());
            assert_eq!(read(&inside.join("canary")), "pwned");
            scratch.assert_outside_untouched();
        }
    }

    #[test]
    fn writes_through_a_relative_escape_symlink_stay_inside() {
        let scratch = Scratch::new();
        Layer::new()
            .symlink("up", "../../..")
            .file("up/canary", b"pwned")
            .file("up/outside/canary", b"pwned")
            .dir("up/outside", 0o777)
            .blob(Compression::Zstd)
            .apply(&scratch.root, Whiteouts::Remove)
            .unwrap();
        assert_eq!(read(&scratch.path("canary")), "pwned");
        assert_eq!(read(&scratch.path("outside/canary")), "pwned");
        scratch.assert_outside_untouched();
    }

    #[test]
    fn an_entry_replaces_a_symlink_instead_of_writing_through_it() {
        let scratch = Scratch::new();
        let outside_file = scratch.dir.path().join("outside/canary");
        let outside_dir = scratch.dir.path().join("outside");
        let mut layer = Layer::new();
        layer
            .symlink("file", outside_file.to_str().unwrap())
            .symlink("dir", outside_dir.to_str().unwrap())
            .symlink("node", outside_file.to_str().unwrap())
            .file_with("file", b"pwned", 0o777, (1, 1), 0)
            .dir("dir", 0o777)
            .node("node", EntryType::Char, (1, 3), 0o666)
            .hardlink("linked", "file");
        layer
            .blob(Compression::Gzip)
            .apply(&scratch.root, Whiteouts::Remove)
            .unwrap();
        assert_eq!(read(&scratch.path("file")), "pwned");
        assert!(scratch.path("dir").is_dir());
        assert!(std::fs::symlink_metadata(scratch.path("node"))
            .unwrap()
            .file_type()
            .is_char_device());
        scratch.assert_outside_untouched();
    }

    #[test]
    fn hardlinks_outside_the_root_are_refused() {
        let passwd_links = std::fs::metadata("/etc/passwd")
            .map(|meta| meta.nlink())
            .ok();
        let outside = "../outside/canary".to_owned();
        let absolute = "/etc/passwd".to_owned();
        for target in [&absolute, &outside] {
            for whiteouts in both_modes() {
                let scratch = Scratch::new();
                let err = Layer::new()
                    .raw(EntryType::Link, b"stolen", target.as_bytes(), b"")
                    .blob(Compression::Gzip)
                    .apply(&scratch.root, whiteouts)
                    .unwrap_err();
                assert!(
                    matches!(err, ApplyError::HardlinkTarget { .. }),
                    "{target}: {err:?}"
                );
                assert_eq!(err.kind(), ApplyErrorKind::InvalidLayer);
                assert!(!scratch.path("stolen").exists());
                scratch.assert_outside_untouched();
            }
        }
        // Through a symlink that points out: resolved inside, so missing.
        let scratch = Scratch::new();
        let err = Layer::new()
            .symlink("host", "/")
            .raw(EntryType::Link, b"stolen", b"host/etc/passwd", b"")
            .blob(Compression::None)
            .apply(&scratch.root, Whiteouts::Remove)
            .unwrap_err();
        assert!(matches!(err, ApplyError::HardlinkTarget { .. }), "{err:?}");
        scratch.assert_outside_untouched();
        assert_eq!(
            std::fs::metadata("/etc/passwd")
                .map(|meta| meta.nlink())
                .ok(),
            passwd_links
        );
    }

    #[test]
    fn a_device_named_like_an_existing_file_replaces_it() {
        let scratch = Scratch::new();
        std::fs::create_dir(scratch.path("etc")).unwrap();
        std::fs::write(scratch.path("etc/passwd"), b"root:x:0:0").unwrap();
        std::os::unix::fs::symlink(
            scratch.dir.path().join("outside/canary"),
            scratch.path("etc/shadow"),
        )
        .unwrap();
        Layer::new()
            .node("etc/passwd", EntryType::Char, (1, 3), 0o666)
            .node("etc/shadow", EntryType::Block, (7, 0), 0o600)
            .blob(Compression::Gzip)
            .apply(&scratch.root, Whiteouts::Remove)
            .unwrap();
        let passwd = std::fs::symlink_metadata(scratch.path("etc/passwd")).unwrap();
        assert!(passwd.file_type().is_char_device());
        assert_eq!(passwd.rdev(), rustix::fs::makedev(1, 3));
        let shadow = std::fs::symlink_metadata(scratch.path("etc/shadow")).unwrap();
        assert!(shadow.file_type().is_block_device());
        scratch.assert_outside_untouched();
    }

    #[test]
    fn whiteouts_through_symlinks_stay_inside() {
        for whiteouts in both_modes() {
            let scratch = Scratch::new();
            let outside = scratch.dir.path().join("outside");
            Layer::new()
                .symlink("out", outside.to_str().unwrap())
                .symlink("up", "../..")
                .file("out/.wh.canary", b"")
                .file("up/.wh.canary", b"")
                .file("out/.wh..wh..opq", b"")
                .blob(Compression::Gzip)
                .apply(&scratch.root, whiteouts)
                .unwrap();
            scratch.assert_outside_untouched();
        }
    }

    #[test]
    fn tar_bombs_stop_at_the_limits() {
        let mut layer = Layer::new();
        for index in 0..1000 {
            layer.file(&format!("bomb/{index}"), b"x");
        }
        let blob = layer.blob(Compression::Gzip);
        let scratch = Scratch::new();
        let limits = Limits {
            max_entries: 100,
            ..Limits::default()
        };
        let err = blob
            .apply_limited(&scratch.root, Whiteouts::Remove, &limits)
            .unwrap_err();
        assert!(
            matches!(err, ApplyError::TooManyEntries { limit: 100 }),
            "{err:?}"
        );
        assert_eq!(err.kind(), ApplyErrorKind::LimitExceeded);
        assert!(std::fs::read_dir(scratch.path("bomb")).unwrap().count() <= 100);
        scratch.assert_outside_untouched();

        let zeros = Layer::new()
            .file("zeros", &vec![0u8; 4 << 20])
            .blob(Compression::Zstd);
        let scratch = Scratch::new();
        let limits = Limits {
            max_uncompressed_bytes: 1 << 20,
            ..Limits::default()
        };
        let err = zeros
            .apply_limited(&scratch.root, Whiteouts::Remove, &limits)
            .unwrap_err();
        assert!(matches!(err, ApplyError::TooLarge { .. }), "{err:?}");
        assert!(std::fs::metadata(scratch.path("zeros")).unwrap().len() <= 1 << 20);
        scratch.assert_outside_untouched();
    }

    #[test]
    fn malformed_entries_are_invalid() {
        let scratch = Scratch::new();
        for (entry_type, name) in [
            (EntryType::Regular, &b".wh."[..]),
            (EntryType::Regular, b"dir/.wh.."),
            (EntryType::new(b'V'), b"volume-label"),
        ] {
            let err = Layer::new()
                .raw(entry_type, name, b"", b"")
                .blob(Compression::None)
                .apply(&scratch.root, Whiteouts::Remove)
                .unwrap_err();
            assert_eq!(err.kind(), ApplyErrorKind::InvalidLayer, "{err:?}");
        }
        scratch.assert_outside_untouched();
    }
}
