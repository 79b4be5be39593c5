//! Failover on a cluster on one machine (a real etcd on loopback, three
//! agents sharing one domain file, two coordinators): agents and
//! coordinators killed, paused and cut off from etcd while they work.

use std::time::{Duration, Instant};

use cairn_agent::pb as apb;
use cairn_coordinator::pb;
use cairn_coordinator::pb::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use cairn_tests::agent::*;
use cairn_tests::ask::{self, coord, AgentCalls, CoordCalls};
use cairn_tests::cluster::*;
use cairn_tests::coordinator::*;
use cairn_tests::data::*;
use cairn_tests::domain::*;
use cairn_tests::Answer;

/// Poll a job until an agent works on it. Not until it has made progress:
/// that is recorded at most every 500 ms, and a fast copy ends first.
async fn running(c: &mut CoordinatorClient<Channel>, id: &str) -> pb::Job {
    let t = Instant::now();
    loop {
        let j = c.job_now(id).await;
        if !j.host_id.is_empty() {
            return j;
        }
        assert_eq!(j.state, pb::JobState::Running as i32, "{j:?}");
        assert!(t.elapsed() < Duration::from_secs(30), "{j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Recover the domain (collecting garbage) through `b` every 200 ms until
/// `done` says so, for at most 30 s.
async fn recover_until(
    b: &mut apb::agent_client::AgentClient<Channel>,
    mut done: impl FnMut(&apb::RecoverDomainResponse) -> bool,
) {
    let t = Instant::now();
    loop {
        let req = apb::RecoverDomainRequest {
            domain: String::new(),
            collect_garbage: true,
        };
        if done(&b.recover_domain(req).await.answer()) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn root_etcd_qemu_cluster_spreads_work_and_survives_killed_agents_and_coordinators() {
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
                .answer();
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
            let l = ac.list_jobs(apb::ListJobsRequest {}).await.answer();
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
            .answer();
        let running = running(&mut c0, &j.id).await;
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
            let vols = ao.volumes().await;
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
            .answer();
        // Its agent job has started (its host and job id are recorded):
        // kill the coordinator at once, before the copy can end (waiting
        // for recorded progress, a second at most, sometimes saw it end
        // first on a loaded machine).
        self::running(&mut c0, &j.id).await;
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
            .answer();
        assert!(l.jobs.is_empty(), "{l:?}");
        c1.list_disks(pb::ListDisksRequest::default())
            .await
            .unwrap();
    });
    cl.stop_and_check();
}

#[test]
fn root_etcd_qemu_paused_agent_cannot_write_after_its_lease_and_the_new_holders_writes_survive() {
    let mut cl = Cluster::start(2, 0);
    let exp = cl.dir.path().join("d.expected");
    rt().block_on(async {
        let mut a = cl.agents[0].client().await;
        let mut b = cl.agents[1].client().await;
        // A disk with data, made by A.
        let made = a
            .create_volume(disk_request("d", apb::VolumeFormat::Raw, 384))
            .await
            .answer();
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
            .answer();
        let t = Instant::now();
        loop {
            let j = a.job_now(&job.id).await;
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
        recover_until(&mut b, |r| {
            assert!(r.volumes_removed.is_empty(), "{r:?}");
            !r.slots_recovered.is_empty()
        })
        .await;
        // B, the new holder of everything, snapshots the disk and writes.
        b.snapshot(ask::snapshot("s", &disk)).await.unwrap();
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
            Err(e) => fenced_or_gone(&e),
        }
        let e = a
            .create_volume(disk_request("late", apb::VolumeFormat::Raw, 8))
            .await
            .unwrap_err();
        fenced_or_gone(&e);
        let e = a
            .snapshot(ask::snapshot("late-s", &disk))
            .await
            .unwrap_err();
        fenced_or_gone(&e);
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
        recover_until(&mut b, |r| !r.volumes_removed.is_empty()).await;
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
fn root_etcd_qemu_sixteen_disks_are_not_serialized_and_one_disk_is() {
    let cl = Cluster::start(3, 1);
    let exp = cl.dir.path().join("d0.expected");
    rt().block_on(async {
        let mut c = cl.wait_agents(0, 3).await;
        // Disk 0 gets a long conversion; fifteen others get snapshots.
        let d0 = filled_disk(&mut c, &cl.agents[0], "d0", 768, 0x42, &exp).await;
        let mut others = Vec::new();
        for i in 1..16 {
            let j = ok(c
                .create_of(&format!("d{i}"), "", pb::Format::Raw, 8 * MIB)
                .await);
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
            .answer();
        running(&mut c, &conv.id).await;
        // A second client on disk 0 waits for the conversion.
        let mut c0 = c.clone();
        let (d0b, conv_id) = (d0.clone(), conv.id.clone());
        let second = tokio::spawn(async move {
            let s = ok(c0
                .snapshot_disk(coord::snapshot("s-d0", "", &d0b))
                .await
                .answer());
            let conv = c0.job_now(&conv_id).await;
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
                        .snapshot_disk(coord::snapshot(&format!("s{i}-{k}"), "", &d))
                        .await
                        .answer());
                    let _ = tx.send(());
                }
            }));
        }
        for _ in 0..15 {
            rx.recv().await.unwrap();
        }
        let during = c.job_now(&conv.id).await;
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
        let v = c.disk_of("", &d0).await;
        assert_eq!(v.chain.len(), 2, "{v:?}");
        assert_eq!(v.chain[0].format, pb::Format::Qcow2 as i32);
        assert_eq!(v.snapshots.len(), 1);
        assert_eq!(v.snapshots[0].id, snap.snapshot_id);
        let mut a = cl.agents[1].client().await;
        check_disk(&mut a, "", &d0, &exp).await;
        for d in &others {
            let v = c.disk_of("", d).await;
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
                .create_of(&format!("before{i}"), "", pb::Format::Raw, 8 * MIB)
                .await);
            let d = j.disk.unwrap().id;
            ok(
                c.snapshot_disk(coord::snapshot(&format!("snap{i}"), "", &d))
                    .await
                    .answer(),
            );
            disks.push(d);
        }
        let before = domain_state(&cl.domain);
        cl.etcd.stop();
        // While it is down, operations fail cleanly and change nothing.
        let e = c
            .create_disk(coord::create("during", "", pb::Format::Raw, 8 * MIB))
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
                .create_disk(coord::create("after", "", pb::Format::Raw, 8 * MIB))
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
        ok(
            c.snapshot_disk(coord::snapshot("snap-after", "", &made.disk.unwrap().id))
                .await
                .answer(),
        );
        // Nothing committed before was lost.
        let listed = c.disks().await;
        for d in &disks {
            let v = listed.iter().find(|x| &x.id == d).expect("disk kept");
            assert_eq!(v.snapshots.len(), 1);
        }
        assert_eq!(listed.len(), 4);
    });
    cl.stop_and_check();
}

/// A call to an agent that lost its lease: refused as UNAVAILABLE while it
/// still runs, or, once it has stopped, never answered: its connection
/// closed under the call (CANCELLED from the transport, not from a
/// service) or refused (UNAVAILABLE).
fn fenced_or_gone(e: &tonic::Status) {
    let closed = e.code() == tonic::Code::Cancelled
        && std::error::Error::source(e).is_some_and(|s| s.to_string().contains("transport"));
    assert!(e.code() == tonic::Code::Unavailable || closed, "{e:?}");
}
