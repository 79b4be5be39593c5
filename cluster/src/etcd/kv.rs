//! The cluster store in etcd, under the same session.

use super::*;
use crate::error::{ClusterError, Result};

impl crate::kv::Kv for EtcdLockService {
    fn put(&self, key: &str, value: &str) -> Result<()> {
        crate::kv::check_key(key)?;
        let inner = self.inner.clone();
        inner.rt().block_on(async {
            let mut c = inner.client.clone();
            c.put(key, value, None)
                .await
                .map_err(ClusterError::etcd(format!("writing {key}")))?;
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
                .map_err(ClusterError::etcd(format!("reading {key}")))?;
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
                .map_err(ClusterError::etcd(format!("listing {prefix}")))?;
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
                .map_err(ClusterError::etcd(format!("removing {key}")))?;
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
                .map_err(ClusterError::etcd(format!("creating {key}")))?;
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
        Ok(EtcdLockService::register(self, key, value)?)
    }
}
