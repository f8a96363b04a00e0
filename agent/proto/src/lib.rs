//! The `berth.v1` gRPC messages and services, generated from `proto/berth/v1/*.proto`.
//! Generated code, hence the only place for `allow`s.
#![allow(
    missing_docs,
    clippy::all,
    missing_debug_implementations,
    rustdoc::invalid_html_tags
)]

tonic::include_proto!("berth.v1");

/// Encoded file descriptor set of `berth.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("berth_v1_descriptor");
