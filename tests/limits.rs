//! Issue 5, limits: what a registry, a token endpoint or a caller sends beyond berth's bounds is
//! refused with the contract's code, without a panic and without an image record, and berthd
//! stays healthy and runs a good order after each.
//!
//! - a manifest past 4 MiB: FAILED_PRECONDITION; a token response past 1 MiB: FAILED_PRECONDITION;
//! - a blob longer than its descriptor: DATA_LOSS; a `WWW-Authenticate` that does not parse:
//!   FAILED_PRECONDITION;
//! - image references over 255 bytes or with bad characters: INVALID_ARGUMENT (StartContainer and
//!   PullImage);
//! - a service YAML over 1 MiB: the CLI refuses it, naming the file and the limit.

use berth::api::pb::{ListContainersRequest, PullImageRequest};
use tonic::Code;

use crate::harness::env::{Env, RegistryKind};
use crate::harness::hostile::{HostileFront, Hostility, HUGE_MANIFEST_BYTES};
use crate::harness::image::TestImage;
use crate::harness::recorder::{Answer, Recorder};
use crate::security::{
    assert_no_image, assert_no_leaks, assert_still_serving, expect_code, order, LOOPBACK,
};

/// What the CLI reads at most from a file or stdin.
const CLI_INPUT_LIMIT: usize = 1024 * 1024;

/// Pushes `repository:v1`, makes a secret for `front`, and expects an order through the front to
/// fail with `code`; then no image record, no leak, still serving.
async fn refused_through(
    env: &Env,
    front: &HostileFront,
    repository: &str,
    code: Code,
) -> anyhow::Result<tonic::Status> {
    let pushed = env
        .push(repository, "v1", &TestImage::busybox(&["echo", "no"]))
        .await?;
    let name = repository.replace('/', "-");
    let secret_id = env.create_secret(&name, front.addr(), &env.user).await?;
    let status = expect_code(
        env,
        order("", &name, &pushed.reference_via(front.addr()), &secret_id),
        code,
    )
    .await?;
    assert!(front.acts() >= 1, "the front never misbehaved");
    assert_no_image(env, repository).await?;
    assert_no_leaks(env, &status, &[]).await?;
    assert_still_serving(env).await?;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_over_4_mib_is_refused() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let front = HostileFront::start(&env.ca, env.registry.addr(), Hostility::HugeManifest).await?;
    const { assert!(HUGE_MANIFEST_BYTES > 4 << 20) };
    let status = refused_through(&env, &front, "team/huge", Code::FailedPrecondition).await?;
    assert!(
        status.message().contains("4 MiB"),
        "the message should name the limit: {status:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_response_over_1_mib_is_refused() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let huge_token = format!(r#"{{"token":"{}","expires_in":300}}"#, "t".repeat(2 << 20));
    let realm = Recorder::start(
        LOOPBACK,
        Some(env.ca.rustls_server_config()?),
        Answer::json(huge_token),
    )
    .await?;
    let front = HostileFront::start(
        &env.ca,
        env.registry.addr(),
        Hostility::Challenge(format!(
            r#"Bearer realm="{}/token",service="berth-hostile""#,
            realm.url()
        )),
    )
    .await?;
    let status = refused_through(&env, &front, "team/huge-token", Code::FailedPrecondition).await?;
    assert_eq!(
        realm.requests().len(),
        1,
        "berthd should have asked the realm once"
    );
    assert!(
        status.message().contains("1 MiB"),
        "the message should name the limit: {status:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_longer_than_its_descriptor_is_data_loss() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let front = HostileFront::start(&env.ca, env.registry.addr(), Hostility::AppendToBlobs).await?;
    refused_through(&env, &front, "team/too-long", Code::DataLoss).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_that_does_not_parse_is_refused() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    for (index, challenge) in [
        r#"Bearer realm="unterminated"#,
        "Bearer",
        r#"Bearer service="no-realm""#,
        "Negotiate abc",
        "B@d realm=x",
    ]
    .into_iter()
    .enumerate()
    {
        let front = HostileFront::start(
            &env.ca,
            env.registry.addr(),
            Hostility::Challenge(challenge.to_owned()),
        )
        .await?;
        let status = refused_through(
            &env,
            &front,
            &format!("team/challenge{index}"),
            Code::FailedPrecondition,
        )
        .await?;
        assert!(
            status.message().contains("WWW-Authenticate"),
            "{challenge:?}: the message should say what failed: {status:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_or_malformed_image_references_are_invalid_argument() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let registry = env.registry.addr();
    let long = format!("{registry}/team/{}", "a".repeat(256 - registry.len() - 6));
    assert_eq!(long.len(), 256);
    let references = [
        long,
        String::new(),
        "UPPER/Case:v1".to_owned(),
        format!("{registry}/team/app:tag with space"),
        format!("{registry}/team/../etc/passwd:v1"),
        format!("{registry}/team//app:v1"),
        format!("{registry}/-team/app:v1"),
        format!("{registry}/team/app:{}", "t".repeat(129)),
        format!("{registry}/team/app@sha256:xyz"),
        format!("{registry}/team/app@sha256:{}", "A".repeat(64)),
        format!("{registry}/team/app@sha512:{}", "a".repeat(128)),
        format!("https://{registry}/team/app:v1"),
        format!("{registry}/team/app:v1\n"),
        format!("{registry}/team/app:v1;rm -rf /"),
        format!("{registry}/team/app\0:v1"),
        format!("{registry}/team/äpp:v1"),
    ];
    for (index, reference) in references.iter().enumerate() {
        let status = expect_code(
            &env,
            order("", &format!("bad-ref-{index}"), reference, ""),
            Code::InvalidArgument,
        )
        .await?;
        assert_no_leaks(&env, &status, &[]).await?;
        let pulled = env
            .berthd
            .agent()
            .await?
            .pull_image(PullImageRequest {
                project: String::new(),
                image: reference.clone(),
                pull_secret: String::new(),
            })
            .await;
        let status = match pulled {
            Err(status) => status,
            Ok(response) => match response.into_inner().message().await {
                Err(status) => status,
                Ok(event) => anyhow::bail!("PullImage {reference:?} gave {event:?}"),
            },
        };
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "PullImage {reference:?}: {status:?}"
        );
    }
    assert_still_serving(&env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_file_over_1_mib_is_refused_by_the_cli() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let mut yaml = format!(
        "version: v1\nkind: Service\nmetadata:\n  name: oversized\ncontainer:\n  image: {}/team/app:v1\n# ",
        env.registry.addr()
    );
    let padding = CLI_INPUT_LIMIT + 1 - yaml.len() - 1;
    yaml.push_str(&"x".repeat(padding));
    yaml.push('\n');
    assert_eq!(yaml.len(), CLI_INPUT_LIMIT + 1);
    let path = env.scratch_dir().join("oversized.yaml");
    std::fs::write(&path, &yaml)?;
    let path_text = path.to_string_lossy().into_owned();

    let output = env
        .berthd
        .cli(&["service", "create", "--file", &path_text], None)
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the CLI accepted {path_text}");
    assert!(
        stderr.contains(&path_text) && stderr.contains("larger than 1048576 bytes"),
        "the error should name the file and the limit: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "the CLI panicked: {stderr}");

    let output = env
        .berthd
        .cli(&["service", "create", "--file", "-"], Some(&yaml))
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the CLI accepted 1 MiB + 1 on stdin"
    );
    assert!(
        stderr.contains("stdin is larger than 1048576 bytes"),
        "the error should name stdin and the limit: {stderr}"
    );

    let listed = env
        .berthd
        .agent()
        .await?
        .list_containers(ListContainersRequest::default())
        .await?
        .into_inner();
    assert!(
        listed.containers.iter().all(|c| c.name != "oversized"),
        "an oversized service file started a container: {listed:?}"
    );
    assert_still_serving(&env).await
}
