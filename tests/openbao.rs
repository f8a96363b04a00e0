//! The `openbao` secret backend against a real `bao server -dev`: berthd logs in with AppRole,
//! reads pull secrets that the test writes with the `bao` CLI (as a control plane would), picks
//! up a rotated password on the next pull, reports deleted secrets as NOT_FOUND and an
//! unreachable or sealed OpenBao as UNAVAILABLE, recovers without a restart, and keeps a
//! short-lived token alive by renewing it (and logging in again at its max TTL).

use berth::api::pb::create_secret_request::Credential;
use berth::api::pb::{
    CreateSecretRequest, DeleteSecretRequest, DockerCredential, ListSecretsRequest,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::env::is_secret_id;
use crate::harness::image::TestImage;
use crate::harness::openbao::{Access, BaoEnv, BaoEnvOptions};
use crate::harness::random_lowercase;
use crate::harness::token_server::Grants;
use crate::harness::wait::assert_eventually;

fn new_secret_id() -> String {
    format!("secret-{}", random_lowercase(16))
}

/// Every credential of the test that must never show up in berthd's log or state dir.
fn needles(env: &BaoEnv, extra: &[&str]) -> Vec<String> {
    let mut needles = vec![
        env.user.password.clone(),
        env.approle.secret_id.clone(),
        env.bao.root_token().to_owned(),
    ];
    needles.extend(extra.iter().map(|needle| (*needle).to_owned()));
    needles
}

/// berthd's log and every file in its state dir are free of `needles`.
fn assert_no_leaks(env: &BaoEnv, needles: &[String]) -> anyhow::Result<()> {
    let log = env.berthd.log_text();
    for needle in needles {
        assert!(
            !log.contains(needle.as_str()),
            "a credential is in berthd's log"
        );
    }
    let mut stack = vec![env.berthd.state_dir().to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                for needle in needles {
                    assert!(
                        !bytes
                            .windows(needle.len())
                            .any(|window| window == needle.as_bytes()),
                        "a credential is in {}",
                        path.display()
                    );
                }
            }
        }
    }
    assert!(
        !env.berthd.state_dir().join("secrets").exists(),
        "the openbao backend wrote a secrets dir"
    );
    Ok(())
}

/// A host whose policy may only read `berth/default/*`: the control plane writes with `bao`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_secret_written_with_bao_is_used_rotated_and_deleted() -> anyhow::Result<()> {
    let env = BaoEnv::start(BaoEnvOptions::default()).await?;
    let first = env
        .push("team/app", "v1", &TestImage::busybox(&["echo", "first"]))
        .await?;
    let id = new_secret_id();
    env.bao
        .put_docker_secret("default", &id, "reg", env.registry.addr(), &env.user)
        .await?;
    env.run_to_completion(&first.reference(), &id).await?;

    // ListSecrets works with list + read on the project.
    let listed = env
        .berthd
        .secrets()
        .await?
        .list_secrets(ListSecretsRequest {
            project: String::new(),
        })
        .await?
        .into_inner()
        .secrets;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].name, "reg");
    assert_eq!(listed[0].kind, "docker");
    assert_eq!(listed[0].server, env.registry.addr());

    // Rotate the password in the registry and in OpenBao; a repository never pulled before
    // needs a fresh registry token, which berth can only get with the new password.
    let rotated = env.user.with_wrong_password();
    env.token_server
        .add_user(&rotated, Grants::none().pull("*"));
    env.bao
        .put_docker_secret("default", &id, "reg", env.registry.addr(), &rotated)
        .await?;
    let second = env
        .push(
            "team/rotated",
            "v1",
            &TestImage::busybox(&["echo", "second"]),
        )
        .await?;
    env.run_to_completion(&second.reference(), &id).await?;

    // The policy allows no writes, and nothing of project team-b.
    let status = env
        .berthd
        .secrets()
        .await?
        .create_secret(CreateSecretRequest {
            project: String::new(),
            name: "new".to_owned(),
            credential: Some(Credential::Docker(DockerCredential {
                server: env.registry.addr().to_owned(),
                username: rotated.username.clone(),
                password: rotated.password.clone(),
            })),
        })
        .await
        .expect_err("the policy forbids writes");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("policy"), "{status:?}");
    env.expect_code(
        BaoEnv::order("team-b", &second.reference(), &id),
        Code::PermissionDenied,
    )
    .await?;

    // Deleted in OpenBao: NOT_FOUND on the next order.
    env.bao.delete_secret("default", &id).await?;
    let status = env
        .expect_code(BaoEnv::order("", &second.reference(), &id), Code::NotFound)
        .await?;
    assert!(status.message().contains(&id), "{status:?}");

    assert_no_leaks(&env, &needles(&env, &[&rotated.password]))
}

/// A policy that allows writes: berth's own Secrets API creates, lists and deletes in OpenBao,
/// in the documented layout. Plain HTTP here (TLS is covered above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_create_list_delete_through_the_secrets_api() -> anyhow::Result<()> {
    let env = BaoEnv::start(BaoEnvOptions {
        tls: false,
        access: Access::ReadWrite,
        ..BaoEnvOptions::default()
    })
    .await?;
    let pushed = env
        .push("team/app", "v1", &TestImage::busybox(&["echo", "hi"]))
        .await?;
    let id = env
        .berthd
        .cli_ok(
            &[
                "secret",
                "docker",
                "create",
                "--name",
                "reg",
                "--server",
                &format!("https://{}/v2/", env.registry.addr()),
                "--username",
                &env.user.username,
                "--password-stdin",
            ],
            Some(&format!("{}\n", env.user.password)),
        )
        .await?;
    let id = id.trim().to_owned();
    assert!(is_secret_id(&id), "{id:?}");

    // The documented layout, read back with the bao CLI.
    let document = env
        .bao
        .kv_get("default", &id)
        .await?
        .expect("the secret is in openbao");
    assert_eq!(document["kind"], "docker");
    assert_eq!(document["server"], env.registry.addr());
    assert_eq!(document["name"], "reg");
    assert_eq!(document["username"], env.user.username.as_str());
    assert_eq!(document["password"], env.user.password.as_str());
    let created_at: u64 = document["created_at"]
        .as_str()
        .expect("created_at is a string")
        .parse()?;
    assert!(created_at > 1_700_000_000, "{created_at}");

    // Names are unique per project.
    let mut secrets = env.berthd.secrets().await?;
    let status = secrets
        .create_secret(CreateSecretRequest {
            project: String::new(),
            name: "reg".to_owned(),
            credential: Some(Credential::Docker(DockerCredential {
                server: env.registry.addr().to_owned(),
                username: "other".to_owned(),
                password: "other-password".to_owned(),
            })),
        })
        .await
        .expect_err("the name is taken");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let listed = env.berthd.cli_ok(&["secret", "list"], None).await?;
    assert!(listed.contains(&id) && listed.contains("reg"), "{listed}");

    env.run_to_completion(&pushed.reference(), &id).await?;

    secrets
        .delete_secret(DeleteSecretRequest {
            project: String::new(),
            id: id.clone(),
        })
        .await?;
    assert_eq!(env.bao.kv_get("default", &id).await?, None);
    let metadata = env
        .bao
        .bao_output(
            &[
                "kv",
                "metadata",
                "get",
                "-mount=secret",
                &format!("berth/default/{id}"),
            ],
            None,
        )
        .await?;
    assert!(!metadata.status.success(), "metadata left behind");
    let status = secrets
        .delete_secret(DeleteSecretRequest {
            project: String::new(),
            id: id.clone(),
        })
        .await
        .expect_err("already deleted");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    env.expect_code(BaoEnv::order("", &pushed.reference(), &id), Code::NotFound)
        .await?;

    assert_no_leaks(&env, &needles(&env, &[]))
}

/// berthd is healthy, and an order without a secret does not touch OpenBao: it gets the
/// registry's refusal of an anonymous start of a private image, not UNAVAILABLE.
async fn still_serving(env: &BaoEnv, image: &str) -> anyhow::Result<()> {
    assert_eq!(env.berthd.health().await?, ServingStatus::Serving);
    env.expect_code(BaoEnv::order("", image, ""), Code::PermissionDenied)
        .await?;
    Ok(())
}

/// Sealed, then stopped: orders that need a secret get UNAVAILABLE (naming OpenBao), berthd
/// stays healthy and serves orders that need none, and works again once OpenBao is back,
/// without a restart. Dev mode restarts empty: the test writes role, policy and secret again
/// (same role id and secret id), and berthd logs in again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_sealed_or_down_is_unavailable_then_recovers() -> anyhow::Result<()> {
    let mut env = BaoEnv::start(BaoEnvOptions {
        tls: false,
        ..BaoEnvOptions::default()
    })
    .await?;
    let pushed = env
        .push("team/app", "v1", &TestImage::busybox(&["echo", "hi"]))
        .await?;
    let id = new_secret_id();
    env.bao
        .put_docker_secret("default", &id, "reg", env.registry.addr(), &env.user)
        .await?;
    env.run_to_completion(&pushed.reference(), &id).await?;

    env.bao.seal().await?;
    let status = env
        .expect_code(
            BaoEnv::order("", &pushed.reference(), &id),
            Code::Unavailable,
        )
        .await?;
    assert!(status.message().contains("sealed"), "{status:?}");
    assert!(status.message().contains(&env.bao.address()), "{status:?}");
    still_serving(&env, &pushed.reference()).await?;
    env.bao.unseal().await?;
    env.run_to_completion(&pushed.reference(), &id).await?;

    env.bao.stop();
    let status = env
        .expect_code(
            BaoEnv::order("", &pushed.reference(), &id),
            Code::Unavailable,
        )
        .await?;
    assert!(status.message().contains("unreachable"), "{status:?}");
    still_serving(&env, &pushed.reference()).await?;

    env.bao.restart().await?;
    env.bao.create_approle(&env.approle).await?;
    env.bao
        .put_docker_secret("default", &id, "reg", env.registry.addr(), &env.user)
        .await?;
    env.run_to_completion(&pushed.reference(), &id).await?;
    let logins = env
        .berthd
        .log_text()
        .matches("logged in to openbao")
        .count();
    assert!(logins >= 2, "berthd logged in {logins} times");
    assert_no_leaks(&env, &needles(&env, &[]))
}

/// token_ttl 6 s, token_max_ttl 12 s: berthd renews at 2/3 of the TTL and logs in again when a
/// renewal comes back cut short by the max TTL. An order after more than twice the TTL works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_short_lived_token_is_renewed() -> anyhow::Result<()> {
    let env = BaoEnv::start(BaoEnvOptions {
        token_ttl: "6s",
        token_max_ttl: "12s",
        ..BaoEnvOptions::default()
    })
    .await?;
    let pushed = env
        .push("team/app", "v1", &TestImage::busybox(&["echo", "hi"]))
        .await?;
    let id = new_secret_id();
    env.bao
        .put_docker_secret("default", &id, "reg", env.registry.addr(), &env.user)
        .await?;
    env.run_to_completion(&pushed.reference(), &id).await?;

    // Renewals at ~4, 8 and 10.7 s, a new login at ~10.7 s (the max TTL is near), and the new
    // token's first renewal at ~14.7 s: by then the first token is long gone.
    assert_eventually(
        "berthd to renew its token and log in again at the max TTL",
        std::time::Duration::from_secs(45),
        || async {
            let log = env.berthd.log_text();
            let renewals = log.matches("openbao token renewed").count();
            let logins = log.matches("logged in to openbao").count();
            Ok(renewals >= 4 && logins >= 2)
        },
    )
    .await
    .map_err(|failure| failure.context(format!("berthd log:\n{}", env.berthd.log_tail())))?;
    let log = env.berthd.log_text();
    assert!(
        !log.contains("openbao login failed"),
        "{}",
        env.berthd.log_tail()
    );
    assert!(!log.contains("renewal failed"), "{}", env.berthd.log_tail());

    // Another repository: a real pull with the secret read from OpenBao with the current token.
    let second = env
        .push("team/later", "v1", &TestImage::busybox(&["echo", "later"]))
        .await?;
    env.run_to_completion(&second.reference(), &id).await?;
    assert_no_leaks(&env, &needles(&env, &[]))
}
