//! The planner's operations, one arm each.

use super::planner::*;
use super::*;

/// A tag's metadata as a transaction may write it: options that encode,
/// a size not beyond the largest capacity.
fn check_tag_meta(meta: &TagMeta) -> Result<()> {
    encode_options(&meta.options)?;
    if meta.size > MAX_CAPACITY {
        let e = format!("{} is too large", meta.size);
        return Err(DomainError::invalid("size", e));
    }
    Ok(())
}

/// Refuse to delete what `refs` records still refer to.
fn unused(refs: u32, why: impl FnOnce() -> String) -> Result<()> {
    if refs > 0 {
        return Err(DomainError::FailedPrecondition(why()));
    }
    Ok(())
}

impl Planner<'_> {
    pub(super) fn op(&mut self, op: &Op) -> std::result::Result<(), PlanError> {
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
                let (slot, before, cur) =
                    self.claim(Table::Volume, Domain::read_volume_slot, |v| {
                        v.id.to_string()
                    })?;
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
                self.vols.insert(slot, Entry::fresh(before, v));
                self.new_volumes.push((id, None));
            }
            Op::DeleteVolume(id) => {
                let v = self.live_vol(id)?.clone();
                unused(v.tag_refs, || {
                    format!("volume {id} is referenced by {} tag(s)", v.tag_refs)
                })?;
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
                self.deleted_runs.push((v.extent_start, v.extent_count));
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
                check_tag_meta(meta)?;
                let vid = self.resolve_vol(meta.volume)?;
                self.live_vol(&vid)?.tag_refs += 1;
                let (slot, before, cur) =
                    self.claim(Table::Tag, Domain::read_tag_slot, |t| t.id.to_string())?;
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
                self.tags.insert(slot, Entry::fresh(before, t));
                self.new_tags.push(id);
            }
            Op::DeleteTag(id) => {
                let t = self.live_tag(id)?.clone();
                unused(t.child_refs, || {
                    format!("tag {id} is the parent of {} volume(s)", t.child_refs)
                })?;
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
                check_tag_meta(meta)?;
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
                crate::limits::check_name("user_data_name", "", name, MAX_ITEM_NAME)?;
                let id = self.resolve_tag(*r)?;
                let mut items = self.items_of(&id)?;
                items.insert(name.clone(), data.clone());
                self.store_items(&id, items)?;
            }
            Op::SetUserDataNaming(r, name, n) => {
                crate::limits::check_name("user_data_name", "", name, MAX_ITEM_NAME)?;
                let id = self.resolve_tag(*r)?;
                let mut bytes = n.bytes.clone();
                for (off, t) in &n.ids {
                    let named = self.resolve_tag(*t)?;
                    let room = bytes.get_mut(*off..*off + 16).ok_or_else(|| {
                        DomainError::invalid("user_data", format!("no room for a tag id at {off}"))
                    })?;
                    room.copy_from_slice(named.as_bytes());
                }
                (n.seal)(&self.d.salt(), &mut bytes);
                let mut items = self.items_of(&id)?;
                items.insert(name.clone(), bytes);
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

    pub(super) fn items_of(&mut self, id: &TagId) -> std::result::Result<UserData, PlanError> {
        let t = self.live_tag(id)?.clone();
        if let Some(items) = self.user_data.get(&id.slot()) {
            return Ok(items.clone());
        }
        Ok(self.d.blob_of(&t)?)
    }

    pub(super) fn store_items(
        &mut self,
        id: &TagId,
        items: UserData,
    ) -> std::result::Result<(), PlanError> {
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

    pub(super) fn finish(mut self) -> Result<Planned> {
        self.one_writer_per_volume()?;
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
        for (slot, before, after) in rewrites(&salt, self.writer, &self.vols, &mut new_volumes_rec)
        {
            actions.push(Action::PutVolume {
                slot,
                before,
                after,
            });
        }
        let mut new_tags_rec = Vec::new();
        for (slot, before, after) in rewrites(&salt, self.writer, &self.tags, &mut new_tags_rec) {
            actions.push(Action::PutTag {
                slot,
                before,
                after,
            });
        }
        for &(map, start, count) in &self.clear_bits {
            actions.push(Action::ClearBits { map, start, count });
        }
        // Return new objects in creation order with their final records.
        let mut volume_locks = Vec::new();
        let mut volume_ids = Vec::new();
        for (id, guard) in self.new_volumes {
            volume_locks.extend(guard);
            volume_ids.push(id);
        }
        let volumes = in_order(volume_ids, new_volumes_rec, |v| v.id, "volume")?;
        let tags = in_order(self.new_tags, new_tags_rec, |t| t.id, "tag")?;
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
            deleted_runs: self.deleted_runs,
        })
    }
}

impl Planner<'_> {
    /// At most one writable (strong, mutable) tag per volume, in the state
    /// the plan leaves: two would be two disks writing one image. Only a
    /// volume with more than one tag can have two, so most plans read no
    /// more than they already have.
    fn one_writer_per_volume(&self) -> Result<()> {
        let writes = |t: &Tag| t.tag_type == TagType::Strong && t.mutable;
        let mut suspects = std::collections::BTreeSet::new();
        for e in self.tags.values() {
            let Slot::Live(t) = &e.cur else { continue };
            if !writes(t) {
                continue;
            }
            let refs = match self.vols.get(&t.volume.slot()).map(|e| &e.cur) {
                Some(Slot::Live(v)) => v.tag_refs,
                Some(_) => 0,
                None => self.d.read_volume(&t.volume)?.tag_refs,
            };
            if refs > 1 {
                suspects.insert(t.volume);
            }
        }
        if suspects.is_empty() {
            return Ok(());
        }
        let mut all: BTreeMap<u32, Tag> = self
            .d
            .list_tags()?
            .into_iter()
            .map(|t| (t.id.slot(), t))
            .collect();
        for (slot, e) in &self.tags {
            match &e.cur {
                Slot::Live(t) => all.insert(*slot, t.clone()),
                _ => all.remove(slot),
            };
        }
        for v in suspects {
            let w: Vec<String> = all
                .values()
                .filter(|t| t.volume == v && writes(t))
                .map(|t| t.id.to_string())
                .collect();
            if w.len() > 1 {
                return Err(DomainError::FailedPrecondition(format!(
                    "volume {v} would have {} writable (strong, mutable) tags ({}); a volume has at most one",
                    w.len(),
                    w.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// The slot writes a plan makes of its records: records it did not change
/// are left out, rewritten ones restamped, freed ones written as free.
/// Records created by the plan are collected in `made`.
fn rewrites<T: SlotRecord>(
    salt: &[u8; 16],
    writer: u16,
    entries: &BTreeMap<u32, Entry<T>>,
    made: &mut Vec<T>,
) -> Vec<(u32, Box<RecordBytes>, Box<RecordBytes>)> {
    let mut out = Vec::new();
    for (slot, e) in entries {
        let after = match &e.cur {
            Slot::Live(r) if !e.fresh && r.encode(salt) == e.before => continue,
            Slot::Live(r) if e.fresh => {
                made.push(r.clone());
                r.encode(salt)
            }
            Slot::Live(r) => {
                let mut r = r.clone();
                r.restamp(e.token, writer);
                r.encode(salt)
            }
            Slot::Free { generation, token } => {
                encode_free(salt, T::MAGIC, *generation, *token, writer)
            }
            Slot::Empty => continue,
        };
        out.push((*slot, Box::new(e.before), Box::new(after)));
    }
    out
}

/// The records created, in the order they were created.
fn in_order<T: Clone, I: PartialEq + std::fmt::Display>(
    ids: Vec<I>,
    made: Vec<T>,
    id: impl Fn(&T) -> I,
    what: &str,
) -> Result<Vec<T>> {
    ids.into_iter()
        .map(|want| {
            made.iter().find(|r| id(r) == want).cloned().ok_or_else(|| {
                DomainError::FailedPrecondition(format!(
                    "{what} {want} was created and deleted in the same transaction"
                ))
            })
        })
        .collect()
}
