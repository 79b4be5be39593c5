//! Committing a transaction: locks in order, the barrier, fresh reads,
//! the plan, then intent, flush, apply, flush, commit.

use super::planner::*;
use super::*;

impl Domain {
    pub(super) fn commit_tx(&self, tx: &Transaction<'_>) -> Result<Outcome> {
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
    pub(super) fn load_pages(&self, guards: &BTreeMap<Resource, &LockGuard>) -> Result<PageView> {
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
    pub(super) fn note_free(&self, view: &PageView) {
        let mut h = self.hints.lock().expect("poisoned");
        for (m, p) in view.held() {
            if let Some(f) = h.free[m].get_mut(p as usize) {
                *f = view.free_on(m, p);
            }
        }
    }

    pub(super) fn execute(
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
        // Wipe after delete: the deleted volumes' data goes before their
        // extents are free for anyone (a crash in between leaves them
        // zeroed and still there, to be deleted again).
        if tx.wipe || self.geom.compat & crate::layout::COMPAT_WIPE_AFTER_DELETE != 0 {
            let es = self.geom.extent_size;
            for &(start, count) in &p.deleted_runs {
                self.dev
                    .zero_range(self.geom.data_off + start * es, count * es)
                    .map_err(DomainError::io("wiping a deleted volume"))?;
            }
            if !p.deleted_runs.is_empty() {
                self.dev
                    .flush()
                    .map_err(DomainError::io("flushing a wipe"))?;
            }
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
            let seq = j.append(self.dev.as_ref(), JournalKind::Intent, &payload)?;
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
                j.commit(
                    self.dev.as_ref(),
                    seq,
                    Direction::Forward,
                    claim.slot as u16,
                )
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

    pub(super) fn apply(
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

    pub(super) fn apply_rest(&self, p: &Planned) -> Result<()> {
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
