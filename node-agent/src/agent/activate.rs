//! Activation: a tag's chain as loop devices behind stable paths, and
//! scratch activations for jobs.

use super::*;
use crate::activation::Link;
use std::collections::BTreeSet;

impl Agent {
    /// The chain of a tag's volume, base first.
    pub fn chain(&self, o: &Opened, tag: &TagId) -> Result<Vec<Volume>> {
        let t = o.domain.read_tag(tag)?;
        let v = o.domain.read_volume(&t.volume)?;
        self.volume_chain(o, &v)
    }

    /// A volume's chain, base first.
    pub(crate) fn volume_chain(&self, o: &Opened, v: &Volume) -> Result<Vec<Volume>> {
        let mut out = vec![v.clone()];
        let mut cur = v.clone();
        while let Some(p) = cur.parent {
            if out.len() > 4096 {
                return Err(AgentError::precondition(format!(
                    "the chain of volume {} is longer than 4096 (a loop?)",
                    v.id
                )));
            }
            let t = o.domain.read_tag(&p)?;
            cur = o.domain.read_volume(&t.volume)?;
            out.push(cur.clone());
        }
        out.reverse();
        Ok(out)
    }

    pub(super) fn is_active(&self, o: &Opened, id: &VolumeId) -> Result<bool> {
        let name = id.to_string();
        Ok(self.live_links(o)?.iter().any(|l| l.volume == name))
    }

    /// Every link of the domain's run directory, after forgetting those of
    /// closing tags whose devices the kernel has let go.
    pub(super) fn live_links(&self, o: &Opened) -> Result<Vec<Link>> {
        let _g = self.act.lock().expect("poisoned");
        self.prune_closed(o)
    }

    /// Forget the links of closing tags whose devices are gone (their last
    /// opener closed them); the links left. The caller holds `act`.
    pub(super) fn prune_closed(&self, o: &Opened) -> Result<Vec<Link>> {
        let links = o
            .run
            .links()
            .map_err(AgentError::io("reading the run directory"))?;
        let mut tags: Vec<&str> = links.iter().map(|l| l.tag.as_str()).collect();
        tags.dedup();
        let closing: BTreeSet<String> = tags
            .into_iter()
            .filter(|t| o.run.closing(t))
            .map(str::to_string)
            .collect();
        if closing.is_empty() {
            return Ok(links);
        }
        let loops = self.domain_loops(o)?;
        let mut kept = Vec::new();
        for l in links {
            if !closing.contains(&l.tag) || self.device_lives(o, &l, &loops) {
                kept.push(l);
                continue;
            }
            tracing::info!(tag = %l.tag, volume = %l.volume, "a closing tag's device is gone");
            o.run
                .remove_link(&l.tag, &l.volume)
                .map_err(AgentError::io("removing a link"))?;
        }
        Ok(kept)
    }

    /// Whether the device of link `l` is still attached over its volume (when
    /// the volume cannot be read, any device of ours at that index counts:
    /// protection errs on the safe side).
    fn device_lives(&self, o: &Opened, l: &Link, loops: &[LoopInfo]) -> bool {
        let Some(i) = l.loop_index else {
            return false;
        };
        let at = VolumeId::parse("volume", &l.volume)
            .ok()
            .and_then(|v| o.domain.read_volume(&v).ok())
            .map(|v| o.extent(&v).offset);
        loops
            .iter()
            .any(|d| d.index == i && at.is_none_or(|off| d.offset == off))
    }

    /// Activate a tag's chain. Returns whether anything was set up.
    pub fn activate(&self, o: &Opened, tag: &TagId) -> Result<(Activation, bool)> {
        let chain = self.chain(o, tag)?;
        self.activate_chain(o, &tag.to_string(), &chain)
    }

    /// Activate `chain` (base first) under the directory `tname`.
    pub(super) fn activate_chain(
        &self,
        o: &Opened,
        tname: &str,
        chain: &[Volume],
    ) -> Result<(Activation, bool)> {
        if let Some(v) = chain.iter().find(|v| v.legality != Legality::Legal) {
            return Err(AgentError::precondition(format!(
                "volume {} of the chain is not legal",
                v.id
            )));
        }
        let _g = self.act.lock().expect("poisoned");
        let tname = tname.to_string();
        let links = self.prune_closed(o)?;
        if o.run.closing(&tname) {
            return Err(AgentError::InUse(format!(
                "tag {tname} is still closing: a process holds a device a forced deactivation let go; activate it again once that process has closed it"
            )));
        }
        let mut loops = self.domain_loops(o)?;
        let mut changed = false;
        let mut vols = Vec::new();
        for v in chain {
            let ext = o.extent(v);
            let vname = v.id.to_string();
            let dev = match loops
                .iter()
                .find(|d| d.offset == ext.offset && d.size == ext.len)
            {
                Some(d) => d.clone(),
                None => {
                    let d = self
                        .loops
                        .attach(&o.path, ext.offset, ext.len, &self.owner)
                        .map_err(AgentError::io(format!("attaching volume {vname}")))?;
                    loops.push(d.clone());
                    changed = true;
                    d
                }
            };
            let have = links
                .iter()
                .any(|l| l.tag == tname && l.volume == vname && l.loop_index == Some(dev.index));
            if !have {
                o.run
                    .set_link(&tname, &vname, &dev.device())
                    .map_err(AgentError::io(format!("linking volume {vname}")))?;
                changed = true;
            }
            vols.push(ActiveVolume {
                volume: v.id,
                path: o.run.path(&tname, &vname),
                device: dev.device(),
                format: v.format,
            });
        }
        let top = vols.last().expect("a chain has a volume").path.clone();
        Ok((
            Activation {
                domain: o.id(),
                tag: tname,
                path: top,
                volumes: vols,
                closing: false,
            },
            changed,
        ))
    }

    /// Take down a tag's activation. Refuses while its top is open by a
    /// process, or while another active tag's chain goes through its
    /// volume, unless forced. A forced one leaves the devices a process
    /// still holds to the kernel, which detaches them at their last close;
    /// until then their links stay (the tag is active and closing), so that
    /// no delete frees the extents under them.
    pub fn deactivate(&self, o: &Opened, tag: &TagId, force: bool) -> Result<Deactivated> {
        let top = o.domain.read_tag(tag).ok().map(|t| t.volume.to_string());
        self.deactivate_dir(o, &tag.to_string(), top, force)
    }

    /// Take down the activation directory `tname` whose top volume is `top`.
    pub(super) fn deactivate_dir(
        &self,
        o: &Opened,
        tname: &str,
        top: Option<String>,
        force: bool,
    ) -> Result<Deactivated> {
        let _g = self.act.lock().expect("poisoned");
        let links = self.prune_closed(o)?;
        let mine: Vec<_> = links.iter().filter(|l| l.tag == tname).collect();
        if mine.is_empty() {
            return Ok(Deactivated::default());
        }
        let was_closing = o.run.closing(tname);
        if !force {
            for l in &mine {
                let Some(i) = l.loop_index else { continue };
                let shared = links
                    .iter()
                    .any(|x| x.tag != tname && x.loop_index == Some(i));
                if !shared {
                    let who = self
                        .loops
                        .openers(i)
                        .map_err(AgentError::io("looking for openers"))?;
                    if !who.is_empty() {
                        return Err(AgentError::InUse(format!(
                            "volume {} is open by process(es) {who:?}",
                            l.volume
                        )));
                    }
                }
            }
            if let Some(top) = &top {
                if let Some(other) = links.iter().find(|x| x.tag != tname && &x.volume == top) {
                    return Err(AgentError::InUse(format!(
                        "volume {top} is needed by the active chain of tag {}",
                        other.tag
                    )));
                }
            }
        }
        // The devices no other tag's chain uses, detached.
        let own: Vec<&Link> = mine
            .iter()
            .copied()
            .filter(|l| {
                l.loop_index.is_some_and(|i| {
                    !links
                        .iter()
                        .any(|x| x.tag != tname && x.loop_index == Some(i))
                })
            })
            .collect();
        for l in &own {
            let i = l.loop_index.expect("filtered");
            self.loops
                .detach(i)
                .map_err(AgentError::io(format!("detaching loop{i}")))?;
        }
        // Held open, the kernel only marks a device to go at the last
        // close: its link stays and protects the volume.
        let loops = self.domain_loops(o)?;
        let mut still_open = Vec::new();
        for l in &mine {
            if own.contains(l) && self.device_lives(o, l, &loops) {
                still_open.push(format!("/dev/loop{}", l.loop_index.expect("filtered")));
                continue;
            }
            o.run
                .remove_link(&l.tag, &l.volume)
                .map_err(AgentError::io("removing a link"))?;
        }
        if !still_open.is_empty() {
            o.run
                .mark_closing(tname)
                .map_err(AgentError::io("marking a tag closing"))?;
            tracing::warn!(tag = tname, devices = ?still_open, "forced deactivation: devices stay until their processes close them; the volumes stay protected");
        }
        Ok(Deactivated {
            changed: !was_closing || still_open.len() < mine.len(),
            still_open,
        })
    }

    /// Make a volume's whole chain readable by qemu for a while: its
    /// volumes as loop devices under a private directory (`.job-<uuid>`),
    /// where the images' parent names resolve. Taken down when the guard
    /// goes (and at the next start if the agent dies first).
    pub(crate) fn scratch_chain<'a>(&'a self, o: &'a Opened, v: &Volume) -> Result<Scratch<'a>> {
        let chain = self.volume_chain(o, v)?;
        let dir = format!("{SCRATCH_PREFIX}{}", uuid::Uuid::new_v4());
        let (act, _) = self.activate_chain(o, &dir, &chain)?;
        Ok(Scratch {
            agent: self,
            o,
            dir,
            path: act.path,
            format: v.format,
        })
    }

    /// Remove scratch activations a dead agent left (no job runs yet).
    pub(super) fn remove_scratch(&self, o: &Opened) -> Result<()> {
        let links = o
            .run
            .links()
            .map_err(AgentError::io("reading the run directory"))?;
        let mut dirs: Vec<&str> = links
            .iter()
            .map(|l| l.tag.as_str())
            .filter(|t| t.starts_with(SCRATCH_PREFIX))
            .collect();
        dirs.dedup();
        for d in dirs {
            tracing::info!(
                dir = d,
                "removing a scratch activation left by a dead agent"
            );
            self.deactivate_dir(o, d, None, true)?;
        }
        Ok(())
    }

    /// Activations of one domain.
    pub fn activations(&self, o: &Opened) -> Result<Vec<Activation>> {
        let links = self.live_links(o)?;
        let mut by_tag: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for l in links {
            by_tag.entry(l.tag.clone()).or_default().push(l);
        }
        let mut out = Vec::new();
        for (tag, ls) in by_tag {
            // Order the chain as the domain knows it, when it still can.
            let order: Vec<Volume> = TagId::parse("tag", &tag)
                .ok()
                .and_then(|t| self.chain(o, &t).ok())
                .unwrap_or_default();
            let mut vols = Vec::new();
            for v in &order {
                let name = v.id.to_string();
                if let Some(l) = ls.iter().find(|l| l.volume == name) {
                    vols.push(ActiveVolume {
                        volume: v.id,
                        path: o.run.path(&tag, &name),
                        device: l
                            .loop_index
                            .map(|i| PathBuf::from(format!("/dev/loop{i}")))
                            .unwrap_or_default(),
                        format: v.format,
                    });
                }
            }
            let path = vols.last().map(|v| v.path.clone()).unwrap_or_default();
            let closing = o.run.closing(&tag);
            out.push(Activation {
                domain: o.id(),
                tag,
                path,
                volumes: vols,
                closing,
            });
        }
        Ok(out)
    }

    pub(super) fn resize_active(&self, o: &Opened, v: &Volume) -> Result<()> {
        let _g = self.act.lock().expect("poisoned");
        let ext = o.extent(v);
        for d in self.domain_loops(o)? {
            if d.offset == ext.offset && d.size != ext.len {
                self.loops
                    .resize(d.index, ext.len)
                    .map_err(AgentError::io("resizing a loop device"))?;
            }
        }
        Ok(())
    }
}
