//! A disk made from an image: a thin qcow2 layer, made in one
//! transaction, on the image's base. The base is the file version the
//! image is registered from when that file is on the disk's domain and its
//! bytes are a disk's (a raw image). Otherwise it is the domain's *image
//! cache*: a copy of the file made once per domain (converted from qcow2,
//! its header judged from its bytes first) by the job's first step, and
//! reused by every later disk of that image on that domain. A cache is a
//! strong, immutable tag of kind `image-cache` (no disk, no file); the
//! leader removes it once its image is no longer registered from that
//! file version and no disk hangs from it.
//!
//! Both steps run under one lock named after the domain and the base, so
//! two jobs never make two caches of one base and the leader never removes
//! a cache a job is about to use.

use cairn_domain::api::TagSpec;
use cairn_domain::{Format, Strategy, TagState, TagType, VolumeId};

use super::prelude::*;
use super::{check_label, options};
use crate::plan::{DomainRef, TagInfo, WIPE_KEY};
use cairn_proto::keys::{
    CACHE_BASE, CACHE_DOMAIN, CACHE_IMAGE, CACHE_JOB, FROM_IMAGE, KIND_IMAGE_CACHE,
};

/// What a disk from an image asks for, with the image resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FromImage {
    /// The domain the disk goes to.
    pub domain: uuid::Uuid,
    /// The image's id.
    pub image: String,
    /// The domain of the image's file.
    pub image_domain: uuid::Uuid,
    /// The file version's tag.
    pub base: TagId,
    /// The file version's volume.
    pub base_volume: VolumeId,
    /// What the file's bytes are: a raw disk or a qcow2 image.
    pub image_format: Format,
    /// The disk's virtual size in bytes (at least the image's).
    pub size: u64,
    /// The disk's name.
    #[serde(default)]
    pub name: String,
    /// The disk's description.
    #[serde(default)]
    pub description: String,
    /// Wipe its data when it is deleted.
    #[serde(default)]
    pub wipe_after_delete: bool,
}

impl FromImage {
    /// Whether the disk needs the domain's cache of the image: its file is
    /// on another domain, or its bytes are an image rather than a disk.
    pub fn needs_cache(&self) -> bool {
        needs_cache(&self.image_domain, &self.domain, self.image_format)
    }

    fn cache_spec(&self, job: &str) -> TagSpec {
        TagSpec {
            size: 0,
            mutable: false,
            strategy: Strategy::Chain,
            options: cache_options(self, job),
            tag_type: TagType::Strong,
            state: TagState::Optimized,
        }
    }
}

/// What a disk from an image asks for besides the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ask {
    /// Its virtual size; 0: the image's (or its min_disk, when larger).
    pub size: u64,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Wipe its data when it is deleted.
    pub wipe_after_delete: bool,
}

/// The job that makes a disk on `domain` from `image` (registered from
/// file version `file` on `image_domain`), or why none can be made.
pub fn plan_from_image(
    domain: uuid::Uuid,
    image_domain: uuid::Uuid,
    image: &crate::catalog::images::ImageRecord,
    file: &cairn_domain::catalog::FileVersion,
    ask: &Ask,
) -> Result<FromImage> {
    let refuse = |why: String| CoordError::FailedPrecondition(format!("image {} {why}", image.id));
    if file.directory {
        return Err(refuse(
            "is registered from a directory marker, not a disk image".into(),
        ));
    }
    if file.inline {
        return Err(refuse(format!(
            "holds only {} bytes, too few for a disk image",
            file.size
        )));
    }
    let (format, image_size) = match image.disk_format.as_str() {
        "raw" => (Format::Raw, file.size.div_ceil(512) * 512),
        "qcow2" => (Format::Qcow2, image.virtual_size.div_ceil(512) * 512),
        f => {
            return Err(refuse(format!(
                "has disk format {f:?}; disks are made from raw and qcow2 images"
            )))
        }
    };
    let min = image.min_disk.saturating_mul(1 << 30);
    let size = match ask.size {
        0 => image_size.max(min),
        s if s < image_size => {
            return Err(CoordError::invalid(
                "size",
                format!(
                    "{s} bytes is smaller than image {}, which holds {image_size}",
                    image.id
                ),
            ))
        }
        s if s < min => {
            return Err(CoordError::invalid(
                "size",
                format!(
                    "{s} bytes is below image {}'s min_disk of {} GiB",
                    image.id, image.min_disk
                ),
            ))
        }
        s => s,
    };
    Ok(FromImage {
        domain,
        image: image.id.clone(),
        image_domain,
        base: file.tag,
        base_volume: file.volume,
        image_format: format,
        size,
        name: ask.name.clone(),
        description: ask.description.clone(),
        wipe_after_delete: ask.wipe_after_delete,
    })
}

/// See [`FromImage::needs_cache`].
pub fn needs_cache(image_domain: &uuid::Uuid, domain: &uuid::Uuid, format: Format) -> bool {
    image_domain != domain || format != Format::Raw
}

fn cache_options(f: &FromImage, job: &str) -> Vec<(String, String)> {
    [
        (cairn_domain::catalog::KIND, KIND_IMAGE_CACHE),
        (CACHE_IMAGE, f.image.as_str()),
        (CACHE_DOMAIN, &f.image_domain.to_string()),
        (CACHE_BASE, &f.base.to_string()),
        (CACHE_JOB, job),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A domain's cache of an image, as its tag tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    /// Its tag.
    pub tag: TagId,
    /// The image.
    pub image: String,
    /// Where the image's file is.
    pub image_domain: uuid::Uuid,
    /// The file version it copies.
    pub base: TagId,
    /// Disks hanging from it.
    pub children: u32,
}

/// The image caches among a domain's tags.
pub fn caches(tags: &[TagInfo]) -> Vec<Cache> {
    tags.iter()
        .filter(|t| t.option(cairn_domain::catalog::KIND) == Some(KIND_IMAGE_CACHE))
        .filter_map(|t| {
            Some(Cache {
                tag: t.id,
                image: t.option(CACHE_IMAGE)?.to_string(),
                image_domain: t.option(CACHE_DOMAIN)?.parse().ok()?,
                base: TagId::parse("", t.option(CACHE_BASE)?).ok()?,
                children: t.child_refs,
            })
        })
        .collect()
}

/// Whether cache `c` may go: no disk hangs from it, and its image is no
/// longer registered from its base (`registered`: the image the base
/// version holds now, `None` when none or the version is gone).
pub fn cache_stale(c: &Cache, registered: Option<&str>) -> bool {
    c.children == 0 && registered != Some(c.image.as_str())
}

#[tonic::async_trait]
impl Kind for FromImage {
    facts!("create-from-image", [Copy, Call], domain: domain, disk: none);

    fn validate(&self) -> Result<()> {
        check_label(&self.name, &self.description)?;
        super::check_size(self.size)
    }

    /// The lock of the domain's cache of the base, taken whether or not a
    /// cache is needed (it is the base's name on this domain).
    async fn lock_target(&self, _c: &Coordinator) -> Result<Option<TagId>> {
        Ok(Some(self.base))
    }

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, lock: Lock<'_>) -> Result<()> {
        let (dom, src_dom) = (self.domain, self.image_domain);
        match rec.step {
            Step::Copy => {
                if !self.needs_cache() {
                    return Ok(());
                }
                if let Some(t) = c.image_cache(&dom, &self.base).await? {
                    rec.made(dom, t);
                    return Ok(());
                }
                let (vol, read_as) = (self.base_volume, self.image_format);
                let spec = self.cache_spec(&rec.id);
                let also = (dom != src_dom).then_some(dom);
                let made = c
                    .agent_job(rec, lock, &src_dom, also.as_ref(), |a, rid| {
                        let spec = spec.clone();
                        async move {
                            a.copy_image(&rid, &src_dom, &vol, read_as, &dom, read_as, spec)
                                .await
                        }
                    })
                    .await?;
                match made {
                    Some(Some(t)) => {
                        let mut memo = c.image_caches.lock().expect("poisoned");
                        memo.insert((dom, self.base), t.id);
                        rec.made(dom, t.id)
                    }
                    Some(None) => {
                        return Err(CoordError::Internal("an image copy without its tag".into()))
                    }
                    None => {}
                }
                Ok(())
            }
            _ => {
                let parent = if self.needs_cache() {
                    crate::coordinator::parse_tag("cache", &rec.result_disk)?
                } else {
                    self.base
                };
                let opts = options(
                    &self.name,
                    &rec.id,
                    &rec.caller,
                    &[
                        (FROM_IMAGE, &self.image),
                        (WIPE_KEY, if self.wipe_after_delete { "true" } else { "" }),
                    ],
                );
                let (desc, size) = (self.description.clone(), self.size);
                let made = c
                    .mutate(rec, |a, rid| {
                        let (opts, desc) = (opts.clone(), desc.clone());
                        async move { a.create_on(&rid, &dom, &parent, size, &desc, &opts).await }
                    })
                    .await?;
                if let Some(t) = made {
                    rec.made(dom, t.id);
                }
                Ok(())
            }
        }
    }

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        match rec.step {
            Step::Copy => {
                let d = DomainRef {
                    id: self.domain,
                    name: String::new(),
                };
                let (tags, _) = c.contents(&d).await?;
                match tags.iter().find(|t| t.option(CACHE_JOB) == Some(&rec.id)) {
                    Some(t) => {
                        rec.made(self.domain, t.id);
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }
            _ => c.found_made(rec, self.domain).await,
        }
    }
}

impl Coordinator {
    /// The cache of file version `base` on domain `dom`, if there is one:
    /// the one found last time when its tag still says so (one tag read),
    /// else looked for among every tag of the domain.
    pub(crate) async fn image_cache(
        &self,
        dom: &uuid::Uuid,
        base: &TagId,
    ) -> Result<Option<TagId>> {
        let known = self
            .image_caches
            .lock()
            .expect("poisoned")
            .get(&(*dom, *base))
            .copied();
        if let Some(t) = known {
            match self.tag(dom, &t).await {
                Ok(t)
                    if caches(std::slice::from_ref(&t)).first().map(|c| c.base) == Some(*base) =>
                {
                    return Ok(Some(t.id));
                }
                Ok(_) | Err(CoordError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let d = DomainRef {
            id: *dom,
            name: String::new(),
        };
        let (tags, _) = self.contents(&d).await?;
        let found = caches(&tags)
            .into_iter()
            .find(|c| c.base == *base)
            .map(|c| c.tag);
        let mut memo = self.image_caches.lock().expect("poisoned");
        match found {
            Some(t) => memo.insert((*dom, *base), t),
            None => memo.remove(&(*dom, *base)),
        };
        Ok(found)
    }

    /// [`Self::reclaim_image_caches`] on every domain, as an image is
    /// unregistered; what fails is left to the leader's next round.
    pub(crate) async fn reclaim_image_caches_everywhere(&self) {
        let Ok(doms) = self.all_domains().await else {
            return;
        };
        for d in doms {
            let r = match self.contents(&d).await {
                Ok((tags, _)) => self.reclaim_image_caches(&d, &tags).await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::info!(domain = %d.id, error = %e, "image caches stay for the leader");
            }
        }
    }

    /// Remove the caches among `tags` (of domain `d`) whose image is no
    /// longer registered from their file version and that no disk uses,
    /// each under its lock (a cache a job is using stays); how many went.
    pub(crate) async fn reclaim_image_caches(
        &self,
        d: &DomainRef,
        tags: &[TagInfo],
    ) -> Result<usize> {
        let mut n = 0;
        for cache in caches(tags) {
            if cache.children > 0 {
                continue;
            }
            let registered = match self.tag(&cache.image_domain, &cache.base).await {
                Ok(t) => t.option(cairn_domain::catalog::IMAGE).map(str::to_string),
                Err(CoordError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            if !cache_stale(&cache, registered.as_deref()) {
                continue;
            }
            let res = cairn_domain::lock::Resource {
                domain: d.id,
                kind: cairn_domain::lock::ResourceKind::Disk(cache.base),
            };
            let locks = self.locks().clone();
            let held = crate::coordinator::blocking(move || {
                Ok(locks.acquire(&res, std::time::Duration::ZERO).ok())
            })
            .await?;
            let Some(_g) = held else { continue };
            // Again under the lock: a disk may have been made on it since.
            let now = self.tag(&d.id, &cache.tag).await;
            if !matches!(&now, Ok(t) if t.child_refs == 0) {
                continue;
            }
            let (dom, tag) = (d.id, cache.tag);
            let rid = format!("uncache-{tag}");
            self.agents
                .with_agent(crate::agents::Pick::on(&dom), |a| {
                    let rid = rid.clone();
                    async move { a.delete_disk(&rid, &dom, &tag).await }
                })
                .await?;
            tracing::info!(domain = %dom, cache = %tag, image = %cache.image, "removed an image cache no disk uses");
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(children: u32) -> Cache {
        Cache {
            tag: TagId::generate(1),
            image: "img".into(),
            image_domain: uuid::Uuid::nil(),
            base: TagId::generate(2),
            children,
        }
    }

    fn image(
        format: &str,
    ) -> (
        crate::catalog::images::ImageRecord,
        cairn_domain::catalog::FileVersion,
    ) {
        let rec = crate::catalog::images::ImageRecord {
            id: "img".into(),
            disk_format: format.into(),
            virtual_size: 10 << 20,
            size: 3 << 20,
            ..Default::default()
        };
        let file = cairn_domain::catalog::FileVersion {
            tag: cache(0).base,
            volume: VolumeId::generate(3),
            path: "a.img".into(),
            version: 1,
            size: 3 << 20,
            sha256: String::new(),
            owner: "u".into(),
            created: 0,
            directory: false,
            inline: false,
            image: Some("img".into()),
            request: String::new(),
        };
        (rec, file)
    }

    #[test]
    fn a_disk_from_an_image_is_at_least_as_big_as_the_image() {
        let d = uuid::Uuid::from_u128(1);
        let (mut rec, mut file) = image("raw");
        let ask = Ask::default();
        let plan = |r: &crate::catalog::images::ImageRecord,
                    f: &cairn_domain::catalog::FileVersion,
                    a: &Ask| { plan_from_image(d, d, r, f, a) };
        // A raw image's size is its file's; a qcow2 image's its header's.
        assert_eq!(plan(&rec, &file, &ask).unwrap().size, 3 << 20);
        rec.disk_format = "qcow2".into();
        let p = plan(&rec, &file, &ask).unwrap();
        assert_eq!((p.size, p.image_format), (10 << 20, Format::Qcow2));
        assert!(p.needs_cache());
        // Smaller than the image, or than min_disk: refused, naming why.
        let small = Ask {
            size: 1 << 20,
            ..Ask::default()
        };
        let e = plan(&rec, &file, &small).unwrap_err().to_string();
        assert!(e.contains("smaller than image img"), "{e}");
        rec.min_disk = 1;
        assert_eq!(plan(&rec, &file, &ask).unwrap().size, 1 << 30);
        let e = plan(
            &rec,
            &file,
            &Ask {
                size: 20 << 20,
                ..Ask::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("min_disk of 1 GiB"), "{e}");
        // What is no disk image is refused.
        rec.disk_format = "vmdk".into();
        let e = plan(&rec, &file, &ask).unwrap_err().to_string();
        assert!(e.contains("disk format \"vmdk\""), "{e}");
        rec.disk_format = "raw".into();
        file.inline = true;
        assert!(matches!(
            plan(&rec, &file, &ask),
            Err(CoordError::FailedPrecondition(_))
        ));
        file.inline = false;
        file.directory = true;
        assert!(matches!(
            plan(&rec, &file, &ask),
            Err(CoordError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn a_cache_goes_when_unused_and_its_image_is_gone() {
        assert!(cache_stale(&cache(0), None));
        assert!(cache_stale(&cache(0), Some("another")));
        assert!(!cache_stale(&cache(0), Some("img")));
        assert!(!cache_stale(&cache(1), None));
    }

    #[test]
    fn only_a_raw_image_on_the_same_domain_goes_without_a_cache() {
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        assert!(!needs_cache(&a, &a, Format::Raw));
        assert!(needs_cache(&a, &a, Format::Qcow2));
        assert!(needs_cache(&a, &b, Format::Raw));
    }

    #[test]
    fn a_cache_reads_back_from_its_options() {
        let f = FromImage {
            domain: uuid::Uuid::from_u128(1),
            image: "img".into(),
            image_domain: uuid::Uuid::from_u128(2),
            base: cache(0).base,
            base_volume: VolumeId::generate(3),
            image_format: Format::Qcow2,
            size: 1 << 20,
            name: String::new(),
            description: String::new(),
            wipe_after_delete: false,
        };
        let spec = f.cache_spec("job-1");
        let size: usize = spec
            .options
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum();
        assert!(size <= cairn_domain::limits::MAX_OPTIONS, "{size}");
        let t = TagInfo {
            id: TagId::generate(4),
            domain: "d".into(),
            volume: f.base_volume,
            size: 0,
            mutable: false,
            strategy: Strategy::Chain,
            options: spec.options.clone(),
            tag_type: TagType::Strong,
            state: TagState::Optimized,
            ctime: 0,
            child_refs: 2,
            user_data_bytes: 0,
            generation: 1,
            token: 1,
            writer_slot: 0,
        };
        let got = caches(std::slice::from_ref(&t));
        assert_eq!(
            got,
            vec![Cache {
                tag: t.id,
                image: "img".into(),
                image_domain: f.image_domain,
                base: f.base,
                children: 2
            }]
        );
    }
}
