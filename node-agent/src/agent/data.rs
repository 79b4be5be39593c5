//! A raw volume's bytes through the API: written into a volume being made
//! under the caller's lock, read from a legal one. Direct I/O on the
//! domain's device, within the volume's run only.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::*;
use crate::jobs::open_direct;

/// Bytes written or read per device call.
pub const CHUNK: usize = 1 << 20;

/// Writes into one volume being made, in order, buffered into whole
/// chunks; each device write checks the lock first.
pub struct VolumeWriter {
    file: File,
    run: u64,
    capacity: u64,
    sector: usize,
    /// Volume offset the buffer starts at.
    at: u64,
    buf: AlignedBuf,
    fill: usize,
    guard: Arc<LockGuard>,
    written: u64,
}

impl Agent {
    /// A writer of raw volume `id` from `offset`: the volume must be
    /// illegal (being made) and `lock_id` the caller's lock of it.
    pub fn volume_writer(
        &self,
        o: &Opened,
        id: &VolumeId,
        lock_id: &str,
        offset: u64,
    ) -> Result<VolumeWriter> {
        let v = o.domain.read_volume(id)?;
        if lock_id.is_empty() {
            return Err(AgentError::invalid(
                "lock_id",
                "writing data needs the volume's lock",
            ));
        }
        let guard = self
            .client_lock(o, id, lock_id)?
            .expect("a lock id was given");
        raw_volume(&v)?;
        if v.legality == Legality::Legal {
            return Err(AgentError::precondition(format!(
                "volume {id} is legal: data goes only into a volume being made"
            )));
        }
        let sector = o.domain.geometry().sector_size as usize;
        check_range(&v, offset, 0, sector as u64)?;
        Ok(VolumeWriter {
            file: open_direct(&o.path, true)?,
            run: o.extent(&v).offset,
            capacity: v.capacity,
            sector,
            at: offset,
            buf: AlignedBuf::zeroed(CHUNK),
            fill: 0,
            guard,
            written: 0,
        })
    }

    /// The open device file and the run offset of legal raw volume `id`,
    /// checked for `length` bytes from `offset` (0: to the end); the
    /// length to read.
    pub fn volume_reader(
        &self,
        o: &Opened,
        id: &VolumeId,
        offset: u64,
        length: u64,
    ) -> Result<(File, u64, u64)> {
        let v = o.domain.read_volume(id)?;
        raw_volume(&v)?;
        if v.legality != Legality::Legal {
            return Err(AgentError::precondition(format!(
                "volume {id} is being made: its data is not readable yet"
            )));
        }
        let length = if length == 0 {
            v.capacity.saturating_sub(offset)
        } else {
            length
        };
        let sector = o.domain.geometry().sector_size as u64;
        check_range(&v, offset, length, sector)?;
        Ok((
            open_direct(&o.path, false)?,
            o.extent(&v).offset + offset,
            length,
        ))
    }
}

/// Only raw volumes hold their bytes as they are.
fn raw_volume(v: &Volume) -> Result<()> {
    if v.format != Format::Raw {
        return Err(AgentError::precondition(format!(
            "volume {} is {}: only raw volumes are read and written as bytes",
            v.id,
            v.format.as_str()
        )));
    }
    Ok(())
}

/// `offset` must be a whole sector and `offset + length` within the
/// volume's capacity.
fn check_range(v: &Volume, offset: u64, length: u64, sector: u64) -> Result<()> {
    if offset % sector != 0 {
        return Err(AgentError::invalid(
            "offset",
            format!("{offset} is not a multiple of the domain's {sector}-byte sector"),
        ));
    }
    match offset.checked_add(length) {
        Some(end) if end <= v.capacity => Ok(()),
        _ => Err(AgentError::invalid(
            "offset",
            format!(
                "{length} bytes at {offset} go beyond volume {}'s {} bytes",
                v.id, v.capacity
            ),
        )),
    }
}

impl VolumeWriter {
    /// Take `data`, the next bytes in order.
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        let end = self.at + self.fill as u64 + data.len() as u64;
        if end > self.capacity {
            return Err(AgentError::invalid(
                "data",
                format!("{end} bytes go beyond the volume's {} bytes", self.capacity),
            ));
        }
        self.written += data.len() as u64;
        while !data.is_empty() {
            let n = data.len().min(CHUNK - self.fill);
            self.buf[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == CHUNK {
                self.flush_buf(CHUNK)?;
            }
        }
        Ok(())
    }

    /// Write what is buffered (the tail padded with zeros to a whole
    /// sector) and make it durable: the bytes written.
    pub fn finish(mut self) -> Result<u64> {
        if self.fill > 0 {
            let len = self.fill.div_ceil(self.sector) * self.sector;
            self.buf[self.fill..len].fill(0);
            self.flush_buf(len)?;
        }
        self.file
            .sync_data()
            .map_err(AgentError::io("flushing volume data"))?;
        Ok(self.written)
    }

    fn flush_buf(&mut self, len: usize) -> Result<()> {
        // A lost or unconfirmed lock stops the writes before the next one.
        self.guard.check()?;
        self.file
            .write_all_at(&self.buf[..len], self.run + self.at)
            .map_err(AgentError::io("writing volume data"))?;
        self.at += self.fill as u64;
        self.fill = 0;
        Ok(())
    }
}

/// Read `len` bytes at device offset `off` of `file` into `buf` (direct
/// I/O reads whole sectors; `buf` is a whole chunk).
pub fn read_chunk(
    file: &File,
    off: u64,
    buf: &mut AlignedBuf,
    len: usize,
    sector: usize,
) -> Result<()> {
    let whole = len.div_ceil(sector) * sector;
    file.read_exact_at(&mut buf[..whole], off)
        .map_err(AgentError::io("reading volume data"))
}
