//! Reaching node agents: discovery (the registry in the cluster store, or
//! fixed addresses on one host), connections over any transport (gRPC over
//! TCP or a unix socket, or an agent served in the same process), and the
//! agent calls the coordinator makes, in the coordinator's own types. The
//! agent's generated types stop here.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_cluster::Kv;
use cairn_domain::api::{CopyTarget, DomainInfo, JobInfo, Recovered, RequestState, TagSpec};
use cairn_domain::{Allocation, Format, TagId, VolumeId};
use cairn_proto::agent as pb;
use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::convert::{self as wire, ConvertError};
use cairn_proto::transport::{lazy_channel, Target, MAX_DECODING};
use tonic::codegen::http;
use tower::ServiceExt;

use crate::error::{CoordError, Result};
use crate::plan::{self, AgentInfo, DomainRef, TagInfo, VolumeInfo};

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

/// A transport over the network: `http://host:port`, or a unix socket
/// path (`unix:/path` or `/path`). Connects lazily: an unreachable agent
/// fails the call with UNAVAILABLE.
pub fn net_transport(address: &str) -> Result<Transport> {
    let channel = lazy_channel(&Target::parse(address), Duration::from_secs(2))
        .map_err(|e| CoordError::invalid("address", format!("{address:?}: {e}")))?;
    Ok(Transport::new(
        channel.map_err(|e| TransportError(Box::new(e) as BoxError)),
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
        }
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
        let t = net_transport(address)?;
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

    /// Run `f` on an agent that sees `domain` (and `also`), picked by
    /// load; when the agent is unreachable or fenced, on another one.
    pub async fn with_agent<T, F, Fut>(
        &self,
        domain: &uuid::Uuid,
        also: Option<&uuid::Uuid>,
        spread: u64,
        f: F,
    ) -> Result<T>
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
                let Some(a) = plan::pick_agent(&agents, domain, also, &load, &exclude, spread)
                else {
                    break;
                };
                let _busy = self.busy(&a.host_id);
                match f(self.conn(a)?).await {
                    Err(e) if e.agent_unavailable() => {
                        tracing::warn!(host = %a.host_id, error = %e, "agent unavailable; trying another");
                        exclude.insert(a.host_id.clone());
                        last = Some(e);
                    }
                    r => return r,
                }
            }
        }
        Err(last.unwrap_or_else(|| CoordError::NoAgent(domain.to_string())))
    }

    /// Make a mutating call `f` on an agent that sees `domain` (and
    /// `also`) at most once per agent process: a call that never reached
    /// its agent goes to another; one whose answer was lost is sent again
    /// with the same request id to the same process (which answers with the
    /// first outcome) for as long as that process stays registered. When it
    /// dies or restarts first, the outcome is [`Once::Lost`] and only the
    /// domain can tell what happened.
    pub async fn call_once<T, F, Fut>(
        &self,
        domain: &uuid::Uuid,
        also: Option<&uuid::Uuid>,
        spread: u64,
        f: F,
    ) -> Result<Once<T>>
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
                let Some(a) = plan::pick_agent(&agents, domain, also, &load, &exclude, spread)
                else {
                    break;
                };
                let _busy = self.busy(&a.host_id);
                match f(self.conn(a)?).await {
                    Err(e) if not_sent(&e) => {
                        tracing::warn!(host = %a.host_id, error = %e, "agent unreachable; trying another");
                        exclude.insert(a.host_id.clone());
                        last = Some(e);
                    }
                    Err(e) if e.agent_unavailable() => return self.ask_again(a, e, &f).await,
                    r => return r.map(Once::Answered),
                }
            }
        }
        Err(last.unwrap_or_else(|| CoordError::NoAgent(domain.to_string())))
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

fn agent_err(host: &str) -> impl Fn(tonic::Status) -> CoordError + '_ {
    move |status| CoordError::Agent {
        host: host.to_string(),
        status,
    }
}

/// An agent's job as the coordinator follows it.
#[derive(Debug, Clone)]
pub struct AgentJob {
    /// Running, succeeded, failed or cancelled.
    pub state: plan::JobState,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    /// The tag a copy made.
    pub tag: Option<TagInfo>,
    /// Why it failed.
    pub error: Option<plan::JobError>,
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

/// What a new disk is made of.
#[derive(Debug, Clone)]
pub struct NewDisk {
    /// Raw or qcow2.
    pub format: Format,
    /// Virtual size.
    pub size: u64,
    /// Preallocated or not.
    pub preallocated: bool,
    /// Free text.
    pub description: String,
    /// Options of its tag.
    pub options: Vec<(String, String)>,
}

/// A connection to one agent.
#[derive(Clone)]
pub struct AgentConn {
    /// Its host id.
    pub host: String,
    /// Its process's instance id (empty when unknown).
    pub instance: String,
    client: AgentClient<Transport>,
}

fn bad(host: &str, what: impl Into<String>) -> CoordError {
    CoordError::Internal(format!("agent {host} answered {}", what.into()))
}

/// An answer this coordinator cannot read is the agent's fault, not the
/// caller's.
fn unreadable(host: &str) -> impl Fn(ConvertError) -> CoordError + '_ {
    move |e| bad(host, format!("a message it cannot read: {e}"))
}

fn tag_of(host: &str, t: &pb::Tag) -> Result<TagInfo> {
    TagInfo::try_from(t).map_err(unreadable(host))
}

fn allocation(preallocated: bool) -> Allocation {
    if preallocated {
        Allocation::Preallocated
    } else {
        Allocation::Sparse
    }
}

fn need<T>(host: &str, v: Option<T>, what: &str) -> Result<T> {
    v.ok_or_else(|| bad(host, format!("without {what}")))
}

impl AgentConn {
    fn c(&self) -> AgentClient<Transport> {
        self.client.clone()
    }

    fn err(&self) -> impl Fn(tonic::Status) -> CoordError + '_ {
        agent_err(&self.host)
    }

    /// Every tag and volume of a domain.
    pub async fn contents(&self, domain: &uuid::Uuid) -> Result<(Vec<TagInfo>, Vec<VolumeInfo>)> {
        let d = domain.to_string();
        let mut c = self.c();
        let tags = c
            .list_tags(pb::ListTagsRequest { domain: d.clone() })
            .await
            .map_err(self.err())?
            .into_inner()
            .tags;
        let vols = c
            .list_volumes(pb::ListVolumesRequest { domain: d })
            .await
            .map_err(self.err())?
            .into_inner()
            .volumes;
        Ok((
            tags.iter()
                .map(|t| tag_of(&self.host, t))
                .collect::<Result<_>>()?,
            vols.iter()
                .map(|v| VolumeInfo::try_from(v).map_err(unreadable(&self.host)))
                .collect::<Result<_>>()?,
        ))
    }

    /// One tag.
    pub async fn tag(&self, domain: &uuid::Uuid, id: &TagId) -> Result<TagInfo> {
        let t = self
            .c()
            .get_tag(pb::GetTagRequest {
                domain: domain.to_string(),
                tag_id: id.to_string(),
            })
            .await
            .map_err(self.err())?
            .into_inner();
        tag_of(&self.host, &t)
    }

    /// Create a disk: a volume with a strong tag, in one transaction.
    pub async fn create_disk(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        d: &NewDisk,
    ) -> Result<TagInfo> {
        let r = self
            .c()
            .create_volume(pb::CreateVolumeRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                format: wire::volume_format_code(d.format),
                capacity: d.size,
                size: 0,
                allocation: wire::allocation_code(allocation(d.preallocated)),
                parent_tag: String::new(),
                description: d.description.clone(),
                tag: Some((&TagSpec::disk(d.options.clone())).into()),
                keep_locked: false,
                lock_lease_seconds: 0,
            })
            .await
            .map_err(self.err())?
            .into_inner();
        tag_of(&self.host, &need(&self.host, r.tag, "a tag")?)
    }

    /// A thin disk on a snapshot: a qcow2 layer on `parent` with a strong
    /// tag, in one transaction.
    pub async fn create_on(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        parent: &TagId,
        description: &str,
        options: &[(String, String)],
    ) -> Result<TagInfo> {
        let r = self
            .c()
            .create_volume(pb::CreateVolumeRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                format: pb::VolumeFormat::Qcow2 as i32,
                capacity: 0,
                size: 0,
                allocation: wire::allocation_code(Allocation::Sparse),
                parent_tag: parent.to_string(),
                description: description.into(),
                tag: Some((&TagSpec::disk(options.to_vec())).into()),
                keep_locked: false,
                lock_lease_seconds: 0,
            })
            .await
            .map_err(self.err())?
            .into_inner();
        tag_of(&self.host, &need(&self.host, r.tag, "a tag")?)
    }

    /// Snapshot a disk, and with `clone` also make a thin clone of it, in
    /// one transaction; `mark` goes into the snapshot's weak tag options.
    /// Returns the snapshot's weak tag and the clone's tag.
    pub async fn snapshot(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        disk: &TagId,
        description: &str,
        mark: &[(String, String)],
        clone: Option<&[(String, String)]>,
    ) -> Result<(TagInfo, Option<TagInfo>)> {
        let r = self
            .c()
            .snapshot(pb::SnapshotRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                tag_id: disk.to_string(),
                description: description.into(),
                size: 0,
                clone: clone.map(|o| (&TagSpec::disk(o.to_vec())).into()),
                snapshot_options: wire::options_to_wire(mark),
            })
            .await
            .map_err(self.err())?
            .into_inner();
        let weak = tag_of(&self.host, &need(&self.host, r.parent_tag, "a parent tag")?)?;
        let clone = match (clone, r.clone_tag) {
            (Some(_), Some(t)) => Some(tag_of(&self.host, &t)?),
            (Some(_), None) => return Err(bad(&self.host, "a snapshot without its clone")),
            _ => None,
        };
        Ok((weak, clone))
    }

    /// Delete a disk and what only it references.
    pub async fn delete_disk(&self, rid: &str, domain: &uuid::Uuid, disk: &TagId) -> Result<()> {
        self.c()
            .delete_disk(pb::DeleteDiskRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                tag_id: disk.to_string(),
            })
            .await
            .map_err(self.err())?;
        Ok(())
    }

    /// Grow a disk's top volume and its tag's size.
    pub async fn extend(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        volume: &VolumeId,
        disk: &TagId,
        size: u64,
    ) -> Result<()> {
        self.c()
            .extend_volume(pb::ExtendVolumeRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                volume_id: volume.to_string(),
                capacity: size,
                lock_id: String::new(),
                tag_id: disk.to_string(),
            })
            .await
            .map_err(self.err())?;
        Ok(())
    }

    /// Start copying a volume's chain (flattened) into a new disk on
    /// `target`. Returns the agent's job id.
    #[allow(clippy::too_many_arguments)]
    pub async fn copy(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        volume: &VolumeId,
        target: &uuid::Uuid,
        format: Option<Format>,
        preallocated: bool,
        description: &str,
        options: &[(String, String)],
    ) -> Result<String> {
        let j = self
            .c()
            .copy_volume(pb::CopyVolumeRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                volume_id: volume.to_string(),
                target: Some(
                    (&CopyTarget {
                        format,
                        allocation: allocation(preallocated),
                        description: description.into(),
                        tag: Some(TagSpec::disk(options.to_vec())),
                    })
                        .into(),
                ),
                target_domain: if target == domain {
                    String::new()
                } else {
                    target.to_string()
                },
            })
            .await
            .map_err(self.err())?
            .into_inner();
        Ok(j.id)
    }

    /// Start merging a snapshot away. Returns the agent's job id.
    pub async fn merge(&self, rid: &str, domain: &uuid::Uuid, snap: &TagId) -> Result<String> {
        let j = self
            .c()
            .merge_snapshot(pb::MergeSnapshotRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                tag_id: snap.to_string(),
            })
            .await
            .map_err(self.err())?
            .into_inner();
        Ok(j.id)
    }

    /// Point `disk` at the volume of `with` and free its old chain.
    pub async fn swap(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        disk: &TagId,
        with: &TagId,
    ) -> Result<()> {
        self.c()
            .swap_disk(pb::SwapDiskRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                tag_id: disk.to_string(),
                with_tag_id: with.to_string(),
            })
            .await
            .map_err(self.err())?;
        Ok(())
    }

    /// An agent job.
    pub async fn job(&self, id: &str) -> Result<AgentJob> {
        let j = self
            .c()
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .map_err(self.err())?
            .into_inner();
        let j = JobInfo::try_from(&j).map_err(unreadable(&self.host))?;
        Ok(AgentJob {
            state: match j.state {
                cairn_domain::api::JobState::Running => plan::JobState::Running,
                cairn_domain::api::JobState::Succeeded => plan::JobState::Succeeded,
                cairn_domain::api::JobState::Failed => plan::JobState::Failed,
                cairn_domain::api::JobState::Cancelled => plan::JobState::Cancelled,
            },
            done: j.done_bytes,
            total: j.total_bytes,
            tag: j.tag,
            error: j.error.map(|e| plan::JobError {
                code: e.code,
                reason: e.reason,
                message: format!("agent {}: {}", self.host, e.message),
            }),
        })
    }

    /// Ask an agent job to stop.
    pub async fn cancel(&self, id: &str) -> Result<()> {
        self.c()
            .cancel_job(pb::CancelJobRequest { job_id: id.into() })
            .await
            .map_err(self.err())?;
        Ok(())
    }

    /// Tags active on this agent's host in a domain.
    pub async fn active_tags(&self, domain: &uuid::Uuid) -> Result<Vec<String>> {
        let r = self
            .c()
            .list_activations(pb::ListActivationsRequest {
                domain: domain.to_string(),
            })
            .await
            .map_err(self.err())?
            .into_inner();
        Ok(r.activations.into_iter().map(|a| a.tag_id).collect())
    }

    /// Recover dead hosts' journals (and collect garbage) on a domain.
    pub async fn recover(&self, domain: &uuid::Uuid, garbage: bool) -> Result<Recovered> {
        let r = self
            .c()
            .recover_domain(pb::RecoverDomainRequest {
                domain: domain.to_string(),
                collect_garbage: garbage,
            })
            .await
            .map_err(self.err())?
            .into_inner();
        Recovered::try_from(&r).map_err(unreadable(&self.host))
    }

    /// What this agent process knows of request id `rid`.
    pub async fn request_state(&self, rid: &str) -> Result<RequestState> {
        let r = self
            .c()
            .get_request(pb::GetRequestRequest {
                request_id: rid.into(),
            })
            .await
            .map_err(self.err())?
            .into_inner();
        Ok(wire::request_state("state", r.state)
            .map_err(unreadable(&self.host))?
            .unwrap_or(RequestState::Unknown))
    }

    /// Whether the agent answers at all.
    pub async fn ping(&self) -> bool {
        self.c()
            .list_domains(pb::ListDomainsRequest {})
            .await
            .is_ok()
    }
}
