//! A real `cairn-coordinator` process, a client to it, jobs followed to
//! their end, and disks looked at through an agent's activation.

use crate::Answer;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use cairn_proto::agent as apb;
use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::coordinator as pb;
use cairn_proto::coordinator::coordinator_client::CoordinatorClient;
use cairn_proto::transport::{channel, Target};
use tonic::transport::Channel;

use crate::bins::{coordinator_bin, spawn_ready};
use crate::data::assert_reads_like;

/// A running coordinator.
pub struct CoordProc {
    child: Option<Child>,
    /// Unix socket.
    pub socket: PathBuf,
    /// `http://` address of its gRPC over TCP.
    pub listen: Option<String>,
}

impl CoordProc {
    /// Start a coordinator with its socket and state under `dir`, and a
    /// TCP listener (plaintext unless `extra` has TLS flags).
    pub fn start(dir: &Path, extra: &[String]) -> CoordProc {
        CoordProc::start_cmd(dir, extra, |_| {})
    }

    /// A coordinator in `dir/coord` that uses only `agent`, on its socket.
    pub fn of(dir: &Path, agent: &crate::agent::AgentProc) -> CoordProc {
        let only = ["--agent".into(), agent.socket.display().to_string()];
        CoordProc::start(&dir.join("coord"), &only)
    }

    /// [`CoordProc::start`], logging JSON lines with the audit target to
    /// `log`.
    pub fn start_logging(dir: &Path, extra: &[String], log: &Path) -> CoordProc {
        let f = std::fs::File::create(log).unwrap();
        CoordProc::start_cmd(dir, extra, |c| {
            c.arg("--log-json")
                .env("RUST_LOG", "warn,audit=info")
                .stderr(f);
        })
    }

    fn start_cmd(dir: &Path, extra: &[String], more: impl FnOnce(&mut Command)) -> CoordProc {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("coordinator.sock");
        let tls = extra.iter().any(|a| a == "--tls-cert");
        let mut cmd = Command::new(coordinator_bin());
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen", "127.0.0.1:0", "--duty-interval", "1"])
            .args((!tls).then_some("--insecure"))
            .args(extra);
        more(&mut cmd);
        let (child, ready) = spawn_ready(&mut cmd, "CAIRN_TEST_LOG");
        CoordProc {
            child: Some(child),
            socket,
            listen: ready["listen"]
                .as_str()
                .map(|a| format!("{}://{a}", if tls { "https" } else { "http" })),
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
    crate::last(c.watch_job(pb::GetJobRequest { job_id: job.id }).await).await
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
        .answer();
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

/// Activate `disk`, assert it reads like `expected`, deactivate.
pub async fn check_disk(a: &mut AgentClient<Channel>, domain: &str, disk: &str, expected: &Path) {
    let p = activate(a, domain, disk).await;
    assert_reads_like(&p, expected);
    deactivate(a, domain, disk).await;
}
