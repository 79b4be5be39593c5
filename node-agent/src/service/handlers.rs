//! One function per RPC: read the request into domain types, call the
//! agent, answer. Mutating handlers get the request id as the journal
//! records it; the envelopes in the parent module do the rest.

use std::sync::Arc;

use cairn_domain::api::TagSpec;
use cairn_domain::catalog::{FileChange, Listing};
use cairn_domain::{DomainError, Format};
use cairn_proto::agent as pb;
use cairn_proto::convert::{self as wire, optional_tag_id, required, tag_id, volume_id};

use super::convert::{self, lease, target};
use crate::agent::{self, Agent};
use crate::error::{AgentError, Result};

type A = Arc<Agent>;

// ---- domains --------------------------------------------------------------------------

pub(super) fn list_domains(a: &A, _: pb::ListDomainsRequest) -> Result<pb::ListDomainsResponse> {
    let domains = a
        .domains()
        .iter()
        .map(|o| convert::domain(o))
        .collect::<Result<Vec<_>>>()?;
    Ok(pb::ListDomainsResponse {
        domains,
        instance: a.instance().to_string(),
    })
}

pub(super) fn get_domain(a: &A, r: pb::GetDomainRequest) -> Result<pb::DomainInfo> {
    convert::domain(a.domain(&r.domain)?.as_ref())
}

pub(super) fn recover_domain(
    a: &A,
    r: pb::RecoverDomainRequest,
) -> Result<pb::RecoverDomainResponse> {
    let o = a.domain(&r.domain)?;
    let (slots, forward, back, removed) = a.recover_domain(&o, r.collect_garbage)?;
    let mut active = Vec::new();
    for (i, h) in o.domain.read_slot_headers()?.into_iter().enumerate() {
        match h {
            Ok(h) if h.state == cairn_domain::layout::SlotState::Active => {
                active.push((i as u32, h.token))
            }
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
    Ok((&cairn_domain::api::Recovered {
        slots,
        forward,
        back,
        removed,
        active,
    })
        .into())
}

// ---- volumes --------------------------------------------------------------------------

/// A tag to create on a new volume: it names no volume of its own.
fn new_volume_tag(t: Option<&pb::TagSpec>) -> Result<Option<TagSpec>> {
    match t {
        Some(t) if !t.volume.is_empty() => Err(AgentError::invalid(
            "tag.volume",
            "must be empty: the tag points at the new volume",
        )),
        Some(t) => Ok(Some(TagSpec::try_from(t)?)),
        None => Ok(None),
    }
}

pub(super) fn create_volume(
    a: &A,
    r: pb::CreateVolumeRequest,
    rid: [u8; 16],
) -> Result<pb::CreateVolumeResponse> {
    let o = a.domain(&r.domain)?;
    let c = a.create_volume(
        &o,
        agent::CreateVolume {
            format: required("format", wire::volume_format("format", r.format)?)?,
            capacity: r.capacity,
            size: r.size,
            allocation: wire::allocation("allocation", r.allocation)?
                .unwrap_or(cairn_domain::Allocation::Sparse),
            parent: optional_tag_id("parent_tag", &r.parent_tag)?,
            description: r.description,
            tag: new_volume_tag(r.tag.as_ref())?,
            keep_locked: r.keep_locked.then(|| lease(r.lock_lease_seconds)),
        },
        rid,
    )?;
    Ok(pb::CreateVolumeResponse {
        volume: Some(convert::volume(&o, &c.volume)),
        tag: c.tag.as_ref().map(|t| convert::tag(&o, t)),
        lock_id: c.lock_id.unwrap_or_default(),
        created: true,
    })
}

pub(super) fn get_volume(a: &A, r: pb::GetVolumeRequest) -> Result<pb::Volume> {
    let o = a.domain(&r.domain)?;
    let id = volume_id("volume_id", &r.volume_id)?;
    Ok(convert::volume(&o, &o.domain.read_volume(&id)?))
}

pub(super) fn list_volumes(a: &A, r: pb::ListVolumesRequest) -> Result<pb::ListVolumesResponse> {
    let o = a.domain(&r.domain)?;
    let volumes = o
        .domain
        .list_volumes()?
        .iter()
        .map(|v| convert::volume(&o, v))
        .collect();
    Ok(pb::ListVolumesResponse { volumes })
}

pub(super) fn update_volume(
    a: &A,
    r: pb::UpdateVolumeRequest,
    rid: [u8; 16],
) -> Result<pb::UpdateVolumeResponse> {
    let o = a.domain(&r.domain)?;
    let id = volume_id("volume_id", &r.volume_id)?;
    let legality = required("legality", wire::legality("legality", r.legality)?)?;
    let parent = match (r.set_parent, r.parent_tag.as_str()) {
        (false, "") => None,
        (false, _) => {
            return Err(AgentError::invalid(
                "parent_tag",
                "is only read with set_parent",
            ))
        }
        (true, p) => Some(optional_tag_id("parent_tag", p)?),
    };
    let (v, changed) =
        a.update_volume(&o, &id, r.description, legality, parent, &r.lock_id, rid)?;
    Ok(pb::UpdateVolumeResponse {
        volume: Some(convert::volume(&o, &v)),
        changed,
    })
}

pub(super) fn delete_volume(
    a: &A,
    r: pb::DeleteVolumeRequest,
    rid: [u8; 16],
) -> Result<pb::DeleteVolumeResponse> {
    let o = a.domain(&r.domain)?;
    let id = volume_id("volume_id", &r.volume_id)?;
    a.delete_volume(&o, &id, &r.lock_id, rid)?;
    Ok(pb::DeleteVolumeResponse { deleted: true })
}

pub(super) fn extend_volume(
    a: &A,
    r: pb::ExtendVolumeRequest,
    rid: [u8; 16],
) -> Result<pb::ExtendVolumeResponse> {
    let o = a.domain(&r.domain)?;
    let id = volume_id("volume_id", &r.volume_id)?;
    let tag = optional_tag_id("tag_id", &r.tag_id)?;
    let (v, changed) = a.extend_volume(&o, &id, r.capacity, &r.lock_id, tag.as_ref(), rid)?;
    Ok(pb::ExtendVolumeResponse {
        volume: Some(convert::volume(&o, &v)),
        changed,
    })
}

pub(super) fn lock_volume(
    a: &A,
    r: pb::LockVolumeRequest,
    _: [u8; 16],
) -> Result<pb::LockVolumeResponse> {
    let o = a.domain(&r.domain)?;
    let id = volume_id("volume_id", &r.volume_id)?;
    let (lock_id, token) = a.lock_volume(&o, &id, lease(r.lease_seconds))?;
    Ok(pb::LockVolumeResponse { lock_id, token })
}

pub(super) fn unlock_volume(a: &A, r: pb::UnlockVolumeRequest) -> Result<pb::UnlockVolumeResponse> {
    if r.lock_id.is_empty() {
        return Err(AgentError::invalid("lock_id", "is required"));
    }
    Ok(pb::UnlockVolumeResponse {
        released: a.unlock(&r.lock_id),
    })
}

pub(super) fn measure_volume(
    a: &A,
    r: pb::MeasureVolumeRequest,
) -> Result<pb::MeasureVolumeResponse> {
    let o = a.domain(&r.domain)?;
    let id = volume_id("volume_id", &r.volume_id)?;
    let f = required(
        "target_format",
        wire::volume_format("target_format", r.target_format)?,
    )?;
    let m = a.measure(&o, &id, f)?;
    Ok(pb::MeasureVolumeResponse {
        required: m.required,
        fully_allocated: m.fully_allocated,
    })
}

pub(super) fn check_volume(a: &A, r: pb::CheckVolumeRequest) -> Result<pb::CheckVolumeResponse> {
    let o = a.domain(&r.domain)?;
    let id = volume_id("volume_id", &r.volume_id)?;
    let c = a.check_volume(&o, &id)?;
    Ok(pb::CheckVolumeResponse {
        clean: c.clean,
        corruptions: c.corruptions,
        leaks: c.leaks,
        check_errors: c.check_errors,
        report_json: c.report,
    })
}

// ---- tags and disks -------------------------------------------------------------------

/// The tag spec of a request and the volume it names.
fn spec_and_volume(t: Option<&pb::TagSpec>) -> Result<(cairn_domain::VolumeId, TagSpec)> {
    let t = t.ok_or_else(|| AgentError::invalid("tag", "is required"))?;
    Ok((volume_id("tag.volume", &t.volume)?, TagSpec::try_from(t)?))
}

pub(super) fn create_tag(
    a: &A,
    r: pb::CreateTagRequest,
    rid: [u8; 16],
) -> Result<pb::CreateTagResponse> {
    let o = a.domain(&r.domain)?;
    let (volume, spec) = spec_and_volume(r.tag.as_ref())?;
    let t = a.create_tag(&o, volume, &spec, rid)?;
    Ok(pb::CreateTagResponse {
        tag: Some(convert::tag(&o, &t)),
        created: true,
    })
}

pub(super) fn get_tag(a: &A, r: pb::GetTagRequest) -> Result<pb::Tag> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    Ok(convert::tag(&o, &o.domain.read_tag(&id)?))
}

pub(super) fn list_tags(a: &A, r: pb::ListTagsRequest) -> Result<pb::ListTagsResponse> {
    let o = a.domain(&r.domain)?;
    let tags = o
        .domain
        .list_tags()?
        .iter()
        .map(|t| convert::tag(&o, t))
        .collect();
    Ok(pb::ListTagsResponse { tags })
}

pub(super) fn change_tag(
    a: &A,
    r: pb::ChangeTagRequest,
    rid: [u8; 16],
) -> Result<pb::ChangeTagResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    let (volume, spec) = spec_and_volume(r.tag.as_ref())?;
    let (t, changed) = a.change_tag(&o, &id, volume, &spec, rid)?;
    Ok(pb::ChangeTagResponse {
        tag: Some(convert::tag(&o, &t)),
        changed,
    })
}

pub(super) fn delete_tag(
    a: &A,
    r: pb::DeleteTagRequest,
    rid: [u8; 16],
) -> Result<pb::DeleteTagResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    a.delete_tag(&o, &id, rid)?;
    Ok(pb::DeleteTagResponse { deleted: true })
}

pub(super) fn delete_disk(
    a: &A,
    r: pb::DeleteDiskRequest,
    rid: [u8; 16],
) -> Result<pb::DeleteDiskResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    let (tags, vols) = a.delete_disk(&o, &id, rid)?;
    Ok(pb::DeleteDiskResponse {
        tags_removed: tags.iter().map(|t| t.to_string()).collect(),
        volumes_removed: vols.iter().map(|v| v.to_string()).collect(),
        deleted: true,
    })
}

pub(super) fn swap_disk(
    a: &A,
    r: pb::SwapDiskRequest,
    rid: [u8; 16],
) -> Result<pb::SwapDiskResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    let with = tag_id("with_tag_id", &r.with_tag_id)?;
    let (t, tags, vols) = a.swap_disk(&o, &id, &with, rid)?;
    Ok(pb::SwapDiskResponse {
        tag: Some(convert::tag(&o, &t)),
        tags_removed: tags.iter().map(|t| t.to_string()).collect(),
        volumes_removed: vols.iter().map(|v| v.to_string()).collect(),
        changed: true,
    })
}

pub(super) fn snapshot(
    a: &A,
    r: pb::SnapshotRequest,
    rid: [u8; 16],
) -> Result<pb::SnapshotResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    let clone = r.clone.as_ref().map(TagSpec::try_from).transpose()?;
    let spec = agent::SnapshotSpec {
        description: r.description,
        size: r.size,
        options: wire::options_from_wire(&r.snapshot_options),
    };
    let s = a.snapshot(&o, &id, spec, clone.as_ref(), rid)?;
    Ok(pb::SnapshotResponse {
        volume: Some(convert::volume(&o, &s.volume)),
        parent_tag: Some(convert::tag(&o, &s.parent_tag)),
        tag: Some(convert::tag(&o, &s.tag)),
        created: true,
        clone_volume: s.clone.as_ref().map(|(v, _)| convert::volume(&o, v)),
        clone_tag: s.clone.as_ref().map(|(_, t)| convert::tag(&o, t)),
    })
}

// ---- user data ------------------------------------------------------------------------

pub(super) fn set_user_data(
    a: &A,
    r: pb::SetUserDataRequest,
    rid: [u8; 16],
) -> Result<pb::SetUserDataResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    let changed = a.set_user_data(&o, &id, &r.name, r.data, rid)?;
    Ok(pb::SetUserDataResponse { changed })
}

pub(super) fn get_user_data(a: &A, r: pb::GetUserDataRequest) -> Result<pb::GetUserDataResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    let items = a
        .get_user_data(&o, &id, &r.name)?
        .into_iter()
        .map(|(name, data)| pb::UserDataItem { name, data })
        .collect();
    Ok(pb::GetUserDataResponse { items })
}

pub(super) fn remove_user_data(
    a: &A,
    r: pb::RemoveUserDataRequest,
    rid: [u8; 16],
) -> Result<pb::RemoveUserDataResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    let removed = a.remove_user_data(&o, &id, &r.name, rid)?;
    Ok(pb::RemoveUserDataResponse { removed })
}

// ---- activation -----------------------------------------------------------------------

pub(super) fn activate(a: &A, r: pb::ActivateRequest, _: [u8; 16]) -> Result<pb::ActivateResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    let (act, changed) = a.activate(&o, &id)?;
    Ok(pb::ActivateResponse {
        activation: Some(convert::activation(&act)),
        changed,
    })
}

pub(super) fn deactivate(
    a: &A,
    r: pb::DeactivateRequest,
    _: [u8; 16],
) -> Result<pb::DeactivateResponse> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    let d = a.deactivate(&o, &id, r.force)?;
    Ok(pb::DeactivateResponse {
        changed: d.changed,
        still_open: d.still_open,
    })
}

pub(super) fn list_activations(
    a: &A,
    r: pb::ListActivationsRequest,
) -> Result<pb::ListActivationsResponse> {
    let doms = if r.domain.is_empty() {
        a.domains().to_vec()
    } else {
        vec![a.domain(&r.domain)?]
    };
    let mut activations = Vec::new();
    for o in doms {
        activations.extend(a.activations(&o)?.iter().map(convert::activation));
    }
    Ok(pb::ListActivationsResponse { activations })
}

// ---- jobs -----------------------------------------------------------------------------

pub(super) fn copy_volume(a: &A, r: pb::CopyVolumeRequest, rid: [u8; 16]) -> Result<pb::Job> {
    let o = a.domain(&r.domain)?;
    let id = volume_id("volume_id", &r.volume_id)?;
    let t = target(r.target.as_ref())?;
    let to = if r.target_domain.is_empty() {
        None
    } else {
        Some(a.domain(&r.target_domain)?)
    };
    let read_as = wire::volume_format("source_format", r.source_format)?;
    let file = r.as_file.map(|f| cairn_domain::catalog::NewFile {
        path: f.path,
        owner: f.owner,
        directory: false,
        request: f.request,
    });
    Ok(convert::job(
        &*a.start_copy(o, &id, to, read_as, t, file, rid)?,
    ))
}

pub(super) fn import_volume(a: &A, r: pb::ImportVolumeRequest, rid: [u8; 16]) -> Result<pb::Job> {
    let o = a.domain(&r.domain)?;
    let f = required(
        "source_format",
        wire::volume_format("source_format", r.source_format)?,
    )?;
    let t = target(r.target.as_ref())?;
    Ok(convert::job(&*a.start_import(o, &r.path, f, t, rid)?))
}

pub(super) fn export_volume(a: &A, r: pb::ExportVolumeRequest, _: [u8; 16]) -> Result<pb::Job> {
    let o = a.domain(&r.domain)?;
    let id = volume_id("volume_id", &r.volume_id)?;
    let f = wire::volume_format("format", r.format)?.unwrap_or(Format::Raw);
    Ok(convert::job(&*a.start_export(o, &id, &r.path, f)?))
}

pub(super) fn merge_snapshot(a: &A, r: pb::MergeSnapshotRequest, rid: [u8; 16]) -> Result<pb::Job> {
    let o = a.domain(&r.domain)?;
    let id = tag_id("tag_id", &r.tag_id)?;
    Ok(convert::job(&*a.start_merge(o, &id, rid)?))
}

pub(super) fn get_job(a: &A, r: pb::GetJobRequest) -> Result<pb::Job> {
    Ok(convert::job(a.jobs().get(&r.job_id)?.as_ref()))
}

pub(super) fn list_jobs(a: &A, _: pb::ListJobsRequest) -> Result<pb::ListJobsResponse> {
    Ok(pb::ListJobsResponse {
        jobs: a.jobs().list().iter().map(|j| convert::job(j)).collect(),
    })
}

pub(super) fn cancel_job(a: &A, r: pb::CancelJobRequest) -> Result<pb::Job> {
    Ok(convert::job(a.cancel_job(&r.job_id)?.as_ref()))
}

// ---- catalog files ----------------------------------------------------------------------

pub(super) fn commit_file(
    a: &A,
    r: pb::CommitFileRequest,
    rid: [u8; 16],
) -> Result<pb::CommitFileResponse> {
    let o = a.domain(&r.domain)?;
    let f = cairn_domain::catalog::NewFile {
        path: r.path,
        owner: r.owner,
        directory: r.directory,
        request: r.request_id.clone(),
    };
    let volume = if r.volume_id.is_empty() {
        None
    } else {
        Some((volume_id("volume_id", &r.volume_id)?, r.lock_id.as_str()))
    };
    let v = a.commit_file(&o, &f, &r.data, volume, r.expect_generation, rid)?;
    Ok(pb::CommitFileResponse {
        generation: v.version,
        file: Some((&v).into()),
        created: true,
    })
}

pub(super) fn list_files(a: &A, r: pb::ListFilesRequest) -> Result<pb::ListFilesResponse> {
    let o = a.domain(&r.domain)?;
    let mut removed_tag_ids = Vec::new();
    let mut changes = false;
    let l = match r.since.map(|g| a.file_changes(&o, g)).transpose()? {
        Some(c) if c.files.is_some() => {
            changes = true;
            let mut files = Vec::new();
            for f in c.files.into_iter().flatten() {
                match f {
                    FileChange::Now(f) => files.push(f),
                    FileChange::Gone(t) => removed_tag_ids.push(t.to_string()),
                }
            }
            Listing {
                generation: c.generation,
                files,
            }
        }
        _ => a.list_files(&o)?,
    };
    let mut l = l;
    let paged = !changes && r.page_bytes > 0;
    if paged {
        // Pages in tag id order (the order of their text too), each a
        // slice of one whole listing.
        if !r.page_after.is_empty() {
            let after = tag_id("page_after", &r.page_after)?;
            l.files.retain(|f| f.tag > after);
        }
        l.files.sort_by_key(|f| f.tag);
    }
    let (mut files, mut bytes, mut next_page_after) = (Vec::new(), 0u64, String::new());
    for f in &l.files {
        if paged && bytes >= r.page_bytes {
            next_page_after = files
                .last()
                .map(|m: &pb::FileVersion| m.tag_id.clone())
                .unwrap_or_default();
            break;
        }
        let mut m: pb::FileVersion = f.into();
        if r.with_images {
            m.image_record = o.domain.image_record(f)?.unwrap_or_default();
        }
        bytes += prost::Message::encoded_len(&m) as u64;
        files.push(m);
    }
    Ok(pb::ListFilesResponse {
        files,
        generation: l.generation,
        changes,
        removed_tag_ids,
        next_page_after,
    })
}

pub(super) fn set_file_image(
    a: &A,
    r: pb::SetFileImageRequest,
    rid: [u8; 16],
) -> Result<pb::SetFileImageResponse> {
    let o = a.domain(&r.domain)?;
    let tag = tag_id("tag_id", &r.tag_id)?;
    let image = (!r.image_id.is_empty()).then_some((r.image_id.as_str(), r.record.as_slice()));
    let meta = cairn_domain::catalog::NewFile {
        path: r.metafile_path.clone(),
        owner: r.metafile_owner.clone(),
        directory: false,
        request: r.request_id.clone(),
    };
    let metafile = (!r.metafile_path.is_empty()).then_some((&meta, r.metafile_data.as_slice()));
    let drop = r
        .drop_tag_ids
        .iter()
        .map(|t| tag_id("drop_tag_ids", t))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let change = cairn_domain::catalog::ImageChange {
        image,
        metafile,
        drop: &drop,
    };
    let (f, m) = a.set_file_image(&o, &tag, change, r.expect_generation, rid)?;
    Ok(pb::SetFileImageResponse {
        file: Some((&f).into()),
        metafile: m.as_ref().map(Into::into),
        changed: true,
    })
}

pub(super) fn delete_files(
    a: &A,
    r: pb::DeleteFilesRequest,
    rid: [u8; 16],
) -> Result<pb::DeleteFilesResponse> {
    let o = a.domain(&r.domain)?;
    let tags = r
        .tag_ids
        .iter()
        .map(|t| tag_id("tag_ids", t))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if tags.is_empty() {
        return Err(AgentError::invalid("tag_ids", "no file version named"));
    }
    let generation = a.delete_files(&o, &tags, r.expect_generation, rid)?;
    Ok(pb::DeleteFilesResponse {
        generation,
        deleted: true,
    })
}
