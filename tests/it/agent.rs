//! The node agent through its real gRPC API, with real qemu-img and qemu-io
//! on loop devices.

use std::path::Path;
use std::process::Command;

use cairn_agent::pb;

use crate::agent_harness::*;

fn qemu_io(fmt: &str, path: &Path, cmd: &str) {
    run(Command::new("qemu-io")
        .args(["-f", fmt, "-c", cmd])
        .arg(path));
}

fn write_expected(path: &Path, off: u64, len: u64, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len as usize], off).unwrap();
}

#[test]
fn root_agent_raw_snapshot_qcow2_chain_verified_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 4);
    let agent = AgentProc::start(&dom, dir.path());
    let rt = rt();
    rt.block_on(async {
        let mut c = agent.client().await;
        let created = c
            .create_volume(disk_request("c1", pb::VolumeFormat::Raw, 64))
            .await
            .unwrap()
            .into_inner();
        assert!(created.created);
        let base = created.volume.unwrap();
        let disk = created.tag.unwrap();
        assert_eq!(base.legality, pb::Legality::Legal as i32);
        assert_eq!(disk.volume, base.id);

        let act = c
            .activate(pb::ActivateRequest {
                request_id: "a1".into(),
                tag_id: disk.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
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
            .unwrap()
            .into_inner();
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

        run(Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&top_path));
        run(Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&top_path)
            .arg(&exp_top));
        // The guest's writes landed in the top volume only.
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&base_path)
            .arg(&exp_base));
        let info = run(Command::new("qemu-img")
            .args(["info", "--backing-chain", "--output=json"])
            .arg(&top_path));
        let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
        let names: Vec<&str> = chain
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["filename"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![top_path.to_str().unwrap(), base_path.to_str().unwrap()]
        );
        assert_eq!(chain[0]["format"], "qcow2");
        assert_eq!(chain[1]["format"], "raw");

        // The agent's own check agrees.
        let chk = c
            .check_volume(pb::CheckVolumeRequest {
                volume_id: top.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(chk.clean, "{}", chk.report_json);

        // Deactivate, then the domain is clean offline.
        let d = c
            .deactivate(pb::DeactivateRequest {
                request_id: "d1".into(),
                tag_id: disk.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(d.changed);
        assert!(!top_path.exists());
    });
    assert!(loops_of(&dom).is_empty(), "loop devices left behind");
    drop(agent);
    domain_clean(&dom);
}

fn activate_req(id: &str, tag: &str) -> pb::ActivateRequest {
    pb::ActivateRequest {
        request_id: id.into(),
        tag_id: tag.into(),
        ..Default::default()
    }
}

#[test]
fn root_agent_restart_keeps_live_activations_and_drops_gone_ones() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 2);
    let mut agent = AgentProc::start(&dom, dir.path());
    let rt = rt();
    let (keep, gone) = rt.block_on(async {
        let mut c = agent.client().await;
        let mut out = vec![];
        for i in 0..2 {
            let r = c
                .create_volume(disk_request(&format!("c{i}"), pb::VolumeFormat::Raw, 8))
                .await
                .unwrap()
                .into_inner();
            let tag = r.tag.unwrap();
            let a = c
                .activate(activate_req(&format!("a{i}"), &tag.id))
                .await
                .unwrap()
                .into_inner()
                .activation
                .unwrap();
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
        let d = cairn_domain::Domain::open(dev, locks, crate::common::opts(9)).unwrap();
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
            .unwrap()
            .into_inner();
        assert_eq!(l.activations.len(), 1);
        assert_eq!(l.activations[0].tag_id, keep.0);
        // Activating again changes nothing.
        let again = c
            .activate(activate_req("a-again", &keep.0))
            .await
            .unwrap()
            .into_inner();
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

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn root_agent_chain_of_100_snapshots_activates_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 8);
    let mut agent = AgentProc::start(&dom, dir.path());
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
            .unwrap()
            .into_inner();
        let disk = r.tag.unwrap().id;
        let mut path = c
            .activate(activate_req("a", &disk))
            .await
            .unwrap()
            .into_inner()
            .activation
            .unwrap()
            .path;
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
                .snapshot(pb::SnapshotRequest {
                    request_id: format!("s{i}"),
                    tag_id: disk.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
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
        c.deactivate(pb::DeactivateRequest {
            request_id: "d".into(),
            tag_id: disk.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    assert!(loops_of(&dom).is_empty());
    agent.stop();
    let agent = AgentProc::start(&dom, dir.path());
    rt.block_on(async {
        let mut c = agent.client().await;
        let a = c
            .activate(activate_req("a2", &disk))
            .await
            .unwrap()
            .into_inner()
            .activation
            .unwrap();
        assert_eq!(a.volumes.len(), 101);
        assert_eq!(a.path, top_path);
    });
    run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&top_path));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&top_path)
        .arg(&exp));
    let info = run(Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json"])
        .arg(&top_path));
    let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(chain.as_array().unwrap().len(), 101);
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_retried_requests_return_the_first_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let agent = AgentProc::start(&dom, dir.path());
    rt().block_on(async {
        let mut c = agent.client().await;
        let req = disk_request("same-id", pb::VolumeFormat::Qcow2, 8);
        let a = c.create_volume(req.clone()).await.unwrap().into_inner();
        let b = c.create_volume(req.clone()).await.unwrap().into_inner();
        assert!(a.created && !b.created);
        assert_eq!(a.volume, b.volume);
        assert_eq!(a.tag, b.tag);
        let vols = c
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes;
        assert_eq!(vols.len(), 1);
        // The same id for a different request is refused.
        let mut other = req.clone();
        other.capacity *= 2;
        let e = c.create_volume(other).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("request_id"), "{}", e.message());

        let disk = a.tag.unwrap().id;
        let snap = pb::SnapshotRequest {
            request_id: "snap-1".into(),
            tag_id: disk.clone(),
            ..Default::default()
        };
        let s1 = c.snapshot(snap.clone()).await.unwrap().into_inner();
        let s2 = c.snapshot(snap).await.unwrap().into_inner();
        assert!(s1.created && !s2.created);
        assert_eq!(s1.volume, s2.volume);
        let tags = c
            .list_tags(pb::ListTagsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tags;
        assert_eq!(tags.len(), 2, "a retried snapshot made another layer");

        let set = pb::SetUserDataRequest {
            request_id: "ud".into(),
            tag_id: disk.clone(),
            name: "owner".into(),
            data: b"alice".to_vec(),
            ..Default::default()
        };
        assert!(
            c.set_user_data(set.clone())
                .await
                .unwrap()
                .into_inner()
                .changed
        );
        assert!(!c.set_user_data(set).await.unwrap().into_inner().changed);
        let got = c
            .get_user_data(pb::GetUserDataRequest {
                tag_id: disk.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, b"alice");
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn root_agent_bad_input_gets_the_right_code_and_changes_nothing() {
    use tonic::Code::*;
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let agent = AgentProc::start(&dom, dir.path());
    let rt = rt();
    let (vol, disk) = rt.block_on(async {
        let mut c = agent.client().await;
        let r = c
            .create_volume(disk_request("setup", pb::VolumeFormat::Raw, 8))
            .await
            .unwrap()
            .into_inner();
        let weak = c
            .create_tag(pb::CreateTagRequest {
                request_id: "weak".into(),
                tag: Some(pb::TagSpec {
                    volume: r.volume.as_ref().unwrap().id.clone(),
                    r#type: pb::TagType::Weak as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .tag
            .unwrap();
        (r.volume.unwrap().id, (r.tag.unwrap().id, weak.id))
    });
    let (disk, weak) = disk;
    let before = domain_state(&dom);
    let missing_vol = {
        // A well-formed volume id whose slot holds nothing.
        let mut b = *uuid::Uuid::parse_str(&vol).unwrap().as_bytes();
        b[3] = b[3].wrapping_add(7);
        b[15] ^= 0xff;
        uuid::Uuid::from_bytes(b).to_string()
    };
    let missing_tag = {
        let mut b = *uuid::Uuid::parse_str(&disk).unwrap().as_bytes();
        b[3] = b[3].wrapping_add(7);
        uuid::Uuid::from_bytes(b).to_string()
    };
    let cv = |f: &dyn Fn(&mut pb::CreateVolumeRequest)| {
        let mut r = disk_request("", pb::VolumeFormat::Raw, 8);
        f(&mut r);
        r
    };
    type Case = (&'static str, tonic::Code, Option<&'static str>);
    let mut cases: Vec<(Case, tonic::Status)> = Vec::new();
    rt.block_on(async {
        let mut c = agent.client().await;
        macro_rules! case {
            ($name:expr, $code:expr, $field:expr, $call:expr) => {{
                let r = $call.await;
                let st = match r {
                    std::result::Result::Ok(_) => panic!("{} succeeded", $name),
                    Err(s) => s,
                };
                cases.push((($name, $code, $field), st));
            }};
        }
        case!(
            "create: zero capacity",
            InvalidArgument,
            Some("capacity"),
            c.create_volume(cv(&|r| r.capacity = 0))
        );
        case!(
            "create: negative-looking capacity",
            InvalidArgument,
            Some("capacity"),
            c.create_volume(cv(&|r| r.capacity = u64::MAX))
        );
        case!(
            "create: unaligned capacity",
            InvalidArgument,
            Some("capacity"),
            c.create_volume(cv(&|r| r.capacity = 1000))
        );
        case!(
            "create: more than the domain",
            InvalidArgument,
            Some("size"),
            c.create_volume(cv(&|r| r.capacity = 1 << 40))
        );
        case!(
            "create: absurd qcow2 run",
            InvalidArgument,
            Some("size"),
            c.create_volume(cv(&|r| {
                r.format = pb::VolumeFormat::Qcow2 as i32;
                r.capacity = 1 << 50;
            }))
        );
        case!(
            "create: unknown format",
            InvalidArgument,
            Some("format"),
            c.create_volume(cv(&|r| r.format = 7))
        );
        case!(
            "create: unspecified format",
            InvalidArgument,
            Some("format"),
            c.create_volume(cv(&|r| r.format = 0))
        );
        case!(
            "create: unknown allocation",
            InvalidArgument,
            Some("allocation"),
            c.create_volume(cv(&|r| r.allocation = 9))
        );
        case!(
            "create: malformed parent",
            InvalidArgument,
            Some("parent_tag"),
            c.create_volume(cv(&|r| {
                r.format = 2;
                r.parent_tag = "../../etc".into();
            }))
        );
        case!(
            "create: parent that does not exist",
            NotFound,
            None,
            c.create_volume(cv(&|r| {
                r.format = 2;
                r.parent_tag = missing_tag.clone();
            }))
        );
        case!(
            "create: raw with a parent",
            InvalidArgument,
            Some("parent_tag"),
            c.create_volume(cv(&|r| r.parent_tag = disk.clone()))
        );
        case!(
            "create: control character in description",
            InvalidArgument,
            Some("description"),
            c.create_volume(cv(&|r| r.description = "a\u{7}b".into()))
        );
        case!(
            "create: description too long",
            InvalidArgument,
            Some("description"),
            c.create_volume(cv(&|r| r.description = "x".repeat(5000)))
        );
        case!(
            "create: domain with a path separator",
            InvalidArgument,
            Some("domain"),
            c.create_volume(cv(&|r| r.domain = "../it".into()))
        );
        case!(
            "create: unknown domain",
            NotFound,
            None,
            c.create_volume(cv(&|r| r.domain = "nope".into()))
        );
        case!(
            "create: tag names a volume",
            InvalidArgument,
            Some("tag.volume"),
            c.create_volume(cv(&|r| r.tag.as_mut().unwrap().volume = vol.clone()))
        );
        case!(
            "create: bad tag option",
            InvalidArgument,
            Some("options"),
            c.create_volume(cv(&|r| r.tag.as_mut().unwrap().options =
                vec![pb::KeyValue {
                    key: "a/b".into(),
                    value: "x".into()
                }]))
        );
        case!(
            "create: control character in request id",
            InvalidArgument,
            Some("request_id"),
            c.create_volume(cv(&|r| r.request_id = "a\nb".into()))
        );
        case!(
            "get volume: malformed id",
            InvalidArgument,
            Some("volume_id"),
            c.get_volume(pb::GetVolumeRequest {
                volume_id: "x/y".into(),
                ..Default::default()
            })
        );
        case!(
            "get volume: a tag id",
            InvalidArgument,
            Some("volume_id"),
            c.get_volume(pb::GetVolumeRequest {
                volume_id: disk.clone(),
                ..Default::default()
            })
        );
        case!(
            "get volume: missing",
            NotFound,
            None,
            c.get_volume(pb::GetVolumeRequest {
                volume_id: missing_vol.clone(),
                ..Default::default()
            })
        );
        case!(
            "update volume: unknown legality",
            InvalidArgument,
            Some("legality"),
            c.update_volume(pb::UpdateVolumeRequest {
                volume_id: vol.clone(),
                legality: 5,
                ..Default::default()
            })
        );
        case!(
            "update volume: unknown lock",
            NotFound,
            None,
            c.update_volume(pb::UpdateVolumeRequest {
                volume_id: vol.clone(),
                legality: 1,
                lock_id: "nope".into(),
                ..Default::default()
            })
        );
        case!(
            "update volume: control character",
            InvalidArgument,
            Some("description"),
            c.update_volume(pb::UpdateVolumeRequest {
                volume_id: vol.clone(),
                legality: 1,
                description: "\u{1b}[31m".into(),
                ..Default::default()
            })
        );
        case!(
            "delete volume: empty id",
            InvalidArgument,
            Some("volume_id"),
            c.delete_volume(pb::DeleteVolumeRequest::default())
        );
        case!(
            "delete volume: missing",
            NotFound,
            None,
            c.delete_volume(pb::DeleteVolumeRequest {
                volume_id: missing_vol.clone(),
                ..Default::default()
            })
        );
        case!(
            "delete volume: tagged",
            FailedPrecondition,
            None,
            c.delete_volume(pb::DeleteVolumeRequest {
                volume_id: vol.clone(),
                ..Default::default()
            })
        );
        case!(
            "extend: shrink",
            InvalidArgument,
            Some("capacity"),
            c.extend_volume(pb::ExtendVolumeRequest {
                volume_id: vol.clone(),
                capacity: 1 << 20,
                ..Default::default()
            })
        );
        case!(
            "extend: zero",
            InvalidArgument,
            Some("capacity"),
            c.extend_volume(pb::ExtendVolumeRequest {
                volume_id: vol.clone(),
                capacity: 0,
                ..Default::default()
            })
        );
        case!(
            "extend: absurd",
            InvalidArgument,
            Some("capacity"),
            c.extend_volume(pb::ExtendVolumeRequest {
                volume_id: vol.clone(),
                capacity: u64::MAX - 511,
                ..Default::default()
            })
        );
        case!(
            "extend: missing",
            NotFound,
            None,
            c.extend_volume(pb::ExtendVolumeRequest {
                volume_id: missing_vol.clone(),
                capacity: 1 << 30,
                ..Default::default()
            })
        );
        case!(
            "lock: missing",
            NotFound,
            None,
            c.lock_volume(pb::LockVolumeRequest {
                volume_id: missing_vol.clone(),
                ..Default::default()
            })
        );
        case!(
            "unlock: empty",
            InvalidArgument,
            Some("lock_id"),
            c.unlock_volume(pb::UnlockVolumeRequest::default())
        );
        case!(
            "measure: unknown format",
            InvalidArgument,
            Some("target_format"),
            c.measure_volume(pb::MeasureVolumeRequest {
                volume_id: vol.clone(),
                target_format: 3,
                ..Default::default()
            })
        );
        case!(
            "check: malformed",
            InvalidArgument,
            Some("volume_id"),
            c.check_volume(pb::CheckVolumeRequest {
                volume_id: "\u{0}".into(),
                ..Default::default()
            })
        );
        case!(
            "create tag: no spec",
            InvalidArgument,
            Some("tag"),
            c.create_tag(pb::CreateTagRequest::default())
        );
        case!(
            "create tag: missing volume",
            NotFound,
            None,
            c.create_tag(pb::CreateTagRequest {
                tag: Some(pb::TagSpec {
                    volume: missing_vol.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
        );
        case!(
            "create tag: unknown type",
            InvalidArgument,
            Some("tag.type"),
            c.create_tag(pb::CreateTagRequest {
                tag: Some(pb::TagSpec {
                    volume: vol.clone(),
                    r#type: 8,
                    ..Default::default()
                }),
                ..Default::default()
            })
        );
        case!(
            "get tag: a volume id",
            InvalidArgument,
            Some("tag_id"),
            c.get_tag(pb::GetTagRequest {
                tag_id: vol.clone(),
                ..Default::default()
            })
        );
        case!(
            "change tag: missing",
            NotFound,
            None,
            c.change_tag(pb::ChangeTagRequest {
                tag_id: missing_tag.clone(),
                tag: Some(pb::TagSpec {
                    volume: vol.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
        );
        case!(
            "change tag: unknown state",
            InvalidArgument,
            Some("tag.state"),
            c.change_tag(pb::ChangeTagRequest {
                tag_id: disk.clone(),
                tag: Some(pb::TagSpec {
                    volume: vol.clone(),
                    state: 4,
                    ..Default::default()
                }),
                ..Default::default()
            })
        );
        case!(
            "delete tag: missing",
            NotFound,
            None,
            c.delete_tag(pb::DeleteTagRequest {
                tag_id: missing_tag.clone(),
                ..Default::default()
            })
        );
        case!(
            "user data: name with a path separator",
            InvalidArgument,
            Some("name"),
            c.set_user_data(pb::SetUserDataRequest {
                tag_id: disk.clone(),
                name: "a/b".into(),
                data: vec![1],
                ..Default::default()
            })
        );
        case!(
            "user data: name with a control character",
            InvalidArgument,
            Some("name"),
            c.set_user_data(pb::SetUserDataRequest {
                tag_id: disk.clone(),
                name: "a\tb".into(),
                data: vec![1],
                ..Default::default()
            })
        );
        case!(
            "user data: over the limit",
            InvalidArgument,
            Some("user_data"),
            c.set_user_data(pb::SetUserDataRequest {
                tag_id: disk.clone(),
                name: "big".into(),
                data: vec![7; 2 << 20],
                ..Default::default()
            })
        );
        case!(
            "user data: missing tag",
            NotFound,
            None,
            c.set_user_data(pb::SetUserDataRequest {
                tag_id: missing_tag.clone(),
                name: "a".into(),
                data: vec![1],
                ..Default::default()
            })
        );
        case!(
            "user data: missing item",
            NotFound,
            None,
            c.get_user_data(pb::GetUserDataRequest {
                tag_id: disk.clone(),
                name: "nope".into(),
                ..Default::default()
            })
        );
        case!(
            "user data: remove bad name",
            InvalidArgument,
            Some("name"),
            c.remove_user_data(pb::RemoveUserDataRequest {
                tag_id: disk.clone(),
                name: "".into(),
                ..Default::default()
            })
        );
        case!(
            "snapshot: missing tag",
            NotFound,
            None,
            c.snapshot(pb::SnapshotRequest {
                tag_id: missing_tag.clone(),
                ..Default::default()
            })
        );
        case!(
            "snapshot: weak tag",
            FailedPrecondition,
            None,
            c.snapshot(pb::SnapshotRequest {
                tag_id: weak.clone(),
                ..Default::default()
            })
        );
        case!(
            "snapshot: control character",
            InvalidArgument,
            Some("description"),
            c.snapshot(pb::SnapshotRequest {
                tag_id: disk.clone(),
                description: "\u{0}".into(),
                ..Default::default()
            })
        );
        case!(
            "activate: malformed",
            InvalidArgument,
            Some("tag_id"),
            c.activate(pb::ActivateRequest {
                tag_id: "../x".into(),
                ..Default::default()
            })
        );
        case!(
            "activate: missing",
            NotFound,
            None,
            c.activate(pb::ActivateRequest {
                tag_id: missing_tag.clone(),
                ..Default::default()
            })
        );
        case!(
            "deactivate: malformed",
            InvalidArgument,
            Some("tag_id"),
            c.deactivate(pb::DeactivateRequest {
                tag_id: "".into(),
                ..Default::default()
            })
        );
    });
    let mut bad = Vec::new();
    for ((name, code, field), st) in &cases {
        if st.code() != *code {
            bad.push(format!(
                "{name}: {:?} ({}) instead of {code:?}",
                st.code(),
                st.message()
            ));
            continue;
        }
        use tonic_types::StatusExt;
        let info = st.get_details_error_info();
        if info.is_none() {
            bad.push(format!("{name}: no error info"));
        }
        if let Some(f) = field {
            let br = st.get_details_bad_request();
            let named = br
                .as_ref()
                .is_some_and(|b| b.field_violations.iter().any(|v| v.field == *f));
            if !named || !st.message().contains(f) {
                bad.push(format!(
                    "{name}: field {f} not named in {:?} / {:?}",
                    st.message(),
                    br
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} cases wrong:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
    let after = domain_state(&dom);
    assert_eq!(before.1, after.1, "the domain's dump changed");
    assert!(before.0 == after.0, "the domain's metadata bytes changed");
    eprintln!("{} bad requests refused, domain unchanged", cases.len());
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn root_agent_refuses_to_deactivate_what_is_in_use_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 2);
    let agent = AgentProc::start(&dom, dir.path());
    rt().block_on(async {
        let mut c = agent.client().await;
        let disk = c
            .create_volume(disk_request("c", pb::VolumeFormat::Raw, 8))
            .await
            .unwrap()
            .into_inner()
            .tag
            .unwrap();
        let snap = c
            .snapshot(pb::SnapshotRequest {
                request_id: "s".into(),
                tag_id: disk.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let weak = snap.parent_tag.unwrap();
        let top = c
            .activate(activate_req("a", &disk.id))
            .await
            .unwrap()
            .into_inner()
            .activation
            .unwrap();
        c.activate(activate_req("a2", &weak.id)).await.unwrap();
        // The disk's chain goes through the weak tag's volume.
        let e = c
            .deactivate(pb::DeactivateRequest {
                request_id: "d1".into(),
                tag_id: weak.id.clone(),
                ..Default::default()
            })
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
            .deactivate(pb::DeactivateRequest {
                request_id: "d2".into(),
                tag_id: disk.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("open by process"), "{}", e.message());
        assert!(Path::new(&top.path).exists());
        // Forced, it goes (the kernel detaches once the holder closes).
        let r = c
            .deactivate(pb::DeactivateRequest {
                request_id: "d3".into(),
                tag_id: disk.id.clone(),
                force: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.changed);
        assert!(!Path::new(&top.path).exists());
        let _ = holder.kill();
        let _ = holder.wait();
        c.deactivate(pb::DeactivateRequest {
            request_id: "d4".into(),
            tag_id: weak.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_extend_in_place_or_resource_exhausted_and_measure() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let agent = AgentProc::start(&dom, dir.path());
    rt().block_on(async {
        let mut c = agent.client().await;
        let a = c
            .create_volume(disk_request("a", pb::VolumeFormat::Qcow2, 16))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let b = c
            .create_volume(disk_request("b", pb::VolumeFormat::Raw, 16))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        // b is last: it grows in place.
        let r = c
            .extend_volume(pb::ExtendVolumeRequest {
                request_id: "x1".into(),
                volume_id: b.id.clone(),
                capacity: 32 << 20,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.changed);
        let v = r.volume.unwrap();
        assert_eq!((v.capacity, v.extent_start), (32 << 20, b.extent_start));
        // a is followed by b: no room in place.
        let before = domain_state(&dom);
        let e = c
            .extend_volume(pb::ExtendVolumeRequest {
                request_id: "x2".into(),
                volume_id: a.id.clone(),
                capacity: 64 << 20,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
        use tonic_types::StatusExt;
        assert_eq!(
            e.get_details_error_info().unwrap().reason,
            "extents_exhausted"
        );
        assert!(
            before == domain_state(&dom),
            "a refused extend changed the domain"
        );
        // A qcow2 grows its virtual size within the slack of its run (a
        // header rewrite), and stays a valid image.
        let r = c
            .extend_volume(pb::ExtendVolumeRequest {
                request_id: "x3".into(),
                volume_id: a.id.clone(),
                capacity: (16 << 20) + (512 << 10),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let grown = r.volume.unwrap();
        assert_eq!(grown.capacity, (16 << 20) + (512 << 10));
        assert_eq!(grown.extent_count, a.extent_count, "the run moved or grew");
        let chk = c
            .check_volume(pb::CheckVolumeRequest {
                volume_id: a.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(chk.clean, "{}", chk.report_json);
        let m = c
            .measure_volume(pb::MeasureVolumeRequest {
                volume_id: b.id.clone(),
                target_format: pb::VolumeFormat::Qcow2 as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // An empty raw volume needs only qcow2 metadata; fully written, all.
        assert!(m.required < 1 << 20, "{m:?}");
        assert!(m.fully_allocated > 32 << 20, "{m:?}");
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_serves_health_and_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let agent = AgentProc::start(&dom, dir.path());
    rt().block_on(async {
        let ch = cairn_proto::transport::channel(&cairn_proto::transport::Target::Unix(
            agent.socket.clone(),
        ))
        .await
        .unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let st = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "cairn.agent.v1.Agent".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            st.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut r = ServerReflectionClient::new(ch);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut s = r
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = s.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(l)) = resp.message_response else {
            panic!("unexpected reflection answer {resp:?}");
        };
        let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"cairn.agent.v1.Agent".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"grpc.health.v1.Health".to_string()),
            "{names:?}"
        );
    });
}

#[test]
fn agent_client_locks_exclude_others_until_unlocked() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let agent = AgentProc::start(&dom, dir.path());
    rt().block_on(async {
        let mut c = agent.client().await;
        let mut req = disk_request("v", pb::VolumeFormat::Raw, 4);
        req.tag = None;
        req.keep_locked = true;
        let r = c.create_volume(req).await.unwrap().into_inner();
        let v = r.volume.unwrap();
        assert!(!r.lock_id.is_empty(), "keep_locked gave no lock id");
        // With the lock id the holder changes the volume at once.
        let u = c
            .update_volume(pb::UpdateVolumeRequest {
                request_id: "u1".into(),
                volume_id: v.id.clone(),
                description: "mine".into(),
                legality: pb::Legality::Legal as i32,
                lock_id: r.lock_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(u.volume.unwrap().description, "mine");
        // Without it, a change waits for the lock and gives up (ABORTED
        // after the agent's 5 s lock timeout).
        let t = std::time::Instant::now();
        let e = c
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: "d1".into(),
                volume_id: v.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted, "{}", e.message());
        assert!(t.elapsed().as_secs_f64() > 4.0);
        // Someone else's lock id does not fit this volume.
        let other = c
            .create_volume(disk_request("w", pb::VolumeFormat::Raw, 4))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let e = c
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: "d2".into(),
                volume_id: other.id.clone(),
                lock_id: r.lock_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        let un = c
            .unlock_volume(pb::UnlockVolumeRequest {
                lock_id: r.lock_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(un.released);
        let again = c
            .unlock_volume(pb::UnlockVolumeRequest {
                lock_id: r.lock_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!again.released);
        // Now anyone may delete it; LockVolume takes it again on request.
        let l = c
            .lock_volume(pb::LockVolumeRequest {
                request_id: "l".into(),
                volume_id: v.id.clone(),
                lease_seconds: 60,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(l.token > 0);
        c.delete_volume(pb::DeleteVolumeRequest {
            request_id: "d3".into(),
            volume_id: v.id.clone(),
            lock_id: l.lock_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_rebase_changes_the_parent_and_refuses_loops() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let agent = AgentProc::start(&dom, dir.path());
    rt().block_on(async {
        let mut c = agent.client().await;
        let base = c
            .create_volume(disk_request("a", pb::VolumeFormat::Raw, 4))
            .await
            .unwrap()
            .into_inner();
        let base_tag = base.tag.unwrap();
        let mut q = disk_request("q", pb::VolumeFormat::Qcow2, 4);
        q.parent_tag = base_tag.id.clone();
        let q = c.create_volume(q).await.unwrap().into_inner();
        let qv = q.volume.unwrap();
        let q_tag = q.tag.unwrap();
        assert_eq!(qv.parent_tag, base_tag.id);
        let r = c
            .create_volume(disk_request("r", pb::VolumeFormat::Qcow2, 4))
            .await
            .unwrap()
            .into_inner();
        let (rv, r_tag) = (r.volume.unwrap(), r.tag.unwrap());
        let upd = |id: &str, parent: &str, rid: &str| pb::UpdateVolumeRequest {
            request_id: rid.into(),
            volume_id: id.into(),
            legality: pb::Legality::Legal as i32,
            description: "disk".into(),
            set_parent: true,
            parent_tag: parent.into(),
            ..Default::default()
        };
        // A raw volume cannot get a parent.
        let e = c
            .update_volume(upd(&base.volume.unwrap().id, &r_tag.id, "u0"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        // Rebase q onto r.
        let u = c
            .update_volume(upd(&qv.id, &r_tag.id, "u1"))
            .await
            .unwrap()
            .into_inner();
        assert!(u.changed);
        assert_eq!(u.volume.unwrap().parent_tag, r_tag.id);
        // r onto q's tag would be a loop (q's chain goes through r).
        let e = c
            .update_volume(upd(&rv.id, &q_tag.id, "u2"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("loop"), "{}", e.message());
        // The old parent's child count went down, the new one's up.
        let t = c
            .get_tag(pb::GetTagRequest {
                tag_id: base_tag.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.child_refs, 0);
        let t = c
            .get_tag(pb::GetTagRequest {
                tag_id: r_tag.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.child_refs, 1);
        // No parent at all.
        let u = c
            .update_volume(upd(&qv.id, "", "u3"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(u.volume.unwrap().parent_tag, "");
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_delete_disk_reclaims_what_only_it_references() {
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let agent = AgentProc::start(&dom, dir.path());
    rt().block_on(async {
        let mut c = agent.client().await;
        let disk = c
            .create_volume(disk_request("d", pb::VolumeFormat::Raw, 4))
            .await
            .unwrap()
            .into_inner()
            .tag
            .unwrap();
        let mut weak = Vec::new();
        for i in 0..3 {
            let s = c
                .snapshot(pb::SnapshotRequest {
                    request_id: format!("s{i}"),
                    tag_id: disk.id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            weak.push(s.parent_tag.unwrap().id);
        }
        // A thin clone on the first snapshot's weak tag keeps that part of
        // the chain alive.
        let mut clone = disk_request("clone", pb::VolumeFormat::Qcow2, 4);
        clone.parent_tag = weak[0].clone();
        let clone = c
            .create_volume(clone)
            .await
            .unwrap()
            .into_inner()
            .tag
            .unwrap();
        let counts = |c: &mut cairn_agent::pb::agent_client::AgentClient<_>| {
            let mut c = c.clone();
            async move {
                let v = c
                    .list_volumes(pb::ListVolumesRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .volumes
                    .len();
                let t = c
                    .list_tags(pb::ListTagsRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .tags
                    .len();
                (v, t)
            }
        };
        assert_eq!(counts(&mut c).await, (5, 5));
        let r = c
            .delete_disk(pb::DeleteDiskRequest {
                request_id: "del".into(),
                tag_id: disk.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // The disk, its top three volumes and the two upper weak tags go;
        // the base and its weak tag stay for the clone.
        assert_eq!(r.tags_removed.len(), 3, "{r:?}");
        assert_eq!(r.volumes_removed.len(), 3, "{r:?}");
        assert!(!r.tags_removed.contains(&weak[0]));
        assert_eq!(counts(&mut c).await, (2, 2));
        let r = c
            .delete_disk(pb::DeleteDiskRequest {
                request_id: "del2".into(),
                tag_id: clone.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.tags_removed.len(), r.volumes_removed.len()),
            (2, 2),
            "{r:?}"
        );
        assert_eq!(counts(&mut c).await, (0, 0));
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_preallocated_volumes_own_their_blocks() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let agent = AgentProc::start(&dom, dir.path());
    let blocks = || std::fs::metadata(&dom).unwrap().blocks() * 512;
    rt().block_on(async {
        let mut c = agent.client().await;
        for (i, f) in [pb::VolumeFormat::Raw, pb::VolumeFormat::Qcow2]
            .into_iter()
            .enumerate()
        {
            let before = blocks();
            let mut sparse = disk_request(&format!("s{i}"), f, 32);
            sparse.tag = None;
            c.create_volume(sparse).await.unwrap();
            let mid = blocks();
            let mut pre = disk_request(&format!("p{i}"), f, 32);
            pre.tag = None;
            pre.allocation = pb::Allocation::Preallocated as i32;
            let v = c
                .create_volume(pre)
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            assert_eq!(v.allocation, pb::Allocation::Preallocated as i32);
            let after = blocks();
            // A sparse volume costs next to nothing; a preallocated one its
            // whole run.
            assert!(mid - before < 4 << 20, "{f:?} sparse took {}", mid - before);
            assert!(
                after - mid >= 32 << 20,
                "{f:?} preallocated took {}",
                after - mid
            );
        }
    });
    drop(agent);
    domain_clean(&dom);
}
