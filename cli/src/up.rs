//! `cairn up`: a single-host Cairn on the embedded default — a domain in a
//! sparse file under a data directory (formatted on first run, reused
//! after), the single-machine lock service, and the agent and a coordinator
//! in this process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cairn_agent::server::{serve, Bound, Locks, ServeOptions};
use cairn_agent::AgentConfig;
use cairn_domain::io::FileDev;
use cairn_domain::{format, FormatParams, HostIdentity, LocalLockService, SystemClock};
use cairn_proto::server::init_logging;
use cairn_proto::server::Endpoints;
use clap::Args;

use crate::args::parse_size;
use crate::output::human_bytes;

/// Options of `cairn up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where the domain file and the import/export directory live.
    #[arg(long, env = "CAIRN_DATA_DIR", default_value = "/var/lib/cairn")]
    data_dir: PathBuf,
    /// Size of the domain file on first run (sparse).
    #[arg(long, value_parser = parse_size, default_value = "20G")]
    size: u64,
    /// Domain name on first run.
    #[arg(long, default_value = "local")]
    name: String,
    /// On first run, format the domain to wipe every deleted volume.
    #[arg(long)]
    wipe_after_delete: bool,
    /// A group (e.g. cairn) that may read the data directory, the domain
    /// file and exports: made 0750/0660 with that group instead of
    /// 0700/0600; also the sockets' group unless --socket-group says.
    #[arg(long, value_parser = cairn_proto::server::parse_group)]
    group: Option<u32>,
    /// Where stable volume paths are made.
    #[arg(long, default_value = "/run/cairn")]
    run_dir: PathBuf,
    /// Also serve the agent's gRPC on this TCP address (e.g. 127.0.0.1:7070).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Also serve the coordinator's gRPC on this TCP address.
    #[arg(long)]
    coordinator_listen: Option<SocketAddr>,
    /// TLS of both TCP listeners (or --insecure).
    #[command(flatten)]
    tls: cairn_proto::tls::ServerTlsArgs,
    /// Who may call both services.
    #[command(flatten)]
    access: cairn_proto::server::AccessArgs,
    /// Serve Prometheus metrics here.
    #[arg(long, default_value = "127.0.0.1:9465")]
    metrics: SocketAddr,
    /// Log JSON lines.
    #[arg(long)]
    log_json: bool,
}

/// A directory only its owner (and, with `group`, that group: 02750, new
/// files taking the group) may enter, made if it is missing (an existing
/// one keeps its mode: it is the operator's).
fn private_dir(d: &Path, group: Option<u32>) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if d.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
        .with_context(|| format!("cannot create {}", d.display()))?;
    if let Some(g) = group {
        std::os::unix::fs::lchown(d, None, Some(g))
            .and_then(|_| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o2750)))
            .with_context(|| format!("cannot give {} to group {g}", d.display()))?;
    }
    Ok(())
}

/// The domain file, formatted if it is new. Returns (path, created).
fn ensure_domain(a: &UpArgs, lock_dir: &Path) -> Result<(PathBuf, bool)> {
    private_dir(&a.data_dir, a.group)?;
    let path = a.data_dir.join("domain.img");
    if path.exists() {
        let dev = FileDev::open(&path, false)
            .with_context(|| format!("cannot open {}", path.display()))?;
        cairn_domain::engine::read_superblocks(&dev).with_context(|| {
            format!(
                "{} exists but is not a usable domain; move it away or run `cairn domain check`",
                path.display()
            )
        })?;
        crate::domain::warn_if_world_readable(&path);
        return Ok((path, false));
    }
    let tmp = a.data_dir.join("domain.img.new");
    let f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if a.group.is_some() { 0o660 } else { 0o600 })
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?
    };
    if let Some(g) = a.group {
        std::os::unix::fs::fchown(&f, None, Some(g))
            .with_context(|| format!("cannot give {} to group {g}", tmp.display()))?;
    }
    f.set_len(a.size)
        .with_context(|| format!("cannot size {}", tmp.display()))?;
    drop(f);
    let dev = FileDev::open(&tmp, true)?;
    let locks = LocalLockService::new(lock_dir)?;
    format(
        &dev,
        &FormatParams {
            name: a.name.clone(),
            wipe_after_delete: a.wipe_after_delete,
            ..Default::default()
        },
        false,
        &locks,
        &SystemClock,
    )?;
    drop(dev);
    // Only a fully formatted file takes the real name.
    std::fs::rename(&tmp, &path)?;
    Ok((path, true))
}

/// Run until Ctrl-C or SIGTERM.
pub fn up(a: &UpArgs, socket: &Path, coordinator: &Path, lock_dir: &Path) -> Result<()> {
    init_logging(a.log_json);
    if which("qemu-img").is_none() {
        bail!("qemu-img is missing: install qemu-utils (apt-get install qemu-utils)");
    }
    let (domain, created) = ensure_domain(a, lock_dir)?;
    let io = a.data_dir.join("io");
    private_dir(&io, a.group)?;
    let mut access = a.access.clone();
    access.socket_group = access.socket_group.or(a.group);
    let opts = ServeOptions {
        agent: AgentConfig {
            domains: vec![domain.clone()],
            run_dir: a.run_dir.clone(),
            host: HostIdentity::local(),
            lock_timeout: Duration::from_secs(30),
            io_dirs: vec![io.clone()],
            gc_quarantine: cairn_agent::agent::GC_QUARANTINE,
        },
        locks: Locks::Local(lock_dir.to_path_buf()),
        endpoints: Endpoints {
            socket: Some(socket.to_path_buf()),
            listen: a.tls.security(a.listen)?,
            access: access.clone(),
        },
        metrics: Some(a.metrics),
    };
    let size = std::fs::metadata(&domain)?.len();
    let rt = tokio::runtime::Runtime::new()?;
    // Listen for signals before announcing anything: a SIGTERM right after
    // "Cairn is up" must stop us cleanly, not kill us.
    let mut term = {
        let _g = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?
    };
    let mut int = {
        let _g = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (agent_tx, agent_rx) = tokio::sync::oneshot::channel::<Bound>();
    let coord_opts = cairn_coordinator::server::ServeOptions {
        id: format!("{}-coordinator", HostIdentity::local().id),
        cluster: cairn_coordinator::server::Cluster::Local {
            dir: a.data_dir.join("coordinator"),
            agents: vec![socket.display().to_string()],
        },
        endpoints: Endpoints {
            socket: Some(coordinator.to_path_buf()),
            listen: a.tls.security(a.coordinator_listen)?,
            access,
        },
        agent_tls: Default::default(),
        // The coordinator reaches the agent on its socket, as this uid.
        agent_token: Default::default(),
        duty_interval: Duration::from_secs(2),
        lock_wait: Duration::from_secs(60),
        job_retention: Duration::from_secs(24 * 3600),
        orphan_quarantine: Duration::from_secs(3600),
        read_only: false,
    };
    let (name, run_dir) = (a.name.clone(), a.run_dir.clone());
    rt.block_on(async move {
        let agent = tokio::spawn(serve(
            opts,
            move |b: &Bound| {
                let _ = agent_tx.send(b.clone());
            },
            stopped(stop_rx.clone()),
        ));
        let Ok(b) = agent_rx.await else {
            // The agent failed before it was ready: say why.
            return agent.await?;
        };
        let coord = tokio::spawn(cairn_coordinator::server::serve(
            coord_opts,
            move |c: &cairn_coordinator::server::Bound| {
                // Whoever started us may not read stdout; that is no reason
                // to stop serving.
                let mut msg = format!(
                    "Cairn is up: domain {:?} in {} ({}, {}).\n",
                    name,
                    domain.display(),
                    human_bytes(size),
                    if created { "formatted now" } else { "reused" }
                );
                if let Some(s) = &b.grpc.socket {
                    msg += &format!("  agent socket:   {} (cairn --socket)\n", s.display());
                }
                if let Some(l) = b.grpc.listen {
                    msg +=
                        &format!("  agent gRPC:     http://{l} (cairn --agent http://{l} ...)\n");
                }
                if let Some(s) = &c.socket {
                    msg += &format!("  coordinator:    {} (cairn --coordinator)\n", s.display());
                }
                if let Some(l) = c.listen {
                    msg += &format!("  coordinator gRPC: http://{l}\n");
                }
                if let Some(m) = b.metrics {
                    msg += &format!("  metrics:        http://{m}/metrics\n");
                }
                msg += &format!(
                    "  stable paths:   {}/<domain-id>/<tag>/<volume>\n",
                    run_dir.display()
                );
                msg += &format!("  import/export:  {}\n", io.display());
                msg += "Try `cairn disk create --size 1G` in another shell. Stop with Ctrl-C.\n";
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(msg.as_bytes()).and_then(|_| out.flush());
            },
            stopped(stop_rx.clone()),
        ));
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
        // The coordinator first: it uses the agent.
        let c = coord.await?;
        let r = agent.await?;
        c.and(r)
    })
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|f| f.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn directories_are_the_owners_or_shared_with_a_group_when_asked() {
        let t = tempfile::tempdir().unwrap();
        let mine = t.path().join("mine");
        private_dir(&mine, None).unwrap();
        assert_eq!(std::fs::metadata(&mine).unwrap().mode() & 0o7777, 0o700);
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let shared = t.path().join("shared/io");
        private_dir(&shared, Some(gid)).unwrap();
        let m = std::fs::metadata(&shared).unwrap();
        assert_eq!((m.mode() & 0o7777, m.gid()), (0o2750, gid));
        // An existing directory is the operator's: left as it is.
        private_dir(&mine, Some(gid)).unwrap();
        assert_eq!(std::fs::metadata(&mine).unwrap().mode() & 0o7777, 0o700);
    }
}
