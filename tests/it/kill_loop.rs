//! Killing processes at random moments: agents and coordinators of a
//! cluster on one machine SIGKILLed in a loop while clients keep asking,
//! every disk left as it was before its operation or as it is after; and
//! agents that die right after their commit, before they answer.

use std::time::{Duration, Instant};

use cairn_agent::pb as apb;
use cairn_coordinator::pb;
use cairn_coordinator::pb::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use cairn_tests::agent::*;
use cairn_tests::ask::{coord, AgentCalls};
use cairn_tests::cluster::*;
use cairn_tests::coordinator::*;
use cairn_tests::Answer;

/// What a disk is, as far as "before or after an operation" goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiskState {
    size: u64,
    format: i32,
    snapshots: std::collections::BTreeSet<String>,
}

type State = std::collections::BTreeMap<String, DiskState>;

async fn state(c: &mut CoordinatorClient<Channel>) -> State {
    let r = c.list_disks(pb::ListDisksRequest::default()).await.answer();
    r.disks
        .into_iter()
        .map(|d| {
            (
                d.id,
                DiskState {
                    size: d.size,
                    format: d.format,
                    snapshots: d.snapshots.into_iter().map(|s| s.id).collect(),
                },
            )
        })
        .collect()
}

/// One operation of the loop.
#[derive(Debug, Clone)]
enum LoopOp {
    Create { size: u64 },
    Snapshot { disk: String },
    CloneSnapshot { snapshot: String },
    Extend { disk: String, size: u64 },
    DeleteSnapshot { disk: String, snapshot: String },
    Delete { disk: String },
    FullClone { disk: String },
}

impl LoopOp {
    async fn send(
        &self,
        c: &mut CoordinatorClient<Channel>,
        rid: &str,
    ) -> Result<pb::Job, tonic::Status> {
        let r = match self.clone() {
            LoopOp::Create { size } => {
                c.create_disk(coord::create(rid, rid, pb::Format::Qcow2, size))
                    .await
            }
            LoopOp::Snapshot { disk } => c.snapshot_disk(coord::snapshot(rid, "", &disk)).await,
            LoopOp::CloneSnapshot { snapshot } => {
                c.clone_disk(coord::clone(rid, "", &snapshot, rid)).await
            }
            LoopOp::Extend { disk, size } => {
                c.extend_disk(coord::extend(rid, "", &disk, size)).await
            }
            LoopOp::DeleteSnapshot { snapshot, .. } => {
                c.delete_snapshot(coord::delete_snapshot(rid, "", &snapshot))
                    .await
            }
            LoopOp::Delete { disk } => c.delete_disk(coord::delete(rid, "", &disk)).await,
            LoopOp::FullClone { disk } => c.clone_disk(full_clone(rid, &disk)).await,
        };
        r.map(|r| r.into_inner())
    }

    /// The state after this operation succeeded as `job` says.
    /// (A thin clone's size is its snapshot's, taken from `seen`.)
    fn after(&self, before: &State, job: &pb::Job, seen: &State) -> State {
        let mut s = before.clone();
        let made = || job.disk.as_ref().expect("a job's disk").id.clone();
        let fresh = |size, format| DiskState {
            size,
            format,
            snapshots: Default::default(),
        };
        match self {
            LoopOp::Create { size } => {
                s.insert(made(), fresh(*size, pb::Format::Qcow2 as i32));
            }
            LoopOp::Snapshot { disk } => {
                let d = s.get_mut(disk).expect("the disk");
                assert!(!job.snapshot_id.is_empty(), "{job:?}");
                d.snapshots.insert(job.snapshot_id.clone());
            }
            LoopOp::CloneSnapshot { snapshot } => {
                assert!(before.values().any(|d| d.snapshots.contains(snapshot)));
                let size = seen.get(&made()).map(|d| d.size).unwrap_or_default();
                s.insert(made(), fresh(size, pb::Format::Qcow2 as i32));
            }
            LoopOp::Extend { disk, size } => {
                s.get_mut(disk).expect("the disk").size = *size;
            }
            LoopOp::DeleteSnapshot { disk, snapshot } => {
                s.get_mut(disk)
                    .expect("the disk")
                    .snapshots
                    .remove(snapshot);
            }
            LoopOp::Delete { disk } => {
                s.remove(disk);
            }
            LoopOp::FullClone { disk } => {
                let size = before[disk].size;
                s.insert(made(), fresh(size, pb::Format::Qcow2 as i32));
            }
        }
        s
    }
}

/// A small deterministic generator (the seed is printed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Send `op` to coordinator `n`; when that coordinator dies under it, send
/// the same request (same id) to the other until one answers.
async fn send_until_answered(cl: &Cluster, n: usize, op: &LoopOp, rid: &str) -> pb::Job {
    let t = Instant::now();
    let mut at = n;
    loop {
        if let Ok(mut c) =
            tokio::time::timeout(Duration::from_secs(2), cl.coords[at].client()).await
        {
            match op.send(&mut c, rid).await {
                Ok(j) => return j,
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) => {}
                // A definite refusal is an answer too.
                Err(s) => {
                    return pb::Job {
                        state: pb::JobState::Failed as i32,
                        error_message: format!("refused: {s:?}"),
                        ..Default::default()
                    }
                }
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no coordinator answers {rid}"
        );
        at = 1 - at;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follow a job (on whichever coordinator answers) until it ends.
async fn job_end(cl: &Cluster, job: pb::Job) -> pb::Job {
    if job.id.is_empty() || job.state != pb::JobState::Running as i32 {
        return job;
    }
    let t = Instant::now();
    let mut at = 0;
    loop {
        if let Ok(mut c) =
            tokio::time::timeout(Duration::from_secs(2), cl.coords[at].client()).await
        {
            if let Ok(j) = c
                .get_job(pb::GetJobRequest {
                    job_id: job.id.clone(),
                })
                .await
            {
                let j = j.into_inner();
                if j.state != pb::JobState::Running as i32 {
                    return j;
                }
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "job {} never ended",
            job.id
        );
        at = 1 - at;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn root_etcd_qemu_slow_sigkill_loop_leaves_every_disk_before_or_after() {
    let mut cl = Cluster::start(3, 2);
    let seed = std::env::var("CAIRN_LOOP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let rounds: usize = std::env::var("CAIRN_LOOP_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    eprintln!("kill loop: seed {seed} (CAIRN_LOOP_SEED), {rounds} rounds");
    let mut rng = Lcg(seed);
    rt().block_on(async {
        let mut c = cl.wait_agents(0, 3).await;
        cl.wait_agents(1, 3).await;
        for i in 0..3 {
            let d = ok(LoopOp::Create { size: 32 * MIB }
                .send(&mut c, &format!("seed-disk{i}"))
                .await
                .unwrap());
            ok(LoopOp::Snapshot {
                disk: d.disk.unwrap().id,
            }
            .send(&mut c, &format!("seed-snap{i}"))
            .await
            .unwrap());
        }
        let mut next_coord_victim = 0;
        let (mut succeeded, mut failed, mut retried, mut hits) = (0, 0, 0, 0);
        for round in 0..rounds {
            let mut c = cl.coords[0].client().await;
            let before = state(&mut c).await;
            let disks: Vec<&String> = before.keys().collect();
            let disk = disks[rng.next(disks.len() as u64) as usize].clone();
            let d = &before[&disk];
            let snap = d.snapshots.iter().next().cloned();
            let op = match (rng.next(7), snap) {
                (0, _) => LoopOp::Create { size: 16 * MIB },
                (2, Some(s)) => LoopOp::CloneSnapshot { snapshot: s },
                (3, _) => LoopOp::Extend {
                    disk: disk.clone(),
                    size: d.size + 16 * MIB,
                },
                (4, Some(s)) => LoopOp::DeleteSnapshot {
                    disk: disk.clone(),
                    snapshot: s,
                },
                (5, _) if before.len() > 3 && d.snapshots.is_empty() => LoopOp::Delete {
                    disk: disk.clone(),
                },
                (6, _) => LoopOp::FullClone { disk: disk.clone() },
                _ => LoopOp::Snapshot { disk: disk.clone() },
            };
            let rid = format!("loop{round}");
            // The victim: an agent (two times in three) or a coordinator
            // (in turn, so that from the second on it is the leader).
            let kill_agent = rng.next(3) < 2;
            let target = rng.next(2) as usize;
            let delay = Duration::from_millis(rng.next(40));
            eprintln!("round {round}: {op:?}, kill {} after {delay:?}", if kill_agent { "an agent" } else { "a coordinator" });
            let client = cl.coords[target].client().await;
            let mut probes = Vec::new();
            for a in &cl.agents {
                probes.push(a.client().await);
            }
            let op2 = op.clone();
            let rid2 = rid.clone();
            let call = tokio::spawn(async move {
                let mut client = client;
                op2.send(&mut client, &rid2).await
            });
            if kill_agent {
                // The agent doing the work: for a short operation the one
                // whose request log shows the job's call running (caught
                // in the middle), for a long one the job's host.
                let job_id = cairn_coordinator::runner::job_id(&rid);
                let long = matches!(op, LoopOp::FullClone { .. } | LoopOp::DeleteSnapshot { .. });
                let probe = format!("{job_id}:Call:1");
                let mut victim = None;
                let t = Instant::now();
                while victim.is_none() && t.elapsed() < Duration::from_millis(400) {
                    if long {
                        if let Ok(j) = cl.coords[target]
                            .client()
                            .await
                            .get_job(pb::GetJobRequest { job_id: job_id.clone() })
                            .await
                        {
                            let j = j.into_inner();
                            if !j.host_id.is_empty() {
                                victim = Some(cl.agent_of(&j.host_id));
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    for (n, p) in probes.iter_mut().enumerate() {
                        let r = p
                            .get_request(apb::GetRequestRequest {
                                request_id: probe.clone(),
                            })
                            .await;
                        if r.is_ok_and(|r| r.into_inner().state == apb::RequestState::Running as i32) {
                            victim = Some(n);
                            break;
                        }
                    }
                }
                if victim.is_some() {
                    hits += 1;
                } else {
                    tokio::time::sleep(delay).await;
                }
                let n = victim.unwrap_or(rng.next(3) as usize);
                eprintln!("  killing agent {n} ({})", if victim.is_some() { "mid-call" } else { "at random" });
                cl.agents[n].signal(libc::SIGKILL);
                cl.agents[n].kill();
                cl.agents[n] = cl.start_agent(n);
            } else {
                tokio::time::sleep(delay).await;
                let n = next_coord_victim;
                next_coord_victim = 1 - n;
                cl.coords[n].kill();
                cl.coords[n] = cl.start_coord(n);
            }
            let job = match call.await.unwrap() {
                Ok(j) => j,
                Err(_) => send_until_answered(&cl, 1 - target, &op, &rid).await,
            };
            let job = job_end(&cl, job).await;
            // Wait until every agent is back before looking.
            let mut c = cl.wait_agents(0, 3).await;
            let after = state(&mut c).await;
            if job.attempts > 1 {
                retried += 1;
            }
            if job.state == pb::JobState::Succeeded as i32 {
                succeeded += 1;
                assert_eq!(after, op.after(&before, &job, &after), "round {round}: {op:?} succeeded as {job:?}, but the disks are not as after it");
            } else {
                failed += 1;
                assert_eq!(after, before, "round {round}: {op:?} failed as {job:?}, but the disks changed");
            }
        }
        eprintln!("kill loop: {succeeded} succeeded, {failed} failed (disks as before), {retried} needed another attempt; {hits} agents killed in the middle of their call");
        assert!(succeeded > rounds / 2, "most operations finish despite the kills");

        // Idle: no job running, no lock held, nothing half made.
        let mut c = cl.wait_agents(0, 3).await;
        let t = Instant::now();
        loop {
            let running = c
                .list_jobs(pb::ListJobsRequest { running: true })
                .await
                .answer()
                .jobs;
            let held = held_locks(&cl.etcd).await;
            let mut a = cl.agents[0].client().await;
            let vols = a
                .volumes().await;
            let half: Vec<_> = vols
                .iter()
                .filter(|v| v.legality != apb::Legality::Legal as i32)
                .collect();
            if running.is_empty() && held.is_empty() && half.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "running {running:?}, held {held:?}, half-made {half:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Every disk's chain is a sound qcow2 chain.
        let mut a = cl.agents[0].client().await;
        for (id, _) in state(&mut c).await {
            let p = activate(&mut a, "", &id).await;
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&p)
                .output()
                .unwrap();
            assert!(out.status.success(), "disk {id}: {}", String::from_utf8_lossy(&out.stdout));
            deactivate(&mut a, "", &id).await;
        }
    });
    cl.stop_and_check();
}

/// Agents that die right after their change is committed, before they
/// answer: the coordinator learns from the domain that the call took
/// effect and does not make it again (one snapshot, one disk), and the
/// jobs succeed with what the dead agent made.
#[test]
fn root_etcd_agent_dying_after_its_commit_is_not_asked_twice() {
    let mut cl = Cluster::start(0, 1);
    let fault = cairn_agent::service::FAULT_ENV;
    let both = [(fault, "snapshot,create_volume")];
    for n in 0..3 {
        let a = cl.start_agent_env(n, &both);
        cl.agents.push(a);
    }
    rt().block_on(async {
        let mut c = cl.wait_agents(0, 3).await;
        // Create, then snapshot: whichever agent makes them dies after its
        // commit, before it answers.
        let dead_after = |cl: &mut Cluster| -> usize {
            let dead: Vec<usize> = (0..3)
                .filter(|n| {
                    cl.agents[*n]
                        .wait_exit(Duration::from_millis(10))
                        .is_some_and(|s| s.code() == Some(137))
                })
                .collect();
            assert_eq!(dead.len(), 1, "one agent made it and died");
            let n = dead[0];
            cl.agents[n] = cl.start_agent_env(n, &both);
            n
        };
        let before = state(&mut c).await;
        let d = ok(LoopOp::Create { size: 16 * MIB }
            .send(&mut c, "base")
            .await
            .unwrap());
        dead_after(&mut cl);
        assert_eq!(d.attempts, 1, "not made again: {d:?}");
        let disk = d.disk.unwrap().id;
        let mut c = cl.wait_agents(0, 3).await;
        let after = state(&mut c).await;
        assert_eq!(after.len(), before.len() + 1, "exactly one disk");
        assert_eq!(after[&disk].size, 16 * MIB);

        let j = ok(LoopOp::Snapshot { disk: disk.clone() }
            .send(&mut c, "snap-dies")
            .await
            .unwrap());
        dead_after(&mut cl);
        assert_eq!(j.attempts, 1, "not made again: {j:?}");
        let s = state(&mut c).await;
        assert_eq!(
            s[&disk].snapshots.iter().collect::<Vec<_>>(),
            [&j.snapshot_id],
            "exactly the one snapshot the dead agent made"
        );
    });
    cl.stop_and_check();
}
