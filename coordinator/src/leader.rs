//! Leadership and the leader's duties. Every replica serves requests; the
//! one holding the leader lock (a key under its etcd session, or a lock
//! file on one host) also, every round:
//!
//! - recovers the journals of hosts whose lease expired, on every domain,
//!   through an agent that sees it (the agent waits out the safety margin
//!   before it replays anything), and collects the volumes such hosts half
//!   made (for a while after a host leaves, and every 30 s);
//! - on the same rounds, reclaims volumes that no tag reaches (a tag deleted
//!   without its chain, a bare volume left behind) once they stayed so,
//!   unchanged, for the orphan quarantine (an hour by default): nothing
//!   can reach such a volume again but a new tag on it, which restarts its
//!   clock;
//! - on the same rounds, removes image caches no disk uses whose image is
//!   no longer registered from the file version they copy;
//! - takes over the running jobs of coordinators that are gone.
//!
//! A leader that cannot confirm its lease stops leading before the lease
//! could expire, as any lock holder does.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_domain::lock::{Resource, ResourceKind};
use cairn_domain::LockGuard;

use crate::agents::Pick;
use crate::coordinator::Coordinator;
use crate::error::{CoordError, Result};
use crate::plan::{DomainRef, TagInfo, VolumeInfo};
use crate::record::JobState;

/// The store prefix under which live replicas register.
pub const REPLICAS: &str = "cairn/coordinators/";

/// The leader lock.
pub fn leader_resource() -> Resource {
    Resource {
        domain: uuid::Uuid::nil(),
        kind: ResourceKind::Named("coordinator-leader".into()),
    }
}

/// What one round of duties did.
#[derive(Debug, Default, Clone)]
pub struct Round {
    /// Host slots recovered, by domain.
    pub recovered: Vec<(uuid::Uuid, Vec<u32>)>,
    /// Half-made volumes removed.
    pub removed: usize,
    /// Volumes nothing reached, reclaimed.
    pub reclaimed: usize,
    /// Jobs taken over.
    pub adopted: Vec<String>,
    /// Records of jobs that ended longer ago than the retention, removed.
    pub expired: usize,
}

/// Run the leader loop until `stop` fires: campaign, and while leading,
/// do the duties every `every`.
pub async fn run(
    coord: Arc<Coordinator>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut lead: Option<LockGuard> = None;
    let mut last_gc = Instant::now() - Duration::from_secs(3600);
    // Hosts seen last round; when one leaves, collect garbage for a while
    // (its journal is recovered once its lease expires, by us or by the
    // next transaction of another host).
    let mut hosts: HashSet<String> = HashSet::new();
    let mut gc_rounds = 0u32;
    let mut scanned: Option<JobScan> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        if let Some(g) = &lead {
            if let Err(e) = g.check() {
                tracing::warn!(error = %e, "lost the leadership");
                lead = None;
            }
        }
        if lead.is_none() {
            let locks = coord.locks().clone();
            let r = tokio::task::spawn_blocking(move || {
                locks.acquire(&leader_resource(), Duration::ZERO)
            })
            .await;
            if let Ok(Ok(g)) = r {
                tracing::info!(id = %coord.id(), "leading");
                lead = Some(g);
                // A new leader looks at every job at once.
                scanned = None;
            }
        }
        if let Ok(now) = coord.agents.list().await {
            let now: HashSet<String> = now.into_iter().map(|a| a.host_id).collect();
            if hosts.iter().any(|h| !now.contains(h)) {
                gc_rounds = 20;
            }
            hosts = now;
        }
        if lead.is_some() {
            // Every 30 s, or as often as the orphan quarantine is short.
            let every_gc = Duration::from_secs(30).min(coord.cfg.orphan_quarantine);
            let gc = gc_rounds > 0 || last_gc.elapsed() >= every_gc;
            gc_rounds = gc_rounds.saturating_sub(1);
            match duties(&coord, gc, &mut scanned).await {
                Ok(r) => {
                    if gc {
                        last_gc = Instant::now();
                    }
                    if !r.recovered.is_empty()
                        || r.removed > 0
                        || r.reclaimed > 0
                        || !r.adopted.is_empty()
                        || r.expired > 0
                    {
                        tracing::info!(?r, "leader duties");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "leader duties failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Delete the volumes of `d` (its contents: `tags`, `vols`) that nothing
/// reached for the quarantine; how many went. A volume an agent refuses
/// to delete (active, locked) stays, and is tried again on a later round.
async fn reclaim_unreached(
    coord: &Arc<Coordinator>,
    d: &DomainRef,
    tags: &[TagInfo],
    vols: &[VolumeInfo],
) -> usize {
    let due = crate::plan::reclaimable(
        &mut coord.unreached.lock().expect("poisoned"),
        d.id,
        tags,
        vols,
        crate::coordinator::now(),
        coord.cfg.orphan_quarantine.as_secs(),
    );
    let mut n = 0;
    for v in due {
        let gen = vols.iter().find(|x| x.id == v).map(|x| x.generation);
        let rid = format!("gc-{v}-{}", gen.unwrap_or(0));
        let r = coord
            .agents
            .with_agent(Pick::on(&d.id), |c| {
                let rid = rid.clone();
                async move { c.delete_volume(&rid, &d.id, &v).await }
            })
            .await;
        match r {
            Ok(()) => {
                tracing::warn!(domain = %d.id, volume = %v, "reclaimed a volume no tag reached");
                coord.unreached.lock().expect("poisoned").remove(&(d.id, v));
                n += 1;
            }
            Err(e) => {
                tracing::info!(domain = %d.id, volume = %v, error = %e, "an unreached volume stays")
            }
        }
    }
    n
}

/// When the leader last read every job, and which replicas were live then.
pub struct JobScan {
    live: HashSet<String>,
    at: Instant,
}

/// How often the leader reads every job even when no replica left.
const JOB_SCAN_EVERY: Duration = Duration::from_secs(30);

/// One round of the leader's duties (`gc`: also collect garbage). Jobs are
/// read (to adopt orphans) only when a replica left since the last read,
/// on the first round, and every 30 s: reading them all is the costly part
/// once many jobs are kept.
pub async fn duties(
    coord: &Arc<Coordinator>,
    gc: bool,
    scanned: &mut Option<JobScan>,
) -> Result<Round> {
    let mut round = Round::default();
    let agents = coord.agents.list().await?;
    let mut doms: Vec<DomainRef> = agents.iter().flat_map(|a| a.domains.clone()).collect();
    doms.sort_by_key(|d| d.id);
    doms.dedup_by_key(|d| d.id);
    for d in doms {
        let r = coord
            .agents
            .with_agent(Pick::on(&d.id).spread(0), |c| async move {
                c.recover(&d.id, gc).await
            })
            .await;
        match r {
            Ok(r) => {
                if !r.slots.is_empty() {
                    tracing::warn!(domain = %d.id, slots = ?r.slots, forward = r.forward,
                        back = r.back, "recovered dead hosts' journals");
                    round.recovered.push((d.id, r.slots));
                }
                round.removed += r.removed.len();
            }
            Err(e) => tracing::warn!(domain = %d.id, error = %e, "could not recover the domain"),
        }
        if gc {
            match coord.contents(&d).await {
                Ok((tags, vols)) => {
                    round.reclaimed += reclaim_unreached(coord, &d, &tags, &vols).await;
                    match coord.reclaim_image_caches(&d, &tags).await {
                        Ok(n) => round.reclaimed += n,
                        Err(e) => {
                            tracing::warn!(domain = %d.id, error = %e, "could not look for unused image caches")
                        }
                    }
                    if let Err(e) = coord.merge_image_snapshots(&d, &tags).await {
                        tracing::warn!(domain = %d.id, error = %e, "could not merge snapshots image jobs left");
                    }
                }
                Err(e) => {
                    tracing::warn!(domain = %d.id, error = %e, "could not look for unreached volumes")
                }
            }
        }
    }
    // Jobs whose owner no longer registers.
    let kv = coord.kv().clone();
    let live: HashSet<String> = tokio::task::spawn_blocking(move || kv.list(REPLICAS))
        .await
        .map_err(|e| CoordError::Internal(e.to_string()))??
        .into_iter()
        .map(|(k, _)| k.trim_start_matches(REPLICAS).to_string())
        .collect();
    let due = match scanned.as_ref() {
        None => true,
        Some(s) => s.at.elapsed() >= JOB_SCAN_EVERY || s.live.iter().any(|r| !live.contains(r)),
    };
    if !due {
        return Ok(round);
    }
    let now = crate::coordinator::now();
    let keep = coord.job_retention().as_secs();
    for j in coord.jobs().await? {
        if j.state != JobState::Running {
            // Ended: kept for a while for whoever asks, then removed, so
            // that the store does not grow without end.
            if j.finished > 0 && now.saturating_sub(j.finished) > keep {
                match coord.forget_job(&j.id).await {
                    Ok(_) => round.expired += 1,
                    Err(e) => {
                        tracing::warn!(job = %j.id, error = %e, "could not remove an old job")
                    }
                }
            }
            continue;
        }
        if live.contains(&j.owner) || coord.runs(&j.id) {
            continue;
        }
        let id = j.id.clone();
        match coord.adopt(j).await {
            Ok(()) => round.adopted.push(id),
            Err(e) => tracing::warn!(job = %id, error = %e, "could not adopt a job"),
        }
    }
    *scanned = Some(JobScan {
        live,
        at: Instant::now(),
    });
    Ok(round)
}
