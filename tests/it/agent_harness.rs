//! A real `cairn-agent` process on a domain file, and a gRPC client to it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cairn_agent::pb;
use cairn_agent::pb::agent_client::AgentClient;
use cairn_domain::io::FileDev;
use cairn_domain::*;
use cairn_proto::transport::{agent_client as connect, Target};
use tonic::transport::Channel;

use crate::common::agent_bin;

/// A runtime for driving the async client from plain tests.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Format a sparse domain file of `gib` GiB.
pub fn make_domain(path: &Path, gib: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(gib << 30)
        .unwrap();
    let dev = FileDev::open(path, true).unwrap();
    let params = FormatParams {
        name: "it".into(),
        host_slots: Some(4),
        volume_slots: Some(1024),
        tag_slots: Some(1024),
        extent_size: Some(1 << 20),
        ..Default::default()
    };
    format(&dev, &params, false, &MemLockService::new(), &SystemClock).unwrap();
}

/// A running agent.
pub struct AgentProc {
    child: Option<Child>,
    /// Scratch directory (socket, run dir, locks).
    pub dir: PathBuf,
    /// Domain file.
    pub domain: PathBuf,
    /// Unix socket.
    pub socket: PathBuf,
    /// Metrics address.
    pub metrics: String,
}

impl AgentProc {
    /// Start an agent on `domain`, its files under `dir`; `dir/io` is its
    /// import/export directory.
    pub fn start(domain: &Path, dir: &Path) -> AgentProc {
        AgentProc::start_with(domain, dir, &[])
    }

    /// Start with more arguments (e.g. `--etcd URL --host-id ID`).
    pub fn start_with(domain: &Path, dir: &Path, extra: &[String]) -> AgentProc {
        AgentProc::start_with_env(domain, dir, extra, &[])
    }

    /// Start with more environment variables.
    pub fn start_with_env(
        domain: &Path,
        dir: &Path,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> AgentProc {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("agent.sock");
        let io = dir.join("io");
        std::fs::create_dir_all(&io).unwrap();
        let mut child = Command::new(agent_bin())
            .arg("--io-dir")
            .arg(&io)
            .arg("--domain")
            .arg(domain)
            .arg("--socket")
            .arg(&socket)
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--lock-dir")
            .arg(dir.join("locks"))
            .args(["--metrics", "127.0.0.1:0"])
            .args(if extra.iter().any(|a| a == "--lock-timeout") {
                &[][..]
            } else {
                &["--lock-timeout", "5"][..]
            })
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            // Its own process group: pausing the group pauses the agent
            // with its qemu-img children, as a frozen host would be.
            .process_group(0)
            .spawn()
            .expect("spawn cairn-agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(!line.is_empty(), "cairn-agent exited before it was ready");
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line");
        AgentProc {
            child: Some(child),
            dir: dir.to_path_buf(),
            domain: domain.to_path_buf(),
            socket,
            metrics: ready["metrics"].as_str().unwrap_or_default().to_string(),
        }
    }

    /// The import/export directory.
    pub fn io_dir(&self) -> PathBuf {
        self.dir.join("io")
    }

    /// The run directory.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// A connected client.
    pub async fn client(&self) -> AgentClient<Channel> {
        connect(&Target::Unix(self.socket.clone()))
            .await
            .expect("connect to the agent")
    }

    /// Send a signal (e.g. SIGSTOP, SIGCONT) to the agent and its
    /// children.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child's process group.
            unsafe { libc::kill(-(c.id() as i32), sig) };
        }
    }

    /// Wait up to `timeout` for the agent to exit by itself.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let t = std::time::Instant::now();
        while t.elapsed() < timeout {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().unwrap();
            assert!(st.success(), "agent exited with {st}");
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill();
        detach_loops_of(&self.domain);
    }
}

/// Detach every loop device over `path` (test cleanup).
pub fn detach_loops_of(path: &Path) {
    let Ok(p) = path.canonicalize() else { return };
    let lc = cairn_agent::loopdev::KernelLoop;
    use cairn_agent::loopdev::LoopControl;
    if let Ok(l) = lc.list() {
        for d in l.into_iter().filter(|d| d.backing == p) {
            let _ = lc.detach(d.index);
        }
    }
}

/// Loop devices over `path`.
pub fn loops_of(path: &Path) -> Vec<u32> {
    let p = path.canonicalize().unwrap();
    use cairn_agent::loopdev::LoopControl;
    cairn_agent::loopdev::KernelLoop
        .list()
        .unwrap()
        .into_iter()
        .filter(|d| d.backing == p)
        .map(|d| d.index)
        .collect()
}

/// A raw or qcow2 volume request with a strong mutable tag.
pub fn disk_request(id: &str, format: pb::VolumeFormat, mib: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        request_id: id.into(),
        format: format as i32,
        capacity: mib << 20,
        description: "disk".into(),
        tag: Some(pb::TagSpec {
            mutable: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Run a command; panic with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The domain's offline check, through the library.
pub fn domain_clean(path: &Path) {
    let dev = FileDev::open(path, false).unwrap();
    crate::common::assert_clean(&dev);
}

/// Follow a job until it ends.
pub async fn wait_job(c: &mut AgentClient<Channel>, job: pb::Job) -> pb::Job {
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

/// Write `len` bytes of a file: random-looking data in the first `data`
/// bytes of every `stride` (multiples of 8), zeros elsewhere (written, not
/// holes).
pub fn pattern_file(path: &Path, len: u64, stride: u64, data: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut pos = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        for (i, w) in buf[..n].chunks_mut(8).enumerate() {
            let at = pos + 8 * i as u64;
            if at % stride < data {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x.to_le_bytes();
                w.copy_from_slice(&b[..w.len()]);
            } else {
                w.fill(0);
            }
        }
        f.write_all(&buf[..n]).unwrap();
        pos += n as u64;
    }
    f.flush().unwrap();
}

/// The domain as bytes (all metadata, journals included) and as a dump.
pub fn domain_state(path: &Path) -> (Vec<u8>, String) {
    let dev = cairn_domain::io::FileDev::open(path, false).unwrap();
    let (g, _) = cairn_domain::engine::read_superblocks(&dev).unwrap();
    let mut meta = cairn_domain::io::AlignedBuf::zeroed(g.data_off as usize);
    use cairn_domain::io::BlockDev;
    dev.read_at(&mut meta, 0).unwrap();
    let d = cairn_domain::check::dump(&dev).unwrap();
    (meta.to_vec(), serde_json::to_string(&d).unwrap())
}
