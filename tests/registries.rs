//! ACR and GAR credentials (and Docker's, on the token registry), end to end through the CLI:
//! each kind runs a container from its own private repository, a few times with pull policy
//! Always and a single token request; is refused (PERMISSION_DENIED) on a repository it has no
//! grant for and on another kind's registry (an ACR refresh token on the Docker registry, whose
//! token server has no OAuth2 POST, in a test of its own); an expired ACR refresh token and a
//! broken GAR key are refused with messages that name the secret or field and quote no material;
//! and after ACR refresh-token and GAR runs no token or key material is anywhere berthd or
//! containerd keeps things.
//!
//! Every test has its own [`Env`] with the three token registries: Docker (`/token`), ACR
//! (`/oauth2/token`, service = its `host:port`) and GAR (`/v2/token`, no service in the challenge,
//! keys exchanged at the Google stand-in).

use std::fmt::Write as _;

use anyhow::bail;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use berth::api::pb::create_secret_request::Credential;
use berth::api::pb::{CreateSecretRequest, GarCredential};
use tokio::time::{Duration, Instant};
use tonic::Code;

use crate::harness::cli::{ServiceRun, ServiceYaml};
use crate::harness::credentials::RegistryUser;
use crate::harness::env::{is_secret_id, start_request, Env, EnvOptions, RegistryKind};
use crate::harness::image::{PushedImage, TestImage};
use crate::harness::random_lowercase;
use crate::harness::registry::Registry;
use crate::harness::token_server::acr::random_guid;
use crate::harness::token_server::{Grants, RefreshRejection, TokenEndpoint, TokenServer};
use crate::leaks::{leak_findings, needles_in, ScannedRun};

/// ACR's "this password is a refresh token" user name.
const NULL_GUID: &str = "00000000-0000-0000-0000-000000000000";

/// Orders per caching check.
const ORDERS: usize = 5;

/// What berthd assumes a token without `expires_in` lives (token.md), minus its 10 % margin: a
/// caching check that took longer proves nothing about ACR tokens (ACR sends no `expires_in`).
const ACR_CACHE_WINDOW: Duration = Duration::from_secs(54);

/// The line every test image prints.
const GREETING: &str = "hello from a cloud registry";

async fn cloud_env() -> anyhow::Result<Env> {
    Env::start_with(
        RegistryKind::Token,
        EnvOptions {
            cloud_registries: true,
            ..EnvOptions::default()
        },
    )
    .await
}

fn greeting_image() -> TestImage {
    TestImage::busybox(&["sh", "-c", &format!("env; echo {GREETING}")])
}

/// The greeting image as a service named `name` with pull policy Always (so that every order
/// pulls), run to completion through the CLI; checks the digest berthd reports.
async fn run_service(
    env: &Env,
    name: &str,
    image: &PushedImage,
    reference: &str,
    secret_id: &str,
) -> anyhow::Result<ServiceRun> {
    let service = ServiceYaml {
        name,
        image: reference,
        pull_secret: secret_id,
        pull_policy: "Always",
    };
    let run = env.cli_run_service(&service, GREETING).await?;
    assert_eq!(run.image_digest, image.manifest_digest, "{name}");
    Ok(run)
}

/// [`ORDERS`] services named `<prefix>-<n>` from `reference`; returns how long they took.
async fn run_orders(
    env: &Env,
    prefix: &str,
    image: &PushedImage,
    reference: &str,
    secret_id: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for order in 0..ORDERS {
        run_service(
            env,
            &format!("{prefix}-{order}"),
            image,
            reference,
            secret_id,
        )
        .await?;
    }
    Ok(started.elapsed())
}

/// Every order really pulled: the registry served the manifest at least [`ORDERS`] times.
fn assert_every_order_pulled(registry: &Registry, repository: &str) {
    let fetches = registry.manifests_served(repository);
    assert!(
        fetches >= ORDERS,
        "{ORDERS} orders with pull policy Always fetched {repository}'s manifest {fetches} times; registry log:\n{}",
        registry.log_text()
    );
}

/// Starts `reference` with `secret_id` over gRPC and expects PERMISSION_DENIED whose message
/// names the secret and holds none of `needles`; returns the message.
async fn expect_permission_denied(
    env: &Env,
    what: &str,
    reference: &str,
    secret_id: &str,
    needles: &[String],
) -> anyhow::Result<String> {
    let suffix = random_lowercase(8);
    let request = start_request(
        &format!("order-{suffix}"),
        &format!("denied-{suffix}"),
        reference,
        secret_id,
    );
    let status = match env.start_container(request).await? {
        Ok(container) => bail!(
            "{what}: starting {reference} with {secret_id} should be PERMISSION_DENIED, got {container:?}\nberthd log:\n{}",
            env.berthd.log_tail()
        ),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{what}: starting {reference} with {secret_id}: {status:?}\n{}",
        diagnostics(env)
    );
    let message = status.message().to_owned();
    println!("{what}: {:?} {message:?}", status.code());
    assert!(
        message.contains(secret_id),
        "{what}: the message does not name the secret {secret_id}: {message:?}"
    );
    let leaked = needles_in(message.as_bytes(), needles);
    assert!(
        leaked.is_empty(),
        "{what}: the message quotes credential material: {message:?}"
    );
    Ok(message)
}

/// What the token servers saw, and berthd's log tail, for failure messages.
fn diagnostics(env: &Env) -> String {
    let mut text = String::new();
    if let Ok(token_server) = env.token_server() {
        let _ = writeln!(
            text,
            "token requests:\n{}\ntoken server refusals: {:?}",
            token_server.request_summary(),
            token_server.refusals()
        );
    }
    if let Ok(gar) = env.gar() {
        let _ = writeln!(text, "google refusals: {:?}", gar.google.refusals());
    }
    let _ = write!(text, "berthd log:\n{}", env.berthd.log_tail());
    text
}

/// `base64(user:pass)`, as a Basic header would carry it.
fn basic(username: &str, password: &str) -> String {
    STANDARD.encode(format!("{username}:{password}"))
}

/// The token-count assertion, with the token server's counts and refusals for context.
fn assert_one_request(
    token_server: &TokenServer,
    endpoint: TokenEndpoint,
    identity: &str,
    took: Duration,
    window: Option<Duration>,
) {
    let count = token_server.requests(endpoint, identity);
    println!("{ORDERS} orders in {took:?}: {count} {endpoint:?} request(s) by {identity:?}");
    if count != 1 {
        if let Some(window) = window.filter(|window| took >= *window) {
            panic!(
                "{ORDERS} orders took {took:?}, longer than the {window:?} a token without \
                 expires_in may be cached: {count} {endpoint:?} requests by {identity:?} prove nothing"
            );
        }
    }
    assert_eq!(
        count,
        1,
        "{ORDERS} orders with one secret ({took:?}) made {count} {endpoint:?} requests as {identity:?}\n\
         all counts:\n{}\nrefusals: {:?}",
        token_server.request_summary(),
        token_server.refusals()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_secret_pulls_its_own_repository_with_one_token_request() -> anyhow::Result<()> {
    let env = cloud_env().await?;
    let token_server = env.token_server()?;
    let acr = env.acr()?;
    let puller = RegistryUser::generate("docker-puller");
    token_server.add_user(&puller, Grants::none().pull("team/docker-app"));
    let image = greeting_image();
    let own = env.push("team/docker-app", "v1", &image).await?;
    let other = env.push("team/docker-other", "v1", &image).await?;
    let on_acr = env.push_to(acr.addr(), "acr/app", "v1", &image).await?;

    let secret_id = env
        .cli_create_password_secret(
            "docker",
            "docker-puller",
            env.registry.addr(),
            &puller.username,
            &puller.password,
        )
        .await?;
    let took = run_orders(&env, "docker-app", &own, &own.reference(), &secret_id).await?;
    assert_one_request(
        token_server,
        TokenEndpoint::Docker,
        &puller.username,
        took,
        None,
    );
    assert_every_order_pulled(&env.registry, "team/docker-app");

    let needles = puller.leak_needles();
    expect_permission_denied(
        &env,
        "a Docker user on a repository it has no grant for",
        &other.reference(),
        &secret_id,
        &needles,
    )
    .await?;
    let on_acr_secret = env
        .cli_create_password_secret(
            "docker",
            "docker-puller-on-acr",
            acr.addr(),
            &puller.username,
            &puller.password,
        )
        .await?;
    expect_permission_denied(
        &env,
        "a Docker user on the ACR registry",
        &on_acr.reference(),
        &on_acr_secret,
        &needles,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acr_service_principal_pulls_its_own_repository_with_one_token_request(
) -> anyhow::Result<()> {
    let env = cloud_env().await?;
    let token_server = env.token_server()?;
    let (acr, gar) = (env.acr()?, env.gar()?);
    let principal = RegistryUser::generate(&random_guid());
    token_server.add_acr_principal(&principal, Grants::none().pull("acr/sp-app"));
    let image = greeting_image();
    let own = env.push_to(acr.addr(), "acr/sp-app", "v1", &image).await?;
    let other = env.push_to(acr.addr(), "acr/other", "v1", &image).await?;
    let on_gar = env
        .push_to(gar.registry.addr(), "berth-test/gar-repo/app", "v1", &image)
        .await?;

    let secret_id = env
        .cli_create_password_secret(
            "acr",
            "acr-sp",
            acr.addr(),
            &principal.username,
            &principal.password,
        )
        .await?;
    let took = run_orders(&env, "acr-sp-app", &own, &own.reference(), &secret_id).await?;
    assert_one_request(
        token_server,
        TokenEndpoint::AcrBasic,
        &principal.username,
        took,
        Some(ACR_CACHE_WINDOW),
    );
    assert_eq!(token_server.requests(TokenEndpoint::AcrRefresh, ""), 0);
    assert_every_order_pulled(acr, "acr/sp-app");

    let needles = principal.leak_needles();
    expect_permission_denied(
        &env,
        "an ACR service principal on a repository it has no grant for",
        &other.reference(),
        &secret_id,
        &needles,
    )
    .await?;
    let on_gar_secret = env
        .cli_create_password_secret(
            "acr",
            "acr-sp-on-gar",
            gar.addr(),
            &principal.username,
            &principal.password,
        )
        .await?;
    expect_permission_denied(
        &env,
        "an ACR service principal on the GAR registry",
        &on_gar.reference_via(gar.addr()),
        &on_gar_secret,
        &needles,
    )
    .await?;
    Ok(())
}

/// An AAD identity that may pull `repository` from the ACR registry, and its ACR refresh token
/// from `/oauth2/exchange` (as `az acr login --expose-token` gets it).
async fn acr_refresh_token(env: &Env, identity: &str, repository: &str) -> anyhow::Result<String> {
    let token_server = env.token_server()?;
    let login = token_server.add_aad_identity(identity, Grants::none().pull(repository));
    token_server
        .exchange_for_refresh_token(&env.ca, env.acr()?.addr(), &login)
        .await
}

/// The forms a refresh token must never appear in.
fn refresh_needles(refresh_token: &str) -> Vec<String> {
    vec![refresh_token.to_owned(), basic(NULL_GUID, refresh_token)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acr_refresh_token_pulls_its_own_repository_with_one_token_request() -> anyhow::Result<()>
{
    let env = cloud_env().await?;
    let token_server = env.token_server()?;
    let acr = env.acr()?;
    let image = greeting_image();
    let own = env.push_to(acr.addr(), "acr/rt-app", "v1", &image).await?;
    let other = env.push_to(acr.addr(), "acr/other", "v1", &image).await?;
    let refresh_token = acr_refresh_token(&env, "aad-puller", "acr/rt-app").await?;

    let secret_id = env
        .cli_create_password_secret("acr", "acr-rt", acr.addr(), NULL_GUID, &refresh_token)
        .await?;
    let took = run_orders(&env, "acr-rt-app", &own, &own.reference(), &secret_id).await?;
    assert_one_request(
        token_server,
        TokenEndpoint::AcrRefresh,
        "aad-puller",
        took,
        Some(ACR_CACHE_WINDOW),
    );
    assert_eq!(
        token_server.requests(TokenEndpoint::AcrBasic, NULL_GUID),
        0,
        "the refresh token was sent as a Basic password"
    );
    assert_every_order_pulled(acr, "acr/rt-app");

    let mut needles = refresh_needles(&refresh_token);
    needles.extend(token_server.issued_tokens());
    expect_permission_denied(
        &env,
        "an ACR refresh token on a repository it has no grant for",
        &other.reference(),
        &secret_id,
        &needles,
    )
    .await?;
    Ok(())
}

/// The Docker token server has no OAuth2 POST: it answers 404, which tells a client to fall back
/// to GET with Basic (protocols.md A4), where the null GUID is nobody: 401, so the registry
/// refused the credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acr_refresh_token_on_the_docker_registry_is_permission_denied() -> anyhow::Result<()> {
    let env = cloud_env().await?;
    let token_server = env.token_server()?;
    let on_docker = env.push("team/docker-app", "v1", &greeting_image()).await?;
    let refresh_token = acr_refresh_token(&env, "aad-puller", "acr/rt-app").await?;
    let secret_id = env
        .cli_create_password_secret(
            "acr",
            "acr-rt-on-docker",
            env.registry.addr(),
            NULL_GUID,
            &refresh_token,
        )
        .await?;
    let mut needles = refresh_needles(&refresh_token);
    needles.extend(token_server.issued_tokens());
    expect_permission_denied(
        &env,
        "an ACR refresh token on the Docker registry",
        &on_docker.reference(),
        &secret_id,
        &needles,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gar_key_pulls_its_own_repository_with_one_token_request() -> anyhow::Result<()> {
    let env = cloud_env().await?;
    let token_server = env.token_server()?;
    let (acr, gar) = (env.acr()?, env.gar()?);
    let account = gar.google.create_service_account("gar-puller").await?;
    token_server.grant_service_account(&account, Grants::none().pull("berth-test/gar-repo/app"));
    let image = greeting_image();
    let own = env
        .push_to(gar.registry.addr(), "berth-test/gar-repo/app", "v1", &image)
        .await?;
    let other = env
        .push_to(
            gar.registry.addr(),
            "berth-test/gar-repo/other",
            "v1",
            &image,
        )
        .await?;
    let on_acr = env.push_to(acr.addr(), "acr/app", "v1", &image).await?;

    let secret_id = env
        .cli_create_gar_secret("gar", gar.addr(), &account.json_key())
        .await?;
    let took = run_orders(
        &env,
        "gar-app",
        &own,
        &own.reference_via(gar.addr()),
        &secret_id,
    )
    .await?;
    assert!(
        gar.front.rewritten_challenges() >= 1,
        "berthd never saw the GAR challenge"
    );
    println!(
        "{ORDERS} orders in {took:?}: {} Google token request(s) by {:?}",
        gar.google.token_requests_by(&account.client_email),
        account.client_email
    );
    assert_eq!(
        gar.google.token_requests_by(&account.client_email),
        1,
        "{ORDERS} orders with one GAR key ({took:?}) made {} Google token requests; refusals: {:?}",
        gar.google.token_requests_by(&account.client_email),
        gar.google.refusals()
    );
    assert_one_request(
        token_server,
        TokenEndpoint::Gar,
        &account.client_email,
        took,
        None,
    );
    assert_every_order_pulled(&gar.registry, "berth-test/gar-repo/app");

    let mut needles = account.private_key_needles();
    for access_token in gar.google.issued_access_tokens() {
        needles.push(basic("oauth2accesstoken", &access_token));
        needles.push(access_token);
    }
    needles.extend(token_server.issued_tokens());
    expect_permission_denied(
        &env,
        "a GAR key on a repository it has no grant for",
        &other.reference_via(gar.addr()),
        &secret_id,
        &needles,
    )
    .await?;
    let on_acr_secret = env
        .cli_create_gar_secret("gar-on-acr", acr.addr(), &account.json_key())
        .await?;
    expect_permission_denied(
        &env,
        "a GAR key on the ACR registry",
        &on_acr.reference(),
        &on_acr_secret,
        &needles,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_acr_refresh_token_is_permission_denied() -> anyhow::Result<()> {
    let env = cloud_env().await?;
    let token_server = env.token_server()?;
    let acr = env.acr()?;
    let own = env
        .push_to(acr.addr(), "acr/rt-app", "v1", &greeting_image())
        .await?;
    for (identity, rejection) in [
        ("aad-expired-401", RefreshRejection::Unauthorized),
        ("aad-expired-400", RefreshRejection::InvalidGrant),
    ] {
        let refresh_token = acr_refresh_token(&env, identity, "acr/rt-app").await?;
        token_server.expire_refresh_token(&refresh_token, rejection)?;
        let secret_id = env
            .cli_create_password_secret("acr", identity, acr.addr(), NULL_GUID, &refresh_token)
            .await?;
        let mut needles = refresh_needles(&refresh_token);
        needles.extend(token_server.issued_tokens());
        let message = expect_permission_denied(
            &env,
            &format!("an expired refresh token refused with {rejection:?}"),
            &own.reference(),
            &secret_id,
            &needles,
        )
        .await?;
        assert!(
            message.contains(acr.addr()),
            "the message does not name the registry: {message:?}"
        );
        assert!(
            token_server.requests(TokenEndpoint::AcrRefresh, identity) >= 1,
            "berthd never offered the refresh token ({rejection:?}); counts:\n{}",
            token_server.request_summary()
        );
        let leaked = needles_in(env.berthd.log_text().as_bytes(), &needles);
        assert!(
            leaked.is_empty(),
            "berthd's log holds the refresh token or a registry token"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gar_key_without_client_email_is_refused_at_create() -> anyhow::Result<()> {
    let env = cloud_env().await?;
    let gar = env.gar()?;
    let account = gar.google.create_service_account("gar-broken").await?;
    let mut needles = account.private_key_needles();
    needles.push("PRIVATE KEY".to_owned());

    let path =
        env.write_private_file("no-email.json", &account.json_key_without("client_email"))?;
    let output = env
        .berthd
        .cli(
            &[
                "secret",
                "gar",
                "create",
                "--name",
                "broken",
                "--server",
                gar.addr(),
                "--json_key",
                &path.to_string_lossy(),
            ],
            None,
        )
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a key without client_email was accepted: {stdout}"
    );
    println!("berth secret gar create without client_email: {stderr}");
    assert!(
        stderr.contains("client_email"),
        "the error does not name client_email: {stderr}"
    );
    let echoed = needles_in(format!("{stdout}{stderr}").as_bytes(), &needles);
    assert!(echoed.is_empty(), "the CLI echoed the key: {echoed:?}");
    let list = env.berthd.cli_ok(&["secret", "list"], None).await?;
    assert!(
        !list.contains("broken"),
        "the broken key was stored:\n{list}"
    );

    // The API refuses each broken key with INVALID_ARGUMENT naming the field.
    let broken_pem = "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEAbroken\n-----END PRIVATE KEY-----\n";
    let cases = [
        ("client_email", account.json_key_without("client_email")),
        ("private_key", account.json_key_without("private_key")),
        ("token_uri", account.json_key_without("token_uri")),
        (
            "private_key",
            account.json_key_with("private_key", broken_pem),
        ),
        (
            "token_uri",
            account.json_key_with("token_uri", "http://oauth2.example/token"),
        ),
    ];
    let mut secrets = env.berthd.secrets().await?;
    for (index, (field, json_key)) in cases.into_iter().enumerate() {
        let refused = secrets
            .create_secret(CreateSecretRequest {
                project: String::new(),
                name: format!("broken-{index}"),
                credential: Some(Credential::Gar(GarCredential {
                    server: gar.addr().to_owned(),
                    json_key,
                })),
            })
            .await;
        let status = match refused {
            Ok(secret) => bail!("a key with a bad {field} was accepted: {secret:?}"),
            Err(status) => status,
        };
        println!("bad {field}: {:?} {:?}", status.code(), status.message());
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "the message does not name {field}: {:?}",
            status.message()
        );
        let echoed = needles_in(status.message().as_bytes(), &needles);
        assert!(echoed.is_empty(), "the message echoes the key: {echoed:?}");
    }

    // The whole key, from stdin with the `--json-key` spelling, is accepted.
    let stdout = env
        .berthd
        .cli_ok(
            &[
                "secret",
                "gar",
                "create",
                "--name",
                "whole",
                "--server",
                gar.addr(),
                "--json-key",
                "-",
            ],
            Some(&account.json_key()),
        )
        .await?;
    assert!(is_secret_id(stdout.trim()), "not a secret id: {stdout:?}");
    Ok(())
}

/// Runs the scan of [`crate::leaks`] after `run` and fails on any finding.
async fn assert_no_leaks(
    env: &Env,
    run: &ServiceRun,
    secret_id: &str,
    needles: &[String],
) -> anyhow::Result<()> {
    let findings = leak_findings(
        env,
        &ScannedRun {
            container_id: &run.id,
            order_id: &run.order_id,
            log_path: &run.log_path,
            secret_id,
            output: GREETING,
        },
        needles,
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
async fn no_acr_refresh_token_or_registry_token_leaks() -> anyhow::Result<()> {
    let env = cloud_env().await?;
    let token_server = env.token_server()?;
    let acr = env.acr()?;
    let own = env
        .push_to(acr.addr(), "acr/rt-app", "v1", &greeting_image())
        .await?;
    let refresh_token = acr_refresh_token(&env, "aad-scanned", "acr/rt-app").await?;
    let secret_id = env
        .cli_create_password_secret("acr", "acr-rt", acr.addr(), NULL_GUID, &refresh_token)
        .await?;
    let run = run_service(&env, "acr-scanned", &own, &own.reference(), &secret_id).await?;

    assert!(
        token_server.requests(TokenEndpoint::AcrRefresh, "aad-scanned") >= 1,
        "berthd never used the refresh grant; counts:\n{}",
        token_server.request_summary()
    );
    let mut needles = refresh_needles(&refresh_token);
    let tokens = token_server.issued_tokens();
    assert!(!tokens.is_empty(), "no registry token was issued");
    needles.extend(tokens);
    assert_no_leaks(&env, &run, &secret_id, &needles).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gar_key_google_token_or_registry_token_leaks() -> anyhow::Result<()> {
    let env = cloud_env().await?;
    let token_server = env.token_server()?;
    let gar = env.gar()?;
    let account = gar.google.create_service_account("gar-scanned").await?;
    token_server.grant_service_account(&account, Grants::none().pull("berth-test/gar-repo/app"));
    let own = env
        .push_to(
            gar.registry.addr(),
            "berth-test/gar-repo/app",
            "v1",
            &greeting_image(),
        )
        .await?;
    let secret_id = env
        .cli_create_gar_secret("gar", gar.addr(), &account.json_key())
        .await?;
    let run = run_service(
        &env,
        "gar-scanned",
        &own,
        &own.reference_via(gar.addr()),
        &secret_id,
    )
    .await?;

    let mut needles = account.private_key_needles();
    let access_tokens = gar.google.issued_access_tokens();
    assert!(
        !access_tokens.is_empty(),
        "no Google access token was issued"
    );
    for access_token in access_tokens {
        needles.push(basic("oauth2accesstoken", &access_token));
        needles.push(access_token);
    }
    needles.extend(gar.google.received_assertions());
    let tokens = token_server.issued_tokens();
    assert!(!tokens.is_empty(), "no registry token was issued");
    needles.extend(tokens);
    assert_no_leaks(&env, &run, &secret_id, &needles).await
}
