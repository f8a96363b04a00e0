//! Issue 15: hostile layers, each its own image pushed to the test registry and pulled through
//! berthd (`Agent/PullImage`). Whatever the layer says, nothing outside the snapshot changes:
//! two canary dirs (one in /tmp, one in the test's scratch dir) and the host's `/etc/passwd` keep
//! every byte and every bit of metadata (a link to them would change their link count and
//! ctime), and nothing new appears in `/` or `/etc`. A refused pull leaves no image record and
//! no snapshot named for the layer's chain id; an accepted one has the entry inside the snapshot.
//!
//! berthd unpacks with its own applier (berth-unpack) on overlayfs, and where it refuses what
//! containerd's Diff.Apply would take or fail differently, the tests pin berth's answer:
//! - `..` names: containerd clamps them into the root and the pull succeeds; berth's applier
//!   refuses the layer (INVALID_ARGUMENT).
//! - hardlinks to a path outside the root: containerd resolves the target inside the root, finds
//!   nothing and fails with an Unknown error; berth's applier refuses them as INVALID_ARGUMENT.
//! - a layer whose config names another diff id: DATA_LOSS.
//!
//! The tar bomb holds `BERTH_TEST_TAR_BOMB_ENTRIES` empty files (default 20000), compressing to
//! a few hundred KiB: far below the applier's entry limit (4 million, not a berthd setting), so
//! it is pulled, and the test checks it lands whole and inside; the refusal at the limit is
//! berth-unpack's unit test `tar_bombs_stop_at_the_limits`.

use std::path::Path;

use anyhow::{bail, Context as _};
use tar::EntryType;
use tonic::Code;

use crate::harness::canary::{Canary, HostRoots};
use crate::harness::env::{Env, RegistryKind};
use crate::harness::hostile::{HostileFront, Hostility};
use crate::harness::image::sha256_digest;
use crate::harness::layers::{push_layers, Layer, LayerFormat, LayerTar, Meta, PushedLayers};
use crate::harness::random_lowercase;
use crate::harness::tree::SnapshotView;
use crate::harness::wait::{wait_for, ORDER_TIMEOUT};
use crate::security::assert_no_image;
use crate::unpack_diff::berth_pull;

/// Enough `../` to climb out of any root.
const CLIMB: &str = "../../../../../../../../../../../../../../../../";

/// What a hostile layer may aim at, recorded before the pull.
#[derive(Debug)]
struct Targets {
    /// `/tmp/berth-canary-<random>`.
    tmp: Canary,
    /// `<scratch>/berth-canary-<random>`.
    scratch: Canary,
    passwd: Canary,
    roots: HostRoots,
}

impl Targets {
    fn plant(env: &Env) -> anyhow::Result<Self> {
        Ok(Self {
            tmp: Canary::plant(Path::new("/tmp"))?,
            scratch: Canary::plant(env.scratch_dir())?,
            passwd: Canary::watch(Path::new("/etc/passwd"))?,
            roots: HostRoots::list()?,
        })
    }

    fn assert_untouched(&self) -> anyhow::Result<()> {
        self.tmp.assert_untouched()?;
        self.scratch.assert_untouched()?;
        self.passwd.assert_untouched()?;
        self.roots.assert_nothing_new()
    }
}

/// Pushes one image of `layers` (OCI gzip) as `repository:v1`.
async fn push(env: &Env, repository: &str, tars: Vec<Vec<u8>>) -> anyhow::Result<PushedLayers> {
    let layers = tars
        .iter()
        .map(|tar| Layer::new(tar, LayerFormat::OciGzip))
        .collect::<anyhow::Result<Vec<_>>>()?;
    push_layers(
        &env.ca,
        env.registry.addr(),
        repository,
        "v1",
        &env.pusher,
        &layers,
    )
    .await
}

/// Pulls `pushed` through berthd with a fresh secret for the registry (or `via`, a front).
async fn pull(
    env: &Env,
    pushed: &PushedLayers,
    via: Option<&str>,
) -> anyhow::Result<Result<(), tonic::Status>> {
    let host = via.unwrap_or(env.registry.addr());
    let secret = env
        .create_secret(&format!("hostile-{}", random_lowercase(6)), host, &env.user)
        .await?;
    berth_pull(env, &pushed.image.reference_via(host), &secret).await
}

/// The snapshot keys of berth's namespace.
async fn snapshot_keys(env: &Env) -> anyhow::Result<Vec<String>> {
    let listed = env.containerd.ctr_ok(&["snapshots", "ls"]).await?;
    Ok(listed
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// A refused pull: no image record for the repository, and (once containerd's GC ran) no
/// snapshot of the top layer's chain id and no active snapshot left from the unpack.
async fn assert_refused_cleanly(env: &Env, pushed: &PushedLayers) -> anyhow::Result<()> {
    assert_no_image(env, &pushed.image.repository).await?;
    let chain_id = pushed.top_chain_id().to_owned();
    let committed = snapshot_keys(env).await?;
    assert!(
        !committed.contains(&chain_id),
        "a snapshot named {chain_id} was committed: {committed:?}"
    );
    wait_for(
        "the refused unpack's snapshots to go",
        ORDER_TIMEOUT,
        || async {
            let listed = env.containerd.ctr_ok(&["snapshots", "ls"]).await?;
            let active: Vec<&str> = listed
                .lines()
                .skip(1)
                .filter(|line| line.contains("Active"))
                .collect();
            Ok(active.is_empty().then_some(()))
        },
    )
    .await
}

/// Pulls and expects a refusal with any code (`expected: None`) or with `expected`; then checks
/// that it left nothing behind and touched nothing outside.
async fn expect_refused(
    env: &Env,
    pushed: &PushedLayers,
    targets: &Targets,
    expected: Option<Code>,
) -> anyhow::Result<tonic::Status> {
    let Err(status) = pull(env, pushed, None).await? else {
        bail!("berthd pulled {}", pushed.image.reference());
    };
    if let Some(code) = expected {
        assert_eq!(
            status.code(),
            code,
            "{status:?}\nberthd log:\n{}",
            env.berthd.log_tail()
        );
    }
    assert_refused_cleanly(env, pushed).await?;
    targets.assert_untouched()?;
    Ok(status)
}

/// Pulls and expects success; checks nothing outside changed; returns the mounted top snapshot.
async fn expect_pulled<'a>(
    env: &'a Env,
    pushed: &PushedLayers,
    targets: &Targets,
) -> anyhow::Result<SnapshotView<'a>> {
    if let Err(status) = pull(env, pushed, None).await? {
        bail!(
            "berthd refused {}: {status:?}\nberthd log:\n{}",
            pushed.image.reference(),
            env.berthd.log_tail()
        );
    }
    targets.assert_untouched()?;
    SnapshotView::mount(
        &env.containerd,
        env.containerd.namespace(),
        pushed.top_chain_id(),
    )
    .await
}

fn read(view: &SnapshotView<'_>, path: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(view.path().join(path))
        .with_context(|| format!("reading {path} in the snapshot"))
}

fn pwned() -> Meta {
    Meta::mode(0o644)
}

/// Files named with `..`: at the canaries, and just above the root.
fn dotdot_layer(targets: &Targets) -> anyhow::Result<Vec<u8>> {
    let mut tar = LayerTar::default();
    for (name, data) in [
        (
            format!("{CLIMB}{}/canary", targets.tmp.dir_in_root()),
            "pwned",
        ),
        (
            format!("{CLIMB}{}/nest/new", targets.scratch.dir_in_root()),
            "pwned",
        ),
        (format!("a/../../escape-{}", random_lowercase(8)), "pwned"),
        ("./../escape".to_owned(), "pwned"),
    ] {
        tar.raw(
            EntryType::Regular,
            name.as_bytes(),
            b"",
            pwned(),
            data.as_bytes(),
        )?;
    }
    tar.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotdot_names_never_leave_the_root() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let pushed = push(&env, "hostile/dotdot", vec![dotdot_layer(&targets)?]).await?;
    match pull(&env, &pushed, None).await? {
        // containerd's Diff.Apply clamps `..` at the root.
        Ok(()) => {
            targets.assert_untouched()?;
            let view = SnapshotView::mount(
                &env.containerd,
                env.containerd.namespace(),
                pushed.top_chain_id(),
            )
            .await?;
            assert_eq!(
                read(&view, &format!("{}/canary", targets.tmp.dir_in_root()))?,
                "pwned"
            );
            assert_eq!(read(&view, "escape")?, "pwned");
        }
        // berth's applier refuses the layer.
        Err(_) => {
            assert_refused_cleanly(&env, &pushed).await?;
            targets.assert_untouched()?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotdot_names_are_invalid_argument() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let pushed = push(&env, "hostile/dotdot", vec![dotdot_layer(&targets)?]).await?;
    expect_refused(&env, &pushed, &targets, Some(Code::InvalidArgument)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_names_land_inside_the_snapshot() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let unique = format!("berth-absolute-{}", random_lowercase(8));
    let mut tar = LayerTar::default();
    let canary = format!("/{}/canary", targets.tmp.dir_in_root());
    tar.raw(
        EntryType::Regular,
        canary.as_bytes(),
        b"",
        pwned(),
        b"pwned",
    )?
    .raw(
        EntryType::Regular,
        format!("/etc/{unique}").as_bytes(),
        b"",
        pwned(),
        b"inside",
    )?
    .raw(
        EntryType::Directory,
        format!("/{unique}/").as_bytes(),
        b"",
        Meta::mode(0o755),
        b"",
    )?;
    let pushed = push(&env, "hostile/absolute", vec![tar.finish()?]).await?;
    let view = expect_pulled(&env, &pushed, &targets).await?;
    assert_eq!(read(&view, &canary[1..])?, "pwned");
    assert_eq!(read(&view, &format!("etc/{unique}"))?, "inside");
    assert!(view.path().join(&unique).is_dir());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_symlink_to_slash_stay_inside() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let unique = format!("berth-symlink-{}", random_lowercase(8));
    let tmp = targets.tmp.dir_in_root();
    let scratch = targets.scratch.dir().to_string_lossy().into_owned();
    let mut tar = LayerTar::default();
    tar.symlink("escape", "/")?
        .file(&format!("escape/{tmp}/canary"), pwned(), b"pwned")?
        .file(&format!("escape/etc/{unique}"), pwned(), b"inside")?
        .symlink("direct", &scratch)?
        .file("direct/canary", pwned(), b"pwned")?
        .file("direct/nest/egg", pwned(), b"pwned")?
        .dir("direct/nest/new", Meta::mode(0o777))?;
    let pushed = push(&env, "hostile/symlink-root", vec![tar.finish()?]).await?;
    let view = expect_pulled(&env, &pushed, &targets).await?;
    assert_eq!(read(&view, &format!("{tmp}/canary"))?, "pwned");
    assert_eq!(read(&view, &format!("etc/{unique}"))?, "inside");
    let scratch_inside = scratch.trim_start_matches('/');
    assert_eq!(read(&view, &format!("{scratch_inside}/canary"))?, "pwned");
    assert_eq!(read(&view, &format!("{scratch_inside}/nest/egg"))?, "pwned");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_relative_escape_symlink_stay_inside() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let tmp = targets.tmp.dir_in_root();
    let mut tar = LayerTar::default();
    tar.symlink("up", "../../..")?
        .file(&format!("up/{tmp}/canary"), pwned(), b"pwned")?
        .dir("a", Meta::mode(0o755))?
        .dir("a/b", Meta::mode(0o755))?
        .symlink("a/b/up", CLIMB.trim_end_matches('/'))?
        .file(&format!("a/b/up/{tmp}/nest/egg"), pwned(), b"pwned")?;
    let pushed = push(&env, "hostile/symlink-up", vec![tar.finish()?]).await?;
    let view = expect_pulled(&env, &pushed, &targets).await?;
    assert_eq!(read(&view, &format!("{tmp}/canary"))?, "pwned");
    assert_eq!(read(&view, &format!("{tmp}/nest/egg"))?, "pwned");
    Ok(())
}

/// Hardlinks to `/etc/passwd` and to the /tmp canary by its absolute path.
fn hardlink_absolute_layer(targets: &Targets) -> anyhow::Result<Vec<u8>> {
    let mut tar = LayerTar::default();
    tar.hardlink("stolen-passwd", "/etc/passwd")?.hardlink(
        "stolen-canary",
        &format!("{}/canary", targets.tmp.dir().display()),
    )?;
    tar.finish()
}

/// A hardlink to the scratch canary through `..`.
fn hardlink_dotdot_layer(targets: &Targets) -> anyhow::Result<Vec<u8>> {
    let mut tar = LayerTar::default();
    tar.hardlink(
        "stolen-canary",
        &format!("{CLIMB}{}/canary", targets.scratch.dir_in_root()),
    )?;
    tar.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardlinks_to_host_files_are_refused() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    for (repository, tar) in [
        (
            "hostile/hardlink-absolute",
            hardlink_absolute_layer(&targets)?,
        ),
        ("hostile/hardlink-dotdot", hardlink_dotdot_layer(&targets)?),
    ] {
        let pushed = push(&env, repository, vec![tar]).await?;
        // Today INTERNAL (containerd fails to link a target that is not in the root).
        expect_refused(&env, &pushed, &targets, None).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardlinks_to_host_files_are_invalid_argument() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    for (repository, tar) in [
        (
            "hostile/hardlink-absolute",
            hardlink_absolute_layer(&targets)?,
        ),
        ("hostile/hardlink-dotdot", hardlink_dotdot_layer(&targets)?),
    ] {
        let pushed = push(&env, repository, vec![tar]).await?;
        expect_refused(&env, &pushed, &targets, Some(Code::InvalidArgument)).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_named_like_an_existing_file_replaces_it_inside() -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let mut base = LayerTar::default();
    base.dir("etc", Meta::mode(0o755))?
        .file("etc/passwd", pwned(), b"root:x:0:0::/root:/bin/sh\n")?
        .symlink(
            "etc/shadow",
            &format!("{}/canary", targets.tmp.dir().display()),
        )?;
    let mut devices = LayerTar::default();
    devices
        .dir("etc", Meta::mode(0o755))?
        .node("etc/passwd", EntryType::Char, (1, 3), Meta::mode(0o666))?
        .node("etc/shadow", EntryType::Block, (7, 0), Meta::mode(0o600))?;
    let canary = format!("/{}/canary", targets.tmp.dir_in_root());
    devices.node(&canary, EntryType::Char, (1, 5), Meta::mode(0o666))?;
    let pushed = push(
        &env,
        "hostile/devices",
        vec![base.finish()?, devices.finish()?],
    )
    .await?;
    let view = expect_pulled(&env, &pushed, &targets).await?;
    let passwd = std::fs::symlink_metadata(view.path().join("etc/passwd"))?;
    assert!(passwd.file_type().is_char_device());
    assert_eq!(
        (
            rustix::fs::major(passwd.rdev()),
            rustix::fs::minor(passwd.rdev())
        ),
        (1, 3)
    );
    let shadow = std::fs::symlink_metadata(view.path().join("etc/shadow"))?;
    assert!(
        shadow.file_type().is_block_device(),
        "the symlink is replaced, not followed"
    );
    let inside = std::fs::symlink_metadata(view.path().join(&canary[1..]))?;
    assert!(inside.file_type().is_char_device());
    Ok(())
}

/// How many empty files the tar bomb holds (`BERTH_TEST_TAR_BOMB_ENTRIES`, default 20000).
fn tar_bomb_entries() -> anyhow::Result<usize> {
    match std::env::var("BERTH_TEST_TAR_BOMB_ENTRIES") {
        Ok(value) => value
            .parse()
            .with_context(|| format!("BERTH_TEST_TAR_BOMB_ENTRIES={value:?}")),
        Err(_) => Ok(20_000),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tar_bomb_of_tiny_files_lands_whole_and_inside() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let entries = tar_bomb_entries()?;
    let per_dir = 1000;
    let mut tar = LayerTar::default();
    tar.dir("bomb", Meta::mode(0o755))?;
    for index in 0..entries {
        if index % per_dir == 0 {
            tar.dir(&format!("bomb/{:04}", index / per_dir), Meta::mode(0o755))?;
        }
        tar.file(
            &format!("bomb/{:04}/{index:07}", index / per_dir),
            pwned(),
            b"",
        )?;
    }
    let tar = tar.finish()?;
    let layer = Layer::new(&tar, LayerFormat::OciGzip)?;
    assert!(
        layer.blob.len() * 20 < tar.len(),
        "a bomb: {} bytes of blob for {} of tar",
        layer.blob.len(),
        tar.len()
    );
    let pushed = push(&env, "hostile/tar-bomb", vec![tar]).await?;
    let view = expect_pulled(&env, &pushed, &targets).await?;
    let mut landed = 0;
    for dir in std::fs::read_dir(view.path().join("bomb"))? {
        landed += std::fs::read_dir(dir?.path())?.count();
    }
    assert_eq!(landed, entries);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_blob_longer_than_its_descriptor_is_data_loss() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let front = HostileFront::start(&env.ca, env.registry.addr(), Hostility::AppendToBlobs).await?;
    let mut tar = LayerTar::default();
    tar.dir("data", Meta::mode(0o755))?
        .file("data/file", pwned(), &[b'x'; 64 * 1024])?
        .symlink("escape", "/")?
        .file(
            &format!("escape/{}/canary", targets.tmp.dir_in_root()),
            pwned(),
            b"pwned",
        )?;
    let pushed = push(&env, "hostile/too-long", vec![tar.finish()?]).await?;
    let Err(status) = pull(&env, &pushed, Some(front.addr())).await? else {
        bail!("berthd pulled a blob longer than its descriptor");
    };
    assert!(front.acts() >= 1, "the front never appended");
    assert_eq!(
        status.code(),
        Code::DataLoss,
        "{status:?}\nberthd log:\n{}",
        env.berthd.log_tail()
    );
    assert_refused_cleanly(&env, &pushed).await?;
    targets.assert_untouched()
}

/// A layer whose config names another diff id (the blob's digest is right).
async fn push_with_wrong_diff_id(env: &Env, targets: &Targets) -> anyhow::Result<PushedLayers> {
    let mut tar = LayerTar::default();
    tar.symlink("escape", "/")?.file(
        &format!("escape/{}/canary", targets.tmp.dir_in_root()),
        pwned(),
        b"pwned",
    )?;
    let mut layer = Layer::new(&tar.finish()?, LayerFormat::OciGzip)?;
    layer.diff_id = sha256_digest(b"not this layer");
    push_layers(
        &env.ca,
        env.registry.addr(),
        "hostile/diff-id",
        "v1",
        &env.pusher,
        &[layer],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_is_not_its_diff_id_is_refused() -> anyhow::Result<()> {
    // Today INTERNAL: the Diff.Apply path reports containerd's diff id as a containerd error.
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let pushed = push_with_wrong_diff_id(&env, &targets).await?;
    expect_refused(&env, &pushed, &targets, None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_is_not_its_diff_id_is_data_loss() -> anyhow::Result<()> {
    // contract.md: a digest mismatch is DATA_LOSS; the diff id is the uncompressed digest.
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let targets = Targets::plant(&env)?;
    let pushed = push_with_wrong_diff_id(&env, &targets).await?;
    expect_refused(&env, &pushed, &targets, Some(Code::DataLoss)).await?;
    Ok(())
}
