//! berthd killed mid-pull and restarted; containerd restarted under berthd; berthd stopped
//! with SIGTERM while containers run and while an order is in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use berth::api::pb::{Container, ContainerState, GetContainerRequest, StartContainerRequest};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{
    blob_committed, image_names, ingest_offset, tasks, wait_for_state, FaultEnv, LAYER_BYTES,
};
use crate::harness::berthd::BerthdOptions;
use crate::harness::env::{start_request, Env, RegistryKind};
use crate::harness::faults::{Fault, Target, Times};
use crate::harness::image::layered::BlobInfo;
use crate::harness::image::TestImage;
use crate::harness::wait::wait_for;

/// berthd waits long enough on a stalled response that it can be killed mid-layer.
const PATIENT_REGISTRY: &str = "read_timeout_seconds = 60\n\
                                retries = 5\n\
                                pull_deadline_seconds = 120\n";

/// An order whose random layer stalls for good after `stall_at(size)` bytes, in flight.
struct StalledOrder {
    repository: String,
    blob: BlobInfo,
    stall_at: u64,
    request: StartContainerRequest,
    first: JoinHandle<Result<tonic::Response<Container>, tonic::Status>>,
}

impl StalledOrder {
    /// The same order again (after berthd's restart): it must succeed.
    async fn order_again(&self, fx: &FaultEnv) -> anyhow::Result<Container> {
        fx.env
            .start_container(self.request.clone())
            .await?
            .map_err(|status| {
                anyhow::anyhow!(
                    "the order after the restart: {status:?}\nproxy saw:\n{}\nberthd log:\n{}",
                    fx.proxy.describe(),
                    fx.env.berthd.log_tail()
                )
            })
    }

    async fn start(
        fx: &FaultEnv,
        name: &str,
        stall_at: impl Fn(u64) -> u64,
    ) -> anyhow::Result<Self> {
        let repository = format!("team/{name}");
        let pushed = fx.push(&repository, &["echo", "ok"], LAYER_BYTES).await?;
        let blob = pushed.random_layer().clone();
        let stall_at = stall_at(blob.size);
        fx.proxy.inject(
            Target::Blob(blob.digest.clone()),
            Fault::StallAfter {
                bytes: stall_at,
                stall: Duration::from_secs(300),
            },
            Times::Once,
        );
        let request = fx.order(&format!("order-{name}"), name, &fx.via_proxy(&pushed));
        let mut agent = fx.env.berthd.agent().await?;
        let first = tokio::spawn({
            let request = request.clone();
            async move { agent.start_container(request).await }
        });
        Ok(Self {
            repository,
            blob,
            stall_at,
            request,
            first,
        })
    }

    /// SIGKILL to berthd: the order fails and no image record is left.
    async fn kill_berthd(&mut self, fx: &mut FaultEnv) -> anyhow::Result<()> {
        let killed = fx.env.berthd.kill9().await?;
        assert!(!killed.success(), "SIGKILL: {killed:?}");
        let outcome = (&mut self.first).await?;
        assert!(
            outcome.is_err(),
            "the order cannot succeed once berthd is gone: {outcome:?}"
        );
        let images = image_names(&fx.env).await?;
        assert!(
            !images.iter().any(|name| name.contains(&self.repository)),
            "an image record after a killed pull: {images:?}"
        );
        Ok(())
    }
}

/// With `resumable_layer_blobs`, SIGKILL while a layer is half fetched: no image record, the
/// ingest stays, and after a restart the same order resumes it from the ingest's offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berthd_killed_mid_pull_resumes_the_layer_after_a_restart() -> anyhow::Result<()> {
    let mut fx = FaultEnv::start_configured(
        RegistryKind::Htpasswd,
        BerthdOptions {
            registry_toml: PATIENT_REGISTRY.to_owned(),
            containerd_toml: "resumable_layer_blobs = true".to_owned(),
            ..BerthdOptions::default()
        },
    )
    .await?;
    let mut order = StalledOrder::start(&fx, "killed", |size| size * 7 / 16).await?;
    let (blob, stall_at) = (order.blob.clone(), order.stall_at);
    // berthd hands containerd the bytes in 512 KiB chunks: wait until everything sent before
    // the stall arrived and the ingest holds at least the whole MiBs of it.
    let expected = stall_at / (1 << 20) * (1 << 20);
    wait_for(
        "the stalled layer's ingest to reach its last whole MiB",
        Duration::from_secs(30),
        || async {
            let sent = fx.proxy.blob_bytes_sent(&blob.digest);
            let offset = ingest_offset(&fx.env, &blob.digest)?;
            Ok((sent == stall_at && offset.is_some_and(|offset| offset >= expected)).then_some(()))
        },
    )
    .await
    .map_err(|failure| failure.context(fx.proxy.describe()))?;

    order.kill_berthd(&mut fx).await?;
    let active = fx.env.containerd.ctr_ok(&["content", "active"]).await?;
    assert!(
        active.contains(&format!("berth-blob-{}", blob.digest)),
        "no partial ingest of the layer:\n{active}"
    );
    // With berthd gone the ingest no longer moves: this is where a resume must start.
    let offset = ingest_offset(&fx.env, &blob.digest)?
        .ok_or_else(|| anyhow::anyhow!("the ingest vanished"))?;
    assert!(
        offset >= expected && offset <= stall_at,
        "ingest holds {offset} B"
    );
    assert!(!blob_committed(&fx.env, &blob.digest));

    fx.proxy.clear();
    fx.proxy.forget_requests();
    let restarting = Instant::now();
    fx.env.berthd.restart().await?;
    let restarted_in = restarting.elapsed();
    let ordered = Instant::now();
    let container = order.order_again(&fx).await?;
    let order_took = ordered.elapsed();
    let exited = fx.env.wait_until_exited(&container.id).await?;
    assert_eq!(exited.exit_code, 0);

    let gets = fx.proxy.blob_gets(&blob.digest);
    let log = fx.proxy.describe();
    assert_eq!(gets.len(), 1, "{log}");
    assert_eq!(
        gets[0].range_start(),
        offset,
        "the resumed GET must start at the ingest's offset:\n{log}"
    );
    assert_eq!(gets[0].bytes_sent, blob.size - offset, "{log}");
    assert!(blob_committed(&fx.env, &blob.digest));
    assert_eq!(ingest_offset(&fx.env, &blob.digest)?, None);
    let fetched = stall_at + gets[0].bytes_sent;
    assert!(fetched * 2 < blob.size * 3, "fetched {fetched} in all");
    println!(
        "[measure] kill -9 mid-layer: {stall_at} B sent before the kill, ingest held {offset} B; \
         after the restart ({restarted_in:?}) the layer was resumed with Range bytes={offset}- \
         ({} B); {fetched} B in all for a {}-byte blob ({:.3}x); the order took {order_took:?}",
        gets[0].bytes_sent,
        blob.size,
        fetched as f64 / blob.size as f64,
    );
    Ok(())
}

/// containerd goes away under berthd: orders and queries get UNAVAILABLE; once containerd is
/// back (same root, state and socket) everything works again without restarting berthd, and the
/// container that ran all along is still reported RUNNING.
/// By default (berthd writes kept blobs into containerd's content directory itself) SIGKILL
/// mid-layer leaves nothing behind: no image record, no ingest, and no file in the content
/// directory but committed blobs (the layer's file was anonymous). The next order after the
/// restart fetches the layer whole and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berthd_killed_mid_pull_leaves_no_partial_blob_and_the_next_order_runs(
) -> anyhow::Result<()> {
    let mut fx = FaultEnv::start(PATIENT_REGISTRY).await?;
    let mut order = StalledOrder::start(&fx, "killed-direct", |size| size / 2).await?;
    let (blob, stall_at) = (order.blob.clone(), order.stall_at);
    wait_for(
        "the registry to send half the layer",
        Duration::from_secs(30),
        || async { Ok((fx.proxy.blob_bytes_sent(&blob.digest) == stall_at).then_some(())) },
    )
    .await
    .map_err(|failure| failure.context(fx.proxy.describe()))?;
    // The bytes have reached berthd's blob file (its writer queues a few chunks at most).
    tokio::time::sleep(Duration::from_millis(300)).await;

    order.kill_berthd(&mut fx).await?;
    assert_eq!(ingest_offset(&fx.env, &blob.digest)?, None);
    let content = fx.env.containerd.ctr_ok(&["content", "ls", "-q"]).await?;
    let blobs = super::content_root(&fx.env).join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        assert!(
            content.contains(&format!("sha256:{name}")),
            "{name} is in the content directory but not in the content store:\n{content}"
        );
    }
    assert!(!blob_committed(&fx.env, &blob.digest));

    fx.proxy.clear();
    fx.proxy.forget_requests();
    fx.env.berthd.restart().await?;
    let container = order.order_again(&fx).await?;
    assert_eq!(fx.env.wait_until_exited(&container.id).await?.exit_code, 0);
    let gets = fx.proxy.blob_gets(&blob.digest);
    assert_eq!(gets.len(), 1, "{}", fx.proxy.describe());
    assert_eq!(gets[0].range_start(), 0, "{}", fx.proxy.describe());
    assert!(blob_committed(&fx.env, &blob.digest));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_restarted_under_berthd() -> anyhow::Result<()> {
    let (mut env, secret, running) = env_with_a_sleeper().await?;
    let later = env
        .push("team/later", "v1", &TestImage::busybox(&["echo", "back"]))
        .await?;

    env.containerd.stop_daemon();
    let during = start_request("order-during", "during", &later.reference(), &secret);
    let asked = Instant::now();
    let status = env
        .start_container(during.clone())
        .await?
        .expect_err("no containerd, no container");
    let refused_in = asked.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let mut agent = env.berthd.agent().await?;
    let get = GetContainerRequest {
        id: running.id.clone(),
        ..GetContainerRequest::default()
    };
    let status = agent
        .get_container(get.clone())
        .await
        .expect_err("no containerd, no container state");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Health follows containerd: a scheduler's health check sees what an order would meet.
    let not_serving_after = wait_for_health(&env, ServingStatus::NotServing).await?;

    env.containerd.start_again().await?;
    let back = Instant::now();
    let serving_after = wait_for_health(&env, ServingStatus::Serving).await?;
    let failures = AtomicUsize::new(0);
    let seen = wait_for(
        "GetContainer to answer again",
        Duration::from_secs(30),
        || {
            let mut agent = agent.clone();
            let get = get.clone();
            let failures = &failures;
            async move {
                match agent.get_container(get).await {
                    Ok(reply) => Ok(Some(reply.into_inner())),
                    Err(_) => {
                        failures.fetch_add(1, Ordering::SeqCst);
                        Ok(None)
                    }
                }
            }
        },
    )
    .await?;
    let failures_after = failures.load(Ordering::SeqCst);
    let recovered_in = back.elapsed();
    assert_eq!(seen.state(), ContainerState::Running, "{seen:?}");

    let ordered = Instant::now();
    let container = env
        .start_container(during)
        .await?
        .map_err(|status| anyhow::anyhow!("the order after containerd came back: {status:?}"))?;
    let order_took = ordered.elapsed();
    let exited = env.wait_until_exited(&container.id).await?;
    assert_eq!(exited.exit_code, 0);
    let listing = tasks(&env).await?;
    assert!(
        listing
            .iter()
            .any(|(id, status)| id == &running.id && status == "RUNNING"),
        "{listing:?}"
    );
    println!(
        "[measure] containerd down: StartContainer UNAVAILABLE after {refused_in:?}, health \
         NOT_SERVING {not_serving_after:?} after the outage began; containerd back: health \
         SERVING after {serving_after:?}, GetContainer answered after {recovered_in:?} \
         ({failures_after} failed calls first); the held-back order then took {order_took:?}"
    );
    Ok(())
}

/// An env with a secret for its registry and a container `sleeper` (busybox `sleep 300`),
/// RUNNING.
async fn env_with_a_sleeper() -> anyhow::Result<(Env, String, Container)> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let sleeper = env
        .push("team/sleeper", "v1", &TestImage::busybox(&["sleep", "300"]))
        .await?;
    let running = env
        .start_container(start_request(
            "order-sleeper",
            "sleeper",
            &sleeper.reference(),
            &secret,
        ))
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    wait_for_state(&env, &running.id, ContainerState::Running).await?;
    Ok((env, secret, running))
}

/// Waits until the server ("") and `berth.v1.Agent` both report `status`; returns how long
/// that took.
async fn wait_for_health(env: &Env, status: ServingStatus) -> anyhow::Result<Duration> {
    let asked = Instant::now();
    wait_for(
        &format!("health {status:?}"),
        Duration::from_secs(15),
        || async {
            let server = env.berthd.health().await?;
            let agent = env.berthd.service_health("berth.v1.Agent").await?;
            Ok((server == status && agent == status).then_some(()))
        },
    )
    .await?;
    Ok(asked.elapsed())
}

/// SIGTERM while a container runs: berthd exits 0, the container keeps running, and a new
/// berthd reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_berthd_and_leaves_containers_running() -> anyhow::Result<()> {
    let (mut env, _, running) = env_with_a_sleeper().await?;

    let stopping = Instant::now();
    let status = env.berthd.terminate(Duration::from_secs(40)).await?;
    let stopped_in = stopping.elapsed();
    assert!(status.success(), "berthd exited with {status:?}");
    let listing = tasks(&env).await?;
    assert!(
        listing
            .iter()
            .any(|(id, status)| id == &running.id && status == "RUNNING"),
        "the container did not survive berthd's stop: {listing:?}"
    );

    env.berthd.restart().await?;
    wait_for_state(&env, &running.id, ContainerState::Running).await?;
    println!("[measure] SIGTERM with a running container: berthd exited 0 after {stopped_in:?}");
    Ok(())
}

/// SIGTERM while an order is pulling: berthd finishes the order (within its 30 s grace), answers
/// it, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_order_in_flight_finish() -> anyhow::Result<()> {
    let fx = FaultEnv::start(super::FAST_REGISTRY).await?;
    let pushed = fx
        .push("team/inflight", &["echo", "ok"], LAYER_BYTES)
        .await?;
    let blob = pushed.random_layer().clone();
    // About 3 s for the layer.
    fx.proxy.inject(
        Target::AnyBlob,
        Fault::Throttle {
            bytes_per_second: 2 << 20,
        },
        Times::Always,
    );
    let mut agent = fx.env.berthd.agent().await?;
    let request = fx.order("order-inflight", "inflight", &fx.via_proxy(&pushed));
    let order = tokio::spawn(async move { agent.start_container(request).await });
    wait_for(
        "the layer to be on its way",
        Duration::from_secs(30),
        || async { Ok((fx.proxy.blob_bytes_sent(&blob.digest) > 0).then_some(())) },
    )
    .await?;

    let stopping = Instant::now();
    let status = fx.env.berthd.terminate(Duration::from_secs(40)).await?;
    let stopped_in = stopping.elapsed();
    let answered = order.await?;
    let log = fx.env.berthd.log_tail();
    assert!(status.success(), "berthd exited with {status:?}\n{log}");
    let container = answered
        .map_err(|status| anyhow::anyhow!("the order in flight at SIGTERM: {status:?}\n{log}"))?
        .into_inner();
    assert_eq!(container.image_digest, pushed.image.manifest_digest);
    println!(
        "[measure] SIGTERM mid-pull: the order finished ({:?}) and berthd exited 0 after \
         {stopped_in:?}",
        container.state()
    );
    Ok(())
}
