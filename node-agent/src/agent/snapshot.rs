//! Snapshots: a new qcow2 layer on a weak tag, the disk's tag moved onto
//! it, and optionally a thin clone, in one transaction.

use super::validate::*;
use super::volumes::qcow2_init;
use super::*;

impl Agent {
    /// Snapshot a disk: a weak tag on the current top, a new qcow2 volume
    /// on it, and the disk's tag moved to the new volume, atomically as far
    /// as anyone reading the domain can tell.
    pub fn snapshot(
        &self,
        o: &Opened,
        disk: &TagId,
        spec: SnapshotSpec,
        clone: Option<&TagSpec>,
        request_id: [u8; 16],
    ) -> Result<Snapshot> {
        let SnapshotSpec {
            description,
            size,
            options,
        } = spec;
        validate_description(&description)?;
        if let Some((k, _)) = options
            .iter()
            .find(|(k, _)| k == SNAP_KEY || k == SNAP_DESC_KEY)
        {
            return Err(AgentError::invalid(
                "snapshot_options",
                format!("{k} is set by the agent"),
            ));
        }
        if let Some(c) = clone {
            validate_tag_spec(c)?;
            if c.tag_type != TagType::Strong {
                return Err(AgentError::invalid("clone", "a clone's tag must be strong"));
            }
        }
        // Planned from unlocked reads; the transaction takes the disk's
        // tag lock with the others in one go and goes on only if the tag
        // is still as read (else read again).
        let mut tries = 0;
        let mut out = loop {
            tries += 1;
            let t = o.domain.read_tag(disk)?;
            if t.tag_type != TagType::Strong || !t.mutable {
                return Err(AgentError::precondition(format!(
                    "tag {disk} is not a disk (a strong, mutable tag)"
                )));
            }
            let top = o.domain.read_volume(&t.volume)?;
            if top.legality != Legality::Legal {
                return Err(AgentError::precondition(format!(
                    "the disk's volume {} is not legal",
                    top.id
                )));
            }
            let size = if size == 0 {
                qcow2::fully_allocated(top.capacity)
            } else {
                size
            };
            let weak = TagMeta {
                volume: VolumeRef::Existing(top.id),
                size: t.size,
                mutable: false,
                strategy: t.strategy,
                options: std::iter::once((SNAP_KEY.into(), disk.to_string()))
                    .chain((!description.is_empty()).then(|| {
                        (
                            SNAP_DESC_KEY.into(),
                            clip(&description, limits::MAX_DESCRIPTION).to_string(),
                        )
                    }))
                    .chain(options.iter().cloned())
                    .collect(),
                tag_type: TagType::Weak,
                state: TagState::Optimized,
            };
            let spec = VolumeSpec {
                format: Format::Qcow2,
                capacity: top.capacity,
                size,
                allocation: Allocation::Sparse,
                parent: Some(TagRef::New(0)),
                legality: Legality::Legal,
                description: description.clone(),
            };
            let es = o.domain.geometry().extent_size;
            let (zero, pages) = qcow2_init(
                top.capacity,
                size.div_ceil(es) * es,
                Some((top.id, top.format)),
            )?;
            let mut moved = t.meta();
            moved.volume = VolumeRef::New(0);
            // One transaction: the weak tag, the new volume with its image
            // metadata, and the disk's tag moved onto it (and the clone's
            // volume and tag beside it).
            let clone_layer = clone.map(|c| {
                let spec = VolumeSpec {
                    description: format!("clone of {disk}"),
                    ..spec.clone()
                };
                (
                    spec,
                    pages.clone(),
                    tag_meta(c, VolumeRef::New(1), top.capacity),
                )
            });
            let mut tx = o
                .domain
                .tx("snapshot")
                .request_id(request_id)
                .create_tag(weak)
                .create_volume(spec)
                .init_volume_data(VolumeRef::New(0), zero, pages)
                .change_tag(*disk, moved);
            if let Some((spec, pages, tag)) = clone_layer {
                tx = tx
                    .create_volume(spec)
                    .init_volume_data(VolumeRef::New(1), zero, pages)
                    .create_tag(tag);
            }
            match tx.expect_tag(&t).commit() {
                Err(DomainError::Changed(why)) if tries < 8 => {
                    tracing::debug!(disk = %disk, %why, "disk changed while planning its snapshot");
                }
                r => break r?,
            }
        };
        let vol = out.volumes.remove(0);
        let parent_tag = out.tags.remove(0);
        let clone = match clone {
            Some(_) => Some((out.volumes.remove(0), out.tags.remove(0))),
            None => None,
        };
        // A running VM needs the new top under its disk's directory.
        if o.run.tag_dir(&disk.to_string()).exists() {
            self.activate(o, disk)?;
        }
        Ok(Snapshot {
            volume: vol,
            parent_tag,
            tag: o.domain.read_tag(disk)?,
            clone,
        })
    }
}
