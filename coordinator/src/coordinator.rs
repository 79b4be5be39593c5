//! One coordinator replica: its configuration, the cluster store it keeps
//! jobs in, the agents it works through, and what it reads (domains,
//! disks, jobs). Running jobs is in [`crate::runner`]; the toolkit of a
//! step (one agent call made at most once, an agent job followed to its
//! end, the domain settled) in [`crate::exec`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_cluster::Kv;
use cairn_domain::{LockService, TagId};

use crate::agents::{Agents, Pick};
use crate::error::{CoordError, Result};
use crate::plan::{self, DiskView, DomainRef, TagInfo, VolumeInfo};
use crate::record::{job_key, JobRecord};

/// How the coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordConfig {
    /// This replica's id (registered while it lives).
    pub id: String,
    /// How long an operation waits for a disk another one holds.
    pub lock_wait: Duration,
    /// How often a running job looks at its agent job.
    pub poll: Duration,
    /// How long the records of ended jobs are kept (the leader removes
    /// older ones).
    pub job_retention: Duration,
    /// How long a volume that no tag reaches stays, unchanged, before the
    /// leader reclaims it.
    pub orphan_quarantine: Duration,
    /// Serve the catalog's reads and refuse its changes.
    pub read_only: bool,
}

impl CoordConfig {
    /// Defaults for replica `id`.
    pub fn new(id: impl Into<String>) -> CoordConfig {
        CoordConfig {
            id: id.into(),
            lock_wait: Duration::from_secs(60),
            poll: Duration::from_millis(100),
            job_retention: Duration::from_secs(24 * 3600),
            orphan_quarantine: Duration::from_secs(3600),
            read_only: false,
        }
    }
}

/// One coordinator replica.
pub struct Coordinator {
    pub(crate) cfg: CoordConfig,
    kv: Arc<dyn Kv>,
    locks: Arc<dyn LockService>,
    /// The agents.
    pub agents: Agents,
    /// Jobs this replica is running.
    pub(crate) running: Mutex<HashSet<String>>,
    /// Volumes the leader saw that nothing reaches, and since when.
    pub(crate) unreached: Mutex<crate::plan::Unreached>,
    /// Each domain's catalog as last read.
    pub(crate) catalogs: crate::catalog::index::Indexes,
    /// Image caches found, by domain and base (checked at every use).
    pub(crate) image_caches: Mutex<std::collections::HashMap<(uuid::Uuid, TagId), TagId>>,
}

/// Seconds since the epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoordError::Internal(format!("a blocking task failed: {e}")))?
}

pub(crate) fn parse_tag(field: &'static str, s: &str) -> Result<TagId> {
    if s.is_empty() {
        return Err(CoordError::invalid(field, "is required"));
    }
    TagId::parse(field, s).map_err(|e| CoordError::invalid(field, e.to_string()))
}

impl Coordinator {
    /// A replica using `kv` for jobs, `locks` for disks and leadership, and
    /// `agents` for the work.
    pub fn new(
        cfg: CoordConfig,
        kv: Arc<dyn Kv>,
        locks: Arc<dyn LockService>,
        agents: Agents,
    ) -> Coordinator {
        Coordinator {
            cfg,
            kv,
            locks,
            agents,
            running: Mutex::new(HashSet::new()),
            unreached: Mutex::new(Default::default()),
            catalogs: Default::default(),
            image_caches: Default::default(),
        }
    }

    /// How long ended jobs are kept.
    pub fn job_retention(&self) -> Duration {
        self.cfg.job_retention
    }

    /// Remove the record of ended job `id`.
    pub async fn forget_job(&self, id: &str) -> Result<bool> {
        let kv = self.kv.clone();
        let key = job_key(id);
        blocking(move || Ok(kv.delete(&key)?)).await
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// The cluster store.
    pub fn kv(&self) -> &Arc<dyn Kv> {
        &self.kv
    }

    /// The lock service.
    pub fn locks(&self) -> &Arc<dyn LockService> {
        &self.locks
    }

    // ---- reading -------------------------------------------------------------------------

    /// Resolve a domain name or id.
    pub async fn domain(&self, key: &str) -> Result<DomainRef> {
        let agents = self.agents.list().await?;
        match plan::resolve_domain(&agents, key) {
            Err(CoordError::NotFound { .. }) | Err(CoordError::NoAgent(_)) => {
                // A new agent may have come: ask again once.
                self.agents.invalidate();
                plan::resolve_domain(&self.agents.list().await?, key)
            }
            r => r,
        }
    }

    /// Every tag and volume of a domain, read through any agent that
    /// sees it.
    pub(crate) async fn contents(&self, d: &DomainRef) -> Result<(Vec<TagInfo>, Vec<VolumeInfo>)> {
        self.agents
            .with_agent(Pick::on(&d.id), |c| async move { c.contents(&d.id).await })
            .await
    }

    /// One tag, read through any agent that sees the domain.
    pub(crate) async fn tag(&self, dom: &uuid::Uuid, id: &TagId) -> Result<TagInfo> {
        let r = self
            .agents
            .with_agent(Pick::on(dom), |c| async move { c.tag(dom, id).await })
            .await;
        match r {
            Err(CoordError::Agent { status, .. }) if status.code() == tonic::Code::NotFound => {
                Err(CoordError::NotFound {
                    kind: "disk or snapshot",
                    id: id.to_string(),
                })
            }
            r => r,
        }
    }

    /// One disk.
    pub async fn disk(&self, domain: &str, id: &str) -> Result<DiskView> {
        let d = self.domain(domain).await?;
        let id = parse_tag("disk_id", id)?;
        let (tags, vols) = self.contents(&d).await?;
        plan::disk_view(&d, &id, &tags, &vols)
    }

    /// Every domain some agent sees, by id.
    pub async fn all_domains(&self) -> Result<Vec<DomainRef>> {
        let mut all: Vec<DomainRef> = self
            .agents
            .list()
            .await?
            .into_iter()
            .flat_map(|a| a.domains)
            .collect();
        all.sort_by_key(|d| d.id);
        all.dedup_by_key(|d| d.id);
        Ok(all)
    }

    /// Every disk of a domain, or of every domain.
    pub async fn disks(&self, domain: &str) -> Result<Vec<DiskView>> {
        let doms = if domain.is_empty() {
            self.all_domains().await?
        } else {
            vec![self.domain(domain).await?]
        };
        let mut out = Vec::new();
        for d in doms {
            let (tags, vols) = self.contents(&d).await?;
            out.extend(plan::disks(&d, &tags, &vols));
        }
        Ok(out)
    }

    /// A job by id.
    pub async fn job(&self, id: &str) -> Result<JobRecord> {
        let kv = self.kv.clone();
        let key = job_key(id);
        let v = blocking(move || Ok(kv.get(&key)?)).await?;
        let v = v.ok_or_else(|| CoordError::NotFound {
            kind: "job",
            id: id.to_string(),
        })?;
        serde_json::from_str(&v).map_err(|e| CoordError::Internal(format!("job record {id}: {e}")))
    }

    /// Every job.
    pub async fn jobs(&self) -> Result<Vec<JobRecord>> {
        let kv = self.kv.clone();
        let all = blocking(move || Ok(kv.list("cairn/jobs/")?)).await?;
        let mut out: Vec<JobRecord> = all
            .iter()
            .filter_map(|(_, v)| serde_json::from_str(v).ok())
            .collect();
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Write `rec` to the store.
    pub(crate) async fn save(&self, rec: &JobRecord) -> Result<()> {
        let kv = self.kv.clone();
        let key = job_key(&rec.id);
        let v = serde_json::to_string(rec).map_err(|e| CoordError::Internal(e.to_string()))?;
        blocking(move || Ok(kv.put(&key, &v)?)).await
    }
}
