//! Issue 5, registries and tenants: what a hostile registry can and cannot get from berthd, and
//! what one project can and cannot use of another's. Each test runs the real berthd against
//! real containerd and docker-registry, behind a [`HostileFront`] where the registry misbehaves,
//! asserts the gRPC code, and scans the status message, berthd's log, its state dir and
//! containerd for credential material ([`crate::leaks`]'s scanner).
//!
//! - Redirects: blob GETs answered with 307 to another host (127.0.0.2) are followed without
//!   `Authorization` or cookies; a redirect from https to http is refused.
//! - Realms: a challenge naming an http realm, a realm with user info, a link-local realm, a
//!   loopback realm for a registry that is not on loopback is refused (PERMISSION_DENIED) and
//!   the realm is never asked; a token endpoint's redirect is not followed; a second challenge
//!   cannot swap in an unchecked realm; an anonymous order does not ask a refused realm either.
//! - Foreign layers: a manifest whose layers carry `urls` is refused, and the URL never asked.
//! - Tenants: another project's secret is NOT_FOUND exactly as an unknown one; a cached private
//!   image starts only with a credential the registry accepts for it now; a public one for all.

use std::net::IpAddr;

use anyhow::{bail, Context as _};
use berth::api::pb::create_secret_request::Credential;
use berth::api::pb::{
    Container, ContainerSpec, CreateSecretRequest, DeleteSecretRequest, DockerCredential,
    ListContainersRequest, ListSecretsRequest, PullImageRequest, PullPolicy, StartContainerRequest,
};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::berthd::{Berthd, BerthdOptions};
use crate::harness::credentials::RegistryUser;
use crate::harness::env::{Env, RegistryKind};
use crate::harness::hostile::{HostileFront, Hostility};
use crate::harness::image::{PushedImage, TestImage};
use crate::harness::mtls::TestPki;
use crate::harness::random_lowercase;
use crate::harness::recorder::{Answer, Recorder};
use crate::harness::token_server::Grants;
use crate::leaks::{leak_findings, needles_in, scan_tree, ScannedRun};

/// 127.0.0.2: "another host" on loopback.
pub(crate) const OTHER_HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
/// 127.0.0.1.
pub(crate) const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------------------------------------
// Shared steps (the other security test files use them too).

/// Replaces env's berthd with one started with `options` (same containerd and test CA). Secrets
/// made before are gone with the old one.
pub(crate) async fn restart_berthd(env: &mut Env, options: &BerthdOptions) -> anyhow::Result<()> {
    env.berthd = Berthd::start(&env.containerd, &env.ca, options).await?;
    Ok(())
}

/// berthd trusting `pki`'s CA beside the test CA.
pub(crate) fn trusting(pki: &TestPki) -> BerthdOptions {
    BerthdOptions {
        extra_ca_files: vec![pki.ca_pem_path().to_owned()],
        ..BerthdOptions::default()
    }
}

/// Every form of every credential of `env` and every token its token server issued so far.
pub(crate) fn env_needles(env: &Env) -> Vec<String> {
    let mut needles = env.user.leak_needles();
    needles.extend(env.pusher.leak_needles());
    if let Some(token_server) = &env.token_server {
        needles.extend(token_server.issued_tokens());
    }
    needles
}

/// A Docker secret in `project` for `server`; returns its id.
pub(crate) async fn create_secret_in(
    env: &Env,
    project: &str,
    name: &str,
    server: &str,
    user: &RegistryUser,
) -> anyhow::Result<String> {
    Ok(env
        .berthd
        .secrets()
        .await?
        .create_secret(docker_secret(project, name, server, user))
        .await
        .with_context(|| format!("creating secret {name} in {project:?}"))?
        .into_inner()
        .id)
}

pub(crate) fn docker_secret(
    project: &str,
    name: &str,
    server: &str,
    user: &RegistryUser,
) -> CreateSecretRequest {
    CreateSecretRequest {
        project: project.to_owned(),
        name: name.to_owned(),
        credential: Some(Credential::Docker(DockerCredential {
            server: server.to_owned(),
            username: user.username.clone(),
            password: user.password.clone(),
        })),
    }
}

/// A start order in `project` named `name` (fresh order id) for `image` with `secret`.
pub(crate) fn order(project: &str, name: &str, image: &str, secret: &str) -> StartContainerRequest {
    StartContainerRequest {
        order_id: format!("order-{name}-{}", random_lowercase(8)),
        project: project.to_owned(),
        name: name.to_owned(),
        container: Some(ContainerSpec {
            image: image.to_owned(),
            pull_secret: secret.to_owned(),
            ..ContainerSpec::default()
        }),
    }
}

/// Starts `request` and expects it to fail with `code`; returns the status.
pub(crate) async fn expect_code(
    env: &Env,
    request: StartContainerRequest,
    code: Code,
) -> anyhow::Result<Status> {
    let what = format!(
        "order {} ({:?})",
        request.order_id,
        request.container.as_ref().map(|spec| spec.image.clone())
    );
    match env.start_container(request).await? {
        Ok(container) => bail!(
            "{what} should fail with {code:?}, got {container:?}\nberthd log:\n{}",
            env.berthd.log_tail()
        ),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "{what}: {status:?}\nberthd log:\n{}",
                env.berthd.log_tail()
            );
            Ok(status)
        }
    }
}

/// Starts `request`, waits until it exited 0, and returns the container.
pub(crate) async fn run_ok(env: &Env, request: StartContainerRequest) -> anyhow::Result<Container> {
    let what = format!("order {}", request.order_id);
    let started = match env.start_container(request).await? {
        Ok(container) => container,
        Err(status) => bail!(
            "{what} failed: {status:?}\nberthd log:\n{}",
            env.berthd.log_tail()
        ),
    };
    let exited = env.wait_until_exited(&started.id).await?;
    assert_eq!(exited.exit_code, 0, "{what}: {exited:?}");
    Ok(exited)
}

/// After a failed order: where any of `needles` is in the status message, berthd's log, every
/// file under berthd's state dir and under containerd's root and state, and containerd's image
/// and content listings.
pub(crate) async fn failure_leaks(
    env: &Env,
    status: &Status,
    needles: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut findings = Vec::new();
    for found in needles_in(status.message().as_bytes(), needles) {
        findings.push(format!("status message {:?}: {found}", status.message()));
    }
    for found in needles_in(env.berthd.log_text().as_bytes(), needles) {
        findings.push(format!(
            "berthd log {}: {found}",
            env.berthd.log_path().display()
        ));
    }
    for args in [["images", "ls"], ["content", "ls"]] {
        let listing = env.containerd.ctr_ok(&args).await?;
        for found in needles_in(listing.as_bytes(), needles) {
            findings.push(format!("ctr {}: {found}", args.join(" ")));
        }
    }
    scan_tree(env.berthd.state_dir(), needles, &mut findings)?;
    scan_tree(env.containerd.dir(), needles, &mut findings)?;
    Ok(findings)
}

/// [`failure_leaks`] finds nothing of `env`'s credentials and tokens, nor of `extra`.
pub(crate) async fn assert_no_leaks(
    env: &Env,
    status: &Status,
    extra: &[String],
) -> anyhow::Result<()> {
    let mut needles = env_needles(env);
    needles.extend(extra.iter().cloned());
    let findings = failure_leaks(env, status, &needles).await?;
    assert!(
        findings.is_empty(),
        "credential material leaked after {status:?}:\n{}",
        findings.join("\n")
    );
    Ok(())
}

/// No image record names `repository` (a refused pull leaves none).
pub(crate) async fn assert_no_image(env: &Env, repository: &str) -> anyhow::Result<()> {
    let images = env.containerd.ctr_ok(&["images", "ls", "-q"]).await?;
    assert!(
        !images.lines().any(|image| image.contains(repository)),
        "an image record for {repository} was written:\n{images}"
    );
    Ok(())
}

/// Health is SERVING and a good private image still runs (pushed to the env's registry, with
/// a fresh secret in project "default").
pub(crate) async fn assert_still_serving(env: &Env) -> anyhow::Result<()> {
    assert_eq!(env.berthd.health().await?, ServingStatus::Serving);
    let good = env
        .push(
            "team/good",
            "v1",
            &TestImage::busybox(&["echo", "still working"]),
        )
        .await?;
    let secret_id = env
        .create_secret(
            &format!("good-{}", random_lowercase(6)),
            env.registry.addr(),
            &env.user,
        )
        .await?;
    let container = env.run_to_completion(&good.reference(), &secret_id).await?;
    assert_eq!(container.image_digest, good.manifest_digest);
    Ok(())
}

/// A name for this host that resolves to loopback only but is neither `localhost` nor an IP
/// literal (the host name, from /etc/hosts): a registry named by it is "not on loopback" to
/// berthd's realm policy, while every byte of the test stays on loopback (this workplace allows
/// traffic to no other address).
async fn loopback_host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name")?
        .trim()
        .to_owned();
    let resolved: Vec<_> = tokio::net::lookup_host((name.as_str(), 443))
        .await
        .with_context(|| format!("resolving the host name {name:?}"))?
        .collect();
    if name.is_empty()
        || name == "localhost"
        || resolved.is_empty()
        || !resolved.iter().all(|addr| addr.ip().is_loopback())
    {
        bail!(
            "the test needs a host name that resolves to loopback only (an /etc/hosts line \
             `127.0.0.1 {name}`); {name:?} resolves to {resolved:?}"
        );
    }
    Ok(name)
}

// ---------------------------------------------------------------------------------------------
// Redirects

/// Blob GETs answered with 307 to blob storage on 127.0.0.2 (TLS): the pull succeeds, and the
/// storage saw no Authorization, no cookie and no credential in any header.
async fn blob_redirects_to_another_host(kind: RegistryKind) -> anyhow::Result<()> {
    let mut env = Env::start(kind).await?;
    let pki = TestPki::generate()?;
    let storage_cert = pki.server("storage", &[OTHER_HOST])?;
    let storage = Recorder::start(
        OTHER_HOST,
        Some(storage_cert.rustls_server_config()?),
        Answer::Blobs,
    )
    .await?;
    let front = HostileFront::start(
        &env.ca,
        env.registry.addr(),
        Hostility::RedirectBlobs {
            target: storage.url().to_owned(),
            store: storage.blob_store(),
        },
    )
    .await?;
    restart_berthd(&mut env, &trusting(&pki)).await?;
    let pushed = env
        .push(
            "team/redirected",
            "v1",
            &TestImage::busybox(&["sh", "-c", "echo served from blob storage"]),
        )
        .await?;
    let secret_id = env.create_secret("front", front.addr(), &env.user).await?;
    let container = env
        .run_to_completion(&pushed.reference_via(front.addr()), &secret_id)
        .await?;
    assert_eq!(container.image_digest, pushed.manifest_digest);

    let requests = storage.requests();
    assert!(
        front.acts() >= 2 && requests.len() >= 2,
        "config and layer should both come from blob storage: {} redirects, requests {requests:?}",
        front.acts()
    );
    let needles = env_needles(&env);
    let cookie_value = front
        .cookie()
        .split_once('=')
        .map_or("", |(_, value)| value)
        .to_owned();
    for request in &requests {
        assert!(
            request.method == "GET"
                && request.uri.starts_with("/v2/team/redirected/blobs/sha256:")
                && request.uri.contains("X-Signature="),
            "blob storage got an unexpected request: {request:?}"
        );
        for header in ["authorization", "proxy-authorization", "cookie", "cookie2"] {
            assert!(
                request.header(header).is_none(),
                "blob storage on another host got {header}: {request:?}"
            );
        }
        for (name, value) in &request.headers {
            let found = needles_in(value.as_bytes(), &needles);
            assert!(found.is_empty(), "header {name} carried {found:?}");
            assert!(
                !value.contains(&cookie_value),
                "header {name} carried the registry's cookie"
            );
        }
    }
    let findings = leak_findings(
        &env,
        &ScannedRun {
            container_id: &container.id,
            order_id: &container.order_id,
            log_path: &container.log_path,
            secret_id: &secret_id,
            output: "served from blob storage",
        },
        &env_needles(&env),
    )
    .await?;
    assert!(
        findings.is_empty(),
        "credential material leaked:\n{}",
        findings.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirects_to_another_host_carry_no_basic_credentials() -> anyhow::Result<()> {
    blob_redirects_to_another_host(RegistryKind::Htpasswd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirects_to_another_host_carry_no_bearer_token() -> anyhow::Result<()> {
    blob_redirects_to_another_host(RegistryKind::Token).await
}

/// A blob GET redirected from https to http://127.0.0.2 is refused; the http server is never
/// asked and no image record is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_https_to_http_is_refused() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let storage = Recorder::start(OTHER_HOST, None, Answer::Blobs).await?;
    let front = HostileFront::start(
        &env.ca,
        env.registry.addr(),
        Hostility::RedirectBlobs {
            target: storage.url().to_owned(),
            store: storage.blob_store(),
        },
    )
    .await?;
    let pushed = env
        .push(
            "team/downgraded",
            "v1",
            &TestImage::busybox(&["echo", "no"]),
        )
        .await?;
    let secret_id = env.create_secret("front", front.addr(), &env.user).await?;
    let status = expect_code(
        &env,
        order(
            "",
            "downgraded",
            &pushed.reference_via(front.addr()),
            &secret_id,
        ),
        Code::FailedPrecondition,
    )
    .await?;
    assert!(front.acts() >= 1, "the front redirected nothing");
    assert!(
        storage.requests().is_empty(),
        "the plain-http target was asked: {:?}",
        storage.requests()
    );
    assert_no_image(&env, "team/downgraded").await?;
    assert_no_leaks(&env, &status, &[]).await?;
    assert_still_serving(&env).await
}

// ---------------------------------------------------------------------------------------------
// Realms

/// The challenge every realm test's front answers with.
fn bearer_challenge(realm: &str) -> String {
    format!(r#"Bearer realm="{realm}",service="berth-hostile""#)
}

/// An order for an image behind a front whose challenge names `realm`, with a secret for the
/// front: PERMISSION_DENIED, naming the realm as the reason; nothing leaked; still serving.
async fn expect_realm_refused(
    env: &Env,
    front: &HostileFront,
    name: &str,
) -> anyhow::Result<Status> {
    expect_realm_refused_at(env, front, front.addr(), name).await
}

/// [`expect_realm_refused`] with the front named `registry` (`host:port`).
async fn expect_realm_refused_at(
    env: &Env,
    front: &HostileFront,
    registry: &str,
    name: &str,
) -> anyhow::Result<Status> {
    let secret_id = env
        .create_secret(&format!("realm-{name}"), registry, &env.user)
        .await?;
    let image = format!("{registry}/team/realm:v1");
    let status = expect_code(
        env,
        order("", name, &image, &secret_id),
        Code::PermissionDenied,
    )
    .await?;
    assert!(
        status.message().contains("realm") && status.message().contains(registry),
        "the message should say the registry's realm was refused: {status:?}"
    );
    assert!(front.acts() >= 1, "the front never answered a challenge");
    assert_no_leaks(env, &status, &[]).await?;
    Ok(status)
}

/// Realms berthd will not send a credential to: plain http for an https registry, a URL with
/// user info, the link-local metadata address. Each is refused before any request to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_realms_are_refused_and_never_asked() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let plain = Recorder::start(LOOPBACK, None, Answer::refuse()).await?;
    let tls = Recorder::start(
        LOOPBACK,
        Some(env.ca.rustls_server_config()?),
        Answer::refuse(),
    )
    .await?;
    let cases = [
        ("http", format!("{}/token", plain.url())),
        (
            "userinfo",
            format!("https://berth:pw-in-url@{}/token", tls.addr()),
        ),
        // Link-local: fe80::1 without a zone cannot be sent to, so even a regression puts no
        // packet on the network (this workplace allows traffic to loopback only); the metadata
        // address 169.254.169.254 itself is in `auth::realm`'s unit test.
        ("link-local-v6", "https://[fe80::1]/token".to_owned()),
        ("not-http", format!("ftp://{}/token", tls.addr())),
    ];
    for (name, realm) in cases {
        let front = HostileFront::start(
            &env.ca,
            env.registry.addr(),
            Hostility::Challenge(bearer_challenge(&realm)),
        )
        .await?;
        expect_realm_refused(&env, &front, name).await?;
    }
    assert!(
        plain.requests().is_empty() && tls.requests().is_empty(),
        "a refused realm was asked: {:?} {:?}",
        plain.requests(),
        tls.requests()
    );
    assert_still_serving(&env).await
}

/// A registry named by a host name (not loopback to the realm policy, which reads IP literals
/// and `localhost` only) whose challenge names a loopback realm: 127.0.0.1, localhost, or
/// 127.0.0.1 written as an IPv4-mapped IPv6 address. Refused, and the realm never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_realm_is_refused_for_a_registry_not_on_loopback() -> anyhow::Result<()> {
    let mut env = Env::start(RegistryKind::Htpasswd).await?;
    let host = loopback_host_name().await?;
    let pki = TestPki::generate()?;
    let front_cert = pki.server_named("front", &[&host], &[LOOPBACK])?;
    restart_berthd(&mut env, &trusting(&pki)).await?;
    // Valid for 127.0.0.1 however it is written, so that only the realm policy stands between
    // the credential and this server.
    let mapped = IpAddr::V6(std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    let realm_cert = pki.server("realm", &[LOOPBACK, mapped])?;
    let realm_server = Recorder::start(
        LOOPBACK,
        Some(realm_cert.rustls_server_config()?),
        Answer::refuse(),
    )
    .await?;
    let port = realm_server
        .addr()
        .rsplit_once(':')
        .map(|(_, port)| port.to_owned())
        .unwrap_or_default();
    for (name, realm) in [
        ("loopback-ip", format!("https://127.0.0.1:{port}/token")),
        ("localhost", format!("https://localhost:{port}/token")),
        (
            "mapped-v6",
            format!("https://[::ffff:127.0.0.1]:{port}/token"),
        ),
        ("localhost-dot", format!("https://localhost.:{port}/token")),
        (
            "sub-localhost",
            format!("https://realm.localhost:{port}/token"),
        ),
    ] {
        let front = HostileFront::start_on(
            LOOPBACK,
            front_cert.rustls_server_config()?,
            &env.ca,
            env.registry.addr(),
            Hostility::Challenge(bearer_challenge(&realm)),
        )
        .await?;
        let named = front.addr().replace("127.0.0.1", &host);
        expect_realm_refused_at(&env, &front, &named, name).await?;
    }
    assert!(
        realm_server.requests().is_empty(),
        "the loopback realm was asked: {:?}",
        realm_server.requests()
    );
    assert_still_serving(&env).await
}

/// A token endpoint that answers 302 to another server: berthd does not follow (the order is
/// refused) and the other server is never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_never_follow_redirects() -> anyhow::Result<()> {
    let mut env = Env::start(RegistryKind::Htpasswd).await?;
    let pki = TestPki::generate()?;
    let elsewhere_cert = pki.server("elsewhere", &[OTHER_HOST])?;
    let elsewhere = Recorder::start(
        OTHER_HOST,
        Some(elsewhere_cert.rustls_server_config()?),
        Answer::json(r#"{"token":"from-elsewhere","expires_in":300}"#),
    )
    .await?;
    let realm = Recorder::start(
        LOOPBACK,
        Some(env.ca.rustls_server_config()?),
        Answer::redirect(302, &format!("{}/token", elsewhere.url())),
    )
    .await?;
    restart_berthd(&mut env, &trusting(&pki)).await?;
    let front = HostileFront::start(
        &env.ca,
        env.registry.addr(),
        Hostility::Challenge(bearer_challenge(&format!("{}/token", realm.url()))),
    )
    .await?;
    let secret_id = env.create_secret("front", front.addr(), &env.user).await?;
    let status = expect_code(
        &env,
        order(
            "",
            "token-redirect",
            &format!("{}/team/realm:v1", front.addr()),
            &secret_id,
        ),
        Code::FailedPrecondition,
    )
    .await?;
    assert_eq!(
        realm.requests().len(),
        1,
        "berthd should ask the realm once: {:?}",
        realm.requests()
    );
    assert!(
        elsewhere.requests().is_empty(),
        "berthd followed the token endpoint's redirect: {:?}",
        elsewhere.requests()
    );
    assert_no_leaks(&env, &status, &[]).await?;
    assert_still_serving(&env).await
}

/// A registry that answers berthd's first challenge with Basic and every later one with a
/// Bearer challenge naming a realm berthd refuses (plain http): the credential must never reach
/// that realm, whoever asks the second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_challenge_cannot_swap_in_an_unchecked_realm() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let realm = Recorder::start(LOOPBACK, None, Answer::refuse()).await?;
    let front = HostileFront::start(
        &env.ca,
        env.registry.addr(),
        Hostility::ChallengeAfterFirst(bearer_challenge(&format!("{}/token", realm.url()))),
    )
    .await?;
    let pushed = env
        .push(
            "team/swapped",
            "v1",
            &TestImage::busybox(&["echo", "swapped"]),
        )
        .await?;
    let secret_id = env.create_secret("front", front.addr(), &env.user).await?;
    let result = env
        .start_container(order(
            "",
            "swapped",
            &pushed.reference_via(front.addr()),
            &secret_id,
        ))
        .await?;
    let requests = realm.requests();
    assert!(
        requests.is_empty(),
        "the unchecked realm was asked ({} times; with Authorization: {}); order result {result:?}",
        requests.len(),
        requests
            .iter()
            .any(|request| request.header("authorization").is_some())
    );
    // The registry's first answer (Basic) stands: the pull goes on with Basic to the registry.
    let container = match result {
        Ok(container) => container,
        Err(status) => bail!(
            "the pull should go on with the first challenge's Basic: {status:?}\nberthd log:\n{}",
            env.berthd.log_tail()
        ),
    };
    let exited = env.wait_until_exited(&container.id).await?;
    assert_eq!(exited.exit_code, 0);
    assert_eq!(exited.image_digest, pushed.manifest_digest);
    assert_still_serving(&env).await
}

/// An anonymous order (no secret) behind a front whose challenge names a realm berthd refuses
/// for credentials (plain http for an https registry): berthd must not ask it either, since the
/// realm is the registry's choice (SSRF: a link-local metadata service, say).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_pull_does_not_ask_a_refused_realm_either() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let realm = Recorder::start(LOOPBACK, None, Answer::refuse()).await?;
    let front = HostileFront::start(
        &env.ca,
        env.registry.addr(),
        Hostility::Challenge(bearer_challenge(&format!("{}/token", realm.url()))),
    )
    .await?;
    let status = match env
        .start_container(order(
            "",
            "anonymous-realm",
            &format!("{}/team/realm:v1", front.addr()),
            "",
        ))
        .await?
    {
        Ok(container) => bail!("an image behind a refused realm started: {container:?}"),
        Err(status) => status,
    };
    assert!(
        realm.requests().is_empty(),
        "an anonymous pull asked the refused realm {:?}; order: {status:?}",
        realm.requests()
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_still_serving(&env).await
}

// ---------------------------------------------------------------------------------------------
// Foreign layers

/// A manifest whose layers carry `urls` (CVE-2020-15157) is refused with FAILED_PRECONDITION,
/// and nothing is fetched from the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_layer_urls_are_refused_and_never_fetched() -> anyhow::Result<()> {
    let mut env = Env::start(RegistryKind::Htpasswd).await?;
    let pki = TestPki::generate()?;
    let foreign_cert = pki.server("foreign", &[OTHER_HOST])?;
    let foreign = Recorder::start(
        OTHER_HOST,
        Some(foreign_cert.rustls_server_config()?),
        Answer::refuse(),
    )
    .await?;
    restart_berthd(&mut env, &trusting(&pki)).await?;
    let front = HostileFront::start(
        &env.ca,
        env.registry.addr(),
        Hostility::ForeignLayerUrls(format!("{}/layers/foreign.tar.gz", foreign.url())),
    )
    .await?;
    let pushed = env
        .push("team/foreign", "v1", &TestImage::busybox(&["echo", "no"]))
        .await?;
    let secret_id = env.create_secret("front", front.addr(), &env.user).await?;
    let status = expect_code(
        &env,
        order(
            "",
            "foreign",
            &pushed.reference_via(front.addr()),
            &secret_id,
        ),
        Code::FailedPrecondition,
    )
    .await?;
    assert!(front.acts() >= 1, "the front rewrote no manifest");
    assert!(
        status.message().contains("foreign"),
        "the message should say why: {status:?}"
    );
    assert!(
        foreign.requests().is_empty(),
        "the foreign-layer URL was fetched: {:?}",
        foreign.requests()
    );
    assert_no_image(&env, "team/foreign").await?;
    assert_no_leaks(&env, &status, &[]).await?;
    assert_still_serving(&env).await
}

// ---------------------------------------------------------------------------------------------
// Tenants

/// A secret id of project team-a, used in project team-b, is NOT_FOUND exactly like an id that
/// does not exist (same code, same message but for the id), for StartContainer, PullImage and
/// DeleteSecret; team-b's list does not show it; team-a can still use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_projects_secret_is_indistinguishable_from_a_missing_one() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Htpasswd).await?;
    let pushed = env
        .push(
            "team/tenant",
            "v1",
            &TestImage::busybox(&["echo", "tenant"]),
        )
        .await?;
    let a_secret = create_secret_in(&env, "team-a", "reg", env.registry.addr(), &env.user).await?;
    let missing = format!(
        "secret-{}",
        random_lowercase(a_secret.len() - "secret-".len())
    );
    let image = pushed.reference();

    let mut messages = Vec::new();
    for (label, id) in [("other project", &a_secret), ("missing", &missing)] {
        let status = expect_code(
            &env,
            order("team-b", &format!("b-{}", random_lowercase(6)), &image, id),
            Code::NotFound,
        )
        .await?;
        messages.push((
            label,
            "start",
            status.message().replace(id.as_str(), "<id>"),
        ));

        let mut agent = env.berthd.agent().await?;
        let pull = agent
            .pull_image(PullImageRequest {
                project: "team-b".to_owned(),
                image: image.clone(),
                pull_secret: id.clone(),
            })
            .await;
        let status = match pull {
            Err(status) => status,
            Ok(response) => {
                let mut stream = response.into_inner();
                match stream.message().await {
                    Err(status) => status,
                    Ok(event) => bail!("PullImage with {label} secret gave {event:?}"),
                }
            }
        };
        assert_eq!(
            status.code(),
            Code::NotFound,
            "PullImage {label}: {status:?}"
        );
        messages.push((label, "pull", status.message().replace(id.as_str(), "<id>")));

        let deleted = env
            .berthd
            .secrets()
            .await?
            .delete_secret(DeleteSecretRequest {
                project: "team-b".to_owned(),
                id: id.clone(),
            })
            .await;
        let status = deleted.expect_err("deleting another project's secret must fail");
        assert_eq!(
            status.code(),
            Code::NotFound,
            "DeleteSecret {label}: {status:?}"
        );
        messages.push((
            label,
            "delete",
            status.message().replace(id.as_str(), "<id>"),
        ));
    }
    for call in ["start", "pull", "delete"] {
        let texts: Vec<&str> = messages
            .iter()
            .filter(|(_, c, _)| *c == call)
            .map(|(_, _, text)| text.as_str())
            .collect();
        assert_eq!(
            texts[0], texts[1],
            "{call}: the answer for another project's secret differs from a missing one's"
        );
        assert!(
            !texts[0].contains("team-a"),
            "{call}: the message names the owning project: {}",
            texts[0]
        );
    }

    let listed = env
        .berthd
        .secrets()
        .await?
        .list_secrets(ListSecretsRequest {
            project: "team-b".to_owned(),
        })
        .await?
        .into_inner();
    assert!(
        listed.secrets.iter().all(|secret| secret.id != a_secret),
        "team-b lists team-a's secret: {listed:?}"
    );
    let b_containers = env
        .berthd
        .agent()
        .await?
        .list_containers(ListContainersRequest {
            project: "team-b".to_owned(),
        })
        .await?
        .into_inner();
    assert!(
        b_containers.containers.is_empty(),
        "refused orders left containers: {b_containers:?}"
    );
    run_ok(&env, order("team-a", "a-still-works", &image, &a_secret)).await?;
    assert_still_serving(&env).await
}

/// Project team-a pulls a private image with its secret. Then, with the image cached, project
/// team-b gets PERMISSION_DENIED with no secret (whatever the pull policy), with a credential
/// the registry refuses for that repository (a user without a grant on it; a wrong password),
/// and runs it with a credential the registry accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_private_image_needs_a_credential_the_registry_accepts() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Token).await?;
    let token_server = env.token_server()?;
    let no_grant = RegistryUser::generate("b-no-grant");
    token_server.add_user(&no_grant, Grants::none().pull("team/other"));
    let granted = RegistryUser::generate("b-granted");
    token_server.add_user(&granted, Grants::none().pull("team/cached"));
    let wrong_password = granted.with_wrong_password();

    let pushed = env
        .push(
            "team/cached",
            "v1",
            &TestImage::busybox(&["echo", "cached"]),
        )
        .await?;
    let image = pushed.reference();
    let registry = env.registry.addr();
    let a_secret = create_secret_in(&env, "team-a", "reg", registry, &env.user).await?;
    run_ok(&env, order("team-a", "a-pulls", &image, &a_secret)).await?;

    let mut statuses = Vec::new();
    for policy in [PullPolicy::IfNotPresent, PullPolicy::Never] {
        let mut request = order("team-b", "b-anonymous", &image, "");
        if let Some(spec) = request.container.as_mut() {
            spec.pull_policy = policy as i32;
        }
        statuses.push(expect_code(&env, request, Code::PermissionDenied).await?);
    }
    for (name, user) in [("no-grant", &no_grant), ("wrong-password", &wrong_password)] {
        let secret = create_secret_in(&env, "team-b", name, registry, user).await?;
        let status = expect_code(
            &env,
            order("team-b", &format!("b-{name}"), &image, &secret),
            Code::PermissionDenied,
        )
        .await?;
        assert!(
            status.message().contains(&secret) && status.message().contains("team/cached"),
            "the message should name the secret and repository: {status:?}"
        );
        statuses.push(status);
    }
    let mut needles = no_grant.leak_needles();
    needles.extend(granted.leak_needles());
    needles.extend(wrong_password.leak_needles());
    for status in &statuses {
        assert_no_leaks(&env, status, &needles).await?;
    }
    let b_containers = env
        .berthd
        .agent()
        .await?
        .list_containers(ListContainersRequest {
            project: "team-b".to_owned(),
        })
        .await?
        .into_inner();
    assert!(
        b_containers.containers.is_empty(),
        "refused orders left containers: {b_containers:?}"
    );

    let b_secret = create_secret_in(&env, "team-b", "granted", registry, &granted).await?;
    let container = run_ok(&env, order("team-b", "b-granted", &image, &b_secret)).await?;
    assert_eq!(container.image_digest, pushed.manifest_digest);
    assert_still_serving(&env).await
}

/// An image whose first pull was anonymous (the token server grants anonymous pull on its
/// repository) is public: every project starts it without a secret, even with policy NEVER.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_image_pulled_anonymously_starts_for_anyone() -> anyhow::Result<()> {
    let env = Env::start(RegistryKind::Token).await?;
    env.token_server()?
        .grant_anonymous(Grants::none().pull("public/app"));
    let pushed: PushedImage = env
        .push("public/app", "v1", &TestImage::busybox(&["echo", "public"]))
        .await?;
    let image = pushed.reference();
    run_ok(&env, order("team-a", "a-public", &image, "")).await?;
    run_ok(&env, order("team-b", "b-public", &image, "")).await?;
    let mut never = order("team-c", "c-public", &image, "");
    if let Some(spec) = never.container.as_mut() {
        spec.pull_policy = PullPolicy::Never as i32;
    }
    let container = run_ok(&env, never).await?;
    assert_eq!(container.image_digest, pushed.manifest_digest);
    // A private repository is still refused anonymously.
    let private = env
        .push(
            "team/private",
            "v1",
            &TestImage::busybox(&["echo", "private"]),
        )
        .await?;
    expect_code(
        &env,
        order("team-c", "c-private", &private.reference(), ""),
        Code::PermissionDenied,
    )
    .await?;
    Ok(())
}
