//! The per-host intent journal: a ring of 4 KiB blocks in the host's slot.
//!
//! A transaction writes an INTENT record (every change it will make, with
//! the before image of every record), flushes, applies, flushes, and writes
//! a COMMIT record. The commit is not flushed on its own: a lost commit only
//! makes recovery roll an already-applied intent forward again, which
//! changes nothing.
//!
//! Records never wrap around the ring's end, and the writer never overwrites
//! an open intent. Each record carries `oldest_open` (records below it are
//! history) and `durable` (every record up to it was flushed); a damaged
//! record at or below `durable` is corruption, above it a torn tail.

mod ring;

pub use ring::{
    decode_block, encode_record, scan, BlockInfo, JournalWriter, RecordHeader, Scan, ScannedRecord,
};

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::layout::*;

/// One action of an intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Replace volume slot `slot` (`before` is what it held).
    PutVolume {
        /// Volume slot.
        slot: u32,
        /// Record before.
        before: Box<[u8; RECORD]>,
        /// Record after.
        after: Box<[u8; RECORD]>,
    },
    /// Replace tag slot `slot`.
    PutTag {
        /// Tag slot.
        slot: u32,
        /// Record before.
        before: Box<[u8; RECORD]>,
        /// Record after.
        after: Box<[u8; RECORD]>,
    },
    /// Set bits of bitmap `map`.
    SetBits {
        /// 0 extents, 1 volume slots, 2 tag slots.
        map: u8,
        /// First bit.
        start: u64,
        /// Number of bits.
        count: u64,
    },
    /// Clear bits of bitmap `map`.
    ClearBits {
        /// 0 extents, 1 volume slots, 2 tag slots.
        map: u8,
        /// First bit.
        start: u64,
        /// Number of bits.
        count: u64,
    },
    /// A user data blob was written to a tag's inactive half before the
    /// intent; the intent can roll forward only if it verifies.
    UserData {
        /// Tag slot.
        slot: u32,
        /// Half written.
        half: u8,
        /// Blob length.
        len: u32,
        /// Salted CRC-32C of the blob.
        crc: u32,
    },
    /// The start of a new volume's run was initialised (zeroed, then pages
    /// written) while the intent was open; it must verify to roll forward.
    VolumeData {
        /// Volume slot (its after image names the run).
        slot: u32,
        /// Bytes from the start of the run.
        len: u64,
        /// Salted CRC-32C of those bytes.
        crc: u32,
    },
}

/// Most bytes of a run one intent may initialise: recovery reads them all
/// back to verify them.
pub const MAX_VOLUME_DATA: u64 = 64 << 20;

/// A decoded intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// When it was written.
    pub created: u64,
    /// Caller's request id (zero: none).
    pub request_id: [u8; 16],
    /// What the transaction was.
    pub label: String,
    /// The changes, in apply order.
    pub actions: Vec<Action>,
}

pub use crate::geometry::Table;

/// What a put action writes: a slot of a table, and its record before and
/// after.
#[derive(Debug, Clone, Copy)]
pub struct Put<'a> {
    /// The table.
    pub table: Table,
    /// The slot.
    pub slot: u32,
    /// What the slot held.
    pub before: &'a [u8; RECORD],
    /// What it holds once the intent is applied.
    pub after: &'a [u8; RECORD],
}

impl Action {
    /// The put action writing `slot` of `table`.
    pub fn put(
        table: Table,
        slot: u32,
        before: Box<[u8; RECORD]>,
        after: Box<[u8; RECORD]>,
    ) -> Action {
        match table {
            Table::Volume => Action::PutVolume {
                slot,
                before,
                after,
            },
            Table::Tag => Action::PutTag {
                slot,
                before,
                after,
            },
        }
    }

    /// What this action writes, if it is a put.
    pub fn as_put(&self) -> Option<Put<'_>> {
        let (table, slot, before, after) = match self {
            Action::PutVolume {
                slot,
                before,
                after,
            } => (Table::Volume, slot, before, after),
            Action::PutTag {
                slot,
                before,
                after,
            } => (Table::Tag, slot, before, after),
            _ => return None,
        };
        Some(Put {
            table,
            slot: *slot,
            before,
            after,
        })
    }
}

/// Most actions one intent may carry.
pub const MAX_ACTIONS: usize = 1 << 16;

impl Intent {
    /// Encode as a journal payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut h = IntentHeaderRaw::new_zeroed();
        h.action_count.set(self.actions.len() as u32);
        h.created.set(self.created);
        h.request_id = self.request_id;
        let label = truncate_utf8(&self.label, 40);
        h.label_len = put_str(&mut h.label, label) as u8;
        let mut out = h.as_bytes().to_vec();
        for a in &self.actions {
            let mut r = ActionRaw::new_zeroed();
            let images: Option<(&[u8; RECORD], &[u8; RECORD])> = match a {
                Action::PutVolume { .. } | Action::PutTag { .. } => {
                    let p = a.as_put().expect("a put");
                    let kind = match p.table {
                        Table::Volume => ActionKind::PutVolume,
                        Table::Tag => ActionKind::PutTag,
                    };
                    r.kind.set(kind.code());
                    r.target.set(p.slot);
                    Some((p.before, p.after))
                }
                Action::SetBits { map, start, count } | Action::ClearBits { map, start, count } => {
                    let kind = if matches!(a, Action::SetBits { .. }) {
                        ActionKind::SetBits
                    } else {
                        ActionKind::ClearBits
                    };
                    r.kind.set(kind.code());
                    r.target.set(*map as u32);
                    r.a.set(*start);
                    r.b.set(*count);
                    None
                }
                Action::UserData {
                    slot,
                    half,
                    len,
                    crc,
                } => {
                    r.kind.set(ActionKind::UserData.code());
                    r.target.set(*slot);
                    r.a.set(*half as u64);
                    r.b.set(*len as u64);
                    r.c.set(*crc as u64);
                    None
                }
                Action::VolumeData { slot, len, crc } => {
                    r.kind.set(ActionKind::VolumeData.code());
                    r.target.set(*slot);
                    r.b.set(*len);
                    r.c.set(*crc as u64);
                    None
                }
            };
            out.extend_from_slice(r.as_bytes());
            if let Some((b, a)) = images {
                out.extend_from_slice(b);
                out.extend_from_slice(a);
            }
        }
        out
    }

    /// Decode a journal payload; the error says what is wrong.
    pub fn decode(p: &[u8]) -> std::result::Result<Intent, DecodeError> {
        let (h, mut rest) = IntentHeaderRaw::read_from_prefix(p)
            .map_err(|_| DecodeError::Length("intent header"))?;
        let n = h.action_count.get() as usize;
        if n > MAX_ACTIONS {
            return Err(DecodeError::field(
                "action_count",
                format!("{n} is over the limit"),
            ));
        }
        if h.label_len as usize > h.label.len() {
            return Err(DecodeError::field("label", "length out of range"));
        }
        let mut actions = Vec::with_capacity(n);
        for i in 0..n {
            let (r, tail) =
                ActionRaw::read_from_prefix(rest).map_err(|_| DecodeError::Length("action"))?;
            rest = tail;
            let kind = r.kind.get();
            let take_images = |rest: &mut &[u8]| -> std::result::Result<_, DecodeError> {
                if rest.len() < 2 * RECORD {
                    return Err(DecodeError::Length("action images"));
                }
                let before: Box<[u8; RECORD]> = Box::new(rest[..RECORD].try_into().expect("len"));
                let after: Box<[u8; RECORD]> =
                    Box::new(rest[RECORD..2 * RECORD].try_into().expect("len"));
                *rest = &rest[2 * RECORD..];
                Ok((before, after))
            };
            let map = || -> std::result::Result<u8, DecodeError> {
                let m = r.target.get();
                if m > 2 {
                    return Err(DecodeError::field(
                        "action.target",
                        format!("action {i} names bitmap {m}"),
                    ));
                }
                Ok(m as u8)
            };
            let a = match ActionKind::from_code(kind) {
                Some(k @ (ActionKind::PutVolume | ActionKind::PutTag)) => {
                    let (before, after) = take_images(&mut rest)?;
                    let table = if k == ActionKind::PutVolume {
                        Table::Volume
                    } else {
                        Table::Tag
                    };
                    Action::put(table, r.target.get(), before, after)
                }
                Some(ActionKind::SetBits) => Action::SetBits {
                    map: map()?,
                    start: r.a.get(),
                    count: r.b.get(),
                },
                Some(ActionKind::ClearBits) => Action::ClearBits {
                    map: map()?,
                    start: r.a.get(),
                    count: r.b.get(),
                },
                Some(ActionKind::UserData) => {
                    if r.a.get() > 1 || r.b.get() > u32::MAX as u64 || r.c.get() > u32::MAX as u64 {
                        return Err(DecodeError::field(
                            "action",
                            format!("action {i} has bad user data fields"),
                        ));
                    }
                    Action::UserData {
                        slot: r.target.get(),
                        half: r.a.get() as u8,
                        len: r.b.get() as u32,
                        crc: r.c.get() as u32,
                    }
                }
                Some(ActionKind::VolumeData) => {
                    if r.a.get() != 0
                        || r.b.get() == 0
                        || r.b.get() > MAX_VOLUME_DATA
                        || r.c.get() > u32::MAX as u64
                    {
                        return Err(DecodeError::field(
                            "action",
                            format!("action {i} has bad volume data fields"),
                        ));
                    }
                    Action::VolumeData {
                        slot: r.target.get(),
                        len: r.b.get(),
                        crc: r.c.get() as u32,
                    }
                }
                None => return Err(DecodeError::unknown("action kind", kind)),
            };
            actions.push(a);
        }
        if !rest.is_empty() {
            return Err(DecodeError::Length("intent"));
        }
        Ok(Intent {
            created: h.created.get(),
            request_id: h.request_id,
            label: get_str(&h.label, h.label_len as usize)?,
            actions,
        })
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A decoded commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// The intent it closes.
    pub intent_seq: u64,
    /// Forward or back.
    pub outcome: Direction,
    /// Who resolved it.
    pub resolver_slot: u16,
}

impl Commit {
    /// Encode as a journal payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut c = CommitRaw::new_zeroed();
        c.intent_seq.set(self.intent_seq);
        c.outcome = self.outcome.code();
        c.resolver_slot.set(self.resolver_slot);
        c.as_bytes().to_vec()
    }
    /// Decode a journal payload.
    pub fn decode(p: &[u8]) -> std::result::Result<Commit, DecodeError> {
        let c = CommitRaw::read_from_bytes(p).map_err(|_| DecodeError::Length("commit"))?;
        let outcome = Direction::from_code(c.outcome)
            .ok_or(DecodeError::unknown("commit outcome", c.outcome))?;
        Ok(Commit {
            intent_seq: c.intent_seq.get(),
            outcome,
            resolver_slot: c.resolver_slot.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemDev;

    const SALT: [u8; 16] = [7; 16];

    fn sample_intent(n: usize) -> Intent {
        let mut actions = vec![Action::SetBits {
            map: 0,
            start: 3,
            count: 2,
        }];
        for i in 0..n {
            actions.push(Action::PutVolume {
                slot: i as u32,
                before: Box::new([0; RECORD]),
                after: Box::new([i as u8; RECORD]),
            });
        }
        actions.push(Action::UserData {
            slot: 1,
            half: 1,
            len: 10,
            crc: 99,
        });
        Intent {
            created: 5,
            request_id: [1; 16],
            label: "test".into(),
            actions,
        }
    }

    #[test]
    fn intent_round_trip() {
        let i = sample_intent(3);
        assert_eq!(Intent::decode(&i.encode()).unwrap(), i);
        let enc = i.encode();
        assert!(Intent::decode(&enc[..enc.len() - 1]).is_err());
    }

    /// Append `sample_intent(n)`: its sequence number.
    fn intent(dev: &MemDev, w: &mut JournalWriter, n: usize) -> u64 {
        w.append(dev, JournalKind::Intent, &sample_intent(n).encode())
            .unwrap()
    }

    fn ring(pages: u64) -> (MemDev, JournalWriter) {
        let dev = MemDev::new(pages * PAGE);
        let s = scan(&SALT, 0, &dev.image(), 0).unwrap();
        (dev, JournalWriter::resume(SALT, 0, 0, pages * PAGE, &s))
    }

    #[test]
    fn scan_finds_open_intents_and_commits() {
        let (dev, mut w) = ring(64);
        let a = intent(&dev, &mut w, 1);
        let b = intent(&dev, &mut w, 9);
        w.commit(&dev, a, Direction::Forward, 0).unwrap();
        let s = scan(&SALT, 0, &dev.image(), 0).unwrap();
        assert_eq!(s.open.keys().copied().collect::<Vec<_>>(), vec![b]);
        assert_eq!(s.open[&b], sample_intent(9));
        assert_eq!(s.next_seq, 4);
    }

    #[test]
    fn ring_wraps_and_keeps_history_out_of_the_live_window() {
        let (dev, mut w) = ring(16);
        for _ in 0..100 {
            let i = intent(&dev, &mut w, 4);
            let up = w.last_written();
            w.flushed(up);
            w.commit(&dev, i, Direction::Forward, 0).unwrap();
        }
        let s = scan(&SALT, 0, &dev.image(), 0).unwrap();
        assert!(s.open.is_empty());
        assert_eq!(s.next_seq, 201);
    }

    #[test]
    fn writer_refuses_to_overwrite_an_open_intent() {
        let (dev, mut w) = ring(16);
        let _held = intent(&dev, &mut w, 1);
        let mut err = None;
        for _ in 0..40 {
            match w.append(&dev, JournalKind::Intent, &sample_intent(4).encode()) {
                Ok(s) => {
                    w.commit(&dev, s, Direction::Forward, 0).unwrap();
                }
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let e = err.expect("journal should fill up");
        assert!(e.to_string().contains("is still open"), "{e}");
    }

    #[test]
    fn torn_tail_is_discarded_but_damage_below_durable_is_reported() {
        let (dev, mut w) = ring(64);
        let a = intent(&dev, &mut w, 1);
        let up = w.last_written();
        w.flushed(up);
        let b = intent(&dev, &mut w, 1);
        // Tear the newest record (never flushed): it is dropped.
        let img = dev.image();
        let mut torn = img.clone();
        torn[(PAGE + 100) as usize] ^= 1;
        let s = scan(&SALT, 0, &torn, 0).unwrap();
        assert!(s.open.contains_key(&a));
        assert!(!s.open.contains_key(&b));
        assert_eq!(s.torn, Vec::<u64>::new());
        // Damage the first intent, which the later record declared durable.
        let mut bad = img.clone();
        bad[100] ^= 1;
        let e = scan(&SALT, 0, &bad, 0).unwrap_err();
        assert!(e.to_string().contains("missing or damaged"), "{e}");
    }
}
