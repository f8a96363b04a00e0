//! `max_concurrent_pulls`: pulls past the limit wait their turn in order (one after another on
//! the wire), PullImage and `berth pull` say `queued` first, `berth_pulls_queued` counts the
//! waiting, and an order whose client goes away leaves the queue without fetching anything.

use std::time::Duration;

use berth::api::pb::{pull_event, PullImageRequest};
use futures::future::join_all;
use tokio::time::Instant;

use super::{metric, with_metrics, FaultEnv};
use crate::harness::env::RegistryKind;
use crate::harness::faults::{Fault, Target, Times};
use crate::harness::image::layered::PushedLayered;
use crate::harness::wait::{assert_eventually, ORDER_TIMEOUT};

const ONE_AT_A_TIME: &str = "connect_timeout_seconds = 2\nread_timeout_seconds = 10\n\
                             retries = 5\npull_deadline_seconds = 60\nmax_concurrent_pulls = 1\n";

/// Random layer of each image: with the throttle below, a pull lasts about a second.
const RANDOM_BYTES: usize = 2 << 20;

/// Blobs are served at this rate, so that every order arrives while the first pull runs.
const RATE: u64 = 3 << 20;

/// The blob GETs of `pushed`'s blobs: (first arrival, last byte) on the proxy's clock. A body
/// sent whole has no recorded finish (the connection is not polled past its end): it cannot
/// have ended before the throttle let its bytes through.
fn blob_window(fx: &FaultEnv, pushed: &PushedLayered) -> (Duration, Duration) {
    let gets: Vec<_> = pushed
        .blobs()
        .iter()
        .flat_map(|blob| fx.proxy.blob_gets(&blob.digest))
        .collect();
    let start = gets.iter().map(|get| get.arrived).min().unwrap_or_default();
    #[allow(clippy::cast_precision_loss)]
    let end = gets
        .iter()
        .map(|get| {
            get.finished.unwrap_or_else(|| {
                get.arrived + Duration::from_secs_f64(get.bytes_sent as f64 / RATE as f64)
            })
        })
        .max()
        .unwrap_or_default();
    (start, end)
}

/// Three orders at once for three new images with `max_concurrent_pulls = 1`: the registry sees
/// the pulls one after another, never two at once, the gauge counts the two waiting, and all
/// three containers run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_past_the_limit_wait_their_turn_one_after_another() -> anyhow::Result<()> {
    let (options, metrics) = with_metrics(ONE_AT_A_TIME)?;
    let fx = FaultEnv::start_configured(RegistryKind::Htpasswd, options).await?;
    let mut pushed = Vec::new();
    for name in ["one", "two", "three"] {
        pushed.push(
            fx.push(&format!("team/{name}"), &["echo", name], RANDOM_BYTES)
                .await?,
        );
    }
    fx.proxy.inject(
        Target::AnyBlob,
        Fault::Throttle {
            bytes_per_second: RATE,
        },
        Times::Always,
    );

    let started = Instant::now();
    let orders = pushed.iter().enumerate().map(|(index, image)| {
        let request = fx.order(
            &format!("order-limit-{index}"),
            &format!("limit-{index}"),
            &fx.via_proxy(image),
        );
        let env = &fx.env;
        async move { env.start_container(request).await }
    });
    let watch_gauge = async {
        assert_eventually("two pulls queued", ORDER_TIMEOUT, || async {
            Ok(metric(&metrics, "berth_pulls_queued", &[]).await? == 2.0)
        })
        .await
    };
    let (results, saw_two_queued) = tokio::join!(join_all(orders), watch_gauge);
    saw_two_queued?;
    let took = started.elapsed();
    let mut ids = Vec::new();
    for result in results {
        let container = result?
            .map_err(|status| anyhow::anyhow!("{status:?}\n{}", fx.env.berthd.log_tail()))?;
        ids.push(container.id);
    }
    for id in &ids {
        assert_eq!(fx.env.wait_until_exited(id).await?.exit_code, 0);
    }
    let mut windows: Vec<_> = pushed.iter().map(|image| blob_window(&fx, image)).collect();
    windows.sort();
    let log = fx.proxy.describe();
    for pair in windows.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "two pulls overlapped on the wire: {windows:?}\n{log}"
        );
    }
    assert_eq!(metric(&metrics, "berth_pulls_queued", &[]).await?, 0.0);
    assert_eq!(
        fx.env
            .berthd
            .log_text()
            .matches("pull queued; waiting for a turn")
            .count(),
        2,
        "{}",
        fx.env.berthd.log_tail()
    );
    println!(
        "[measure] 3 orders, 3 images, max_concurrent_pulls = 1: blob windows {:?}; all RUNNING \
         or done after {took:?}",
        windows
            .iter()
            .map(|(start, end)| format!("{:.2}-{:.2}s", start.as_secs_f64(), end.as_secs_f64()))
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// While one pull has the only turn: PullImage of a second image streams `queued` first; its
/// client goes away and the pull leaves the queue; a StartContainer order for a third image
/// whose client gives up leaves it too. Neither image is ever fetched. `berth pull` of a fourth
/// image prints `queued` and then pulls it once the turn is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_order_whose_client_leaves_is_dropped_from_the_queue() -> anyhow::Result<()> {
    let (options, metrics) = with_metrics(ONE_AT_A_TIME)?;
    let fx = FaultEnv::start_configured(RegistryKind::Htpasswd, options).await?;
    let busy = fx.push("team/busy", &["echo", "busy"], 6 << 20).await?;
    let left_pull = fx.push("team/leftpull", &["echo", "x"], 1 << 20).await?;
    let left_order = fx.push("team/leftorder", &["echo", "x"], 1 << 20).await?;
    let cli = fx.push("team/cli", &["echo", "x"], 1 << 20).await?;
    // The busy pull holds the turn for a few seconds.
    fx.proxy.inject(
        Target::Blob(busy.random_layer().digest.clone()),
        Fault::Throttle {
            bytes_per_second: 1 << 20,
        },
        Times::Always,
    );
    let busy_order = {
        let request = fx.order("order-busy", "busy", &fx.via_proxy(&busy));
        let env = &fx.env;
        async move { env.start_container(request).await }
    };
    let rest = async {
        assert_eventually("the busy pull to fetch blobs", ORDER_TIMEOUT, || async {
            Ok(!fx.proxy.requests_to("/blobs/").is_empty())
        })
        .await?;

        // PullImage: `queued` comes first; then the client goes away.
        let mut stream = fx
            .env
            .berthd
            .agent()
            .await?
            .pull_image(PullImageRequest {
                project: String::new(),
                image: fx.via_proxy(&left_pull),
                pull_secret: fx.secret.clone(),
            })
            .await?
            .into_inner();
        let first = stream.message().await?;
        match first.and_then(|event| event.event) {
            Some(pull_event::Event::Queued(queued)) => {
                assert_eq!(queued.image, fx.via_proxy(&left_pull));
                assert_eq!(queued.position, 1);
            }
            other => anyhow::bail!("expected a queued event first, got {other:?}"),
        }
        assert_eq!(metric(&metrics, "berth_pulls_queued", &[]).await?, 1.0);
        drop(stream);
        assert_eventually(
            "the abandoned pull to leave the queue",
            ORDER_TIMEOUT,
            || async { Ok(metric(&metrics, "berth_pulls_queued", &[]).await? == 0.0) },
        )
        .await?;

        // StartContainer: the client gives up while the order is queued.
        let order = fx.order("order-left", "left", &fx.via_proxy(&left_order));
        let env = &fx.env;
        let waiting = tokio::spawn({
            let mut agent = env.berthd.agent().await?;
            async move { agent.start_container(order).await }
        });
        assert_eventually("the order to queue", ORDER_TIMEOUT, || async {
            Ok(metric(&metrics, "berth_pulls_queued", &[]).await? == 1.0)
        })
        .await?;
        waiting.abort();
        assert_eventually(
            "the abandoned order to leave the queue",
            ORDER_TIMEOUT,
            || async { Ok(metric(&metrics, "berth_pulls_queued", &[]).await? == 0.0) },
        )
        .await?;

        // The CLI: queued, then pulled.
        let printed = fx
            .env
            .berthd
            .cli_ok(
                &["pull", &fx.via_proxy(&cli), "--pull-secret", &fx.secret],
                None,
            )
            .await?;
        anyhow::Ok(printed)
    };
    let (busy_result, printed) = tokio::join!(busy_order, rest);
    let printed = printed?;
    let busy_container = busy_result?.map_err(|status| anyhow::anyhow!("{status:?}"))?;
    assert_eq!(
        fx.env
            .wait_until_exited(&busy_container.id)
            .await?
            .exit_code,
        0
    );
    let lines: Vec<&str> = printed.lines().collect();
    assert!(
        lines.first().is_some_and(
            |line| line.starts_with(&format!("queued {} (position 1", fx.via_proxy(&cli)))
        ),
        "{printed}"
    );
    assert!(
        lines.iter().any(|line| line.starts_with("resolved ")),
        "{printed}"
    );
    assert!(
        lines.iter().any(|line| line.starts_with("done ")),
        "{printed}"
    );

    let log = fx.proxy.describe();
    for gone in ["team/leftpull", "team/leftorder"] {
        assert!(
            fx.proxy.requests_to(gone).is_empty(),
            "{gone} was fetched after its client left:\n{log}"
        );
    }
    assert_eq!(metric(&metrics, "berth_pulls_queued", &[]).await?, 0.0);
    let berthd_log = fx.env.berthd.log_text();
    assert_eq!(
        berthd_log
            .matches("order cancelled while its pull was queued")
            .count(),
        2,
        "{}",
        fx.env.berthd.log_tail()
    );
    println!(
        "[measure] queued PullImage and StartContainer whose clients left: both out of the queue \
         (gauge back to 0), neither image fetched; berth pull printed {:?}",
        lines.first()
    );
    Ok(())
}
