//! Cairn's cluster layer: the etcd implementation of the domain's
//! `LockService` (sessions, locks with fencing tokens, self-fencing), and a
//! small key-value store ([`kv::Kv`]) for what the cluster may lose: the
//! agent registry and coordinator job records.
//!
//! The single-machine implementation lives in `cairn-domain`; both pass
//! `cairn_domain::lock::conformance`, the etcd one against a real etcd in
//! the integration tests.
#![warn(missing_docs)]

pub mod error;
pub mod etcd;
pub mod kv;

pub use error::ClusterError;
pub use etcd::{EtcdConfig, EtcdLockService};
pub use kv::{FileKv, Kv, MemKv};
