//! Opening a domain: superblocks, a host slot claimed, this host's and
//! dead hosts' journals recovered.

use super::*;

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
                    Ok(h) if h.state != SlotState::Active => continue,
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

    pub(super) fn open_inner(
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
}
