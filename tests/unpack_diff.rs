//! Issue 15: berthd's unpack against containerd's own, on one containerd. A layer corpus (every
//! entry type, owners, set-id and sticky modes, xattrs, mtimes, PAX and GNU long names, a GNU
//! sparse file, hardlinks, devices; later layers delete, replace and make opaque what earlier
//! ones wrote; OCI gzip, zstd and plain tar layers and a Docker gzip layer) is pulled once by
//! berthd (`Agent/PullImage`, berth's namespace) and once by `ctr images pull` (namespace
//! `containerd-unpack`, containerd's own unpacker). Every chain level is then mounted read-only
//! from both namespaces and the two trees are compared entry by entry: type, mode, owner, size,
//! content, link target, device numbers, xattrs, mtime, hardlink groups. The berth tree is also
//! checked against what the corpus means (whiteouts, opaque dirs, replacements), so two equally
//! wrong unpacks cannot pass.
//!
//! Each chain level is compared twice: merged (the view a container gets) and raw (the
//! snapshot's own layer dir, where overlay whiteouts are char devices 0:0 and opaque dirs carry
//! `trusted.overlay.opaque=y`, the form berth's applier must write).
//!
//! Tolerance: directory mtimes are compared, which holds because every layer of the corpus
//! carries an explicit entry for each directory it writes into (as image builders do); a
//! directory a layer only implies gets the time of the unpack, on both sides. Only the mtimes of
//! the whiteout devices in the raw layer dirs are not compared: containerd creates them at
//! unpack time and sets no time, so they differ between any two unpacks.
//!
//! Docker's `tar.zstd` layer type is in a test of its own: containerd 1.6 does not know it, and
//! berthd today refuses it on every version before any fetch (FAILED_PRECONDITION, "unsupported
//! layer media type"), so it waits for berth's own applier.

use anyhow::{bail, Context as _};
use berth::api::pb::PullImageRequest;
use tar::EntryType;

use crate::harness::env::{Env, RegistryKind};
use crate::harness::layers::{
    push_layers, Layer, LayerFormat, LayerTar, Meta, PushedLayers, BASE_MTIME,
};
use crate::harness::tree::{Kind, SnapshotView, Tolerance, Tree};

/// containerd's own unpack goes here.
const CONTAINERD_NAMESPACE: &str = "containerd-unpack";

/// Files in `many/`.
const MANY: usize = 300;

/// A `security.capability` value (VFS_CAP_REVISION_2, effective, CAP_NET_BIND_SERVICE).
const CAPABILITY: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// The sparse file: 4 KiB of `a`, a 1 MiB hole, 4 KiB of `b`.
const SPARSE_HOLE_END: u64 = 1 << 20;

fn long_dir() -> String {
    format!("long/{}", "d".repeat(60))
}

fn long_file() -> String {
    format!("{}/{}", long_dir(), "f".repeat(80))
}

fn pax_file() -> String {
    format!("long/{}", "p".repeat(150))
}

fn long_target() -> String {
    format!("../{}", "t".repeat(120))
}

/// Layer 0: everything once.
fn base_layer() -> anyhow::Result<Vec<u8>> {
    let mut tar = LayerTar::default();
    let dir = Meta::mode(0o755);
    let file = Meta::mode(0o644);
    tar.dir("etc", dir)?
        .file("etc/hostname", file, b"corpus\n")?
        .file("etc/passwd", file, b"root:x:0:0:root:/root:/bin/sh\n")?
        .dir("data", dir)?
        .file("data/setuid", Meta::mode(0o4755), b"setuid\n")?
        .file("data/setgid", Meta::mode(0o2755).owner(0, 50), b"setgid\n")?
        .dir("data/sticky", Meta::mode(0o1777))?
        .file(
            "data/sticky/note",
            Meta::mode(0o600).owner(1000, 1000).mtime(946_684_800),
            b"note\n",
        )?
        .file(
            "data/owned",
            Meta::mode(0o640).owner(1000, 2000).mtime(1_000_000_000),
            b"owned\n",
        )?
        .file("data/empty", file, b"")?
        .file("data/old", Meta::mode(0o444).mtime(1), b"old\n")?;
    tar.xattr("user.berth.note", b"corpus")
        .xattr("user.berth.binary", &[0, 1, 0xff]);
    tar.file("data/xattrs", file, b"xattrs\n")?;
    tar.xattr("security.capability", &CAPABILITY);
    tar.file("data/cap", Meta::mode(0o755), b"capability\n")?
        .symlink("data/rel", "../etc/hostname")?
        .symlink("data/abs", "/etc/hostname")?
        .symlink("data/dangling", "/nonexistent/target")?
        .file("data/hl_a", file, b"linked\n")?
        .hardlink("data/hl_b", "data/hl_a")?
        .hardlink("data/hl_c", "data/hl_a")?
        .dir("dev", dir)?
        .node("dev/null_like", EntryType::Char, (1, 3), Meta::mode(0o666))?
        .node(
            "dev/loop_like",
            EntryType::Block,
            (7, 0),
            Meta::mode(0o660).owner(0, 6),
        )?
        .node("dev/fifo", EntryType::Fifo, (0, 0), Meta::mode(0o622))?
        .dir("opaque", dir)?
        .file("opaque/a", file, b"a\n")?
        .file("opaque/b", file, b"b\n")?
        .dir("opaque/sub", dir)?
        .file("opaque/sub/c", file, b"c\n")?
        .dir("replace", dir)?
        .file("replace/file_to_dir", file, b"file\n")?
        .dir("replace/dir_to_file", dir)?
        .file("replace/dir_to_file/inner", file, b"inner\n")?
        .file("replace/file_to_symlink", file, b"file\n")?
        .symlink("replace/symlink_to_file", "file_to_dir")?
        .dir("delete", dir)?
        .file("delete/gone", file, b"gone\n")?
        .dir("delete/gone_dir", dir)?
        .file("delete/gone_dir/child", file, b"child\n")?
        .file("delete/kept", file, b"kept\n")?
        .dir("many", dir)?;
    for index in 0..MANY {
        tar.file(&format!("many/entry-{index:04}"), file, b"n\n")?;
    }
    tar.dir("long", dir)?
        .dir(&long_dir(), dir)?
        .file(&long_file(), file, b"gnu long name\n")?
        .symlink("long/long_target", &long_target())?;
    tar.pax_long_file(&pax_file(), file, b"pax long name\n")?;
    tar.finish()
}

/// Layer 1: deletes, makes opaque, replaces, changes metadata.
fn change_layer() -> anyhow::Result<Vec<u8>> {
    let mut tar = LayerTar::default();
    let dir = Meta::mode(0o755).mtime(BASE_MTIME + 100);
    let file = Meta::mode(0o644).mtime(BASE_MTIME + 100);
    tar.dir("delete", dir)?
        .whiteout("delete/gone")?
        .whiteout("delete/gone_dir")?
        .dir("opaque", dir)?
        .opaque("opaque")?
        .file("opaque/new", file, b"new\n")?
        .dir("replace", dir)?
        .dir("replace/file_to_dir", dir)?
        .file("replace/file_to_dir/child", file, b"child\n")?
        .file("replace/dir_to_file", file, b"now a file\n")?
        .symlink("replace/file_to_symlink", "../etc/hostname")?
        .file("replace/symlink_to_file", file, b"was a symlink\n")?
        .dir("etc", dir)?
        .file(
            "etc/hostname",
            file.mtime(BASE_MTIME + 1000),
            b"corpus v2\n",
        )?
        .dir("data", dir)?
        .file(
            "data/owned",
            Meta::mode(0o600).owner(3000, 3000),
            b"owned v2\n",
        )?;
    tar.xattr("user.berth.note", b"v2");
    tar.file("data/xattrs", file, b"xattrs v2\n")?;
    tar.finish()
}

/// Layer 2: brings back what layer 1 deleted, a dir where a file replaced a dir, a PAX mtime.
/// (A hardlink to a file of a lower layer is left out: containerd's overlay unpack fails on it,
/// and berth's applier refuses it too, as image builders never write one.)
fn relink_layer() -> anyhow::Result<Vec<u8>> {
    let mut tar = LayerTar::default();
    let dir = Meta::mode(0o755).mtime(BASE_MTIME + 200);
    let file = Meta::mode(0o644).mtime(BASE_MTIME + 200);
    tar.dir("delete", dir)?
        .file("delete/gone", file, b"resurrected\n")?
        .dir("opaque", dir)?
        .file("opaque/newer", file, b"newer\n")?
        .dir("replace", dir)?
        .dir("replace/dir_to_file", dir)?
        .file("replace/dir_to_file/again", file, b"again\n")?
        .dir("data", dir)?
        .file("data/hl_new", file, b"linked in layer 2\n")?
        .hardlink("data/hl_new_link", "data/hl_new")?;
    tar.pax("mtime", b"1700000000.5");
    tar.file("data/nanos", file, b"nanos\n")?;
    tar.finish()
}

/// Layer 3 (Docker media type): whiteouts of a device and one of many, a dir under an opaque one.
fn docker_layer() -> anyhow::Result<Vec<u8>> {
    let mut tar = LayerTar::default();
    let dir = Meta::mode(0o755).mtime(BASE_MTIME + 300);
    let file = Meta::mode(0o644).mtime(BASE_MTIME + 300);
    tar.dir("dev", dir)?
        .whiteout("dev/fifo")?
        .dir("many", dir)?
        .whiteout("many/entry-0007")?
        .dir("opaque", dir)?
        .dir("opaque/sub", dir)?
        .file("opaque/sub/d", file, b"d\n")?;
    tar.finish()
}

/// A layer holding only an old-style GNU sparse file (type `S`), which containerd's unpacker
/// refuses ("unhandled tar header type 83").
fn sparse_layer() -> anyhow::Result<Vec<u8>> {
    let mut tar = LayerTar::default();
    tar.dir("data", Meta::mode(0o755))?.gnu_sparse(
        "data/sparse",
        Meta::mode(0o644),
        &[(0, &[b'a'; 4096]), (SPARSE_HOLE_END, &[b'b'; 4096])],
    )?;
    tar.finish()
}

/// The corpus: base (OCI gzip), changes (OCI zstd), relinks (OCI tar), Docker gzip.
fn corpus() -> anyhow::Result<Vec<Layer>> {
    Ok(vec![
        Layer::new(&base_layer()?, LayerFormat::OciGzip)?,
        Layer::new(&change_layer()?, LayerFormat::OciZstd)?,
        Layer::new(&relink_layer()?, LayerFormat::OciTar)?,
        Layer::new(&docker_layer()?, LayerFormat::DockerGzip)?,
    ])
}

/// `Agent/PullImage` of `image` with `secret` in project "default", drained; the final status.
pub(crate) async fn berth_pull(
    env: &Env,
    image: &str,
    secret: &str,
) -> anyhow::Result<Result<(), tonic::Status>> {
    let mut agent = env.berthd.agent().await?;
    let mut stream = match agent
        .pull_image(PullImageRequest {
            project: String::new(),
            image: image.to_owned(),
            pull_secret: secret.to_owned(),
        })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Ok(())),
            Err(status) => return Ok(Err(status)),
        }
    }
}

/// `ctr -n <namespace> images pull` of `image` from the env's registry: containerd's own fetch
/// and unpack (the test CA through a hosts dir, the user through `--user`).
async fn containerd_pull(env: &Env, namespace: &str, image: &str) -> anyhow::Result<()> {
    let registry = env.registry.addr();
    let hosts = env.scratch_dir().join("hosts.d");
    let host_dir = hosts.join(registry);
    std::fs::create_dir_all(&host_dir)?;
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"https://{registry}\"\n\n[host.\"https://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            env.ca.ca_pem_path().display()
        ),
    )?;
    let user = format!("{}:{}", env.user.username, env.user.password);
    let hosts_arg = hosts.to_string_lossy().into_owned();
    let output = env
        .containerd
        .ctr(
            namespace,
            &[
                "images",
                "pull",
                "--hosts-dir",
                &hosts_arg,
                "--user",
                &user,
                image,
            ],
        )
        .await?;
    if !output.status.success() {
        bail!(
            "ctr images pull {image} failed ({}): {}{}\ncontainerd log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            env.containerd.log_text()
        );
    }
    Ok(())
}

/// Pushes `layers` as `repository:v1`, pulls it through berthd and with `ctr`, and compares every
/// chain level; returns what was pushed, berthd's top tree and berthd's layer dirs.
async fn pull_both_and_compare(
    env: &Env,
    repository: &str,
    layers: &[Layer],
    tolerance: Tolerance,
) -> anyhow::Result<(PushedLayers, Tree, Vec<Tree>)> {
    let pushed: PushedLayers = push_layers(
        &env.ca,
        env.registry.addr(),
        repository,
        "v1",
        &env.pusher,
        layers,
    )
    .await?;
    let reference = pushed.image.reference();
    let secret = env
        .create_secret("corpus", env.registry.addr(), &env.user)
        .await?;
    if let Err(status) = berth_pull(env, &reference, &secret).await? {
        bail!(
            "berthd failed to pull {reference}: {status:?}\nberthd log:\n{}",
            env.berthd.log_tail()
        );
    }
    containerd_pull(env, CONTAINERD_NAMESPACE, &reference).await?;

    let berth_namespace = env.containerd.namespace();
    let mut top = None;
    let mut raw = Vec::new();
    for (level, chain_id) in pushed.chain_ids.iter().enumerate() {
        let berth_view = SnapshotView::mount(&env.containerd, berth_namespace, chain_id).await?;
        let containerd_view =
            SnapshotView::mount(&env.containerd, CONTAINERD_NAMESPACE, chain_id).await?;
        let berth_tree = berth_view.scan()?;
        let containerd_tree = containerd_view.scan()?;
        let differences = berth_tree.diff("berthd", &containerd_tree, "containerd", tolerance);
        assert!(
            differences.is_empty(),
            "layers 0..={level} ({chain_id}, top {:?}) unpack differently:\n{}",
            layers[level].format,
            differences.join("\n")
        );
        // The layer as written: whiteout devices and opaque xattrs in the form overlayfs reads.
        // containerd makes a whiteout device at unpack time and sets no time on it (overlayfs
        // never shows it), so those mtimes differ from one unpack to the next.
        let berth_layer = berth_view.scan_layer()?;
        let differences = berth_layer.diff(
            "berthd",
            &containerd_view.scan_layer()?,
            "containerd",
            Tolerance {
                whiteout_mtimes: true,
                ..tolerance
            },
        );
        assert!(
            differences.is_empty(),
            "layer {level} ({:?}) is written differently in its snapshot dir:\n{}",
            layers[level].format,
            differences.join("\n")
        );
        top = Some(berth_tree);
        raw.push(berth_layer);
    }
    Ok((pushed, top.context("the corpus has layers")?, raw))
}

/// Layer 1's own dir holds its whiteouts as overlayfs reads them.
fn assert_overlay_form(layer: &Tree) {
    for whiteout in ["delete/gone", "delete/gone_dir"] {
        assert_eq!(
            layer.get(whiteout).map(|node| &node.kind),
            Some(&Kind::Char(0, 0)),
            "{whiteout} in layer 1's dir"
        );
    }
    assert_eq!(
        layer
            .get("opaque")
            .and_then(|node| node.xattrs.get("trusted.overlay.opaque")),
        Some(&b"y".to_vec())
    );
    assert_eq!(
        layer.children("opaque"),
        ["new".to_owned()].into(),
        "the marker itself is not a file"
    );
    assert!(layer.get("delete/.wh.gone").is_none());
}

/// What the corpus means, checked on berthd's tree (so that equal but wrong trees fail).
fn assert_corpus_semantics(tree: &Tree, view: &std::path::Path) -> anyhow::Result<()> {
    let read = |path: &str| -> anyhow::Result<String> {
        std::fs::read_to_string(view.join(path)).with_context(|| format!("reading {path}"))
    };
    // Whiteouts: deleted entries are gone, a later layer may bring a name back.
    assert_eq!(read("delete/gone")?, "resurrected\n");
    assert!(tree.get("delete/gone_dir").is_none(), "delete/gone_dir");
    assert!(tree.get("delete/gone_dir/child").is_none());
    assert_eq!(read("delete/kept")?, "kept\n");
    assert!(tree.get("dev/fifo").is_none(), "dev/fifo was whited out");
    let many = tree.children("many");
    assert_eq!(many.len(), MANY - 1);
    assert!(!many.contains("entry-0007"));
    // No whiteout marker is visible as a file.
    let markers: Vec<_> = tree
        .entries
        .keys()
        .filter(|path| path.to_string_lossy().contains(".wh."))
        .collect();
    assert!(markers.is_empty(), "whiteout markers visible: {markers:?}");
    // Opaque: only what the opaque layer and later ones put there.
    assert_eq!(
        tree.children("opaque"),
        ["new", "newer", "sub"].map(str::to_owned).into()
    );
    assert_eq!(tree.children("opaque/sub"), ["d".to_owned()].into());
    // Replacements.
    assert!(tree
        .get("replace/file_to_dir")
        .is_some_and(|node| node.is_dir()));
    assert_eq!(read("replace/file_to_dir/child")?, "child\n");
    assert_eq!(
        tree.children("replace/dir_to_file"),
        ["again".to_owned()].into(),
        "dir -> file -> dir keeps none of the first dir"
    );
    assert_eq!(
        tree.get("replace/file_to_symlink").map(|node| &node.kind),
        Some(&Kind::Symlink("../etc/hostname".into()))
    );
    assert!(tree
        .get("replace/symlink_to_file")
        .is_some_and(|node| matches!(node.kind, Kind::File { .. })));
    // Metadata.
    let mode = |path: &str| tree.get(path).map(|node| node.mode);
    assert_eq!(mode("data/setuid"), Some(0o4755));
    assert_eq!(mode("data/setgid"), Some(0o2755));
    assert_eq!(mode("data/sticky"), Some(0o1777));
    let owned = tree.get("data/owned").context("data/owned")?;
    assert_eq!((owned.mode, owned.uid, owned.gid), (0o600, 3000, 3000));
    assert_eq!(read("data/owned")?, "owned v2\n");
    assert_eq!(
        tree.get("data/cap")
            .and_then(|node| node.xattrs.get("security.capability")),
        Some(&CAPABILITY.to_vec())
    );
    let xattrs = &tree.get("data/xattrs").context("data/xattrs")?.xattrs;
    assert_eq!(xattrs.get("user.berth.note"), Some(&b"v2".to_vec()));
    assert_eq!(
        xattrs.get("user.berth.binary"),
        None,
        "a replaced file keeps none of the old xattrs"
    );
    assert_eq!(tree.get("data/old").map(|node| node.mtime), Some((1, 0)));
    assert_eq!(
        tree.get("data/nanos").map(|node| node.mtime),
        Some((1_700_000_000, 500_000_000))
    );
    assert_eq!(
        tree.get("etc/hostname").map(|node| node.mtime.0),
        Some(i64::try_from(BASE_MTIME + 1000)?)
    );
    // Devices, links, names.
    assert_eq!(
        tree.get("dev/null_like").map(|node| &node.kind),
        Some(&Kind::Char(1, 3))
    );
    assert_eq!(
        tree.get("dev/loop_like").map(|node| &node.kind),
        Some(&Kind::Block(7, 0))
    );
    assert_eq!(
        tree.get("data/abs").map(|node| &node.kind),
        Some(&Kind::Symlink("/etc/hostname".into()))
    );
    assert_eq!(
        tree.get("long/long_target").map(|node| &node.kind),
        Some(&Kind::Symlink(long_target().into()))
    );
    assert_eq!(read(&long_file())?, "gnu long name\n");
    assert_eq!(read(&pax_file())?, "pax long name\n");
    assert!(tree.get("long/pax-name-stand-in").is_none());
    assert!(tree.hardlinks.contains(&vec![
        "data/hl_a".into(),
        "data/hl_b".into(),
        "data/hl_c".into()
    ]));
    assert!(
        tree.hardlinks
            .contains(&vec!["data/hl_new".into(), "data/hl_new_link".into()]),
        "{:?}",
        tree.hardlinks
    );
    assert_eq!(
        tree.get("data/empty").map(|node| &node.kind),
        Some(&Kind::File {
            size: 0,
            sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_owned()
        })
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_corpus_unpacks_as_containerd_unpacks_it() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let layers = corpus()?;
    let (pushed, top, raw) =
        pull_both_and_compare(&env, "team/corpus", &layers, Tolerance::default()).await?;
    assert_overlay_form(&raw[1]);
    let view = SnapshotView::mount(
        &env.containerd,
        env.containerd.namespace(),
        pushed.top_chain_id(),
    )
    .await?;
    assert_eq!(view.scan()?, top);
    assert_corpus_semantics(&top, view.path())
}

/// A layer whose download ends long before its parent's (8 MiB of incompressible data) is
/// applied beside it, into a staging snapshot, and moved onto the parent once that is
/// committed. The directories it only implies then take the owner and mode of the parent's,
/// as they do when containerd applies it on the mounted parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_applied_ahead_of_its_parent_unpacks_as_containerd_unpacks_it() -> anyhow::Result<()>
{
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let big = crate::harness::random_bytes(8 << 20);
    let mut parent = LayerTar::default();
    parent
        .dir("etc", Meta::mode(0o751).owner(3, 4))?
        .dir("srv", Meta::mode(0o700).owner(5, 6))?
        .dir("srv/deep", Meta::mode(0o2750).owner(7, 8))?
        .file("big", Meta::mode(0o644), &big)?;
    // No directory entries: etc, srv, srv/deep and srv/deep/new are implied.
    let mut child = LayerTar::default();
    child
        .file("etc/added", Meta::mode(0o644), b"added\n")?
        .file("srv/deep/new/file", Meta::mode(0o600), b"deep\n")?;
    let layers = [
        Layer::new(&parent.finish()?, LayerFormat::OciGzip)?,
        Layer::new(&child.finish()?, LayerFormat::OciGzip)?,
    ];
    // An implied directory gets the time of the unpack, on both sides.
    let tolerance = Tolerance {
        dir_mtimes: true,
        ..Tolerance::default()
    };
    let (_, top, _) = pull_both_and_compare(&env, "team/ahead", &layers, tolerance).await?;

    let log = env.berthd.log_text();
    assert!(
        log.lines()
            .any(|line| line.contains("layer applied") && line.contains("staged=true")),
        "the child layer was not applied ahead of its parent:\n{}",
        env.berthd.log_tail()
    );
    for (path, mode, owner) in [
        ("etc", 0o751, (3, 4)),
        ("srv", 0o700, (5, 6)),
        ("srv/deep", 0o2750, (7, 8)),
        // Made in a setgid directory: its group.
        ("srv/deep/new", 0o755, (0, 8)),
    ] {
        let node = top
            .get(path)
            .with_context(|| format!("{path} is missing"))?;
        assert_eq!(node.kind, Kind::Dir, "{path}");
        assert_eq!(
            (node.mode & 0o7777, (node.uid, node.gid)),
            (mode, owner),
            "{path}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_tar_zstd_layer_unpacks_like_its_oci_twin() -> anyhow::Result<()> {
    // containerd 1.6 cannot apply `application/vnd.docker.image.rootfs.diff.tar.zstd`, so the
    // reference here is containerd's unpack of the same tar as an OCI zstd layer.
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let mut docker = corpus()?;
    docker.push(Layer::new(&change_layer()?, LayerFormat::DockerZstd)?);
    let mut oci = corpus()?;
    oci.push(Layer::new(&change_layer()?, LayerFormat::OciZstd)?);

    let secret = env
        .create_secret("corpus", env.registry.addr(), &env.user)
        .await?;
    let docker_pushed = push_layers(
        &env.ca,
        env.registry.addr(),
        "team/docker-zstd",
        "v1",
        &env.pusher,
        &docker,
    )
    .await?;
    let oci_pushed = push_layers(
        &env.ca,
        env.registry.addr(),
        "team/oci-zstd",
        "v1",
        &env.pusher,
        &oci,
    )
    .await?;
    // Same tars, so same chain ids: the snapshot in berth's namespace must be berthd's own
    // unpack of the Docker layer; the OCI twin goes to containerd's namespace.
    assert_eq!(docker_pushed.chain_ids, oci_pushed.chain_ids);
    if let Err(status) = berth_pull(&env, &docker_pushed.image.reference(), &secret).await? {
        bail!(
            "berthd failed to pull the Docker tar.zstd image: {status:?}\n{}",
            env.berthd.log_tail()
        );
    }
    containerd_pull(&env, CONTAINERD_NAMESPACE, &oci_pushed.image.reference()).await?;
    let top = docker_pushed.top_chain_id();
    let berth_view = SnapshotView::mount(&env.containerd, env.containerd.namespace(), top).await?;
    let containerd_view = SnapshotView::mount(&env.containerd, CONTAINERD_NAMESPACE, top).await?;
    let differences = berth_view.scan()?.diff(
        "berthd (docker tar.zstd)",
        &containerd_view.scan()?,
        "containerd (oci tar+zstd)",
        Tolerance::default(),
    );
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_refuses_a_gnu_sparse_file() -> anyhow::Result<()> {
    // containerd's own unpack refuses old-style GNU sparse entries; berth's applier unpacks
    // them (the next test), a deliberate difference: the layer is valid tar.
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let layers = vec![Layer::new(&sparse_layer()?, LayerFormat::OciGzip)?];
    let pushed = push_layers(
        &env.ca,
        env.registry.addr(),
        "team/sparse",
        "v1",
        &env.pusher,
        &layers,
    )
    .await?;
    let refused = containerd_pull(&env, CONTAINERD_NAMESPACE, &pushed.image.reference()).await;
    let message = format!(
        "{:#}",
        refused.err().context("ctr pulled the sparse layer")?
    );
    assert!(
        message.contains("unhandled tar header type 83"),
        "{message}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gnu_sparse_file_unpacks_to_its_full_content() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let layers = vec![Layer::new(&sparse_layer()?, LayerFormat::OciGzip)?];
    let pushed = push_layers(
        &env.ca,
        env.registry.addr(),
        "team/sparse",
        "v1",
        &env.pusher,
        &layers,
    )
    .await?;
    let secret = env
        .create_secret("sparse", env.registry.addr(), &env.user)
        .await?;
    if let Err(status) = berth_pull(&env, &pushed.image.reference(), &secret).await? {
        bail!(
            "berthd refused a GNU sparse layer: {status:?}\n{}",
            env.berthd.log_tail()
        );
    }
    let view = SnapshotView::mount(
        &env.containerd,
        env.containerd.namespace(),
        pushed.top_chain_id(),
    )
    .await?;
    let sparse = std::fs::read(view.path().join("data/sparse"))?;
    assert_eq!(sparse.len(), usize::try_from(SPARSE_HOLE_END)? + 4096);
    assert!(sparse[..4096].iter().all(|byte| *byte == b'a'));
    assert!(sparse[4096..sparse.len() - 4096]
        .iter()
        .all(|byte| *byte == 0));
    assert!(sparse[sparse.len() - 4096..]
        .iter()
        .all(|byte| *byte == b'b'));
    let node = view.scan()?;
    assert_eq!(node.get("data/sparse").map(|node| node.mode), Some(0o644));
    Ok(())
}

/// A setuid file with a file capability and a setgid file, each with a hardlink whose header
/// repeats the target's mode and owner (as tar and Go's archive/tar write them), and a 0640 7:8
/// file with a hardlink whose header says 0644 0:0.
fn setid_link_layer() -> anyhow::Result<Vec<u8>> {
    let mut tar = LayerTar::default();
    tar.dir("bin", Meta::mode(0o755))?;
    tar.xattr("security.capability", &CAPABILITY);
    tar.file("bin/tool", Meta::mode(0o4755), b"tool\n")?
        .hardlink_with("bin/tool-link", "bin/tool", Meta::mode(0o4755))?
        .file("bin/gtool", Meta::mode(0o2755).owner(0, 50), b"gtool\n")?
        .hardlink_with(
            "bin/gtool-link",
            "bin/gtool",
            Meta::mode(0o2755).owner(0, 50),
        )?
        .file("bin/plain", Meta::mode(0o640).owner(7, 8), b"plain\n")?
        .hardlink("bin/plain-link", "bin/plain")?;
    tar.finish()
}

/// Pushes the hardlink layer as `team/setid-links:v1`.
async fn setid_links_pushed(env: &Env) -> anyhow::Result<PushedLayers> {
    let layers = vec![Layer::new(&setid_link_layer()?, LayerFormat::OciGzip)?];
    push_layers(
        &env.ca,
        env.registry.addr(),
        "team/setid-links",
        "v1",
        &env.pusher,
        &layers,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_gives_a_hardlinked_inode_the_link_entrys_metadata() -> anyhow::Result<()> {
    // containerd lchowns and chmods the link, i.e. the shared inode, from the link entry's
    // header. The chown clears the file capability (the chmod restores setuid and setgid, not
    // the capability), and a link header with another mode or owner rewrites the target's.
    // Same on 1.6 and 2.1; berth's applier does the same (the next test).
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let pushed = setid_links_pushed(&env).await?;
    containerd_pull(&env, CONTAINERD_NAMESPACE, &pushed.image.reference()).await?;
    let view =
        SnapshotView::mount(&env.containerd, CONTAINERD_NAMESPACE, pushed.top_chain_id()).await?;
    let tree = view.scan()?;
    let tool = tree.get("bin/tool").context("bin/tool")?;
    assert_eq!(tool.mode, 0o4755);
    assert_eq!(tool.xattrs.get("security.capability"), None);
    let gtool = tree.get("bin/gtool").context("bin/gtool")?;
    assert_eq!((gtool.mode, gtool.uid, gtool.gid), (0o2755, 0, 50));
    let plain = tree.get("bin/plain").context("bin/plain")?;
    assert_eq!((plain.mode, plain.uid, plain.gid), (0o644, 0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_gives_a_hardlinked_inode_the_link_entrys_metadata_too() -> anyhow::Result<()> {
    // berth-unpack (entry.rs, make_hardlink) applies the link entry's header to the shared
    // inode as containerd does, so both unpack this layer alike.
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let pushed = setid_links_pushed(&env).await?;
    let secret = env
        .create_secret("links", env.registry.addr(), &env.user)
        .await?;
    if let Err(status) = berth_pull(&env, &pushed.image.reference(), &secret).await? {
        bail!("berthd refused the hardlink layer: {status:?}");
    }
    let view = SnapshotView::mount(
        &env.containerd,
        env.containerd.namespace(),
        pushed.top_chain_id(),
    )
    .await?;
    let tree = view.scan()?;
    let tool = tree.get("bin/tool").context("bin/tool")?;
    assert_eq!(tool.mode, 0o4755);
    assert_eq!(tool.xattrs.get("security.capability"), None);
    let gtool = tree.get("bin/gtool").context("bin/gtool")?;
    assert_eq!((gtool.mode, gtool.uid, gtool.gid), (0o2755, 0, 50));
    let plain = tree.get("bin/plain").context("bin/plain")?;
    assert_eq!((plain.mode, plain.uid, plain.gid), (0o644, 0, 0));
    assert!(tree
        .hardlinks
        .contains(&vec!["bin/tool".into(), "bin/tool-link".into()]));
    Ok(())
}
