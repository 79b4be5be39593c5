//! Reading records, tables and user data, and the locks callers take to
//! read-modify-write.

use super::*;

impl Domain {
    pub(super) fn read_record(&self, off: u64, what: &str) -> Result<RecordBytes> {
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

    pub(super) fn check_volume_id(&self, id: &VolumeId) -> Result<()> {
        check_slot("volume_id", id, id.slot(), self.geom.volume_slots)
    }

    pub(super) fn check_tag_id(&self, id: &TagId) -> Result<()> {
        check_slot("tag_id", id, id.slot(), self.geom.tag_slots)
    }

    /// Read a volume's metadata.
    pub fn read_volume(&self, id: &VolumeId) -> Result<Volume> {
        self.check_volume_id(id)?;
        let (_, slot) = self.read_volume_slot(id.slot())?;
        live("volume", id, slot, |v| v.id == *id)
    }

    /// Read a tag's metadata.
    pub fn read_tag(&self, id: &TagId) -> Result<Tag> {
        self.check_tag_id(id)?;
        let (_, slot) = self.read_tag_slot(id.slot())?;
        live("tag", id, slot, |t| t.id == *id)
    }

    pub(super) fn read_table(&self, off: u64, slots: u64) -> Result<AlignedBuf> {
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

    pub(super) fn fresh_alloc(&self) -> Result<AllocMap> {
        AllocMap::load(self.dev.as_ref(), &self.geom)
    }

    /// Every live volume, by slot.
    pub fn list_volumes(&self) -> Result<Vec<Volume>> {
        self.list()
    }

    /// Every live tag, by slot.
    pub fn list_tags(&self) -> Result<Vec<Tag>> {
        self.list()
    }

    /// Every live record of a table, by slot; a record that does not decode
    /// is corruption.
    fn list<T: SlotRecord>(&self) -> Result<Vec<T>> {
        let hw = self.fresh_alloc()?.high_water(T::MAP);
        let (table, _) = T::table(&self.geom);
        let buf = self.read_table(table, hw)?;
        let s = self.geom.sector_size as usize;
        let mut out = Vec::new();
        for i in 0..hw as usize {
            match T::decode(&self.salt(), i as u32, &buf[i * s..i * s + RECORD]) {
                Ok(Slot::Live(v)) => out.push(v),
                Ok(_) => {}
                Err(d) => {
                    let at = table + (i * s) as u64;
                    return Err(DomainError::corrupt(format!("{} slot {i}", T::KIND), at, d));
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

    pub(super) fn blob_of(&self, t: &Tag) -> Result<UserData> {
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

    /// Take a named lock (waits up to the lock timeout). Named locks are
    /// cluster-wide: the name should say which domain it is about.
    pub fn lock_named(&self, name: String) -> Result<LockGuard> {
        self.locks
            .acquire(&self.resource(ResourceKind::Named(name)), self.lock_timeout)
    }

    /// Take a tag's lock (waits up to the lock timeout).
    pub fn lock_tag(&self, id: &TagId) -> Result<LockGuard> {
        self.check_tag_id(id)?;
        self.locks
            .acquire(&self.resource(ResourceKind::Tag(*id)), self.lock_timeout)
    }
}

/// Refuse an id (of `field`) naming a slot beyond the domain's `slots`.
fn check_slot(
    field: &'static str,
    id: &dyn std::fmt::Display,
    slot: u32,
    slots: u32,
) -> Result<()> {
    if slot >= slots {
        let e = format!("{id} names slot {slot} beyond this domain's {slots}");
        return Err(DomainError::invalid(field, e));
    }
    Ok(())
}

/// The record `id` of a slot, if the slot holds it live.
fn live<T>(
    kind: &'static str,
    id: &dyn std::fmt::Display,
    slot: Slot<T>,
    is: impl FnOnce(&T) -> bool,
) -> Result<T> {
    match slot {
        Slot::Live(r) if is(&r) => Ok(r),
        _ => Err(DomainError::NotFound {
            kind,
            id: id.to_string(),
        }),
    }
}
