//! Carrying out image requests: find images in the domains' listings,
//! decide with [`super::images`], and commit on the image's domain
//! expecting the listing's generation (planned again when it moved).

use cairn_domain::catalog::{check_path, FileVersion};
use cairn_proto::auth::Identity;

use super::images::{self, Change, ImageRecord, Register};
use super::{
    base_rid, busy, domain_name, file_versions, made_by, moved, versions_of, Location, TRIES,
};
use crate::agents::AgentConn;
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
    /// The images of domain `d`, read through `c`.
    async fn images_on(&self, c: &AgentConn, d: &DomainRef) -> Result<(u64, Vec<Found>)> {
        let (generation, files) = c.list_images(&d.id).await?;
        let mut out = Vec::new();
        for (f, rec) in files {
            if f.image.is_none() || rec.is_empty() {
                continue;
            }
            out.push(Found {
                domain: d.clone(),
                generation,
                record: images::decode(&rec)?,
                file: f,
            });
        }
        Ok((generation, out))
    }

    /// Every image of every domain.
    async fn all_images(&self) -> Result<Vec<Found>> {
        let mut out = Vec::new();
        for d in self.all_domains().await? {
            let c = self.catalog_agent(&d).await?;
            out.extend(self.images_on(&c, &d).await?.1);
        }
        Ok(out)
    }

    /// The images `who` may see (of `owner` only, when given), by name.
    pub async fn list_images(&self, who: &Identity, owner: &str) -> Result<Vec<Found>> {
        let mut v: Vec<Found> = self
            .all_images()
            .await?
            .into_iter()
            .filter(|i| images::visible(who, &i.record))
            .filter(|i| owner.is_empty() || i.record.owner == owner)
            .collect();
        v.sort_by(|a, b| (&a.record.name, &a.record.id).cmp(&(&b.record.name, &b.record.id)));
        Ok(v)
    }

    /// Image `id`, if `who` may see it.
    pub async fn get_image(&self, who: &Identity, id: &str) -> Result<Found> {
        if id.is_empty() {
            return Err(CoordError::invalid("image_id", "is required"));
        }
        self.all_images()
            .await?
            .into_iter()
            .find(|i| i.record.id == id && images::visible(who, &i.record))
            .ok_or_else(|| CoordError::NotFound {
                kind: "image",
                id: id.to_string(),
            })
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
        let loc = Location::parse(location)?;
        let path = loc.file_path()?.to_string();
        let meta_path = format!("{path}.meta");
        if !no_metafile {
            check_path(&meta_path)?;
        }
        let d = self.domain(&loc.domain).await?;
        let dname = domain_name(&d);
        let c = self.catalog_agent(&d).await?;
        let base = base_rid("img", who, request_id);
        for attempt in 0..TRIES {
            // Planning needs the files, not the other images' records.
            let l = c.list_files(&d.id).await?;
            let (generation, all) = (l.generation, l.files);
            // A retry of a registration that wrote its metafile: its answer.
            if let Some(m) = all.iter().find(|f| made_by(&f.request, &base)) {
                let (_, found) = self.images_on(&c, &d).await?;
                if let Some(i) = found.into_iter().find(|i| i.file.path == path) {
                    return Ok(Registered {
                        image: i,
                        metafile: Some(m.clone()),
                    });
                }
            }
            let versions = file_versions(who, &loc, &all)?;
            let latest = versions.last().copied().expect("one version at least");
            let full = Location::full(&latest.owner, &dname, &path);
            let rec = images::plan_register(who, latest, &full, &d.id, req, now())?;
            let body = images::metafile(&rec);
            if !no_metafile {
                let existing = versions_of(&all, &meta_path);
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
            let meta = (!no_metafile).then(|| (meta_path.as_str(), rec.owner.as_str(), &body[..]));
            let record = images::encode(&rec);
            let rid = format!("{base}.{attempt}");
            let done = c
                .set_file_image(
                    &rid,
                    &d.id,
                    &latest.tag,
                    Some((&rec.id, &record)),
                    meta,
                    generation,
                )
                .await;
            match done {
                Ok((file, metafile)) => {
                    return Ok(Registered {
                        image: Found {
                            domain: d.clone(),
                            generation: generation + 1,
                            file,
                            record: rec,
                        },
                        metafile,
                    })
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
        let base = base_rid("img", who, request_id);
        for attempt in 0..TRIES {
            let i = self.get_image(who, id).await?;
            images::may_change(who, &i.record)?;
            let rec = images::plan_change(&i.record, change, now())?;
            let c = self.catalog_agent(&i.domain).await?;
            let record = images::encode(&rec);
            let rid = format!("{base}.{attempt}");
            let image = Some((rec.id.as_str(), &record[..]));
            match c
                .set_file_image(&rid, &i.domain.id, &i.file.tag, image, None, i.generation)
                .await
            {
                Ok((file, _)) => {
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
        Err(busy(&format!("image {id}")))
    }

    /// Unregister image `id`; its file stays.
    pub async fn unregister_image(&self, who: &Identity, request_id: &str, id: &str) -> Result<()> {
        check_request_id(request_id)?;
        let base = base_rid("img", who, request_id);
        for attempt in 0..TRIES {
            let i = self.get_image(who, id).await?;
            images::may_change(who, &i.record)?;
            let c = self.catalog_agent(&i.domain).await?;
            let rid = format!("{base}.{attempt}");
            match c
                .set_file_image(&rid, &i.domain.id, &i.file.tag, None, None, i.generation)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if moved(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(busy(&format!("image {id}")))
    }
}
