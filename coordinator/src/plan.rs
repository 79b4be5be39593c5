//! What the coordinator decides, without any I/O: which agent does the
//! work, what a disk looks like from a domain's tags and volumes, and
//! which step a job takes next. The async layers only fetch the inputs and
//! carry out the answers.

use std::collections::{HashMap, HashSet};

use cairn_domain::{TagId, TagType, VolumeId};
use serde::{Deserialize, Serialize};

use crate::error::{CoordError, Result};

pub use cairn_proto::keys::{
    CLONE_OF as CLONE_OF_KEY, CONVERT_OF as CONVERT_KEY, JOB as JOB_KEY, NAME as NAME_KEY,
    OWNER as OWNER_KEY, SNAPSHOT_DESCRIPTION as SNAP_DESC_KEY, SNAPSHOT_OF as SNAP_KEY,
    WIPE_AFTER_DELETE as WIPE_KEY,
};

/// A domain as agents report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRef {
    /// Its id.
    pub id: uuid::Uuid,
    /// Its name.
    pub name: String,
}

/// A node agent the coordinator can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Host id (the registry key).
    pub host_id: String,
    /// Host name.
    pub host_name: String,
    /// `http://host:port` or a unix socket path.
    pub address: String,
    /// Domains it has open.
    pub domains: Vec<DomainRef>,
    /// The agent process's id, new at every start (empty when unknown).
    pub instance: String,
    /// Its host slot on each domain, and the slot lock's fencing token:
    /// while that token holds the slot, the process may still write.
    pub slots: Vec<HostSlot>,
}

/// An agent's host slot on a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct HostSlot {
    /// The domain.
    #[serde(rename = "id")]
    pub domain: uuid::Uuid,
    /// The slot.
    #[serde(rename = "host_slot")]
    pub slot: u32,
    /// The fencing token of its lock.
    #[serde(rename = "host_slot_token")]
    pub token: u64,
}

impl AgentInfo {
    /// Whether it sees `domain`.
    pub fn sees(&self, domain: &uuid::Uuid) -> bool {
        self.domains.iter().any(|d| d.id == *domain)
    }
}

#[derive(Deserialize)]
struct Registration {
    host_id: String,
    #[serde(default)]
    host_name: String,
    address: Option<String>,
    #[serde(default)]
    domains: Vec<DomainRef>,
    #[serde(default)]
    instance: String,
}

#[derive(Deserialize)]
struct Slots {
    #[serde(default)]
    domains: Vec<HostSlot>,
}

/// Read an agent's registry entry (`cairn/agents/<host id>`). Agents that
/// listen only on a unix socket register no address and are skipped.
pub fn parse_registration(value: &str) -> Option<AgentInfo> {
    let r: Registration = serde_json::from_str(value).ok()?;
    // Older agents registered no slot tokens.
    let slots = serde_json::from_str::<Slots>(value)
        .map(|s| s.domains)
        .unwrap_or_default();
    Some(AgentInfo {
        host_id: r.host_id,
        host_name: r.host_name,
        address: r.address?,
        domains: r.domains,
        instance: r.instance,
        slots,
    })
}

/// Find a domain by name or id among what agents see; empty picks the
/// only one.
pub fn resolve_domain(agents: &[AgentInfo], key: &str) -> Result<DomainRef> {
    let mut all: Vec<&DomainRef> = agents.iter().flat_map(|a| a.domains.iter()).collect();
    all.sort_by_key(|d| d.id);
    all.dedup_by_key(|d| d.id);
    if key.is_empty() {
        return match all.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(CoordError::NoAgent("(any)".into())),
            _ => Err(CoordError::invalid(
                "domain",
                "the cluster has several domains; name one",
            )),
        };
    }
    let by_id = uuid::Uuid::parse_str(key).ok();
    let found: Vec<&&DomainRef> = all
        .iter()
        .filter(|d| Some(d.id) == by_id || d.name == key)
        .collect();
    match found.as_slice() {
        [one] => Ok((**one).clone()),
        [] => Err(CoordError::NotFound {
            kind: "domain",
            id: key.to_string(),
        }),
        _ => Err(CoordError::invalid(
            "domain",
            format!(
                "several domains are named {}; use the id",
                cairn_domain::limits::quote(key)
            ),
        )),
    }
}

/// Pick the agent for an operation on `domain` (and `also`, a second
/// domain it must see): among those that see it and are not excluded, the
/// least loaded; ties are broken by `spread` so that equal agents share
/// the work.
pub fn pick_agent<'a>(
    agents: &'a [AgentInfo],
    domain: &uuid::Uuid,
    also: Option<&uuid::Uuid>,
    load: &HashMap<String, usize>,
    exclude: &HashSet<String>,
    spread: u64,
) -> Option<&'a AgentInfo> {
    let mut c: Vec<&AgentInfo> = agents
        .iter()
        .filter(|a| a.sees(domain) && also.is_none_or(|d| a.sees(d)))
        .filter(|a| !exclude.contains(&a.host_id))
        .collect();
    if c.is_empty() {
        return None;
    }
    c.sort_by(|a, b| a.host_id.cmp(&b.host_id));
    let least = c
        .iter()
        .map(|a| load.get(&a.host_id).copied().unwrap_or(0))
        .min()
        .unwrap_or(0);
    let best: Vec<&AgentInfo> = c
        .into_iter()
        .filter(|a| load.get(&a.host_id).copied().unwrap_or(0) == least)
        .collect();
    Some(best[(spread % best.len() as u64) as usize])
}

pub use cairn_domain::api::{TagInfo, VolumeInfo};

/// One layer of a disk's chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// The volume.
    pub volume: VolumeInfo,
    /// The snapshot on it, if any.
    pub snapshot: Option<TagId>,
}

/// A snapshot of a disk.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapView {
    /// The weak tag.
    pub tag: TagInfo,
    /// Its volume's description.
    pub description: String,
    /// Volumes of other disks hanging from it.
    pub clones: u32,
}

/// A disk: a strong tag and its chain.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskView {
    /// Its domain.
    pub domain: DomainRef,
    /// The tag.
    pub tag: TagInfo,
    /// Base first.
    pub chain: Vec<Layer>,
    /// Oldest first.
    pub snapshots: Vec<SnapView>,
}

/// Build the view of disk `disk` from every tag and volume of its domain.
pub fn disk_view(
    domain: &DomainRef,
    disk: &TagId,
    tags: &[TagInfo],
    vols: &[VolumeInfo],
) -> Result<DiskView> {
    let t = tags
        .iter()
        .find(|t| t.id == *disk && t.tag_type == TagType::Strong && !in_catalog(t))
        .ok_or_else(|| CoordError::NotFound {
            kind: "disk",
            id: disk.to_string(),
        })?;
    let vol = |id: &VolumeId| vols.iter().find(|v| v.id == *id);
    let tag = |id: &TagId| tags.iter().find(|t| t.id == *id);
    let mut chain = Vec::new();
    let mut cur = vol(&t.volume).ok_or_else(|| {
        CoordError::Internal(format!(
            "disk {disk} points at a missing volume {}",
            t.volume
        ))
    })?;
    let mut snapshots = Vec::new();
    loop {
        if chain.len() > 4096 {
            return Err(CoordError::Internal(format!(
                "the chain of disk {disk} loops"
            )));
        }
        let snap = tags
            .iter()
            .find(|x| x.volume == cur.id && x.tag_type == TagType::Weak)
            .filter(|x| x.option(SNAP_KEY).is_some() || x.child_refs > 0);
        chain.push(Layer {
            volume: cur.clone(),
            snapshot: snap.map(|s| s.id),
        });
        if let Some(s) = snap {
            // Children beyond the one in this chain are other disks.
            let in_chain = usize::from(chain.len() > 1);
            snapshots.push(SnapView {
                tag: s.clone(),
                description: s
                    .option(SNAP_DESC_KEY)
                    .unwrap_or(&cur.description)
                    .to_string(),
                clones: s.child_refs.saturating_sub(in_chain as u32),
            });
        }
        let Some(p) = cur.parent else { break };
        let pt = tag(&p).ok_or_else(|| {
            CoordError::Internal(format!("volume {} names a missing parent tag {p}", cur.id))
        })?;
        cur = vol(&pt.volume).ok_or_else(|| {
            CoordError::Internal(format!("tag {p} points at a missing volume {}", pt.volume))
        })?;
    }
    chain.reverse();
    snapshots.reverse();
    // Snapshots of another disk (this one is a clone of it) are not ours.
    snapshots.retain(|s| s.tag.option(SNAP_KEY).is_none_or(|d| d == disk.to_string()));
    Ok(DiskView {
        domain: domain.clone(),
        tag: t.clone(),
        chain,
        snapshots,
    })
}

/// Every disk of a domain (a conversion's copy in progress is not one).
pub fn disks(domain: &DomainRef, tags: &[TagInfo], vols: &[VolumeInfo]) -> Vec<DiskView> {
    tags.iter()
        .filter(|t| t.tag_type == TagType::Strong && t.option(CONVERT_KEY).is_none())
        .filter(|t| !in_catalog(t))
        .filter_map(|t| disk_view(domain, &t.id, tags, vols).ok())
        .collect()
}

/// Whether a tag is the catalog's (a file version or a domain's anchor):
/// not a disk or snapshot, changed only through the catalog's calls.
pub fn in_catalog(t: &TagInfo) -> bool {
    t.option(cairn_domain::catalog::KIND).is_some()
}

/// Who owns tag `id`, from every tag of its domain: a disk's owner is its
/// `cairn.owner`, a snapshot's the owner of the disk it is of (none when
/// that disk is gone or has no owner; an unknown tag has none).
pub fn owner_of<'a>(id: &TagId, tags: &'a [TagInfo]) -> Option<&'a str> {
    let t = tags.iter().find(|t| t.id == *id && !in_catalog(t))?;
    match t.tag_type {
        TagType::Strong => t.option(OWNER_KEY),
        TagType::Weak => {
            let disk = TagId::parse("", t.option(SNAP_KEY)?).ok()?;
            tags.iter()
                .find(|d| d.id == disk && d.tag_type == TagType::Strong)
                .and_then(|d| d.option(OWNER_KEY))
        }
    }
}

/// Volumes nothing reaches, as the leader saw them: by domain and volume,
/// the generation seen and when it was first seen so (seconds).
pub type Unreached = HashMap<(uuid::Uuid, VolumeId), (u64, u64)>;

/// The volumes of domain `domain` to reclaim now: complete volumes that no
/// tag points at (so no child hangs from them either) and that stayed so,
/// unchanged, for `quarantine` seconds. `seen` is updated: volumes reached
/// again, gone or changed start over. Half-made (ILLEGAL) volumes are the
/// agent's to collect.
pub fn reclaimable(
    seen: &mut Unreached,
    domain: uuid::Uuid,
    tags: &[TagInfo],
    vols: &[VolumeInfo],
    now: u64,
    quarantine: u64,
) -> Vec<VolumeId> {
    let reached: HashSet<VolumeId> = tags.iter().map(|t| t.volume).collect();
    let unreached: HashMap<VolumeId, u64> = vols
        .iter()
        .filter(|v| {
            v.legality == cairn_domain::Legality::Legal
                && v.tag_refs == 0
                && !reached.contains(&v.id)
        })
        .map(|v| (v.id, v.generation))
        .collect();
    seen.retain(|(d, v), (g, _)| *d != domain || unreached.get(v) == Some(g));
    let mut due = Vec::new();
    for (v, g) in unreached {
        let (_, since) = *seen.entry((domain, v)).or_insert((g, now));
        if now.saturating_sub(since) >= quarantine {
            due.push(v);
        }
    }
    due.sort();
    due
}

/// What a clone is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneSource {
    /// A disk: a thin clone snapshots it first (in the same transaction).
    Disk(TagId),
    /// A snapshot: a thin clone is a new layer on it.
    Snapshot(TagId),
}

/// Tell a disk from a snapshot.
pub fn clone_source(id: &TagId, tags: &[TagInfo]) -> Result<CloneSource> {
    let t = tags
        .iter()
        .find(|t| t.id == *id)
        .ok_or_else(|| CoordError::NotFound {
            kind: "disk or snapshot",
            id: id.to_string(),
        })?;
    Ok(match t.tag_type {
        TagType::Strong => CloneSource::Disk(t.id),
        TagType::Weak => CloneSource::Snapshot(t.id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_domain::{Format, Legality, TagState};

    #[test]
    fn volumes_nothing_reaches_are_reclaimed_after_the_quarantine_unchanged() {
        let d = uuid::Uuid::from_u128(7);
        let ids: Vec<VolumeId> = (0..4).map(VolumeId::generate).collect();
        let vol = |n: usize, refs: u32, gen: u64, legal: bool| {
            let mut v = cairn_domain::Volume {
                id: ids[n],
                parent: None,
                format: Format::Raw,
                capacity: 1 << 20,
                extent_start: n as u64,
                extent_count: 1,
                legality: if legal {
                    Legality::Legal
                } else {
                    Legality::Illegal
                },
                allocation: cairn_domain::Allocation::Sparse,
                ctime: 0,
                description: String::new(),
                tag_refs: refs,
                generation: gen,
                token: 1,
                writer_slot: 0,
            };
            v.tag_refs = refs;
            VolumeInfo::of("d", 1 << 20, &v)
        };
        let mut seen = Unreached::new();
        // 1 bare, 2 tagged, 3 half made (the agent's to collect).
        let vols = vec![vol(1, 0, 1, true), vol(2, 1, 1, true), vol(3, 0, 1, false)];
        assert!(reclaimable(&mut seen, d, &[], &vols, 100, 60).is_empty());
        assert!(reclaimable(&mut seen, d, &[], &vols, 159, 60).is_empty());
        assert_eq!(reclaimable(&mut seen, d, &[], &vols, 160, 60), vec![ids[1]]);
        // Changed meanwhile (a new generation): its clock starts over.
        let mut seen = Unreached::new();
        reclaimable(&mut seen, d, &[], &vols, 100, 60);
        let changed = vec![vol(1, 0, 2, true)];
        assert!(reclaimable(&mut seen, d, &[], &changed, 170, 60).is_empty());
        assert_eq!(reclaimable(&mut seen, d, &[], &changed, 230, 60).len(), 1);
        // Tagged again meanwhile: forgotten, and a later orphaning starts
        // over; another domain's memory is left alone.
        let other = uuid::Uuid::from_u128(8);
        reclaimable(&mut seen, other, &[], &vols, 100, 60);
        let tagged = vec![vol(1, 1, 2, true)];
        assert!(reclaimable(&mut seen, d, &[], &tagged, 240, 60).is_empty());
        assert!(!seen.contains_key(&(d, ids[1])));
        assert!(seen.contains_key(&(other, ids[1])));
        assert!(reclaimable(&mut seen, d, &[], &vols, 250, 60).is_empty());
    }

    fn agent(id: &str, doms: &[uuid::Uuid]) -> AgentInfo {
        AgentInfo {
            instance: String::new(),
            slots: Vec::new(),
            host_id: id.into(),
            host_name: id.into(),
            address: format!("http://{id}"),
            domains: doms
                .iter()
                .map(|d| DomainRef {
                    id: *d,
                    name: format!("d-{}", &d.to_string()[..4]),
                })
                .collect(),
        }
    }

    #[test]
    fn picking_spreads_over_equal_agents_and_avoids_the_dead_and_busy() {
        let (d1, d2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let agents = vec![agent("a", &[d1]), agent("b", &[d1, d2]), agent("c", &[d1])];
        let none = HashMap::new();
        let mut seen = HashSet::new();
        for spread in 0..6 {
            let a = pick_agent(&agents, &d1, None, &none, &HashSet::new(), spread).unwrap();
            seen.insert(a.host_id.clone());
        }
        assert_eq!(seen.len(), 3, "equal agents share the work");
        let load = HashMap::from([("a".to_string(), 2), ("b".to_string(), 1)]);
        let a = pick_agent(&agents, &d1, None, &load, &HashSet::new(), 7).unwrap();
        assert_eq!(a.host_id, "c", "the least loaded wins");
        let dead = HashSet::from(["c".to_string()]);
        let a = pick_agent(&agents, &d1, None, &load, &dead, 7).unwrap();
        assert_eq!(a.host_id, "b");
        // Only b sees both domains of a copy.
        let a = pick_agent(&agents, &d1, Some(&d2), &none, &HashSet::new(), 1).unwrap();
        assert_eq!(a.host_id, "b");
        let all = HashSet::from(["a".into(), "b".into(), "c".into()]);
        assert!(pick_agent(&agents, &d1, None, &none, &all, 0).is_none());
    }

    #[test]
    fn domains_resolve_by_name_or_id() {
        let (d1, d2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let agents = vec![agent("a", &[d1]), agent("b", &[d1, d2])];
        let r = resolve_domain(&agents, &d2.to_string()).unwrap();
        assert_eq!(r.id, d2);
        let name = agents[0].domains[0].name.clone();
        assert_eq!(resolve_domain(&agents, &name).unwrap().id, d1);
        assert!(matches!(
            resolve_domain(&agents, ""),
            Err(CoordError::InvalidArgument { .. })
        ));
        assert!(matches!(
            resolve_domain(&agents, "nope"),
            Err(CoordError::NotFound { .. })
        ));
        assert_eq!(resolve_domain(&agents[..1], "").unwrap().id, d1);
    }

    #[test]
    fn registrations_parse_and_socket_only_agents_are_skipped() {
        let d = uuid::Uuid::new_v4();
        let v = serde_json::json!({"host_id": "h1", "host_name": "n", "address": "http://127.0.0.1:1",
            "domains": [{"id": d, "name": "x", "path": "/p", "host_slot": 0}]});
        let a = parse_registration(&v.to_string()).unwrap();
        assert_eq!(a.address, "http://127.0.0.1:1");
        assert!(a.sees(&d));
        let v = serde_json::json!({"host_id": "h1", "address": null, "domains": []});
        assert!(parse_registration(&v.to_string()).is_none());
        assert!(parse_registration("not json").is_none());
    }

    fn vol(n: u32, parent: Option<TagId>) -> VolumeInfo {
        let v = cairn_domain::Volume {
            id: VolumeId::generate(n),
            parent,
            format: if parent.is_some() {
                Format::Qcow2
            } else {
                Format::Raw
            },
            capacity: 1 << 30,
            extent_start: 0,
            extent_count: 1024,
            legality: Legality::Legal,
            allocation: cairn_domain::Allocation::Sparse,
            ctime: n as u64,
            description: format!("v{n}"),
            tag_refs: 1,
            generation: 1,
            token: 1,
            writer_slot: 0,
        };
        VolumeInfo::of("d", 1 << 20, &v)
    }

    fn tag(n: u32, v: &VolumeInfo, t: TagType, children: u32, opts: &[(&str, String)]) -> TagInfo {
        TagInfo {
            id: TagId::generate(n),
            volume: v.id,
            size: v.capacity,
            mutable: t == TagType::Strong,
            tag_type: t,
            state: TagState::Optimized,
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ctime: n as u64,
            child_refs: children,
            domain: "d".into(),
            strategy: cairn_domain::Strategy::Chain,
            user_data_bytes: 0,
            generation: 1,
            token: 1,
            writer_slot: 0,
        }
    }

    #[test]
    fn a_disk_view_walks_the_chain_and_keeps_its_own_snapshots() {
        let d = DomainRef {
            id: uuid::Uuid::new_v4(),
            name: "d".into(),
        };
        let disk_id = TagId::generate(100);
        let base = vol(1, None);
        // s1 on base has two children: the disk's next layer and a clone.
        let s1 = tag(
            2,
            &base,
            TagType::Weak,
            2,
            &[(SNAP_KEY, disk_id.to_string())],
        );
        let mid = vol(3, Some(s1.id));
        let s2 = tag(
            4,
            &mid,
            TagType::Weak,
            1,
            &[(SNAP_KEY, disk_id.to_string())],
        );
        let top = vol(5, Some(s2.id));
        let mut disk = tag(100, &top, TagType::Strong, 0, &[(NAME_KEY, "web".into())]);
        disk.id = disk_id;
        let cvol = vol(6, Some(s1.id));
        let clone = tag(7, &cvol, TagType::Strong, 0, &[]);
        let tags = vec![s1.clone(), s2.clone(), disk.clone(), clone.clone()];
        let vols = vec![base.clone(), mid.clone(), top.clone(), cvol.clone()];
        let v = disk_view(&d, &disk_id, &tags, &vols).unwrap();
        let ids: Vec<_> = v.chain.iter().map(|l| l.volume.id).collect();
        assert_eq!(ids, [base.id, mid.id, top.id]);
        let snaps: Vec<_> = v.snapshots.iter().map(|s| (s.tag.id, s.clones)).collect();
        assert_eq!(snaps, [(s1.id, 1), (s2.id, 0)]);
        // The clone shares the base but not the disk's snapshots.
        let c = disk_view(&d, &clone.id, &tags, &vols).unwrap();
        assert_eq!(c.chain.len(), 2);
        assert!(c.snapshots.is_empty());
        assert_eq!(disks(&d, &tags, &vols).len(), 2);
        assert!(matches!(
            disk_view(&d, &s1.id, &tags, &vols),
            Err(CoordError::NotFound { .. })
        ));
        assert_eq!(
            clone_source(&s2.id, &tags).unwrap(),
            CloneSource::Snapshot(s2.id)
        );
        assert_eq!(
            clone_source(&disk_id, &tags).unwrap(),
            CloneSource::Disk(disk_id)
        );
    }
}
