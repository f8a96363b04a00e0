//! Layer-level tests: real tars (built with the tar crate, or raw headers
//! for hostile names) applied to temp directories, as root.

mod entries;
mod fixture;
mod hostile;
mod stacking;
mod stream;
