//! Image cleanup: `PruneImages` / `berth image prune` remove images no container references,
//! oldest first, down to a byte budget, and never an image in use.

use berth::api::pb::{ContainerState, PruneImagesRequest, RemoveContainerRequest};
use serde_json::Value;

use super::{blob_committed, image_names, wait_for_state};
use crate::harness::env::{start_request, Env, RegistryKind};

/// `berth --output json image prune [--keep-bytes N]`: (removed, freed_bytes).
async fn prune_cli(env: &Env, keep_bytes: Option<u64>) -> anyhow::Result<(Vec<String>, u64)> {
    let keep = keep_bytes.map(|bytes| bytes.to_string());
    let mut args = vec!["--output", "json", "image", "prune"];
    if let Some(keep) = &keep {
        args.extend(["--keep-bytes", keep.as_str()]);
    }
    let printed: Value = serde_json::from_str(&env.berthd.cli_ok(&args, None).await?)?;
    let removed = printed["removed"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|name| name.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok((removed, printed["freed_bytes"].as_u64().unwrap_or(0)))
}

/// Three images: one a container runs, one an exited container was made from, one whose
/// container was removed. Prune removes only the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_only_images_no_container_uses() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let running = env
        .push_layered("team/running", &["sleep", "300"], 2 << 20)
        .await?;
    let exited = env
        .push_layered("team/exited", &["echo", "done"], 2 << 20)
        .await?;
    let unused = env
        .push_layered("team/unused", &["echo", "bye"], 3 << 20)
        .await?;

    let sleeper = env
        .start_container(start_request(
            "order-running",
            "running",
            &running.image.reference(),
            &secret,
        ))
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    wait_for_state(&env, &sleeper.id, ContainerState::Running).await?;
    env.run_to_completion(&exited.image.reference(), &secret)
        .await?;
    let gone = env
        .run_to_completion(&unused.image.reference(), &secret)
        .await?;
    env.berthd
        .agent()
        .await?
        .remove_container(RemoveContainerRequest {
            id: gone.id.clone(),
            force: false,
        })
        .await?;
    let before = image_names(&env).await?;
    assert_eq!(before.len(), 3, "{before:?}");

    // A budget the unused image fits in: nothing to do.
    let (removed, freed) = prune_cli(&env, Some(100 << 20)).await?;
    assert!(removed.is_empty() && freed == 0, "{removed:?} {freed}");

    let (removed, freed) = prune_cli(&env, None).await?;
    assert_eq!(removed, [unused.image.reference()]);
    assert!(
        freed >= unused.total_bytes() && freed < unused.total_bytes() + (64 << 10),
        "freed {freed} B; the image's config and layers are {} B",
        unused.total_bytes()
    );
    let after = image_names(&env).await?;
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.contains(&running.image.reference()), "{after:?}");
    assert!(after.contains(&exited.image.reference()), "{after:?}");
    for blob in unused.blobs() {
        assert!(
            !blob_committed(&env, &blob.digest),
            "{} still stored",
            blob.digest
        );
    }
    for blob in running.blobs().into_iter().chain(exited.blobs()) {
        assert!(
            blob_committed(&env, &blob.digest),
            "{} was removed",
            blob.digest
        );
    }
    wait_for_state(&env, &sleeper.id, ContainerState::Running).await?;
    // The kept images still start without a pull.
    env.run_to_completion(&exited.image.reference(), &secret)
        .await?;

    let text = env.berthd.cli_ok(&["image", "prune"], None).await?;
    assert_eq!(text.trim(), "removed 0 images, freed 0 bytes", "{text:?}");
    println!(
        "[measure] prune: removed {removed:?}, freed {freed} B (config + layers {} B)",
        unused.total_bytes()
    );
    Ok(())
}

/// Unused images go oldest first, and only until the rest fit the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_with_a_budget_removes_the_oldest_unused_images_first() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let mut images = Vec::new();
    for name in ["first", "second", "third"] {
        let pushed = env
            .push_layered(&format!("team/{name}"), &["echo", name], 2 << 20)
            .await?;
        env.pull_image(&pushed.image.reference(), &secret).await?;
        images.push(pushed);
    }
    let [first, second, third] = images.as_slice() else {
        unreachable!("three images were pushed");
    };
    let mut agent = env.berthd.agent().await?;

    // Room for the two newest, not for all three.
    let keep_bytes = second.total_bytes() + third.total_bytes() + (64 << 10);
    let report = agent
        .prune_images(PruneImagesRequest { keep_bytes })
        .await?
        .into_inner();
    assert_eq!(report.removed, [first.image.reference()]);

    let report = agent
        .prune_images(PruneImagesRequest { keep_bytes: 0 })
        .await?
        .into_inner();
    assert_eq!(
        report.removed,
        [second.image.reference(), third.image.reference()]
    );
    assert!(report.freed_bytes >= second.total_bytes() + third.total_bytes());
    assert!(image_names(&env).await?.is_empty());
    Ok(())
}
