//! The file boundary under attack: while an import or export runs, another
//! thread swaps what the io dir names (symlinks to decoys outside it,
//! renamed images, swapped directories). What is imported must be the bytes
//! of the file named at the call; nothing outside the io dir may be read,
//! written, created or removed (checked by the decoys' content and inode).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_agent::pb;
use tonic::transport::Channel;

use cairn_tests::agent::*;
use cairn_tests::domain::*;
use cairn_tests::Answer;

type Client = pb::agent_client::AgentClient<Channel>;

const ROUNDS: usize = 20;
const MIB: usize = 1 << 20;

/// A file outside the io dir that no job may touch: its path, content and
/// inode as they were.
struct Decoy {
    path: PathBuf,
    bytes: Vec<u8>,
    ino: u64,
}

impl Decoy {
    fn new(path: PathBuf, byte: u8) -> Decoy {
        let bytes = vec![byte; MIB];
        std::fs::write(&path, &bytes).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        Decoy { path, bytes, ino }
    }

    fn assert_untouched(&self) {
        let m = std::fs::symlink_metadata(&self.path).expect("the decoy was removed");
        assert_eq!(m.ino(), self.ino, "the decoy {:?} was replaced", self.path);
        assert_eq!(
            std::fs::read(&self.path).unwrap(),
            self.bytes,
            "the decoy was written"
        );
    }
}

/// An agent, its io dir, and a directory beside it (outside) for decoys.
fn beside_the_io_dir() -> (tempfile::TempDir, PathBuf, AgentProc, PathBuf, PathBuf) {
    let (dir, dom, agent) = AgentFixture::new(4).parts();
    let io = agent.io_dir();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    (dir, dom, agent, io, outside)
}

/// The names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Replace `path` with a symlink to `to`, atomically.
fn swap_in_link(path: &Path, to: &Path) {
    let tmp = path.with_extension("swap");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(to, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn import(c: &mut Client, rid: String, path: &Path, f: pb::VolumeFormat) -> pb::Job {
    c.import_volume(pb::ImportVolumeRequest {
        request_id: rid,
        path: path.display().to_string(),
        source_format: f as i32,
        target: Some(pb::TargetSpec {
            format: pb::VolumeFormat::Raw as i32,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .answer()
}

async fn export(
    c: &mut Client,
    rid: String,
    vol: &str,
    path: &Path,
) -> Result<pb::Job, tonic::Status> {
    c.export_volume(pb::ExportVolumeRequest {
        request_id: rid,
        volume_id: vol.into(),
        path: path.display().to_string(),
        format: pb::VolumeFormat::Raw as i32,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

/// The guest-visible bytes of a volume, exported to `out` in the io dir.
async fn contents(c: &mut Client, rid: String, vol: &str, out: &Path) -> Vec<u8> {
    let job = export(c, rid, vol, out).await.unwrap();
    let j = wait_job(c, job).await;
    assert_eq!(j.state, pb::JobState::Succeeded as i32, "{j:?}");
    let b = std::fs::read(out).unwrap();
    std::fs::remove_file(out).unwrap();
    b
}

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

#[test]
fn qemu_agent_imports_the_file_named_at_the_call_whatever_replaces_it() {
    let (_dir, dom, agent, io, outside) = beside_the_io_dir();
    let secret = Decoy::new(outside.join("secret.raw"), 0xd0);
    // A qcow2 whose guest data is the secret, through an external raw data
    // file outside the io dir.
    let evil_data = Decoy::new(outside.join("evil-data.raw"), 0xd1);
    let evil = outside.join("evil.qcow2");
    let data_opt = format!("data_file={},data_file_raw=on", evil_data.path.display());
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &data_opt,
        evil.to_str().unwrap(),
        "1M",
    ]);
    // qemu-img create wrote the data file: take its bytes as they are now.
    let evil_data = Decoy {
        bytes: std::fs::read(&evil_data.path).unwrap(),
        ..evil_data
    };
    let good = vec![0xa1u8; MIB];
    let before_outside = names(&outside);
    rt().block_on(async {
        let mut c = agent.client().await;
        // Named directly, the evil image is refused for what it is.
        std::fs::copy(&evil, io.join("evil.qcow2")).unwrap();
        c.import_volume(pb::ImportVolumeRequest {
            path: io.join("evil.qcow2").display().to_string(),
            source_format: pb::VolumeFormat::Qcow2 as i32,
            ..Default::default()
        })
        .await
        .refused(tonic::Code::InvalidArgument, "external data file");

        for i in 0..ROUNDS {
            // A raw file, replaced by a symlink to the secret as soon as
            // the call returns.
            let raw = io.join(format!("r{i}.raw"));
            std::fs::write(&raw, &good).unwrap();
            let job = import(&mut c, format!("raw{i}"), &raw, pb::VolumeFormat::Raw).await;
            swap_in_link(&raw, &secret.path);
            let j = succeeded(&mut c, job).await;
            let v = j.volume.unwrap().id;
            let got = contents(&mut c, format!("back-raw{i}"), &v, &io.join("back.raw")).await;
            assert!(got == good, "round {i}: the raw import read another file");

            // A harmless qcow2, renamed over by the evil one once checked.
            let q = io.join(format!("q{i}.qcow2"));
            let q_str = q.to_str().unwrap();
            qemu_img(&["create", "-q", "-f", "qcow2", q_str, "1M"]);
            run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0xa1 0 1M", q_str]));
            std::fs::copy(&evil, io.join("evil.qcow2")).unwrap();
            let job = import(&mut c, format!("q{i}"), &q, pb::VolumeFormat::Qcow2).await;
            std::fs::rename(io.join("evil.qcow2"), &q).unwrap();
            let j = succeeded(&mut c, job).await;
            let v = j.volume.unwrap().id;
            let got = contents(&mut c, format!("back-q{i}"), &v, &io.join("back.raw")).await;
            assert!(got == good, "round {i}: the qcow2 import read another file");
        }
    });
    secret.assert_untouched();
    evil_data.assert_untouched();
    assert_eq!(names(&outside), before_outside);
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn qemu_agent_exports_write_and_remove_nothing_outside_the_io_dir() {
    let (_dir, dom, agent, io, outside) = beside_the_io_dir();
    let victim = Decoy::new(outside.join("x.raw"), 0xd0);
    let mut cancelled = 0;
    rt().block_on(async {
        let mut c = agent.client().await;
        // A disk of 256 MiB of data, so an export takes a while.
        let src = io.join("big.raw");
        cairn_tests::data::pattern_file(&src, 256 << 20, 1 << 20, 1 << 20, 5);
        let job = import(&mut c, "big".into(), &src, pb::VolumeFormat::Raw).await;
        let j = succeeded(&mut c, job).await;
        let vol = j.volume.unwrap().id;
        std::fs::remove_file(&src).unwrap();
        let before_outside = names(&outside);
        for i in 0..ROUNDS {
            // A symlink planted at the target, to a file and to nothing.
            let planted = io.join(format!("planted{i}.raw"));
            std::os::unix::fs::symlink(&victim.path, &planted).unwrap();
            let e = export(&mut c, format!("planted{i}"), &vol, &planted)
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
            let dangling = io.join(format!("dangling{i}.raw"));
            let nowhere = outside.join(format!("new{i}.raw"));
            std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
            let e = export(&mut c, format!("dangling{i}"), &vol, &dangling)
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");

            // The target's directory swapped for a symlink to the outside
            // while the export runs, and the export then cancelled: its
            // clean-up must remove its own file, not the victim.
            let sub = io.join(format!("sub{i}"));
            std::fs::create_dir(&sub).unwrap();
            let job = export(&mut c, format!("sub{i}"), &vol, &sub.join("x.raw"))
                .await
                .unwrap();
            let moved = io.join(format!("sub{i}.old"));
            std::fs::rename(&sub, &moved).unwrap();
            std::os::unix::fs::symlink(&outside, &sub).unwrap();
            let _ = c
                .cancel_job(pb::CancelJobRequest {
                    job_id: job.id.clone(),
                })
                .await;
            let j = wait_job(&mut c, job).await;
            if j.state == pb::JobState::Cancelled as i32 {
                cancelled += 1;
                assert!(
                    !moved.join("x.raw").exists(),
                    "a cancelled export left its file"
                );
            } else {
                assert_eq!(j.state, pb::JobState::Succeeded as i32, "{j:?}");
                assert_eq!(
                    std::fs::metadata(moved.join("x.raw")).unwrap().len(),
                    256 << 20
                );
            }
            victim.assert_untouched();
            assert_eq!(
                names(&outside),
                before_outside,
                "round {i} created a file outside"
            );
        }
    });
    // The swap raced a running copy at least once (not a figure to assert
    // tightly: the machine's speed decides how many).
    assert!(
        cancelled > 0,
        "no export was still running when its directory was swapped"
    );
    drop(agent);
    domain_clean(&dom);
}
