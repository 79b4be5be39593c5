//! Volumes: create (data initialised before the volume is made legal),
//! delete, change metadata, extend in place, measure and check.

use super::validate::*;
use super::*;
use cairn_domain::limits;

impl Agent {
    /// Create a volume (and optionally a tag on it), with its data area
    /// initialised: zeros for raw, an empty qcow2 image for qcow2.
    pub fn create_volume(
        &self,
        o: &Opened,
        req: CreateVolume,
        request_id: [u8; 16],
    ) -> Result<CreatedVolume> {
        validate_description(&req.description)?;
        let parent = match req.parent {
            None => None,
            Some(p) => {
                let (t, pv) = read_parent(o, req.format, &p)?;
                if pv.legality != Legality::Legal {
                    return Err(AgentError::precondition(format!(
                        "parent tag {p} points at volume {} which is not legal",
                        pv.id
                    )));
                }
                Some((t, pv))
            }
        };
        let capacity = match (req.capacity, &parent) {
            (0, Some((_, pv))) => pv.capacity,
            (c, _) => c,
        };
        validate_capacity(capacity)?;
        let size = match (req.size, req.format) {
            (0, Format::Raw) => capacity,
            (0, Format::Qcow2) => qcow2::fully_allocated(capacity),
            (s, _) => s,
        };
        if let Some(spec) = &req.tag {
            validate_tag_spec(spec)?;
        }
        if req.format == Format::Qcow2 {
            // Refuse before anything is written if the run cannot hold the
            // image's metadata.
            let es = o.domain.geometry().extent_size;
            let run = size.div_ceil(es).saturating_mul(es);
            qcow2::empty_image(capacity, run, None).map_err(|r| AgentError::invalid("size", r))?;
        }
        let backing = parent.as_ref().map(|(_, pv)| (pv.id, pv.format));
        let mut spec = VolumeSpec {
            format: req.format,
            capacity,
            size,
            allocation: req.allocation,
            parent: parent.as_ref().map(|(t, _)| TagRef::Existing(t.id)),
            legality: Legality::Illegal,
            description: req.description.clone(),
        };
        if req.format == Format::Qcow2 {
            // One transaction: the image's metadata is written with the
            // records, and recovery verifies it (see InitVolumeData).
            let es = o.domain.geometry().extent_size;
            let run = size.div_ceil(es) * es;
            let (zero, pages) = qcow2_init(capacity, run, backing)?;
            spec.legality = Legality::Legal;
            let mut tx = o
                .domain
                .tx("create volume")
                .request_id(request_id)
                .create_volume(spec)
                .init_volume_data(VolumeRef::New(0), zero, pages);
            if let Some(s) = &req.tag {
                tx = tx.create_tag(tag_meta(s, VolumeRef::New(0), capacity));
            }
            let mut out = tx.lock_created().commit()?;
            let (volume, guard) = (out.volumes.remove(0), out.volume_locks.remove(0));
            if volume.allocation == Allocation::Preallocated {
                if let Err(e) = preallocate(&o.path, o.extent(&volume)) {
                    tracing::warn!(volume = %volume.id, error = %e, "could not preallocate");
                }
            }
            let lock_id = req
                .keep_locked
                .map(|lease| self.keep_lock(o, volume.id, guard, lease));
            return Ok(CreatedVolume {
                volume,
                tag: out.tags.pop(),
                lock_id,
            });
        }
        let (vol, guard) = self.begin_volume(o, spec, backing, request_id)?;
        let (volume, tag) = self.finish_volume(o, &vol, &guard, req.tag.as_ref(), request_id)?;
        let lock_id = req
            .keep_locked
            .map(|lease| self.keep_lock(o, vol.id, guard, lease));
        Ok(CreatedVolume {
            volume,
            tag,
            lock_id,
        })
    }

    /// First step of making a volume: create it ILLEGAL and initialise its
    /// data area (see the module docs).
    pub(crate) fn begin_volume(
        &self,
        o: &Opened,
        spec: VolumeSpec,
        backing: Option<(VolumeId, Format)>,
        request_id: [u8; 16],
    ) -> Result<(Volume, LockGuard)> {
        let mut out = o
            .domain
            .tx("create volume")
            .request_id(request_id)
            .create_volume(spec)
            .lock_created()
            .commit()?;
        let (vol, guard) = (out.volumes.remove(0), out.volume_locks.remove(0));
        if let Err(e) = self.init_data(o, &vol, backing) {
            self.undo_create(o, &vol, &guard);
            return Err(e);
        }
        Ok((vol, guard))
    }

    /// Last step: mark the volume LEGAL and create its tag, in one
    /// transaction. Removes the volume if that fails.
    pub(crate) fn finish_volume(
        &self,
        o: &Opened,
        vol: &Volume,
        guard: &LockGuard,
        tag: Option<&TagSpec>,
        request_id: [u8; 16],
    ) -> Result<(Volume, Option<Tag>)> {
        let mut meta = vol.meta();
        meta.legality = Legality::Legal;
        let mut tx = o
            .domain
            .tx("create volume: finish")
            .request_id(request_id)
            .write_volume_meta(vol.id, meta)
            .held(&[guard]);
        if let Some(s) = tag {
            tx = tx.create_tag(tag_meta(s, VolumeRef::Existing(vol.id), vol.capacity));
        }
        let mut fin = match tx.commit() {
            Ok(f) => f,
            Err(e) => {
                self.undo_create(o, vol, guard);
                return Err(e.into());
            }
        };
        let tag = (!fin.tags.is_empty()).then(|| fin.tags.remove(0));
        Ok((o.domain.read_volume(&vol.id)?, tag))
    }

    /// Best effort: remove a volume whose creation failed half way. If this
    /// fails too, the next start removes it.
    pub(crate) fn undo_create(&self, o: &Opened, v: &Volume, guard: &LockGuard) {
        if let Err(e) = o.domain.delete_volume(&v.id, &[guard]) {
            tracing::warn!(volume = %v.id, error = %e, "could not remove a half-made volume");
        }
    }

    /// Zero a new volume's run, or lay out an empty qcow2 image in it, and
    /// flush.
    pub(super) fn init_data(
        &self,
        o: &Opened,
        v: &Volume,
        backing: Option<(VolumeId, Format)>,
    ) -> Result<()> {
        let ext = o.extent(v);
        let dev = o.dev();
        let io = |what: &str| AgentError::io(format!("initialising volume {}: {what}", v.id));
        match v.format {
            Format::Raw => {
                dev.zero_range(ext.offset, ext.len).map_err(io("zeroing"))?;
                if v.allocation == Allocation::Preallocated {
                    preallocate(&o.path, ext).map_err(io("preallocating"))?;
                }
            }
            Format::Qcow2 => {
                let (zero, pages) = qcow2_init(v.capacity, ext.len, backing)?;
                if v.allocation == Allocation::Preallocated {
                    preallocate(&o.path, ext).map_err(io("preallocating"))?;
                }
                dev.zero_range(ext.offset, zero)
                    .map_err(io("zeroing metadata"))?;
                for (off, page) in pages {
                    let buf = AlignedBuf::from_slice(&page, page.len());
                    dev.write_at(&buf, ext.offset + off)
                        .map_err(io("writing the qcow2 header"))?;
                }
            }
        }
        dev.flush().map_err(io("flushing"))
    }

    /// Delete a volume: no tag may point at it, and it must not be active.
    pub fn delete_volume(
        &self,
        o: &Opened,
        id: &VolumeId,
        lock_id: &str,
        request_id: [u8; 16],
    ) -> Result<()> {
        let held = self.client_lock(o, id, lock_id)?;
        o.domain.read_volume(id)?;
        if self.is_active(o, id)? {
            return Err(AgentError::InUse(format!(
                "volume {id} is active; deactivate its tags first"
            )));
        }
        let h: Vec<&LockGuard> = held.iter().map(|g| g.as_ref()).collect();
        o.domain
            .tx("delete volume")
            .request_id(request_id)
            .delete_volume(*id)
            .held(&h)
            .commit()?;
        Ok(())
    }

    /// Replace a volume's description and legality, and its parent when
    /// `parent` is given.
    #[allow(clippy::too_many_arguments)]
    pub fn update_volume(
        &self,
        o: &Opened,
        id: &VolumeId,
        description: String,
        legality: Legality,
        parent: Option<Option<TagId>>,
        lock_id: &str,
        request_id: [u8; 16],
    ) -> Result<(Volume, bool)> {
        validate_description(&description)?;
        let held = self.client_lock(o, id, lock_id)?;
        let v = o.domain.read_volume(id)?;
        let parent = parent.unwrap_or(v.parent);
        if let Some(p) = parent {
            // The new parent's chain must not go through this volume.
            let (_, pv) = read_parent(o, v.format, &p)?;
            if self.volume_chain(o, &pv)?.iter().any(|c| c.id == v.id) {
                return Err(AgentError::precondition(format!(
                    "tag {p} is on the chain below volume {id}: that would make a loop"
                )));
            }
        }
        if v.description == description && v.legality == legality && v.parent == parent {
            return Ok((v, false));
        }
        let meta = VolumeMeta {
            description,
            legality,
            parent,
            ..v.meta()
        };
        let h: Vec<&LockGuard> = held.iter().map(|g| g.as_ref()).collect();
        o.domain
            .tx("update volume")
            .request_id(request_id)
            .write_volume_meta(*id, meta)
            .held(&h)
            .commit()?;
        Ok((o.domain.read_volume(id)?, true))
    }

    /// Grow a volume to `capacity` virtual bytes, growing its run in place.
    pub fn extend_volume(
        &self,
        o: &Opened,
        id: &VolumeId,
        capacity: u64,
        lock_id: &str,
        tag: Option<&TagId>,
        request_id: [u8; 16],
    ) -> Result<(Volume, bool)> {
        validate_capacity(capacity)?;
        // The disk's tag, whose size follows the capacity; its lock comes
        // before the volume's.
        let tlock = tag.map(|t| o.domain.lock_tag(t)).transpose()?;
        let tag = match tag {
            Some(t) => {
                let t = o.domain.read_tag(t)?;
                if t.volume != *id {
                    return Err(AgentError::invalid(
                        "tag_id",
                        format!("tag {} points at volume {}, not {id}", t.id, t.volume),
                    ));
                }
                Some(t)
            }
            None => None,
        };
        let held = self.client_lock(o, id, lock_id)?;
        let own;
        let guard: &LockGuard = match &held {
            Some(g) => g,
            None => {
                own = o.domain.lock_volume(id)?;
                &own
            }
        };
        let v = o.domain.read_volume(id)?;
        if capacity == v.capacity && tag.as_ref().is_none_or(|t| t.size == capacity) {
            return Ok((v, false));
        }
        limits::check_growth("capacity", "volume", capacity, v.capacity)?;
        if v.legality != Legality::Legal {
            return Err(AgentError::precondition(format!(
                "volume {id} is not legal"
            )));
        }
        let g = o.domain.geometry();
        let run = v.extent_count * g.extent_size;
        let need = match v.format {
            Format::Raw => capacity,
            Format::Qcow2 => qcow2::fully_allocated(capacity),
        };
        let ext0 = o.extent(&v);
        if need > run {
            let grown = o
                .domain
                .tx("extend volume")
                .request_id(request_id)
                .extend_volume(*id, need)
                .held(&[guard])
                .commit();
            match grown {
                Ok(_) => {}
                Err(DomainError::NoSpace(m)) => {
                    // A disk's top can move to where there is room.
                    if let (Some(t), Some(tl)) = (&tag, &tlock) {
                        let nv = self.relocate_top(o, t, &v, capacity, &[guard, tl], request_id)?;
                        return Ok((nv, true));
                    }
                    return Err(AgentError::CannotGrowInPlace(format!(
                        "volume {id} cannot grow in place to {need} bytes: {m}"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
            // The new extents were free; they must read as zeros.
            let dev = o.dev();
            dev.zero_range(
                ext0.offset + ext0.len,
                need.div_ceil(g.extent_size) * g.extent_size - run,
            )
            .map_err(AgentError::io("zeroing the grown run"))?;
        }
        if v.format == Format::Qcow2 && capacity > v.capacity {
            self.grow_qcow2(o, &v, capacity)?;
        }
        let meta = VolumeMeta {
            capacity,
            ..v.meta()
        };
        let mut tx = o
            .domain
            .tx("extend volume: capacity")
            .request_id(request_id)
            .write_volume_meta(*id, meta);
        if let Some(t) = &tag {
            let mut m = t.meta();
            m.size = capacity;
            tx = tx.change_tag(t.id, m);
        }
        let mut held = vec![guard];
        held.extend(tlock.as_ref());
        tx.held(&held).commit()?;
        let v = o.domain.read_volume(id)?;
        self.resize_active(o, &v)?;
        Ok((v, true))
    }

    pub(crate) fn grow_qcow2(&self, o: &Opened, v: &Volume, capacity: u64) -> Result<()> {
        let ext = o.extent(v);
        let dev = o.dev();
        let mut page = AlignedBuf::zeroed(qcow2::HEADER_PAGE);
        dev.read_at(&mut page, ext.offset)
            .map_err(AgentError::io("reading the qcow2 header"))?;
        match qcow2::grow_header(&page, capacity) {
            Some(h) => {
                let buf = AlignedBuf::from_slice(&h, h.len());
                dev.write_at(&buf, ext.offset)
                    .map_err(AgentError::io("writing the qcow2 header"))?;
                dev.flush().map_err(AgentError::io("flushing"))?;
            }
            None => {
                // The L1 table must move: let qemu-img do it.
                let node = self.node(o, v);
                self.qemu.run(&[
                    "resize".into(),
                    format!("json:{node}"),
                    capacity.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// A qemu block node for one volume (a qcow2 one without its parents).
    pub(crate) fn node(&self, o: &Opened, v: &Volume) -> serde_json::Value {
        let ext = o.extent(v);
        let file = serde_json::json!({
            "driver": "file",
            "filename": o.path,
            "locking": "off",
        });
        match v.format {
            Format::Raw => serde_json::json!({
                "driver": "raw", "offset": ext.offset, "size": v.capacity, "file": file,
            }),
            Format::Qcow2 => serde_json::json!({
                "driver": "qcow2",
                "file": {"driver": "raw", "offset": ext.offset, "size": ext.len, "file": file},
                "backing": serde_json::Value::Null,
            }),
        }
    }

    /// A qemu block node for a volume with its whole chain. A volume with
    /// parents is read through a scratch activation (qemu cannot nest
    /// offset nodes as backing files more than one deep), which the
    /// returned guard keeps up.
    pub(crate) fn chain_node<'a>(
        &'a self,
        o: &'a Opened,
        v: &Volume,
    ) -> Result<(serde_json::Value, Option<Scratch<'a>>)> {
        if v.parent.is_none() {
            return Ok((self.node(o, v), None));
        }
        let s = self.scratch_chain(o, v)?;
        Ok((s.node(), Some(s)))
    }

    /// `qemu-img measure` of a volume and its chain.
    pub fn measure(&self, o: &Opened, id: &VolumeId, target: Format) -> Result<Measure> {
        let v = o.domain.read_volume(id)?;
        let (node, _scratch) = self.chain_node(o, &v)?;
        let out = self.qemu.run(&[
            "measure".into(),
            "--output=json".into(),
            "-O".into(),
            target.as_str().into(),
            format!("json:{node}"),
        ])?;
        let j: serde_json::Value = serde_json::from_str(&out).map_err(|e| AgentError::Qemu {
            tool: "qemu-img measure".into(),
            detail: format!("unreadable output: {e}"),
        })?;
        let get = |k: &str| j.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        Ok(Measure {
            required: get("required"),
            fully_allocated: get("fully-allocated"),
        })
    }

    /// `qemu-img check` of a volume's image.
    pub fn check_volume(&self, o: &Opened, id: &VolumeId) -> Result<CheckResult> {
        let v = o.domain.read_volume(id)?;
        if v.format == Format::Raw {
            return Ok(CheckResult {
                clean: true,
                corruptions: 0,
                leaks: 0,
                check_errors: 0,
                report: "{}".into(),
            });
        }
        let node = self.node(o, &v);
        let out = self
            .qemu
            .output(&[
                "check".into(),
                "--output=json".into(),
                format!("json:{node}"),
            ])
            .map_err(AgentError::io("running qemu-img check"))?;
        let report = out.stdout;
        // Exit 0 clean, 2 corrupt, 3 leaks; 1 means it could not check.
        let j: serde_json::Value = serde_json::from_str(&report).map_err(|_| AgentError::Qemu {
            tool: "qemu-img check".into(),
            detail: out.stderr.trim().to_string(),
        })?;
        let get = |k: &str| j.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        let (corruptions, leaks, check_errors) =
            (get("corruptions"), get("leaks"), get("check-errors"));
        Ok(CheckResult {
            clean: corruptions == 0 && leaks == 0 && check_errors == 0,
            corruptions,
            leaks,
            check_errors,
            report,
        })
    }
}

/// The start of a new qcow2 image of `capacity` in a run of `run` bytes:
/// bytes to zero, and pages to write over them.
pub(super) fn qcow2_init(
    capacity: u64,
    run: u64,
    backing: Option<(VolumeId, Format)>,
) -> Result<(u64, Vec<qcow2::Page>)> {
    let name = backing.map(|(id, _)| id.to_string());
    let b = backing.map(|(_, f)| match f {
        Format::Raw => qcow2::BackingFormat::Raw,
        Format::Qcow2 => qcow2::BackingFormat::Qcow2,
    });
    let (plan, pages) = qcow2::empty_image(capacity, run, name.as_deref().zip(b))
        .map_err(|r| AgentError::invalid("size", r))?;
    Ok((plan.metadata_bytes(), pages))
}

/// Allocate the blocks of a run in a file domain (a no-op on a block
/// device, whose blocks always exist).
pub(super) fn preallocate(path: &Path, ext: Extent) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    if f.metadata()?.file_type().is_file() {
        // SAFETY: plain syscall on an owned descriptor.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                ext.offset as libc::off_t,
                ext.len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! What the agent makes of qemu-img's answers, with a scripted
    //! qemu-img and a fixed clock on a domain in a file (no loop devices:
    //! nothing here activates).

    use super::*;
    use crate::loopdev::MemLoop;
    use crate::qemu::FakeQemu;

    fn agent(qemu: Arc<FakeQemu>) -> (tempfile::TempDir, Agent) {
        agent_with(qemu, Arc::new(MemLoop::default()))
    }

    fn agent_with(qemu: Arc<FakeQemu>, loops: Arc<MemLoop>) -> (tempfile::TempDir, Agent) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let locks: Arc<dyn LockService> = Arc::new(cairn_domain::MemLockService::new());
        let params = cairn_domain::FormatParams::small("t", 2, 64);
        let dev = FileDev::open(&path, true).unwrap();
        cairn_domain::format(&dev, &params, false, locks.as_ref(), &SystemClock).unwrap();
        let cfg = AgentConfig {
            domains: vec![path],
            run_dir: dir.path().join("run"),
            host: HostIdentity::local(),
            lock_timeout: Duration::from_secs(5),
            io_dirs: vec![],
            gc_quarantine: GC_QUARANTINE,
        };
        let host = HostEffects {
            loops,
            qemu,
            clock: Arc::new(cairn_domain::FixedClock(1_700_000_000)),
        };
        (dir, Agent::open_with(&cfg, locks, host).unwrap())
    }

    /// A new volume of `format` (with a disk's tag when `tag`).
    fn new_volume(
        a: &Agent,
        o: &Opened,
        format: Format,
        capacity: u64,
        tag: bool,
        rid: u8,
    ) -> CreatedVolume {
        a.create_volume(
            o,
            CreateVolume {
                format,
                capacity,
                size: 0,
                allocation: Allocation::Sparse,
                parent: None,
                description: String::new(),
                tag: tag.then(|| cairn_domain::api::TagSpec::disk(vec![])),
                keep_locked: None,
            },
            [rid; 16],
        )
        .unwrap()
    }

    fn qcow2_volume(a: &Agent) -> (Arc<Opened>, Volume) {
        let o = a.domain("").unwrap();
        let c = new_volume(a, &o, Format::Qcow2, 64 << 20, false, 1);
        (o, c.volume)
    }

    #[test]
    fn check_reads_the_counts_of_qemu_img_s_report() {
        let report = r#"{"corruptions": 2, "leaks": 1, "check-errors": 0}"#;
        // qemu-img check exits 2 when it finds corruption.
        let mut answer = FakeQemu::ok(report);
        answer.code = Some(2);
        let q = Arc::new(FakeQemu::answering([answer]));
        let (_d, a) = agent(q.clone());
        let (o, v) = qcow2_volume(&a);
        // The volume was made on the agent's clock.
        assert_eq!(v.ctime, 1_700_000_000);
        let c = a.check_volume(&o, &v.id).unwrap();
        assert_eq!((c.clean, c.corruptions, c.leaks), (false, 2, 1));
        assert_eq!(c.report, report);
        let call = &q.calls()[0];
        assert_eq!(&call[..2], ["check", "--output=json"]);
        let node: serde_json::Value =
            serde_json::from_str(call[2].strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(node["driver"], "qcow2");
        assert_eq!(node["file"]["offset"], o.extent(&v).offset);
    }

    #[test]
    fn an_unreadable_check_is_a_qemu_error_with_its_message() {
        let q = Arc::new(FakeQemu::answering([FakeQemu::failed(1, "cannot open\n")]));
        let (_d, a) = agent(q);
        let (o, v) = qcow2_volume(&a);
        match a.check_volume(&o, &v.id) {
            Err(AgentError::Qemu { tool, detail }) => {
                assert_eq!(tool, "qemu-img check");
                assert_eq!(detail, "cannot open");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn measure_reads_required_and_fully_allocated() {
        let q = Arc::new(FakeQemu::answering([FakeQemu::ok(
            r#"{"required": 393216, "fully-allocated": 67502080}"#,
        )]));
        let (_d, a) = agent(q.clone());
        let (o, v) = qcow2_volume(&a);
        let m = a.measure(&o, &v.id, Format::Raw).unwrap();
        assert_eq!((m.required, m.fully_allocated), (393216, 67502080));
        assert_eq!(
            &q.calls()[0][..4],
            ["measure", "--output=json", "-O", "raw"]
        );
    }

    #[test]
    fn a_forced_deactivation_of_a_held_device_keeps_its_volume_until_the_device_goes() {
        let loops = Arc::new(MemLoop::default());
        let (_d, a) = agent_with(Arc::new(FakeQemu::default()), loops.clone());
        let o = a.domain("").unwrap();
        let c = new_volume(&a, &o, Format::Raw, 4 << 20, true, 2);
        let tag = c.tag.unwrap();
        let (act, _) = a.activate(&o, &tag.id).unwrap();
        let dev = &act.volumes[0].device;
        let index: u32 = dev.to_str().unwrap()["/dev/loop".len()..].parse().unwrap();
        loops.set_open(index, vec![4242]);
        assert!(
            a.deactivate(&o, &tag.id, false).is_err(),
            "held: refused unless forced"
        );
        let d = a.deactivate(&o, &tag.id, true).unwrap();
        assert!(d.changed);
        assert_eq!(d.still_open, vec![dev.display().to_string()]);
        assert!(a.activations(&o).unwrap()[0].closing);
        // Protected: no delete, no new activation.
        assert!(a.delete_disk(&o, &tag.id, [3; 16]).is_err());
        assert!(a.activate(&o, &tag.id).is_err());
        // Asked again, it still says so and changes nothing.
        let again = a.deactivate(&o, &tag.id, true).unwrap();
        assert_eq!((again.changed, again.still_open.len()), (false, 1));
        // The last close: the device goes, and so does the activation.
        loops.set_open(index, vec![]);
        assert!(a.activations(&o).unwrap().is_empty());
        a.delete_disk(&o, &tag.id, [4; 16]).unwrap();
        assert!(o.domain.read_volume(&c.volume.id).is_err());
    }
}
