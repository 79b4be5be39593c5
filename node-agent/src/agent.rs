//! The agent's operations, in domain types and synchronous: the gRPC layer
//! runs each of them on a blocking thread.
//!
//! Volumes whose data must be initialised (zeroed runs, qcow2 headers) are
//! made in two steps: one transaction creates the volume ILLEGAL, the data
//! is written and flushed, a second transaction marks it LEGAL and does
//! whatever else the operation does (create a tag, move a disk's tag). A
//! crash in between leaves an illegal volume that nothing references; the
//! agent removes such volumes of its own host slot when it starts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_domain::io::{AlignedBuf, BlockDev, FileDev};
use cairn_domain::limits;
use cairn_domain::lock::LockService;
use cairn_domain::{
    Allocation, Domain, DomainError, Format, HostIdentity, Legality, LockGuard, OpenOptions, Tag,
    TagId, TagMeta, TagRef, TagState, TagType, Volume, VolumeId, VolumeMeta, VolumeRef, VolumeSpec,
};

use crate::activation::{plan_reconcile, Extent, Fix, RunDir};
use crate::error::{AgentError, Result};
use crate::loopdev::{LoopControl, LoopInfo};
use crate::qcow2;
use cairn_domain::records::UserData;

/// How an agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Domain devices or files to open.
    pub domains: Vec<PathBuf>,
    /// Where stable paths live (`/run/cairn`).
    pub run_dir: PathBuf,
    /// This host.
    pub host: HostIdentity,
    /// How long an operation waits for a lock.
    pub lock_timeout: Duration,
    /// Directories of this host that import and export may use.
    pub io_dirs: Vec<PathBuf>,
    /// How long after a dead host's journal was recovered the volumes it
    /// half made stay before they are removed (see `recover_domain`).
    pub gc_quarantine: Duration,
}

/// Default of [`AgentConfig::gc_quarantine`].
pub const GC_QUARANTINE: Duration = Duration::from_secs(60);

/// An open domain with what the agent knows about it.
pub struct Opened {
    /// The domain.
    pub domain: Domain,
    /// Its device or file, canonical.
    pub path: PathBuf,
    /// Its run directory.
    pub run: RunDir,
}

impl Opened {
    /// Domain id.
    pub fn id(&self) -> uuid::Uuid {
        self.domain.geometry().domain_id
    }
    /// Domain name.
    pub fn name(&self) -> &str {
        &self.domain.geometry().name
    }
    fn dev(&self) -> &Arc<dyn BlockDev> {
        self.domain.device()
    }
    /// Where a volume's run is on the device.
    pub fn extent(&self, v: &Volume) -> Extent {
        let g = self.domain.geometry();
        Extent {
            offset: g.extent_off(v.extent_start),
            len: v.extent_count * g.extent_size,
        }
    }
}

/// A volume lock held for a client.
struct ClientLock {
    guard: Arc<LockGuard>,
    domain: uuid::Uuid,
    volume: VolumeId,
    expires: Instant,
}

/// What CreateVolume asks for.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    /// Raw or qcow2.
    pub format: Format,
    /// Virtual size; 0 takes the parent's.
    pub capacity: u64,
    /// Bytes of run; 0 picks what the format needs.
    pub size: u64,
    /// Sparse or preallocated.
    pub allocation: Allocation,
    /// Parent tag (qcow2 only).
    pub parent: Option<TagId>,
    /// Free text.
    pub description: String,
    /// Create this tag on the new volume too.
    pub tag: Option<TagSpec>,
    /// Keep the new volume's lock for the caller for this long.
    pub keep_locked: Option<Duration>,
}

pub use cairn_domain::api::TagSpec;

/// What CreateVolume made.
#[derive(Debug)]
pub struct CreatedVolume {
    /// The volume.
    pub volume: Volume,
    /// The tag, when one was asked for.
    pub tag: Option<Tag>,
    /// The kept lock's id.
    pub lock_id: Option<String>,
}

/// What a snapshot's weak tag says.
#[derive(Debug, Clone, Default)]
pub struct SnapshotSpec {
    /// Shown with the snapshot, also on its weak tag.
    pub description: String,
    /// Bytes of extent run for the new volume; 0 sizes it for the whole
    /// virtual size.
    pub size: u64,
    /// More options for the weak tag.
    pub options: Vec<(String, String)>,
}

/// What Snapshot made.
#[derive(Debug)]
pub struct Snapshot {
    /// The new top volume.
    pub volume: Volume,
    /// The weak tag on the old top.
    pub parent_tag: Tag,
    /// The disk's tag, moved.
    pub tag: Tag,
    /// The thin clone's volume and strong tag, when one was asked for.
    pub clone: Option<(Volume, Tag)>,
}

/// One activated volume.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActiveVolume {
    /// Volume.
    pub volume: VolumeId,
    /// Stable path.
    pub path: PathBuf,
    /// Device.
    pub device: PathBuf,
    /// Format.
    pub format: Format,
}

/// A tag's activation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Activation {
    /// Domain id.
    pub domain: uuid::Uuid,
    /// Tag (directory name).
    pub tag: String,
    /// Stable path of the top volume.
    pub path: PathBuf,
    /// Base first.
    pub volumes: Vec<ActiveVolume>,
}

/// `qemu-img measure` of a volume.
#[derive(Debug, Clone, Copy)]
pub struct Measure {
    /// Bytes for the data as it is.
    pub required: u64,
    /// Bytes for a fully written image.
    pub fully_allocated: u64,
}

/// `qemu-img check` of a volume.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// No corruption, no leak, no error.
    pub clean: bool,
    /// Corruptions found.
    pub corruptions: u64,
    /// Leaked clusters.
    pub leaks: u64,
    /// Errors while checking.
    pub check_errors: u64,
    /// The JSON report.
    pub report: String,
}

/// The node agent.
pub struct Agent {
    /// New at every start (see `instance`).
    instance: uuid::Uuid,
    domains: Vec<Arc<Opened>>,
    loops: Arc<dyn LoopControl>,
    /// Serialises changes to activations.
    act: Mutex<()>,
    client_locks: Mutex<HashMap<String, ClientLock>>,
    pub(crate) jobs: crate::jobs::Jobs,
    pub(crate) io_dirs: Vec<PathBuf>,
    pub(crate) gc_quarantine: Duration,
    /// The mark on this agent's loop devices: `cairn:<host id>`.
    owner: String,
}

/// Directory name prefix of scratch activations.
const SCRATCH_PREFIX: &str = ".job-";

/// A chain activated for a job; taken down when dropped.
pub(crate) struct Scratch<'a> {
    agent: &'a Agent,
    o: &'a Opened,
    dir: String,
    /// The top volume's path.
    pub path: PathBuf,
    /// The top volume's format.
    pub format: Format,
}

impl Scratch<'_> {
    /// The top as a qemu node (its parents follow by name).
    pub fn node(&self) -> serde_json::Value {
        serde_json::json!({
            "driver": self.format.as_str(),
            "file": {"driver": "host_device", "filename": self.path, "locking": "off"},
        })
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.agent.deactivate_dir(self.o, &self.dir, None, true) {
            tracing::warn!(dir = %self.dir, error = %e, "could not take down a scratch activation");
        }
    }
}

/// Default lease of a client-held lock.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);

impl Agent {
    /// Open every configured domain (claiming a host slot and recovering),
    /// remove half-made volumes of this host, and reconcile activations.
    pub fn open(
        cfg: &AgentConfig,
        locks: Arc<dyn LockService>,
        loops: Arc<dyn LoopControl>,
    ) -> Result<Agent> {
        let mut domains = Vec::new();
        for p in &cfg.domains {
            let path = p
                .canonicalize()
                .map_err(AgentError::io(format!("resolving {}", p.display())))?;
            let dev = FileDev::open(&path, true)
                .map_err(AgentError::io(format!("opening {}", path.display())))?;
            let mut opts = OpenOptions::new(cfg.host.clone());
            opts.lock_timeout = cfg.lock_timeout;
            let domain = Domain::open(Arc::new(dev), locks.clone(), opts)?;
            let run = RunDir {
                root: cfg.run_dir.join(domain.geometry().domain_id.to_string()),
            };
            if domains
                .iter()
                .any(|o: &Arc<Opened>| o.id() == domain.geometry().domain_id)
            {
                return Err(AgentError::invalid(
                    "domains",
                    format!("{} is the same domain as another one", path.display()),
                ));
            }
            tracing::info!(
                domain = %domain.geometry().name,
                id = %domain.geometry().domain_id,
                slot = ?domain.slot(),
                path = %path.display(),
                "domain open"
            );
            domains.push(Arc::new(Opened { domain, path, run }));
        }
        let mut io_dirs = Vec::new();
        for d in &cfg.io_dirs {
            io_dirs.push(d.canonicalize().map_err(AgentError::io(format!(
                "import/export directory {}",
                d.display()
            )))?);
        }
        let agent = Agent {
            instance: uuid::Uuid::new_v4(),
            domains,
            loops,
            act: Mutex::new(()),
            client_locks: Mutex::new(HashMap::new()),
            jobs: Default::default(),
            io_dirs,
            gc_quarantine: cfg.gc_quarantine,
            owner: format!("cairn:{}", cfg.host.id),
        };
        for o in &agent.domains {
            agent.remove_half_made(o)?;
            agent.remove_scratch(o)?;
            agent.reconcile(o)?;
        }
        Ok(agent)
    }

    /// Close every domain (releasing the host slots).
    pub fn close(self) -> Result<()> {
        self.client_locks.lock().expect("poisoned").clear();
        for o in self.domains {
            match Arc::try_unwrap(o) {
                Ok(o) => o.domain.close()?,
                Err(_) => tracing::warn!("domain still in use at close; left to drop"),
            }
        }
        Ok(())
    }

    /// This process's id, new at every start: callers tell a restarted
    /// agent, which has forgotten its request ids, from the same one.
    pub fn instance(&self) -> uuid::Uuid {
        self.instance
    }

    /// The open domains.
    pub fn domains(&self) -> &[Arc<Opened>] {
        &self.domains
    }

    /// Find a domain by name or id; empty picks the only one.
    pub fn domain(&self, key: &str) -> Result<Arc<Opened>> {
        if key.is_empty() {
            return match self.domains.as_slice() {
                [one] => Ok(one.clone()),
                _ => Err(AgentError::invalid(
                    "domain",
                    "this agent has several domains; name one",
                )),
            };
        }
        validate_name("domain", key)?;
        self.domains
            .iter()
            .find(|o| o.name() == key || o.id().to_string() == key)
            .cloned()
            .ok_or_else(|| AgentError::NotFound {
                kind: "domain",
                id: key.to_string(),
            })
    }

    // ---- startup -------------------------------------------------------------------

    /// Illegal volumes that no tag reaches, last written by this host, are
    /// what a crash between the two steps of a create left; remove them, and
    /// then weak tags of this host that nothing hangs from any more.
    fn remove_half_made(&self, o: &Opened) -> Result<()> {
        let Some(slot) = o.domain.slot() else {
            return Ok(());
        };
        for v in o.domain.list_volumes()? {
            if v.legality == Legality::Illegal && v.tag_refs == 0 && v.writer_slot as u32 == slot {
                tracing::warn!(volume = %v.id, "removing a half-made volume");
                o.domain.delete_volume(&v.id, &[])?;
            }
        }
        for t in o.domain.list_tags()? {
            if t.tag_type == TagType::Weak && t.child_refs == 0 && t.writer_slot as u32 == slot {
                let v = o.domain.read_volume(&t.volume)?;
                if v.legality == Legality::Illegal || t.options.iter().any(|(k, _)| k == SNAP_KEY) {
                    tracing::warn!(tag = %t.id, "removing a snapshot tag nothing hangs from");
                    o.domain.delete_tag(&t.id, &[])?;
                }
            }
        }
        Ok(())
    }

    fn domain_loops(&self, o: &Opened) -> Result<Vec<LoopInfo>> {
        Ok(self
            .loops
            .list()
            .map_err(AgentError::io("listing loop devices"))?
            .into_iter()
            .filter(|l| l.backing == o.path && l.owner == self.owner)
            .collect())
    }

    /// Bring the run directory and loop devices of a domain in line with
    /// the domain: links of deleted volumes go, devices nothing links go,
    /// links to vanished devices get new ones.
    pub fn reconcile(&self, o: &Opened) -> Result<Vec<Fix>> {
        let _g = self.act.lock().expect("poisoned");
        let links = o
            .run
            .links()
            .map_err(AgentError::io("reading the run directory"))?;
        let loops = self.domain_loops(o)?;
        let mut vols = BTreeMap::new();
        for l in &links {
            if vols.contains_key(&l.volume) {
                continue;
            }
            let ext = match VolumeId::parse("volume", &l.volume) {
                Ok(id) => match o.domain.read_volume(&id) {
                    Ok(v) => Some(o.extent(&v)),
                    Err(DomainError::NotFound { .. }) => None,
                    Err(e) => return Err(e.into()),
                },
                Err(_) => None,
            };
            vols.insert(l.volume.clone(), ext);
        }
        let fixes = plan_reconcile(&links, &loops, &vols);
        for f in &fixes {
            tracing::info!(fix = ?f, domain = %o.name(), "reconciling activations");
            match f {
                Fix::RemoveLink { tag, volume } => o
                    .run
                    .remove_link(tag, volume)
                    .map_err(AgentError::io("removing a stale link"))?,
                Fix::Attach { volume, tags } => {
                    let ext = vols[volume].expect("planned for live volumes");
                    let d = self
                        .loops
                        .attach(&o.path, ext.offset, ext.len, &self.owner)
                        .map_err(AgentError::io("attaching a loop device"))?;
                    for t in tags {
                        o.run
                            .set_link(t, volume, &d.device())
                            .map_err(AgentError::io("linking"))?;
                    }
                }
                Fix::Relink {
                    tag,
                    volume,
                    loop_index,
                } => o
                    .run
                    .set_link(tag, volume, Path::new(&format!("/dev/loop{loop_index}")))
                    .map_err(AgentError::io("linking"))?,
                Fix::Resize { loop_index, len } => self
                    .loops
                    .resize(*loop_index, *len)
                    .map_err(AgentError::io("resizing a loop device"))?,
                Fix::Detach { loop_index } => {
                    let who = self.loops.openers(*loop_index).unwrap_or_default();
                    if who.is_empty() {
                        self.loops
                            .detach(*loop_index)
                            .map_err(AgentError::io("detaching a loop device"))?;
                    } else {
                        tracing::warn!(loop_index, ?who, "unlinked device is open; left attached");
                    }
                }
            }
        }
        Ok(fixes)
    }

    // ---- client locks -----------------------------------------------------------------

    fn reap_locks(map: &mut HashMap<String, ClientLock>) {
        let now = Instant::now();
        map.retain(|id, l| {
            let keep = l.expires > now;
            if !keep {
                tracing::warn!(lock_id = %id, volume = %l.volume, "client lock lease ended");
            }
            keep
        });
    }

    fn keep_lock(&self, o: &Opened, volume: VolumeId, guard: LockGuard, lease: Duration) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut m = self.client_locks.lock().expect("poisoned");
        Self::reap_locks(&mut m);
        m.insert(
            id.clone(),
            ClientLock {
                guard: Arc::new(guard),
                domain: o.id(),
                volume,
                expires: Instant::now() + lease,
            },
        );
        id
    }

    /// The guard of a client lock on `volume`, if `lock_id` is given.
    fn client_lock(
        &self,
        o: &Opened,
        volume: &VolumeId,
        lock_id: &str,
    ) -> Result<Option<Arc<LockGuard>>> {
        if lock_id.is_empty() {
            return Ok(None);
        }
        let mut m = self.client_locks.lock().expect("poisoned");
        Self::reap_locks(&mut m);
        let l = m.get(lock_id).ok_or_else(|| AgentError::NotFound {
            kind: "lock",
            id: lock_id.to_string(),
        })?;
        if l.domain != o.id() || l.volume != *volume {
            return Err(AgentError::invalid(
                "lock_id",
                format!("lock {lock_id} is not the lock of volume {volume}"),
            ));
        }
        Ok(Some(l.guard.clone()))
    }

    /// Take a volume's lock for a client.
    pub fn lock_volume(&self, o: &Opened, id: &VolumeId, lease: Duration) -> Result<(String, u64)> {
        o.domain.read_volume(id)?;
        let g = o.domain.lock_volume(id)?;
        let token = g.token();
        Ok((self.keep_lock(o, *id, g, lease), token))
    }

    /// Give back a client lock; false if it was not held.
    pub fn unlock(&self, lock_id: &str) -> bool {
        let mut m = self.client_locks.lock().expect("poisoned");
        Self::reap_locks(&mut m);
        m.remove(lock_id).is_some()
    }

    // ---- volumes -------------------------------------------------------------------------

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
                    return Err(AgentError::FailedPrecondition(format!(
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
    fn init_data(&self, o: &Opened, v: &Volume, backing: Option<(VolumeId, Format)>) -> Result<()> {
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
                return Err(AgentError::FailedPrecondition(format!(
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
        if capacity < v.capacity {
            return Err(AgentError::invalid(
                "capacity",
                format!(
                    "{capacity} is smaller than the volume's {}; volumes only grow",
                    v.capacity
                ),
            ));
        }
        if v.legality != Legality::Legal {
            return Err(AgentError::FailedPrecondition(format!(
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
                qemu_img(&[
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
        let out = qemu_img(&[
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
        let out = Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(format!("json:{node}"))
            .output()
            .map_err(AgentError::io("running qemu-img check"))?;
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        // Exit 0 clean, 2 corrupt, 3 leaks; 1 means it could not check.
        let j: serde_json::Value = serde_json::from_str(&report).map_err(|_| AgentError::Qemu {
            tool: "qemu-img check".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
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

    // ---- tags and user data -----------------------------------------------------------

    /// Create a tag.
    pub fn create_tag(
        &self,
        o: &Opened,
        volume: VolumeId,
        spec: &TagSpec,
        request_id: [u8; 16],
    ) -> Result<Tag> {
        validate_tag_spec(spec)?;
        let v = o.domain.read_volume(&volume)?;
        let mut out = o
            .domain
            .tx("create tag")
            .request_id(request_id)
            .create_tag(tag_meta(spec, VolumeRef::Existing(volume), v.capacity))
            .commit()?;
        Ok(out.tags.remove(0))
    }

    /// Replace a tag's metadata. Returns whether anything changed.
    pub fn change_tag(
        &self,
        o: &Opened,
        id: &TagId,
        volume: VolumeId,
        spec: &TagSpec,
        request_id: [u8; 16],
    ) -> Result<(Tag, bool)> {
        validate_tag_spec(spec)?;
        let t = o.domain.read_tag(id)?;
        let v = o.domain.read_volume(&volume)?;
        let meta = tag_meta(spec, VolumeRef::Existing(volume), v.capacity);
        if t.meta() == meta {
            return Ok((t, false));
        }
        o.domain
            .tx("change tag")
            .request_id(request_id)
            .change_tag(*id, meta)
            .commit()?;
        Ok((o.domain.read_tag(id)?, true))
    }

    /// Delete a tag; refused while it is active.
    pub fn delete_tag(&self, o: &Opened, id: &TagId, request_id: [u8; 16]) -> Result<()> {
        o.domain.read_tag(id)?;
        if o.run.tag_dir(&id.to_string()).exists() {
            return Err(AgentError::InUse(format!(
                "tag {id} is active; deactivate it first"
            )));
        }
        o.domain
            .tx("delete tag")
            .request_id(request_id)
            .delete_tag(*id)
            .commit()?;
        Ok(())
    }

    /// Delete a tag and every volume and weak tag of its chain that nothing
    /// else references once it is gone, in one transaction. Refused while
    /// any of them is active.
    pub fn delete_disk(
        &self,
        o: &Opened,
        id: &TagId,
        request_id: [u8; 16],
    ) -> Result<(Vec<TagId>, Vec<VolumeId>)> {
        let lock = o.domain.lock_tag(id)?;
        let t = o.domain.read_tag(id)?;
        let plan = self.plan_delete_disk(o, &t)?;
        let links = o
            .run
            .links()
            .map_err(AgentError::io("reading the run directory"))?;
        if let Some(l) = links.iter().find(|l| {
            plan.0.iter().any(|t| t.to_string() == l.tag)
                || plan.1.iter().any(|v| v.to_string() == l.volume)
        }) {
            return Err(AgentError::InUse(format!(
                "volume {} of the disk is active under tag {}; deactivate it first",
                l.volume, l.tag
            )));
        }
        let mut tx = o.domain.tx("delete disk").request_id(request_id);
        // Interleave as the chain goes: tag, its volume, the parent tag...
        let mut vols = plan.1.iter();
        for tag in &plan.0 {
            tx = tx.delete_tag(*tag);
            if let Some(v) = vols.next() {
                tx = tx.delete_volume(*v);
            }
        }
        tx.held(&[&lock]).commit()?;
        Ok(plan)
    }

    /// What deleting `t` takes with it: walk down the chain while each
    /// volume loses its last tag and each weak parent tag its last child.
    pub(crate) fn plan_delete_disk(
        &self,
        o: &Opened,
        t: &Tag,
    ) -> Result<(Vec<TagId>, Vec<VolumeId>)> {
        let mut tags = vec![t.id];
        let mut vols = Vec::new();
        let mut cur = t.clone();
        loop {
            let v = o.domain.read_volume(&cur.volume)?;
            if v.tag_refs > 1 {
                break; // another tag keeps the volume
            }
            vols.push(v.id);
            let Some(p) = v.parent else { break };
            let pt = o.domain.read_tag(&p)?;
            if pt.tag_type != TagType::Weak || pt.child_refs > 1 {
                break; // a strong tag, or another child, keeps the parent
            }
            tags.push(pt.id);
            cur = pt;
        }
        Ok((tags, vols))
    }

    /// Set a user data item; false if it already had this value.
    pub fn set_user_data(
        &self,
        o: &Opened,
        id: &TagId,
        name: &str,
        data: Vec<u8>,
        request_id: [u8; 16],
    ) -> Result<bool> {
        validate_item_name(name)?;
        if o.domain.read_user_data(id)?.get(name) == Some(&data) {
            return Ok(false);
        }
        o.domain
            .tx("set user data")
            .request_id(request_id)
            .set_user_data(TagRef::Existing(*id), name, data)
            .commit()?;
        Ok(true)
    }

    /// Read user data items (one, or all when `name` is empty).
    pub fn get_user_data(&self, o: &Opened, id: &TagId, name: &str) -> Result<UserData> {
        let mut all = o.domain.read_user_data(id)?;
        if name.is_empty() {
            return Ok(all);
        }
        validate_item_name(name)?;
        match all.remove_entry(name) {
            Some((k, v)) => Ok(UserData::from([(k, v)])),
            None => Err(AgentError::NotFound {
                kind: "user data item",
                id: format!("{name} of tag {id}"),
            }),
        }
    }

    /// Remove a user data item; false if there was none.
    pub fn remove_user_data(
        &self,
        o: &Opened,
        id: &TagId,
        name: &str,
        request_id: [u8; 16],
    ) -> Result<bool> {
        validate_item_name(name)?;
        if !o.domain.read_user_data(id)?.contains_key(name) {
            return Ok(false);
        }
        o.domain
            .tx("remove user data")
            .request_id(request_id)
            .remove_user_data(*id, name)
            .commit()?;
        Ok(true)
    }

    // ---- snapshot -----------------------------------------------------------------------

    /// Snapshot a disk: a weak tag on the current top, a new qcow2 volume
    /// on it, and the disk's tag moved to the new volume, atomically as far
    /// as anyone reading the domain can tell.
    pub fn snapshot(
        &self,
        o: &Opened,
        disk: &TagId,
        spec: SnapshotSpec,
        clone: Option<&TagSpec>,
        request_id: [u8; 16],
    ) -> Result<Snapshot> {
        let SnapshotSpec {
            description,
            size,
            options,
        } = spec;
        validate_description(&description)?;
        if let Some((k, _)) = options
            .iter()
            .find(|(k, _)| k == SNAP_KEY || k == SNAP_DESC_KEY)
        {
            return Err(AgentError::invalid(
                "snapshot_options",
                format!("{k} is set by the agent"),
            ));
        }
        if let Some(c) = clone {
            validate_tag_spec(c)?;
            if c.tag_type != TagType::Strong {
                return Err(AgentError::invalid("clone", "a clone's tag must be strong"));
            }
        }
        // Planned from unlocked reads; the transaction takes the disk's
        // tag lock with the others in one go and goes on only if the tag
        // is still as read (else read again).
        let mut tries = 0;
        let mut out = loop {
            tries += 1;
            let t = o.domain.read_tag(disk)?;
            if t.tag_type != TagType::Strong || !t.mutable {
                return Err(AgentError::FailedPrecondition(format!(
                    "tag {disk} is not a disk (a strong, mutable tag)"
                )));
            }
            let top = o.domain.read_volume(&t.volume)?;
            if top.legality != Legality::Legal {
                return Err(AgentError::FailedPrecondition(format!(
                    "the disk's volume {} is not legal",
                    top.id
                )));
            }
            let size = if size == 0 {
                qcow2::fully_allocated(top.capacity)
            } else {
                size
            };
            let weak = TagMeta {
                volume: VolumeRef::Existing(top.id),
                size: t.size,
                mutable: false,
                strategy: t.strategy,
                options: std::iter::once((SNAP_KEY.into(), disk.to_string()))
                    .chain((!description.is_empty()).then(|| {
                        (
                            SNAP_DESC_KEY.into(),
                            clip(&description, limits::MAX_DESCRIPTION).to_string(),
                        )
                    }))
                    .chain(options.iter().cloned())
                    .collect(),
                tag_type: TagType::Weak,
                state: TagState::Optimized,
            };
            let spec = VolumeSpec {
                format: Format::Qcow2,
                capacity: top.capacity,
                size,
                allocation: Allocation::Sparse,
                parent: Some(TagRef::New(0)),
                legality: Legality::Legal,
                description: description.clone(),
            };
            let es = o.domain.geometry().extent_size;
            let (zero, pages) = qcow2_init(
                top.capacity,
                size.div_ceil(es) * es,
                Some((top.id, top.format)),
            )?;
            let mut moved = t.meta();
            moved.volume = VolumeRef::New(0);
            // One transaction: the weak tag, the new volume with its image
            // metadata, and the disk's tag moved onto it (and the clone's
            // volume and tag beside it).
            let clone_layer = clone.map(|c| {
                let spec = VolumeSpec {
                    description: format!("clone of {disk}"),
                    ..spec.clone()
                };
                (
                    spec,
                    pages.clone(),
                    tag_meta(c, VolumeRef::New(1), top.capacity),
                )
            });
            let mut tx = o
                .domain
                .tx("snapshot")
                .request_id(request_id)
                .create_tag(weak)
                .create_volume(spec)
                .init_volume_data(VolumeRef::New(0), zero, pages)
                .change_tag(*disk, moved);
            if let Some((spec, pages, tag)) = clone_layer {
                tx = tx
                    .create_volume(spec)
                    .init_volume_data(VolumeRef::New(1), zero, pages)
                    .create_tag(tag);
            }
            match tx.expect_tag(&t).commit() {
                Err(DomainError::Changed(why)) if tries < 8 => {
                    tracing::debug!(disk = %disk, %why, "disk changed while planning its snapshot");
                }
                r => break r?,
            }
        };
        let vol = out.volumes.remove(0);
        let parent_tag = out.tags.remove(0);
        let clone = match clone {
            Some(_) => Some((out.volumes.remove(0), out.tags.remove(0))),
            None => None,
        };
        // A running VM needs the new top under its disk's directory.
        if o.run.tag_dir(&disk.to_string()).exists() {
            self.activate(o, disk)?;
        }
        Ok(Snapshot {
            volume: vol,
            parent_tag,
            tag: o.domain.read_tag(disk)?,
            clone,
        })
    }

    // ---- activation -----------------------------------------------------------------------

    /// The chain of a tag's volume, base first.
    pub fn chain(&self, o: &Opened, tag: &TagId) -> Result<Vec<Volume>> {
        let t = o.domain.read_tag(tag)?;
        let v = o.domain.read_volume(&t.volume)?;
        self.volume_chain(o, &v)
    }

    /// A volume's chain, base first.
    pub(crate) fn volume_chain(&self, o: &Opened, v: &Volume) -> Result<Vec<Volume>> {
        let mut out = vec![v.clone()];
        let mut cur = v.clone();
        while let Some(p) = cur.parent {
            if out.len() > 4096 {
                return Err(AgentError::FailedPrecondition(format!(
                    "the chain of volume {} is longer than 4096 (a loop?)",
                    v.id
                )));
            }
            let t = o.domain.read_tag(&p)?;
            cur = o.domain.read_volume(&t.volume)?;
            out.push(cur.clone());
        }
        out.reverse();
        Ok(out)
    }

    fn is_active(&self, o: &Opened, id: &VolumeId) -> Result<bool> {
        let name = id.to_string();
        Ok(o.run
            .links()
            .map_err(AgentError::io("reading the run directory"))?
            .iter()
            .any(|l| l.volume == name))
    }

    /// Activate a tag's chain. Returns whether anything was set up.
    pub fn activate(&self, o: &Opened, tag: &TagId) -> Result<(Activation, bool)> {
        let chain = self.chain(o, tag)?;
        self.activate_chain(o, &tag.to_string(), &chain)
    }

    /// Activate `chain` (base first) under the directory `tname`.
    fn activate_chain(
        &self,
        o: &Opened,
        tname: &str,
        chain: &[Volume],
    ) -> Result<(Activation, bool)> {
        if let Some(v) = chain.iter().find(|v| v.legality != Legality::Legal) {
            return Err(AgentError::FailedPrecondition(format!(
                "volume {} of the chain is not legal",
                v.id
            )));
        }
        let _g = self.act.lock().expect("poisoned");
        let tname = tname.to_string();
        let links = o
            .run
            .links()
            .map_err(AgentError::io("reading the run directory"))?;
        let mut loops = self.domain_loops(o)?;
        let mut changed = false;
        let mut vols = Vec::new();
        for v in chain {
            let ext = o.extent(v);
            let vname = v.id.to_string();
            let dev = match loops
                .iter()
                .find(|d| d.offset == ext.offset && d.size == ext.len)
            {
                Some(d) => d.clone(),
                None => {
                    let d = self
                        .loops
                        .attach(&o.path, ext.offset, ext.len, &self.owner)
                        .map_err(AgentError::io(format!("attaching volume {vname}")))?;
                    loops.push(d.clone());
                    changed = true;
                    d
                }
            };
            let have = links
                .iter()
                .any(|l| l.tag == tname && l.volume == vname && l.loop_index == Some(dev.index));
            if !have {
                o.run
                    .set_link(&tname, &vname, &dev.device())
                    .map_err(AgentError::io(format!("linking volume {vname}")))?;
                changed = true;
            }
            vols.push(ActiveVolume {
                volume: v.id,
                path: o.run.path(&tname, &vname),
                device: dev.device(),
                format: v.format,
            });
        }
        let top = vols.last().expect("a chain has a volume").path.clone();
        Ok((
            Activation {
                domain: o.id(),
                tag: tname,
                path: top,
                volumes: vols,
            },
            changed,
        ))
    }

    /// Take down a tag's activation. Refuses while its top is open by a
    /// process, or while another active tag's chain goes through its
    /// volume, unless forced.
    pub fn deactivate(&self, o: &Opened, tag: &TagId, force: bool) -> Result<bool> {
        let top = o.domain.read_tag(tag).ok().map(|t| t.volume.to_string());
        self.deactivate_dir(o, &tag.to_string(), top, force)
    }

    /// Take down the activation directory `tname` whose top volume is `top`.
    fn deactivate_dir(
        &self,
        o: &Opened,
        tname: &str,
        top: Option<String>,
        force: bool,
    ) -> Result<bool> {
        let _g = self.act.lock().expect("poisoned");
        let links = o
            .run
            .links()
            .map_err(AgentError::io("reading the run directory"))?;
        let mine: Vec<_> = links.iter().filter(|l| l.tag == tname).collect();
        if mine.is_empty() {
            return Ok(false);
        }
        if !force {
            for l in &mine {
                let Some(i) = l.loop_index else { continue };
                let shared = links
                    .iter()
                    .any(|x| x.tag != tname && x.loop_index == Some(i));
                if !shared {
                    let who = self
                        .loops
                        .openers(i)
                        .map_err(AgentError::io("looking for openers"))?;
                    if !who.is_empty() {
                        return Err(AgentError::InUse(format!(
                            "volume {} is open by process(es) {who:?}",
                            l.volume
                        )));
                    }
                }
            }
            if let Some(top) = &top {
                if let Some(other) = links.iter().find(|x| x.tag != tname && &x.volume == top) {
                    return Err(AgentError::InUse(format!(
                        "volume {top} is needed by the active chain of tag {}",
                        other.tag
                    )));
                }
            }
        }
        for l in &mine {
            o.run
                .remove_link(&l.tag, &l.volume)
                .map_err(AgentError::io("removing a link"))?;
            let Some(i) = l.loop_index else { continue };
            let shared = links
                .iter()
                .any(|x| x.tag != tname && x.loop_index == Some(i));
            if !shared {
                self.loops
                    .detach(i)
                    .map_err(AgentError::io(format!("detaching loop{i}")))?;
            }
        }
        Ok(true)
    }

    /// Make a volume's whole chain readable by qemu for a while: its
    /// volumes as loop devices under a private directory (`.job-<uuid>`),
    /// where the images' parent names resolve. Taken down when the guard
    /// goes (and at the next start if the agent dies first).
    pub(crate) fn scratch_chain<'a>(&'a self, o: &'a Opened, v: &Volume) -> Result<Scratch<'a>> {
        let chain = self.volume_chain(o, v)?;
        let dir = format!("{SCRATCH_PREFIX}{}", uuid::Uuid::new_v4());
        let (act, _) = self.activate_chain(o, &dir, &chain)?;
        Ok(Scratch {
            agent: self,
            o,
            dir,
            path: act.path,
            format: v.format,
        })
    }

    /// Remove scratch activations a dead agent left (no job runs yet).
    fn remove_scratch(&self, o: &Opened) -> Result<()> {
        let links = o
            .run
            .links()
            .map_err(AgentError::io("reading the run directory"))?;
        let mut dirs: Vec<&str> = links
            .iter()
            .map(|l| l.tag.as_str())
            .filter(|t| t.starts_with(SCRATCH_PREFIX))
            .collect();
        dirs.dedup();
        for d in dirs {
            tracing::info!(
                dir = d,
                "removing a scratch activation left by a dead agent"
            );
            self.deactivate_dir(o, d, None, true)?;
        }
        Ok(())
    }

    /// Activations of one domain.
    pub fn activations(&self, o: &Opened) -> Result<Vec<Activation>> {
        let links = o
            .run
            .links()
            .map_err(AgentError::io("reading the run directory"))?;
        let mut by_tag: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for l in links {
            by_tag.entry(l.tag.clone()).or_default().push(l);
        }
        let mut out = Vec::new();
        for (tag, ls) in by_tag {
            // Order the chain as the domain knows it, when it still can.
            let order: Vec<Volume> = TagId::parse("tag", &tag)
                .ok()
                .and_then(|t| self.chain(o, &t).ok())
                .unwrap_or_default();
            let mut vols = Vec::new();
            for v in &order {
                let name = v.id.to_string();
                if let Some(l) = ls.iter().find(|l| l.volume == name) {
                    vols.push(ActiveVolume {
                        volume: v.id,
                        path: o.run.path(&tag, &name),
                        device: l
                            .loop_index
                            .map(|i| PathBuf::from(format!("/dev/loop{i}")))
                            .unwrap_or_default(),
                        format: v.format,
                    });
                }
            }
            let path = vols.last().map(|v| v.path.clone()).unwrap_or_default();
            out.push(Activation {
                domain: o.id(),
                tag,
                path,
                volumes: vols,
            });
        }
        Ok(out)
    }

    fn resize_active(&self, o: &Opened, v: &Volume) -> Result<()> {
        let _g = self.act.lock().expect("poisoned");
        let ext = o.extent(v);
        for d in self.domain_loops(o)? {
            if d.offset == ext.offset && d.size != ext.len {
                self.loops
                    .resize(d.index, ext.len)
                    .map_err(AgentError::io("resizing a loop device"))?;
            }
        }
        Ok(())
    }
}

/// Tag options the agent puts on a snapshot's weak tag.
pub use cairn_proto::keys::{SNAPSHOT_DESCRIPTION as SNAP_DESC_KEY, SNAPSHOT_OF as SNAP_KEY};

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn tag_meta(s: &TagSpec, volume: VolumeRef, capacity: u64) -> TagMeta {
    TagMeta {
        volume,
        size: if s.size == 0 { capacity } else { s.size },
        mutable: s.mutable,
        strategy: s.strategy,
        options: s.options.clone(),
        tag_type: s.tag_type,
        state: s.state,
    }
}

fn validate_capacity(c: u64) -> Result<()> {
    if c == 0 {
        return Err(AgentError::invalid("capacity", "must be more than 0 bytes"));
    }
    if c > limits::MAX_CAPACITY {
        return Err(AgentError::invalid(
            "capacity",
            format!(
                "{c} bytes is more than the largest volume ({} bytes)",
                limits::MAX_CAPACITY
            ),
        ));
    }
    if c % 512 != 0 {
        return Err(AgentError::invalid(
            "capacity",
            format!("{c} bytes is not a multiple of 512"),
        ));
    }
    Ok(())
}

pub(crate) fn validate_description(d: &str) -> Result<()> {
    limits::check_text("description", d, limits::MAX_DESCRIPTION)?;
    Ok(())
}

fn validate_item_name(n: &str) -> Result<()> {
    if !cairn_domain::records::valid_item_name(n) {
        return Err(AgentError::invalid(
            "name",
            format!(
                "{n:?} must be 1 to {} characters of A-Z a-z 0-9 . _ - :",
                cairn_domain::records::MAX_ITEM_NAME
            ),
        ));
    }
    Ok(())
}

/// A domain name or id as given in a request: no path separators, no
/// control characters.
pub fn validate_name(field: &'static str, n: &str) -> Result<()> {
    if n.len() > limits::MAX_DOMAIN_NAME
        || n.contains('/')
        || n.contains('\0')
        || n.chars().any(char::is_control)
    {
        return Err(AgentError::invalid(
            field,
            format!(
                "{n:?} is not a name (at most {} bytes, no '/' or control characters)",
                limits::MAX_DOMAIN_NAME
            ),
        ));
    }
    Ok(())
}

pub(crate) fn validate_tag_spec(s: &TagSpec) -> Result<()> {
    cairn_domain::model::encode_options(&s.options)?;
    Ok(())
}

/// A parent tag for a volume of `format` and the volume it points at; only
/// qcow2 volumes have parents.
fn read_parent(o: &Opened, format: Format, p: &TagId) -> Result<(Tag, Volume)> {
    if format != Format::Qcow2 {
        return Err(AgentError::invalid(
            "parent_tag",
            "only a qcow2 volume can have a parent",
        ));
    }
    let t = o.domain.read_tag(p).map_err(|e| match e {
        DomainError::NotFound { .. } => AgentError::NotFound {
            kind: "parent tag",
            id: p.to_string(),
        },
        e => e.into(),
    })?;
    let v = o.domain.read_volume(&t.volume)?;
    Ok((t, v))
}

/// The start of a new qcow2 image of `capacity` in a run of `run` bytes:
/// bytes to zero, and pages to write over them.
fn qcow2_init(
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
fn preallocate(path: &Path, ext: Extent) -> std::io::Result<()> {
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

/// Run qemu-img; its stdout on success.
fn qemu_img(args: &[String]) -> Result<String> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(AgentError::io("running qemu-img"))?;
    if !out.status.success() {
        return Err(AgentError::Qemu {
            tool: format!(
                "qemu-img {}",
                args.first().map(String::as_str).unwrap_or("")
            ),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
