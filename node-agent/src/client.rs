//! Connecting to an agent: a unix socket path or a TCP address.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pb::agent_client::AgentClient;

/// Where an agent listens.
#[derive(Debug, Clone)]
pub enum Target {
    /// A unix socket.
    Unix(PathBuf),
    /// `http://host:port`.
    Tcp(String),
}

/// Open a channel to an agent.
pub async fn channel(t: &Target) -> Result<Channel, tonic::transport::Error> {
    match t {
        Target::Tcp(addr) => {
            Endpoint::from_shared(addr.clone())?
                .tcp_nodelay(true)
                .connect()
                .await
        }
        Target::Unix(path) => {
            let path = path.clone();
            // The URI is not used for a unix socket, only required.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let p = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(p).await?,
                        ))
                    }
                }))
                .await
        }
    }
}

/// A client of the agent API.
pub async fn connect(t: &Target) -> Result<AgentClient<Channel>, tonic::transport::Error> {
    Ok(AgentClient::new(channel(t).await?).max_decoding_message_size(64 << 20))
}
