//! `cairn-coordinator`: a coordinator replica.

use std::path::PathBuf;
use std::time::Duration;

use cairn_coordinator::server::{serve, Bound, Cluster, ServeOptions};
use clap::Parser;

/// Cairn coordinator: high-level disk operations (create, snapshot, clone,
/// merge, copy, move, extend, convert) composed from node agent calls.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Unix socket for local clients (the `cairn` CLI).
    #[arg(long, default_value = cairn_proto::transport::COORDINATOR_SOCKET)]
    socket: PathBuf,
    #[command(flatten)]
    tcp: cairn_proto::tls::ListenArgs,
    /// How https:// agents are reached: --ca checks them, --cert/--key is
    /// this coordinator's certificate for agents that require one.
    #[command(flatten)]
    agent_tls: cairn_proto::tls::ClientTlsArgs,
    /// A file whose first line is the bearer token presented to agents
    /// (for agents that know this coordinator by token, not certificate).
    #[arg(long, env = "CAIRN_AGENT_TOKEN_FILE")]
    agent_token_file: Option<PathBuf>,
    #[command(flatten)]
    access: cairn_proto::server::AccessArgs,
    /// etcd client URL (repeat for several): locks, jobs and the agent
    /// registry live there, and replicas elect a leader.
    #[arg(long = "etcd", env = "CAIRN_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    #[command(flatten)]
    etcd_tls: cairn_proto::tls::EtcdTlsArgs,
    /// Without etcd: the agents to use (unix socket paths, http:// or
    /// https:// addresses; default: the local agent's socket).
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// Without etcd: where jobs and locks are kept.
    #[arg(long, default_value = "/var/lib/cairn/coordinator")]
    state_dir: PathBuf,
    /// Seconds of the etcd session lease.
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// Seconds between the leader's rounds of duties.
    #[arg(long, default_value_t = 2)]
    duty_interval: u64,
    /// Seconds an operation waits for a disk another operation holds.
    #[arg(long, default_value_t = 60)]
    lock_wait: u64,
    /// Seconds the records of ended jobs are kept.
    #[arg(long, default_value_t = 86400)]
    job_retention: u64,
    /// Seconds a volume that no tag reaches stays, unchanged, before the
    /// leader reclaims it (a bare volume made through the agent API must
    /// be tagged within this time).
    #[arg(long, default_value_t = 3600)]
    orphan_quarantine: u64,
    /// This replica's id (default: a new UUID per start).
    #[arg(long)]
    id: Option<String>,
    /// Serve the image catalog read-only: every read, no change
    /// (FAILED_PRECONDITION "catalog is read-only").
    #[arg(long)]
    read_only: bool,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    cairn_proto::server::init_logging(a.log_json);
    let id = a.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let cluster = if a.etcd.is_empty() {
        let agents = if a.agents.is_empty() {
            vec![cairn_proto::transport::AGENT_SOCKET.to_string()]
        } else {
            a.agents
        };
        Cluster::Local {
            dir: a.state_dir,
            agents,
        }
    } else {
        let tls = a.etcd_tls.config(&a.etcd)?;
        let mut c = cairn_cluster::EtcdConfig::new(a.etcd, format!("coordinator {id}"));
        c.tls = tls;
        c.ttl = Duration::from_secs(a.lease_ttl.max(2));
        c.margin = (c.ttl / 3).max(Duration::from_secs(1));
        Cluster::Etcd(c)
    };
    let opts = ServeOptions {
        id,
        cluster,
        endpoints: cairn_proto::server::Endpoints {
            socket: Some(a.socket),
            listen: a.tcp.security()?,
            access: a.access,
        },
        agent_tls: a.agent_tls,
        agent_token: match &a.agent_token_file {
            Some(p) => cairn_proto::auth::Bearer::from_file(p).map_err(anyhow::Error::msg)?,
            None => cairn_proto::auth::Bearer::default(),
        },
        duty_interval: Duration::from_secs(a.duty_interval.max(1)),
        lock_wait: Duration::from_secs(a.lock_wait),
        job_retention: Duration::from_secs(a.job_retention),
        orphan_quarantine: Duration::from_secs(a.orphan_quarantine),
        read_only: a.read_only,
    };
    let ready = |b: &Bound| {
        println!(
            "{}",
            serde_json::json!({
                "socket": b.socket,
                "listen": b.listen.map(|a| a.to_string()),
            })
        )
    };
    let shutdown = cairn_proto::server::shutdown_signal()?;
    serve(opts, ready, shutdown).await
}
