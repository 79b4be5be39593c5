//! Messages to and from the coordinator's types, and the one mapping of
//! its errors to statuses.

use cairn_domain::{Allocation, Format, TagId};
use cairn_proto::convert as wire;
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::coordinator::parse_tag;
use crate::error::CoordError;
use crate::pb;
use crate::plan::{DiskView, NAME_KEY};
use crate::record::{JobRecord, JobState};

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

pub(super) fn format_of(v: i32) -> Result<Option<Format>, CoordError> {
    Ok(wire::disk_format("format", v)?)
}

pub(super) fn required_format(v: i32) -> Result<Format, CoordError> {
    format_of(v)?.ok_or_else(|| CoordError::invalid("format", "is required (raw or qcow2)"))
}

pub(super) fn allocation_of(v: i32) -> Result<Allocation, CoordError> {
    Ok(wire::disk_allocation("allocation", v)?.unwrap_or(Allocation::Sparse))
}

pub(super) fn disk_id(field: &'static str, s: &str) -> Result<TagId, CoordError> {
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
        image_id: v
            .tag
            .option(cairn_proto::keys::FROM_IMAGE)
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
        image_id: r.spec.image(&r.id).unwrap_or_default(),
    }
}
