//! Cairn's coordinator.
//!
//! Replicas serve `cairn.coordinator.v1` ([`service`]): high-level disk
//! operations, each a job ([`jobs`]: a typed spec checked once at the
//! service boundary, with its steps, lock target, agent calls and "is it
//! done" check per kind) kept in the cluster store ([`record`]) so that it
//! outlives the replica that started it. [`runner`] runs jobs step by step
//! under the disk's cluster lock; [`exec`] is the toolkit of a step (an
//! agent call made at most once, an agent job followed to its end, the
//! domain settled); [`agents`] reaches node agents. What to do is decided
//! by plain functions ([`plan`], [`record`]); the leader ([`leader`])
//! recovers dead hosts' journals, collects their half-made volumes and
//! takes over orphaned jobs.
#![warn(missing_docs)]

pub mod agents;
pub mod catalog;
pub mod coordinator;
pub mod error;
pub mod exec;
pub mod jobs;
pub mod leader;
pub mod plan;
pub mod record;
pub mod runner;
pub mod server;
pub mod service;

pub use coordinator::{CoordConfig, Coordinator};
pub use error::CoordError;

/// Generated gRPC types of `cairn.coordinator.v1` (from `cairn-proto`).
/// They stop at the service layer.
pub use cairn_proto::coordinator as pb;
