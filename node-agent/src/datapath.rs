//! Moving data: a native copy for raw data with direct I/O, and
//! `qemu-img convert` ([`crate::qemu`]) for anything with a qcow2 in it. Both skip
//! unallocated ranges and zeros, report progress, stop when cancelled, and
//! flush before they return.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

use cairn_domain::io::AlignedBuf;

/// Progress and cancellation of one data job.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes handled so far.
    pub done: AtomicU64,
    /// Bytes to handle.
    pub total: AtomicU64,
    /// Bytes not written because they were zero or unallocated.
    pub skipped: AtomicU64,
    /// Set to ask the job to stop.
    pub cancel: AtomicBool,
    /// Set when the job stopped because its lock may be lost.
    pub fenced: AtomicBool,
}

impl Progress {
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Why a copy stopped.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Someone cancelled it.
    #[error("cancelled")]
    Cancelled,
    /// Reading or writing failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// qemu-img failed.
    #[error("qemu-img convert failed: {0}")]
    Qemu(String),
}

pub(crate) fn io_err(context: &str) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Io {
        context: context.to_string(),
        source,
    }
}

/// A byte range of an open file or device.
#[derive(Debug, Clone, Copy)]
pub struct Region<'a> {
    /// The file.
    pub file: &'a File,
    /// Where the range starts.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
}

/// Bytes per read.
pub const CHUNK: usize = 4 << 20;
/// Granularity of zero detection.
const ZERO_BLOCK: usize = 64 << 10;

/// The allocated ranges of `r` (relative to its start), from SEEK_DATA and
/// SEEK_HOLE. A device without hole tracking is all data.
pub fn data_ranges(r: Region) -> io::Result<Vec<(u64, u64)>> {
    let fd = r.file.as_raw_fd();
    let end = r.offset + r.len;
    let mut out = Vec::new();
    let mut pos = r.offset;
    while pos < end {
        // SAFETY: lseek on an owned descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // no data after pos
                Some(libc::EINVAL) => {
                    out.push((pos - r.offset, end - pos));
                    break;
                }
                _ => return Err(e),
            }
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data - r.offset, hole - data));
        pos = hole;
    }
    Ok(out)
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns.
    let (head, words, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copy `src` to `dst` (same length or longer), which must already read
/// as zeros: unallocated ranges of the source are not read, zero blocks are
/// not written. A reader thread keeps the next chunk coming while this one
/// is written. Flushes `dst` at the end.
pub fn copy_raw(src: Region, dst: Region, p: &Progress) -> Result<(), CopyError> {
    p.total.store(src.len, Ordering::Relaxed);
    let ranges = data_ranges(src).map_err(io_err("finding the source's data"))?;
    let data: u64 = ranges.iter().map(|r| r.1).sum();
    p.skipped.fetch_add(src.len - data, Ordering::Relaxed);
    p.done.fetch_add(src.len - data, Ordering::Relaxed);
    // Chunks to read, in order, each within one data range.
    let mut chunks = Vec::new();
    for (off, len) in ranges {
        let mut o = off;
        while o < off + len {
            let n = (off + len - o).min(CHUNK as u64);
            chunks.push((o, n as usize));
            o += n;
        }
    }
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<(u64, usize, AlignedBuf)>>(2);
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..3 {
        free_tx
            .send(AlignedBuf::zeroed(CHUNK))
            .expect("receiver alive");
    }
    std::thread::scope(|s| -> Result<(), CopyError> {
        let reader = s.spawn(move || {
            for (off, n) in chunks {
                if p.cancelled() {
                    break;
                }
                let Ok(mut buf) = free_rx.recv() else { break };
                // Direct I/O reads whole sectors; the region is whole
                // sectors except perhaps a file's tail.
                let want = n.div_ceil(512) * 512;
                let r = read_full(src.file, &mut buf[..want], src.offset + off).map(|got| {
                    buf[got.min(want)..want].fill(0);
                    (off, n, buf)
                });
                let failed = r.is_err();
                if full_tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let mut result = Ok(());
        for item in full_rx.iter() {
            if p.cancelled() {
                result = Err(CopyError::Cancelled);
                break;
            }
            let (off, n, buf) = match item {
                Ok(x) => x,
                Err(e) => {
                    result = Err(io_err("reading the source")(e));
                    break;
                }
            };
            if let Err(e) = write_nonzero(&buf[..n.div_ceil(512) * 512], dst, off, n, p) {
                result = Err(io_err("writing the target")(e));
                break;
            }
            p.done.fetch_add(n as u64, Ordering::Relaxed);
            let _ = free_tx.send(buf);
        }
        drop(full_rx);
        drop(free_tx);
        reader.join().expect("reader thread panicked");
        result?;
        if p.cancelled() {
            return Err(CopyError::Cancelled);
        }
        Ok(())
    })?;
    dst.file
        .sync_data()
        .map_err(io_err("flushing the target"))?;
    Ok(())
}

/// The SHA-256 (hex) of the `r.len` bytes of `r`, as a reader of them
/// sees them: holes are hashed as zeros without being read. Adds to the
/// progress as it goes and stops when cancelled.
pub fn sha256_of(r: Region, p: &Progress) -> Result<String, CopyError> {
    let ranges = data_ranges(r).map_err(io_err("finding the data to hash"))?;
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let zeros = vec![0u8; CHUNK];
    let mut buf = AlignedBuf::zeroed(CHUNK);
    let mut at = 0;
    let zero_until = |sha: &mut ring::digest::Context, at: &mut u64, end: u64| {
        while *at < end {
            let n = (end - *at).min(CHUNK as u64) as usize;
            sha.update(&zeros[..n]);
            *at += n as u64;
            p.done.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    for (off, len) in ranges {
        zero_until(&mut sha, &mut at, off);
        while at < off + len {
            if p.cancelled() {
                return Err(CopyError::Cancelled);
            }
            let n = (off + len - at).min(CHUNK as u64) as usize;
            let want = n.div_ceil(512) * 512;
            let got = read_full(r.file, &mut buf[..want], r.offset + at)
                .map_err(io_err("reading the data to hash"))?;
            if got < n {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "the volume ended early");
                return Err(io_err("reading the data to hash")(e));
            }
            sha.update(&buf[..n]);
            at += n as u64;
            p.done.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    zero_until(&mut sha, &mut at, r.len);
    Ok(cairn_proto::auth::hex(sha.finish().as_ref()))
}

/// Write the non-zero 64 KiB blocks of `buf` (of which `n` bytes count) to
/// `dst` at `off`, coalescing neighbours into one write.
fn write_nonzero(buf: &[u8], dst: Region, off: u64, n: usize, p: &Progress) -> io::Result<()> {
    let mut i = 0;
    while i < buf.len() {
        let end = (i + ZERO_BLOCK).min(buf.len());
        if is_zero(&buf[i..end]) {
            p.skipped
                .fetch_add((end.min(n) - i.min(n)) as u64, Ordering::Relaxed);
            i = end;
            continue;
        }
        let mut j = end;
        while j < buf.len() {
            let e = (j + ZERO_BLOCK).min(buf.len());
            if is_zero(&buf[j..e]) {
                break;
            }
            j = e;
        }
        if off + (j as u64) > dst.len + 511 {
            return Err(io::Error::other("source is longer than the target"));
        }
        dst.file
            .write_all_at(&buf[i..j], dst.offset + off + i as u64)?;
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 1 << 16];
        assert!(is_zero(&b));
        b[4097] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&b[1..4097]));
    }

    fn direct(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_hash_reads_holes_as_zeros_and_stops_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        // 1 MiB of something else first, then a 13 MiB region: data at
        // 2 MiB and at its last sector, holes between.
        let (start, len) = (1u64 << 20, 13u64 << 20);
        let f = std::fs::File::create(&a).unwrap();
        f.set_len(start + len).unwrap();
        f.write_all_at(&[9u8; 4096], 0).unwrap();
        f.write_all_at(&[7u8; 300_000], start + (2 << 20)).unwrap();
        f.write_all_at(&[5u8; 512], start + len - 512).unwrap();
        drop(f);
        let bytes = std::fs::read(&a).unwrap();
        let want = cairn_proto::auth::hex(
            ring::digest::digest(&ring::digest::SHA256, &bytes[start as usize..]).as_ref(),
        );
        let d = direct(&a);
        let r = Region {
            file: &d,
            offset: start,
            len,
        };
        let p = Progress::default();
        assert_eq!(sha256_of(r, &p).unwrap(), want);
        assert_eq!(p.done.load(Ordering::Relaxed), len);
        let p = Progress::default();
        p.cancel.store(true, Ordering::Relaxed);
        assert!(matches!(sha256_of(r, &p), Err(CopyError::Cancelled)));
    }

    #[test]
    fn copy_skips_holes_and_zeros_and_copies_data() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let len = 24u64 << 20;
        for p in [&a, &b] {
            std::fs::File::create(p)
                .unwrap()
                .set_len(len + (1 << 20))
                .unwrap();
        }
        // Source region at 1 MiB: data at 2 MiB (random-ish), explicit
        // zeros at 9 MiB, a hole elsewhere.
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i * 7 + 3) as u8).collect();
        f.write_all_at(&data, (1 << 20) + (2 << 20)).unwrap();
        f.write_all_at(&vec![0u8; 4 << 20], (1 << 20) + (9 << 20))
            .unwrap();
        f.sync_all().unwrap();
        let (fa, fb) = (direct(&a), direct(&b));
        let p = Progress::default();
        copy_raw(
            Region {
                file: &fa,
                offset: 1 << 20,
                len,
            },
            Region {
                file: &fb,
                offset: 0,
                len,
            },
            &p,
        )
        .unwrap();
        assert_eq!(p.done.load(Ordering::Relaxed), len);
        // 3 MiB of data written; the hole and the 4 MiB of zeros skipped.
        let skipped = p.skipped.load(Ordering::Relaxed);
        assert!(skipped >= len - (3 << 20) - (1 << 20), "skipped {skipped}");
        let got = std::fs::read(&b).unwrap();
        assert_eq!(&got[2 << 20..5 << 20], &data[..]);
        assert!(got[..2 << 20].iter().all(|&x| x == 0));
        assert!(got[5 << 20..].iter().all(|&x| x == 0));
        // The zeros were not written: the target has a hole there.
        let ranges = data_ranges(Region {
            file: &fb,
            offset: 0,
            len,
        })
        .unwrap();
        assert!(
            ranges
                .iter()
                .all(|(o, l)| *o < (6 << 20) && o + l <= (6 << 20)),
            "{ranges:?}"
        );
    }

    #[test]
    fn cancelled_copy_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for p in [&a, &b] {
            let f = std::fs::File::create(p).unwrap();
            f.write_all_at(&vec![1u8; 8 << 20], 0).unwrap();
        }
        let (fa, fb) = (direct(&a), direct(&b));
        let p = Progress::default();
        p.cancel.store(true, Ordering::Relaxed);
        let r = copy_raw(
            Region {
                file: &fa,
                offset: 0,
                len: 8 << 20,
            },
            Region {
                file: &fb,
                offset: 0,
                len: 8 << 20,
            },
            &p,
        );
        assert!(matches!(r, Err(CopyError::Cancelled)), "{r:?}");
    }
}
