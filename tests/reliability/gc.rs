//! `[gc]`: containerd's root on a small tmpfs fills past `high_percent`; berthd removes unused
//! images least recently used first until use is at `low_percent`, and keeps a pinned image, an
//! image in use, a recently used one and a young one. A removed image is pulled again by the
//! next order that needs it.

use std::collections::HashMap;

use berth::api::pb::{ContainerState, RemoveContainerRequest};

use super::{image_names, metric, wait_for_state};
use crate::harness::berthd::{Berthd, BerthdOptions};
use crate::harness::containerd::Containerd;
use crate::harness::env::{start_request, Env, RegistryKind};
use crate::harness::tmpfs::Tmpfs;
use crate::harness::wait::{wait_for, ORDER_TIMEOUT};

/// containerd's root: small enough that a few images fill it.
const ROOT_BYTES: u64 = 128 << 20;

/// Random layer per image: with its unpacked snapshot and the busybox layer, about 11 MiB.
const RANDOM_BYTES: usize = 4 << 20;

/// The `berth.dev/last-used` label of image `name` (`ctr images ls`).
async fn last_used(env: &Env, name: &str) -> anyhow::Result<Option<u64>> {
    let listing = env.containerd.ctr_ok(&["images", "ls"]).await?;
    Ok(listing
        .lines()
        .filter(|line| line.split_whitespace().next() == Some(name))
        .flat_map(|line| line.split([',', ' ']))
        .find_map(|field| field.strip_prefix("berth.dev/last-used="))
        .and_then(|seconds| seconds.parse().ok()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_least_recently_used_images_down_to_the_low_watermark() -> anyhow::Result<()> {
    let tmpfs = Tmpfs::mount(ROOT_BYTES)?;
    let containerd = Containerd::start_with_root(&tmpfs.path().join("root")).await?;
    let mut env = Env::start_with_containerd(RegistryKind::Htpasswd, containerd).await?;
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;

    // Pulled in this order; how far each pull filled the disk (percentage points).
    let names = ["pinned", "used", "touched", "old2", "old3", "old4", "young"];
    let mut references = HashMap::new();
    let mut growth = HashMap::new();
    for name in names {
        let cmd: &[&str] = if name == "used" {
            &["sleep", "300"]
        } else {
            &["echo", "ok"]
        };
        let pushed = env
            .push_layered(&format!("team/gc-{name}"), cmd, RANDOM_BYTES)
            .await?;
        let reference = pushed.image.reference();
        let before = tmpfs.use_percent()?;
        env.pull_image(&reference, &secret).await?;
        growth.insert(name, tmpfs.use_percent()? - before);
        references.insert(name, reference);
    }
    let sleeper = env
        .start_container(start_request(
            "order-gc-used",
            "gc-used",
            &references["used"],
            &secret,
        ))
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    wait_for_state(&env, &sleeper.id, ContainerState::Running).await?;

    // As if pulled long ago, least recently used first: pinned, used, touched, old2, old3, old4.
    let now = now();
    for (name, ago) in [
        ("pinned", 10_000),
        ("used", 9_500),
        ("touched", 9_200),
        ("old2", 9_000),
        ("old3", 8_000),
        ("old4", 7_000),
    ] {
        let label = format!("berth.dev/last-used={}", now - ago);
        env.containerd
            .ctr_ok(&["images", "label", &references[name], &label])
            .await?;
    }
    // An order uses `touched` (and its container goes again): its last use is now.
    let touched = env
        .run_to_completion(&references["touched"], &secret)
        .await
        .map_err(|err| {
            let log = env.containerd.log_text();
            let tail = log.get(log.len().saturating_sub(4000)..).unwrap_or(&log);
            anyhow::anyhow!("{err:#}\ncontainerd log:\n{tail}")
        })?;
    env.berthd
        .agent()
        .await?
        .remove_container(RemoveContainerRequest {
            id: touched.id,
            force: false,
        })
        .await?;
    let touched_at = last_used(&env, &references["touched"]).await?;
    assert!(
        touched_at.is_some_and(|at| at + 60 >= now),
        "the order did not refresh the label: {touched_at:?}"
    );

    // Watermarks from what the images took: removing old2 alone is not enough, old2 and old3 are.
    let full = tmpfs.use_percent()?;
    let target = full - growth["old2"] - growth["old3"];
    let low = (target + 0.4 * growth["old2"].min(growth["old3"])).floor();
    let high = (full.floor() - 1.0).min(99.0);
    assert!(
        low + growth["old3"] * 0.5 < high && target < low,
        "the images do not fill the tmpfs as planned: use {full:.1} %, growth {growth:?}"
    );
    let metrics = format!("127.0.0.1:{}", crate::harness::free_local_port()?);
    let options = BerthdOptions {
        top_level_toml: format!("metrics_listen = \"{metrics}\"\n"),
        tables_toml: format!(
            "[gc]\nenabled = true\npath = \"{}\"\nhigh_percent = {high}\nlow_percent = {low}\n\
             min_age_seconds = 600\ninterval_seconds = 1\npinned = [\"{}/team/gc-pinned*\"]\n",
            tmpfs.path().display(),
            env.registry.addr()
        ),
        ..BerthdOptions::default()
    };
    env.berthd = Berthd::start(&env.containerd, &env.ca, &options).await?;

    let gone = [&references["old2"], &references["old3"]];
    let left = wait_for("the gc to remove old2 and old3", ORDER_TIMEOUT, || async {
        let images = image_names(&env).await?;
        let finished = env.berthd.log_text().contains("image gc pass finished");
        Ok((finished && !images.iter().any(|name| gone.contains(&name))).then_some(images))
    })
    .await
    .map_err(|err| anyhow::anyhow!("{err:#}\nberthd log:\n{}", env.berthd.log_tail()))?;
    let after = tmpfs.use_percent()?;
    let log = env.berthd.log_text();
    let removals: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("image removed by gc"))
        .collect();
    assert_eq!(removals.len(), 2, "{removals:#?}");
    assert!(
        removals[0].contains(references["old2"].as_str()),
        "{removals:#?}"
    );
    assert!(
        removals[1].contains(references["old3"].as_str()),
        "{removals:#?}"
    );
    for kept in ["pinned", "used", "touched", "old4", "young"] {
        assert!(
            left.contains(&references[kept]),
            "{kept} was removed: {left:?}"
        );
    }
    assert!(
        after <= low,
        "use {after:.1} % is above the low watermark {low}"
    );
    for reason in ["pinned", "in use", "pulled or used within min_age_seconds"] {
        assert!(
            log.contains(&format!("reason=\"{reason}\""))
                || log.contains(&format!("reason={reason}")),
            "no image kept as {reason}:\n{}",
            env.berthd.log_tail()
        );
    }
    assert_eq!(
        metric(&metrics, "berth_gc_removed_images_total", &[]).await?,
        2.0
    );

    // The next order for a removed image pulls it again and runs it (the new berthd has a
    // state dir, and so a secret store, of its own).
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let again = env.run_to_completion(&references["old2"], &secret).await?;
    assert_eq!(again.exit_code, 0);
    println!(
        "[measure] gc on a {} MiB tmpfs: use {full:.1} % (high {high}, low {low}) -> {after:.1} % \
         after removing old2 and old3 (each image took {:.1}-{:.1} points); pinned, in-use, \
         recently used, newer and young images kept; old2 pulled again by the next order",
        ROOT_BYTES >> 20,
        growth.values().copied().fold(f64::MAX, f64::min),
        growth.values().copied().fold(0.0, f64::max),
    );
    Ok(())
}

/// The GC never races an order for the same image: with the disk kept above the watermark by a
/// filler file and `min_age_seconds = 0`, the GC removes the image whenever no container uses
/// it, while rounds of orders for that image pull it again and run it. Every order succeeds: a
/// pull holds the image's write lock until its order's container references the image, and the
/// GC deletes only under that lock, after checking again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_and_orders_for_the_same_image_never_race() -> anyhow::Result<()> {
    let tmpfs = Tmpfs::mount(64 << 20)?;
    let containerd = Containerd::start_with_root(&tmpfs.path().join("root")).await?;
    let mut env = Env::start_with_containerd(RegistryKind::Htpasswd, containerd).await?;
    std::fs::write(tmpfs.path().join("filler"), vec![1_u8; 40 << 20])?;
    let metrics = format!("127.0.0.1:{}", crate::harness::free_local_port()?);
    let options = BerthdOptions {
        top_level_toml: format!("metrics_listen = \"{metrics}\"\n"),
        tables_toml: format!(
            "[gc]\nenabled = true\npath = \"{}\"\nhigh_percent = 50\nlow_percent = 10\n\
             min_age_seconds = 0\ninterval_seconds = 1\n",
            tmpfs.path().display()
        ),
        ..BerthdOptions::default()
    };
    env.berthd = Berthd::start(&env.containerd, &env.ca, &options).await?;
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let pushed = env
        .push_layered("team/gc-race", &["echo", "ok"], 2 << 20)
        .await?;
    let image = pushed.image.reference();

    let mut agent = env.berthd.agent().await?;
    for round in 0..4 {
        let orders = (0..3).map(|index| {
            let env = &env;
            let (image, secret) = (&image, &secret);
            async move {
                let request = start_request(
                    &format!("order-race-{round}-{index}"),
                    &format!("race-{round}-{index}"),
                    image,
                    secret,
                );
                let container = env
                    .start_container(request)
                    .await?
                    .map_err(|status| anyhow::anyhow!("round {round}: {status:?}"))?;
                let exited = env.wait_until_exited(&container.id).await?;
                anyhow::ensure!(exited.exit_code == 0, "exit {}", exited.exit_code);
                anyhow::Ok(container.id)
            }
        });
        for id in futures::future::join_all(orders).await {
            let id = id.map_err(|err| anyhow::anyhow!("{err:#}\n{}", env.berthd.log_tail()))?;
            agent
                .remove_container(RemoveContainerRequest { id, force: false })
                .await?;
        }
        // Unused now: the GC takes it before the next round.
        wait_for("the gc to remove the image", ORDER_TIMEOUT, || async {
            Ok((!image_names(&env).await?.contains(&image)).then_some(()))
        })
        .await?;
    }
    let removed = metric(&metrics, "berth_gc_removed_images_total", &[]).await?;
    assert!(removed >= 4.0, "removed {removed}");
    println!(
        "[measure] gc racing orders: 4 rounds of 3 orders for one image, the gc removing it \
         between rounds ({removed} removals): every order ran"
    );
    Ok(())
}
