//! Cairn's storage domain.
//!
//! A domain is one shared block device formatted by Cairn: two superblock
//! copies, one journal ring per host slot, fixed-size checksummed records for
//! volumes and tags, an allocation map, user data areas, and the extents that
//! hold volume data. This crate is synchronous and has no async runtime,
//! network or cluster code in it: the node agent and the offline `cairn` CLI
//! both build on it.
//!
//! Invariants the crate maintains:
//! - every change is one intent in the writer's journal, made durable before
//!   anything it describes is written, and recovery rolls an open intent
//!   forward or back using only what is on the domain;
//! - every record is written under the lock of the object it describes and
//!   carries that lock's fencing token; a write under an older token than
//!   the record's is refused;
//! - the allocation map always equals the union of the records' extent runs
//!   and slots once no intent is open;
//! - every structure on disk is checksummed, and a mismatch is an error that
//!   names the location, never silently ignored.

#![warn(missing_docs)]

pub mod alloc;
pub mod api;
pub mod catalog;
pub mod check;
pub mod engine;
pub mod error;
pub mod fuzzing;
pub mod geometry;
pub mod io;
pub mod journal;
pub mod layout;
pub mod limits;
pub mod lock;
pub mod model;
pub mod records;
pub mod recovery;
pub mod testing;

pub use engine::{
    format, Clock, Domain, FixedClock, HostIdentity, Op, OpenOptions, Outcome, RecoveryReport,
    SystemClock, Transaction,
};
pub use error::{DomainError, ErrorCode, Result};
pub use geometry::{FormatParams, Geometry};
pub use lock::{LocalLockService, LockGuard, LockService, MemLockService};
pub use model::*;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod golden;

#[cfg(test)]
mod regressions;
