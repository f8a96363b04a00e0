//! The harness tested on its own, without berthd: containerd runs our image, both registries take
//! our pushes and refuse wrong passwords, the real registry accepts our ES256 tokens, the index
//! resolves to linux/amd64, the proxy corrupts blobs, and cleanup leaves nothing behind.

use std::path::Path;

use anyhow::Context as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;

use crate::harness::ca::TestCa;
use crate::harness::containerd::Containerd;
use crate::harness::credentials::RegistryUser;
use crate::harness::grpcurl::grpcurl_path;
use crate::harness::image::{pull_image, push_image, TestImage};
use crate::harness::proxy::CorruptingProxy;
use crate::harness::registry::Registry;
use crate::harness::token_server::{Grants, TokenServer};

/// Whether any process's command line mentions `needle`.
fn process_mentions(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.bytes().all(|byte| byte.is_ascii_digit()))
        })
        .filter(|entry| entry.file_name().to_str() != Some(&std::process::id().to_string()))
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .any(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_runs_the_test_image_and_cleans_up_on_drop() -> anyhow::Result<()> {
    let containerd = Containerd::start().await?;
    let version = containerd.ctr(containerd.namespace(), &["version"]).await?;
    assert!(version.status.success(), "ctr version: {version:?}");
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    // The server is the build BERTH_TEST_CONTAINERD_DIR picked (or the system's), not another.
    let server = version
        .split("Server:")
        .nth(1)
        .with_context(|| format!("no Server: in ctr version:\n{version}"))?;
    let build = containerd.build();
    assert!(
        server.contains(&build.version_text),
        "the test containerd is not {}:\n{version}",
        build.version_text
    );
    // Its own config version is read without a migration warning.
    assert!(
        !containerd.log_text().contains("migrat"),
        "{}",
        containerd.log_text()
    );
    assert!(
        containerd
            .log_text()
            .contains("containerd successfully booted"),
        "{}",
        containerd.log_text()
    );
    let plugins = containerd.ctr_ok(&["plugins", "ls"]).await?;
    assert!(
        plugins
            .lines()
            .any(|line| line.contains(" overlayfs ") && line.trim_end().ends_with("ok")),
        "the overlayfs snapshotter must work in {}:\n{plugins}",
        containerd.dir().display()
    );

    // Our image, imported from an OCI layout archive, runs with overlayfs and runc.
    let name = "localhost/berth-selftest:v1";
    let archive_path = containerd.dir().join("image.tar");
    let image = TestImage::busybox(&["sh", "-c", "echo hello from $(cat /proc/1/comm)"]).in_index();
    std::fs::write(&archive_path, image.oci_archive(name)?)?;
    let archive = archive_path.to_string_lossy().into_owned();
    containerd
        .ctr_ok(&["images", "import", "--all-platforms", &archive])
        .await?;
    let output = containerd
        .ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "overlayfs",
            name,
            "selftest-run",
        ])
        .await?;
    assert_eq!(output.trim(), "hello from sh");

    // A container left running is gone, with its shim, once the harness drops.
    containerd
        .ctr_ok(&["run", "-d", name, "selftest-sleeper", "sleep", "600"])
        .await?;
    let tasks = containerd.ctr_ok(&["tasks", "ls"]).await?;
    assert!(
        tasks.contains("selftest-sleeper") && tasks.contains("RUNNING"),
        "{tasks}"
    );
    let dir = containerd.dir().to_owned();
    let namespace = containerd.namespace().to_owned();
    drop(containerd);
    assert!(
        !process_mentions(&dir.to_string_lossy()),
        "a shim outlived the harness"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
    assert!(!Path::new("/run/containerd/runc").join(namespace).exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_registry_takes_pushes_and_refuses_wrong_passwords() -> anyhow::Result<()> {
    let ca = TestCa::generate()?;
    let alice = RegistryUser::generate("alice");
    let registry = Registry::start_htpasswd(&ca, &[&alice]).await?;
    let image = TestImage::busybox(&["echo", "hi"]);
    let pushed = push_image(
        &ca,
        registry.addr(),
        "selftest/busybox",
        "v1",
        &alice,
        &image,
    )
    .await?;

    let pulled = pull_image(&ca, &pushed.reference(), Some(&alice), &[]).await?;
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    assert_eq!(pulled.layers, 1);
    assert_eq!(pulled.cmd, ["echo", "hi"]);
    let registry_log = registry.log_text();
    assert!(
        registry_log.contains("/v2/selftest/busybox/manifests/v1"),
        "the pull is not in the registry's log:\n{registry_log}"
    );

    let wrong = alice.with_wrong_password();
    if let Ok(pulled) = pull_image(&ca, &pushed.reference(), Some(&wrong), &[]).await {
        panic!("a wrong password pulled {pulled:?}");
    }
    if let Ok(pulled) = pull_image(&ca, &pushed.reference(), None, &[]).await {
        panic!("an anonymous client pulled {pulled:?}");
    }
    Ok(())
}

/// The claims of a JWT, unverified.
fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_registry_accepts_our_es256_tokens() -> anyhow::Result<()> {
    let ca = TestCa::generate()?;
    let alice = RegistryUser::generate("alice");
    let pusher = RegistryUser::generate("pusher");
    let mallory = RegistryUser::generate("mallory");
    let token_server = TokenServer::start(
        &ca,
        &[
            (&alice, Grants::none().pull("selftest/busybox")),
            (&pusher, Grants::none().push_all()),
            (&mallory, Grants::none()),
        ],
    )
    .await?;
    let registry = Registry::start_token(&ca, &token_server).await?;
    let image = TestImage::busybox(&["echo", "hi"]);

    // Pushing needs push tokens the registry accepts.
    let pushed = push_image(
        &ca,
        registry.addr(),
        "selftest/busybox",
        "v1",
        &pusher,
        &image,
    )
    .await?;
    assert!(token_server.requests_by("pusher") >= 1);

    let pulled = pull_image(&ca, &pushed.reference(), Some(&alice), &[]).await?;
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    assert!(token_server.requests_by("alice") >= 1);

    if let Ok(pulled) = pull_image(
        &ca,
        &pushed.reference(),
        Some(&alice.with_wrong_password()),
        &[],
    )
    .await
    {
        panic!("a wrong password pulled {pulled:?}");
    }
    let before = token_server.requests_by("mallory");
    if let Ok(pulled) = pull_image(&ca, &pushed.reference(), Some(&mallory), &[]).await {
        panic!("a user without access pulled {pulled:?}");
    }
    assert!(token_server.requests_by("mallory") > before);
    if let Ok(pulled) = pull_image(&ca, &pushed.reference(), None, &[]).await {
        panic!("an anonymous client pulled {pulled:?}");
    }

    // The token endpoint itself: 401 for a wrong password, an empty grant for no access.
    let client = ca.http_client()?;
    let url = format!(
        "{}?service={}&scope=repository:selftest/busybox:pull",
        token_server.realm(),
        token_server.service()
    );
    let refused = client
        .get(&url)
        .basic_auth("alice", Some("not-the-password"))
        .send()
        .await?;
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
    let granted: Value = client
        .get(&url)
        .basic_auth(&mallory.username, Some(&mallory.password))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(granted["token"], granted["access_token"]);
    assert_eq!(granted["expires_in"], 300);
    let token = granted["token"].as_str().unwrap();
    let header = jwt_part(token, 0);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"].as_str().unwrap().len(), 59);
    let claims = jwt_part(token, 1);
    assert_eq!(claims["aud"], token_server.service());
    assert!(claims["exp"].is_u64() && claims["nbf"].is_u64() && claims["iat"].is_u64());
    assert_eq!(claims["access"], serde_json::json!([]));
    assert!(token_server
        .issued_tokens()
        .iter()
        .any(|issued| issued == token));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_resolves_to_the_amd64_manifest() -> anyhow::Result<()> {
    let ca = TestCa::generate()?;
    let alice = RegistryUser::generate("alice");
    let registry = Registry::start_htpasswd(&ca, &[&alice]).await?;
    let image = TestImage::busybox(&["echo hi"])
        .with_entrypoint(&["sh", "-c"])
        .in_index();
    let pushed = push_image(&ca, registry.addr(), "selftest/multi", "v1", &alice, &image).await?;
    let index_digest = pushed.index_digest.clone().unwrap();
    assert_ne!(index_digest, pushed.manifest_digest);

    let pulled = pull_image(&ca, &pushed.reference(), Some(&alice), &[]).await?;
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    assert_eq!(pulled.cmd, ["echo hi"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_corrupts_blobs_and_nothing_else() -> anyhow::Result<()> {
    let ca = TestCa::generate()?;
    let alice = RegistryUser::generate("alice");
    let registry = Registry::start_htpasswd(&ca, &[&alice]).await?;
    let image = TestImage::busybox(&["echo", "hi"]);
    let pushed = push_image(
        &ca,
        registry.addr(),
        "selftest/busybox",
        "v1",
        &alice,
        &image,
    )
    .await?;
    let proxy = CorruptingProxy::start(&ca, registry.addr()).await?;

    let through_proxy = pushed.reference_via(proxy.addr());
    let client = crate::harness::image::oci_client(&ca, &[proxy.addr()])?;
    let reference: oci_client::Reference = through_proxy.parse()?;
    let auth =
        oci_client::secrets::RegistryAuth::Basic(alice.username.clone(), alice.password.clone());
    let (_, manifest_digest) = client.pull_manifest(&reference, &auth).await?;
    assert_eq!(manifest_digest, pushed.manifest_digest);
    assert_eq!(proxy.corrupted_blobs(), 0);

    match pull_image(&ca, &through_proxy, Some(&alice), &[proxy.addr()]).await {
        Ok(pulled) => panic!("a corrupted image pulled cleanly: {pulled:?}"),
        Err(failure) => assert!(
            format!("{failure:#}").to_lowercase().contains("digest"),
            "expected a digest mismatch, got {failure:#}"
        ),
    }
    assert!(proxy.corrupted_blobs() >= 1);

    // A ranged GET (206, as resumable pullers ask) is corrupted too, and keeps its length.
    let http = reqwest::Client::new();
    let base = format!("http://{}/v2/selftest/busybox", proxy.addr());
    let manifest: Value = http
        .get(format!("{base}/manifests/v1"))
        .header("Accept", crate::harness::image::MANIFEST_MEDIA_TYPE)
        .basic_auth(&alice.username, Some(&alice.password))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
    let layer_size = manifest["layers"][0]["size"].as_u64().unwrap();
    let before = proxy.corrupted_blobs();
    let ranged = http
        .get(format!("{base}/blobs/{layer_digest}"))
        .header("Range", "bytes=0-")
        .basic_auth(&alice.username, Some(&alice.password))
        .send()
        .await?
        .error_for_status()?;
    assert!(ranged.status().is_success());
    let body = ranged.bytes().await?;
    assert_eq!(u64::try_from(body.len())?, layer_size);
    assert_ne!(crate::harness::image::sha256_digest(&body), layer_digest);
    assert_eq!(proxy.corrupted_blobs(), before + 1);
    Ok(())
}

#[tokio::test]
async fn grpcurl_is_installed() -> anyhow::Result<()> {
    let output = tokio::process::Command::new(grpcurl_path()?)
        .arg("-version")
        .output()
        .await?;
    let version = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(version.contains("grpcurl"), "{version}");
    Ok(())
}

/// `GET https://{registry}/v2/{repository}/manifests/{tag}` with `Authorization: Bearer {token}`.
async fn manifest_status(
    client: &reqwest::Client,
    registry: &str,
    repository: &str,
    tag: &str,
    token: &str,
) -> anyhow::Result<reqwest::StatusCode> {
    Ok(client
        .get(format!(
            "https://{registry}/v2/{repository}/manifests/{tag}"
        ))
        .header("Accept", crate::harness::image::MANIFEST_MEDIA_TYPE)
        .bearer_auth(token)
        .send()
        .await?
        .status())
}

/// The challenge a registry answers `GET /v2/` with.
async fn challenge(client: &reqwest::Client, registry: &str) -> anyhow::Result<String> {
    let response = client.get(format!("https://{registry}/v2/")).send().await?;
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);
    Ok(response
        .headers()
        .get("www-authenticate")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acr_registry_accepts_tokens_from_the_basic_and_refresh_grants() -> anyhow::Result<()> {
    use crate::harness::token_server::acr::random_guid;
    use crate::harness::token_server::{RefreshRejection, TokenEndpoint};

    let ca = TestCa::generate()?;
    let pusher = RegistryUser::generate("pusher");
    let token_server = TokenServer::start(&ca, &[]).await?;
    token_server.add_acr_principal(&pusher, Grants::none().push_all());
    let registry = Registry::start_acr(&ca, &token_server).await?;
    let image = TestImage::busybox(&["echo", "hi"]);
    for repository in ["acr/app", "acr/other"] {
        push_image(&ca, registry.addr(), repository, "v1", &pusher, &image).await?;
    }
    let client = ca.http_client()?;
    assert_eq!(
        challenge(&client, registry.addr()).await?,
        format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            token_server.acr_realm(),
            registry.addr()
        )
    );

    // A service principal: Basic on GET; `{"access_token"}` only, as ACR documents.
    let principal = RegistryUser::generate(&random_guid());
    token_server.add_acr_principal(&principal, Grants::none().pull("acr/app"));
    let answer: Value = client
        .get(token_server.acr_realm())
        .query(&[
            ("service", registry.addr()),
            ("scope", "repository:acr/app:pull"),
        ])
        .basic_auth(&principal.username, Some(&principal.password))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert!(answer.get("token").is_none() && answer.get("expires_in").is_none());
    let token = answer["access_token"].as_str().unwrap();
    assert_eq!(jwt_part(token, 1)["aud"], registry.addr());
    let ok = manifest_status(&client, registry.addr(), "acr/app", "v1", token).await?;
    assert_eq!(ok, reqwest::StatusCode::OK);
    let denied = manifest_status(&client, registry.addr(), "acr/other", "v1", token).await?;
    assert_eq!(denied, reqwest::StatusCode::UNAUTHORIZED);
    let refused = client
        .get(token_server.acr_realm())
        .query(&[("service", registry.addr())])
        .basic_auth(&principal.username, Some("wrong"))
        .send()
        .await?;
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(
        token_server.requests(TokenEndpoint::AcrBasic, &principal.username),
        2
    );

    // AAD token -> refresh token -> access token (scopes space-separated and repeated).
    let login = token_server.add_aad_identity("aad-user", Grants::none().pull("acr/app"));
    let refresh_token = token_server
        .exchange_for_refresh_token(&ca, registry.addr(), &login)
        .await?;
    assert_eq!(jwt_part(&refresh_token, 1)["aud"], registry.addr());
    let refresh = |refresh_token: String| {
        let client = client.clone();
        let realm = token_server.acr_realm();
        let service = registry.addr().to_owned();
        async move {
            client
                .post(realm)
                .form(&[
                    ("grant_type", "refresh_token"),
                    ("service", service.as_str()),
                    ("scope", "repository:acr/other:pull repository:acr/app:pull"),
                    ("scope", "repository:acr/app:push"),
                    ("refresh_token", refresh_token.as_str()),
                ])
                .send()
                .await
        }
    };
    let answer: Value = refresh(refresh_token.clone())
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = answer["access_token"].as_str().unwrap();
    assert_eq!(
        jwt_part(token, 1)["access"],
        serde_json::json!([{"type": "repository", "name": "acr/app", "actions": ["pull"]}])
    );
    let ok = manifest_status(&client, registry.addr(), "acr/app", "v1", token).await?;
    assert_eq!(ok, reqwest::StatusCode::OK);
    assert_eq!(
        token_server.requests(TokenEndpoint::AcrRefresh, "aad-user"),
        1
    );
    assert_eq!(
        token_server.requests(TokenEndpoint::AcrExchange, "aad-user"),
        1
    );

    let unknown = refresh("not-a-refresh-token".to_owned()).await?;
    assert_eq!(unknown.status(), reqwest::StatusCode::UNAUTHORIZED);
    token_server.expire_refresh_token(&refresh_token, RefreshRejection::InvalidGrant)?;
    let expired = refresh(refresh_token.clone()).await?;
    assert_eq!(expired.status(), reqwest::StatusCode::BAD_REQUEST);
    assert_eq!(expired.json::<Value>().await?["error"], "invalid_grant");
    token_server.expire_refresh_token(&refresh_token, RefreshRejection::Unauthorized)?;
    let expired = refresh(refresh_token.clone()).await?;
    assert_eq!(expired.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert!(expired.json::<Value>().await?["errors"].is_array());
    assert_eq!(token_server.issued_refresh_tokens(), vec![refresh_token]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gar_front_hides_the_service_and_its_realm_takes_google_access_tokens() -> anyhow::Result<()>
{
    use crate::harness::google::{GoogleOAuth, CLOUD_PLATFORM_SCOPE, JWT_BEARER_GRANT};
    use crate::harness::proxy::ServicelessFront;
    use crate::harness::token_server::TokenEndpoint;

    let ca = TestCa::generate()?;
    let pusher = RegistryUser::generate("pusher");
    let google = GoogleOAuth::start(&ca).await?;
    let token_server = TokenServer::start(&ca, &[]).await?;
    token_server.trust_google(&google)?;
    token_server.add_gar_user(&pusher, Grants::none().push_all());
    let registry = Registry::start_gar(&ca, &token_server).await?;
    let front = ServicelessFront::start(&ca, registry.addr()).await?;
    let image = TestImage::busybox(&["echo", "hi"]);
    for repository in ["proj/repo/app", "proj/repo/other"] {
        push_image(&ca, registry.addr(), repository, "v1", &pusher, &image).await?;
    }
    let client = ca.http_client()?;
    assert_eq!(
        challenge(&client, front.addr()).await?,
        format!("Bearer realm=\"{}\"", token_server.gar_realm())
    );
    assert_eq!(front.rewritten_challenges(), 1);

    let account = google.create_service_account("puller").await?;
    token_server.grant_service_account(&account, Grants::none().pull("proj/repo/app"));
    let key: Value = serde_json::from_str(&account.json_key())?;
    assert_eq!(key["type"], "service_account");
    assert_eq!(key["token_uri"], google.token_uri());
    assert!(key["private_key"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----\n"));
    let needles = account.private_key_needles();
    assert_eq!(needles.len(), 3);
    assert!(needles
        .iter()
        .all(|needle| needle.len() == 40 && account.json_key().contains(needle.as_str())));
    assert!(!format!("{account:?}").contains(&needles[0]));

    let post = |assertion: String, grant_type: &'static str| {
        let client = client.clone();
        let url = google.token_uri().to_owned();
        async move {
            client
                .post(url)
                .form(&[
                    ("grant_type", grant_type),
                    ("assertion", assertion.as_str()),
                ])
                .send()
                .await
        }
    };
    let answer: Value = post(account.assertion()?, JWT_BEARER_GRANT)
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(answer["expires_in"], 3599);
    assert_eq!(answer["token_type"], "Bearer");
    let access_token = answer["access_token"].as_str().unwrap();
    assert!(access_token.starts_with("ya29."));

    // The realm: no service, Basic oauth2accesstoken:<access token>.
    let answer: Value = client
        .get(token_server.gar_realm())
        .query(&[("scope", "repository:proj/repo/app:pull")])
        .basic_auth("oauth2accesstoken", Some(access_token))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = answer["token"].as_str().unwrap();
    assert_eq!(jwt_part(token, 1)["aud"], token_server.gar_service());
    assert_eq!(jwt_part(token, 1)["sub"], account.client_email.as_str());
    let ok = manifest_status(&client, front.addr(), "proj/repo/app", "v1", token).await?;
    assert_eq!(ok, reqwest::StatusCode::OK);
    let denied = manifest_status(&client, front.addr(), "proj/repo/other", "v1", token).await?;
    assert_eq!(denied, reqwest::StatusCode::UNAUTHORIZED);
    let unknown = client
        .get(token_server.gar_realm())
        .basic_auth("oauth2accesstoken", Some("ya29.made-up"))
        .send()
        .await?;
    assert_eq!(unknown.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert_eq!(
        token_server.requests(TokenEndpoint::Gar, &account.client_email),
        1
    );

    // Assertions Google refuses: each one claim off.
    let stranger = google.create_service_account("stranger").await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = |aud: &str, scope: &str, iat: u64, exp: u64| serde_json::json!({"iss": account.client_email, "scope": scope, "aud": aud, "iat": iat, "exp": exp});
    let header = serde_json::json!({"typ": "JWT", "kid": account.private_key_id});
    let uri = google.token_uri();
    let bad = [
        (
            "another audience",
            account.sign_jwt(
                &header,
                &claims(
                    "https://oauth2.googleapis.com/token",
                    CLOUD_PLATFORM_SCOPE,
                    now,
                    now + 3600,
                ),
            )?,
        ),
        (
            "no cloud-platform scope",
            account.sign_jwt(
                &header,
                &claims(
                    uri,
                    "https://www.googleapis.com/auth/devstorage.read_only",
                    now,
                    now + 3600,
                ),
            )?,
        ),
        (
            "longer than an hour",
            account.sign_jwt(&header, &claims(uri, CLOUD_PLATFORM_SCOPE, now, now + 3601))?,
        ),
        (
            "expired",
            account.sign_jwt(
                &header,
                &claims(uri, CLOUD_PLATFORM_SCOPE, now - 7200, now - 3600),
            )?,
        ),
        (
            "another key",
            stranger.sign_jwt(
                &serde_json::json!({"typ": "JWT"}),
                &claims(uri, CLOUD_PLATFORM_SCOPE, now, now + 3600),
            )?,
        ),
        (
            "another kid",
            account.sign_jwt(
                &serde_json::json!({"kid": stranger.private_key_id}),
                &claims(uri, CLOUD_PLATFORM_SCOPE, now, now + 3600),
            )?,
        ),
    ];
    for (what, assertion) in bad {
        let refused = post(assertion, JWT_BEARER_GRANT).await?;
        assert_eq!(refused.status(), reqwest::StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(
            refused.json::<Value>().await?["error"],
            "invalid_grant",
            "{what}"
        );
    }
    let wrong_grant = post(account.assertion()?, "client_credentials").await?;
    assert_eq!(wrong_grant.status(), reqwest::StatusCode::BAD_REQUEST);
    assert_eq!(
        wrong_grant.json::<Value>().await?["error"],
        "unsupported_grant_type"
    );
    assert_eq!(google.token_requests_by(&account.client_email), 8);
    assert_eq!(google.issued_access_tokens().len(), 1);
    assert_eq!(google.refusals().len(), 7, "{:?}", google.refusals());
    Ok(())
}
