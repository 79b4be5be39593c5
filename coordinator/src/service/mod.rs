//! The `cairn.coordinator.v1` gRPC service: who may ask ([`Caller`], the
//! owner checks), the handlers, and the jobs they submit. Messages are
//! converted and errors mapped to status codes (in one place,
//! [`to_status`]) in [`convert`]. Generated types stop here.

mod convert;
mod files;
mod images;
mod store;
#[cfg(test)]
mod tests;

use convert::{allocation_of, disk_id, format_of, required_format};
pub use convert::{pb_disk, pb_job, to_status};
pub use files::pb_file;
pub use images::pb_image;

use std::sync::Arc;
use std::time::Duration;

use cairn_proto::fingerprint;
use prost::Message;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use cairn_domain::{Allocation, TagId};

use crate::coordinator::Coordinator;
use crate::error::CoordError;
use crate::jobs::{
    Convert, CopyTo, Create, Delete, DeleteSnapshot, Extend, FullClone, JobSpec, Move, Snapshot,
    ThinClone,
};
use crate::pb;

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

/// How long a watch keeps asking a store that does not answer before it
/// ends with the store's error.
const WATCH_PATIENCE: Duration = Duration::from_secs(30);

/// The `cairn.coordinator.v1.Coordinator` service.
#[derive(Clone)]
pub struct CoordService {
    coord: Arc<Coordinator>,
}

/// A request that submits a job: what [`CoordService::submit`] reads of it.
trait JobRequest: Message {
    /// The RPC, as audit lines name it.
    const METHOD: &'static str;
    /// The caller's request id.
    fn request_id(&self) -> &str;
    /// The disk's domain (name or id; empty: the only one).
    fn domain(&self) -> &str;
    /// The domain the job copies to (empty: none).
    fn target(&self) -> &str {
        ""
    }
}

/// Each job request's [`JobRequest`]: its method, and the field naming the
/// target domain where it has one.
macro_rules! job_requests {
    ($($req:ident => $method:literal $(, $target:ident)?;)*) => {$(
        impl JobRequest for pb::$req {
            const METHOD: &'static str = $method;
            fn request_id(&self) -> &str {
                &self.request_id
            }
            fn domain(&self) -> &str {
                &self.domain
            }
            $(fn target(&self) -> &str {
                &self.$target
            })?
        }
    )*};
}

job_requests! {
    CreateDiskRequest => "create_disk";
    SnapshotDiskRequest => "snapshot_disk";
    CloneDiskRequest => "clone_disk";
    DeleteSnapshotRequest => "delete_snapshot";
    DeleteDiskRequest => "delete_disk";
    CopyDiskRequest => "copy_disk", target_domain;
    ExtendDiskRequest => "extend_disk";
    ConvertDiskRequest => "convert_disk";
    CreateImageFromDiskRequest => "create_image_from_disk";
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
    async fn submit<Req: JobRequest>(
        &self,
        r: Request<Req>,
        build: impl Fn(&Req, uuid::Uuid, Option<uuid::Uuid>) -> Result<JobSpec, CoordError>,
    ) -> Result<Response<pb::Job>, Status> {
        let (who, req) = (Caller::of(&r)?, r.into_inner());
        let (request_id, domain, target) = (req.request_id(), req.domain(), req.target());
        let go = async {
            check_request_id(request_id)?;
            // Placeholders for a domain and a target that differ.
            let placeholder = (!target.is_empty()).then_some(uuid::Uuid::from_u128(1));
            let kind = build(&req, uuid::Uuid::nil(), placeholder)?;
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
            let spec = build(&req, d, t)?;
            spec.validate()?;
            if let Some(tag) = spec.disk() {
                self.authorize(&who.id, &spec.domain(), &tag).await?;
            }
            self.coord.submit(request_id, fp, spec, &who.id.name).await
        };
        let r = go.await;
        audit(&who.peer, Req::METHOD, request_id, &outcome(&r));
        let rec = r.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_job(&rec, None)))
    }

    /// Refuse a `user` acting on a disk or snapshot it does not own, and
    /// anyone acting on a catalog tag through a disk call, as if it did
    /// not exist (admin and service identities act on every disk).
    async fn authorize(
        &self,
        who: &Identity,
        domain: &uuid::Uuid,
        tag: &TagId,
    ) -> Result<(), CoordError> {
        if who.role != Role::User {
            // The catalog's tags are changed through its calls only.
            return match self.coord.tag(domain, tag).await {
                Ok(t) if crate::plan::in_catalog(&t) => {
                    Err(hidden("disk or snapshot", &tag.to_string()))
                }
                _ => Ok(()),
            };
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
        if !r.get_ref().from_image.is_empty() {
            return self.create_from_image(r).await;
        }
        self.submit(r, |r, domain, _| {
            Ok(JobSpec::Create(Create {
                domain,
                name: r.name.clone(),
                format: required_format(r.format)?,
                allocation: allocation_of(r.allocation)?,
                size: r.size,
                description: r.description.clone(),
                wipe_after_delete: r.wipe_after_delete,
            }))
        })
        .await
    }

    async fn create_image_from_disk(
        &self,
        r: Request<pb::CreateImageFromDiskRequest>,
    ) -> R<pb::Job> {
        self.submit(r, |r, domain, _| {
            Ok(JobSpec::ImageFromDisk(crate::jobs::FromDisk {
                domain,
                disk: disk_id("disk_id", &r.disk_id)?,
                name: r.name.clone(),
                path: r.path.clone(),
                properties: r.properties.clone().into_iter().collect(),
                public: r.public,
            }))
        })
        .await
    }

    async fn snapshot_disk(&self, r: Request<pb::SnapshotDiskRequest>) -> R<pb::Job> {
        self.submit(r, |r, domain, _| {
            Ok(JobSpec::Snapshot(Snapshot {
                domain,
                disk: disk_id("disk_id", &r.disk_id)?,
                description: r.description.clone(),
            }))
        })
        .await
    }

    async fn clone_disk(&self, r: Request<pb::CloneDiskRequest>) -> R<pb::Job> {
        self.submit(r, |r, domain, _| {
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
        })
        .await
    }

    async fn delete_snapshot(&self, r: Request<pb::DeleteSnapshotRequest>) -> R<pb::Job> {
        self.submit(r, |r, domain, _| {
            Ok(JobSpec::DeleteSnapshot(DeleteSnapshot {
                domain,
                snapshot: disk_id("snapshot_id", &r.snapshot_id)?,
            }))
        })
        .await
    }

    async fn delete_disk(&self, r: Request<pb::DeleteDiskRequest>) -> R<pb::Job> {
        self.submit(r, |r, domain, _| {
            Ok(JobSpec::Delete(Delete {
                domain,
                disk: disk_id("disk_id", &r.disk_id)?,
            }))
        })
        .await
    }

    async fn copy_disk(&self, r: Request<pb::CopyDiskRequest>) -> R<pb::Job> {
        self.submit(r, |r, domain, target| {
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
        })
        .await
    }

    async fn extend_disk(&self, r: Request<pb::ExtendDiskRequest>) -> R<pb::Job> {
        self.submit(r, |r, domain, _| {
            Ok(JobSpec::Extend(Extend {
                domain,
                disk: disk_id("disk_id", &r.disk_id)?,
                size: r.size,
            }))
        })
        .await
    }

    async fn convert_disk(&self, r: Request<pb::ConvertDiskRequest>) -> R<pb::Job> {
        self.submit(r, |r, domain, _| {
            Ok(JobSpec::Convert(Convert {
                domain,
                disk: disk_id("disk_id", &r.disk_id)?,
                format: required_format(r.format)?,
                allocation: allocation_of(r.allocation)?,
                flatten: r.flatten,
            }))
        })
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

    type ReadFileStream = files::FileStream;

    async fn upload_file(
        &self,
        r: Request<tonic::Streaming<pb::UploadFileRequest>>,
    ) -> R<pb::UploadFileResponse> {
        self.upload(r).await
    }

    async fn list_files(&self, r: Request<pb::ListFilesRequest>) -> R<pb::ListFilesResponse> {
        let who = Identity::of(&r)?;
        files::listed(self.coord.list_files(&who, &r.into_inner().location).await)
    }

    async fn file_versions(&self, r: Request<pb::FileVersionsRequest>) -> R<pb::ListFilesResponse> {
        let who = Identity::of(&r)?;
        files::listed(
            self.coord
                .file_versions(&who, &r.into_inner().location)
                .await,
        )
    }

    async fn read_file(&self, r: Request<pb::ReadFileRequest>) -> R<Self::ReadFileStream> {
        let who = Identity::of(&r)?;
        self.read(&who, r.into_inner()).await
    }

    async fn delete_file(&self, r: Request<pb::DeleteFileRequest>) -> R<pb::DeleteFileResponse> {
        self.delete(r).await
    }

    async fn register_image(
        &self,
        r: Request<pb::RegisterImageRequest>,
    ) -> R<pb::RegisterImageResponse> {
        self.register(r).await
    }

    async fn list_images(&self, r: Request<pb::ListImagesRequest>) -> R<pb::ListImagesResponse> {
        let who = Identity::of(&r)?;
        self.images(&who, r.into_inner()).await
    }

    async fn get_image(&self, r: Request<pb::GetImageRequest>) -> R<pb::Image> {
        let who = Identity::of(&r)?;
        self.image(&who, &r.into_inner().image_id).await
    }

    async fn update_image(&self, r: Request<pb::UpdateImageRequest>) -> R<pb::Image> {
        self.change_image(r).await
    }

    async fn unregister_image(
        &self,
        r: Request<pb::UnregisterImageRequest>,
    ) -> R<pb::UnregisterImageResponse> {
        self.unregister(r).await
    }

    async fn set_image_names(&self, r: Request<pb::SetImageNamesRequest>) -> R<pb::Image> {
        self.names(r).await
    }

    async fn set_image_data(
        &self,
        r: Request<tonic::Streaming<pb::SetImageDataRequest>>,
    ) -> R<pb::SetImageDataResponse> {
        self.put_data(r).await
    }

    type GetImageDataStream = files::FileStream;

    async fn get_image_data(
        &self,
        r: Request<pb::GetImageDataRequest>,
    ) -> R<Self::GetImageDataStream> {
        let who = Identity::of(&r)?;
        self.data(&who, r.into_inner()).await
    }

    async fn remove_image_data(
        &self,
        r: Request<pb::RemoveImageDataRequest>,
    ) -> R<pb::RemoveImageDataResponse> {
        self.remove_data(r).await
    }

    async fn wipe_images(&self, r: Request<pb::WipeImagesRequest>) -> R<pb::WipeImagesResponse> {
        self.wipe(r).await
    }

    async fn set_image_member_status(
        &self,
        r: Request<pb::SetImageMemberStatusRequest>,
    ) -> R<pb::Image> {
        self.member_status(r).await
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
