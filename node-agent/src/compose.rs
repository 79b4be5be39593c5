//! The agent's part of operations a coordinator composes: deleting a
//! snapshot by merging it into its child, swapping a disk onto a converted
//! copy, and recovering what dead hosts left on a domain.
//!
//! Each one changes image data first, in a way that keeps every guest
//! visible byte where it was (a crash there leaves the domain as it was,
//! and running the operation again finishes it), and then the metadata in
//! one transaction.

use std::sync::Arc;

use cairn_domain::layout::SlotState;
use cairn_domain::{
    Format, Legality, LockGuard, Tag, TagId, TagMeta, TagState, TagType, Volume, VolumeId,
    VolumeMeta,
};

use crate::agent::{Agent, Opened};
use crate::datapath::Progress;
use crate::error::{AgentError, Result};
use crate::jobs::{from_copy, open_direct, Job, Outcome};
use crate::qcow2;

/// How a snapshot is merged away (made once per merge; its size does not
/// matter).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum MergePlan {
    /// The snapshot is the base and its child the disk's top: the child's
    /// data is committed down into the snapshot's volume, which the child's
    /// tags then point at; the child's volume is freed.
    Commit {
        /// The snapshot's volume, which stays.
        snap: Volume,
        /// The child, freed.
        child: Volume,
        /// Tags on the child, moved to the snapshot's volume.
        child_tags: Vec<Tag>,
    },
    /// The snapshot's data is copied up into its child, which then hangs
    /// from the snapshot's parent; the snapshot's volume is freed.
    Rebase {
        /// The snapshot's volume, freed.
        snap: Volume,
        /// The child, rebased.
        child: Volume,
        /// The snapshot's parent tag and volume (none: the child becomes a
        /// base).
        parent: Option<(Tag, Volume)>,
    },
}

impl MergePlan {
    /// The volume that goes.
    pub fn freed(&self) -> &Volume {
        match self {
            MergePlan::Commit { child, .. } => child,
            MergePlan::Rebase { snap, .. } => snap,
        }
    }
}

/// Decide how to delete the snapshot `tag` (on volume `snap`), given the
/// domain's extent size, the volumes hanging from it, the tags on its one
/// child, and its parent.
pub fn plan_merge(
    extent_size: u64,
    tag: &Tag,
    snap: &Volume,
    children: &[Volume],
    child_tags: &[Tag],
    parent: Option<(Tag, Volume)>,
) -> Result<MergePlan> {
    if tag.tag_type != TagType::Weak {
        return Err(AgentError::precondition(format!(
            "tag {} is not a snapshot (a weak tag); delete a disk with DeleteDisk",
            tag.id
        )));
    }
    if snap.tag_refs > 1 {
        return Err(AgentError::precondition(format!(
            "volume {} of snapshot {} has other tags on it",
            snap.id, tag.id
        )));
    }
    let child = match children {
        [one] => one.clone(),
        [] => {
            return Err(AgentError::precondition(format!(
                "snapshot {} has no child to merge into",
                tag.id
            )))
        }
        many => {
            return Err(AgentError::precondition(format!(
                "snapshot {} has {} children (clones hang from it); delete or copy them first",
                tag.id,
                many.len()
            )))
        }
    };
    if let Some(bad) = [snap, &child]
        .into_iter()
        .find(|v| v.legality != Legality::Legal)
    {
        return Err(AgentError::precondition(format!(
            "volume {} is not legal",
            bad.id
        )));
    }
    let child_is_top = child_tags.iter().all(|t| t.child_refs == 0);
    let snap_holds_all = match snap.format {
        Format::Raw => true,
        Format::Qcow2 => snap.extent_count * extent_size >= qcow2::fully_allocated(snap.capacity),
    };
    if parent.is_none()
        && child_is_top
        && !child_tags.is_empty()
        && snap.capacity == child.capacity
        && snap_holds_all
    {
        return Ok(MergePlan::Commit {
            snap: snap.clone(),
            child,
            child_tags: child_tags.to_vec(),
        });
    }
    Ok(MergePlan::Rebase {
        snap: snap.clone(),
        child,
        parent,
    })
}

fn plan_child(p: &MergePlan) -> &Volume {
    match p {
        MergePlan::Commit { child, .. } | MergePlan::Rebase { child, .. } => child,
    }
}

impl Agent {
    /// Refuse when any of `vols` is active on this host.
    fn refuse_active(&self, o: &Opened, vols: &[VolumeId], what: &str) -> Result<()> {
        let links = o
            .run
            .links()
            .map_err(AgentError::io("reading the run directory"))?;
        if let Some(l) = links
            .iter()
            .find(|l| vols.iter().any(|v| v.to_string() == l.volume))
        {
            return Err(AgentError::InUse(format!(
                "volume {} is active under tag {}; deactivate it before {what}",
                l.volume, l.tag
            )));
        }
        Ok(())
    }

    /// Read what deleting snapshot `id` involves and plan it.
    pub fn plan_merge(&self, o: &Opened, id: &TagId) -> Result<MergePlan> {
        let t = o.domain.read_tag(id)?;
        let snap = o.domain.read_volume(&t.volume)?;
        let children: Vec<Volume> = o
            .domain
            .list_volumes()?
            .into_iter()
            .filter(|v| v.parent == Some(*id))
            .collect();
        let child_tags: Vec<Tag> = match children.as_slice() {
            [c] => o
                .domain
                .list_tags()?
                .into_iter()
                .filter(|x| x.volume == c.id)
                .collect(),
            _ => Vec::new(),
        };
        let parent = match snap.parent {
            Some(p) => {
                let pt = o.domain.read_tag(&p)?;
                let pv = o.domain.read_volume(&pt.volume)?;
                Some((pt, pv))
            }
            None => None,
        };
        let es = o.domain.geometry().extent_size;
        plan_merge(es, &t, &snap, &children, &child_tags, parent)
    }

    /// Delete snapshot `id` by merging it (see [`MergePlan`]), as a job.
    pub fn start_merge(
        self: &Arc<Self>,
        o: Arc<Opened>,
        id: &TagId,
        request_id: [u8; 16],
    ) -> Result<Arc<Job>> {
        // Refuse bad requests before a job exists.
        let plan = self.plan_merge(&o, id)?;
        self.refuse_active(&o, &[plan.freed().id], "merging")?;
        let id = *id;
        Ok(self.spawn_job("merge", move |a, p| a.merge(&o, &id, request_id, p)))
    }

    fn merge(
        &self,
        o: &Arc<Opened>,
        id: &TagId,
        request_id: [u8; 16],
        p: &Progress,
    ) -> Result<Outcome> {
        // Tags before volumes; each set sorted.
        let plan = self.plan_merge(o, id)?;
        let mut tag_ids = vec![*id];
        if let MergePlan::Commit { child_tags, .. } = &plan {
            tag_ids.extend(child_tags.iter().map(|t| t.id));
        }
        tag_ids.sort();
        let mut locks: Vec<LockGuard> = Vec::new();
        for t in &tag_ids {
            locks.push(o.domain.lock_tag(t)?);
        }
        let (snap, child) = match &plan {
            MergePlan::Commit { snap, child, .. } | MergePlan::Rebase { snap, child, .. } => {
                (snap.id, child.id)
            }
        };
        let mut vols = [snap, child];
        vols.sort();
        for v in &vols {
            locks.push(o.domain.lock_volume(v)?);
        }
        // Under the locks, the plan must still hold.
        let plan = self.plan_merge(o, id)?;
        self.refuse_active(o, &[plan.freed().id], "merging")?;
        let held: Vec<&LockGuard> = locks.iter().collect();
        // qemu-img works on the child's chain, activated under a scratch
        // directory (the images name their parents by volume id, which
        // resolves there).
        self.refuse_active(o, &[plan_child(&plan).id], "merging")?;
        let scratch = self.scratch_chain(o, plan_child(&plan))?;
        let child_path = scratch.path.display().to_string();
        let data = crate::jobs::fenced_while(&held, p, || match &plan {
            MergePlan::Rebase { child, parent, .. } => {
                let mut args = vec![
                    "-f".into(),
                    "qcow2".into(),
                    "-t".into(),
                    "none".into(),
                    "-T".into(),
                    "none".into(),
                ];
                match parent {
                    Some((_, pv)) => args.extend([
                        "-b".into(),
                        pv.id.to_string(),
                        "-F".into(),
                        pv.format.as_str().into(),
                    ]),
                    None => args.extend(["-b".into(), String::new()]),
                }
                args.push(child_path.clone());
                self.qemu
                    .with_progress("rebase", &args, child.capacity, p)
                    .map_err(from_copy("qemu-img rebase"))
            }
            MergePlan::Commit { child, .. } => self.mark_merging(o, id, &held).and_then(|()| {
                let args = vec![
                    "-f".into(),
                    "qcow2".into(),
                    "-t".into(),
                    "none".into(),
                    "-d".into(),
                    child_path.clone(),
                ];
                self.qemu
                    .with_progress("commit", &args, child.capacity, p)
                    .map_err(from_copy("qemu-img commit"))
            }),
        });
        drop(scratch);
        data?;
        o.domain
            .device()
            .flush()
            .map_err(AgentError::io("flushing"))?;
        // The disk the snapshot is of may ask for what goes to be wiped.
        let wipe = o
            .domain
            .read_tag(id)
            .ok()
            .and_then(|t| {
                let (_, d) = t
                    .options
                    .iter()
                    .find(|(k, _)| k == crate::agent::SNAP_KEY)?;
                TagId::parse("", d).ok()
            })
            .and_then(|d| o.domain.read_tag(&d).ok())
            .is_some_and(|d| crate::agent::wipes(&d));
        match plan {
            MergePlan::Rebase {
                snap,
                child,
                parent,
            } => {
                let meta = VolumeMeta {
                    parent: parent.as_ref().map(|(t, _)| t.id),
                    ..child.meta()
                };
                o.domain
                    .tx("merge snapshot: rebase")
                    .request_id(request_id)
                    .wipe_deleted(wipe)
                    .write_volume_meta(child.id, meta)
                    .delete_tag(*id)
                    .delete_volume(snap.id)
                    .held(&held)
                    .commit()?;
                tracing::info!(snapshot = %id, volume = %snap.id, into = %child.id, "snapshot merged (rebase)");
                merged_into(o, &child.id)
            }
            MergePlan::Commit {
                snap,
                child,
                child_tags,
            } => {
                let mut tx = o
                    .domain
                    .tx("merge snapshot: commit")
                    .request_id(request_id)
                    .wipe_deleted(wipe);
                for ct in &child_tags {
                    let mut m = ct.meta();
                    m.volume = cairn_domain::VolumeRef::Existing(snap.id);
                    tx = tx.change_tag(ct.id, m);
                }
                // The child goes before its parent tag can.
                tx.delete_volume(child.id)
                    .delete_tag(*id)
                    .held(&held)
                    .commit()?;
                tracing::info!(snapshot = %id, volume = %child.id, into = %snap.id, "snapshot merged (commit)");
                merged_into(o, &snap.id)
            }
        }
    }

    /// Before a commit changes the snapshot's data: mark its tag degraded,
    /// so that anyone looking during the merge (or after a crash in it)
    /// sees the snapshot is no longer a faithful copy.
    fn mark_merging(&self, o: &Opened, id: &TagId, held: &[&LockGuard]) -> Result<()> {
        let t = o.domain.read_tag(id)?;
        if t.state == TagState::Degraded {
            return Ok(());
        }
        let m = TagMeta {
            state: TagState::Degraded,
            ..t.meta()
        };
        o.domain
            .tx("merge snapshot: begin commit")
            .change_tag(*id, m)
            .held(held)
            .commit()?;
        Ok(())
    }

    /// Grow disk `tag`'s top volume `v` to `capacity` by moving it where
    /// there is room: a new volume (same format and parent) gets a byte
    /// copy of the old one's run and grows; then one transaction points
    /// the tag at it, with the new size, and frees the old volume. The
    /// copy is ILLEGAL until then, so a crash leaves the disk as it was.
    pub(crate) fn relocate_top(
        &self,
        o: &Opened,
        tag: &Tag,
        v: &Volume,
        capacity: u64,
        held: &[&LockGuard],
        request_id: [u8; 16],
    ) -> Result<Volume> {
        if v.tag_refs != 1 {
            return Err(AgentError::precondition(format!(
                "volume {} cannot grow in place and has other tags, so it cannot move",
                v.id
            )));
        }
        self.refuse_active(o, &[v.id], "moving it to grow the disk")?;
        let need = match v.format {
            Format::Raw => capacity,
            Format::Qcow2 => qcow2::fully_allocated(capacity),
        };
        let backing = match v.parent {
            Some(p) => {
                let pv = o.domain.read_volume(&o.domain.read_tag(&p)?.volume)?;
                Some((pv.id, pv.format))
            }
            None => None,
        };
        let spec = cairn_domain::VolumeSpec {
            format: v.format,
            capacity: v.capacity,
            size: need,
            allocation: v.allocation,
            parent: v.parent.map(cairn_domain::TagRef::Existing),
            legality: Legality::Illegal,
            description: v.description.clone(),
        };
        let (nv, g) = self.begin_volume(o, spec, backing, request_id)?;
        let moved = (|| -> Result<()> {
            let (from, to) = (o.extent(v), o.extent(&nv));
            // Skipped zero blocks must read as zeros in the new run.
            o.domain
                .device()
                .zero_range(to.offset, to.len)
                .map_err(AgentError::io("zeroing the new run"))?;
            let f = open_direct(&o.path, true)?;
            let len = match v.format {
                Format::Raw => v.capacity,
                Format::Qcow2 => from.len,
            };
            crate::datapath::copy_raw(
                crate::datapath::Region {
                    file: &f,
                    offset: from.offset,
                    len,
                },
                crate::datapath::Region {
                    file: &f,
                    offset: to.offset,
                    len: to.len,
                },
                &Progress::default(),
            )
            .map_err(from_copy("copying the volume"))?;
            if v.format == Format::Qcow2 {
                self.grow_qcow2(o, &nv, capacity)?;
            }
            o.domain
                .device()
                .flush()
                .map_err(AgentError::io("flushing"))
        })();
        if let Err(e) = moved {
            self.undo_create(o, &nv, &g);
            return Err(e);
        }
        let meta = VolumeMeta {
            capacity,
            legality: Legality::Legal,
            ..nv.meta()
        };
        let mut tm = tag.meta();
        tm.volume = cairn_domain::VolumeRef::Existing(nv.id);
        tm.size = capacity;
        let mut all = held.to_vec();
        all.push(&g);
        let r = o
            .domain
            .tx("extend volume: move")
            .request_id(request_id)
            .write_volume_meta(nv.id, meta)
            .change_tag(tag.id, tm)
            .delete_volume(v.id)
            .held(&all)
            .commit();
        if let Err(e) = r {
            self.undo_create(o, &nv, &g);
            return Err(e.into());
        }
        tracing::info!(tag = %tag.id, from = %v.id, to = %nv.id, capacity, "moved a disk's top to grow it");
        Ok(o.domain.read_volume(&nv.id)?)
    }

    /// Point disk `id` at the volume of tag `with`, delete `with`, and free
    /// the disk's old chain as far as nothing else references it, in one
    /// transaction. Returns the disk's tag and what was removed.
    pub fn swap_disk(
        &self,
        o: &Opened,
        id: &TagId,
        with: &TagId,
        request_id: [u8; 16],
    ) -> Result<(Tag, Vec<TagId>, Vec<VolumeId>)> {
        if id == with {
            return Err(AgentError::invalid("with_tag_id", "is the disk itself"));
        }
        let mut ids = [*id, *with];
        ids.sort();
        let l0 = o.domain.lock_tag(&ids[0])?;
        let l1 = o.domain.lock_tag(&ids[1])?;
        let d = o.domain.read_tag(id)?;
        let w = o.domain.read_tag(with)?;
        for (t, field) in [(&d, "tag_id"), (&w, "with_tag_id")] {
            if t.tag_type != TagType::Strong {
                return Err(AgentError::invalid(
                    field,
                    format!("tag {} is not strong", t.id),
                ));
            }
        }
        if d.volume == w.volume {
            return Err(AgentError::invalid(
                "with_tag_id",
                "points at the disk's own volume",
            ));
        }
        let nv = o.domain.read_volume(&w.volume)?;
        if nv.legality != Legality::Legal {
            return Err(AgentError::precondition(format!(
                "volume {} is not legal",
                nv.id
            )));
        }
        let (tags, vols) = self.plan_delete_disk(o, &d)?;
        self.refuse_active(o, &vols, "swapping the disk")?;
        let mut meta = d.meta();
        meta.volume = cairn_domain::VolumeRef::Existing(nv.id);
        meta.size = nv.capacity.max(d.size);
        let mut tx = o
            .domain
            .tx("swap disk")
            .request_id(request_id)
            .wipe_deleted(crate::agent::wipes(&d))
            .change_tag(*id, meta)
            .delete_tag(*with);
        // As DeleteDisk goes, with the disk's tag changed instead of gone.
        let mut vi = vols.iter();
        if let Some(v) = vi.next() {
            tx = tx.delete_volume(*v);
        }
        for t in &tags[1..] {
            tx = tx.delete_tag(*t);
            if let Some(v) = vi.next() {
                tx = tx.delete_volume(*v);
            }
        }
        tx.held(&[&l0, &l1]).commit()?;
        let mut removed = vec![*with];
        removed.extend_from_slice(&tags[1..]);
        Ok((o.domain.read_tag(id)?, removed, vols))
    }

    /// Recover the journals of dead hosts of the domain, then (when asked,
    /// or when a host was just recovered) remove volumes half made by hosts
    /// that are gone: ILLEGAL, untagged, written from a slot that is no
    /// longer held, or held by a later claim, and recovered at least the
    /// quarantine ago.
    /// Returns the slots recovered, intents rolled forward and back, and
    /// the volumes removed.
    pub fn recover_domain(
        &self,
        o: &Opened,
        collect_garbage: bool,
    ) -> Result<(Vec<u32>, u32, u32, Vec<VolumeId>)> {
        let reports = o.domain.recover_dead_hosts()?;
        // And wait for the slots other hosts are recovering.
        o.domain.barrier()?;
        let (mut fwd, mut back) = (0, 0);
        for (_, r) in &reports {
            fwd += r.forward.len() as u32;
            back += r.back.len() as u32;
        }
        let slots = reports.iter().map(|(s, _)| *s).collect();
        if !collect_garbage && reports.is_empty() {
            return Ok((slots, fwd, back, Vec::new()));
        }
        let headers = o.domain.read_slot_headers()?;
        let now = self.clock.now();
        let mut removed = Vec::new();
        for v in o.domain.list_volumes()? {
            if v.legality != Legality::Illegal || v.tag_refs != 0 {
                continue;
            }
            // Its writer is gone, and long enough ago: a host frozen at
            // its death could still wake and write into the volume for a
            // moment before it notices it lost its lease, so its extents
            // must not be anyone else's yet.
            let gone = match headers.get(v.writer_slot as usize) {
                Some(Ok(h)) => {
                    (h.state != SlotState::Active || h.token > v.token)
                        && now.saturating_sub(h.released_at) >= self.gc_quarantine.as_secs()
                }
                _ => false,
            };
            if !gone {
                continue;
            }
            match o.domain.delete_volume(&v.id, &[]) {
                Ok(()) => {
                    tracing::warn!(volume = %v.id, slot = v.writer_slot, "removed a volume a gone host half made");
                    removed.push(v.id);
                }
                Err(e) => {
                    tracing::warn!(volume = %v.id, error = %e, "could not remove a half-made volume")
                }
            }
        }
        Ok((slots, fwd, back, removed))
    }
}

/// What a merge answers: the volume the snapshot's data is in now.
fn merged_into(o: &Arc<Opened>, volume: &VolumeId) -> Result<Outcome> {
    Ok(Outcome::Volume {
        domain: o.clone(),
        volume: Box::new(o.domain.read_volume(volume)?),
        tag: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_domain::{Allocation, Strategy};

    const ES: u64 = 1 << 20;

    fn vol(id: u8, parent: Option<TagId>, format: Format, refs: u32) -> Volume {
        Volume {
            id: VolumeId::generate(id as u32),
            parent,
            format,
            capacity: 1 << 30,
            extent_start: 0,
            extent_count: match format {
                Format::Raw => 1 << 30,
                Format::Qcow2 => qcow2::fully_allocated(1 << 30),
            } / ES,
            legality: Legality::Legal,
            allocation: Allocation::Sparse,
            ctime: 0,
            description: String::new(),
            tag_refs: refs,
            generation: 1,
            token: 1,
            writer_slot: 0,
        }
    }

    fn tag(id: u8, v: &Volume, t: TagType, children: u32) -> Tag {
        Tag {
            id: TagId::generate(id as u32),
            volume: v.id,
            size: v.capacity,
            mutable: t == TagType::Strong,
            strategy: Strategy::Copy,
            options: vec![],
            tag_type: t,
            state: TagState::Optimized,
            ctime: 0,
            child_refs: children,
            user_data: cairn_domain::UserDataRef {
                half: 0,
                len: 0,
                crc: 0,
            },
            generation: 1,
            token: 1,
            writer_slot: 0,
        }
    }

    #[test]
    fn base_snapshot_under_the_top_is_committed_else_rebased() {
        let base = vol(1, None, Format::Raw, 1);
        let snap = tag(2, &base, TagType::Weak, 1);
        let top = vol(3, Some(snap.id), Format::Qcow2, 1);
        let disk = tag(4, &top, TagType::Strong, 0);
        let tops = std::slice::from_ref(&top);
        let p = plan_merge(ES, &snap, &base, tops, std::slice::from_ref(&disk), None).unwrap();
        assert!(matches!(p, MergePlan::Commit { .. }));
        assert_eq!(p.freed().id, top.id);
        // The child has its own snapshot hanging from it: rebase instead.
        let weak_on_top = tag(5, &top, TagType::Weak, 1);
        let p = plan_merge(ES, &snap, &base, tops, &[disk.clone(), weak_on_top], None).unwrap();
        assert!(matches!(p, MergePlan::Rebase { .. }));
        assert_eq!(p.freed().id, base.id);
        // A snapshot with a parent is rebased away.
        let mid = vol(6, Some(snap.id), Format::Qcow2, 1);
        let mid_tag = tag(7, &mid, TagType::Weak, 1);
        let top2 = vol(8, Some(mid_tag.id), Format::Qcow2, 1);
        let p = plan_merge(
            ES,
            &mid_tag,
            &mid,
            &[top2],
            std::slice::from_ref(&disk),
            Some((snap.clone(), base.clone())),
        )
        .unwrap();
        match p {
            MergePlan::Rebase { parent, .. } => assert_eq!(parent.unwrap().0.id, snap.id),
            other => panic!("{other:?}"),
        }
        // A grown child cannot be committed into a smaller base.
        let mut big = top.clone();
        big.capacity *= 2;
        let p = plan_merge(ES, &snap, &base, &[big], &[disk], None).unwrap();
        assert!(matches!(p, MergePlan::Rebase { .. }));
    }

    #[test]
    fn merge_refusals_name_the_reason() {
        let base = vol(1, None, Format::Raw, 1);
        let snap = tag(2, &base, TagType::Weak, 2);
        let a = vol(3, Some(snap.id), Format::Qcow2, 1);
        let b = vol(4, Some(snap.id), Format::Qcow2, 1);
        let e = plan_merge(ES, &snap, &base, &[a.clone(), b], &[], None).unwrap_err();
        assert!(e.to_string().contains("2 children"), "{e}");
        let e = plan_merge(ES, &snap, &base, &[], &[], None).unwrap_err();
        assert!(e.to_string().contains("no child"), "{e}");
        let strong = tag(5, &base, TagType::Strong, 1);
        let e = plan_merge(ES, &strong, &base, std::slice::from_ref(&a), &[], None).unwrap_err();
        assert!(e.to_string().contains("not a snapshot"), "{e}");
        let mut ill = a;
        ill.legality = Legality::Illegal;
        let e = plan_merge(ES, &snap, &base, &[ill], &[], None).unwrap_err();
        assert!(e.to_string().contains("not legal"), "{e}");
    }
}
