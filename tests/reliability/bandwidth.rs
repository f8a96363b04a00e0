//! `max_bytes_per_second`: one bandwidth for every download of every pull, shared evenly.

use std::time::Duration;

use berth::api::pb::{pull_event, PullImageRequest};
use tokio::time::Instant;

use super::FaultEnv;
use crate::harness::image::layered::PushedLayered;

const LIMIT: u64 = 4 << 20;

/// Random layer of each image: with the busybox layer and config, the image is about 16 MiB.
const RANDOM_BYTES: usize = 15 << 20;

/// `PullImage` of `pushed` (through the proxy) to its `done` event; how long it took.
async fn timed_pull(fx: &FaultEnv, pushed: &PushedLayered) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut events = fx
        .env
        .berthd
        .agent()
        .await?
        .pull_image(PullImageRequest {
            project: String::new(),
            image: fx.via_proxy(pushed),
            pull_secret: fx.secret.clone(),
        })
        .await?
        .into_inner();
    let mut done = false;
    while let Some(event) = events.message().await? {
        done |= matches!(event.event, Some(pull_event::Event::Done(_)));
    }
    anyhow::ensure!(
        done,
        "the pull of {} ended without done",
        fx.via_proxy(pushed)
    );
    Ok(started.elapsed())
}

/// 4 MiB/s: a 16 MiB image alone takes about 4 s; two such images at once share the limit,
/// each taking about twice as long, and finish close together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bandwidth_limit_is_shared_evenly_by_concurrent_pulls() -> anyhow::Result<()> {
    let fx = FaultEnv::start(&format!(
        "read_timeout_seconds = 30\npull_deadline_seconds = 60\nmax_bytes_per_second = {LIMIT}\n"
    ))
    .await?;
    let solo = fx
        .push("team/bw-solo", &["echo", "x"], RANDOM_BYTES)
        .await?;
    let first = fx.push("team/bw-a", &["echo", "x"], RANDOM_BYTES).await?;
    let second = fx.push("team/bw-b", &["echo", "x"], RANDOM_BYTES).await?;
    let mib = |pushed: &PushedLayered| pushed.total_bytes() as f64 / f64::from(1 << 20);

    let alone = timed_pull(&fx, &solo).await?;
    // At least the 4 s the limit allows; at most 6 s: the pull's own work (unpack, the image
    // record) takes up to a second and more on a loaded machine (seen: 5.2 s at a load of 12
    // on 2 cores), while a limiter that let through less than two thirds of its rate would
    // still fail here.
    assert!(
        alone >= Duration::from_millis(3500) && alone <= Duration::from_secs(6),
        "{:.1} MiB at 4 MiB/s took {alone:?}",
        mib(&solo)
    );

    let (a, b) = tokio::join!(timed_pull(&fx, &first), timed_pull(&fx, &second));
    let (a, b) = (a?, b?);
    for (name, took) in [("a", a), ("b", b)] {
        let ratio = took.as_secs_f64() / alone.as_secs_f64();
        assert!(
            (1.7..=2.4).contains(&ratio),
            "pull {name} took {took:?}, {ratio:.2}x the {alone:?} of a pull alone"
        );
    }
    let apart = a.abs_diff(b);
    assert!(
        apart < Duration::from_millis(1000),
        "the two pulls finished {apart:?} apart ({a:?}, {b:?})"
    );
    println!(
        "[measure] max_bytes_per_second 4 MiB/s: {:.1} MiB alone in {alone:?} ({:.2} MiB/s); two at \
         once in {a:?} and {b:?} ({:.2}x and {:.2}x alone, {apart:?} apart)",
        mib(&solo),
        mib(&solo) / alone.as_secs_f64(),
        a.as_secs_f64() / alone.as_secs_f64(),
        b.as_secs_f64() / alone.as_secs_f64(),
    );
    Ok(())
}
