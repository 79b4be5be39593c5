//! The coordinator's operations: every mutating request becomes a job kept
//! in the cluster store, run step by step (see [`plan::next_step`]) under
//! the disk's cluster lock, each step one agent call that is atomic on the
//! domain. A job records its step before it starts it, so another
//! coordinator can take it over when this one dies ([`Coordinator::adopt`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_cluster::Kv;
use cairn_domain::lock::{Resource, ResourceKind};
use cairn_domain::{Format, LockGuard, LockService, TagId};

use crate::agents::{AgentConn, Agents, NewDisk, Once};
use crate::error::{CoordError, Result};
use crate::plan::{
    self, CloneSource, DiskView, DomainRef, JobError, JobKind, JobRecord, JobState, Params, Step,
    TagInfo, CLONE_OF_KEY, CONVERT_KEY, JOB_KEY, NAME_KEY, SNAP_KEY,
};
use cairn_domain::api::RequestState;

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
}

impl CoordConfig {
    /// Defaults for replica `id`.
    pub fn new(id: impl Into<String>) -> CoordConfig {
        CoordConfig {
            id: id.into(),
            lock_wait: Duration::from_secs(60),
            poll: Duration::from_millis(100),
            job_retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// One coordinator replica.
pub struct Coordinator {
    cfg: CoordConfig,
    kv: Arc<dyn Kv>,
    locks: Arc<dyn LockService>,
    /// The agents.
    pub agents: Agents,
    /// Jobs this replica is running.
    running: Mutex<HashSet<String>>,
}

/// Seconds since the epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoordError::Internal(format!("a blocking task failed: {e}")))?
}

fn parse_tag(field: &'static str, s: &str) -> Result<TagId> {
    if s.is_empty() {
        return Err(CoordError::invalid(field, "is required"));
    }
    TagId::parse(field, s).map_err(|e| CoordError::invalid(field, e.to_string()))
}

fn parse_format(s: &str) -> Result<Option<Format>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| CoordError::invalid("format", format!("{s:?} is not raw or qcow2")))
}

/// How long the coordinator waits for a silent agent to answer or die,
/// and for a dead host's lease to expire, before it gives up on learning
/// an outcome.
const SETTLE_WAIT: Duration = Duration::from_secs(120);

/// The largest disk (qcow2's limit is far above; this is the domain's
/// practical one).
const MAX_SIZE: u64 = 1 << 50;

/// Check what can be checked without the cluster.
pub fn validate(kind: JobKind, p: &Params) -> Result<()> {
    if p.name.len() > 128 || p.name.chars().any(char::is_control) {
        return Err(CoordError::invalid(
            "name",
            "must be at most 128 bytes without control characters",
        ));
    }
    if p.description.len() > 256 {
        return Err(CoordError::invalid(
            "description",
            "is longer than 256 bytes",
        ));
    }
    parse_format(&p.format)?;
    match kind {
        JobKind::Create => {
            if parse_format(&p.format)?.is_none() {
                return Err(CoordError::invalid("format", "is required (raw or qcow2)"));
            }
            if p.size == 0 || p.size % 512 != 0 || p.size > MAX_SIZE {
                return Err(CoordError::invalid(
                    "size",
                    format!(
                        "{} is not a positive multiple of 512 up to {MAX_SIZE}",
                        p.size
                    ),
                ));
            }
        }
        JobKind::Extend => {
            parse_tag("disk_id", &p.disk)?;
            if p.size == 0 || p.size % 512 != 0 || p.size > MAX_SIZE {
                return Err(CoordError::invalid(
                    "size",
                    format!(
                        "{} is not a positive multiple of 512 up to {MAX_SIZE}",
                        p.size
                    ),
                ));
            }
        }
        JobKind::Convert => {
            parse_tag("disk_id", &p.disk)?;
            if parse_format(&p.format)?.is_none() {
                return Err(CoordError::invalid("format", "is required (raw or qcow2)"));
            }
        }
        JobKind::Clone | JobKind::FullClone => {
            parse_tag("source_id", &p.disk)?;
        }
        JobKind::DeleteSnapshot => {
            parse_tag("snapshot_id", &p.disk)?;
        }
        JobKind::Copy | JobKind::Move => {
            parse_tag("disk_id", &p.disk)?;
            if p.target_domain.is_empty() {
                return Err(CoordError::invalid("target_domain", "is required"));
            }
        }
        JobKind::Snapshot | JobKind::Delete => {
            parse_tag("disk_id", &p.disk)?;
        }
    }
    Ok(())
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
        }
    }

    /// How long ended jobs are kept.
    pub fn job_retention(&self) -> Duration {
        self.cfg.job_retention
    }

    /// Remove the record of ended job `id`.
    pub async fn forget_job(&self, id: &str) -> Result<bool> {
        let kv = self.kv.clone();
        let key = plan::job_key(id);
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

    async fn contents(&self, d: &DomainRef) -> Result<(Vec<TagInfo>, Vec<plan::VolumeInfo>)> {
        self.agents
            .with_agent(&d.id, None, rand_spread(), |c| async move {
                c.contents(&d.id).await
            })
            .await
    }

    /// One tag, read through any agent that sees the domain.
    async fn tag(&self, dom: &uuid::Uuid, id: &TagId) -> Result<TagInfo> {
        let r = self
            .agents
            .with_agent(
                dom,
                None,
                rand_spread(),
                |c| async move { c.tag(dom, id).await },
            )
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

    /// Every disk of a domain, or of every domain.
    pub async fn disks(&self, domain: &str) -> Result<Vec<DiskView>> {
        let doms = if domain.is_empty() {
            let mut all: Vec<DomainRef> = self
                .agents
                .list()
                .await?
                .into_iter()
                .flat_map(|a| a.domains)
                .collect();
            all.sort_by_key(|d| d.id);
            all.dedup_by_key(|d| d.id);
            all
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
        let key = plan::job_key(id);
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

    async fn save(&self, rec: &JobRecord) -> Result<()> {
        let kv = self.kv.clone();
        let key = plan::job_key(&rec.id);
        let v = serde_json::to_string(rec).map_err(|e| CoordError::Internal(e.to_string()))?;
        blocking(move || Ok(kv.put(&key, &v)?)).await
    }

    // ---- submitting ------------------------------------------------------------------------

    /// Start a job for a request, or return the job an earlier request with
    /// the same id started. Short jobs have ended when this returns; a
    /// failed short job is returned as its error.
    pub async fn submit(
        self: &Arc<Self>,
        kind: JobKind,
        request_id: &str,
        fingerprint: u64,
        mut params: Params,
    ) -> Result<JobRecord> {
        if request_id.len() > 64 || request_id.chars().any(char::is_control) {
            return Err(CoordError::invalid(
                "request_id",
                "must be at most 64 bytes without control characters",
            ));
        }
        validate(kind, &params)?;
        let id = job_id(request_id);
        let d = self.domain(&params.domain).await?;
        params.domain = d.id.to_string();
        if !params.target_domain.is_empty() {
            params.target_domain = self.domain(&params.target_domain).await?.id.to_string();
        }
        let mut rec = JobRecord::new(kind, request_id, fingerprint, params, self.id(), now());
        rec.id = id;
        if !kind.long() {
            // One write for a short job before its one call.
            rec.step = plan::next_step(kind, Step::Begin);
            rec.attempts = 1;
        }
        // Created once: of two coordinators racing with one request id,
        // one starts the job and the other returns it.
        let kv = self.kv.clone();
        let key = plan::job_key(&rec.id);
        let v = serde_json::to_string(&rec).map_err(|e| CoordError::Internal(e.to_string()))?;
        if let Some(there) = blocking(move || Ok(kv.create(&key, &v)?)).await? {
            let rec: JobRecord = serde_json::from_str(&there)
                .map_err(|e| CoordError::Internal(format!("job record {}: {e}", rec.id)))?;
            return same_request(rec, request_id, fingerprint);
        }
        tracing::info!(job = %rec.id, kind = kind.as_str(), disk = %rec.params.disk, "job started");
        if kind.long() {
            let me = self.clone();
            let r = rec.clone();
            tokio::spawn(async move { me.run(r).await });
            return Ok(rec);
        }
        match self.run_with(rec).await {
            (_, Some(e)) => Err(e),
            (rec, None) => Ok(rec),
        }
    }

    /// Ask a job to stop.
    pub async fn cancel(&self, id: &str) -> Result<JobRecord> {
        let mut rec = self.job(id).await?;
        if rec.state != JobState::Running {
            return Ok(rec);
        }
        if !plan::cancellable(rec.step) {
            return Err(CoordError::TooLate(id.to_string()));
        }
        rec.cancel = true;
        self.save(&rec).await?;
        if !rec.agent_job.is_empty() {
            // Tell the agent at once; the job's runner sees the end.
            self.cancel_agent_job(&rec).await;
        }
        Ok(rec)
    }

    // ---- running ---------------------------------------------------------------------------

    /// Run (or resume) a job to its end; returns its final record.
    pub async fn run(self: &Arc<Self>, rec: JobRecord) -> JobRecord {
        self.run_with(rec).await.0
    }

    /// Run a job; returns its final record and, when it failed, why.
    async fn run_with(self: &Arc<Self>, rec: JobRecord) -> (JobRecord, Option<CoordError>) {
        self.run_job(rec, false).await
    }

    /// Run a job (`adopted`: taken over from a dead owner, so another
    /// replica may have taken it too).
    async fn run_job(
        self: &Arc<Self>,
        mut rec: JobRecord,
        adopted: bool,
    ) -> (JobRecord, Option<CoordError>) {
        self.running
            .lock()
            .expect("poisoned")
            .insert(rec.id.clone());
        let r = self.run_steps(&mut rec, adopted).await;
        self.running.lock().expect("poisoned").remove(&rec.id);
        let mut failure = None;
        match r {
            Ok(false) => {
                tracing::info!(job = %rec.id, "another replica runs the job");
                return (rec, None);
            }
            Ok(true) => {
                rec.state = JobState::Succeeded;
                rec.step = Step::Done;
            }
            Err(CoordError::Cancelled) => rec.state = JobState::Cancelled,
            Err(e) => {
                tracing::info!(job = %rec.id, error = %e, "job failed");
                rec.state = JobState::Failed;
                rec.error = Some(job_error(&e));
                failure = Some(e);
            }
        }
        rec.finished = now();
        if let Err(e) = self.save(&rec).await {
            // The leader will find it running with a dead owner later.
            tracing::error!(job = %rec.id, error = %e, "could not record the end of a job");
        }
        tracing::debug!(job = %rec.id, state = ?rec.state, "job ended");
        (rec, failure)
    }

    /// The resource a job locks: the disk it works on.
    async fn lock_target(&self, rec: &JobRecord) -> Result<Option<Resource>> {
        let domain: uuid::Uuid = rec
            .params
            .domain
            .parse()
            .map_err(|_| CoordError::Internal("a job without a domain".into()))?;
        let disk = match rec.kind {
            JobKind::Create => return Ok(None),
            JobKind::DeleteSnapshot => {
                // The disk the snapshot belongs to, so that its other
                // operations wait.
                let snap = parse_tag("snapshot_id", &rec.params.disk)?;
                let t = match self.tag(&domain, &snap).await {
                    Ok(t) => Some(t),
                    Err(CoordError::NotFound { .. }) => None,
                    Err(e) => return Err(e),
                };
                match t
                    .as_ref()
                    .and_then(|t| t.option(SNAP_KEY))
                    .and_then(|d| TagId::parse("", d).ok())
                {
                    Some(disk) => disk,
                    None => snap,
                }
            }
            _ => parse_tag("disk_id", &rec.params.disk)?,
        };
        Ok(Some(Resource {
            domain,
            kind: ResourceKind::Disk(disk),
        }))
    }

    /// Run a job's steps under its disk's lock; `Ok(false)`: another
    /// replica owns the (adopted) job now, or it has ended.
    async fn run_steps(self: &Arc<Self>, rec: &mut JobRecord, adopted: bool) -> Result<bool> {
        let lock = match self.lock_target(rec).await {
            Ok(Some(res)) => {
                let (locks, wait) = (self.locks.clone(), self.cfg.lock_wait);
                Some(blocking(move || Ok(locks.acquire(&res, wait)?)).await?)
            }
            Ok(None) => None,
            Err(e) => return Err(e),
        };
        if adopted {
            // Two replicas may adopt one job (a leader and its restarted
            // owner): the last to record itself as owner runs it, the
            // other leaves it once it holds the lock.
            let now = self.job(&rec.id).await?;
            if now.state != JobState::Running || now.owner != self.id() {
                return Ok(false);
            }
        }
        if rec.step == Step::Begin {
            rec.step = plan::next_step(rec.kind, Step::Begin);
            rec.attempts += 1;
            self.save(rec).await?;
        }
        loop {
            if rec.step == Step::Done {
                return Ok(true);
            }
            if let Some(g) = &lock {
                // Self-fencing: no step starts on a lock that may be gone.
                g.check()?;
            }
            if plan::cancellable(rec.step) && self.job(&rec.id).await.is_ok_and(|r| r.cancel) {
                return Err(CoordError::Cancelled);
            }
            self.step(rec, lock.as_ref()).await?;
            rec.step = plan::next_step(rec.kind, rec.step);
            rec.host.clear();
            rec.agent_job.clear();
            if rec.step != Step::Done {
                // The end is recorded by `run_with`.
                self.save(rec).await?;
            }
        }
    }

    fn rid(rec: &JobRecord) -> String {
        format!("{}:{:?}:{}", rec.id, rec.step, rec.attempts)
    }

    fn domain_id(rec: &JobRecord) -> Result<uuid::Uuid> {
        rec.params
            .domain
            .parse()
            .map_err(|_| CoordError::Internal("a job without a domain".into()))
    }

    async fn step(self: &Arc<Self>, rec: &mut JobRecord, lock: Option<&LockGuard>) -> Result<()> {
        let dom = Self::domain_id(rec)?;
        if rec.attempts > 1 && self.step_done(rec).await? {
            // An earlier attempt did it; its agent or coordinator died
            // before anyone heard.
            tracing::info!(job = %rec.id, step = ?rec.step, "an earlier attempt did this step");
            return Ok(());
        }
        match (rec.kind, rec.step) {
            (JobKind::Create, Step::Call) => {
                let p = &rec.params;
                let nd = NewDisk {
                    format: parse_format(&p.format)?.unwrap_or(Format::Raw),
                    size: p.size,
                    preallocated: p.allocation == "preallocated",
                    description: p.description.clone(),
                    options: options(&p.name, &rec.id, &[]),
                };
                let made = self
                    .mutate(rec, |c, rid| {
                        let nd = nd.clone();
                        async move { c.create_disk(&rid, &dom, &nd).await }
                    })
                    .await?;
                if let Some(t) = made {
                    rec.result_domain = dom.to_string();
                    rec.result_disk = t.id.to_string();
                }
            }
            (JobKind::Snapshot, Step::Call) => {
                let disk = parse_tag("disk_id", &rec.params.disk)?;
                let desc = rec.params.description.clone();
                let mark = vec![(JOB_KEY.to_string(), rec.id.clone())];
                let made = self
                    .mutate(rec, |c, rid| {
                        let (desc, mark) = (desc.clone(), mark.clone());
                        async move { c.snapshot(&rid, &dom, &disk, &desc, &mark, None).await }
                    })
                    .await?;
                if let Some((weak, _)) = made {
                    rec.snapshot = weak.id.to_string();
                    rec.result_domain = dom.to_string();
                    rec.result_disk = disk.to_string();
                }
            }
            (JobKind::Clone, Step::Call) => {
                let src = parse_tag("source_id", &rec.params.disk)?;
                let st = self.tag(&dom, &src).await?;
                let source = plan::clone_source(&src, std::slice::from_ref(&st))?;
                let of = match &source {
                    CloneSource::Disk(d) => d.to_string(),
                    CloneSource::Snapshot(_) => st.option(SNAP_KEY).unwrap_or_default().to_string(),
                };
                let opts = options(&rec.params.name, &rec.id, &[(CLONE_OF_KEY, &of)]);
                let desc = rec.params.description.clone();
                let made = self
                    .mutate(rec, |c, rid| {
                        let (opts, desc, source) = (opts.clone(), desc.clone(), source.clone());
                        async move {
                            match source {
                                CloneSource::Snapshot(s) => {
                                    c.create_on(&rid, &dom, &s, &desc, &opts).await
                                }
                                CloneSource::Disk(d) => {
                                    let (_, clone) = c
                                        .snapshot(
                                            &rid,
                                            &dom,
                                            &d,
                                            "base of a clone",
                                            &[],
                                            Some(&opts),
                                        )
                                        .await?;
                                    clone.ok_or_else(|| {
                                        CoordError::Internal("a snapshot without its clone".into())
                                    })
                                }
                            }
                        }
                    })
                    .await?;
                if let Some(t) = made {
                    rec.result_domain = dom.to_string();
                    rec.result_disk = t.id.to_string();
                }
            }
            (JobKind::Delete, Step::Call) => {
                let disk = parse_tag("disk_id", &rec.params.disk)?;
                self.refuse_active(&dom, &disk).await?;
                self.mutate(rec, |c, rid| async move {
                    c.delete_disk(&rid, &dom, &disk).await
                })
                .await?;
                rec.result_domain = dom.to_string();
                rec.result_disk = disk.to_string();
            }
            (JobKind::Extend, Step::Call) => {
                let disk = parse_tag("disk_id", &rec.params.disk)?;
                let t = self.tag(&dom, &disk).await?;
                if t.tag_type != cairn_domain::TagType::Strong {
                    return Err(CoordError::NotFound {
                        kind: "disk",
                        id: disk.to_string(),
                    });
                }
                let top = t.volume;
                if rec.params.size < t.size {
                    return Err(CoordError::invalid(
                        "size",
                        format!(
                            "{} is smaller than the disk's {}; disks only grow",
                            rec.params.size, t.size
                        ),
                    ));
                }
                let size = rec.params.size;
                self.mutate(rec, |c, rid| async move {
                    c.extend(&rid, &dom, &top, &disk, size).await
                })
                .await?;
                rec.result_domain = dom.to_string();
                rec.result_disk = disk.to_string();
            }
            (JobKind::DeleteSnapshot, Step::Merge) if !rec.agent_job.is_empty() => {
                // Following the merge an earlier run of this job started
                // (and checked): the snapshot may be gone already.
                let snap = parse_tag("snapshot_id", &rec.params.disk)?;
                self.agent_job(rec, lock, &dom, None, |c, rid| async move {
                    c.merge(&rid, &dom, &snap).await
                })
                .await?;
            }
            (JobKind::DeleteSnapshot, Step::Merge) => {
                let snap = parse_tag("snapshot_id", &rec.params.disk)?;
                let t = match self.tag(&dom, &snap).await {
                    Ok(t) => t,
                    Err(CoordError::NotFound { .. }) => {
                        return Err(CoordError::NotFound {
                            kind: "snapshot",
                            id: snap.to_string(),
                        })
                    }
                    Err(e) => return Err(e),
                };
                if let Some(disk) = t.option(SNAP_KEY).and_then(|d| TagId::parse("", d).ok()) {
                    self.refuse_active(&dom, &disk).await?;
                    rec.result_disk = disk.to_string();
                }
                rec.result_domain = dom.to_string();
                self.agent_job(rec, lock, &dom, None, |c, rid| async move {
                    c.merge(&rid, &dom, &snap).await
                })
                .await?;
            }
            (JobKind::FullClone | JobKind::Copy | JobKind::Move | JobKind::Convert, Step::Copy) => {
                self.copy_step(rec, lock, dom).await?;
            }
            (JobKind::Convert, Step::Swap) => {
                let disk = parse_tag("disk_id", &rec.params.disk)?;
                let with = parse_tag("copy", &rec.result_disk)?;
                self.refuse_active(&dom, &disk).await?;
                self.mutate(rec, |c, rid| async move {
                    c.swap(&rid, &dom, &disk, &with).await
                })
                .await?;
                rec.result_domain = dom.to_string();
                rec.result_disk = disk.to_string();
            }
            (JobKind::Move, Step::DeleteSource) => {
                let disk = parse_tag("disk_id", &rec.params.disk)?;
                self.refuse_active(&dom, &disk).await?;
                self.mutate(rec, |c, rid| async move {
                    c.delete_disk(&rid, &dom, &disk).await
                })
                .await?;
            }
            (k, s) => {
                return Err(CoordError::Internal(format!(
                    "no step {s:?} in a {} job",
                    k.as_str()
                )))
            }
        }
        Ok(())
    }

    /// Make the one agent call of a step: at most once per agent process
    /// (see [`Agents::call_once`]); when the process that got it died
    /// without answering, the domain, once settled, tells whether it took
    /// effect ([`Coordinator::step_done`], `Ok(None)`: it did, and the
    /// step's results are in `rec`); if not, another agent makes it.
    async fn mutate<T, F, Fut>(&self, rec: &mut JobRecord, call: F) -> Result<Option<T>>
    where
        F: Fn(AgentConn, String) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let dom = Self::domain_id(rec)?;
        // One disk's short operations go to one agent while it is not
        // busier than others: its locks for the disk are then handed over
        // in the process instead of through etcd.
        let spread = if rec.params.disk.is_empty() {
            spread_of(&rec.id)
        } else {
            spread_of(&rec.params.disk)
        };
        for _ in 0..4 {
            match self
                .agents
                .call_once(&dom, None, spread, |c| call(c, Self::rid(rec)))
                .await?
            {
                Once::Answered(v) => return Ok(Some(v)),
                Once::Lost { host } => {
                    tracing::warn!(job = %rec.id, host = %host, step = ?rec.step, "the agent died without answering; asking the domain");
                    if self.step_done(rec).await? {
                        tracing::info!(job = %rec.id, step = ?rec.step, "the call took effect before its agent died");
                        return Ok(None);
                    }
                    tracing::info!(job = %rec.id, step = ?rec.step, "the call did not take effect; calling another agent");
                    // Another attempt, under its own request id, recorded
                    // so that an adopter waits for the right one.
                    rec.attempts += 1;
                    self.save(rec).await?;
                }
            }
        }
        Err(CoordError::Unsettled(format!(
            "the agents of job {} kept dying during its {:?} step",
            rec.id, rec.step
        )))
    }

    /// Bring a domain to rest after a host may have died mid-operation:
    /// wait until every host slot in use belongs to a live agent (a dead
    /// host's lease has expired, so it can no longer write) and every dead
    /// host's journal has been recovered. What the domain shows afterwards
    /// is final.
    pub async fn settle(&self, dom: &uuid::Uuid) -> Result<()> {
        let since = std::time::Instant::now();
        loop {
            let r = self
                .agents
                .with_agent(dom, None, rand_spread(), |c| async move {
                    c.recover(dom, false).await
                })
                .await?;
            self.agents.invalidate();
            let live: HashSet<(u32, u64)> = self
                .agents
                .list()
                .await?
                .iter()
                .flat_map(|a| a.slots.iter())
                .filter(|s| s.domain == *dom)
                .map(|s| (s.slot, s.token))
                .collect();
            let stale: Vec<u32> = r
                .active
                .iter()
                .filter(|s| !live.contains(s))
                .map(|s| s.0)
                .collect();
            if stale.is_empty() {
                return Ok(());
            }
            if since.elapsed() > SETTLE_WAIT {
                return Err(CoordError::Unsettled(format!(
                    "host slots {stale:?} of domain {dom} are in use by no live agent, and their leases did not expire within {SETTLE_WAIT:?}"
                )));
            }
            tracing::info!(domain = %dom, slots = ?stale, "waiting for dead hosts' leases to expire");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether the current step of `rec` took effect though nobody heard
    /// its answer (its agent or coordinator died): settle the domain, then
    /// look for the mark the step leaves (the job id on what it made, or
    /// what it removed being gone). Fills in the step's results when it
    /// did.
    async fn step_done(&self, rec: &mut JobRecord) -> Result<bool> {
        let dom = Self::domain_id(rec)?;
        self.settle(&dom).await?;
        let gone = |r: Result<TagInfo>| match r {
            Err(CoordError::NotFound { .. }) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        };
        match (rec.kind, rec.step) {
            (JobKind::Create | JobKind::Clone, Step::Call) => {
                match self.made_by(&dom, &rec.id).await? {
                    Some(t) => {
                        rec.result_domain = dom.to_string();
                        rec.result_disk = t.id.to_string();
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }
            (JobKind::Snapshot, Step::Call) => {
                let (tags, _) = self
                    .contents(&DomainRef {
                        id: dom,
                        name: String::new(),
                    })
                    .await?;
                match tags.iter().find(|t| {
                    t.tag_type == cairn_domain::TagType::Weak && t.option(JOB_KEY) == Some(&rec.id)
                }) {
                    Some(t) => {
                        rec.snapshot = t.id.to_string();
                        rec.result_domain = dom.to_string();
                        rec.result_disk = rec.params.disk.clone();
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }
            (JobKind::Delete, Step::Call) | (JobKind::Move, Step::DeleteSource) => {
                let disk = parse_tag("disk_id", &rec.params.disk)?;
                gone(self.tag(&dom, &disk).await)
            }
            (JobKind::Extend, Step::Call) => {
                let disk = parse_tag("disk_id", &rec.params.disk)?;
                match self.tag(&dom, &disk).await {
                    Ok(t) => Ok(t.size >= rec.params.size),
                    Err(CoordError::NotFound { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            (JobKind::DeleteSnapshot, Step::Merge) => {
                let snap = parse_tag("snapshot_id", &rec.params.disk)?;
                gone(self.tag(&dom, &snap).await)
            }
            (JobKind::Convert, Step::Swap) => {
                // The swap removes the copy's tag.
                let copy = parse_tag("copy", &rec.result_disk)?;
                gone(self.tag(&dom, &copy).await)
            }
            (JobKind::FullClone | JobKind::Copy | JobKind::Move | JobKind::Convert, Step::Copy) => {
                let target = Self::target_id(rec)?;
                if target != dom {
                    self.settle(&target).await?;
                }
                match self.made_by(&target, &rec.id).await? {
                    Some(t) => {
                        rec.result_domain = target.to_string();
                        rec.result_disk = t.id.to_string();
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }
            _ => Ok(false),
        }
    }

    fn target_id(rec: &JobRecord) -> Result<uuid::Uuid> {
        if rec.params.target_domain.is_empty() {
            return Self::domain_id(rec);
        }
        rec.params
            .target_domain
            .parse()
            .map_err(|_| CoordError::invalid("target_domain", "is not a domain id"))
    }

    /// The copy of a full clone, copy, move or conversion.
    async fn copy_step(
        self: &Arc<Self>,
        rec: &mut JobRecord,
        lock: Option<&LockGuard>,
        dom: uuid::Uuid,
    ) -> Result<()> {
        let disk = parse_tag("disk_id", &rec.params.disk)?;
        let target = Self::target_id(rec)?;
        let d = DomainRef {
            id: dom,
            name: String::new(),
        };
        let (tags, vols) = self.contents(&d).await?;
        let view = match plan::clone_source(&disk, &tags)? {
            CloneSource::Disk(_) => plan::disk_view(&d, &disk, &tags, &vols)?,
            CloneSource::Snapshot(s) => {
                // A full clone of a snapshot copies the snapshot's chain.
                let t = tags.iter().find(|t| t.id == s).expect("found above");
                let mut fake = t.clone();
                fake.tag_type = cairn_domain::TagType::Strong;
                let mut tags2 = tags.clone();
                tags2.retain(|x| x.id != s);
                tags2.push(fake);
                plan::disk_view(&d, &s, &tags2, &vols)?
            }
        };
        let top = view.chain.last().expect("a chain has a top").volume.clone();
        let format = parse_format(&rec.params.format)?.or(Some(top.format));
        let pre = rec.params.allocation == "preallocated";
        let name = if rec.params.name.is_empty() {
            view.tag.option(NAME_KEY).unwrap_or_default().to_string()
        } else {
            rec.params.name.clone()
        };
        let disk_s = disk.to_string();
        let extra: Vec<(&str, &str)> = match rec.kind {
            JobKind::Convert => vec![(CONVERT_KEY, &disk_s)],
            JobKind::FullClone => vec![(CLONE_OF_KEY, &disk_s)],
            _ => vec![],
        };
        let opts = options(&name, &rec.id, &extra);
        let desc = rec.params.description.clone();
        let also = (target != dom).then_some(target);
        let made = self
            .agent_job(rec, lock, &dom, also.as_ref(), |c, rid| {
                let (opts, desc) = (opts.clone(), desc.clone());
                async move {
                    c.copy(&rid, &dom, &top.id, &target, format, pre, &desc, &opts)
                        .await
                }
            })
            .await?;
        match made {
            Some(Some(t)) => {
                rec.result_domain = target.to_string();
                rec.result_disk = t.id.to_string();
            }
            Some(None) => return Err(CoordError::Internal("a copy job without its tag".into())),
            // Found done on the domain: the results are in `rec`.
            None => {}
        }
        Ok(())
    }

    /// A disk a job made (found by the job id in its tag's options).
    async fn made_by(&self, domain: &uuid::Uuid, job: &str) -> Result<Option<TagInfo>> {
        let d = DomainRef {
            id: *domain,
            name: String::new(),
        };
        let (tags, _) = self.contents(&d).await?;
        Ok(tags.into_iter().find(|t| t.option(JOB_KEY) == Some(job)))
    }

    /// Refuse when the disk is active on any host.
    async fn refuse_active(&self, dom: &uuid::Uuid, disk: &TagId) -> Result<()> {
        let want = disk.to_string();
        for a in self.agents.list().await? {
            if !a.sees(dom) {
                continue;
            }
            let c = self.agents.conn(&a)?;
            match c.active_tags(dom).await {
                Ok(tags) if tags.contains(&want) => {
                    return Err(CoordError::FailedPrecondition(format!(
                        "disk {disk} is active on host {} ({}); deactivate it first",
                        a.host_name, a.host_id
                    )))
                }
                Ok(_) => {}
                Err(e) if e.agent_unavailable() => {
                    // A dead host's activations die with it.
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Start an agent job with `start` and follow it to its end,
    /// recording its host, id and progress; when its agent dies, start it
    /// again on another, unless the domain shows that it finished.
    /// Returns what the agent's job made (`Some`), or `None` when the step
    /// was found done on the domain (its results are then in `rec`).
    async fn agent_job<F, Fut>(
        self: &Arc<Self>,
        rec: &mut JobRecord,
        lock: Option<&LockGuard>,
        dom: &uuid::Uuid,
        also: Option<&uuid::Uuid>,
        start: F,
    ) -> Result<Option<Option<TagInfo>>>
    where
        F: Fn(AgentConn, String) -> Fut,
        Fut: std::future::Future<Output = Result<String>>,
    {
        let spread = spread_of(&rec.id);
        loop {
            if rec.agent_job.is_empty() {
                let rid = Self::rid(rec);
                let started = self
                    .agents
                    .call_once(dom, also, spread, |c| {
                        let rid = rid.clone();
                        let (host, instance) = (c.host.clone(), c.instance.clone());
                        let f = start(c, rid);
                        async move { f.await.map(|j| (host, instance, j)) }
                    })
                    .await?;
                match started {
                    Once::Answered((host, instance, job)) => {
                        rec.host = host;
                        rec.instance = instance;
                        rec.agent_job = job;
                        self.save(rec).await?;
                    }
                    Once::Lost { host } => {
                        tracing::warn!(job = %rec.id, host = %host, "the agent died as the job started");
                        if self.restart(rec).await? {
                            return Ok(None);
                        }
                        continue;
                    }
                }
            }
            match self.follow(rec, lock).await? {
                Some(t) => return Ok(Some(t)),
                None => {
                    if self.restart(rec).await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Count another attempt of the current step after its agent died;
    /// `true` when the domain shows the step done anyway.
    async fn restart(&self, rec: &mut JobRecord) -> Result<bool> {
        rec.attempts += 1;
        rec.agent_job.clear();
        rec.host.clear();
        rec.instance.clear();
        self.save(rec).await?;
        self.step_done(rec).await
    }

    /// Follow `rec.agent_job` on `rec.host` until it ends. `Ok(None)`: the
    /// agent process is gone (and its job with it).
    async fn follow(
        &self,
        rec: &mut JobRecord,
        lock: Option<&LockGuard>,
    ) -> Result<Option<Option<TagInfo>>> {
        let mut unreachable_since: Option<std::time::Instant> = None;
        let mut last_saved = std::time::Instant::now();
        loop {
            if let Some(g) = lock {
                if let Err(e) = g.check() {
                    // Fenced: stop the agent's work; the job fails.
                    self.cancel_agent_job(rec).await;
                    return Err(e.into());
                }
            }
            let Some(conn) = self.agents.conn_to(&rec.host).await? else {
                tracing::warn!(job = %rec.id, host = %rec.host, "the agent left the registry");
                return Ok(None);
            };
            if !rec.instance.is_empty()
                && !conn.instance.is_empty()
                && conn.instance != rec.instance
            {
                tracing::warn!(job = %rec.id, host = %rec.host, "the agent restarted");
                return Ok(None);
            }
            let _busy = self.agents.busy(&conn.host);
            match conn.job(&rec.agent_job).await {
                Ok(j) => {
                    unreachable_since = None;
                    let changed = (rec.done, rec.total) != (j.done, j.total);
                    rec.done = j.done;
                    rec.total = j.total;
                    match j.state {
                        JobState::Running => {}
                        JobState::Succeeded => return Ok(Some(j.tag)),
                        JobState::Cancelled => return Err(CoordError::Cancelled),
                        JobState::Failed => {
                            let e = j.error.unwrap_or(JobError {
                                code: tonic::Code::Internal as i32,
                                reason: "agent_error".into(),
                                message: "the agent's job failed".into(),
                            });
                            return Err(CoordError::Agent {
                                host: rec.host.clone(),
                                status: tonic::Status::new(tonic::Code::from(e.code), e.message),
                            });
                        }
                    }
                    if changed && last_saved.elapsed() >= Duration::from_millis(500) {
                        // Progress is for people; a second is fine grained.
                        let cur = self.job(&rec.id).await?;
                        if cur.cancel && !rec.cancel {
                            rec.cancel = true;
                            self.cancel_agent_job(rec).await;
                        }
                        self.save(rec).await?;
                        last_saved = std::time::Instant::now();
                    }
                }
                Err(CoordError::Agent { status, .. }) if status.code() == tonic::Code::NotFound => {
                    // The agent restarted: its job died with it.
                    tracing::warn!(job = %rec.id, host = %rec.host, "the agent forgot the job");
                    return Ok(None);
                }
                Err(e) if e.agent_unavailable() => {
                    // Registered but silent: its job may still be writing,
                    // so wait for it to answer or to leave the registry.
                    let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > SETTLE_WAIT {
                        return Err(CoordError::Unsettled(format!(
                            "agent {} neither answers nor leaves the registry",
                            rec.host
                        )));
                    }
                    self.agents.invalidate();
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(self.cfg.poll).await;
        }
    }

    async fn cancel_agent_job(&self, rec: &JobRecord) {
        if let Ok(Some(c)) = self.agents.conn_to(&rec.host).await {
            let _ = c.cancel(&rec.agent_job).await;
        }
    }

    // ---- taking over ---------------------------------------------------------------------

    /// Whether this replica is running job `id`.
    pub fn runs(&self, id: &str) -> bool {
        self.running.lock().expect("poisoned").contains(id)
    }

    /// Take over a running job whose owner is gone, in the background:
    /// follow its agent job while that lives; otherwise run its current
    /// step again, which first looks at the domain for whether the dead
    /// owner's last call took effect (see [`plan::adopt`]).
    pub async fn adopt(self: &Arc<Self>, mut rec: JobRecord) -> Result<()> {
        let previous = std::mem::replace(&mut rec.owner, self.id().to_string());
        tracing::warn!(job = %rec.id, from = %previous, step = ?rec.step, "adopting an orphaned job");
        let alive = if rec.agent_job.is_empty() {
            false
        } else {
            match self.agents.conn_to(&rec.host).await? {
                Some(c) if rec.instance.is_empty() || c.instance == rec.instance => {
                    c.job(&rec.agent_job).await.is_ok()
                }
                _ => false,
            }
        };
        match plan::adopt(&rec, alive) {
            plan::Adopt::Follow => {}
            plan::Adopt::Restart => {
                rec.attempts += 1;
                rec.agent_job.clear();
                rec.host.clear();
                rec.instance.clear();
            }
            plan::Adopt::Reconcile => {
                // The dead owner's one call may still be running on a live
                // agent: wait until none runs it, so that the domain shows
                // its outcome.
                self.wait_unanswered(&Self::rid(&rec)).await?;
                rec.attempts += 1;
            }
        }
        self.save(&rec).await?;
        let me = self.clone();
        tokio::spawn(async move { me.run_job(rec, true).await });
        Ok(())
    }

    /// Take back this replica's own running jobs after a restart (its id
    /// registers again, so the leader would not see them as orphans).
    pub async fn resume_own(self: &Arc<Self>) -> Result<usize> {
        let mut n = 0;
        for j in self.jobs().await? {
            if j.state != JobState::Running || j.owner != self.id() || self.runs(&j.id) {
                continue;
            }
            let id = j.id.clone();
            match self.adopt(j).await {
                Ok(()) => n += 1,
                Err(e) => tracing::warn!(job = %id, error = %e, "could not resume a job"),
            }
        }
        Ok(n)
    }

    /// Wait until no live agent is running request `rid`.
    async fn wait_unanswered(&self, rid: &str) -> Result<()> {
        let since = std::time::Instant::now();
        loop {
            let mut running = None;
            for a in self.agents.list().await? {
                let Ok(c) = self.agents.conn(&a) else {
                    continue;
                };
                // An unreachable agent is dead or cut off; `settle` waits
                // for its lease.
                if let Ok(RequestState::Running) = c.request_state(rid).await {
                    running = Some(a.host_id.clone());
                }
            }
            let Some(host) = running else { return Ok(()) };
            if since.elapsed() > SETTLE_WAIT {
                return Err(CoordError::Unsettled(format!(
                    "agent {host} is still running request {rid}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn options(name: &str, job: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut o = vec![(JOB_KEY.to_string(), job.to_string())];
    if !name.is_empty() {
        o.push((NAME_KEY.to_string(), name.to_string()));
    }
    for (k, v) in extra {
        if !v.is_empty() {
            o.push((k.to_string(), v.to_string()));
        }
    }
    o
}

/// A job's id: derived from its request id when there is one, so that
/// the job record itself makes the request idempotent (one write, created
/// once); random otherwise.
pub fn job_id(request_id: &str) -> String {
    if request_id.is_empty() {
        return uuid::Uuid::new_v4().to_string();
    }
    let a = spread_of(request_id);
    let b = spread_of(&format!("{request_id}#job"));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..].copy_from_slice(&b.to_le_bytes());
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// The job an earlier request with this id started, if it was the same
/// request.
fn same_request(rec: JobRecord, request_id: &str, fingerprint: u64) -> Result<JobRecord> {
    if rec.request_id != request_id || rec.fingerprint != fingerprint {
        return Err(CoordError::RequestIdReused(request_id.to_string()));
    }
    Ok(rec)
}

fn spread_of(s: &str) -> u64 {
    cairn_proto::fingerprint(s.as_bytes())
}

fn rand_spread() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// A job's error as recorded.
pub fn job_error(e: &CoordError) -> JobError {
    let code = match e {
        CoordError::Agent { status, .. } => status.code(),
        other => crate::service::code_of(other),
    };
    JobError {
        code: code as i32,
        reason: e.code().to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! The coordinator over a real agent served in this process (through
    //! its gRPC service, without a network), with the in-memory store and
    //! lock service: jobs, idempotency and the composed steps, fast.

    use super::*;
    use crate::agents::{Discovery, Transport, TransportError};
    use cairn_cluster::MemKv;
    use cairn_domain::MemLockService;

    fn agent(dir: &std::path::Path, locks: Arc<dyn LockService>) -> Transport {
        agent_with(
            dir,
            locks,
            Arc::new(cairn_agent::loopdev::MemLoop::default()),
            cairn_domain::HostIdentity::local(),
        )
    }

    /// An agent on real loop devices (for steps that run qemu-img on
    /// activated volumes), under a host id of its own so that it never
    /// touches another agent's devices.
    fn kernel_agent(dir: &std::path::Path, locks: Arc<dyn LockService>) -> Transport {
        agent_with(
            dir,
            locks,
            Arc::new(cairn_agent::loopdev::KernelLoop),
            cairn_domain::HostIdentity {
                id: uuid::Uuid::new_v4(),
                name: "test".into(),
            },
        )
    }

    fn agent_with(
        dir: &std::path::Path,
        locks: Arc<dyn LockService>,
        loops: Arc<dyn cairn_agent::loopdev::LoopControl>,
        host: cairn_domain::HostIdentity,
    ) -> Transport {
        use cairn_domain::io::FileDev;
        let path = dir.join("d.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
        let dev = FileDev::open(&path, true).unwrap();
        let params = cairn_domain::FormatParams {
            name: "mem".into(),
            host_slots: Some(4),
            volume_slots: Some(256),
            tag_slots: Some(256),
            extent_size: Some(1 << 20),
            ..Default::default()
        };
        cairn_domain::format(
            &dev,
            &params,
            false,
            locks.as_ref(),
            &cairn_domain::SystemClock,
        )
        .unwrap();
        let cfg = cairn_agent::AgentConfig {
            domains: vec![path],
            run_dir: dir.join("run"),
            host,
            lock_timeout: Duration::from_secs(5),
            io_dirs: vec![],
            gc_quarantine: Duration::from_secs(60),
        };
        let a = cairn_agent::Agent::open(&cfg, locks, loops).unwrap();
        let svc = cairn_agent::service::AgentService::new(
            Arc::new(a),
            Arc::new(cairn_agent::metrics::Metrics::new()),
        );
        Transport::new(tower::util::MapErr::new(
            cairn_agent::pb::agent_server::AgentServer::new(svc),
            |e: std::convert::Infallible| -> TransportError { match e {} },
        ))
    }

    /// The record of job `id` once it is no longer running (20 s at most).
    async fn ended(c: &Coordinator, id: &str) -> JobRecord {
        let t = std::time::Instant::now();
        loop {
            let j = c.job(id).await.unwrap();
            if j.state != JobState::Running {
                return j;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "{j:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn params(disk: &str) -> Params {
        Params {
            disk: disk.into(),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_compose_agent_calls_and_retries_get_the_same_job() {
        let dir = tempfile::tempdir().unwrap();
        let locks: Arc<dyn LockService> = Arc::new(MemLockService::new());
        let t = agent(dir.path(), locks.clone());
        let c = Arc::new(Coordinator::new(
            CoordConfig::new("c1"),
            Arc::new(MemKv::new()),
            locks,
            Agents::new(Discovery::Transports(vec![("host-a".into(), t)])),
        ));
        let create = Params {
            format: "raw".into(),
            size: 8 << 20,
            name: "web".into(),
            ..Default::default()
        };
        let j = c
            .submit(JobKind::Create, "r1", 1, create.clone())
            .await
            .unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        let disk = j.result_disk.clone();
        // The same request id: the same job, nothing new.
        let again = c
            .submit(JobKind::Create, "r1", 1, create.clone())
            .await
            .unwrap();
        assert_eq!(again.id, j.id);
        assert!(matches!(
            c.submit(JobKind::Create, "r1", 2, create).await,
            Err(CoordError::RequestIdReused(_))
        ));
        assert_eq!(c.disks("").await.unwrap().len(), 1);

        let s = c
            .submit(JobKind::Snapshot, "r2", 3, params(&disk))
            .await
            .unwrap();
        assert!(!s.snapshot.is_empty());
        let v = c.disk("", &disk).await.unwrap();
        assert_eq!(v.chain.len(), 2);
        assert_eq!(v.tag.option(NAME_KEY), Some("web"));

        // A thin clone of the disk: its own top on a new snapshot.
        let cl = c
            .submit(JobKind::Clone, "r3", 4, params(&disk))
            .await
            .unwrap();
        let clone = c.disk("", &cl.result_disk).await.unwrap();
        assert_eq!(clone.chain.len(), 3);
        assert_eq!(clone.tag.option(CLONE_OF_KEY), Some(disk.as_str()));

        // Extend moves nothing when the top can grow, and refuses to shrink.
        let mut p = params(&disk);
        p.size = 16 << 20;
        c.submit(JobKind::Extend, "r4", 5, p.clone()).await.unwrap();
        assert_eq!(c.disk("", &disk).await.unwrap().tag.size, 16 << 20);
        p.size = 4 << 20;
        assert!(matches!(
            c.submit(JobKind::Extend, "r5", 6, p).await,
            Err(CoordError::InvalidArgument { field: "size", .. })
        ));

        // Deleting the clone, then the disk, leaves nothing.
        c.submit(JobKind::Delete, "r6", 7, params(&cl.result_disk))
            .await
            .unwrap();
        c.submit(JobKind::Delete, "r7", 8, params(&disk))
            .await
            .unwrap();
        assert!(c.disks("").await.unwrap().is_empty());
        // Every job is recorded, and ended.
        let jobs = c.jobs().await.unwrap();
        assert_eq!(jobs.len(), 7, "{jobs:?}");
        assert!(jobs.iter().all(|j| j.state != JobState::Running));
        assert_eq!(
            jobs.iter().filter(|j| j.state == JobState::Failed).count(),
            1
        );
    }

    #[test]
    fn requests_are_checked_before_anything_runs() {
        assert!(validate(JobKind::Create, &Params::default()).is_err());
        let mut p = Params {
            format: "raw".into(),
            size: 1000,
            ..Default::default()
        };
        assert!(matches!(
            validate(JobKind::Create, &p),
            Err(CoordError::InvalidArgument { field: "size", .. })
        ));
        p.size = 4096;
        validate(JobKind::Create, &p).unwrap();
        p.format = "vmdk".into();
        assert!(matches!(
            validate(JobKind::Create, &p),
            Err(CoordError::InvalidArgument {
                field: "format",
                ..
            })
        ));
        assert!(matches!(
            validate(JobKind::Copy, &params("x")),
            Err(CoordError::InvalidArgument {
                field: "disk_id",
                ..
            })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_leader_forgets_ended_jobs_after_their_retention_and_adopts_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let locks: Arc<dyn LockService> = Arc::new(MemLockService::new());
        let t = agent(dir.path(), locks.clone());
        let kv: Arc<dyn Kv> = Arc::new(MemKv::new());
        let mut cfg = CoordConfig::new("c1");
        cfg.job_retention = Duration::from_secs(3600);
        let c = Arc::new(Coordinator::new(
            cfg,
            kv.clone(),
            locks,
            Agents::new(Discovery::Transports(vec![("host-a".into(), t)])),
        ));
        let create = |n: &str| Params {
            format: "raw".into(),
            size: 4 << 20,
            name: n.into(),
            ..Default::default()
        };
        let old = c
            .submit(JobKind::Create, "old", 1, create("a"))
            .await
            .unwrap();
        let new = c
            .submit(JobKind::Create, "new", 2, create("b"))
            .await
            .unwrap();
        // One ended two hours ago, one just now.
        let mut rec = c.job(&old.id).await.unwrap();
        rec.finished -= 7200;
        c.save(&rec).await.unwrap();
        // A running job of a replica that is gone.
        let disk = new.result_disk.clone();
        let mut orphan = JobRecord::new(JobKind::Snapshot, "orphan", 3, params(&disk), "c9", now());
        orphan.params.domain = new.result_domain.clone();
        orphan.step = Step::Call;
        orphan.attempts = 1;
        c.save(&orphan).await.unwrap();

        let mut scanned = None;
        let r = crate::leader::duties(&c, false, &mut scanned)
            .await
            .unwrap();
        assert_eq!(r.expired, 1, "{r:?}");
        assert_eq!(r.adopted, vec![orphan.id.clone()]);
        assert!(matches!(
            c.job(&old.id).await,
            Err(CoordError::NotFound { .. })
        ));
        assert_eq!(c.job(&new.id).await.unwrap().state, JobState::Succeeded);
        // The adopted job was never started by its dead owner: it runs now.
        let done = ended(&c, &orphan.id).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert_eq!(done.owner, "c1");
        assert_eq!(c.disk("", &disk).await.unwrap().snapshots.len(), 1);
        // Nothing new to look at: the next round does not read the jobs.
        let r = crate::leader::duties(&c, false, &mut scanned)
            .await
            .unwrap();
        assert_eq!((r.expired, r.adopted.len()), (0, 0));
    }

    /// Regression (kill loop): a coordinator killed while it followed a
    /// merge, restarted after the merge had ended, failed the job with
    /// "snapshot not found" though the merge had succeeded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn root_a_resumed_delete_snapshot_follows_its_finished_merge() {
        let dir = tempfile::tempdir().unwrap();
        let locks: Arc<dyn LockService> = Arc::new(MemLockService::new());
        let t = kernel_agent(dir.path(), locks.clone());
        let kv: Arc<dyn Kv> = Arc::new(MemKv::new());
        let c = Arc::new(Coordinator::new(
            CoordConfig::new("c1"),
            kv.clone(),
            locks,
            Agents::new(Discovery::Transports(vec![("host-a".into(), t)])),
        ));
        let d = c
            .submit(
                JobKind::Create,
                "mk",
                1,
                Params {
                    format: "qcow2".into(),
                    size: 4 << 20,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let disk = d.result_disk.clone();
        let s = c
            .submit(JobKind::Snapshot, "snap", 2, params(&disk))
            .await
            .unwrap();
        let dom: uuid::Uuid = d.result_domain.parse().unwrap();
        let snap = TagId::parse("", &s.snapshot).unwrap();
        // The job as its dead run left it: merging, the agent job started.
        let mut rec = JobRecord::new(
            JobKind::DeleteSnapshot,
            "del",
            3,
            params(&s.snapshot),
            "c1",
            now(),
        );
        rec.params.domain = dom.to_string();
        rec.step = Step::Merge;
        rec.attempts = 1;
        let rid = Coordinator::rid(&rec);
        let started = c
            .agents
            .call_once(&dom, None, 0, |a| {
                let rid = rid.clone();
                async move {
                    let j = a.merge(&rid, &dom, &snap).await?;
                    Ok((a, j))
                }
            })
            .await
            .unwrap();
        let Once::Answered((a, job)) = started else {
            panic!("the agent answers")
        };
        // The merge ends before anybody takes the job back.
        let t0 = std::time::Instant::now();
        while a.job(&job).await.unwrap().state == plan::JobState::Running {
            assert!(t0.elapsed() < Duration::from_secs(20));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let merged = a.job(&job).await.unwrap();
        assert_eq!(
            merged.state,
            plan::JobState::Succeeded,
            "{:?}",
            merged.error
        );
        assert!(c.disk("", &disk).await.unwrap().snapshots.is_empty());
        rec.host = a.host.clone();
        rec.instance = a.instance.clone();
        rec.agent_job = job;
        c.save(&rec).await.unwrap();
        assert_eq!(c.resume_own().await.unwrap(), 1);
        let done = ended(&c, &rec.id).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert_eq!(done.attempts, 1);
        assert_eq!(c.disk("", &disk).await.unwrap().chain.len(), 1);
    }
}
