//! Loop devices over extent runs, behind a small trait.
//!
//! The real implementation talks to the kernel with ioctls (no `losetup`
//! process per device) and reads device state back from sysfs, so that an
//! agent that restarts finds what it attached before. The in-memory twin
//! lets the activation logic be tested without root.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One attached loop device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopInfo {
    /// N of /dev/loopN.
    pub index: u32,
    /// Backing file or device.
    pub backing: PathBuf,
    /// Byte offset into the backing file.
    pub offset: u64,
    /// Bytes exposed.
    pub size: u64,
    /// Whether direct I/O is on.
    pub direct_io: bool,
    /// The owner's mark given at attach (the kernel keeps it as the
    /// device's file name), so agents sharing a machine tell their devices
    /// apart.
    pub owner: String,
}

impl LoopInfo {
    /// `/dev/loopN`.
    pub fn device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.index))
    }
}

/// What the agent needs from loop devices.
pub trait LoopControl: Send + Sync {
    /// Attach a new device over `size` bytes of `backing` at `offset`,
    /// with direct I/O, marked as `owner`'s (at most 63 bytes).
    fn attach(&self, backing: &Path, offset: u64, size: u64, owner: &str) -> io::Result<LoopInfo>;
    /// Detach a device. Detaching one that is gone is not an error. A
    /// device a process holds open stays until its last close (the
    /// kernel's autoclear): `list` shows it until then.
    fn detach(&self, index: u32) -> io::Result<()>;
    /// Change how many bytes a device exposes.
    fn resize(&self, index: u32, size: u64) -> io::Result<()>;
    /// Every attached device.
    fn list(&self) -> io::Result<Vec<LoopInfo>>;
    /// Processes that have the device open (pids).
    fn openers(&self, index: u32) -> io::Result<Vec<u32>>;
}

// ioctl numbers from <linux/loop.h>.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

fn zeroed_info() -> LoopInfo64 {
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The kernel's loop driver.
#[derive(Debug, Default)]
pub struct KernelLoop;

impl KernelLoop {
    fn open_dev(index: u32) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/dev/loop{index}"))
    }

    fn read_sys(index: u32, name: &str) -> io::Result<String> {
        Ok(
            std::fs::read_to_string(format!("/sys/block/loop{index}/loop/{name}"))?
                .trim()
                .to_string(),
        )
    }

    /// The name given at attach (LOOP_GET_STATUS64's file name).
    fn owner(index: u32) -> io::Result<String> {
        let dev = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/dev/loop{index}"))?;
        let mut info = zeroed_info();
        // SAFETY: LOOP_GET_STATUS64 writes a struct loop_info64.
        cvt(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info) })?;
        let n = info
            .lo_file_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(LO_NAME_SIZE);
        Ok(String::from_utf8_lossy(&info.lo_file_name[..n]).into_owned())
    }

    /// A device detached while it is read (by another process) is gone:
    /// `None`, as if it had never been listed.
    fn info(index: u32) -> io::Result<Option<LoopInfo>> {
        let gone = |e: &io::Error| {
            e.kind() == io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENXIO))
        };
        match Self::read_info(index) {
            Err(e) if gone(&e) => Ok(None),
            r => r.map(Some),
        }
    }

    fn read_info(index: u32) -> io::Result<LoopInfo> {
        let backing = Self::read_sys(index, "backing_file")?;
        let num = |n: &str| -> io::Result<u64> {
            Self::read_sys(index, n)?
                .parse()
                .map_err(|_| io::Error::other(format!("loop{index}: bad sysfs {n}")))
        };
        let offset = num("offset")?;
        let limit = num("sizelimit")?;
        let size = if limit != 0 {
            limit
        } else {
            let sectors: u64 = std::fs::read_to_string(format!("/sys/block/loop{index}/size"))?
                .trim()
                .parse()
                .map_err(|_| io::Error::other("bad sysfs size"))?;
            sectors * 512
        };
        let direct_io = Self::read_sys(index, "dio")
            .map(|s| s == "1")
            .unwrap_or(false);
        Ok(LoopInfo {
            index,
            backing: PathBuf::from(backing.trim_end_matches(" (deleted)")),
            offset,
            size,
            direct_io,
            owner: Self::owner(index).unwrap_or_default(),
        })
    }
}

impl LoopControl for KernelLoop {
    fn attach(&self, backing: &Path, offset: u64, size: u64, owner: &str) -> io::Result<LoopInfo> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(backing)?;
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")?;
        // Another process may take the free device between GET_FREE and
        // CONFIGURE; then the kernel answers EBUSY and we ask again.
        for _ in 0..64 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument.
            let index = cvt(unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) })? as u32;
            let dev = Self::open_dev(index)?;
            let mut info = zeroed_info();
            info.lo_offset = offset;
            info.lo_sizelimit = size;
            info.lo_flags = LO_FLAGS_DIRECT_IO;
            let name = owner.as_bytes();
            let n = name.len().min(LO_NAME_SIZE - 1);
            info.lo_file_name[..n].copy_from_slice(&name[..n]);
            let cfg = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size: 512,
                info,
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads a struct loop_config.
            let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
            if rc == 0 {
                return Self::info(index)?
                    .ok_or_else(|| io::Error::other(format!("loop{index} vanished after attach")));
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(e);
            }
        }
        Err(io::Error::other("no free loop device after 64 tries"))
    }

    fn detach(&self, index: u32) -> io::Result<()> {
        let dev = match Self::open_dev(index) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // SAFETY: LOOP_CLR_FD takes no argument.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(()); // not attached
            }
            return Err(e);
        }
        Ok(())
    }

    fn resize(&self, index: u32, size: u64) -> io::Result<()> {
        let dev = Self::open_dev(index)?;
        let mut info = zeroed_info();
        // SAFETY: LOOP_GET_STATUS64 writes a struct loop_info64.
        cvt(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info) })?;
        info.lo_sizelimit = size;
        // SAFETY: LOOP_SET_STATUS64 reads a struct loop_info64.
        cvt(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64, &info) })?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        cvt(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_CAPACITY, 0) })?;
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<LoopInfo>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/sys/block")? {
            let name = e?.file_name();
            let Some(n) = name.to_str().and_then(|s| s.strip_prefix("loop")) else {
                continue;
            };
            let Ok(index) = n.parse::<u32>() else {
                continue;
            };
            if let Some(i) = Self::info(index)? {
                out.push(i);
            }
        }
        out.sort_by_key(|i| i.index);
        Ok(out)
    }

    fn openers(&self, index: u32) -> io::Result<Vec<u32>> {
        let dev = PathBuf::from(format!("/dev/loop{index}"));
        let mut pids = Vec::new();
        let me = std::process::id();
        for e in std::fs::read_dir("/proc")? {
            let e = e?;
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
                continue; // gone, or not ours to look at
            };
            for fd in fds.flatten() {
                if std::fs::read_link(fd.path()).is_ok_and(|t| t == dev) {
                    pids.push(pid);
                    break;
                }
            }
        }
        // A device stacked on this one (another loop, device-mapper) holds
        // it too.
        if let Ok(h) = std::fs::read_dir(format!("/sys/block/loop{index}/holders")) {
            if h.flatten().next().is_some() {
                pids.push(0);
            }
        }
        Ok(pids)
    }
}

/// In-memory loop devices for unit tests.
#[derive(Debug, Default)]
pub struct MemLoop {
    state: Mutex<MemState>,
}

#[derive(Debug, Default)]
struct MemState {
    devs: BTreeMap<u32, LoopInfo>,
    open: BTreeMap<u32, Vec<u32>>,
    /// Detached while open: goes at the last close.
    autoclear: std::collections::BTreeSet<u32>,
}

impl MemLoop {
    /// Pretend processes `pids` have device `index` open (none: the last
    /// one closed it, and a device detached meanwhile goes).
    pub fn set_open(&self, index: u32, pids: Vec<u32>) {
        let mut s = self.state.lock().expect("poisoned");
        if pids.is_empty() && s.autoclear.remove(&index) {
            s.devs.remove(&index);
        }
        s.open.insert(index, pids);
    }
}

impl LoopControl for MemLoop {
    fn attach(&self, backing: &Path, offset: u64, size: u64, owner: &str) -> io::Result<LoopInfo> {
        let mut s = self.state.lock().expect("poisoned");
        let index = (0..).find(|i| !s.devs.contains_key(i)).expect("u32 space");
        let info = LoopInfo {
            index,
            backing: backing.to_path_buf(),
            offset,
            size,
            direct_io: true,
            owner: owner.to_string(),
        };
        s.devs.insert(index, info.clone());
        Ok(info)
    }
    fn detach(&self, index: u32) -> io::Result<()> {
        let mut s = self.state.lock().expect("poisoned");
        if s.open.get(&index).is_some_and(|p| !p.is_empty()) {
            s.autoclear.insert(index);
            return Ok(());
        }
        s.devs.remove(&index);
        s.open.remove(&index);
        Ok(())
    }
    fn resize(&self, index: u32, size: u64) -> io::Result<()> {
        let mut s = self.state.lock().expect("poisoned");
        match s.devs.get_mut(&index) {
            Some(d) => {
                d.size = size;
                Ok(())
            }
            None => Err(io::Error::from_raw_os_error(libc::ENXIO)),
        }
    }
    fn list(&self) -> io::Result<Vec<LoopInfo>> {
        Ok(self
            .state
            .lock()
            .expect("poisoned")
            .devs
            .values()
            .cloned()
            .collect())
    }
    fn openers(&self, index: u32) -> io::Result<Vec<u32>> {
        Ok(self
            .state
            .lock()
            .expect("poisoned")
            .open
            .get(&index)
            .cloned()
            .unwrap_or_default())
    }
}

/// One conformance suite for both implementations.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    pub fn attach_list_resize_detach(lc: &dyn LoopControl, backing: &Path) {
        let a = lc.attach(backing, 1 << 20, 2 << 20, "cairn:test").unwrap();
        assert_eq!(a.offset, 1 << 20);
        assert_eq!(a.owner, "cairn:test");
        assert_eq!(a.size, 2 << 20);
        assert!(a.direct_io, "direct I/O must be on");
        let b = lc.attach(backing, 4 << 20, 1 << 20, "cairn:other").unwrap();
        assert_ne!(a.index, b.index);
        let l = lc.list().unwrap();
        assert!(l.iter().any(|i| i.index == a.index && i.offset == 1 << 20));
        lc.resize(b.index, 3 << 20).unwrap();
        let l = lc.list().unwrap();
        let b2 = l.iter().find(|i| i.index == b.index).unwrap();
        assert_eq!(b2.size, 3 << 20);
        assert!(lc.openers(a.index).unwrap().is_empty());
        lc.detach(a.index).unwrap();
        lc.detach(b.index).unwrap();
        lc.detach(b.index).unwrap(); // twice is fine
        let l = lc.list().unwrap();
        assert!(!l.iter().any(|i| i.backing == backing));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_loop_conformance() {
        conformance::attach_list_resize_detach(&MemLoop::default(), Path::new("/x/domain"));
    }

    /// An 8 MiB backing file in `dir`, by its canonical path; `None`
    /// (skipped) unless root.
    fn root_backing(dir: &tempfile::TempDir) -> Option<PathBuf> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return None;
        }
        let f = dir.path().join("backing");
        std::fs::File::create(&f).unwrap().set_len(8 << 20).unwrap();
        Some(f.canonicalize().unwrap())
    }

    #[test]
    fn root_kernel_loop_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let Some(f) = root_backing(&dir) else { return };
        conformance::attach_list_resize_detach(&KernelLoop, &f);
    }

    /// Regression: a device detached by another process while the list
    /// read its sysfs files made the whole list fail with ENOENT.
    #[test]
    fn root_kernel_loop_list_survives_devices_detached_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let Some(f) = root_backing(&dir) else { return };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (f, stop) = (f.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 300 {
                    let d = KernelLoop.attach(&f, 0, 1 << 20, "cairn:churn").unwrap();
                    KernelLoop.detach(d.index).unwrap();
                    n += 1;
                }
            })
        };
        for _ in 0..300 {
            if let Err(e) = KernelLoop.list() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                panic!("listing failed while devices came and went: {e}");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().unwrap();
        assert!(!KernelLoop.list().unwrap().iter().any(|d| d.backing == f));
    }
}
