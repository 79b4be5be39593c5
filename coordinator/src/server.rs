//! Running a coordinator replica: gRPC on a unix socket and/or TCP with
//! health checking and reflection, its registration, and the leader loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_cluster::{EtcdConfig, EtcdLockService, FileKv, Kv};
use cairn_domain::{LocalLockService, LockService};
use cairn_proto::auth::Policy;
pub use cairn_proto::server::Bound;
use cairn_proto::server::Endpoints;
use tonic::service::interceptor::InterceptedService;

use crate::agents::{Agents, Discovery};
use crate::coordinator::{CoordConfig, Coordinator};
use crate::pb;
use crate::service::CoordService;

/// Where the cluster's state and locks are.
#[derive(Debug, Clone)]
pub enum Cluster {
    /// One host: jobs as files and locks as lock files under this
    /// directory; agents at fixed addresses.
    Local {
        /// State directory.
        dir: PathBuf,
        /// The agents (unix socket paths or `http://` addresses).
        agents: Vec<String>,
    },
    /// etcd: locks, jobs and the agent registry.
    Etcd(EtcdConfig),
}

/// How to run a replica.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Replica id (default: a new UUID).
    pub id: String,
    /// State and locks.
    pub cluster: Cluster,
    /// Where gRPC is served, and who may call.
    pub endpoints: Endpoints,
    /// How agents over https:// are reached.
    pub agent_tls: cairn_proto::tls::ClientTlsArgs,
    /// The bearer token presented to agents (none: the certificate of
    /// `agent_tls`, or the unix socket's credentials, say who we are).
    pub agent_token: cairn_proto::auth::Bearer,
    /// How often the leader does its duties.
    pub duty_interval: Duration,
    /// How long an operation waits for a busy disk.
    pub lock_wait: Duration,
    /// How long the records of ended jobs are kept.
    pub job_retention: Duration,
    /// How long a volume no tag reaches stays before the leader reclaims it.
    pub orphan_quarantine: Duration,
    /// Serve the catalog's reads and refuse its changes.
    pub read_only: bool,
}

/// Serve until `shutdown` resolves; `ready` gets the bound addresses.
pub async fn serve(
    opts: ServeOptions,
    ready: impl FnOnce(&Bound) + Send,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cluster = opts.cluster.clone();
    // Any identity; what it may act on is the service's business.
    let gate = opts.endpoints.gate(Policy::Anyone, "coordinator API")?;
    let (kv, locks, discovery) = tokio::task::spawn_blocking(move || {
        Ok::<_, cairn_domain::DomainError>(match cluster {
            Cluster::Local { dir, agents } => (
                Arc::new(FileKv::new(dir.join("store"))?) as Arc<dyn Kv>,
                Arc::new(LocalLockService::new(dir.join("locks"))?) as Arc<dyn LockService>,
                Discovery::Fixed(agents),
            ),
            Cluster::Etcd(c) => {
                let e = EtcdLockService::connect(c)?;
                (
                    Arc::new(e.clone()) as Arc<dyn Kv>,
                    Arc::new(e.clone()) as Arc<dyn LockService>,
                    Discovery::Registry(Arc::new(e) as Arc<dyn Kv>),
                )
            }
        })
    })
    .await??;
    let mut cfg = CoordConfig::new(opts.id.clone());
    cfg.lock_wait = opts.lock_wait;
    cfg.job_retention = opts.job_retention;
    cfg.orphan_quarantine = opts.orphan_quarantine;
    cfg.read_only = opts.read_only;
    let coord = Arc::new(Coordinator::new(
        cfg,
        kv.clone(),
        locks,
        Agents::new(discovery).with_tls(opts.agent_tls.clone(), opts.agent_token.clone()),
    ));
    let svc = CoordService::new(coord.clone());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (bound, mut tasks) = opts
        .endpoints
        .serve(
            InterceptedService::new(pb::coordinator_server::CoordinatorServer::new(svc), gate),
            pb::FILE_DESCRIPTOR_SET,
            stop_rx.clone(),
            "coordinator",
        )
        .await?;
    // Live while this process lives: jobs it owns are not orphans.
    let reg = serde_json::json!({
        "id": opts.id,
        "listen": bound.listen.map(|a| a.to_string()),
        "socket": bound.socket,
    })
    .to_string();
    let key = format!("{}{}", crate::leader::REPLICAS, opts.id);
    let kv2 = kv.clone();
    tokio::task::spawn_blocking(move || kv2.register(&key, &reg)).await??;
    // Jobs this replica's previous run left running.
    let me = coord.clone();
    tokio::spawn(async move {
        match me.resume_own().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(jobs = n, "resumed jobs a previous run of this replica left"),
            Err(e) => tracing::warn!(error = %e, "could not look for jobs to resume"),
        }
    });
    let leader = tokio::spawn(crate::leader::run(
        coord.clone(),
        opts.duty_interval,
        stop_rx.clone(),
    ));
    tracing::info!(id = %opts.id, ?bound, "coordinator serving");
    ready(&bound);
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = leader.await;
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    if let Some(p) = &bound.socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
