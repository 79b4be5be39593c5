//! The transaction builder: the operations a transaction groups under
//! one intent, and the one-operation shortcuts on [`Domain`].

use super::*;

impl Domain {
    /// Start building a transaction.
    pub fn tx<'a>(&'a self, label: &str) -> Transaction<'a> {
        Transaction {
            domain: self,
            label: label.to_string(),
            request_id: [0; 16],
            ops: Vec::new(),
            held: Vec::new(),
            lock_created: false,
            wipe: false,
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
    /// Set a user data item whose bytes name tags, some of them created
    /// by this transaction (see [`Naming`]).
    SetUserDataNaming(TagRef, String, Naming),
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

/// User data bytes that hold tag ids, some not known before planning: at
/// each offset, the 16 bytes of the tag a [`TagRef`] names are written,
/// then `seal` (given the domain's salt) finishes the bytes, e.g. with a
/// checksum over them.
#[derive(Debug, Clone)]
pub struct Naming {
    /// The bytes, with room at each offset.
    pub bytes: Vec<u8>,
    /// Where each tag's id goes.
    pub ids: Vec<(usize, TagRef)>,
    /// Called once every id is in place.
    pub seal: fn(&[u8; 16], &mut [u8]),
}

/// A set of low-level operations that happen atomically under one intent.
pub struct Transaction<'a> {
    pub(super) domain: &'a Domain,
    pub(super) label: String,
    pub(super) request_id: [u8; 16],
    pub(super) ops: Vec<Op>,
    pub(super) held: Vec<&'a LockGuard>,
    pub(super) lock_created: bool,
    pub(super) wipe: bool,
}

/// Builder methods that add one operation each: `name(args)` adds
/// `Op::Variant(args)`.
macro_rules! ops {
    ($($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) => $variant:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(self, $($arg: $ty),*) -> Self {
                self.op(Op::$variant($($arg),*))
            }
        )*
    };
}

impl<'a> Transaction<'a> {
    /// Add an operation.
    pub fn op(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }
    ops! {
        /// Create a volume (refer to it later as `VolumeRef::New(n)`).
        create_volume(spec: VolumeSpec) => CreateVolume;
        /// Delete a volume.
        delete_volume(id: VolumeId) => DeleteVolume;
        /// Replace a volume's changeable metadata.
        write_volume_meta(id: VolumeId, meta: VolumeMeta) => WriteVolumeMeta;
        /// Grow a volume in place.
        extend_volume(id: VolumeId, size: u64) => ExtendVolume;
        /// Create a tag (refer to it later as `TagRef::New(n)`).
        create_tag(meta: TagMeta) => CreateTag;
        /// Delete a tag.
        delete_tag(id: TagId) => DeleteTag;
        /// Replace a tag's metadata.
        change_tag(id: TagId, meta: TagMeta) => ChangeTag;
    }
    /// Expect a tag unchanged since it was read (see `Op::ExpectTag`).
    pub fn expect_tag(self, t: &Tag) -> Self {
        self.op(Op::ExpectTag(t.id, t.generation))
    }
    /// Set a user data item.
    pub fn set_user_data(self, tag: TagRef, name: &str, data: Vec<u8>) -> Self {
        self.op(Op::SetUserData(tag, name.to_string(), data))
    }
    /// Set a user data item whose bytes name tags ([`Naming`]).
    pub fn set_user_data_naming(self, tag: TagRef, name: &str, naming: Naming) -> Self {
        self.op(Op::SetUserDataNaming(tag, name.to_string(), naming))
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
    /// Zero the extents of the volumes this transaction deletes before the
    /// intent frees them (always so on a domain formatted with
    /// wipe-after-delete).
    pub fn wipe_deleted(mut self, wipe: bool) -> Self {
        self.wipe |= wipe;
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

    pub(super) fn direct_resources(&self, d: &Domain) -> Vec<Resource> {
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
                Op::SetUserData(TagRef::Existing(id), _, _)
                | Op::SetUserDataNaming(TagRef::Existing(id), _, _) => {
                    v.push(d.resource(ResourceKind::Tag(*id)))
                }
                Op::SetUserData(TagRef::New(_), _, _)
                | Op::SetUserDataNaming(TagRef::New(_), _, _) => {}
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
