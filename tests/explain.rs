//! ExplainPull end to end (gRPC and `berth explain`): a public image, a private image with a
//! secret, a cached image, an image behind a mirror, an image under a `[[policy]]`, and a
//! refused credential. The plan names the endpoint, credential, realm and scope, presence and
//! bytes to fetch, access, policy and signature; nothing but manifests is fetched (no blob GET
//! at the registry or the mirror); nothing is recorded; the token use is an audit line.

use std::time::Duration;

use berth::api::pb::{PullImageRequest, PullPlan, PullPolicy};
use tonic::Code;

use crate::harness::credentials::RegistryUser;
use crate::harness::host::{HostBerthd, HostEnvironment, MirrorEntry, OpsEnv};
use crate::harness::mirror::{ProxyMirror, RecordingFront};
use crate::harness::token_server::Grants;
use crate::harness::wait::wait_for;
use crate::providers::push;

async fn explain(
    berthd: &HostBerthd,
    image: &str,
    pull_secret: &str,
) -> anyhow::Result<Result<PullPlan, tonic::Status>> {
    Ok(berthd
        .agent()
        .await?
        .explain_pull(PullImageRequest {
            project: String::new(),
            image: image.to_owned(),
            pull_secret: pull_secret.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner))
}

/// The registry's completed GETs of `repository`'s blobs.
fn blob_gets(log: &str, repository: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("msg=\"response completed\""))
        .filter(|line| line.contains("http.request.method=GET"))
        .filter(|line| line.contains(&format!("/v2/{repository}/blobs/")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_pull_walks_the_real_path_without_fetching_a_blob() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    env.token_server
        .grant_anonymous(Grants::none().pull("public/app"));
    let mirror_user = RegistryUser::generate("berth-mirror");
    env.token_server
        .add_user(&mirror_user, Grants::none().pull("*"));
    let registry = env.registry.addr().to_owned();
    let public = push(&env, "public/app").await?;
    let private = push(&env, "private/app").await?;
    let signed = push(&env, "policy/app").await?;
    let mirrored = push(&env, "mirrored/app").await?;
    let audit_path = env.scratch_dir().join("audit.log");
    let mut config = env.host_config();
    config.top_level_toml = format!("audit_log = {:?}", audit_path.to_string_lossy());
    config.tables_toml =
        format!("[[policy]]\nimages = [\"{registry}/policy/**\"]\nverify = \"none\"\n");
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let secret = berthd
        .create_docker_secret("reg", &registry, &env.user)
        .await?;
    let refused = berthd
        .create_docker_secret("wrong", &registry, &env.user.with_wrong_password())
        .await?;
    let realm = env.token_server.realm();

    // A public image, anonymously: the upstream answered, nothing is present.
    let plan = explain(&berthd, &public.reference(), "")
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}\n{}", berthd.log_tail()))?;
    assert_eq!(plan.image, public.reference());
    assert_eq!(plan.digest, public.manifest_digest);
    assert_eq!(plan.endpoint, format!("https://{registry}"));
    assert_eq!(plan.credential, "anonymous");
    assert_eq!(plan.realm, realm);
    assert_eq!(plan.scope, "repository:public/app:pull");
    assert!(!plan.present);
    assert!(plan.bytes_to_fetch > 0, "{plan:?}");
    assert_eq!(plan.access, "ok");
    assert_eq!(plan.policy, "");
    assert_eq!(plan.signature, "not required");

    // A private image with its secret, through the CLI as JSON.
    let printed = berthd
        .cli_ok(
            &[
                "explain",
                &private.reference(),
                "--pull-secret",
                &secret,
                "--output",
                "json",
            ],
            None,
        )
        .await?;
    let printed: serde_json::Value = serde_json::from_str(&printed)?;
    assert_eq!(printed["credential"], secret.as_str());
    assert_eq!(printed["digest"], private.manifest_digest.as_str());
    assert_eq!(printed["present"], false);
    assert_eq!(printed["scope"], "repository:private/app:pull");
    let first_bytes = printed["bytes_to_fetch"].as_u64().unwrap_or_default();
    assert!(first_bytes > 0, "{printed}");

    // Nothing was fetched or recorded: no blob GET, no image record.
    let log = env.registry.log_text();
    for repository in ["public/app", "private/app"] {
        assert_eq!(blob_gets(&log, repository), Vec::<String>::new());
    }
    let images = env.containerd.ctr_ok(&["images", "ls", "-q"]).await?;
    assert!(!images.contains("private/app"), "{images}");

    // Once cached: present, nothing to fetch, access ok.
    berthd
        .run_to_completion(&private.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;
    let plan = explain(&berthd, &private.reference(), &secret)
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    assert!(plan.present, "{plan:?}");
    assert_eq!(plan.bytes_to_fetch, 0, "{plan:?}");
    assert_eq!(plan.access, "ok");

    // A policy's pattern; verify = "none" requires no signature.
    let plan = explain(&berthd, &signed.reference(), &secret)
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}"))?;
    assert_eq!(plan.policy, format!("{registry}/policy/**"));
    assert_eq!(plan.signature, "not required");

    // A refused credential: the code a pull gives, naming the secret.
    let status = explain(&berthd, &private.reference(), &refused)
        .await?
        .expect_err("the registry refuses this password");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&refused), "{status:?}");

    // The token uses are audit lines of action token with no order id; no pull line. The
    // audit log is written by its own task: wait until the refused explain's line is in.
    let refused_line = |line: &serde_json::Value| {
        line["repository"] == "private/app"
            && line["action"] == "token"
            && line["credential"] == refused.as_str()
            && line["result"] == "PERMISSION_DENIED"
    };
    let lines: Vec<serde_json::Value> = wait_for(
        "the refused explain's audit line",
        Duration::from_secs(10),
        || {
            let audit_path = &audit_path;
            async move {
                let audit = std::fs::read_to_string(audit_path)?;
                // A line being written may be cut short at the end: it is read again.
                let lines: Vec<serde_json::Value> = audit
                    .lines()
                    .filter_map(|line| serde_json::from_str(line).ok())
                    .collect();
                Ok(lines.iter().any(refused_line).then_some(lines))
            }
        },
    )
    .await?;
    assert!(lines.iter().any(|line| line["repository"] == "public/app"
        && line["action"] == "token"
        && line["order_id"] == ""
        && line["credential"] == "anonymous"));
    assert!(!lines
        .iter()
        .any(|line| line["repository"] == "public/app" && line["action"] == "pull"));

    // Behind a mirror (a second berthd on the same containerd): the mirror answered.
    let proxy = ProxyMirror::start(&env.ca, &registry, &mirror_user).await?;
    let front = RecordingFront::start(proxy.addr()).await?;
    let mut config = env.host_config();
    config.mirrors = vec![MirrorEntry {
        upstream: registry.clone(),
        endpoint: format!("http://{}", front.addr()),
        credentials: false,
    }];
    let mirrored_berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let plan = explain(&mirrored_berthd, &mirrored.reference(), "")
        .await?
        .map_err(|status| anyhow::anyhow!("{status:?}\n{}", mirrored_berthd.log_tail()))?;
    assert_eq!(plan.endpoint, format!("http://{}", front.addr()));
    assert_eq!(plan.digest, mirrored.manifest_digest);
    assert_eq!(plan.credential, "anonymous");
    assert!(!plan.present);
    assert!(
        !front.requests_for("mirrored/app", "manifests").is_empty(),
        "the mirror was not asked"
    );
    let blob_requests = front.requests_for("mirrored/app", "blobs");
    assert!(
        blob_requests.iter().all(|request| request.method != "GET"),
        "{blob_requests:?}"
    );
    Ok(())
}
