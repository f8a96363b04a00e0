//! Signature policy (`[[policy]]`, `verify = "cosign"`), end to end: the real cosign CLI signs
//! images in the token-auth registry (a private registry: every signature fetch needs the
//! order's credential), in both storage schemes, and `cosign verify` is the oracle: berthd runs
//! what cosign accepts and refuses what it refuses, FAILED_PRECONDITION naming the signature,
//! the digest and the policy. Also: a policy change refuses the next start of a cached image, a
//! registry that refuses the credential for the signature gives PERMISSION_DENIED, and the
//! credential stays out of berthd's log and containerd's files.

use anyhow::Context as _;
use berth::api::pb::{PullImageRequest, PullPolicy};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use reqwest::header::HeaderValue;
use serde_json::Value;
use tonic::Code;

use crate::harness::cosign::{Cosign, KeyPair, Scheme};
use crate::harness::env::start_request;
use crate::harness::exposition::scrape;
use crate::harness::faults::{Fault, FaultProxy, Target, Times};
use crate::harness::host::{HostBerthd, HostEnvironment, OpsEnv};
use crate::harness::image::{oci_client, sha256_digest, PushedImage, TestImage};
use crate::harness::wait::wait_for;
use crate::harness::{free_local_port, random_lowercase};
use crate::leaks::{needles_in, scan_tree};

const SIG_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// `[[policy]]` for `pattern` trusting `keys`.
fn cosign_policy(pattern: &str, keys: &[&KeyPair]) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|key| serde_json::to_string(&key.public.to_string_lossy()).unwrap())
        .collect();
    format!(
        "[[policy]]\nimages = [{}]\nverify = \"cosign\"\nkeys = [{}]\n",
        serde_json::to_string(pattern).unwrap(),
        keys.join(", ")
    )
}

/// `host/repository@digest` of a pushed image (what cosign signs).
fn by_digest(image: &PushedImage) -> String {
    format!(
        "{}/{}@{}",
        image.registry, image.repository, image.manifest_digest
    )
}

async fn push(env: &OpsEnv, repository: &str, tag: &str) -> anyhow::Result<PushedImage> {
    env.push_image(
        repository,
        tag,
        &TestImage::busybox(&["echo", &format!("{repository}:{tag}")]),
    )
    .await
}

/// Rewrites the `.sig` manifest of `image` (tag scheme) with `edit` and pushes it back under the
/// same tag, uploading a new payload blob when `payload_edit` changes it.
async fn tamper_tag_signature(
    env: &OpsEnv,
    image: &PushedImage,
    payload_edit: Option<fn(&mut Vec<u8>)>,
    annotation_edit: Option<fn(&str) -> String>,
) -> anyhow::Result<()> {
    let client = oci_client(&env.ca, &[])?;
    let tag = format!(
        "{}.sig",
        image.manifest_digest.replace("sha256:", "sha256-")
    );
    let reference = Reference::with_tag(
        image.registry.clone(),
        image.repository.clone(),
        tag.clone(),
    );
    let auth = RegistryAuth::Basic(env.pusher.username.clone(), env.pusher.password.clone());
    client
        .auth(&reference, &auth, RegistryOperation::Push)
        .await?;
    let (bytes, _) = client
        .pull_manifest_raw(&reference, &auth, &[SIG_MANIFEST])
        .await
        .with_context(|| format!("pulling {reference}"))?;
    let mut manifest: Value = serde_json::from_slice(&bytes)?;
    let layer = &mut manifest["layers"][0];
    if let Some(edit) = payload_edit {
        let digest = layer["digest"].as_str().context("layer digest")?.to_owned();
        let mut payload = Vec::new();
        client
            .pull_blob(&reference, digest.as_str(), &mut payload)
            .await?;
        edit(&mut payload);
        let new_digest = sha256_digest(&payload);
        client
            .push_blob(&reference, payload.clone(), &new_digest)
            .await?;
        layer["digest"] = Value::from(new_digest);
        layer["size"] = Value::from(payload.len());
    }
    if let Some(edit) = annotation_edit {
        let annotation = &mut layer["annotations"]["dev.cosignproject.cosign/signature"];
        let old = annotation
            .as_str()
            .context("signature annotation")?
            .to_owned();
        *annotation = Value::from(edit(&old));
    }
    client
        .push_manifest_raw(
            &reference,
            serde_json::to_vec(&manifest)?,
            HeaderValue::from_static(SIG_MANIFEST),
        )
        .await
        .with_context(|| format!("pushing the altered {reference}"))?;
    Ok(())
}

/// Copies the `.sig` manifest of `from` to the `.sig` tag of `to` (same repository).
async fn copy_tag_signature(
    env: &OpsEnv,
    from: &PushedImage,
    to: &PushedImage,
) -> anyhow::Result<()> {
    let client = oci_client(&env.ca, &[])?;
    let sig_tag = |image: &PushedImage| {
        Reference::with_tag(
            image.registry.clone(),
            image.repository.clone(),
            format!(
                "{}.sig",
                image.manifest_digest.replace("sha256:", "sha256-")
            ),
        )
    };
    let auth = RegistryAuth::Basic(env.pusher.username.clone(), env.pusher.password.clone());
    let source = sig_tag(from);
    client.auth(&source, &auth, RegistryOperation::Push).await?;
    let (bytes, _) = client
        .pull_manifest_raw(&source, &auth, &[SIG_MANIFEST])
        .await?;
    client
        .push_manifest_raw(&sig_tag(to), bytes, HeaderValue::from_static(SIG_MANIFEST))
        .await?;
    Ok(())
}

/// Starts `image` under a fresh order; the refusal status, or None when it ran to exit 0.
async fn outcome(
    berthd: &HostBerthd,
    image: &str,
    secret: &str,
) -> anyhow::Result<Option<tonic::Status>> {
    let suffix = random_lowercase(8);
    let request = start_request(
        &format!("order-{suffix}"),
        &format!("sig-{suffix}"),
        image,
        secret,
    );
    match berthd.start_container(request).await? {
        Ok(container) => {
            let exited = berthd.wait_until_exited(&container.id).await?;
            anyhow::ensure!(exited.exit_code == 0, "{image} exited {}", exited.exit_code);
            Ok(None)
        }
        Err(status) => Ok(Some(status)),
    }
}

fn assert_refused(status: Option<tonic::Status>, image: &PushedImage, pattern: &str, why: &str) {
    let status = status.unwrap_or_else(|| panic!("{} ran; it must be refused", image.reference()));
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let message = status.message();
    for needle in ["signature", image.manifest_digest.as_str(), pattern, why] {
        assert!(
            message.contains(needle),
            "{}: {needle:?} missing from {message:?}",
            image.reference()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berthd_runs_what_cosign_verifies_and_refuses_what_it_refuses() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    let registry = env.registry.addr().to_owned();
    let cosign = Cosign::new(&env.ca, &registry, &env.pusher)?;
    let team = cosign.generate_key_pair("team")?;
    let second = cosign.generate_key_pair("second")?;
    let stranger = cosign.generate_key_pair("stranger")?;
    let pattern = format!("{registry}/signed/**");

    let bundle = push(&env, "signed/bundle", "v1").await?;
    cosign.sign(&team, &by_digest(&bundle), Scheme::Referrers)?;
    let tag = push(&env, "signed/tag", "v1").await?;
    cosign.sign(&team, &by_digest(&tag), Scheme::Tag)?;
    let by_second = push(&env, "signed/second", "v1").await?;
    cosign.sign(&second, &by_digest(&by_second), Scheme::Referrers)?;
    let unsigned = push(&env, "signed/unsigned", "v1").await?;
    let foreign = push(&env, "signed/foreign", "v1").await?;
    cosign.sign(&stranger, &by_digest(&foreign), Scheme::Tag)?;
    let foreign_bundle = push(&env, "signed/foreign-bundle", "v1").await?;
    cosign.sign(&stranger, &by_digest(&foreign_bundle), Scheme::Referrers)?;
    let original = push(&env, "signed/copied", "original").await?;
    cosign.sign(&team, &by_digest(&original), Scheme::Tag)?;
    let copied = push(&env, "signed/copied", "copy").await?;
    copy_tag_signature(&env, &original, &copied).await?;
    let payload = push(&env, "signed/payload", "v1").await?;
    cosign.sign(&team, &by_digest(&payload), Scheme::Tag)?;
    tamper_tag_signature(
        &env,
        &payload,
        Some(|payload: &mut Vec<u8>| {
            // "cosign container image signature" -> "cosign container image signaturf"
            let at = payload
                .windows(9)
                .position(|window| window == b"signature")
                .expect("the payload names its type");
            payload[at + 8] = b'f';
        }),
        None,
    )
    .await?;
    let signature = push(&env, "signed/signature", "v1").await?;
    cosign.sign(&team, &by_digest(&signature), Scheme::Tag)?;
    tamper_tag_signature(
        &env,
        &signature,
        None,
        Some(|old: &str| {
            // One byte of s changed: still DER, no longer the signer's signature.
            let mut bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, old)
                .expect("cosign writes base64");
            let last = bytes.len() - 1;
            bytes[last] ^= 0x01;
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
        }),
    )
    .await?;
    let unchecked = push(&env, "unchecked/app", "v1").await?;

    // The oracle.
    let verifies = |key: &KeyPair, image: &PushedImage| cosign.verifies(key, &by_digest(image));
    for image in [&bundle, &tag] {
        assert!(
            verifies(&team, image)?,
            "cosign refuses {}",
            image.reference()
        );
    }
    assert!(verifies(&second, &by_second)?);
    for image in [
        &unsigned,
        &foreign,
        &foreign_bundle,
        &copied,
        &payload,
        &signature,
    ] {
        for key in [&team, &second] {
            assert!(
                !verifies(key, image)?,
                "cosign accepts {}",
                image.reference()
            );
        }
    }

    let mut config = env.host_config();
    config.metrics_listen = format!("127.0.0.1:{}", free_local_port()?);
    config.tables_toml = cosign_policy(&pattern, &[&team, &second]);
    let audit_path = env.scratch_dir().join("audit.log");
    config.top_level_toml = format!("audit_log = {:?}", audit_path.to_string_lossy());
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let secret = berthd
        .create_docker_secret("reg", &registry, &env.user)
        .await?;

    for image in [&bundle, &tag, &by_second, &unchecked] {
        let status = outcome(&berthd, &image.reference(), &secret).await?;
        assert!(
            status.is_none(),
            "{} was refused: {status:?}\n{}",
            image.reference(),
            berthd.log_tail()
        );
    }
    for (image, why) in [
        (&unsigned, "no signature found"),
        (&foreign, "unknown key"),
        (&foreign_bundle, "unknown key"),
        (&copied, "another digest"),
        (&payload, "unknown key"),
        (&signature, "unknown key"),
    ] {
        let status = outcome(&berthd, &image.reference(), &secret).await?;
        assert_refused(status, image, &pattern, why);
    }
    // A refused image left no image record (and no container: the start failed before one).
    let images = env.containerd.ctr_ok(&["images", "ls", "-q"]).await?;
    for image in [&unsigned, &foreign, &copied, &payload, &signature] {
        assert!(
            !images.contains(&image.repository),
            "{} has an image record:\n{images}",
            image.reference()
        );
    }
    assert!(images.contains("signed/bundle"), "{images}");

    // `berth pull` says so.
    let pulled = berthd
        .cli_ok(&["pull", &tag.reference(), "--pull-secret", &secret], None)
        .await?;
    assert!(pulled.contains("signature verified"), "{pulled}");

    // ExplainPull checks the same way: verified, or the refusal a pull would give.
    let explain = |image: &PushedImage| {
        let request = PullImageRequest {
            project: String::new(),
            image: image.reference(),
            pull_secret: secret.clone(),
        };
        async {
            anyhow::Ok(
                berthd
                    .agent()
                    .await?
                    .explain_pull(request)
                    .await?
                    .into_inner(),
            )
        }
    };
    let plan = explain(&by_second).await?;
    assert_eq!(plan.policy, pattern);
    assert_eq!(plan.signature, "verified");
    let plan = explain(&unsigned).await?;
    assert_eq!(plan.policy, pattern);
    for part in [
        "signature",
        "no signature found",
        unsigned.manifest_digest.as_str(),
    ] {
        assert!(plan.signature.contains(part), "{plan:?}");
    }
    let plan = explain(&unchecked).await?;
    assert_eq!(
        (plan.policy.as_str(), plan.signature.as_str()),
        ("", "not required")
    );

    // Each signature fetch is an audit line (written by the audit log's own task: waited for).
    let signature_line = |lines: &[Value], repository: &str, result: &str| {
        lines.iter().any(|line| {
            line["action"] == "signature"
                && line["repository"] == repository
                && line["result"] == result
                && line["credential"] == secret.as_str()
        })
    };
    let lines: Vec<Value> = wait_for(
        "the signature audit lines",
        std::time::Duration::from_secs(10),
        || {
            let audit_path = &audit_path;
            async move {
                let audit = std::fs::read_to_string(audit_path)?;
                // A line being written may be cut short at the end: it is read again.
                let lines: Vec<Value> = audit
                    .lines()
                    .filter_map(|line| serde_json::from_str(line).ok())
                    .collect();
                let both = signature_line(&lines, "signed/bundle", "ok")
                    && signature_line(&lines, "signed/unsigned", "FAILED_PRECONDITION");
                Ok(both.then_some(lines))
            }
        },
    )
    .await?;
    assert!(!lines
        .iter()
        .any(|line| line["action"] == "signature" && line["repository"] == "unchecked/app"));

    let (_, metrics) = scrape(berthd.metrics_addr()).await?;
    let count = |result: &str| {
        metrics
            .value("berth_signature_verifications_total", &[("result", result)])
            .unwrap_or(0.0)
    };
    assert!(
        count("verified") >= 4.0,
        "{:?}",
        metrics.lines_starting("berth_signature")
    );
    assert!(count("no_signature") >= 1.0);
    assert!(count("unknown_key") >= 4.0);
    assert!(count("wrong_digest") >= 1.0);

    // The leak scan: the credential and every token issued stay out of berthd's log and every
    // file containerd keeps.
    let mut needles = env.user.leak_needles();
    needles.extend(env.token_server.issued_tokens());
    let mut findings = Vec::new();
    for found in needles_in(berthd.log_text().as_bytes(), &needles) {
        findings.push(format!("berthd log: {found}"));
    }
    scan_tree(env.containerd.dir(), &needles, &mut findings)?;
    assert!(findings.is_empty(), "leaked:\n{}", findings.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_image_is_refused_once_the_policy_trusts_another_key() -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    let registry = env.registry.addr().to_owned();
    let cosign = Cosign::new(&env.ca, &registry, &env.pusher)?;
    let old_key = cosign.generate_key_pair("old")?;
    let new_key = cosign.generate_key_pair("new")?;
    let pattern = format!("{registry}/team/**");
    let image = push(&env, "team/app", "v1").await?;
    cosign.sign(&old_key, &by_digest(&image), Scheme::Referrers)?;

    let mut config = env.host_config();
    config.tables_toml = cosign_policy(&pattern, &[&old_key]);
    let mut berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let secret = berthd
        .create_docker_secret("reg", &registry, &env.user)
        .await?;
    berthd
        .run_to_completion(&image.reference(), &secret, PullPolicy::IfNotPresent)
        .await?;
    berthd.terminate(std::time::Duration::from_secs(20)).await?;

    // The operator rotates the key: berthd restarts with the new config on the same containerd.
    config.tables_toml = cosign_policy(&pattern, &[&new_key]);
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let secret = berthd
        .create_docker_secret("reg", &registry, &env.user)
        .await?;
    for policy in [PullPolicy::IfNotPresent, PullPolicy::Never] {
        let suffix = random_lowercase(8);
        let mut request = start_request(
            &format!("order-{suffix}"),
            &format!("cached-{suffix}"),
            &image.reference(),
            &secret,
        );
        if let Some(spec) = request.container.as_mut() {
            spec.pull_policy = policy as i32;
        }
        let status = berthd.start_container(request).await?.err();
        assert_refused(status, &image, &pattern, "unknown key");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_refuses_the_credential_for_the_signature_is_permission_denied(
) -> anyhow::Result<()> {
    let env = OpsEnv::start().await?;
    let registry = env.registry.addr().to_owned();
    let cosign = Cosign::new(&env.ca, &registry, &env.pusher)?;
    let key = cosign.generate_key_pair("team")?;
    let image = push(&env, "team/app", "v1").await?;
    cosign.sign(&key, &by_digest(&image), Scheme::Tag)?;
    let proxy = FaultProxy::start(&env.ca, &registry).await?;
    proxy.inject(
        Target::PathContains("/manifests/sha256-".to_owned()),
        Fault::Status {
            code: 403,
            retry_after_seconds: None,
        },
        Times::Always,
    );
    let mut config = env.host_config();
    config.plain_http = vec![proxy.addr().to_owned()];
    config.tables_toml = cosign_policy(&format!("{}/team/**", proxy.addr()), &[&key]);
    let berthd = HostBerthd::start(&config, &HostEnvironment::default()).await?;
    let secret = berthd
        .create_docker_secret("reg", proxy.addr(), &env.user)
        .await?;
    let status = outcome(&berthd, &image.reference_via(proxy.addr()), &secret)
        .await?
        .context("the image ran although its signature could not be read")?;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&secret), "{status:?}");
    Ok(())
}
