//! `[[registry.mirror]]`: a real docker-registry in proxy mode (a pull-through cache of the
//! private token-auth upstream, logged in there with its own user) as the mirror, with a
//! recording front before it. Pulls go through the mirror first and fall back to the upstream
//! when it fails; the image is the upstream reference's; credentials reach a mirror only with
//! `credentials = true`; private or public is decided against the upstream.

use berth::api::pb::PullPolicy;
use tonic::Code;

use crate::harness::credentials::RegistryUser;
use crate::harness::env::start_request;
use crate::harness::exposition::scrape;
use crate::harness::host::{HostBerthd, HostEnvironment, MirrorEntry, OpsEnv};
use crate::harness::image::{PushedImage, TestImage};
use crate::harness::mirror::{ProxyMirror, RecordingFront};
use crate::harness::proxy::CorruptingProxy;
use crate::harness::token_server::Grants;
use crate::harness::{free_local_port, random_lowercase};

/// The env plus a mirror user the upstream's token server knows (pull on everything).
async fn env_with_mirror_user() -> anyhow::Result<(OpsEnv, RegistryUser)> {
    let env = OpsEnv::start().await?;
    let mirror_user = RegistryUser::generate("berth-mirror");
    env.token_server
        .add_user(&mirror_user, Grants::none().pull("*"));
    Ok((env, mirror_user))
}

fn mirror(upstream: &str, front: &RecordingFront, credentials: bool) -> MirrorEntry {
    MirrorEntry {
        upstream: upstream.to_owned(),
        endpoint: format!("http://{}", front.addr()),
        credentials,
    }
}

/// The upstream registry's `response completed` log lines for reads (GET, HEAD) of
/// `repository`'s manifests and blobs, as (uri, user agent). The harness's pushes are writes.
fn upstream_requests(env: &OpsEnv, repository: &str) -> Vec<(String, String)> {
    let field = |line: &str, key: &str| -> String {
        let Some(start) = line.find(&format!("{key}=")) else {
            return String::new();
        };
        let rest = &line[start + key.len() + 1..];
        if let Some(quoted) = rest.strip_prefix('"') {
            quoted.split('"').next().unwrap_or_default().to_owned()
        } else {
            rest.split(' ').next().unwrap_or_default().to_owned()
        }
    };
    env.registry
        .log_text()
        .lines()
        .filter(|line| line.contains("msg=\"response completed\""))
        .filter(|line| matches!(field(line, "http.request.method").as_str(), "GET" | "HEAD"))
        .map(|line| {
            (
                field(line, "http.request.uri"),
                field(line, "http.request.useragent"),
            )
        })
        .filter(|(uri, _)| {
            uri.starts_with(&format!("/v2/{repository}/manifests/"))
                || uri.starts_with(&format!("/v2/{repository}/blobs/"))
        })
        .collect()
}

/// The `ctr images ls` line of `reference` (fails when there is none).
async fn image_line(env: &OpsEnv, reference: &str) -> anyhow::Result<String> {
    let listing = env.containerd.ctr_ok(&["images", "ls"]).await?;
    listing
        .lines()
        .find(|line| line.split_whitespace().next() == Some(reference))
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no image record {reference} in:\n{listing}"))
}

async fn push(env: &OpsEnv, repository: &str, tag: &str) -> anyhow::Result<PushedImage> {
    env.push_image(
        repository,
        tag,
        &TestImage::busybox(&["echo", &format!("{repository}:{tag}")]),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_mirror_serves_pulls_and_the_upstream_takes_over_when_it_stops(
) -> anyhow::Result<()> {
    let (env, mirror_user) = env_with_mirror_user().await?;
    let registry = env.registry.addr().to_owned();
    let repository = "team/mirrored";
    let v1 = push(&env, repository, "v1").await?;
    let v2 = push(&env, repository, "v2").await?;
    let proxy = ProxyMirror::start(&env.ca, &registry, &mirror_user).await?;
    let front = RecordingFront::start(proxy.addr()).await?;
    let front_url = format!("http://{}", front.addr());
    let mut config = env.host_config();
    config.metrics_listen = format!("127.0.0.1:{}", free_local_port()?);
    config.mirrors = vec![mirror(&registry, &front, false)];
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let secret = berthd
        .create_docker_secret("reg", &registry, &env.user)
        .await?;

    // 1. Through the mirror.
    let first = berthd
        .run_to_completion(&v1.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;
    assert_eq!(first.image, v1.reference());
    assert_eq!(first.image_digest, v1.manifest_digest);
    let manifests = front.requests_for(repository, "manifests");
    let blobs = front.requests_for(repository, "blobs");
    assert!(
        manifests
            .iter()
            .any(|r| r.status == 200 && r.path.ends_with("/v1")),
        "the mirror did not serve the manifest: {manifests:?}"
    );
    assert!(
        blobs
            .iter()
            .filter(|r| r.method == "GET" && r.status == 200)
            .count()
            >= 2,
        "the mirror did not serve config and layer: {blobs:?}"
    );
    assert!(
        front.seen().iter().all(|r| r.authorization.is_none()),
        "credentials = false, yet the mirror got an Authorization header: {:?}",
        front.seen()
    );
    assert!(
        front.seen().iter().all(|r| r
            .user_agent
            .as_deref()
            .is_some_and(|ua| ua.starts_with("berth/"))),
        "{:?}",
        front.seen()
    );
    assert!(
        proxy
            .log_text()
            .contains(&format!("/v2/{repository}/blobs/sha256:")),
        "the mirror's own log shows no blob GET"
    );
    let upstream = upstream_requests(&env, repository);
    assert!(
        !upstream.is_empty(),
        "the mirror fetched nothing from the upstream"
    );
    assert!(
        upstream
            .iter()
            .all(|(_, agent)| !agent.starts_with("berth/")),
        "berthd itself fetched from the upstream: {upstream:?}"
    );
    assert_eq!(
        env.token_server.requests_by(&env.user.username),
        0,
        "berthd asked the upstream's token endpoint although the mirror served the pull"
    );
    assert!(env.token_server.requests_by(&mirror_user.username) >= 1);
    let record = image_line(&env, &v1.reference()).await?;
    assert!(
        record.contains("berth.dev/private=true"),
        "an order with a secret makes the image private: {record}"
    );
    println!(
        "via mirror: front saw {} manifest and {} blob requests; upstream saw {:?}",
        manifests.len(),
        blobs.len(),
        upstream
    );

    // 2. The mirror stops: its front answers 502, the order falls back to the upstream.
    proxy.stop();
    let second = berthd
        .run_to_completion(&v2.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;
    assert_eq!(second.image_digest, v2.manifest_digest);
    // The stopped mirror was tried first (its /v2/ ping or its manifest answered 502).
    let manifests = format!("/v2/{repository}/manifests/");
    assert!(
        front
            .seen()
            .iter()
            .any(|r| r.status == 502 && (r.path == "/v2/" || r.path.starts_with(&manifests))),
        "{:?}",
        front.seen()
    );
    assert!(
        upstream_requests(&env, repository)
            .iter()
            .any(|(uri, agent)| uri.ends_with("/manifests/v2") && agent.starts_with("berth/")),
        "berthd did not fall back to the upstream"
    );
    assert!(env.token_server.requests_by(&env.user.username) >= 1);

    // 3. The mirror unreachable altogether (connection refused), pull policy ALWAYS.
    drop(front);
    let third = berthd
        .run_to_completion(&v1.reference(), &secret, PullPolicy::Always)
        .await?;
    assert_eq!(third.image_digest, v1.manifest_digest);
    assert!(berthd
        .log_text()
        .contains("mirror failed; trying the next source"));

    let (_, metrics) = scrape(berthd.metrics_addr()).await?;
    let mirror_result = |result: &str| {
        metrics.value(
            "berth_mirror_pulls_total",
            &[
                ("upstream", registry.as_str()),
                ("mirror", front_url.as_str()),
                ("result", result),
            ],
        )
    };
    assert_eq!(mirror_result("ok"), Some(1.0), "{}", metrics.text);
    assert_eq!(mirror_result("fallback"), Some(2.0), "{}", metrics.text);
    assert_eq!(
        metrics.value(
            "berth_pulls_total",
            &[("result", "ok"), ("registry", registry.as_str())]
        ),
        Some(3.0)
    );
    assert_eq!(
        metrics.value("berth_pull_duration_seconds_count", &[]),
        Some(3.0)
    );
    assert_eq!(metrics.value("berth_pulls_in_flight", &[]), Some(0.0));
    println!(
        "mirror metrics:\n{}",
        metrics
            .lines_starting("berth_mirror_pulls_total")
            .join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_reach_a_mirror_only_when_allowed_and_privacy_follows_the_upstream(
) -> anyhow::Result<()> {
    let (env, mirror_user) = env_with_mirror_user().await?;
    let registry = env.registry.addr().to_owned();
    let proxy = ProxyMirror::start(&env.ca, &registry, &mirror_user).await?;

    // credentials = true: the order's username and password go to the mirror.
    let trusted = RecordingFront::start(proxy.addr()).await?;
    let with_credentials = push(&env, "team/creds", "v1").await?;
    {
        let mut config = env.host_config();
        config.mirrors = vec![mirror(&registry, &trusted, true)];
        let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
        let secret = berthd
            .create_docker_secret("reg", &registry, &env.user)
            .await?;
        let container = berthd
            .run_to_completion(
                &with_credentials.reference(),
                &secret,
                PullPolicy::IfNotPresent,
            )
            .await?;
        assert_eq!(container.image_digest, with_credentials.manifest_digest);
        let expected = format!("Basic {}", env.user.basic_auth_base64());
        let seen = trusted.requests_for("team/creds", "blobs");
        assert!(
            !seen.is_empty()
                && seen
                    .iter()
                    .all(|r| r.authorization.as_deref() == Some(expected.as_str())),
            "credentials = true: every blob request should carry the secret: {seen:?}"
        );
    }

    // credentials = false: nothing, neither for an order with a secret nor without.
    let open = RecordingFront::start(proxy.addr()).await?;
    let mut config = env.host_config();
    config.mirrors = vec![mirror(&registry, &open, false)];
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let secret = berthd
        .create_docker_secret("reg", &registry, &env.user)
        .await?;
    let private_tag = push(&env, "team/creds", "v2").await?;
    berthd
        .run_to_completion(&private_tag.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;

    // An anonymous order for a repository the upstream does not serve anonymously: the mirror
    // serves it, the order runs, the image is recorded private.
    let anonymous_private = push(&env, "team/creds", "v3").await?;
    let container = berthd
        .run_to_completion(&anonymous_private.reference(), "", PullPolicy::IfNotPresent)
        .await?;
    assert_eq!(container.image_digest, anonymous_private.manifest_digest);
    let record = image_line(&env, &anonymous_private.reference()).await?;
    assert!(record.contains("berth.dev/private=true"), "{record}");
    // ... so a later anonymous order for the cached image is refused.
    let suffix = random_lowercase(6);
    let refused = berthd
        .start_container(start_request(
            &format!("order-{suffix}"),
            &format!("again-{suffix}"),
            &anonymous_private.reference(),
            "",
        ))
        .await?
        .expect_err("a cached private image needs a credential");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A repository the upstream serves anonymously: recorded public, and a later anonymous
    // order starts from the cache without asking anyone.
    env.token_server
        .grant_anonymous(Grants::none().pull("public/app"));
    let public = push(&env, "public/app", "v1").await?;
    berthd
        .run_to_completion(&public.reference(), "", PullPolicy::IfNotPresent)
        .await?;
    let record = image_line(&env, &public.reference()).await?;
    assert!(record.contains("berth.dev/private=false"), "{record}");
    let asked_before = open.requests_for("public/app", "manifests").len();
    berthd
        .run_to_completion(&public.reference(), "", PullPolicy::IfNotPresent)
        .await?;
    assert_eq!(
        open.requests_for("public/app", "manifests").len(),
        asked_before
    );

    assert!(
        open.seen().iter().all(|r| r.authorization.is_none()),
        "credentials = false, yet the mirror got an Authorization header: {:?}",
        open.seen()
    );
    assert!(!open.requests_for("team/creds", "blobs").is_empty());
    Ok(())
}

/// A mirror whose blobs fail verification is passed over; the upstream's bytes are used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_serving_corrupt_blobs_is_passed_over() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    let registry = env.registry.addr().to_owned();
    let corrupting = CorruptingProxy::start(&env.ca, &registry).await?;
    let pushed = push(&env, "team/corrupted", "v1").await?;
    let mut config = env.host_config();
    config.mirrors = vec![MirrorEntry {
        upstream: registry.clone(),
        endpoint: format!("http://{}", corrupting.addr()),
        credentials: true,
    }];
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let secret = berthd
        .create_docker_secret("reg", &registry, &env.user)
        .await?;
    let container = berthd
        .run_to_completion(&pushed.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;
    assert_eq!(container.image_digest, pushed.manifest_digest);
    assert!(corrupting.corrupted_blobs() >= 1);
    let log = berthd.log_text();
    assert!(
        log.contains("mirror failed; trying the next source") && log.contains("verification"),
        "{}",
        berthd.log_tail()
    );
    Ok(())
}
