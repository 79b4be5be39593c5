//! Cluster locks behind one small trait.
//!
//! A lock is taken per resource and carries a fencing token: a number that
//! grows with every acquisition of any lock of the domain, so a record
//! written under a newer lock always carries a larger token than one written
//! under an older lock. Tokens must keep growing when the lock service
//! itself restarts with no memory (a fresh process, a wiped `/run`, a wiped
//! etcd), or every record written before would fence out every writer
//! after: so a token is `max(previous + 1, now in microseconds)`, a hybrid
//! logical clock that stays ahead of anything issued before a restart. Two implementations live here: [`MemLockService`]
//! (one process) and [`LocalLockService`] (one machine: an in-process table
//! plus `flock` files so that processes exclude each other). The etcd one
//! lives in the cluster crate; all pass [`conformance`].

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{DomainError, Result};
use crate::model::{TagId, VolumeId};

/// A fencing token.
pub type Token = u64;

/// The clock part of a token: microseconds since the Unix epoch.
pub fn token_floor() -> Token {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The next token after `last`.
pub fn next_token(last: Token) -> Token {
    (last + 1).max(token_floor())
}

/// What a lock protects, in lock order: a disk's operation lock before
/// tags before volumes before allocation map pages (by map, then page).
/// Host slot and named locks are taken alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// A high-level operation on a disk (the coordinator holds it across
    /// the agent calls the operation makes; agents never take it).
    Disk(TagId),
    /// A tag and the chain under it.
    Tag(TagId),
    /// One volume.
    Volume(VolumeId),
    /// One page of the allocation map: bitmap `map` (0 extents, 1 volume
    /// slots, 2 tag slots), page `page` (innermost, held briefly).
    AllocPage {
        /// The bitmap.
        map: u8,
        /// The page within it.
        page: u32,
    },
    /// A host slot and its journal.
    HostSlot(u32),
    /// A cluster-wide lock outside the domain's data, e.g. the
    /// coordinator's leadership (its key ignores the domain).
    Named(String),
}

/// A lockable resource of one domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    /// The domain.
    pub domain: uuid::Uuid,
    /// What in it.
    pub kind: ResourceKind,
}

impl Resource {
    /// The lock's class and the parts of its name in that class.
    fn parts(&self) -> (&'static str, Vec<String>) {
        match &self.kind {
            ResourceKind::Disk(t) => ("disk", vec![t.to_string()]),
            ResourceKind::Tag(t) => ("tag", vec![t.to_string()]),
            ResourceKind::Volume(v) => ("volume", vec![v.to_string()]),
            ResourceKind::AllocPage { map, page } => {
                ("alloc", vec![map.to_string(), page.to_string()])
            }
            ResourceKind::HostSlot(i) => ("slot", vec![i.to_string()]),
            ResourceKind::Named(n) => ("named", vec![n.clone()]),
        }
    }

    /// The lock's key, e.g. `cairn/<domain>/tag/<id>`; named locks are
    /// `cairn/lock/<name>`, of no domain.
    pub fn key(&self) -> String {
        match self.parts() {
            ("named", n) => format!("cairn/lock/{}", n.join("/")),
            (class, n) => format!("cairn/{}/{class}/{}", self.domain, n.join("/")),
        }
    }

    /// The lock file's name in the single-machine service, e.g.
    /// `tag-<id>.lock`.
    fn file_name(&self) -> String {
        let (class, n) = self.parts();
        format!("{class}-{}.lock", n.join("-"))
    }
}

/// A held lock, as an implementation provides it. Dropping it releases;
/// a networked service may finish the release in the background (the
/// caller does not wait a round trip for it): the same handle's later calls
/// wait for it, other handles see the lock free once it reached the service
/// (a waiter is woken then).
pub trait HeldLock: Send + Sync {
    /// The fencing token of this acquisition.
    fn token(&self) -> Token;
    /// Whether the lock is still certainly held (a lease-based
    /// implementation fails this before the lease could have expired).
    fn check(&self) -> Result<()>;
    /// Whether the lock is gone for good (its session ended), as opposed
    /// to unconfirmed for now.
    fn lost(&self) -> bool {
        false
    }
}

/// A held lock on one resource.
pub struct LockGuard {
    resource: Resource,
    inner: Box<dyn HeldLock>,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LockGuard({}, token {})",
            self.resource.key(),
            self.token()
        )
    }
}

impl LockGuard {
    /// Wrap an implementation's held lock.
    pub fn new(resource: Resource, inner: Box<dyn HeldLock>) -> LockGuard {
        LockGuard { resource, inner }
    }
    /// What is locked.
    pub fn resource(&self) -> &Resource {
        &self.resource
    }
    /// The fencing token.
    pub fn token(&self) -> Token {
        self.inner.token()
    }
    /// Fail if the lock may no longer be held.
    pub fn check(&self) -> Result<()> {
        self.inner.check()
    }
    /// Whether the lock is gone for good.
    pub fn lost(&self) -> bool {
        self.inner.lost()
    }
}

/// What [`LockService::acquire_all_then_read`] gives: the guards, and the
/// holders of the locks it was asked to read.
pub type Acquired = (Vec<LockGuard>, Vec<Option<Token>>);

/// A lock service.
pub trait LockService: Send + Sync {
    /// Take the lock, waiting up to `timeout` (zero: try once).
    fn acquire(&self, resource: &Resource, timeout: Duration) -> Result<LockGuard>;
    /// The token of whoever holds the lock now, if anyone does (after this
    /// handle's own releases of it have reached the service).
    fn holder(&self, resource: &Resource) -> Result<Option<Token>>;
    /// Take every lock of `resources` (sorted, distinct: the fixed order),
    /// waiting up to `timeout` for each; all or none. A service that can
    /// take free locks in one round trip does so; by default they are taken
    /// one by one.
    fn acquire_all(&self, resources: &[Resource], timeout: Duration) -> Result<Vec<LockGuard>> {
        resources.iter().map(|r| self.acquire(r, timeout)).collect()
    }
    /// The holders of several locks, read at one moment where the service
    /// can.
    fn holders(&self, resources: &[Resource]) -> Result<Vec<Option<Token>>> {
        resources.iter().map(|r| self.holder(r)).collect()
    }
    /// [`LockService::acquire_all`], then the holders of `read` as they
    /// are once those locks are held (in the same round trip where the
    /// service can).
    fn acquire_all_then_read(
        &self,
        resources: &[Resource],
        timeout: Duration,
        read: &[Resource],
    ) -> Result<(Vec<LockGuard>, Vec<Option<Token>>)> {
        let guards = self.acquire_all(resources, timeout)?;
        let holders = self.holders(read)?;
        Ok((guards, holders))
    }
    /// How long a new holder of a lock whose previous holder died waits
    /// before touching what that holder may have been writing: the margin
    /// by which a lease-based holder stops writing before its lease can
    /// expire, covering clock drift. Zero where death is certain at once.
    fn takeover_delay(&self) -> Duration {
        Duration::ZERO
    }
}

struct Table {
    held: Mutex<HashMap<String, Token>>,
    released: Condvar,
}

impl Table {
    fn new() -> Arc<Table> {
        Arc::new(Table {
            held: Mutex::new(HashMap::new()),
            released: Condvar::new(),
        })
    }

    /// Wait until `key` is free in this process and mark it taken.
    fn enter(&self, key: &str, deadline: Instant) -> bool {
        let mut held = self.held.lock().expect("poisoned");
        loop {
            if !held.contains_key(key) {
                held.insert(key.to_string(), 0);
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            held = self
                .released
                .wait_timeout(held, deadline - now)
                .expect("poisoned")
                .0;
        }
    }

    fn set_token(&self, key: &str, token: Token) {
        self.held
            .lock()
            .expect("poisoned")
            .insert(key.to_string(), token);
    }

    fn leave(&self, key: &str) {
        self.held.lock().expect("poisoned").remove(key);
        self.released.notify_all();
    }

    fn holder(&self, key: &str) -> Option<Token> {
        self.held.lock().expect("poisoned").get(key).copied()
    }
}

/// Locks shared by the threads of one process.
#[derive(Clone)]
pub struct MemLockService {
    table: Arc<Table>,
    last: Arc<AtomicU64>,
}

impl Default for MemLockService {
    fn default() -> Self {
        MemLockService::new()
    }
}

impl MemLockService {
    /// A new, empty lock table.
    pub fn new() -> MemLockService {
        MemLockService {
            table: Table::new(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }
}

struct MemHeld {
    table: Arc<Table>,
    key: String,
    token: Token,
}

impl HeldLock for MemHeld {
    /// An in-process lock is held until its guard drops.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    fn token(&self) -> Token {
        self.token
    }
}

impl Drop for MemHeld {
    fn drop(&mut self) {
        self.table.leave(&self.key);
    }
}

impl LockService for MemLockService {
    fn acquire(&self, resource: &Resource, timeout: Duration) -> Result<LockGuard> {
        let key = resource.key();
        if !self.table.enter(&key, Instant::now() + timeout) {
            return Err(DomainError::LockTimeout { resource: key });
        }
        let mut last = self.last.load(Ordering::SeqCst);
        let token = loop {
            let t = next_token(last);
            match self
                .last
                .compare_exchange(last, t, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break t,
                Err(cur) => last = cur,
            }
        };
        self.table.set_token(&key, token);
        Ok(LockGuard::new(
            resource.clone(),
            Box::new(MemHeld {
                table: self.table.clone(),
                key,
                token,
            }),
        ))
    }

    fn holder(&self, resource: &Resource) -> Result<Option<Token>> {
        Ok(self.table.holder(&resource.key()))
    }
}

/// Locks for one machine: an in-process table, then an exclusive `flock` on
/// a file per resource under a directory that every process on the machine
/// uses (by default `/run/cairn/locks`). Tokens come from a counter file
/// incremented under its own `flock`, so they grow across processes.
#[derive(Clone)]
pub struct LocalLockService {
    dir: PathBuf,
    table: Arc<Table>,
}

fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn would_block(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EWOULDBLOCK)
}

impl LocalLockService {
    /// Locks under `dir`, which is created if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<LocalLockService> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| DomainError::Lock {
            context: format!("creating lock directory {}", dir.display()),
            source: source.into(),
        })?;
        Ok(LocalLockService {
            dir,
            table: Table::new(),
        })
    }

    /// The directory holding the lock files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn domain_dir(&self, domain: &uuid::Uuid) -> Result<PathBuf> {
        let d = self.dir.join(domain.to_string());
        fs::create_dir_all(&d).map_err(|source| DomainError::Lock {
            context: format!("creating {}", d.display()),
            source: source.into(),
        })?;
        Ok(d)
    }

    fn next_token(&self, domain_dir: &Path) -> io::Result<Token> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(domain_dir.join("tokens"))?;
        flock(&f, libc::LOCK_EX)?;
        let mut b = [0u8; 8];
        let n = f.read_at(&mut b, 0)?;
        let cur = if n == 8 { u64::from_le_bytes(b) } else { 0 };
        let next = next_token(cur);
        f.write_all_at(&next.to_le_bytes(), 0)?;
        flock(&f, libc::LOCK_UN)?;
        Ok(next)
    }

    /// Try once to take the file lock; `Ok(None)` if another process has it.
    fn try_file(&self, path: &Path) -> io::Result<Option<File>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => {}
            Err(e) if would_block(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        // The previous holder may have unlinked the file after we opened it.
        match fs::metadata(path) {
            Ok(m) if m.ino() == f.metadata()?.ino() => Ok(Some(f)),
            _ => Ok(None),
        }
    }
}

struct LocalHeld {
    table: Arc<Table>,
    key: String,
    path: PathBuf,
    file: Option<File>,
    token: Token,
}

impl HeldLock for LocalHeld {
    fn token(&self) -> Token {
        self.token
    }
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

impl Drop for LocalHeld {
    fn drop(&mut self) {
        // Unlink while still holding the lock, then release it.
        let _ = fs::remove_file(&self.path);
        drop(self.file.take());
        self.table.leave(&self.key);
    }
}

impl LockService for LocalLockService {
    fn acquire(&self, resource: &Resource, timeout: Duration) -> Result<LockGuard> {
        let key = resource.key();
        let deadline = Instant::now() + timeout;
        if !self.table.enter(&key, deadline) {
            return Err(DomainError::LockTimeout { resource: key });
        }
        let fail = |e: io::Error| DomainError::Lock {
            context: format!("locking {key}"),
            source: e.into(),
        };
        let dd = match self.domain_dir(&resource.domain) {
            Ok(d) => d,
            Err(e) => {
                self.table.leave(&key);
                return Err(e);
            }
        };
        let path = dd.join(resource.file_name());
        let mut backoff = Duration::from_micros(500);
        let file = loop {
            match self.try_file(&path) {
                Ok(Some(f)) => break f,
                Ok(None) => {
                    let now = Instant::now();
                    if now >= deadline {
                        self.table.leave(&key);
                        return Err(DomainError::LockTimeout { resource: key });
                    }
                    std::thread::sleep(backoff.min(deadline - now));
                    backoff = (backoff * 2).min(Duration::from_millis(20));
                }
                Err(e) => {
                    self.table.leave(&key);
                    return Err(fail(e));
                }
            }
        };
        let token = match self
            .next_token(&dd)
            .and_then(|t| file.write_all_at(&t.to_le_bytes(), 0).map(|_| t))
        {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_file(&path);
                self.table.leave(&key);
                return Err(fail(e));
            }
        };
        self.table.set_token(&key, token);
        Ok(LockGuard::new(
            resource.clone(),
            Box::new(LocalHeld {
                table: self.table.clone(),
                key,
                path,
                file: Some(file),
                token,
            }),
        ))
    }

    fn holder(&self, resource: &Resource) -> Result<Option<Token>> {
        if let Some(t) = self.table.holder(&resource.key()) {
            return Ok(Some(t));
        }
        let path = self
            .dir
            .join(resource.domain.to_string())
            .join(resource.file_name());
        let fail = |e: io::Error| DomainError::Lock {
            context: format!("probing {}", resource.key()),
            source: e.into(),
        };
        let f = match OpenOptions::new().read(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(fail(e)),
        };
        match flock(&f, libc::LOCK_SH | libc::LOCK_NB) {
            Ok(()) => Ok(None),
            Err(e) if would_block(&e) => {
                let mut b = [0u8; 8];
                let n = f.read_at(&mut b, 0).map_err(fail)?;
                Ok(Some(if n == 8 { u64::from_le_bytes(b) } else { 0 }))
            }
            Err(e) => Err(fail(e)),
        }
    }
}

pub mod conformance;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_lock_file_names_keep_their_shape() {
        let d = uuid::Uuid::from_u128(7);
        let (t, v) = (TagId::generate(4), VolumeId::generate(5));
        let of = |kind| Resource { domain: d, kind };
        let cases = [
            (
                ResourceKind::Disk(t),
                format!("cairn/{d}/disk/{t}"),
                format!("disk-{t}.lock"),
            ),
            (
                ResourceKind::Tag(t),
                format!("cairn/{d}/tag/{t}"),
                format!("tag-{t}.lock"),
            ),
            (
                ResourceKind::Volume(v),
                format!("cairn/{d}/volume/{v}"),
                format!("volume-{v}.lock"),
            ),
            (
                ResourceKind::AllocPage { map: 1, page: 9 },
                format!("cairn/{d}/alloc/1/9"),
                "alloc-1-9.lock".into(),
            ),
            (
                ResourceKind::HostSlot(3),
                format!("cairn/{d}/slot/3"),
                "slot-3.lock".into(),
            ),
            (
                ResourceKind::Named("leader".into()),
                "cairn/lock/leader".into(),
                "named-leader.lock".into(),
            ),
        ];
        for (kind, key, file) in cases {
            let r = of(kind);
            assert_eq!((r.key(), r.file_name()), (key, file));
        }
    }

    #[test]
    fn mem_lock_service_conforms() {
        let shared = MemLockService::new();
        conformance::run_all(&move || Arc::new(shared.clone()) as Arc<dyn LockService>);
    }

    #[test]
    fn local_lock_service_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        // Each handle has its own in-process table, like separate processes.
        conformance::run_all(&move || {
            Arc::new(LocalLockService::new(&path).unwrap()) as Arc<dyn LockService>
        });
    }

    #[test]
    fn resource_order_is_tag_volume_alloc() {
        let d = uuid::Uuid::nil();
        let t = Resource {
            domain: d,
            kind: ResourceKind::Tag(TagId::generate(9)),
        };
        let v = Resource {
            domain: d,
            kind: ResourceKind::Volume(VolumeId::generate(1)),
        };
        let a = Resource {
            domain: d,
            kind: ResourceKind::AllocPage { map: 0, page: 0 },
        };
        let a2 = Resource {
            domain: d,
            kind: ResourceKind::AllocPage { map: 0, page: 1 },
        };
        let disk = Resource {
            domain: d,
            kind: ResourceKind::Disk(TagId::generate(9)),
        };
        assert!(disk < t && t < v && v < a && a < a2);
    }
}
