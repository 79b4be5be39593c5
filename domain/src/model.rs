//! Domain types: ids, volumes, tags and what callers ask for.
//!
//! Ids are UUID-shaped and carry the index of the metadata slot that holds
//! the object, so any host finds a record with one read, with no index to
//! keep coherent between hosts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{DomainError, Result};

const VOLUME_KIND: u8 = 0x56; // 'V'
const TAG_KIND: u8 = 0x7a;

fn make_id(kind: u8, slot: u32) -> [u8; 16] {
    let mut b = *uuid::Uuid::new_v4().as_bytes();
    b[..4].copy_from_slice(&slot.to_be_bytes());
    b[4] = kind;
    b[6] = (b[6] & 0x0f) | 0x80; // UUID version 8 (custom layout)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    b
}

fn parse_id(kind: u8, field: &'static str, s: &str) -> Result<[u8; 16]> {
    let u = uuid::Uuid::parse_str(s.trim()).map_err(|e| {
        DomainError::invalid(
            field,
            format!("{} is not a UUID: {e}", crate::limits::quote(s)),
        )
    })?;
    let b = *u.as_bytes();
    if b[4] != kind || b[6] >> 4 != 8 {
        let what = if kind == VOLUME_KIND { "volume" } else { "tag" };
        return Err(DomainError::invalid(
            field,
            format!("{s} is not a Cairn {what} id"),
        ));
    }
    Ok(b)
}

macro_rules! id_type {
    ($name:ident, $kind:expr, $field:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub(crate) [u8; 16]);

        impl $name {
            /// A new random id for the object in `slot`.
            pub fn generate(slot: u32) -> Self {
                $name(make_id($kind, slot))
            }
            /// The metadata slot the id names.
            pub fn slot(&self) -> u32 {
                u32::from_be_bytes(self.0[..4].try_into().expect("4 bytes"))
            }
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }
            /// From raw bytes as stored in a record; `None` for all-zero.
            pub fn from_bytes(b: [u8; 16]) -> Option<Self> {
                (b != [0; 16]).then_some($name(b))
            }
            /// From stored bytes that must be an id of this kind.
            pub fn from_stored(b: [u8; 16]) -> Option<Self> {
                (b[4] == $kind && b[6] >> 4 == 8).then_some($name(b))
            }
            /// Parse, naming the field in the error.
            pub fn parse(field: &'static str, s: &str) -> Result<Self> {
                parse_id($kind, field, s).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                uuid::Uuid::from_bytes(self.0).fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self)
            }
        }

        impl FromStr for $name {
            type Err = DomainError;
            fn from_str(s: &str) -> Result<Self> {
                $name::parse($field, s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(VolumeId, VOLUME_KIND, "volume_id", "A volume's id.");
id_type!(TagId, TAG_KIND, "tag_id", "A tag's id.");

macro_rules! code_enum {
    ($name:ident, $doc:literal, { $($(#[$m:meta])* $var:ident = $code:literal, $text:literal;)+ }) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$m])* $var,)+
        }
        impl $name {
            /// The on-disk code.
            pub fn code(self) -> u8 {
                match self { $($name::$var => $code,)+ }
            }
            /// From the on-disk code.
            pub fn from_code(c: u8) -> Option<Self> {
                match c { $($code => Some($name::$var),)+ _ => None }
            }
            /// The name used in the CLI and in JSON.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $text,)+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $name {
            type Err = DomainError;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($text => Ok($name::$var),)+
                    _ => Err(DomainError::invalid(
                        stringify!($name),
                        format!("unknown value {} (expected one of: {})", crate::limits::quote(s), [$($text),+].join(", ")),
                    )),
                }
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

code_enum!(Format, "Data format of a volume.", {
    /// Plain bytes.
    Raw = 1, "raw";
    /// A qcow2 image inside the volume's extent run.
    Qcow2 = 2, "qcow2";
});
code_enum!(Legality, "Whether a volume's data is complete.", {
    /// Complete and usable.
    Legal = 1, "legal";
    /// Being created, copied or removed; not to be used.
    Illegal = 2, "illegal";
});
code_enum!(Allocation, "How a volume's data area is provisioned.", {
    /// Allocated as written.
    Sparse = 1, "sparse";
    /// Fully allocated up front.
    Preallocated = 2, "preallocated";
});
code_enum!(TagType, "Who may see a tag.", {
    /// User-visible.
    Strong = 1, "strong";
    /// Internal (for example a snapshot's parent handle).
    Weak = 2, "weak";
});
code_enum!(TagState, "Health of the volume a tag points at.", {
    /// Operational and in an optimal state.
    Optimized = 1, "optimized";
    /// Operational but not optimal.
    Degraded = 2, "degraded";
    /// Incomplete or corrupted.
    Broken = 3, "broken";
});
code_enum!(Strategy, "How the image manipulator snapshots and clones a tag.", {
    /// Thin: new qcow2 layers on top of the chain.
    Chain = 1, "chain";
    /// Full copies.
    Copy = 2, "copy";
});

/// A volume as stored on the domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    /// Id (names its metadata slot).
    pub id: VolumeId,
    /// Parent tag, if any.
    pub parent: Option<TagId>,
    /// Data format.
    pub format: Format,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// First extent of the run.
    pub extent_start: u64,
    /// Extents in the run.
    pub extent_count: u64,
    /// Complete or not.
    pub legality: Legality,
    /// Provisioning.
    pub allocation: Allocation,
    /// Creation time (seconds since the epoch).
    pub ctime: u64,
    /// Free text.
    pub description: String,
    /// Tags pointing at this volume.
    pub tag_refs: u32,
    /// Record generation (bumped on every change).
    pub generation: u64,
    /// Fencing token of the last writer.
    pub token: u64,
    /// Host slot of the last writer.
    pub writer_slot: u16,
}

/// What a caller asks for when creating a volume.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Data format.
    pub format: Format,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Bytes of extent run to allocate (rounded up to whole extents).
    pub size: u64,
    /// Provisioning.
    pub allocation: Allocation,
    /// Parent tag (existing or created earlier in the same transaction).
    pub parent: Option<TagRef>,
    /// Initial legality.
    pub legality: Legality,
    /// Free text.
    pub description: String,
}

impl VolumeSpec {
    /// A sparse, legal raw volume of `capacity` bytes without a parent.
    pub fn raw(capacity: u64, description: impl Into<String>) -> VolumeSpec {
        VolumeSpec {
            format: Format::Raw,
            capacity,
            size: capacity,
            allocation: Allocation::Sparse,
            parent: None,
            legality: Legality::Legal,
            description: description.into(),
        }
    }
}

/// The changeable part of a volume's metadata; writing it replaces all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Parent tag (a rebase changes it).
    pub parent: Option<TagId>,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Complete or not.
    pub legality: Legality,
    /// Free text.
    pub description: String,
}

impl Volume {
    /// The changeable part of this volume's metadata.
    pub fn meta(&self) -> VolumeMeta {
        VolumeMeta {
            parent: self.parent,
            capacity: self.capacity,
            legality: self.legality,
            description: self.description.clone(),
        }
    }
}

/// Where a tag's user data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UserDataRef {
    /// Current half (0 or 1).
    pub half: u8,
    /// Blob bytes (0: none).
    pub len: u32,
    /// Salted CRC-32C of the blob.
    pub crc: u32,
}

/// A tag as stored on the domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tag {
    /// Id (names its metadata slot).
    pub id: TagId,
    /// The volume it points at.
    pub volume: VolumeId,
    /// Logical size in bytes.
    pub size: u64,
    /// Whether operations may change the image it names.
    pub mutable: bool,
    /// Snapshot/clone strategy.
    pub strategy: Strategy,
    /// Low-level options.
    pub options: Vec<(String, String)>,
    /// Strong or weak.
    pub tag_type: TagType,
    /// Health.
    pub state: TagState,
    /// Creation time (seconds since the epoch).
    pub ctime: u64,
    /// Volumes whose parent is this tag.
    pub child_refs: u32,
    /// User data location.
    pub user_data: UserDataRef,
    /// Record generation.
    pub generation: u64,
    /// Fencing token of the last writer.
    pub token: u64,
    /// Host slot of the last writer.
    pub writer_slot: u16,
}

/// A tag's metadata as callers set it; a change replaces all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagMeta {
    /// The volume it points at.
    pub volume: VolumeRef,
    /// Logical size in bytes.
    pub size: u64,
    /// Whether operations may change the image it names.
    pub mutable: bool,
    /// Snapshot/clone strategy.
    pub strategy: Strategy,
    /// Low-level options.
    pub options: Vec<(String, String)>,
    /// Strong or weak.
    pub tag_type: TagType,
    /// Health.
    pub state: TagState,
}

impl TagMeta {
    /// A disk's tag on `volume`: strong, mutable, thin, healthy.
    pub fn disk(volume: VolumeRef, size: u64, options: Vec<(String, String)>) -> TagMeta {
        TagMeta {
            volume,
            size,
            mutable: true,
            strategy: Strategy::Chain,
            options,
            tag_type: TagType::Strong,
            state: TagState::Optimized,
        }
    }
}

impl Tag {
    /// An option's value.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// This tag's metadata in the form callers set it.
    pub fn meta(&self) -> TagMeta {
        TagMeta {
            volume: VolumeRef::Existing(self.volume),
            size: self.size,
            mutable: self.mutable,
            strategy: self.strategy,
            options: self.options.clone(),
            tag_type: self.tag_type,
            state: self.state,
        }
    }
}

/// A volume named by id, or created earlier in the same transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeRef {
    /// An existing volume.
    Existing(VolumeId),
    /// The n-th volume created by this transaction.
    New(usize),
}

/// A tag named by id, or created earlier in the same transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagRef {
    /// An existing tag.
    Existing(TagId),
    /// The n-th tag created by this transaction.
    New(usize),
}

impl From<VolumeId> for VolumeRef {
    fn from(v: VolumeId) -> Self {
        VolumeRef::Existing(v)
    }
}

impl From<TagId> for TagRef {
    fn from(t: TagId) -> Self {
        TagRef::Existing(t)
    }
}

pub use crate::limits::{check_text as validate_text, MAX_CAPACITY, MAX_DESCRIPTION, MAX_OPTIONS};

fn valid_key(k: &str) -> bool {
    crate::limits::is_name(k, crate::limits::MAX_KEY)
}

/// Encode tag options as `key=value` lines, validating them.
pub fn encode_options(opts: &[(String, String)]) -> Result<String> {
    let mut out = String::new();
    for (i, (k, v)) in opts.iter().enumerate() {
        crate::limits::check_name("options", "key ", k, crate::limits::MAX_KEY)?;
        if opts[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(DomainError::invalid(
                "options",
                format!("duplicate key {}", crate::limits::quote(k)),
            ));
        }
        validate_text("options", v, MAX_OPTIONS)?;
        if i > 0 {
            out.push('\n');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    if out.len() > MAX_OPTIONS {
        return Err(DomainError::invalid(
            "options",
            format!(
                "{} encoded bytes is over the limit of {MAX_OPTIONS}",
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// Decode tag options; `None` if malformed or if they could not have been
/// written (a control character, a key twice): what decodes encodes again.
pub fn decode_options(s: &str) -> Option<Vec<(String, String)>> {
    if s.is_empty() {
        return Some(Vec::new());
    }
    let opts: Vec<(String, String)> = s
        .split('\n')
        .map(|line| {
            let (k, v) = line.split_once('=')?;
            valid_key(k).then(|| (k.to_string(), v.to_string()))
        })
        .collect::<Option<_>>()?;
    encode_options(&opts).ok()?;
    Some(opts)
}

/// Parse a `KEY=VALUE` option argument.
pub fn parse_option(s: &str) -> Result<(String, String)> {
    let (k, v) = s.split_once('=').ok_or_else(|| {
        DomainError::invalid(
            "options",
            format!("{} is not KEY=VALUE", crate::limits::quote(s)),
        )
    })?;
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_embed_their_slot_and_kind() {
        let v = VolumeId::generate(42);
        assert_eq!(v.slot(), 42);
        let s = v.to_string();
        assert!(s.starts_with("0000002a-56"), "{s}");
        assert_eq!(s.parse::<VolumeId>().unwrap(), v);
        // A tag id is not a volume id.
        let t = TagId::generate(42);
        let err = t.to_string().parse::<VolumeId>().unwrap_err();
        assert!(err.to_string().contains("volume_id"), "{err}");
        assert!("nonsense".parse::<TagId>().is_err());
    }

    #[test]
    fn options_round_trip_and_validation() {
        let o = vec![("a".into(), "1".into()), ("b.c".into(), "x=y".into())];
        let e = encode_options(&o).unwrap();
        assert_eq!(decode_options(&e).unwrap(), o);
        assert!(encode_options(&[("bad key".into(), "v".into())]).is_err());
        assert!(encode_options(&[("k".into(), "a\nb".into())]).is_err());
        assert!(encode_options(&[("k".into(), "1".into()), ("k".into(), "2".into())]).is_err());
    }

    #[test]
    fn enums_parse_and_name() {
        assert_eq!("qcow2".parse::<Format>().unwrap(), Format::Qcow2);
        let e = "vmdk".parse::<Format>().unwrap_err().to_string();
        assert!(e.contains("raw, qcow2"), "{e}");
        assert_eq!(Format::from_code(9), None);
    }
}
