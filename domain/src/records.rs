//! Encoding and decoding of metadata records and user data blobs.

use std::collections::BTreeMap;

use serde::Serialize;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::layout::*;
use crate::model::*;

/// What a metadata slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot<T> {
    /// Never used.
    Empty,
    /// Freed at this generation.
    Free {
        /// Generation of the free record.
        generation: u64,
        /// Token of its writer.
        token: u64,
    },
    /// A live object.
    Live(T),
}

impl<T> Slot<T> {
    /// The generation of the slot and the token of its last writer (0
    /// and 0 if never used).
    fn stamp(&self) -> (u64, u64)
    where
        T: HasGeneration,
    {
        match self {
            Slot::Empty => (0, 0),
            Slot::Free { generation, token } => (*generation, *token),
            Slot::Live(t) => (t.generation(), t.token()),
        }
    }
    /// The generation of the slot (0 if never used).
    pub fn generation(&self) -> u64
    where
        T: HasGeneration,
    {
        self.stamp().0
    }
    /// The token of the slot's last writer (0 if never used).
    pub fn token(&self) -> u64
    where
        T: HasGeneration,
    {
        self.stamp().1
    }
    /// The live object, if any.
    pub fn live(self) -> Option<T> {
        match self {
            Slot::Live(t) => Some(t),
            _ => None,
        }
    }
}

/// Records with a generation and token.
pub trait HasGeneration {
    /// Record generation.
    fn generation(&self) -> u64;
    /// Writer's token.
    fn token(&self) -> u64;
    /// Writer's host slot.
    fn writer_slot(&self) -> u16;
}

/// A volume or a tag: what a metadata slot holds when it is live.
pub trait SlotRecord: HasGeneration + Clone {
    /// The magic of its records.
    const MAGIC: [u8; 4];
    /// "volume" or "tag".
    const KIND: &'static str;
    /// Its slot map in the allocation map.
    const MAP: usize;
    /// Encode as a live record.
    fn encode(&self, salt: &[u8; 16]) -> RecordBytes;
    /// Decode the record of slot `slot`.
    fn decode(salt: &[u8; 16], slot: u32, b: &[u8]) -> Result<Slot<Self>, DecodeError>;
    /// Where its table starts and how many slots it has.
    fn table(g: &crate::geometry::Geometry) -> (u64, u32);
    /// Stamp a rewrite of an existing record: the generation moves on and
    /// the writer's token and host slot are recorded.
    fn restamp(&mut self, token: u64, writer: u16);
}

/// A record type's [`SlotRecord`]: its magic, kind, slot map, codec and
/// table.
macro_rules! slot_record {
    ($t:ty, $magic:expr, $kind:literal, $map:expr, $enc:ident, $dec:ident, $off:ident, $slots:ident) => {
        impl HasGeneration for $t {
            fn generation(&self) -> u64 {
                self.generation
            }
            fn token(&self) -> u64 {
                self.token
            }
            fn writer_slot(&self) -> u16 {
                self.writer_slot
            }
        }

        impl SlotRecord for $t {
            const MAGIC: [u8; 4] = $magic;
            const KIND: &'static str = $kind;
            const MAP: usize = $map;
            fn encode(&self, salt: &[u8; 16]) -> RecordBytes {
                $enc(salt, self)
            }
            fn decode(salt: &[u8; 16], slot: u32, b: &[u8]) -> Result<Slot<Self>, DecodeError> {
                $dec(salt, slot, b)
            }
            fn table(g: &crate::geometry::Geometry) -> (u64, u32) {
                (g.$off, g.$slots)
            }
            fn restamp(&mut self, token: u64, writer: u16) {
                (self.generation, self.token, self.writer_slot) =
                    (self.generation + 1, token, writer);
            }
        }
    };
}

slot_record!(
    Volume,
    VOL_MAGIC,
    "volume",
    crate::alloc::VOLUME_SLOTS,
    encode_volume,
    decode_volume,
    volume_table_off,
    volume_slots
);
slot_record!(
    Tag,
    TAG_MAGIC,
    "tag",
    crate::alloc::TAG_SLOTS,
    encode_tag,
    decode_tag,
    tag_table_off,
    tag_slots
);

/// One record image.
pub type RecordBytes = [u8; RECORD];

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Encode a live volume.
pub fn encode_volume(salt: &[u8; 16], v: &Volume) -> RecordBytes {
    let mut r = VolumeRecordRaw::new_zeroed();
    r.head = live_head(VOL_MAGIC, v);
    r.format = v.format.code();
    r.legality = v.legality.code();
    r.allocation = v.allocation.code();
    r.id = v.id.0;
    r.parent = v.parent.map(|p| p.0).unwrap_or_default();
    r.capacity.set(v.capacity);
    r.extent_start.set(v.extent_start);
    r.extent_count.set(v.extent_count);
    r.ctime.set(v.ctime);
    r.tag_refs.set(v.tag_refs);
    r.desc_len
        .set(put_str(&mut r.description, &v.description) as u16);
    let mut out: RecordBytes = r.as_bytes().try_into().expect("512");
    seal(salt, &mut out);
    out
}

fn head(magic: [u8; 4], state: RecState, generation: u64, token: u64, writer: u16) -> RecordHead {
    let mut h = RecordHead::new_zeroed();
    h.magic = magic;
    h.version.set(RECORD_VERSION);
    h.state.set(state.code());
    h.generation.set(generation);
    h.token.set(token);
    h.writer_slot.set(writer);
    h
}

/// The head of live record `r`.
fn live_head(magic: [u8; 4], r: &impl HasGeneration) -> RecordHead {
    head(
        magic,
        RecState::Live,
        r.generation(),
        r.token(),
        r.writer_slot(),
    )
}

/// Encode a free volume or tag slot (keeps the generation monotonic).
pub fn encode_free(
    salt: &[u8; 16],
    magic: [u8; 4],
    generation: u64,
    token: u64,
    writer: u16,
) -> RecordBytes {
    let mut out = [0u8; RECORD];
    let h = head(magic, RecState::Free, generation, token, writer);
    out[..size_of::<RecordHead>()].copy_from_slice(h.as_bytes());
    seal(salt, &mut out);
    out
}

/// A record's magic (whether it is right), version and checksum, checked
/// in that order.
fn sealed(salt: &[u8; 16], b: &[u8], magic: bool, version: u16) -> Result<(), DecodeError> {
    if !magic {
        return Err(DecodeError::Magic);
    }
    if version != RECORD_VERSION {
        return Err(DecodeError::Version(version.into()));
    }
    if !verify(salt, b) {
        return Err(DecodeError::Checksum);
    }
    Ok(())
}

/// The checks every volume and tag record passes first: all zero is a slot
/// never used; then magic, version, checksum and state. `Some` is an empty
/// or free slot, `None` a live record whose own fields are still to read.
fn read_head<T>(salt: &[u8; 16], b: &[u8], magic: [u8; 4]) -> Result<Option<Slot<T>>, DecodeError> {
    if is_zero(b) {
        return Ok(Some(Slot::Empty));
    }
    let (h, _) = RecordHead::ref_from_prefix(b).map_err(|_| DecodeError::Length("record"))?;
    sealed(salt, b, h.magic == magic, h.version.get())?;
    match RecState::from_code(h.state.get()) {
        Some(RecState::Free) => Ok(Some(Slot::Free {
            generation: h.generation.get(),
            token: h.token.get(),
        })),
        Some(RecState::Live) => Ok(None),
        _ => Err(DecodeError::unknown("state", h.state.get())),
    }
}

/// A record's id bytes: they must name the slot they are in and be of the
/// record's kind (byte 4).
fn id_of(raw: [u8; 16], kind: u8, slot: u32) -> Result<[u8; 16], DecodeError> {
    let named = u32::from_be_bytes(raw[..4].try_into().expect("4 bytes"));
    if named != slot || raw[4] != kind {
        let id = uuid::Uuid::from_bytes(raw);
        return Err(DecodeError::field(
            "id",
            format!("{id} does not name slot {slot}"),
        ));
    }
    Ok(raw)
}

/// The raw form of the live record in `b`, or (`Err`) the empty or free
/// slot `b` is.
fn live_raw<'b, R, T>(
    salt: &[u8; 16],
    b: &'b [u8],
    magic: [u8; 4],
) -> Result<Result<&'b R, Slot<T>>, DecodeError>
where
    R: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable,
{
    let b = &b[..RECORD];
    if let Some(empty_or_free) = read_head(salt, b, magic)? {
        return Ok(Err(empty_or_free));
    }
    R::ref_from_bytes(b)
        .map(Ok)
        .map_err(|_| DecodeError::Length("record"))
}

/// Decode a volume slot; the error says what is wrong.
pub fn decode_volume(salt: &[u8; 16], slot: u32, b: &[u8]) -> Result<Slot<Volume>, DecodeError> {
    let r: &VolumeRecordRaw = match live_raw(salt, b, VOL_MAGIC)? {
        Ok(r) => r,
        Err(empty_or_free) => return Ok(empty_or_free),
    };
    let id = VolumeId(id_of(r.id, VolumeId::generate(0).0[4], slot)?);
    let format = Format::from_code(r.format).ok_or(DecodeError::unknown("format", r.format))?;
    let legality =
        Legality::from_code(r.legality).ok_or(DecodeError::unknown("legality", r.legality))?;
    let allocation = Allocation::from_code(r.allocation)
        .ok_or(DecodeError::unknown("allocation", r.allocation))?;
    let dl = r.desc_len.get() as usize;
    if dl > r.description.len() {
        return Err(DecodeError::field("description", "length out of range"));
    }
    Ok(Slot::Live(Volume {
        id,
        parent: TagId::from_bytes(r.parent),
        format,
        capacity: r.capacity.get(),
        extent_start: r.extent_start.get(),
        extent_count: r.extent_count.get(),
        legality,
        allocation,
        ctime: r.ctime.get(),
        description: get_str(&r.description, dl)?,
        tag_refs: r.tag_refs.get(),
        generation: r.head.generation.get(),
        token: r.head.token.get(),
        writer_slot: r.head.writer_slot.get(),
    }))
}

/// Encode a live tag.
pub fn encode_tag(salt: &[u8; 16], t: &Tag) -> RecordBytes {
    let mut r = TagRecordRaw::new_zeroed();
    r.head = live_head(TAG_MAGIC, t);
    r.mutable = t.mutable as u8;
    r.tag_type = t.tag_type.code();
    r.tag_state = t.state.code();
    r.strategy = t.strategy.code();
    r.ud_half = t.user_data.half;
    r.id = t.id.0;
    r.volume = t.volume.0;
    r.size.set(t.size);
    r.ctime.set(t.ctime);
    r.child_refs.set(t.child_refs);
    r.ud_len.set(t.user_data.len);
    r.ud_crc.set(t.user_data.crc);
    let opts = encode_options(&t.options).expect("options validated before encoding");
    r.options_len.set(put_str(&mut r.options, &opts) as u16);
    let mut out: RecordBytes = r.as_bytes().try_into().expect("512");
    seal(salt, &mut out);
    out
}

/// Decode a tag slot; the error says what is wrong.
pub fn decode_tag(salt: &[u8; 16], slot: u32, b: &[u8]) -> Result<Slot<Tag>, DecodeError> {
    let r: &TagRecordRaw = match live_raw(salt, b, TAG_MAGIC)? {
        Ok(r) => r,
        Err(empty_or_free) => return Ok(empty_or_free),
    };
    let id = TagId(id_of(r.id, TagId::generate(0).0[4], slot)?);
    let volume = VolumeId::from_bytes(r.volume).ok_or(DecodeError::field("volume", "none"))?;
    let ol = r.options_len.get() as usize;
    if ol > r.options.len() {
        return Err(DecodeError::field("options", "length out of range"));
    }
    let options = std::str::from_utf8(&r.options[..ol])
        .ok()
        .and_then(decode_options)
        .ok_or(DecodeError::field("options", "malformed"))?;
    if r.mutable > 1 || r.ud_half > 1 {
        return Err(DecodeError::field("mutable", "not 0 or 1"));
    }
    Ok(Slot::Live(Tag {
        id,
        volume,
        size: r.size.get(),
        mutable: r.mutable == 1,
        strategy: Strategy::from_code(r.strategy)
            .ok_or(DecodeError::unknown("strategy", r.strategy))?,
        options,
        tag_type: TagType::from_code(r.tag_type)
            .ok_or(DecodeError::unknown("tag type", r.tag_type))?,
        state: TagState::from_code(r.tag_state)
            .ok_or(DecodeError::unknown("tag state", r.tag_state))?,
        ctime: r.ctime.get(),
        child_refs: r.child_refs.get(),
        user_data: UserDataRef {
            half: r.ud_half,
            len: r.ud_len.get(),
            crc: r.ud_crc.get(),
        },
        generation: r.head.generation.get(),
        token: r.head.token.get(),
        writer_slot: r.head.writer_slot.get(),
    }))
}

/// A host slot header, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotHeader {
    /// Never claimed, active or free.
    pub state: SlotState,
    /// Bumped on every write.
    pub generation: u64,
    /// Slot lock token of the writer.
    pub token: u64,
    /// Owner host id.
    pub host_id: uuid::Uuid,
    /// Owner host name.
    pub host_name: String,
    /// Claim time.
    pub claimed_at: u64,
    /// Release time.
    pub released_at: u64,
}

impl SlotHeader {
    /// Encode for slot `index`.
    pub fn encode(&self, salt: &[u8; 16], index: u32) -> RecordBytes {
        let mut r = SlotHeaderRaw::new_zeroed();
        r.magic = SLOT_MAGIC;
        r.version.set(RECORD_VERSION);
        r.state.set(self.state.code());
        r.index.set(index);
        r.generation.set(self.generation);
        r.token.set(self.token);
        r.host_id = *self.host_id.as_bytes();
        let name = if self.host_name.len() > 64 {
            &self.host_name[..64]
        } else {
            &self.host_name
        };
        r.host_name_len = put_str(&mut r.host_name, name) as u8;
        r.claimed_at.set(self.claimed_at);
        r.released_at.set(self.released_at);
        let mut out: RecordBytes = r.as_bytes().try_into().expect("512");
        seal(salt, &mut out);
        out
    }

    /// Decode slot `index`'s header (all zero: never used).
    pub fn decode(salt: &[u8; 16], index: u32, b: &[u8]) -> Result<SlotHeader, DecodeError> {
        let b = &b[..RECORD];
        if is_zero(b) {
            return Ok(SlotHeader {
                state: SlotState::Never,
                generation: 0,
                token: 0,
                host_id: uuid::Uuid::nil(),
                host_name: String::new(),
                claimed_at: 0,
                released_at: 0,
            });
        }
        let r = SlotHeaderRaw::ref_from_bytes(b).map_err(|_| DecodeError::Length("record"))?;
        sealed(salt, b, r.magic == SLOT_MAGIC, r.version.get())?;
        if r.index.get() != index {
            return Err(DecodeError::field(
                "index",
                format!("header of slot {} found in slot {index}", r.index.get()),
            ));
        }
        let state = match SlotState::from_code(r.state.get()) {
            Some(s @ (SlotState::Active | SlotState::Free)) => s,
            _ => return Err(DecodeError::unknown("state", r.state.get())),
        };
        if r.host_name_len as usize > r.host_name.len() {
            return Err(DecodeError::field("host_name", "length out of range"));
        }
        Ok(SlotHeader {
            state,
            generation: r.generation.get(),
            token: r.token.get(),
            host_id: uuid::Uuid::from_bytes(r.host_id),
            host_name: get_str(&r.host_name, r.host_name_len as usize)?,
            claimed_at: r.claimed_at.get(),
            released_at: r.released_at.get(),
        })
    }
}

/// Named user data items of a tag.
pub type UserData = BTreeMap<String, Vec<u8>>;

/// Largest user data item name.
pub use crate::limits::MAX_ITEM_NAME;

/// Check a user data item name.
pub fn valid_item_name(n: &str) -> bool {
    crate::limits::is_name(n, MAX_ITEM_NAME)
}

/// Encode user data items as a blob.
pub fn encode_user_data(tag: &TagId, items: &UserData) -> Vec<u8> {
    let mut h = UserDataHeaderRaw::new_zeroed();
    h.magic = USER_DATA_MAGIC;
    h.version.set(RECORD_VERSION);
    h.count.set(items.len() as u16);
    h.tag = tag.0;
    let mut out = h.as_bytes().to_vec();
    for (k, v) in items {
        out.push(k.len() as u8);
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    let total = out.len() as u32;
    out[24..28].copy_from_slice(&total.to_le_bytes());
    out
}

/// Size a set of items would take encoded.
pub fn encoded_user_data_len(items: &UserData) -> usize {
    size_of::<UserDataHeaderRaw>()
        + items
            .iter()
            .map(|(k, v)| 1 + k.len() + 4 + v.len())
            .sum::<usize>()
}

/// Decode a user data blob of `tag`.
pub fn decode_user_data(tag: &TagId, b: &[u8]) -> Result<UserData, DecodeError> {
    let (h, mut rest) = UserDataHeaderRaw::read_from_prefix(b)
        .map_err(|_| DecodeError::Length("user data header"))?;
    if h.magic != USER_DATA_MAGIC {
        return Err(DecodeError::Magic);
    }
    if h.version.get() != RECORD_VERSION {
        return Err(DecodeError::Version(h.version.get().into()));
    }
    if h.tag != tag.0 {
        return Err(DecodeError::field("tag", "another tag's blob"));
    }
    if h.total_len.get() as usize != b.len() {
        return Err(DecodeError::field("length", "disagrees with the header"));
    }
    let mut items = UserData::new();
    for i in 0..h.count.get() {
        let (&nl, r) = rest
            .split_first()
            .ok_or_else(|| DecodeError::field("items", format!("item {i} truncated")))?;
        let nl = nl as usize;
        if r.len() < nl + 4 {
            return Err(DecodeError::field("items", format!("item {i} truncated")));
        }
        let name = std::str::from_utf8(&r[..nl])
            .map_err(|_| DecodeError::field("items", format!("item {i} name not UTF-8")))?;
        if !valid_item_name(name) {
            return Err(DecodeError::field(
                "items",
                format!("item {i} has an invalid name"),
            ));
        }
        let dl = u32::from_le_bytes(r[nl..nl + 4].try_into().expect("4")) as usize;
        let r = &r[nl + 4..];
        if r.len() < dl {
            return Err(DecodeError::field(
                "items",
                format!("item {i} data truncated"),
            ));
        }
        if items.insert(name.to_string(), r[..dl].to_vec()).is_some() {
            return Err(DecodeError::field(
                "items",
                format!("item {name:?} appears twice"),
            ));
        }
        rest = &r[dl..];
    }
    if !rest.is_empty() {
        return Err(DecodeError::Length("user data"));
    }
    Ok(items)
}
