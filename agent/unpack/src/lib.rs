//! Applies OCI image layers to a directory, streaming and verified, and
//! never writing outside that directory.
//!
//! berthd feeds a layer to [`apply::apply_layer`] while it downloads: the
//! blob is hashed and counted against its descriptor
//! ([`verify::VerifyingReader`]), inflated ([`compression`]), hashed again as
//! a tar against its diff id, and its entries are written into the target
//! (a snapshot's overlay upperdir, or a mounted tree) with whiteouts in the
//! form that target needs.
//!
//! Flow, one module per step:
//! - [`digest`]: `sha256:` digests.
//! - [`verify`]: the verifying readers on the compressed and uncompressed
//!   streams.
//! - [`compression`]: media types and the decoders.
//! - `resolve`: entry-name normalization and in-root path resolution with
//!   `openat2(RESOLVE_IN_ROOT)`.
//! - `entry`: one tar entry, created with `*at` calls and its metadata.
//! - `whiteout`: whiteouts and opaque directories, overlay or tree form.
//! - [`apply`]: the driver, the public types and the error precedence.
//! - [`error`]: [`error::ApplyError`] and its coarse kind.

pub mod apply;
pub mod compression;
pub mod digest;
mod entry;
pub mod error;
mod resolve;
pub mod verify;
mod whiteout;

#[cfg(test)]
mod tests;
