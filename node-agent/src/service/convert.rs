//! The agent's own types as wire messages (through the domain's report
//! types and `cairn_proto::convert`, the one mapping both sides share).

use std::time::Duration;

use cairn_domain::api::{self, CopyTarget, FailureInfo, JobInfo, TagInfo, VolumeInfo};
use cairn_domain::{Tag, Volume};
use cairn_proto::agent as pb;
use cairn_proto::convert as wire;

use super::status::to_status;
use crate::agent::{self, Opened};
use crate::error::Result;
use crate::jobs::{Job, Outcome, Status as JobStatus};

/// A volume of domain `o`.
pub(super) fn volume(o: &Opened, v: &Volume) -> pb::Volume {
    (&VolumeInfo::of(o.name(), o.domain.geometry().extent_size, v)).into()
}

/// A tag of domain `o`.
pub(super) fn tag(o: &Opened, t: &Tag) -> pb::Tag {
    (&TagInfo::of(o.name(), t)).into()
}

/// Domain `o` as this host has it open.
pub(super) fn domain(o: &Opened) -> Result<pb::DomainInfo> {
    let g = o.domain.geometry();
    let u = o.domain.usage()?;
    Ok((&api::DomainInfo {
        id: o.id(),
        name: o.name().to_string(),
        path: o.path.display().to_string(),
        host_slot: o.domain.slot().unwrap_or(u32::MAX),
        host_slot_token: o.domain.slot_token().unwrap_or(0),
        extent_size: g.extent_size,
        extents_total: u.extents_total,
        extents_free: u.extents_total - u.extents_used,
        volume_slots_total: u.volume_slots,
        volumes: u.volumes,
        tag_slots_total: u.tag_slots,
        tags: u.tags,
        host_slots_total: g.host_slots,
    })
        .into())
}

/// An activation (only this agent speaks of them).
pub(super) fn activation(a: &agent::Activation) -> pb::Activation {
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
                format: wire::volume_format_code(v.format),
            })
            .collect(),
        closing: a.closing,
    }
}

/// A lock lease; 0 asks for the default.
pub(super) fn lease(secs: u32) -> Duration {
    if secs == 0 {
        agent::DEFAULT_LEASE
    } else {
        Duration::from_secs(secs as u64)
    }
}

/// What a copy or import makes; none given is a sparse volume in the
/// source's format, without a tag.
pub(super) fn target(t: Option<&pb::TargetSpec>) -> Result<CopyTarget> {
    Ok(match t {
        Some(t) => CopyTarget::try_from(t)?,
        None => CopyTarget::default(),
    })
}

/// A job as it is now.
pub(super) fn job(j: &Job) -> pb::Job {
    use std::sync::atomic::Ordering::Relaxed;
    let (st, finished) = j.status();
    let mut out = JobInfo {
        id: j.id.clone(),
        kind: j.kind.to_string(),
        state: api::JobState::Running,
        done_bytes: j.progress.done.load(Relaxed),
        total_bytes: j.progress.total.load(Relaxed),
        skipped_bytes: j.progress.skipped.load(Relaxed),
        started: j.started,
        finished,
        volume: None,
        tag: None,
        path: String::new(),
        error: None,
    };
    out.state = match st {
        JobStatus::Running => api::JobState::Running,
        JobStatus::Succeeded(o) => {
            match o {
                Outcome::Volume {
                    domain,
                    volume,
                    tag,
                } => {
                    let ext = domain.domain.geometry().extent_size;
                    out.volume = Some(VolumeInfo::of(domain.name(), ext, &volume));
                    out.tag = tag.as_ref().map(|t| TagInfo::of(domain.name(), t));
                }
                Outcome::File(p) => out.path = p.display().to_string(),
            }
            api::JobState::Succeeded
        }
        JobStatus::Failed(e) => {
            let s = to_status(&e);
            out.error = Some(FailureInfo {
                code: s.code() as i32,
                reason: e.code().to_string(),
                message: s.message().to_string(),
            });
            api::JobState::Failed
        }
        JobStatus::Cancelled => api::JobState::Cancelled,
    };
    (&out).into()
}
