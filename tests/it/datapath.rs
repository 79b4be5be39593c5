//! Copy, convert, import and export through the agent, checked by
//! qemu-img compare; cancellation; refused paths; SIGKILL mid-copy.

use std::path::Path;
use std::process::Command;

use cairn_agent::pb;

use cairn_tests::agent::*;
use cairn_tests::ask::{self, AgentCalls};
use cairn_tests::data::*;
use cairn_tests::domain::*;
use cairn_tests::Answer;

fn target(format: pb::VolumeFormat, tag: bool) -> Option<pb::TargetSpec> {
    Some(pb::TargetSpec {
        format: format as i32,
        tag: tag.then(|| pb::TagSpec {
            mutable: true,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    run(Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b));
}

/// Importing the raw file `src` as a raw disk (with its tag).
fn raw_disk_from(src: &Path) -> pb::ImportVolumeRequest {
    pb::ImportVolumeRequest {
        request_id: "imp".into(),
        path: src.display().to_string(),
        source_format: pb::VolumeFormat::Raw as i32,
        target: target(pb::VolumeFormat::Raw, true),
        ..Default::default()
    }
}

#[test]
fn root_qemu_agent_import_copy_convert_export_round_trip() {
    let (_dir, dom, agent) = AgentFixture::new(4).parts();
    let io = agent.io_dir();
    let src = io.join("src.raw");
    // 40 MiB + 512: half data, half written zeros, an odd tail.
    pattern_file(&src, (40 << 20) + 512, 1 << 20, 512 << 10, 7);
    rt().block_on(async {
        let mut c = agent.client().await;
        let job = c.import_volume(raw_disk_from(&src)).await.answer();
        assert_eq!(job.kind, "import");
        let j = succeeded(&mut c, job).await;
        assert_eq!(j.done_bytes, j.total_bytes);
        assert!(j.skipped_bytes >= 18 << 20, "zeros were written: {j:?}");
        let raw = j.volume.unwrap();
        let disk = j.tag.unwrap();
        assert_eq!(raw.capacity, (40 << 20) + 512);

        // raw -> qcow2 and raw -> raw copies.
        let mut copies = vec![];
        for (i, f) in [pb::VolumeFormat::Qcow2, pb::VolumeFormat::Raw]
            .into_iter()
            .enumerate()
        {
            let job = c
                .copy_volume(pb::CopyVolumeRequest {
                    request_id: format!("copy{i}"),
                    volume_id: raw.id.clone(),
                    target: target(f, false),
                    ..Default::default()
                })
                .await
                .answer();
            let j = succeeded(&mut c, job).await;
            let v = j.volume.unwrap();
            assert_eq!(v.format, f as i32);
            assert_eq!(v.legality, pb::Legality::Legal as i32);
            copies.push(v);
        }
        // Snapshot the imported disk, write into the top, export the chain.
        let snap = c.snapshot_tag("snap", &disk.id).await;
        let top = snap.volume.unwrap();
        let act = c.activate_tag("act", &disk.id).await;
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 3M 2M"])
            .arg(&act.path));
        let expected_chain = io.join("expected-chain.raw");
        std::fs::copy(&src, &expected_chain).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&expected_chain)
                .unwrap();
            f.write_all_at(&vec![0x5a; 2 << 20], 3 << 20).unwrap();
        }
        let exports = [
            (
                copies[0].id.clone(),
                "copy.qcow2",
                pb::VolumeFormat::Qcow2,
                "qcow2",
                &src,
            ),
            (
                copies[1].id.clone(),
                "copy.raw",
                pb::VolumeFormat::Raw,
                "raw",
                &src,
            ),
            (
                top.id.clone(),
                "chain.raw",
                pb::VolumeFormat::Raw,
                "raw",
                &expected_chain,
            ),
            (
                top.id.clone(),
                "chain.qcow2",
                pb::VolumeFormat::Qcow2,
                "qcow2",
                &expected_chain,
            ),
        ];
        for (i, (vol, name, f, fname, expect)) in exports.iter().enumerate() {
            let out = io.join(name);
            let job = c
                .export_volume(pb::ExportVolumeRequest {
                    request_id: format!("exp{i}"),
                    volume_id: vol.clone(),
                    path: out.display().to_string(),
                    format: *f as i32,
                    ..Default::default()
                })
                .await
                .answer();
            let j = wait_job(&mut c, job).await;
            assert_eq!(j.state, pb::JobState::Succeeded as i32, "{name}: {j:?}");
            assert_eq!(j.path, out.display().to_string());
            compare(&out, fname, expect, "raw");
        }
        // A qcow2 file imports too, into qcow2.
        let job = c
            .import_volume(pb::ImportVolumeRequest {
                request_id: "imp-q".into(),
                path: io.join("chain.qcow2").display().to_string(),
                source_format: pb::VolumeFormat::Qcow2 as i32,
                ..Default::default()
            })
            .await
            .answer();
        let j = succeeded(&mut c, job).await;
        let v = j.volume.unwrap();
        assert_eq!(v.format, pb::VolumeFormat::Qcow2 as i32);
        c.assert_clean(&v.id).await;
        c.deactivate_tag("deact", &disk.id).await;
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_refuses_paths_outside_io_dirs_and_cancels_cleanly() {
    let (dir, dom, agent) = AgentFixture::new(4).parts();
    let io = agent.io_dir();
    let outside = dir.path().join("outside.raw");
    std::fs::write(&outside, vec![1u8; 4096]).unwrap();
    std::os::unix::fs::symlink(&outside, io.join("link.raw")).unwrap();
    std::fs::write(io.join("exists.raw"), b"x").unwrap();
    let big = io.join("big.raw");
    pattern_file(&big, 512 << 20, 1 << 20, 1 << 20, 3);
    rt().block_on(async {
        let mut c = agent.client().await;
        let setup = c.new_disk("v", pb::VolumeFormat::Raw, 4).await.0;
        let before = domain_state(&dom);
        use tonic::Code::*;
        let imp = |p: String| pb::ImportVolumeRequest {
            path: p,
            source_format: pb::VolumeFormat::Raw as i32,
            ..Default::default()
        };
        for (p, code) in [
            (outside.display().to_string(), InvalidArgument),
            (format!("{}/../outside.raw", io.display()), InvalidArgument),
            (io.join("link.raw").display().to_string(), InvalidArgument),
            ("relative.raw".to_string(), InvalidArgument),
            (io.join("missing.raw").display().to_string(), NotFound),
            ("/etc/passwd".to_string(), InvalidArgument),
        ] {
            let e = c.import_volume(imp(p.clone())).await.unwrap_err();
            assert_eq!(e.code(), code, "{p}: {}", e.message());
            if code == InvalidArgument {
                assert!(e.message().contains("path"), "{}", e.message());
            }
        }
        let e = c
            .import_volume(pb::ImportVolumeRequest {
                path: big.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), InvalidArgument, "unspecified source format");
        for (p, code) in [
            (io.join("exists.raw").display().to_string(), AlreadyExists),
            (
                outside.with_file_name("new.raw").display().to_string(),
                InvalidArgument,
            ),
            (io.join("nodir/x.raw").display().to_string(), NotFound),
        ] {
            let e = c
                .export_volume(pb::ExportVolumeRequest {
                    volume_id: setup.id.clone(),
                    path: p.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), code, "{p}: {}", e.message());
        }
        let after = domain_state(&dom);
        assert!(before == after, "a refused request changed the domain");

        // Cancel a long import: it ends CANCELLED and leaves no volume.
        let job = c
            .import_volume(imp(big.display().to_string()))
            .await
            .answer();
        c.cancel_job(pb::CancelJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap();
        let j = wait_job(&mut c, job).await;
        assert_eq!(j.state, pb::JobState::Cancelled as i32, "{j:?}");
        assert!(j.done_bytes < j.total_bytes || j.total_bytes == 0, "{j:?}");
        let vols = c.volumes().await;
        assert_eq!(vols.len(), 1, "a cancelled import left a volume");
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn root_qemu_agent_killed_mid_copy_leaves_target_absent_or_complete() {
    let (dir, dom, mut agent) = AgentFixture::new(8).parts();
    let src = agent.io_dir().join("src.raw");
    pattern_file(&src, 1 << 30, 1 << 20, 1 << 20, 11);
    let rt = rt();
    let (source, disk) = rt.block_on(async {
        let mut c = agent.client().await;
        let job = c.import_volume(raw_disk_from(&src)).await.answer();
        let j = succeeded(&mut c, job).await;
        let disk = j.tag.unwrap();
        c.activate(ask::activate("a", &disk.id)).await.unwrap();
        (j.volume.unwrap(), disk)
    });
    // Start a copy and kill the agent once it is under way.
    rt.block_on(async {
        let mut c = agent.client().await;
        let job = c
            .copy_volume(pb::CopyVolumeRequest {
                request_id: "copy".into(),
                volume_id: source.id.clone(),
                target: target(pb::VolumeFormat::Qcow2, false),
                ..Default::default()
            })
            .await
            .answer();
        loop {
            let j = c.job_now(&job.id).await;
            assert_eq!(
                j.state,
                pb::JobState::Running as i32,
                "finished too soon: {j:?}"
            );
            if j.done_bytes > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    agent.kill();
    // Offline: an open intent or a half-made volume may be there; the
    // restarted agent recovers and cleans up.
    let agent = AgentProc::start(&dom, dir.path());
    rt.block_on(async {
        let mut c = agent.client().await;
        let vols = c.volumes().await;
        for v in &vols {
            assert_eq!(
                v.legality,
                pb::Legality::Legal as i32,
                "half-made volume left: {v:?}"
            );
        }
        assert_eq!(vols.len(), 1, "the killed copy's target survived: {vols:?}");
        let acts = c.activations().await;
        assert_eq!(acts.len(), 1);
        assert_eq!(acts[0].tag_id, disk.id);
        assert!(Path::new(&acts[0].path).exists());
    });
    assert_eq!(loops_of(&dom).len(), 1, "a loop device without a volume");
    drop(agent);
    domain_clean(&dom);
}
