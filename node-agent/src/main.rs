//! `cairn-agent`: the node agent daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cairn_agent::server::{serve, Locks, ServeOptions};
use cairn_agent::AgentConfig;
use cairn_proto::server::init_logging;
use clap::Parser;

/// Cairn node agent: serves volume operations on the storage domains this
/// host sees.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A domain device or file to open (repeat for several).
    #[arg(long = "domain", required = true)]
    domains: Vec<PathBuf>,
    /// Unix socket for local clients (the `cairn` CLI).
    #[arg(long, default_value = cairn_proto::transport::AGENT_SOCKET)]
    socket: PathBuf,
    #[command(flatten)]
    tcp: cairn_proto::tls::ListenArgs,
    #[command(flatten)]
    access: cairn_proto::server::AccessArgs,
    /// Serve Prometheus metrics on this TCP address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Where stable volume paths are made.
    #[arg(long, default_value = "/run/cairn")]
    run_dir: PathBuf,
    /// Single-machine lock directory (when no --etcd is given).
    #[arg(long, env = "CAIRN_LOCK_DIR", default_value = "/run/cairn/locks")]
    lock_dir: PathBuf,
    /// etcd client URL (repeat for several): use cluster locks, so that
    /// agents of several hosts can share domains.
    #[arg(long = "etcd", env = "CAIRN_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    #[command(flatten)]
    etcd_tls: cairn_proto::tls::EtcdTlsArgs,
    /// This host's id (default: /etc/machine-id). Only for running several
    /// agents on one machine, as the local cluster script does.
    #[arg(long)]
    host_id: Option<uuid::Uuid>,
    /// This host's name (default: the host name).
    #[arg(long)]
    host_name: Option<String>,
    /// Seconds of the etcd session lease.
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// Seconds an operation waits for a lock.
    #[arg(long, default_value_t = 30)]
    lock_timeout: u64,
    /// A directory whose files may be imported and exported (repeat for
    /// several; none means no import or export).
    #[arg(long = "io-dir")]
    io_dirs: Vec<PathBuf>,
    /// Seconds after a dead host's journal was recovered before the
    /// volumes it half made are removed (a host frozen at its death could
    /// wake and write into them for a moment).
    #[arg(long, default_value_t = 60)]
    gc_quarantine: u64,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    init_logging(a.log_json);
    let mut host = cairn_domain::HostIdentity::local();
    if let Some(id) = a.host_id {
        host.id = id;
    }
    if let Some(n) = &a.host_name {
        host.name = n.clone();
    }
    let opts = ServeOptions {
        agent: AgentConfig {
            domains: a.domains,
            run_dir: a.run_dir,
            host: host.clone(),
            lock_timeout: Duration::from_secs(a.lock_timeout),
            io_dirs: a.io_dirs,
            gc_quarantine: Duration::from_secs(a.gc_quarantine),
        },
        locks: if a.etcd.is_empty() {
            Locks::Local(a.lock_dir)
        } else {
            let tls = a.etcd_tls.config(&a.etcd)?;
            let mut c =
                cairn_cluster::EtcdConfig::new(a.etcd, format!("{} ({})", host.name, host.id));
            c.tls = tls;
            c.ttl = Duration::from_secs(a.lease_ttl.max(2));
            c.margin = (c.ttl / 3).max(Duration::from_secs(1));
            Locks::Etcd(c)
        },
        endpoints: cairn_proto::server::Endpoints {
            socket: Some(a.socket),
            listen: a.tcp.security()?,
            access: a.access,
        },
        metrics: a.metrics,
    };
    // One JSON line on stdout says where we listen (ports may be 0).
    let ready = |b: &cairn_agent::server::Bound| {
        println!(
            "{}",
            serde_json::json!({
                "socket": b.grpc.socket,
                "listen": b.grpc.listen.map(|a| a.to_string()),
                "metrics": b.metrics.map(|a| a.to_string()),
            })
        )
    };
    let shutdown = cairn_proto::server::shutdown_signal()?;
    serve(opts, ready, shutdown).await
}
