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

use std::collections::BTreeMap;

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::error::{DomainError, Result};
use crate::io::{AlignedBuf, BlockDev};
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
                Action::PutVolume {
                    slot,
                    before,
                    after,
                } => {
                    r.kind.set(ActionKind::PutVolume.code());
                    r.target.set(*slot);
                    Some((before, after))
                }
                Action::PutTag {
                    slot,
                    before,
                    after,
                } => {
                    r.kind.set(ActionKind::PutTag.code());
                    r.target.set(*slot);
                    Some((before, after))
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
                Some(ActionKind::PutVolume) => {
                    let (before, after) = take_images(&mut rest)?;
                    Action::PutVolume {
                        slot: r.target.get(),
                        before,
                        after,
                    }
                }
                Some(ActionKind::PutTag) => {
                    let (before, after) = take_images(&mut rest)?;
                    Action::PutTag {
                        slot: r.target.get(),
                        before,
                        after,
                    }
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

/// Header fields shared by every block of a record.
#[derive(Debug, Clone, Copy)]
pub struct RecordHeader {
    /// A [`JournalKind`] code (an unknown one is reported by the scan).
    pub kind: u16,
    /// Sequence number.
    pub seq: u64,
    /// Oldest open intent when written.
    pub oldest_open: u64,
    /// Everything up to here was durable when written.
    pub durable: u64,
    /// Ring owner.
    pub slot: u16,
}

/// Encode a record as whole blocks.
pub fn encode_record(salt: &[u8; 16], h: &RecordHeader, payload: &[u8]) -> AlignedBuf {
    let blocks = payload.len().div_ceil(JOURNAL_PAYLOAD).max(1);
    let mut buf = AlignedBuf::zeroed(blocks * PAGE as usize);
    for i in 0..blocks {
        let mut b = JournalBlockRaw::new_zeroed();
        b.magic = JOURNAL_MAGIC;
        b.version.set(RECORD_VERSION);
        b.kind.set(h.kind);
        b.seq.set(h.seq);
        b.oldest_open.set(h.oldest_open);
        b.durable.set(h.durable);
        b.slot.set(h.slot);
        b.block_index.set(i as u16);
        b.block_count.set(blocks as u16);
        b.payload_len.set(payload.len() as u32);
        let chunk = &payload[(i * JOURNAL_PAYLOAD).min(payload.len())
            ..((i + 1) * JOURNAL_PAYLOAD).min(payload.len())];
        b.payload[..chunk.len()].copy_from_slice(chunk);
        let out = &mut buf[i * PAGE as usize..(i + 1) * PAGE as usize];
        out.copy_from_slice(b.as_bytes());
        seal(salt, out);
    }
    buf
}

/// A block that decoded with a good checksum.
#[derive(Debug, Clone)]
pub struct BlockInfo {
    /// Record header fields.
    pub header: RecordHeader,
    /// Index within its record.
    pub index: u16,
    /// Blocks in its record.
    pub count: u16,
    /// Payload bytes of its record.
    pub payload_len: u32,
}

/// Decode one block; `None` if it is not a valid block of `slot`'s ring.
pub fn decode_block(salt: &[u8; 16], slot: u16, bytes: &[u8]) -> Option<BlockInfo> {
    let b = JournalBlockRaw::ref_from_bytes(bytes).ok()?;
    if b.magic != JOURNAL_MAGIC || b.version.get() != RECORD_VERSION || !verify(salt, bytes) {
        return None;
    }
    if b.slot.get() != slot
        || b.block_count.get() == 0
        || b.block_index.get() >= b.block_count.get()
    {
        return None;
    }
    Some(BlockInfo {
        header: RecordHeader {
            kind: b.kind.get(),
            seq: b.seq.get(),
            oldest_open: b.oldest_open.get(),
            durable: b.durable.get(),
            slot: b.slot.get(),
        },
        index: b.block_index.get(),
        count: b.block_count.get(),
        payload_len: b.payload_len.get(),
    })
}

/// A whole record found in a ring.
#[derive(Debug, Clone)]
pub struct ScannedRecord {
    /// Header.
    pub header: RecordHeader,
    /// First page in the ring.
    pub page: u64,
    /// Pages used.
    pub pages: u64,
    /// Payload.
    pub payload: Vec<u8>,
}

/// What a ring holds.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Live records (seq at or above `oldest_open`), by seq.
    pub live: BTreeMap<u64, ScannedRecord>,
    /// Intents with no commit, by seq.
    pub open: BTreeMap<u64, Intent>,
    /// Commits among live records, by intent seq.
    pub commits: BTreeMap<u64, Commit>,
    /// Oldest live seq.
    pub oldest_open: u64,
    /// Highest seq known flushed.
    pub durable: u64,
    /// Next seq to write.
    pub next_seq: u64,
    /// Page after the newest record.
    pub head: u64,
    /// Live-window records lost above `durable` (torn tail), by seq.
    pub torn: Vec<u64>,
}

/// Scan a ring read whole into `ring`. `ring_off` is for error messages.
pub fn scan(salt: &[u8; 16], slot: u16, ring: &[u8], ring_off: u64) -> Result<Scan> {
    let pages = ring.len() as u64 / PAGE;
    let page = |p: u64| &ring[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
    let blocks: Vec<Option<BlockInfo>> = (0..pages)
        .map(|p| decode_block(salt, slot, page(p)))
        .collect();
    let mut max_seq_any = 0;
    let mut records: BTreeMap<u64, ScannedRecord> = BTreeMap::new();
    for p in 0..pages {
        let Some(b) = &blocks[p as usize] else {
            continue;
        };
        max_seq_any = max_seq_any.max(b.header.seq);
        if b.index != 0 {
            continue;
        }
        let n = b.count as u64;
        if p + n > pages {
            continue;
        }
        let complete = (1..n).all(|i| {
            blocks[(p + i) as usize].as_ref().is_some_and(|o| {
                o.header.seq == b.header.seq
                    && o.index as u64 == i
                    && o.count == b.count
                    && o.header.kind == b.header.kind
                    && o.payload_len == b.payload_len
            })
        });
        let len = b.payload_len as usize;
        if !complete
            || len > n as usize * JOURNAL_PAYLOAD
            || len + JOURNAL_PAYLOAD <= n as usize * JOURNAL_PAYLOAD && n > 1
        {
            continue;
        }
        let mut payload = Vec::with_capacity(len);
        for i in 0..n {
            let raw = JournalBlockRaw::ref_from_bytes(page(p + i)).expect("page size");
            let take = (len - payload.len()).min(JOURNAL_PAYLOAD);
            payload.extend_from_slice(&raw.payload[..take]);
        }
        let rec = ScannedRecord {
            header: b.header,
            page: p,
            pages: n,
            payload,
        };
        if let Some(prev) = records.insert(b.header.seq, rec) {
            return Err(DomainError::corrupt(
                format!("journal of host slot {slot}"),
                ring_off + prev.page * PAGE,
                format!("two records with sequence number {}", b.header.seq),
            ));
        }
    }
    let mut s = Scan {
        next_seq: max_seq_any + 1,
        ..Default::default()
    };
    let Some((_, newest)) = records.iter().next_back() else {
        s.next_seq = s.next_seq.max(1);
        return Ok(s);
    };
    s.oldest_open = newest.header.oldest_open;
    s.head = newest.page + newest.pages;
    if s.head >= pages {
        s.head = 0;
    }
    s.durable = records
        .values()
        .map(|r| r.header.durable)
        .max()
        .unwrap_or(0);
    let newest_seq = newest.header.seq;
    for seq in s.oldest_open..=newest_seq {
        match records.remove(&seq) {
            Some(r) => {
                s.live.insert(seq, r);
            }
            None if seq <= s.durable => {
                return Err(DomainError::corrupt(
                    format!("journal of host slot {slot}"),
                    ring_off,
                    format!(
                        "record {seq} is missing or damaged although records up to {} were \
                         flushed",
                        s.durable
                    ),
                ));
            }
            None => s.torn.push(seq),
        }
    }
    let mut intents = BTreeMap::new();
    for (seq, r) in &s.live {
        let at = ring_off + r.page * PAGE;
        match JournalKind::from_code(r.header.kind) {
            Some(JournalKind::Intent) => {
                let i = Intent::decode(&r.payload).map_err(|d| {
                    DomainError::corrupt(format!("journal intent {seq} of host slot {slot}"), at, d)
                })?;
                intents.insert(*seq, i);
            }
            Some(JournalKind::Commit) => {
                let c = Commit::decode(&r.payload).map_err(|d| {
                    DomainError::corrupt(format!("journal commit {seq} of host slot {slot}"), at, d)
                })?;
                s.commits.insert(c.intent_seq, c);
            }
            None => {
                return Err(DomainError::corrupt(
                    format!("journal record {seq} of host slot {slot}"),
                    at,
                    DecodeError::unknown("kind", r.header.kind),
                ))
            }
        }
    }
    for (seq, i) in intents {
        if !s.commits.contains_key(&seq) {
            s.open.insert(seq, i);
        }
    }
    Ok(s)
}

/// Writes one host slot's ring. One writer per slot; callers serialize.
#[derive(Debug)]
pub struct JournalWriter {
    salt: [u8; 16],
    slot: u16,
    ring_off: u64,
    pages: u64,
    head: u64,
    next_seq: u64,
    /// Open intents: seq -> (first page, pages).
    open: BTreeMap<u64, (u64, u64)>,
    durable: u64,
    last_written: u64,
}

impl JournalWriter {
    /// Continue a ring after a scan. Intents still open in the scan must be
    /// resolved (and committed) before anything else is appended.
    pub fn resume(salt: [u8; 16], slot: u16, ring_off: u64, ring_len: u64, s: &Scan) -> Self {
        let mut open = BTreeMap::new();
        for seq in s.open.keys() {
            let r = &s.live[seq];
            open.insert(*seq, (r.page, r.pages));
        }
        JournalWriter {
            salt,
            slot,
            ring_off,
            pages: ring_len / PAGE,
            head: s.head,
            next_seq: s.next_seq,
            open,
            durable: s.next_seq - 1,
            last_written: s.next_seq - 1,
        }
    }

    /// Largest payload a record can carry in this ring (half the ring).
    pub fn max_payload(&self) -> usize {
        (self.pages as usize / 2) * JOURNAL_PAYLOAD
    }

    /// Append a record; returns its seq. The write is complete (not
    /// flushed) when this returns.
    pub fn append(&mut self, dev: &dyn BlockDev, kind: JournalKind, payload: &[u8]) -> Result<u64> {
        let n = payload.len().div_ceil(JOURNAL_PAYLOAD).max(1) as u64;
        if payload.len() > self.max_payload() {
            return Err(DomainError::NoSpace(format!(
                "journal record of {} bytes exceeds the {}-byte limit of a {}-byte journal",
                payload.len(),
                self.max_payload(),
                self.pages * PAGE
            )));
        }
        let mut start = self.head;
        if start + n > self.pages {
            start = 0;
        }
        if let Some((seq, _)) = self
            .open
            .iter()
            .find(|(_, &(p, len))| start < p + len && p < start + n)
        {
            return Err(DomainError::NoSpace(format!(
                "journal of host slot {} is full: intent {seq} is still open",
                self.slot
            )));
        }
        let seq = self.next_seq;
        let oldest_open = self.open.keys().next().copied().unwrap_or(seq).min(seq);
        let h = RecordHeader {
            kind: kind.code(),
            seq,
            oldest_open,
            durable: self.durable,
            slot: self.slot,
        };
        let buf = encode_record(&self.salt, &h, payload);
        dev.write_at(&buf, self.ring_off + start * PAGE)
            .map_err(DomainError::io(format!(
                "writing journal record {seq} of host slot {}",
                self.slot
            )))?;
        self.next_seq += 1;
        self.head = start + n;
        self.last_written = seq;
        if kind == JournalKind::Intent {
            self.open.insert(seq, (start, n));
        }
        Ok(seq)
    }

    /// The newest seq written so far (take it before a flush, pass it to
    /// [`JournalWriter::flushed`] after).
    pub fn last_written(&self) -> u64 {
        self.last_written
    }

    /// Note that a flush covered every record up to `seq`.
    pub fn flushed(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
    }

    /// Write the commit record of `intent_seq`.
    pub fn commit(
        &mut self,
        dev: &dyn BlockDev,
        intent_seq: u64,
        outcome: Direction,
        resolver_slot: u16,
    ) -> Result<u64> {
        let c = Commit {
            intent_seq,
            outcome,
            resolver_slot,
        };
        let seq = self.append(dev, JournalKind::Commit, &c.encode())?;
        self.open.remove(&intent_seq);
        Ok(seq)
    }

    /// Number of intents not yet committed.
    pub fn open_count(&self) -> usize {
        self.open.len()
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

    fn ring(pages: u64) -> (MemDev, JournalWriter) {
        let dev = MemDev::new(pages * PAGE);
        let s = scan(&SALT, 0, &dev.image(), 0).unwrap();
        (dev, JournalWriter::resume(SALT, 0, 0, pages * PAGE, &s))
    }

    #[test]
    fn scan_finds_open_intents_and_commits() {
        let (dev, mut w) = ring(64);
        let a = w
            .append(&dev, JournalKind::Intent, &sample_intent(1).encode())
            .unwrap();
        let b = w
            .append(&dev, JournalKind::Intent, &sample_intent(9).encode())
            .unwrap();
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
            let i = w
                .append(&dev, JournalKind::Intent, &sample_intent(4).encode())
                .unwrap();
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
        let _held = w
            .append(&dev, JournalKind::Intent, &sample_intent(1).encode())
            .unwrap();
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
        let a = w
            .append(&dev, JournalKind::Intent, &sample_intent(1).encode())
            .unwrap();
        let up = w.last_written();
        w.flushed(up);
        let b = w
            .append(&dev, JournalKind::Intent, &sample_intent(1).encode())
            .unwrap();
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
