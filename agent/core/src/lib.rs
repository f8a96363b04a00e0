//! What every stage of berth shares, and nothing that can hold a credential: the validated
//! image reference of an order, registry host names, the Prometheus metrics, retry timing and
//! keyed locks.

pub mod host;
pub mod locks;
pub mod metrics;
pub mod order;
pub mod retry;
