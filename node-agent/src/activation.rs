//! Activation: loop devices over volumes' extent runs behind stable paths.
//!
//! The state is what the kernel and the run directory say, nothing else:
//! `<run>/<domain-id>/<tag-id>/<volume-id>` is a symlink to `/dev/loopN`,
//! and loop N's backing file, offset and size name the volume's run. An
//! agent that restarts reads both back and reconciles them with the domain,
//! so there is no state file to lose or to disagree with.
//!
//! A qcow2 volume names its parent by volume id, relative to its own
//! directory; a tag's directory therefore holds a link for every volume of
//! its chain, and qemu resolves the backing chain through it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use crate::loopdev::LoopInfo;

/// A link found in the run directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Link {
    /// Tag directory name.
    pub tag: String,
    /// Volume (the link's name).
    pub volume: String,
    /// Loop device index the link points at, if it names one.
    pub loop_index: Option<u32>,
}

/// Where a volume lives on the domain device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset of the run.
    pub offset: u64,
    /// Bytes of the run.
    pub len: u64,
}

/// One step of reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    /// Remove a link (its volume is gone).
    RemoveLink {
        /// Tag directory.
        tag: String,
        /// Volume.
        volume: String,
    },
    /// Attach a device for a volume and point these links at it.
    Attach {
        /// Volume.
        volume: String,
        /// Tag directories whose link must point at the new device.
        tags: Vec<String>,
    },
    /// Point a link at an existing device.
    Relink {
        /// Tag directory.
        tag: String,
        /// Volume.
        volume: String,
        /// Device.
        loop_index: u32,
    },
    /// Change a device's size to its volume's run.
    Resize {
        /// Device.
        loop_index: u32,
        /// New size.
        len: u64,
    },
    /// Detach a device no link needs.
    Detach {
        /// Device.
        loop_index: u32,
    },
}

/// Decide how to bring the run directory and loop devices of one domain in
/// line with the domain. `volumes` maps every linked volume to its run, or
/// to `None` when it no longer exists. `loops` are the devices over this
/// domain's device. Pure: no I/O.
pub fn plan_reconcile(
    links: &[Link],
    loops: &[LoopInfo],
    volumes: &BTreeMap<String, Option<Extent>>,
) -> Vec<Fix> {
    let mut fixes = Vec::new();
    let by_index: BTreeMap<u32, &LoopInfo> = loops.iter().map(|l| (l.index, l)).collect();
    let mut used: BTreeSet<u32> = BTreeSet::new();
    // Volume -> device chosen for it (one device per volume).
    let mut chosen: BTreeMap<&str, u32> = BTreeMap::new();
    let mut need_attach: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for l in links {
        let Some(Some(ext)) = volumes.get(&l.volume) else {
            fixes.push(Fix::RemoveLink {
                tag: l.tag.clone(),
                volume: l.volume.clone(),
            });
            continue;
        };
        // The device the link names, if it still covers the volume's run.
        let good = l
            .loop_index
            .and_then(|i| by_index.get(&i))
            .filter(|d| d.offset == ext.offset);
        let pick = chosen.get(l.volume.as_str()).copied().or_else(|| {
            good.map(|d| d.index).or_else(|| {
                loops
                    .iter()
                    .find(|d| d.offset == ext.offset && d.size == ext.len)
                    .map(|d| d.index)
            })
        });
        match pick {
            Some(i) => {
                if chosen.insert(l.volume.as_str(), i).is_none() {
                    let d = by_index[&i];
                    if d.size != ext.len {
                        fixes.push(Fix::Resize {
                            loop_index: i,
                            len: ext.len,
                        });
                    }
                }
                used.insert(i);
                if l.loop_index != Some(i) {
                    fixes.push(Fix::Relink {
                        tag: l.tag.clone(),
                        volume: l.volume.clone(),
                        loop_index: i,
                    });
                }
            }
            None => need_attach
                .entry(l.volume.as_str())
                .or_default()
                .push(l.tag.clone()),
        }
    }
    for (volume, tags) in need_attach {
        fixes.push(Fix::Attach {
            volume: volume.to_string(),
            tags,
        });
    }
    for d in loops {
        if !used.contains(&d.index) {
            fixes.push(Fix::Detach {
                loop_index: d.index,
            });
        }
    }
    fixes
}

/// The run directory of one domain.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// `<run>/<domain-id>`.
    pub root: PathBuf,
}

impl RunDir {
    /// The directory of a tag.
    pub fn tag_dir(&self, tag: &str) -> PathBuf {
        self.root.join(tag)
    }

    /// The stable path of a volume in a tag's directory.
    pub fn path(&self, tag: &str, volume: &str) -> PathBuf {
        self.root.join(tag).join(volume)
    }

    /// Every link, sorted.
    pub fn links(&self) -> io::Result<Vec<Link>> {
        let mut out = Vec::new();
        let tags = match std::fs::read_dir(&self.root) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for t in tags {
            let t = t?;
            if !t.file_type()?.is_dir() {
                continue;
            }
            let tag = t.file_name().to_string_lossy().into_owned();
            for v in std::fs::read_dir(t.path())? {
                let v = v?;
                if !v.file_type()?.is_symlink() {
                    continue;
                }
                let volume = v.file_name().to_string_lossy().into_owned();
                let loop_index = std::fs::read_link(v.path())
                    .ok()
                    .and_then(|p| p.to_str()?.strip_prefix("/dev/loop")?.parse::<u32>().ok());
                out.push(Link {
                    tag: tag.clone(),
                    volume,
                    loop_index,
                });
            }
        }
        out.sort();
        Ok(out)
    }

    /// Point `<tag>/<volume>` at a device, atomically (symlink + rename).
    pub fn set_link(&self, tag: &str, volume: &str, device: &Path) -> io::Result<()> {
        let dir = self.tag_dir(tag);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{volume}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(device, &tmp)?;
        std::fs::rename(&tmp, dir.join(volume))
    }

    /// Whether tag `tag` is closing: a forced deactivation left devices
    /// that a process still held open (its links stay, protecting the
    /// volumes, until the kernel lets the devices go).
    pub fn closing(&self, tag: &str) -> bool {
        self.tag_dir(tag).join(CLOSING).exists()
    }

    /// Mark tag `tag` closing.
    pub fn mark_closing(&self, tag: &str) -> io::Result<()> {
        std::fs::write(self.tag_dir(tag).join(CLOSING), b"")
    }

    /// Remove a link; removes the tag directory (and its closing mark)
    /// once no link is left.
    pub fn remove_link(&self, tag: &str, volume: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(tag, volume)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let dir = self.tag_dir(tag);
        let linked = std::fs::read_dir(&dir).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
        });
        if !linked {
            let _ = std::fs::remove_file(dir.join(CLOSING));
            let _ = std::fs::remove_dir(&dir);
        }
        Ok(())
    }
}

/// The mark of a closing tag's directory (a regular file: links are
/// symbolic links).
const CLOSING: &str = ".closing";

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(index: u32, offset: u64, size: u64) -> LoopInfo {
        LoopInfo {
            index,
            backing: "/d".into(),
            offset,
            size,
            direct_io: true,
            owner: "cairn:x".into(),
        }
    }

    fn relink(tag: &str, volume: &str, loop_index: u32) -> Fix {
        Fix::Relink {
            tag: tag.into(),
            volume: volume.into(),
            loop_index,
        }
    }

    /// The fixes for `links` and `loops` when the domain's volumes are `v`.
    fn plan(links: &[Link], loops: &[LoopInfo], v: &[(&str, Option<(u64, u64)>)]) -> Vec<Fix> {
        plan_reconcile(links, loops, &vols(v))
    }

    /// The volumes of the domain: a name and its run, or gone.
    fn vols(v: &[(&str, Option<(u64, u64)>)]) -> BTreeMap<String, Option<Extent>> {
        v.iter()
            .map(|&(n, run)| {
                (
                    n.to_string(),
                    run.map(|(offset, len)| Extent { offset, len }),
                )
            })
            .collect()
    }

    fn link(tag: &str, volume: &str, i: Option<u32>) -> Link {
        Link {
            tag: tag.into(),
            volume: volume.into(),
            loop_index: i,
        }
    }

    #[test]
    fn consistent_state_needs_nothing() {
        let links = [link("t", "a", Some(0)), link("t", "b", Some(1))];
        let loops = [dev(0, 100, 10), dev(1, 200, 10)];
        let vols = vols(&[("a", Some((100, 10))), ("b", Some((200, 10)))]);
        assert!(plan_reconcile(&links, &loops, &vols).is_empty());
    }

    #[test]
    fn gone_volume_loses_link_and_device() {
        let want = vec![
            Fix::RemoveLink {
                tag: "t".into(),
                volume: "b".into(),
            },
            Fix::Detach { loop_index: 1 },
        ];
        let links = [link("t", "a", Some(0)), link("t", "b", Some(1))];
        let loops = [dev(0, 100, 10), dev(1, 200, 10)];
        assert_eq!(
            plan(&links, &loops, &[("a", Some((100, 10))), ("b", None)]),
            want
        );
    }

    #[test]
    fn orphan_device_is_detached_and_missing_device_attached() {
        // Device 5 is over nothing linked (a crash between attach and link);
        // link to a vanished device 7 needs a new device.
        let want = vec![
            Fix::Attach {
                volume: "a".into(),
                tags: vec!["t".into()],
            },
            Fix::Detach { loop_index: 5 },
        ];
        let links = [link("t", "a", Some(7))];
        let loops = [dev(5, 900, 10)];
        assert_eq!(plan(&links, &loops, &[("a", Some((100, 10)))]), want);
    }

    #[test]
    fn shared_volume_uses_one_device_and_grown_run_resizes() {
        let want = vec![
            Fix::Resize {
                loop_index: 0,
                len: 20,
            },
            relink("t2", "a", 0),
            Fix::Detach { loop_index: 3 },
        ];
        let links = [link("t1", "a", Some(0)), link("t2", "a", Some(3))];
        let loops = [dev(0, 100, 10), dev(3, 100, 10)];
        assert_eq!(plan(&links, &loops, &[("a", Some((100, 20)))]), want);
    }

    #[test]
    fn link_to_device_of_another_run_is_repointed() {
        // The volume was deleted and its slot's id reused is impossible (ids
        // are random), but a device reused by the kernel for another run
        // must not be trusted.
        let links = [link("t", "a", Some(0))];
        let loops = [dev(0, 500, 10), dev(1, 100, 10)];
        let want = vec![relink("t", "a", 1), Fix::Detach { loop_index: 0 }];
        assert_eq!(plan(&links, &loops, &[("a", Some((100, 10)))]), want);
    }
}
