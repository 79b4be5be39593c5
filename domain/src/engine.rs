//! The repository engine: a formatted domain opened by one host.
//!
//! Every change is a transaction: take the locks of every record it writes
//! (in lock order), make sure no dead host's journal is left unrecovered,
//! read the records fresh, plan, write the intent and flush, apply and
//! flush, then write the commit record. Records carry the fencing token of
//! the lock they were written under; a write under an older token than the
//! record's is refused.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use zerocopy::IntoBytes;

use crate::alloc::{page_span, AllocMap, PageView, EXTENTS, TAG_SLOTS, VOLUME_SLOTS};
use crate::error::{DomainError, Result};
use crate::geometry::{FormatParams, Geometry};
use crate::io::{AlignedBuf, BlockDev};
use crate::journal::{Action, Intent, JournalWriter};
use crate::layout::BITS_PER_PAGE;
use crate::layout::{jkind, outcome, slot_state, PAGE, RECORD, TAG_MAGIC, VOL_MAGIC};
use crate::lock::{LockGuard, LockService, Resource, ResourceKind, Token};
use crate::model::*;
use crate::records::*;

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

/// What happened to the two superblock copies at open.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SuperblockStatus {
    /// Problem with the primary copy, if any.
    pub primary: Option<String>,
    /// Problem with the backup copy, if any.
    pub backup: Option<String>,
    /// A damaged copy was rewritten from its twin.
    pub repaired: bool,
}

/// Read both superblocks; returns the geometry and what was wrong.
pub fn read_superblocks(dev: &dyn BlockDev) -> Result<(Geometry, SuperblockStatus)> {
    let size = dev.size();
    if size < 2 * PAGE {
        return Err(DomainError::NotADomain(format!(
            "device of {size} bytes is too small to hold a domain"
        )));
    }
    let mut buf = AlignedBuf::zeroed(PAGE as usize);
    dev.read_at(&mut buf, 0)
        .map_err(DomainError::io("reading the primary superblock"))?;
    let primary = Geometry::decode(&buf, 0);
    let mut st = SuperblockStatus::default();
    let backup_at = |g: &Geometry| g.backup_sb_off();
    let read_backup = |off: u64| -> Result<Geometry> {
        if off + PAGE > size {
            return Err(DomainError::corrupt(
                "backup superblock",
                off,
                "beyond end of device",
            ));
        }
        let mut b = AlignedBuf::zeroed(PAGE as usize);
        dev.read_at(&mut b, off)
            .map_err(DomainError::io("reading the backup superblock"))?;
        Geometry::decode(&b, off)
    };
    match primary {
        Ok(g) => {
            match read_backup(backup_at(&g)) {
                Ok(b) if b == g => {}
                Ok(_) => {
                    return Err(DomainError::corrupt(
                        "superblocks",
                        0,
                        "primary and backup disagree",
                    ))
                }
                Err(e) => st.backup = Some(e.to_string()),
            }
            Ok((g, st))
        }
        Err(pe) => {
            // The backup is in the last page of the device (or of the size the
            // domain was formatted with, which we cannot know without it).
            let off = size - size % PAGE - PAGE;
            match read_backup(off) {
                Ok(g) => {
                    st.primary = Some(pe.to_string());
                    Ok((g, st))
                }
                Err(be) => match (&pe, &be) {
                    (DomainError::NotADomain(_), DomainError::NotADomain(_)) => Err(pe),
                    (DomainError::NotADomain(_), _) => Err(be),
                    _ => Err(pe),
                },
            }
        }
    }
}

/// Format `dev` as a new domain. Refuses a device that already holds a
/// domain unless `force`, and even then refuses one a live host has open.
pub fn format(
    dev: &dyn BlockDev,
    params: &FormatParams,
    force: bool,
    locks: &dyn LockService,
    clock: &dyn Clock,
) -> Result<Geometry> {
    match read_superblocks(dev) {
        Ok((g, _)) => {
            if !force {
                return Err(DomainError::AlreadyExists {
                    what: format!(
                        "device already holds domain {:?} ({}); pass --force to overwrite it",
                        g.name, g.domain_id
                    ),
                });
            }
            for i in 0..g.host_slots {
                let r = Resource {
                    domain: g.domain_id,
                    kind: ResourceKind::HostSlot(i),
                };
                if locks.holder(&r)?.is_some() {
                    return Err(DomainError::FailedPrecondition(format!(
                        "domain {:?} is in use by a live host (slot {i}); stop it first",
                        g.name
                    )));
                }
            }
        }
        Err(DomainError::NotADomain(_)) => {}
        Err(e) if force => {
            tracing::warn!("overwriting a damaged domain: {e}");
        }
        Err(e) => {
            return Err(DomainError::AlreadyExists {
                what: format!("device holds a damaged domain ({e}); pass --force to overwrite it"),
            })
        }
    }
    let g = Geometry::compute(
        dev.size(),
        dev.sector_size(),
        params,
        uuid::Uuid::new_v4(),
        clock.now(),
    )?;
    let io = |what: &'static str| DomainError::io(format!("formatting: {what}"));
    // Old superblocks go first so a crash mid-format leaves no domain.
    dev.zero_range(g.backup_sb_off(), PAGE)
        .map_err(io("clearing the backup superblock"))?;
    dev.zero_range(0, g.data_off)
        .map_err(io("clearing metadata"))?;
    dev.flush().map_err(io("flush"))?;
    let alloc = AllocMap::empty(&g);
    dev.write_at(&alloc.format_pages(&g), g.alloc_off)
        .map_err(io("writing the allocation map"))?;
    dev.flush().map_err(io("flush"))?;
    let sb = AlignedBuf::from_slice(g.encode().as_bytes(), PAGE as usize);
    dev.write_at(&sb, 0).map_err(io("writing the superblock"))?;
    dev.flush().map_err(io("flush"))?;
    dev.write_at(&sb, g.backup_sb_off())
        .map_err(io("writing the backup superblock"))?;
    dev.flush().map_err(io("flush"))?;
    Ok(g)
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
    free: [Vec<u64>; 3],
    cursor: [u64; 3],
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
    /// Open a formatted domain.
    pub fn open(
        dev: Arc<dyn BlockDev>,
        locks: Arc<dyn LockService>,
        opts: OpenOptions,
    ) -> Result<Domain> {
        Domain::open_inner(dev, locks, opts, true)
    }

    /// Recover the journals of dead hosts without claiming a slot: host slot
    /// `slot`, or every slot whose owner is gone. Refuses a named slot whose
    /// owner is alive; skips such slots otherwise.
    pub fn recover_offline(
        dev: Arc<dyn BlockDev>,
        locks: Arc<dyn LockService>,
        opts: OpenOptions,
        slot: Option<u32>,
    ) -> Result<(Vec<RecoveryReport>, Vec<u32>)> {
        let opts = OpenOptions {
            writable: true,
            ..opts
        };
        let d = Domain::open_inner(dev, locks, opts, false)?;
        let targets: Vec<u32> = match slot {
            Some(s) if s >= d.geom.host_slots => {
                return Err(DomainError::invalid(
                    "host_slot",
                    format!(
                        "{s} is beyond the domain's {} host slots",
                        d.geom.host_slots
                    ),
                ))
            }
            Some(s) => vec![s],
            None => (0..d.geom.host_slots).collect(),
        };
        let headers = d.read_slot_headers()?;
        let mut reports = Vec::new();
        let mut busy = Vec::new();
        for s in targets {
            if slot.is_none() {
                match &headers[s as usize] {
                    Ok(h) if h.state != slot_state::ACTIVE => continue,
                    _ => {}
                }
            }
            let res = d.resource(ResourceKind::HostSlot(s));
            match d.locks.acquire(&res, Duration::ZERO) {
                Ok(g) => reports.push(d.recover_dead_slot(s, &g)?),
                Err(DomainError::LockTimeout { .. }) if slot.is_some() => {
                    return Err(DomainError::FailedPrecondition(format!(
                        "host slot {s} is in use by a live host; it recovers its own journal"
                    )))
                }
                Err(DomainError::LockTimeout { .. }) => busy.push(s),
                Err(e) => return Err(e),
            }
        }
        Ok((reports, busy))
    }

    fn open_inner(
        dev: Arc<dyn BlockDev>,
        locks: Arc<dyn LockService>,
        opts: OpenOptions,
        claim: bool,
    ) -> Result<Domain> {
        let (geom, mut sb_status) = read_superblocks(dev.as_ref())?;
        if dev.size() < geom.device_size {
            return Err(DomainError::NotADomain(format!(
                "device is {} bytes but the domain was formatted for {}",
                dev.size(),
                geom.device_size
            )));
        }
        if geom.sector_size % dev.sector_size() != 0 {
            return Err(DomainError::NotADomain(format!(
                "device needs {}-byte I/O but the domain's records are {} bytes apart",
                dev.sector_size(),
                geom.sector_size
            )));
        }
        if opts.writable && geom.ro_compat & !crate::layout::KNOWN_RO_COMPAT != 0 {
            return Err(DomainError::NotADomain(
                "domain uses features this build can only read; open it read-only".into(),
            ));
        }
        if opts.writable && (sb_status.primary.is_some() || sb_status.backup.is_some()) {
            let sb = AlignedBuf::from_slice(geom.encode().as_bytes(), PAGE as usize);
            let off = if sb_status.primary.is_some() {
                0
            } else {
                geom.backup_sb_off()
            };
            dev.write_at(&sb, off)
                .and_then(|_| dev.flush())
                .map_err(DomainError::io("repairing a superblock from its twin"))?;
            tracing::warn!(
                "repaired the {} superblock from its twin",
                if off == 0 { "primary" } else { "backup" }
            );
            sb_status.repaired = true;
        }
        let mut d = Domain {
            dev,
            geom,
            locks,
            clock: opts.clock.clone(),
            host: opts.host.clone(),
            lock_timeout: opts.lock_timeout,
            claim: None,
            hints: Mutex::new(AllocHints::default()),
            sb_status,
            poisoned: AtomicBool::new(false),
            recovered: Mutex::new(Vec::new()),
        };
        if opts.writable && claim {
            d.claim = Some(d.claim_slot(opts.slot)?);
            d.barrier()?;
        }
        let map = AllocMap::load(d.dev.as_ref(), &d.geom)?;
        {
            let mut h = d.hints.lock().expect("poisoned");
            for m in 0..3 {
                h.free[m] = map.free_per_page(m);
            }
        }
        Ok(d)
    }

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

    fn page_res(&self, map: usize, page: u64) -> Resource {
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
    fn pick_pages(&self, map: usize, need: u64) -> Vec<u64> {
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

    fn claim_ref(&self) -> Result<&Claim> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(DomainError::FailedPrecondition(
                "an earlier write failed midway; reopen the domain to recover it".into(),
            ));
        }
        self.claim.as_ref().ok_or(DomainError::ReadOnly)
    }

    // ---- host slots -------------------------------------------------------

    /// Read all host slot headers.
    pub fn read_slot_headers(&self) -> Result<Vec<std::result::Result<SlotHeader, String>>> {
        let g = &self.geom;
        let len = g.host_slots as usize * g.sector_size as usize;
        let mut buf = AlignedBuf::zeroed(len.div_ceil(512) * 512);
        self.dev
            .read_at(&mut buf, g.slot_table_off)
            .map_err(DomainError::io("reading the host slot table"))?;
        Ok((0..g.host_slots)
            .map(|i| {
                let o = i as usize * g.sector_size as usize;
                SlotHeader::decode(&self.salt(), i, &buf[o..o + RECORD])
            })
            .collect())
    }

    fn read_slot_header(&self, i: u32) -> Result<SlotHeader> {
        let mut buf = AlignedBuf::zeroed(self.geom.sector_size as usize);
        let off = self.geom.slot_off(i);
        self.dev
            .read_at(&mut buf, off)
            .map_err(DomainError::io(format!("reading host slot {i}")))?;
        SlotHeader::decode(&self.salt(), i, &buf)
            .map_err(|d| DomainError::corrupt(format!("host slot {i} header"), off, d))
    }

    pub(crate) fn write_slot_header(&self, i: u32, h: &SlotHeader) -> Result<()> {
        let rec = h.encode(&self.salt(), i);
        let buf = AlignedBuf::from_slice(&rec, self.geom.sector_size as usize);
        self.dev
            .write_at(&buf, self.geom.slot_off(i))
            .and_then(|_| self.dev.flush())
            .map_err(DomainError::io(format!("writing host slot {i}")))
    }

    fn claim_slot(&self, wanted: Option<u32>) -> Result<Claim> {
        let g = &self.geom;
        let candidates: Vec<u32> = match wanted {
            Some(s) if s >= g.host_slots => {
                return Err(DomainError::invalid(
                    "host_slot",
                    format!("{s} is beyond the domain's {} host slots", g.host_slots),
                ))
            }
            Some(s) => vec![s],
            None => {
                // Prefer the slot this host used before, then unused ones.
                let headers = self.read_slot_headers()?;
                let mut order: Vec<(u8, u32)> = headers
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        let rank = match h {
                            Ok(h) if h.host_id == self.host.id && !self.host.id.is_nil() => 0,
                            Ok(h) if h.state == slot_state::NEVER => 1,
                            Ok(h) if h.state == slot_state::FREE => 2,
                            Ok(_) => 3,
                            Err(_) => 4,
                        };
                        (rank, i as u32)
                    })
                    .collect();
                order.sort();
                order.into_iter().map(|(_, i)| i).collect()
            }
        };
        for s in candidates {
            let timeout = if wanted.is_some() {
                self.lock_timeout
            } else {
                Duration::ZERO
            };
            let guard = match self
                .locks
                .acquire(&self.resource(ResourceKind::HostSlot(s)), timeout)
            {
                Ok(g) => g,
                Err(DomainError::LockTimeout { .. }) if wanted.is_none() => continue,
                Err(DomainError::LockTimeout { .. }) => {
                    return Err(DomainError::FailedPrecondition(format!(
                        "host slot {s} is in use by a live host"
                    )))
                }
                Err(e) => return Err(e),
            };
            let old = self.read_slot_header(s)?;
            self.wait_takeover(s, &old);
            let (writer, report) = self.recover_ring(s, &guard)?;
            let header = SlotHeader {
                state: slot_state::ACTIVE,
                generation: old.generation + 1,
                token: guard.token(),
                host_id: self.host.id,
                host_name: self.host.name.clone(),
                claimed_at: self.clock.now(),
                released_at: old.released_at,
            };
            self.write_slot_header(s, &header)?;
            if !report.forward.is_empty() || !report.back.is_empty() || !report.torn.is_empty() {
                self.recovered.lock().expect("poisoned").push(report);
            }
            tracing::debug!(slot = s, "claimed host slot");
            return Ok(Claim {
                slot: s,
                guard,
                header: Mutex::new(header),
                journal: Mutex::new(writer),
            });
        }
        Err(DomainError::NoSpace(format!(
            "all {} host slots are in use",
            g.host_slots
        )))
    }

    /// Make sure no host slot belongs to a dead host with an unrecovered
    /// journal; recover any that does, and wait for those another host is
    /// recovering. Runs after a transaction has taken its locks, so what it
    /// then reads is never half of a dead host's work; callers that only
    /// read use it to settle the domain after a host died.
    pub fn barrier(&self) -> Result<()> {
        self.barrier_from(None)
    }

    /// The other hosts' active slots with the tokens their headers record.
    fn active_slots(&self) -> Result<Vec<(u32, Token)>> {
        let me = self.claim.as_ref().map(|c| c.slot);
        let mut active = Vec::new();
        for (i, h) in self.read_slot_headers()?.into_iter().enumerate() {
            let i = i as u32;
            if Some(i) == me {
                continue;
            }
            let h = h.map_err(|d| {
                DomainError::corrupt(format!("host slot {i} header"), self.geom.slot_off(i), d)
            })?;
            if h.state == slot_state::ACTIVE {
                active.push((i, h.token));
            }
        }
        Ok(active)
    }

    /// The locks of host slots `active`.
    fn slot_locks(&self, active: &[(u32, Token)]) -> Vec<Resource> {
        active
            .iter()
            .map(|(i, _)| self.resource(ResourceKind::HostSlot(*i)))
            .collect()
    }

    /// The barrier, starting from slots and holders already read.
    #[allow(clippy::type_complexity)]
    fn barrier_from(
        &self,
        mut known: Option<(Vec<(u32, Token)>, Vec<Option<Token>>)>,
    ) -> Result<()> {
        let deadline = Instant::now() + self.lock_timeout;
        loop {
            let (active, holders) = match known.take() {
                Some(k) => k,
                None => {
                    let active = self.active_slots()?;
                    let holders = self.locks.holders(&self.slot_locks(&active))?;
                    (active, holders)
                }
            };
            let mut waiting = None;
            for ((i, token), holder) in active.iter().zip(holders) {
                match holder {
                    Some(t) if t == *token => {}
                    Some(_) => waiting = Some(*i),
                    None => {
                        let res = self.resource(ResourceKind::HostSlot(*i));
                        match self.locks.acquire(&res, Duration::ZERO) {
                            Ok(g) => {
                                self.recover_dead_slot(*i, &g)?;
                            }
                            Err(DomainError::LockTimeout { .. }) => waiting = Some(*i),
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            let Some(i) = waiting else { return Ok(()) };
            if Instant::now() >= deadline {
                return Err(DomainError::LockTimeout {
                    resource: format!("recovery of host slot {i}"),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Before recovering slot `i`, whose owner died without releasing it
    /// (its lease expired, but it may not know yet), wait out the margin by
    /// which a live holder stops writing before that.
    fn wait_takeover(&self, i: u32, h: &SlotHeader) {
        let wait = self.locks.takeover_delay();
        if h.state == slot_state::ACTIVE && !wait.is_zero() {
            tracing::info!(slot = i, wait = ?wait, "waiting out a dead host's margin");
            std::thread::sleep(wait);
        }
    }

    /// Recover the journal of every host slot whose owner died (its lock is
    /// free but the slot was never released). Returns the slots recovered;
    /// slots of live hosts, and a dead one someone else is recovering, are
    /// left alone.
    pub fn recover_dead_hosts(&self) -> Result<Vec<(u32, RecoveryReport)>> {
        let active = self.active_slots()?;
        let res = self.slot_locks(&active);
        // Read first (one round trip): only a slot nobody holds is tried.
        let holders = self.locks.holders(&res)?;
        let mut out = Vec::new();
        for (((i, _), res), holder) in active.iter().zip(&res).zip(holders) {
            if holder.is_some() {
                continue;
            }
            match self.locks.acquire(res, Duration::ZERO) {
                Ok(g) => out.push((*i, self.recover_dead_slot(*i, &g)?)),
                Err(DomainError::LockTimeout { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Recover host slot `i`, whose owner is dead, while holding its lock.
    pub(crate) fn recover_dead_slot(&self, i: u32, guard: &LockGuard) -> Result<RecoveryReport> {
        let h = self.read_slot_header(i)?;
        self.wait_takeover(i, &h);
        let (_, report) = self.recover_ring(i, guard)?;
        if h.state == slot_state::ACTIVE {
            let freed = SlotHeader {
                state: slot_state::FREE,
                generation: h.generation + 1,
                token: guard.token(),
                released_at: self.clock.now(),
                ..h
            };
            self.write_slot_header(i, &freed)?;
        }
        tracing::info!(slot = i, ?report, "recovered the journal of a dead host");
        self.recovered
            .lock()
            .expect("poisoned")
            .push(report.clone());
        Ok(report)
    }

    /// Release the host slot cleanly.
    pub fn close(mut self) -> Result<()> {
        if let Some(c) = self.claim.take() {
            if self.poisoned.load(Ordering::SeqCst) {
                return Err(DomainError::FailedPrecondition(
                    "not releasing the host slot: an earlier write failed midway".into(),
                ));
            }
            let j = c.journal.lock().expect("poisoned");
            if j.open_count() > 0 {
                return Err(DomainError::FailedPrecondition(
                    "intents are still open".into(),
                ));
            }
            drop(j);
            // A holder whose lock may be gone must not touch the slot: it
            // may have been recovered, or claimed, by another host.
            c.guard.check()?;
            self.dev
                .flush()
                .map_err(DomainError::io("flushing before release"))?;
            let h = c.header.lock().expect("poisoned").clone();
            let freed = SlotHeader {
                state: slot_state::FREE,
                generation: h.generation + 1,
                released_at: self.clock.now(),
                ..h
            };
            self.write_slot_header(c.slot, &freed)?;
        }
        Ok(())
    }

    // ---- reads --------------------------------------------------------------

    fn read_record(&self, off: u64, what: &str) -> Result<RecordBytes> {
        let mut buf = AlignedBuf::zeroed(self.geom.sector_size as usize);
        self.dev
            .read_at(&mut buf, off)
            .map_err(DomainError::io(format!("reading {what}")))?;
        Ok(buf[..RECORD].try_into().expect("512"))
    }

    pub(crate) fn read_volume_slot(&self, slot: u32) -> Result<(RecordBytes, Slot<Volume>)> {
        let off = self.geom.volume_off(slot);
        let what = format!("volume slot {slot}");
        let b = self.read_record(off, &what)?;
        let s = decode_volume(&self.salt(), slot, &b)
            .map_err(|d| DomainError::corrupt(what, off, d))?;
        Ok((b, s))
    }

    pub(crate) fn read_tag_slot(&self, slot: u32) -> Result<(RecordBytes, Slot<Tag>)> {
        let off = self.geom.tag_off(slot);
        let what = format!("tag slot {slot}");
        let b = self.read_record(off, &what)?;
        let s =
            decode_tag(&self.salt(), slot, &b).map_err(|d| DomainError::corrupt(what, off, d))?;
        Ok((b, s))
    }

    fn check_volume_id(&self, id: &VolumeId) -> Result<()> {
        if id.slot() >= self.geom.volume_slots {
            return Err(DomainError::invalid(
                "volume_id",
                format!(
                    "{id} names slot {} beyond this domain's {}",
                    id.slot(),
                    self.geom.volume_slots
                ),
            ));
        }
        Ok(())
    }

    fn check_tag_id(&self, id: &TagId) -> Result<()> {
        if id.slot() >= self.geom.tag_slots {
            return Err(DomainError::invalid(
                "tag_id",
                format!(
                    "{id} names slot {} beyond this domain's {}",
                    id.slot(),
                    self.geom.tag_slots
                ),
            ));
        }
        Ok(())
    }

    /// Read a volume's metadata.
    pub fn read_volume(&self, id: &VolumeId) -> Result<Volume> {
        self.check_volume_id(id)?;
        match self.read_volume_slot(id.slot())?.1 {
            Slot::Live(v) if v.id == *id => Ok(v),
            _ => Err(DomainError::NotFound {
                kind: "volume",
                id: id.to_string(),
            }),
        }
    }

    /// Read a tag's metadata.
    pub fn read_tag(&self, id: &TagId) -> Result<Tag> {
        self.check_tag_id(id)?;
        match self.read_tag_slot(id.slot())?.1 {
            Slot::Live(t) if t.id == *id => Ok(t),
            _ => Err(DomainError::NotFound {
                kind: "tag",
                id: id.to_string(),
            }),
        }
    }

    fn read_table(&self, off: u64, slots: u64) -> Result<AlignedBuf> {
        let len = (slots * self.geom.sector_size as u64) as usize;
        let mut buf = AlignedBuf::zeroed(len);
        const CHUNK: usize = 8 << 20;
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(CHUNK);
            self.dev
                .read_at(&mut buf[pos..pos + n], off + pos as u64)
                .map_err(DomainError::io("reading a metadata table"))?;
            pos += n;
        }
        Ok(buf)
    }

    fn fresh_alloc(&self) -> Result<AllocMap> {
        AllocMap::load(self.dev.as_ref(), &self.geom)
    }

    /// Every live volume, by slot.
    pub fn list_volumes(&self) -> Result<Vec<Volume>> {
        let hw = self.fresh_alloc()?.high_water(VOLUME_SLOTS);
        let buf = self.read_table(self.geom.volume_table_off, hw)?;
        let s = self.geom.sector_size as usize;
        let mut out = Vec::new();
        for i in 0..hw as usize {
            let b = &buf[i * s..i * s + RECORD];
            match decode_volume(&self.salt(), i as u32, b) {
                Ok(Slot::Live(v)) => out.push(v),
                Ok(_) => {}
                Err(d) => {
                    return Err(DomainError::corrupt(
                        format!("volume slot {i}"),
                        self.geom.volume_off(i as u32),
                        d,
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Every live tag, by slot.
    pub fn list_tags(&self) -> Result<Vec<Tag>> {
        let hw = self.fresh_alloc()?.high_water(TAG_SLOTS);
        let buf = self.read_table(self.geom.tag_table_off, hw)?;
        let s = self.geom.sector_size as usize;
        let mut out = Vec::new();
        for i in 0..hw as usize {
            let b = &buf[i * s..i * s + RECORD];
            match decode_tag(&self.salt(), i as u32, b) {
                Ok(Slot::Live(t)) => out.push(t),
                Ok(_) => {}
                Err(d) => {
                    return Err(DomainError::corrupt(
                        format!("tag slot {i}"),
                        self.geom.tag_off(i as u32),
                        d,
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Usage counts from the allocation map.
    pub fn usage(&self) -> Result<Usage> {
        let m = self.fresh_alloc()?;
        Ok(Usage {
            extents_used: m.count_set(EXTENTS),
            extents_total: self.geom.extent_count,
            volumes: m.count_set(VOLUME_SLOTS),
            volume_slots: self.geom.volume_slots as u64,
            tags: m.count_set(TAG_SLOTS),
            tag_slots: self.geom.tag_slots as u64,
        })
    }

    pub(crate) fn read_blob(&self, slot: u32, half: u8, len: u32) -> Result<Vec<u8>> {
        let s = self.geom.sector_size as usize;
        let n = (len as usize).div_ceil(s) * s;
        let mut buf = AlignedBuf::zeroed(n.max(s));
        let off = self.geom.user_data_half_off(slot, half);
        self.dev
            .read_at(&mut buf[..n.max(s)], off)
            .map_err(DomainError::io(format!(
                "reading user data of tag slot {slot}"
            )))?;
        Ok(buf[..len as usize].to_vec())
    }

    fn blob_of(&self, t: &Tag) -> Result<UserData> {
        if t.user_data.len == 0 {
            return Ok(UserData::new());
        }
        let u = t.user_data;
        let off = self.geom.user_data_half_off(t.id.slot(), u.half);
        if u.len > self.geom.user_data_size {
            return Err(DomainError::corrupt(
                format!("tag {} user data", t.id),
                off,
                "length exceeds the user data area",
            ));
        }
        let blob = self.read_blob(t.id.slot(), u.half, u.len)?;
        if crate::layout::csum(&self.salt(), &blob) != u.crc {
            return Err(DomainError::corrupt(
                format!("tag {} user data", t.id),
                off,
                "checksum mismatch",
            ));
        }
        decode_user_data(&t.id, &blob)
            .map_err(|d| DomainError::corrupt(format!("tag {} user data", t.id), off, d))
    }

    /// All user data items of a tag.
    pub fn read_user_data(&self, id: &TagId) -> Result<UserData> {
        // A writer on another host may flip halves between our two reads;
        // retry when the tag record moved on.
        let mut last_err = None;
        for _ in 0..3 {
            let t = self.read_tag(id)?;
            match self.blob_of(&t) {
                Ok(d) => return Ok(d),
                Err(e) => {
                    if self.read_tag(id)?.generation == t.generation {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.expect("loop ran"))
    }

    // ---- locks ------------------------------------------------------------------

    /// Take a volume's lock (waits up to the lock timeout).
    pub fn lock_volume(&self, id: &VolumeId) -> Result<LockGuard> {
        self.check_volume_id(id)?;
        self.locks
            .acquire(&self.resource(ResourceKind::Volume(*id)), self.lock_timeout)
    }

    /// Take a tag's lock (waits up to the lock timeout).
    pub fn lock_tag(&self, id: &TagId) -> Result<LockGuard> {
        self.check_tag_id(id)?;
        self.locks
            .acquire(&self.resource(ResourceKind::Tag(*id)), self.lock_timeout)
    }

    // ---- transactions -------------------------------------------------------------

    /// Start building a transaction.
    pub fn tx<'a>(&'a self, label: &str) -> Transaction<'a> {
        Transaction {
            domain: self,
            label: label.to_string(),
            request_id: [0; 16],
            ops: Vec::new(),
            held: Vec::new(),
            lock_created: false,
        }
    }

    /// Create a volume; it is returned locked by the caller.
    pub fn create_volume(&self, spec: VolumeSpec) -> Result<(Volume, LockGuard)> {
        let mut out = self
            .tx("create volume")
            .create_volume(spec)
            .lock_created()
            .commit()?;
        Ok((out.volumes.remove(0), out.volume_locks.remove(0)))
    }

    /// Delete a volume (no tag may point at it).
    pub fn delete_volume(&self, id: &VolumeId, held: &[&LockGuard]) -> Result<()> {
        self.tx("delete volume")
            .delete_volume(*id)
            .held(held)
            .commit()
            .map(|_| ())
    }

    /// Replace a volume's changeable metadata.
    pub fn write_volume_meta(
        &self,
        id: &VolumeId,
        meta: VolumeMeta,
        held: &[&LockGuard],
    ) -> Result<Volume> {
        self.tx("write volume metadata")
            .write_volume_meta(*id, meta)
            .held(held)
            .commit()?;
        self.read_volume(id)
    }

    /// Grow a volume's extent run in place to hold `size` bytes.
    pub fn extend_volume(&self, id: &VolumeId, size: u64, held: &[&LockGuard]) -> Result<Volume> {
        self.tx("extend volume")
            .extend_volume(*id, size)
            .held(held)
            .commit()?;
        self.read_volume(id)
    }

    /// Create a tag. Pass the lock of its volume if the caller holds it.
    pub fn create_tag(&self, meta: TagMeta, held: &[&LockGuard]) -> Result<Tag> {
        let mut out = self.tx("create tag").create_tag(meta).held(held).commit()?;
        Ok(out.tags.remove(0))
    }

    /// Delete a tag (no volume may have it as parent).
    pub fn delete_tag(&self, id: &TagId, held: &[&LockGuard]) -> Result<()> {
        self.tx("delete tag")
            .delete_tag(*id)
            .held(held)
            .commit()
            .map(|_| ())
    }

    /// Replace a tag's metadata.
    pub fn change_tag(&self, id: &TagId, meta: TagMeta, held: &[&LockGuard]) -> Result<Tag> {
        self.tx("change tag")
            .change_tag(*id, meta)
            .held(held)
            .commit()?;
        self.read_tag(id)
    }

    /// Set one user data item of a tag.
    pub fn set_user_data(
        &self,
        id: &TagId,
        name: &str,
        data: Vec<u8>,
        held: &[&LockGuard],
    ) -> Result<()> {
        self.tx("write user data")
            .set_user_data(TagRef::Existing(*id), name, data)
            .held(held)
            .commit()
            .map(|_| ())
    }

    /// Remove one user data item of a tag.
    pub fn remove_user_data(&self, id: &TagId, name: &str, held: &[&LockGuard]) -> Result<()> {
        self.tx("remove user data")
            .remove_user_data(*id, name)
            .held(held)
            .commit()
            .map(|_| ())
    }

    fn commit_tx(&self, tx: &Transaction<'_>) -> Result<Outcome> {
        let claim = self.claim_ref()?;
        if tx.ops.is_empty() {
            return Err(DomainError::invalid(
                "operations",
                "a transaction needs at least one",
            ));
        }
        let held: BTreeMap<Resource, &LockGuard> =
            tx.held.iter().map(|g| (g.resource().clone(), *g)).collect();
        for g in held.values() {
            if g.resource().domain != self.geom.domain_id {
                return Err(DomainError::invalid(
                    "lock",
                    "a held lock belongs to another domain",
                ));
            }
            g.check()?;
        }
        let mut wanted: Vec<Resource> = tx.direct_resources(self);
        let mut attempts = 0;
        loop {
            attempts += 1;
            wanted.sort();
            wanted.dedup();
            // All at once where the lock service can (one etcd round trip).
            let take: Vec<Resource> = wanted
                .iter()
                .filter(|r| !held.contains_key(r))
                .cloned()
                .collect();
            // The other hosts' slots, and whether their owners still hold
            // them, read in the same round trip as our locks are taken.
            let active = self.active_slots()?;
            let slot_res = self.slot_locks(&active);
            let (got, holders) =
                self.locks
                    .acquire_all_then_read(&take, self.lock_timeout, &slot_res)?;
            let owned: BTreeMap<Resource, LockGuard> = take.into_iter().zip(got).collect();
            // Slots claimed or given up while we waited make the early read
            // stale: then read the holders again.
            let known = (self.active_slots()? == active).then_some((active, holders));
            self.barrier_from(known)?;
            let mut guards: BTreeMap<Resource, &LockGuard> = held.clone();
            for (r, g) in &owned {
                guards.insert(r.clone(), g);
            }
            // The allocation map pages whose locks we hold, read fresh.
            let mut view = self.load_pages(&guards)?;
            let cursor = self.hints.lock().expect("poisoned").cursor;
            let mut plan = Planner::new(
                self,
                &guards,
                &mut view,
                cursor,
                claim.slot as u16,
                tx.lock_created,
            );
            match plan.run(&tx.ops) {
                Ok(()) => {}
                Err(PlanError::NeedLocks(rs)) if attempts < 8 => {
                    self.note_free(&view);
                    wanted.extend(rs);
                    continue;
                }
                Err(PlanError::NeedLocks(rs)) => {
                    let r = rs.first().map(|r| r.key()).unwrap_or_default();
                    return Err(DomainError::LockTimeout {
                        resource: format!("{r} (records kept changing)"),
                    });
                }
                Err(PlanError::Domain(e)) => {
                    self.note_free(&view);
                    return Err(e);
                }
            }
            let planned = plan.finish()?;
            let ends = planned.run_ends();
            let out = self.execute(claim, tx, planned, &mut view, &guards);
            if out.is_ok() {
                self.note_free(&view);
                let mut h = self.hints.lock().expect("poisoned");
                for (m, end) in ends.into_iter().enumerate() {
                    if let Some(e) = end {
                        h.cursor[m] = e;
                    }
                }
            }
            // Locks taken here are released as `owned` drops; new volumes'
            // locks go to the caller.
            return out;
        }
    }

    /// Read the allocation map pages whose locks are in `guards`. A page
    /// written under a newer token than our lock's means a newer holder
    /// exists: we were fenced.
    fn load_pages(&self, guards: &BTreeMap<Resource, &LockGuard>) -> Result<PageView> {
        let mut want = Vec::new();
        for r in guards.keys() {
            if let ResourceKind::AllocPage { map, page } = r.kind {
                want.push((map as usize, page as u64));
            }
        }
        let view = PageView::load(self.dev.as_ref(), &self.geom, &want)?;
        for (m, p) in view.held() {
            let ours = guards[&self.page_res(m, p)].token();
            let on_disk = view.token(m, p).unwrap_or(0);
            if on_disk > ours {
                return Err(DomainError::Fenced(format!(
                    "allocation map page {m}/{p} was written under token {on_disk} but the \
                     lock's token is {ours}"
                )));
            }
        }
        Ok(view)
    }

    /// Remember the free counts of the pages just read.
    fn note_free(&self, view: &PageView) {
        let mut h = self.hints.lock().expect("poisoned");
        for (m, p) in view.held() {
            if let Some(f) = h.free[m].get_mut(p as usize) {
                *f = view.free_on(m, p);
            }
        }
    }

    fn execute(
        &self,
        claim: &Claim,
        tx: &Transaction<'_>,
        p: Planned,
        view: &mut PageView,
        guards: &BTreeMap<Resource, &LockGuard>,
    ) -> Result<Outcome> {
        claim.guard.check()?;
        for g in guards.values() {
            g.check()?;
        }
        let intent = Intent {
            created: self.clock.now(),
            request_id: tx.request_id,
            label: tx.label.clone(),
            actions: p.actions.clone(),
        };
        let payload = intent.encode();
        let journal = |f: &mut dyn FnMut(&mut JournalWriter) -> Result<u64>| {
            let mut j = claim.journal.lock().expect("poisoned");
            f(&mut j)
        };
        let (seq, upto) = {
            let mut j = claim.journal.lock().expect("poisoned");
            let seq = j.append(self.dev.as_ref(), jkind::INTENT, &payload)?;
            (seq, j.last_written())
        };
        // From here on a failure leaves an open intent: poison the handle so
        // nothing else is written until recovery has run.
        let res = (|| -> Result<()> {
            self.dev
                .flush()
                .map_err(DomainError::io("flushing the intent"))?;
            journal(&mut |j| {
                j.flushed(upto);
                Ok(0)
            })?;
            self.apply(&p, view, guards)?;
            let upto = journal(&mut |j| Ok(j.last_written()))?;
            self.dev
                .flush()
                .map_err(DomainError::io("flushing the transaction"))?;
            journal(&mut |j| {
                j.flushed(upto);
                j.commit(self.dev.as_ref(), seq, outcome::FORWARD, claim.slot as u16)
            })?;
            Ok(())
        })();
        if let Err(e) = res {
            self.poisoned.store(true, Ordering::SeqCst);
            return Err(e);
        }
        Ok(Outcome {
            volumes: p.new_volumes,
            volume_locks: p.volume_locks,
            tags: p.new_tags,
            intent_seq: seq,
        })
    }

    fn apply(
        &self,
        p: &Planned,
        view: &mut PageView,
        guards: &BTreeMap<Resource, &LockGuard>,
    ) -> Result<()> {
        let mut touched = Vec::new();
        for a in &p.actions {
            let (map, start, count, set) = match a {
                Action::SetBits { map, start, count } => (*map as usize, *start, *count, true),
                Action::ClearBits { map, start, count } => (*map as usize, *start, *count, false),
                _ => continue,
            };
            if !view.missing(map, start, count).is_empty() {
                return Err(DomainError::FailedPrecondition(
                    "bitmap change without its page's lock".into(),
                ));
            }
            for pg in view.apply(map, start, count, set) {
                touched.push((map, pg));
            }
        }
        view.write(self.dev.as_ref(), &self.geom, &touched, |m, pg| {
            guards
                .get(&self.page_res(m, pg))
                .map(|g| g.token())
                .unwrap_or(0)
        })?;
        self.apply_rest(p)
    }

    fn apply_rest(&self, p: &Planned) -> Result<()> {
        for (_, off, data) in &p.vol_data {
            self.dev
                .zero_range(*off, data.zero)
                .map_err(DomainError::io("zeroing a new volume's start"))?;
            for (o, page) in &data.pages {
                let buf = AlignedBuf::from_slice(page, page.len());
                self.dev
                    .write_at(&buf, off + o)
                    .map_err(DomainError::io("writing a new volume's start"))?;
            }
        }
        for (slot, half, blob) in &p.blobs {
            let s = self.geom.sector_size as usize;
            let buf = AlignedBuf::from_slice(blob, blob.len().div_ceil(s) * s);
            self.dev
                .write_at(&buf, self.geom.user_data_half_off(*slot, *half))
                .map_err(DomainError::io("writing user data"))?;
        }
        for a in &p.actions {
            match a {
                Action::PutVolume { slot, after, .. } => {
                    self.write_record(self.geom.volume_off(*slot), after)?
                }
                Action::PutTag { slot, after, .. } => {
                    self.write_record(self.geom.tag_off(*slot), after)?
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub(crate) fn write_record(&self, off: u64, rec: &RecordBytes) -> Result<()> {
        let buf = AlignedBuf::from_slice(rec, self.geom.sector_size as usize);
        self.dev
            .write_at(&buf, off)
            .map_err(DomainError::io(format!("writing the record at {off:#x}")))
    }
}

/// What a committed transaction created.
#[derive(Debug)]
pub struct Outcome {
    /// New volumes, in creation order.
    pub volumes: Vec<Volume>,
    /// Their locks, in the same order, when the transaction asked for them
    /// (`lock_created`); else empty.
    pub volume_locks: Vec<LockGuard>,
    /// New tags.
    pub tags: Vec<Tag>,
    /// The intent's journal sequence number.
    pub intent_seq: u64,
}

/// One low-level operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Create a volume.
    CreateVolume(VolumeSpec),
    /// Delete a volume.
    DeleteVolume(VolumeId),
    /// Replace a volume's changeable metadata.
    WriteVolumeMeta(VolumeId, VolumeMeta),
    /// Grow a volume's run in place to hold this many bytes.
    ExtendVolume(VolumeId, u64),
    /// Create a tag.
    CreateTag(TagMeta),
    /// Delete a tag.
    DeleteTag(TagId),
    /// Replace a tag's metadata.
    ChangeTag(TagId, TagMeta),
    /// Set a user data item.
    SetUserData(TagRef, String, Vec<u8>),
    /// Remove a user data item.
    RemoveUserData(TagId, String),
    /// Initialise the start of a volume created by this transaction:
    /// zero its first `zero` bytes, then write `pages` (offset within the
    /// run, bytes; sector-aligned) over them. Part of the transaction: it
    /// happens entirely or not at all.
    InitVolumeData {
        /// The volume (created earlier in the same transaction).
        volume: VolumeRef,
        /// Bytes from the start of the run to zero.
        zero: u64,
        /// What to write over the zeros.
        pages: Vec<(u64, Vec<u8>)>,
    },
    /// Go on only if the tag still has this generation, i.e. nobody wrote
    /// it since the caller read it without its lock (else `Changed`). Lets
    /// a caller plan from an unlocked read and take every lock in one go.
    ExpectTag(TagId, u64),
}

/// A set of low-level operations that happen atomically under one intent.
pub struct Transaction<'a> {
    domain: &'a Domain,
    label: String,
    request_id: [u8; 16],
    ops: Vec<Op>,
    held: Vec<&'a LockGuard>,
    lock_created: bool,
}

impl<'a> Transaction<'a> {
    /// Add an operation.
    pub fn op(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }
    /// Create a volume (refer to it later as `VolumeRef::New(n)`).
    pub fn create_volume(self, spec: VolumeSpec) -> Self {
        self.op(Op::CreateVolume(spec))
    }
    /// Delete a volume.
    pub fn delete_volume(self, id: VolumeId) -> Self {
        self.op(Op::DeleteVolume(id))
    }
    /// Replace a volume's changeable metadata.
    pub fn write_volume_meta(self, id: VolumeId, meta: VolumeMeta) -> Self {
        self.op(Op::WriteVolumeMeta(id, meta))
    }
    /// Grow a volume in place.
    pub fn extend_volume(self, id: VolumeId, size: u64) -> Self {
        self.op(Op::ExtendVolume(id, size))
    }
    /// Create a tag (refer to it later as `TagRef::New(n)`).
    pub fn create_tag(self, meta: TagMeta) -> Self {
        self.op(Op::CreateTag(meta))
    }
    /// Delete a tag.
    pub fn delete_tag(self, id: TagId) -> Self {
        self.op(Op::DeleteTag(id))
    }
    /// Replace a tag's metadata.
    pub fn change_tag(self, id: TagId, meta: TagMeta) -> Self {
        self.op(Op::ChangeTag(id, meta))
    }
    /// Expect a tag unchanged since it was read (see `Op::ExpectTag`).
    pub fn expect_tag(self, t: &Tag) -> Self {
        self.op(Op::ExpectTag(t.id, t.generation))
    }
    /// Set a user data item.
    pub fn set_user_data(self, tag: TagRef, name: &str, data: Vec<u8>) -> Self {
        self.op(Op::SetUserData(tag, name.to_string(), data))
    }
    /// Remove a user data item.
    pub fn remove_user_data(self, tag: TagId, name: &str) -> Self {
        self.op(Op::RemoveUserData(tag, name.to_string()))
    }
    /// Initialise the start of a volume this transaction creates.
    pub fn init_volume_data(
        self,
        volume: VolumeRef,
        zero: u64,
        pages: Vec<(u64, Vec<u8>)>,
    ) -> Self {
        self.op(Op::InitVolumeData {
            volume,
            zero,
            pages,
        })
    }
    /// Return the new volumes locked (`Outcome::volume_locks`), for a
    /// caller that goes on working on them. Without it nobody holds their
    /// locks: a new record carries the token of the allocation lock it was
    /// allocated under, which any later holder of its own lock exceeds.
    pub fn lock_created(mut self) -> Self {
        self.lock_created = true;
        self
    }
    /// Locks the caller already holds.
    pub fn held(mut self, guards: &[&'a LockGuard]) -> Self {
        self.held.extend_from_slice(guards);
        self
    }
    /// The caller's request id, recorded in the intent.
    pub fn request_id(mut self, id: [u8; 16]) -> Self {
        self.request_id = id;
        self
    }
    /// Run the transaction.
    pub fn commit(self) -> Result<Outcome> {
        self.domain.commit_tx(&self)
    }

    fn direct_resources(&self, d: &Domain) -> Vec<Resource> {
        let mut v = Vec::new();
        // Items to allocate, by map.
        let mut need = [0u64; 3];
        let mut pages: Vec<(usize, u64)> = Vec::new();
        let counts = d.geom.bitmap_page_counts();
        let on_pages = |pages: &mut Vec<(usize, u64)>, map: usize, start: u64, n: u64| {
            pages.extend(
                page_span(start, n)
                    .filter(|&p| p < counts[map])
                    .map(|p| (map, p)),
            );
        };
        // Locks an operation is sure to need, so planning rarely has to
        // stop, take more locks in order and start over. Records read here
        // without their locks only guide the choice; planning checks it.
        for op in &self.ops {
            match op {
                Op::CreateVolume(spec) => {
                    need[EXTENTS] += spec.size.div_ceil(d.geom.extent_size).max(1);
                    need[VOLUME_SLOTS] += 1;
                    if let Some(TagRef::Existing(p)) = spec.parent {
                        v.push(d.resource(ResourceKind::Tag(p)));
                    }
                }
                Op::CreateTag(meta) => {
                    need[TAG_SLOTS] += 1;
                    if let VolumeRef::Existing(vol) = meta.volume {
                        v.push(d.resource(ResourceKind::Volume(vol)));
                    }
                }
                Op::DeleteVolume(id) => {
                    v.push(d.resource(ResourceKind::Volume(*id)));
                    on_pages(&mut pages, VOLUME_SLOTS, id.slot() as u64, 1);
                    if let Ok(vol) = d.read_volume(id) {
                        on_pages(&mut pages, EXTENTS, vol.extent_start, vol.extent_count);
                    }
                }
                Op::ExtendVolume(id, size) => {
                    v.push(d.resource(ResourceKind::Volume(*id)));
                    if let Ok(vol) = d.read_volume(id) {
                        let n = size.div_ceil(d.geom.extent_size);
                        let end = vol.extent_start + vol.extent_count;
                        on_pages(&mut pages, EXTENTS, end, n.saturating_sub(vol.extent_count));
                    }
                }
                Op::WriteVolumeMeta(id, _) => v.push(d.resource(ResourceKind::Volume(*id))),
                Op::DeleteTag(id) => {
                    v.push(d.resource(ResourceKind::Tag(*id)));
                    on_pages(&mut pages, TAG_SLOTS, id.slot() as u64, 1);
                }
                // A changed tag needs its volumes' locks only when it moves;
                // planning finds that out.
                Op::ChangeTag(id, _) | Op::RemoveUserData(id, _) | Op::ExpectTag(id, _) => {
                    v.push(d.resource(ResourceKind::Tag(*id)))
                }
                Op::SetUserData(TagRef::Existing(id), _, _) => {
                    v.push(d.resource(ResourceKind::Tag(*id)))
                }
                Op::SetUserData(TagRef::New(_), _, _) => {}
                Op::InitVolumeData { .. } => {}
            }
        }
        for (map, n) in need.into_iter().enumerate() {
            if n > 0 {
                for p in d.pick_pages(map, n) {
                    pages.push((map, p));
                }
            }
        }
        v.extend(pages.into_iter().map(|(m, p)| d.page_res(m, p)));
        v
    }
}

enum PlanError {
    /// Planning needs these locks too: take them and start over.
    NeedLocks(Vec<Resource>),
    Domain(DomainError),
}

impl From<DomainError> for PlanError {
    fn from(e: DomainError) -> Self {
        PlanError::Domain(e)
    }
}

struct Entry<T> {
    before: RecordBytes,
    cur: Slot<T>,
    token: Token,
    fresh: bool,
}

struct Planner<'p> {
    d: &'p Domain,
    guards: &'p BTreeMap<Resource, &'p LockGuard>,
    view: &'p mut PageView,
    /// Where to look for free runs first, by map.
    cursor: [u64; 3],
    writer: u16,
    vols: BTreeMap<u32, Entry<Volume>>,
    tags: BTreeMap<u32, Entry<Tag>>,
    /// Created objects; their locks are taken together once planning is
    /// done (`lock_new`).
    new_volumes: Vec<(VolumeId, Option<LockGuard>)>,
    new_tags: Vec<TagId>,
    lock_created: bool,
    set_bits: Vec<(u8, u64, u64)>,
    clear_bits: Vec<(u8, u64, u64)>,
    blobs: BTreeMap<u32, (u8, Vec<u8>)>,
    user_data: BTreeMap<u32, UserData>,
    vol_data: BTreeMap<u32, VolData>,
}

/// The initial bytes of a new volume's run.
struct VolData {
    zero: u64,
    pages: Vec<(u64, Vec<u8>)>,
}

impl VolData {
    /// The region as it will read: zeros with the pages over them.
    fn image(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.zero as usize];
        for (off, p) in &self.pages {
            b[*off as usize..*off as usize + p.len()].copy_from_slice(p);
        }
        b
    }
}

struct Planned {
    actions: Vec<Action>,
    blobs: Vec<(u32, u8, Vec<u8>)>,
    /// Volume slot, run offset, data.
    vol_data: Vec<(u32, u64, VolData)>,
    new_volumes: Vec<Volume>,
    volume_locks: Vec<LockGuard>,
    new_tags: Vec<Tag>,
}

impl Planned {
    /// Where the last run allocated in each map ends.
    fn run_ends(&self) -> [Option<u64>; 3] {
        let mut ends = [None; 3];
        for a in &self.actions {
            if let Action::SetBits { map, start, count } = a {
                ends[*map as usize] = Some(start + count);
            }
        }
        ends
    }
}

impl<'p> Planner<'p> {
    fn new(
        d: &'p Domain,
        guards: &'p BTreeMap<Resource, &'p LockGuard>,
        view: &'p mut PageView,
        cursor: [u64; 3],
        writer: u16,
        lock_created: bool,
    ) -> Self {
        Planner {
            d,
            guards,
            view,
            cursor,
            writer,
            lock_created,
            vols: BTreeMap::new(),
            tags: BTreeMap::new(),
            new_volumes: Vec::new(),
            new_tags: Vec::new(),
            set_bits: Vec::new(),
            clear_bits: Vec::new(),
            blobs: BTreeMap::new(),
            user_data: BTreeMap::new(),
            vol_data: BTreeMap::new(),
        }
    }

    fn token_for(&self, r: &Resource) -> std::result::Result<Token, PlanError> {
        match self.guards.get(r) {
            Some(g) => Ok(g.token()),
            None => Err(PlanError::NeedLocks(vec![r.clone()])),
        }
    }

    /// Fail with the locks of the pages `start..start + n` of `map` lies
    /// on that are not held.
    fn need_pages(&self, map: usize, start: u64, n: u64) -> std::result::Result<(), PlanError> {
        let missing = self.view.missing(map, start, n);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(self.need(map, missing))
        }
    }

    /// Planning needs the locks of `pages` of `map` too.
    fn need(&self, map: usize, pages: Vec<u64>) -> PlanError {
        PlanError::NeedLocks(pages.into_iter().map(|p| self.d.page_res(map, p)).collect())
    }

    /// Find `n` free items in `map` on the pages held; when there are none
    /// there, ask for the other pages' locks, or fail with `full` when
    /// every page is held.
    fn find(
        &self,
        map: usize,
        n: u64,
        full: impl FnOnce(&PageView) -> DomainError,
    ) -> std::result::Result<u64, PlanError> {
        let taken = self.taken(map as u8);
        if let Some(s) = self.view.find_run(map, n, &taken, self.cursor[map]) {
            return Ok(s);
        }
        let missing = self.view.all_missing(map);
        if missing.is_empty() {
            return Err(full(self.view).into());
        }
        Err(self.need(map, missing))
    }

    /// The token of the lock of the page holding item `i` of `map`.
    fn page_token(&self, map: usize, i: u64) -> std::result::Result<Token, PlanError> {
        self.token_for(&self.d.page_res(map, i / BITS_PER_PAGE))
    }

    /// Load a volume for writing: it must be locked.
    fn vol(&mut self, id: &VolumeId) -> std::result::Result<&mut Entry<Volume>, PlanError> {
        self.d.check_volume_id(id)?;
        let slot = id.slot();
        if !self.vols.contains_key(&slot) {
            let token = self.token_for(&self.d.resource(ResourceKind::Volume(*id)))?;
            let (before, cur) = self.d.read_volume_slot(slot)?;
            self.vols.insert(
                slot,
                Entry {
                    before,
                    cur,
                    token,
                    fresh: false,
                },
            );
        }
        let e = self.vols.get_mut(&slot).expect("inserted");
        match &e.cur {
            Slot::Live(v) if v.id == *id => {
                if v.token > e.token {
                    return Err(DomainError::Fenced(format!(
                        "volume {id} was written under token {} but the lock's token is {}",
                        v.token, e.token
                    ))
                    .into());
                }
                Ok(e)
            }
            _ => Err(DomainError::NotFound {
                kind: "volume",
                id: id.to_string(),
            }
            .into()),
        }
    }

    fn tag(&mut self, id: &TagId) -> std::result::Result<&mut Entry<Tag>, PlanError> {
        self.d.check_tag_id(id)?;
        let slot = id.slot();
        if !self.tags.contains_key(&slot) {
            let token = self.token_for(&self.d.resource(ResourceKind::Tag(*id)))?;
            let (before, cur) = self.d.read_tag_slot(slot)?;
            self.tags.insert(
                slot,
                Entry {
                    before,
                    cur,
                    token,
                    fresh: false,
                },
            );
        }
        let e = self.tags.get_mut(&slot).expect("inserted");
        match &e.cur {
            Slot::Live(t) if t.id == *id => {
                if t.token > e.token {
                    return Err(DomainError::Fenced(format!(
                        "tag {id} was written under token {} but the lock's token is {}",
                        t.token, e.token
                    ))
                    .into());
                }
                Ok(e)
            }
            _ => Err(DomainError::NotFound {
                kind: "tag",
                id: id.to_string(),
            }
            .into()),
        }
    }

    fn live_vol(&mut self, id: &VolumeId) -> std::result::Result<&mut Volume, PlanError> {
        match &mut self.vol(id)?.cur {
            Slot::Live(v) => Ok(v),
            _ => unreachable!("vol() checks liveness"),
        }
    }

    fn live_tag(&mut self, id: &TagId) -> std::result::Result<&mut Tag, PlanError> {
        match &mut self.tag(id)?.cur {
            Slot::Live(t) => Ok(t),
            _ => unreachable!("tag() checks liveness"),
        }
    }

    fn resolve_vol(&self, r: VolumeRef) -> std::result::Result<VolumeId, PlanError> {
        match r {
            VolumeRef::Existing(id) => Ok(id),
            VolumeRef::New(n) => self.new_volumes.get(n).map(|(id, _)| *id).ok_or_else(|| {
                DomainError::invalid(
                    "volume",
                    format!("new volume {n} is not created before use"),
                )
                .into()
            }),
        }
    }

    fn resolve_tag(&self, r: TagRef) -> std::result::Result<TagId, PlanError> {
        match r {
            TagRef::Existing(id) => Ok(id),
            TagRef::New(n) => self.new_tags.get(n).copied().ok_or_else(|| {
                DomainError::invalid("tag", format!("new tag {n} is not created before use")).into()
            }),
        }
    }

    fn taken(&self, map: u8) -> Vec<(u64, u64)> {
        self.set_bits
            .iter()
            .chain(self.clear_bits.iter())
            .filter(|(m, _, _)| *m == map)
            .map(|&(_, s, c)| (s, c))
            .collect()
    }

    fn alloc_slot(
        &mut self,
        map: usize,
        what: &str,
        total: u32,
    ) -> std::result::Result<u32, PlanError> {
        let s = self.find(map, 1, |_| {
            DomainError::NoSpace(format!("all {total} {what} slots are in use"))
        })?;
        self.set_bits.push((map as u8, s, 1));
        Ok(s as u32)
    }

    fn extents_for(&self, size: u64) -> std::result::Result<u64, PlanError> {
        let g = &self.d.geom;
        if size == 0 {
            return Err(DomainError::invalid("size", "must be at least 1 byte").into());
        }
        if size > g.extent_count * g.extent_size {
            return Err(DomainError::invalid(
                "size",
                format!(
                    "{size} bytes is more than the domain's whole data area ({} bytes)",
                    g.extent_count * g.extent_size
                ),
            )
            .into());
        }
        Ok(size.div_ceil(g.extent_size))
    }

    fn validate_capacity(
        capacity: u64,
        format: Format,
        run_bytes: u64,
    ) -> std::result::Result<(), PlanError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(DomainError::invalid(
                "capacity",
                format!("{capacity} must be between 1 and {MAX_CAPACITY}"),
            )
            .into());
        }
        if format == Format::Raw && capacity > run_bytes {
            return Err(DomainError::invalid(
                "capacity",
                format!("a raw volume of {capacity} bytes needs at least that much space (has {run_bytes})"),
            )
            .into());
        }
        Ok(())
    }

    fn run(&mut self, ops: &[Op]) -> std::result::Result<(), PlanError> {
        for op in ops {
            self.op(op)?;
        }
        self.lock_new()
    }

    /// Give the new records their tokens: that of the lock of the
    /// allocation map page their slot is on, under which the slot was free
    /// (a later holder of their own lock has a larger one). New volumes a
    /// caller goes on working on are locked, all at once; their ids are
    /// new, so nobody else can hold or want them.
    fn lock_new(&mut self) -> std::result::Result<(), PlanError> {
        if self.new_volumes.is_empty() && self.new_tags.is_empty() {
            return Ok(());
        }
        for i in 0..self.new_tags.len() {
            let id = self.new_tags[i];
            let token = self.page_token(TAG_SLOTS, id.slot() as u64)?;
            if let Some(e) = self.tags.get_mut(&id.slot()) {
                e.token = token;
                if let Slot::Live(t) = &mut e.cur {
                    t.token = token;
                }
            }
        }
        let mut got = if self.lock_created {
            let want: Vec<Resource> = self
                .new_volumes
                .iter()
                .map(|(id, _)| self.d.resource(ResourceKind::Volume(*id)))
                .collect();
            self.d.locks.acquire_all(&want, Duration::ZERO)?
        } else {
            Vec::new()
        }
        .into_iter();
        for i in 0..self.new_volumes.len() {
            let id = self.new_volumes[i].0;
            let guard = got.next();
            let t = match &guard {
                Some(g) => g.token(),
                None => self.page_token(VOLUME_SLOTS, id.slot() as u64)?,
            };
            if let Some(e) = self.vols.get_mut(&id.slot()) {
                e.token = t;
                if let Slot::Live(v) = &mut e.cur {
                    v.token = t;
                }
            }
            self.new_volumes[i].1 = guard;
        }
        Ok(())
    }

    fn now(&self) -> u64 {
        self.d.clock.now()
    }

    fn op(&mut self, op: &Op) -> std::result::Result<(), PlanError> {
        match op {
            Op::CreateVolume(spec) => {
                validate_text("description", &spec.description, MAX_DESCRIPTION)?;
                let n = self.extents_for(spec.size)?;
                Self::validate_capacity(spec.capacity, spec.format, n * self.d.geom.extent_size)?;
                let parent = match spec.parent {
                    Some(r) => {
                        let p = self.resolve_tag(r)?;
                        self.live_tag(&p)?.child_refs += 1;
                        Some(p)
                    }
                    None => None,
                };
                let start = self.find(EXTENTS, n, |v| {
                    DomainError::NoSpace(format!(
                        "no run of {n} free extents (largest free run: {})",
                        v.largest_free_run(EXTENTS)
                    ))
                })?;
                self.set_bits.push((EXTENTS as u8, start, n));
                let slot = self.alloc_slot(VOLUME_SLOTS, "volume", self.d.geom.volume_slots)?;
                let (before, cur) = self.d.read_volume_slot(slot)?;
                if let Slot::Live(v) = &cur {
                    return Err(DomainError::corrupt(
                        format!("volume slot {slot}"),
                        self.d.geom.volume_off(slot),
                        format!("free in the allocation map but holds volume {}", v.id),
                    )
                    .into());
                }
                let id = VolumeId::generate(slot);
                // The token comes in `lock_new`.
                let v = Volume {
                    id,
                    parent,
                    format: spec.format,
                    capacity: spec.capacity,
                    extent_start: start,
                    extent_count: n,
                    legality: spec.legality,
                    allocation: spec.allocation,
                    ctime: self.now(),
                    description: spec.description.clone(),
                    tag_refs: 0,
                    generation: cur.generation() + 1,
                    token: 0,
                    writer_slot: self.writer,
                };
                self.vols.insert(
                    slot,
                    Entry {
                        before,
                        cur: Slot::Live(v),
                        token: 0,
                        fresh: true,
                    },
                );
                self.new_volumes.push((id, None));
            }
            Op::DeleteVolume(id) => {
                let v = self.live_vol(id)?.clone();
                if v.tag_refs > 0 {
                    return Err(DomainError::FailedPrecondition(format!(
                        "volume {id} is referenced by {} tag(s)",
                        v.tag_refs
                    ))
                    .into());
                }
                if let Some(p) = v.parent {
                    let t = self.live_tag(&p)?;
                    t.child_refs = t.child_refs.saturating_sub(1);
                }
                self.need_pages(EXTENTS, v.extent_start, v.extent_count)?;
                self.need_pages(VOLUME_SLOTS, id.slot() as u64, 1)?;
                let e = self.vol(id)?;
                e.cur = Slot::Free {
                    generation: v.generation + 1,
                    token: e.token,
                };
                self.clear_bits
                    .push((EXTENTS as u8, v.extent_start, v.extent_count));
                self.clear_bits
                    .push((VOLUME_SLOTS as u8, id.slot() as u64, 1));
            }
            Op::WriteVolumeMeta(id, meta) => {
                validate_text("description", &meta.description, MAX_DESCRIPTION)?;
                let v = self.live_vol(id)?.clone();
                Self::validate_capacity(
                    meta.capacity,
                    v.format,
                    v.extent_count * self.d.geom.extent_size,
                )?;
                if meta.parent != v.parent {
                    if let Some(p) = meta.parent {
                        self.live_tag(&p)?.child_refs += 1;
                    }
                    if let Some(p) = v.parent {
                        let t = self.live_tag(&p)?;
                        t.child_refs = t.child_refs.saturating_sub(1);
                    }
                }
                let v = self.live_vol(id)?;
                v.parent = meta.parent;
                v.capacity = meta.capacity;
                v.legality = meta.legality;
                v.description = meta.description.clone();
            }
            Op::ExtendVolume(id, size) => {
                let n = self.extents_for(*size)?;
                let v = self.live_vol(id)?.clone();
                if n <= v.extent_count {
                    return Err(DomainError::invalid(
                        "size",
                        format!(
                            "{size} bytes does not grow the volume (it has {} extents of {} bytes)",
                            v.extent_count, self.d.geom.extent_size
                        ),
                    )
                    .into());
                }
                let extra = n - v.extent_count;
                let from = v.extent_start + v.extent_count;
                let taken = self.taken(EXTENTS as u8);
                self.need_pages(EXTENTS, from, extra)?;
                if !self.view.run_is_free(EXTENTS, from, extra, &taken) {
                    return Err(DomainError::NoSpace(format!(
                        "the {extra} extent(s) after volume {id} are not free; it cannot grow in place"
                    ))
                    .into());
                }
                self.set_bits.push((EXTENTS as u8, from, extra));
                self.live_vol(id)?.extent_count = n;
            }
            Op::CreateTag(meta) => {
                encode_options(&meta.options)?;
                if meta.size > MAX_CAPACITY {
                    return Err(DomainError::invalid(
                        "size",
                        format!("{} is too large", meta.size),
                    )
                    .into());
                }
                let vid = self.resolve_vol(meta.volume)?;
                self.live_vol(&vid)?.tag_refs += 1;
                let slot = self.alloc_slot(TAG_SLOTS, "tag", self.d.geom.tag_slots)?;
                let (before, cur) = self.d.read_tag_slot(slot)?;
                if let Slot::Live(t) = &cur {
                    return Err(DomainError::corrupt(
                        format!("tag slot {slot}"),
                        self.d.geom.tag_off(slot),
                        format!("free in the allocation map but holds tag {}", t.id),
                    )
                    .into());
                }
                let id = TagId::generate(slot);
                let t = Tag {
                    id,
                    volume: vid,
                    size: meta.size,
                    mutable: meta.mutable,
                    strategy: meta.strategy,
                    options: meta.options.clone(),
                    tag_type: meta.tag_type,
                    state: meta.state,
                    ctime: self.now(),
                    child_refs: 0,
                    user_data: UserDataRef {
                        half: 0,
                        len: 0,
                        crc: 0,
                    },
                    generation: cur.generation() + 1,
                    token: 0,
                    writer_slot: self.writer,
                };
                self.tags.insert(
                    slot,
                    Entry {
                        before,
                        cur: Slot::Live(t),
                        token: 0,
                        fresh: true,
                    },
                );
                self.new_tags.push(id);
            }
            Op::DeleteTag(id) => {
                let t = self.live_tag(id)?.clone();
                if t.child_refs > 0 {
                    return Err(DomainError::FailedPrecondition(format!(
                        "tag {id} is the parent of {} volume(s)",
                        t.child_refs
                    ))
                    .into());
                }
                let v = self.live_vol(&t.volume)?;
                v.tag_refs = v.tag_refs.saturating_sub(1);
                self.need_pages(TAG_SLOTS, id.slot() as u64, 1)?;
                let e = self.tag(id)?;
                e.cur = Slot::Free {
                    generation: t.generation + 1,
                    token: e.token,
                };
                self.clear_bits.push((TAG_SLOTS as u8, id.slot() as u64, 1));
                self.blobs.remove(&id.slot());
            }
            Op::ExpectTag(id, generation) => {
                let t = self.live_tag(id)?;
                if t.generation != *generation {
                    return Err(DomainError::Changed(format!(
                        "tag {id} is at generation {}, read at {generation}",
                        t.generation
                    ))
                    .into());
                }
            }
            Op::ChangeTag(id, meta) => {
                encode_options(&meta.options)?;
                if meta.size > MAX_CAPACITY {
                    return Err(DomainError::invalid(
                        "size",
                        format!("{} is too large", meta.size),
                    )
                    .into());
                }
                let new_vol = self.resolve_vol(meta.volume)?;
                let t = self.live_tag(id)?.clone();
                if new_vol != t.volume {
                    self.live_vol(&new_vol)?.tag_refs += 1;
                    let old = self.live_vol(&t.volume)?;
                    old.tag_refs = old.tag_refs.saturating_sub(1);
                }
                let t = self.live_tag(id)?;
                t.volume = new_vol;
                t.size = meta.size;
                t.mutable = meta.mutable;
                t.strategy = meta.strategy;
                t.options = meta.options.clone();
                t.tag_type = meta.tag_type;
                t.state = meta.state;
            }
            Op::SetUserData(r, name, data) => {
                if !valid_item_name(name) {
                    return Err(DomainError::invalid(
                        "user_data_name",
                        format!("{name:?} must be 1-{MAX_ITEM_NAME} characters of [A-Za-z0-9._:-]"),
                    )
                    .into());
                }
                let id = self.resolve_tag(*r)?;
                let mut items = self.items_of(&id)?;
                items.insert(name.clone(), data.clone());
                self.store_items(&id, items)?;
            }
            Op::RemoveUserData(id, name) => {
                let mut items = self.items_of(id)?;
                if items.remove(name).is_none() {
                    return Err(DomainError::NotFound {
                        kind: "user data item",
                        id: format!("{name} of tag {id}"),
                    }
                    .into());
                }
                self.store_items(id, items)?;
            }
            Op::InitVolumeData {
                volume,
                zero,
                pages,
            } => {
                let id = self.resolve_vol(*volume)?;
                let sector = self.d.geom.sector_size as u64;
                let run = {
                    let e = self.vol(&id)?;
                    if !e.fresh {
                        return Err(DomainError::invalid(
                            "volume",
                            format!("volume {id} was not created by this transaction"),
                        )
                        .into());
                    }
                    match &e.cur {
                        Slot::Live(v) => v.extent_count * self.d.geom.extent_size,
                        _ => {
                            return Err(DomainError::NotFound {
                                kind: "volume",
                                id: id.to_string(),
                            }
                            .into())
                        }
                    }
                };
                if *zero == 0
                    || zero % sector != 0
                    || *zero > run
                    || *zero > crate::journal::MAX_VOLUME_DATA
                {
                    return Err(DomainError::invalid(
                        "volume_data",
                        format!(
                            "{zero} bytes to initialise must be whole sectors, at most the run ({run}) and {}",
                            crate::journal::MAX_VOLUME_DATA
                        ),
                    )
                    .into());
                }
                for (off, p) in pages {
                    if off % sector != 0
                        || p.len() as u64 % sector != 0
                        || off + p.len() as u64 > *zero
                    {
                        return Err(DomainError::invalid(
                            "volume_data",
                            format!("a page of {} bytes at {off} is not whole sectors inside the {zero} bytes", p.len()),
                        )
                        .into());
                    }
                }
                self.vol_data.insert(
                    id.slot(),
                    VolData {
                        zero: *zero,
                        pages: pages.clone(),
                    },
                );
            }
        }
        Ok(())
    }

    fn items_of(&mut self, id: &TagId) -> std::result::Result<UserData, PlanError> {
        let t = self.live_tag(id)?.clone();
        if let Some(items) = self.user_data.get(&id.slot()) {
            return Ok(items.clone());
        }
        Ok(self.d.blob_of(&t)?)
    }

    fn store_items(&mut self, id: &TagId, items: UserData) -> std::result::Result<(), PlanError> {
        let limit = self.d.geom.user_data_size as usize;
        let len = encoded_user_data_len(&items);
        if len > limit {
            return Err(DomainError::invalid(
                "user_data",
                format!("{len} encoded bytes is over this domain's limit of {limit} per tag"),
            )
            .into());
        }
        let blob = encode_user_data(id, &items);
        let salt = self.d.salt();
        let slot = id.slot();
        let cur_half = self.live_tag(id)?.user_data.half;
        // A tag written twice in one transaction reuses the half it chose.
        let half = match self.blobs.get(&slot) {
            Some((h, _)) => *h,
            None => 1 - cur_half,
        };
        let t = self.live_tag(id)?;
        t.user_data = UserDataRef {
            half,
            len: blob.len() as u32,
            crc: crate::layout::csum(&salt, &blob),
        };
        if items.is_empty() {
            t.user_data.len = 0;
            t.user_data.crc = 0;
            self.blobs.remove(&slot);
        } else {
            self.blobs.insert(slot, (half, blob));
        }
        self.user_data.insert(slot, items);
        Ok(())
    }

    fn finish(mut self) -> Result<Planned> {
        let salt = self.d.salt();
        let mut actions = Vec::new();
        for &(map, start, count) in &self.set_bits {
            actions.push(Action::SetBits { map, start, count });
        }
        for (slot, (half, blob)) in &self.blobs {
            actions.push(Action::UserData {
                slot: *slot,
                half: *half,
                len: blob.len() as u32,
                crc: crate::layout::csum(&salt, blob),
            });
        }
        let mut vol_data = Vec::new();
        for (slot, data) in std::mem::take(&mut self.vol_data) {
            // The volume may have been deleted again in this transaction.
            let Some(Slot::Live(v)) = self.vols.get(&slot).map(|e| &e.cur) else {
                continue;
            };
            let off = self.d.geom.extent_off(v.extent_start);
            actions.push(Action::VolumeData {
                slot,
                len: data.zero,
                crc: crate::layout::csum(&salt, &data.image()),
            });
            vol_data.push((slot, off, data));
        }
        let mut new_volumes_rec = Vec::new();
        for (slot, e) in &self.vols {
            let after = match &e.cur {
                Slot::Live(v) if !e.fresh && encode_volume(&salt, v) == e.before => continue,
                Slot::Live(v) => {
                    let mut v = v.clone();
                    if !e.fresh {
                        v.generation += 1;
                        v.token = e.token;
                        v.writer_slot = self.writer;
                    } else {
                        new_volumes_rec.push(v.clone());
                    }
                    encode_volume(&salt, &v)
                }
                Slot::Free { generation, token } => {
                    encode_free(&salt, VOL_MAGIC, *generation, *token, self.writer)
                }
                Slot::Empty => continue,
            };
            actions.push(Action::PutVolume {
                slot: *slot,
                before: Box::new(e.before),
                after: Box::new(after),
            });
        }
        let mut new_tags_rec = Vec::new();
        for (slot, e) in &self.tags {
            let after = match &e.cur {
                Slot::Live(t) if !e.fresh && encode_tag(&salt, t) == e.before => continue,
                Slot::Live(t) => {
                    let mut t = t.clone();
                    if !e.fresh {
                        t.generation += 1;
                        t.token = e.token;
                        t.writer_slot = self.writer;
                    } else {
                        new_tags_rec.push(t.clone());
                    }
                    encode_tag(&salt, &t)
                }
                Slot::Free { generation, token } => {
                    encode_free(&salt, TAG_MAGIC, *generation, *token, self.writer)
                }
                Slot::Empty => continue,
            };
            actions.push(Action::PutTag {
                slot: *slot,
                before: Box::new(e.before),
                after: Box::new(after),
            });
        }
        for &(map, start, count) in &self.clear_bits {
            actions.push(Action::ClearBits { map, start, count });
        }
        // Return new objects in creation order with their final records.
        let mut volumes = Vec::new();
        let mut volume_locks = Vec::new();
        for (id, guard) in self.new_volumes {
            volume_locks.extend(guard);
            let v = new_volumes_rec
                .iter()
                .find(|v| v.id == id)
                .cloned()
                .ok_or_else(|| {
                    DomainError::FailedPrecondition(format!(
                        "volume {id} was created and deleted in the same transaction"
                    ))
                })?;
            volumes.push(v);
        }
        let mut tags = Vec::new();
        for id in self.new_tags {
            let t = new_tags_rec
                .iter()
                .find(|t| t.id == id)
                .cloned()
                .ok_or_else(|| {
                    DomainError::FailedPrecondition(format!(
                        "tag {id} was created and deleted in the same transaction"
                    ))
                })?;
            tags.push(t);
        }
        let blobs = self
            .blobs
            .into_iter()
            .map(|(s, (h, b))| (s, h, b))
            .collect();
        Ok(Planned {
            actions,
            blobs,
            vol_data,
            new_volumes: volumes,
            volume_locks,
            new_tags: tags,
        })
    }
}
