//! berth's own layer applier (issue 15), end to end: layers written straight into containerd's
//! overlayfs snapshots while they download, with and without the layer blobs kept in the
//! content store, and a layer corrupted in flight.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use anyhow::Context as _;
use berth::api::pb::{PruneImagesRequest, RemoveContainerRequest};
use tonic::Code;

use crate::harness::berthd::{Berthd, BerthdOptions};
use crate::harness::env::{start_request, Env, RegistryKind};
use crate::harness::faults::{Fault, FaultProxy, Target, Times};
use crate::harness::image::layered::PushedLayered;
use crate::harness::image::{sha256_digest, TestImage};
use crate::harness::layers::{push_layers, Layer, LayerFormat, LayerTar, Meta};
use crate::harness::wait::assert_eventually;

/// The random layer: several HTTP chunks and applier reads.
const RANDOM_BYTES: usize = 3 << 20;

/// Succeeds only when the layers' files are in the container's root filesystem.
const CHECK_FILES: &[&str] = &[
    "sh",
    "-c",
    "[ -s /random.bin ] && [ -x /bin/busybox ] && [ -s /berth-image-id ]",
];

/// berthd's log line when containerd's applier does the work in place of berth's.
const FALLBACK_LOG: &str = "applying the layer with containerd's applier";

/// An env whose berthd has `containerd_toml` in its `[containerd]` table.
async fn env_with(containerd_toml: &str, plain_http: Vec<String>) -> anyhow::Result<Env> {
    let mut env = Env::start(RegistryKind::Htpasswd).await?;
    env.berthd = Berthd::start(
        &env.containerd,
        &env.ca,
        &BerthdOptions {
            containerd_toml: containerd_toml.to_owned(),
            plain_http,
            ..BerthdOptions::default()
        },
    )
    .await?;
    Ok(env)
}

async fn push(env: &Env, repository: &str) -> anyhow::Result<PushedLayered> {
    TestImage::busybox(CHECK_FILES)
        .with_random_layer(RANDOM_BYTES)
        .push(&env.ca, env.registry.addr(), repository, "v1", &env.pusher)
        .await
}

/// The digests in the content store of the test's namespace.
async fn content_digests(env: &Env) -> anyhow::Result<String> {
    env.containerd.ctr_ok(&["content", "ls", "-q"]).await
}

/// An env whose berthd reaches the registry only through a fault proxy, and a secret for the
/// proxy's address.
async fn env_behind_proxy() -> anyhow::Result<(Env, FaultProxy, String)> {
    let mut env = Env::start(RegistryKind::Htpasswd).await?;
    let proxy = FaultProxy::start(&env.ca, env.registry.addr()).await?;
    env.berthd = Berthd::start(
        &env.containerd,
        &env.ca,
        &BerthdOptions {
            plain_http: vec![proxy.addr().to_owned()],
            ..BerthdOptions::default()
        },
    )
    .await?;
    let secret = env.create_secret("proxy", proxy.addr(), &env.user).await?;
    Ok((env, proxy, secret))
}

/// Orders `reference` as `name`, which must fail with DATA_LOSS and leave no image of
/// `repository` and no snapshot.
async fn assert_data_loss_leaves_nothing(
    env: &Env,
    name: &str,
    reference: &str,
    secret: &str,
    repository: &str,
) -> anyhow::Result<()> {
    let status = env
        .start_container(start_request(
            &format!("order-{name}"),
            name,
            reference,
            secret,
        ))
        .await?
        .err()
        .context("a corrupted layer started a container")?;
    assert_eq!(
        status.code(),
        Code::DataLoss,
        "{status:?}\n{}",
        env.berthd.log_tail()
    );
    let images = env.containerd.ctr_ok(&["images", "ls", "-q"]).await?;
    assert!(
        !images.contains(repository),
        "the image was recorded:\n{images}"
    );
    // The failed layer's snapshot was removed at once, and berthd waited for containerd's GC
    // to take what else only the pull's lease held: nothing is left when the error reaches
    // the scheduler.
    let left = snapshots(env).await?;
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}

/// The snapshots of the test's namespace, one `KEY PARENT KIND` line each.
async fn snapshots(env: &Env) -> anyhow::Result<Vec<String>> {
    Ok(env
        .containerd
        .ctr_ok(&["snapshots", "ls"])
        .await?
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_sees_the_files_berth_applied_and_kept_blobs_are_labelled() -> anyhow::Result<()>
{
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let pushed = push(&env, "team/applied").await?;
    env.run_to_completion(&pushed.image.reference(), &secret)
        .await?;
    let log = env.berthd.log_text();
    assert!(
        !log.contains(FALLBACK_LOG),
        "containerd applied a layer:\n{log}"
    );
    // keep_layer_blobs = true (the default): the blobs are stored and marked unpacked.
    let content = env.containerd.ctr_ok(&["content", "ls"]).await?;
    for layer in &pushed.layers {
        let line = content
            .lines()
            .find(|line| line.starts_with(&layer.digest))
            .with_context(|| format!("layer {} is not stored:\n{content}", layer.digest))?;
        assert!(
            line.contains("containerd.io/uncompressed=sha256:"),
            "layer {} has no uncompressed label: {line}",
            layer.digest
        );
    }
    // berthd wrote the layer blobs into containerd's content directory itself (the probe
    // found that containerd takes them as shared content): containerd serves those very
    // files, read-only like its own, and the directory holds nothing else (no probe left).
    assert!(
        log.contains("writing kept layer blobs into containerd's content directory"),
        "{log}"
    );
    let blobs = env
        .containerd
        .dir()
        .join("root/io.containerd.content.v1.content/blobs/sha256");
    for layer in &pushed.layers {
        let hex = layer.digest.trim_start_matches("sha256:");
        let mode = std::fs::metadata(blobs.join(hex))
            .with_context(|| format!("no file for layer {}", layer.digest))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444, "layer {}", layer.digest);
        let served = env
            .containerd
            .ctr(
                env.containerd.namespace(),
                &["content", "get", &layer.digest],
            )
            .await?;
        assert!(served.status.success(), "{served:?}");
        assert_eq!(sha256_digest(&served.stdout), layer.digest);
    }
    for entry in std::fs::read_dir(&blobs)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        assert!(
            content.contains(&format!("sha256:{name}")),
            "{name} in the content directory is not in the content store:\n{content}"
        );
    }
    let check = env.containerd.ctr_ok(&["images", "check"]).await?;
    assert!(
        check
            .lines()
            .any(|line| line.contains("team/applied") && line.contains("complete")),
        "{check}"
    );
    // No extraction snapshot is left active.
    let left = snapshots(&env).await?;
    assert!(
        !left.iter().any(|line| line.starts_with("extract-")),
        "{left:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kept_layer_blobs_an_image_runs_is_pruned_and_pulled_again() -> anyhow::Result<()> {
    let env = env_with("keep_layer_blobs = false", Vec::new()).await?;
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let pushed = push(&env, "team/discarded").await?;
    let reference = pushed.image.reference();

    let first = env.run_to_completion(&reference, &secret).await?;
    let content = content_digests(&env).await?;
    assert!(content.contains(&pushed.config.digest), "{content}");
    assert!(content.contains(&pushed.image.manifest_digest), "{content}");
    for layer in &pushed.layers {
        assert!(
            !content.contains(&layer.digest),
            "layer {} was kept:\n{content}",
            layer.digest
        );
    }
    // Started again: the image is whole without its layer blobs.
    let second = env.run_to_completion(&reference, &secret).await?;

    let mut agent = env.berthd.agent().await?;
    for id in [first.id, second.id] {
        agent
            .remove_container(RemoveContainerRequest { id, force: false })
            .await?;
    }
    let report = agent
        .prune_images(PruneImagesRequest { keep_bytes: 0 })
        .await?
        .into_inner();
    assert_eq!(report.removed, std::slice::from_ref(&reference));
    assert_eventually(
        "the image's snapshots to go",
        Duration::from_secs(20),
        || {
            let env = &env;
            async move { Ok(snapshots(env).await?.is_empty()) }
        },
    )
    .await?;

    // Pulled again from the registry, and runs.
    env.run_to_completion(&reference, &secret).await?;
    assert!(!env.berthd.log_text().contains(FALLBACK_LOG));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_corrupted_in_flight_is_data_loss_and_leaves_no_image_or_snapshot(
) -> anyhow::Result<()> {
    let (env, proxy, secret) = env_behind_proxy().await?;
    let pushed = push(&env, "team/corrupted-layer").await?;
    let random = pushed.random_layer();
    // A byte in the middle of the random file's data: the tar still parses, the digest fails.
    proxy.inject(
        Target::Blob(random.digest.clone()),
        Fault::FlipByte(random.size / 2),
        Times::Always,
    );
    let reference = pushed.image.reference_via(proxy.addr());
    assert_data_loss_leaves_nothing(&env, "corrupt", &reference, &secret, "team/corrupted-layer")
        .await
}

/// The bottom layer (8 MiB) is corrupted in flight while the small layer above it is being
/// applied ahead of it, into a staging snapshot: the pull is DATA_LOSS and neither the staging
/// snapshot nor anything else is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_parent_leaves_no_staged_child_behind() -> anyhow::Result<()> {
    let (env, proxy, secret) = env_behind_proxy().await?;
    let mut parent = LayerTar::default();
    parent.file(
        "big",
        Meta::mode(0o644),
        &crate::harness::random_bytes(8 << 20),
    )?;
    let mut child = LayerTar::default();
    child.file("etc/child", Meta::mode(0o644), b"child\n")?;
    let layers = [
        Layer::new(&parent.finish()?, LayerFormat::OciGzip)?,
        Layer::new(&child.finish()?, LayerFormat::OciGzip)?,
    ];
    let pushed = push_layers(
        &env.ca,
        env.registry.addr(),
        "team/staged-corrupt",
        "v1",
        &env.pusher,
        &layers,
    )
    .await?;
    proxy.inject(
        Target::Blob(layers[0].digest.clone()),
        Fault::FlipByte(layers[0].blob.len() as u64 * 3 / 4),
        Times::Always,
    );
    let reference = pushed.image.reference_via(proxy.addr());
    assert_data_loss_leaves_nothing(&env, "staged", &reference, &secret, "team/staged-corrupt")
        .await?;
    let log = env.berthd.log_text();
    assert!(
        log.lines()
            .any(|line| line.contains("applying the layer as it downloads")
                && line.contains("staged=true")),
        "the child layer was not staged:\n{}",
        env.berthd.log_tail()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_snapshotter_falls_back_to_containerds_applier() -> anyhow::Result<()> {
    let env = env_with("snapshotter = \"native\"", Vec::new()).await?;
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let pushed = push(&env, "team/native").await?;
    env.run_to_completion(&pushed.image.reference(), &secret)
        .await?;
    let log = env.berthd.log_text();
    assert!(
        log.contains(FALLBACK_LOG) && log.contains("the snapshotter is not overlayfs"),
        "no fallback logged:\n{log}"
    );
    let native = env
        .containerd
        .ctr_ok(&["snapshots", "--snapshotter", "native", "ls"])
        .await?;
    assert!(native.lines().count() > 1, "{native}");
    Ok(())
}
