//! Orders are idempotent on order_id: sequentially, concurrently and across berthd restarts;
//! a container keeps being reported (to its exit code and full log) across a berthd crash.

use berth::api::pb::{ContainerState, ListContainersRequest, StartContainerRequest};
use futures::future::join_all;
use tonic::Code;

use super::{wait_for_log, wait_for_state};
use crate::harness::env::{start_request, Env, RegistryKind};
use crate::harness::image::TestImage;

/// An env with a secret for its registry and a busybox image running `cmd`.
async fn env_with_image(cmd: &[&str]) -> anyhow::Result<(Env, String, String)> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let secret = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let pushed = env
        .push("team/idempotent", "v1", &TestImage::busybox(cmd))
        .await?;
    Ok((env, secret, pushed.reference()))
}

async fn start_ok(env: &Env, request: StartContainerRequest) -> anyhow::Result<String> {
    let container = env
        .start_container(request)
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}\nberthd log:\n{}", env.berthd.log_tail()))?;
    Ok(container.id)
}

async fn containers_named(env: &Env, name: &str) -> anyhow::Result<usize> {
    let listed = env
        .berthd
        .agent()
        .await?
        .list_containers(ListContainersRequest {
            project: String::new(),
        })
        .await?
        .into_inner()
        .containers;
    Ok(listed
        .iter()
        .filter(|container| container.name == name)
        .count())
}

/// The same order twice in a row, and another five times at once: one container each, and
/// every answer names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_id_again_or_concurrently_is_one_container() -> anyhow::Result<()> {
    let (env, secret, image) = env_with_image(&["echo", "once"]).await?;
    let request = start_request("order-twice", "twice", &image, &secret);
    let first = start_ok(&env, request.clone()).await?;
    let second = start_ok(&env, request).await?;
    assert_eq!(first, second);
    assert_eq!(containers_named(&env, "twice").await?, 1);

    let request = start_request("order-five", "five", &image, &secret);
    let answers = join_all((0..5).map(|_| start_ok(&env, request.clone()))).await;
    let ids = answers.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(containers_named(&env, "five").await?, 1);
    let exited = env.wait_until_exited(&ids[0]).await?;
    assert_eq!(exited.exit_code, 0);
    Ok(())
}

/// The same order_id with another order (another name, or another image spec) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_id_for_another_order_is_already_exists() -> anyhow::Result<()> {
    let (env, secret, image) = env_with_image(&["echo", "once"]).await?;
    start_ok(
        &env,
        start_request("order-taken", "original", &image, &secret),
    )
    .await?;
    let mut other_name = start_request("order-taken", "another", &image, &secret);
    let mut other_env = start_request("order-taken", "original", &image, &secret);
    if let Some(spec) = other_env.container.as_mut() {
        spec.env.insert("EXTRA".to_owned(), "1".to_owned());
    }
    for request in [other_name.clone(), other_env] {
        let status = env
            .start_container(request)
            .await?
            .expect_err("a different order under a used order_id");
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    }
    assert_eq!(containers_named(&env, "another").await?, 0);
    // A new order for a name that exists is refused too.
    other_name.order_id = "order-fresh".to_owned();
    other_name.name = "original".to_owned();
    let status = env
        .start_container(other_name)
        .await?
        .expect_err("the name is taken");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    Ok(())
}

/// After a berthd restart the same order_id still names the same container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_id_after_a_restart_is_the_same_container() -> anyhow::Result<()> {
    let (mut env, secret, image) = env_with_image(&["echo", "once"]).await?;
    let request = start_request("order-restart", "restart", &image, &secret);
    let first = env
        .start_container(request.clone())
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    env.berthd.restart().await?;
    let again = env
        .start_container(request)
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    assert_eq!(first.id, again.id);
    assert_eq!(first.created_at, again.created_at);
    assert_eq!(containers_named(&env, "restart").await?, 1);
    Ok(())
}

/// berthd crashes (SIGKILL) while a container runs: the new berthd reports it RUNNING, then
/// EXITED with its exit code, and its log holds what it wrote before and after the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_is_reported_to_its_end_across_a_berthd_crash() -> anyhow::Result<()> {
    let (mut env, secret, image) = env_with_image(&[
        "sh",
        "-c",
        "echo before-crash; sleep 4; echo after-crash; exit 7",
    ])
    .await?;
    let container = env
        .start_container(start_request("order-crash", "crash", &image, &secret))
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    let log_path = std::path::PathBuf::from(&container.log_path);
    wait_for_log(&log_path, "before-crash").await?;

    env.berthd.kill9().await?;
    env.berthd.restart().await?;
    let running = wait_for_state(&env, &container.id, ContainerState::Running).await?;
    assert_eq!(running.order_id, "order-crash");
    let exited = env.wait_until_exited(&container.id).await?;
    assert_eq!(exited.exit_code, 7, "{exited:?}");
    assert!(exited.finished_at.is_some(), "{exited:?}");

    let log = wait_for_log(&log_path, "after-crash").await?;
    assert!(log.contains("before-crash"), "{log:?}");
    let printed = env.berthd.cli_ok(&["logs", "crash"], None).await?;
    assert!(
        printed.contains("before-crash") && printed.contains("after-crash"),
        "berth logs printed {printed:?}"
    );
    Ok(())
}

/// A snapshot left under the container's key by a crash between snapshot prepare and container
/// create (here an empty one) is replaced: the order runs on the image's root filesystem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_left_by_a_crash_before_create_is_replaced() -> anyhow::Result<()> {
    let (env, secret, image) = env_with_image(&["/bin/busybox", "test", "-x", "/bin/sh"]).await?;
    // The key berthd gives the container of `default`/`stale`, as an empty, parentless snapshot.
    env.containerd
        .ctr_ok(&["snapshots", "prepare", "default.stale"])
        .await?;
    let id = start_ok(&env, start_request("order-stale", "stale", &image, &secret)).await?;
    assert_eq!(id, "default.stale");
    let exited = env.wait_until_exited(&id).await?;
    assert_eq!(
        exited.exit_code,
        0,
        "the container ran on the image, not the stale snapshot:\n{}",
        env.berthd.log_tail()
    );
    Ok(())
}
