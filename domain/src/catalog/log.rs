//! The catalog's change log: the anchor's user data item `log`, written
//! in every catalog transaction beside the head. It names the tags each
//! of the latest generations touched, so that a reader that knows the
//! catalog at generation `g` learns what changed since by reading the
//! anchor and those tags, not the whole tag table.
//!
//! Invariants:
//! - every tag a generation in `since + 1 ..= head` touched is in the log
//!   (a generation is dropped whole when the log is full, raising
//!   `since`);
//! - entries are in generation order, each above `since` and at most the
//!   head's generation (the head and the log are one blob: one write).

use std::collections::BTreeSet;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::*;
use crate::engine::Naming;

/// User data item of the anchor holding the [`CatalogLog`].
pub const LOG_ITEM: &str = "log";
/// Magic of the change log.
pub const LOG_MAGIC: [u8; 4] = *b"CLOG";
/// Version of the change log.
pub const LOG_VERSION: u16 = 1;
/// Most entries the log keeps (`24 + 128 * 24` bytes: it fits the
/// smallest user data size, 4 KiB, beside the head).
pub const MAX_LOG: usize = 128;

/// The change log's fixed start as stored; [`LogEntryRaw`]s follow.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CatalogLogRaw {
    /// [`LOG_MAGIC`].
    pub magic: [u8; 4],
    /// [`LOG_VERSION`].
    pub version: U16,
    /// Feature bits; none are defined, any set bit is refused.
    pub features: U16,
    /// Every change after this generation is in the log.
    pub since: U64,
    /// Entries that follow.
    pub count: U16,
    /// Zero.
    pub reserved: U16,
    /// The first four bytes of SHA-256 over the domain id, bytes 0–19 and
    /// the entries.
    pub checksum: U32,
}

const _: () = assert!(size_of::<CatalogLogRaw>() == 24);

/// One tag one generation touched.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct LogEntryRaw {
    /// The generation.
    pub generation: U64,
    /// The tag's id.
    pub tag: [u8; 16],
}

const _: () = assert!(size_of::<LogEntryRaw>() == 24);

/// What the latest catalog generations touched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CatalogLog {
    /// Every change after this generation is in `entries`.
    pub since: u64,
    /// Generation and tag, in generation order.
    pub entries: Vec<(u64, TagId)>,
}

fn digest(salt: &[u8; 16], b: &[u8]) -> u32 {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    c.update(salt);
    c.update(&b[..20]);
    c.update(&b[24..]);
    let d = c.finish();
    u32::from_le_bytes(d.as_ref()[..4].try_into().expect("4 bytes"))
}

/// Seal log bytes `b`: write their checksum.
pub fn seal(salt: &[u8; 16], b: &mut [u8]) {
    let c = digest(salt, b);
    b[20..24].copy_from_slice(&c.to_le_bytes());
}

impl CatalogLog {
    /// An empty log that covers nothing before generation `g`.
    pub fn starting_at(g: u64) -> CatalogLog {
        CatalogLog {
            since: g,
            entries: Vec::new(),
        }
    }

    /// Unsealed bytes with the tag ids in place.
    fn raw(&self) -> Vec<u8> {
        let head = CatalogLogRaw {
            magic: LOG_MAGIC,
            version: LOG_VERSION.into(),
            features: 0.into(),
            since: self.since.into(),
            count: (self.entries.len() as u16).into(),
            reserved: 0.into(),
            checksum: 0.into(),
        };
        let mut b = head.as_bytes().to_vec();
        for (g, t) in &self.entries {
            let e = LogEntryRaw {
                generation: (*g).into(),
                tag: *t.as_bytes(),
            };
            b.extend_from_slice(e.as_bytes());
        }
        b
    }

    /// Its bytes on domain `salt`.
    pub fn encode(&self, salt: &[u8; 16]) -> Vec<u8> {
        let mut b = self.raw();
        seal(salt, &mut b);
        b
    }

    /// From its bytes on domain `salt`.
    pub fn decode(salt: &[u8; 16], b: &[u8]) -> std::result::Result<CatalogLog, DecodeError> {
        let (raw, rest) = CatalogLogRaw::read_from_prefix(b)
            .map_err(|_| DecodeError::Length("change log is at least 24 bytes"))?;
        if raw.magic != LOG_MAGIC {
            return Err(DecodeError::Magic);
        }
        if raw.version.get() != LOG_VERSION {
            return Err(DecodeError::Version(raw.version.get().into()));
        }
        let count = raw.count.get() as usize;
        if count > MAX_LOG || rest.len() != count * size_of::<LogEntryRaw>() {
            return Err(DecodeError::field(
                "count",
                format!("{count} entries in {} bytes", rest.len()),
            ));
        }
        if digest(salt, b) != raw.checksum.get() {
            return Err(DecodeError::Checksum);
        }
        if raw.features.get() != 0 {
            return Err(DecodeError::field(
                "features",
                format!("unknown bits {:#x}", raw.features.get()),
            ));
        }
        if raw.reserved.get() != 0 {
            return Err(DecodeError::field("reserved", "not zero"));
        }
        let since = raw.since.get();
        let mut entries = Vec::with_capacity(count);
        let mut last = since + 1;
        for c in rest.chunks_exact(size_of::<LogEntryRaw>()) {
            let e = LogEntryRaw::read_from_bytes(c).expect("24 bytes");
            let g = e.generation.get();
            if g < last {
                return Err(DecodeError::field(
                    "entries",
                    format!("generation {g} after {last} or at most since {since}"),
                ));
            }
            let tag = TagId::from_stored(e.tag)
                .ok_or_else(|| DecodeError::field("entries", "not a tag id"))?;
            entries.push((g, tag));
            last = g;
        }
        Ok(CatalogLog { since, entries })
    }

    /// The newest generation it knows of.
    pub fn newest(&self) -> u64 {
        self.entries.last().map_or(self.since, |e| e.0)
    }

    /// The tags changed after generation `g`, each once; `None` when the
    /// log does not reach back that far.
    pub fn changed_since(&self, g: u64) -> Option<Vec<TagId>> {
        if g < self.since {
            return None;
        }
        let mut seen = BTreeSet::new();
        Some(
            self.entries
                .iter()
                .filter(|(eg, _)| *eg > g)
                .filter(|(_, t)| seen.insert(*t))
                .map(|(_, t)| *t)
                .collect(),
        )
    }

    /// This log with generation `g` touching `tags` added, the oldest
    /// generations dropped whole to make room, as [`Naming`] bytes (the
    /// ids of tags the transaction creates are put in while planning).
    pub fn next(&self, g: u64, tags: &[TagRef]) -> Naming {
        let placeholder = TagId([0; 16]);
        let mut log = self.clone();
        let mut n = tags.len();
        if n > MAX_LOG {
            log = CatalogLog::starting_at(g);
            n = 0;
        }
        while log.entries.len() + n > MAX_LOG {
            let oldest = log.entries[0].0;
            log.entries.retain(|e| e.0 != oldest);
            log.since = oldest;
        }
        let first = log.entries.len();
        let ids = tags[..n]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                log.entries.push((
                    g,
                    match t {
                        TagRef::Existing(id) => *id,
                        TagRef::New(_) => placeholder,
                    },
                ));
                let off = size_of::<CatalogLogRaw>() + (first + i) * size_of::<LogEntryRaw>() + 8;
                (off, *t)
            })
            .collect();
        Naming {
            bytes: log.raw(),
            ids,
            seal,
        }
    }
}
