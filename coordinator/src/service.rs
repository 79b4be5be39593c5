//! The `cairn.coordinator.v1` gRPC service: converts messages to the
//! coordinator's types and back, and maps errors to status codes (in one
//! place, [`to_status`]). Generated types stop here.

use std::sync::Arc;
use std::time::Duration;

use cairn_proto::convert as wire;
use cairn_proto::fingerprint;
use prost::Message;
use tokio::time::Instant;
#[cfg(test)]
use tonic::Code;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use cairn_domain::{Allocation, Format, TagId};

use crate::coordinator::{parse_tag, Coordinator};
use crate::error::CoordError;
use crate::jobs::{
    Convert, CopyTo, Create, Delete, DeleteSnapshot, Extend, FullClone, JobSpec, Move, Snapshot,
    ThinClone,
};
use crate::pb;
use crate::plan::{DiskView, NAME_KEY};
use crate::record::{JobRecord, JobState};
use crate::runner::check_request_id;
use cairn_proto::auth::{Identity, Role};
use cairn_proto::peer::{audit, Peer};

/// Who is calling: the identity the gate found, and the transport's facts
/// for the audit line.
struct Caller {
    id: Identity,
    peer: Peer,
}

impl Caller {
    fn of<T>(r: &Request<T>) -> Result<Caller, Status> {
        Ok(Caller {
            id: Identity::of(r)?,
            peer: Peer::of(r),
        })
    }
}

/// What a `user` is told about another's disk, snapshot or job: the same
/// as about one that does not exist.
fn hidden(kind: &'static str, id: &str) -> CoordError {
    CoordError::NotFound {
        kind,
        id: id.to_string(),
    }
}

/// The one mapping of coordinator errors to gRPC statuses: the code, the
/// message with its causes, and an ErrorInfo with the stable code (an
/// agent's own code when the agent refused).
pub fn to_status(e: &CoordError) -> Status {
    let mut details = ErrorDetails::with_error_info(
        e.reason(),
        "cairn.coordinator.v1",
        std::collections::HashMap::new(),
    );
    if let CoordError::InvalidArgument { field, reason } = e {
        details.add_bad_request_violation(*field, reason.clone());
    }
    // A store error says why (etcd's or the file system's error); an
    // agent's already carries the agent's message.
    let msg = match e {
        CoordError::Store(c) => format!("cluster store: {}", cairn_proto::with_causes(c)),
        _ => e.to_string(),
    };
    Status::with_error_details(e.grpc_code(), msg, details)
}

/// How long a watch keeps asking a store that does not answer before it
/// ends with the store's error.
const WATCH_PATIENCE: Duration = Duration::from_secs(30);

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

    /// Start the job a request asks for: its request id and fields are
    /// checked first (`build` makes the spec from the resolved domain and
    /// target, and is tried once on placeholders), then its domains are
    /// resolved, the spec checked again with them (a move to the disk's own
    /// domain) and the job submitted.
    async fn submit<Req: Message>(
        &self,
        (who, method): (&Caller, &str),
        request_id: &str,
        req: &Req,
        domain: &str,
        target: &str,
        build: impl Fn(uuid::Uuid, Option<uuid::Uuid>) -> Result<JobSpec, CoordError>,
    ) -> Result<Response<pb::Job>, Status> {
        let go = async {
            check_request_id(request_id)?;
            // Placeholders for a domain and a target that differ.
            let placeholder = (!target.is_empty()).then_some(uuid::Uuid::from_u128(1));
            let kind = build(uuid::Uuid::nil(), placeholder)?;
            kind.validate()?;
            // What the job does and who asks are part of the request: one
            // id, one request (another caller's id is never its job).
            let fp = fingerprint(
                &[
                    kind.name().as_bytes(),
                    b"\0",
                    who.id.name.as_bytes(),
                    b"\0",
                    &req.encode_to_vec(),
                ]
                .concat(),
            );
            let d = self.coord.domain(domain).await?.id;
            let t = match target {
                "" => None,
                t => Some(self.coord.domain(t).await?.id),
            };
            let spec = build(d, t)?;
            spec.validate()?;
            if let Some(tag) = spec.disk() {
                self.authorize(&who.id, &spec.domain(), &tag).await?;
            }
            self.coord.submit(request_id, fp, spec, &who.id.name).await
        };
        let r = go.await;
        audit(&who.peer, method, request_id, &outcome(&r));
        let rec = r.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_job(&rec, None)))
    }

    /// Refuse a `user` acting on a disk or snapshot it does not own, as if
    /// it did not exist (admin and service identities act on every one).
    async fn authorize(
        &self,
        who: &Identity,
        domain: &uuid::Uuid,
        tag: &TagId,
    ) -> Result<(), CoordError> {
        if who.role != Role::User {
            return Ok(());
        }
        let d = crate::plan::DomainRef {
            id: *domain,
            name: String::new(),
        };
        let (tags, _) = self.coord.contents(&d).await?;
        if who.may_act_on(crate::plan::owner_of(tag, &tags)) {
            Ok(())
        } else {
            Err(hidden("disk or snapshot", &tag.to_string()))
        }
    }

    /// Job `id`, if the caller may see it.
    async fn job_for(&self, who: &Identity, id: &str) -> Result<JobRecord, CoordError> {
        let rec = self.coord.job(id).await?;
        if who.may_act_on(Some(&rec.caller)) {
            Ok(rec)
        } else {
            Err(hidden("job", id))
        }
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

/// How a request ended, for its audit line: `ok` or its stable code.
fn outcome<T>(r: &Result<T, CoordError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.reason(),
    }
}

fn format_of(v: i32) -> Result<Option<Format>, CoordError> {
    Ok(wire::disk_format("format", v)?)
}

fn required_format(v: i32) -> Result<Format, CoordError> {
    format_of(v)?.ok_or_else(|| CoordError::invalid("format", "is required (raw or qcow2)"))
}

fn allocation_of(v: i32) -> Result<Allocation, CoordError> {
    Ok(wire::disk_allocation("allocation", v)?.unwrap_or(Allocation::Sparse))
}

fn disk_id(field: &'static str, s: &str) -> Result<TagId, CoordError> {
    parse_tag(field, s)
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
        owner: v
            .tag
            .option(crate::plan::OWNER_KEY)
            .unwrap_or_default()
            .to_string(),
        wipe_after_delete: v.tag.option(crate::plan::WIPE_KEY) == Some("true"),
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
        kind: r.spec.name().to_string(),
        state: match r.state {
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        } as i32,
        request_id: r.request_id.clone(),
        domain: r.spec.domain().to_string(),
        disk_id: r.spec.disk().map(|d| d.to_string()).unwrap_or_default(),
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
        caller: r.caller.clone(),
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordService {
    type WatchJobStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Job, Status>> + Send>>;

    async fn list_agents(&self, r: Request<pb::ListAgentsRequest>) -> R<pb::ListAgentsResponse> {
        let who = Identity::of(&r)?;
        if who.role == Role::User {
            return Err(cairn_proto::auth::AuthError::Denied {
                name: who.name,
                role: who.role,
                api: "agent listing",
                allowed: "admin and service",
            }
            .to_status());
        }
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
        let (who, r) = (Identity::of(&r)?, r.into_inner());
        let disks = self
            .coord
            .disks(&r.domain)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListDisksResponse {
            disks: disks
                .iter()
                .filter(|d| who.may_act_on(d.tag.option(crate::plan::OWNER_KEY)))
                .map(pb_disk)
                .collect(),
        }))
    }

    async fn get_disk(&self, r: Request<pb::GetDiskRequest>) -> R<pb::Disk> {
        let (who, r) = (Identity::of(&r)?, r.into_inner());
        let d = self
            .coord
            .disk(&r.domain, &r.disk_id)
            .await
            .and_then(
                |d| match who.may_act_on(d.tag.option(crate::plan::OWNER_KEY)) {
                    true => Ok(d),
                    false => Err(hidden("disk", &d.tag.id.to_string())),
                },
            )
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_disk(&d)))
    }

    async fn create_disk(&self, r: Request<pb::CreateDiskRequest>) -> R<pb::Job> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        self.submit(
            (&who, "create_disk"),
            &r.request_id,
            &r,
            &r.domain,
            "",
            |domain, _| {
                Ok(JobSpec::Create(Create {
                    domain,
                    name: r.name.clone(),
                    format: required_format(r.format)?,
                    allocation: allocation_of(r.allocation)?,
                    size: r.size,
                    description: r.description.clone(),
                    wipe_after_delete: r.wipe_after_delete,
                }))
            },
        )
        .await
    }

    async fn snapshot_disk(&self, r: Request<pb::SnapshotDiskRequest>) -> R<pb::Job> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        self.submit(
            (&who, "snapshot_disk"),
            &r.request_id,
            &r,
            &r.domain,
            "",
            |domain, _| {
                Ok(JobSpec::Snapshot(Snapshot {
                    domain,
                    disk: disk_id("disk_id", &r.disk_id)?,
                    description: r.description.clone(),
                }))
            },
        )
        .await
    }

    async fn clone_disk(&self, r: Request<pb::CloneDiskRequest>) -> R<pb::Job> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        self.submit(
            (&who, "clone_disk"),
            &r.request_id,
            &r,
            &r.domain,
            "",
            |domain, _| {
                let (format, allocation) = (format_of(r.format)?, allocation_of(r.allocation)?);
                if !r.full && (format.is_some() || allocation == Allocation::Preallocated) {
                    return Err(CoordError::invalid(
                        "full",
                        "format and allocation apply to full clones only",
                    ));
                }
                let source = disk_id("source_id", &r.source_id)?;
                let name = r.name.clone();
                Ok(if r.full {
                    JobSpec::FullClone(FullClone {
                        domain,
                        source,
                        name,
                        format,
                        allocation,
                        description: String::new(),
                    })
                } else {
                    JobSpec::Clone(ThinClone {
                        domain,
                        source,
                        name,
                        description: String::new(),
                    })
                })
            },
        )
        .await
    }

    async fn delete_snapshot(&self, r: Request<pb::DeleteSnapshotRequest>) -> R<pb::Job> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        self.submit(
            (&who, "delete_snapshot"),
            &r.request_id,
            &r,
            &r.domain,
            "",
            |domain, _| {
                Ok(JobSpec::DeleteSnapshot(DeleteSnapshot {
                    domain,
                    snapshot: disk_id("snapshot_id", &r.snapshot_id)?,
                }))
            },
        )
        .await
    }

    async fn delete_disk(&self, r: Request<pb::DeleteDiskRequest>) -> R<pb::Job> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        self.submit(
            (&who, "delete_disk"),
            &r.request_id,
            &r,
            &r.domain,
            "",
            |domain, _| {
                Ok(JobSpec::Delete(Delete {
                    domain,
                    disk: disk_id("disk_id", &r.disk_id)?,
                }))
            },
        )
        .await
    }

    async fn copy_disk(&self, r: Request<pb::CopyDiskRequest>) -> R<pb::Job> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        self.submit(
            (&who, "copy_disk"),
            &r.request_id,
            &r,
            &r.domain,
            &r.target_domain,
            |domain, target| {
                let to = CopyTo {
                    domain,
                    disk: disk_id("disk_id", &r.disk_id)?,
                    target: target
                        .ok_or_else(|| CoordError::invalid("target_domain", "is required"))?,
                    format: format_of(r.format)?,
                    allocation: allocation_of(r.allocation)?,
                };
                Ok(if r.r#move {
                    JobSpec::Move(Move(to))
                } else {
                    JobSpec::Copy(to)
                })
            },
        )
        .await
    }

    async fn extend_disk(&self, r: Request<pb::ExtendDiskRequest>) -> R<pb::Job> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        self.submit(
            (&who, "extend_disk"),
            &r.request_id,
            &r,
            &r.domain,
            "",
            |domain, _| {
                Ok(JobSpec::Extend(Extend {
                    domain,
                    disk: disk_id("disk_id", &r.disk_id)?,
                    size: r.size,
                }))
            },
        )
        .await
    }

    async fn convert_disk(&self, r: Request<pb::ConvertDiskRequest>) -> R<pb::Job> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        self.submit(
            (&who, "convert_disk"),
            &r.request_id,
            &r,
            &r.domain,
            "",
            |domain, _| {
                Ok(JobSpec::Convert(Convert {
                    domain,
                    disk: disk_id("disk_id", &r.disk_id)?,
                    format: required_format(r.format)?,
                    allocation: allocation_of(r.allocation)?,
                    flatten: r.flatten,
                }))
            },
        )
        .await
    }

    async fn get_job(&self, r: Request<pb::GetJobRequest>) -> R<pb::Job> {
        let who = Identity::of(&r)?;
        let rec = self
            .job_for(&who, &r.into_inner().job_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(self.job_with_disk(&rec).await))
    }

    async fn list_jobs(&self, r: Request<pb::ListJobsRequest>) -> R<pb::ListJobsResponse> {
        let (who, r) = (Identity::of(&r)?, r.into_inner());
        let jobs = self.coord.jobs().await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs
                .iter()
                .filter(|j| !r.running || j.state == JobState::Running)
                .filter(|j| who.may_act_on(Some(&j.caller)))
                .map(|j| pb_job(j, None))
                .collect(),
        }))
    }

    async fn cancel_job(&self, r: Request<pb::CancelJobRequest>) -> R<pb::Job> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        let done = match self.job_for(&who.id, &r.job_id).await {
            Ok(_) => self.coord.cancel(&r.job_id).await,
            Err(e) => Err(e),
        };
        audit(&who.peer, "cancel_job", &r.job_id, &outcome(&done));
        let rec = done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_job(&rec, None)))
    }

    async fn who_am_i(&self, r: Request<pb::WhoAmIRequest>) -> R<pb::WhoAmIResponse> {
        let who = Identity::of(&r)?;
        Ok(Response::new(pb::WhoAmIResponse {
            name: who.name,
            role: who.role.as_str().to_string(),
        }))
    }

    async fn watch_job(&self, r: Request<pb::GetJobRequest>) -> R<Self::WatchJobStream> {
        let who = Identity::of(&r)?;
        let id = r.into_inner().job_id;
        let first = self.job_for(&who, &id).await.map_err(|e| to_status(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut cur = first;
            let mut unanswered = None;
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
                    Ok(c) => {
                        unanswered = None;
                        c
                    }
                    // A store that does not answer for a moment (etcd
                    // busy or electing) does not end the watch.
                    Err(e)
                        if e.store_unavailable()
                            && unanswered.get_or_insert_with(Instant::now).elapsed()
                                < WATCH_PATIENCE =>
                    {
                        tracing::warn!(job = %id, error = %to_status(&e).message(),
                            "a watch's read failed; asking again");
                        continue;
                    }
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

#[cfg(test)]
mod tests {
    //! The boundary: a request is checked before its domain is resolved
    //! (here there is no agent at all, so a request that passes the checks
    //! fails for want of one).

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::agents::{Agents, Discovery};
    use crate::coordinator::CoordConfig;
    use crate::record::job_key;
    use cairn_cluster::{ClusterError, Kv};
    use pb::coordinator_server::Coordinator as _;

    fn service() -> CoordService {
        service_on(Arc::new(cairn_cluster::MemKv::new()))
    }

    fn service_on(kv: Arc<dyn Kv>) -> CoordService {
        CoordService::new(Arc::new(Coordinator::new(
            CoordConfig::new("c1"),
            kv,
            Arc::new(cairn_domain::MemLockService::new()),
            Agents::new(Discovery::Fixed(vec![])),
        )))
    }

    /// A store whose reads fail while it is `down`, as etcd's do when it
    /// is busy or between leaders.
    #[derive(Default)]
    struct Flaky {
        kv: cairn_cluster::MemKv,
        down: AtomicBool,
    }

    type KvResult<T> = std::result::Result<T, ClusterError>;

    impl Kv for Flaky {
        fn put(&self, key: &str, value: &str) -> KvResult<()> {
            self.kv.put(key, value)
        }
        fn get(&self, key: &str) -> KvResult<Option<String>> {
            if self.down.load(Ordering::SeqCst) {
                let e = std::io::Error::other("the store is down");
                let context = format!("reading {key}");
                return Err(ClusterError::Io { context, source: e });
            }
            self.kv.get(key)
        }
        fn list(&self, prefix: &str) -> KvResult<Vec<(String, String)>> {
            self.kv.list(prefix)
        }
        fn delete(&self, key: &str) -> KvResult<bool> {
            self.kv.delete(key)
        }
        fn create(&self, key: &str, value: &str) -> KvResult<Option<String>> {
            self.kv.create(key, value)
        }
        fn register(&self, key: &str, value: &str) -> KvResult<()> {
            self.kv.register(key, value)
        }
    }

    /// A request as the gate leaves it for an identity.
    fn as_who<T>(m: T, name: &str, role: Role) -> Request<T> {
        let mut r = Request::new(m);
        r.extensions_mut().insert(Identity {
            name: name.into(),
            role,
        });
        r
    }

    fn as_admin<T>(m: T) -> Request<T> {
        as_who(m, "uid:0", Role::Admin)
    }

    #[tokio::test]
    async fn jobs_are_seen_by_their_caller_and_admins_only() {
        let kv = Arc::new(Flaky::default());
        let svc = service_on(kv.clone());
        let rec = running_job(&kv);
        let get = |n: &str, role| {
            as_who(
                pb::GetJobRequest {
                    job_id: rec.id.clone(),
                },
                n,
                role,
            )
        };
        assert_eq!(
            svc.get_job(get("alice", Role::User))
                .await
                .unwrap()
                .into_inner()
                .caller,
            "alice"
        );
        svc.get_job(get("ops", Role::Admin)).await.unwrap();
        // Another user: as if there were no such job.
        let e = svc.get_job(get("bob", Role::User)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let e = svc
            .cancel_job(as_who(
                pb::CancelJobRequest {
                    job_id: rec.id.clone(),
                },
                "bob",
                Role::User,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let mine = |n: &str| as_who(pb::ListJobsRequest { running: false }, n, Role::User);
        assert_eq!(
            svc.list_jobs(mine("alice"))
                .await
                .unwrap()
                .into_inner()
                .jobs
                .len(),
            1
        );
        assert!(svc
            .list_jobs(mine("bob"))
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty());
        // No identity (a service without its gate): nobody is answered.
        let e = svc
            .get_job(Request::new(pb::GetJobRequest {
                job_id: rec.id.clone(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = svc
            .list_agents(as_who(pb::ListAgentsRequest {}, "bob", Role::User))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }

    fn running_job(kv: &Flaky) -> JobRecord {
        let spec = JobSpec::Delete(Delete {
            domain: uuid::Uuid::nil(),
            disk: TagId::generate(1),
        });
        let rec = JobRecord::new(spec, "r", 0, "c1", "alice", 1);
        kv.put(&job_key(&rec.id), &serde_json::to_string(&rec).unwrap())
            .unwrap();
        rec
    }

    // Regression: one etcd read that timed out under load ended a watch
    // with UNAVAILABLE while the job ran on.
    #[tokio::test(start_paused = true)]
    async fn a_watch_outlasts_a_store_that_stops_answering_for_a_while() {
        use tokio_stream::StreamExt;
        let kv = Arc::new(Flaky::default());
        let svc = service_on(kv.clone());
        let watch = |id: &str| pb::GetJobRequest { job_id: id.into() };

        let mut rec = running_job(&kv);
        let mut s = svc
            .watch_job(as_admin(watch(&rec.id)))
            .await
            .unwrap()
            .into_inner();
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(first.state, pb::JobState::Running as i32);
        // Down for five seconds: the watch asks some 25 times meanwhile.
        kv.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        rec.state = JobState::Succeeded;
        kv.put(&job_key(&rec.id), &serde_json::to_string(&rec).unwrap())
            .unwrap();
        kv.down.store(false, Ordering::SeqCst);
        let last = s.next().await.unwrap().unwrap();
        assert_eq!(last.state, pb::JobState::Succeeded as i32, "{last:?}");
        assert!(s.next().await.is_none());

        // A store that stays down ends the watch with its error and why.
        let rec = running_job(&kv);
        let mut s = svc
            .watch_job(as_admin(watch(&rec.id)))
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        kv.down.store(true, Ordering::SeqCst);
        let t = Instant::now();
        let e = s.next().await.unwrap().unwrap_err();
        assert!(t.elapsed() >= WATCH_PATIENCE, "{:?}", t.elapsed());
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(
            e.message().ends_with(": the store is down"),
            "{}",
            e.message()
        );
    }

    fn field(s: &Status) -> String {
        s.get_details_bad_request()
            .map(|b| b.field_violations[0].field.clone())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn requests_are_checked_before_anything_runs() {
        let svc = service();
        let create = |format: pb::Format, size| pb::CreateDiskRequest {
            format: format as i32,
            size,
            ..Default::default()
        };
        let e = svc
            .create_disk(as_admin(create(pb::Format::Unspecified, 4096)))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), field(&e).as_str()),
            (Code::InvalidArgument, "format")
        );
        let e = svc
            .create_disk(as_admin(create(pb::Format::Raw, 1000)))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), field(&e).as_str()),
            (Code::InvalidArgument, "size")
        );
        let mut bad = create(pb::Format::Raw, 4096);
        bad.format = 9;
        let e = svc.create_disk(as_admin(bad)).await.unwrap_err();
        assert_eq!(
            (e.code(), field(&e).as_str()),
            (Code::InvalidArgument, "format")
        );
        // A valid request gets as far as looking for the domain.
        let e = svc
            .create_disk(as_admin(create(pb::Format::Raw, 4096)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        let e = svc
            .copy_disk(as_admin(pb::CopyDiskRequest {
                disk_id: "x".into(),
                target_domain: "other".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), field(&e).as_str()),
            (Code::InvalidArgument, "disk_id")
        );
        let e = svc
            .copy_disk(as_admin(pb::CopyDiskRequest {
                disk_id: cairn_domain::TagId::generate(1).to_string(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), field(&e).as_str()),
            (Code::InvalidArgument, "target_domain")
        );
        let e = svc
            .create_disk(as_admin(pb::CreateDiskRequest {
                request_id: "x".repeat(65),
                ..create(pb::Format::Raw, 4096)
            }))
            .await
            .unwrap_err();
        assert_eq!(field(&e), "request_id");
    }
}
