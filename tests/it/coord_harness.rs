//! A real `cairn-coordinator` process, a client to it, and helpers to look
//! at disks' data through an agent's activation with qemu-img.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cairn_agent::pb as apb;
use cairn_agent::pb::agent_client::AgentClient;
use cairn_coordinator::pb;
use cairn_coordinator::pb::coordinator_client::CoordinatorClient;
use cairn_domain::io::FileDev;
use cairn_domain::*;
use cairn_proto::transport::{channel, Target};
use tonic::transport::Channel;

use crate::agent_harness::run;
use crate::common::built_bin;

/// The `cairn-coordinator` binary, built if missing.
pub fn coordinator_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    built_bin(&BUILT, "cairn-coordinator", "cairn-coordinator")
}

/// Format a sparse domain file of `gib` GiB named `name`.
pub fn make_named_domain(path: &Path, gib: u64, name: &str) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(gib << 30)
        .unwrap();
    let dev = FileDev::open(path, true).unwrap();
    let params = FormatParams {
        name: name.into(),
        host_slots: Some(8),
        volume_slots: Some(1024),
        tag_slots: Some(1024),
        extent_size: Some(1 << 20),
        ..Default::default()
    };
    format(&dev, &params, false, &MemLockService::new(), &SystemClock).unwrap();
}

/// A running coordinator.
pub struct CoordProc {
    child: Option<Child>,
    /// Unix socket.
    pub socket: PathBuf,
}

impl CoordProc {
    /// Start a coordinator with its socket and state under `dir`.
    pub fn start(dir: &Path, extra: &[String]) -> CoordProc {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("coordinator.sock");
        let mut child = Command::new(coordinator_bin())
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen", "127.0.0.1:0", "--duty-interval", "1"])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn cairn-coordinator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            !line.is_empty(),
            "cairn-coordinator exited before it was ready"
        );
        let _: serde_json::Value = serde_json::from_str(&line).expect("ready line");
        CoordProc {
            child: Some(child),
            socket,
        }
    }

    /// A connected client.
    pub async fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(
            channel(&Target::Unix(self.socket.clone()))
                .await
                .expect("connect to the coordinator"),
        )
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for CoordProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Follow a coordinator job until it ends.
pub async fn finish(mut c: CoordinatorClient<Channel>, job: pb::Job) -> pb::Job {
    if job.state != pb::JobState::Running as i32 {
        return job;
    }
    let mut s = c
        .watch_job(pb::GetJobRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(j) = s.message().await.unwrap() {
        last = Some(j);
    }
    last.expect("a watched job reports at least once")
}

/// Assert a job succeeded and return it.
pub fn ok(j: pb::Job) -> pb::Job {
    assert_eq!(
        j.state,
        pb::JobState::Succeeded as i32,
        "job {} ({}) ended {}: {} {}",
        j.id,
        j.kind,
        j.state,
        j.error_reason,
        j.error_message
    );
    j
}

/// Activate a tag through an agent; returns the top's path.
pub async fn activate(a: &mut AgentClient<Channel>, domain: &str, tag: &str) -> PathBuf {
    let r = a
        .activate(apb::ActivateRequest {
            request_id: String::new(),
            domain: domain.into(),
            tag_id: tag.into(),
        })
        .await
        .unwrap()
        .into_inner();
    PathBuf::from(r.activation.unwrap().path)
}

/// Deactivate a tag through an agent.
pub async fn deactivate(a: &mut AgentClient<Channel>, domain: &str, tag: &str) {
    a.deactivate(apb::DeactivateRequest {
        request_id: String::new(),
        domain: domain.into(),
        tag_id: tag.into(),
        force: false,
    })
    .await
    .unwrap();
}

/// The format qemu sees at `path`.
pub fn qemu_format(path: &Path) -> String {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format"].as_str().unwrap().to_string()
}

/// The virtual size qemu sees at `path`.
pub fn qemu_size(path: &Path) -> u64 {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Assert the image at `path` (its whole chain) reads like the raw file
/// `expected`, and that `qemu-img check` finds a qcow2 image clean.
pub fn assert_reads_like(path: &Path, expected: &Path) {
    let fmt = qemu_format(path);
    run(Command::new("qemu-img")
        .args(["compare", "-f", &fmt, "-F", "raw"])
        .arg(path)
        .arg(expected));
    if fmt == "qcow2" {
        run(Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(path));
    }
}

/// Write `len` bytes of `byte` at `off` through qemu-io into the image at
/// `path` and into the raw file `expected`.
pub fn write_both(path: &Path, expected: &Path, off: u64, len: u64, byte: u8) {
    let fmt = qemu_format(path);
    run(Command::new("qemu-io")
        .args(["-f", &fmt, "-c", &format!("write -P {byte} {off} {len}")])
        .arg(path));
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(expected)
        .unwrap();
    f.write_all_at(&vec![byte; len as usize], off).unwrap();
}

/// A raw file of `len` zero bytes.
pub fn expected_file(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// Activate `disk`, assert it reads like `expected`, deactivate.
pub async fn check_disk(a: &mut AgentClient<Channel>, domain: &str, disk: &str, expected: &Path) {
    let p = activate(a, domain, disk).await;
    assert_reads_like(&p, expected);
    deactivate(a, domain, disk).await;
}
