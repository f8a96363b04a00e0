//! After a private image ran, the credential (and, with a token registry, every token issued) is
//! nowhere berthd or containerd keeps things: container info and spec (process env included),
//! images, content, snapshot labels, berthd's debug log, every file under berthd's state dir and
//! every file under containerd's root and state. [`leak_findings`] is the scanner; the ACR and
//! GAR scans in `registries` use it too.

use std::path::Path;

use serde_json::Value;

use crate::harness::env::{Env, RegistryKind};
use crate::harness::image::TestImage;

/// The needles found in `haystack`.
pub(crate) fn needles_in<'a>(haystack: &[u8], needles: &'a [String]) -> Vec<&'a str> {
    needles
        .iter()
        .filter(|needle| {
            !needle.is_empty()
                && haystack
                    .windows(needle.len())
                    .any(|window| window == needle.as_bytes())
        })
        .map(String::as_str)
        .collect()
}

/// Every regular file under `root` that holds a needle, with the needles it holds.
pub(crate) fn scan_tree(
    root: &Path,
    needles: &[String],
    findings: &mut Vec<String>,
) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        let path = entry.path();
        if file_type.is_dir() {
            scan_tree(&path, needles, findings)?;
        } else if file_type.is_file() {
            // Sockets and fifos are skipped; a file removed meanwhile is not a leak.
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let found = needles_in(&bytes, needles);
            if !found.is_empty() {
                findings.push(format!("{}: {found:?}", path.display()));
            }
        }
    }
    Ok(())
}

async fn leak_scan(kind: RegistryKind) -> anyhow::Result<()> {
    let env = Env::start(kind).await?;
    let pushed = env
        .push(
            "team/leak-scan",
            "v1",
            &TestImage::busybox(&["sh", "-c", "env; echo done"]),
        )
        .await?;
    let secret_id = env
        .create_secret("reg", env.registry.addr(), &env.user)
        .await?;
    let container = env
        .run_to_completion(&pushed.reference(), &secret_id)
        .await?;

    let mut needles = env.user.leak_needles();
    if let Some(token_server) = &env.token_server {
        let tokens = token_server.issued_tokens();
        assert!(
            token_server.requests_by(&env.user.username) >= 1,
            "berthd never asked the token server for a token as the secret's user"
        );
        needles.extend(tokens);
    }
    let findings = leak_findings(
        &env,
        &ScannedRun {
            container_id: &container.id,
            order_id: &container.order_id,
            log_path: &container.log_path,
            secret_id: &secret_id,
            output: "done",
        },
        &needles,
    )
    .await?;
    assert!(
        findings.is_empty(),
        "credential material leaked:\n{}",
        findings.join("\n")
    );
    Ok(())
}

/// The run a leak scan follows.
#[derive(Debug)]
pub(crate) struct ScannedRun<'a> {
    pub container_id: &'a str,
    pub order_id: &'a str,
    /// The container's output file.
    pub log_path: &'a str,
    pub secret_id: &'a str,
    /// What the container printed (proof that the scan looked at a run that happened).
    pub output: &'a str,
}

/// Where, after `run`, any of `needles` is: container info and spec (process env included),
/// images, content, snapshots (and each snapshot's info), berthd's log, every file under berthd's
/// state dir and under containerd's root and state. Also checks that the scan means something:
/// the container printed `run.output` and berthd's log mentions the order and the secret.
pub(crate) async fn leak_findings(
    env: &Env,
    run: &ScannedRun<'_>,
    needles: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut findings = Vec::new();

    let info = env
        .containerd
        .ctr_ok(&["containers", "info", run.container_id])
        .await?;
    for found in needles_in(info.as_bytes(), needles) {
        findings.push(format!("ctr containers info {}: {found}", run.container_id));
    }
    let info: Value = serde_json::from_str(&info)?;
    let process_env = &info["Spec"]["process"]["env"];
    assert!(process_env.is_array(), "no process env in the spec: {info}");
    for variable in process_env.as_array().into_iter().flatten() {
        let variable = variable.as_str().unwrap_or_default();
        for found in needles_in(variable.as_bytes(), needles) {
            findings.push(format!("container env {variable:?}: {found}"));
        }
    }

    let mut listings = vec![
        vec!["images".to_owned(), "ls".to_owned()],
        vec!["content".to_owned(), "ls".to_owned()],
        vec![
            "snapshots".to_owned(),
            "--snapshotter".to_owned(),
            "overlayfs".to_owned(),
            "ls".to_owned(),
        ],
    ];
    let snapshots = env
        .containerd
        .ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"])
        .await?;
    for key in snapshots
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
    {
        listings.push(
            ["snapshots", "--snapshotter", "overlayfs", "info", key]
                .map(str::to_owned)
                .to_vec(),
        );
    }
    for args in listings {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let listing = env.containerd.ctr_ok(&args).await?;
        for found in needles_in(listing.as_bytes(), needles) {
            findings.push(format!("ctr {}: {found}", args.join(" ")));
        }
    }

    let log = env.berthd.log_text();
    // The scan covered the order's log lines (berthd runs with BERTH_LOG=debug).
    assert!(
        log.contains(run.order_id) && log.contains(run.secret_id),
        "berthd's log never mentions the order or the secret; the scan would prove little:\n{log}"
    );
    for found in needles_in(log.as_bytes(), needles) {
        findings.push(format!(
            "berthd log {}: {found}",
            env.berthd.log_path().display()
        ));
    }
    scan_tree(env.berthd.state_dir(), needles, &mut findings)?;
    scan_tree(env.containerd.dir(), needles, &mut findings)?;

    // The scan saw what it should have: the container's output is in its log.
    let output = std::fs::read_to_string(run.log_path).unwrap_or_default();
    assert!(
        output.contains(run.output),
        "container log {}: {output:?}",
        run.log_path
    );
    Ok(findings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_leaks_with_an_htpasswd_registry() -> anyhow::Result<()> {
    leak_scan(RegistryKind::Htpasswd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_or_token_leaks_with_a_token_registry() -> anyhow::Result<()> {
    leak_scan(RegistryKind::Token).await
}

#[test]
fn the_scanner_finds_a_planted_needle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("nested")).unwrap();
    std::fs::write(
        dir.path().join("nested/blob"),
        b"\0\x01pw-planted-secret\xff",
    )
    .unwrap();
    std::fs::write(dir.path().join("clean"), b"nothing here").unwrap();
    let needles = vec!["pw-planted-secret".to_owned(), "absent".to_owned()];
    let mut findings = Vec::new();
    scan_tree(dir.path(), &needles, &mut findings).unwrap();
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert!(findings[0].contains("nested/blob") && findings[0].contains("pw-planted-secret"));
}
