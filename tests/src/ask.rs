//! Typed client helpers: the calls tests make over and over, as one line
//! each, answering with what the test wants (and panicking with the
//! status when a call the test expects to succeed fails).

use std::future::Future;

use cairn_proto::agent as pb;
use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::coordinator as cpb;
use cairn_proto::coordinator::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::Answer;

/// The agent calls tests make.
pub trait AgentCalls {
    /// A raw or qcow2 disk of `mib` MiB: a volume and its strong tag.
    fn new_disk(
        &mut self,
        rid: &str,
        format: pb::VolumeFormat,
        mib: u64,
    ) -> impl Future<Output = (pb::Volume, pb::Tag)>;
    /// Snapshot `tag`.
    fn snapshot_tag(&mut self, rid: &str, tag: &str) -> impl Future<Output = pb::SnapshotResponse>;
    /// Activate `tag`.
    fn activate_tag(&mut self, rid: &str, tag: &str) -> impl Future<Output = pb::Activation>;
    /// Deactivate `tag` (not forced); whether anything was active.
    fn deactivate_tag(&mut self, rid: &str, tag: &str) -> impl Future<Output = bool>;
    /// A job as it is now.
    fn job_now(&mut self, id: &str) -> impl Future<Output = pb::Job>;
    /// One volume.
    fn volume_of(&mut self, id: &str) -> impl Future<Output = pb::Volume>;
    /// One tag.
    fn tag_of(&mut self, id: &str) -> impl Future<Output = pb::Tag>;
    /// Every volume of the only domain.
    fn volumes(&mut self) -> impl Future<Output = Vec<pb::Volume>>;
    /// Every activation.
    fn activations(&mut self) -> impl Future<Output = Vec<pb::Activation>>;
    /// Panic unless the agent's check of volume `id` finds it clean.
    fn assert_clean(&mut self, id: &str) -> impl Future<Output = ()>;
}

impl AgentCalls for AgentClient<Channel> {
    async fn new_disk(
        &mut self,
        rid: &str,
        format: pb::VolumeFormat,
        mib: u64,
    ) -> (pb::Volume, pb::Tag) {
        let r = self
            .create_volume(crate::agent::disk_request(rid, format, mib))
            .await
            .answer();
        (r.volume.expect("a volume"), r.tag.expect("a tag"))
    }

    async fn snapshot_tag(&mut self, rid: &str, tag: &str) -> pb::SnapshotResponse {
        self.snapshot(snapshot(rid, tag)).await.answer()
    }

    async fn activate_tag(&mut self, rid: &str, tag: &str) -> pb::Activation {
        let r = self.activate(activate(rid, tag)).await.answer();
        r.activation.expect("an activation")
    }

    async fn deactivate_tag(&mut self, rid: &str, tag: &str) -> bool {
        self.deactivate(deactivate(rid, tag)).await.answer().changed
    }

    async fn job_now(&mut self, id: &str) -> pb::Job {
        self.get_job(job(id)).await.answer()
    }

    async fn volume_of(&mut self, id: &str) -> pb::Volume {
        let r = pb::GetVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        };
        self.get_volume(r).await.answer()
    }

    async fn tag_of(&mut self, id: &str) -> pb::Tag {
        let r = pb::GetTagRequest {
            tag_id: id.into(),
            ..Default::default()
        };
        self.get_tag(r).await.answer()
    }

    async fn volumes(&mut self) -> Vec<pb::Volume> {
        self.list_volumes(pb::ListVolumesRequest::default())
            .await
            .answer()
            .volumes
    }

    async fn activations(&mut self) -> Vec<pb::Activation> {
        self.list_activations(pb::ListActivationsRequest::default())
            .await
            .answer()
            .activations
    }

    async fn assert_clean(&mut self, id: &str) {
        let r = pb::CheckVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        };
        let chk = self.check_volume(r).await.answer();
        assert!(chk.clean, "volume {id}: {}", chk.report_json);
    }
}

/// A snapshot of `tag` on the only domain.
pub fn snapshot(rid: &str, tag: &str) -> pb::SnapshotRequest {
    pb::SnapshotRequest {
        request_id: rid.into(),
        tag_id: tag.into(),
        ..Default::default()
    }
}

/// An activation of `tag` on the only domain.
pub fn activate(rid: &str, tag: &str) -> pb::ActivateRequest {
    pb::ActivateRequest {
        request_id: rid.into(),
        tag_id: tag.into(),
        ..Default::default()
    }
}

/// A deactivation of `tag` on the only domain, not forced.
pub fn deactivate(rid: &str, tag: &str) -> pb::DeactivateRequest {
    pb::DeactivateRequest {
        request_id: rid.into(),
        tag_id: tag.into(),
        ..Default::default()
    }
}

/// Asking for job `id`.
pub fn job(id: &str) -> pb::GetJobRequest {
    pb::GetJobRequest { job_id: id.into() }
}

/// A delete of disk `tag` on the only domain.
pub fn delete_disk(rid: &str, tag: &str) -> pb::DeleteDiskRequest {
    pb::DeleteDiskRequest {
        request_id: rid.into(),
        tag_id: tag.into(),
        ..Default::default()
    }
}

/// Coordinator requests, as tests make them (empty domain: the only one).
pub mod coord {
    use cairn_proto::coordinator as cpb;

    /// A new disk `name` of `size` bytes.
    pub fn create(rid: &str, name: &str, format: cpb::Format, size: u64) -> cpb::CreateDiskRequest {
        cpb::CreateDiskRequest {
            request_id: rid.into(),
            name: name.into(),
            format: format as i32,
            size,
            ..Default::default()
        }
    }

    /// A snapshot of `disk`.
    pub fn snapshot(rid: &str, domain: &str, disk: &str) -> cpb::SnapshotDiskRequest {
        cpb::SnapshotDiskRequest {
            request_id: rid.into(),
            domain: domain.into(),
            disk_id: disk.into(),
            ..Default::default()
        }
    }

    /// A thin clone of `source` (a disk or snapshot) named `name`.
    pub fn clone(rid: &str, domain: &str, source: &str, name: &str) -> cpb::CloneDiskRequest {
        cpb::CloneDiskRequest {
            request_id: rid.into(),
            domain: domain.into(),
            source_id: source.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    /// Growing `disk` to `size` bytes.
    pub fn extend(rid: &str, domain: &str, disk: &str, size: u64) -> cpb::ExtendDiskRequest {
        cpb::ExtendDiskRequest {
            request_id: rid.into(),
            domain: domain.into(),
            disk_id: disk.into(),
            size,
        }
    }

    /// Deleting `disk`.
    pub fn delete(rid: &str, domain: &str, disk: &str) -> cpb::DeleteDiskRequest {
        cpb::DeleteDiskRequest {
            request_id: rid.into(),
            domain: domain.into(),
            disk_id: disk.into(),
        }
    }

    /// Deleting snapshot `snap` (merging it away).
    pub fn delete_snapshot(rid: &str, domain: &str, snap: &str) -> cpb::DeleteSnapshotRequest {
        cpb::DeleteSnapshotRequest {
            request_id: rid.into(),
            domain: domain.into(),
            snapshot_id: snap.into(),
        }
    }
}

/// The coordinator calls tests make.
pub trait CoordCalls {
    /// Disk `disk` of `domain` (name or id; empty: the only one).
    fn disk_of(&mut self, domain: &str, disk: &str) -> impl Future<Output = cpb::Disk>;
    /// Snapshot `disk`: the job.
    fn snapshot_of(
        &mut self,
        rid: &str,
        domain: &str,
        disk: &str,
    ) -> impl Future<Output = cpb::Job>;
    /// Delete `disk`: the job.
    fn delete_of(&mut self, rid: &str, domain: &str, disk: &str) -> impl Future<Output = cpb::Job>;
    /// Start deleting snapshot `snap`: the job (follow it to its end).
    fn delete_snapshot_of(
        &mut self,
        rid: &str,
        domain: &str,
        snap: &str,
    ) -> impl Future<Output = cpb::Job>;
    /// A job as it is now.
    fn job_now(&mut self, id: &str) -> impl Future<Output = cpb::Job>;
    /// Every disk the caller may see.
    fn disks(&mut self) -> impl Future<Output = Vec<cpb::Disk>>;
    /// Create disk `name` (may be empty) of `size` bytes: the job.
    fn create_of(
        &mut self,
        rid: &str,
        name: &str,
        format: cpb::Format,
        size: u64,
    ) -> impl Future<Output = cpb::Job>;
}

impl CoordCalls for CoordinatorClient<Channel> {
    async fn disk_of(&mut self, domain: &str, disk: &str) -> cpb::Disk {
        let r = cpb::GetDiskRequest {
            domain: domain.into(),
            disk_id: disk.into(),
        };
        self.get_disk(r).await.answer()
    }

    async fn snapshot_of(&mut self, rid: &str, domain: &str, disk: &str) -> cpb::Job {
        self.snapshot_disk(coord::snapshot(rid, domain, disk))
            .await
            .answer()
    }

    async fn delete_of(&mut self, rid: &str, domain: &str, disk: &str) -> cpb::Job {
        self.delete_disk(coord::delete(rid, domain, disk))
            .await
            .answer()
    }

    async fn delete_snapshot_of(&mut self, rid: &str, domain: &str, snap: &str) -> cpb::Job {
        self.delete_snapshot(coord::delete_snapshot(rid, domain, snap))
            .await
            .answer()
    }

    async fn job_now(&mut self, id: &str) -> cpb::Job {
        self.get_job(cpb::GetJobRequest { job_id: id.into() })
            .await
            .answer()
    }

    async fn create_of(
        &mut self,
        rid: &str,
        name: &str,
        format: cpb::Format,
        size: u64,
    ) -> cpb::Job {
        self.create_disk(coord::create(rid, name, format, size))
            .await
            .answer()
    }

    async fn disks(&mut self) -> Vec<cpb::Disk> {
        self.list_disks(cpb::ListDisksRequest::default())
            .await
            .answer()
            .disks
    }
}
