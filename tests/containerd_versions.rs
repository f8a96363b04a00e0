//! berth on the containerd builds it claims (the whole suite runs on each: `scripts/test.sh
//! --containerd 1.6|1.7|2.1`), what it reports of the one it talks to, and its refusal of one
//! it does not support (Debian 11's containerd 1.4).

use anyhow::Context as _;
use berth::api::pb::PullPolicy;

use crate::harness::ca::TestCa;
use crate::harness::containerd::{Build, Containerd};
use crate::harness::exposition::scrape;
use crate::harness::free_local_port;
use crate::harness::host::{HostBerthd, HostConfig, HostEnvironment, OpsEnv};
use crate::harness::image::TestImage;
use crate::harness::wait::{wait_for, STARTUP_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_version_names_berthd_and_the_containerd_it_talks_to() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    let mut config = env.host_config();
    config.metrics_listen = format!("127.0.0.1:{}", free_local_port()?);
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let release = Build::current()?.release().to_owned();

    let printed = berthd.cli_ok(&["version"], None).await?;
    let lines: Vec<&str> = printed.lines().collect();
    let own = env!("CARGO_PKG_VERSION");
    assert_eq!(lines.len(), 3, "{printed}");
    assert_eq!(lines[0], format!("berth   {own}"), "{printed}");
    assert_eq!(lines[1], format!("berthd  {own}"), "{printed}");
    assert!(
        lines[2].starts_with(&format!("containerd {release}")),
        "the containerd line names {release}:\n{printed}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &berthd
            .cli_ok(&["version", "--output", "json"], None)
            .await?,
    )?;
    let reported = json["containerd"].as_str().context("containerd in JSON")?;
    assert!(reported.starts_with(&release), "{json}");

    // The metric and the ready log line carry the same version.
    let (_, metrics) = scrape(berthd.metrics_addr()).await?;
    assert_eq!(
        metrics.value("berth_containerd_info", &[("version", reported)]),
        Some(1.0),
        "{}",
        metrics.lines_starting("berth_containerd").join("\n")
    );
    let log = berthd.log_text();
    let ready = log
        .lines()
        .find(|line| line.contains("containerd answered; ready"))
        .with_context(|| format!("no ready line in:\n{log}"))?;
    assert!(ready.contains(reported), "{ready}");

    // And the build runs berth's main job.
    let pushed = env
        .push_image("team/versions", "v1", &TestImage::busybox(&["echo", "hi"]))
        .await?;
    let secret = berthd
        .create_docker_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let container = berthd
        .run_to_completion(&pushed.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;
    assert_eq!(container.exit_code, 0);

    // containerd 2.x lists the deprecated features a client used; berth uses none.
    if env.containerd.build().is_v2() {
        let deprecations = env.containerd.ctr_ok(&["deprecations", "list"]).await?;
        let used: Vec<&str> = deprecations
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.starts_with("ID"))
            .collect();
        assert!(
            used.is_empty(),
            "containerd reports deprecations:\n{deprecations}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berthd_refuses_a_containerd_older_than_1_6_naming_its_version() -> anyhow::Result<()> {
    let old = Build::by_version("1.4")?;
    assert_eq!(old.version, (1, 4), "{old:?}");
    let containerd = Containerd::start_build(&old).await?;
    let ca = TestCa::generate()?;
    let config = HostConfig::new(&containerd, &ca);
    let mut berthd = HostBerthd::spawn(&config, &HostEnvironment::default())?;
    let status = wait_for("berthd to refuse containerd 1.4", STARTUP_TIMEOUT, || {
        let status = berthd.exit_status();
        async move { status }
    })
    .await
    .with_context(|| berthd.log_tail())?;
    // 64: a restart would not help (the unit's RestartPreventExitStatus).
    assert_eq!(status.code(), Some(64), "{}", berthd.log_tail());
    let log = berthd.log_text();
    assert!(
        log.contains(&format!("is version {}", old.release()))
            && log.contains("berth needs containerd 1.6 or newer"),
        "{log}"
    );
    // It never said it was ready.
    assert!(!log.contains("containerd answered; ready"), "{log}");
    Ok(())
}
