//! `stall_timeout_seconds`: a blob download that receives nothing for that long is cut and
//! resumed alone (Range), counted and logged; a registry that trickles is not stalled, and only
//! the pull deadline ends it. `read_timeout_seconds` is set high so only the stall clock fires.

use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use super::{metric, with_metrics, FaultEnv, LAYER_BYTES};
use crate::harness::env::RegistryKind;
use crate::harness::faults::{Fault, Target, Times};

const STALL: Duration = Duration::from_secs(2);

/// The random layer stops after 2 MiB for a minute: berthd cuts it after the 2 s stall timeout
/// and resumes it from its offset; the other blobs are fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_blob_is_cut_and_resumed_alone_after_the_stall_timeout() -> anyhow::Result<()> {
    let (options, metrics) = with_metrics(
        "connect_timeout_seconds = 2\nread_timeout_seconds = 120\nretries = 5\n\
         pull_deadline_seconds = 60\nstall_timeout_seconds = 2\n",
    )?;
    let fx = FaultEnv::start_configured(RegistryKind::Htpasswd, options).await?;
    let pushed = fx.push("team/stall", &["echo", "ok"], LAYER_BYTES).await?;
    let blob = pushed.random_layer();
    let stall_at = 2 << 20;
    fx.proxy.stall_blob_once(&blob.digest, stall_at);

    let (container, took) = fx.run(&fx.via_proxy(&pushed)).await?;
    assert_eq!(container.image_digest, pushed.image.manifest_digest);
    let (stalled, resumed) = fx.proxy.gets_resumed_after(&blob.digest, stall_at)?;
    let log = fx.proxy.describe();
    assert_eq!(resumed.status, 206, "{log}");
    assert_eq!(
        resumed.bytes_sent,
        blob.size - resumed.range_start(),
        "{log}"
    );
    // Cut once the stall timeout passed after the last byte, then resumed after one backoff.
    let gap = resumed.arrived.saturating_sub(stalled.arrived);
    assert!(
        gap >= STALL && gap < STALL + Duration::from_millis(1500),
        "resumed {gap:?} after the first GET:\n{log}"
    );
    for other in [&pushed.config, &pushed.layers[0]] {
        assert_eq!(
            fx.proxy.blob_gets(&other.digest).len(),
            1,
            "{} fetched again:\n{log}",
            other.digest
        );
    }
    let stalls = metric(
        &metrics,
        "berth_download_stalls_total",
        &[("registry", fx.proxy.addr())],
    )
    .await?;
    assert_eq!(stalls, 1.0);
    let berthd_log = fx.env.berthd.log_text();
    assert_eq!(
        berthd_log.matches("blob download stalled").count(),
        1,
        "{}",
        fx.env.berthd.log_tail()
    );
    println!(
        "[measure] stall after {stall_at} B (stall timeout 2 s, read timeout 120 s): cut and \
         resumed with Range bytes={}- {gap:?} after the first GET; re-fetched {} B \
         of {}; order took {took:?}; berth_download_stalls_total {stalls}",
        resumed.range_start(),
        resumed.bytes_sent,
        blob.size
    );
    Ok(())
}

/// The random layer trickles 4 bytes a second: never quiet for 2 s, so the stall clock never
/// fires; the 6 s pull deadline ends the order with DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_registry_is_not_stalled_and_the_deadline_ends_it() -> anyhow::Result<()> {
    let (options, metrics) = with_metrics(
        "connect_timeout_seconds = 2\nread_timeout_seconds = 120\nretries = 5\n\
         pull_deadline_seconds = 6\nstall_timeout_seconds = 2\n",
    )?;
    let fx = FaultEnv::start_configured(RegistryKind::Htpasswd, options).await?;
    let pushed = fx
        .push("team/trickle", &["echo", "ok"], LAYER_BYTES)
        .await?;
    let blob = pushed.random_layer();
    fx.proxy.inject(
        Target::Blob(blob.digest.clone()),
        Fault::Trickle {
            bytes_per_second: 4,
        },
        Times::Always,
    );

    let started = Instant::now();
    let status = fx
        .env
        .start_container(fx.order("order-trickle", "trickle", &fx.via_proxy(&pushed)))
        .await?
        .expect_err("4 bytes a second cannot bring 6 MiB within 6 s");
    let took = started.elapsed();
    let log = fx.proxy.describe();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}\n{log}");
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(10),
        "gave up after {took:?}"
    );
    let gets = fx.proxy.blob_gets(&blob.digest);
    assert_eq!(gets.len(), 1, "the trickle was never cut:\n{log}");
    let stalls = metric(
        &metrics,
        "berth_download_stalls_total",
        &[("registry", fx.proxy.addr())],
    )
    .await?;
    assert_eq!(stalls, 0.0);
    assert!(
        !fx.env.berthd.log_text().contains("blob download stalled"),
        "{}",
        fx.env.berthd.log_tail()
    );
    println!(
        "[measure] trickle of 4 B/s (stall timeout 2 s, deadline 6 s): {:?} after {took:?}, \
         {} B of the layer arrived over 1 GET, no stall counted",
        status.code(),
        gets[0].bytes_sent
    );
    Ok(())
}
