//! `audit_log` end to end: one order per kind of credential (a Docker secret, a credential
//! provider, anonymous), an access check of a cached private image (passed and refused); the
//! file holds one line per use with exactly the contract's fields; `mv` + SIGHUP sends new
//! lines to a new file (logrotate); and no credential or token is in either file.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use berth::api::pb::PullPolicy;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tonic::Code;

use crate::harness::exposition::scrape;
use crate::harness::free_local_port;
use crate::harness::host::{HostBerthd, HostEnvironment, OpsEnv};
use crate::harness::token_server::Grants;
use crate::harness::wait::{assert_eventually, wait_for};
use crate::leaks::needles_in;
use crate::providers::{pull, push, start_in, Plugin, Script, ALLOWED};

const FIELDS: [&str; 9] = [
    "time",
    "project",
    "order_id",
    "credential",
    "registry",
    "repository",
    "digest",
    "action",
    "result",
];

fn lines(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .map(|line| Ok(serde_json::from_str(line)?))
        .collect()
}

/// The lines about `repository` with `action`.
fn about<'a>(lines: &'a [Value], repository: &str, action: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|line| line["repository"] == repository && line["action"] == action)
        .collect()
}

#[tokio::test]
async fn every_credential_use_is_one_audit_line_and_sighup_reopens_the_file() -> anyhow::Result<()>
{
    let env = OpsEnv::start().await?;
    env.token_server
        .grant_anonymous(Grants::none().pull("public/app"));
    let host = env.registry.addr().to_owned();
    let private = push(&env, "private/app").await?;
    let provided = push(&env, "provided/app").await?;
    let public = push(&env, "public/app").await?;
    let script = Script::write(
        env.scratch_dir(),
        "audited",
        &Plugin::Answer {
            host: &host,
            user: &env.user,
            cache_duration: "300s",
        },
    )?;
    let audit_path = env.scratch_dir().join("audit.log");
    let mut config = env.host_config();
    config.top_level_toml = format!("audit_log = {:?}", audit_path.to_string_lossy());
    config.tables_toml = script.table("audited", &format!("{host}/provided"), 10)
        + "[security]\naccess_check_ttl_seconds = 0\n";
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let secret = berthd
        .create_docker_secret("audit", &host, &env.user)
        .await?;

    // Docker secret (start order), provider (PullImage: no order id), anonymous (start order).
    let docker_run = berthd
        .run_to_completion(&private.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;
    pull(&berthd, ALLOWED, &provided.reference())
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    let public_run = berthd
        .run_to_completion(&public.reference(), "", PullPolicy::IfNotPresent)
        .await?;
    // The cached private image again: an access check with the secret (ttl 0), then one
    // refused to an order without a credential.
    berthd
        .run_to_completion(&private.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;
    let status = start_in(&berthd, "team-b", &private.reference())
        .await?
        .expect_err("no credential for a private image");
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut all = Vec::new();
    wait_for("the audit lines", Duration::from_secs(10), || {
        let audit_path = &audit_path;
        async move {
            let found = lines(audit_path).unwrap_or_default();
            Ok((about(&found, "private/app", "access_check").len() >= 2).then_some(found))
        }
    })
    .await
    .map(|found| all = found)?;
    for line in &all {
        let keys: Vec<&str> = line
            .as_object()
            .context("a line is an object")?
            .keys()
            .map(String::as_str)
            .collect();
        let mut wanted = FIELDS.to_vec();
        wanted.sort_unstable();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        assert_eq!(keys_sorted, wanted, "{line}");
        assert_eq!(line["registry"], host.as_str(), "{line}");
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }

    // Docker secret: a token request and a pull, with the order id and the digest.
    let pulls = about(&all, "private/app", "pull");
    assert_eq!(pulls.len(), 1, "{all:#?}");
    assert_eq!(pulls[0]["credential"], secret.as_str());
    assert_eq!(pulls[0]["order_id"], docker_run.order_id.as_str());
    assert_eq!(pulls[0]["project"], "default");
    assert_eq!(pulls[0]["digest"], private.manifest_digest.as_str());
    assert_eq!(pulls[0]["result"], "ok");
    let tokens = about(&all, "private/app", "token");
    assert!(
        tokens
            .iter()
            .any(|line| line["credential"] == secret.as_str() && line["result"] == "ok"),
        "{tokens:#?}"
    );
    let checks = about(&all, "private/app", "access_check");
    assert!(
        checks
            .iter()
            .any(|line| line["credential"] == secret.as_str()
                && line["result"] == "ok"
                && line["digest"] == private.manifest_digest.as_str()),
        "{checks:#?}"
    );
    assert!(
        checks.iter().any(|line| line["credential"] == "anonymous"
            && line["project"] == "team-b"
            && line["result"] == "PERMISSION_DENIED"),
        "{checks:#?}"
    );

    // Provider: PullImage has no order id.
    let pulls = about(&all, "provided/app", "pull");
    assert_eq!(pulls.len(), 1, "{all:#?}");
    assert_eq!(pulls[0]["credential"], "provider:audited");
    assert_eq!(pulls[0]["order_id"], "");
    assert_eq!(pulls[0]["project"], ALLOWED);
    assert_eq!(pulls[0]["digest"], provided.manifest_digest.as_str());
    assert_eq!(about(&all, "provided/app", "token").len(), 1, "{all:#?}");

    // Anonymous.
    let pulls = about(&all, "public/app", "pull");
    assert_eq!(pulls.len(), 1, "{all:#?}");
    assert_eq!(pulls[0]["credential"], "anonymous");
    assert_eq!(pulls[0]["order_id"], public_run.order_id.as_str());
    assert_eq!(pulls[0]["result"], "ok");

    // logrotate: mv, SIGHUP, and the next lines go to a new file.
    let rotated = env.scratch_dir().join("audit.log.1");
    std::fs::rename(&audit_path, &rotated)?;
    let pid = i32::try_from(berthd.pid()?)?;
    kill(Pid::from_raw(pid), Signal::SIGHUP)?;
    assert_eventually(
        "berthd to take the SIGHUP",
        Duration::from_secs(10),
        || async {
            Ok(berthd
                .log_text()
                .contains("sighup: reopening the audit log"))
        },
    )
    .await?;
    let before = std::fs::read(&rotated)?;
    pull(&berthd, ALLOWED, &provided.reference())
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    assert_eventually(
        "a line in the new file",
        Duration::from_secs(10),
        || async {
            Ok(lines(&audit_path)
                .is_ok_and(|found| !about(&found, "provided/app", "pull").is_empty()))
        },
    )
    .await?;
    assert_eq!(
        std::fs::read(&rotated)?,
        before,
        "the rotated file got new lines"
    );
    let mode = std::fs::metadata(&audit_path)?.permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    // No credential or token in either file.
    let mut needles = env.user.leak_needles();
    needles.extend(env.token_server.issued_tokens());
    for path in [&audit_path, &rotated] {
        let bytes = std::fs::read(path)?;
        let found = needles_in(&bytes, &needles);
        assert!(found.is_empty(), "{}: {found:?}", path.display());
    }
    Ok(())
}

#[tokio::test]
async fn an_audit_log_that_cannot_be_written_never_fails_an_order() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    env.token_server
        .grant_anonymous(Grants::none().pull("public/app"));
    let public = push(&env, "public/app").await?;
    let mut config = env.host_config();
    // A directory that does not exist: every line fails.
    let audit_path = env.scratch_dir().join("missing").join("audit.log");
    config.top_level_toml = format!("audit_log = {:?}", audit_path.to_string_lossy());
    config.metrics_listen = format!("127.0.0.1:{}", free_local_port()?);
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    berthd
        .run_to_completion(&public.reference(), "", PullPolicy::IfNotPresent)
        .await?;
    assert_eventually(
        "the failed audit lines to be counted",
        Duration::from_secs(10),
        || async {
            let (_, metrics) = scrape(berthd.metrics_addr()).await?;
            Ok(metrics
                .value("berth_audit_write_errors_total", &[])
                .is_some_and(|count| count >= 2.0))
        },
    )
    .await?;
    assert!(!audit_path.exists());
    Ok(())
}
