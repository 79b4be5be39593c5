//! The one mapping between wire messages and domain types.
//!
//! Every enum has one function from its wire value (`Ok(None)` for the
//! unspecified value, an error naming the field for a value this version
//! does not know) and one `From` into the wire type; every message that
//! both sides of a call read has a `From` and a `TryFrom` here, so that an
//! agent's answer and the coordinator's reading of it cannot drift apart.

use cairn_domain::api::{
    CopyTarget, DomainInfo, FailureInfo, JobInfo, JobState, Recovered, RequestState, TagInfo,
    TagSpec, VolumeInfo,
};
use cairn_domain::{
    Allocation, DomainError, Format, Legality, Strategy, TagId, TagState, TagType, VolumeId,
};

use crate::{agent, coordinator};

/// A wire value that does not make a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ConvertError {
    /// The field, as the message names it (`tag.strategy`).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ConvertError {
    /// An error naming `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> ConvertError {
        ConvertError {
            field,
            reason: reason.into(),
        }
    }

    /// A required field that was left unspecified.
    pub fn required(field: &'static str) -> ConvertError {
        ConvertError::new(field, "is required")
    }
}

/// A required value: `None` (unspecified) is an error naming `field`.
pub fn required<T>(field: &'static str, v: Option<T>) -> Result<T, ConvertError> {
    v.ok_or_else(|| ConvertError::required(field))
}

fn from_domain(field: &'static str, e: DomainError) -> ConvertError {
    match e {
        DomainError::InvalidArgument { reason, .. } => ConvertError::new(field, reason),
        other => ConvertError::new(field, other.to_string()),
    }
}

/// A volume id; empty is an error.
pub fn volume_id(field: &'static str, s: &str) -> Result<VolumeId, ConvertError> {
    if s.is_empty() {
        return Err(ConvertError::required(field));
    }
    VolumeId::parse(field, s).map_err(|e| from_domain(field, e))
}

/// A tag id; empty is an error.
pub fn tag_id(field: &'static str, s: &str) -> Result<TagId, ConvertError> {
    if s.is_empty() {
        return Err(ConvertError::required(field));
    }
    TagId::parse(field, s).map_err(|e| from_domain(field, e))
}

/// A tag id that may be empty (no parent).
pub fn optional_tag_id(field: &'static str, s: &str) -> Result<Option<TagId>, ConvertError> {
    if s.is_empty() {
        return Ok(None);
    }
    tag_id(field, s).map(Some)
}

/// A domain id as agents report it.
pub fn uuid(field: &'static str, s: &str) -> Result<uuid::Uuid, ConvertError> {
    uuid::Uuid::parse_str(s)
        .map_err(|e| ConvertError::new(field, format!("{}: {e}", cairn_domain::limits::quote(s))))
}

macro_rules! wire_enum {
    ($(#[$doc:meta])* $from:ident, $to:ident: $m:ident::$wire:ident <=> $domain:ident,
     $what:literal, { $($v:ident),+ $(,)? }) => {
        impl From<$domain> for $m::$wire {
            fn from(d: $domain) -> $m::$wire {
                match d {
                    $($domain::$v => $m::$wire::$v,)+
                }
            }
        }

        $(#[$doc])*
        /// `Ok(None)`: the unspecified value.
        pub fn $from(field: &'static str, v: i32) -> Result<Option<$domain>, ConvertError> {
            match $m::$wire::try_from(v) {
                Ok($m::$wire::Unspecified) => Ok(None),
                $(Ok($m::$wire::$v) => Ok(Some($domain::$v)),)+
                Err(_) => Err(ConvertError::new(
                    field,
                    format!(
                        concat!("{} is not a ", $what, " (", $(stringify!($v), " ",)+ ")"),
                        v
                    ),
                )),
            }
        }

        /// The wire value of `d`.
        pub fn $to(d: $domain) -> i32 {
            $m::$wire::from(d) as i32
        }
    };
}

wire_enum!(
    /// A volume's format (`cairn.agent.v1.VolumeFormat`).
    volume_format, volume_format_code: agent::VolumeFormat <=> Format, "volume format", { Raw, Qcow2 }
);
wire_enum!(
    /// A volume's provisioning (`cairn.agent.v1.Allocation`).
    allocation, allocation_code: agent::Allocation <=> Allocation, "allocation", { Sparse, Preallocated }
);
wire_enum!(
    /// A volume's legality.
    legality, legality_code: agent::Legality <=> Legality, "legality", { Legal, Illegal }
);
wire_enum!(
    /// A tag's type.
    tag_type, tag_type_code: agent::TagType <=> TagType, "tag type", { Strong, Weak }
);
wire_enum!(
    /// A tag's state.
    tag_state, tag_state_code: agent::TagState <=> TagState, "tag state", { Optimized, Degraded, Broken }
);
wire_enum!(
    /// A tag's strategy.
    strategy, strategy_code: agent::Strategy <=> Strategy, "strategy", { Chain, Copy }
);
wire_enum!(
    /// An agent job's state.
    job_state, job_state_code: agent::JobState <=> JobState, "job state", { Running, Succeeded, Failed, Cancelled }
);
wire_enum!(
    /// What an agent knows of a request id.
    request_state, request_state_code: agent::RequestState <=> RequestState, "request state", { Unknown, Running, Answered, Failed }
);
wire_enum!(
    /// A disk's format (`cairn.coordinator.v1.Format`).
    disk_format, disk_format_code: coordinator::Format <=> Format, "format", { Raw, Qcow2 }
);
wire_enum!(
    /// A disk's provisioning (`cairn.coordinator.v1.Allocation`).
    disk_allocation, disk_allocation_code: coordinator::Allocation <=> Allocation, "allocation", { Sparse, Preallocated }
);

/// Options as key-value messages.
pub fn options_to_wire(o: &[(String, String)]) -> Vec<agent::KeyValue> {
    o.iter()
        .map(|(k, v)| agent::KeyValue {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

/// Options from key-value messages.
pub fn options_from_wire(o: &[agent::KeyValue]) -> Vec<(String, String)> {
    o.iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect()
}

fn writer_slot(field: &'static str, v: u32) -> Result<u16, ConvertError> {
    u16::try_from(v).map_err(|_| ConvertError::new(field, format!("{v} is not a host slot")))
}

impl From<&VolumeInfo> for agent::Volume {
    fn from(v: &VolumeInfo) -> agent::Volume {
        agent::Volume {
            id: v.id.to_string(),
            domain: v.domain.clone(),
            parent_tag: v.parent.map(|p| p.to_string()).unwrap_or_default(),
            format: volume_format_code(v.format),
            capacity: v.capacity,
            size: v.size,
            extent_start: v.extent_start,
            extent_count: v.extent_count,
            legality: legality_code(v.legality),
            allocation: allocation_code(v.allocation),
            ctime: v.ctime,
            description: v.description.clone(),
            tag_refs: v.tag_refs,
            generation: v.generation,
            token: v.token,
            writer_slot: v.writer_slot as u32,
        }
    }
}

impl TryFrom<&agent::Volume> for VolumeInfo {
    type Error = ConvertError;
    fn try_from(v: &agent::Volume) -> Result<VolumeInfo, ConvertError> {
        let volume = cairn_domain::Volume {
            id: volume_id("volume.id", &v.id)?,
            parent: optional_tag_id("volume.parent_tag", &v.parent_tag)?,
            format: required("volume.format", volume_format("volume.format", v.format)?)?,
            capacity: v.capacity,
            extent_start: v.extent_start,
            extent_count: v.extent_count,
            legality: required("volume.legality", legality("volume.legality", v.legality)?)?,
            allocation: required(
                "volume.allocation",
                allocation("volume.allocation", v.allocation)?,
            )?,
            ctime: v.ctime,
            description: v.description.clone(),
            tag_refs: v.tag_refs,
            generation: v.generation,
            token: v.token,
            writer_slot: writer_slot("volume.writer_slot", v.writer_slot)?,
        };
        Ok(VolumeInfo {
            volume,
            domain: v.domain.clone(),
            size: v.size,
        })
    }
}

impl From<&TagInfo> for agent::Tag {
    fn from(t: &TagInfo) -> agent::Tag {
        agent::Tag {
            id: t.id.to_string(),
            domain: t.domain.clone(),
            volume: t.volume.to_string(),
            size: t.size,
            mutable: t.mutable,
            strategy: strategy_code(t.strategy),
            options: options_to_wire(&t.options),
            r#type: tag_type_code(t.tag_type),
            state: tag_state_code(t.state),
            ctime: t.ctime,
            child_refs: t.child_refs,
            user_data_bytes: t.user_data_bytes,
            generation: t.generation,
            token: t.token,
            writer_slot: t.writer_slot as u32,
        }
    }
}

impl TryFrom<&agent::Tag> for TagInfo {
    type Error = ConvertError;
    fn try_from(t: &agent::Tag) -> Result<TagInfo, ConvertError> {
        Ok(TagInfo {
            id: tag_id("tag.id", &t.id)?,
            domain: t.domain.clone(),
            volume: volume_id("tag.volume", &t.volume)?,
            size: t.size,
            mutable: t.mutable,
            strategy: required("tag.strategy", strategy("tag.strategy", t.strategy)?)?,
            options: options_from_wire(&t.options),
            tag_type: required("tag.type", tag_type("tag.type", t.r#type)?)?,
            state: required("tag.state", tag_state("tag.state", t.state)?)?,
            ctime: t.ctime,
            child_refs: t.child_refs,
            user_data_bytes: t.user_data_bytes,
            generation: t.generation,
            token: t.token,
            writer_slot: writer_slot("tag.writer_slot", t.writer_slot)?,
        })
    }
}

/// A tag spec on the wire: its volume field stays empty (the caller fills
/// it in where the request names one).
impl From<&TagSpec> for agent::TagSpec {
    fn from(s: &TagSpec) -> agent::TagSpec {
        agent::TagSpec {
            volume: String::new(),
            size: s.size,
            mutable: s.mutable,
            strategy: strategy_code(s.strategy),
            options: options_to_wire(&s.options),
            r#type: tag_type_code(s.tag_type),
            state: tag_state_code(s.state),
        }
    }
}

/// A tag spec from the wire, without its volume (read by the caller):
/// unspecified strategy, type and state are chain, strong and optimized.
impl TryFrom<&agent::TagSpec> for TagSpec {
    type Error = ConvertError;
    fn try_from(t: &agent::TagSpec) -> Result<TagSpec, ConvertError> {
        Ok(TagSpec {
            size: t.size,
            mutable: t.mutable,
            strategy: strategy("tag.strategy", t.strategy)?.unwrap_or(Strategy::Chain),
            options: options_from_wire(&t.options),
            tag_type: tag_type("tag.type", t.r#type)?.unwrap_or(TagType::Strong),
            state: tag_state("tag.state", t.state)?.unwrap_or(TagState::Optimized),
        })
    }
}

impl From<&CopyTarget> for agent::TargetSpec {
    fn from(t: &CopyTarget) -> agent::TargetSpec {
        agent::TargetSpec {
            format: t.format.map(volume_format_code).unwrap_or(0),
            allocation: allocation_code(t.allocation),
            description: t.description.clone(),
            tag: t.tag.as_ref().map(agent::TagSpec::from),
        }
    }
}

/// A copy's target from the wire: an unspecified format is the source's,
/// an unspecified allocation sparse; the tag names no volume.
impl TryFrom<&agent::TargetSpec> for CopyTarget {
    type Error = ConvertError;
    fn try_from(t: &agent::TargetSpec) -> Result<CopyTarget, ConvertError> {
        let tag = match &t.tag {
            Some(s) if !s.volume.is_empty() => {
                return Err(ConvertError::new(
                    "target.tag.volume",
                    "must be empty: the tag points at the new volume",
                ))
            }
            Some(s) => Some(TagSpec::try_from(s)?),
            None => None,
        };
        Ok(CopyTarget {
            format: volume_format("target.format", t.format)?,
            allocation: allocation("allocation", t.allocation)?.unwrap_or(Allocation::Sparse),
            description: t.description.clone(),
            tag,
        })
    }
}

impl From<&JobInfo> for agent::Job {
    fn from(j: &JobInfo) -> agent::Job {
        let e = j.error.as_ref();
        agent::Job {
            id: j.id.clone(),
            kind: j.kind.clone(),
            state: job_state_code(j.state),
            done_bytes: j.done_bytes,
            total_bytes: j.total_bytes,
            error_code: e.map(|e| e.code).unwrap_or(0),
            error_reason: e.map(|e| e.reason.clone()).unwrap_or_default(),
            error_message: e.map(|e| e.message.clone()).unwrap_or_default(),
            volume: j.volume.as_ref().map(agent::Volume::from),
            tag: j.tag.as_ref().map(agent::Tag::from),
            path: j.path.clone(),
            started: j.started,
            finished: j.finished,
            skipped_bytes: j.skipped_bytes,
        }
    }
}

impl TryFrom<&agent::Job> for JobInfo {
    type Error = ConvertError;
    fn try_from(j: &agent::Job) -> Result<JobInfo, ConvertError> {
        Ok(JobInfo {
            id: j.id.clone(),
            kind: j.kind.clone(),
            state: required("job.state", job_state("job.state", j.state)?)?,
            done_bytes: j.done_bytes,
            total_bytes: j.total_bytes,
            skipped_bytes: j.skipped_bytes,
            started: j.started,
            finished: j.finished,
            volume: j.volume.as_ref().map(VolumeInfo::try_from).transpose()?,
            tag: j.tag.as_ref().map(TagInfo::try_from).transpose()?,
            path: j.path.clone(),
            error: (j.error_code != 0).then(|| FailureInfo {
                code: j.error_code,
                reason: j.error_reason.clone(),
                message: j.error_message.clone(),
            }),
        })
    }
}

impl From<&Recovered> for agent::RecoverDomainResponse {
    fn from(r: &Recovered) -> agent::RecoverDomainResponse {
        agent::RecoverDomainResponse {
            slots_recovered: r.slots.clone(),
            rolled_forward: r.forward,
            rolled_back: r.back,
            volumes_removed: r.removed.iter().map(|v| v.to_string()).collect(),
            active_slots: r
                .active
                .iter()
                .map(|&(slot, token)| agent::ActiveSlot { slot, token })
                .collect(),
        }
    }
}

impl TryFrom<&agent::RecoverDomainResponse> for Recovered {
    type Error = ConvertError;
    fn try_from(r: &agent::RecoverDomainResponse) -> Result<Recovered, ConvertError> {
        Ok(Recovered {
            slots: r.slots_recovered.clone(),
            forward: r.rolled_forward,
            back: r.rolled_back,
            removed: r
                .volumes_removed
                .iter()
                .map(|v| volume_id("volumes_removed", v))
                .collect::<Result<_, _>>()?,
            active: r.active_slots.iter().map(|a| (a.slot, a.token)).collect(),
        })
    }
}

impl From<&DomainInfo> for agent::DomainInfo {
    fn from(d: &DomainInfo) -> agent::DomainInfo {
        agent::DomainInfo {
            id: d.id.to_string(),
            name: d.name.clone(),
            path: d.path.clone(),
            host_slot: d.host_slot,
            extent_size: d.extent_size,
            extents_total: d.extents_total,
            extents_free: d.extents_free,
            volume_slots_total: d.volume_slots_total,
            volumes: d.volumes,
            tag_slots_total: d.tag_slots_total,
            tags: d.tags,
            host_slots_total: d.host_slots_total,
            host_slot_token: d.host_slot_token,
        }
    }
}

impl TryFrom<&agent::DomainInfo> for DomainInfo {
    type Error = ConvertError;
    fn try_from(d: &agent::DomainInfo) -> Result<DomainInfo, ConvertError> {
        Ok(DomainInfo {
            id: uuid("domain.id", &d.id)?,
            name: d.name.clone(),
            path: d.path.clone(),
            host_slot: d.host_slot,
            host_slot_token: d.host_slot_token,
            extent_size: d.extent_size,
            extents_total: d.extents_total,
            extents_free: d.extents_free,
            volume_slots_total: d.volume_slots_total,
            volumes: d.volumes,
            tag_slots_total: d.tag_slots_total,
            tags: d.tags,
            host_slots_total: d.host_slots_total,
        })
    }
}

impl From<&cairn_domain::catalog::FileVersion> for agent::FileVersion {
    fn from(f: &cairn_domain::catalog::FileVersion) -> agent::FileVersion {
        agent::FileVersion {
            tag_id: f.tag.to_string(),
            volume_id: f.volume.to_string(),
            path: f.path.clone(),
            version: f.version,
            size: f.size,
            sha256: f.sha256.clone(),
            owner: f.owner.clone(),
            created: f.created,
            directory: f.directory,
            inline: f.inline,
            image: f.image.clone().unwrap_or_default(),
            request_id: f.request.clone(),
            image_record: Vec::new(),
        }
    }
}

impl TryFrom<&agent::FileVersion> for cairn_domain::catalog::FileVersion {
    type Error = ConvertError;
    fn try_from(f: &agent::FileVersion) -> Result<Self, ConvertError> {
        Ok(cairn_domain::catalog::FileVersion {
            tag: tag_id("file.tag_id", &f.tag_id)?,
            volume: volume_id("file.volume_id", &f.volume_id)?,
            path: f.path.clone(),
            version: f.version,
            size: f.size,
            sha256: f.sha256.clone(),
            owner: f.owner.clone(),
            created: f.created,
            directory: f.directory,
            inline: f.inline,
            image: (!f.image.is_empty()).then(|| f.image.clone()),
            request: f.request_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop_assert_eq, prop_compose, proptest};

    fn text() -> impl proptest::strategy::Strategy<Value = String> {
        "[a-z0-9 .-]{0,12}"
    }

    prop_compose! {
        fn volume()(slot in 0u32..1000, parent in proptest::option::of(0u32..1000),
                    qcow in any::<bool>(), legal in any::<bool>(), pre in any::<bool>(),
                    nums in proptest::array::uniform8(any::<u64>()), refs in any::<u32>(),
                    ws in any::<u16>(), domain in text(), description in text()) -> VolumeInfo {
            VolumeInfo {
                volume: cairn_domain::Volume {
                    id: VolumeId::generate(slot),
                    parent: parent.map(TagId::generate),
                    format: if qcow { Format::Qcow2 } else { Format::Raw },
                    capacity: nums[0],
                    extent_start: nums[2],
                    extent_count: nums[3],
                    legality: if legal { Legality::Legal } else { Legality::Illegal },
                    allocation: if pre { Allocation::Preallocated } else { Allocation::Sparse },
                    ctime: nums[4],
                    description,
                    tag_refs: refs,
                    generation: nums[5],
                    token: nums[6],
                    writer_slot: ws,
                },
                domain,
                size: nums[1],
            }
        }
    }

    prop_compose! {
        fn tag()(slot in 0u32..1000, vol in 0u32..1000, weak in any::<bool>(),
                 copy in any::<bool>(), state in 0usize..3, m in any::<bool>(),
                 nums in proptest::array::uniform4(any::<u64>()), refs in any::<(u32, u32)>(),
                 ws in any::<u16>(), domain in text(),
                 options in proptest::collection::vec(("[a-z]{1,5}", text()), 0..4)) -> TagInfo {
            TagInfo {
                id: TagId::generate(slot),
                domain,
                volume: VolumeId::generate(vol),
                size: nums[0],
                mutable: m,
                strategy: if copy { Strategy::Copy } else { Strategy::Chain },
                options,
                tag_type: if weak { TagType::Weak } else { TagType::Strong },
                state: [TagState::Optimized, TagState::Degraded, TagState::Broken][state],
                ctime: nums[1],
                child_refs: refs.0,
                user_data_bytes: refs.1,
                generation: nums[2],
                token: nums[3],
                writer_slot: ws,
            }
        }
    }

    proptest! {
        #[test]
        fn volumes_and_tags_round_trip(v in volume(), t in tag()) {
            prop_assert_eq!(VolumeInfo::try_from(&agent::Volume::from(&v)).unwrap(), v.clone());
            prop_assert_eq!(TagInfo::try_from(&agent::Tag::from(&t)).unwrap(), t.clone());
            let spec = TagSpec {
                size: t.size, mutable: t.mutable, strategy: t.strategy,
                options: t.options.clone(), tag_type: t.tag_type, state: t.state,
            };
            let target = CopyTarget {
                format: Some(v.format), allocation: v.allocation,
                description: v.description.clone(), tag: Some(spec.clone()),
            };
            prop_assert_eq!(TagSpec::try_from(&agent::TagSpec::from(&spec)).unwrap(), spec);
            prop_assert_eq!(CopyTarget::try_from(&agent::TargetSpec::from(&target)).unwrap(), target);
            let job = JobInfo {
                id: "j".into(), kind: "copy".into(), state: JobState::Succeeded,
                done_bytes: v.size, total_bytes: v.capacity, skipped_bytes: 3,
                started: 1, finished: 2, volume: Some(v.clone()), tag: Some(t.clone()),
                path: String::new(),
                error: Some(FailureInfo { code: 5, reason: "not_found".into(), message: "m".into() }),
            };
            prop_assert_eq!(JobInfo::try_from(&agent::Job::from(&job)).unwrap(), job);
        }
    }

    #[test]
    fn unknown_enum_values_are_refused_with_their_field() {
        let mut t = agent::Tag::from(&TagInfo {
            id: TagId::generate(1),
            domain: "d".into(),
            volume: VolumeId::generate(2),
            size: 1,
            mutable: true,
            strategy: Strategy::Chain,
            options: vec![],
            tag_type: TagType::Strong,
            state: TagState::Optimized,
            ctime: 0,
            child_refs: 0,
            user_data_bytes: 0,
            generation: 1,
            token: 1,
            writer_slot: 0,
        });
        t.r#type = 7;
        let e = TagInfo::try_from(&t).unwrap_err();
        assert_eq!(e.field, "tag.type");
        assert!(e.reason.contains("7 is not a tag type"), "{e}");
        t.r#type = 0;
        assert_eq!(
            TagInfo::try_from(&t).unwrap_err(),
            ConvertError::required("tag.type")
        );
        // A spec leaves them unspecified to mean the defaults.
        let spec = agent::TagSpec::default();
        let s = TagSpec::try_from(&spec).unwrap();
        assert_eq!((s.strategy, s.tag_type), (Strategy::Chain, TagType::Strong));
        assert!(TagSpec::try_from(&agent::TagSpec {
            strategy: 9,
            ..Default::default()
        })
        .is_err());
        assert_eq!(volume_format("format", 0), Ok(None));
        assert_eq!(disk_format("format", 2), Ok(Some(Format::Qcow2)));
        assert_eq!(disk_format("format", 3).unwrap_err().field, "format");
        assert_eq!(
            CopyTarget::try_from(&agent::TargetSpec {
                tag: Some(agent::TagSpec {
                    volume: "x".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap_err()
            .field,
            "target.tag.volume"
        );
    }
}
