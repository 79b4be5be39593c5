//! The agent's operations, in domain types and synchronous: the gRPC layer
//! runs each of them on a blocking thread.
//!
//! Volumes whose data must be initialised (zeroed runs, qcow2 headers) are
//! made in two steps: one transaction creates the volume ILLEGAL, the data
//! is written and flushed, a second transaction marks it LEGAL and does
//! whatever else the operation does (create a tag, move a disk's tag). A
//! crash in between leaves an illegal volume that nothing references; the
//! agent removes such volumes of its own host slot when it starts.

mod activate;
pub mod data;
mod files;
pub use files::FileRead;
mod locks;
mod snapshot;
mod startup;
mod tags;
mod validate;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_domain::io::{AlignedBuf, BlockDev, FileDev};
use cairn_domain::limits;
use cairn_domain::lock::LockService;
use cairn_domain::{
    Allocation, Domain, DomainError, Format, HostIdentity, Legality, LockGuard, OpenOptions, Tag,
    TagId, TagMeta, TagRef, TagState, TagType, Volume, VolumeId, VolumeMeta, VolumeRef, VolumeSpec,
};
use cairn_domain::{Clock, SystemClock};

use crate::activation::{plan_reconcile, Extent, Fix, RunDir};
use crate::error::{AgentError, Result};
use crate::loopdev::{LoopControl, LoopInfo};
use crate::qcow2;
use crate::qemu::{QemuImg, SystemQemu};
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
    /// Its catalog anchor, once found or made (it never goes away).
    pub anchor: std::sync::OnceLock<cairn_domain::catalog::Anchor>,
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
    /// A forced deactivation is waiting for processes to close it.
    pub closing: bool,
}

/// What a deactivation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deactivated {
    /// Whether anything was active.
    pub changed: bool,
    /// Devices a process still holds open (forced): they go when it
    /// closes them, and until then the tag stays active and its volumes
    /// protected.
    pub still_open: Vec<String>,
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
    /// What WriteVolumeData wrote from offset 0 under a client lock, by
    /// lock id: bytes and their SHA-256 (hex), for CommitFile.
    written: Mutex<HashMap<String, (u64, String)>>,
    pub(crate) jobs: crate::jobs::Jobs,
    pub(crate) io: crate::iodir::IoDirs,
    pub(crate) gc_quarantine: Duration,
    /// The mark on this agent's loop devices: `cairn:<host id>`.
    owner: String,
    /// Every run of qemu-img.
    pub(crate) qemu: Arc<dyn QemuImg>,
    /// Wall-clock time, for the domains and the agent's own records.
    pub(crate) clock: Arc<dyn Clock>,
}

/// What an agent does to its host besides the domains: loop devices,
/// qemu-img, the clock. Real ones in service; fakes in unit tests.
#[derive(Clone)]
pub struct HostEffects {
    /// Loop devices.
    pub loops: Arc<dyn LoopControl>,
    /// qemu-img.
    pub qemu: Arc<dyn QemuImg>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
}

impl HostEffects {
    /// `loops` with the system's qemu-img and clock.
    pub fn with_loops(loops: Arc<dyn LoopControl>) -> HostEffects {
        HostEffects {
            loops,
            qemu: Arc::new(SystemQemu::default()),
            clock: Arc::new(SystemClock),
        }
    }
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
        Agent::open_with(cfg, locks, HostEffects::with_loops(loops))
    }

    /// [`Agent::open`] with these effects on the host.
    pub fn open_with(
        cfg: &AgentConfig,
        locks: Arc<dyn LockService>,
        host: HostEffects,
    ) -> Result<Agent> {
        let HostEffects { loops, qemu, clock } = host;
        let mut domains = Vec::new();
        for p in &cfg.domains {
            let path = p
                .canonicalize()
                .map_err(AgentError::io(format!("resolving {}", p.display())))?;
            let dev = FileDev::open(&path, true)
                .map_err(AgentError::io(format!("opening {}", path.display())))?;
            let mut opts = OpenOptions::new(cfg.host.clone());
            opts.lock_timeout = cfg.lock_timeout;
            opts.clock = clock.clone();
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
            domains.push(Arc::new(Opened {
                domain,
                path,
                run,
                anchor: Default::default(),
            }));
        }
        let io = crate::iodir::IoDirs::open(&cfg.io_dirs)?;
        let agent = Agent {
            instance: uuid::Uuid::new_v4(),
            domains,
            loops,
            act: Mutex::new(()),
            client_locks: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
            jobs: crate::jobs::Jobs::new(clock.clone()),
            io,
            gc_quarantine: cfg.gc_quarantine,
            owner: format!("cairn:{}", cfg.host.id),
            qemu,
            clock,
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
            .ok_or_else(|| AgentError::not_found("domain", key.to_string()))
    }
}

pub use validate::validate_name;
pub(crate) use validate::{validate_description, validate_tag_spec};

/// Tag options the agent puts on a snapshot's weak tag.
pub use cairn_proto::keys::{SNAPSHOT_DESCRIPTION as SNAP_DESC_KEY, SNAPSHOT_OF as SNAP_KEY};

/// Whether disk `t` asked for its deleted volumes to be wiped (a domain
/// formatted with wipe-after-delete wipes every one anyway).
pub(crate) fn wipes(t: &Tag) -> bool {
    t.options
        .iter()
        .any(|(k, v)| k == cairn_proto::keys::WIPE_AFTER_DELETE && v == "true")
}
