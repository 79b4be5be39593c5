//! The coordinator through its real gRPC API, over a real agent on domain
//! files, with the data checked by qemu-img through activations.

use std::process::Command;

use cairn_coordinator::pb;
use tonic::Code;

use cairn_tests::agent::*;
use cairn_tests::ask::{coord, AgentCalls, CoordCalls};
use cairn_tests::coordinator::*;
use cairn_tests::data::*;
use cairn_tests::domain::*;
use cairn_tests::Answer;

const MIB: u64 = 1 << 20;

/// Disk `id` on `domain` as the coordinator shows it.
async fn disk_on(
    c: &mut cairn_proto::coordinator::coordinator_client::CoordinatorClient<
        tonic::transport::Channel,
    >,
    domain: &str,
    id: &str,
) -> pb::Disk {
    c.get_disk(pb::GetDiskRequest {
        domain: domain.into(),
        disk_id: id.into(),
    })
    .await
    .answer()
}

fn create(
    rid: &str,
    domain: &str,
    name: &str,
    format: pb::Format,
    mib: u64,
) -> pb::CreateDiskRequest {
    pb::CreateDiskRequest {
        request_id: rid.into(),
        domain: domain.into(),
        name: name.into(),
        format: format as i32,
        size: mib * MIB,
        ..Default::default()
    }
}

#[test]
fn root_qemu_coordinator_every_operation_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("one.img"), dir.path().join("two.img"));
    make_named_domain(&d1, 2, "one");
    make_named_domain(&d2, 2, "two");
    let agent = AgentProc::start_with(
        &d1,
        &dir.path().join("agent"),
        &["--domain".into(), d2.display().to_string()],
    );
    let coord = CoordProc::of(dir.path(), &agent);
    let exp = |n: &str| dir.path().join(format!("{n}.expected"));
    rt().block_on(async {
        let mut c = coord.client().await;
        let mut a = agent.client().await;

        // Create a raw disk and write to it.
        let j = ok(c
            .create_disk(create("c1", "one", "web", pb::Format::Raw, 64))
            .await
            .answer());
        assert_eq!(j.kind, "create");
        let disk = j.disk.unwrap().id;
        expected_file(&exp("web"), 64 * MIB);
        let p = activate(&mut a, "one", &disk).await;
        write_both(&p, &exp("web"), 0, MIB, 0x11);
        deactivate(&mut a, "one", &disk).await;
        std::fs::copy(exp("web"), exp("s1")).unwrap();

        // A retry gets the same job; the same id for another request is refused.
        let again = c
            .create_disk(create("c1", "one", "web", pb::Format::Raw, 64))
            .await
            .answer();
        assert_eq!(again.id, j.id);
        let e = c
            .create_disk(create("c1", "one", "web", pb::Format::Raw, 65))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        use tonic_types::StatusExt;
        assert_eq!(
            e.get_details_error_info().unwrap().reason,
            "request_id_reused"
        );
        // So is the same id for another method, even where the two
        // messages' bytes are the same.
        let e = c
            .delete_disk(coord::delete("c1", "one", &disk))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_eq!(
            e.get_details_error_info().unwrap().reason,
            "request_id_reused"
        );

        // Snapshot, then write on the new top.
        let s = ok(c
            .snapshot_disk(pb::SnapshotDiskRequest {
                request_id: "s1".into(),
                domain: "one".into(),
                disk_id: disk.clone(),
                description: "before the upgrade".into(),
            })
            .await
            .answer());
        let s1 = s.snapshot_id.clone();
        assert!(!s1.is_empty());
        let p = activate(&mut a, "one", &disk).await;
        write_both(&p, &exp("web"), MIB, MIB, 0x22);
        deactivate(&mut a, "one", &disk).await;

        let v = disk_on(&mut c, "one", &disk).await;
        assert_eq!(v.name, "web");
        assert_eq!(v.chain.len(), 2);
        assert_eq!(v.format, pb::Format::Qcow2 as i32);
        assert_eq!(v.snapshots.len(), 1);
        assert_eq!(v.snapshots[0].id, s1);
        assert_eq!(v.snapshots[0].description, "before the upgrade");
        assert_eq!(v.chain[0].snapshot_id, s1);

        // Thin clone of the snapshot: what the disk was.
        let cs = ok(c
            .clone_disk(coord::clone("cl1", "one", &s1, "from-snap"))
            .await
            .answer());
        let from_snap = cs.disk.unwrap().id;
        check_disk(&mut a, "one", &from_snap, &exp("s1")).await;
        // Thin clone of the disk: what it is now (the disk gets a snapshot).
        let cd = ok(c
            .clone_disk(coord::clone("cl2", "one", &disk, "from-disk"))
            .await
            .answer());
        let from_disk = cd.disk.unwrap().id;
        check_disk(&mut a, "one", &from_disk, &exp("web")).await;
        let fd = disk_on(&mut c, "one", &from_disk).await;
        assert_eq!(fd.parent_disk, disk);
        assert_eq!(fd.chain.len(), 3, "the clone shares the disk's chain");
        // Writes to the clone stay in the clone.
        std::fs::copy(exp("web"), exp("clone")).unwrap();
        let p = activate(&mut a, "one", &from_disk).await;
        write_both(&p, &exp("clone"), 4 * MIB, MIB, 0x77);
        deactivate(&mut a, "one", &from_disk).await;
        check_disk(&mut a, "one", &disk, &exp("web")).await;

        // A full clone (qcow2 of the flattened chain), independent.
        let fc = ok(finish(
            c.clone(),
            c.clone()
                .clone_disk(pb::CloneDiskRequest {
                    request_id: "cl3".into(),
                    domain: "one".into(),
                    source_id: disk.clone(),
                    name: "full".into(),
                    full: true,
                    format: pb::Format::Qcow2 as i32,
                    ..Default::default()
                })
                .await
                .answer(),
        )
        .await);
        let full = fc.disk.unwrap();
        assert_eq!(full.chain.len(), 1);
        assert_eq!(full.format, pb::Format::Qcow2 as i32);
        check_disk(&mut a, "one", &full.id, &exp("web")).await;

        // Extend: the disk and its top grow.
        ok(c.extend_disk(coord::extend("x1", "one", &disk, 96 * MIB))
            .await
            .answer());
        std::fs::OpenOptions::new()
            .write(true)
            .open(exp("web"))
            .unwrap()
            .set_len(96 * MIB)
            .unwrap();
        let p = activate(&mut a, "one", &disk).await;
        assert_eq!(qemu_size(&p), 96 * MIB);
        write_both(&p, &exp("web"), 90 * MIB, MIB, 0x33);
        deactivate(&mut a, "one", &disk).await;
        let e = c
            .extend_disk(coord::extend("x2", "one", &disk, 32 * MIB))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

        // Deleting a snapshot with clones hanging from it is refused.
        let v = disk_on(&mut c, "one", &disk).await;
        assert_eq!(v.snapshots.len(), 2);
        let s2 = v.snapshots[1].id.clone();
        let e = finish(
            c.clone(),
            c.clone()
                .delete_snapshot(coord::delete_snapshot("ds0", "one", &s2))
                .await
                .answer(),
        )
        .await;
        assert_eq!(e.state, pb::JobState::Failed as i32);
        assert_eq!(e.error_code, Code::FailedPrecondition as i32, "{e:?}");
        // Delete the clone of the disk; then the snapshot merges (rebase).
        ok(c.delete_disk(coord::delete("dd1", "one", &from_disk))
            .await
            .answer());
        ok(finish(
            c.clone(),
            c.clone()
                .delete_snapshot(coord::delete_snapshot("ds1", "one", &s2))
                .await
                .answer(),
        )
        .await);
        check_disk(&mut a, "one", &disk, &exp("web")).await;
        // Then the base snapshot, once its other clone is gone.
        ok(c.delete_disk(coord::delete("dd2", "one", &from_snap))
            .await
            .answer());
        ok(finish(
            c.clone(),
            c.clone()
                .delete_snapshot(coord::delete_snapshot("ds2", "one", &s1))
                .await
                .answer(),
        )
        .await);
        let v = disk_on(&mut c, "one", &disk).await;
        assert_eq!(v.chain.len(), 1, "{v:?}");
        assert!(v.snapshots.is_empty());
        check_disk(&mut a, "one", &disk, &exp("web")).await;

        // Commit: a raw base under its one top, same size.
        let j = ok(c
            .create_disk(create("c2", "one", "db", pb::Format::Raw, 32))
            .await
            .answer());
        let db = j.disk.unwrap().id;
        expected_file(&exp("db"), 32 * MIB);
        let p = activate(&mut a, "one", &db).await;
        write_both(&p, &exp("db"), 0, 2 * MIB, 0x44);
        deactivate(&mut a, "one", &db).await;
        let s = ok(c
            .snapshot_disk(pb::SnapshotDiskRequest {
                request_id: "s3".into(),
                domain: "one".into(),
                disk_id: db.clone(),
                description: String::new(),
            })
            .await
            .answer());
        let p = activate(&mut a, "one", &db).await;
        write_both(&p, &exp("db"), MIB, 2 * MIB, 0x55);
        deactivate(&mut a, "one", &db).await;
        ok(finish(
            c.clone(),
            c.clone()
                .delete_snapshot(coord::delete_snapshot("ds3", "one", &s.snapshot_id))
                .await
                .answer(),
        )
        .await);
        let v = disk_on(&mut c, "one", &db).await;
        assert_eq!(v.chain.len(), 1);
        assert_eq!(
            v.format,
            pb::Format::Raw as i32,
            "committed into the raw base"
        );
        check_disk(&mut a, "one", &db, &exp("db")).await;

        // Convert the disk to raw: same id, same data.
        ok(finish(
            c.clone(),
            c.clone()
                .convert_disk(pb::ConvertDiskRequest {
                    request_id: "cv1".into(),
                    domain: "one".into(),
                    disk_id: disk.clone(),
                    format: pb::Format::Raw as i32,
                    ..Default::default()
                })
                .await
                .answer(),
        )
        .await);
        let v = disk_on(&mut c, "one", &disk).await;
        assert_eq!(v.format, pb::Format::Raw as i32);
        assert_eq!(v.chain.len(), 1);
        assert_eq!(v.name, "web");
        check_disk(&mut a, "one", &disk, &exp("web")).await;
        // Regression: converting a disk with snapshots dropped them. It is
        // refused, naming them, and changes nothing; with flatten they go.
        let snap = ok(c
            .snapshot_disk(pb::SnapshotDiskRequest {
                request_id: "s-cv".into(),
                domain: "one".into(),
                disk_id: disk.clone(),
                description: String::new(),
            })
            .await
            .answer())
        .snapshot_id;
        let convert = |rid: &str, flatten: bool| pb::ConvertDiskRequest {
            request_id: rid.into(),
            domain: "one".into(),
            disk_id: disk.clone(),
            format: pb::Format::Qcow2 as i32,
            flatten,
            ..Default::default()
        };
        c.convert_disk(convert("cv2", false))
            .await
            .refused(Code::FailedPrecondition, &snap);
        let v = disk_on(&mut c, "one", &disk).await;
        assert_eq!((v.chain.len(), v.snapshots.len()), (2, 1));
        ok(finish(
            c.clone(),
            c.clone().convert_disk(convert("cv3", true)).await.answer(),
        )
        .await);
        let v = disk_on(&mut c, "one", &disk).await;
        assert_eq!((v.chain.len(), v.snapshots.len()), (1, 0));
        assert_eq!(v.format, pb::Format::Qcow2 as i32);
        check_disk(&mut a, "one", &disk, &exp("web")).await;

        // Copy to the other domain; move the other disk there.
        let cp = ok(finish(
            c.clone(),
            c.clone()
                .copy_disk(pb::CopyDiskRequest {
                    request_id: "cp1".into(),
                    domain: "one".into(),
                    disk_id: disk.clone(),
                    target_domain: "two".into(),
                    ..Default::default()
                })
                .await
                .answer(),
        )
        .await);
        let copy = cp.disk.unwrap();
        assert_eq!(copy.domain_name, "two");
        check_disk(&mut a, "two", &copy.id, &exp("web")).await;
        let mv = ok(finish(
            c.clone(),
            c.clone()
                .copy_disk(pb::CopyDiskRequest {
                    request_id: "mv1".into(),
                    domain: "one".into(),
                    disk_id: db.clone(),
                    target_domain: "two".into(),
                    r#move: true,
                    ..Default::default()
                })
                .await
                .answer(),
        )
        .await);
        assert_eq!(mv.kind, "move");
        let moved = mv.disk.unwrap();
        check_disk(&mut a, "two", &moved.id, &exp("db")).await;
        // A move to the disk's own domain would copy it and delete the
        // original: refused, and the disk stays as it was.
        c.copy_disk(pb::CopyDiskRequest {
            request_id: "mv-self".into(),
            domain: "two".into(),
            disk_id: moved.id.clone(),
            target_domain: "two".into(),
            r#move: true,
            ..Default::default()
        })
        .await
        .refused(Code::FailedPrecondition, "already on domain");
        check_disk(&mut a, "two", &moved.id, &exp("db")).await;
        let e = c
            .get_disk(pb::GetDiskRequest {
                domain: "one".into(),
                disk_id: db.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);

        let listed = c.disks().await;
        let mut names: Vec<_> = listed
            .iter()
            .map(|d| format!("{}/{}", d.domain_name, d.name))
            .collect();
        names.sort();
        assert_eq!(names, ["one/full", "one/web", "two/db", "two/web"]);

        // Bad input: the right code, and nothing changes.
        drop(listed);
        let before = (domain_state(&d1).1, domain_state(&d2).1);
        let bad = [
            c.create_disk(create("b1", "one", "x", pb::Format::Raw, 0))
                .await
                .map(|_| ()),
            c.create_disk(pb::CreateDiskRequest {
                size: 1000,
                ..create("b2", "one", "x", pb::Format::Raw, 1)
            })
            .await
            .map(|_| ()),
            c.create_disk(create("b3", "one", "x", pb::Format::Unspecified, 1))
                .await
                .map(|_| ()),
            c.create_disk(create("b4", "nowhere", "x", pb::Format::Raw, 1))
                .await
                .map(|_| ()),
            c.create_disk(create("b5", "", "x", pb::Format::Raw, 1))
                .await
                .map(|_| ()),
            c.snapshot_disk(coord::snapshot("b6", "one", "not-an-id"))
                .await
                .map(|_| ()),
            c.delete_disk(coord::delete("b7", "one", &from_disk))
                .await
                .map(|_| ()),
            c.get_disk(pb::GetDiskRequest {
                domain: "one".into(),
                disk_id: s1.clone(),
            })
            .await
            .map(|_| ()),
            c.copy_disk(pb::CopyDiskRequest {
                request_id: "b9".into(),
                domain: "one".into(),
                disk_id: disk.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ];
        let codes: Vec<Code> = bad.iter().map(|r| r.as_ref().unwrap_err().code()).collect();
        assert_eq!(
            codes,
            [
                Code::InvalidArgument,
                Code::InvalidArgument,
                Code::InvalidArgument,
                Code::NotFound,
                Code::InvalidArgument,
                Code::InvalidArgument,
                Code::NotFound,
                Code::NotFound,
                Code::InvalidArgument,
            ],
            "{bad:?}"
        );
        assert_eq!((domain_state(&d1).1, domain_state(&d2).1), before);

        // Delete everything: nothing is left on either domain.
        for (dom, id) in [
            ("one", &disk),
            ("one", &full.id),
            ("two", &copy.id),
            ("two", &moved.id),
        ] {
            ok(c.delete_disk(coord::delete(&format!("del-{id}"), dom, id))
                .await
                .answer());
        }
        let jobs = c
            .list_jobs(pb::ListJobsRequest { running: true })
            .await
            .answer()
            .jobs;
        assert!(jobs.is_empty(), "{jobs:?}");
    });
    drop(coord);
    drop(agent);
    for d in [&d1, &d2] {
        domain_clean(d);
        let out = run(Command::new(cairn_tests::bins::cairn_bin())
            .args(["domain", "info", "--json"])
            .arg(d));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["usage"]["volumes"], 0, "{v}");
        assert_eq!(v["usage"]["tags"], 0, "{v}");
    }
}

#[test]
fn the_leader_reclaims_volumes_no_tag_reaches_after_their_quarantine() {
    use cairn_proto::agent as apb;
    let (dir, dom, agent) = AgentFixture::new(1).parts();
    let coord = CoordProc::start(
        &dir.path().join("coord"),
        &[
            "--agent".into(),
            agent.socket.display().to_string(),
            "--orphan-quarantine".into(),
            "4".into(),
        ],
    );
    rt().block_on(async {
        let mut a = agent.client().await;
        // A disk whose tag is deleted without its chain, and a bare volume
        // (beside a volume made with its tag).
        let (orphan, tag) = a.new_disk("d1", apb::VolumeFormat::Raw, 4).await;
        a.delete_tag(apb::DeleteTagRequest {
            request_id: "t1".into(),
            tag_id: tag.id.clone(),
            ..Default::default()
        })
        .await
        .answer();
        let born_tagged = a
            .create_volume(disk_request("b1", apb::VolumeFormat::Raw, 4))
            .await
            .answer();
        let mut req = disk_request("b2", apb::VolumeFormat::Raw, 4);
        req.tag = None;
        let bare = a.create_volume(req).await.answer().volume.unwrap();
        // A disk that stays, and a bare volume tagged within the quarantine.
        let (kept, _) = a.new_disk("d2", apb::VolumeFormat::Raw, 4).await;
        let mut req = disk_request("b3", apb::VolumeFormat::Raw, 4);
        req.tag = None;
        let tagged = a.create_volume(req).await.answer().volume.unwrap();
        a.create_tag(apb::CreateTagRequest {
            request_id: "t3".into(),
            tag: Some(apb::TagSpec {
                volume: tagged.id.clone(),
                mutable: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .answer();
        let ids = |v: &[apb::Volume]| v.iter().map(|v| v.id.clone()).collect::<Vec<_>>();
        let now = ids(&a.volumes().await);
        for v in [&orphan.id, &bare.id, &kept.id, &tagged.id] {
            assert!(now.contains(v), "{v} went before its quarantine");
        }
        let t = std::time::Instant::now();
        loop {
            let now = ids(&a.volumes().await);
            if !now.contains(&orphan.id) && !now.contains(&bare.id) {
                assert!(
                    now.contains(&kept.id) && now.contains(&tagged.id),
                    "{now:?}"
                );
                assert!(
                    born_tagged.volume.is_some_and(|v| now.contains(&v.id)),
                    "a volume made with its tag stays"
                );
                break;
            }
            assert!(t.elapsed().as_secs() < 60, "never reclaimed: {now:?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    drop(coord);
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn qemu_a_disk_made_to_wipe_after_delete_leaves_zeros_where_its_data_was() {
    use std::os::unix::fs::FileExt;
    let (dir, dom, agent) = AgentFixture::new(1).parts();
    let coord = CoordProc::of(dir.path(), &agent);
    let (g, _) = cairn_domain::engine::read_superblocks(
        &cairn_domain::io::FileDev::open(&dom, false).unwrap(),
    )
    .unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dom)
        .unwrap();
    rt().block_on(async {
        let mut c = coord.client().await;
        let mut a = agent.client().await;
        let made = |wipe: bool, rid: &str| {
            let mut r = create(rid, "", rid, pb::Format::Raw, 2);
            r.wipe_after_delete = wipe;
            r
        };
        let wiped = ok(c.create_disk(made(true, "w")).await.answer())
            .disk
            .unwrap()
            .id;
        let kept = ok(c.create_disk(made(false, "k")).await.answer())
            .disk
            .unwrap()
            .id;
        assert!(disk_on(&mut c, "", &wiped).await.wipe_after_delete);
        assert!(!disk_on(&mut c, "", &kept).await.wipe_after_delete);
        // A pattern where each disk's data is.
        let mut at = Vec::new();
        for d in [&wiped, &kept] {
            let top = disk_on(&mut c, "", d).await.chain[0].volume_id.clone();
            let v = a.volume_of(&top).await;
            let off = g.data_off + v.extent_start * g.extent_size;
            file.write_all_at(&vec![0x5a; 2 * MIB as usize], off)
                .unwrap();
            file.sync_all().unwrap();
            at.push(off);
        }
        for (rid, d) in [("dw", &wiped), ("dk", &kept)] {
            ok(c.delete_disk(coord::delete(rid, "", d)).await.answer());
        }
        let read = |off: u64| {
            let mut b = vec![0u8; 2 * MIB as usize];
            file.read_exact_at(&mut b, off).unwrap();
            b
        };
        assert!(
            read(at[0]).iter().all(|&x| x == 0),
            "the wiped disk's data is gone"
        );
        assert!(
            read(at[1]).iter().all(|&x| x == 0x5a),
            "without it the bytes stay"
        );

        // A snapshot merged away frees a volume of the disk: wiped too.
        let d = ok(c.create_disk(made(true, "m")).await.answer())
            .disk
            .unwrap()
            .id;
        let snap = ok(c
            .snapshot_disk(coord::snapshot("ms", "", &d))
            .await
            .answer())
        .snapshot_id;
        let before = disk_on(&mut c, "", &d).await.chain;
        let mut runs = Vec::new();
        for l in &before {
            let v = a.volume_of(&l.volume_id).await;
            let (off, len) = (
                g.data_off + v.extent_start * g.extent_size,
                v.extent_count * g.extent_size,
            );
            // The last MiB of each run: raw data, or clusters qcow2 has not
            // allocated.
            file.write_all_at(&vec![0x5a; MIB as usize], off + len - MIB)
                .unwrap();
            runs.push((l.volume_id.clone(), off, len));
        }
        file.sync_all().unwrap();
        let j = c
            .delete_snapshot(coord::delete_snapshot("md", "", &snap))
            .await
            .answer();
        ok(finish(c.clone(), j).await);
        let after: Vec<String> = disk_on(&mut c, "", &d)
            .await
            .chain
            .iter()
            .map(|l| l.volume_id.clone())
            .collect();
        let gone: Vec<_> = runs.iter().filter(|(v, _, _)| !after.contains(v)).collect();
        assert_eq!(gone.len(), 1, "{before:?} -> {after:?}");
        let (_, off, len) = gone[0];
        let mut b = vec![0u8; *len as usize];
        file.read_exact_at(&mut b, *off).unwrap();
        assert!(b.iter().all(|&x| x == 0), "the merged-away volume is wiped");
    });
    drop(coord);
    drop(agent);
    domain_clean(&dom);
}
