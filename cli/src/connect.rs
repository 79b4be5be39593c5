//! Reaching the agent and the coordinator, and what their refusals become:
//! [`Refused`] carries the stable error code for `--json` and exit code 1.

use std::future::Future;
use std::path::PathBuf;

use anyhow::{Context, Result};
use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::auth::Bearer;
use cairn_proto::coordinator::coordinator_client::CoordinatorClient;
use cairn_proto::transport::{channel_tls, Target, AGENT_SOCKET, COORDINATOR_SOCKET, MAX_DECODING};
use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// How to reach the agent.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The agent's unix socket.
    #[arg(long, global = true, env = "CAIRN_SOCKET", default_value = AGENT_SOCKET)]
    pub socket: PathBuf,
    /// Talk to an agent over TCP instead, e.g. https://10.0.0.5:7070 (with
    /// --ca) or http://… (an agent started with --insecure).
    #[arg(long, global = true, env = "CAIRN_AGENT")]
    pub agent: Option<String>,
    /// TLS for https:// agents and coordinators.
    #[command(flatten)]
    pub tls: cairn_proto::tls::ClientTlsArgs,
    /// The bearer token presented to both.
    #[command(flatten)]
    pub token: TokenArgs,
    /// Domain name or id (may be left out when the agent has one domain).
    #[arg(long, global = true, env = "CAIRN_DOMAIN", default_value = "")]
    pub domain: String,
}

/// How to reach the coordinator.
#[derive(Args, Debug, Clone)]
pub struct CoordConn {
    /// The coordinator: its unix socket, or https://host:port (with --ca)
    /// or http://host:port.
    #[arg(long, global = true, env = "CAIRN_COORDINATOR", default_value = COORDINATOR_SOCKET)]
    pub coordinator: String,
    /// TLS for an https:// coordinator (the global --ca, --cert, --key).
    #[arg(skip)]
    pub tls: cairn_proto::tls::ClientTlsArgs,
    /// The global --token or --token-file.
    #[arg(skip)]
    pub token: TokenArgs,
}

/// Who the CLI says it is besides its certificate or uid: a bearer token.
#[derive(Args, Debug, Clone, Default)]
pub struct TokenArgs {
    /// Bearer token to present. On a command line it shows in the process
    /// list: prefer CAIRN_TOKEN or --token-file.
    #[arg(long, global = true, env = "CAIRN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file whose first line is the bearer token (when --token is not
    /// given).
    #[arg(long, global = true, env = "CAIRN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token to present, if any.
    pub fn bearer(&self) -> Result<Bearer> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Bearer::new(Some(t)).map_err(anyhow::Error::msg),
            (None, Some(p)) => Bearer::from_file(p).map_err(anyhow::Error::msg),
            (None, None) => Ok(Bearer::default()),
        }
    }
}

/// A channel that presents the caller's token, if it has one.
pub type Ch = InterceptedService<Channel, Bearer>;

/// A client of the agent.
pub type Agent = AgentClient<Ch>;

/// A client of the coordinator.
pub type Coord = CoordinatorClient<Ch>;

/// A refusal by the agent or coordinator, for the exit code and --json.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({reason})")]
pub struct Refused {
    /// The status code.
    pub code: tonic::Code,
    /// The stable error code.
    pub reason: String,
    /// The message.
    pub message: String,
}

/// A status as a [`Refused`] error.
pub fn refused(s: tonic::Status) -> anyhow::Error {
    let reason = s
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_else(|| format!("{:?}", s.code()).to_lowercase());
    Refused {
        code: s.code(),
        reason,
        message: s.message().to_string(),
    }
    .into()
}

/// A call's answer, or its refusal as a [`Refused`] error.
pub trait Ask<T> {
    /// The message, or the refusal.
    fn ask(self) -> Result<T>;
}

impl<T> Ask<T> for std::result::Result<tonic::Response<T>, tonic::Status> {
    fn ask(self) -> Result<T> {
        self.map(tonic::Response::into_inner).map_err(refused)
    }
}

/// A client of the agent.
pub async fn agent(c: &Conn) -> Result<Agent> {
    let t = match &c.agent {
        Some(a) => Target::Tcp(a.clone()),
        None => Target::Unix(c.socket.clone()),
    };
    let tls = c.tls.for_address(c.agent.as_deref().unwrap_or(""))?;
    let ch = channel_tls(&t, tls).await.with_context(|| match &t {
        Target::Unix(p) => format!(
            "cannot reach the agent at {} (is `cairn up` or cairn-agent running? set --socket)",
            p.display()
        ),
        Target::Tcp(a) => format!("cannot reach the agent at {a}"),
    })?;
    Ok(
        AgentClient::with_interceptor(ch, c.token.bearer()?)
            .max_decoding_message_size(MAX_DECODING),
    )
}

/// A client of the coordinator.
pub async fn coordinator(c: &CoordConn) -> Result<Coord> {
    let t = if c.coordinator.starts_with("http://") || c.coordinator.starts_with("https://") {
        Target::Tcp(c.coordinator.clone())
    } else {
        Target::Unix(PathBuf::from(&c.coordinator))
    };
    let tls = c.tls.for_address(&c.coordinator)?;
    let ch = channel_tls(&t, tls).await.with_context(|| {
        format!(
            "cannot reach the coordinator at {} (is `cairn up` or cairn-coordinator running? set --coordinator)",
            c.coordinator
        )
    })?;
    Ok(CoordinatorClient::with_interceptor(ch, c.token.bearer()?))
}

/// Run a command's future on a runtime of this thread.
pub fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// Follow a job's watch `s` to its end, from `first`, with a progress bar
/// unless `quiet`; `progress` gives a message's done and total bytes and
/// the bar's label.
pub async fn follow<T>(
    mut s: tonic::Streaming<T>,
    first: T,
    quiet: bool,
    progress: impl Fn(&T) -> (u64, u64, &str),
) -> Result<T> {
    let bar = (!quiet).then(|| {
        let (_, total, label) = progress(&first);
        crate::output::progress_bar(total, label)
    });
    let mut last = first;
    while let Some(j) = s.message().await.map_err(refused)? {
        if let Some(b) = &bar {
            let (done, total, label) = progress(&j);
            b.set_message(label.to_string());
            b.set_length(total.max(1));
            b.set_position(done);
        }
        last = j;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(last)
}
