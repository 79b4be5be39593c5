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

use cairn_domain::lock::{token_floor, HeldLock, Resource, Token};
use cairn_domain::{DomainError, LockGuard, LockService, Result};
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
}

impl EtcdConfig {
    /// Defaults: TTL 10 s, margin 3 s.
    pub fn new(endpoints: Vec<String>, holder: impl Into<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            ttl: Duration::from_secs(10),
            margin: Duration::from_secs(3),
            holder: holder.into(),
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
        source: std::io::Error::other(e.to_string()),
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

impl Inner {
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as Inner")
    }

    fn since_start(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Whether a lock of session `epoch` may still be relied on.
    fn valid(&self, epoch: u64) -> std::result::Result<(), String> {
        let s = *self.session.lock().expect("poisoned");
        match s {
            Some(s) if s.epoch == epoch => {}
            _ => return Err("the etcd session that held this lock is gone".into()),
        }
        let confirmed = self.confirmed_ms.load(Ordering::SeqCst);
        let age = Duration::from_millis(self.since_start().saturating_sub(confirmed));
        let limit = self.cfg.ttl.saturating_sub(self.cfg.margin);
        if confirmed == 0 || age >= limit {
            return Err(format!(
                "the etcd lease was last confirmed {:.1} s ago (limit {:.1} s)",
                age.as_secs_f64(),
                limit.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// Keep the session alive forever (until the runtime stops): grant a
    /// lease when there is none, send keep-alives every TTL/3, renew the
    /// session when the lease is lost.
    async fn keep_alive(self: Arc<Self>) {
        let stopped = async {
            loop {
                let n = self.stop.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if self.stopped.load(Ordering::SeqCst) {
                    return;
                }
                n.await;
            }
        };
        tokio::select! {
            _ = self.clone().keep_alive_loop() => {}
            _ = stopped => {}
        }
    }

    async fn keep_alive_loop(self: Arc<Self>) {
        let ttl = self.cfg.ttl.as_secs().max(2) as i64;
        let every = self.cfg.ttl / 3;
        loop {
            let mut c = self.client.clone();
            let cur = *self.session.lock().expect("poisoned");
            let s = match cur {
                Some(s) => s,
                None => {
                    let sent = self.since_start();
                    let granted = c.lease_grant(ttl, None).await;
                    match granted {
                        Ok(r) => {
                            let epoch = self.epochs.fetch_add(1, Ordering::SeqCst) + 1;
                            let s = Session {
                                lease: r.id(),
                                epoch,
                            };
                            *self.session.lock().expect("poisoned") = Some(s);
                            // The grant confirms the lease from when it was asked.
                            self.confirmed_ms.store(sent.max(1), Ordering::SeqCst);
                            tracing::info!(lease = r.id(), epoch, "etcd session started");
                            self.put_registrations(s.lease).await;
                            s
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "etcd lease grant failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    }
                }
            };
            let (mut keeper, mut stream) = match c.lease_keep_alive(s.lease).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(error = %e, "etcd keep-alive stream failed; retrying");
                    self.expire_if_stale(s);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                let sent = self.since_start();
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(every.max(Duration::from_millis(200)), stream.message())
                    .await
                {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        self.confirmed_ms.fetch_max(sent.max(1), Ordering::SeqCst);
                    }
                    Ok(Ok(Some(_))) => {
                        // TTL 0: the lease expired on the server.
                        tracing::warn!(lease = s.lease, "etcd lease expired; new session");
                        self.drop_session(s);
                        break;
                    }
                    _ => {
                        self.expire_if_stale(s);
                        break;
                    }
                }
                tokio::time::sleep(every).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Put every registration under `lease`.
    async fn put_registrations(&self, lease: i64) {
        let regs = self.registrations.lock().expect("poisoned").clone();
        let mut c = self.client.clone();
        for (k, v) in regs {
            if let Err(e) = c
                .put(k.clone(), v, Some(PutOptions::new().with_lease(lease)))
                .await
            {
                tracing::warn!(key = %k, error = %e, "could not register in etcd");
            }
        }
    }

    /// When etcd has not confirmed the lease for a whole TTL, it may have
    /// expired: start over with a new session.
    fn expire_if_stale(&self, s: Session) {
        let confirmed = self.confirmed_ms.load(Ordering::SeqCst);
        if Duration::from_millis(self.since_start().saturating_sub(confirmed)) >= self.cfg.ttl {
            self.drop_session(s);
        }
    }

    fn drop_session(&self, s: Session) {
        let mut g = self.session.lock().expect("poisoned");
        if g.map(|c| c.epoch) == Some(s.epoch) {
            *g = None;
            self.confirmed_ms.store(0, Ordering::SeqCst);
        }
    }

    /// The current session, waiting for one until `deadline`.
    async fn current(&self, deadline: Instant) -> Result<Session> {
        loop {
            // Copy the session out first: `valid` takes the same lock.
            let cur = *self.session.lock().expect("poisoned");
            if let Some(s) = cur {
                if self.valid(s.epoch).is_ok() {
                    return Ok(s);
                }
            }
            if Instant::now() >= deadline {
                return Err(DomainError::Fenced(
                    "no confirmed etcd session (is etcd reachable?)".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The token base of a domain, making it on first use.
    async fn base(&self, domain: uuid::Uuid) -> Result<u64> {
        if let Some(b) = self.bases.lock().expect("poisoned").get(&domain) {
            return Ok(*b);
        }
        let key = base_key(domain);
        let mut c = self.client.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), token_floor().to_string(), None)])
            .or_else([]);
        c.txn(txn)
            .await
            .map_err(lock_err("creating the token base"))?;
        let r = c
            .get(key.clone(), None)
            .await
            .map_err(lock_err("reading the token base"))?;
        let b = parse_base(r.kvs().first().map(|kv| kv.value()))?;
        self.bases.lock().expect("poisoned").insert(domain, b);
        Ok(b)
    }

    /// Take the lock in etcd, first come first served: each contender
    /// puts its own key under the lock's (`<lock>/<lease>`, under its
    /// lease), and holds the lock when its key is the oldest there; until
    /// then it waits for the key just before its own to go. The token is
    /// its key's create revision (later holders have later keys). Returns
    /// the guard with its session epoch and create revision.
    async fn acquire(
        self: &Arc<Self>,
        r: &Resource,
        timeout: Duration,
    ) -> Result<(LockGuard, u64, i64)> {
        let deadline = Instant::now() + timeout;
        let lock = r.key();
        loop {
            let s = self.current(deadline).await?;
            let base = self.base(r.domain).await?;
            let bkey = base_key(r.domain);
            // A key of our own for this attempt: a key left by an earlier
            // attempt (whose release may still be on its way) is never
            // taken for ours.
            let mine = waiter_key(&lock, s.lease);
            let mut c = self.client.clone();
            // Into the queue, and at once: our key, the oldest key, the base.
            let mut txn = Txn::new().and_then([
                TxnOp::put(
                    mine.clone(),
                    self.cfg.holder.clone(),
                    Some(PutOptions::new().with_lease(s.lease)),
                ),
                TxnOp::get(mine.clone(), None),
                TxnOp::get(queue_of(&lock), Some(first_in_queue())),
                TxnOp::get(bkey.clone(), None),
            ]);
            loop {
                let resp = match c.txn(txn).await {
                    Ok(r) => r,
                    // etcd lost our lease (its data was wiped, or the lease
                    // expired before the keep-alive task noticed): renew
                    // the session and try again.
                    Err(e) if e.to_string().contains("lease not found") => {
                        tracing::warn!(
                            lease = s.lease,
                            "etcd does not know our lease; new session"
                        );
                        self.drop_session(s);
                        break;
                    }
                    Err(e) => {
                        let _ = c.delete(mine.clone(), None).await;
                        return Err(lock_err(format!("locking {lock}"))(e));
                    }
                };
                txn = Txn::new().and_then([
                    TxnOp::get(mine.clone(), None),
                    TxnOp::get(queue_of(&lock), Some(first_in_queue())),
                    TxnOp::get(bkey.clone(), None),
                ]);
                let mut ops = resp.op_responses();
                if matches!(ops.first(), Some(TxnOpResponse::Put(_))) {
                    ops.remove(0);
                }
                let rev_of = |i: usize| match ops.get(i) {
                    Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.create_revision()),
                    _ => None,
                };
                let now_base = match ops.get(2) {
                    Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
                    _ => None,
                };
                if now_base.as_deref().map(|v| parse_base(Some(v)).ok()) != Some(Some(base)) {
                    // A wiped etcd: start over with a new base.
                    self.bases.lock().expect("poisoned").remove(&r.domain);
                    let _ = c.delete(mine.clone(), None).await;
                    break;
                }
                let Some(my_rev) = rev_of(0) else {
                    // Our key is gone (the lease ended): start over.
                    break;
                };
                if rev_of(1) == Some(my_rev) {
                    let token = base + my_rev as u64;
                    let g = LockGuard::new(
                        r.clone(),
                        Box::new(EtcdHeld {
                            inner: self.clone(),
                            lock: lock.clone(),
                            key: mine.clone(),
                            revision: my_rev,
                            epoch: s.epoch,
                            token,
                        }),
                    );
                    return Ok((g, s.epoch, my_rev));
                }
                if timeout.is_zero() || Instant::now() >= deadline {
                    self.release(&mine, my_rev).await;
                    return Err(DomainError::LockTimeout { resource: lock });
                }
                // Wait for the key just before ours to go.
                let before = c
                    .get(
                        queue_of(&lock),
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_max_create_revision(my_rev - 1)
                                .with_sort(SortTarget::Create, SortOrder::Descend)
                                .with_limit(1),
                        ),
                    )
                    .await
                    .map_err(lock_err(format!("locking {lock}")))?;
                let Some((pkey, prev)) = before
                    .kvs()
                    .first()
                    .map(|kv| (kv.key().to_vec(), kv.mod_revision()))
                else {
                    continue;
                };
                let mut stream = c
                    .watch(
                        pkey,
                        Some(WatchOptions::new().with_start_revision(prev + 1)),
                    )
                    .await
                    .map_err(lock_err(format!("watching {lock}")))?;
                let wait = async {
                    while let Ok(Some(m)) = stream.message().await {
                        if m.events()
                            .iter()
                            .any(|e| e.event_type() == EventType::Delete)
                        {
                            return;
                        }
                    }
                };
                let left = deadline.saturating_duration_since(Instant::now());
                // Look again at least every second in case the watch
                // misses a beat.
                let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), wait).await;
            }
        }
    }

    /// Delete the keys queued for release, all queued at once in one
    /// transaction, trying again while etcd does not answer, until they
    /// are gone or their session is (the lease takes its keys with it): a
    /// key left behind would hold up every later contender, us included.
    /// A key's name is unique to one attempt at a lock, so deleting it by
    /// name cannot take anybody else's.
    async fn flush_releases(&self) {
        // Let the other guards of the same transaction join.
        tokio::task::yield_now().await;
        loop {
            let mut batch = std::mem::take(&mut *self.releases.lock().expect("poisoned"));
            if batch.is_empty() {
                return;
            }
            let mut pause = Duration::from_millis(50);
            loop {
                let current = self.session.lock().expect("poisoned").map(|s| s.epoch);
                let (live, gone): (Vec<Release>, Vec<Release>) =
                    batch.into_iter().partition(|r| Some(r.epoch) == current);
                self.after_release(&gone);
                batch = live;
                if batch.is_empty() || self.stopped.load(Ordering::SeqCst) {
                    self.after_release(&batch);
                    break;
                }
                let txn = Txn::new().and_then(
                    batch
                        .iter()
                        .map(|r| TxnOp::delete(r.key.clone(), None))
                        .collect::<Vec<_>>(),
                );
                let mut c = self.client.clone();
                if c.txn(txn).await.is_ok() {
                    self.after_release(&batch);
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }

    fn after_release(&self, done: &[Release]) {
        for r in done {
            if let Some(lock) = &r.lock {
                self.released(lock);
            }
        }
    }

    async fn release(&self, key: &str, revision: i64) {
        if let Err(e) = self.try_release(key, revision).await {
            // The lease ends it anyway.
            tracing::warn!(key, error = %e, "could not release an etcd lock");
        }
    }

    async fn try_release(
        &self,
        key: &str,
        revision: i64,
    ) -> std::result::Result<(), etcd_client::Error> {
        let mut c = self.client.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(key, None)])
            .or_else([]);
        c.txn(txn).await.map(|_| ())
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
            source: std::io::Error::other("missing or not a number"),
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

impl Inner {
    /// Release our etcd `key`; with `lock`, tell this process's queue at
    /// it when that is done.
    fn release_in_background(self: &Arc<Self>, lock: Option<String>, key: String, epoch: u64) {
        // Never on the caller's time: the delete goes out at once and a
        // thread of this process that wants the lock again waits for it
        // (`releasing`), as do this process's reads of the holder.
        let first = {
            let mut q = self.releases.lock().expect("poisoned");
            q.push(Release { lock, key, epoch });
            q.len() == 1
        };
        if first {
            let inner = self.clone();
            self.rt().spawn(async move { inner.flush_releases().await });
        }
    }

    /// Wait (briefly) until releases of our keys at `locks` reached etcd,
    /// so that what this process reads of them includes what it did.
    fn wait_own_releases(&self, locks: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut m = self.local.lock().expect("poisoned");
        loop {
            let pending = locks
                .iter()
                .any(|l| m.get(l).is_some_and(|st| st.releasing > 0));
            let now = Instant::now();
            if !pending || now >= deadline {
                return;
            }
            m = self
                .local_cv
                .wait_timeout(m, deadline - now)
                .expect("poisoned")
                .0;
        }
    }

    /// A release of one of our keys at `lock` reached etcd (or failed).
    fn released(&self, lock: &str) {
        let mut m = self.local.lock().expect("poisoned");
        if let Some(st) = m.get_mut(lock) {
            st.releasing = st.releasing.saturating_sub(1);
            if !st.busy && st.waiters == 0 && st.kept.is_none() && st.releasing == 0 {
                m.remove(lock);
            }
        }
        self.local_cv.notify_all();
    }

    /// Wait for this process's turn at `key`; a lock the previous holder
    /// here left in etcd comes with it.
    fn enter_local(&self, key: &str, deadline: Instant, try_once: bool) -> Result<Option<Kept>> {
        let mut m = self.local.lock().expect("poisoned");
        if m.get(key).is_some_and(|st| st.busy) && try_once {
            return Err(DomainError::LockTimeout {
                resource: key.to_string(),
            });
        }
        // Our own release on its way is worth waiting for even when only
        // trying: it takes one round trip.
        let release_deadline = deadline.max(Instant::now() + Duration::from_secs(2));
        if m.get(key).is_some_and(|st| st.busy || st.releasing > 0) {
            m.get_mut(key).expect("present").waiters += 1;
            loop {
                let now = Instant::now();
                let Some(st) = m.get(key) else { break };
                let busy = st.busy && !self.gone(st.holder);
                let until = if busy {
                    deadline
                } else if st.releasing > 0 && st.kept.is_none() {
                    release_deadline
                } else {
                    break;
                };
                if now >= until {
                    break;
                }
                // Also look again now and then: a holder's session can be
                // lost without anyone here letting go.
                let wait = (until - now).min(Duration::from_millis(100));
                m = self.local_cv.wait_timeout(m, wait).expect("poisoned").0;
            }
            let st = m.get_mut(key).expect("present while waited for");
            st.waiters -= 1;
            if st.busy && !self.gone(st.holder) {
                return Err(DomainError::LockTimeout {
                    resource: key.to_string(),
                });
            }
        }
        let st = m.entry(key.to_string()).or_default();
        st.busy = true;
        st.holder = None;
        let kept = st.kept.take().filter(|k| self.valid(k.epoch).is_ok());
        if let Some(k) = &kept {
            st.holder = Some((k.epoch, k.revision));
        }
        Ok(kept)
    }

    /// Let go of the etcd key a handoff brought for `lock`, keeping this
    /// thread's turn here.
    fn unkeep(self: &Arc<Self>, lock: &str, k: Kept) {
        if let Some(st) = self.local.lock().expect("poisoned").get_mut(lock) {
            st.holder = None;
            st.releasing += 1;
        }
        self.release_in_background(Some(lock.to_string()), k.key, k.epoch);
    }

    /// Give back turns taken by `acquire_all` that it could not use: a
    /// handed-over key is released (or handed on) as a guard would be.
    fn give_back(self: &Arc<Self>, turns: Vec<(Resource, String, Option<Kept>)>) {
        for (r, key, kept) in turns {
            match kept {
                Some(k) => drop(LockGuard::new(
                    r,
                    Box::new(EtcdHeld {
                        inner: self.clone(),
                        lock: key,
                        key: k.key,
                        revision: k.revision,
                        epoch: k.epoch,
                        token: k.token,
                    }),
                )),
                None => self.leave_local(&key),
            }
        }
    }

    /// Take every key of `rs` in one transaction if all are free (and in
    /// one domain): `Some((epoch, revision, token))`, the same for all;
    /// `None` when one is held (or the attempt should be made key by key).
    /// Join the queues of every lock of `rs` in one transaction and see
    /// whether we are first in each: then all are ours, `Some` with the
    /// session epoch, the revision and token (the same for all), our key
    /// in each queue (by lock), and the holders of `read`. When any is
    /// held by another, our keys are taken out again and `None` says to
    /// queue for them one by one.
    #[allow(clippy::type_complexity)]
    async fn try_all(
        self: &Arc<Self>,
        rs: &[Resource],
        deadline: Instant,
        read: &[Resource],
    ) -> Result<
        Option<(
            (u64, i64, Token),
            HashMap<String, String>,
            Vec<Option<Token>>,
        )>,
    > {
        let domain = rs[0].domain;
        if rs.iter().chain(read).any(|r| r.domain != domain) {
            return Ok(None);
        }
        let s = self.current(deadline).await?;
        let base = self.base(domain).await?;
        let bkey = base_key(domain);
        let mut c = self.client.clone();
        let locks: Vec<String> = rs.iter().map(|r| r.key()).collect();
        let mine: Vec<String> = locks.iter().map(|l| waiter_key(l, s.lease)).collect();
        let mut ops: Vec<TxnOp> = mine
            .iter()
            .map(|k| {
                TxnOp::put(
                    k.clone(),
                    self.cfg.holder.clone(),
                    Some(PutOptions::new().with_lease(s.lease)),
                )
            })
            .collect();
        ops.extend(
            locks
                .iter()
                .map(|l| TxnOp::get(queue_of(l), Some(first_in_queue()))),
        );
        // The holders asked for, as of the moment these locks are ours.
        ops.extend(
            read.iter()
                .map(|r| TxnOp::get(queue_of(&r.key()), Some(first_in_queue()))),
        );
        ops.push(TxnOp::get(bkey, None));
        let resp = match c.txn(Txn::new().and_then(ops)).await {
            Ok(r) => r,
            // Key by key, which renews the session.
            Err(e) if e.to_string().contains("lease not found") => return Ok(None),
            Err(e) => {
                self.forget(&mine).await;
                return Err(lock_err("locking several keys")(e));
            }
        };
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let ops = resp.op_responses();
        let first = |op: Option<&TxnOpResponse>| match op {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.create_revision()),
            _ => None,
        };
        let n = locks.len();
        let now_base = match ops.last() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        };
        if now_base.as_deref().map(|v| parse_base(Some(v)).ok()) != Some(Some(base)) {
            // A wiped etcd: undo, and let the key-by-key path start over.
            self.bases.lock().expect("poisoned").remove(&domain);
            self.forget(&mine).await;
            return Ok(None);
        }
        if (0..n).any(|i| first(ops.get(n + i)) != Some(rev)) {
            self.forget(&mine).await;
            return Ok(None);
        }
        let seen = (0..read.len())
            .map(|i| first(ops.get(2 * n + i)).map(|r| base + r as u64))
            .collect();
        let by_lock = locks.into_iter().zip(mine).collect();
        Ok(Some(((s.epoch, rev, base + rev as u64), by_lock, seen)))
    }

    /// Take our keys out of lock queues (best effort: the lease ends them
    /// at worst).
    async fn forget(&self, keys: &[String]) {
        let mut c = self.client.clone();
        let txn = Txn::new().and_then(
            keys.iter()
                .map(|k| TxnOp::delete(k.clone(), None))
                .collect::<Vec<_>>(),
        );
        if let Err(e) = c.txn(txn).await {
            tracing::warn!(error = %e, "could not take keys out of lock queues");
        }
    }

    /// Record the etcd key a thread of this process took for `key`.
    fn took_local(&self, key: &str, epoch: u64, revision: i64) {
        let mut m = self.local.lock().expect("poisoned");
        if let Some(st) = m.get_mut(key) {
            st.holder = Some((epoch, revision));
        }
    }

    /// Whether the session of a holder is gone for good.
    fn gone(&self, holder: Option<(u64, i64)>) -> bool {
        let cur = self.session.lock().expect("poisoned").map(|s| s.epoch);
        holder.is_some_and(|(epoch, _)| cur != Some(epoch))
    }

    /// Give up this process's turn at `key` after failing to take it.
    fn leave_local(self: &Arc<Self>, key: &str) {
        let mut m = self.local.lock().expect("poisoned");
        if let Some(st) = m.get_mut(key) {
            st.busy = false;
            if st.waiters == 0 && st.releasing == 0 && st.kept.is_none() {
                m.remove(key);
            }
        }
        self.local_cv.notify_all();
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
                source: e,
            })?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(cfg.ttl / 2)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
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

impl LockService for EtcdLockService {
    fn acquire(&self, resource: &Resource, timeout: Duration) -> Result<LockGuard> {
        let inner = self.inner.clone();
        let r = resource.clone();
        let key = r.key();
        let deadline = Instant::now() + timeout;
        if let Some(k) = inner.enter_local(&key, deadline, timeout.is_zero())? {
            return Ok(LockGuard::new(
                r,
                Box::new(EtcdHeld {
                    inner: inner.clone(),
                    lock: key,
                    key: k.key,
                    revision: k.revision,
                    epoch: k.epoch,
                    token: k.token,
                }),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let got = inner.rt().block_on(async { inner.acquire(&r, left).await });
        match got {
            Ok((g, epoch, rev)) => {
                inner.took_local(&key, epoch, rev);
                Ok(g)
            }
            Err(e) => {
                inner.leave_local(&key);
                Err(e)
            }
        }
    }

    fn takeover_delay(&self) -> Duration {
        self.inner.cfg.margin
    }

    fn acquire_all(&self, resources: &[Resource], timeout: Duration) -> Result<Vec<LockGuard>> {
        Ok(self.acquire_all_then_read(resources, timeout, &[])?.0)
    }

    fn acquire_all_then_read(
        &self,
        resources: &[Resource],
        timeout: Duration,
        read: &[Resource],
    ) -> Result<(Vec<LockGuard>, Vec<Option<Token>>)> {
        if resources.len() < 2 && read.is_empty() {
            let guards = resources
                .iter()
                .map(|r| self.acquire(r, timeout))
                .collect::<Result<Vec<_>>>()?;
            return Ok((guards, Vec::new()));
        }
        let inner = self.inner.clone();
        let deadline = Instant::now() + timeout;
        // This process's turn at each key first, in order; a handoff from
        // the previous holder here comes with its etcd key.
        let mut turns: Vec<(Resource, String, Option<Kept>)> = Vec::new();
        for r in resources {
            let key = r.key();
            match inner.enter_local(&key, deadline, timeout.is_zero()) {
                Ok(k) => turns.push((r.clone(), key, k)),
                Err(e) => {
                    inner.give_back(turns);
                    return Err(e);
                }
            }
        }
        // The keys still to take in etcd: all in one transaction when all
        // are free, else one by one (waiting for each, in order).
        let need: Vec<Resource> = turns
            .iter()
            .filter(|t| t.2.is_none())
            .map(|t| t.0.clone())
            .collect();
        let at_once = if need.is_empty() {
            None
        } else {
            match inner.rt().block_on(inner.try_all(&need, deadline, read)) {
                Ok(v) => v,
                Err(e) => {
                    inner.give_back(turns);
                    return Err(e);
                }
            }
        };
        if at_once.is_none() && !need.is_empty() {
            // Key by key, we may wait in etcd for a lock that comes before
            // one whose key a handoff here brought along: holding that key
            // while waiting would take locks out of order (another process
            // may hold the earlier lock and wait for the later). Let such
            // keys go, keeping this thread's turn, and queue for them again
            // in order.
            let mut waiting_before = false;
            for (_, key, kept) in turns.iter_mut() {
                match kept.take() {
                    None => waiting_before = true,
                    Some(k) if waiting_before => inner.unkeep(key, k),
                    Some(k) => *kept = Some(k),
                }
            }
        }
        let mut guards = Vec::with_capacity(turns.len());
        let mut pending = turns.into_iter();
        while let Some((r, key, kept)) = pending.next() {
            let made = |etcd_key: String, epoch, revision, token| {
                inner.took_local(&key, epoch, revision);
                LockGuard::new(
                    r.clone(),
                    Box::new(EtcdHeld {
                        inner: inner.clone(),
                        lock: key.clone(),
                        key: etcd_key,
                        revision,
                        epoch,
                        token,
                    }),
                )
            };
            let held = match (kept, &at_once) {
                (Some(k), _) => Ok(made(k.key, k.epoch, k.revision, k.token)),
                (None, Some(((epoch, rev, token), mine, _))) => {
                    let etcd_key = mine.get(&key).cloned().unwrap_or_default();
                    Ok(made(etcd_key, *epoch, *rev, *token))
                }
                (None, None) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    inner
                        .rt()
                        .block_on(async { inner.acquire(&r, left).await })
                        .map(|(g, epoch, rev)| {
                            inner.took_local(&key, epoch, rev);
                            g
                        })
                }
            };
            match held {
                Ok(g) => guards.push(g),
                Err(e) => {
                    inner.leave_local(&key);
                    inner.give_back(pending.collect());
                    // Dropping the guards taken so far releases them.
                    drop(guards);
                    return Err(e);
                }
            }
        }
        let seen = match at_once {
            Some((_, _, seen)) if seen.len() == read.len() => seen,
            _ => self.holders(read)?,
        };
        Ok((guards, seen))
    }

    fn holders(&self, resources: &[Resource]) -> Result<Vec<Option<Token>>> {
        let inner = self.inner.clone();
        let keys: Vec<String> = resources.iter().map(|r| r.key()).collect();
        inner.wait_own_releases(&keys);
        inner.rt().block_on(async {
            let mut bases = HashMap::new();
            for r in resources {
                if let std::collections::hash_map::Entry::Vacant(e) = bases.entry(r.domain) {
                    e.insert(inner.base(r.domain).await?);
                }
            }
            let mut c = inner.client.clone();
            let txn = Txn::new().and_then(
                resources
                    .iter()
                    .map(|r| TxnOp::get(queue_of(&r.key()), Some(first_in_queue())))
                    .collect::<Vec<_>>(),
            );
            let resp = c.txn(txn).await.map_err(lock_err("reading lock holders"))?;
            let ops = resp.op_responses();
            Ok(resources
                .iter()
                .zip(ops)
                .map(|(r, op)| match op {
                    TxnOpResponse::Get(g) => g
                        .kvs()
                        .first()
                        .map(|kv| bases[&r.domain] + kv.create_revision() as u64),
                    _ => None,
                })
                .collect())
        })
    }

    fn holder(&self, resource: &Resource) -> Result<Option<Token>> {
        Ok(self.holders(std::slice::from_ref(resource))?[0])
    }
}

impl crate::kv::Kv for EtcdLockService {
    fn put(&self, key: &str, value: &str) -> Result<()> {
        crate::kv::check_key(key)?;
        let inner = self.inner.clone();
        inner.rt().block_on(async {
            let mut c = inner.client.clone();
            c.put(key, value, None)
                .await
                .map_err(lock_err(format!("writing {key}")))?;
            Ok(())
        })
    }

    fn get(&self, key: &str) -> Result<Option<String>> {
        let inner = self.inner.clone();
        inner.rt().block_on(async {
            let mut c = inner.client.clone();
            let r = c
                .get(key, None)
                .await
                .map_err(lock_err(format!("reading {key}")))?;
            Ok(r.kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let inner = self.inner.clone();
        inner.rt().block_on(async {
            let mut c = inner.client.clone();
            let r = c
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(lock_err(format!("listing {prefix}")))?;
            let mut out: Vec<(String, String)> = r
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                })
                .collect();
            out.sort();
            Ok(out)
        })
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let inner = self.inner.clone();
        inner.rt().block_on(async {
            let mut c = inner.client.clone();
            let r = c
                .delete(key, None)
                .await
                .map_err(lock_err(format!("removing {key}")))?;
            Ok(r.deleted() > 0)
        })
    }

    fn create(&self, key: &str, value: &str) -> Result<Option<String>> {
        crate::kv::check_key(key)?;
        let inner = self.inner.clone();
        inner.rt().block_on(async {
            let mut c = inner.client.clone();
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, value, None)])
                .or_else([TxnOp::get(key, None)]);
            let r = c
                .txn(txn)
                .await
                .map_err(lock_err(format!("creating {key}")))?;
            if r.succeeded() {
                return Ok(None);
            }
            let v = match r.op_responses().into_iter().next() {
                Some(TxnOpResponse::Get(g)) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            };
            Ok(Some(v.unwrap_or_default()))
        })
    }

    fn register(&self, key: &str, value: &str) -> Result<()> {
        crate::kv::check_key(key)?;
        EtcdLockService::register(self, key, value)
    }
}
