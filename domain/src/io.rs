//! Block I/O: the one trait every domain access goes through, a real
//! implementation with direct I/O, an in-memory twin, and a simulated device
//! that loses unflushed writes at a chosen point (for crash tests).
//!
//! Every offset and length must be a multiple of the device's sector size;
//! the real device bounces buffers that are not sector-aligned in memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use zerocopy::{FromZeros, IntoBytes};

/// Counters of device operations, for benchmarks and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IoStats {
    /// Read calls.
    pub reads: u64,
    /// Write calls.
    pub writes: u64,
    /// Flush (fdatasync) calls.
    pub flushes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

#[derive(Default, Debug)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl Counters {
    fn read(&self, n: usize) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn write(&self, n: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> IoStats {
        IoStats {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}

/// Zero a range by writing zeros, a megabyte at a time.
pub fn write_zeros<D: BlockDev + ?Sized>(dev: &D, off: u64, len: u64) -> io::Result<()> {
    let chunk = Page::zeroed_buf(256);
    let mut pos = off;
    while pos < off + len {
        let n = ((off + len - pos) as usize).min(chunk.len());
        dev.write_at(&chunk[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// A block device (or a file used as one).
pub trait BlockDev: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The alignment unit for offsets and lengths (512 or 4096).
    fn sector_size(&self) -> u32;
    /// Read exactly `buf.len()` bytes at `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at `off`. Not durable until [`BlockDev::flush`].
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Zero a range (punch a hole, discard with zeroing, or write zeros).
    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        write_zeros(self, off, len)
    }
    /// Operation counters since the device was opened.
    fn stats(&self) -> IoStats;
}

/// A 4 KiB page aligned to 4 KiB, so buffers made of pages satisfy direct I/O.
#[derive(
    Clone,
    Copy,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::KnownLayout,
    zerocopy::Immutable,
)]
#[repr(C, align(4096))]
pub struct Page(pub [u8; 4096]);

/// Page-aligned owned byte buffer.
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl Page {
    /// A zeroed aligned buffer of `pages` pages.
    pub fn zeroed_buf(pages: usize) -> AlignedBuf {
        AlignedBuf::zeroed(pages * 4096)
    }
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up internally to whole pages).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let pages = len.div_ceil(4096);
        AlignedBuf {
            pages: <Page as FromZeros>::new_vec_zeroed(pages).expect("allocation"),
            len,
        }
    }
    /// Copy `data` into a new aligned buffer of `len` bytes (zero padded).
    pub fn from_slice(data: &[u8], len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(len.max(data.len()));
        b[..data.len()].copy_from_slice(data);
        b
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.pages.as_bytes()[..self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.pages.as_mut_bytes()[..len]
    }
}

fn check_aligned(sector: u32, off: u64, len: usize, size: u64) -> io::Result<()> {
    let s = sector as u64;
    if off % s != 0 || len as u64 % s != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unaligned I/O: offset {off} length {len} sector {sector}"),
        ));
    }
    if off + len as u64 > size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("I/O beyond end of device: offset {off} length {len} size {size}"),
        ));
    }
    Ok(())
}

/// A real device or regular file opened with `O_DIRECT`.
pub struct FileDev {
    file: File,
    size: u64,
    sector: u32,
    is_block: bool,
    counters: Counters,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl FileDev {
    /// Open `path` for direct I/O. `writable` selects read-write.
    pub fn open(path: &Path, writable: bool) -> io::Result<FileDev> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path)?;
        let meta = file.metadata()?;
        let is_block = meta.file_type().is_block_device();
        let fd = file.as_raw_fd();
        let (size, sector) = if is_block {
            let mut size: u64 = 0;
            let mut ssz: libc::c_int = 0;
            // SAFETY: both ioctls write one integer of the stated type into
            // the pointer we pass, which points at a live local of that type.
            unsafe {
                if libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(fd, BLKSSZGET, &mut ssz as *mut libc::c_int) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            (size, ssz.max(512) as u32)
        } else if meta.file_type().is_file() {
            (meta.len(), probe_file_sector(&file, meta.len()))
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        Ok(FileDev {
            file,
            size,
            sector,
            is_block,
            counters: Counters::default(),
        })
    }

    /// Whether this is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }
}

/// Find the smallest direct-I/O alignment a file accepts (512 or 4096).
fn probe_file_sector(file: &File, len: u64) -> u32 {
    if len < 1024 {
        return 4096;
    }
    let mut buf = AlignedBuf::zeroed(512);
    match file.read_exact_at(&mut buf, 512) {
        Ok(()) => 512,
        Err(_) => 4096,
    }
}

impl BlockDev for FileDev {
    fn size(&self) -> u64 {
        self.size
    }
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_aligned(self.sector, off, buf.len(), self.size)?;
        self.counters.read(buf.len());
        if (buf.as_ptr() as usize) % 4096 == 0 {
            return self.file.read_exact_at(buf, off);
        }
        let mut bounce = AlignedBuf::zeroed(buf.len());
        self.file.read_exact_at(&mut bounce, off)?;
        buf.copy_from_slice(&bounce);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_aligned(self.sector, off, buf.len(), self.size)?;
        self.counters.write(buf.len());
        if (buf.as_ptr() as usize) % 4096 == 0 {
            return self.file.write_all_at(buf, off);
        }
        let bounce = AlignedBuf::from_slice(buf, buf.len());
        self.file.write_all_at(&bounce, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.counters.flush();
        self.file.sync_data()
    }
    fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        check_aligned(self.sector, off, len as usize, self.size)?;
        let fd = self.file.as_raw_fd();
        let rc = if self.is_block {
            let range: [u64; 2] = [off, len];
            // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer.
            unsafe { libc::ioctl(fd, BLKZEROOUT, range.as_ptr()) }
        } else {
            // SAFETY: plain syscall on an owned descriptor.
            unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            }
        };
        if rc == 0 {
            return Ok(());
        }
        // Fall back to writing zeros (filesystems without hole punching).
        write_zeros(self, off, len)
    }
    fn stats(&self) -> IoStats {
        self.counters.snapshot()
    }
}

/// An in-memory device: the fast twin of [`FileDev`] for unit tests.
pub struct MemDev {
    data: RwLock<Vec<u8>>,
    sector: u32,
    counters: Counters,
}

impl MemDev {
    /// A zeroed device of `size` bytes with 512-byte sectors.
    pub fn new(size: u64) -> MemDev {
        MemDev::from_image(vec![0; size as usize])
    }
    /// A device holding `image`.
    pub fn from_image(image: Vec<u8>) -> MemDev {
        MemDev {
            data: RwLock::new(image),
            sector: 512,
            counters: Counters::default(),
        }
    }
    /// A copy of the whole device contents.
    pub fn image(&self) -> Vec<u8> {
        self.data.read().expect("poisoned").clone()
    }
    /// Flip one bit (for corruption tests).
    pub fn flip_bit(&self, byte: u64, bit: u8) {
        self.data.write().expect("poisoned")[byte as usize] ^= 1 << bit;
    }
}

impl BlockDev for MemDev {
    fn size(&self) -> u64 {
        self.data.read().expect("poisoned").len() as u64
    }
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.data.read().expect("poisoned");
        check_aligned(self.sector, off, buf.len(), d.len() as u64)?;
        self.counters.read(buf.len());
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut d = self.data.write().expect("poisoned");
        check_aligned(self.sector, off, buf.len(), d.len() as u64)?;
        self.counters.write(buf.len());
        d[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.counters.flush();
        Ok(())
    }
    fn stats(&self) -> IoStats {
        self.counters.snapshot()
    }
}

/// What survives a simulated power loss among the writes issued since the
/// last flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKeep {
    /// Every unflushed write is lost.
    None,
    /// Every unflushed write survives.
    All,
    /// A pseudo-random subset survives, chosen by the seed.
    Subset(u64),
}

struct SimState {
    durable: Vec<u8>,
    visible: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    events: u64,
    crash_after: Option<u64>,
    crashed: bool,
}

/// A simulated device that counts writes and flushes ("events") and, once
/// `crash_after` events have happened, fails every further operation as if
/// the machine had lost power. [`SimDev::crash_image`] then gives the device
/// contents after the power loss.
pub struct SimDev {
    state: Mutex<SimState>,
    counters: Counters,
}

impl SimDev {
    /// A device holding `image`, crashing after `crash_after` events.
    pub fn new(image: Vec<u8>, crash_after: Option<u64>) -> Arc<SimDev> {
        Arc::new(SimDev {
            state: Mutex::new(SimState {
                durable: image.clone(),
                visible: image,
                pending: Vec::new(),
                events: 0,
                crash_after,
                crashed: false,
            }),
            counters: Counters::default(),
        })
    }
    /// Events (writes plus flushes) seen so far.
    pub fn events(&self) -> u64 {
        self.state.lock().expect("poisoned").events
    }
    /// Whether the crash point was reached.
    pub fn crashed(&self) -> bool {
        self.state.lock().expect("poisoned").crashed
    }
    /// Device contents after power loss, keeping unflushed writes per `keep`.
    pub fn crash_image(&self, keep: CrashKeep) -> Vec<u8> {
        let st = self.state.lock().expect("poisoned");
        let mut img = st.durable.clone();
        let mut rng = match keep {
            CrashKeep::Subset(seed) => seed | 1,
            _ => 1,
        };
        for (off, data) in &st.pending {
            let keep_it = match keep {
                CrashKeep::None => false,
                CrashKeep::All => true,
                CrashKeep::Subset(_) => {
                    // xorshift64
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng & 1 == 1
                }
            };
            if keep_it {
                img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        }
        img
    }

    fn event(st: &mut SimState) -> io::Result<()> {
        if st.crashed {
            return Err(io::Error::other("simulated power loss"));
        }
        if let Some(limit) = st.crash_after {
            if st.events >= limit {
                st.crashed = true;
                return Err(io::Error::other("simulated power loss"));
            }
        }
        st.events += 1;
        Ok(())
    }
}

impl BlockDev for SimDev {
    fn size(&self) -> u64 {
        self.state.lock().expect("poisoned").visible.len() as u64
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let st = self.state.lock().expect("poisoned");
        if st.crashed {
            return Err(io::Error::other("simulated power loss"));
        }
        check_aligned(512, off, buf.len(), st.visible.len() as u64)?;
        self.counters.read(buf.len());
        buf.copy_from_slice(&st.visible[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut st = self.state.lock().expect("poisoned");
        check_aligned(512, off, buf.len(), st.visible.len() as u64)?;
        SimDev::event(&mut st)?;
        self.counters.write(buf.len());
        st.visible[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        st.pending.push((off, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut st = self.state.lock().expect("poisoned");
        SimDev::event(&mut st)?;
        self.counters.flush();
        let pending = std::mem::take(&mut st.pending);
        for (off, data) in pending {
            st.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
    fn stats(&self) -> IoStats {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_dev_drops_unflushed_writes() {
        let dev = SimDev::new(vec![0; 4096], None);
        dev.write_at(&[1; 512], 0).unwrap();
        dev.flush().unwrap();
        dev.write_at(&[2; 512], 512).unwrap();
        let img = dev.crash_image(CrashKeep::None);
        assert_eq!(img[0], 1);
        assert_eq!(img[512], 0);
        let img = dev.crash_image(CrashKeep::All);
        assert_eq!(img[512], 2);
    }

    #[test]
    fn sim_dev_stops_after_n_events() {
        let dev = SimDev::new(vec![0; 4096], Some(2));
        dev.write_at(&[1; 512], 0).unwrap();
        dev.flush().unwrap();
        assert!(dev.write_at(&[1; 512], 0).is_err());
        assert!(dev.crashed());
        let mut b = [0u8; 512];
        assert!(dev.read_at(&mut b, 0).is_err());
    }

    #[test]
    fn unaligned_io_is_refused() {
        let dev = MemDev::new(8192);
        assert!(dev.write_at(&[0; 100], 0).is_err());
        assert!(dev.write_at(&[0; 512], 100).is_err());
        assert!(dev.write_at(&[0; 512], 8192).is_err());
    }

    #[test]
    fn file_dev_direct_io_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let dev = FileDev::open(&p, true).unwrap();
        assert_eq!(dev.size(), 1 << 20);
        let mut w = AlignedBuf::zeroed(4096);
        w[..5].copy_from_slice(b"cairn");
        dev.write_at(&w, 8192).unwrap();
        // An unaligned memory buffer goes through a bounce buffer.
        let mut v = vec![0u8; 4097];
        dev.read_at(&mut v[1..], 8192).unwrap();
        assert_eq!(&v[1..6], b"cairn");
        dev.flush().unwrap();
        dev.zero_range(8192, 4096).unwrap();
        let mut r = AlignedBuf::zeroed(4096);
        dev.read_at(&mut r, 8192).unwrap();
        assert!(r.iter().all(|&b| b == 0));
        assert_eq!(dev.stats().flushes, 1);
    }
}
