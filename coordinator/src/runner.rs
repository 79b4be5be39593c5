//! Running jobs: a request becomes a job record (created once per
//! request id), run step by step under its disk's cluster lock, each step
//! recorded before it starts so that another replica can take the job
//! over when this one dies ([`Coordinator::adopt`]).

use std::sync::Arc;
use std::time::Duration;

use cairn_domain::api::RequestState;
use cairn_domain::lock::{Resource, ResourceKind};
use cairn_domain::LockGuard;

use crate::coordinator::{blocking, now, Coordinator};
use crate::error::{CoordError, Result};
use crate::exec::{spread_of, SETTLE_WAIT};
use crate::jobs::JobSpec;
use crate::record::{self, cancellable, job_key, next_step, JobError, JobRecord, JobState, Step};

impl Coordinator {
    // ---- submitting ------------------------------------------------------------------------

    /// Start the job `spec` for a request, or return the job an earlier
    /// request with the same id started. Short jobs have ended when this
    /// returns; a failed short job is returned as its error.
    pub async fn submit(
        self: &Arc<Self>,
        request_id: &str,
        fingerprint: u64,
        spec: JobSpec,
        caller: &str,
    ) -> Result<JobRecord> {
        check_request_id(request_id)?;
        spec.validate()?;
        let mut rec = JobRecord::new(spec, request_id, fingerprint, self.id(), caller, now());
        rec.id = job_id(request_id);
        let long = rec.spec.long();
        if !long {
            // One write for a short job before its one call.
            rec.step = next_step(rec.spec.plan(), Step::Begin);
            rec.attempts = 1;
        }
        // Created once: of two coordinators racing with one request id,
        // one starts the job and the other returns it.
        let key = job_key(&rec.id);
        let read = |there: String| -> Result<JobRecord> {
            serde_json::from_str(&there)
                .map_err(|e| CoordError::Internal(format!("job record {key}: {e}")))
        };
        // A new request must be admitted by the state of things; a retry of
        // an admitted one gets its job whatever that state is by now (read
        // only when admission refuses: most kinds admit everything).
        if let Err(refused) = rec.spec.admit(self).await {
            let kv = self.kv().clone();
            let k = key.clone();
            return match blocking(move || Ok(kv.get(&k)?)).await? {
                Some(there) => same_request(read(there)?, request_id, fingerprint),
                None => Err(refused),
            };
        }
        let kv = self.kv().clone();
        let v = serde_json::to_string(&rec).map_err(|e| CoordError::Internal(e.to_string()))?;
        let k = key.clone();
        if let Some(there) = blocking(move || Ok(kv.create(&k, &v)?)).await? {
            return same_request(read(there)?, request_id, fingerprint);
        }
        let disk = rec.spec.disk().map(|d| d.to_string()).unwrap_or_default();
        tracing::info!(job = %rec.id, kind = rec.spec.name(), disk = %disk, "job started");
        if long {
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
        if !cancellable(rec.step) {
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
        Ok(rec
            .spec
            .kind()
            .lock_target(self)
            .await?
            .map(|disk| Resource {
                domain: rec.domain(),
                kind: ResourceKind::Disk(disk),
            }))
    }

    /// Run a job's steps under its disk's lock; `Ok(false)`: another
    /// replica owns the (adopted) job now, or it has ended.
    async fn run_steps(self: &Arc<Self>, rec: &mut JobRecord, adopted: bool) -> Result<bool> {
        let lock = match self.lock_target(rec).await {
            Ok(Some(res)) => {
                let (locks, wait) = (self.locks().clone(), self.cfg.lock_wait);
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
            rec.step = next_step(rec.spec.plan(), Step::Begin);
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
            if cancellable(rec.step) && self.job(&rec.id).await.is_ok_and(|r| r.cancel) {
                return Err(CoordError::Cancelled);
            }
            self.step(rec, lock.as_ref()).await?;
            rec.step = next_step(rec.spec.plan(), rec.step);
            rec.host.clear();
            rec.agent_job.clear();
            if rec.step != Step::Done {
                // The end is recorded by `run_with`.
                self.save(rec).await?;
            }
        }
    }

    /// Carry out the current step of `rec`, unless an earlier attempt
    /// whose answer was lost did.
    async fn step(self: &Arc<Self>, rec: &mut JobRecord, lock: Option<&LockGuard>) -> Result<()> {
        if rec.attempts > 1 && self.step_done(rec).await? {
            // An earlier attempt did it; its agent or coordinator died
            // before anyone heard.
            tracing::info!(job = %rec.id, step = ?rec.step, "an earlier attempt did this step");
            return Ok(());
        }
        let spec = rec.spec.clone();
        spec.kind().step(self, rec, lock).await
    }

    // ---- taking over ---------------------------------------------------------------------

    /// Whether this replica is running job `id`.
    pub fn runs(&self, id: &str) -> bool {
        self.running.lock().expect("poisoned").contains(id)
    }

    /// Take over a running job whose owner is gone, in the background:
    /// follow its agent job while that lives; otherwise run its current
    /// step again, which first looks at the domain for whether the dead
    /// owner's last call took effect (see [`record::adopt`]).
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
        match record::adopt(&rec, alive) {
            record::Adopt::Follow => {}
            record::Adopt::Restart => {
                rec.attempts += 1;
                rec.agent_job.clear();
                rec.host.clear();
                rec.instance.clear();
            }
            record::Adopt::Reconcile => {
                // The dead owner's one call may still be running on a live
                // agent: wait until none runs it, so that the domain shows
                // its outcome.
                self.wait_unanswered(&rec.step_request_id()).await?;
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

/// Refuse a request id that could not be remembered.
pub fn check_request_id(id: &str) -> Result<()> {
    Ok(cairn_domain::limits::check_request_id(id)?)
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

/// A job's error as recorded.
pub fn job_error(e: &CoordError) -> JobError {
    let code = e.grpc_code();
    JobError {
        code: code as i32,
        reason: e.reason(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! The coordinator over a real agent served in this process (through
    //! its gRPC service, without a network), with the in-memory store and
    //! lock service: jobs, idempotency and the composed steps, fast.

    use super::*;
    use crate::agents::{Agents, Discovery, Once, Pick, Transport, TransportError};
    use crate::coordinator::CoordConfig;
    use crate::jobs::{Create, Delete, DeleteSnapshot, Extend, Snapshot, ThinClone};
    use crate::plan::{CLONE_OF_KEY, NAME_KEY};
    use cairn_cluster::{Kv, MemKv};
    use cairn_domain::{Allocation, Format, LockService, MemLockService, TagId};

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
        let params = cairn_domain::FormatParams::small("mem", 4, 256);
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

    /// A coordinator over one agent served in this process, with its domain
    /// under `dir`.
    fn one_agent_coordinator(dir: &std::path::Path) -> Arc<Coordinator> {
        let kv = Arc::new(MemKv::new());
        coordinator_with(dir, CoordConfig::new("c1"), kv, agent)
    }

    /// A coordinator of `cfg` on store `kv` over one agent that `make`
    /// serves in this process, with its domain under `dir`.
    fn coordinator_with(
        dir: &std::path::Path,
        cfg: CoordConfig,
        kv: Arc<dyn Kv>,
        make: fn(&std::path::Path, Arc<dyn LockService>) -> Transport,
    ) -> Arc<Coordinator> {
        let locks: Arc<dyn LockService> = Arc::new(MemLockService::new());
        let t = make(dir, locks.clone());
        let agents = Agents::new(Discovery::Transports(vec![("host-a".into(), t)]));
        Arc::new(Coordinator::new(cfg, kv, locks, agents))
    }

    /// The only domain the coordinator's agents see.
    async fn dom(c: &Coordinator) -> uuid::Uuid {
        c.domain("").await.unwrap().id
    }

    fn tag(s: &str) -> TagId {
        TagId::parse("disk", s).unwrap()
    }

    fn create(domain: uuid::Uuid, format: Format, size: u64, name: &str) -> JobSpec {
        JobSpec::Create(Create {
            domain,
            name: name.into(),
            format,
            allocation: Allocation::Sparse,
            size,
            description: String::new(),
            wipe_after_delete: false,
        })
    }

    fn snapshot(domain: uuid::Uuid, disk: &str) -> JobSpec {
        JobSpec::Snapshot(Snapshot {
            domain,
            disk: tag(disk),
            description: String::new(),
        })
    }

    fn delete(domain: uuid::Uuid, disk: &str) -> JobSpec {
        JobSpec::Delete(Delete {
            domain,
            disk: tag(disk),
        })
    }

    /// Regression: a job an agent refused recorded the reason
    /// `agent_error`, not the agent's own code.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_job_records_the_agents_own_code() {
        let dir = tempfile::tempdir().unwrap();
        let c = one_agent_coordinator(dir.path());
        let d = dom(&c).await;
        let e = c
            .submit("big", 1, create(d, Format::Raw, 1 << 40, "big"), "t")
            .await
            .unwrap_err();
        // The agent refuses a disk larger than the domain (its own code,
        // from its own ErrorInfo).
        let CoordError::Agent { status, .. } = &e else {
            panic!("not the agent's refusal: {e:?}");
        };
        use tonic_types::StatusExt;
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.domain, "cairn.agent.v1");
        assert_eq!(e.reason(), info.reason);
        assert_ne!(e.reason(), "agent_error");
        let j = c.jobs().await.unwrap().remove(0);
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error.unwrap().reason, info.reason);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_compose_agent_calls_and_retries_get_the_same_job() {
        let dir = tempfile::tempdir().unwrap();
        let c = one_agent_coordinator(dir.path());
        let d = dom(&c).await;
        let create = create(d, Format::Raw, 8 << 20, "web");
        let j = c.submit("r1", 1, create.clone(), "t").await.unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        let disk = j.result_disk.clone();
        // The same request id: the same job, nothing new.
        let again = c.submit("r1", 1, create.clone(), "t").await.unwrap();
        assert_eq!(again.id, j.id);
        assert!(matches!(
            c.submit("r1", 2, create, "t").await,
            Err(CoordError::RequestIdReused(_))
        ));
        assert_eq!(c.disks("").await.unwrap().len(), 1);

        let s = c.submit("r2", 3, snapshot(d, &disk), "t").await.unwrap();
        assert!(!s.snapshot.is_empty());
        let v = c.disk("", &disk).await.unwrap();
        assert_eq!(v.chain.len(), 2);
        assert_eq!(v.tag.option(NAME_KEY), Some("web"));

        // A thin clone of the disk: its own top on a new snapshot.
        let thin = JobSpec::Clone(ThinClone {
            domain: d,
            source: tag(&disk),
            name: String::new(),
            description: String::new(),
        });
        let cl = c.submit("r3", 4, thin, "t").await.unwrap();
        let clone = c.disk("", &cl.result_disk).await.unwrap();
        assert_eq!(clone.chain.len(), 3);
        assert_eq!(clone.tag.option(CLONE_OF_KEY), Some(disk.as_str()));

        // Extend moves nothing when the top can grow, and refuses to shrink.
        let extend = |size| {
            JobSpec::Extend(Extend {
                domain: d,
                disk: tag(&disk),
                size,
            })
        };
        c.submit("r4", 5, extend(16 << 20), "t").await.unwrap();
        assert_eq!(c.disk("", &disk).await.unwrap().tag.size, 16 << 20);
        assert!(matches!(
            c.submit("r5", 6, extend(4 << 20), "t").await,
            Err(CoordError::InvalidArgument { field: "size", .. })
        ));

        // Deleting the clone, then the disk, leaves nothing.
        c.submit("r6", 7, delete(d, &cl.result_disk), "t")
            .await
            .unwrap();
        c.submit("r7", 8, delete(d, &disk), "t").await.unwrap();
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_leader_forgets_ended_jobs_after_their_retention_and_adopts_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let kv: Arc<dyn Kv> = Arc::new(MemKv::new());
        let mut cfg = CoordConfig::new("c1");
        cfg.job_retention = Duration::from_secs(3600);
        let c = coordinator_with(dir.path(), cfg, kv.clone(), agent);
        let d = dom(&c).await;
        let old = c
            .submit("old", 1, create(d, Format::Raw, 4 << 20, "a"), "t")
            .await
            .unwrap();
        let new = c
            .submit("new", 2, create(d, Format::Raw, 4 << 20, "b"), "t")
            .await
            .unwrap();
        // One ended two hours ago, one just now.
        let mut rec = c.job(&old.id).await.unwrap();
        rec.finished -= 7200;
        c.save(&rec).await.unwrap();
        // A running job of a replica that is gone.
        let disk = new.result_disk.clone();
        let mut orphan = JobRecord::new(snapshot(d, &disk), "orphan", 3, "c9", "t", now());
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
    async fn root_qemu_a_resumed_delete_snapshot_follows_its_finished_merge() {
        let dir = tempfile::tempdir().unwrap();
        let kv: Arc<dyn Kv> = Arc::new(MemKv::new());
        let c = coordinator_with(dir.path(), CoordConfig::new("c1"), kv.clone(), kernel_agent);
        let dom = dom(&c).await;
        let d = c
            .submit("mk", 1, create(dom, Format::Qcow2, 4 << 20, ""), "t")
            .await
            .unwrap();
        let disk = d.result_disk.clone();
        let s = c
            .submit("snap", 2, snapshot(dom, &disk), "t")
            .await
            .unwrap();
        let snap = TagId::parse("", &s.snapshot).unwrap();
        // The job as its dead run left it: merging, the agent job started.
        let merge = JobSpec::DeleteSnapshot(DeleteSnapshot {
            domain: dom,
            snapshot: snap,
        });
        let mut rec = JobRecord::new(merge, "del", 3, "c1", "t", now());
        rec.step = Step::Merge;
        rec.attempts = 1;
        let rid = rec.step_request_id();
        let started = c
            .agents
            .call_once(Pick::on(&dom).spread(0), |a| {
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
        while a.job(&job).await.unwrap().state == JobState::Running {
            assert!(t0.elapsed() < Duration::from_secs(20));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let merged = a.job(&job).await.unwrap();
        assert_eq!(merged.state, JobState::Succeeded, "{:?}", merged.error);
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
