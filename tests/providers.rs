//! `[[credential_provider]]` end to end: kubelet-style exec plugins (shell scripts written here)
//! give berthd the credential for the token registry. An order with no pull secret in a listed
//! project runs; in another project it is refused without the plugin running; the answer's
//! cacheDuration is honoured (many orders, one run; a second run once it expired); a plugin
//! that hangs is UNAVAILABLE and leaves no process behind; one that prints garbage is
//! UNAVAILABLE; a credential the registry refuses is PERMISSION_DENIED naming the provider; and
//! the plugin's output (a recognisable password) is never in berthd's log.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use berth::api::pb::{ContainerSpec, PullImageRequest, StartContainerRequest};
use tonic::Code;

use crate::harness::credentials::RegistryUser;
use crate::harness::exposition::scrape;
use crate::harness::host::{HostBerthd, HostEnvironment, OpsEnv};
use crate::harness::image::{PushedImage, TestImage};
use crate::harness::wait::{assert_eventually, ORDER_TIMEOUT};
use crate::harness::{free_local_port, random_lowercase};

/// The project the providers serve.
pub(crate) const ALLOWED: &str = "team-a";

/// A plugin's behaviour.
pub(crate) enum Plugin<'a> {
    /// Answers with `user`'s credential for `host`, cacheKeyType Registry, `cache_duration`.
    Answer {
        host: &'a str,
        user: &'a RegistryUser,
        cache_duration: &'a str,
    },
    /// Like `Answer` (cacheDuration 300s), after a one-second pause: orders arrive meanwhile.
    Delayed {
        host: &'a str,
        user: &'a RegistryUser,
    },
    /// Starts a background child, then hangs.
    Hang,
    /// Prints something that is not a CredentialProviderResponse (with `needle` in it).
    Garbage { needle: &'a str },
}

/// A plugin script under `dir`; each run appends a line to `<name>.runs`, its request goes to
/// `<name>.request`, its environment to `<name>.env`, pids to `<name>.pids`.
pub(crate) struct Script {
    pub path: PathBuf,
    pub runs: PathBuf,
    pub request: PathBuf,
    pub env: PathBuf,
    pub pids: PathBuf,
}

impl Script {
    pub(crate) fn write(dir: &Path, name: &str, plugin: &Plugin<'_>) -> anyhow::Result<Self> {
        let path = dir.join(format!("{name}-provider.sh"));
        let runs = dir.join(format!("{name}.runs"));
        let request = dir.join(format!("{name}.request"));
        let env = dir.join(format!("{name}.env"));
        let pids = dir.join(format!("{name}.pids"));
        let answer = |host: &str, user: &RegistryUser, cache_duration: &str| {
            format!(
                "cat <<'JSON'\n{}\nJSON\n",
                serde_json::json!({
                    "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                    "kind": "CredentialProviderResponse",
                    "cacheKeyType": "Registry",
                    "cacheDuration": cache_duration,
                    "auth": { host: { "username": user.username, "password": user.password } },
                })
            )
        };
        let body = match plugin {
            Plugin::Answer {
                host,
                user,
                cache_duration,
            } => answer(host, user, cache_duration),
            Plugin::Delayed { host, user } => format!("sleep 1\n{}", answer(host, user, "300s")),
            Plugin::Hang => format!(
                "sleep 1000 &\necho $! >> '{pids}'\necho $$ >> '{pids}'\nsleep 1000\n",
                pids = pids.display()
            ),
            Plugin::Garbage { needle } => format!("echo 'this is not json {needle}'\n"),
        };
        let script = format!(
            "#!/bin/sh\necho run >> '{runs}'\ncat > '{request}'\nenv > '{env}'\n{body}",
            runs = runs.display(),
            request = request.display(),
            env = env.display(),
        );
        std::fs::write(&path, script)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            path,
            runs,
            request,
            env,
            pids,
        })
    }

    /// How many times the plugin ran.
    pub(crate) fn run_count(&self) -> usize {
        std::fs::read_to_string(&self.runs)
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    /// The `[[credential_provider]]` table for this script.
    pub(crate) fn table(&self, name: &str, match_image: &str, timeout_seconds: u64) -> String {
        format!(
            "[[credential_provider]]\nname = \"{name}\"\ncommand = \"{}\"\nenv = {{ BERTH_PROVIDER_TEST = \"yes\" }}\n\
             match_images = [\"{match_image}\"]\nprojects = [\"{ALLOWED}\"]\ntimeout_seconds = {timeout_seconds}\n\n",
            self.path.display()
        )
    }
}

/// `Agent/PullImage` in `project` without a pull secret, drained; the final status.
pub(crate) async fn pull(
    berthd: &HostBerthd,
    project: &str,
    image: &str,
) -> anyhow::Result<Result<(), tonic::Status>> {
    let mut agent = berthd.agent().await?;
    let mut stream = match agent
        .pull_image(PullImageRequest {
            project: project.to_owned(),
            image: image.to_owned(),
            pull_secret: String::new(),
        })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Ok(())),
            Err(status) => return Ok(Err(status)),
        }
    }
}

/// A start order in `project` without a pull secret; waits for it to exit 0 when it started.
pub(crate) async fn start_in(
    berthd: &HostBerthd,
    project: &str,
    image: &str,
) -> anyhow::Result<Result<(), tonic::Status>> {
    let suffix = random_lowercase(8);
    let request = StartContainerRequest {
        order_id: format!("order-{suffix}"),
        project: project.to_owned(),
        name: format!("run-{suffix}"),
        container: Some(ContainerSpec {
            image: image.to_owned(),
            ..ContainerSpec::default()
        }),
    };
    match berthd.start_container(request).await? {
        Ok(container) => {
            let exited = berthd.wait_until_exited(&container.id).await?;
            anyhow::ensure!(exited.exit_code == 0, "{image} exited {}", exited.exit_code);
            Ok(Ok(()))
        }
        Err(status) => Ok(Err(status)),
    }
}

pub(crate) async fn push(env: &OpsEnv, repository: &str) -> anyhow::Result<PushedImage> {
    env.push_image(
        repository,
        "v1",
        &TestImage::busybox(&["sh", "-c", "echo provided"]),
    )
    .await
}

#[tokio::test]
async fn a_provider_serves_listed_projects_only_and_its_answer_is_cached() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    let host = env.registry.addr().to_owned();
    let cached = push(&env, "cached/app").await?;
    let short = push(&env, "short/app").await?;
    let flight = push(&env, "flight/app").await?;
    let cached_script = Script::write(
        env.scratch_dir(),
        "cached",
        &Plugin::Answer {
            host: &host,
            user: &env.user,
            cache_duration: "300s",
        },
    )?;
    let short_script = Script::write(
        env.scratch_dir(),
        "short",
        &Plugin::Answer {
            host: &host,
            user: &env.user,
            cache_duration: "1s",
        },
    )?;
    let flight_script = Script::write(
        env.scratch_dir(),
        "flight",
        &Plugin::Delayed {
            host: &host,
            user: &env.user,
        },
    )?;
    let mut config = env.host_config();
    config.tables_toml = cached_script.table("cached", &format!("{host}/cached"), 10)
        + &short_script.table("short", &format!("{host}/short"), 10)
        + &flight_script.table("flight", &format!("{host}/flight"), 10);
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;

    // Another project: refused, and the plugin never ran.
    let refused = start_in(&berthd, "team-b", &cached.reference()).await?;
    let status = refused.expect_err("team-b is not in the provider's projects");
    assert!(
        matches!(status.code(), Code::PermissionDenied | Code::NotFound),
        "{status:?}"
    );
    assert_eq!(cached_script.run_count(), 0, "the plugin ran for team-b");

    // The listed project runs the image with the plugin's credential.
    start_in(&berthd, ALLOWED, &cached.reference())
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}\n{}", berthd.log_tail()))?;
    let request: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cached_script.request)?)?;
    assert_eq!(
        request["apiVersion"],
        "credentialprovider.kubelet.k8s.io/v1"
    );
    assert_eq!(request["kind"], "CredentialProviderRequest");
    assert_eq!(request["image"], cached.reference());
    let plugin_env = std::fs::read_to_string(&cached_script.env)?;
    assert!(
        plugin_env.contains("BERTH_PROVIDER_TEST=yes"),
        "{plugin_env}"
    );
    assert!(plugin_env.contains("PATH="), "{plugin_env}");
    assert!(
        !plugin_env.contains("BERTH_LOG"),
        "berthd's env leaked: {plugin_env}"
    );

    // Five more orders (start and pull, cached image or not): still one plugin run.
    for _ in 0..3 {
        pull(&berthd, ALLOWED, &cached.reference())
            .await?
            .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    }
    for _ in 0..2 {
        start_in(&berthd, ALLOWED, &cached.reference())
            .await?
            .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    }
    assert_eq!(cached_script.run_count(), 1, "cacheDuration 300s: one run");
    // The cached private image is still refused to the other project.
    let status = start_in(&berthd, "team-b", &cached.reference())
        .await?
        .expect_err("team-b may not use the cached private image");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(cached_script.run_count(), 1);

    // cacheDuration 1s: a second run once the first answer expired.
    pull(&berthd, ALLOWED, &short.reference())
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    assert_eq!(short_script.run_count(), 1);
    assert_eventually(
        "a second plugin run after cacheDuration",
        Duration::from_secs(20),
        || async {
            pull(&berthd, ALLOWED, &short.reference())
                .await?
                .map_err(|status| anyhow::anyhow!("{status:?}"))?;
            Ok(short_script.run_count() >= 2)
        },
    )
    .await?;

    // Single flight: four orders at once while the plugin runs, one run.
    let reference = flight.reference();
    let pulls = (0..4).map(|_| pull(&berthd, ALLOWED, &reference));
    for result in futures::future::join_all(pulls).await {
        result?.map_err(|status| anyhow::anyhow!("{status:?}"))?;
    }
    assert_eq!(
        flight_script.run_count(),
        1,
        "concurrent orders ran the plugin again"
    );

    let log = berthd.log_text();
    assert!(
        !log.contains(&env.user.password),
        "the plugin's password is in berthd's log"
    );
    Ok(())
}

/// Whether any live process is `pid`.
fn alive(pid: &str) -> bool {
    // A zombie waiting for its reaper is gone for this purpose.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test]
async fn failing_providers_are_unavailable_and_refused_ones_permission_denied() -> anyhow::Result<()>
{
    let env = OpsEnv::start().await?;
    let host = env.registry.addr().to_owned();
    let hang = push(&env, "hang/app").await?;
    let garbage = push(&env, "garbage/app").await?;
    let refused = push(&env, "refused/app").await?;
    let needle = format!("zz{}zz", random_lowercase(20));
    let wrong = env.user.with_wrong_password();
    let hang_script = Script::write(env.scratch_dir(), "hang", &Plugin::Hang)?;
    let garbage_script = Script::write(
        env.scratch_dir(),
        "garbage",
        &Plugin::Garbage { needle: &needle },
    )?;
    let refused_script = Script::write(
        env.scratch_dir(),
        "refused",
        &Plugin::Answer {
            host: &host,
            user: &wrong,
            cache_duration: "300s",
        },
    )?;
    let mut config = env.host_config();
    config.tables_toml = hang_script.table("hang", &format!("{host}/hang"), 1)
        + &garbage_script.table("garbage", &format!("{host}/garbage"), 10)
        + &refused_script.table("refused", &format!("{host}/refused"), 10);
    config.metrics_listen = format!("127.0.0.1:{}", free_local_port()?);
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;

    // A plugin that hangs: UNAVAILABLE naming it, and its process group is gone.
    let status = start_in(&berthd, ALLOWED, &hang.reference())
        .await?
        .expect_err("a hanging plugin gives no credential");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("provider:hang"), "{status:?}");
    let pids = std::fs::read_to_string(&hang_script.pids).context("the hanging plugin's pids")?;
    let pids: Vec<&str> = pids.lines().collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eventually(
        "the plugin and its child to be gone",
        ORDER_TIMEOUT,
        || async { Ok(pids.iter().all(|pid| !alive(pid))) },
    )
    .await?;

    // Garbage on stdout: UNAVAILABLE naming the provider, the output nowhere.
    let status = pull(&berthd, ALLOWED, &garbage.reference())
        .await?
        .expect_err("garbage is no credential");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("provider:garbage"), "{status:?}");
    assert!(!status.message().contains(&needle), "{status:?}");
    assert_eq!(garbage_script.run_count(), 1);

    // A credential the registry refuses: PERMISSION_DENIED naming the provider.
    let status = start_in(&berthd, ALLOWED, &refused.reference())
        .await?
        .expect_err("the registry refuses this password");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("provider:refused"), "{status:?}");
    assert!(!status.message().contains(&wrong.password), "{status:?}");

    // berth_credential_provider_requests_total{provider,result}
    let (_, metrics) = scrape(berthd.metrics_addr()).await?;
    for (provider, result) in [
        ("hang", "timeout"),
        ("garbage", "invalid"),
        ("refused", "ok"),
    ] {
        let count = metrics.value(
            "berth_credential_provider_requests_total",
            &[("provider", provider), ("result", result)],
        );
        assert_eq!(
            count,
            Some(1.0),
            "{provider}: {:?}",
            metrics.lines_starting("berth_credential_provider")
        );
    }

    let log = berthd.log_text();
    for secret in [needle.as_str(), wrong.password.as_str()] {
        assert!(!log.contains(secret), "plugin output in berthd's log");
    }
    Ok(())
}
