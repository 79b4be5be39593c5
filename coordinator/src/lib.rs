//! Cairn's coordinator.
//!
//! Replicas serve `cairn.coordinator.v1`: high-level disk operations, each
//! composed from node agent calls ([`agents`]) under the disk's cluster
//! lock and kept as a job in the cluster store ([`ops`]), so that a job
//! outlives the replica that started it. What to do is decided by plain
//! functions ([`plan`]); the leader ([`leader`]) recovers dead hosts'
//! journals, collects their half-made volumes and takes over orphaned jobs.
#![warn(missing_docs)]

pub mod agents;
pub mod error;
pub mod leader;
pub mod ops;
pub mod plan;
pub mod server;
pub mod service;

pub use error::CoordError;
pub use ops::{CoordConfig, Coordinator};

/// Generated gRPC types of `cairn.coordinator.v1` (from `cairn-proto`).
/// They stop at the service layer.
pub use cairn_proto::coordinator as pb;
