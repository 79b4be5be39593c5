//! What every Cairn server shares: where it listens (a unix socket and/or
//! TCP), gRPC health and reflection beside its own service, and logging.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};

use crate::tls::TcpSecurity;
use tokio_stream::wrappers::UnixListenerStream;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A live process answers on the socket.
    #[error("another {what} is serving on {}", path.display())]
    InUse {
        /// "agent", "coordinator".
        what: String,
        /// The socket.
        path: PathBuf,
    },
    /// Binding or preparing a listener failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The reflection service could not be built.
    #[error("reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The TLS configuration was refused (a bad certificate or key).
    #[error("TLS configuration")]
    Tls(#[source] tonic::transport::Error),
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> ServeError {
    move |source| ServeError::Io { context, source }
}

/// Who may connect to a unix socket: its mode and group (the peer's
/// credentials then say who connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPolicy {
    /// Permission bits (connecting needs write permission).
    pub mode: u32,
    /// Group owner; none keeps the process's.
    pub group: Option<u32>,
}

impl Default for SocketPolicy {
    /// Owner and group may connect.
    fn default() -> SocketPolicy {
        SocketPolicy {
            mode: 0o660,
            group: None,
        }
    }
}

/// The flags of a server's access control (the agent's, the
/// coordinator's, `cairn up`'s).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessArgs {
    /// Operator-managed file of the bearer tokens callers may present,
    /// stored hashed (`cairn token add` writes it); read again when it
    /// changes.
    #[arg(long = "tokens", env = "CAIRN_TOKENS")]
    pub token_file: Option<PathBuf>,
    /// Mode of the unix socket, in octal: who may connect at all.
    #[arg(long, default_value = "0660", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Group of the unix socket (a name or a gid), for non-root users.
    #[arg(long, value_parser = parse_group)]
    pub socket_group: Option<u32>,
}

impl AccessArgs {
    /// The authenticator these flags describe (refused when the token file
    /// is unusable).
    pub fn authenticator(&self) -> Result<crate::auth::Authenticator, crate::auth::AuthError> {
        let tokens = match &self.token_file {
            Some(p) => Some(crate::auth::TokenFile::load(p)?),
            None => None,
        };
        Ok(crate::auth::Authenticator::new(tokens))
    }

    /// The unix socket's policy.
    pub fn socket_policy(&self) -> SocketPolicy {
        SocketPolicy {
            mode: self.socket_mode,
            group: self.socket_group,
        }
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode like 0660")),
    }
}

/// The gid of group `s` (a name in /etc/group, or a number).
pub fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").map_err(|e| format!("/etc/group: {e}"))?;
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(s)).then(|| f.nth(1).and_then(|g| g.parse().ok()))?
        })
        .ok_or_else(|| format!("no group {s:?} in /etc/group"))
}

/// Give the socket at `path` its mode and group.
fn apply_policy(path: &Path, p: SocketPolicy) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = p.group {
        std::os::unix::fs::lchown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(p.mode))
}

/// Tasks serving gRPC, each ending with its server.
pub type ServerTasks = tokio::task::JoinSet<Result<(), tonic::transport::Error>>;

/// The health service (reporting `S` as serving) and the reflection
/// service for `S`'s descriptor set and the health protocol's, as both
/// `grpc.reflection.v1` and `grpc.reflection.v1alpha` (which Python's
/// grpcio-reflection client and older tools speak).
pub async fn standard_services<S: tonic::server::NamedService>(
    descriptors: &'static [u8],
) -> Result<
    (
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<S>().await;
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder().build_v1().map_err(ServeError::Reflection)?;
    let v1alpha = builder().build_v1alpha().map_err(ServeError::Reflection)?;
    Ok((health_svc, v1, v1alpha))
}

/// Where a daemon serves gRPC, and who may call it.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// Unix socket path (the CLI's default way in).
    pub socket: Option<PathBuf>,
    /// TCP address for remote clients, and how it is secured.
    pub listen: Option<(SocketAddr, TcpSecurity)>,
    /// Who may call: the token file and the unix socket's mode and group.
    pub access: AccessArgs,
}

/// The addresses a daemon's gRPC endpoints actually bound (TCP port 0
/// becomes the one given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bound {
    /// Unix socket.
    pub socket: Option<PathBuf>,
    /// gRPC over TCP.
    pub listen: Option<SocketAddr>,
}

impl Endpoints {
    /// The gate that lets `policy` callers into `api` (refused when the
    /// token file is unusable, before anything is served).
    pub fn gate(
        &self,
        policy: crate::auth::Policy,
        api: &'static str,
    ) -> Result<crate::auth::Gate, crate::auth::AuthError> {
        let auth = std::sync::Arc::new(self.access.authenticator()?);
        Ok(crate::auth::Gate::new(auth, policy, api))
    }

    /// Serve `svc` (behind its gate) beside health and reflection (for
    /// `descriptors`) on these endpoints until `stop` turns true (see
    /// [`serve_router`]).
    pub async fn serve<S>(
        &self,
        svc: S,
        descriptors: &'static [u8],
        stop: tokio::sync::watch::Receiver<bool>,
        what: &str,
    ) -> Result<(Bound, ServerTasks), ServeError>
    where
        S: tower::Service<
                tonic::codegen::http::Request<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        let (health, reflection, reflection_v1alpha) = standard_services::<S>(descriptors).await?;
        let router = |mut b: tonic::transport::Server| {
            b.add_service(health.clone())
                .add_service(reflection.clone())
                .add_service(reflection_v1alpha.clone())
                .add_service(svc.clone())
        };
        let socket = self
            .socket
            .as_deref()
            .map(|p| (p, self.access.socket_policy()));
        let (socket, listen, tasks) =
            serve_router(router, socket, self.listen.clone(), stop, what).await?;
        Ok((Bound { socket, listen }, tasks))
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are in place when this
/// returns: call it before announcing readiness, so that a SIGTERM right
/// after the ready line stops the process cleanly instead of killing it.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static>
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Serve what `router` makes of a server builder on a unix socket
/// (replacing one a dead process left, refusing one a live process serves;
/// with the mode and group its policy says) and/or a TCP address secured
/// as it says, until `stop` turns true.
/// Returns the socket and the bound address.
pub async fn serve_router(
    router: impl Fn(tonic::transport::Server) -> tonic::transport::server::Router,
    socket: Option<(&Path, SocketPolicy)>,
    listen: Option<(SocketAddr, TcpSecurity)>,
    stop: tokio::sync::watch::Receiver<bool>,
    what: &str,
) -> Result<(Option<PathBuf>, Option<SocketAddr>, ServerTasks), ServeError> {
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = ServerTasks::new();
    let mut bound = (None, None);
    if let Some((path, policy)) = socket {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        // A socket left by a dead process is in the way; a live one answers.
        if path.exists() {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ServeError::InUse {
                    what: what.to_string(),
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?;
        }
        let l = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
        // Until then the socket has the umask's mode, which grants no more.
        apply_policy(path, policy).map_err(io(format!(
            "setting the mode and group of {}",
            path.display()
        )))?;
        bound.0 = Some(path.to_path_buf());
        let (r, s) = (
            router(tonic::transport::Server::builder()),
            stopped(stop.clone()),
        );
        tasks.spawn(async move {
            r.serve_with_incoming_shutdown(UnixListenerStream::new(l), s)
                .await
        });
    }
    if let Some((addr, security)) = listen {
        let b = match security {
            TcpSecurity::Tls(cfg) => tonic::transport::Server::builder()
                .tls_config(*cfg)
                .map_err(ServeError::Tls)?,
            TcpSecurity::Insecure => tonic::transport::Server::builder(),
        };
        let l = TcpListener::bind(addr)
            .await
            .map_err(io(format!("binding {addr}")))?;
        bound.1 = Some(l.local_addr().map_err(io(format!("binding {addr}")))?);
        let (r, s) = (router(b), stopped(stop.clone()));
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
