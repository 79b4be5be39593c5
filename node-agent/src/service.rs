//! The gRPC layer: converts `cairn.agent.v1` messages to domain types and
//! back, runs each operation on a blocking thread, remembers request ids,
//! records metrics, and maps every error to a status in one place
//! ([`to_status`]). Generated types go no further than this module.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_domain::{
    Allocation, DomainError, Format, Legality, Strategy, Tag, TagId, TagState, TagType, Volume,
    VolumeId,
};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::agent::{self, Agent, Opened, TagSpec};
use crate::error::AgentError;
use crate::metrics::Metrics;
use crate::pb;

/// The error domain in status details.
pub const ERROR_DOMAIN: &str = "cairn.agent.v1";

/// The one mapping from agent errors to gRPC statuses. The stable code
/// goes into a google.rpc.ErrorInfo; invalid fields into a BadRequest.
pub fn to_status(e: &AgentError) -> Status {
    let code = match e {
        AgentError::Domain(d) => match d {
            DomainError::InvalidArgument { .. } => Code::InvalidArgument,
            DomainError::NotFound { .. } => Code::NotFound,
            DomainError::AlreadyExists { .. } => Code::AlreadyExists,
            DomainError::FailedPrecondition(_) => Code::FailedPrecondition,
            DomainError::NoSpace(_) => Code::ResourceExhausted,
            DomainError::LockTimeout { .. } => Code::Aborted,
            DomainError::Fenced(_) => Code::Unavailable,
            DomainError::Corrupt { .. } => Code::DataLoss,
            DomainError::NotADomain(_) => Code::FailedPrecondition,
            DomainError::ReadOnly => Code::FailedPrecondition,
            DomainError::Changed(_) => Code::Aborted,
            DomainError::Lock { .. } => Code::Unavailable,
            DomainError::Io { .. } => Code::Unavailable,
        },
        AgentError::InvalidArgument { .. } => Code::InvalidArgument,
        AgentError::NotFound { .. } => Code::NotFound,
        AgentError::FailedPrecondition(_) => Code::FailedPrecondition,
        AgentError::InUse(_) => Code::FailedPrecondition,
        AgentError::CannotGrowInPlace(_) => Code::ResourceExhausted,
        AgentError::RequestIdReused(_) => Code::InvalidArgument,
        AgentError::Cancelled => Code::Cancelled,
        AgentError::Qemu { .. } => Code::Internal,
        AgentError::CorruptImage { .. } => Code::DataLoss,
        AgentError::Io { .. } => Code::Unavailable,
    };
    let mut details = ErrorDetails::new();
    details.set_error_info(e.code(), ERROR_DOMAIN, HashMap::new());
    let field = match e {
        AgentError::InvalidArgument { field, reason }
        | AgentError::Domain(DomainError::InvalidArgument { field, reason }) => {
            Some((*field, reason.clone()))
        }
        AgentError::RequestIdReused(_) => Some(("request_id", e.to_string())),
        _ => None,
    };
    if let Some((f, r)) = field {
        details.add_bad_request_violation(f, r);
    }
    // The whole cause chain, so "I/O error: x" also says why.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    Status::with_error_details(code, msg, details)
}

/// Remembered outcomes of mutating requests, by (method, request id).
#[derive(Default)]
pub struct RequestLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    map: HashMap<(&'static str, String), Arc<tokio::sync::Mutex<Option<Remembered>>>>,
    order: VecDeque<(&'static str, String)>,
}

struct Remembered {
    fingerprint: u64,
    response: Vec<u8>,
}

/// How many outcomes are remembered.
const REQUEST_LOG_SIZE: usize = 20_000;

impl RequestLog {
    fn slot(&self, method: &'static str, id: &str) -> Arc<tokio::sync::Mutex<Option<Remembered>>> {
        let mut g = self.inner.lock().expect("poisoned");
        let key = (method, id.to_string());
        if let Some(s) = g.map.get(&key) {
            return s.clone();
        }
        let s = Arc::new(tokio::sync::Mutex::new(None));
        g.map.insert(key.clone(), s.clone());
        g.order.push_back(key);
        while g.order.len() > REQUEST_LOG_SIZE {
            if let Some(old) = g.order.pop_front() {
                g.map.remove(&old);
            }
        }
        s
    }

    /// What is known of request id `id`, under any method.
    fn state(&self, id: &str) -> pb::RequestState {
        let g = self.inner.lock().expect("poisoned");
        let mut out = pb::RequestState::Unknown;
        for ((_, rid), slot) in &g.map {
            if rid != id {
                continue;
            }
            out = match slot.try_lock() {
                Err(_) => return pb::RequestState::Running,
                Ok(r) if r.is_some() => pb::RequestState::Answered,
                Ok(_) => pb::RequestState::Failed,
            };
        }
        out
    }
}

/// FNV-1a of a request's bytes: only equality of requests matters here.
pub fn fingerprint(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A request id as the domain journal records it: a UUID's bytes, or a
/// hash of any other string.
fn request_bytes(id: &str) -> [u8; 16] {
    if let Ok(u) = uuid::Uuid::parse_str(id) {
        return *u.as_bytes();
    }
    let a = fingerprint(id.as_bytes());
    let b = fingerprint(&[id.as_bytes(), b"#"].concat());
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&b.to_le_bytes());
    out
}

fn check_request_id(id: &str) -> Result<(), AgentError> {
    if id.len() > 64 || id.chars().any(char::is_control) {
        return Err(AgentError::invalid(
            "request_id",
            "must be at most 64 bytes without control characters",
        ));
    }
    Ok(())
}

/// The `cairn.agent.v1.Agent` service.
#[derive(Clone)]
pub struct AgentService {
    agent: Arc<Agent>,
    log: Arc<RequestLog>,
    metrics: Arc<Metrics>,
    /// Fault injection for crash tests: die right after one of these
    /// methods' change is committed, before answering (see [`FAULT_ENV`]).
    exit_after: Vec<String>,
}

/// The environment variable that names methods (comma-separated) after
/// whose commit the agent process dies without answering, as a host crashing at that point
/// would. For crash tests only; unset in any real deployment.
pub const FAULT_ENV: &str = "CAIRN_FAULT_EXIT_AFTER_COMMIT";

impl AgentService {
    /// Serve `agent`.
    pub fn new(agent: Arc<Agent>, metrics: Arc<Metrics>) -> AgentService {
        let exit_after: Vec<String> = std::env::var(FAULT_ENV)
            .unwrap_or_default()
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        if !exit_after.is_empty() {
            tracing::warn!(methods = ?exit_after, "fault injection: this agent dies after a commit");
        }
        AgentService {
            agent,
            log: Arc::new(RequestLog::default()),
            metrics,
            exit_after,
        }
    }

    /// Run `f` on a blocking thread with the agent, timing it.
    async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<Agent>) -> Result<T, AgentError> + Send + 'static,
    {
        let agent = self.agent.clone();
        let t = Instant::now();
        let r = tokio::task::spawn_blocking(move || f(&agent))
            .await
            .map_err(|e| Status::internal(format!("{op} panicked: {e}")))?;
        let took = t.elapsed();
        match r {
            Ok(v) => {
                self.metrics.observe(op, took, None);
                tracing::debug!(op, took_ms = took.as_secs_f64() * 1e3, "ok");
                Ok(v)
            }
            Err(e) => {
                self.metrics.observe(op, took, Some(e.code()));
                tracing::info!(op, code = e.code(), error = %e, "failed");
                Err(to_status(&e))
            }
        }
    }

    /// Run a mutating request once per request id: a retry gets the first
    /// outcome back, marked by `replayed`; the same id with a different
    /// request is refused.
    async fn once<Req, Resp, Fut>(
        &self,
        method: &'static str,
        request_id: &str,
        req: &Req,
        replayed: fn(&mut Resp),
        run: Fut,
    ) -> Result<Response<Resp>, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
        Fut: Future<Output = Result<Resp, Status>>,
    {
        if let Err(e) = check_request_id(request_id) {
            return Err(to_status(&e));
        }
        if request_id.is_empty() {
            return run.await.map(Response::new);
        }
        let fp = fingerprint(&req.encode_to_vec());
        let slot = self.log.slot(method, request_id);
        let mut g = slot.lock().await;
        if let Some(r) = g.as_ref() {
            if r.fingerprint != fp {
                return Err(to_status(&AgentError::RequestIdReused(
                    request_id.to_string(),
                )));
            }
            let mut resp = Resp::decode(r.response.as_slice())
                .map_err(|e| Status::internal(format!("remembered response: {e}")))?;
            replayed(&mut resp);
            return Ok(Response::new(resp));
        }
        let resp = run.await?;
        if self.exit_after.iter().any(|m| m == method) {
            tracing::error!(
                method,
                request_id,
                "fault injection: dying after the commit"
            );
            // SAFETY: ends this process at once, as a crash would: no
            // destructors, no answer, no slot released.
            unsafe { libc::_exit(137) };
        }
        *g = Some(Remembered {
            fingerprint: fp,
            response: resp.encode_to_vec(),
        });
        Ok(Response::new(resp))
    }
}

// ---- conversions ----------------------------------------------------------------------

type R<T> = Result<T, AgentError>;

fn vol_id(field: &'static str, s: &str) -> R<VolumeId> {
    if s.is_empty() {
        return Err(AgentError::invalid(field, "is required"));
    }
    Ok(VolumeId::parse(field, s)?)
}

fn tag_id(field: &'static str, s: &str) -> R<TagId> {
    if s.is_empty() {
        return Err(AgentError::invalid(field, "is required"));
    }
    Ok(TagId::parse(field, s)?)
}

fn format_of(field: &'static str, v: i32) -> R<Format> {
    match pb::VolumeFormat::try_from(v) {
        Ok(pb::VolumeFormat::Raw) => Ok(Format::Raw),
        Ok(pb::VolumeFormat::Qcow2) => Ok(Format::Qcow2),
        _ => Err(AgentError::invalid(
            field,
            format!("{v} is not a volume format (1 raw, 2 qcow2)"),
        )),
    }
}

fn allocation_of(v: i32) -> R<Allocation> {
    match pb::Allocation::try_from(v) {
        Ok(pb::Allocation::Unspecified | pb::Allocation::Sparse) => Ok(Allocation::Sparse),
        Ok(pb::Allocation::Preallocated) => Ok(Allocation::Preallocated),
        _ => Err(AgentError::invalid(
            "allocation",
            format!("{v} is not an allocation (1 sparse, 2 preallocated)"),
        )),
    }
}

fn legality_of(v: i32) -> R<Legality> {
    match pb::Legality::try_from(v) {
        Ok(pb::Legality::Legal) => Ok(Legality::Legal),
        Ok(pb::Legality::Illegal) => Ok(Legality::Illegal),
        _ => Err(AgentError::invalid(
            "legality",
            format!("{v} is not a legality (1 legal, 2 illegal)"),
        )),
    }
}

fn tag_spec_of(t: &pb::TagSpec) -> R<TagSpec> {
    let strategy = match pb::Strategy::try_from(t.strategy) {
        Ok(pb::Strategy::Unspecified | pb::Strategy::Chain) => Strategy::Chain,
        Ok(pb::Strategy::Copy) => Strategy::Copy,
        _ => {
            return Err(AgentError::invalid(
                "tag.strategy",
                format!("{} is not a strategy", t.strategy),
            ))
        }
    };
    let tag_type = match pb::TagType::try_from(t.r#type) {
        Ok(pb::TagType::Unspecified | pb::TagType::Strong) => TagType::Strong,
        Ok(pb::TagType::Weak) => TagType::Weak,
        _ => {
            return Err(AgentError::invalid(
                "tag.type",
                format!("{} is not a tag type", t.r#type),
            ))
        }
    };
    let state = match pb::TagState::try_from(t.state) {
        Ok(pb::TagState::Unspecified | pb::TagState::Optimized) => TagState::Optimized,
        Ok(pb::TagState::Degraded) => TagState::Degraded,
        Ok(pb::TagState::Broken) => TagState::Broken,
        _ => {
            return Err(AgentError::invalid(
                "tag.state",
                format!("{} is not a tag state", t.state),
            ))
        }
    };
    Ok(TagSpec {
        size: t.size,
        mutable: t.mutable,
        strategy,
        options: t
            .options
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect(),
        tag_type,
        state,
    })
}

fn pb_format(f: Format) -> i32 {
    match f {
        Format::Raw => pb::VolumeFormat::Raw as i32,
        Format::Qcow2 => pb::VolumeFormat::Qcow2 as i32,
    }
}

fn pb_volume(o: &Opened, v: &Volume) -> pb::Volume {
    pb::Volume {
        id: v.id.to_string(),
        domain: o.name().to_string(),
        parent_tag: v.parent.map(|p| p.to_string()).unwrap_or_default(),
        format: pb_format(v.format),
        capacity: v.capacity,
        size: v.extent_count * o.domain.geometry().extent_size,
        extent_start: v.extent_start,
        extent_count: v.extent_count,
        legality: match v.legality {
            Legality::Legal => pb::Legality::Legal as i32,
            Legality::Illegal => pb::Legality::Illegal as i32,
        },
        allocation: match v.allocation {
            Allocation::Sparse => pb::Allocation::Sparse as i32,
            Allocation::Preallocated => pb::Allocation::Preallocated as i32,
        },
        ctime: v.ctime,
        description: v.description.clone(),
        tag_refs: v.tag_refs,
        generation: v.generation,
        token: v.token,
        writer_slot: v.writer_slot as u32,
    }
}

fn pb_tag(o: &Opened, t: &Tag) -> pb::Tag {
    pb::Tag {
        id: t.id.to_string(),
        domain: o.name().to_string(),
        volume: t.volume.to_string(),
        size: t.size,
        mutable: t.mutable,
        strategy: match t.strategy {
            Strategy::Chain => pb::Strategy::Chain as i32,
            Strategy::Copy => pb::Strategy::Copy as i32,
        },
        options: t
            .options
            .iter()
            .map(|(k, v)| pb::KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        r#type: match t.tag_type {
            TagType::Strong => pb::TagType::Strong as i32,
            TagType::Weak => pb::TagType::Weak as i32,
        },
        state: match t.state {
            TagState::Optimized => pb::TagState::Optimized as i32,
            TagState::Degraded => pb::TagState::Degraded as i32,
            TagState::Broken => pb::TagState::Broken as i32,
        },
        ctime: t.ctime,
        child_refs: t.child_refs,
        user_data_bytes: t.user_data.len,
        generation: t.generation,
        token: t.token,
        writer_slot: t.writer_slot as u32,
    }
}

fn pb_domain(o: &Opened) -> R<pb::DomainInfo> {
    let g = o.domain.geometry();
    let u = o.domain.usage()?;
    Ok(pb::DomainInfo {
        id: o.id().to_string(),
        name: o.name().to_string(),
        path: o.path.display().to_string(),
        host_slot: o.domain.slot().unwrap_or(u32::MAX),
        extent_size: g.extent_size,
        extents_total: u.extents_total,
        extents_free: u.extents_total - u.extents_used,
        volume_slots_total: u.volume_slots,
        volumes: u.volumes,
        tag_slots_total: u.tag_slots,
        tags: u.tags,
        host_slots_total: g.host_slots,
        host_slot_token: o.domain.slot_token().unwrap_or(0),
    })
}

fn pb_activation(a: &agent::Activation) -> pb::Activation {
    pb::Activation {
        domain: a.domain.to_string(),
        tag_id: a.tag.clone(),
        path: a.path.display().to_string(),
        volumes: a
            .volumes
            .iter()
            .map(|v| pb::ActivatedVolume {
                volume_id: v.volume.to_string(),
                path: v.path.display().to_string(),
                device: v.device.display().to_string(),
                format: pb_format(v.format),
            })
            .collect(),
    }
}

fn lease(secs: u32) -> Duration {
    if secs == 0 {
        agent::DEFAULT_LEASE
    } else {
        Duration::from_secs(secs as u64)
    }
}

fn target_of(t: Option<&pb::TargetSpec>) -> R<crate::jobs::Target> {
    let Some(t) = t else {
        return Ok(crate::jobs::Target {
            format: None,
            allocation: Allocation::Sparse,
            description: String::new(),
            tag: None,
        });
    };
    let tag = match &t.tag {
        Some(s) => {
            if !s.volume.is_empty() {
                return Err(AgentError::invalid(
                    "target.tag.volume",
                    "must be empty: the tag points at the new volume",
                ));
            }
            Some(tag_spec_of(s)?)
        }
        None => None,
    };
    Ok(crate::jobs::Target {
        format: if t.format == 0 {
            None
        } else {
            Some(format_of("target.format", t.format)?)
        },
        allocation: allocation_of(t.allocation)?,
        description: t.description.clone(),
        tag,
    })
}

fn pb_job(j: &crate::jobs::Job) -> pb::Job {
    use crate::jobs::{Outcome, Status as S};
    use std::sync::atomic::Ordering::Relaxed;
    let (st, finished) = j.status();
    let mut out = pb::Job {
        id: j.id.clone(),
        kind: j.kind.to_string(),
        done_bytes: j.progress.done.load(Relaxed),
        total_bytes: j.progress.total.load(Relaxed),
        skipped_bytes: j.progress.skipped.load(Relaxed),
        started: j.started,
        finished,
        ..Default::default()
    };
    out.state = match st {
        S::Running => pb::JobState::Running,
        S::Succeeded(o) => {
            match o {
                Outcome::Volume {
                    domain,
                    volume,
                    tag,
                } => {
                    out.volume = Some(pb_volume(&domain, &volume));
                    out.tag = tag.as_ref().map(|t| pb_tag(&domain, t));
                }
                Outcome::File(p) => out.path = p.display().to_string(),
            }
            pb::JobState::Succeeded
        }
        S::Failed(e) => {
            let s = to_status(&e);
            out.error_code = s.code() as i32;
            out.error_reason = e.code().to_string();
            out.error_message = s.message().to_string();
            pb::JobState::Failed
        }
        S::Cancelled => pb::JobState::Cancelled,
    } as i32;
    out
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    type WatchJobStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::Job, Status>> + Send + 'static>,
    >;

    async fn merge_snapshot(
        &self,
        r: Request<pb::MergeSnapshotRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "merge_snapshot",
            &rid,
            &r,
            |_| {},
            self.run("merge_snapshot", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                let j = a.start_merge(o, &id, request_bytes(&req.request_id))?;
                Ok(pb_job(&j))
            }),
        )
        .await
    }

    async fn swap_disk(
        &self,
        r: Request<pb::SwapDiskRequest>,
    ) -> Result<Response<pb::SwapDiskResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "swap_disk",
            &rid,
            &r,
            |x| x.changed = false,
            self.run("swap_disk", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                let with = tag_id("with_tag_id", &req.with_tag_id)?;
                let (t, tags, vols) =
                    a.swap_disk(&o, &id, &with, request_bytes(&req.request_id))?;
                Ok(pb::SwapDiskResponse {
                    tag: Some(pb_tag(&o, &t)),
                    tags_removed: tags.iter().map(|t| t.to_string()).collect(),
                    volumes_removed: vols.iter().map(|v| v.to_string()).collect(),
                    changed: true,
                })
            }),
        )
        .await
    }

    async fn recover_domain(
        &self,
        r: Request<pb::RecoverDomainRequest>,
    ) -> Result<Response<pb::RecoverDomainResponse>, Status> {
        let r = r.into_inner();
        self.run("recover_domain", move |a| {
            let o = a.domain(&r.domain)?;
            let (slots, fwd, back, removed) = a.recover_domain(&o, r.collect_garbage)?;
            let mut active_slots = Vec::new();
            for (i, h) in o.domain.read_slot_headers()?.into_iter().enumerate() {
                match h {
                    Ok(h) if h.state == cairn_domain::layout::slot_state::ACTIVE => active_slots
                        .push(pb::ActiveSlot {
                            slot: i as u32,
                            token: h.token,
                        }),
                    Ok(_) => {}
                    Err(d) => {
                        return Err(AgentError::Domain(DomainError::corrupt(
                            format!("host slot {i} header"),
                            o.domain.geometry().slot_off(i as u32),
                            d,
                        )))
                    }
                }
            }
            Ok(pb::RecoverDomainResponse {
                slots_recovered: slots,
                rolled_forward: fwd,
                rolled_back: back,
                volumes_removed: removed.iter().map(|v| v.to_string()).collect(),
                active_slots,
            })
        })
        .await
        .map(Response::new)
    }

    async fn get_request(
        &self,
        r: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::GetRequestResponse>, Status> {
        let r = r.into_inner();
        if let Err(e) = check_request_id(&r.request_id) {
            return Err(to_status(&e));
        }
        Ok(Response::new(pb::GetRequestResponse {
            state: self.log.state(&r.request_id) as i32,
        }))
    }

    async fn copy_volume(
        &self,
        r: Request<pb::CopyVolumeRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "copy_volume",
            &rid,
            &r,
            |_| {},
            self.run("copy_volume", move |a| {
                let o = a.domain(&req.domain)?;
                let id = vol_id("volume_id", &req.volume_id)?;
                let t = target_of(req.target.as_ref())?;
                let to = if req.target_domain.is_empty() {
                    None
                } else {
                    Some(a.domain(&req.target_domain)?)
                };
                let j = a.start_copy(o, &id, to, t, request_bytes(&req.request_id))?;
                Ok(pb_job(&j))
            }),
        )
        .await
    }

    async fn import_volume(
        &self,
        r: Request<pb::ImportVolumeRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "import_volume",
            &rid,
            &r,
            |_| {},
            self.run("import_volume", move |a| {
                let o = a.domain(&req.domain)?;
                let f = format_of("source_format", req.source_format)?;
                let t = target_of(req.target.as_ref())?;
                let j = a.start_import(o, &req.path, f, t, request_bytes(&req.request_id))?;
                Ok(pb_job(&j))
            }),
        )
        .await
    }

    async fn export_volume(
        &self,
        r: Request<pb::ExportVolumeRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "export_volume",
            &rid,
            &r,
            |_| {},
            self.run("export_volume", move |a| {
                let o = a.domain(&req.domain)?;
                let id = vol_id("volume_id", &req.volume_id)?;
                let f = if req.format == 0 {
                    Format::Raw
                } else {
                    format_of("format", req.format)?
                };
                let j = a.start_export(o, &id, &req.path, f)?;
                Ok(pb_job(&j))
            }),
        )
        .await
    }

    async fn get_job(&self, r: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let r = r.into_inner();
        self.run("get_job", move |a| {
            Ok(pb_job(a.jobs().get(&r.job_id)?.as_ref()))
        })
        .await
        .map(Response::new)
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.run("list_jobs", |a| {
            Ok(pb::ListJobsResponse {
                jobs: a.jobs().list().iter().map(|j| pb_job(j)).collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn cancel_job(
        &self,
        r: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = r.into_inner();
        self.run("cancel_job", move |a| {
            Ok(pb_job(a.cancel_job(&r.job_id)?.as_ref()))
        })
        .await
        .map(Response::new)
    }

    async fn watch_job(
        &self,
        r: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = r.into_inner().job_id;
        let job = self.agent.jobs().get(&id).map_err(|e| to_status(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let j = pb_job(&job);
                let running = j.state == pb::JobState::Running as i32;
                if last.as_ref() != Some(&j) {
                    if tx.send(Ok(j.clone())).await.is_err() {
                        return; // the client went away
                    }
                    last = Some(j);
                }
                if !running {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_domains(
        &self,
        _: Request<pb::ListDomainsRequest>,
    ) -> Result<Response<pb::ListDomainsResponse>, Status> {
        self.run("list_domains", |a| {
            let domains = a
                .domains()
                .iter()
                .map(|o| pb_domain(o))
                .collect::<R<Vec<_>>>()?;
            Ok(pb::ListDomainsResponse {
                domains,
                instance: a.instance().to_string(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn get_domain(
        &self,
        r: Request<pb::GetDomainRequest>,
    ) -> Result<Response<pb::DomainInfo>, Status> {
        let r = r.into_inner();
        self.run("get_domain", move |a| {
            pb_domain(a.domain(&r.domain)?.as_ref())
        })
        .await
        .map(Response::new)
    }

    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "create_volume",
            &rid,
            &r,
            |x| x.created = false,
            self.run("create_volume", move |a| {
                let o = a.domain(&req.domain)?;
                let parent = if req.parent_tag.is_empty() {
                    None
                } else {
                    Some(tag_id("parent_tag", &req.parent_tag)?)
                };
                let tag = match &req.tag {
                    Some(t) => {
                        if !t.volume.is_empty() {
                            return Err(AgentError::invalid(
                                "tag.volume",
                                "must be empty: the tag points at the new volume",
                            ));
                        }
                        Some(tag_spec_of(t)?)
                    }
                    None => None,
                };
                let c = a.create_volume(
                    &o,
                    agent::CreateVolume {
                        format: format_of("format", req.format)?,
                        capacity: req.capacity,
                        size: req.size,
                        allocation: allocation_of(req.allocation)?,
                        parent,
                        description: req.description.clone(),
                        tag,
                        keep_locked: req.keep_locked.then(|| lease(req.lock_lease_seconds)),
                    },
                    request_bytes(&req.request_id),
                )?;
                Ok(pb::CreateVolumeResponse {
                    volume: Some(pb_volume(&o, &c.volume)),
                    tag: c.tag.as_ref().map(|t| pb_tag(&o, t)),
                    lock_id: c.lock_id.unwrap_or_default(),
                    created: true,
                })
            }),
        )
        .await
    }

    async fn get_volume(
        &self,
        r: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        self.run("get_volume", move |a| {
            let o = a.domain(&r.domain)?;
            let id = vol_id("volume_id", &r.volume_id)?;
            Ok(pb_volume(&o, &o.domain.read_volume(&id)?))
        })
        .await
        .map(Response::new)
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = r.into_inner();
        self.run("list_volumes", move |a| {
            let o = a.domain(&r.domain)?;
            let volumes = o
                .domain
                .list_volumes()?
                .iter()
                .map(|v| pb_volume(&o, v))
                .collect();
            Ok(pb::ListVolumesResponse { volumes })
        })
        .await
        .map(Response::new)
    }

    async fn update_volume(
        &self,
        r: Request<pb::UpdateVolumeRequest>,
    ) -> Result<Response<pb::UpdateVolumeResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "update_volume",
            &rid,
            &r,
            |x| x.changed = false,
            self.run("update_volume", move |a| {
                let o = a.domain(&req.domain)?;
                let id = vol_id("volume_id", &req.volume_id)?;
                let legality = legality_of(req.legality)?;
                let parent = match (req.set_parent, req.parent_tag.as_str()) {
                    (false, "") => None,
                    (false, _) => {
                        return Err(AgentError::invalid(
                            "parent_tag",
                            "is only read with set_parent",
                        ))
                    }
                    (true, "") => Some(None),
                    (true, p) => Some(Some(tag_id("parent_tag", p)?)),
                };
                let (v, changed) = a.update_volume(
                    &o,
                    &id,
                    req.description.clone(),
                    legality,
                    parent,
                    &req.lock_id,
                    request_bytes(&req.request_id),
                )?;
                Ok(pb::UpdateVolumeResponse {
                    volume: Some(pb_volume(&o, &v)),
                    changed,
                })
            }),
        )
        .await
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "delete_volume",
            &rid,
            &r,
            |x| x.deleted = false,
            self.run("delete_volume", move |a| {
                let o = a.domain(&req.domain)?;
                let id = vol_id("volume_id", &req.volume_id)?;
                a.delete_volume(&o, &id, &req.lock_id, request_bytes(&req.request_id))?;
                Ok(pb::DeleteVolumeResponse { deleted: true })
            }),
        )
        .await
    }

    async fn extend_volume(
        &self,
        r: Request<pb::ExtendVolumeRequest>,
    ) -> Result<Response<pb::ExtendVolumeResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "extend_volume",
            &rid,
            &r,
            |x| x.changed = false,
            self.run("extend_volume", move |a| {
                let o = a.domain(&req.domain)?;
                let id = vol_id("volume_id", &req.volume_id)?;
                let tag = if req.tag_id.is_empty() {
                    None
                } else {
                    Some(tag_id("tag_id", &req.tag_id)?)
                };
                let (v, changed) = a.extend_volume(
                    &o,
                    &id,
                    req.capacity,
                    &req.lock_id,
                    tag.as_ref(),
                    request_bytes(&req.request_id),
                )?;
                Ok(pb::ExtendVolumeResponse {
                    volume: Some(pb_volume(&o, &v)),
                    changed,
                })
            }),
        )
        .await
    }

    async fn lock_volume(
        &self,
        r: Request<pb::LockVolumeRequest>,
    ) -> Result<Response<pb::LockVolumeResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "lock_volume",
            &rid,
            &r,
            |_| {},
            self.run("lock_volume", move |a| {
                let o = a.domain(&req.domain)?;
                let id = vol_id("volume_id", &req.volume_id)?;
                let (lock_id, token) = a.lock_volume(&o, &id, lease(req.lease_seconds))?;
                Ok(pb::LockVolumeResponse { lock_id, token })
            }),
        )
        .await
    }

    async fn unlock_volume(
        &self,
        r: Request<pb::UnlockVolumeRequest>,
    ) -> Result<Response<pb::UnlockVolumeResponse>, Status> {
        let r = r.into_inner();
        self.run("unlock_volume", move |a| {
            if r.lock_id.is_empty() {
                return Err(AgentError::invalid("lock_id", "is required"));
            }
            Ok(pb::UnlockVolumeResponse {
                released: a.unlock(&r.lock_id),
            })
        })
        .await
        .map(Response::new)
    }

    async fn measure_volume(
        &self,
        r: Request<pb::MeasureVolumeRequest>,
    ) -> Result<Response<pb::MeasureVolumeResponse>, Status> {
        let r = r.into_inner();
        self.run("measure_volume", move |a| {
            let o = a.domain(&r.domain)?;
            let id = vol_id("volume_id", &r.volume_id)?;
            let f = format_of("target_format", r.target_format)?;
            let m = a.measure(&o, &id, f)?;
            Ok(pb::MeasureVolumeResponse {
                required: m.required,
                fully_allocated: m.fully_allocated,
            })
        })
        .await
        .map(Response::new)
    }

    async fn check_volume(
        &self,
        r: Request<pb::CheckVolumeRequest>,
    ) -> Result<Response<pb::CheckVolumeResponse>, Status> {
        let r = r.into_inner();
        self.run("check_volume", move |a| {
            let o = a.domain(&r.domain)?;
            let id = vol_id("volume_id", &r.volume_id)?;
            let c = a.check_volume(&o, &id)?;
            Ok(pb::CheckVolumeResponse {
                clean: c.clean,
                corruptions: c.corruptions,
                leaks: c.leaks,
                check_errors: c.check_errors,
                report_json: c.report,
            })
        })
        .await
        .map(Response::new)
    }

    async fn create_tag(
        &self,
        r: Request<pb::CreateTagRequest>,
    ) -> Result<Response<pb::CreateTagResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "create_tag",
            &rid,
            &r,
            |x| x.created = false,
            self.run("create_tag", move |a| {
                let o = a.domain(&req.domain)?;
                let spec = req
                    .tag
                    .as_ref()
                    .ok_or_else(|| AgentError::invalid("tag", "is required"))?;
                let volume = vol_id("tag.volume", &spec.volume)?;
                let t = a.create_tag(
                    &o,
                    volume,
                    &tag_spec_of(spec)?,
                    request_bytes(&req.request_id),
                )?;
                Ok(pb::CreateTagResponse {
                    tag: Some(pb_tag(&o, &t)),
                    created: true,
                })
            }),
        )
        .await
    }

    async fn get_tag(&self, r: Request<pb::GetTagRequest>) -> Result<Response<pb::Tag>, Status> {
        let r = r.into_inner();
        self.run("get_tag", move |a| {
            let o = a.domain(&r.domain)?;
            let id = tag_id("tag_id", &r.tag_id)?;
            Ok(pb_tag(&o, &o.domain.read_tag(&id)?))
        })
        .await
        .map(Response::new)
    }

    async fn list_tags(
        &self,
        r: Request<pb::ListTagsRequest>,
    ) -> Result<Response<pb::ListTagsResponse>, Status> {
        let r = r.into_inner();
        self.run("list_tags", move |a| {
            let o = a.domain(&r.domain)?;
            let tags = o
                .domain
                .list_tags()?
                .iter()
                .map(|t| pb_tag(&o, t))
                .collect();
            Ok(pb::ListTagsResponse { tags })
        })
        .await
        .map(Response::new)
    }

    async fn change_tag(
        &self,
        r: Request<pb::ChangeTagRequest>,
    ) -> Result<Response<pb::ChangeTagResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "change_tag",
            &rid,
            &r,
            |x| x.changed = false,
            self.run("change_tag", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                let spec = req
                    .tag
                    .as_ref()
                    .ok_or_else(|| AgentError::invalid("tag", "is required"))?;
                let volume = vol_id("tag.volume", &spec.volume)?;
                let (t, changed) = a.change_tag(
                    &o,
                    &id,
                    volume,
                    &tag_spec_of(spec)?,
                    request_bytes(&req.request_id),
                )?;
                Ok(pb::ChangeTagResponse {
                    tag: Some(pb_tag(&o, &t)),
                    changed,
                })
            }),
        )
        .await
    }

    async fn delete_tag(
        &self,
        r: Request<pb::DeleteTagRequest>,
    ) -> Result<Response<pb::DeleteTagResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "delete_tag",
            &rid,
            &r,
            |x| x.deleted = false,
            self.run("delete_tag", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                a.delete_tag(&o, &id, request_bytes(&req.request_id))?;
                Ok(pb::DeleteTagResponse { deleted: true })
            }),
        )
        .await
    }

    async fn delete_disk(
        &self,
        r: Request<pb::DeleteDiskRequest>,
    ) -> Result<Response<pb::DeleteDiskResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "delete_disk",
            &rid,
            &r,
            |x| x.deleted = false,
            self.run("delete_disk", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                let (tags, vols) = a.delete_disk(&o, &id, request_bytes(&req.request_id))?;
                Ok(pb::DeleteDiskResponse {
                    tags_removed: tags.iter().map(|t| t.to_string()).collect(),
                    volumes_removed: vols.iter().map(|v| v.to_string()).collect(),
                    deleted: true,
                })
            }),
        )
        .await
    }

    async fn set_user_data(
        &self,
        r: Request<pb::SetUserDataRequest>,
    ) -> Result<Response<pb::SetUserDataResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "set_user_data",
            &rid,
            &r,
            |x| x.changed = false,
            self.run("set_user_data", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                let changed = a.set_user_data(
                    &o,
                    &id,
                    &req.name,
                    req.data.clone(),
                    request_bytes(&req.request_id),
                )?;
                Ok(pb::SetUserDataResponse { changed })
            }),
        )
        .await
    }

    async fn get_user_data(
        &self,
        r: Request<pb::GetUserDataRequest>,
    ) -> Result<Response<pb::GetUserDataResponse>, Status> {
        let r = r.into_inner();
        self.run("get_user_data", move |a| {
            let o = a.domain(&r.domain)?;
            let id = tag_id("tag_id", &r.tag_id)?;
            let items = a
                .get_user_data(&o, &id, &r.name)?
                .into_iter()
                .map(|(name, data)| pb::UserDataItem { name, data })
                .collect();
            Ok(pb::GetUserDataResponse { items })
        })
        .await
        .map(Response::new)
    }

    async fn remove_user_data(
        &self,
        r: Request<pb::RemoveUserDataRequest>,
    ) -> Result<Response<pb::RemoveUserDataResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "remove_user_data",
            &rid,
            &r,
            |x| x.removed = false,
            self.run("remove_user_data", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                let removed =
                    a.remove_user_data(&o, &id, &req.name, request_bytes(&req.request_id))?;
                Ok(pb::RemoveUserDataResponse { removed })
            }),
        )
        .await
    }

    async fn snapshot(
        &self,
        r: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "snapshot",
            &rid,
            &r,
            |x| x.created = false,
            self.run("snapshot", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                let clone = req.clone.as_ref().map(tag_spec_of).transpose()?;
                let spec = agent::SnapshotSpec {
                    description: req.description.clone(),
                    size: req.size,
                    options: req
                        .snapshot_options
                        .iter()
                        .map(|kv| (kv.key.clone(), kv.value.clone()))
                        .collect(),
                };
                let s = a.snapshot(
                    &o,
                    &id,
                    spec,
                    clone.as_ref(),
                    request_bytes(&req.request_id),
                )?;
                Ok(pb::SnapshotResponse {
                    volume: Some(pb_volume(&o, &s.volume)),
                    parent_tag: Some(pb_tag(&o, &s.parent_tag)),
                    tag: Some(pb_tag(&o, &s.tag)),
                    created: true,
                    clone_volume: s.clone.as_ref().map(|(v, _)| pb_volume(&o, v)),
                    clone_tag: s.clone.as_ref().map(|(_, t)| pb_tag(&o, t)),
                })
            }),
        )
        .await
    }

    async fn activate(
        &self,
        r: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::ActivateResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "activate",
            &rid,
            &r,
            |x| x.changed = false,
            self.run("activate", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                let (act, changed) = a.activate(&o, &id)?;
                Ok(pb::ActivateResponse {
                    activation: Some(pb_activation(&act)),
                    changed,
                })
            }),
        )
        .await
    }

    async fn deactivate(
        &self,
        r: Request<pb::DeactivateRequest>,
    ) -> Result<Response<pb::DeactivateResponse>, Status> {
        let r = r.into_inner();
        let rid = r.request_id.clone();
        let req = r.clone();
        self.once(
            "deactivate",
            &rid,
            &r,
            |x| x.changed = false,
            self.run("deactivate", move |a| {
                let o = a.domain(&req.domain)?;
                let id = tag_id("tag_id", &req.tag_id)?;
                let changed = a.deactivate(&o, &id, req.force)?;
                Ok(pb::DeactivateResponse { changed })
            }),
        )
        .await
    }

    async fn list_activations(
        &self,
        r: Request<pb::ListActivationsRequest>,
    ) -> Result<Response<pb::ListActivationsResponse>, Status> {
        let r = r.into_inner();
        self.run("list_activations", move |a| {
            let doms = if r.domain.is_empty() {
                a.domains().to_vec()
            } else {
                vec![a.domain(&r.domain)?]
            };
            let mut activations = Vec::new();
            for o in doms {
                activations.extend(a.activations(&o)?.iter().map(pb_activation));
            }
            Ok(pb::ListActivationsResponse { activations })
        })
        .await
        .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_code_and_status() {
        let cases: Vec<(AgentError, Code, &str)> = vec![
            (
                AgentError::invalid("capacity", "x"),
                Code::InvalidArgument,
                "invalid_argument",
            ),
            (
                AgentError::NotFound {
                    kind: "domain",
                    id: "d".into(),
                },
                Code::NotFound,
                "not_found",
            ),
            (
                AgentError::CannotGrowInPlace("x".into()),
                Code::ResourceExhausted,
                "extents_exhausted",
            ),
            (
                AgentError::InUse("x".into()),
                Code::FailedPrecondition,
                "in_use",
            ),
            (
                AgentError::Domain(DomainError::LockTimeout {
                    resource: "r".into(),
                }),
                Code::Aborted,
                "lock_timeout",
            ),
            (
                AgentError::Domain(DomainError::Corrupt {
                    what: "w".into(),
                    offset: 0,
                    detail: "d".into(),
                }),
                Code::DataLoss,
                "corrupt",
            ),
            (
                AgentError::Domain(DomainError::AlreadyExists { what: "w".into() }),
                Code::AlreadyExists,
                "already_exists",
            ),
        ];
        for (e, code, reason) in cases {
            let s = to_status(&e);
            assert_eq!(s.code(), code, "{e}");
            let info = s.get_details_error_info().expect("error info");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, ERROR_DOMAIN);
        }
        let s = to_status(&AgentError::invalid("capacity", "too big"));
        let br = s.get_details_bad_request().expect("bad request");
        assert_eq!(br.field_violations[0].field, "capacity");
    }

    #[test]
    fn request_ids_map_to_stable_bytes() {
        let u = "6f1c1a52-4b8e-4a43-9d2c-0a2b3c4d5e6f";
        assert_eq!(
            request_bytes(u),
            *uuid::Uuid::parse_str(u).unwrap().as_bytes()
        );
        assert_eq!(request_bytes("retry-1"), request_bytes("retry-1"));
        assert_ne!(request_bytes("retry-1"), request_bytes("retry-2"));
        assert!(check_request_id(&"x".repeat(65)).is_err());
        assert!(check_request_id("a\nb").is_err());
    }
}
