//! Carrying out the image store's requests (seed 004): names taken from
//! the images that had them, data items kept as files beside the image,
//! and the administrator's wipe.

use std::collections::HashMap;

use cairn_proto::auth::{Identity, Role};
use tokio_stream::Stream;

use super::files::Upload;
use super::image_ops::Found;
use super::images::{self, ImageRecord};
use super::store::{self, DataItem};
use super::{base_rid, busy, domain_name, moved, Location, TRIES};
use crate::agents::Chunks;
use crate::coordinator::{now, Coordinator};
use crate::error::{CoordError, Result};
use crate::runner::check_request_id;

/// A data item upload as the service hands it over.
#[derive(Debug, Clone, Default)]
pub struct DataUpload {
    /// The caller's request id (empty: none).
    pub request_id: String,
    /// The image: an id, a name, or an id prefix.
    pub image: String,
    /// The item's key.
    pub key: String,
    /// The bytes to come.
    pub size: u64,
    /// Their SHA-256 as the caller says (hex; empty: not checked).
    pub sha256: String,
}

impl Coordinator {
    /// Give image `key` exactly `names`, taking each from the image that
    /// had it (which `who` must be allowed to change). Images that lose a
    /// name are changed first: a crash between leaves a name on no image,
    /// never on two.
    pub async fn set_image_names(
        &self,
        who: &Identity,
        request_id: &str,
        key: &str,
        names: &[String],
    ) -> Result<Found> {
        check_request_id(request_id)?;
        self.catalog_writable()?;
        let base = base_rid("names", who, request_id);
        let _turn = self.image_writer_turn(who, key).await?;
        'plan: for attempt in 0..TRIES {
            let (target, all) = self.find_image(who, key).await?;
            images::may_change(who, &target.record)?;
            let records: Vec<&ImageRecord> = all.iter().map(|i| &i.record).collect();
            let t = all
                .iter()
                .position(|i| i.record.id == target.record.id)
                .expect("the target is among all images");
            let (names, losers) = store::plan_names(&records, t, names)?;
            for (i, _) in &losers {
                let r = &all[*i].record;
                if !who.may_act_on(Some(&r.owner)) {
                    return Err(CoordError::Denied(format!(
                        "a name asked for is image {}'s, of another owner",
                        r.id
                    )));
                }
            }
            if losers.is_empty() && names == target.record.names {
                return Ok(target);
            }
            // Each commit raises its domain's generation by one.
            let mut gens: HashMap<uuid::Uuid, u64> =
                all.iter().map(|i| (i.domain.id, i.generation)).collect();
            let mut put = |i: &Found, rec: ImageRecord, n: usize| {
                let g = gens.get_mut(&i.domain.id).expect("a known domain");
                let at = Found {
                    generation: *g,
                    ..i.clone()
                };
                *g += 1;
                (at, rec, format!("{base}.{attempt}.{n}"))
            };
            let mut steps = Vec::new();
            for (n, (i, kept)) in losers.into_iter().enumerate() {
                let rec = ImageRecord {
                    names: kept,
                    updated_at: now(),
                    ..all[i].record.clone()
                };
                steps.push(put(&all[i], rec, n + 1));
            }
            let rec = ImageRecord {
                names,
                updated_at: now(),
                ..target.record.clone()
            };
            steps.push(put(&target, rec, 0));
            let mut last = None;
            for (at, rec, rid) in steps {
                match self.put_record(&at, &rec, &rid).await {
                    Ok(file) => last = Some((at, rec, file)),
                    Err(e) if moved(&e) => continue 'plan,
                    Err(e) => return Err(e),
                }
            }
            let (at, record, file) = last.expect("the target's step");
            return Ok(Found {
                generation: at.generation + 1,
                file,
                record,
                ..at
            });
        }
        Err(busy(&format!("image {key}")))
    }

    /// Keep data item `up.key` of image `up.image`: `data` yields its
    /// bytes. The image, the item, and whether this request made it.
    pub async fn set_image_data<S>(
        &self,
        who: &Identity,
        up: &DataUpload,
        data: S,
    ) -> Result<(Found, DataItem, bool)>
    where
        S: Stream<Item = Result<Vec<u8>>> + Send + Unpin + 'static,
    {
        check_request_id(&up.request_id)?;
        self.catalog_writable()?;
        store::check_key(&up.key)?;
        super::files::check_sha(&up.sha256)?;
        let i = self.get_image(who, &up.image).await?;
        images::may_change(who, &i.record)?;
        let loc = Location {
            owner: Some(i.record.owner.clone()),
            domain: domain_name(&i.domain),
            path: store::data_path(&i.record.id, &up.key),
        };
        let file_up = Upload {
            request_id: up.request_id.clone(),
            location: String::new(),
            size: up.size,
            sha256: up.sha256.clone(),
            directory: false,
        };
        let (f, created) = self.upload_to(who, &file_up, &loc, &i.domain, data).await?;
        let item = DataItem {
            key: up.key.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
            file: f,
        };
        Ok((i, item, created))
    }

    /// Data item `key` of image `image`, and its bytes.
    pub async fn get_image_data(
        &self,
        who: &Identity,
        image: &str,
        key: &str,
    ) -> Result<(Found, DataItem, Chunks)> {
        store::check_key(key)?;
        let i = self.get_image(who, image).await?;
        let item = item_of(&i, key)?;
        let c = self.catalog_agent(&i.domain).await?;
        let chunks = c.read_file(&i.domain.id, &item.file.tag).await?;
        Ok((i, item, chunks))
    }

    /// Remove data item `key` of image `image` (every version of its file).
    pub async fn remove_image_data(
        &self,
        who: &Identity,
        request_id: &str,
        image: &str,
        key: &str,
    ) -> Result<()> {
        check_request_id(request_id)?;
        self.catalog_writable()?;
        store::check_key(key)?;
        let base = base_rid("data", who, request_id);
        let _turn = self.image_writer_turn(who, image).await?;
        for attempt in 0..TRIES {
            let i = self.get_image(who, image).await?;
            images::may_change(who, &i.record)?;
            let item = item_of(&i, key)?;
            let tags: Vec<_> = i
                .data_files
                .iter()
                .filter(|f| f.path == item.file.path)
                .map(|f| f.tag)
                .collect();
            let c = self.catalog_agent(&i.domain).await?;
            let rid = format!("{base}.{attempt}");
            match c
                .delete_files(&rid, &i.domain.id, &tags, i.generation)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if moved(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(busy(&format!("image {image}")))
    }

    /// Unregister every image of domain `domain` (every domain when
    /// empty), with their data items; no image file is deleted. Admin
    /// only. The ids unregistered.
    pub async fn wipe_images(
        &self,
        who: &Identity,
        request_id: &str,
        domain: &str,
    ) -> Result<Vec<String>> {
        check_request_id(request_id)?;
        self.catalog_writable()?;
        if who.role != Role::Admin {
            return Err(CoordError::Denied(format!(
                "{} may not wipe the catalog: only an admin may",
                who.name
            )));
        }
        let doms = if domain.is_empty() {
            self.all_domains().await?
        } else {
            vec![self.domain(domain).await?]
        };
        let base = base_rid("wipe", who, request_id);
        let mut gone = Vec::new();
        for d in doms {
            let c = self.catalog_agent(&d).await?;
            let _turn = self.catalogs.writer_turn(&d.id).await;
            let mut tries = 0;
            'domain: loop {
                let found = self.images_on(&c, &d).await?;
                if found.is_empty() {
                    break;
                }
                tries += 1;
                if tries > TRIES {
                    return Err(busy(&format!("domain {}", domain_name(&d))));
                }
                let mut generation = found[0].generation;
                for i in found {
                    let rid = format!("{base}.{}.{tries}", i.record.id);
                    let at = Found { generation, ..i };
                    match self.drop_image(&at, &rid).await {
                        Ok(()) => {
                            generation += 1;
                            gone.push(at.record.id);
                        }
                        Err(e) if moved(&e) => continue 'domain,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(gone)
    }
}

/// Data item `key` of image `i`.
fn item_of(i: &Found, key: &str) -> Result<DataItem> {
    i.data
        .iter()
        .find(|d| d.key == key)
        .cloned()
        .ok_or_else(|| CoordError::NotFound {
            kind: "data item",
            id: format!("{key} of image {}", i.record.id),
        })
}

impl Coordinator {
    /// Member `who` of shared image `key` answers `status`.
    pub async fn set_member_status(
        &self,
        who: &Identity,
        request_id: &str,
        key: &str,
        status: &str,
    ) -> Result<Found> {
        check_request_id(request_id)?;
        self.catalog_writable()?;
        super::glance::check_status(status)?;
        let base = base_rid("member", who, request_id);
        self.rewrite_image(who, &base, key, |r| {
            if !super::glance::member(who, r) {
                return Err(CoordError::FailedPrecondition(format!(
                    "{} is not a member of image {}",
                    who.name, r.id
                )));
            }
            let mut rec = r.clone();
            rec.members.insert(who.name.clone(), status.to_string());
            rec.updated_at = now();
            Ok(rec)
        })
        .await
    }
}
