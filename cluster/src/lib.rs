//! Cairn's cluster layer: the etcd implementation of the domain's
//! `LockService` (sessions, locks with fencing tokens, self-fencing).
//!
//! The single-machine implementation lives in `cairn-domain`; both pass
//! `cairn_domain::lock::conformance`, the etcd one against a real etcd in
//! the integration tests.
#![warn(missing_docs)]

pub mod etcd;

pub use etcd::{EtcdConfig, EtcdLockService};
