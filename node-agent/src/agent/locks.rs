//! Volume locks held for clients, with a lease.

use super::*;

impl Agent {
    pub(super) fn reap_locks(map: &mut HashMap<String, ClientLock>) {
        let now = Instant::now();
        map.retain(|id, l| {
            let keep = l.expires > now;
            if !keep {
                tracing::warn!(lock_id = %id, volume = %l.volume, "client lock lease ended");
            }
            keep
        });
    }

    pub(super) fn keep_lock(
        &self,
        o: &Opened,
        volume: VolumeId,
        guard: LockGuard,
        lease: Duration,
    ) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut m = self.client_locks.lock().expect("poisoned");
        Self::reap_locks(&mut m);
        m.insert(
            id.clone(),
            ClientLock {
                guard: Arc::new(guard),
                domain: o.id(),
                volume,
                expires: Instant::now() + lease,
            },
        );
        id
    }

    /// The guard of a client lock on `volume`, if `lock_id` is given.
    pub(super) fn client_lock(
        &self,
        o: &Opened,
        volume: &VolumeId,
        lock_id: &str,
    ) -> Result<Option<Arc<LockGuard>>> {
        if lock_id.is_empty() {
            return Ok(None);
        }
        let mut m = self.client_locks.lock().expect("poisoned");
        Self::reap_locks(&mut m);
        let l = m
            .get(lock_id)
            .ok_or_else(|| AgentError::not_found("lock", lock_id.to_string()))?;
        if l.domain != o.id() || l.volume != *volume {
            return Err(AgentError::invalid(
                "lock_id",
                format!("lock {lock_id} is not the lock of volume {volume}"),
            ));
        }
        Ok(Some(l.guard.clone()))
    }

    /// Take a volume's lock for a client.
    pub fn lock_volume(&self, o: &Opened, id: &VolumeId, lease: Duration) -> Result<(String, u64)> {
        o.domain.read_volume(id)?;
        let g = o.domain.lock_volume(id)?;
        let token = g.token();
        Ok((self.keep_lock(o, *id, g, lease), token))
    }

    /// Give back a client lock; false if it was not held.
    pub fn unlock(&self, lock_id: &str) -> bool {
        self.written.lock().expect("poisoned").remove(lock_id);
        let mut m = self.client_locks.lock().expect("poisoned");
        Self::reap_locks(&mut m);
        m.remove(lock_id).is_some()
    }
}
