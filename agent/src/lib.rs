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
//! - `secret`: the pull-secret store (encrypted files under the state dir).
//! - `auth`: turns a stored credential into registry authentication for one pull.
//! - `pull`: resolves, fetches and verifies manifests and blobs while streaming them into containerd.
//! - `containerd`: content, images, snapshots, containers and tasks over containerd's gRPC API.
//! - `spec`: builds the OCI runtime spec from the image config and the order; it cannot see a
//!   credential, it takes none.
//! - `run`: drives one order through all stages.

pub mod api;
pub mod cmd;
pub mod config;
pub mod daemon;
pub mod telemetry;

pub(crate) mod auth;
pub(crate) mod containerd;
pub(crate) mod metrics;
pub(crate) mod order;
pub(crate) mod pull;
pub(crate) mod run;
pub(crate) mod secret;
pub(crate) mod spec;
