//! The toolkit of a job's step: one agent call made at most once per
//! agent process, an agent job started and followed to its end (started
//! again elsewhere when its agent dies), and, when an answer was lost,
//! the domain brought to rest so that it tells what happened.

use std::collections::HashSet;
use std::time::Duration;

use cairn_domain::{LockGuard, TagId};

use crate::agents::{AgentConn, Once, Pick};
use crate::coordinator::Coordinator;
use crate::error::{CoordError, Result};
use crate::plan::{DomainRef, TagInfo, JOB_KEY};
use crate::record::{JobError, JobRecord, JobState};

/// How long the coordinator waits for a silent agent to answer or die,
/// and for a dead host's lease to expire, before it gives up on learning
/// an outcome.
pub(crate) const SETTLE_WAIT: Duration = Duration::from_secs(120);

impl Coordinator {
    /// Make the one agent call of a step: at most once per agent process
    /// (see [`Agents::call_once`]); when the process that got it died
    /// without answering, the domain, once settled, tells whether it took
    /// effect ([`Coordinator::step_done`], `Ok(None)`: it did, and the
    /// step's results are in `rec`); if not, another agent makes it.
    pub(crate) async fn mutate<T, F, Fut>(&self, rec: &mut JobRecord, call: F) -> Result<Option<T>>
    where
        F: Fn(AgentConn, String) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let dom = rec.domain();
        // One disk's short operations go to one agent while it is not
        // busier than others: its locks for the disk are then handed over
        // in the process instead of through etcd.
        let spread = match rec.spec.disk() {
            Some(d) => spread_of(&d.to_string()),
            None => spread_of(&rec.id),
        };
        for _ in 0..4 {
            match self
                .agents
                .call_once(Pick::on(&dom).spread(spread), |c| {
                    call(c, rec.step_request_id())
                })
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
                .with_agent(
                    Pick::on(dom),
                    |c| async move { c.recover(dom, false).await },
                )
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
    pub(crate) async fn step_done(&self, rec: &mut JobRecord) -> Result<bool> {
        self.settle(&rec.domain()).await?;
        let spec = rec.spec.clone();
        spec.kind().done(self, rec).await
    }

    /// Whether a disk the job of `rec` made is on `domain`; records it as
    /// the job's result when it is.
    pub(crate) async fn found_made(&self, rec: &mut JobRecord, domain: uuid::Uuid) -> Result<bool> {
        match self.made_by(&domain, &rec.id).await? {
            Some(t) => {
                rec.made(domain, t.id);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether tag `id` is gone from `domain`.
    pub(crate) async fn gone(&self, domain: &uuid::Uuid, id: &TagId) -> Result<bool> {
        match self.tag(domain, id).await {
            Err(CoordError::NotFound { .. }) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A disk a job made (found by the job id in its tag's options).
    pub(crate) async fn made_by(&self, domain: &uuid::Uuid, job: &str) -> Result<Option<TagInfo>> {
        let d = DomainRef {
            id: *domain,
            name: String::new(),
        };
        let (tags, _) = self.contents(&d).await?;
        Ok(tags.into_iter().find(|t| t.option(JOB_KEY) == Some(job)))
    }

    /// Refuse when the disk is active on any host.
    pub(crate) async fn refuse_active(&self, dom: &uuid::Uuid, disk: &TagId) -> Result<()> {
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
    pub(crate) async fn agent_job<F, Fut>(
        &self,
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
                let rid = rec.step_request_id();
                let started = self
                    .agents
                    .call_once(Pick::on(dom).also(also).spread(spread), |c| {
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
    pub(crate) async fn restart(&self, rec: &mut JobRecord) -> Result<bool> {
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

    pub(crate) async fn cancel_agent_job(&self, rec: &JobRecord) {
        if let Ok(Some(c)) = self.agents.conn_to(&rec.host).await {
            let _ = c.cancel(&rec.agent_job).await;
        }
    }
}

/// A stable spread of work over equal agents.
pub(crate) fn spread_of(s: &str) -> u64 {
    cairn_proto::fingerprint(s.as_bytes())
}
