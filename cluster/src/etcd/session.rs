//! The session: one lease per process kept alive in the background,
//! self-fencing by the last confirmed keep-alive, and the token base.

use super::*;

impl Inner {
    pub(super) fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as Inner")
    }

    pub(super) fn since_start(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Whether a lock of session `epoch` may still be relied on.
    pub(super) fn valid(&self, epoch: u64) -> std::result::Result<(), String> {
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
    pub(super) async fn keep_alive(self: Arc<Self>) {
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

    pub(super) async fn keep_alive_loop(self: Arc<Self>) {
        let ttl = self.cfg.ttl.as_secs().max(2) as i64;
        let every = self.cfg.ttl / 3;
        // Registrations that did not reach etcd when the session started:
        // put again at every confirmed keep-alive until they do.
        let mut unregistered = false;
        loop {
            let mut c = self.client.clone();
            let cur = *self.session.lock().expect("poisoned");
            let s = match cur {
                Some(s) => s,
                None => {
                    let sent = self.since_start();
                    // No call here may wait longer than a lease lives: an
                    // etcd that restarts can leave a call unanswered.
                    let granted =
                        tokio::time::timeout(self.cfg.ttl, c.lease_grant(ttl, None)).await;
                    match granted {
                        Ok(Ok(r)) => {
                            let epoch = self.epochs.fetch_add(1, Ordering::SeqCst) + 1;
                            let s = Session {
                                lease: r.id(),
                                epoch,
                            };
                            *self.session.lock().expect("poisoned") = Some(s);
                            // The grant confirms the lease from when it was asked.
                            self.confirmed_ms.store(sent.max(1), Ordering::SeqCst);
                            tracing::info!(lease = r.id(), epoch, "etcd session started");
                            unregistered = !self.put_registrations(s.lease).await;
                            s
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "etcd lease grant failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                        Err(_) => {
                            tracing::warn!("etcd lease grant unanswered; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    }
                }
            };
            let opened = tokio::time::timeout(self.cfg.ttl, c.lease_keep_alive(s.lease)).await;
            let (mut keeper, mut stream) = match opened {
                Ok(Ok(k)) => k,
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) if e == "lease not found" => {
                    // etcd says the lease is gone (it expired, or etcd lost
                    // its data): a new session at once, not after a TTL.
                    tracing::warn!(lease = s.lease, "etcd lease not found; new session");
                    self.drop_session(s);
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "etcd keep-alive stream failed; retrying");
                    self.expire_if_stale(s);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!("etcd keep-alive stream unanswered; retrying");
                    self.expire_if_stale(s);
                    continue;
                }
            };
            loop {
                let sent = self.since_start();
                match tokio::time::timeout(every, keeper.keep_alive()).await {
                    Ok(Ok(())) => {}
                    _ => {
                        self.expire_if_stale(s);
                        break;
                    }
                }
                match tokio::time::timeout(every.max(Duration::from_millis(200)), stream.message())
                    .await
                {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        self.confirmed_ms.fetch_max(sent.max(1), Ordering::SeqCst);
                        if unregistered {
                            unregistered = !self.put_registrations(s.lease).await;
                        }
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

    /// Put every registration under `lease`; whether all of them went in.
    pub(super) async fn put_registrations(&self, lease: i64) -> bool {
        let regs = self.registrations.lock().expect("poisoned").clone();
        let mut c = self.client.clone();
        let mut all = true;
        for (k, v) in regs {
            let put = c.put(k.clone(), v, Some(PutOptions::new().with_lease(lease)));
            match tokio::time::timeout(self.cfg.ttl, put).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => tracing::warn!(key = %k, error = %e, "could not register in etcd"),
                Err(_) => tracing::warn!(key = %k, "registering in etcd went unanswered"),
            }
            all = false;
        }
        all
    }

    /// When etcd has not confirmed the lease for a whole TTL, it may have
    /// expired: start over with a new session.
    pub(super) fn expire_if_stale(&self, s: Session) {
        let confirmed = self.confirmed_ms.load(Ordering::SeqCst);
        if Duration::from_millis(self.since_start().saturating_sub(confirmed)) >= self.cfg.ttl {
            self.drop_session(s);
        }
    }

    pub(super) fn drop_session(&self, s: Session) {
        let mut g = self.session.lock().expect("poisoned");
        if g.map(|c| c.epoch) == Some(s.epoch) {
            *g = None;
            self.confirmed_ms.store(0, Ordering::SeqCst);
        }
    }

    /// The current session, waiting for one until `deadline`.
    pub(super) async fn current(&self, deadline: Instant) -> Result<Session> {
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
    pub(super) async fn base(&self, domain: uuid::Uuid) -> Result<u64> {
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
}
