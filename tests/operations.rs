//! berthd as an operator runs it: the systemd unit, `Type=notify` readiness, watchdog and
//! stopping notifications, the Prometheus metrics, the CLI's progress and JSON output, `berth
//! secret docker import`, and the install script.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use berth::api::pb::{ListContainersRequest, PullPolicy};
use serde_json::Value;
use tokio::time::Instant;
use tonic::Code;

use crate::harness::berthd::bin_dir;
use crate::harness::containerd::Containerd;
use crate::harness::env::{is_secret_id, start_request};
use crate::harness::exposition::{scrape, Exposition};
use crate::harness::host::{health_of, HostBerthd, HostConfig, HostEnvironment, OpsEnv};
use crate::harness::image::TestImage;
use crate::harness::notify::NotifySocket;
use crate::harness::wait::{assert_eventually, wait_for, ORDER_TIMEOUT, STARTUP_TIMEOUT};
use crate::harness::{free_local_port, random_lowercase, temp_dir};

/// The repository root (tests/ is one of its members).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

/// `systemd-analyze verify` on a copy of the repository's unit whose `ExecStart` runs `berthd`.
fn verify_unit(berthd: &Path, dir: &Path) -> anyhow::Result<std::process::Output> {
    let unit = std::fs::read_to_string(repo_root().join("systemd/berthd.service"))
        .context("reading systemd/berthd.service")?;
    verify_unit_text(&unit, berthd, dir)
}

/// `systemd-analyze verify` on `unit` with its `ExecStart` binary replaced by `berthd` (verify
/// requires the binary to exist).
fn verify_unit_text(unit: &str, berthd: &Path, dir: &Path) -> anyhow::Result<std::process::Output> {
    let mut found = 0;
    let text: String = unit
        .lines()
        .map(|line| {
            if line.starts_with("ExecStart=") {
                found += 1;
                format!(
                    "ExecStart={} --config /etc/berth/berthd.toml",
                    berthd.display()
                )
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    if found != 1 {
        bail!("the unit has {found} ExecStart= lines, expected 1");
    }
    let path = dir.join("berthd.service");
    std::fs::write(&path, text + "\n")?;
    Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .context("running systemd-analyze (apt package systemd; scripts/provision.sh installs it)")
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() -> anyhow::Result<()> {
    let dir = temp_dir("unit")?;
    let berthd = bin_dir()?.join("berthd");
    assert!(berthd.is_file(), "build berthd first: {}", berthd.display());
    let output = verify_unit(&berthd, dir.path())?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !stderr.contains("berthd.service"),
        "systemd-analyze verify failed ({}):\n{stderr}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );

    // The check has teeth: the same unit with a missing ExecStart binary is refused.
    let missing = verify_unit(&dir.path().join("no-such-berthd"), dir.path())?;
    assert!(
        !missing.status.success(),
        "verify accepted a unit whose ExecStart does not exist"
    );

    // What the unit promises (contract.md, style.md).
    let unit = std::fs::read_to_string(repo_root().join("systemd/berthd.service"))?;
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "RestartPreventExitStatus=64",
        "RuntimeDirectory=berth",
        "StateDirectory=berth",
        "UMask=0077",
        "Environment=MALLOC_ARENA_MAX=2",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "the unit lacks {line}"
        );
    }
    let stop_timeout: u64 = unit
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .context("no TimeoutStopSec=")?
        .trim()
        .parse()?;
    assert!(
        stop_timeout > 30,
        "TimeoutStopSec={stop_timeout} is not longer than berthd's 30 s grace period"
    );
    Ok(())
}

/// berthd started before containerd exists, under a `NOTIFY_SOCKET` and a watchdog, with
/// `WATCHDOG_PID` set to its own pid as systemd does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_the_api_and_containerd_answer_then_watchdog_and_stopping(
) -> anyhow::Result<()> {
    let notify = NotifySocket::bind()?;
    let ca = crate::harness::ca::TestCa::generate()?;
    // containerd will appear at this path later (a symlink to the test's containerd socket).
    let late = temp_dir("late-containerd")?;
    let socket = late.path().join("containerd.sock");
    let namespace = format!("berth-test-{}", random_lowercase(8));
    let config = HostConfig::for_socket(&socket, &namespace, &ca);
    let environment = HostEnvironment {
        vars: vec![
            (
                "NOTIFY_SOCKET".to_owned(),
                notify.path().to_string_lossy().into_owned(),
            ),
            ("WATCHDOG_USEC".to_owned(), "1000000".to_owned()),
        ],
        watchdog_pid_is_self: true,
        json_logs: false,
    };
    let spawned = Instant::now();
    let mut berthd = HostBerthd::spawn(&config, &environment)?;

    let waiting = notify
        .wait_for_prefix("STATUS", "waiting for containerd", STARTUP_TIMEOUT)
        .await?;
    // The API answers while containerd does not, its health check NOT_SERVING: still no
    // READY=1.
    berthd
        .wait_health(tonic_health::pb::health_check_response::ServingStatus::NotServing)
        .await?;
    assert_eventually(
        "berthd to retry containerd at least three times",
        STARTUP_TIMEOUT,
        || async {
            Ok(berthd
                .log_text()
                .matches("containerd not answering yet")
                .count()
                >= 3)
        },
    )
    .await?;
    assert!(
        notify.with_key("READY").is_empty(),
        "READY=1 before containerd answered: {:?}",
        notify.summary()
    );
    assert!(
        notify.with_key("WATCHDOG").is_empty(),
        "WATCHDOG=1 before READY=1: {:?}",
        notify.summary()
    );
    let first = notify.messages().into_iter().next().context("no message")?;
    assert!(
        first
            .get("STATUS")
            .is_some_and(|status| status.starts_with("waiting for containerd")),
        "the first notification is not the waiting STATUS: {:?}",
        notify.summary()
    );

    let containerd = Containerd::start().await?;
    std::os::unix::fs::symlink(containerd.socket(), &socket)?;
    let appeared = Instant::now();
    let ready = notify.wait_for("READY", "1", STARTUP_TIMEOUT).await?;
    assert!(ready.at >= appeared, "READY=1 before containerd appeared");
    let status = ready.get("STATUS").unwrap_or_default().to_owned();
    assert!(status.starts_with("serving"), "READY's STATUS: {status:?}");
    // READY=1 means the API answers now.
    assert_eq!(
        health_of(berthd.socket()).await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );
    let listed = berthd
        .agent()
        .await?
        .list_containers(ListContainersRequest::default())
        .await?
        .into_inner();
    assert!(listed.containers.is_empty());
    println!(
        "notify: STATUS={:?} {:?} after spawn; READY=1 {:?} after containerd appeared ({:?} after spawn); STATUS with READY: {status:?}",
        waiting.get("STATUS").unwrap_or_default(),
        waiting.at - spawned,
        ready.at - appeared,
        ready.at - spawned,
    );

    // WATCHDOG_USEC=1 s: pings at about half that.
    wait_for("three WATCHDOG=1", STARTUP_TIMEOUT, || async {
        Ok((notify.with_key("WATCHDOG").len() >= 3).then_some(()))
    })
    .await
    .with_context(|| format!("{:?}\n{}", notify.summary(), berthd.log_tail()))?;
    let pings: Vec<Instant> = notify
        .with_key("WATCHDOG")
        .iter()
        .map(|message| message.at)
        .collect();
    let gaps: Vec<Duration> = pings.windows(2).map(|pair| pair[1] - pair[0]).collect();
    assert!(pings[0] >= ready.at, "WATCHDOG=1 before READY=1");
    for gap in &gaps {
        assert!(
            *gap < Duration::from_millis(1000),
            "watchdog gap {gap:?} is not under WATCHDOG_USEC (1 s): {gaps:?}"
        );
    }
    println!("watchdog: WATCHDOG_USEC=1000000, gaps between pings {gaps:?}");

    let terminated = Instant::now();
    let exit = berthd.terminate(Duration::from_secs(40)).await?;
    let stopping = notify.wait_for("STOPPING", "1", STARTUP_TIMEOUT).await?;
    assert!(exit.success(), "berthd exited with {exit} after SIGTERM");
    println!(
        "stopping: STOPPING=1 {:?} after SIGTERM (STATUS={:?}); exit {exit}",
        stopping.at - terminated,
        stopping.get("STATUS").unwrap_or_default()
    );
    drop(containerd);
    Ok(())
}

/// sd_watchdog_enabled(3): the watchdog is on when `WATCHDOG_USEC` is set and `WATCHDOG_PID` is
/// unset or names this process; off when it names another process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_follows_watchdog_pid() -> anyhow::Result<()> {
    let ca = crate::harness::ca::TestCa::generate()?;
    let containerd = Containerd::start().await?;
    let run = |watchdog_pid: Option<&str>| {
        let notify = NotifySocket::bind();
        let ca = &ca;
        let containerd = &containerd;
        let watchdog_pid = watchdog_pid.map(str::to_owned);
        async move {
            let notify = notify?;
            let mut vars = vec![
                (
                    "NOTIFY_SOCKET".to_owned(),
                    notify.path().to_string_lossy().into_owned(),
                ),
                ("WATCHDOG_USEC".to_owned(), "400000".to_owned()),
            ];
            if let Some(pid) = watchdog_pid {
                vars.push(("WATCHDOG_PID".to_owned(), pid));
            }
            let environment = HostEnvironment {
                vars,
                watchdog_pid_is_self: false,
                json_logs: true,
            };
            let berthd = HostBerthd::start(&HostConfig::new(containerd, ca), &environment).await?;
            notify.wait_for("READY", "1", STARTUP_TIMEOUT).await?;
            // --log-format json: one JSON object per line.
            let log = berthd.log_text();
            for line in log.lines() {
                let entry: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("a log line is not JSON: {line:?}"))?;
                assert!(
                    entry["level"].is_string() && entry["fields"].is_object(),
                    "{line}"
                );
            }
            assert!(log.contains("containerd answered; ready"), "{log}");
            // Up to two whole watchdog periods for a ping.
            let pinged = wait_for("a WATCHDOG=1", Duration::from_millis(800), || async {
                Ok((!notify.with_key("WATCHDOG").is_empty()).then_some(()))
            })
            .await
            .is_ok();
            drop(berthd);
            anyhow::Ok(pinged)
        }
    };
    let unset = run(None).await?;
    let other = run(Some("1")).await?;
    assert!(
        !other,
        "WATCHDOG=1 sent although WATCHDOG_PID names another process"
    );
    assert!(
        unset,
        "no WATCHDOG=1 with WATCHDOG_USEC set and WATCHDOG_PID unset (sd_watchdog_enabled(3) enables it)"
    );
    Ok(())
}

fn value(exposition: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition.value(name, labels).unwrap_or_else(|| {
        panic!(
            "no sample {name}{labels:?} in:\n{}",
            exposition.lines_starting("berth_").join("\n")
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_pull_a_start_and_a_refused_pull() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    let mut config = env.host_config();
    config.metrics_listen = format!("127.0.0.1:{}", free_local_port()?);
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let registry = env.registry.addr();

    let (content_type, before) = scrape(berthd.metrics_addr()).await?;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert_eq!(value(&before, "berth_pulls_in_flight", &[]), 0.0);
    let pushed = env
        .push_image(
            "team/metered",
            "v1",
            &TestImage::busybox(&["echo", "metered"]),
        )
        .await?;
    let secret = berthd
        .create_docker_secret("reg", registry, &env.user)
        .await?;
    let container = berthd
        .run_to_completion(&pushed.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;
    assert_eq!(container.image_digest, pushed.manifest_digest);

    let (_, after) = scrape(berthd.metrics_addr()).await?;
    // prometheus-client leaves a family out until it has a sample.
    for (family, kind) in [
        ("berth_pulls", "counter"),
        ("berth_pull_bytes", "counter"),
        ("berth_pull_duration_seconds", "histogram"),
        ("berth_start_duration_seconds", "histogram"),
        ("berth_token_requests", "counter"),
        ("berth_pulls_in_flight", "gauge"),
        ("berth_containers", "gauge"),
    ] {
        assert_eq!(
            after.types.get(family).map(String::as_str),
            Some(kind),
            "# TYPE of {family}"
        );
    }

    let pull_labels = [("result", "ok"), ("registry", registry)];
    assert_eq!(value(&after, "berth_pulls_total", &pull_labels), 1.0);
    let bytes = value(&after, "berth_pull_bytes_total", &[("registry", registry)]);
    assert!(bytes > 0.0, "berth_pull_bytes_total {bytes}");
    assert_eq!(value(&after, "berth_pull_duration_seconds_count", &[]), 1.0);
    assert!(value(&after, "berth_start_duration_seconds_count", &[]) >= 1.0);
    let tokens = value(
        &after,
        "berth_token_requests_total",
        &[("registry", registry), ("kind", "docker")],
    );
    assert!(tokens >= 1.0, "berth_token_requests_total {tokens}");
    assert_eq!(
        value(&after, "berth_containers", &[("state", "exited")]),
        1.0
    );
    assert_eq!(value(&after, "berth_pulls_in_flight", &[]), 0.0);
    let inf_bucket = value(
        &after,
        "berth_pull_duration_seconds_bucket",
        &[("le", "+Inf")],
    );
    assert_eq!(inf_bucket, 1.0);
    println!(
        "scrape after one pull:\n{}",
        after
            .lines_starting("berth_")
            .into_iter()
            .filter(|line| !line.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A wrong password: the order is refused, and the pull counts as denied.
    let wrong = berthd
        .create_docker_secret("wrong", registry, &env.user.with_wrong_password())
        .await?;
    let refused = format!("{registry}/team/metered:v2");
    env.push_image("team/metered", "v2", &TestImage::busybox(&["echo", "v2"]))
        .await?;
    let suffix = random_lowercase(6);
    let status = berthd
        .start_container(start_request(
            &format!("order-{suffix}"),
            &format!("refused-{suffix}"),
            &refused,
            &wrong,
        ))
        .await?
        .expect_err("a wrong password must be refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let (_, refused_scrape) = scrape(berthd.metrics_addr()).await?;
    assert_eq!(
        value(
            &refused_scrape,
            "berth_pulls_total",
            &[("result", "denied"), ("registry", registry)]
        ),
        1.0,
        "berth_pulls_total{{result=\"denied\"}} after a refused credential"
    );
    assert_eq!(value(&refused_scrape, "berth_pulls_in_flight", &[]), 0.0);
    Ok(())
}

/// `berth pull` without a terminal, `--output json pull`, `service create` with progress on
/// stderr, and `--output json` on every read verb.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_progress_lines_json_events_and_json_read_verbs() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    let berthd = HostBerthd::start(&env.host_config(), &HostEnvironment::default()).await?;
    let registry = env.registry.addr();
    let first = env
        .push_image("team/progress", "v1", &TestImage::busybox(&["echo", "one"]))
        .await?;
    let second = env
        .push_image("team/progress", "v2", &TestImage::busybox(&["echo", "two"]))
        .await?;
    let secret = berthd
        .cli_ok(
            &[
                "secret",
                "docker",
                "create",
                "--name",
                "reg",
                "--server",
                registry,
                "--username",
                &env.user.username,
                "--password-stdin",
            ],
            Some(&format!("{}\n", env.user.password)),
        )
        .await?
        .trim()
        .to_owned();
    assert!(is_secret_id(&secret), "{secret:?}");

    // Plain lines (stdout is a pipe, not a terminal).
    let stdout = berthd
        .cli_ok(
            &["pull", &first.reference(), "--pull-secret", &secret],
            None,
        )
        .await?;
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines.first().is_some_and(|line| line
            .starts_with(&format!("resolved {}", first.reference()))
            && line.contains(&first.manifest_digest)),
        "first line: {stdout}"
    );
    let layer_lines: Vec<&&str> = lines
        .iter()
        .filter(|line| line.starts_with("layer sha256:"))
        .collect();
    assert!(
        layer_lines.iter().any(|line| {
            let Some(counts) = line.split(' ').nth(2) else {
                return false;
            };
            let Some((done, total)) = counts.split_once('/') else {
                return false;
            };
            line.ends_with(" bytes")
                && done.parse::<u64>().is_ok()
                && done == total
                && total.parse::<u64>().is_ok_and(|total| total > 0)
        }),
        "no `layer <digest> n/n bytes` line: {stdout}"
    );
    assert_eq!(
        lines.last().copied(),
        Some(format!("done {}", first.manifest_digest).as_str()),
        "{stdout}"
    );
    println!("berth pull (no tty):\n{stdout}");

    // One JSON object per line, the last {"done":{"digest":...}}.
    let stdout = berthd
        .cli_ok(
            &[
                "--output",
                "json",
                "pull",
                &second.reference(),
                "--pull-secret",
                &secret,
            ],
            None,
        )
        .await?;
    let events: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("not one JSON object per line:\n{stdout}"))?;
    assert!(events.len() >= 3, "{stdout}");
    assert!(events.iter().all(Value::is_object), "{stdout}");
    assert_eq!(
        events[0]["resolved"]["digest"],
        second.manifest_digest.as_str()
    );
    assert!(
        events.iter().any(|event| event.get("layer").is_some()),
        "{stdout}"
    );
    assert_eq!(
        events.last().map(|event| &event["done"]["digest"]),
        Some(&Value::from(second.manifest_digest.as_str())),
        "{stdout}"
    );
    println!("berth --output json pull:\n{stdout}");

    // service create: progress lines on stderr, the container on stdout.
    let yaml = env.scratch_dir().join("svc.yaml");
    std::fs::write(
        &yaml,
        format!(
            "version: v1\nkind: Service\nmetadata:\n  name: progress-svc\ncontainer:\n  image: {}\n  pull_secret: {secret}\n",
            second.reference()
        ),
    )?;
    let created = berthd
        .cli(
            &["service", "create", "--file", &yaml.to_string_lossy()],
            None,
        )
        .await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr),
    );
    assert!(created.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.lines().any(|line| line.starts_with("resolved "))
            && stderr
                .lines()
                .any(|line| line == format!("done {}", second.manifest_digest)),
        "no progress lines on stderr:\n{stderr}"
    );
    assert!(
        !stdout.contains("resolved ") && stdout.contains("progress-svc"),
        "stdout should hold the container only:\n{stdout}"
    );
    println!("service create stdout:\n{stdout}\nstderr:\n{stderr}");

    let agent_ok = wait_for("progress-svc to exit", ORDER_TIMEOUT, || async {
        let output = berthd
            .cli(&["--output", "json", "get", "progress-svc"], None)
            .await?;
        if !output.status.success() {
            return Ok(None);
        }
        let container: Value = serde_json::from_slice(&output.stdout)?;
        Ok((container["state"] == "EXITED").then_some(container))
    })
    .await?;
    assert_eq!(agent_ok["image_digest"], second.manifest_digest.as_str());

    for args in [
        vec!["--output", "json", "ps"],
        vec!["ps", "--output", "json"],
        vec!["--output", "json", "get", "progress-svc"],
        vec!["--output", "json", "secret", "list"],
    ] {
        let stdout = berthd.cli_ok(&args, None).await?;
        let parsed: Value = serde_json::from_str(&stdout)
            .with_context(|| format!("berth {args:?} printed no JSON:\n{stdout}"))?;
        match args
            .iter()
            .rev()
            .find(|arg| !arg.starts_with('-') && **arg != "json")
        {
            Some(&"ps") => assert!(
                parsed
                    .as_array()
                    .is_some_and(|list| list.iter().any(|c| c["name"] == "progress-svc")),
                "ps: {parsed}"
            ),
            Some(&"list") => assert!(
                parsed
                    .as_array()
                    .is_some_and(|list| list.iter().any(|s| s["id"] == secret.as_str())),
                "secret list: {parsed}"
            ),
            _ => assert_eq!(parsed["name"], "progress-svc", "{parsed}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_config_import_makes_secrets_that_pull() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    let berthd = HostBerthd::start(&env.host_config(), &HostEnvironment::default()).await?;
    let registry = env.registry.addr();
    let pushed = env
        .push_image(
            "team/imported",
            "v1",
            &TestImage::busybox(&["echo", "imported"]),
        )
        .await?;
    let config = serde_json::json!({
        "auths": {
            registry: {"auth": env.user.basic_auth_base64()},
            "https://identity.example/v1/": {"auth": "", "identitytoken": format!("idt-{}", random_lowercase(24))},
        },
        "credHelpers": {"helper.example": "ecr-login"},
    });
    let path = env.scratch_dir().join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let output = berthd
        .cli(
            &[
                "secret",
                "docker",
                "import",
                "--config",
                &path.to_string_lossy(),
            ],
            None,
        )
        .await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let imported: Vec<(&str, &str)> = stdout
        .lines()
        .map(|line| line.split_once(' ').unwrap_or((line, "")))
        .collect();
    assert_eq!(
        imported.len(),
        2,
        "one `<id> <server>` per auths entry:\n{stdout}"
    );
    for (id, _) in &imported {
        assert!(is_secret_id(id), "{stdout}");
    }
    let servers: Vec<&str> = imported.iter().map(|(_, server)| *server).collect();
    assert!(servers.contains(&registry), "{stdout}");
    assert!(servers.contains(&"identity.example"), "{stdout}");
    assert!(
        stderr
            .lines()
            .any(|line| line.contains("skipped helper.example") && line.contains("credHelpers")),
        "the credHelpers entry is not reported as skipped:\n{stderr}"
    );
    assert!(
        !stdout.contains(&env.user.password) && !stderr.contains(&env.user.password),
        "the password was printed"
    );
    println!("import stdout:\n{stdout}stderr:\n{stderr}");

    let listed: Value = serde_json::from_str(
        &berthd
            .cli_ok(&["--output", "json", "secret", "list"], None)
            .await?,
    )?;
    let names: Vec<&str> = listed
        .as_array()
        .context("secret list is not an array")?
        .iter()
        .filter_map(|secret| secret["name"].as_str())
        .collect();
    assert!(names.contains(&"identity.example"), "{listed}");

    let id = imported
        .iter()
        .find(|(_, server)| *server == registry)
        .map(|(id, _)| *id)
        .context("no secret for the registry")?;
    let container = berthd
        .run_to_completion(&pushed.reference(), id, PullPolicy::IfNotPresent)
        .await?;
    assert_eq!(container.image_digest, pushed.manifest_digest);
    Ok(())
}

/// `scripts/install.sh` with DESTDIR and PREFIX, on the already-built binaries.
#[test]
fn install_script_puts_binaries_unit_and_config_in_place() -> anyhow::Result<()> {
    let destdir = temp_dir("install")?;
    let root = repo_root();
    let output = Command::new("bash")
        .arg(root.join("scripts/install.sh"))
        .env("DESTDIR", destdir.path())
        .env("PREFIX", "/opt/berth")
        .env("BERTH_BIN_DIR", bin_dir()?)
        .output()
        .context("running scripts/install.sh")?;
    assert!(
        output.status.success(),
        "install.sh failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let mode = |relative: &str| -> anyhow::Result<u32> {
        let path = destdir.path().join(relative);
        Ok(std::fs::metadata(&path)
            .with_context(|| format!("{} was not installed", path.display()))?
            .permissions()
            .mode()
            & 0o7777)
    };
    assert_eq!(mode("opt/berth/bin/berthd")?, 0o755);
    assert_eq!(mode("opt/berth/bin/berth")?, 0o755);
    assert_eq!(mode("opt/berth/lib/systemd/system/berthd.service")?, 0o644);
    assert_eq!(mode("etc/berth")?, 0o700);
    assert_eq!(mode("etc/berth/berthd.toml")?, 0o600);
    assert_eq!(
        std::fs::read(destdir.path().join("opt/berth/bin/berthd"))?,
        std::fs::read(bin_dir()?.join("berthd"))?,
        "the installed berthd is not the built one"
    );
    assert_eq!(
        std::fs::read_to_string(destdir.path().join("etc/berth/berthd.toml"))?,
        std::fs::read_to_string(root.join("config/berthd.toml"))?
    );
    let unit = std::fs::read_to_string(
        destdir
            .path()
            .join("opt/berth/lib/systemd/system/berthd.service"),
    )?;
    assert!(
        unit.lines()
            .any(|line| line == "ExecStart=/opt/berth/bin/berthd --config /etc/berth/berthd.toml"),
        "ExecStart does not name the installed binary:\n{unit}"
    );
    // The installed unit verifies (its binary looked up under DESTDIR: verify needs it to exist).
    let scratch = temp_dir("installed-unit")?;
    let verify = verify_unit_text(
        &unit,
        &destdir.path().join("opt/berth/bin/berthd"),
        scratch.path(),
    )?;
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "the installed unit does not verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // A second run keeps an edited config.
    std::fs::write(
        destdir.path().join("etc/berth/berthd.toml"),
        "retries_edited = 1\n",
    )?;
    let again = Command::new("bash")
        .arg(root.join("scripts/install.sh"))
        .env("DESTDIR", destdir.path())
        .env("PREFIX", "/opt/berth")
        .env("BERTH_BIN_DIR", bin_dir()?)
        .output()?;
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(destdir.path().join("etc/berth/berthd.toml"))?,
        "retries_edited = 1\n",
        "install.sh overwrote an existing config"
    );
    Ok(())
}
