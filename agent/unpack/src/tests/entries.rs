//! Every entry type and metadata item, checked with lstat and getxattr.

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use tar::{EntryType, Header};

    use crate::apply::Whiteouts;
    use crate::compression::Compression;
    use crate::tests::fixture::{read, xattr, Blob, Layer, Scratch, MTIME};

    /// `security.capability` v2 granting cap_net_bind_service, effective.
    const CAPABILITY: [u8; 20] = [
        0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    fn octal12(value: u64) -> [u8; 12] {
        let mut field = [0u8; 12];
        field[..11].copy_from_slice(format!("{value:011o}").as_bytes());
        field
    }

    /// A GNU sparse entry: "head" at 0, "tail" at 1 MiB, a hole between.
    fn sparse_blocks() -> Vec<u8> {
        let mut header = Header::new_gnu();
        header.set_path("sparse").unwrap();
        header.set_entry_type(EntryType::GNUSparse);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_size(516);
        let gnu = header.as_gnu_mut().unwrap();
        gnu.sparse[0].offset = octal12(0);
        gnu.sparse[0].numbytes = octal12(512);
        gnu.sparse[1].offset = octal12(1 << 20);
        gnu.sparse[1].numbytes = octal12(4);
        gnu.realsize = octal12((1 << 20) + 4);
        header.set_cksum();
        let mut blocks = header.as_bytes().to_vec();
        // Every chunk but the last is a whole number of blocks.
        let mut data = b"head".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"tail");
        data.resize(1024, 0);
        blocks.extend(data);
        blocks
    }

    #[test]
    fn every_entry_type_and_metadata() {
        let scratch = Scratch::new();
        let long_dir = format!("long/{}", "d".repeat(120));
        let long_target = format!("/{}", "t".repeat(150));
        let mut layer = Layer::new();
        layer
            .owned_dir("d", 0o750, 1000, 1001)
            .file_with("d/setuid", b"suid", 0o4755, (1000, 1000), MTIME + 1)
            .file_with("d/setgid", b"sgid", 0o2711, (0, 50), MTIME + 2)
            .dir("tmp", 0o1777)
            .symlink("d/link", "setuid")
            .hardlink_with("d/hard", "d/setuid", 0o4755, (1000, 1000), MTIME + 1)
            .node("dev/null", EntryType::Char, (1, 3), 0o666)
            .node("dev/loop0", EntryType::Block, (7, 0), 0o660)
            .node("d/fifo", EntryType::Fifo, (0, 0), 0o640)
            .pax(&[
                ("SCHILY.xattr.user.note", b"hello"),
                ("SCHILY.xattr.security.capability", &CAPABILITY),
                ("mtime", b"1600000123.5"),
            ])
            .file_with("d/cap", b"cap", 0o755, (7, 7), MTIME)
            .pax(&[("SCHILY.xattr.user.dir", b"yes")])
            .dir("xdir", 0o755)
            .pax(&[
                ("SCHILY.xattr.trusted.fifo", b"f"),
                ("SCHILY.xattr.user.refused-on-fifos", b"skipped"),
            ])
            .node("xfifo", EntryType::Fifo, (0, 0), 0o600)
            .file(&format!("{long_dir}/gnu-long-name"), b"long")
            .pax(&[("path", b"pax/named/file")])
            .file("short-name-replaced-by-pax", b"pax")
            .symlink("longlink", &long_target)
            .raw_blocks(&sparse_blocks());
        let applied = layer
            .blob(Compression::Gzip)
            .apply(&scratch.root, Whiteouts::Remove)
            .unwrap();
        assert_eq!(applied.entries, 16);

        let meta = |path: &str| std::fs::symlink_metadata(scratch.path(path)).unwrap();
        let d = meta("d");
        assert!(d.is_dir());
        assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o750, 1000, 1001));
        // Set after its children were written.
        assert_eq!(d.mtime(), MTIME as i64);

        let setuid = meta("d/setuid");
        assert_eq!(
            (setuid.mode() & 0o7777, setuid.uid(), setuid.gid()),
            (0o4755, 1000, 1000)
        );
        assert_eq!(setuid.mtime(), (MTIME + 1) as i64);
        assert_eq!(read(&scratch.path("d/setuid")), "suid");
        assert_eq!(meta("d/setgid").mode() & 0o7777, 0o2711);
        assert_eq!(meta("d/setgid").gid(), 50);
        assert_eq!(meta("tmp").mode() & 0o7777, 0o1777);

        let link = meta("d/link");
        assert!(link.file_type().is_symlink());
        assert_eq!(
            std::fs::read_link(scratch.path("d/link")).unwrap().to_str(),
            Some("setuid")
        );
        assert_eq!(link.mtime(), MTIME as i64);

        let hard = meta("d/hard");
        assert_eq!(hard.ino(), setuid.ino());
        assert_eq!(hard.nlink(), 2);

        let null = meta("dev/null");
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
        assert_eq!(null.mode() & 0o7777, 0o666);
        let loop0 = meta("dev/loop0");
        assert!(loop0.file_type().is_block_device());
        assert_eq!(loop0.rdev(), rustix::fs::makedev(7, 0));
        let fifo = meta("d/fifo");
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o640);
        assert_eq!(fifo.mtime(), MTIME as i64);

        let cap = meta("d/cap");
        assert_eq!((cap.uid(), cap.gid()), (7, 7));
        assert_eq!(
            (cap.mtime(), cap.mtime_nsec()),
            (1_600_000_123, 500_000_000)
        );
        assert_eq!(
            xattr(&scratch.path("d/cap"), "user.note").as_deref(),
            Some(&b"hello"[..])
        );
        // Set after chown, which would have cleared it.
        assert_eq!(
            xattr(&scratch.path("d/cap"), "security.capability").as_deref(),
            Some(&CAPABILITY[..])
        );
        assert_eq!(
            xattr(&scratch.path("xdir"), "user.dir").as_deref(),
            Some(&b"yes"[..])
        );
        assert_eq!(
            xattr(&scratch.path("xfifo"), "trusted.fifo").as_deref(),
            Some(&b"f"[..])
        );

        assert_eq!(
            read(&scratch.path(&format!("{long_dir}/gnu-long-name"))),
            "long"
        );
        assert_eq!(read(&scratch.path("pax/named/file")), "pax");
        assert!(!scratch.path("short-name-replaced-by-pax").exists());
        assert_eq!(
            std::fs::read_link(scratch.path("longlink"))
                .unwrap()
                .to_str(),
            Some(long_target.as_str())
        );

        let sparse = std::fs::read(scratch.path("sparse")).unwrap();
        assert_eq!(sparse.len(), (1 << 20) + 4);
        assert_eq!(&sparse[..4], b"head");
        assert_eq!(&sparse[1 << 20..], b"tail");
        assert!(sparse[4..1 << 20].iter().all(|byte| *byte == 0));
        assert!(
            meta("sparse").blocks() * 512 < 1 << 20,
            "the hole was written"
        );

        // Missing parents are created 0755.
        assert_eq!(meta("dev").mode() & 0o7777, 0o755);
        scratch.assert_outside_untouched();
    }

    /// As containerd's applier does: the link entry's own header (owner, mode, times) is
    /// applied to the inode the link shares, and chowning drops file capabilities.
    #[test]
    fn a_hardlink_entry_sets_the_shared_inodes_metadata() {
        let scratch = Scratch::new();
        let mut layer = Layer::new();
        layer
            .pax(&[("SCHILY.xattr.security.capability", &CAPABILITY)])
            .file_with("caps", b"bin", 0o4755, (7, 8), MTIME + 5)
            .hardlink_with("caps-link", "caps", 0o640, (1, 2), MTIME + 9);
        layer
            .blob(Compression::None)
            .apply(&scratch.root, Whiteouts::Remove)
            .unwrap();
        let meta = std::fs::symlink_metadata(scratch.path("caps")).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.mtime()),
            (0o640, 1, 2, (MTIME + 9) as i64)
        );
        assert_eq!(meta.nlink(), 2);
        assert_eq!(xattr(&scratch.path("caps"), "security.capability"), None);
        scratch.assert_outside_untouched();
    }

    #[test]
    fn replaces_what_is_there() {
        let scratch = Scratch::new();
        std::fs::create_dir_all(scratch.path("dir-to-file/child")).unwrap();
        std::fs::write(scratch.path("file-to-dir"), b"old").unwrap();
        std::fs::create_dir(scratch.path("kept")).unwrap();
        std::fs::write(scratch.path("kept/inside"), b"stays").unwrap();
        std::fs::write(scratch.path("file-to-link"), b"old").unwrap();
        std::fs::write(
            scratch.path("file-to-file"),
            b"old contents that are longer",
        )
        .unwrap();
        let mut layer = Layer::new();
        layer
            .file("dir-to-file", b"now a file")
            .dir("file-to-dir", 0o700)
            .owned_dir("kept", 0o711, 3, 4)
            .symlink("file-to-link", "kept")
            .file("file-to-file", b"new");
        layer
            .blob(Compression::None)
            .apply(&scratch.root, Whiteouts::Remove)
            .unwrap();
        assert_eq!(read(&scratch.path("dir-to-file")), "now a file");
        assert!(scratch.path("file-to-dir").is_dir());
        let kept = std::fs::metadata(scratch.path("kept")).unwrap();
        assert_eq!(
            (kept.mode() & 0o7777, kept.uid(), kept.gid()),
            (0o711, 3, 4)
        );
        assert_eq!(read(&scratch.path("kept/inside")), "stays");
        assert!(std::fs::symlink_metadata(scratch.path("file-to-link"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(read(&scratch.path("file-to-file")), "new");
        scratch.assert_outside_untouched();
    }

    #[test]
    fn all_compressions_apply_the_same_tree() {
        let mut layer = Layer::new();
        layer.dir("a", 0o755).file("a/b", &[42u8; 100_000]);
        let tar = layer.tar();
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let scratch = Scratch::new();
            let blob = Blob::new(&tar, compression);
            let applied = blob.apply(&scratch.root, Whiteouts::Remove).unwrap();
            assert_eq!(applied.uncompressed_size, tar.len() as u64);
            assert_eq!(applied.compressed_size, blob.bytes.len() as u64);
            assert_eq!(applied.diff_id, blob.spec.diff_id);
            assert_eq!(
                std::fs::read(scratch.path("a/b")).unwrap(),
                vec![42u8; 100_000]
            );
        }
    }
}
