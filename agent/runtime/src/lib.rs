//! The container runtime side of berth: containerd's gRPC API (content, images, leases,
//! snapshots, containers, tasks) and the OCI runtime spec built from an image config and an
//! order.
//!
//! No dependency of this crate can name a credential: it depends on no berth crate and on
//! neither `secrecy` nor `zeroize` (`scripts/check-layers.py` keeps it so), so a spec or a
//! containerd record that holds a pull secret does not compile.

pub mod containerd;
pub mod spec;
