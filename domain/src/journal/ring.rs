//! The ring itself: records of one or more blocks, the scan that finds
//! the live records and tells a torn tail from corruption, and the
//! writer that appends without overwriting an open intent.

use std::collections::BTreeMap;

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::error::{DomainError, Result};
use crate::io::{AlignedBuf, BlockDev};
use crate::layout::*;

use super::{Commit, Intent};

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
    // Every record from the oldest open intent on was written after it,
    // and the writer never wraps over an open intent: they fit in the
    // ring, one page each at least.
    if newest_seq >= s.oldest_open && newest_seq - s.oldest_open >= pages {
        return Err(DomainError::corrupt(
            format!("journal of host slot {slot}"),
            ring_off + newest.page * PAGE,
            format!(
                "record {newest_seq} says intent {} is open, {} records back in a ring of {pages} pages",
                s.oldest_open,
                newest_seq - s.oldest_open
            ),
        ));
    }
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
