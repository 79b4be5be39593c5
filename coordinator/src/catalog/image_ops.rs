//! Carrying out image requests: find images in the domains' listings,
//! decide with [`super::images`], and commit on the image's domain
//! expecting the listing's generation (planned again when it moved).

use std::collections::HashMap;

use cairn_domain::catalog::{check_path, FileVersion};
use cairn_domain::TagId;
use cairn_proto::auth::Identity;

use super::glance;
use super::images::{self, Change, ImageRecord, Register};
use super::store::{self, DataItem};
use super::{base_rid, busy, domain_name, file_versions, moved, versions_of, Location, TRIES};
use crate::agents::{AgentConn, ImageSet};
use crate::coordinator::{now, Coordinator};
use crate::error::{CoordError, Result};
use crate::plan::DomainRef;
use crate::runner::check_request_id;

/// An image where it was found.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its domain.
    pub domain: DomainRef,
    /// The catalog generation it was read at.
    pub generation: u64,
    /// The file version it is registered from.
    pub file: FileVersion,
    /// Its record.
    pub record: ImageRecord,
    /// Its data items, by key.
    pub data: Vec<DataItem>,
    /// Every file version under its data directory.
    pub data_files: Vec<FileVersion>,
}

/// Every domain with its catalog.
pub type Catalogs = Vec<(DomainRef, std::sync::Arc<super::index::DomainCatalog>)>;

/// What [`Coordinator::list_images`] answers.
#[derive(Debug, Clone, Default)]
pub struct ImageListing {
    /// The images, by name.
    pub images: Vec<Found>,
    /// What a read-only catalog could not repair.
    pub problems: Vec<String>,
    /// Every domain, its generation, and whether only its changes are
    /// listed.
    pub domains: Vec<(DomainRef, u64, bool)>,
    /// Images removed since, of the domains whose changes are listed.
    pub removed: Vec<String>,
}

/// What a registration made: the image, and its metafile if one was
/// written.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The image.
    pub image: Found,
    /// The metafile version written.
    pub metafile: Option<FileVersion>,
}

impl Coordinator {
    /// Refuse a change to a read-only catalog.
    pub(crate) fn catalog_writable(&self) -> Result<()> {
        if self.cfg.read_only {
            return Err(CoordError::FailedPrecondition(
                "catalog is read-only".into(),
            ));
        }
        Ok(())
    }

    /// The images of domain `d`, read through `c`.
    pub(super) async fn images_on(&self, c: &AgentConn, d: &DomainRef) -> Result<Vec<Found>> {
        Ok(self.catalog_of(c, d).await?.images())
    }

    /// Every image of every domain, and the names given twice that were
    /// not repaired (see [`Coordinator::catalogs`]).
    pub(super) async fn all_images(&self) -> Result<(Vec<Found>, Vec<String>)> {
        let (cats, problems) = self.catalogs().await?;
        Ok((
            cats.iter().flat_map(|(_, c)| c.images()).collect(),
            problems,
        ))
    }

    /// Every domain's catalog, and the names given twice that were not
    /// repaired (a read-only catalog reports them; a writable one takes
    /// each name from all but the image that changed last).
    pub(super) async fn catalogs(&self) -> Result<(Catalogs, Vec<String>)> {
        for _ in 0..TRIES {
            let cats = self.domain_catalogs(None).await?;
            if !names_given_twice(&cats) {
                return Ok((cats, Vec::new()));
            }
            let out: Vec<Found> = cats.iter().flat_map(|(_, c)| c.images()).collect();
            let records: Vec<&ImageRecord> = out.iter().map(|i| &i.record).collect();
            let dups = store::duplicates(&records);
            if dups.is_empty() {
                return Ok((cats, Vec::new()));
            }
            if self.cfg.read_only {
                let problems = dups
                    .iter()
                    .map(|(n, h)| {
                        let ids: Vec<&str> = h.iter().map(|&i| out[i].record.id.as_str()).collect();
                        format!("name {n:?} is given to images {}", ids.join(", "))
                    })
                    .collect();
                return Ok((cats, problems));
            }
            let fixes: Vec<(Found, Vec<String>)> = store::repairs(&records)
                .into_iter()
                .map(|(i, names)| (out[i].clone(), names))
                .collect();
            for (i, names) in fixes {
                tracing::warn!(image = %i.record.id, kept = ?names, "repairing a name given to two images");
                let rec = ImageRecord {
                    names,
                    ..i.record.clone()
                };
                match self
                    .put_record(&i, &rec, &format!("repair-{}", uuid::Uuid::new_v4()))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if moved(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Err(busy("every domain"))
    }

    /// Write `rec` as image `i`'s record (planned at `i.generation`).
    pub(super) async fn put_record(
        &self,
        i: &Found,
        rec: &ImageRecord,
        rid: &str,
    ) -> Result<FileVersion> {
        let c = self.catalog_agent(&i.domain).await?;
        let record = images::encode(rec);
        let set = ImageSet {
            image: Some((rec.id.as_str(), &record[..])),
            ..Default::default()
        };
        let (file, _) = c
            .set_file_image(rid, &i.domain.id, &i.file.tag, &set, i.generation)
            .await?;
        Ok(file)
    }

    /// The images `who` may list (of `owner` only, when given), by name:
    /// of a domain named in `since` (by id or name) whose kept catalog
    /// knows back that far, only those changed after that generation, and
    /// the ids of those removed.
    pub async fn list_images(
        &self,
        who: &Identity,
        owner: &str,
        since: &HashMap<String, u64>,
    ) -> Result<ImageListing> {
        let (cats, problems) = self.catalogs().await?;
        for k in since.keys() {
            if !cats
                .iter()
                .any(|(d, _)| d.id.to_string() == *k || d.name == *k)
            {
                return Err(CoordError::invalid(
                    "since",
                    format!("no domain {}", cairn_domain::limits::quote(k)),
                ));
            }
        }
        let mut out = ImageListing {
            problems,
            ..Default::default()
        };
        let mine = |i: &Found| owner.is_empty() || i.record.owner == owner;
        for (d, cat) in cats {
            let asked = since.get(&d.id.to_string()).or(since.get(&d.name));
            let part = asked.and_then(|&g| cat.since(who, g));
            out.domains.push((d, cat.generation, part.is_some()));
            match part {
                Some(s) => {
                    out.images.extend(s.changed.into_iter().filter(mine));
                    out.removed.extend(s.removed);
                }
                None => out.images.extend(
                    cat.images()
                        .into_iter()
                        .filter(|i| glance::listed(who, &i.record))
                        .filter(mine),
                ),
            }
        }
        out.images
            .sort_by(|a, b| (&a.record.name, &a.record.id).cmp(&(&b.record.name, &b.record.id)));
        Ok(out)
    }

    /// The image `key` (an id, a name, or an id prefix) names among those
    /// `who` may see, and every image.
    pub(super) async fn find_image(
        &self,
        who: &Identity,
        key: &str,
    ) -> Result<(Found, Vec<Found>)> {
        let (all, _) = self.all_images().await?;
        let seen: Vec<&Found> = all
            .iter()
            .filter(|i| images::visible(who, &i.record))
            .collect();
        let records: Vec<&ImageRecord> = seen.iter().map(|i| &i.record).collect();
        let found = seen[store::resolve(&records, key)?].clone();
        Ok((found, all))
    }

    /// Every domain's catalog, refreshed, but that of `except`.
    async fn domain_catalogs(&self, except: Option<&uuid::Uuid>) -> Result<Catalogs> {
        let mut cats = Vec::new();
        for d in self.all_domains().await? {
            if Some(&d.id) != except {
                let c = self.catalog_agent(&d).await?;
                let cat = self.catalog_of(&c, &d).await?;
                cats.push((d, cat));
            }
        }
        Ok(cats)
    }

    /// The writers' turn of the domain of image `key` (see
    /// [`Indexes::writer_turn`](super::index::Indexes::writer_turn)).
    pub(super) async fn image_writer_turn(
        &self,
        who: &Identity,
        key: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>> {
        let d = self.get_image(who, key).await?.domain.id;
        Ok(self.catalogs.writer_turn(&d).await)
    }

    /// Image `key` (an id, a name, or an id prefix), if `who` may see it
    /// (as [`Self::find_image`], from the kept catalogs' indexes).
    pub async fn get_image(&self, who: &Identity, key: &str) -> Result<Found> {
        let (cats, _) = self.catalogs().await?;
        let seen: Vec<Found> = cats
            .iter()
            .flat_map(|(_, c)| c.matching(key))
            .filter(|i| images::visible(who, &i.record))
            .collect();
        let records: Vec<&ImageRecord> = seen.iter().map(|i| &i.record).collect();
        let at = store::resolve(&records, key)?;
        Ok(seen.into_iter().nth(at).expect("resolved among them"))
    }

    /// Refuse record `rec` (to be registered from file version `latest`
    /// on domain `d`, whose catalog is `cat`) when another image has its
    /// id or one of its names.
    async fn check_unique(
        &self,
        d: &DomainRef,
        cat: &super::index::DomainCatalog,
        latest: &FileVersion,
        rec: &ImageRecord,
    ) -> Result<()> {
        let dup_id = || CoordError::AlreadyExists(format!("image id {} is taken", rec.id));
        if cat.image_files(&rec.id).iter().any(|f| f.tag != latest.tag) {
            return Err(dup_id());
        }
        // The other domains' catalogs, refreshed; this one's is `cat`.
        let others = self.domain_catalogs(Some(&d.id)).await?;
        if others
            .iter()
            .any(|(_, c)| !c.image_files(&rec.id).is_empty())
        {
            return Err(dup_id());
        }
        let holders: Vec<Found> = std::iter::once(cat)
            .chain(others.iter().map(|(_, c)| &**c))
            .flat_map(|c| rec.names.iter().flat_map(|n| c.holders(n)))
            .filter(|i| i.file.tag != latest.tag || i.domain.id != d.id)
            .collect();
        let records: Vec<&ImageRecord> = holders.iter().map(|i| &i.record).collect();
        store::check_names_free(&records, &rec.id, &rec.names)
    }

    /// The virtual size of the disk image in file version `f`, from its
    /// first bytes ([`glance::virtual_size`]).
    async fn virtual_size(
        &self,
        c: &AgentConn,
        d: &DomainRef,
        f: &FileVersion,
        disk_format: &str,
    ) -> Result<u64> {
        let mut head = Vec::new();
        if f.size >= 32 && !f.directory && glance::needs_head(disk_format) {
            let mut s = c
                .read_file_part(&d.id, &f.tag, glance::HEAD.min(f.size))
                .await?;
            let failed = |status| CoordError::Agent {
                host: c.host.clone(),
                status,
            };
            while let Some(chunk) = s.message().await.map_err(failed)? {
                head.extend_from_slice(&chunk.data);
            }
        }
        Ok(glance::virtual_size(&head, f.size, disk_format))
    }

    /// Register an image from the latest version of the file at
    /// `location`, writing its metafile beside it unless `no_metafile`
    /// (refused when one exists, unless `force`).
    pub async fn register_image(
        &self,
        who: &Identity,
        request_id: &str,
        location: &str,
        req: &Register,
        force: bool,
        no_metafile: bool,
    ) -> Result<Registered> {
        check_request_id(request_id)?;
        self.catalog_writable()?;
        let loc = Location::parse(location)?;
        let path = loc.file_path()?.to_string();
        store::check_not_reserved(&path)?;
        if !req.id.is_empty() {
            store::check_given_id(&req.id)?;
        }
        let meta_path = format!("{path}.meta");
        if !no_metafile {
            check_path(&meta_path)?;
        }
        let d = self.domain(&loc.domain).await?;
        let dname = domain_name(&d);
        let c = self.catalog_agent(&d).await?;
        let base = base_rid("img", who, request_id);
        let _turn = self.catalogs.writer_turn(&d.id).await;
        for attempt in 0..TRIES {
            // Planning needs the files, not the other images' records.
            let l = self.catalog_of(&c, &d).await?;
            let generation = l.generation;
            // A retry of a registration that wrote its metafile: its answer.
            if let Some(m) = l.made_by(&base).first() {
                let image = l
                    .versions(&path)
                    .iter()
                    .find_map(|f| l.image_of_tag(&f.tag));
                if let Some(i) = image {
                    return Ok(Registered {
                        image: i,
                        metafile: Some((*m).clone()),
                    });
                }
            }
            // The versions the plan looks at.
            let all = &l.about(&[&path, &meta_path], None, None)[..];
            let versions = file_versions(who, &loc, all)?;
            let latest = versions.last().copied().expect("one version at least");
            if req.version.is_some_and(|v| v != latest.tag) {
                return Err(CoordError::FailedPrecondition(format!(
                    "{dname}:{path} got a newer version than the one to register"
                )));
            }
            let full = Location::full(&latest.owner, &dname, &path);
            let mut rec = images::plan_register(who, latest, &full, &d.id, req, now())?;
            self.check_unique(&d, &l, latest, &rec).await?;
            // Registering over a protected image would clear it.
            if let Some(old) = l.image_of_tag(&latest.tag) {
                glance::check_unprotected(&old.record)?;
            }
            rec.virtual_size = self.virtual_size(&c, &d, latest, &rec.disk_format).await?;
            let body = images::metafile(&rec);
            if !no_metafile {
                let existing = versions_of(all, &meta_path);
                if let Some(m) = existing.last() {
                    if !force {
                        return Err(CoordError::FailedPrecondition(format!(
                            "Metadata file {dname}:{meta_path} already exists"
                        )));
                    }
                    if m.owner != rec.owner {
                        return Err(CoordError::Denied(format!(
                            "{dname}:{meta_path} belongs to another owner"
                        )));
                    }
                    if let Some(image) = &m.image {
                        return Err(CoordError::FailedPrecondition(format!(
                            "{dname}:{meta_path} holds registered image {image}"
                        )));
                    }
                }
            }
            // A registration under another id leaves the old id's data.
            let drop = match &latest.image {
                Some(old) if *old != rec.id => store::tags(&l.data_of(old).1),
                _ => Vec::new(),
            };
            let record = images::encode(&rec);
            let set = ImageSet {
                image: Some((&rec.id, &record)),
                metafile: (!no_metafile)
                    .then(|| (meta_path.as_str(), rec.owner.as_str(), &body[..])),
                drop: &drop,
            };
            let rid = format!("{base}.{attempt}");
            match c
                .set_file_image(&rid, &d.id, &latest.tag, &set, generation)
                .await
            {
                Ok((file, metafile)) => {
                    let kept = |t: &TagId| !drop.contains(t);
                    let (data, data_files) = l.data_of(&rec.id);
                    return Ok(Registered {
                        image: Found {
                            domain: d.clone(),
                            generation: generation + 1,
                            file,
                            data: data.into_iter().filter(|x| kept(&x.file.tag)).collect(),
                            data_files: data_files.into_iter().filter(|f| kept(&f.tag)).collect(),
                            record: rec,
                        },
                        metafile,
                    });
                }
                Err(e) if moved(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(busy(&format!("domain {dname}")))
    }

    /// Change image `id` as `change` says.
    pub async fn update_image(
        &self,
        who: &Identity,
        request_id: &str,
        id: &str,
        change: &Change,
    ) -> Result<Found> {
        check_request_id(request_id)?;
        self.catalog_writable()?;
        let base = base_rid("img", who, request_id);
        self.rewrite_image(who, &base, id, |r| {
            images::may_change(who, r)?;
            images::plan_change(r, change, now())
        })
        .await
    }

    /// Write the record `plan` makes of image `key`'s (as `who` sees
    /// it), planned again when the catalog moved; agent request ids are
    /// `base.ATTEMPT`.
    pub(super) async fn rewrite_image(
        &self,
        who: &Identity,
        base: &str,
        key: &str,
        plan: impl Fn(&ImageRecord) -> Result<ImageRecord>,
    ) -> Result<Found> {
        let _turn = self.image_writer_turn(who, key).await?;
        for attempt in 0..TRIES {
            let i = self.get_image(who, key).await?;
            let rec = plan(&i.record)?;
            match self
                .put_record(&i, &rec, &format!("{base}.{attempt}"))
                .await
            {
                Ok(file) => {
                    return Ok(Found {
                        generation: i.generation + 1,
                        file,
                        record: rec,
                        ..i
                    })
                }
                Err(e) if moved(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(busy(&format!("image {key}")))
    }

    /// Unregister image `i` (its data items go with it; its file stays).
    pub(super) async fn drop_image(&self, i: &Found, rid: &str) -> Result<()> {
        let c = self.catalog_agent(&i.domain).await?;
        let drop = store::tags(&i.data_files);
        let set = ImageSet {
            drop: &drop,
            ..Default::default()
        };
        c.set_file_image(rid, &i.domain.id, &i.file.tag, &set, i.generation)
            .await?;
        Ok(())
    }

    /// Unregister image `id`; its file stays, its data items do not.
    pub async fn unregister_image(&self, who: &Identity, request_id: &str, id: &str) -> Result<()> {
        check_request_id(request_id)?;
        self.catalog_writable()?;
        let base = base_rid("img", who, request_id);
        let _turn = self.image_writer_turn(who, id).await?;
        for attempt in 0..TRIES {
            let i = self.get_image(who, id).await?;
            images::may_change(who, &i.record)?;
            glance::check_unprotected(&i.record)?;
            match self.drop_image(&i, &format!("{base}.{attempt}")).await {
                Ok(()) => {
                    drop(_turn);
                    self.reclaim_image_caches_everywhere().await;
                    return Ok(());
                }
                Err(e) if moved(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(busy(&format!("image {id}")))
    }
}

/// Whether a name is on more than one image of `cats` (from their names
/// indexes: a look at every image only when one is).
fn names_given_twice(cats: &Catalogs) -> bool {
    let mut holders: HashMap<&str, usize> = HashMap::new();
    for (_, c) in cats {
        for (n, tags) in c.names() {
            let k = holders.entry(n).or_default();
            *k += tags.len();
            if *k > 1 {
                return true;
            }
        }
    }
    false
}
