//! Confinement of the qemu-img runs that read untrusted images, with
//! Landlock: such a run may read the system's programs and libraries and
//! exactly the files the agent names (the import's source, by its open
//! descriptor), and write exactly the domain it imports into. An image that
//! names another host file (a backing file or an external data file, say
//! one written into it after the agent judged its header) makes qemu-img
//! fail with "Permission denied" instead of reading that file.
//!
//! The ruleset is built in the agent; the child only applies it between
//! fork and exec (`prctl(PR_SET_NO_NEW_PRIVS)` and
//! `landlock_restrict_self`, both async-signal-safe system calls).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const SYS_CREATE_RULESET: libc::c_long = 444;
const SYS_ADD_RULE: libc::c_long = 445;
const SYS_RESTRICT_SELF: libc::c_long = 446;
const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

/// Run programs.
pub const EXECUTE: u64 = 1 << 0;
/// Write files.
pub const WRITE_FILE: u64 = 1 << 1;
/// Read files.
pub const READ_FILE: u64 = 1 << 2;
/// List directories.
pub const READ_DIR: u64 = 1 << 3;
/// Every right of Landlock ABI 1 (also removing and making things).
const ABI1: u64 = (1 << 13) - 1;
const REFER: u64 = 1 << 13;
const TRUNCATE: u64 = 1 << 14;
const IOCTL_DEV: u64 = 1 << 15;

/// Directories whose files any confined run may read and execute: programs,
/// libraries, qemu's block modules.
const SYSTEM: &[&str] = &["/usr", "/lib", "/lib64", "/bin", "/sbin"];
/// Files of `/etc` the dynamic loader reads.
const SYSTEM_FILES: &[&str] = &["/etc/ld.so.cache"];

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// A Landlock ruleset under construction.
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
    handled: u64,
    /// Descriptors the child inherits.
    pass: Vec<RawFd>,
}

impl Ruleset {
    /// A ruleset that handles every file-system right this kernel knows,
    /// with the system's programs and libraries allowed; `None` when the
    /// kernel has no Landlock.
    pub fn for_untrusted_images() -> io::Result<Option<Ruleset>> {
        // SAFETY: the version query takes no pointers.
        let abi = unsafe {
            libc::syscall(
                SYS_CREATE_RULESET,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        };
        if abi < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(e),
            };
        }
        let mut handled = ABI1;
        if abi >= 2 {
            handled |= REFER;
        }
        if abi >= 3 {
            handled |= TRUNCATE;
        }
        if abi >= 5 {
            handled |= IOCTL_DEV;
        }
        let attr = RulesetAttr {
            handled_access_fs: handled,
        };
        // SAFETY: `attr` outlives the call and its size is passed.
        let fd = unsafe {
            libc::syscall(
                SYS_CREATE_RULESET,
                &attr,
                std::mem::size_of::<RulesetAttr>(),
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned by nobody else.
        let r = Ruleset {
            fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            handled,
            pass: Vec::new(),
        };
        for d in SYSTEM {
            match r.allow_path(Path::new(d), READ_FILE | READ_DIR | EXECUTE) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        // qemu probes file locking on /dev/null.
        for f in SYSTEM_FILES.iter().chain(&["/dev/null"]) {
            match r.allow_path(Path::new(f), READ_FILE) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        Ok(Some(r))
    }

    /// Allow `rights` on the file (or beneath the directory) `fd` is open on.
    pub fn allow(&self, fd: BorrowedFd<'_>, rights: u64) -> io::Result<()> {
        let attr = PathBeneathAttr {
            allowed_access: rights & self.handled,
            parent_fd: fd.as_raw_fd(),
        };
        // SAFETY: `attr` outlives the call.
        let rc = unsafe {
            libc::syscall(
                SYS_ADD_RULE,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Allow `rights` on `path` (a trusted path: the agent's own files).
    pub fn allow_path(&self, path: &Path, rights: u64) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let is_dir = std::fs::metadata(path)?.is_dir();
        let rights = if is_dir {
            rights
        } else {
            rights & (EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV)
        };
        self.allow(fd.as_fd(), rights)
    }

    /// Another handle on the same ruleset.
    pub fn try_clone(&self) -> io::Result<Ruleset> {
        Ok(Ruleset {
            fd: self.fd.try_clone()?,
            handled: self.handled,
            pass: self.pass.clone(),
        })
    }

    /// Allow `rights` on the open file `f` and hand it to the child: the
    /// path by which the child opens it (a confined process cannot reach
    /// another process's descriptors). `f` must stay open while the child
    /// runs.
    pub fn pass(&mut self, f: &std::fs::File, rights: u64) -> io::Result<String> {
        self.allow(f.as_fd(), rights)?;
        self.pass.push(f.as_raw_fd());
        Ok(format!("/proc/self/fd/{}", f.as_raw_fd()))
    }

    /// Set up the calling process, a child between fork and exec: the
    /// passed descriptors survive exec, and the ruleset applies. Only
    /// async-signal-safe system calls.
    pub fn enter(&self) -> io::Result<()> {
        for &fd in &self.pass {
            // SAFETY: fcntl on a descriptor the parent keeps open.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        restrict_self(self.fd.as_raw_fd())
    }
}

/// Confine the calling process to `ruleset`: only async-signal-safe
/// system calls.
fn restrict_self(ruleset: RawFd) -> io::Result<()> {
    // SAFETY: plain system calls without pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(SYS_RESTRICT_SELF, ruleset, 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::{QemuImg, SystemQemu};

    fn qemu_img(args: &[&str]) {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = SystemQemu::default().output(&args).unwrap();
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    }

    fn confined_convert(img: &Path, out: &Path) -> crate::qemu::QemuOutput {
        let mut r = Ruleset::for_untrusted_images()
            .unwrap()
            .expect("this kernel has Landlock");
        let src = std::fs::File::open(img).unwrap();
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(out)
            .unwrap();
        let s = r.pass(&src, READ_FILE).unwrap();
        let d = r.pass(&dst, READ_FILE | WRITE_FILE).unwrap();
        let args = ["convert", "-n", "-f", "qcow2", "-O", "raw", &s, &d].map(String::from);
        SystemQemu::default()
            .confined(Some(r))
            .output(&args)
            .unwrap()
    }

    #[test]
    fn qemu_a_confined_run_reads_its_image_but_not_a_data_file_it_names() {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        let (data, evil, good, out) = (
            p("data.raw"),
            p("evil.qcow2"),
            p("good.qcow2"),
            p("out.raw"),
        );
        let opt = format!("data_file={},data_file_raw=on", data.display());
        let evil_name = evil.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opt, evil_name, "1M"]);
        std::fs::write(&data, vec![0xd1u8; 1 << 20]).unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "1M"]);
        std::fs::write(&out, vec![0u8; 1 << 20]).unwrap();
        // Unconfined, qemu-img follows the data file the image names.
        qemu_img(&[
            "convert",
            "-n",
            "-f",
            "qcow2",
            "-O",
            "raw",
            evil.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_eq!(std::fs::read(&out).unwrap(), vec![0xd1u8; 1 << 20]);
        std::fs::write(&out, vec![0u8; 1 << 20]).unwrap();
        // Confined, it cannot; the output is not written.
        let r = confined_convert(&evil, &out);
        assert_ne!(r.code, Some(0), "{r:?}");
        assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
        assert_eq!(std::fs::read(&out).unwrap(), vec![0u8; 1 << 20]);
        // An image that stands alone converts as usual.
        let r = confined_convert(&good, &out);
        assert_eq!(r.code, Some(0), "{r:?}");
    }
}
