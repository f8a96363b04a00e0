//! The harness tested on its own, without berthd: containerd runs our image, both registries take
//! our pushes and refuse wrong passwords, the real registry accepts our ES256 tokens, the index
//! resolves to linux/amd64, the proxy corrupts blobs, and cleanup leaves nothing behind.

use std::path::Path;

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
    assert!(String::from_utf8_lossy(&version.stdout).contains("Server:"));
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
