//! Host slots: claiming one, the barrier that makes sure no dead host's
//! journal is left open, recovering dead hosts, and closing.

use super::*;

impl Domain {
    /// Read all host slot headers.
    pub fn read_slot_headers(&self) -> Result<Vec<std::result::Result<SlotHeader, DecodeError>>> {
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

    pub(super) fn read_slot_header(&self, i: u32) -> Result<SlotHeader> {
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

    pub(super) fn claim_slot(&self, wanted: Option<u32>) -> Result<Claim> {
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
                            Ok(h) if h.state == SlotState::Never => 1,
                            Ok(h) if h.state == SlotState::Free => 2,
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
                state: SlotState::Active,
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
    pub(super) fn active_slots(&self) -> Result<Vec<(u32, Token)>> {
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
            if h.state == SlotState::Active {
                active.push((i, h.token));
            }
        }
        Ok(active)
    }

    /// The locks of host slots `active`.
    pub(super) fn slot_locks(&self, active: &[(u32, Token)]) -> Vec<Resource> {
        active
            .iter()
            .map(|(i, _)| self.resource(ResourceKind::HostSlot(*i)))
            .collect()
    }

    /// The barrier, starting from slots and holders already read.
    #[allow(clippy::type_complexity)]
    pub(super) fn barrier_from(
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
    pub(super) fn wait_takeover(&self, i: u32, h: &SlotHeader) {
        let wait = self.locks.takeover_delay();
        if h.state == SlotState::Active && !wait.is_zero() {
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
        if h.state == SlotState::Active {
            let freed = SlotHeader {
                state: SlotState::Free,
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
                state: SlotState::Free,
                generation: h.generation + 1,
                released_at: self.clock.now(),
                ..h
            };
            self.write_slot_header(c.slot, &freed)?;
        }
        Ok(())
    }
}
