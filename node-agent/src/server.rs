//! Running the agent: gRPC on a unix socket and/or TCP, with health
//! checking and reflection, and the metrics endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cairn_proto::auth::Policy;
use cairn_proto::server::Endpoints;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

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
    /// Where gRPC is served, and who may call.
    pub endpoints: Endpoints,
    /// TCP address of the Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
}

/// Addresses actually bound (ports may have been 0).
#[derive(Debug, Clone)]
pub struct Bound {
    /// gRPC.
    pub grpc: cairn_proto::server::Bound,
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
    // The agent API is for admin and service identities only.
    let gate = opts.endpoints.gate(Policy::AdminOrService, "agent API")?;
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

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (grpc, mut tasks) = opts
        .endpoints
        .serve(
            InterceptedService::new(pb::agent_server::AgentServer::new(svc.clone()), gate),
            pb::FILE_DESCRIPTOR_SET,
            stop_rx,
            "agent",
        )
        .await?;
    let mut bound = Bound {
        grpc,
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
            "address": bound.grpc.listen.zip(opts.endpoints.listen.as_ref()).map(|(a, (_, s))| format!("{}://{a}", s.scheme())),
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
    if let Some(p) = &bound.grpc.socket {
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
