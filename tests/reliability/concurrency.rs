//! Many orders for one image that is not there yet: one download, every order served.

use std::time::Duration;

use berth::api::pb::PullImageRequest;
use futures::future::join_all;
use tokio::time::Instant;

use super::{FaultEnv, FAST_REGISTRY, LAYER_BYTES};
use crate::harness::faults::{Fault, Target, Times};

/// Orders sent at once.
const ORDERS: usize = 20;

/// Blobs are served at this rate, so a pull lasts long enough for every order to arrive while
/// it runs (and a single pull and the crowd's pull take comparable time).
const RATE: u64 = 8 << 20;

/// 20 StartContainer orders (distinct names and order ids, one secret) for one new image: all
/// run to exit 0, the registry served each blob exactly once and the manifest once (the orders
/// behind the pull need no access check of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_orders_for_one_new_image_download_it_once() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let solo = fx.push("team/solo", &["echo", "solo"], LAYER_BYTES).await?;
    let crowd = fx
        .push("team/crowd", &["echo", "crowd"], LAYER_BYTES)
        .await?;
    fx.proxy.inject(
        Target::AnyBlob,
        Fault::Throttle {
            bytes_per_second: RATE,
        },
        Times::Always,
    );

    // The baseline: one order for a new image of the same size.
    let (_, single) = fx.run(&fx.via_proxy(&solo)).await?;

    let image = fx.via_proxy(&crowd);
    let env = &fx.env;
    let started = Instant::now();
    let orders = (0..ORDERS).map(|index| {
        let request = fx.order(
            &format!("order-crowd-{index}"),
            &format!("crowd-{index}"),
            &image,
        );
        async move {
            let result = env.start_container(request).await?;
            anyhow::Ok((result, started.elapsed()))
        }
    });
    let results = join_all(orders).await;
    let all_started = started.elapsed();
    let mut latencies = Vec::with_capacity(ORDERS);
    let mut ids = Vec::with_capacity(ORDERS);
    for (index, result) in results.into_iter().enumerate() {
        let (result, latency) = result?;
        let container = result.map_err(|status| {
            anyhow::anyhow!(
                "order {index}: {status:?}\nproxy saw:\n{}\nberthd log:\n{}",
                fx.proxy.describe(),
                fx.env.berthd.log_tail()
            )
        })?;
        latencies.push(latency);
        ids.push(container.id);
    }
    for id in &ids {
        let exited = fx.env.wait_until_exited(id).await?;
        assert_eq!(exited.exit_code, 0, "{exited:?}");
        assert_eq!(exited.image_digest, crowd.image.manifest_digest);
    }
    let all_exited = started.elapsed();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), ORDERS, "every order has its own container");

    let log = fx.proxy.describe();
    let mut counts = Vec::new();
    for blob in crowd.blobs() {
        let gets = fx.proxy.blob_gets(&blob.digest);
        assert_eq!(
            gets.len(),
            1,
            "blob {} fetched {} times:\n{log}",
            blob.digest,
            gets.len()
        );
        counts.push((blob.size, gets.len()));
    }
    let manifest_gets = fx
        .proxy
        .requests_to(&format!("/v2/{}/manifests/", crowd.image.repository))
        .len();
    // The pull showed the registry accepts the credential: the orders that queued behind it
    // start without asking again (within access_check_ttl_seconds).
    assert_eq!(
        manifest_gets, 1,
        "the manifest is fetched by the pull alone:\n{log}"
    );
    latencies.sort();
    println!(
        "[measure] {ORDERS} concurrent orders, one new image ({} B, blobs served at {RATE} B/s): \
         blob GETs (size, count) {counts:?}, manifest GETs {manifest_gets}; all started after \
         {all_started:?} (fastest {:?}, median {:?}, slowest {:?}), all exited after \
         {all_exited:?}; one order for a same-size image alone: {single:?}",
        crowd.total_bytes(),
        latencies[0],
        latencies[ORDERS / 2],
        latencies[ORDERS - 1],
    );
    Ok(())
}

/// A PullImage (pre-pull) and start orders for the same new image at the same time: one
/// download, and every call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_pull_and_start_orders_for_one_image_share_the_download() -> anyhow::Result<()> {
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx
        .push("team/prepull", &["echo", "ok"], LAYER_BYTES)
        .await?;
    // About 3 s per pull: plenty of overlap.
    fx.proxy.inject(
        Target::AnyBlob,
        Fault::Throttle {
            bytes_per_second: 2 << 20,
        },
        Times::Always,
    );
    let image = fx.via_proxy(&pushed);

    let pull = async {
        let mut agent = fx.env.berthd.agent().await?;
        let mut events = agent
            .pull_image(PullImageRequest {
                project: String::new(),
                image: image.clone(),
                pull_secret: fx.secret.clone(),
            })
            .await?
            .into_inner();
        let mut count = 0;
        while let Some(_event) = events.message().await? {
            count += 1;
        }
        anyhow::Ok(count)
    };
    let env = &fx.env;
    let starts = (0..3).map(|index| {
        let request = fx.order(
            &format!("order-prepull-{index}"),
            &format!("prepull-{index}"),
            &image,
        );
        async move {
            // The pre-pull goes first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            env.start_container(request).await
        }
    });
    let (pulled, started) = tokio::join!(pull, join_all(starts));
    let log = fx.proxy.describe();
    let events = pulled.map_err(|failure| failure.context(format!("PullImage\n{log}")))?;
    for (index, result) in started.into_iter().enumerate() {
        let container = result?.map_err(|status| {
            anyhow::anyhow!(
                "start order {index} beside a pre-pull: {status:?}\nproxy saw:\n{log}\nberthd log:\n{}",
                fx.env.berthd.log_tail()
            )
        })?;
        fx.env.wait_until_exited(&container.id).await?;
    }
    for blob in pushed.blobs() {
        let gets = fx.proxy.blob_gets(&blob.digest).len();
        assert_eq!(gets, 1, "blob {} fetched {gets} times:\n{log}", blob.digest);
    }
    println!("[measure] pre-pull beside 3 start orders: {events} pull events, one GET per blob");
    Ok(())
}

/// Orders for several tags of one new image at once: the tags share every blob (and the
/// manifest), so containerd would refuse a second writer of the same ingest; every order runs
/// and each blob is fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_for_several_tags_of_one_image_share_its_blobs() -> anyhow::Result<()> {
    use oci_client::secrets::RegistryAuth;
    use oci_client::{Reference, RegistryOperation};

    const TAGS: usize = 4;
    let fx = FaultEnv::start(FAST_REGISTRY).await?;
    let pushed = fx
        .push("team/tagged", &["echo", "tagged"], LAYER_BYTES)
        .await?;
    // The same manifest under more tags, as a release pipeline tags one build several times.
    let client = crate::harness::image::oci_client(&fx.env.ca, &[])?;
    let registry = fx.env.registry.addr().to_owned();
    let auth = RegistryAuth::Basic(
        fx.env.pusher.username.clone(),
        fx.env.pusher.password.clone(),
    );
    let source = Reference::with_tag(registry.clone(), "team/tagged".into(), "v1".into());
    client.auth(&source, &auth, RegistryOperation::Push).await?;
    let (body, _) = client
        .pull_manifest_raw(
            &source,
            &auth,
            &["application/vnd.oci.image.manifest.v1+json"],
        )
        .await?;
    for tag in 2..=TAGS {
        let target = Reference::with_tag(registry.clone(), "team/tagged".into(), format!("v{tag}"));
        client
            .push_manifest_raw(
                &target,
                body.to_vec(),
                "application/vnd.oci.image.manifest.v1+json".parse()?,
            )
            .await?;
    }
    fx.proxy.inject(
        Target::AnyBlob,
        Fault::Throttle {
            bytes_per_second: RATE,
        },
        Times::Always,
    );

    let env = &fx.env;
    let orders = (1..=TAGS).map(|tag| {
        let image = format!("{}/team/tagged:v{tag}", fx.proxy.addr());
        let request = fx.order(&format!("order-tag-{tag}"), &format!("tag-{tag}"), &image);
        async move { env.start_container(request).await }
    });
    for (index, result) in join_all(orders).await.into_iter().enumerate() {
        let container = result?.map_err(|status| {
            anyhow::anyhow!(
                "tag order {index}: {status:?}\nproxy saw:\n{}\nberthd log:\n{}",
                fx.proxy.describe(),
                fx.env.berthd.log_tail()
            )
        })?;
        let exited = fx.env.wait_until_exited(&container.id).await?;
        assert_eq!(exited.exit_code, 0, "{exited:?}");
        assert_eq!(exited.image_digest, pushed.image.manifest_digest);
    }
    let log = fx.proxy.describe();
    for blob in pushed.blobs() {
        let gets = fx.proxy.blob_gets(&blob.digest).len();
        assert_eq!(gets, 1, "blob {} fetched {gets} times:\n{log}", blob.digest);
    }
    Ok(())
}
