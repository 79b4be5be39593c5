//! Running the agent: gRPC on a unix socket and/or TCP, with health
//! checking and reflection, and the metrics endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;

use crate::agent::{Agent, AgentConfig};
use crate::loopdev::KernelLoop;
use crate::metrics::{self, Metrics};
use crate::pb;
use crate::service::AgentService;

/// Which lock service the agent uses.
#[derive(Debug, Clone)]
pub enum Locks {
    /// The single-machine service: lock files in this directory.
    Local(PathBuf),
    /// etcd, for hosts that share domains.
    Etcd(cairn_cluster::EtcdConfig),
}

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The agent.
    pub agent: AgentConfig,
    /// The lock service.
    pub locks: Locks,
    /// Unix socket path (the CLI's default way in).
    pub socket: Option<PathBuf>,
    /// TCP address for remote clients.
    pub listen: Option<SocketAddr>,
    /// TCP address of the Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
}

/// Addresses actually bound (ports may have been 0).
#[derive(Debug, Clone)]
pub struct Bound {
    /// Unix socket.
    pub socket: Option<PathBuf>,
    /// gRPC over TCP.
    pub listen: Option<SocketAddr>,
    /// Metrics.
    pub metrics: Option<SocketAddr>,
}

/// Open the agent and serve until `shutdown` resolves; `ready` gets the
/// bound addresses once clients can connect.
pub async fn serve(
    opts: ServeOptions,
    ready: impl FnOnce(&Bound) + Send,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let choice = opts.locks.clone();
    // The etcd service runs its own runtime; start it off this one.
    let (locks, etcd) = tokio::task::spawn_blocking(move || {
        Ok::<_, cairn_domain::DomainError>(match choice {
            Locks::Local(dir) => (
                Arc::new(cairn_domain::LocalLockService::new(&dir)?)
                    as Arc<dyn cairn_domain::LockService>,
                None,
            ),
            Locks::Etcd(c) => {
                let e = cairn_cluster::EtcdLockService::connect(c)?;
                (
                    Arc::new(e.clone()) as Arc<dyn cairn_domain::LockService>,
                    Some(e),
                )
            }
        })
    })
    .await??;
    let cfg = opts.agent.clone();
    let agent = tokio::task::spawn_blocking(move || Agent::open(&cfg, locks, Arc::new(KernelLoop)))
        .await??;
    let agent = Arc::new(agent);
    let metrics = Arc::new(Metrics::new());
    let svc = AgentService::new(agent.clone(), metrics.clone());

    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::agent_server::AgentServer<AgentService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let router = || {
        tonic::transport::Server::builder()
            .add_service(health_svc.clone())
            .add_service(reflection.clone())
            .add_service(pb::agent_server::AgentServer::new(svc.clone()))
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (socket, listen, mut tasks) = serve_router(
        router,
        opts.socket.as_deref(),
        opts.listen,
        stop_rx,
        "agent",
    )
    .await?;
    let mut bound = Bound {
        socket,
        listen,
        metrics: None,
    };
    let mut metrics_task = None;
    if let Some(addr) = opts.metrics {
        let l = TcpListener::bind(addr).await?;
        bound.metrics = Some(l.local_addr()?);
        metrics_task = Some(tokio::spawn(metrics::serve(l, metrics.clone())));
    }
    if let Some(e) = etcd {
        // Tell the cluster who we are, where we listen and what we see,
        // for as long as our session lives.
        let host = &opts.agent.host;
        let value = serde_json::json!({
            "host_id": host.id,
            "host_name": host.name,
            "instance": agent.instance(),
            "address": bound.listen.map(|a| format!("http://{a}")),
            "domains": agent.domains().iter().map(|o| serde_json::json!({
                "id": o.id(),
                "name": o.name(),
                "path": o.path,
                "host_slot": o.domain.slot(),
                "host_slot_token": o.domain.slot_token(),
            })).collect::<Vec<_>>(),
        })
        .to_string();
        let key = format!("cairn/agents/{}", host.id);
        tokio::task::spawn_blocking(move || e.register(&key, &value)).await??;
    }
    tracing::info!(?bound, "agent serving");
    ready(&bound);
    // A host slot lost for good (the etcd lease expired while we could
    // not reach etcd, or were frozen) cannot be claimed back while this
    // process runs: stop, so that the service manager starts the agent
    // again and it claims a slot anew.
    let watched = agent.clone();
    let lost = async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if let Some(o) = watched.domains().iter().find(|o| o.domain.claim_lost()) {
                return o.name().to_string();
            }
        }
    };
    let mut failure = None;
    tokio::select! {
        _ = shutdown => {}
        name = lost => {
            tracing::error!(domain = %name, "lost this host's slot on the domain for good; stopping so that the agent is started again");
            failure = Some(name);
        }
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(p) = &bound.socket {
        let _ = std::fs::remove_file(p);
    }
    drop(svc);
    match Arc::try_unwrap(agent) {
        Ok(a) => {
            let closed = tokio::task::spawn_blocking(move || a.close()).await?;
            if failure.is_none() {
                closed?;
            }
        }
        Err(_) => tracing::warn!("requests still running at shutdown"),
    }
    if let Some(name) = failure {
        anyhow::bail!("lost the host slot on domain {name} (the etcd lease expired)");
    }
    Ok(())
}

/// Tasks serving gRPC, each ending with its server.
pub type ServerTasks = tokio::task::JoinSet<Result<(), tonic::transport::Error>>;

/// Serve what `router` makes on a unix socket (replacing one a dead
/// process left, refusing one a live process serves) and/or a TCP address,
/// until `stop` turns true. Returns the socket and the bound address.
pub async fn serve_router(
    router: impl Fn() -> tonic::transport::server::Router,
    socket: Option<&std::path::Path>,
    listen: Option<SocketAddr>,
    stop: tokio::sync::watch::Receiver<bool>,
    what: &str,
) -> anyhow::Result<(Option<PathBuf>, Option<SocketAddr>, ServerTasks)> {
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = ServerTasks::new();
    let mut bound = (None, None);
    if let Some(path) = socket {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A socket left by a dead process is in the way; a live one answers.
        if path.exists() {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                anyhow::bail!("another {what} is serving on {}", path.display());
            }
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        bound.0 = Some(path.to_path_buf());
        let (r, s) = (router(), stopped(stop.clone()));
        tasks.spawn(async move {
            r.serve_with_incoming_shutdown(UnixListenerStream::new(l), s)
                .await
        });
    }
    if let Some(addr) = listen {
        let l = TcpListener::bind(addr).await?;
        bound.1 = Some(l.local_addr()?);
        let (r, s) = (router(), stopped(stop.clone()));
        // Without TCP_NODELAY a response's frames wait for the client's
        // delayed ACK: 40 ms per call.
        let incoming = tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true));
        tasks.spawn(async move { r.serve_with_incoming_shutdown(incoming, s).await });
    }
    Ok((bound.0, bound.1, tasks))
}

/// Set up logging: human-readable or JSON lines, filtered by `RUST_LOG`
/// (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
