//! The etcd lock service.
//!
//! One session lease per process (TTL 10 s by default) kept alive by a
//! background task that reconnects after errors and after an etcd restart.
//! A lock is the key `Resource::key()` created under the session lease if it
//! does not exist (a transaction comparing its create revision with 0); a
//! waiter watches the key until it is deleted. The fencing token is the
//! domain's token base plus the key's create revision: revisions grow with
//! every write to etcd, and the base, kept in `cairn/<domain>/token-base`,
//! is a clock reading taken when that key was first made, so tokens keep
//! growing even after etcd's data is wiped (the key is then made again,
//! later).
//!
//! Self-fencing: a held lock is only as good as the last keep-alive that
//! etcd confirmed. `check()` fails once the time since that keep-alive's
//! request was sent exceeds the TTL minus a safety margin, before the lease
//! can have expired on the server; it passes again when etcd answers, as
//! long as the lease survived. If the lease is lost the session is renewed
//! under a new lease and every guard of the old one fails for good.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_domain::lock::{token_floor, Acquired, HeldLock, Resource, Token};
use cairn_domain::{DomainError, LockGuard, LockService, Result};
mod kv;
mod local;
mod queue;
mod service;
mod session;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

/// How to reach etcd and how long a session lives.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Session lease TTL.
    pub ttl: Duration,
    /// How long before the lease could expire a holder stops writing.
    pub margin: Duration,
    /// Who we are (stored as the lock keys' values, for operators).
    pub holder: String,
    /// TLS for `https://` endpoints: the CA that signed etcd's certificate
    /// and, for etcd with `--client-cert-auth`, our certificate.
    pub tls: Option<etcd_client::TlsOptions>,
}

impl EtcdConfig {
    /// Defaults: TTL 10 s, margin 3 s.
    pub fn new(endpoints: Vec<String>, holder: impl Into<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            ttl: Duration::from_secs(10),
            margin: Duration::from_secs(3),
            holder: holder.into(),
            tls: None,
        }
    }
}

/// The current session: a lease and its generation.
#[derive(Debug, Clone, Copy)]
struct Session {
    lease: i64,
    epoch: u64,
}

struct Inner {
    cfg: EtcdConfig,
    /// Taken only when `Inner` is dropped.
    rt: Option<tokio::runtime::Runtime>,
    /// Set when the last handle goes: the keep-alive task ends.
    stopped: AtomicBool,
    stop: tokio::sync::Notify,
    client: Client,
    session: Mutex<Option<Session>>,
    /// Sessions started so far (the next one's epoch is this plus one).
    epochs: AtomicU64,
    /// Milliseconds since `start` at which the last confirmed keep-alive
    /// request was sent (0: never).
    confirmed_ms: AtomicU64,
    start: Instant,
    bases: Mutex<HashMap<uuid::Uuid, u64>>,
    /// Keys kept under the session lease (put again for every new session).
    registrations: Mutex<Vec<(String, String)>>,
    /// Locks of this process, by key: threads of one process queue here
    /// rather than race in etcd, and a lock goes from one to the next
    /// without leaving etcd (see [`LocalKey`]).
    local: Mutex<HashMap<String, LocalKey>>,
    local_cv: std::sync::Condvar,
    /// Lock keys to delete: the guards a transaction drops together go
    /// out in one etcd transaction.
    releases: Mutex<Vec<Release>>,
}

/// One of our keys on its way out of etcd.
struct Release {
    /// The lock whose queue it is in, to tell this process's queue there
    /// when it is gone (None: nobody here waits for it).
    lock: Option<String>,
    key: String,
    epoch: u64,
}

/// Hand a lock to a waiting thread of this process at most this many times
/// in a row before giving it back to etcd, so other hosts get their turn.
const HANDOFFS: u32 = 4;

/// One lock key as this process uses it.
#[derive(Default)]
struct LocalKey {
    /// A thread of this process holds it.
    busy: bool,
    /// Threads waiting for it.
    waiters: usize,
    /// The etcd key, still held, left by the last holder for a waiter.
    kept: Option<Kept>,
    /// Handoffs since the key was last taken from etcd.
    handoffs: u32,
    /// Session epoch and create revision of the current holder's key.
    holder: Option<(u64, i64)>,
    /// Releases of our keys still on their way to etcd: a thread here
    /// waits for them rather than queue behind our own old key.
    releasing: u32,
}

#[derive(Clone)]
struct Kept {
    /// The etcd key (our key in the lock's queue).
    key: String,
    revision: i64,
    epoch: u64,
    token: Token,
}

/// Locks in etcd. Cloning shares the session; when the last clone goes,
/// the session ends (its lease is revoked, so its locks and registrations
/// go at once).
#[derive(Clone)]
pub struct EtcdLockService {
    inner: Arc<Inner>,
    _life: Arc<Life>,
}

/// Ends the session when the last handle is dropped.
struct Life(Arc<Inner>);

impl Drop for Life {
    fn drop(&mut self) {
        let inner = self.0.clone();
        inner.stopped.store(true, Ordering::SeqCst);
        inner.stop.notify_waiters();
        let lease = inner.session.lock().expect("poisoned").map(|s| s.lease);
        let Some(lease) = lease else { return };
        let mut c = inner.client.clone();
        let revoke = async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(lease)).await;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            inner.rt().spawn(revoke);
        } else {
            inner.rt().block_on(revoke);
        }
    }
}

fn lock_err(context: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> DomainError {
    let context = context.into();
    move |e| DomainError::Lock {
        context,
        source: Box::new(e),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // This may run on the runtime's own thread (the keep-alive task's
        // last reference): shut it down without blocking.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A contender's key in the queue of lock `lock`: its lease, and a
/// random part that tells one attempt from another.
fn waiter_key(lock: &str, lease: i64) -> String {
    format!(
        "{lock}/{lease:x}.{:x}",
        uuid::Uuid::new_v4().as_u64_pair().0
    )
}

/// The prefix of lock `lock`'s queue.
fn queue_of(lock: &str) -> String {
    format!("{lock}/")
}

/// A read of a lock's queue that returns its oldest key: the holder.
fn first_in_queue() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1)
}

fn base_key(domain: uuid::Uuid) -> String {
    format!("cairn/{domain}/token-base")
}

fn parse_base(v: Option<&[u8]>) -> Result<u64> {
    v.and_then(|b| std::str::from_utf8(b).ok()?.parse().ok())
        .ok_or_else(|| DomainError::Lock {
            context: "reading the token base".into(),
            source: "missing or not a number".into(),
        })
}

/// A lock held in etcd.
struct EtcdHeld {
    inner: Arc<Inner>,
    /// The lock (this process's queue at it is kept under this name).
    lock: String,
    /// Our key in the lock's queue in etcd.
    key: String,
    revision: i64,
    epoch: u64,
    token: Token,
}

impl HeldLock for EtcdHeld {
    fn token(&self) -> Token {
        self.token
    }
    fn check(&self) -> Result<()> {
        self.inner.valid(self.epoch).map_err(DomainError::Fenced)
    }
    fn lost(&self) -> bool {
        self.inner.gone(Some((self.epoch, self.revision)))
    }
}

impl Drop for EtcdHeld {
    fn drop(&mut self) {
        let inner = self.inner.clone();
        let (key, rev) = (self.key.clone(), self.revision);
        {
            let mut m = inner.local.lock().expect("poisoned");
            // A guard of a lost session may outlive its turn (another
            // thread took the key again since): it only gives back its
            // etcd key, which is gone anyway.
            if let Some(st) = m
                .get_mut(&self.lock)
                .filter(|st| st.holder == Some((self.epoch, rev)))
            {
                st.busy = false;
                st.holder = None;
                if st.waiters > 0 && st.handoffs < HANDOFFS && inner.valid(self.epoch).is_ok() {
                    // The next thread here takes it over as it is.
                    st.kept = Some(Kept {
                        key: key.clone(),
                        revision: rev,
                        epoch: self.epoch,
                        token: self.token,
                    });
                    st.handoffs += 1;
                    inner.local_cv.notify_all();
                    return;
                }
                st.handoffs = 0;
                st.releasing += 1;
                inner.local_cv.notify_all();
                drop(m);
                inner.release_in_background(Some(self.lock.clone()), key, self.epoch);
                return;
            }
            inner.local_cv.notify_all();
        }
        inner.release_in_background(None, key, self.epoch);
    }
}

impl EtcdLockService {
    /// Connect and start the session (waits up to `ttl` for the first
    /// lease).
    pub fn connect(cfg: EtcdConfig) -> Result<EtcdLockService> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-session")
            .enable_all()
            .build()
            .map_err(|e| DomainError::Lock {
                context: "starting the etcd runtime".into(),
                source: e.into(),
            })?;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(cfg.ttl / 2)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(tls) = &cfg.tls {
            opts = opts.with_tls(tls.clone());
        }
        let client = rt
            .block_on(Client::connect(cfg.endpoints.clone(), Some(opts)))
            .map_err(lock_err(format!(
                "connecting to etcd at {:?}",
                cfg.endpoints
            )))?;
        let inner = Arc::new(Inner {
            cfg,
            rt: Some(rt),
            stopped: Default::default(),
            stop: tokio::sync::Notify::new(),
            client,
            session: Mutex::new(None),
            epochs: AtomicU64::new(0),
            confirmed_ms: AtomicU64::new(0),
            start: Instant::now(),
            bases: Mutex::new(HashMap::new()),
            registrations: Mutex::new(Vec::new()),
            local: Mutex::new(HashMap::new()),
            local_cv: std::sync::Condvar::new(),
            releases: Mutex::new(Vec::new()),
        });
        inner.rt().spawn(inner.clone().keep_alive());
        let deadline = Instant::now() + inner.cfg.ttl;
        inner.rt().block_on(inner.current(deadline))?;
        Ok(EtcdLockService {
            _life: Arc::new(Life(inner.clone())),
            inner,
        })
    }

    /// Keep `key` = `value` in etcd for as long as this process's session
    /// lives (it goes when the process dies and its lease expires), and put
    /// it again under every new session.
    pub fn register(&self, key: &str, value: &str) -> Result<()> {
        {
            let mut r = self.inner.registrations.lock().expect("poisoned");
            r.retain(|(k, _)| k != key);
            r.push((key.to_string(), value.to_string()));
        }
        let inner = self.inner.clone();
        let deadline = Instant::now() + inner.cfg.ttl;
        inner.rt().block_on(async {
            let s = inner.current(deadline).await?;
            let mut c = inner.client.clone();
            c.put(key, value, Some(PutOptions::new().with_lease(s.lease)))
                .await
                .map_err(lock_err(format!("registering {key}")))?;
            Ok(())
        })
    }

    /// Whether locks taken now would be valid (a confirmed session).
    pub fn healthy(&self) -> bool {
        let s = *self.inner.session.lock().expect("poisoned");
        s.is_some_and(|s| self.inner.valid(s.epoch).is_ok())
    }
}
