//! The file boundary between clients and the host: the import/export
//! directories.
//!
//! Each directory is opened once, when the agent starts, and every path a
//! client names is resolved beneath that handle one component at a time
//! with `O_NOFOLLOW`: a symbolic link anywhere in the path, a `..`, or a
//! path outside every directory is refused, whatever the link points at.
//! The file is opened once and that descriptor is what the job reads or
//! writes, and what qemu-img is given (as `/proc/PID/fd/N`, which reopens
//! the same inode however the directory changes meanwhile). An export is
//! created exclusively, mode 0600, and its clean-up removes the name only
//! while it still names the inode the job created.
//!
//! The properties held, whatever another process does to the directory
//! during a job (renames, symlinks, directory swaps): an import reads the
//! bytes of the file named at the call and of no other file; an export
//! writes and removes nothing outside the directory.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use cairn_domain::limits::quote;
use cairn_domain::DomainError;

use crate::error::{AgentError, Result};

/// The import/export directories of an agent, opened.
#[derive(Debug, Default)]
pub struct IoDirs {
    dirs: Vec<IoDir>,
}

#[derive(Debug)]
struct IoDir {
    /// The directory as configured and as resolved at start; a client may
    /// name files under either.
    names: Vec<PathBuf>,
    fd: OwnedFd,
}

/// A file opened for import: a regular file, read-only.
#[derive(Debug)]
pub struct Source {
    /// The open file; everything reads through it.
    pub file: File,
    /// The path as the client named it (for messages only).
    pub path: PathBuf,
    /// Its size when it was opened.
    pub len: u64,
}

/// A file created for export, exclusively, mode 0600.
#[derive(Debug)]
pub struct Target {
    /// The open file; everything writes through it.
    pub file: File,
    /// The path as the client named it (for messages only).
    pub path: PathBuf,
    dir: OwnedFd,
    name: CString,
    dev: u64,
    ino: u64,
}

/// The path by which a child process (qemu-img) reopens `f`: the inode this
/// process has open, not whatever the file's name means by then.
pub fn fd_path(f: &File) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd())
}

impl IoDirs {
    /// Open every configured directory.
    pub fn open(paths: &[PathBuf]) -> Result<IoDirs> {
        let mut dirs = Vec::new();
        for p in paths {
            let context = || format!("import/export directory {}", p.display());
            let real = p.canonicalize().map_err(AgentError::io(context()))?;
            let c = cstr(real.as_os_str()).map_err(AgentError::io(context()))?;
            let fd = open_at(libc::AT_FDCWD, &c, libc::O_DIRECTORY | libc::O_RDONLY, 0)
                .map_err(AgentError::io(context()))?;
            let mut names = vec![p.clone()];
            if real != *p {
                names.push(real);
            }
            dirs.push(IoDir { names, fd });
        }
        Ok(IoDirs { dirs })
    }

    /// The directories as resolved at start.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.names.last().cloned().unwrap_or_default())
            .collect()
    }

    /// Open the regular file `p` names for reading.
    pub fn open_source(&self, p: &str) -> Result<Source> {
        let (dir, name) = self.parent(p)?;
        // O_NONBLOCK: opening a FIFO must not wait for a writer.
        let flags = libc::O_RDONLY | libc::O_NONBLOCK;
        let fd = open_at(dir.as_raw_fd(), &name, flags, 0).map_err(|e| refusal(p, "file", e))?;
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(AgentError::io("reading the file's size"))?;
        if !meta.file_type().is_file() {
            return Err(AgentError::invalid(
                "path",
                format!("{} is not a regular file", quote(p)),
            ));
        }
        // Reads block as usual from here on.
        set_blocking(&file).map_err(AgentError::io("opening the file"))?;
        Ok(Source {
            file,
            path: PathBuf::from(p),
            len: meta.len(),
        })
    }

    /// Create the file `p` names, exclusively: mode 0600, or 0660 in a
    /// shared group directory (setgid and open to its group, e.g. group
    /// `cairn` with mode 2750: the operator's choice of who reads exports;
    /// the file takes the directory's group).
    pub fn create_target(&self, p: &str) -> Result<Target> {
        let (dir, name) = self.parent(p)?;
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
        let grouped = {
            // SAFETY: a zeroed stat is a valid value; fstat fills it for a
            // descriptor we own.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::fstat(dir.as_raw_fd(), &mut st) };
            rc == 0 && st.st_mode & 0o2050 == 0o2050
        };
        let mode = if grouped { 0o660 } else { 0o600 };
        let fd =
            open_at(dir.as_raw_fd(), &name, flags, mode).map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST) => AgentError::Domain(DomainError::AlreadyExists {
                    what: format!("{} already exists", quote(p)),
                }),
                _ => refusal(p, "file", e),
            })?;
        let file = File::from(fd);
        if grouped {
            // The umask would take the group's write bit.
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(AgentError::io("creating the file"))?;
        }
        let meta = file
            .metadata()
            .map_err(AgentError::io("creating the file"))?;
        Ok(Target {
            file,
            path: PathBuf::from(p),
            dir,
            name,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The directory handle of `p`'s parent, walked beneath its io dir one
    /// component at a time without following links, and the last component.
    fn parent(&self, p: &str) -> Result<(OwnedFd, CString)> {
        let bad = |why: &str| AgentError::invalid("path", format!("{} {why}", quote(p)));
        if p.is_empty() {
            return Err(bad("is empty"));
        }
        if p.chars().any(char::is_control) {
            return Err(bad("has control characters"));
        }
        let path = Path::new(p);
        if !path.is_absolute() {
            return Err(bad("is not absolute"));
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(bad("has a '..' component"));
        }
        let (dir, rest) = self
            .dirs
            .iter()
            .find_map(|d| {
                d.names
                    .iter()
                    .find_map(|n| path.strip_prefix(n).ok())
                    .map(|rest| (d, rest))
            })
            .ok_or_else(|| {
                let dirs: Vec<String> = self
                    .paths()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                bad(&format!(
                    "is outside the allowed import/export directories ({})",
                    dirs.join(", ")
                ))
            })?;
        let parts: Vec<&OsStr> = rest.iter().collect();
        let Some((last, walk)) = parts.split_last() else {
            return Err(bad("names the directory itself, not a file in it"));
        };
        let mut cur = dir
            .fd
            .try_clone()
            .map_err(AgentError::io("opening the directory"))?;
        for part in walk {
            let c = cstr(part).map_err(|_| bad("has a NUL byte"))?;
            cur = open_at(cur.as_raw_fd(), &c, libc::O_DIRECTORY | libc::O_RDONLY, 0)
                .map_err(|e| refusal(p, "directory", e))?;
        }
        let name = cstr(last).map_err(|_| bad("has a NUL byte"))?;
        Ok((cur, name))
    }
}

impl Target {
    /// Remove the file, if its name still names the inode created here (a
    /// name another process put in its place is left alone). Whether it
    /// was removed.
    pub fn remove(&self) -> io::Result<bool> {
        // SAFETY: `stat` is plain data; the pointers outlive the calls.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::fstatat(
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Ok(false);
        }
        if st.st_dev != self.dev || st.st_ino != self.ino {
            return Ok(false);
        }
        // SAFETY: as above.
        let rc = unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }
}

/// An open failure as a refusal of the path: what is missing is NOT_FOUND,
/// a link or a non-directory in the way is INVALID_ARGUMENT.
fn refusal(p: &str, what: &'static str, e: io::Error) -> AgentError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => AgentError::not_found(what, p.to_string()),
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => AgentError::invalid(
            "path",
            format!(
                "{} is or passes through a symbolic link or something that is not a directory",
                quote(p)
            ),
        ),
        _ => AgentError::io(format!("opening {p}"))(e),
    }
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
fn open_at(dir: i32, name: &CString, flags: i32, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_blocking(f: &File) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, IoDirs) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("io")).unwrap();
        let d = IoDirs::open(&[t.path().join("io")]).unwrap();
        (t, d)
    }

    #[test]
    fn links_dot_dots_and_outside_paths_are_refused() {
        let (t, d) = dirs();
        let io = t.path().join("io");
        std::fs::write(t.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), io.join("link")).unwrap();
        std::fs::create_dir(t.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(t.path().join("elsewhere"), io.join("sub")).unwrap();
        for p in [
            io.join("link"),
            io.join("sub/x"),
            io.join("../secret"),
            t.path().join("secret"),
            io.clone(),
        ] {
            let e = d.open_source(p.to_str().unwrap()).unwrap_err();
            assert_eq!(e.code(), "invalid_argument", "{p:?}: {e}");
        }
        let e = d
            .create_target(io.join("sub/new").to_str().unwrap())
            .unwrap_err();
        assert_eq!(e.code(), "invalid_argument", "{e}");
        assert!(!t.path().join("elsewhere/new").exists());
        let e = d
            .open_source(io.join("missing").to_str().unwrap())
            .unwrap_err();
        assert_eq!(e.code(), "not_found", "{e}");
    }

    #[test]
    fn fifos_are_refused_without_waiting_for_a_writer() {
        let (t, d) = dirs();
        let fifo = t.path().join("io/fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = d.open_source(fifo.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_target_is_created_0600_and_removed_only_while_it_is_ours() {
        let (t, d) = dirs();
        let p = t.path().join("io/out.raw");
        let tg = d.create_target(p.to_str().unwrap()).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // In a shared group directory (setgid, open to the group): 0660.
        use std::os::unix::fs::PermissionsExt;
        let shared = t.path().join("io/shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o2750)).unwrap();
        let sp = shared.join("out.raw");
        d.create_target(sp.to_str().unwrap()).unwrap();
        assert_eq!(std::fs::metadata(&sp).unwrap().mode() & 0o777, 0o660);
        let e = d.create_target(p.to_str().unwrap()).unwrap_err();
        assert_eq!(e.code(), "already_exists", "{e}");
        // Another file put in its place survives the clean-up.
        std::fs::rename(&p, t.path().join("io/moved")).unwrap();
        std::fs::write(&p, b"someone else's").unwrap();
        assert!(!tg.remove().unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"someone else's");
        std::fs::remove_file(&p).unwrap();
        std::fs::rename(t.path().join("io/moved"), &p).unwrap();
        assert!(tg.remove().unwrap());
        assert!(!p.exists());
    }
}
