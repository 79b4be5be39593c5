//! The gRPC layer of `cairn.agent.v1`: each RPC is one handler (plain
//! functions over the agent, in [`handlers`]) inside one of two envelopes.
//! A query runs on a blocking thread, timed; a mutating request also runs
//! once per request id ([`request_log`]): a retry gets the first outcome
//! back, marked as a replay, and the same id with another request is
//! refused. Messages are converted in [`convert`], errors mapped to
//! statuses in [`status`]; generated types go no further than this module.

mod convert;
mod data;
mod fault;
mod handlers;
mod request_log;
mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::agent as pb;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::error::AgentError;
use crate::metrics::Metrics;

pub use fault::FAULT_ENV;
pub use request_log::RequestLog;
pub use status::{to_status, ERROR_DOMAIN};

use request_log::{check_request_id, request_bytes, Remembered};

/// The `cairn.agent.v1.Agent` service.
#[derive(Clone)]
pub struct AgentService {
    agent: Arc<Agent>,
    log: Arc<RequestLog>,
    metrics: Arc<Metrics>,
    faults: fault::Faults,
}

/// A mutating request: its request id, and what its answer says when it
/// is a replay of the first one.
trait Mutating: prost::Message + Send + 'static {
    type Response: prost::Message + Default + Send + 'static;
    fn request_id(&self) -> &str;
    fn mark_replayed(_: &mut Self::Response) {}
}

macro_rules! mutating {
    ($($req:ident -> $resp:ident $(, $flag:ident)?;)+) => {$(
        impl Mutating for pb::$req {
            type Response = pb::$resp;
            fn request_id(&self) -> &str {
                &self.request_id
            }
            $(fn mark_replayed(r: &mut pb::$resp) {
                r.$flag = false;
            })?
        }
    )+};
}

mutating! {
    CreateVolumeRequest -> CreateVolumeResponse, created;
    UpdateVolumeRequest -> UpdateVolumeResponse, changed;
    DeleteVolumeRequest -> DeleteVolumeResponse, deleted;
    ExtendVolumeRequest -> ExtendVolumeResponse, changed;
    LockVolumeRequest -> LockVolumeResponse;
    CreateTagRequest -> CreateTagResponse, created;
    ChangeTagRequest -> ChangeTagResponse, changed;
    DeleteTagRequest -> DeleteTagResponse, deleted;
    DeleteDiskRequest -> DeleteDiskResponse, deleted;
    SetUserDataRequest -> SetUserDataResponse, changed;
    RemoveUserDataRequest -> RemoveUserDataResponse, removed;
    SnapshotRequest -> SnapshotResponse, created;
    ActivateRequest -> ActivateResponse, changed;
    DeactivateRequest -> DeactivateResponse, changed;
    CopyVolumeRequest -> Job;
    ImportVolumeRequest -> Job;
    ExportVolumeRequest -> Job;
    MergeSnapshotRequest -> Job;
    SwapDiskRequest -> SwapDiskResponse, changed;
    CommitFileRequest -> CommitFileResponse, created;
    DeleteFilesRequest -> DeleteFilesResponse, deleted;
    SetFileImageRequest -> SetFileImageResponse, changed;
}

/// A handler of a mutating request: the agent, the request and its id as
/// the journal records it.
type MutateFn<Req, Resp> = fn(&Arc<Agent>, Req, [u8; 16]) -> Result<Resp, AgentError>;
/// A handler of a query.
type QueryFn<Req, Resp> = fn(&Arc<Agent>, Req) -> Result<Resp, AgentError>;

impl AgentService {
    /// Serve `agent`.
    pub fn new(agent: Arc<Agent>, metrics: Arc<Metrics>) -> AgentService {
        AgentService {
            agent,
            log: Arc::new(RequestLog::default()),
            metrics,
            faults: fault::Faults::from_env(),
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

    /// The envelope of a query.
    async fn query<Req, Resp>(
        &self,
        op: &'static str,
        r: Request<Req>,
        f: QueryFn<Req, Resp>,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
    {
        let req = r.into_inner();
        self.run(op, move |a| f(a, req)).await.map(Response::new)
    }

    /// The envelope of a mutating request: once per request id.
    async fn mutate<Req: Mutating>(
        &self,
        method: &'static str,
        r: Request<Req>,
        f: MutateFn<Req, Req::Response>,
    ) -> Result<Response<Req::Response>, Status> {
        let peer = cairn_proto::peer::Peer::of(&r);
        let id = r.get_ref().request_id().to_string();
        let answer = self.mutate_once(method, r.into_inner(), f).await;
        cairn_proto::peer::audit(&peer, method, &id, &outcome(&answer));
        answer
    }

    /// A mutating request, once per request id.
    async fn mutate_once<Req: Mutating>(
        &self,
        method: &'static str,
        req: Req,
        f: MutateFn<Req, Req::Response>,
    ) -> Result<Response<Req::Response>, Status> {
        let id = req.request_id().to_string();
        check_request_id(&id).map_err(|e| to_status(&e))?;
        let rid = request_bytes(&id);
        if id.is_empty() {
            return self
                .run(method, move |a| f(a, req, rid))
                .await
                .map(Response::new);
        }
        // The method is part of the request: one id, one request.
        let fp =
            cairn_proto::fingerprint(&[method.as_bytes(), b"\0", &req.encode_to_vec()].concat());
        let slot = self.log.slot(&id);
        let mut g = slot.lock().await;
        if let Some(r) = g.as_ref() {
            if r.fingerprint != fp {
                return Err(to_status(&AgentError::RequestIdReused(id)));
            }
            if let Some(answer) = &r.response {
                let mut resp = Req::Response::decode(answer.as_slice())
                    .map_err(|e| Status::internal(format!("remembered response: {e}")))?;
                Req::mark_replayed(&mut resp);
                return Ok(Response::new(resp));
            }
        }
        let resp = self.run(method, move |a| f(a, req, rid)).await;
        if resp.is_ok() {
            self.faults.after_commit(method, &id);
        }
        *g = Some(Remembered {
            fingerprint: fp,
            response: resp.as_ref().ok().map(|r| r.encode_to_vec()),
        });
        let resp = resp?;
        Ok(Response::new(resp))
    }
}

/// What an audit line says of an answer: "ok", or the refusal's reason.
fn outcome<T>(answer: &Result<T, Status>) -> String {
    match answer {
        Ok(_) => "ok".to_string(),
        Err(s) => {
            use tonic_types::StatusExt;
            s.get_details_error_info()
                .map(|i| i.reason)
                .unwrap_or_else(|| format!("{:?}", s.code()).to_lowercase())
        }
    }
}

/// The service's RPCs, each one line: its envelope and its handler.
macro_rules! rpcs {
    ($($kind:ident $name:ident($req:ident) -> $resp:ident;)+) => {
        #[tonic::async_trait]
        impl pb::agent_server::Agent for AgentService {
            type WatchJobStream = std::pin::Pin<
                Box<dyn tokio_stream::Stream<Item = Result<pb::Job, Status>> + Send + 'static>,
            >;
            type ReadVolumeDataStream = data::DataStream;
            type ReadFileStream = data::DataStream;

            async fn read_file(
                &self,
                r: Request<pb::ReadFileRequest>,
            ) -> Result<Response<Self::ReadFileStream>, Status> {
                self.read_file(r.into_inner()).await.map(Response::new)
            }

            async fn write_volume_data(
                &self,
                r: Request<tonic::Streaming<pb::WriteVolumeDataRequest>>,
            ) -> Result<Response<pb::WriteVolumeDataResponse>, Status> {
                let peer = cairn_proto::peer::Peer::of(&r);
                let answer = self.write_data(r.into_inner()).await;
                cairn_proto::peer::audit(&peer, "write_volume_data", "", &outcome(&answer));
                answer.map(Response::new)
            }

            async fn read_volume_data(
                &self,
                r: Request<pb::ReadVolumeDataRequest>,
            ) -> Result<Response<Self::ReadVolumeDataStream>, Status> {
                self.read_data(r.into_inner()).await.map(Response::new)
            }

            $(async fn $name(&self, r: Request<pb::$req>) -> Result<Response<pb::$resp>, Status> {
                self.$kind(stringify!($name), r, handlers::$name).await
            })+

            async fn get_request(
                &self,
                r: Request<pb::GetRequestRequest>,
            ) -> Result<Response<pb::GetRequestResponse>, Status> {
                let r = r.into_inner();
                check_request_id(&r.request_id).map_err(|e| to_status(&e))?;
                Ok(Response::new(pb::GetRequestResponse {
                    state: cairn_proto::convert::request_state_code(self.log.state(&r.request_id)),
                }))
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
                        let j = convert::job(&job);
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
        }
    };
}

rpcs! {
    query list_domains(ListDomainsRequest) -> ListDomainsResponse;
    query get_domain(GetDomainRequest) -> DomainInfo;
    mutate create_volume(CreateVolumeRequest) -> CreateVolumeResponse;
    query get_volume(GetVolumeRequest) -> Volume;
    query list_volumes(ListVolumesRequest) -> ListVolumesResponse;
    mutate update_volume(UpdateVolumeRequest) -> UpdateVolumeResponse;
    mutate delete_volume(DeleteVolumeRequest) -> DeleteVolumeResponse;
    mutate extend_volume(ExtendVolumeRequest) -> ExtendVolumeResponse;
    mutate lock_volume(LockVolumeRequest) -> LockVolumeResponse;
    query unlock_volume(UnlockVolumeRequest) -> UnlockVolumeResponse;
    query measure_volume(MeasureVolumeRequest) -> MeasureVolumeResponse;
    query check_volume(CheckVolumeRequest) -> CheckVolumeResponse;
    mutate create_tag(CreateTagRequest) -> CreateTagResponse;
    query get_tag(GetTagRequest) -> Tag;
    query list_tags(ListTagsRequest) -> ListTagsResponse;
    mutate change_tag(ChangeTagRequest) -> ChangeTagResponse;
    mutate delete_tag(DeleteTagRequest) -> DeleteTagResponse;
    mutate delete_disk(DeleteDiskRequest) -> DeleteDiskResponse;
    mutate set_user_data(SetUserDataRequest) -> SetUserDataResponse;
    query get_user_data(GetUserDataRequest) -> GetUserDataResponse;
    mutate remove_user_data(RemoveUserDataRequest) -> RemoveUserDataResponse;
    mutate snapshot(SnapshotRequest) -> SnapshotResponse;
    mutate activate(ActivateRequest) -> ActivateResponse;
    mutate deactivate(DeactivateRequest) -> DeactivateResponse;
    query list_activations(ListActivationsRequest) -> ListActivationsResponse;
    mutate copy_volume(CopyVolumeRequest) -> Job;
    mutate import_volume(ImportVolumeRequest) -> Job;
    mutate export_volume(ExportVolumeRequest) -> Job;
    query get_job(GetJobRequest) -> Job;
    query list_jobs(ListJobsRequest) -> ListJobsResponse;
    query cancel_job(CancelJobRequest) -> Job;
    mutate merge_snapshot(MergeSnapshotRequest) -> Job;
    mutate swap_disk(SwapDiskRequest) -> SwapDiskResponse;
    query recover_domain(RecoverDomainRequest) -> RecoverDomainResponse;
    mutate commit_file(CommitFileRequest) -> CommitFileResponse;
    query list_files(ListFilesRequest) -> ListFilesResponse;
    mutate delete_files(DeleteFilesRequest) -> DeleteFilesResponse;
    mutate set_file_image(SetFileImageRequest) -> SetFileImageResponse;
}
