//! What hosts report about a domain's objects and their work, and what
//! callers ask for, in domain types. These are the shapes the gRPC layer
//! (`cairn-proto`) converts to and from: one pair of conversions per
//! message, so that an agent's answer and a coordinator's reading of it
//! cannot disagree.
//!
//! A report carries everything the wire carries and nothing a host could
//! not tell a remote caller (no user data location, no lock state).

use crate::model::{Allocation, Format, Strategy, Tag, TagId, TagState, TagType};
use crate::model::{Volume, VolumeId};

/// A volume as a host reports it: its record, the name of its domain and
/// the bytes of its extent run. Reads as the record (`Deref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The record.
    pub volume: Volume,
    /// The name of its domain.
    pub domain: String,
    /// Bytes of its extent run.
    pub size: u64,
}

impl VolumeInfo {
    /// The report of `v` on domain `domain` with extents of `extent_size`.
    pub fn of(domain: &str, extent_size: u64, v: &Volume) -> VolumeInfo {
        VolumeInfo {
            volume: v.clone(),
            domain: domain.to_string(),
            size: v.extent_count * extent_size,
        }
    }
}

impl std::ops::Deref for VolumeInfo {
    type Target = Volume;
    fn deref(&self) -> &Volume {
        &self.volume
    }
}

/// A tag as a host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagInfo {
    /// Id.
    pub id: TagId,
    /// The name of its domain.
    pub domain: String,
    /// Its volume.
    pub volume: VolumeId,
    /// Logical size.
    pub size: u64,
    /// Whether it may change.
    pub mutable: bool,
    /// Snapshot and clone strategy.
    pub strategy: Strategy,
    /// Options.
    pub options: Vec<(String, String)>,
    /// Strong (a disk) or weak (a snapshot).
    pub tag_type: TagType,
    /// Health.
    pub state: TagState,
    /// Seconds since the epoch.
    pub ctime: u64,
    /// Volumes hanging from it.
    pub child_refs: u32,
    /// Bytes of user data.
    pub user_data_bytes: u32,
    /// Record generation.
    pub generation: u64,
    /// Fencing token of the last writer.
    pub token: u64,
    /// Host slot of the last writer.
    pub writer_slot: u16,
}

impl TagInfo {
    /// The report of `t` on domain `domain`.
    pub fn of(domain: &str, t: &Tag) -> TagInfo {
        TagInfo {
            id: t.id,
            domain: domain.to_string(),
            volume: t.volume,
            size: t.size,
            mutable: t.mutable,
            strategy: t.strategy,
            options: t.options.clone(),
            tag_type: t.tag_type,
            state: t.state,
            ctime: t.ctime,
            child_refs: t.child_refs,
            user_data_bytes: t.user_data.len,
            generation: t.generation,
            token: t.token,
            writer_slot: t.writer_slot,
        }
    }

    /// An option's value.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A tag's metadata without its volume: what a caller asks a new or
/// changed tag to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSpec {
    /// Logical size; 0 takes the volume's capacity.
    pub size: u64,
    /// Whether operations may change it.
    pub mutable: bool,
    /// Snapshot/clone strategy.
    pub strategy: Strategy,
    /// Options.
    pub options: Vec<(String, String)>,
    /// Strong or weak.
    pub tag_type: TagType,
    /// Health.
    pub state: TagState,
}

impl TagSpec {
    /// A disk's tag: strong, mutable, thin, healthy, with `options`.
    pub fn disk(options: Vec<(String, String)>) -> TagSpec {
        TagSpec {
            size: 0,
            mutable: true,
            strategy: Strategy::Chain,
            options,
            tag_type: TagType::Strong,
            state: TagState::Optimized,
        }
    }
}

/// The new volume of a copy or import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyTarget {
    /// Format; `None` takes the source's.
    pub format: Option<Format>,
    /// Provisioning.
    pub allocation: Allocation,
    /// Free text.
    pub description: String,
    /// A tag for the new volume, if one is wanted.
    pub tag: Option<TagSpec>,
}

impl Default for CopyTarget {
    fn default() -> Self {
        CopyTarget {
            format: None,
            allocation: Allocation::Sparse,
            description: String::new(),
            tag: None,
        }
    }
}

/// Where a host's long job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Working.
    Running,
    /// Done.
    Succeeded,
    /// Failed (see the error).
    Failed,
    /// Cancelled; nothing is left behind.
    Cancelled,
}

/// Why a job or call failed, as reported to a remote caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureInfo {
    /// The gRPC status code.
    pub code: i32,
    /// The stable error code.
    pub reason: String,
    /// The message with its causes.
    pub message: String,
}

/// A host's long job (copy, import, export, merge) as it reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// Id.
    pub id: String,
    /// "copy", "import", "export", "merge".
    pub kind: String,
    /// Where it is.
    pub state: JobState,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
    /// Bytes found zero or unallocated and not written.
    pub skipped_bytes: u64,
    /// Seconds since the epoch.
    pub started: u64,
    /// Seconds since the epoch; 0 while running.
    pub finished: u64,
    /// The volume it made.
    pub volume: Option<VolumeInfo>,
    /// The tag it made.
    pub tag: Option<TagInfo>,
    /// The file it wrote (export).
    pub path: String,
    /// Why it failed.
    pub error: Option<FailureInfo>,
}

/// What recovering a domain did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Host slots replayed.
    pub slots: Vec<u32>,
    /// Intents rolled forward.
    pub forward: u32,
    /// Intents rolled back.
    pub back: u32,
    /// Half-made volumes removed.
    pub removed: Vec<VolumeId>,
    /// Host slots in use afterwards, with their lock tokens.
    pub active: Vec<(u32, u64)>,
}

/// What a host process knows of a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestState {
    /// Not seen (or forgotten).
    Unknown,
    /// Running now.
    Running,
    /// Answered.
    Answered,
    /// Failed.
    Failed,
}

/// A domain as a host that has it open reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Id.
    pub id: uuid::Uuid,
    /// Name.
    pub name: String,
    /// Where the host opened it.
    pub path: String,
    /// The host's slot (`u32::MAX` when it has none, read-only).
    pub host_slot: u32,
    /// The fencing token of the host slot's lock.
    pub host_slot_token: u64,
    /// Extent size in bytes.
    pub extent_size: u64,
    /// Extents in all.
    pub extents_total: u64,
    /// Extents free.
    pub extents_free: u64,
    /// Volume slots in all.
    pub volume_slots_total: u64,
    /// Volumes.
    pub volumes: u64,
    /// Tag slots in all.
    pub tag_slots_total: u64,
    /// Tags.
    pub tags: u64,
    /// Host slots in all.
    pub host_slots_total: u32,
}
