//! Turns within the process: threads queue for a lock locally and hand
//! it on without leaving etcd, and several locks are taken in one etcd
//! transaction.

use super::*;

impl Inner {
    /// Release our etcd `key`; with `lock`, tell this process's queue at
    /// it when that is done.
    pub(super) fn release_in_background(
        self: &Arc<Self>,
        lock: Option<String>,
        key: String,
        epoch: u64,
    ) {
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
    pub(super) fn wait_own_releases(&self, locks: &[String]) {
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
    pub(super) fn released(&self, lock: &str) {
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
    pub(super) fn enter_local(
        &self,
        key: &str,
        deadline: Instant,
        try_once: bool,
    ) -> Result<Option<Kept>> {
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
    pub(super) fn unkeep(self: &Arc<Self>, lock: &str, k: Kept) {
        if let Some(st) = self.local.lock().expect("poisoned").get_mut(lock) {
            st.holder = None;
            st.releasing += 1;
        }
        self.release_in_background(Some(lock.to_string()), k.key, k.epoch);
    }

    /// Give back turns taken by `acquire_all` that it could not use: a
    /// handed-over key is released (or handed on) as a guard would be.
    pub(super) fn give_back(self: &Arc<Self>, turns: Vec<(Resource, String, Option<Kept>)>) {
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
    pub(super) async fn try_all(
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
    pub(super) async fn forget(&self, keys: &[String]) {
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
    pub(super) fn took_local(&self, key: &str, epoch: u64, revision: i64) {
        let mut m = self.local.lock().expect("poisoned");
        if let Some(st) = m.get_mut(key) {
            st.holder = Some((epoch, revision));
        }
    }

    /// Whether the session of a holder is gone for good.
    pub(super) fn gone(&self, holder: Option<(u64, i64)>) -> bool {
        let cur = self.session.lock().expect("poisoned").map(|s| s.epoch);
        holder.is_some_and(|(epoch, _)| cur != Some(epoch))
    }

    /// Give up this process's turn at `key` after failing to take it.
    pub(super) fn leave_local(self: &Arc<Self>, key: &str) {
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
