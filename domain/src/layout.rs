//! On-disk structures, declared with a fixed little-endian layout.
//!
//! Every structure ends in a CRC-32C of all bytes before it. Except for the
//! superblock (which carries the domain id itself), the checksum is salted
//! with the domain id, so a structure left over from an earlier domain on the
//! same device never validates. `docs/format.md` has the byte tables.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes in a page: the unit of superblocks, journal blocks and bitmap pages.
pub const PAGE: u64 = 4096;
/// Bytes in a metadata record (volume, tag, host slot). Records are stored
/// one per sector so that two hosts never write the same sector.
pub const RECORD: usize = 512;

/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"CAIRNDOM";
/// The only on-disk format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Feature bits this build understands (none defined yet).
pub const KNOWN_INCOMPAT: u64 = 0;
/// Compatible feature: zero every deleted volume's extents before they are
/// freed (an older reader that ignores it only does not wipe).
pub const COMPAT_WIPE_AFTER_DELETE: u64 = 1;
/// Read-only-compatible feature bits this build understands.
pub const KNOWN_RO_COMPAT: u64 = 0;

/// Host slot header magic.
pub const SLOT_MAGIC: [u8; 4] = *b"CSLT";
/// Volume record magic.
pub const VOL_MAGIC: [u8; 4] = *b"CVOL";
/// Tag record magic.
pub const TAG_MAGIC: [u8; 4] = *b"CTAG";
/// Allocation map root magic.
pub const ROOT_MAGIC: [u8; 4] = *b"CAMR";
/// Bitmap page magic.
pub const BITMAP_MAGIC: [u8; 4] = *b"CBMP";
/// Journal block magic.
pub const JOURNAL_MAGIC: [u8; 4] = *b"CJNL";
/// User data blob magic.
pub const USER_DATA_MAGIC: [u8; 4] = *b"CUDB";

/// Version of records, journal blocks and the other small structures.
pub const RECORD_VERSION: u16 = 1;

/// Why bytes on the domain do not decode as the structure expected there.
/// Structural failures (length, magic, version, checksum) have their own
/// variants; a field whose value is impossible names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer or more bytes than the structure has.
    #[error("wrong length: {0}")]
    Length(&'static str),
    /// The magic is not the structure's.
    #[error("bad magic")]
    Magic,
    /// A version this build does not read.
    #[error("unknown version {0}")]
    Version(u32),
    /// The checksum does not match the bytes.
    #[error("checksum mismatch")]
    Checksum,
    /// A state or kind code this build does not know.
    #[error("unknown {what} {code}")]
    UnknownCode {
        /// What the code is ("state", "format", "action kind").
        what: &'static str,
        /// The code found.
        code: u64,
    },
    /// A field whose value cannot be (out of range, inconsistent with
    /// another, or in the wrong place).
    #[error("{field}: {detail}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl DecodeError {
    /// A field that cannot be.
    pub fn field(field: &'static str, detail: impl Into<String>) -> DecodeError {
        DecodeError::Field {
            field,
            detail: detail.into(),
        }
    }

    /// An unknown code.
    pub fn unknown(what: &'static str, code: impl Into<u64>) -> DecodeError {
        DecodeError::UnknownCode {
            what,
            code: code.into(),
        }
    }
}

/// A state or kind stored as a little-endian integer: the enum's
/// discriminant is its on-disk code, and an unknown code decodes to `None`.
macro_rules! disk_code {
    ($(#[$m:meta])* $name:ident: $t:ty { $($(#[$vm:meta])* $v:ident = $c:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($t)]
        pub enum $name {
            $($(#[$vm])* $v = $c,)+
        }

        impl $name {
            /// The on-disk code.
            pub fn code(self) -> $t {
                self as $t
            }
            /// From the on-disk code.
            pub fn from_code(c: $t) -> Option<Self> {
                match c {
                    $($c => Some($name::$v),)+
                    _ => None,
                }
            }
        }

        /// Dumps show the on-disk code.
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_u64(self.code() as u64)
            }
        }
    };
}

/// CRC-32C of `bytes`, salted with the domain id.
pub fn csum(salt: &[u8; 16], bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(salt), bytes)
}

/// Set the trailing 4-byte checksum of `bytes`.
pub fn seal(salt: &[u8; 16], bytes: &mut [u8]) {
    let n = bytes.len() - 4;
    let c = csum(salt, &bytes[..n]);
    bytes[n..].copy_from_slice(&c.to_le_bytes());
}

/// Whether the trailing checksum of `bytes` is right.
pub fn verify(salt: &[u8; 16], bytes: &[u8]) -> bool {
    let n = bytes.len() - 4;
    let stored = u32::from_le_bytes(bytes[n..].try_into().expect("4 bytes"));
    csum(salt, &bytes[..n]) == stored
}

/// The superblock, stored at offset 0 and in the last page of the device.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SuperblockRaw {
    /// "CAIRNDOM".
    pub magic: [u8; 8],
    /// Format version (1).
    pub version: U32,
    /// Size of this structure (4096).
    pub struct_size: U32,
    /// Features an old reader may ignore.
    pub compat: U64,
    /// Features an old reader must refuse.
    pub incompat: U64,
    /// Features an old reader may only read.
    pub ro_compat: U64,
    /// Domain UUID.
    pub domain_id: [u8; 16],
    /// Bytes of `name` in use.
    pub name_len: u8,
    /// Padding.
    pub pad0: [u8; 7],
    /// Domain name (UTF-8).
    pub name: [u8; 64],
    /// Creation time, seconds since the epoch.
    pub created: U64,
    /// Bytes of the device the domain covers.
    pub device_size: U64,
    /// Record stride and I/O unit of records (512 or 4096).
    pub sector_size: U32,
    /// Page size (4096).
    pub page_size: U32,
    /// Bytes per extent.
    pub extent_size: U64,
    /// Number of extents in the data area.
    pub extent_count: U64,
    /// Host slots (one journal each).
    pub host_slots: U32,
    /// Volume record slots.
    pub volume_slots: U32,
    /// Tag record slots.
    pub tag_slots: U32,
    /// Bytes of user data per tag (each tag has two halves of this size).
    pub user_data_size: U32,
    /// Bytes of each host's journal ring.
    pub journal_size: U64,
    /// Offset of the host slot table.
    pub slot_table_off: U64,
    /// Offset of the first journal ring.
    pub journal_off: U64,
    /// Offset of the allocation map root page.
    pub alloc_off: U64,
    /// Pages of the allocation map, root included.
    pub alloc_pages: U32,
    /// Padding.
    pub pad1: U32,
    /// Offset of the volume table.
    pub volume_table_off: U64,
    /// Offset of the tag table.
    pub tag_table_off: U64,
    /// Offset of the user data area.
    pub user_data_off: U64,
    /// Offset of the first extent.
    pub data_off: U64,
    /// Zero.
    pub reserved: [u8; 3836],
    /// CRC-32C of the preceding bytes (not salted).
    pub crc: U32,
}
const _: () = assert!(size_of::<SuperblockRaw>() == 4096);

disk_code! {
    /// A host slot's state.
    SlotState: u16 {
        /// Never claimed (all-zero sector).
        Never = 0,
        /// Owned by a live host, or by a dead one whose journal is unrecovered.
        Active = 1,
        /// Released cleanly or recovered.
        Free = 2,
    }
}

/// One host slot's header: who owns the slot and its journal.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SlotHeaderRaw {
    /// "CSLT".
    pub magic: [u8; 4],
    /// Record version.
    pub version: U16,
    /// [`SlotState`].
    pub state: U16,
    /// Slot index (guards against misdirected writes).
    pub index: U32,
    /// Padding.
    pub pad0: U32,
    /// Bumped on every write.
    pub generation: U64,
    /// Fencing token of the slot lock of the writer.
    pub token: U64,
    /// Owner host UUID.
    pub host_id: [u8; 16],
    /// Bytes of `host_name` in use.
    pub host_name_len: u8,
    /// Padding.
    pub pad1: [u8; 7],
    /// Owner host name.
    pub host_name: [u8; 64],
    /// When the owner claimed the slot (seconds since the epoch).
    pub claimed_at: U64,
    /// When the slot was last released or recovered.
    pub released_at: U64,
    /// Zero.
    pub reserved: [u8; 372],
    /// Salted CRC-32C.
    pub crc: U32,
}
const _: () = assert!(size_of::<SlotHeaderRaw>() == RECORD);

disk_code! {
    /// The state of a volume or tag record.
    RecState: u16 {
        /// Never used (all-zero sector).
        Empty = 0,
        /// Holds a live object.
        Live = 1,
        /// Freed; keeps its generation so generations stay monotonic per slot.
        Free = 2,
    }
}

/// The first 26 bytes of every volume and tag record: all a reader checks
/// before the record's own fields, and all a freed slot keeps.
#[derive(Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RecordHead {
    /// "CVOL" or "CTAG".
    pub magic: [u8; 4],
    /// Record version.
    pub version: U16,
    /// [`RecState`].
    pub state: U16,
    /// Bumped on every write of this slot.
    pub generation: U64,
    /// Fencing token of the writer's lock.
    pub token: U64,
    /// Host slot of the writer.
    pub writer_slot: U16,
}
const _: () = assert!(size_of::<RecordHead>() == 26);

/// A volume's metadata record.
#[derive(Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct VolumeRecordRaw {
    /// Magic "CVOL", version, state, generation, token, writer.
    pub head: RecordHead,
    /// 1 raw, 2 qcow2.
    pub format: u8,
    /// 1 legal, 2 illegal.
    pub legality: u8,
    /// 1 sparse, 2 preallocated.
    pub allocation: u8,
    /// Padding.
    pub pad0: [u8; 3],
    /// Volume id.
    pub id: [u8; 16],
    /// Parent tag id (all zero: none).
    pub parent: [u8; 16],
    /// Virtual size in bytes.
    pub capacity: U64,
    /// First extent of the run.
    pub extent_start: U64,
    /// Extents in the run.
    pub extent_count: U64,
    /// Creation time, seconds since the epoch.
    pub ctime: U64,
    /// Tags that point at this volume.
    pub tag_refs: U32,
    /// Bytes of `description` in use.
    pub desc_len: U16,
    /// Padding.
    pub pad1: U16,
    /// Free text (UTF-8).
    pub description: [u8; 400],
    /// Zero.
    pub reserved: [u8; 4],
    /// Salted CRC-32C.
    pub crc: U32,
}
const _: () = assert!(size_of::<VolumeRecordRaw>() == RECORD);

/// A tag's metadata record.
#[derive(Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TagRecordRaw {
    /// Magic "CTAG", version, state, generation, token, writer.
    pub head: RecordHead,
    /// 1 mutable, 0 immutable.
    pub mutable: u8,
    /// 1 strong, 2 weak.
    pub tag_type: u8,
    /// 1 optimized, 2 degraded, 3 broken.
    pub tag_state: u8,
    /// 1 chain, 2 copy.
    pub strategy: u8,
    /// Which user data half is current (0 or 1).
    pub ud_half: u8,
    /// Padding.
    pub pad0: u8,
    /// Tag id.
    pub id: [u8; 16],
    /// Volume the tag points at.
    pub volume: [u8; 16],
    /// Logical size in bytes.
    pub size: U64,
    /// Creation time, seconds since the epoch.
    pub ctime: U64,
    /// Volumes whose parent is this tag.
    pub child_refs: U32,
    /// Bytes of user data blob in the current half (0: none).
    pub ud_len: U32,
    /// Salted CRC-32C of the user data blob.
    pub ud_crc: U32,
    /// Bytes of `options` in use.
    pub options_len: U16,
    /// Padding.
    pub pad1: U16,
    /// Options as `key=value` lines.
    pub options: [u8; 408],
    /// Zero.
    pub reserved: [u8; 4],
    /// Salted CRC-32C.
    pub crc: U32,
}
const _: () = assert!(size_of::<TagRecordRaw>() == RECORD);

/// The allocation map root: its generation tells a host whether its cached
/// bitmaps are still current after it takes the allocation lock.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct AllocRootRaw {
    /// "CAMR".
    pub magic: [u8; 4],
    /// Record version.
    pub version: U16,
    /// Padding.
    pub pad0: U16,
    /// Bumped on every change of any bitmap page.
    pub generation: U64,
    /// Token of the allocation lock of the last writer.
    pub token: U64,
    /// Host slot of the last writer.
    pub writer_slot: U16,
    /// Padding.
    pub pad1: [u8; 6],
    /// Pages of the extent bitmap.
    pub extent_pages: U32,
    /// Pages of the volume slot bitmap.
    pub volume_pages: U32,
    /// Pages of the tag slot bitmap.
    pub tag_pages: U32,
    /// Zero.
    pub reserved: [u8; 4048],
    /// Salted CRC-32C.
    pub crc: U32,
}
const _: () = assert!(size_of::<AllocRootRaw>() == 4096);

/// Bits in one bitmap page.
pub const BITS_PER_PAGE: u64 = 4032 * 8;

/// One page of a bitmap (extents, volume slots or tag slots).
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct BitmapPageRaw {
    /// "CBMP".
    pub magic: [u8; 4],
    /// Record version.
    pub version: U16,
    /// 1 extents, 2 volume slots, 3 tag slots.
    pub map: u8,
    /// Padding.
    pub pad0: u8,
    /// Page index within its map.
    pub index: U32,
    /// Padding.
    pub pad1: U32,
    /// Bumped on every write of this page.
    pub generation: U64,
    /// Token of the allocation lock of the writer.
    pub token: U64,
    /// Bit i set: item `index * BITS_PER_PAGE + i` is in use (LSB first).
    pub bits: [u8; 4032],
    /// Zero.
    pub reserved: [u8; 28],
    /// Salted CRC-32C.
    pub crc: U32,
}
const _: () = assert!(size_of::<BitmapPageRaw>() == 4096);

disk_code! {
    /// A journal record's kind.
    JournalKind: u16 {
        /// An intent: what a transaction will change.
        Intent = 1,
        /// A commit: the intent with `intent_seq` is finished.
        Commit = 2,
    }
}

/// Payload bytes carried by one journal block.
pub const JOURNAL_PAYLOAD: usize = 4044;

/// One 4 KiB block of a journal record. Every block has its own header and
/// checksum, so a record is valid only when all its blocks are, and a block
/// of user-controlled payload can never pass for a record header.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct JournalBlockRaw {
    /// "CJNL".
    pub magic: [u8; 4],
    /// Record version.
    pub version: U16,
    /// [`JournalKind`].
    pub kind: U16,
    /// Record sequence number, increasing per slot.
    pub seq: U64,
    /// Oldest intent still open when this record was written: records
    /// below it are history.
    pub oldest_open: U64,
    /// Every record up to this sequence number was flushed before this one
    /// was written: a hole at or below it is corruption, not a torn tail.
    pub durable: U64,
    /// Host slot that owns the ring.
    pub slot: U16,
    /// Index of this block within the record.
    pub block_index: U16,
    /// Blocks in the record.
    pub block_count: U16,
    /// Padding.
    pub pad0: U16,
    /// Payload bytes of the whole record.
    pub payload_len: U32,
    /// Padding.
    pub pad1: U32,
    /// This block's share of the payload.
    pub payload: [u8; JOURNAL_PAYLOAD],
    /// Salted CRC-32C.
    pub crc: U32,
}
const _: () = assert!(size_of::<JournalBlockRaw>() == 4096);

/// Start of an intent's payload.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct IntentHeaderRaw {
    /// Number of actions that follow.
    pub action_count: U32,
    /// Padding.
    pub pad0: U32,
    /// When the intent was written (seconds since the epoch).
    pub created: U64,
    /// Caller's request id (idempotency), zero if none.
    pub request_id: [u8; 16],
    /// Bytes of `label` in use.
    pub label_len: u8,
    /// Padding.
    pub pad1: [u8; 7],
    /// What the transaction was ("create volume", ...), for dumps.
    pub label: [u8; 40],
}
const _: () = assert!(size_of::<IntentHeaderRaw>() == 80);

disk_code! {
    /// The kind of one action of an intent.
    ActionKind: u16 {
        /// Replace a volume record; two record images follow (before, after).
        PutVolume = 1,
        /// Replace a tag record; two record images follow (before, after).
        PutTag = 2,
        /// Set `count` bits from `start` in bitmap `target`.
        SetBits = 3,
        /// Clear `count` bits from `start` in bitmap `target`.
        ClearBits = 4,
        /// A user data blob of `len` bytes with checksum `crc` was written to
        /// half `half` of tag slot `target`; it must verify to roll forward.
        UserData = 5,
        /// The first `b` bytes of the run of the volume in slot `target` were
        /// written (zeros and pages) with checksum `c`; they must verify to
        /// roll forward. `a` is 0 (reserved for an offset).
        VolumeData = 6,
    }
}

/// One action of an intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ActionRaw {
    /// [`ActionKind`].
    pub kind: U16,
    /// Padding.
    pub pad0: U16,
    /// Slot index, or bitmap number for bit actions.
    pub target: U32,
    /// First bit, or user data half.
    pub a: U64,
    /// Bit count, or user data length.
    pub b: U64,
    /// User data checksum.
    pub c: U64,
}
const _: () = assert!(size_of::<ActionRaw>() == 32);

disk_code! {
    /// How an intent ended: a commit record's outcome.
    Direction: u8 {
        /// Applied (live, or rolled forward by recovery).
        Forward = 1,
        /// Rolled back by recovery.
        Back = 2,
    }
}

/// Payload of a commit record.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CommitRaw {
    /// Sequence number of the intent this commits.
    pub intent_seq: U64,
    /// [`Direction`].
    pub outcome: u8,
    /// Padding.
    pub pad0: [u8; 7],
    /// Slot of the host that resolved the intent (itself or a recoverer).
    pub resolver_slot: U16,
    /// Padding.
    pub pad1: [u8; 6],
}
const _: () = assert!(size_of::<CommitRaw>() == 24);

/// Header of a user data blob. Items follow as
/// `name_len: u8, name, data_len: u32 LE, data`.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct UserDataHeaderRaw {
    /// "CUDB".
    pub magic: [u8; 4],
    /// Record version.
    pub version: U16,
    /// Number of items.
    pub count: U16,
    /// Tag the blob belongs to.
    pub tag: [u8; 16],
    /// Total blob length including this header.
    pub total_len: U32,
    /// Padding.
    pub pad0: U32,
}
const _: () = assert!(size_of::<UserDataHeaderRaw>() == 32);

/// Copy `s` into a fixed buffer, returning the used length.
pub fn put_str(dst: &mut [u8], s: &str) -> usize {
    let b = s.as_bytes();
    dst[..b.len()].copy_from_slice(b);
    dst[b.len()..].fill(0);
    b.len()
}

/// Read a length-prefixed UTF-8 string from a fixed buffer; invalid UTF-8
/// or a length past the buffer is an error (never decoded lossily, so that
/// whatever decodes re-encodes to the same bytes).
pub fn get_str(src: &[u8], len: usize) -> Result<String, DecodeError> {
    let b = src
        .get(..len)
        .ok_or_else(|| DecodeError::field("text", "length out of range"))?;
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::field("text", "not UTF-8"))
}

/// The bytes of a declared structure (for tools outside this crate).
pub fn as_bytes<T: IntoBytes + Immutable>(v: &T) -> &[u8] {
    v.as_bytes()
}
