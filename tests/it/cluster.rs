//! A cluster on one machine: a real etcd on loopback, three agents sharing
//! one domain file, two coordinators; agents and coordinators killed,
//! paused and cut off from etcd while they work.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_agent::pb as apb;
use cairn_coordinator::pb;
use cairn_coordinator::pb::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::agent_harness::*;
use crate::coord_harness::*;
use crate::etcd::Etcd;

const MIB: u64 = 1 << 20;

/// etcd, agents on one domain, coordinators.
pub struct Cluster {
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
    pub domain: PathBuf,
    pub agents: Vec<AgentProc>,
    pub coords: Vec<CoordProc>,
    /// Seconds of every session lease.
    pub ttl: u64,
}

pub fn host_id(n: usize) -> String {
    uuid::Uuid::from_bytes([n as u8 + 1; 16]).to_string()
}

impl Cluster {
    pub fn start(agents: usize, coords: usize) -> Cluster {
        Cluster::start_with_ttl(agents, coords, 3)
    }

    pub fn start_with_ttl(agents: usize, coords: usize, ttl: u64) -> Cluster {
        let etcd = Etcd::start();
        let dir = tempfile::tempdir().unwrap();
        let domain = dir.path().join("domain.img");
        make_named_domain(&domain, 4, "shared");
        let mut c = Cluster {
            etcd,
            dir,
            domain,
            agents: Vec::new(),
            coords: Vec::new(),
            ttl,
        };
        for n in 0..agents {
            let a = c.start_agent(n);
            c.agents.push(a);
        }
        for n in 0..coords {
            let p = c.start_coord(n);
            c.coords.push(p);
        }
        c
    }

    pub fn start_agent(&self, n: usize) -> AgentProc {
        self.start_agent_env(n, &[])
    }

    /// Start agent `n` with more environment variables.
    pub fn start_agent_env(&self, n: usize, env: &[(&str, &str)]) -> AgentProc {
        AgentProc::start_with_env(
            &self.domain,
            &self.dir.path().join(format!("agent{n}")),
            &[
                "--etcd".into(),
                self.etcd.url(),
                "--lease-ttl".into(),
                self.ttl.to_string(),
                "--host-id".into(),
                host_id(n),
                "--host-name".into(),
                format!("host{n}"),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--gc-quarantine".into(),
                "5".into(),
                // Sixteen clients queue on the domain's allocation lock,
                // which etcd does not hand out in order.
                "--lock-timeout".into(),
                "30".into(),
            ],
            env,
        )
    }

    pub fn start_coord(&self, n: usize) -> CoordProc {
        CoordProc::start(
            &self.dir.path().join(format!("coord{n}")),
            &[
                "--etcd".into(),
                self.etcd.url(),
                "--lease-ttl".into(),
                self.ttl.to_string(),
                "--id".into(),
                format!("coord{n}"),
            ],
        )
    }

    /// Wait until coordinator `n` sees `count` agents.
    pub async fn wait_agents(&self, n: usize, count: usize) -> CoordinatorClient<Channel> {
        let mut c = self.coords[n].client().await;
        let t = Instant::now();
        loop {
            let r = c
                .list_agents(pb::ListAgentsRequest {})
                .await
                .unwrap()
                .into_inner();
            if r.agents.iter().filter(|a| a.reachable).count() == count {
                return c;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "agents: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop every process, then check the domain offline.
    pub fn stop_and_check(mut self) {
        self.coords.clear();
        self.agents.clear();
        domain_clean(&self.domain);
    }

    /// The agent serving host `id`.
    pub fn agent_of(&self, id: &str) -> usize {
        (0..self.agents.len())
            .find(|n| host_id(*n) == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }
}

/// A raw disk of `mib` MiB filled with `byte` (written through agent
/// `a`), and the raw file it should read like.
pub async fn filled_disk(
    c: &mut CoordinatorClient<Channel>,
    a: &AgentProc,
    rid: &str,
    mib: u64,
    byte: u8,
    expected: &Path,
) -> String {
    let j = ok(c
        .create_disk(pb::CreateDiskRequest {
            request_id: rid.into(),
            name: rid.into(),
            format: pb::Format::Raw as i32,
            size: mib * MIB,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner());
    let disk = j.disk.unwrap().id;
    expected_file(expected, mib * MIB);
    let mut ac = a.client().await;
    let p = activate(&mut ac, "", &disk).await;
    write_both(&p, expected, 0, mib * MIB, byte);
    deactivate(&mut ac, "", &disk).await;
    disk
}

fn full_clone(rid: &str, source: &str) -> pb::CloneDiskRequest {
    pb::CloneDiskRequest {
        request_id: rid.into(),
        source_id: source.into(),
        name: format!("clone-{rid}"),
        full: true,
        format: pb::Format::Qcow2 as i32,
        ..Default::default()
    }
}

/// Poll a job until an agent works on it and has made progress.
async fn running_on(c: &mut CoordinatorClient<Channel>, id: &str) -> pb::Job {
    running(c, id, true).await
}

/// Poll a job until an agent works on it (and, with `progress`, has made
/// some).
async fn running(c: &mut CoordinatorClient<Channel>, id: &str, progress: bool) -> pb::Job {
    let t = Instant::now();
    loop {
        let j = c
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if !j.host_id.is_empty() && (j.done_bytes > 0 || !progress) {
            return j;
        }
        assert_eq!(j.state, pb::JobState::Running as i32, "{j:?}");
        assert!(t.elapsed() < Duration::from_secs(30), "{j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Cluster locks still held under the domain (host slots of live agents
/// excepted).
async fn held_locks(e: &Etcd) -> Vec<String> {
    {
        let mut c = etcd_client::Client::connect([e.url()], None).await.unwrap();
        let r = c
            .get("cairn/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap();
        r.kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .filter(|k| {
                ["/disk/", "/tag/", "/volume/", "/alloc"]
                    .iter()
                    .any(|p| k.contains(p))
            })
            .collect()
    }
}

#[test]
fn root_etcd_cluster_spreads_work_and_survives_killed_agents_and_coordinators() {
    let mut cl = Cluster::start(3, 2);
    let base = cl.dir.path().to_path_buf();
    let exp = |n: &str| base.join(format!("{n}.expected"));
    rt().block_on(async {
        let mut c0 = cl.wait_agents(0, 3).await;
        let mut c1 = cl.wait_agents(1, 3).await;

        // Work spreads: six full clones at once land on more than one host.
        let src = filled_disk(&mut c0, &cl.agents[0], "src", 64, 0x5a, &exp("src")).await;
        let mut jobs = Vec::new();
        for i in 0..6 {
            let j = c0
                .clone_disk(full_clone(&format!("spread{i}"), &src))
                .await
                .unwrap()
                .into_inner();
            jobs.push(j);
        }
        let mut hosts = std::collections::BTreeSet::new();
        let mut clones = Vec::new();
        for j in jobs {
            let j = ok(finish(c0.clone(), j).await);
            hosts.insert(j.host_id.clone());
            clones.push(j.disk.unwrap().id);
        }
        // The last step's host is cleared when a job ends; the agents'
        // own job lists say who copied.
        let mut copied = std::collections::BTreeSet::new();
        for (n, a) in cl.agents.iter().enumerate() {
            let mut ac = a.client().await;
            let l = ac
                .list_jobs(apb::ListJobsRequest {})
                .await
                .unwrap()
                .into_inner();
            if l.jobs.iter().any(|j| j.kind == "copy") {
                copied.insert(n);
            }
        }
        assert!(copied.len() >= 2, "all six copies ran on {copied:?}");
        let mut a1 = cl.agents[1].client().await;
        check_disk(&mut a1, "", &clones[0], &exp("src")).await;

        // An agent killed in the middle of a copy: the copy starts again on
        // another host, and the disk is whole.
        let big = filled_disk(&mut c0, &cl.agents[0], "big", 384, 0x6b, &exp("big")).await;
        let j = c0
            .clone_disk(full_clone("killed-agent", &big))
            .await
            .unwrap()
            .into_inner();
        let running = running_on(&mut c0, &j.id).await;
        let victim = cl.agent_of(&running.host_id);
        cl.agents[victim].kill();
        let done = ok(finish(c0.clone(), running).await);
        assert!(done.attempts >= 2, "{done:?}");
        let other = (victim + 1) % 3;
        let mut ao = cl.agents[other].client().await;
        check_disk(&mut ao, "", &done.disk.unwrap().id, &exp("big")).await;
        // The killed agent's host slot was recovered without anyone asking,
        // and what it half made is gone.
        let t = Instant::now();
        loop {
            let vols = ao
                .list_volumes(apb::ListVolumesRequest::default())
                .await
                .unwrap()
                .into_inner()
                .volumes;
            if vols
                .iter()
                .all(|v| v.legality == apb::Legality::Legal as i32)
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "half-made volumes stay: {vols:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cl.agents[victim] = cl.start_agent(victim);

        // The coordinator that started a job is killed: the other one
        // takes the job over and finishes it.
        let mut c1b = cl.wait_agents(1, 3).await;
        let j = c0
            .clone_disk(full_clone("killed-coord", &big))
            .await
            .unwrap()
            .into_inner();
        // Its agent job has started (its host and job id are recorded):
        // kill the coordinator at once, before the copy can end (waiting
        // for recorded progress, a second at most, sometimes saw it end
        // first on a loaded machine).
        running(&mut c0, &j.id, false).await;
        cl.coords[0].kill();
        let done = ok(finish(c1.clone(), j).await);
        assert_eq!(done.owner, "coord1", "{done:?}");
        let mut a2 = cl.agents[2].client().await;
        check_disk(&mut a2, "", &done.disk.unwrap().id, &exp("big")).await;

        // Nothing is left locked once the cluster is idle.
        let t = Instant::now();
        loop {
            let held = held_locks(&cl.etcd).await;
            if held.is_empty() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(15), "{held:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let l = c1b
            .list_jobs(pb::ListJobsRequest { running: true })
            .await
            .unwrap()
            .into_inner();
        assert!(l.jobs.is_empty(), "{l:?}");
        c1.list_disks(pb::ListDisksRequest::default())
            .await
            .unwrap();
    });
    cl.stop_and_check();
}

#[test]
fn root_etcd_paused_agent_cannot_write_after_its_lease_and_the_new_holders_writes_survive() {
    let mut cl = Cluster::start(2, 0);
    let exp = cl.dir.path().join("d.expected");
    rt().block_on(async {
        let mut a = cl.agents[0].client().await;
        let mut b = cl.agents[1].client().await;
        // A disk with data, made by A.
        let made = a
            .create_volume(disk_request("d", apb::VolumeFormat::Raw, 384))
            .await
            .unwrap()
            .into_inner();
        let (vol, disk) = (made.volume.unwrap().id, made.tag.unwrap().id);
        expected_file(&exp, 384 * MIB);
        let p = activate(&mut a, "", &disk).await;
        write_both(&p, &exp, 0, 384 * MIB, 0x3c);
        deactivate(&mut a, "", &disk).await;

        // A copies it and its host freezes in the middle.
        let job = a
            .copy_volume(apb::CopyVolumeRequest {
                request_id: "cp".into(),
                volume_id: vol.clone(),
                target: Some(apb::TargetSpec {
                    format: apb::VolumeFormat::Qcow2 as i32,
                    tag: Some(apb::TagSpec {
                        mutable: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let t = Instant::now();
        loop {
            let j = a
                .get_job(apb::GetJobRequest {
                    job_id: job.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if j.done_bytes > 0 {
                break;
            }
            assert_eq!(j.state, apb::JobState::Running as i32, "{j:?}");
            assert!(t.elapsed() < Duration::from_secs(20));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cl.agents[0].signal(libc::SIGSTOP);

        // Once A's lease expired, B recovers A's host slot. The copy A half
        // made stays in quarantine: A may still wake and write into it.
        let t = Instant::now();
        loop {
            let r = b
                .recover_domain(apb::RecoverDomainRequest {
                    domain: String::new(),
                    collect_garbage: true,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(r.volumes_removed.is_empty(), "{r:?}");
            if !r.slots_recovered.is_empty() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // B, the new holder of everything, snapshots the disk and writes.
        b.snapshot(apb::SnapshotRequest {
            request_id: "s".into(),
            tag_id: disk.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let p = activate(&mut b, "", &disk).await;
        write_both(&p, &exp, MIB, MIB, 0x77);
        deactivate(&mut b, "", &disk).await;
        let before = domain_state(&cl.domain);

        // A wakes up: its job fails, and nothing it tries reaches the domain.
        // A knows at once that it lost its host slot for good and stops, so
        // it may be gone before we ask: then it answers nothing at all.
        cl.agents[0].signal(libc::SIGCONT);
        let seen = async {
            let mut s = a
                .watch_job(apb::GetJobRequest {
                    job_id: job.id.clone(),
                })
                .await?
                .into_inner();
            let mut last = None;
            while let Some(j) = s.message().await? {
                last = Some(j);
            }
            Ok::<_, tonic::Status>(last)
        }
        .await;
        match seen {
            Ok(j) => {
                let j = j.expect("a watched job reports at least once");
                assert_eq!(j.state, apb::JobState::Failed as i32, "{j:?}");
                assert_eq!(j.error_code, tonic::Code::Unavailable as i32, "{j:?}");
            }
            Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "A is gone: {e:?}"),
        }
        let e = a
            .create_volume(disk_request("late", apb::VolumeFormat::Raw, 8))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        let e = a
            .snapshot(apb::SnapshotRequest {
                request_id: "late-s".into(),
                tag_id: disk.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        // It knows it lost its host slot for good: it stops by itself (so
        // that its service manager starts it again), and on the way out it
        // leaves the slot alone (regression: it marked the slot free, over
        // B's recovery).
        let st = tokio::task::block_in_place(|| cl.agents[0].wait_exit(Duration::from_secs(15)));
        assert!(st.is_some_and(|s| !s.success()), "{st:?}");
        assert!(
            before == domain_state(&cl.domain),
            "the paused agent changed the domain"
        );
        // What B wrote is intact.
        check_disk(&mut b, "", &disk, &exp).await;
        // After the quarantine, the half-made copy goes.
        let t = Instant::now();
        loop {
            let r = b
                .recover_domain(apb::RecoverDomainRequest {
                    domain: String::new(),
                    collect_garbage: true,
                })
                .await
                .unwrap()
                .into_inner();
            if !r.volumes_removed.is_empty() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Started again, it rejoins.
    cl.agents[0] = cl.start_agent(0);
    rt().block_on(async {
        let mut a = cl.agents[0].client().await;
        a.create_volume(disk_request("back", apb::VolumeFormat::Raw, 8))
            .await
            .unwrap();
    });
    cl.stop_and_check();
}

#[test]
fn root_etcd_sixteen_disks_are_not_serialized_and_one_disk_is() {
    let cl = Cluster::start(3, 1);
    let exp = cl.dir.path().join("d0.expected");
    rt().block_on(async {
        let mut c = cl.wait_agents(0, 3).await;
        // Disk 0 gets a long conversion; fifteen others get snapshots.
        let d0 = filled_disk(&mut c, &cl.agents[0], "d0", 768, 0x42, &exp).await;
        let mut others = Vec::new();
        for i in 1..16 {
            let j = ok(c
                .create_disk(pb::CreateDiskRequest {
                    request_id: format!("d{i}"),
                    format: pb::Format::Raw as i32,
                    size: 8 * MIB,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner());
            others.push(j.disk.unwrap().id);
        }
        let conv = c
            .convert_disk(pb::ConvertDiskRequest {
                request_id: "conv".into(),
                disk_id: d0.clone(),
                format: pb::Format::Qcow2 as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        running(&mut c, &conv.id, false).await;
        // A second client on disk 0 waits for the conversion.
        let mut c0 = c.clone();
        let (d0b, conv_id) = (d0.clone(), conv.id.clone());
        let second = tokio::spawn(async move {
            let s = ok(c0
                .snapshot_disk(pb::SnapshotDiskRequest {
                    request_id: "s-d0".into(),
                    disk_id: d0b,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner());
            let conv = c0
                .get_job(pb::GetJobRequest { job_id: conv_id })
                .await
                .unwrap()
                .into_inner();
            (s, conv)
        });
        // Fifteen clients on their own disks are not held up by it: their
        // snapshots are done while the conversion still runs.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (i, d) in others.iter().enumerate() {
            let (mut ci, d, tx) = (c.clone(), d.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                for k in 0..5 {
                    ok(ci
                        .snapshot_disk(pb::SnapshotDiskRequest {
                            request_id: format!("s{i}-{k}"),
                            disk_id: d.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner());
                    let _ = tx.send(());
                }
            }));
        }
        for _ in 0..15 {
            rx.recv().await.unwrap();
        }
        let during = c
            .get_job(pb::GetJobRequest {
                job_id: conv.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            during.state,
            pb::JobState::Running as i32,
            "15 snapshots of other disks waited for disk 0's conversion"
        );
        for t in tasks {
            t.await.unwrap();
        }
        let (snap, conv_then) = second.await.unwrap();
        assert_eq!(
            conv_then.state,
            pb::JobState::Succeeded as i32,
            "the snapshot of disk 0 ran before its conversion ended"
        );
        // Both happened, in order: a qcow2 base (the conversion) under
        // the snapshot's layer, and the data as written.
        let v = c
            .get_disk(pb::GetDiskRequest {
                domain: String::new(),
                disk_id: d0.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.chain.len(), 2, "{v:?}");
        assert_eq!(v.chain[0].format, pb::Format::Qcow2 as i32);
        assert_eq!(v.snapshots.len(), 1);
        assert_eq!(v.snapshots[0].id, snap.snapshot_id);
        let mut a = cl.agents[1].client().await;
        check_disk(&mut a, "", &d0, &exp).await;
        for d in &others {
            let v = c
                .get_disk(pb::GetDiskRequest {
                    domain: String::new(),
                    disk_id: d.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(v.snapshots.len(), 5, "{v:?}");
        }
    });
    cl.stop_and_check();
}

#[test]
fn root_etcd_stopped_and_restarted_mid_run_loses_nothing_and_work_resumes() {
    let mut cl = Cluster::start_with_ttl(2, 1, 8);
    rt().block_on(async {
        let mut c = cl.wait_agents(0, 2).await;
        let mut disks = Vec::new();
        for i in 0..3 {
            let j = ok(c
                .create_disk(pb::CreateDiskRequest {
                    request_id: format!("before{i}"),
                    format: pb::Format::Raw as i32,
                    size: 8 * MIB,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner());
            let d = j.disk.unwrap().id;
            ok(c.snapshot_disk(pb::SnapshotDiskRequest {
                request_id: format!("snap{i}"),
                disk_id: d.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner());
            disks.push(d);
        }
        let before = domain_state(&cl.domain);
        cl.etcd.stop();
        // While it is down, operations fail cleanly and change nothing.
        let e = c
            .create_disk(pb::CreateDiskRequest {
                request_id: "during".into(),
                format: pb::Format::Raw as i32,
                size: 8 * MIB,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        let mut a = cl.agents[0].client().await;
        let e = a
            .create_volume(disk_request("during-agent", apb::VolumeFormat::Raw, 8))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(
            before == domain_state(&cl.domain),
            "a write got through without etcd"
        );
        // (Its harness runs a runtime of its own: not on this one's thread.)
        std::thread::scope(|s| s.spawn(|| cl.etcd.start_again()).join().unwrap());
        // Work resumes once it is back.
        let t = Instant::now();
        let made = loop {
            match c
                .create_disk(pb::CreateDiskRequest {
                    request_id: "after".into(),
                    format: pb::Format::Raw as i32,
                    size: 8 * MIB,
                    ..Default::default()
                })
                .await
            {
                Ok(j) if j.get_ref().state == pb::JobState::Succeeded as i32 => {
                    break j.into_inner()
                }
                r => {
                    assert!(t.elapsed() < Duration::from_secs(30), "{r:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        ok(c.snapshot_disk(pb::SnapshotDiskRequest {
            request_id: "snap-after".into(),
            disk_id: made.disk.unwrap().id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner());
        // Nothing committed before was lost.
        let listed = c
            .list_disks(pb::ListDisksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .disks;
        for d in &disks {
            let v = listed.iter().find(|x| &x.id == d).expect("disk kept");
            assert_eq!(v.snapshots.len(), 1);
        }
        assert_eq!(listed.len(), 4);
    });
    cl.stop_and_check();
}

/// What a disk is, as far as "before or after an operation" goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiskState {
    size: u64,
    format: i32,
    snapshots: std::collections::BTreeSet<String>,
}

type State = std::collections::BTreeMap<String, DiskState>;

async fn state(c: &mut CoordinatorClient<Channel>) -> State {
    let r = c
        .list_disks(pb::ListDisksRequest::default())
        .await
        .unwrap()
        .into_inner();
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
        let rid = rid.to_string();
        let r = match self.clone() {
            LoopOp::Create { size } => {
                c.create_disk(pb::CreateDiskRequest {
                    request_id: rid.clone(),
                    name: rid,
                    format: pb::Format::Qcow2 as i32,
                    size,
                    ..Default::default()
                })
                .await
            }
            LoopOp::Snapshot { disk } => {
                c.snapshot_disk(pb::SnapshotDiskRequest {
                    request_id: rid,
                    disk_id: disk,
                    ..Default::default()
                })
                .await
            }
            LoopOp::CloneSnapshot { snapshot } => {
                c.clone_disk(pb::CloneDiskRequest {
                    request_id: rid.clone(),
                    source_id: snapshot,
                    name: rid,
                    ..Default::default()
                })
                .await
            }
            LoopOp::Extend { disk, size } => {
                c.extend_disk(pb::ExtendDiskRequest {
                    request_id: rid,
                    disk_id: disk,
                    size,
                    ..Default::default()
                })
                .await
            }
            LoopOp::DeleteSnapshot { snapshot, .. } => {
                c.delete_snapshot(pb::DeleteSnapshotRequest {
                    request_id: rid,
                    snapshot_id: snapshot,
                    ..Default::default()
                })
                .await
            }
            LoopOp::Delete { disk } => {
                c.delete_disk(pb::DeleteDiskRequest {
                    request_id: rid,
                    disk_id: disk,
                    ..Default::default()
                })
                .await
            }
            LoopOp::FullClone { disk } => c.clone_disk(full_clone(&rid, &disk)).await,
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
fn root_etcd_slow_sigkill_loop_leaves_every_disk_before_or_after() {
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
                .unwrap()
                .into_inner()
                .jobs;
            let held = held_locks(&cl.etcd).await;
            let mut a = cl.agents[0].client().await;
            let vols = a
                .list_volumes(apb::ListVolumesRequest::default())
                .await
                .unwrap()
                .into_inner()
                .volumes;
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
