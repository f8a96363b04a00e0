//! The gRPC boundary: tonic services, proto <-> domain conversion and the one error -> Status map.

mod access;
mod agent;
mod convert;
pub(crate) mod front;
mod health;
pub use berth_proto as pb;
mod secrets;
mod status;

pub(crate) use access::Access;
pub(crate) use agent::AgentService;
pub(crate) use front::UnixFront;
pub(crate) use health::Health;
pub(crate) use secrets::SecretsService;
