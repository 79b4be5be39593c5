//! Cairn's node agent.
//!
//! The agent opens the storage domains its host sees, claims a host slot
//! on each, and serves the domain's repository operations, activation and
//! the data path over gRPC (`cairn.agent.v1`). The operations themselves
//! ([`agent::Agent`]) are synchronous and speak domain types; the gRPC
//! layer ([`service`]) converts messages, runs them on blocking threads,
//! remembers request ids and maps errors to status codes.
#![warn(missing_docs)]

pub mod activation;
pub mod agent;
pub mod compose;
pub mod confine;
pub mod datapath;
pub mod error;
pub mod iodir;
pub mod jobs;
pub mod loopdev;
pub mod metrics;
pub mod qcow2;
pub mod qemu;
pub mod server;
pub mod service;

pub use agent::{Agent, AgentConfig};
pub use error::AgentError;

/// Generated gRPC types of `cairn.agent.v1` (from `cairn-proto`). They
/// stop at the service layer.
pub use cairn_proto::agent as pb;
