//! Failed orders map to the contract's gRPC codes, and berthd stays healthy and useful after each.

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::env::{start_request, Env, EnvOptions, RegistryKind};
use crate::harness::image::{PushedImage, TestImage};

/// A private image and a secret that works for it, for the "still works" checks.
async fn good_image(env: &Env) -> anyhow::Result<(PushedImage, String)> {
    let pushed = env
        .push(
            "team/good",
            "v1",
            &TestImage::busybox(&["echo", "still working"]),
        )
        .await?;
    let secret_id = env
        .create_secret("good", env.registry.addr(), &env.user)
        .await?;
    Ok((pushed, secret_id))
}

/// Starts `request`, expects `code`, then checks health and that a good order still runs.
async fn expect_code_then_still_serving(
    env: &Env,
    request: berth::api::pb::StartContainerRequest,
    code: Code,
) -> anyhow::Result<()> {
    let image = request
        .container
        .as_ref()
        .map(|spec| spec.image.clone())
        .unwrap_or_default();
    match env.start_container(request).await? {
        Ok(container) => panic!(
            "starting {image} should fail with {code:?}, got {container:?}\nberthd log:\n{}",
            env.berthd.log_tail()
        ),
        Err(status) => assert_eq!(
            status.code(),
            code,
            "starting {image}: {status:?}\nberthd log:\n{}",
            env.berthd.log_tail()
        ),
    }
    assert_eq!(env.berthd.health().await?, ServingStatus::Serving);
    let (good, secret_id) = good_image(env).await?;
    let container = env.run_to_completion(&good.reference(), &secret_id).await?;
    assert_eq!(container.image_digest, good.manifest_digest);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_permission_denied() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let pushed = env
        .push("team/private", "v1", &TestImage::busybox(&["echo", "hi"]))
        .await?;
    let wrong = env.user.with_wrong_password();
    let secret_id = env
        .create_secret("wrong", env.registry.addr(), &wrong)
        .await?;
    let request = start_request(
        "order-wrong-password",
        "wrong-password",
        &pushed.reference(),
        &secret_id,
    );
    expect_code_then_still_serving(&env, request, Code::PermissionDenied).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_secret_is_not_found() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let pushed = env
        .push("team/private", "v1", &TestImage::busybox(&["echo", "hi"]))
        .await?;
    let request = start_request(
        "order-unknown-secret",
        "unknown-secret",
        &pushed.reference(),
        "secret-doesnotexist0",
    );
    expect_code_then_still_serving(&env, request, Code::NotFound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reference_is_invalid_argument() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let request = start_request("order-malformed", "malformed", "UPPER/Case::bad", "");
    expect_code_then_still_serving(&env, request, Code::InvalidArgument).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_corrupted_in_flight_is_data_loss() -> anyhow::Result<()> {
    let env = Env::start_with(
        RegistryKind::Htpasswd,
        EnvOptions {
            corrupting_proxy: true,
            ..EnvOptions::default()
        },
    )
    .await?;
    let proxy = env.proxy()?;
    let pushed = env
        .push("team/corrupted", "v1", &TestImage::busybox(&["echo", "hi"]))
        .await?;
    let secret_id = env.create_secret("proxy", proxy.addr(), &env.user).await?;
    let through_proxy = pushed.reference_via(proxy.addr());
    let request = start_request("order-corrupted", "corrupted", &through_proxy, &secret_id);
    expect_code_then_still_serving(&env, request, Code::DataLoss).await?;
    assert!(
        proxy.corrupted_blobs() >= 1,
        "berthd fetched no blob through the proxy"
    );

    let images = env.containerd.ctr_ok(&["images", "ls", "-q"]).await?;
    assert!(
        !images.lines().any(|image| image.contains("team/corrupted")),
        "the corrupted image was registered:\n{images}"
    );
    Ok(())
}
