//! Journal recovery: resolve every open intent of a host slot using only
//! what is on the domain.
//!
//! An intent rolls forward when everything it needs is on disk (every user
//! data blob it names verifies); otherwise it rolls back to the before
//! images it carries. Each step writes only what differs from the target,
//! so recovery is idempotent and may itself be interrupted and rerun.

use crate::alloc;
use crate::engine::{Domain, RecoveryReport};
use crate::error::{DomainError, Result};
use crate::io::AlignedBuf;
use crate::journal::{self, Action, Intent, JournalWriter, Put, Table};
use crate::layout::{csum, Direction, RECORD};
use crate::lock::LockGuard;
use crate::records::{decode_tag, decode_volume, RecordBytes};

/// Where a record stands relative to an intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// Holds the intent's after image.
    After,
    /// Holds the intent's before image.
    Before,
    /// Does not decode (a torn or lost write).
    Torn,
}

/// Decide the direction for an intent: forward unless data written beside
/// the records does not verify — a user data blob (`blob_ok(slot, half,
/// len, crc)`) or a new volume's initial bytes (`data_ok(slot, len, crc)`).
pub fn decide(
    intent: &Intent,
    mut blob_ok: impl FnMut(u32, u8, u32, u32) -> Result<bool>,
    mut data_ok: impl FnMut(u32, u64, u32) -> Result<bool>,
) -> Result<Direction> {
    for a in &intent.actions {
        let ok = match a {
            Action::UserData {
                slot,
                half,
                len,
                crc,
            } => blob_ok(*slot, *half, *len, *crc)?,
            Action::VolumeData { slot, len, crc } => data_ok(*slot, *len, *crc)?,
            _ => true,
        };
        if !ok {
            return Ok(Direction::Back);
        }
    }
    Ok(Direction::Forward)
}

/// Classify a record against an intent's images.
pub fn classify(
    cur: &RecordBytes,
    before: &RecordBytes,
    after: &RecordBytes,
    decodes: bool,
) -> Option<RecordState> {
    if cur == after {
        Some(RecordState::After)
    } else if cur == before {
        Some(RecordState::Before)
    } else if !decodes {
        Some(RecordState::Torn)
    } else {
        None
    }
}

impl Domain {
    /// Read host slot `slot`'s ring, resolve its open intents and commit
    /// them in the ring. The caller holds the slot's lock.
    pub(crate) fn recover_ring(
        &self,
        slot: u32,
        guard: &LockGuard,
    ) -> Result<(JournalWriter, RecoveryReport)> {
        let g = &self.geom;
        let off = g.journal_ring_off(slot);
        let mut ring = AlignedBuf::zeroed(g.journal_size as usize);
        self.dev
            .read_at(&mut ring, off)
            .map_err(DomainError::io(format!(
                "reading the journal of host slot {slot}"
            )))?;
        let scan = journal::scan(&self.salt(), slot as u16, &ring, off)?;
        let mut w = JournalWriter::resume(self.salt(), slot as u16, off, g.journal_size, &scan);
        let mut report = RecoveryReport {
            slot,
            torn: scan.torn.clone(),
            ..Default::default()
        };
        let resolver = self.claim.as_ref().map(|c| c.slot).unwrap_or(slot) as u16;
        for (seq, intent) in &scan.open {
            guard.check()?;
            let oc = self.resolve_intent(slot, *seq, intent)?;
            w.commit(self.dev.as_ref(), *seq, oc, resolver)?;
            if oc == Direction::Forward {
                report.forward.push(*seq);
            } else {
                report.back.push(*seq);
            }
        }
        if !scan.open.is_empty() {
            let upto = w.last_written();
            self.dev
                .flush()
                .map_err(DomainError::io("flushing recovery commits"))?;
            w.flushed(upto);
        }
        Ok((w, report))
    }

    fn resolve_intent(&self, slot: u32, seq: u64, intent: &Intent) -> Result<Direction> {
        let g = &self.geom;
        let salt = self.salt();
        let dir = decide(
            intent,
            |ts, half, len, crc| {
                if ts >= g.tag_slots || len > g.user_data_size {
                    return Ok(false);
                }
                Ok(csum(&salt, &self.read_blob(ts, half, len)?) == crc)
            },
            |vs, len, crc| {
                // The run is the one the intent's after image of the volume
                // names.
                let run = intent.actions.iter().find_map(|a| match a {
                    Action::PutVolume { slot, after, .. } if *slot == vs => {
                        decode_volume(&salt, vs, after.as_ref()).ok()?.live()
                    }
                    _ => None,
                });
                let Some(v) = run else { return Ok(false) };
                if v.extent_start + v.extent_count > g.extent_count
                    || len > v.extent_count * g.extent_size
                {
                    return Ok(false);
                }
                let mut buf = AlignedBuf::zeroed(len as usize);
                self.dev
                    .read_at(&mut buf, g.extent_off(v.extent_start))
                    .map_err(DomainError::io("reading a new volume's start"))?;
                Ok(csum(&salt, &buf) == crc)
            },
        )?;
        // Where does each record stand?
        let mut states = Vec::with_capacity(intent.actions.len());
        for a in &intent.actions {
            let st = match a.as_put() {
                Some(p) => Some(self.record_state(&salt, &p, slot, seq)?),
                None => None,
            };
            states.push(st);
        }
        let dev = self.dev.as_ref();
        let forward = dir == Direction::Forward;
        let apply = |a: &Action, st: &Option<RecordState>| -> Result<()> {
            if let Some(p) = a.as_put() {
                let (want, rec) = if forward {
                    (RecordState::After, p.after)
                } else {
                    (RecordState::Before, p.before)
                };
                if *st != Some(want) {
                    self.write_record(g.record_off(p.table, p.slot), rec)?;
                }
                return Ok(());
            }
            // Setting bits forward is clearing them back, and so on.
            let (map, start, count, set) = match a {
                Action::SetBits { map, start, count } => (map, start, count, forward),
                Action::ClearBits { map, start, count } => (map, start, count, !forward),
                _ => return Ok(()),
            };
            alloc::apply_on_disk(dev, g, *map as usize, *start, *count, set)?;
            Ok(())
        };
        if forward {
            for (a, st) in intent.actions.iter().zip(&states) {
                apply(a, st)?;
            }
        } else {
            for (a, st) in intent.actions.iter().zip(&states).rev() {
                apply(a, st)?;
            }
        }
        self.dev
            .flush()
            .map_err(DomainError::io("flushing recovery"))?;
        tracing::info!(
            slot,
            seq,
            label = %intent.label,
            direction = if dir == Direction::Forward { "forward" } else { "back" },
            "resolved an open intent"
        );
        Ok(dir)
    }

    /// Where the record `p` writes stands: before, after, or (a conflict)
    /// neither.
    fn record_state(
        &self,
        salt: &[u8; 16],
        p: &Put<'_>,
        slot: u32,
        seq: u64,
    ) -> Result<RecordState> {
        let g = &self.geom;
        let what = p.table.name();
        self.check_slot(p.slot, g.slots_of(p.table), what, slot, seq)?;
        let off = g.record_off(p.table, p.slot);
        let cur = self.read_raw(off)?;
        let ok = match p.table {
            Table::Volume => decode_volume(salt, p.slot, &cur).is_ok(),
            Table::Tag => decode_tag(salt, p.slot, &cur).is_ok(),
        };
        classify(&cur, p.before, p.after, ok).ok_or_else(|| conflict(what, p.slot, off, slot, seq))
    }

    fn check_slot(&self, s: u32, limit: u32, what: &str, slot: u32, seq: u64) -> Result<()> {
        if s >= limit {
            return Err(DomainError::corrupt(
                format!("journal intent {seq} of host slot {slot}"),
                self.geom.journal_ring_off(slot),
                format!("names {what} slot {s} beyond the table"),
            ));
        }
        Ok(())
    }

    fn read_raw(&self, off: u64) -> Result<RecordBytes> {
        let mut buf = AlignedBuf::zeroed(self.geom.sector_size as usize);
        self.dev
            .read_at(&mut buf, off)
            .map_err(DomainError::io("reading a record for recovery"))?;
        Ok(buf[..RECORD].try_into().expect("512"))
    }
}

fn conflict(what: &str, s: u32, off: u64, slot: u32, seq: u64) -> DomainError {
    DomainError::corrupt(
        format!("{what} slot {s}"),
        off,
        format!(
            "holds neither the before nor the after image of open intent {seq} of host slot \
             {slot}: someone wrote it while the intent was open"
        ),
    )
}
