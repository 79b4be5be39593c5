//! At start: half-made volumes of this host removed, scratch activations
//! of jobs that died taken down, activations reconciled with the domain.

use super::*;

impl Agent {
    /// Illegal volumes that no tag reaches, last written by this host, are
    /// what a crash between the two steps of a create left; remove them, and
    /// then weak tags of this host that nothing hangs from any more.
    pub(super) fn remove_half_made(&self, o: &Opened) -> Result<()> {
        let Some(slot) = o.domain.slot() else {
            return Ok(());
        };
        for v in o.domain.list_volumes()? {
            if v.legality == Legality::Illegal && v.tag_refs == 0 && v.writer_slot as u32 == slot {
                tracing::warn!(volume = %v.id, "removing a half-made volume");
                o.domain.delete_volume(&v.id, &[])?;
            }
        }
        for t in o.domain.list_tags()? {
            if t.tag_type == TagType::Weak && t.child_refs == 0 && t.writer_slot as u32 == slot {
                let v = o.domain.read_volume(&t.volume)?;
                if v.legality == Legality::Illegal || t.options.iter().any(|(k, _)| k == SNAP_KEY) {
                    tracing::warn!(tag = %t.id, "removing a snapshot tag nothing hangs from");
                    o.domain.delete_tag(&t.id, &[])?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn domain_loops(&self, o: &Opened) -> Result<Vec<LoopInfo>> {
        Ok(self
            .loops
            .list()
            .map_err(AgentError::io("listing loop devices"))?
            .into_iter()
            .filter(|l| l.backing == o.path && l.owner == self.owner)
            .collect())
    }

    /// Bring the run directory and loop devices of a domain in line with
    /// the domain: links of deleted volumes go, devices nothing links go,
    /// links to vanished devices get new ones.
    pub fn reconcile(&self, o: &Opened) -> Result<Vec<Fix>> {
        let _g = self.act.lock().expect("poisoned");
        // A closing tag's links whose devices went while we were down are
        // gone for good, not activations to set up again.
        let links = self.prune_closed(o)?;
        let loops = self.domain_loops(o)?;
        let mut vols = BTreeMap::new();
        for l in &links {
            if vols.contains_key(&l.volume) {
                continue;
            }
            let ext = match VolumeId::parse("volume", &l.volume) {
                Ok(id) => match o.domain.read_volume(&id) {
                    Ok(v) => Some(o.extent(&v)),
                    Err(DomainError::NotFound { .. }) => None,
                    Err(e) => return Err(e.into()),
                },
                Err(_) => None,
            };
            vols.insert(l.volume.clone(), ext);
        }
        let fixes = plan_reconcile(&links, &loops, &vols);
        for f in &fixes {
            tracing::info!(fix = ?f, domain = %o.name(), "reconciling activations");
            match f {
                Fix::RemoveLink { tag, volume } => o
                    .run
                    .remove_link(tag, volume)
                    .map_err(AgentError::io("removing a stale link"))?,
                Fix::Attach { volume, tags } => {
                    let ext = vols[volume].expect("planned for live volumes");
                    let d = self
                        .loops
                        .attach(&o.path, ext.offset, ext.len, &self.owner)
                        .map_err(AgentError::io("attaching a loop device"))?;
                    for t in tags {
                        o.run
                            .set_link(t, volume, &d.device())
                            .map_err(AgentError::io("linking"))?;
                    }
                }
                Fix::Relink {
                    tag,
                    volume,
                    loop_index,
                } => o
                    .run
                    .set_link(tag, volume, Path::new(&format!("/dev/loop{loop_index}")))
                    .map_err(AgentError::io("linking"))?,
                Fix::Resize { loop_index, len } => self
                    .loops
                    .resize(*loop_index, *len)
                    .map_err(AgentError::io("resizing a loop device"))?,
                Fix::Detach { loop_index } => {
                    let who = self.loops.openers(*loop_index).unwrap_or_default();
                    if who.is_empty() {
                        self.loops
                            .detach(*loop_index)
                            .map_err(AgentError::io("detaching a loop device"))?;
                    } else {
                        tracing::warn!(loop_index, ?who, "unlinked device is open; left attached");
                    }
                }
            }
        }
        Ok(fixes)
    }
}
