//! One fault at a time between berthd and the registry: each one survived (resumed where
//! possible), and a registry that stays broken gives up with UNAVAILABLE inside the deadline,
//! leaving no image record behind.

use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use super::{
    blob_committed, image_names, ingest_offset, FaultEnv, FAST_DEADLINE, FAST_REGISTRY, LAYER_BYTES,
};
use crate::harness::env::{start_request, RegistryKind};
use crate::harness::faults::{Fault, Target, Times};
use crate::harness::free_local_port;

/// A cut at 40 % of the random layer: the retry asks for `Range: bytes=<what arrived>-` and
/// gets only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_mid_layer_is_resumed_from_where_it_stopped() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx.push("team/cut", &["echo", "ok"], LAYER_BYTES).await?;
    let blob = pushed.random_layer();
    let cut = blob.size * 2 / 5;
    fx.proxy.inject(
        Target::Blob(blob.digest.clone()),
        Fault::CutAfter(cut),
        Times::Once,
    );

    let (container, took) = fx.run(&fx.via_proxy(&pushed)).await?;
    assert_eq!(container.image_digest, pushed.image.manifest_digest);

    let (first, resumed) = fx.proxy.gets_resumed_after(&blob.digest, cut)?;
    let log = fx.proxy.describe();
    assert_eq!(first.range, None, "{log}");
    let resumed_from = resumed.range_start();
    assert_eq!(resumed.status, 206, "{log}");
    assert_eq!(resumed.bytes_sent, blob.size - resumed_from, "{log}");
    let fetched = fx.proxy.blob_bytes_sent(&blob.digest);
    assert!(
        fetched * 2 < blob.size * 3,
        "fetched {fetched} bytes for a {}-byte blob",
        blob.size
    );
    println!(
        "[measure] cut mid-layer: blob {} B, cut after {cut} B, resumed with Range bytes={resumed_from}-, \
         re-fetched {} B ({:.3} of the blob), total fetched {fetched} B ({:.3}x); order took {took:?}",
        blob.size,
        resumed.bytes_sent,
        resumed.bytes_sent as f64 / blob.size as f64,
        fetched as f64 / blob.size as f64,
    );
    Ok(())
}

/// 503 twice on the layer and twice on the manifest: retried with backoff, then pulled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_503s_are_retried() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx.push("team/flaky", &["echo", "ok"], LAYER_BYTES).await?;
    let blob = pushed.random_layer();
    fx.proxy.inject(
        Target::Blob(blob.digest.clone()),
        Fault::unavailable(),
        Times::N(2),
    );
    fx.proxy
        .inject(Target::Manifests, Fault::unavailable(), Times::N(2));

    let (_, took) = fx.run(&fx.via_proxy(&pushed)).await?;
    let gets = fx.proxy.blob_gets(&blob.digest);
    let log = fx.proxy.describe();
    let statuses: Vec<u16> = gets.iter().map(|get| get.status).collect();
    assert_eq!(statuses, [503, 503, 200], "{log}");
    assert_eq!(fx.proxy.blob_bytes_sent(&blob.digest), blob.size, "{log}");
    let manifest_statuses: Vec<u16> = fx
        .proxy
        .requests_to("/manifests/")
        .iter()
        .map(|request| request.status)
        .collect();
    assert_eq!(&manifest_statuses[..3], [503, 503, 200], "{log}");
    let gaps: Vec<Duration> = gets
        .windows(2)
        .map(|pair| pair[1].arrived.saturating_sub(pair[0].arrived))
        .collect();
    println!(
        "[measure] 503 x2 on layer and manifest: order took {took:?}; layer retry gaps {gaps:?}"
    );
    Ok(())
}

/// 429 with `Retry-After: 1` on the layer: retried no sooner than the registry asked, then
/// pulled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_retried() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx
        .push("team/throttled", &["echo", "ok"], LAYER_BYTES)
        .await?;
    let blob = pushed.random_layer();
    fx.proxy.inject(
        Target::Blob(blob.digest.clone()),
        Fault::too_many_requests(1),
        Times::N(2),
    );

    let (_, took) = fx.run(&fx.via_proxy(&pushed)).await?;
    let gets = fx.proxy.blob_gets(&blob.digest);
    let log = fx.proxy.describe();
    let statuses: Vec<u16> = gets.iter().map(|get| get.status).collect();
    assert_eq!(statuses, [429, 429, 200], "{log}");
    let gaps: Vec<Duration> = gets
        .windows(2)
        .map(|pair| pair[1].arrived.saturating_sub(pair[0].arrived))
        .collect();
    println!(
        "[measure] 429 (Retry-After: 1) x2: order took {took:?}; gaps before the retries {gaps:?}"
    );
    assert!(
        gaps.iter().all(|gap| *gap >= Duration::from_millis(950)),
        "Retry-After: 1 not honoured: {gaps:?}\n{log}"
    );
    Ok(())
}

/// The layer stalls after 2 MiB for longer than `read_timeout_seconds` (2 s): berthd gives up
/// on that response after the read timeout and resumes with a Range request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_layer_is_resumed_after_the_read_timeout() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx
        .push("team/stalled", &["echo", "ok"], LAYER_BYTES)
        .await?;
    let blob = pushed.random_layer();
    let stall_at = 2 << 20;
    fx.proxy.stall_blob_once(&blob.digest, stall_at);

    let (_, took) = fx.run(&fx.via_proxy(&pushed)).await?;
    let (stalled, resumed) = fx.proxy.gets_resumed_after(&blob.digest, stall_at)?;
    let log = fx.proxy.describe();
    let gap = resumed.arrived.saturating_sub(stalled.arrived);
    assert!(
        gap >= Duration::from_secs(2),
        "the retry came before the 2 s read timeout ({gap:?}):\n{log}"
    );
    assert!(took < FAST_DEADLINE, "took {took:?}");
    println!(
        "[measure] stall after {stall_at} B (read timeout 2 s): retry with Range bytes={}- \
         {gap:?} after the first GET; re-fetched {} B of {}; order took {took:?}",
        resumed.range_start(),
        resumed.bytes_sent,
        blob.size
    );
    Ok(())
}

/// The manifest's response first stalls before its headers (longer than the read timeout), then
/// is cut mid-body: berthd asks again each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_cut_manifest_is_asked_for_again() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx
        .push("team/slowmanifest", &["echo", "ok"], 1 << 20)
        .await?;
    fx.proxy.inject(
        Target::Manifests,
        Fault::StallHeaders(Duration::from_secs(30)),
        Times::Once,
    );
    fx.proxy
        .inject(Target::Manifests, Fault::CutAfter(100), Times::Once);
    let (_, took) = fx.run(&fx.via_proxy(&pushed)).await?;
    let manifests = fx.proxy.requests_to("/manifests/");
    let log = fx.proxy.describe();
    assert!(manifests.len() >= 3, "{log}");
    assert_eq!(manifests[1].bytes_sent, 100, "{log}");
    assert!(manifests[1].body_len > 100, "{log}");
    let gap = manifests[1].arrived.saturating_sub(manifests[0].arrived);
    assert!(
        gap >= Duration::from_secs(2),
        "asked again after {gap:?}:\n{log}"
    );
    println!(
        "[measure] manifest stalled before headers, then cut: asked again after {gap:?}; order took {took:?}"
    );
    Ok(())
}

/// Every blob response stalls forever: UNAVAILABLE once the attempts are spent, well inside
/// the pull deadline, and no image record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_always_stalls_is_unavailable_within_the_deadline() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx.push("team/frozen", &["echo", "ok"], LAYER_BYTES).await?;
    fx.proxy.inject(
        Target::AnyBlob,
        Fault::StallAfter {
            bytes: 0,
            stall: Duration::from_secs(120),
        },
        Times::Always,
    );

    let image = fx.via_proxy(&pushed);
    let (status, took) = unavailable_in_time(&fx, "frozen", &image, "team/frozen").await?;
    let layer_gets = fx.proxy.blob_gets(&pushed.random_layer().digest).len();
    println!(
        "[measure] permanent stall: {:?} after {took:?} ({layer_gets} GETs of the layer): {}",
        status.code(),
        status.message()
    );
    Ok(())
}

/// The first GET of the layer is cut; the registry then ignores Range and answers 200 with
/// the whole blob: berthd starts the blob over and the pull succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_ignores_range_gets_the_blob_fetched_whole() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx
        .push("team/norange", &["echo", "ok"], LAYER_BYTES)
        .await?;
    let blob = pushed.random_layer();
    let cut = blob.size * 2 / 5;
    fx.proxy.inject(
        Target::Blob(blob.digest.clone()),
        Fault::CutAfter(cut),
        Times::Once,
    );
    fx.proxy.inject(
        Target::Blob(blob.digest.clone()),
        Fault::IgnoreRange,
        Times::Always,
    );

    let (container, took) = fx.run(&fx.via_proxy(&pushed)).await?;
    assert_eq!(container.image_digest, pushed.image.manifest_digest);
    let gets = fx.proxy.blob_gets(&blob.digest);
    let log = fx.proxy.describe();
    assert_eq!(gets.len(), 2, "{log}");
    assert!(
        gets[1].range_start() > 0,
        "berthd asked for a range:\n{log}"
    );
    assert_eq!(gets[1].status, 200, "{log}");
    assert_eq!(gets[1].bytes_sent, blob.size, "{log}");
    println!(
        "[measure] Range ignored: cut after {cut} B, retry asked {:?}, got 200 with {} B; \
         total {} B for a {}-byte blob; order took {took:?}",
        gets[1].range,
        gets[1].bytes_sent,
        fx.proxy.blob_bytes_sent(&blob.digest),
        blob.size
    );
    Ok(())
}

/// The registry answers 503 to everything: UNAVAILABLE within the deadline, no image record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_outage_is_unavailable_within_the_deadline() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx.push("team/down", &["echo", "ok"], 1 << 20).await?;
    fx.proxy
        .inject(Target::Any, Fault::unavailable(), Times::Always);

    let image = fx.via_proxy(&pushed);
    let (status, took) = unavailable_in_time(&fx, "down", &image, "team/down").await?;
    let requests = fx.proxy.requests().len();
    println!(
        "[measure] 503 always: {:?} after {took:?} ({requests} requests): {}",
        status.code(),
        status.message()
    );

    // The registry comes back: the same order now runs.
    fx.proxy.clear();
    let result = fx
        .env
        .start_container(fx.order("order-down", "down", &image))
        .await?;
    let container = result.map_err(|status| anyhow::anyhow!("after the outage: {status:?}"))?;
    let exited = fx.env.wait_until_exited(&container.id).await?;
    assert_eq!(exited.exit_code, 0);
    Ok(())
}

/// Nothing listens at the registry's address (a registry that is stopped): UNAVAILABLE, quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_is_not_running_is_unavailable() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let gone = format!("127.0.0.1:{}", free_local_port()?);
    let secret = fx.env.create_secret("gone", &gone, &fx.env.user).await?;
    let image = format!("{gone}/team/app:v1");
    let started = Instant::now();
    let result = fx
        .env
        .start_container(start_request("order-gone", "gone", &image, &secret))
        .await?;
    let took = started.elapsed();
    let status = result.expect_err("no registry, no image");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(took < FAST_DEADLINE, "gave up after {took:?}");
    println!(
        "[measure] registry not running: {:?} after {took:?}: {}",
        status.code(),
        status.message()
    );
    Ok(())
}

/// A pull that fails after part of a layer arrived keeps that part: the next order for the
/// image resumes it with a Range request instead of fetching the blob again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pull_leaves_its_partial_layer_for_the_next_order() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx
        .push("team/partial", &["echo", "ok"], LAYER_BYTES)
        .await?;
    let blob = pushed.random_layer();
    let cut = blob.size / 2;
    fx.proxy.inject(
        Target::Blob(blob.digest.clone()),
        Fault::CutAfter(cut),
        Times::Once,
    );
    fx.proxy.inject(
        Target::Blob(blob.digest.clone()),
        Fault::unavailable(),
        Times::Always,
    );
    let image = fx.via_proxy(&pushed);
    let result = fx
        .env
        .start_container(fx.order("order-partial", "partial", &image))
        .await?;
    let status = result.expect_err("the layer never arrives whole");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!blob_committed(&fx.env, &blob.digest));
    let kept_right_after = ingest_offset(&fx.env, &blob.digest)?;

    fx.proxy.clear();
    fx.proxy.forget_requests();
    // containerd collects garbage on a timer after a lease is deleted: give it the chance.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept_later = ingest_offset(&fx.env, &blob.digest)?;
    let result = fx
        .env
        .start_container(fx.order("order-partial", "partial", &image))
        .await?;
    let container = result.map_err(|status| anyhow::anyhow!("second order: {status:?}"))?;
    fx.env.wait_until_exited(&container.id).await?;
    let gets = fx.proxy.blob_gets(&blob.digest);
    println!(
        "[measure] failed pull: ingest right after the failure {kept_right_after:?} B, 2 s later \
         {kept_later:?} B; the next order's GETs: {:?}",
        gets.iter()
            .map(|get| (get.range.clone(), get.bytes_sent))
            .collect::<Vec<_>>()
    );
    assert_eq!(gets.len(), 1, "{}", fx.proxy.describe());
    assert!(
        gets[0].range_start() > 0,
        "the next order fetched the whole layer again ({} B) instead of resuming the {cut} B \
         that had arrived (ingest right after the failure: {kept_right_after:?}, 2 s later: \
         {kept_later:?})",
        gets[0].bytes_sent
    );
    Ok(())
}

/// A pull slower than `pull_deadline_seconds` (5 s here) ends with DEADLINE_EXCEEDED and no
/// image record; once the registry is fast again the same order runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_slower_than_the_deadline_is_deadline_exceeded() -> anyhow::Result<()> {
    let fx = FaultEnv::start(
        "connect_timeout_seconds = 2\nread_timeout_seconds = 2\nretries = 5\npull_deadline_seconds = 5\n",
    )
    .await?;
    let pushed = fx.push("team/slow", &["echo", "ok"], LAYER_BYTES).await?;
    // 6 MiB at 256 KiB/s: about 24 s, every piece well inside the read timeout.
    fx.proxy.inject(
        Target::AnyBlob,
        Fault::Throttle {
            bytes_per_second: 256 << 10,
        },
        Times::Always,
    );
    let image = fx.via_proxy(&pushed);
    let started = Instant::now();
    let status = fx
        .env
        .start_container(fx.order("order-slow", "slow", &image))
        .await?
        .expect_err("the pull cannot finish within 5 s");
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(10),
        "gave up after {took:?}"
    );
    let images = image_names(&fx.env).await?;
    assert!(
        !images.iter().any(|name| name.contains("team/slow")),
        "{images:?}"
    );
    println!(
        "[measure] pull past a 5 s deadline: {:?} after {took:?}: {}",
        status.code(),
        status.message()
    );

    fx.proxy.clear();
    let container = fx
        .env
        .start_container(fx.order("order-slow", "slow", &image))
        .await?
        .map_err(|status| anyhow::anyhow!("after the slow registry recovered: {status:?}"))?;
    assert_eq!(fx.env.wait_until_exited(&container.id).await?.exit_code, 0);
    Ok(())
}

/// A token registry whose `/v2/` ping answers 503 once: the order still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_on_a_token_registrys_ping_is_survived() -> anyhow::Result<()> {
    let fx = FaultEnv::start_with(RegistryKind::Token, FAST_REGISTRY).await?;
    let pushed = fx.push("team/pinged", &["echo", "ok"], 1 << 20).await?;
    fx.proxy
        .inject(Target::Ping, Fault::unavailable(), Times::Once);
    let (_, took) = fx.run(&fx.via_proxy(&pushed)).await?;
    println!(
        "[measure] 503 on a token registry's /v2/: order took {took:?}; ping statuses {:?}",
        fx.proxy
            .requests()
            .iter()
            .filter(|request| request.path == "/v2/")
            .map(|request| request.status)
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// Orders `image` as container `name` (order id `order-<name>`) from a registry that stays
/// broken: UNAVAILABLE inside the fast deadline, and no image record of `repository`. Returns
/// the status and how long the order took.
async fn unavailable_in_time(
    fx: &FaultEnv,
    name: &str,
    image: &str,
    repository: &str,
) -> anyhow::Result<(tonic::Status, Duration)> {
    let started = Instant::now();
    let result = fx
        .env
        .start_container(fx.order(&format!("order-{name}"), name, image))
        .await?;
    let took = started.elapsed();
    let status = result.expect_err("a registry that stays broken cannot be pulled from");
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "{status:?}\n{}",
        fx.proxy.describe()
    );
    assert!(took < FAST_DEADLINE, "gave up after {took:?}");
    let images = image_names(&fx.env).await?;
    assert!(
        !images.iter().any(|name| name.contains(repository)),
        "{images:?}"
    );
    Ok((status, took))
}
