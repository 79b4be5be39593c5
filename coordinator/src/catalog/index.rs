//! What a coordinator keeps of each domain's catalog between requests:
//! every file version and every image, at one generation, brought up to
//! date from the domain's change log (only what changed is read again;
//! a domain whose log does not reach back far enough is listed whole).
//!
//! Invariant: a [`DomainCatalog`] is what the domain held at its
//! `generation` (records may be newer: a record read just after a change
//! is read again at the next refresh, the log naming its tag).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cairn_domain::catalog::FileVersion;
use cairn_domain::TagId;

use super::image_ops::Found;
use super::images::{self, ImageRecord};
use super::store::{self, DATA_DIR};
use crate::agents::{AgentConn, FileDelta};
use crate::coordinator::Coordinator;
use crate::error::Result;
use crate::plan::DomainRef;

/// One domain's catalog at one generation.
#[derive(Debug, Clone, Default)]
pub struct DomainCatalog {
    /// The generation.
    pub generation: u64,
    /// Every file version, by path then version.
    pub files: Vec<FileVersion>,
    /// Every image with its data items.
    pub images: Vec<Found>,
    /// The records as read, by tag (what a refresh keeps).
    records: HashMap<TagId, Arc<ImageRecord>>,
}

impl DomainCatalog {
    /// Build it from every file version of domain `d` and the records of
    /// the images registered from them.
    pub fn build(
        d: &DomainRef,
        generation: u64,
        files: Vec<FileVersion>,
        records: HashMap<TagId, Arc<ImageRecord>>,
    ) -> DomainCatalog {
        let mut files = files;
        files.sort_by(|a, b| (&a.path, a.version).cmp(&(&b.path, b.version)));
        // Data items, grouped by image id once (not a pass per image).
        let mut data: HashMap<&str, Vec<FileVersion>> = HashMap::new();
        for f in &files {
            let id = f
                .path
                .strip_prefix(DATA_DIR)
                .and_then(|r| r.strip_prefix('/'))
                .and_then(|r| r.split_once('/'))
                .map(|(id, _)| id);
            if let Some(id) = id {
                data.entry(id).or_default().push(f.clone());
            }
        }
        let mut out = Vec::with_capacity(records.len());
        for f in &files {
            let Some(rec) = records.get(&f.tag) else {
                continue;
            };
            let group = data.get(rec.id.as_str()).map_or(&[][..], |v| &v[..]);
            out.push(Found {
                domain: d.clone(),
                generation,
                file: f.clone(),
                record: (**rec).clone(),
                data: store::data_items(group, &rec.id),
                data_files: store::data_versions(group, &rec.id),
            });
        }
        DomainCatalog {
            generation,
            files,
            images: out,
            records,
        }
    }

    /// This catalog with `delta` (changes since its generation) applied;
    /// on an empty one, a whole listing.
    pub fn apply(&self, d: &DomainRef, delta: FileDelta) -> Result<DomainCatalog> {
        let mut files: BTreeMap<TagId, FileVersion> =
            self.files.iter().map(|f| (f.tag, f.clone())).collect();
        let mut records = self.records.clone();
        for t in &delta.removed {
            files.remove(t);
            records.remove(t);
        }
        for (f, rec) in delta.files {
            records.remove(&f.tag);
            if f.image.is_some() && !rec.is_empty() {
                records.insert(f.tag, Arc::new(images::decode(&rec)?));
            }
            files.insert(f.tag, f);
        }
        Ok(DomainCatalog::build(
            d,
            delta.generation,
            files.into_values().collect(),
            records,
        ))
    }
}

/// Every domain's catalog this coordinator read, by domain id.
#[derive(Debug, Default)]
pub struct Indexes {
    by_domain: Mutex<HashMap<uuid::Uuid, Arc<DomainCatalog>>>,
}

impl Indexes {
    fn get(&self, d: &uuid::Uuid) -> Option<Arc<DomainCatalog>> {
        self.by_domain.lock().expect("poisoned").get(d).cloned()
    }

    /// Keep `c` unless a newer one was kept meanwhile; the one kept.
    fn put(&self, d: uuid::Uuid, c: DomainCatalog) -> Arc<DomainCatalog> {
        let mut m = self.by_domain.lock().expect("poisoned");
        match m.get(&d) {
            Some(old) if old.generation > c.generation => old.clone(),
            _ => {
                let c = Arc::new(c);
                m.insert(d, c.clone());
                c
            }
        }
    }
}

impl Coordinator {
    /// Domain `d`'s catalog now, read through `c`: the changes since the
    /// one kept, or the whole catalog when none is kept or the domain's
    /// log does not reach back to it.
    pub(super) async fn catalog_of(
        &self,
        c: &AgentConn,
        d: &DomainRef,
    ) -> Result<Arc<DomainCatalog>> {
        let kept = self.catalogs.get(&d.id);
        let delta = c
            .file_delta(&d.id, kept.as_ref().map(|k| k.generation))
            .await?;
        let next = match kept {
            Some(k) if delta.changes => {
                if delta.generation == k.generation {
                    return Ok(k);
                }
                k.apply(d, delta)?
            }
            _ => DomainCatalog::default().apply(d, delta)?,
        };
        Ok(self.catalogs.put(d.id, next))
    }
}
