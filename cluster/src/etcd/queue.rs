//! A lock's queue in etcd: each contender's key under the lock, the
//! oldest holding it; releases, in the background and in batches.

use super::*;

impl Inner {
    /// Take the lock in etcd, first come first served: each contender
    /// puts its own key under the lock's (`<lock>/<lease>`, under its
    /// lease), and holds the lock when its key is the oldest there; until
    /// then it waits for the key just before its own to go. The token is
    /// its key's create revision (later holders have later keys). Returns
    /// the guard with its session epoch and create revision.
    pub(super) async fn acquire(
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
    pub(super) async fn flush_releases(&self) {
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

    pub(super) fn after_release(&self, done: &[Release]) {
        for r in done {
            if let Some(lock) = &r.lock {
                self.released(lock);
            }
        }
    }

    pub(super) async fn release(&self, key: &str, revision: i64) {
        if let Err(e) = self.try_release(key, revision).await {
            // The lease ends it anyway.
            tracing::warn!(key, error = %e, "could not release an etcd lock");
        }
    }

    pub(super) async fn try_release(
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
