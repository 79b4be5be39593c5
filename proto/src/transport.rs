//! Channels to Cairn servers: a unix socket path or a TCP address.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A unix socket.
    Unix(PathBuf),
    /// `http://host:port`.
    Tcp(String),
}

impl Target {
    /// `unix:/path` or `/path` is a unix socket; anything else an address.
    pub fn parse(address: &str) -> Target {
        match address
            .strip_prefix("unix:")
            .or_else(|| address.starts_with('/').then_some(address))
        {
            Some(path) => Target::Unix(PathBuf::from(path)),
            None => Target::Tcp(address.to_string()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::Tcp(a) => f.write_str(a),
        }
    }
}

/// The endpoint of `t`: its address (over TLS when `tls` is given), or a
/// placeholder URI for a unix socket (the connector decides where it goes).
fn endpoint(t: &Target, tls: Option<ClientTlsConfig>) -> Result<Endpoint, tonic::transport::Error> {
    match t {
        Target::Tcp(addr) => {
            let ep = Endpoint::from_shared(addr.clone())?.tcp_nodelay(true);
            match tls {
                Some(cfg) => ep.tls_config(cfg),
                None => Ok(ep),
            }
        }
        Target::Unix(_) => Ok(Endpoint::from_static("http://localhost")),
    }
}

/// A connector that ignores the URI and dials the socket at `path`.
fn unix_connector(
    path: PathBuf,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |_: Uri| {
        let p = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
    })
}

/// Open a channel to `t` now: an unreachable server is an error here.
pub async fn channel(t: &Target) -> Result<Channel, tonic::transport::Error> {
    channel_tls(t, None).await
}

/// [`channel`], over TLS with `tls` for a TCP target.
pub async fn channel_tls(
    t: &Target,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let ep = endpoint(t, tls)?;
    match t {
        Target::Tcp(_) => ep.connect().await,
        Target::Unix(p) => ep.connect_with_connector(unix_connector(p.clone())).await,
    }
}

/// A channel to `t` that connects on first use (and again after a
/// failure): an unreachable server fails that call with UNAVAILABLE.
pub fn lazy_channel(
    t: &Target,
    connect_timeout: Duration,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let ep = endpoint(t, tls)?.connect_timeout(connect_timeout);
    Ok(match t {
        Target::Tcp(_) => ep.connect_lazy(),
        Target::Unix(p) => ep.connect_with_connector_lazy(unix_connector(p.clone())),
    })
}

/// The largest message a Cairn client accepts (a domain's listing).
pub const MAX_DECODING: usize = 64 << 20;

/// Where the node agent's unix socket is unless told otherwise.
pub const AGENT_SOCKET: &str = "/run/cairn/agent.sock";

/// Where the coordinator's unix socket is unless told otherwise.
pub const COORDINATOR_SOCKET: &str = "/run/cairn/coordinator.sock";

/// A client of the agent API on `t`.
pub async fn agent_client(
    t: &Target,
) -> Result<crate::agent::agent_client::AgentClient<Channel>, tonic::transport::Error> {
    Ok(
        crate::agent::agent_client::AgentClient::new(channel(t).await?)
            .max_decoding_message_size(MAX_DECODING),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_sockets_or_addresses() {
        assert_eq!(
            Target::parse("unix:/run/a.sock"),
            Target::Unix("/run/a.sock".into())
        );
        assert_eq!(
            Target::parse("/run/a.sock"),
            Target::Unix("/run/a.sock".into())
        );
        assert_eq!(
            Target::parse("http://127.0.0.1:7070"),
            Target::Tcp("http://127.0.0.1:7070".into())
        );
        assert_eq!(Target::parse("/x").to_string(), "unix:/x");
    }
}
