//! A cluster on one machine: a real etcd on loopback, agents sharing one
//! domain file, coordinators.

use crate::Answer;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_proto::coordinator as pb;
use cairn_proto::coordinator::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::agent::AgentProc;
use crate::certs::Certs;
use crate::coordinator::{activate, deactivate, ok, CoordProc};
use crate::data::{expected_file, write_both};
use crate::domain::{domain_clean, make_named_domain};
use crate::etcd::Etcd;

/// A mebibyte.
pub const MIB: u64 = 1 << 20;

/// etcd, agents on one domain, coordinators.
pub struct Cluster {
    /// The etcd.
    pub etcd: Etcd,
    /// Scratch directory.
    pub dir: tempfile::TempDir,
    /// The shared domain file.
    pub domain: PathBuf,
    /// The agents, by number.
    pub agents: Vec<AgentProc>,
    /// The coordinators, by number.
    pub coords: Vec<CoordProc>,
    /// Seconds of every session lease.
    pub ttl: u64,
    /// The cluster's certificates: agents and coordinators serve TCP with
    /// mutual TLS, coordinators reach agents as "service".
    pub certs: Certs,
}

/// The host id of agent `n`.
pub fn host_id(n: usize) -> String {
    uuid::Uuid::from_bytes([n as u8 + 1; 16]).to_string()
}

impl Cluster {
    /// Start etcd, `agents` agents and `coords` coordinators (3 s leases).
    pub fn start(agents: usize, coords: usize) -> Cluster {
        Cluster::start_with_ttl(agents, coords, 3)
    }

    /// [`Cluster::start`] with leases of `ttl` seconds.
    pub fn start_with_ttl(agents: usize, coords: usize, ttl: u64) -> Cluster {
        let etcd = Etcd::start();
        let dir = tempfile::tempdir().unwrap();
        let domain = dir.path().join("domain.img");
        make_named_domain(&domain, 4, "shared");
        let certs = Certs::make(&dir.path().join("certs"), &[]);
        let mut c = Cluster {
            etcd,
            dir,
            domain,
            agents: Vec::new(),
            coords: Vec::new(),
            ttl,
            certs,
        };
        for n in 0..agents {
            let a = c.start_agent(n);
            c.agents.push(a);
        }
        for n in 0..coords {
            let p = c.start_coord(n);
            c.coords.push(p);
        }
        c
    }

    /// Start agent `n`.
    pub fn start_agent(&self, n: usize) -> AgentProc {
        self.start_agent_env(n, &[])
    }

    /// Start agent `n` with more environment variables.
    pub fn start_agent_env(&self, n: usize, env: &[(&str, &str)]) -> AgentProc {
        AgentProc::start_with_env(
            &self.domain,
            &self.dir.path().join(format!("agent{n}")),
            &[
                "--etcd".into(),
                self.etcd.url(),
                "--lease-ttl".into(),
                self.ttl.to_string(),
                "--host-id".into(),
                host_id(n),
                "--host-name".into(),
                format!("host{n}"),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--tls-cert".into(),
                self.certs.file("server.pem"),
                "--tls-key".into(),
                self.certs.file("server.key"),
                "--tls-client-ca".into(),
                self.certs.file("ca.pem"),
                "--gc-quarantine".into(),
                "5".into(),
                // Sixteen clients queue on the domain's allocation lock,
                // which etcd does not hand out in order.
                "--lock-timeout".into(),
                "30".into(),
            ],
            env,
        )
    }

    /// Start coordinator `n`.
    pub fn start_coord(&self, n: usize) -> CoordProc {
        let mut args = vec![
            "--etcd".into(),
            self.etcd.url(),
            "--lease-ttl".into(),
            self.ttl.to_string(),
            "--id".into(),
            format!("coord{n}"),
        ];
        args.extend(self.certs.server_args());
        args.extend(self.certs.client_args("service"));
        CoordProc::start(&self.dir.path().join(format!("coord{n}")), &args)
    }

    /// Wait until coordinator `n` sees `count` agents.
    pub async fn wait_agents(&self, n: usize, count: usize) -> CoordinatorClient<Channel> {
        let mut c = self.coords[n].client().await;
        let t = Instant::now();
        loop {
            let r = c.list_agents(pb::ListAgentsRequest {}).await.answer();
            if r.agents.iter().filter(|a| a.reachable).count() == count {
                return c;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "agents: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop every process, then check the domain offline.
    pub fn stop_and_check(mut self) {
        self.coords.clear();
        self.agents.clear();
        domain_clean(&self.domain);
    }

    /// The agent serving host `id`.
    pub fn agent_of(&self, id: &str) -> usize {
        (0..self.agents.len())
            .find(|n| host_id(*n) == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }
}

/// A raw disk of `mib` MiB filled with `byte` (written through agent
/// `a`), and the raw file it should read like.
pub async fn filled_disk(
    c: &mut CoordinatorClient<Channel>,
    a: &AgentProc,
    rid: &str,
    mib: u64,
    byte: u8,
    expected: &Path,
) -> String {
    let j = ok(c
        .create_disk(pb::CreateDiskRequest {
            request_id: rid.into(),
            name: rid.into(),
            format: pb::Format::Raw as i32,
            size: mib * MIB,
            ..Default::default()
        })
        .await
        .answer());
    let disk = j.disk.unwrap().id;
    expected_file(expected, mib * MIB);
    let mut ac = a.client().await;
    let p = activate(&mut ac, "", &disk).await;
    write_both(&p, expected, 0, mib * MIB, byte);
    deactivate(&mut ac, "", &disk).await;
    disk
}

/// A full clone of `source` into qcow2, named after the request.
pub fn full_clone(rid: &str, source: &str) -> pb::CloneDiskRequest {
    pb::CloneDiskRequest {
        request_id: rid.into(),
        source_id: source.into(),
        name: format!("clone-{rid}"),
        full: true,
        format: pb::Format::Qcow2 as i32,
        ..Default::default()
    }
}

/// Cluster locks still held under the domain (host slots of live agents
/// excepted).
pub async fn held_locks(e: &Etcd) -> Vec<String> {
    {
        let mut c = etcd_client::Client::connect([e.url()], None).await.unwrap();
        let r = c
            .get("cairn/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap();
        r.kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .filter(|k| {
                ["/disk/", "/tag/", "/volume/", "/alloc"]
                    .iter()
                    .any(|p| k.contains(p))
            })
            .collect()
    }
}
