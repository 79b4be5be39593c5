//! The repository engine: a formatted domain opened by one host.
//!
//! Every change is a transaction: take the locks of every record it writes
//! (in lock order), make sure no dead host's journal is left unrecovered,
//! read the records fresh, plan, write the intent and flush, apply and
//! flush, then write the commit record. Records carry the fencing token of
//! the lock they were written under; a write under an older token than the
//! record's is refused.

mod commit;
mod open;
mod planner;
mod planner_ops;
mod reads;
mod slots;
mod superblock;
mod tx;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use zerocopy::IntoBytes;

use crate::alloc::{page_span, AllocMap, PageView, EXTENTS, TAG_SLOTS, VOLUME_SLOTS};
use crate::error::{DomainError, Result};
use crate::geometry::{FormatParams, Geometry, Table};
use crate::io::{AlignedBuf, BlockDev};
use crate::journal::{Action, Intent, JournalWriter};
use crate::layout::BITS_PER_PAGE;
use crate::layout::{DecodeError, Direction, JournalKind, SlotState, PAGE, RECORD};
use crate::lock::{LockGuard, LockService, Resource, ResourceKind, Token};
use crate::model::*;
use crate::records::*;

pub use superblock::{format, read_superblocks, SuperblockStatus};
pub use tx::{Naming, Op, Outcome, Transaction};

/// Who this host is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostIdentity {
    /// Stable host id.
    pub id: uuid::Uuid,
    /// Human-readable name.
    pub name: String,
}

impl HostIdentity {
    /// This machine: `/etc/machine-id` and the host name.
    pub fn local() -> HostIdentity {
        let id = std::fs::read_to_string("/etc/machine-id")
            .ok()
            .and_then(|s| uuid::Uuid::parse_str(s.trim()).ok())
            .unwrap_or_else(uuid::Uuid::nil);
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        HostIdentity { id, name }
    }
}

/// A source of wall-clock time.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that says what it is told (tests, golden images).
pub struct FixedClock(pub u64);

impl Clock for FixedClock {
    fn now(&self) -> u64 {
        self.0
    }
}

/// How to open a domain.
#[derive(Clone)]
pub struct OpenOptions {
    /// This host.
    pub host: HostIdentity,
    /// Read-write (claims a host slot and recovers) or read-only.
    pub writable: bool,
    /// A specific host slot to claim.
    pub slot: Option<u32>,
    /// How long to wait for a lock.
    pub lock_timeout: Duration,
    /// Time source.
    pub clock: Arc<dyn Clock>,
}

impl OpenOptions {
    /// Read-write as `host`, any free slot, 30 s lock timeout.
    pub fn new(host: HostIdentity) -> OpenOptions {
        OpenOptions {
            host,
            writable: true,
            slot: None,
            lock_timeout: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
        }
    }
    /// Read-only.
    pub fn read_only(host: HostIdentity) -> OpenOptions {
        OpenOptions {
            writable: false,
            ..OpenOptions::new(host)
        }
    }
}

pub(crate) struct Claim {
    pub(crate) slot: u32,
    pub(crate) guard: LockGuard,
    pub(crate) header: Mutex<SlotHeader>,
    pub(crate) journal: Mutex<JournalWriter>,
}

/// An open domain.
pub struct Domain {
    pub(crate) dev: Arc<dyn BlockDev>,
    pub(crate) geom: Geometry,
    pub(crate) locks: Arc<dyn LockService>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) host: HostIdentity,
    pub(crate) lock_timeout: Duration,
    pub(crate) claim: Option<Claim>,
    pub(crate) hints: Mutex<AllocHints>,
    pub(crate) sb_status: SuperblockStatus,
    pub(crate) poisoned: AtomicBool,
    pub(crate) recovered: Mutex<Vec<RecoveryReport>>,
}

/// What this host believes about the allocation map's pages: free items
/// per page (refreshed from every page it reads under the page's lock) and
/// where the last run was found. It only steers which page locks a
/// transaction asks for; correctness never depends on it.
#[derive(Default)]
pub(crate) struct AllocHints {
    pub(super) free: [Vec<u64>; 3],
    pub(super) cursor: [u64; 3],
}

/// What recovery did to one host slot's journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// Host slot.
    pub slot: u32,
    /// Intents rolled forward.
    pub forward: Vec<u64>,
    /// Intents rolled back.
    pub back: Vec<u64>,
    /// Torn-tail records discarded.
    pub torn: Vec<u64>,
}

/// Usage counts.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Extents in use.
    pub extents_used: u64,
    /// Extents in all.
    pub extents_total: u64,
    /// Volume slots in use.
    pub volumes: u64,
    /// Volume slots in all.
    pub volume_slots: u64,
    /// Tag slots in use.
    pub tags: u64,
    /// Tag slots in all.
    pub tag_slots: u64,
}

impl Domain {
    /// The domain's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }
    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDev> {
        &self.dev
    }
    /// The host slot this handle owns (None when read-only).
    pub fn slot(&self) -> Option<u32> {
        self.claim.as_ref().map(|c| c.slot)
    }

    /// The fencing token of this handle's host slot lock (None when
    /// read-only). Others can tell from it whether the slot is still held
    /// by this handle's session.
    pub fn slot_token(&self) -> Option<u64> {
        self.claim.as_ref().map(|c| c.guard.token())
    }

    /// Whether this handle's host slot lock is gone for good (a lease-based
    /// lock whose session ended): it can never write again, and another
    /// host may recover its journal.
    pub fn claim_lost(&self) -> bool {
        self.claim.as_ref().is_some_and(|c| c.guard.lost())
    }
    /// What happened to the superblocks at open.
    pub fn superblock_status(&self) -> &SuperblockStatus {
        &self.sb_status
    }
    /// What recovery did since open.
    pub fn recovery_reports(&self) -> Vec<RecoveryReport> {
        self.recovered.lock().expect("poisoned").clone()
    }

    pub(crate) fn salt(&self) -> [u8; 16] {
        self.geom.salt()
    }

    pub(crate) fn resource(&self, kind: ResourceKind) -> Resource {
        Resource {
            domain: self.geom.domain_id,
            kind,
        }
    }

    pub(crate) fn writer_slot(&self) -> u16 {
        self.claim
            .as_ref()
            .map(|c| c.slot as u16)
            .unwrap_or(u16::MAX)
    }

    pub(super) fn page_res(&self, map: usize, page: u64) -> Resource {
        self.resource(ResourceKind::AllocPage {
            map: map as u8,
            page: page as u32,
        })
    }

    /// The pages of `map` to lock for allocating `need` items: the first
    /// page that seems to have room, from a start that depends on the host
    /// slot, so that hosts allocate on different pages and one host's
    /// transactions queue for its page within the process (a lock handed
    /// from thread to thread costs no etcd round trip); every page when
    /// none seems to have room or the run may cross pages.
    pub(super) fn pick_pages(&self, map: usize, need: u64) -> Vec<u64> {
        let pages = self.geom.bitmap_page_counts()[map];
        if pages == 1 {
            return vec![0];
        }
        if need > BITS_PER_PAGE / 2 {
            return (0..pages).collect();
        }
        let h = self.hints.lock().expect("poisoned");
        let start = (self.writer_slot() as u64 * 3) % pages;
        (0..pages)
            .map(|i| (start + i) % pages)
            .find(|&p| h.free[map].get(p as usize).is_some_and(|&f| f >= need))
            .map(|p| vec![p])
            .unwrap_or_else(|| (0..pages).collect())
    }

    pub(super) fn claim_ref(&self) -> Result<&Claim> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(DomainError::FailedPrecondition(
                "an earlier write failed midway; reopen the domain to recover it".into(),
            ));
        }
        self.claim.as_ref().ok_or(DomainError::ReadOnly)
    }
}
