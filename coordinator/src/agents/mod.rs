//! Reaching node agents: discovery (the registry in the cluster store, or
//! fixed addresses on one host), connections over any transport (gRPC over
//! TCP or a unix socket, or an agent served in the same process), and the
//! agent calls the coordinator makes, in the coordinator's own types
//! ([`conn`]). The agent's generated types stop here.

mod conn;
mod files;

pub use conn::{AgentConn, AgentJob, NewDisk};
pub use files::{Chunks, Commit, FileDelta, FileVolume, ImageSet};

use cairn_proto::auth::Bearer;
use cairn_proto::tls::ClientTlsArgs;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_cluster::Kv;
use cairn_domain::api::DomainInfo;
use cairn_proto::agent as pb;
use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::transport::{lazy_channel, Target, MAX_DECODING};
use tonic::codegen::http;
use tower::ServiceExt;

use crate::error::{CoordError, Result};
use crate::plan::{self, AgentInfo, DomainRef};

/// Errors of a transport.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A transport's error, as one concrete type (a boxed trait object as the
/// service's error type trips the compiler's checks of async code); its
/// source is the original error, where tonic finds e.g. a refused
/// connection and makes it UNAVAILABLE.
#[derive(Debug)]
pub struct TransportError(pub BoxError);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Any way to carry gRPC requests to an agent.
pub type Transport = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    TransportError,
>;

/// A transport over the network: `http://host:port`, `https://host:port`
/// (TLS as `tls` says), or a unix socket path (`unix:/path` or `/path`),
/// presenting `token` if it has one. Connects lazily: an unreachable agent
/// fails the call with UNAVAILABLE.
pub fn net_transport(address: &str, tls: &ClientTlsArgs, token: &Bearer) -> Result<Transport> {
    let bad = |e: &dyn std::fmt::Display| {
        CoordError::invalid(
            "address",
            format!("{}: {e}", cairn_domain::limits::quote(address)),
        )
    };
    let cfg = tls.for_address(address).map_err(|e| bad(&e))?;
    let channel =
        lazy_channel(&Target::parse(address), Duration::from_secs(2), cfg).map_err(|e| bad(&e))?;
    let token = token.clone();
    Ok(Transport::new(
        channel
            .map_request(move |mut r: http::Request<tonic::body::Body>| {
                token.apply(r.headers_mut());
                r
            })
            .map_err(|e| TransportError(Box::new(e) as BoxError)),
    ))
}

/// How the coordinator finds agents.
pub enum Discovery {
    /// Agents registered in the cluster store (`cairn/agents/<host id>`).
    Registry(Arc<dyn Kv>),
    /// Fixed addresses (one host: the local agent's socket); each is asked
    /// for its domains.
    Fixed(Vec<String>),
    /// Agents with ready transports (an agent served in this process, for
    /// tests); asked for their domains like fixed ones.
    Transports(Vec<(String, Transport)>),
}

/// The agents of the cluster and connections to them.
pub struct Agents {
    discovery: Discovery,
    conns: Mutex<HashMap<String, (String, Transport)>>,
    cache: Mutex<Option<(Instant, Vec<AgentInfo>)>>,
    load: Mutex<HashMap<String, usize>>,
    tls: ClientTlsArgs,
    token: Bearer,
}

/// Which agents may take a call: those that see `domain` (and `also`),
/// equal ones spread by `spread`.
#[derive(Clone, Copy)]
pub struct Pick<'a> {
    domain: &'a uuid::Uuid,
    also: Option<&'a uuid::Uuid>,
    spread: u64,
}

impl<'a> Pick<'a> {
    /// The agents that see `domain`, equal ones taken at random.
    pub fn on(domain: &'a uuid::Uuid) -> Self {
        Pick {
            domain,
            also: None,
            spread: uuid::Uuid::new_v4().as_u64_pair().0,
        }
    }

    /// Only those that also see `other`.
    pub fn also(self, other: Option<&'a uuid::Uuid>) -> Self {
        Pick {
            also: other,
            ..self
        }
    }

    /// Equal ones in the order `spread` gives (the same spread, the same
    /// agent).
    pub fn spread(self, spread: u64) -> Self {
        Pick { spread, ..self }
    }
}

/// How long a discovered list of agents is used before asking again.
const FRESH: Duration = Duration::from_millis(1000);

/// Marks one unit of work on an agent while it lives.
pub struct Busy<'a> {
    agents: &'a Agents,
    host: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut l = self.agents.load.lock().expect("poisoned");
        if let Some(n) = l.get_mut(&self.host) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Agents {
    /// Agents found through `discovery`.
    pub fn new(discovery: Discovery) -> Agents {
        Agents {
            discovery,
            conns: Mutex::new(HashMap::new()),
            cache: Mutex::new(None),
            load: Mutex::new(HashMap::new()),
            tls: ClientTlsArgs::default(),
            token: Bearer::default(),
        }
    }

    /// Reach `https://` agents with this CA (and client certificate), and
    /// present `token` to every agent.
    pub fn with_tls(mut self, tls: ClientTlsArgs, token: Bearer) -> Agents {
        self.tls = tls;
        self.token = token;
        self
    }

    /// The agents now (cached for a second).
    pub async fn list(&self) -> Result<Vec<AgentInfo>> {
        if let Some((at, l)) = self.cache.lock().expect("poisoned").as_ref() {
            if at.elapsed() < FRESH {
                return Ok(l.clone());
            }
        }
        let l = self.discover().await?;
        *self.cache.lock().expect("poisoned") = Some((Instant::now(), l.clone()));
        Ok(l)
    }

    /// Forget the cached list (an agent did not answer).
    pub fn invalidate(&self) {
        *self.cache.lock().expect("poisoned") = None;
    }

    async fn discover(&self) -> Result<Vec<AgentInfo>> {
        match &self.discovery {
            Discovery::Registry(kv) => {
                let kv = kv.clone();
                let entries = tokio::task::spawn_blocking(move || kv.list("cairn/agents/"))
                    .await
                    .map_err(|e| CoordError::Internal(e.to_string()))??;
                Ok(entries
                    .iter()
                    .filter_map(|(_, v)| plan::parse_registration(v))
                    .collect())
            }
            Discovery::Fixed(addrs) => {
                let mut out = Vec::new();
                for a in addrs {
                    let t = self.transport(a, a)?;
                    if let Ok(info) = ask_domains(a, a, t).await {
                        out.push(info);
                    }
                }
                Ok(out)
            }
            Discovery::Transports(ts) => {
                let mut out = Vec::new();
                for (id, t) in ts {
                    self.conns
                        .lock()
                        .expect("poisoned")
                        .insert(id.clone(), (id.clone(), t.clone()));
                    if let Ok(info) = ask_domains(id, id, t.clone()).await {
                        out.push(info);
                    }
                }
                Ok(out)
            }
        }
    }

    fn transport(&self, host: &str, address: &str) -> Result<Transport> {
        let mut c = self.conns.lock().expect("poisoned");
        if let Some((addr, t)) = c.get(host) {
            if addr == address {
                return Ok(t.clone());
            }
        }
        let t = net_transport(address, &self.tls, &self.token)?;
        c.insert(host.to_string(), (address.to_string(), t.clone()));
        Ok(t)
    }

    /// A connection to the registered agent of host `host`, if it is.
    pub async fn conn_to(&self, host: &str) -> Result<Option<AgentConn>> {
        match self.list().await?.into_iter().find(|a| a.host_id == host) {
            Some(a) => Ok(Some(self.conn(&a)?)),
            None => Ok(None),
        }
    }

    /// A connection to `a`.
    pub fn conn(&self, a: &AgentInfo) -> Result<AgentConn> {
        Ok(AgentConn {
            host: a.host_id.clone(),
            instance: a.instance.clone(),
            client: AgentClient::new(self.transport(&a.host_id, &a.address)?)
                .max_decoding_message_size(MAX_DECODING),
        })
    }

    /// Count work on `host` until the returned value is dropped.
    pub fn busy(&self, host: &str) -> Busy<'_> {
        *self
            .load
            .lock()
            .expect("poisoned")
            .entry(host.to_string())
            .or_default() += 1;
        Busy {
            agents: self,
            host: host.to_string(),
        }
    }

    /// Run `f` on an agent `pick` allows, picked by load; when the agent is unreachable or fenced, on another one.
    pub async fn with_agent<T, F, Fut>(&self, pick: Pick<'_>, f: F) -> Result<T>
    where
        F: Fn(AgentConn) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.first_answer(pick, CoordError::agent_unavailable, f)
            .await
            .and_then(|(_, r)| r)
    }

    /// Make a mutating call `f` on an agent `pick` allows, at most once
    /// per agent process: a call that never reached
    /// its agent goes to another; one whose answer was lost is sent again
    /// with the same request id to the same process (which answers with the
    /// first outcome) for as long as that process stays registered. When it
    /// dies or restarts first, the outcome is [`Once::Lost`] and only the
    /// domain can tell what happened.
    pub async fn call_once<T, F, Fut>(&self, pick: Pick<'_>, f: F) -> Result<Once<T>>
    where
        F: Fn(AgentConn) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match self.first_answer(pick, not_sent, &f).await? {
            (a, Err(e)) if e.agent_unavailable() => self.ask_again(&a, e, &f).await,
            (_, r) => r.map(Once::Answered),
        }
    }

    /// Call `f` on agents picked by load until one answers with something
    /// other than an error `skip` says to try another agent for (in two
    /// rounds, the second on a fresh list). Returns that agent and its
    /// answer.
    async fn first_answer<T, F, Fut>(
        &self,
        pick: Pick<'_>,
        skip: fn(&CoordError) -> bool,
        f: F,
    ) -> Result<(AgentInfo, Result<T>)>
    where
        F: Fn(AgentConn) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut exclude = HashSet::new();
        let mut last = None;
        for round in 0..2 {
            if round > 0 {
                self.invalidate();
            }
            let agents = self.list().await?;
            loop {
                let load = self.load.lock().expect("poisoned").clone();
                let Some(a) = plan::pick_agent(
                    &agents,
                    pick.domain,
                    pick.also,
                    &load,
                    &exclude,
                    pick.spread,
                ) else {
                    break;
                };
                let _busy = self.busy(&a.host_id);
                match f(self.conn(a)?).await {
                    Err(e) if skip(&e) => {
                        tracing::warn!(host = %a.host_id, error = %e, "agent unavailable; trying another");
                        exclude.insert(a.host_id.clone());
                        last = Some(e);
                    }
                    r => return Ok((a.clone(), r)),
                }
            }
        }
        Err(last.unwrap_or_else(|| CoordError::NoAgent(pick.domain.to_string())))
    }

    /// The call `f` may have reached agent `a` (it failed with `e`): send it
    /// again to the same process while that stays registered. A refused
    /// connection now only says the process is gone, and its call may still
    /// have taken effect.
    async fn ask_again<T, F, Fut>(&self, a: &AgentInfo, mut e: CoordError, f: &F) -> Result<Once<T>>
    where
        F: Fn(AgentConn) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let since = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            if since.elapsed() > UNANSWERED {
                return Err(e);
            }
            tracing::warn!(host = %a.host_id, error = %e, "no answer; asking the same agent again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            self.invalidate();
            let now = self.list().await?;
            let Some(b) = now.iter().find(|b| {
                b.host_id == a.host_id && !a.instance.is_empty() && b.instance == a.instance
            }) else {
                return Ok(Once::Lost {
                    host: a.host_id.clone(),
                });
            };
            match f(self.conn(b)?).await {
                Err(again) if again.agent_unavailable() => e = again,
                r => return r.map(Once::Answered),
            }
        }
    }
}

async fn ask_domains(host: &str, address: &str, t: Transport) -> Result<AgentInfo> {
    let mut c = AgentClient::new(t);
    let r = c
        .list_domains(pb::ListDomainsRequest {})
        .await
        .map_err(agent_err(host))?
        .into_inner();
    // A domain this coordinator cannot read is one it does not use.
    let domains: Vec<DomainInfo> = r
        .domains
        .iter()
        .filter_map(|d| DomainInfo::try_from(d).ok())
        .collect();
    Ok(AgentInfo {
        instance: r.instance.clone(),
        slots: domains
            .iter()
            .map(|d| plan::HostSlot {
                domain: d.id,
                slot: d.host_slot,
                token: d.host_slot_token,
            })
            .collect(),
        host_id: host.to_string(),
        host_name: host.to_string(),
        address: address.to_string(),
        domains: domains
            .iter()
            .map(|d| DomainRef {
                id: d.id,
                name: d.name.clone(),
            })
            .collect(),
    })
}

pub(crate) fn agent_err(host: &str) -> impl Fn(tonic::Status) -> CoordError + '_ {
    move |status| CoordError::Agent {
        host: host.to_string(),
        status,
    }
}

/// How a mutating call ended (see [`Agents::call_once`]).
#[derive(Debug)]
pub enum Once<T> {
    /// The agent answered.
    Answered(T),
    /// The agent process that got the request died or restarted without
    /// answering: the request may or may not have taken effect.
    Lost {
        /// Its host.
        host: String,
    },
}

/// How long a mutating call keeps asking an agent that stays registered
/// but does not answer.
const UNANSWERED: Duration = Duration::from_secs(120);

/// Whether a failed call never reached the agent (the connection was
/// refused or never made), so that it cannot have had any effect.
pub fn not_sent(e: &CoordError) -> bool {
    let CoordError::Agent { status, .. } = e else {
        return false;
    };
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::AddrNotAvailable
            ) {
                return true;
            }
        }
        if e.to_string().contains("tcp connect error") {
            return true;
        }
        src = e.source();
    }
    false
}
