//! The registry side of berth: authentication against a registry's token endpoint (`auth`),
//! and the verified pull of manifests and blobs into containerd (`pull`). `auth` is the one
//! place a stored credential becomes something sent on the wire.

pub mod auth;
pub mod pull;
