//! Coordinator benchmark against a real etcd (Debian's etcd-server, started
//! here on free loopback ports), three node agents sharing one domain file
//! and one coordinator, all talking gRPC over TCP on loopback:
//!
//! - create, snapshot and thin clone through the coordinator, p50 and p99,
//!   with 1 client and with 16 clients on 16 disks, and the throughput
//!   ratio; beside the same snapshot made directly on an agent (the
//!   baseline: what the coordinator adds);
//! - time from SIGKILL of an agent that holds a disk's lock (in the middle
//!   of copying it) to that disk taking a snapshot again through another
//!   agent, against the lease TTL + 5 s.
//!
//! `cargo bench -p cairn-tests --bench coordinator`. CAIRN_BENCH_N:
//! operations per client (default 200 for one client, a quarter of it per
//! client for 16); CAIRN_BENCH_KILLS: SIGKILL samples (default 3);
//! CAIRN_BENCH_TTL: lease TTL in seconds (default 10, the production
//! default).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_proto::agent as apb;
use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::auth::{Bearer, Role};
use cairn_proto::coordinator as pb;
use cairn_proto::coordinator::coordinator_client::CoordinatorClient;
use cairn_tests::bins::{built_bin, spawn_ready, Profile};
use cairn_tests::etcd::Etcd;
use cairn_tests::stats::{cpu_of, env_u64, ms, pct};
use cairn_tests::Answer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Clients that present the bench's admin token (plaintext TCP callers
/// are nobody without one).
type Co = CoordinatorClient<InterceptedService<Channel, Bearer>>;
type Ag = AgentClient<InterceptedService<Channel, Bearer>>;

/// The bench's tokens: an admin for its clients, a service for the
/// coordinator's calls to agents.
static TOKENS: std::sync::OnceLock<cairn_tests::auth::Tokens> = std::sync::OnceLock::new();

fn bearer() -> Bearer {
    Bearer::new(Some(TOKENS.get().expect("tokens made").of("bench"))).unwrap()
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn agent_at(addr: &str) -> Ag {
    AgentClient::with_interceptor(channel(addr).await, bearer())
}

/// CPU per operation: each part and the sum.
fn cpu_line(c: &[Duration; 4]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:.2}/{:.2}/{:.2}/{:.2} = {:.2} ms",
        ms(c[0]),
        ms(c[1]),
        ms(c[2]),
        ms(c[3]),
        ms(c.iter().sum())
    )
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a release server binary; return it and its ready line.
fn start(cmd: &mut Command) -> (Proc, serde_json::Value) {
    let (c, ready) = spawn_ready(cmd, "CAIRN_BENCH_LOG");
    (Proc(c), ready)
}

fn bin(name: &str) -> PathBuf {
    built_bin(name, name, Profile::Release)
}

fn make_domain(path: &Path) {
    let st = Command::new(built_bin("cairn-cli", "cairn", Profile::Release))
        .args(["domain", "format", "--name", "bench", "--size", "256G"])
        .args(["--host-slots", "8", "--lock-dir"])
        .arg(path.with_extension("locks"))
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

struct Cluster {
    _etcd: Etcd,
    agents: Vec<Option<Proc>>,
    agent_addrs: Vec<String>,
    _coord: Proc,
    coord: String,
    dir: PathBuf,
    domain: PathBuf,
    etcd: String,
    ttl: u64,
}

impl Cluster {
    /// CPU used so far by etcd, the agents, the coordinator and this
    /// process (the clients).
    fn cpu(&self) -> [Duration; 4] {
        let of = |p: &Proc| cpu_of(&p.0.id().to_string());
        [
            cpu_of(&self._etcd.pid().map(|p| p.to_string()).unwrap_or_default()),
            self.agents.iter().flatten().map(of).sum(),
            of(&self._coord),
            cpu_of("self"),
        ]
    }

    fn start_agent(&self, n: usize) -> (Proc, String) {
        let d = self.dir.join(format!("agent{n}"));
        std::fs::create_dir_all(&d).unwrap();
        let (p, ready) = start(
            Command::new(bin("cairn-agent"))
                .arg("--domain")
                .arg(&self.domain)
                .arg("--socket")
                .arg(d.join("s.sock"))
                .arg("--run-dir")
                .arg(d.join("run"))
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--insecure",
                    "--etcd",
                    &self.etcd,
                ])
                .arg("--tokens")
                .arg(&TOKENS.get().unwrap().file)
                .args(["--lease-ttl", &self.ttl.to_string()])
                .args([
                    "--host-id",
                    &uuid::Uuid::from_bytes([n as u8 + 1; 16]).to_string(),
                ]),
        );
        (p, format!("http://{}", ready["listen"].as_str().unwrap()))
    }
}

fn cluster(ttl: u64) -> Cluster {
    let dir = std::env::var_os("CAIRN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join(format!("cairn-coord-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = TOKENS.get_or_init(|| {
        cairn_tests::auth::Tokens::make(
            &dir.join("tokens"),
            &[("bench", Role::Admin), ("coordinator", Role::Service)],
        )
    });
    let agent_token = dir.join("coordinator.token");
    std::fs::write(&agent_token, tokens.of("coordinator")).unwrap();
    let etcd_p = Etcd::start_in(&dir);
    let etcd = etcd_p.url();
    let domain = dir.join("domain.img");
    make_domain(&domain);
    let mut c = Cluster {
        _etcd: etcd_p,
        agents: Vec::new(),
        agent_addrs: Vec::new(),
        _coord: Proc(Command::new("true").spawn().unwrap()),
        coord: String::new(),
        dir: dir.clone(),
        domain,
        etcd,
        ttl,
    };
    for n in 0..3 {
        let (p, a) = c.start_agent(n);
        c.agents.push(Some(p));
        c.agent_addrs.push(a);
    }
    let (p, ready) = start(
        Command::new(bin("cairn-coordinator"))
            .arg("--socket")
            .arg(dir.join("coord.sock"))
            .args(["--listen", "127.0.0.1:0", "--insecure", "--etcd", &c.etcd])
            .arg("--tokens")
            .arg(&tokens.file)
            .arg("--agent-token-file")
            .arg(&agent_token)
            .args(["--lease-ttl", &ttl.to_string()]),
    );
    c._coord = p;
    c.coord = format!("http://{}", ready["listen"].as_str().unwrap());
    c
}

async fn coord(c: &Cluster) -> Co {
    CoordinatorClient::with_interceptor(channel(&c.coord).await, bearer())
}

async fn wait_agents(c: &mut Co, n: usize) {
    loop {
        let r = c.list_agents(pb::ListAgentsRequest {}).await.answer();
        if r.agents.iter().filter(|a| a.reachable).count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ok(j: pb::Job) -> pb::Job {
    assert_eq!(j.state, pb::JobState::Succeeded as i32, "{j:?}");
    j
}

async fn create(c: &mut Co) -> String {
    ok(c.create_disk(pb::CreateDiskRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        format: pb::Format::Raw as i32,
        size: 8 << 20,
        ..Default::default()
    })
    .await
    .answer())
    .disk
    .unwrap()
    .id
}

async fn snapshot(c: &mut Co, disk: &str) -> String {
    ok(c.snapshot_disk(pb::SnapshotDiskRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        disk_id: disk.into(),
        ..Default::default()
    })
    .await
    .answer())
    .snapshot_id
}

async fn clone(c: &mut Co, snap: &str) {
    ok(c.clone_disk(pb::CloneDiskRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        source_id: snap.into(),
        ..Default::default()
    })
    .await
    .answer());
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Snapshot,
    Clone,
}

/// `clients` clients doing `n` operations each, each on its own disk.
/// Returns every latency, the wall time and the CPU time used per
/// operation by etcd, the agents, the coordinator and the clients.
async fn run(
    cl: &Cluster,
    op: Op,
    clients: usize,
    n: usize,
) -> (Vec<Duration>, Duration, [Duration; 4]) {
    let mut setup = Vec::new();
    for _ in 0..clients {
        let mut c = coord(cl).await;
        let d = create(&mut c).await;
        let s = snapshot(&mut c, &d).await;
        setup.push((c, d, s));
    }
    let cpu0 = cl.cpu();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (mut c, d, s) in setup {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                match op {
                    Op::Create => {
                        create(&mut c).await;
                    }
                    Op::Snapshot => {
                        snapshot(&mut c, &d).await;
                    }
                    Op::Clone => clone(&mut c, &s).await,
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = t.elapsed();
    let cpu1 = cl.cpu();
    let per_op = std::array::from_fn(|i| (cpu1[i] - cpu0[i]) / all.len() as u32);
    (all, wall, per_op)
}

async fn agent_snapshots(addr: &str, n: usize) -> Vec<Duration> {
    let mut a = agent_at(addr).await;
    let disk = a
        .create_volume(apb::CreateVolumeRequest {
            format: apb::VolumeFormat::Raw as i32,
            capacity: 8 << 20,
            tag: Some(apb::TagSpec {
                mutable: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .answer()
        .tag
        .unwrap()
        .id;
    let mut lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        a.snapshot(apb::SnapshotRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            tag_id: disk.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        lat.push(t.elapsed());
    }
    lat
}

/// Kill an agent holding a disk's volume lock and time until the disk
/// takes a snapshot through the coordinator again.
async fn kill_sample(cl: &mut Cluster, victim: usize) -> Duration {
    let mut c = coord(cl).await;
    wait_agents(&mut c, 3).await;
    let disk = create(&mut c).await;
    let v = c
        .get_disk(pb::GetDiskRequest {
            domain: String::new(),
            disk_id: disk.clone(),
        })
        .await
        .answer();
    let top = v.chain.last().unwrap().volume_id.clone();
    let mut a = agent_at(&cl.agent_addrs[victim]).await;
    // The agent takes the lock of the disk's top volume (a client lock,
    // kept under its session, as during a copy of the disk).
    a.lock_volume(apb::LockVolumeRequest {
        volume_id: top,
        lease_seconds: 600,
        ..Default::default()
    })
    .await
    .unwrap();
    let killed = Instant::now();
    drop(cl.agents[victim].take());
    loop {
        let r = c
            .snapshot_disk(pb::SnapshotDiskRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                disk_id: disk.clone(),
                ..Default::default()
            })
            .await;
        if matches!(&r, Ok(j) if j.get_ref().state == pb::JobState::Succeeded as i32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    let (p, addr) = cl.start_agent(victim);
    cl.agents[victim] = Some(p);
    cl.agent_addrs[victim] = addr;
    took
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_u64("CAIRN_BENCH_N", 200) as usize;
    let kills = env_u64("CAIRN_BENCH_KILLS", 3) as usize;
    let ttl = env_u64("CAIRN_BENCH_TTL", 10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let mut cl = cluster(ttl);
    rt.block_on(async {
        let mut c = coord(&cl).await;
        wait_agents(&mut c, 3).await;
        println!("coordinator over 3 agents and etcd on loopback; lease TTL {ttl} s");
        println!(
            "{:<28} {:>11} {:>11} {:>11} {:>8}   CPU per op: etcd/agents/coordinator/clients",
            "operation", "p50", "p99", "ops/s", "x one"
        );
        let mut base = agent_snapshots(&cl.agent_addrs[0], n).await;
        println!(
            "{:<28} {} {}",
            "agent snapshot (baseline)",
            ms(pct(&mut base, 0.5)),
            ms(pct(&mut base, 0.99))
        );
        for op in [Op::Create, Op::Snapshot, Op::Clone] {
            let (mut one, w1, c1) = run(&cl, op, 1, n).await;
            let ops1 = one.len() as f64 / w1.as_secs_f64();
            let line = |label: &str, lat: &mut [Duration], ops: f64, ratio: String, cpu: &str| {
                let (p50, p99) = (ms(pct(lat, 0.5)), ms(pct(lat, 0.99)));
                println!("{label:<28} {p50} {p99} {ops:>11.1} {ratio:>8}   {cpu}");
            };
            line(
                &format!("{op:?} (1 client)"),
                &mut one,
                ops1,
                String::new(),
                &cpu_line(&c1),
            );
            let (mut many, w16, c16) = run(&cl, op, 16, (n / 4).max(1)).await;
            let ops16 = many.len() as f64 / w16.as_secs_f64();
            let ratio = format!("{:.2}x", ops16 / ops1);
            line(
                &format!("{op:?} (16 clients)"),
                &mut many,
                ops16,
                ratio,
                &cpu_line(&c16),
            );
        }
    });
    let mut rec = Vec::new();
    for i in 0..kills {
        let d = rt.block_on(kill_sample(&mut cl, i % 3));
        println!(
            "SIGKILL of an agent holding a disk -> disk usable again: {:6.2} s",
            d.as_secs_f64()
        );
        rec.push(d);
    }
    if !rec.is_empty() {
        let med = pct(&mut rec, 0.5);
        println!(
            "recovery median {:.2} s; goal: within TTL + 5 s = {} s",
            med.as_secs_f64(),
            ttl + 5
        );
    }
    drop(cl.agents);
    let _ = std::fs::remove_dir_all(&cl.dir);
}
