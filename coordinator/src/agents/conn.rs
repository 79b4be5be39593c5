//! One agent's calls, as the coordinator makes them: requests built from
//! domain types, answers read back through `cairn_proto::convert` (an
//! answer it cannot read is the agent's fault, reported as internal).

use cairn_domain::api::{CopyTarget, JobInfo, Recovered, RequestState, TagSpec};
use cairn_domain::{Allocation, Format, TagId, VolumeId};
use cairn_proto::agent as pb;
use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::convert::{self as wire, ConvertError};

use super::{agent_err, Transport};
use crate::error::{CoordError, Result};
use crate::plan::{TagInfo, VolumeInfo};
use crate::record::{JobError, JobState};

/// An agent's job as the coordinator follows it.
#[derive(Debug, Clone)]
pub struct AgentJob {
    /// Running, succeeded, failed or cancelled.
    pub state: JobState,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    /// The tag a copy made.
    pub tag: Option<TagInfo>,
    /// Why it failed.
    pub error: Option<JobError>,
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
    pub(super) client: AgentClient<Transport>,
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
    pub(super) fn c(&self) -> AgentClient<Transport> {
        self.client.clone()
    }

    pub(super) fn err(&self) -> impl Fn(tonic::Status) -> CoordError + '_ {
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
        self.create(rid, domain, d, None).await
    }

    /// A thin disk on a snapshot: a qcow2 layer on `parent` with a strong
    /// tag, in one transaction.
    pub async fn create_on(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        parent: &TagId,
        size: u64,
        description: &str,
        options: &[(String, String)],
    ) -> Result<TagInfo> {
        let d = NewDisk {
            format: Format::Qcow2,
            size,
            preallocated: false,
            description: description.into(),
            options: options.to_vec(),
        };
        self.create(rid, domain, &d, Some(parent)).await
    }

    async fn create(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        d: &NewDisk,
        parent: Option<&TagId>,
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
                parent_tag: parent.map(|p| p.to_string()).unwrap_or_default(),
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

    /// Delete a volume no tag points at (refused while it is active or
    /// locked).
    pub async fn delete_volume(&self, rid: &str, domain: &uuid::Uuid, v: &VolumeId) -> Result<()> {
        self.c()
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                volume_id: v.to_string(),
                lock_id: String::new(),
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
        let t = CopyTarget {
            format,
            allocation: allocation(preallocated),
            description: description.into(),
            tag: Some(TagSpec::disk(options.to_vec())),
        };
        self.copy_volume(rid, domain, volume, None, target, &t, None)
            .await
    }

    /// Start copying file volume `volume` of `domain`, whose bytes are an
    /// image of `read_as`, into a new volume of `format` on `target`
    /// tagged `tag`. Returns the agent's job id.
    #[allow(clippy::too_many_arguments)]
    pub async fn copy_image(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        volume: &VolumeId,
        read_as: Format,
        target: &uuid::Uuid,
        format: Format,
        tag: TagSpec,
    ) -> Result<String> {
        let t = CopyTarget {
            format: Some(format),
            allocation: Allocation::Sparse,
            description: "image cache".into(),
            tag: Some(tag),
        };
        self.copy_volume(rid, domain, volume, Some(read_as), target, &t, None)
            .await
    }

    /// Start copying `volume`'s chain (flattened) into a new raw version
    /// of catalog file `path` on the same domain, owned by `owner` and
    /// marked with `request`. Returns the agent's job id.
    pub async fn copy_to_file(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        volume: &VolumeId,
        path: &str,
        owner: &str,
        request: &str,
    ) -> Result<String> {
        let t = CopyTarget {
            format: Some(Format::Raw),
            allocation: Allocation::Sparse,
            description: "image file".into(),
            tag: None,
        };
        let f = pb::FileTarget {
            path: path.into(),
            owner: owner.into(),
            request: request.into(),
        };
        self.copy_volume(rid, domain, volume, None, domain, &t, Some(f))
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy_volume(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        volume: &VolumeId,
        read_as: Option<Format>,
        target: &uuid::Uuid,
        t: &CopyTarget,
        as_file: Option<pb::FileTarget>,
    ) -> Result<String> {
        let j = self
            .c()
            .copy_volume(pb::CopyVolumeRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                volume_id: volume.to_string(),
                target: Some(t.into()),
                target_domain: if target == domain {
                    String::new()
                } else {
                    target.to_string()
                },
                source_format: read_as.map(wire::volume_format_code).unwrap_or(0),
                as_file,
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
                cairn_domain::api::JobState::Running => JobState::Running,
                cairn_domain::api::JobState::Succeeded => JobState::Succeeded,
                cairn_domain::api::JobState::Failed => JobState::Failed,
                cairn_domain::api::JobState::Cancelled => JobState::Cancelled,
            },
            done: j.done_bytes,
            total: j.total_bytes,
            tag: j.tag,
            error: j.error.map(|e| JobError {
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
