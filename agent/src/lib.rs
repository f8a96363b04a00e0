//! berth: a per-host agent that starts containers from a scheduler's orders and pulls their private
//! OCI images with credentials that never reach the container.
//!
//! Data flow of one start order, one module per stage:
//!
//! ```text
//! api (gRPC) -> order -> secret -> auth -> pull (registry, verify) -> containerd -> spec -> run
//! ```
//!
//! - [`api`]: tonic services, proto <-> domain conversion, and the one error -> `Status` map.
//! - `order`: a validated start order; proto types stop at `api/convert.rs`.
//! - `secret`: the pull-secret store: sealed files under the state dir, or OpenBao/Vault KV v2.
//! - `auth`: answers the registry's challenge with a stored credential (docker, ACR service
//!   principal or refresh token, GAR service-account key), with an in-memory token cache.
//! - `pull`: resolves, fetches and verifies manifests and blobs while streaming them into containerd.
//! - `containerd`: content, images, snapshots, containers and tasks over containerd's gRPC API.
//! - `spec`: builds the OCI runtime spec from the image config and the order; it cannot see a
//!   credential, it takes none.
//! - `run`: drives one order through all stages; all state lives in containerd labels.
//! - `audit`: one JSON line per credential use (`audit_log`), written by its own task.
//! - `metrics`: the Prometheus exposition; `daemon`: sockets, readiness, shutdown.

pub mod api;
pub mod cmd;
pub mod config;
pub mod daemon;
pub mod telemetry;

pub(crate) mod audit;
pub(crate) mod code_name;
pub(crate) mod run;

/// Entry points for the fuzz targets in `fuzz/` (run by `scripts/fuzz.sh`): thin wrappers
/// around the parsers of untrusted input. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    /// `ImageRef::parse` (an order's image reference); the normalised name when it parses.
    pub fn image_ref(input: &str) -> Option<String> {
        let image = berth_core::order::ImageRef::parse(input).ok()?;
        let _ = (image.registry(), image.repository(), image.to_string());
        Some(image.name())
    }

    /// `auth::challenge::parse` (a registry's `WWW-Authenticate`); whether it parses.
    pub fn www_authenticate(input: &str) -> bool {
        berth_registry::auth::challenge::parse(input).is_ok()
    }

    /// `pull::manifest::parse` (a manifest or index), then platform selection on an index
    /// and the `mediaType` / `Content-Type` check; whether it parses.
    pub fn manifest(input: &[u8]) -> bool {
        use berth_registry::pull::manifest;
        let _ = manifest::check_content_type(input, Some(manifest::OCI_MANIFEST));
        match manifest::parse(input) {
            Ok(manifest::Parsed::Index(entries)) => {
                let (os, arch) = manifest::host_platform();
                let _ = manifest::select_platform(&entries, os, arch);
                true
            }
            Ok(manifest::Parsed::Manifest(_)) => true,
            Err(_) => false,
        }
    }

    /// OpenBao's `created_time` (an RFC 3339 UTC timestamp) → unix seconds.
    pub fn openbao_created_time(input: &str) -> Option<u64> {
        berth_secrets::openbao::rfc3339_unix_seconds(input)
    }

    /// The unix socket's HTTP/2 front (`api/front.rs`) on a client's byte stream; whether it
    /// was accepted, and then what the server reads.
    pub fn unix_front(input: &[u8]) -> Option<Vec<u8>> {
        crate::api::front::rewrite_all(input).ok()
    }

    /// The CLI's service YAML parser (`berth service create --file`); whether it parses.
    pub fn service_yaml(input: &str) -> bool {
        crate::cmd::service::parse_service(Path::new("fuzz.yaml"), input).is_ok()
    }
}
