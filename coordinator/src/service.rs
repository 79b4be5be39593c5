//! The `cairn.coordinator.v1` gRPC service: converts messages to the
//! coordinator's types and back, and maps errors to status codes (in one
//! place, [`to_status`]). Generated types stop here.

use std::sync::Arc;
use std::time::Duration;

use cairn_proto::convert as wire;
use cairn_proto::fingerprint;
use prost::Message;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::CoordError;
use crate::ops::Coordinator;
use crate::pb;
use crate::plan::{DiskView, JobKind, JobRecord, JobState, Params, NAME_KEY};

/// The status code of an error (the agent's own code for its errors).
pub fn code_of(e: &CoordError) -> Code {
    match e {
        CoordError::InvalidArgument { .. } => Code::InvalidArgument,
        CoordError::NotFound { .. } => Code::NotFound,
        CoordError::FailedPrecondition(_) => Code::FailedPrecondition,
        CoordError::RequestIdReused(_) => Code::AlreadyExists,
        CoordError::NoAgent(_) => Code::Unavailable,
        CoordError::Agent { status, .. } => status.code(),
        CoordError::Busy(_) => Code::Aborted,
        CoordError::Fenced(_) => Code::Unavailable,
        CoordError::Store(_) => Code::Unavailable,
        CoordError::Cancelled => Code::Cancelled,
        CoordError::TooLate(_) => Code::FailedPrecondition,
        CoordError::Unsettled(_) => Code::Unavailable,
        CoordError::Internal(_) => Code::Internal,
    }
}

/// The one mapping of coordinator errors to gRPC statuses: the code, the
/// message with its causes, and an ErrorInfo with the stable code (an
/// agent's own code when the agent refused).
pub fn to_status(e: &CoordError) -> Status {
    let mut reason = e.code().to_string();
    if let CoordError::Agent { status, .. } = e {
        if let Some(info) = status.get_details_error_info() {
            reason = info.reason;
        }
    }
    let mut details = ErrorDetails::with_error_info(
        reason,
        "cairn.coordinator.v1",
        std::collections::HashMap::new(),
    );
    if let CoordError::InvalidArgument { field, reason } = e {
        details.add_bad_request_violation(*field, reason.clone());
    }
    Status::with_error_details(code_of(e), e.to_string(), details)
}

/// The `cairn.coordinator.v1.Coordinator` service.
#[derive(Clone)]
pub struct CoordService {
    coord: Arc<Coordinator>,
}

impl CoordService {
    /// Serve `coord`.
    pub fn new(coord: Arc<Coordinator>) -> CoordService {
        CoordService { coord }
    }

    async fn submit<Req: Message>(
        &self,
        kind: JobKind,
        request_id: &str,
        req: &Req,
        params: Params,
    ) -> Result<Response<pb::Job>, Status> {
        let fp = fingerprint(&req.encode_to_vec());
        let rec = self
            .coord
            .submit(kind, request_id, fp, params)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_job(&rec, None)))
    }

    /// A job with its disk's view when it succeeded (best effort).
    async fn job_with_disk(&self, rec: &JobRecord) -> pb::Job {
        let disk = if rec.state == JobState::Succeeded && !rec.result_disk.is_empty() {
            self.coord
                .disk(&rec.result_domain, &rec.result_disk)
                .await
                .ok()
        } else {
            None
        };
        pb_job(rec, disk.as_ref())
    }
}

fn format_str(v: i32) -> Result<String, Status> {
    match wire::disk_format("format", v) {
        Ok(f) => Ok(f.map(|f| f.as_str().to_string()).unwrap_or_default()),
        Err(e) => Err(to_status(&e.into())),
    }
}

fn allocation_str(v: i32) -> Result<String, Status> {
    match wire::disk_allocation("allocation", v) {
        Ok(a) => Ok(a
            .unwrap_or(cairn_domain::Allocation::Sparse)
            .as_str()
            .to_string()),
        Err(e) => Err(to_status(&e.into())),
    }
}

fn pb_fmt(f: cairn_domain::Format) -> i32 {
    wire::disk_format_code(f)
}

/// A disk view as a message.
pub fn pb_disk(v: &DiskView) -> pb::Disk {
    let top = v.chain.last();
    pb::Disk {
        id: v.tag.id.to_string(),
        domain: v.domain.id.to_string(),
        domain_name: v.domain.name.clone(),
        name: v.tag.option(NAME_KEY).unwrap_or_default().to_string(),
        size: v.tag.size,
        format: top.map(|l| pb_fmt(l.volume.format)).unwrap_or(0),
        chain: v
            .chain
            .iter()
            .map(|l| pb::Layer {
                volume_id: l.volume.id.to_string(),
                format: pb_fmt(l.volume.format),
                capacity: l.volume.capacity,
                size: l.volume.size,
                parent_tag: l.volume.parent.map(|p| p.to_string()).unwrap_or_default(),
                snapshot_id: l.snapshot.map(|s| s.to_string()).unwrap_or_default(),
                description: l.volume.description.clone(),
                ctime: l.volume.ctime,
                legal: l.volume.legality == cairn_domain::Legality::Legal,
            })
            .collect(),
        snapshots: v
            .snapshots
            .iter()
            .map(|s| pb::Snapshot {
                id: s.tag.id.to_string(),
                volume_id: s.tag.volume.to_string(),
                description: s.description.clone(),
                ctime: s.tag.ctime,
                state: s.tag.state.as_str().to_string(),
                clones: s.clones,
            })
            .collect(),
        ctime: v.tag.ctime,
        state: v.tag.state.as_str().to_string(),
        parent_disk: v
            .tag
            .option(crate::plan::CLONE_OF_KEY)
            .unwrap_or_default()
            .to_string(),
    }
}

/// A job as a message; `disk` is the full view of what it made, if known.
pub fn pb_job(r: &JobRecord, disk: Option<&DiskView>) -> pb::Job {
    let disk = match disk {
        Some(v) => Some(pb_disk(v)),
        None if !r.result_disk.is_empty() => Some(pb::Disk {
            id: r.result_disk.clone(),
            domain: r.result_domain.clone(),
            ..Default::default()
        }),
        None => None,
    };
    pb::Job {
        id: r.id.clone(),
        kind: r.kind.as_str().to_string(),
        state: match r.state {
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        } as i32,
        request_id: r.request_id.clone(),
        domain: r.params.domain.clone(),
        disk_id: r.params.disk.clone(),
        done_bytes: r.done,
        total_bytes: r.total,
        step: r.step.as_str().to_string(),
        host_id: r.host.clone(),
        owner: r.owner.clone(),
        error_code: r.error.as_ref().map(|e| e.code).unwrap_or(0),
        error_reason: r
            .error
            .as_ref()
            .map(|e| e.reason.clone())
            .unwrap_or_default(),
        error_message: r
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
        disk,
        created: r.created,
        finished: r.finished,
        attempts: r.attempts,
        snapshot_id: r.snapshot.clone(),
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordService {
    type WatchJobStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Job, Status>> + Send>>;

    async fn list_agents(&self, _: Request<pb::ListAgentsRequest>) -> R<pb::ListAgentsResponse> {
        let agents = self.coord.agents.list().await.map_err(|e| to_status(&e))?;
        let mut out = Vec::new();
        for a in agents {
            let reachable = match self.coord.agents.conn(&a) {
                Ok(c) => c.ping().await,
                Err(_) => false,
            };
            out.push(pb::Agent {
                host_id: a.host_id.clone(),
                host_name: a.host_name.clone(),
                address: a.address.clone(),
                domains: a
                    .domains
                    .iter()
                    .map(|d| pb::AgentDomain {
                        id: d.id.to_string(),
                        name: d.name.clone(),
                    })
                    .collect(),
                reachable,
            });
        }
        Ok(Response::new(pb::ListAgentsResponse { agents: out }))
    }

    async fn list_disks(&self, r: Request<pb::ListDisksRequest>) -> R<pb::ListDisksResponse> {
        let r = r.into_inner();
        let disks = self
            .coord
            .disks(&r.domain)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListDisksResponse {
            disks: disks.iter().map(pb_disk).collect(),
        }))
    }

    async fn get_disk(&self, r: Request<pb::GetDiskRequest>) -> R<pb::Disk> {
        let r = r.into_inner();
        let d = self
            .coord
            .disk(&r.domain, &r.disk_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_disk(&d)))
    }

    async fn create_disk(&self, r: Request<pb::CreateDiskRequest>) -> R<pb::Job> {
        let r = r.into_inner();
        let p = Params {
            domain: r.domain.clone(),
            name: r.name.clone(),
            format: format_str(r.format)?,
            allocation: allocation_str(r.allocation)?,
            size: r.size,
            description: r.description.clone(),
            ..Default::default()
        };
        self.submit(JobKind::Create, &r.request_id, &r, p).await
    }

    async fn snapshot_disk(&self, r: Request<pb::SnapshotDiskRequest>) -> R<pb::Job> {
        let r = r.into_inner();
        let p = Params {
            domain: r.domain.clone(),
            disk: r.disk_id.clone(),
            description: r.description.clone(),
            ..Default::default()
        };
        self.submit(JobKind::Snapshot, &r.request_id, &r, p).await
    }

    async fn clone_disk(&self, r: Request<pb::CloneDiskRequest>) -> R<pb::Job> {
        let r = r.into_inner();
        let p = Params {
            domain: r.domain.clone(),
            disk: r.source_id.clone(),
            name: r.name.clone(),
            format: format_str(r.format)?,
            allocation: allocation_str(r.allocation)?,
            ..Default::default()
        };
        if !r.full && (r.format != 0 || r.allocation == pb::Allocation::Preallocated as i32) {
            return Err(to_status(&CoordError::invalid(
                "full",
                "format and allocation apply to full clones only",
            )));
        }
        let kind = if r.full {
            JobKind::FullClone
        } else {
            JobKind::Clone
        };
        self.submit(kind, &r.request_id, &r, p).await
    }

    async fn delete_snapshot(&self, r: Request<pb::DeleteSnapshotRequest>) -> R<pb::Job> {
        let r = r.into_inner();
        let p = Params {
            domain: r.domain.clone(),
            disk: r.snapshot_id.clone(),
            ..Default::default()
        };
        self.submit(JobKind::DeleteSnapshot, &r.request_id, &r, p)
            .await
    }

    async fn delete_disk(&self, r: Request<pb::DeleteDiskRequest>) -> R<pb::Job> {
        let r = r.into_inner();
        let p = Params {
            domain: r.domain.clone(),
            disk: r.disk_id.clone(),
            ..Default::default()
        };
        self.submit(JobKind::Delete, &r.request_id, &r, p).await
    }

    async fn copy_disk(&self, r: Request<pb::CopyDiskRequest>) -> R<pb::Job> {
        let r = r.into_inner();
        let p = Params {
            domain: r.domain.clone(),
            disk: r.disk_id.clone(),
            target_domain: r.target_domain.clone(),
            format: format_str(r.format)?,
            allocation: allocation_str(r.allocation)?,
            ..Default::default()
        };
        let kind = if r.r#move {
            JobKind::Move
        } else {
            JobKind::Copy
        };
        self.submit(kind, &r.request_id, &r, p).await
    }

    async fn extend_disk(&self, r: Request<pb::ExtendDiskRequest>) -> R<pb::Job> {
        let r = r.into_inner();
        let p = Params {
            domain: r.domain.clone(),
            disk: r.disk_id.clone(),
            size: r.size,
            ..Default::default()
        };
        self.submit(JobKind::Extend, &r.request_id, &r, p).await
    }

    async fn convert_disk(&self, r: Request<pb::ConvertDiskRequest>) -> R<pb::Job> {
        let r = r.into_inner();
        let p = Params {
            domain: r.domain.clone(),
            disk: r.disk_id.clone(),
            format: format_str(r.format)?,
            allocation: allocation_str(r.allocation)?,
            ..Default::default()
        };
        self.submit(JobKind::Convert, &r.request_id, &r, p).await
    }

    async fn get_job(&self, r: Request<pb::GetJobRequest>) -> R<pb::Job> {
        let rec = self
            .coord
            .job(&r.into_inner().job_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(self.job_with_disk(&rec).await))
    }

    async fn list_jobs(&self, r: Request<pb::ListJobsRequest>) -> R<pb::ListJobsResponse> {
        let r = r.into_inner();
        let jobs = self.coord.jobs().await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs
                .iter()
                .filter(|j| !r.running || j.state == JobState::Running)
                .map(|j| pb_job(j, None))
                .collect(),
        }))
    }

    async fn cancel_job(&self, r: Request<pb::CancelJobRequest>) -> R<pb::Job> {
        let rec = self
            .coord
            .cancel(&r.into_inner().job_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_job(&rec, None)))
    }

    async fn watch_job(&self, r: Request<pb::GetJobRequest>) -> R<Self::WatchJobStream> {
        let id = r.into_inner().job_id;
        let first = self.coord.job(&id).await.map_err(|e| to_status(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut cur = first;
            loop {
                let done = cur.state != JobState::Running;
                let msg = if done {
                    me.job_with_disk(&cur).await
                } else {
                    pb_job(&cur, None)
                };
                if last.as_ref() != Some(&msg) {
                    if tx.send(Ok(msg.clone())).await.is_err() {
                        return;
                    }
                    last = Some(msg);
                }
                if done {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                cur = match me.coord.job(&id).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(&e))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
