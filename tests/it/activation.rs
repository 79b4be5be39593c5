//! Activation through the agent's real gRPC API: chains of qcow2 layers
//! on loop devices behind stable paths, read and written by real qemu-img
//! and qemu-io; activations across restarts; deactivation of what is in
//! use.

use std::path::Path;
use std::process::Command;

use cairn_proto::agent as pb;
use cairn_tests::agent::*;
use cairn_tests::ask::{self, AgentCalls};
use cairn_tests::data::*;
use cairn_tests::domain::*;
use cairn_tests::Answer;

#[test]
fn root_qemu_agent_raw_snapshot_qcow2_chain_verified() {
    let (dir, dom, agent) = AgentFixture::new(4).parts();
    let rt = rt();
    rt.block_on(async {
        let mut c = agent.client().await;
        let created = c
            .create_volume(disk_request("c1", pb::VolumeFormat::Raw, 64))
            .await
            .answer();
        assert!(created.created);
        let base = created.volume.unwrap();
        let disk = created.tag.unwrap();
        assert_eq!(base.legality, pb::Legality::Legal as i32);
        assert_eq!(disk.volume, base.id);

        let act = c.activate(ask::activate("a1", &disk.id)).await.answer();
        let a = act.activation.unwrap();
        let base_path = Path::new(&a.path).to_path_buf();
        assert_eq!(
            base_path,
            agent
                .run_dir()
                .join(&a.domain)
                .join(&disk.id)
                .join(&base.id)
        );
        assert!(act.changed);

        // Expected images, kept in plain files beside.
        let exp_base = dir.path().join("expected-base.raw");
        let exp_top = dir.path().join("expected-top.raw");
        for p in [&exp_base, &exp_top] {
            std::fs::File::create(p).unwrap().set_len(64 << 20).unwrap();
        }
        qemu_io("raw", &base_path, "write -P 0xaa 0 1M");
        qemu_io("raw", &base_path, "write -P 0xab 60M 1M");
        for p in [&exp_base, &exp_top] {
            write_expected(p, 0, 1 << 20, 0xaa);
            write_expected(p, 60 << 20, 1 << 20, 0xab);
        }

        let snap = c
            .snapshot(pb::SnapshotRequest {
                request_id: "s1".into(),
                tag_id: disk.id.clone(),
                description: "first snapshot".into(),
                ..Default::default()
            })
            .await
            .answer();
        let top = snap.volume.unwrap();
        assert_eq!(top.format, pb::VolumeFormat::Qcow2 as i32);
        assert_eq!(snap.tag.unwrap().volume, top.id);
        let weak = snap.parent_tag.unwrap();
        assert_eq!(weak.volume, base.id);
        assert_eq!(weak.r#type, pb::TagType::Weak as i32);
        assert_eq!(top.parent_tag, weak.id);

        // The disk was active, so the new top is linked beside its parent.
        let top_path = agent.run_dir().join(&a.domain).join(&disk.id).join(&top.id);
        assert!(top_path.exists(), "{top_path:?} missing after snapshot");
        qemu_io("qcow2", &top_path, "write -P 0xbb 512K 1M");
        qemu_io("qcow2", &top_path, "write -z 60M 64K");
        write_expected(&exp_top, 512 << 10, 1 << 20, 0xbb);
        write_expected(&exp_top, 60 << 20, 64 << 10, 0);

        assert_reads_like(&top_path, &exp_top);
        // The guest's writes landed in the top volume only.
        assert_reads_like(&base_path, &exp_base);
        let chain = qemu_info(&top_path, true);
        let names = strings(&chain, "filename");
        assert_eq!(
            names,
            vec![top_path.to_str().unwrap(), base_path.to_str().unwrap()]
        );
        assert_eq!(chain[0]["format"], "qcow2");
        assert_eq!(chain[1]["format"], "raw");

        // The agent's own check agrees.
        c.assert_clean(&top.id).await;

        // Deactivate, then the domain is clean offline.
        let d = c.deactivate_tag("d1", &disk.id).await;
        assert!(d);
        assert!(!top_path.exists());
    });
    assert!(loops_of(&dom).is_empty(), "loop devices left behind");
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn root_agent_restart_keeps_live_activations_and_drops_gone_ones() {
    let (dir, dom, mut agent) = AgentFixture::new(2).parts();
    let rt = rt();
    let (keep, gone) = rt.block_on(async {
        let mut c = agent.client().await;
        let mut out = vec![];
        for i in 0..2 {
            let r = c
                .create_volume(disk_request(&format!("c{i}"), pb::VolumeFormat::Raw, 8))
                .await
                .answer();
            let tag = r.tag.unwrap();
            let a = c.activate_tag(&format!("a{i}"), &tag.id).await;
            out.push((
                tag.id,
                r.volume.unwrap().id,
                a.volumes[0].device.clone(),
                a.path,
            ));
        }
        (out.remove(0), out.remove(0))
    });
    agent.kill();
    // While the agent is down, another host removes the second disk.
    {
        let dev = std::sync::Arc::new(cairn_domain::io::FileDev::open(&dom, true).unwrap());
        let locks = std::sync::Arc::new(
            cairn_domain::LocalLockService::new(dir.path().join("locks")).unwrap(),
        );
        let d = cairn_domain::Domain::open(dev, locks, cairn_tests::domain::opts(9)).unwrap();
        let t: cairn_domain::TagId = gone.0.parse().unwrap();
        let v: cairn_domain::VolumeId = gone.1.parse().unwrap();
        d.delete_tag(&t, &[]).unwrap();
        d.delete_volume(&v, &[]).unwrap();
        d.close().unwrap();
    }
    let agent = AgentProc::start(&dom, dir.path());
    // The live activation kept its device and path; the gone one is gone.
    assert!(Path::new(&keep.3).exists());
    assert_eq!(std::fs::read_link(&keep.3).unwrap(), Path::new(&keep.2));
    assert!(
        !Path::new(&gone.3).exists(),
        "link of a deleted volume kept"
    );
    let idx: u32 = gone.2.trim_start_matches("/dev/loop").parse().unwrap();
    assert!(
        !loops_of(&dom).contains(&idx),
        "device of a deleted volume kept"
    );
    assert_eq!(loops_of(&dom).len(), 1);
    rt.block_on(async {
        let mut c = agent.client().await;
        let l = c
            .list_activations(pb::ListActivationsRequest::default())
            .await
            .answer();
        assert_eq!(l.activations.len(), 1);
        assert_eq!(l.activations[0].tag_id, keep.0);
        // Activating again changes nothing.
        let again = c.activate(ask::activate("a-again", &keep.0)).await.answer();
        assert!(!again.changed);
    });
    // Metrics count what the restarted agent served.
    let body = http_get(&agent.metrics, "/metrics");
    assert!(
        body.contains("cairn_agent_requests_total{op=\"activate\"} 1"),
        "{body}"
    );
    assert!(body.contains("cairn_agent_request_duration_seconds_bucket{"));
}

#[test]
fn root_qemu_agent_chain_of_100_snapshots_activates_and_verifies() {
    let (dir, dom, mut agent) = AgentFixture::new(8).parts();
    let exp = dir.path().join("expected.raw");
    std::fs::File::create(&exp)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let rt = rt();
    let (disk, top_path) = rt.block_on(async {
        let mut c = agent.client().await;
        let r = c
            .create_volume(disk_request("base", pb::VolumeFormat::Raw, 16))
            .await
            .answer();
        let disk = r.tag.unwrap().id;
        let mut path = c.activate_tag("a", &disk).await.path;
        for i in 0..=100u64 {
            // Each layer writes its own 64 KiB, and overwrites part of the
            // previous layer's.
            let off = i * 128 * 1024;
            let fmt = if i == 0 { "raw" } else { "qcow2" };
            qemu_io(
                fmt,
                Path::new(&path),
                &format!("write -P {} {off} 96K", i + 1),
            );
            write_expected(&exp, off, 96 << 10, (i + 1) as u8);
            if i == 100 {
                break;
            }
            let s = c
                .snapshot(ask::snapshot(&format!("s{i}"), &disk))
                .await
                .answer();
            let top = s.volume.unwrap().id;
            path = Path::new(&path)
                .with_file_name(&top)
                .to_string_lossy()
                .into_owned();
        }
        (disk, path)
    });
    // Restart the agent and activate from scratch: the whole chain again.
    rt.block_on(async {
        let mut c = agent.client().await;
        c.deactivate_tag("d", &disk).await;
    });
    assert!(loops_of(&dom).is_empty());
    agent.stop();
    let agent = AgentProc::start(&dom, dir.path());
    rt.block_on(async {
        let mut c = agent.client().await;
        let a = c.activate_tag("a2", &disk).await;
        assert_eq!(a.volumes.len(), 101);
        assert_eq!(a.path, top_path);
    });
    assert_reads_like(Path::new(&top_path), &exp);
    let chain = qemu_info(Path::new(&top_path), true);
    assert_eq!(chain.as_array().unwrap().len(), 101);
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn root_agent_refuses_to_deactivate_what_is_in_use_and_forced_keeps_it_protected() {
    let (_dir, dom, agent) = AgentFixture::new(2).parts();
    rt().block_on(async {
        let mut c = agent.client().await;
        let disk = c.new_disk("c", pb::VolumeFormat::Raw, 8).await.1;
        let snap = c.snapshot_tag("s", &disk.id).await;
        let weak = snap.parent_tag.unwrap();
        let top = c.activate_tag("a", &disk.id).await;
        c.activate(ask::activate("a2", &weak.id)).await.unwrap();
        // The disk's chain goes through the weak tag's volume.
        let e = c
            .deactivate(ask::deactivate("d1", &weak.id))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        assert!(
            e.message().contains("needed by the active chain"),
            "{}",
            e.message()
        );
        // A process holds the top open.
        let mut holder = Command::new("bash")
            .args(["-c", "exec 3<\"$0\"; sleep 30"])
            .arg(&top.path)
            .spawn()
            .unwrap();
        // Wait until the shell has the device open.
        let device = std::fs::read_link(&top.path).unwrap();
        let fd_dir = format!("/proc/{}/fd", holder.id());
        let t = std::time::Instant::now();
        while !std::fs::read_dir(&fd_dir)
            .map(|d| {
                d.flatten()
                    .any(|f| std::fs::read_link(f.path()).is_ok_and(|l| l == device))
            })
            .unwrap_or(false)
        {
            assert!(
                t.elapsed().as_secs() < 10,
                "the holder never opened {device:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let e = c
            .deactivate(ask::deactivate("d2", &disk.id))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("open by process"), "{}", e.message());
        assert!(Path::new(&top.path).exists());
        // Forced, it is let go, but the kernel keeps the device until the
        // holder closes it: the answer says so, and until then the tag is
        // active (closing) and nothing frees the extents under it.
        let r = c
            .deactivate(pb::DeactivateRequest {
                request_id: "d3".into(),
                tag_id: disk.id.clone(),
                force: true,
                ..Default::default()
            })
            .await
            .answer();
        assert!(r.changed);
        assert_eq!(r.still_open, vec![device.display().to_string()]);
        let acts = c.activations().await;
        let mine = acts
            .iter()
            .find(|a| a.tag_id == disk.id)
            .expect("still listed");
        assert!(mine.closing, "{mine:?}");
        let e = c
            .delete_disk(ask::delete_disk("del1", &disk.id))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        let e = c.activate(ask::activate("a3", &disk.id)).await.unwrap_err();
        assert!(e.message().contains("still closing"), "{}", e.message());
        // The holder closes it: the device goes, and so does the tag's
        // activation; the disk can be deleted.
        let _ = holder.kill();
        let _ = holder.wait();
        let t = std::time::Instant::now();
        loop {
            let acts = c.activations().await;
            if !acts.iter().any(|a| a.tag_id == disk.id) {
                break;
            }
            assert!(
                t.elapsed().as_secs() < 10,
                "the device never went: {acts:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!Path::new(&top.path).exists());
        c.deactivate_tag("d4", &weak.id).await;
        c.delete_disk(ask::delete_disk("del2", &disk.id))
            .await
            .answer();
    });
    drop(agent);
    domain_clean(&dom);
}
