//! grpcurl against berthd with server reflection only (no .proto files): list, describe, health,
//! and a secret plus a container created from JSON.

use serde_json::{json, Value};

use crate::harness::env::{is_secret_id, Env, RegistryKind};
use crate::harness::grpcurl::{grpcurl_ok, grpcurl_path};
use crate::harness::image::TestImage;
use crate::harness::wait::{assert_eventually, wait_for, ORDER_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_starts_a_container() -> anyhow::Result<()> {
    grpcurl_path()?;
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let socket = env.berthd.socket();

    let services = grpcurl_ok(socket, &[], &["list"]).await?;
    for service in [
        "berth.v1.Agent",
        "berth.v1.Secrets",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|line| line.trim() == service),
            "{service} missing from:\n{services}"
        );
    }

    let described = grpcurl_ok(socket, &[], &["describe", "berth.v1.Agent.StartContainer"]).await?;
    assert!(
        described.contains("rpc StartContainer")
            && described.contains("StartContainerRequest")
            && described.contains("Container"),
        "{described}"
    );

    let health: Value = serde_json::from_str(
        &grpcurl_ok(socket, &["-d", "{}"], &["grpc.health.v1.Health/Check"]).await?,
    )?;
    assert_eq!(health["status"], "SERVING");

    let image = TestImage::busybox(&["echo hello from grpcurl"]).with_entrypoint(&["sh", "-c"]);
    let pushed = env.push("team/grpcurl", "v1", &image).await?;

    let create_secret = json!({
        "name": "reg",
        "docker": {
            "server": env.registry.addr(),
            "username": env.user.username,
            "password": env.user.password,
        },
    });
    let secret: Value = serde_json::from_str(
        &grpcurl_ok(
            socket,
            &["-d", &create_secret.to_string()],
            &["berth.v1.Secrets/CreateSecret"],
        )
        .await?,
    )?;
    let secret_id = secret["id"].as_str().unwrap_or_default().to_owned();
    assert!(is_secret_id(&secret_id), "{secret}");

    let start = json!({
        "order_id": "grpcurl-order-1",
        "name": "grpcurl-demo",
        "container": {"image": pushed.reference(), "pull_secret": secret_id},
    });
    let started: Value = serde_json::from_str(
        &grpcurl_ok(
            socket,
            &["-d", &start.to_string()],
            &["berth.v1.Agent/StartContainer"],
        )
        .await?,
    )?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    assert!(!id.is_empty(), "{started}");

    let get = json!({ "id": id }).to_string();
    let exited: Value = wait_for("the grpcurl container to exit", ORDER_TIMEOUT, || async {
        let container: Value = serde_json::from_str(
            &grpcurl_ok(socket, &["-d", &get], &["berth.v1.Agent/GetContainer"]).await?,
        )?;
        Ok((container["state"] == "EXITED").then_some(container))
    })
    .await
    .map_err(|failure| failure.context(format!("berthd log:\n{}", env.berthd.log_tail())))?;
    // proto3 JSON leaves out zero values: no exitCode means 0.
    assert_eq!(exited["exitCode"].as_i64().unwrap_or(0), 0, "{exited}");
    assert_eq!(exited["imageDigest"], pushed.manifest_digest.as_str());
    let log_path = exited["logPath"].as_str().unwrap_or_default().to_owned();
    assert_eventually(
        "the container's log to hold its output",
        ORDER_TIMEOUT,
        || async {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            Ok(log.contains("hello from grpcurl"))
        },
    )
    .await?;
    Ok(())
}
