//! A small key-value store for what the cluster may lose: the agent
//! registry, coordinator job records and the like. Durable facts live on
//! the domains; these are views and bookkeeping that a wiped etcd only
//! makes the cluster rebuild or forget.
//!
//! Three implementations pass [`conformance`]: etcd (on
//! [`crate::EtcdLockService`], sharing its session), files in a directory
//! for one host, and memory for unit tests.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{ClusterError, Result};

/// Keys are `/`-separated paths of plain names, values are text (JSON).
pub trait Kv: Send + Sync {
    /// Set `key` to `value` for good.
    fn put(&self, key: &str, value: &str) -> Result<()>;
    /// The value of `key`.
    fn get(&self, key: &str) -> Result<Option<String>>;
    /// Every key under `prefix` with its value, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<(String, String)>>;
    /// Remove `key`; false if it was not there.
    fn delete(&self, key: &str) -> Result<bool>;
    /// Set `key` to `value` unless it exists: `None` when it was created,
    /// else the value it has. Atomic: of two racing creators one wins.
    fn create(&self, key: &str, value: &str) -> Result<Option<String>>;
    /// Keep `key` = `value` only while this process lives (in etcd: under
    /// its session lease).
    fn register(&self, key: &str, value: &str) -> Result<()>;
}

fn kv_err(context: impl Into<String>, e: std::io::Error) -> ClusterError {
    ClusterError::io(context)(e)
}

/// Refuse keys that are not plain `/`-separated names.
pub fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(ClusterError::InvalidKey {
            key: key.to_string(),
            reason: "not a /-separated path of plain names",
        })
    }
}

/// Keys in memory, shared by clones.
#[derive(Clone, Default)]
pub struct MemKv {
    map: Arc<Mutex<BTreeMap<String, String>>>,
}

impl MemKv {
    /// An empty store.
    pub fn new() -> MemKv {
        MemKv::default()
    }
}

impl Kv for MemKv {
    fn put(&self, key: &str, value: &str) -> Result<()> {
        check_key(key)?;
        self.map
            .lock()
            .expect("poisoned")
            .insert(key.into(), value.into());
        Ok(())
    }
    fn get(&self, key: &str) -> Result<Option<String>> {
        Ok(self.map.lock().expect("poisoned").get(key).cloned())
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .map
            .lock()
            .expect("poisoned")
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.map.lock().expect("poisoned").remove(key).is_some())
    }
    fn create(&self, key: &str, value: &str) -> Result<Option<String>> {
        check_key(key)?;
        let mut m = self.map.lock().expect("poisoned");
        if let Some(v) = m.get(key) {
            return Ok(Some(v.clone()));
        }
        m.insert(key.into(), value.into());
        Ok(None)
    }
    fn register(&self, key: &str, value: &str) -> Result<()> {
        self.put(key, value)
    }
}

/// Keys as files under a directory (one host's coordinator state).
/// Registered keys stay in memory: they die with the process, as they would
/// with its lease.
#[derive(Clone)]
pub struct FileKv {
    dir: PathBuf,
    live: MemKv,
}

impl FileKv {
    /// A store in `dir`, created if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<FileKv> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| kv_err(format!("creating {}", dir.display()), e))?;
        Ok(FileKv {
            dir,
            live: MemKv::new(),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.dir.join(key))
    }

    fn walk(&self, dir: &Path, out: &mut Vec<(String, String)>) -> Result<()> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(kv_err(format!("reading {}", dir.display()), e)),
        };
        for e in rd {
            let e = e.map_err(|e| kv_err(format!("reading {}", dir.display()), e))?;
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp.") {
                continue;
            }
            if p.is_dir() {
                self.walk(&p, out)?;
            } else {
                let key = p
                    .strip_prefix(&self.dir)
                    .expect("under the store")
                    .to_string_lossy()
                    .into_owned();
                let v = fs::read_to_string(&p)
                    .map_err(|e| kv_err(format!("reading {}", p.display()), e))?;
                out.push((key, v));
            }
        }
        Ok(())
    }
}

impl Kv for FileKv {
    fn put(&self, key: &str, value: &str) -> Result<()> {
        let p = self.path(key)?;
        let dir = p.parent().expect("a key has a parent").to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| kv_err(format!("creating {}", dir.display()), e))?;
        let tmp = dir.join(format!(
            ".tmp.{}.{}",
            p.file_name().expect("named").to_string_lossy(),
            uuid::Uuid::new_v4()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(value.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &p)?;
            fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            kv_err(format!("writing {}", p.display()), e)
        })
    }
    fn get(&self, key: &str) -> Result<Option<String>> {
        if let Some(v) = self.live.get(key)? {
            return Ok(Some(v));
        }
        let p = self.path(key)?;
        match fs::read_to_string(&p) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => Ok(None),
            Err(e) => Err(kv_err(format!("reading {}", p.display()), e)),
        }
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        // Walk from the deepest directory the prefix names.
        let base = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if base.is_empty() {
            self.dir.clone()
        } else {
            self.path(base)?
        };
        let mut out = Vec::new();
        self.walk(&start, &mut out)?;
        out.retain(|(k, _)| k.starts_with(prefix));
        out.extend(self.live.list(prefix)?);
        out.sort();
        Ok(out)
    }
    fn delete(&self, key: &str) -> Result<bool> {
        if self.live.delete(key)? {
            return Ok(true);
        }
        let p = self.path(key)?;
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(kv_err(format!("removing {}", p.display()), e)),
        }
    }
    fn create(&self, key: &str, value: &str) -> Result<Option<String>> {
        let p = self.path(key)?;
        let dir = p.parent().expect("a key has a parent").to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| kv_err(format!("creating {}", dir.display()), e))?;
        let tmp = dir.join(format!(".tmp.{}", uuid::Uuid::new_v4()));
        // A hard link fails when the name exists: create-if-absent in one
        // step, with the whole value in place before the name appears.
        let write = || -> std::io::Result<bool> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(value.as_bytes())?;
            f.sync_all()?;
            let made = match fs::hard_link(&tmp, &p) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e),
            };
            fs::remove_file(&tmp)?;
            fs::File::open(&dir)?.sync_all()?;
            Ok(made)
        };
        match write() {
            Ok(true) => Ok(None),
            Ok(false) => Ok(Some(self.get(key)?.unwrap_or_default())),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(kv_err(format!("writing {}", p.display()), e))
            }
        }
    }
    fn register(&self, key: &str, value: &str) -> Result<()> {
        self.live.register(key, value)
    }
}

/// The behaviour every implementation shares.
#[doc(hidden)]
pub mod conformance {
    use super::*;

    /// Run every check on a fresh store; `ns` keeps runs apart.
    pub fn run_all(kv: &dyn Kv, ns: &str) {
        put_get_delete(kv, ns);
        create_only_once(kv, ns);
        list_is_by_prefix_and_sorted(kv, ns);
        bad_keys_are_refused(kv);
    }

    /// Values come back as written; delete says whether it removed.
    pub fn put_get_delete(kv: &dyn Kv, ns: &str) {
        let k = format!("{ns}/a/one");
        assert_eq!(kv.get(&k).unwrap(), None);
        kv.put(&k, "1").unwrap();
        assert_eq!(kv.get(&k).unwrap().as_deref(), Some("1"));
        kv.put(&k, "{\"x\": 2}").unwrap();
        assert_eq!(kv.get(&k).unwrap().as_deref(), Some("{\"x\": 2}"));
        assert!(kv.delete(&k).unwrap());
        assert!(!kv.delete(&k).unwrap());
        assert_eq!(kv.get(&k).unwrap(), None);
        let r = format!("{ns}/live/me");
        kv.register(&r, "here").unwrap();
        assert_eq!(kv.get(&r).unwrap().as_deref(), Some("here"));
    }

    /// Create writes only a missing key, and says what is there.
    pub fn create_only_once(kv: &dyn Kv, ns: &str) {
        let k = format!("{ns}/c/once");
        assert_eq!(kv.create(&k, "first").unwrap(), None);
        assert_eq!(kv.create(&k, "second").unwrap().as_deref(), Some("first"));
        assert_eq!(kv.get(&k).unwrap().as_deref(), Some("first"));
        assert!(kv.create("a//b", "x").is_err());
        assert!(kv.delete(&k).unwrap());
        assert_eq!(kv.create(&k, "third").unwrap(), None);
        assert_eq!(kv.get(&k).unwrap().as_deref(), Some("third"));
        // Racing creators: exactly one wins.
        let k = format!("{ns}/c/race");
        let won = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let k = k.clone();
                    s.spawn(move || kv.create(&k, &i.to_string()).unwrap().is_none())
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .filter(|w| *w)
                .count()
        });
        assert_eq!(won, 1);
    }

    /// A prefix selects its keys only, in key order.
    pub fn list_is_by_prefix_and_sorted(kv: &dyn Kv, ns: &str) {
        for k in ["jobs/b", "jobs/a", "jobsx/c", "other/d"] {
            kv.put(&format!("{ns}/{k}"), k).unwrap();
        }
        let got: Vec<String> = kv
            .list(&format!("{ns}/jobs/"))
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(got, ["jobs/a", "jobs/b"]);
        assert!(kv.list(&format!("{ns}/none/")).unwrap().is_empty());
    }

    /// Paths that could escape or confuse a directory are refused.
    pub fn bad_keys_are_refused(kv: &dyn Kv) {
        for k in ["", "/abs", "a//b", "a/../b", "a/./b", "a b", "a/"] {
            assert!(kv.put(k, "x").is_err(), "{k:?} accepted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_kv_conforms() {
        conformance::run_all(&MemKv::new(), "t");
    }

    #[test]
    fn file_kv_conforms_and_persists() {
        let d = tempfile::tempdir().unwrap();
        let kv = FileKv::new(d.path()).unwrap();
        conformance::run_all(&kv, "t");
        kv.put("t/keep/x", "v").unwrap();
        kv.register("t/keep/live", "l").unwrap();
        // A new process sees what was put, not what was registered.
        let again = FileKv::new(d.path()).unwrap();
        assert_eq!(again.get("t/keep/x").unwrap().as_deref(), Some("v"));
        assert_eq!(again.get("t/keep/live").unwrap(), None);
    }
}
