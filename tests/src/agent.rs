//! A real `cairn-agent` process on a domain file, a gRPC client to it,
//! and what tests do with agents (loop devices, jobs, requests).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use cairn_proto::agent as pb;
use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::transport::{agent_client as connect, Target};
use tonic::transport::Channel;

use crate::bins::{agent_bin, spawn_ready};

/// A runtime for driving the async client from plain tests.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// An agent on a domain file of its own, in a scratch directory.
pub struct AgentFixture {
    /// The agent (dropped first: it detaches its loop devices while the
    /// domain file is still there).
    pub agent: AgentProc,
    /// The domain file.
    pub domain: PathBuf,
    /// The scratch directory (the agent's files under it).
    pub dir: tempfile::TempDir,
}

impl AgentFixture {
    /// A fresh `gib` GiB domain and an agent on it.
    pub fn new(gib: u64) -> AgentFixture {
        let dir = tempfile::tempdir().unwrap();
        let domain = dir.path().join("domain.img");
        crate::domain::make_domain(&domain, gib);
        let agent = AgentProc::start(&domain, dir.path());
        AgentFixture { agent, domain, dir }
    }

    /// Its parts, in the order that drops them right when bound as
    /// `let (dir, domain, agent) = ...`: the agent first, the directory
    /// last.
    pub fn parts(self) -> (tempfile::TempDir, PathBuf, AgentProc) {
        (self.dir, self.domain, self.agent)
    }
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
    /// `http://` (or, with TLS flags, `https://`) address of its gRPC over
    /// TCP, when it listens on one.
    pub listen: Option<String>,
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
        AgentProc::start_cmd(domain, dir, extra, |c| {
            c.envs(env.iter().copied());
        })
    }

    /// [`AgentProc::start_with`], logging JSON lines with the audit target
    /// to `log`.
    pub fn start_logging(domain: &Path, dir: &Path, extra: &[String], log: &Path) -> AgentProc {
        let f = std::fs::File::create(log).unwrap();
        AgentProc::start_cmd(domain, dir, extra, |c| {
            c.arg("--log-json")
                .env("RUST_LOG", "warn,audit=info")
                .stderr(f);
        })
    }

    fn start_cmd(
        domain: &Path,
        dir: &Path,
        extra: &[String],
        more: impl FnOnce(&mut Command),
    ) -> AgentProc {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("agent.sock");
        let io = dir.join("io");
        std::fs::create_dir_all(&io).unwrap();
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--io-dir")
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
            // Its own process group: pausing the group pauses the agent
            // with its qemu-img children, as a frozen host would be.
            .process_group(0);
        more(&mut cmd);
        let (child, ready) = spawn_ready(&mut cmd, "CAIRN_TEST_LOG");
        AgentProc {
            child: Some(child),
            dir: dir.to_path_buf(),
            domain: domain.to_path_buf(),
            socket,
            metrics: ready["metrics"].as_str().unwrap_or_default().to_string(),
            listen: ready["listen"].as_str().map(|a| {
                let tls = extra.iter().any(|x| x == "--tls-cert");
                format!("{}://{a}", if tls { "https" } else { "http" })
            }),
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

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
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

/// An HTTP GET of `path` on `addr` (the metrics endpoint); the whole
/// response.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
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

/// Follow a job to its end, which must be success.
pub async fn succeeded(c: &mut AgentClient<Channel>, job: pb::Job) -> pb::Job {
    let j = wait_job(c, job).await;
    assert_eq!(j.state, pb::JobState::Succeeded as i32, "{j:?}");
    j
}

/// Follow a job until it ends.
pub async fn wait_job(c: &mut AgentClient<Channel>, job: pb::Job) -> pb::Job {
    crate::last(c.watch_job(pb::GetJobRequest { job_id: job.id }).await).await
}
