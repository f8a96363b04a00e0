//! The seed flow, through the CLI only: a private image, a Docker pull secret read from stdin, a
//! service YAML, and the container run to completion with its output in its log file.

use serde_json::Value;

use crate::harness::env::{is_secret_id, Env, RegistryKind};
use crate::harness::image::TestImage;
use crate::harness::wait::{wait_for, ORDER_TIMEOUT};

const SERVICE_NAME: &str = "private-image-demo";
const GREETING: &str = "hello from private image";

/// A proto3 JSON enum or number field that may be left out when it holds its default.
fn field<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container.get(name).filter(|value| !value.is_null())
}

async fn seed_flow(kind: RegistryKind, image: TestImage) -> anyhow::Result<()> {
    let env = Env::start(kind).await?;
    let pushed = env.push("team/private-image", "v1", &image).await?;

    let secret_id = env
        .berthd
        .cli_ok(
            &[
                "secret",
                "docker",
                "create",
                "--name",
                "reg",
                "--server",
                env.registry.addr(),
                "--username",
                &env.user.username,
                "--password-stdin",
            ],
            Some(&format!("{}\n", env.user.password)),
        )
        .await?;
    let secret_id = secret_id.trim();
    assert!(is_secret_id(secret_id), "not a secret id: {secret_id:?}");

    let yaml_path = env.scratch_dir().join("private-image-demo.yaml");
    std::fs::write(
        &yaml_path,
        format!(
            "version: v1\nkind: Service\nmetadata:\n  name: {SERVICE_NAME}\ncontainer:\n  image: {}\n  pull_secret: {secret_id}\n",
            pushed.reference()
        ),
    )?;
    let created = env
        .berthd
        .cli_ok(
            &["service", "create", "--file", &yaml_path.to_string_lossy()],
            None,
        )
        .await?;
    assert!(
        created.contains(SERVICE_NAME),
        "service create printed {created:?}"
    );

    let container: Value = wait_for(
        &format!("`berth get {SERVICE_NAME}` to show EXITED"),
        ORDER_TIMEOUT,
        || async {
            let output = env
                .berthd
                .cli(&["--output", "json", "get", SERVICE_NAME], None)
                .await?;
            if !output.status.success() {
                return Ok(None);
            }
            let container: Value = serde_json::from_slice(&output.stdout)?;
            Ok((field(&container, "state") == Some(&Value::from("EXITED"))).then_some(container))
        },
    )
    .await
    .map_err(|failure| {
        failure.context(format!(
            "config {}; berthd log:\n{}",
            env.berthd.config_path().display(),
            env.berthd.log_tail()
        ))
    })?;
    assert_eq!(
        field(&container, "exit_code")
            .and_then(Value::as_i64)
            .unwrap_or(0),
        0,
        "{container}"
    );
    assert_eq!(container["name"], SERVICE_NAME);
    assert_eq!(container["image"], pushed.reference().as_str());
    assert_eq!(container["image_digest"], pushed.manifest_digest.as_str());

    let log_path = container["log_path"]
        .as_str()
        .filter(|path| !path.is_empty())
        .unwrap_or_else(|| panic!("no log_path in {container}"))
        .to_owned();
    let log = wait_for(
        &format!("{log_path} to hold the greeting"),
        ORDER_TIMEOUT,
        || async {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            Ok(log.contains(GREETING).then_some(log))
        },
    )
    .await?;
    assert!(!log.contains("wrong platform"), "{log}");

    let logs = env.berthd.cli_ok(&["logs", SERVICE_NAME], None).await?;
    assert!(logs.contains(GREETING), "berth logs printed {logs:?}");

    let ps = env.berthd.cli_ok(&["ps"], None).await?;
    assert!(
        ps.lines()
            .any(|line| line.contains(SERVICE_NAME) && line.contains("EXITED")),
        "berth ps printed:\n{ps}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_flow_with_an_htpasswd_registry() -> anyhow::Result<()> {
    seed_flow(
        RegistryKind::Htpasswd,
        TestImage::busybox(&["sh", "-c", "echo hello from private image"]),
    )
    .await
}

/// Token auth, and the image behind an OCI index (a bogus arm64 entry first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_flow_with_a_token_registry_and_an_index() -> anyhow::Result<()> {
    seed_flow(
        RegistryKind::Token,
        TestImage::busybox(&["sh", "-c", "echo hello from private image"]).in_index(),
    )
    .await
}
