//! The real cosign CLI (3.x, from `scripts/cosign.sh path`): generates key pairs, signs images in
//! the test registry offline (no Fulcio, no Rekor) in either storage scheme, and verifies them:
//! the oracle berth's verdicts are compared with.
//!
//! cosign reaches the TLS test registry through `SSL_CERT_FILE` (the test CA) and logs in with
//! a `DOCKER_CONFIG` directory of its own (`config.json` with `auths`), never the machine's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use tempfile::TempDir;

use super::ca::TestCa;
use super::credentials::RegistryUser;
use super::temp_dir;

/// How cosign stores the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// cosign 3's default: a sigstore bundle as an OCI 1.1 referrer (on distribution 2.8,
    /// through the `sha256-<hex>` tag fallback).
    Referrers,
    /// `--new-bundle-format=false`: the `sha256-<hex>.sig` tag with a simple-signing payload.
    Tag,
}

/// A cosign key pair on disk (the private key has an empty password).
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private: PathBuf,
    pub public: PathBuf,
}

/// cosign, set up to talk to one registry as one user.
#[derive(Debug)]
pub struct Cosign {
    binary: PathBuf,
    ca_file: PathBuf,
    dir: TempDir,
}

impl Cosign {
    /// Finds (fetching on first use) cosign through `scripts/cosign.sh` and writes a
    /// `DOCKER_CONFIG` with `user`'s credential for `registry`. A missing cosign fails loudly.
    pub fn new(ca: &TestCa, registry: &str, user: &RegistryUser) -> anyhow::Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cosign.sh");
        let output = Command::new("bash")
            .arg(&script)
            .arg("path")
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!(
                "{} path failed (cosign is a prerequisite of the signature tests): {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let binary = PathBuf::from(String::from_utf8(output.stdout)?.trim());
        let dir = temp_dir("cosign")?;
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", user.username, user.password));
        let config = serde_json::json!({ "auths": { registry: { "auth": auth } } });
        std::fs::write(dir.path().join("config.json"), serde_json::to_vec(&config)?)?;
        Ok(Self {
            binary,
            ca_file: ca.ca_pem_path().to_owned(),
            dir,
        })
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .current_dir(self.dir.path())
            .env("DOCKER_CONFIG", self.dir.path())
            .env("SSL_CERT_FILE", &self.ca_file)
            .env("COSIGN_PASSWORD", "")
            .env("HOME", self.dir.path())
            .env("TUF_ROOT", self.dir.path().join("tuf"));
        command
    }

    fn run(&self, command: &mut Command, what: &str) -> anyhow::Result<Output> {
        command
            .output()
            .with_context(|| format!("running cosign {what}"))
    }

    /// `cosign generate-key-pair` into this cosign's dir, named `<name>.key` / `<name>.pub`.
    pub fn generate_key_pair(&self, name: &str) -> anyhow::Result<KeyPair> {
        let prefix = self.dir.path().join(name);
        let output = self.run(
            self.command()
                .arg("generate-key-pair")
                .arg("--output-key-prefix")
                .arg(&prefix),
            "generate-key-pair",
        )?;
        if !output.status.success() {
            bail!(
                "cosign generate-key-pair failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(KeyPair {
            private: prefix.with_extension("key"),
            public: prefix.with_extension("pub"),
        })
    }

    /// `cosign sign --key` `reference` (`host/repo@sha256:...`) offline, in `scheme`.
    pub fn sign(&self, key: &KeyPair, reference: &str, scheme: Scheme) -> anyhow::Result<()> {
        let mut command = self.command();
        command.args(["sign", "--key"]).arg(&key.private).args([
            "--use-signing-config=false",
            "--tlog-upload=false",
            "-y",
        ]);
        if scheme == Scheme::Tag {
            command.arg("--new-bundle-format=false");
        }
        command.arg(reference);
        let output = self.run(&mut command, "sign")?;
        if !output.status.success() {
            bail!(
                "cosign sign {reference} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Whether `cosign verify --key <public> --insecure-ignore-tlog=true reference` accepts.
    pub fn verifies(&self, key: &KeyPair, reference: &str) -> anyhow::Result<bool> {
        let output = self.run(
            self.command()
                .args(["verify", "--key"])
                .arg(&key.public)
                .args(["--insecure-ignore-tlog=true", "--output", "json"])
                .arg(reference),
            "verify",
        )?;
        Ok(output.status.success())
    }
}
