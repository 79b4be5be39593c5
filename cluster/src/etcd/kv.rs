//! The cluster store in etcd, under the same session.

use super::*;
use crate::error::{ClusterError, Result};

impl EtcdLockService {
    /// One etcd call on the session's runtime; a failure names `what`.
    fn call<T, Fut>(&self, what: String, f: impl FnOnce(Client) -> Fut) -> Result<T>
    where
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let inner = &self.inner;
        inner
            .rt()
            .block_on(f(inner.client.clone()))
            .map_err(ClusterError::etcd(what))
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl crate::kv::Kv for EtcdLockService {
    fn put(&self, key: &str, value: &str) -> Result<()> {
        crate::kv::check_key(key)?;
        self.call(format!("writing {key}"), |mut c| async move {
            c.put(key, value, None).await
        })?;
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<String>> {
        let r = self.call(format!("reading {key}"), |mut c| async move {
            c.get(key, None).await
        })?;
        Ok(r.kvs().first().map(|kv| text(kv.value())))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let r = self.call(format!("listing {prefix}"), |mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        let mut out: Vec<(String, String)> = r
            .kvs()
            .iter()
            .map(|kv| (text(kv.key()), text(kv.value())))
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let r = self.call(format!("removing {key}"), |mut c| async move {
            c.delete(key, None).await
        })?;
        Ok(r.deleted() > 0)
    }

    fn create(&self, key: &str, value: &str) -> Result<Option<String>> {
        crate::kv::check_key(key)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)]);
        let r = self.call(format!("creating {key}"), |mut c| async move {
            c.txn(txn).await
        })?;
        if r.succeeded() {
            return Ok(None);
        }
        let v = match r.op_responses().into_iter().next() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| text(kv.value())),
            _ => None,
        };
        Ok(Some(v.unwrap_or_default()))
    }

    fn register(&self, key: &str, value: &str) -> Result<()> {
        crate::kv::check_key(key)?;
        Ok(EtcdLockService::register(self, key, value)?)
    }
}
