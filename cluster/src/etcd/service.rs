//! The etcd service as the domain's `LockService`.

use super::*;

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
    ) -> Result<Acquired> {
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
