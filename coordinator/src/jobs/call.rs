//! The jobs of one agent call, each a single transaction on the domain:
//! a create makes a volume and its strong tag (no lock: nothing exists
//! yet that another job could touch); a snapshot adds a qcow2 layer and
//! moves the disk's tag onto it, leaving a weak tag that carries the job's
//! id so that a lost answer can be found on the domain; a thin clone adds
//! a layer on a snapshot, or, of a disk, a snapshot and the clone's layer
//! on it; a delete, refused while the disk is active on any host, removes
//! its tag and every volume only it reaches; an extend grows the top
//! volume (in place, or by moving it where there is room) and the tag's
//! size. Disks only grow.

use cairn_domain::{limits, Allocation, Format, TagType};

use super::prelude::*;
use super::{check_description, check_label, check_size, options, text};
use crate::agents::NewDisk;
use crate::plan::{self, CloneSource, DomainRef, CLONE_OF_KEY, JOB_KEY, SNAP_KEY, WIPE_KEY};

/// What a create asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Create {
    /// The domain.
    pub domain: uuid::Uuid,
    /// The disk's name.
    #[serde(default)]
    pub name: String,
    /// Raw or qcow2.
    pub format: Format,
    /// Sparse or preallocated.
    #[serde(default = "text::sparse", deserialize_with = "text::de_allocation")]
    pub allocation: Allocation,
    /// Virtual size in bytes.
    pub size: u64,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Wipe its data when it is deleted.
    #[serde(default)]
    pub wipe_after_delete: bool,
}

#[tonic::async_trait]
impl Kind for Create {
    facts!("create", [Call], domain: domain, disk: none);

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, _: Lock<'_>) -> Result<()> {
        let dom = self.domain;
        let nd = NewDisk {
            format: self.format,
            size: self.size,
            preallocated: self.allocation == Allocation::Preallocated,
            description: self.description.clone(),
            options: options(
                &self.name,
                &rec.id,
                &rec.caller,
                &[(WIPE_KEY, if self.wipe_after_delete { "true" } else { "" })],
            ),
        };
        let made = c
            .mutate(rec, |a, rid| {
                let nd = nd.clone();
                async move { a.create_disk(&rid, &dom, &nd).await }
            })
            .await?;
        if let Some(t) = made {
            rec.made(dom, t.id);
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        check_label(&self.name, &self.description)?;
        check_size(self.size)
    }
}

/// What a snapshot asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The domain.
    pub domain: uuid::Uuid,
    /// The disk.
    pub disk: TagId,
    /// Shown with the snapshot.
    #[serde(default)]
    pub description: String,
}

#[tonic::async_trait]
impl Kind for Snapshot {
    facts!("snapshot", [Call], domain: domain, disk: disk);

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, _: Lock<'_>) -> Result<()> {
        if snapshot(c, rec, self.domain, self.disk, &self.description, &[]).await? {
            rec.made(self.domain, self.disk);
        }
        Ok(())
    }

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        let found = snapshot_found(c, rec, self.domain).await?;
        if found {
            rec.made(self.domain, self.disk);
        }
        Ok(found)
    }

    fn validate(&self) -> Result<()> {
        check_description(&self.description)
    }
}

/// Snapshot `disk` for job `rec`: its weak tag carries the job's id (and
/// `mark`), and goes into `rec.snapshot`; false when an earlier attempt
/// was found to have made it (`rec.snapshot` is set then too).
pub(super) async fn snapshot(
    c: &Coordinator,
    rec: &mut JobRecord,
    dom: uuid::Uuid,
    disk: TagId,
    description: &str,
    mark: &[(&str, &str)],
) -> Result<bool> {
    let mut opts = vec![(JOB_KEY.to_string(), rec.id.clone())];
    opts.extend(mark.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let desc = description.to_string();
    let made = c
        .mutate(rec, |a, rid| {
            let (desc, opts) = (desc.clone(), opts.clone());
            async move { a.snapshot(&rid, &dom, &disk, &desc, &opts, None).await }
        })
        .await?;
    Ok(match made {
        Some((weak, _)) => {
            rec.snapshot = weak.id.to_string();
            true
        }
        None => false,
    })
}

/// Whether job `rec`'s snapshot is on domain `dom` (a weak tag carrying
/// its id); sets `rec.snapshot` when it is.
pub(super) async fn snapshot_found(
    c: &Coordinator,
    rec: &mut JobRecord,
    dom: uuid::Uuid,
) -> Result<bool> {
    let d = DomainRef {
        id: dom,
        name: String::new(),
    };
    let (tags, _) = c.contents(&d).await?;
    let made = tags
        .iter()
        .find(|t| t.tag_type == TagType::Weak && t.option(JOB_KEY) == Some(&rec.id));
    Ok(match made {
        Some(t) => {
            rec.snapshot = t.id.to_string();
            true
        }
        None => false,
    })
}

/// What a thin clone asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinClone {
    /// The domain.
    pub domain: uuid::Uuid,
    /// The disk or snapshot cloned.
    #[serde(rename = "disk")]
    pub source: TagId,
    /// The clone's name.
    #[serde(default)]
    pub name: String,
    /// The clone's description.
    #[serde(default)]
    pub description: String,
}

#[tonic::async_trait]
impl Kind for ThinClone {
    facts!("clone", [Call], domain: domain, disk: source);

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, _: Lock<'_>) -> Result<()> {
        let (dom, src) = (self.domain, self.source);
        let st = c.tag(&dom, &src).await?;
        let source = plan::clone_source(&src, std::slice::from_ref(&st))?;
        let of = match &source {
            CloneSource::Disk(d) => d.to_string(),
            CloneSource::Snapshot(_) => st.option(SNAP_KEY).unwrap_or_default().to_string(),
        };
        let opts = options(&self.name, &rec.id, &rec.caller, &[(CLONE_OF_KEY, &of)]);
        let desc = self.description.clone();
        let made = c
            .mutate(rec, |a, rid| {
                let (opts, desc, source) = (opts.clone(), desc.clone(), source.clone());
                async move {
                    match source {
                        CloneSource::Snapshot(s) => {
                            a.create_on(&rid, &dom, &s, 0, &desc, &opts).await
                        }
                        CloneSource::Disk(d) => {
                            let (_, clone) = a
                                .snapshot(&rid, &dom, &d, "base of a clone", &[], Some(&opts))
                                .await?;
                            clone.ok_or_else(|| {
                                CoordError::Internal("a snapshot without its clone".into())
                            })
                        }
                    }
                }
            })
            .await?;
        if let Some(t) = made {
            rec.made(dom, t.id);
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        check_label(&self.name, &self.description)
    }
}

/// What a delete asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    /// The domain.
    pub domain: uuid::Uuid,
    /// The disk.
    pub disk: TagId,
}

#[tonic::async_trait]
impl Kind for Delete {
    facts!("delete", [Call], domain: domain, disk: disk);

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, _: Lock<'_>) -> Result<()> {
        let (dom, disk) = (self.domain, self.disk);
        c.refuse_active(&dom, &disk).await?;
        c.mutate(rec, |a, rid| async move {
            a.delete_disk(&rid, &dom, &disk).await
        })
        .await?;
        rec.made(dom, disk);
        Ok(())
    }

    async fn done(&self, c: &Coordinator, _: &mut JobRecord) -> Result<bool> {
        c.gone(&self.domain, &self.disk).await
    }
}

/// What an extend asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extend {
    /// The domain.
    pub domain: uuid::Uuid,
    /// The disk.
    pub disk: TagId,
    /// The new virtual size in bytes.
    pub size: u64,
}

#[tonic::async_trait]
impl Kind for Extend {
    facts!("extend", [Call], domain: domain, disk: disk);

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, _: Lock<'_>) -> Result<()> {
        let (dom, disk, size) = (self.domain, self.disk, self.size);
        let t = c.tag(&dom, &disk).await?;
        if t.tag_type != TagType::Strong {
            return Err(CoordError::NotFound {
                kind: "disk",
                id: disk.to_string(),
            });
        }
        limits::check_growth("size", "disk", size, t.size)?;
        let top = t.volume;
        c.mutate(rec, |a, rid| async move {
            a.extend(&rid, &dom, &top, &disk, size).await
        })
        .await?;
        rec.made(dom, disk);
        Ok(())
    }

    async fn done(&self, c: &Coordinator, _: &mut JobRecord) -> Result<bool> {
        match c.tag(&self.domain, &self.disk).await {
            Ok(t) => Ok(t.size >= self.size),
            Err(CoordError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn validate(&self) -> Result<()> {
        check_size(self.size)
    }
}
