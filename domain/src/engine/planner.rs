//! Planning a transaction: from the records read under its locks, what
//! every operation changes, which more locks it needs, and the intent
//! that describes it all. No I/O but the reads its locks allow.

use super::*;

pub(super) enum PlanError {
    /// Planning needs these locks too: take them and start over.
    NeedLocks(Vec<Resource>),
    Domain(DomainError),
}

impl From<DomainError> for PlanError {
    fn from(e: DomainError) -> Self {
        PlanError::Domain(e)
    }
}

pub(super) struct Entry<T> {
    pub(super) before: RecordBytes,
    pub(super) cur: Slot<T>,
    pub(super) token: Token,
    pub(super) fresh: bool,
}

/// The records of a table read so far, by slot.
pub(super) type Loaded<T> = BTreeMap<u32, Entry<T>>;

/// How a table's slot is read: its bytes and what they decode to.
pub(super) type SlotRead<T> = fn(&Domain, u32) -> Result<(RecordBytes, Slot<T>)>;

impl<T> Entry<T> {
    /// A new record `rec` in a slot that held `before`.
    pub(super) fn fresh(before: RecordBytes, rec: T) -> Entry<T> {
        Entry {
            before,
            cur: Slot::Live(rec),
            token: 0,
            fresh: true,
        }
    }
}

impl<T: HasGeneration> Entry<T> {
    /// A record as read from its slot under a lock of `token`.
    fn read(token: Token, (before, cur): (RecordBytes, Slot<T>)) -> Entry<T> {
        Entry {
            before,
            cur,
            token,
            fresh: false,
        }
    }

    /// This entry, if it holds the live record `is` accepts (the `kind`
    /// named `id`) and no writer with a newer token than its lock's wrote it.
    fn live(
        &mut self,
        kind: &'static str,
        id: &dyn std::fmt::Display,
        is: impl Fn(&T) -> bool,
    ) -> std::result::Result<&mut Entry<T>, PlanError> {
        match &self.cur {
            Slot::Live(r) if is(r) => {
                if r.token() > self.token {
                    return Err(DomainError::Fenced(format!(
                        "{kind} {id} was written under token {} but the lock's token is {}",
                        r.token(),
                        self.token
                    ))
                    .into());
                }
                Ok(self)
            }
            _ => Err(DomainError::NotFound {
                kind,
                id: id.to_string(),
            }
            .into()),
        }
    }
}

pub(super) struct Planner<'p> {
    pub(super) d: &'p Domain,
    pub(super) guards: &'p BTreeMap<Resource, &'p LockGuard>,
    pub(super) view: &'p mut PageView,
    /// Where to look for free runs first, by map.
    pub(super) cursor: [u64; 3],
    pub(super) writer: u16,
    pub(super) vols: Loaded<Volume>,
    pub(super) tags: Loaded<Tag>,
    /// Created objects; their locks are taken together once planning is
    /// done (`lock_new`).
    pub(super) new_volumes: Vec<(VolumeId, Option<LockGuard>)>,
    pub(super) new_tags: Vec<TagId>,
    pub(super) lock_created: bool,
    pub(super) set_bits: Vec<(u8, u64, u64)>,
    pub(super) clear_bits: Vec<(u8, u64, u64)>,
    /// Extent runs of the volumes deleted (start, count).
    pub(super) deleted_runs: Vec<(u64, u64)>,
    pub(super) blobs: BTreeMap<u32, (u8, Vec<u8>)>,
    pub(super) user_data: BTreeMap<u32, UserData>,
    pub(super) vol_data: BTreeMap<u32, VolData>,
}

/// The initial bytes of a new volume's run.
pub(super) struct VolData {
    pub(super) zero: u64,
    pub(super) pages: Vec<(u64, Vec<u8>)>,
}

impl VolData {
    /// The region as it will read: zeros with the pages over them.
    pub(super) fn image(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.zero as usize];
        for (off, p) in &self.pages {
            b[*off as usize..*off as usize + p.len()].copy_from_slice(p);
        }
        b
    }
}

pub(super) struct Planned {
    pub(super) actions: Vec<Action>,
    pub(super) blobs: Vec<(u32, u8, Vec<u8>)>,
    /// Volume slot, run offset, data.
    pub(super) vol_data: Vec<(u32, u64, VolData)>,
    pub(super) new_volumes: Vec<Volume>,
    pub(super) volume_locks: Vec<LockGuard>,
    pub(super) new_tags: Vec<Tag>,
    /// Extent runs of the volumes deleted (start, count): what a wipe
    /// zeroes before the intent frees them.
    pub(super) deleted_runs: Vec<(u64, u64)>,
}

impl Planned {
    /// Where the last run allocated in each map ends.
    pub(super) fn run_ends(&self) -> [Option<u64>; 3] {
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
    pub(super) fn new(
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
            deleted_runs: Vec::new(),
            blobs: BTreeMap::new(),
            user_data: BTreeMap::new(),
            vol_data: BTreeMap::new(),
        }
    }

    pub(super) fn token_for(&self, r: &Resource) -> std::result::Result<Token, PlanError> {
        match self.guards.get(r) {
            Some(g) => Ok(g.token()),
            None => Err(PlanError::NeedLocks(vec![r.clone()])),
        }
    }

    /// Fail with the locks of the pages `start..start + n` of `map` lies
    /// on that are not held.
    pub(super) fn need_pages(
        &self,
        map: usize,
        start: u64,
        n: u64,
    ) -> std::result::Result<(), PlanError> {
        let missing = self.view.missing(map, start, n);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(self.need(map, missing))
        }
    }

    /// Planning needs the locks of `pages` of `map` too.
    pub(super) fn need(&self, map: usize, pages: Vec<u64>) -> PlanError {
        PlanError::NeedLocks(pages.into_iter().map(|p| self.d.page_res(map, p)).collect())
    }

    /// Find `n` free items in `map` on the pages held; when there are none
    /// there, ask for the other pages' locks, or fail with `full` when
    /// every page is held.
    pub(super) fn find(
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
    pub(super) fn page_token(&self, map: usize, i: u64) -> std::result::Result<Token, PlanError> {
        self.token_for(&self.d.page_res(map, i / BITS_PER_PAGE))
    }

    /// Load a volume for writing: it must be locked.
    pub(super) fn vol(
        &mut self,
        id: &VolumeId,
    ) -> std::result::Result<&mut Entry<Volume>, PlanError> {
        self.d.check_volume_id(id)?;
        let res = ResourceKind::Volume(*id);
        let e = self.load(res, id.slot(), |p| &mut p.vols, Domain::read_volume_slot)?;
        e.live("volume", id, |v| v.id == *id)
    }

    /// Load a tag for writing: it must be locked.
    pub(super) fn tag(&mut self, id: &TagId) -> std::result::Result<&mut Entry<Tag>, PlanError> {
        self.d.check_tag_id(id)?;
        let res = ResourceKind::Tag(*id);
        let e = self.load(res, id.slot(), |p| &mut p.tags, Domain::read_tag_slot)?;
        e.live("tag", id, |t| t.id == *id)
    }

    /// The entry of `slot` in `table`, read (under the lock of `res`) the
    /// first time.
    fn load<T: HasGeneration>(
        &mut self,
        res: ResourceKind,
        slot: u32,
        table: fn(&mut Self) -> &mut Loaded<T>,
        read: SlotRead<T>,
    ) -> std::result::Result<&mut Entry<T>, PlanError> {
        if !table(self).contains_key(&slot) {
            let token = self.token_for(&self.d.resource(res))?;
            let e = Entry::read(token, read(self.d, slot)?);
            table(self).insert(slot, e);
        }
        Ok(table(self).get_mut(&slot).expect("inserted"))
    }

    pub(super) fn live_vol(
        &mut self,
        id: &VolumeId,
    ) -> std::result::Result<&mut Volume, PlanError> {
        match &mut self.vol(id)?.cur {
            Slot::Live(v) => Ok(v),
            _ => unreachable!("vol() checks liveness"),
        }
    }

    pub(super) fn live_tag(&mut self, id: &TagId) -> std::result::Result<&mut Tag, PlanError> {
        match &mut self.tag(id)?.cur {
            Slot::Live(t) => Ok(t),
            _ => unreachable!("tag() checks liveness"),
        }
    }

    pub(super) fn resolve_vol(&self, r: VolumeRef) -> std::result::Result<VolumeId, PlanError> {
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

    pub(super) fn resolve_tag(&self, r: TagRef) -> std::result::Result<TagId, PlanError> {
        match r {
            TagRef::Existing(id) => Ok(id),
            TagRef::New(n) => self.new_tags.get(n).copied().ok_or_else(|| {
                DomainError::invalid("tag", format!("new tag {n} is not created before use")).into()
            }),
        }
    }

    pub(super) fn taken(&self, map: u8) -> Vec<(u64, u64)> {
        self.set_bits
            .iter()
            .chain(self.clear_bits.iter())
            .filter(|(m, _, _)| *m == map)
            .map(|&(_, s, c)| (s, c))
            .collect()
    }

    pub(super) fn alloc_slot(
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

    /// Take a free slot of `map` for a new `what` record, and what it
    /// holds: a slot the map calls free that holds a live record is
    /// corruption.
    pub(super) fn claim<T>(
        &mut self,
        table: Table,
        read: SlotRead<T>,
        id: fn(&T) -> String,
    ) -> std::result::Result<(u32, RecordBytes, Slot<T>), PlanError> {
        let (what, total) = (table.name(), self.d.geom.slots_of(table));
        let map = match table {
            Table::Volume => VOLUME_SLOTS,
            Table::Tag => TAG_SLOTS,
        };
        let slot = self.alloc_slot(map, what, total)?;
        let (before, cur) = read(self.d, slot)?;
        if let Slot::Live(r) = &cur {
            let holds = format!("free in the allocation map but holds {what} {}", id(r));
            let at = self.d.geom.record_off(table, slot);
            return Err(DomainError::corrupt(format!("{what} slot {slot}"), at, holds).into());
        }
        Ok((slot, before, cur))
    }

    pub(super) fn extents_for(&self, size: u64) -> std::result::Result<u64, PlanError> {
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

    pub(super) fn validate_capacity(
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

    pub(super) fn run(&mut self, ops: &[Op]) -> std::result::Result<(), PlanError> {
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
    pub(super) fn lock_new(&mut self) -> std::result::Result<(), PlanError> {
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

    pub(super) fn now(&self) -> u64 {
        self.d.clock.now()
    }
}
