//! What a coordinator keeps of each domain's catalog between requests:
//! every file version and every image, at one generation, brought up to
//! date from the domain's change log (only what changed is read again and
//! updated in place; a domain whose log does not reach back far enough is
//! listed whole), and the images' recent changes, which answer "what
//! changed since generation `g`".
//!
//! Invariants:
//! - a [`DomainCatalog`] is what the domain held at its `generation`
//!   (records may be newer: a record read just after a change is read
//!   again at the next refresh, the log naming its tag);
//! - every image change after `floor` is in `events`, with the image as
//!   it was before that change.
//!
//! Requests hold the catalog they read while they work, so a refresh
//! usually finds it shared and changes a copy. Its collections are
//! persistent (`imbl`): a copy shares everything but the paths a change
//! touches, so a change costs the same at 100,000 images as at 1,000
//! (with plain maps each copy cost a pass over the whole catalog).

use std::collections::{BTreeSet, HashMap as StdMap};
use std::sync::{Arc, Mutex};

use imbl::{HashMap, OrdMap, Vector};

use cairn_domain::catalog::FileVersion;
use cairn_domain::TagId;
use cairn_proto::auth::Identity;

use super::glance;
use super::image_ops::Found;
use super::images::{self, ImageRecord};
use super::store::{self, DATA_DIR};
use crate::agents::{AgentConn, FileDelta};
use crate::coordinator::Coordinator;
use crate::error::Result;
use crate::plan::DomainRef;

/// Most image changes a kept catalog remembers; a caller further behind
/// is given everything.
const MAX_EVENTS: usize = 16384;

/// One image's change.
#[derive(Debug, Clone)]
struct Event {
    generation: u64,
    id: String,
    /// The image before it (`None`: there was none).
    before: Option<Arc<ImageRecord>>,
}

/// One domain's catalog at one generation.
#[derive(Debug, Clone, Default)]
pub struct DomainCatalog {
    /// The generation.
    pub generation: u64,
    /// Changes after this generation are known one by one.
    pub floor: u64,
    /// Every file version, in no order.
    pub files: Vector<FileVersion>,
    file_at: HashMap<TagId, usize>,
    /// Every image with its data items, in no order.
    images: Vector<Found>,
    image_at: HashMap<TagId, usize>,
    /// Image id to the tag it is registered from (ordered: prefixes).
    by_id: OrdMap<String, TagId>,
    /// Path to its versions' tags.
    by_path: HashMap<String, Vec<TagId>>,
    /// Request id (before its `.ATTEMPT`) to the versions it made.
    by_request: HashMap<String, Vec<TagId>>,
    /// Image id to the versions that name it, with a record or not.
    image_tags: HashMap<String, Vec<TagId>>,
    /// Image name to the tags of the images that have it (once per
    /// time a record lists it).
    names: HashMap<String, Vec<TagId>>,
    /// Image id to the file versions under its data directory.
    data: HashMap<String, BTreeSet<TagId>>,
    events: Vector<Event>,
}

/// Take element `i` out of `v`, the last one taking its place (as
/// `Vec::swap_remove`).
fn swap_remove<T: Clone>(v: &mut Vector<T>, i: usize) -> T {
    let last = v.pop_back().expect("i is in v");
    if i == v.len() {
        last
    } else {
        v.set(i, last)
    }
}

/// The image id whose data directory `path` is in.
pub(super) fn data_owner(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(DATA_DIR)?.strip_prefix('/')?;
    rest.split_once('/').map(|(id, _)| id)
}

/// The part of a stored request id before its `.ATTEMPT`.
fn request_key(r: &str) -> &str {
    r.split_once('.').map_or(r, |(b, _)| b)
}

/// Take `t` from `m[k]`, and the entry when it is left empty.
fn forget<K>(m: &mut HashMap<String, Vec<TagId>>, k: &K, t: &TagId)
where
    K: AsRef<str> + ?Sized,
{
    let k = k.as_ref();
    if let Some(v) = m.get_mut(k) {
        v.retain(|x| x != t);
        if v.is_empty() {
            m.remove(k);
        }
    }
}

/// What changed for one caller since a generation.
#[derive(Debug, Clone, Default)]
pub struct Since {
    /// Images changed since that the caller may list, as they are now.
    pub changed: Vec<Found>,
    /// Images the caller could list then and cannot now (unregistered,
    /// or no longer visible to it).
    pub removed: Vec<String>,
}

impl DomainCatalog {
    /// Every image, read at this catalog's generation.
    pub fn images(&self) -> Vec<Found> {
        self.images.iter().map(|i| self.stamped(i)).collect()
    }

    fn image_by_id(&self, id: &str) -> Option<&Found> {
        let t = self.by_id.get(id)?;
        self.image_at.get(t).map(|&i| &self.images[i])
    }

    fn stamped(&self, i: &Found) -> Found {
        Found {
            generation: self.generation,
            ..i.clone()
        }
    }

    fn file(&self, t: &TagId) -> Option<&FileVersion> {
        self.file_at.get(t).map(|&i| &self.files[i])
    }

    /// The image registered from file version `t`.
    pub fn image_of_tag(&self, t: &TagId) -> Option<Found> {
        self.image_at.get(t).map(|&i| self.stamped(&self.images[i]))
    }

    /// The versions of `path`, oldest first.
    pub fn versions(&self, path: &str) -> Vec<&FileVersion> {
        let mut v: Vec<&FileVersion> = self
            .by_path
            .get(path)
            .into_iter()
            .flatten()
            .filter_map(|t| self.file(t))
            .collect();
        v.sort_by_key(|f| f.version);
        v
    }

    /// The versions an attempt of request `base` made.
    pub fn made_by(&self, base: &str) -> Vec<&FileVersion> {
        self.by_request
            .get(request_key(base))
            .into_iter()
            .flatten()
            .filter_map(|t| self.file(t))
            .filter(|f| super::made_by(&f.request, base))
            .collect()
    }

    /// The file versions that name image `id` (registered or not).
    pub fn image_files(&self, id: &str) -> Vec<&FileVersion> {
        self.image_tags
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|t| self.file(t))
            .collect()
    }

    /// Every file version a plan about `paths`, request `base` and image
    /// `image` looks at: the plans of `super` given these instead of
    /// every version answer the same.
    pub fn about(
        &self,
        paths: &[&str],
        base: Option<&str>,
        image: Option<&str>,
    ) -> Vec<FileVersion> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let tags = paths
            .iter()
            .flat_map(|p| self.by_path.get(*p).into_iter().flatten())
            .chain(
                base.map(|b| self.made_by(b))
                    .into_iter()
                    .flatten()
                    .map(|f| &f.tag),
            )
            .chain(
                image
                    .into_iter()
                    .flat_map(|id| self.image_tags.get(id).into_iter().flatten()),
            );
        for t in tags {
            if seen.insert(*t) {
                out.extend(self.file(t).cloned());
            }
        }
        out
    }

    /// The images `key` may name: with that id, that name, or an id it
    /// prefixes (what [`store::resolve`] picks among).
    pub fn matching(&self, key: &str) -> Vec<Found> {
        let mut seen = BTreeSet::new();
        let prefixed = self
            .by_id
            .range::<_, String>((
                std::ops::Bound::Included(key.to_string()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(id, _)| id.starts_with(key))
            .map(|(_, t)| t);
        let named = self.names.get(key).into_iter().flatten();
        prefixed
            .chain(named)
            .filter(|t| seen.insert(**t))
            .filter_map(|t| self.image_of_tag(t))
            .collect()
    }

    /// The images that have name `n`.
    pub fn holders(&self, n: &str) -> Vec<Found> {
        let mut seen = BTreeSet::new();
        self.names
            .get(n)
            .into_iter()
            .flatten()
            .filter(|t| seen.insert(**t))
            .filter_map(|t| self.image_of_tag(t))
            .collect()
    }

    /// Every image name, with the tags of the images that have it.
    pub fn names(&self) -> impl Iterator<Item = (&str, &[TagId])> {
        self.names.iter().map(|(n, t)| (n.as_str(), &t[..]))
    }

    /// What changed after generation `g` for `who`; `None` when this
    /// catalog does not know back that far.
    pub fn since(&self, who: &Identity, g: u64) -> Option<Since> {
        if g < self.floor {
            return None;
        }
        let mut before: StdMap<&str, Option<&ImageRecord>> = StdMap::new();
        for e in self.events.iter().filter(|e| e.generation > g) {
            before.entry(e.id.as_str()).or_insert(e.before.as_deref());
        }
        let mut out = Since::default();
        for (id, was) in before {
            let now = self.image_by_id(id);
            match now {
                Some(i) if glance::listed(who, &i.record) => out.changed.push(self.stamped(i)),
                _ if was.is_some_and(|r| glance::listed(who, r)) => out.removed.push(id.into()),
                _ => {}
            }
        }
        out.removed.sort();
        Some(out)
    }

    fn remove_file(&mut self, t: &TagId) -> Option<FileVersion> {
        let i = self.file_at.remove(t)?;
        let f = swap_remove(&mut self.files, i);
        if let Some(moved) = self.files.get(i) {
            self.file_at.insert(moved.tag, i);
        }
        if let Some(id) = data_owner(&f.path) {
            if let Some(s) = self.data.get_mut(id) {
                s.remove(t);
            }
        }
        forget(&mut self.by_path, &f.path, t);
        forget(&mut self.by_request, request_key(&f.request), t);
        if let Some(id) = &f.image {
            forget(&mut self.image_tags, id, t);
        }
        Some(f)
    }

    fn remove_image(&mut self, t: &TagId) -> Option<Found> {
        let i = self.image_at.remove(t)?;
        let f = swap_remove(&mut self.images, i);
        if let Some(moved) = self.images.get(i) {
            self.image_at.insert(moved.file.tag, i);
        }
        if self.by_id.get(&f.record.id) == Some(t) {
            self.by_id.remove(&f.record.id);
        }
        for n in &f.record.names {
            forget(&mut self.names, n, t);
        }
        Some(f)
    }

    /// Image `id`'s data items and versions, from the files kept.
    pub fn data_of(&self, id: &str) -> (Vec<store::DataItem>, Vec<FileVersion>) {
        let group: Vec<FileVersion> = self
            .data
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|t| self.file_at.get(t).map(|&i| self.files[i].clone()))
            .collect();
        (
            store::data_items(&group, id),
            store::data_versions(&group, id),
        )
    }

    /// Apply `delta`: the changes since this catalog's generation, or
    /// (`changes` false) every file version, which replaces all (nothing
    /// before it is then known one by one).
    pub fn apply(&mut self, d: &DomainRef, delta: FileDelta) -> Result<()> {
        if !delta.changes {
            *self = DomainCatalog::default();
            self.load(d, delta.files, &mut BTreeSet::new())?;
            self.generation = delta.generation;
            self.floor = delta.generation;
            return Ok(());
        }
        // The images the changed tags held or hold, and whose data
        // directories they are in; each as it was.
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let tags = delta
            .removed
            .iter()
            .chain(delta.files.iter().map(|(f, _)| &f.tag));
        for t in tags {
            if let Some(&i) = self.image_at.get(t) {
                touched.insert(self.images[i].record.id.clone());
            }
            if let Some(&i) = self.file_at.get(t) {
                touched.extend(data_owner(&self.files[i].path).map(str::to_string));
            }
        }
        for (f, _) in &delta.files {
            touched.extend(data_owner(&f.path).map(str::to_string));
        }
        let mut before: StdMap<String, Arc<ImageRecord>> = touched
            .iter()
            .filter_map(|id| Some((id.clone(), Arc::new(self.image_by_id(id)?.record.clone()))))
            .collect();
        for t in delta
            .removed
            .iter()
            .chain(delta.files.iter().map(|(f, _)| &f.tag))
        {
            self.remove_image(t);
            self.remove_file(t);
        }
        let mut added = BTreeSet::new();
        self.load(d, delta.files, &mut added)?;
        for id in added {
            if !touched.contains(&id) {
                before.remove(&id);
                touched.insert(id);
            }
        }
        self.generation = delta.generation;
        for id in &touched {
            let (data, data_files) = self.data_of(id);
            if let Some(t) = self.by_id.get(id).copied() {
                let i = self.image_at[&t];
                self.images[i].data = data;
                self.images[i].data_files = data_files;
            }
            self.events.push_back(Event {
                generation: delta.generation,
                id: id.clone(),
                before: before.get(id).cloned(),
            });
        }
        // Forget the oldest generations whole.
        while self.events.len() > MAX_EVENTS {
            let e = self.events.pop_front().expect("not empty");
            self.floor = self.floor.max(e.generation);
        }
        while self
            .events
            .front()
            .is_some_and(|e| e.generation <= self.floor)
        {
            self.events.pop_front();
        }
        Ok(())
    }

    /// Add file versions and their images; the ids of the images they
    /// touch go in `touched`.
    fn load(
        &mut self,
        d: &DomainRef,
        files: Vec<(FileVersion, Vec<u8>)>,
        touched: &mut BTreeSet<String>,
    ) -> Result<()> {
        let mut added = Vec::new();
        for (f, rec) in files {
            if let Some(id) = data_owner(&f.path) {
                self.data.entry(id.to_string()).or_default().insert(f.tag);
                touched.insert(id.to_string());
            }
            if f.image.is_some() && !rec.is_empty() {
                added.push((f.tag, images::decode(&rec)?));
            }
            self.by_path.entry(f.path.clone()).or_default().push(f.tag);
            if !f.request.is_empty() {
                let k = request_key(&f.request).to_string();
                self.by_request.entry(k).or_default().push(f.tag);
            }
            if let Some(id) = &f.image {
                self.image_tags.entry(id.clone()).or_default().push(f.tag);
            }
            self.file_at.insert(f.tag, self.files.len());
            self.files.push_back(f);
        }
        for (t, record) in added {
            let file = self.files[self.file_at[&t]].clone();
            let (data, data_files) = self.data_of(&record.id);
            touched.insert(record.id.clone());
            self.by_id.insert(record.id.clone(), t);
            for n in &record.names {
                self.names.entry(n.clone()).or_default().push(t);
            }
            self.image_at.insert(t, self.images.len());
            self.images.push_back(Found {
                domain: d.clone(),
                generation: 0,
                file,
                record,
                data,
                data_files,
            });
        }
        Ok(())
    }
}

/// Every domain's catalog this coordinator read, by domain id, and each
/// domain's writers' queue.
#[derive(Debug, Default)]
pub struct Indexes {
    by_domain: Mutex<StdMap<uuid::Uuid, Arc<DomainCatalog>>>,
    writers: Mutex<StdMap<uuid::Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

impl Indexes {
    /// Domain `d`'s writers' turn: the catalog changes one coordinator
    /// makes on a domain are planned and committed one at a time, in the
    /// order they asked (each commit raises the generation the others
    /// planned against, so planning them at once only makes all but one
    /// plan again). Changes from other coordinators still race, and are
    /// planned again.
    pub async fn writer_turn(&self, d: &uuid::Uuid) -> tokio::sync::OwnedMutexGuard<()> {
        let q = self
            .writers
            .lock()
            .expect("poisoned")
            .entry(*d)
            .or_default()
            .clone();
        q.lock_owned().await
    }

    fn get(&self, d: &uuid::Uuid) -> Option<Arc<DomainCatalog>> {
        self.by_domain.lock().expect("poisoned").get(d).cloned()
    }

    /// Apply `delta`, read against the catalog at generation `at`, to the
    /// one kept, in place unless a request holds it. When another reader
    /// already brought the one kept to the delta's generation or beyond,
    /// that one is as fresh as this read: it is the answer. `None` when the
    /// one kept moved elsewhere (read the changes again).
    pub(super) fn update(
        &self,
        d: &DomainRef,
        at: Option<u64>,
        delta: FileDelta,
    ) -> Result<Option<Arc<DomainCatalog>>> {
        let mut m = self.by_domain.lock().expect("poisoned");
        let mut cat = match m.remove(&d.id) {
            Some(k) if Some(k.generation) == at => k,
            Some(k) if delta.changes && k.generation >= delta.generation => {
                m.insert(d.id, k.clone());
                return Ok(Some(k));
            }
            Some(k) if !delta.changes && k.generation <= delta.generation => {
                Arc::new(DomainCatalog::default())
            }
            Some(k) => {
                m.insert(d.id, k);
                return Ok(None);
            }
            None if at.is_none() || !delta.changes => Arc::new(DomainCatalog::default()),
            None => return Ok(None),
        };
        Arc::make_mut(&mut cat).apply(d, delta)?;
        m.insert(d.id, cat.clone());
        Ok(Some(cat))
    }

    /// Keep `c` unless a newer one was kept meanwhile; the one kept.
    fn put(&self, d: uuid::Uuid, c: Arc<DomainCatalog>) -> Arc<DomainCatalog> {
        let mut m = self.by_domain.lock().expect("poisoned");
        match m.get(&d) {
            Some(old) if old.generation > c.generation => old.clone(),
            _ => {
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
        for _ in 0..8 {
            let kept = self.catalogs.get(&d.id);
            let at = kept.as_ref().map(|k| k.generation);
            let delta = c.file_delta(&d.id, at).await?;
            if let Some(k) = kept {
                if delta.changes && delta.generation == k.generation {
                    return Ok(k);
                }
            }
            if let Some(c) = self.catalogs.update(d, at, delta)? {
                return Ok(c);
            }
        }
        // Others kept changing it: one whole listing, kept if newest.
        let delta = c.file_delta(&d.id, None).await?;
        let mut fresh = DomainCatalog::default();
        fresh.apply(d, delta)?;
        Ok(self.catalogs.put(d.id, Arc::new(fresh)))
    }
}
