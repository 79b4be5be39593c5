//! Offline consistency check and dump of a domain.
//!
//! Reads everything, changes nothing. Run it on a quiescent domain: a host
//! working at the same time shows up as open intents or moving counts.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::alloc::{AllocMap, EXTENTS, TAG_SLOTS, VOLUME_SLOTS};
use crate::engine::{read_superblocks, SuperblockStatus};
use crate::error::{DomainError, Result};
use crate::geometry::Geometry;
use crate::io::{AlignedBuf, BlockDev};
use crate::journal::{self, Action, Intent};
use crate::layout::{csum, JournalKind, SlotState, JOURNAL_MAGIC, PAGE, RECORD};
use crate::model::*;
use crate::records::*;

/// One violated invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable finding code, e.g. `alloc.extent_leak`.
    pub code: &'static str,
    /// Which structure.
    pub location: String,
    /// Byte offset, where one applies.
    pub offset: Option<u64>,
    /// What is wrong.
    pub detail: String,
}

/// Everything a check learned.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Domain id.
    pub domain_id: uuid::Uuid,
    /// Domain name.
    pub name: String,
    /// Live volumes.
    pub volumes: usize,
    /// Live tags.
    pub tags: usize,
    /// Extents in use.
    pub extents_used: u64,
    /// Open intents found.
    pub open_intents: usize,
    /// Violations; empty means clean.
    pub findings: Vec<Finding>,
    /// Things worth knowing that are not violations.
    pub warnings: Vec<Finding>,
}

impl CheckReport {
    /// Whether no invariant is violated.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// A host slot as dumped.
#[derive(Debug, Clone, Serialize)]
pub struct SlotDump {
    /// Index.
    pub index: u32,
    /// "never", "active" or "free".
    pub state: String,
    /// Header, if it decodes.
    pub header: Option<SlotHeader>,
    /// Live journal records.
    pub journal: Vec<RecordDump>,
    /// Journal problem, if any.
    pub journal_error: Option<String>,
}

/// A journal record as dumped.
#[derive(Debug, Clone, Serialize)]
pub struct RecordDump {
    /// Sequence number.
    pub seq: u64,
    /// "intent" or "commit".
    pub kind: &'static str,
    /// Page within the ring.
    pub page: u64,
    /// Intent label or commit target.
    pub summary: String,
    /// Whether an intent is still open.
    pub open: bool,
    /// Actions of an intent.
    pub actions: Vec<String>,
}

/// A tag with its user data item sizes.
#[derive(Debug, Clone, Serialize)]
pub struct TagDump {
    /// The tag.
    #[serde(flatten)]
    pub tag: Tag,
    /// Item names and sizes, if the blob verifies.
    pub user_data_items: BTreeMap<String, usize>,
}

/// A whole domain as dumped.
#[derive(Debug, Clone, Serialize)]
pub struct Dump {
    /// Geometry.
    pub geometry: Geometry,
    /// Superblock copies.
    pub superblocks: SuperblockStatus,
    /// Host slots.
    pub slots: Vec<SlotDump>,
    /// Extents in use.
    pub extents_used: Option<u64>,
    /// Volumes.
    pub volumes: Vec<Volume>,
    /// Tags.
    pub tags: Vec<TagDump>,
    /// Slots that failed to decode.
    pub damaged: Vec<Finding>,
}

struct Scanned {
    geom: Geometry,
    sb: SuperblockStatus,
    slots: Vec<SlotDump>,
    open_intents: usize,
    alloc: std::result::Result<AllocMap, DomainError>,
    volumes: BTreeMap<u32, Volume>,
    tags: BTreeMap<u32, Tag>,
    findings: Vec<Finding>,
    warnings: Vec<Finding>,
}

fn finding(
    code: &'static str,
    location: impl Into<String>,
    offset: Option<u64>,
    detail: impl std::fmt::Display,
) -> Finding {
    Finding {
        code,
        location: location.into(),
        offset,
        detail: detail.to_string(),
    }
}

fn describe(a: &Action) -> String {
    const MAPS: [&str; 3] = ["extents", "volume-slots", "tag-slots"];
    match a {
        Action::PutVolume { slot, .. } => format!("put volume slot {slot}"),
        Action::PutTag { slot, .. } => format!("put tag slot {slot}"),
        Action::SetBits { map, start, count } => {
            format!("set {} {start}+{count}", MAPS[*map as usize])
        }
        Action::ClearBits { map, start, count } => {
            format!("clear {} {start}+{count}", MAPS[*map as usize])
        }
        Action::UserData {
            slot, half, len, ..
        } => {
            format!("user data of tag slot {slot} half {half} ({len} bytes)")
        }
        Action::VolumeData { slot, len, .. } => {
            format!("data of volume slot {slot} ({len} bytes)")
        }
    }
}

fn read(dev: &dyn BlockDev, off: u64, len: usize, what: &str) -> Result<AlignedBuf> {
    let mut buf = AlignedBuf::zeroed(len);
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(8 << 20);
        dev.read_at(&mut buf[pos..pos + n], off + pos as u64)
            .map_err(DomainError::io(format!("reading {what}")))?;
        pos += n;
    }
    Ok(buf)
}

fn scan_domain(dev: &dyn BlockDev) -> Result<Scanned> {
    let (geom, sb) = read_superblocks(dev)?;
    let g = &geom;
    let salt = g.salt();
    let mut findings = Vec::new();
    let mut warnings = Vec::new();
    if let Some(p) = &sb.primary {
        findings.push(finding(
            "superblock.primary",
            "primary superblock",
            Some(0),
            p.clone(),
        ));
    }
    if let Some(b) = &sb.backup {
        findings.push(finding(
            "superblock.backup",
            "backup superblock",
            Some(g.backup_sb_off()),
            b.clone(),
        ));
    }
    if dev.size() < g.device_size {
        return Err(DomainError::NotADomain(format!(
            "device is {} bytes but the domain was formatted for {}",
            dev.size(),
            g.device_size
        )));
    }
    // Host slots and journals.
    let table = read(
        dev,
        g.slot_table_off,
        (g.host_slots as usize * g.sector_size as usize).div_ceil(512) * 512,
        "the host slot table",
    )?;
    let mut slots = Vec::new();
    let mut open_intents = 0;
    for i in 0..g.host_slots {
        let o = i as usize * g.sector_size as usize;
        let header = match SlotHeader::decode(&salt, i, &table[o..o + RECORD]) {
            Ok(h) => Some(h),
            Err(d) => {
                findings.push(finding(
                    "slot.header",
                    format!("host slot {i} header"),
                    Some(g.slot_off(i)),
                    d,
                ));
                None
            }
        };
        let state = match header.as_ref().map(|h| h.state) {
            Some(SlotState::Never) => "never",
            Some(SlotState::Active) => "active",
            Some(_) => "free",
            None => "damaged",
        };
        let ring_off = g.journal_ring_off(i);
        let ring = read(dev, ring_off, g.journal_size as usize, "a journal")?;
        let mut dump = SlotDump {
            index: i,
            state: state.into(),
            header,
            journal: Vec::new(),
            journal_error: None,
        };
        match journal::scan(&salt, i as u16, &ring, ring_off) {
            Ok(s) => {
                let live_pages: Vec<(u64, u64)> =
                    s.live.values().map(|r| (r.page, r.pages)).collect();
                // Blocks that look like ours but fail their checksum, outside
                // the live records: history damage or torn writes.
                for p in 0..g.journal_size / PAGE {
                    let b = &ring[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
                    if b[..4] == JOURNAL_MAGIC
                        && journal::decode_block(&salt, i as u16, b).is_none()
                        && !live_pages.iter().any(|&(s, n)| p >= s && p < s + n)
                    {
                        warnings.push(finding(
                            "journal.damaged_block",
                            format!("journal of host slot {i}, page {p}"),
                            Some(ring_off + p * PAGE),
                            "a journal block outside the live records fails its checksum",
                        ));
                    }
                }
                if !s.torn.is_empty() {
                    warnings.push(finding(
                        "journal.torn_tail",
                        format!("journal of host slot {i}"),
                        Some(ring_off),
                        format!("records {:?} were lost in a torn tail", s.torn),
                    ));
                }
                for (seq, r) in &s.live {
                    let mut rd = RecordDump {
                        seq: *seq,
                        kind: if r.header.kind == JournalKind::Intent.code() {
                            "intent"
                        } else {
                            "commit"
                        },
                        page: r.page,
                        summary: String::new(),
                        open: s.open.contains_key(seq),
                        actions: Vec::new(),
                    };
                    if r.header.kind == JournalKind::Intent.code() {
                        if let Ok(intent) = Intent::decode(&r.payload) {
                            rd.summary = intent.label.clone();
                            rd.actions = intent.actions.iter().map(describe).collect();
                        }
                    } else if let Ok(c) = journal::Commit::decode(&r.payload) {
                        rd.summary = format!(
                            "commits {} ({})",
                            c.intent_seq,
                            if c.outcome == crate::layout::Direction::Forward {
                                "forward"
                            } else {
                                "back"
                            }
                        );
                    }
                    dump.journal.push(rd);
                }
                for (seq, intent) in &s.open {
                    open_intents += 1;
                    findings.push(finding(
                        "journal.open_intent",
                        format!("journal of host slot {i}"),
                        Some(ring_off + s.live[seq].page * PAGE),
                        format!(
                            "intent {seq} ({}) is not committed; run `cairn domain recover`",
                            intent.label
                        ),
                    ));
                }
            }
            Err(e) => {
                dump.journal_error = Some(e.to_string());
                findings.push(finding(
                    "journal.damaged",
                    format!("journal of host slot {i}"),
                    Some(ring_off),
                    e.to_string(),
                ));
            }
        }
        slots.push(dump);
    }
    let alloc = AllocMap::load(dev, g);
    if let Err(e) = &alloc {
        findings.push(finding(
            "alloc.damaged",
            "allocation map",
            Some(g.alloc_off),
            e.to_string(),
        ));
    }
    let volumes = scan_table(dev, g, &salt, "volume.record", &mut findings)?;
    let tags = scan_table(dev, g, &salt, "tag.record", &mut findings)?;
    Ok(Scanned {
        geom,
        sb,
        slots,
        open_intents,
        alloc,
        volumes,
        tags,
        findings,
        warnings,
    })
}

/// The live records of a table by slot; a record that does not decode is a
/// finding of `code`.
fn scan_table<T: SlotRecord>(
    dev: &dyn BlockDev,
    g: &Geometry,
    salt: &[u8; 16],
    code: &'static str,
    findings: &mut Vec<Finding>,
) -> Result<BTreeMap<u32, T>> {
    let (table, slots) = T::table(g);
    let sector = g.sector_size as usize;
    let what = format!("the {} table", T::KIND);
    let buf = read(dev, table, slots as usize * sector, &what)?;
    let mut live = BTreeMap::new();
    for i in 0..slots {
        let o = i as usize * sector;
        match T::decode(salt, i, &buf[o..o + RECORD]) {
            Ok(Slot::Live(r)) => {
                live.insert(i, r);
            }
            Ok(_) => {}
            Err(d) => findings.push(finding(
                code,
                format!("{} slot {i}", T::KIND),
                Some(table + o as u64),
                d,
            )),
        }
    }
    Ok(live)
}

fn read_user_data(
    dev: &dyn BlockDev,
    g: &Geometry,
    t: &Tag,
) -> std::result::Result<UserData, String> {
    let u = t.user_data;
    if u.len == 0 {
        return Ok(UserData::new());
    }
    if u.len > g.user_data_size {
        return Err("length exceeds the user data area".into());
    }
    let s = g.sector_size as usize;
    let n = (u.len as usize).div_ceil(s) * s;
    let buf = read(
        dev,
        g.user_data_half_off(t.id.slot(), u.half),
        n,
        "user data",
    )
    .map_err(|e| e.to_string())?;
    let blob = &buf[..u.len as usize];
    if csum(&g.salt(), blob) != u.crc {
        return Err("checksum mismatch".into());
    }
    decode_user_data(&t.id, blob).map_err(|e| e.to_string())
}

/// Check every invariant of the domain on `dev`. Fails only when it cannot
/// check at all (no readable superblock, I/O errors).
pub fn check(dev: &dyn BlockDev) -> Result<CheckReport> {
    let s = scan_domain(dev)?;
    let g = &s.geom;
    let mut f = s.findings;
    let vols_by_id: HashMap<VolumeId, &Volume> = s.volumes.values().map(|v| (v.id, v)).collect();
    let tags_by_id: HashMap<TagId, &Tag> = s.tags.values().map(|t| (t.id, t)).collect();
    // Runs inside the data area and disjoint.
    let mut runs: Vec<(u64, u64, VolumeId)> = Vec::new();
    for v in s.volumes.values() {
        if v.extent_count == 0 || v.extent_start + v.extent_count > g.extent_count {
            f.push(finding(
                "volume.run",
                format!("volume {}", v.id),
                Some(g.volume_off(v.id.slot())),
                format!(
                    "extent run {}+{} lies outside the data area of {} extents",
                    v.extent_start, v.extent_count, g.extent_count
                ),
            ));
            continue;
        }
        runs.push((v.extent_start, v.extent_count, v.id));
    }
    runs.sort();
    for w in runs.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            f.push(finding(
                "volume.overlap",
                format!("volumes {} and {}", w[0].2, w[1].2),
                None,
                format!(
                    "runs {}+{} and {}+{} overlap",
                    w[0].0, w[0].1, w[1].0, w[1].1
                ),
            ));
        }
    }
    // References and counts.
    let mut tag_refs: HashMap<VolumeId, u32> = HashMap::new();
    for t in s.tags.values() {
        *tag_refs.entry(t.volume).or_default() += 1;
        if !vols_by_id.contains_key(&t.volume) {
            f.push(finding(
                "tag.dangling",
                format!("tag {}", t.id),
                Some(g.tag_off(t.id.slot())),
                format!("points at volume {}, which does not exist", t.volume),
            ));
        }
        if let Err(d) = read_user_data(dev, g, t) {
            f.push(finding(
                "tag.user_data",
                format!("tag {} user data", t.id),
                Some(g.user_data_half_off(t.id.slot(), t.user_data.half)),
                d,
            ));
        }
    }
    let mut child_refs: HashMap<TagId, u32> = HashMap::new();
    for v in s.volumes.values() {
        if let Some(p) = v.parent {
            *child_refs.entry(p).or_default() += 1;
            if !tags_by_id.contains_key(&p) {
                f.push(finding(
                    "volume.parent",
                    format!("volume {}", v.id),
                    Some(g.volume_off(v.id.slot())),
                    format!("parent tag {p} does not exist"),
                ));
            }
        }
        let n = tag_refs.get(&v.id).copied().unwrap_or(0);
        if n != v.tag_refs {
            f.push(finding(
                "volume.tag_refs",
                format!("volume {}", v.id),
                Some(g.volume_off(v.id.slot())),
                format!(
                    "records {} tag references but {n} tags point at it",
                    v.tag_refs
                ),
            ));
        }
    }
    for t in s.tags.values() {
        let n = child_refs.get(&t.id).copied().unwrap_or(0);
        if n != t.child_refs {
            f.push(finding(
                "tag.child_refs",
                format!("tag {}", t.id),
                Some(g.tag_off(t.id.slot())),
                format!(
                    "records {} children but {n} volumes name it as parent",
                    t.child_refs
                ),
            ));
        }
    }
    // Allocation map equals what the records use.
    let mut extents_used = 0;
    if let Ok(m) = &s.alloc {
        extents_used = m.count_set(EXTENTS);
        let mut used = vec![false; g.extent_count as usize];
        for &(start, n, _) in &runs {
            for e in start..start + n {
                used[e as usize] = true;
            }
        }
        let mut leaks = Vec::new();
        let mut unmarked = Vec::new();
        for (e, &u) in used.iter().enumerate() {
            match (m.is_set(EXTENTS, e as u64), u) {
                (true, false) => leaks.push(e),
                (false, true) => unmarked.push(e),
                _ => {}
            }
        }
        if !leaks.is_empty() {
            f.push(finding(
                "alloc.extent_leak",
                "extent bitmap",
                Some(g.bitmap_page_off(EXTENTS, 0)),
                format!(
                    "{} extents marked used that no volume holds (first {})",
                    leaks.len(),
                    leaks[0]
                ),
            ));
        }
        if !unmarked.is_empty() {
            f.push(finding(
                "alloc.extent_unmarked",
                "extent bitmap",
                Some(g.bitmap_page_off(EXTENTS, 0)),
                format!(
                    "{} extents held by volumes are marked free (first {})",
                    unmarked.len(),
                    unmarked[0]
                ),
            ));
        }
        for (map, name, live, total) in [
            (
                VOLUME_SLOTS,
                "volume",
                &s.volumes.keys().copied().collect::<Vec<_>>(),
                g.volume_slots,
            ),
            (
                TAG_SLOTS,
                "tag",
                &s.tags.keys().copied().collect::<Vec<_>>(),
                g.tag_slots,
            ),
        ] {
            for i in 0..total {
                let set = m.is_set(map, i as u64);
                let is_live = live.binary_search(&i).is_ok();
                if set != is_live {
                    f.push(finding(
                        if set {
                            "alloc.slot_leak"
                        } else {
                            "alloc.slot_unmarked"
                        },
                        format!("{name} slot {i}"),
                        Some(g.bitmap_page_off(map, i as u64 / crate::layout::BITS_PER_PAGE)),
                        if set {
                            "marked used but holds no live record".to_string()
                        } else {
                            "holds a live record but is marked free".to_string()
                        },
                    ));
                }
            }
        }
    }
    Ok(CheckReport {
        domain_id: g.domain_id,
        name: g.name.clone(),
        volumes: s.volumes.len(),
        tags: s.tags.len(),
        extents_used,
        open_intents: s.open_intents,
        findings: f,
        warnings: s.warnings,
    })
}

/// Dump everything on the domain.
pub fn dump(dev: &dyn BlockDev) -> Result<Dump> {
    let s = scan_domain(dev)?;
    let g = &s.geom;
    let tags = s
        .tags
        .values()
        .map(|t| TagDump {
            tag: t.clone(),
            user_data_items: read_user_data(dev, g, t)
                .map(|d| d.iter().map(|(k, v)| (k.clone(), v.len())).collect())
                .unwrap_or_default(),
        })
        .collect();
    Ok(Dump {
        geometry: s.geom.clone(),
        superblocks: s.sb,
        slots: s.slots,
        extents_used: s.alloc.as_ref().ok().map(|m| m.count_set(EXTENTS)),
        volumes: s.volumes.into_values().collect(),
        tags,
        damaged: s.findings,
    })
}
