//! Jobs that copy a disk's chain into a new volume through one agent job:
//! a copy to another domain, a move (a copy, then the source deleted) and
//! a conversion (a copy in another format, then the disk swapped onto
//! it, keeping its id). A full clone copies too ([`copy`] does the work).

use cairn_domain::{Allocation, Format, LockGuard, TagType};

use super::prelude::*;
use super::{check_label, format_or, options, text};
use crate::plan::{
    self, CloneSource, DomainRef, CLONE_OF_KEY, CONVERT_KEY, NAME_KEY, OWNER_KEY, WIPE_KEY,
};

/// What a copy or move asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyTo {
    /// The source's domain.
    pub domain: uuid::Uuid,
    /// The disk.
    pub disk: TagId,
    /// The domain the copy goes to.
    #[serde(rename = "target_domain")]
    pub target: uuid::Uuid,
    /// The copy's format; none keeps the disk's.
    #[serde(default, with = "text::opt_format")]
    pub format: Option<Format>,
    /// The copy's provisioning.
    #[serde(default = "text::sparse", deserialize_with = "text::de_allocation")]
    pub allocation: Allocation,
}

/// A move: a copy, then the source deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Move(pub CopyTo);

/// What a conversion asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Convert {
    /// The domain.
    pub domain: uuid::Uuid,
    /// The disk.
    pub disk: TagId,
    /// The new format.
    pub format: Format,
    /// The new provisioning.
    #[serde(default = "text::sparse", deserialize_with = "text::de_allocation")]
    pub allocation: Allocation,
    /// Whether the disk's snapshots may go (a conversion cannot keep them).
    #[serde(default)]
    pub flatten: bool,
}

impl Convert {
    /// A conversion keeps no snapshot: refused while the disk has some,
    /// unless asked to flatten.
    pub async fn refuse_snapshots(&self, c: &Coordinator) -> Result<()> {
        if self.flatten {
            return Ok(());
        }
        let v = c
            .disk(&self.domain.to_string(), &self.disk.to_string())
            .await?;
        if v.snapshots.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = v.snapshots.iter().map(|s| s.tag.id.to_string()).collect();
        Err(CoordError::FailedPrecondition(format!(
            "disk {} has {} snapshot(s) ({}), which a conversion cannot keep; delete them or convert with flatten to drop them",
            self.disk,
            ids.len(),
            ids.join(", ")
        )))
    }
}

/// One copy of a chain into a new disk.
pub(super) struct CopyOf<'a> {
    /// The source's domain.
    pub domain: uuid::Uuid,
    /// The disk or snapshot copied.
    pub source: TagId,
    /// Where the copy goes.
    pub target: uuid::Uuid,
    /// Its format; none keeps the source's top's.
    pub format: Option<Format>,
    /// Its provisioning.
    pub allocation: Allocation,
    /// Its name; empty keeps the source's.
    pub name: &'a str,
    /// Its description.
    pub description: &'a str,
    /// One more option of its tag (what it is a copy of).
    pub mark: Option<&'static str>,
    /// Whether the copy keeps the source's owner (a copy, a move, a
    /// conversion's copy: the same disk elsewhere), or belongs to the
    /// job's caller (a clone: a new disk).
    pub keep_owner: bool,
}

/// Copy `what.source`'s chain (flattened) into a new disk, following the
/// agent's job to its end.
pub(super) async fn copy(
    c: &Arc<Coordinator>,
    rec: &mut JobRecord,
    lock: Option<&LockGuard>,
    what: CopyOf<'_>,
) -> Result<()> {
    let (dom, target) = (what.domain, what.target);
    let d = DomainRef {
        id: dom,
        name: String::new(),
    };
    let (tags, vols) = c.contents(&d).await?;
    let view = match plan::clone_source(&what.source, &tags)? {
        CloneSource::Disk(disk) => plan::disk_view(&d, &disk, &tags, &vols)?,
        CloneSource::Snapshot(s) => {
            // A full clone of a snapshot copies the snapshot's chain.
            let t = tags.iter().find(|t| t.id == s).expect("found above");
            let mut fake = t.clone();
            fake.tag_type = TagType::Strong;
            let mut tags2 = tags.clone();
            tags2.retain(|x| x.id != s);
            tags2.push(fake);
            plan::disk_view(&d, &s, &tags2, &vols)?
        }
    };
    let top = &view.chain.last().expect("a chain has a top").volume;
    let (top_id, format) = (top.id, Some(format_or(what.format, top.format)));
    let pre = what.allocation == Allocation::Preallocated;
    let name = if what.name.is_empty() {
        view.tag.option(NAME_KEY).unwrap_or_default().to_string()
    } else {
        what.name.to_string()
    };
    let source = what.source.to_string();
    let mut extra: Vec<(&str, &str)> = what
        .mark
        .map(|k| (k, source.as_str()))
        .into_iter()
        .collect();
    if what.keep_owner {
        // The same disk elsewhere keeps its wipe-after-delete.
        extra.push((WIPE_KEY, view.tag.option(WIPE_KEY).unwrap_or_default()));
    }
    let owner = if what.keep_owner {
        view.tag.option(OWNER_KEY).unwrap_or_default()
    } else {
        rec.caller.as_str()
    };
    let opts = options(&name, &rec.id, owner, &extra);
    let desc = what.description.to_string();
    let also = (target != dom).then_some(target);
    let made = c
        .agent_job(rec, lock, &dom, also.as_ref(), |a, rid| {
            let (opts, desc) = (opts.clone(), desc.clone());
            async move {
                a.copy(&rid, &dom, &top_id, &target, format, pre, &desc, &opts)
                    .await
            }
        })
        .await?;
    match made {
        Some(Some(t)) => {
            rec.made(target, t.id);
        }
        Some(None) => return Err(CoordError::Internal("a copy job without its tag".into())),
        // Found done on the domain: the results are in `rec`.
        None => {}
    }
    Ok(())
}

/// Whether the copy of `rec` was made on `target`.
pub(super) async fn copy_done(
    c: &Coordinator,
    rec: &mut JobRecord,
    domain: uuid::Uuid,
    target: uuid::Uuid,
) -> Result<bool> {
    if target != domain {
        c.settle(&target).await?;
    }
    c.found_made(rec, target).await
}

impl CopyTo {
    fn copy_of(&self) -> CopyOf<'_> {
        CopyOf {
            domain: self.domain,
            source: self.disk,
            target: self.target,
            format: self.format,
            allocation: self.allocation,
            name: "",
            description: "",
            mark: None,
            keep_owner: true,
        }
    }
}

#[tonic::async_trait]
impl Kind for CopyTo {
    facts!("copy", [Copy], domain: domain, disk: disk);

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, lock: Lock<'_>) -> Result<()> {
        copy(c, rec, lock, self.copy_of()).await
    }

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        copy_done(c, rec, self.domain, self.target).await
    }
}

#[tonic::async_trait]
impl Kind for Move {
    facts!("move", [Copy, DeleteSource], domain: 0.domain, disk: 0.disk);

    /// A move to the domain the disk is on would copy it and then delete
    /// the original, leaving a new disk id for nothing.
    fn validate(&self) -> Result<()> {
        if self.0.target == self.0.domain {
            return Err(CoordError::FailedPrecondition(format!(
                "disk {} is already on domain {}; a move must go to another domain",
                self.0.disk, self.0.target
            )));
        }
        Ok(())
    }

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, lock: Lock<'_>) -> Result<()> {
        let (dom, disk) = (self.0.domain, self.0.disk);
        match rec.step {
            Step::Copy => copy(c, rec, lock, self.0.copy_of()).await,
            _ => {
                c.refuse_active(&dom, &disk).await?;
                c.mutate(rec, |a, rid| async move {
                    a.delete_disk(&rid, &dom, &disk).await
                })
                .await?;
                Ok(())
            }
        }
    }

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        match rec.step {
            Step::Copy => copy_done(c, rec, self.0.domain, self.0.target).await,
            _ => c.gone(&self.0.domain, &self.0.disk).await,
        }
    }
}

#[tonic::async_trait]
impl Kind for Convert {
    facts!("convert", [Copy, Swap], domain: domain, disk: disk);

    async fn admit(&self, c: &Coordinator) -> Result<()> {
        self.refuse_snapshots(c).await
    }

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, lock: Lock<'_>) -> Result<()> {
        let (dom, disk) = (self.domain, self.disk);
        match rec.step {
            Step::Copy => {
                // Again under the disk's lock: a snapshot may have come since
                // the call.
                self.refuse_snapshots(c).await?;
                let what = CopyOf {
                    domain: dom,
                    source: disk,
                    target: dom,
                    format: Some(self.format),
                    allocation: self.allocation,
                    name: "",
                    description: "",
                    mark: Some(CONVERT_KEY),
                    keep_owner: true,
                };
                copy(c, rec, lock, what).await
            }
            _ => {
                let with = copy_made(rec)?;
                c.refuse_active(&dom, &disk).await?;
                c.mutate(rec, |a, rid| async move {
                    a.swap(&rid, &dom, &disk, &with).await
                })
                .await?;
                rec.made(dom, disk);
                Ok(())
            }
        }
    }

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        match rec.step {
            Step::Copy => copy_done(c, rec, self.domain, self.domain).await,
            // The swap removes the copy's tag.
            _ => c.gone(&self.domain, &copy_made(rec)?).await,
        }
    }
}

/// The copy a conversion's first step made.
fn copy_made(rec: &JobRecord) -> Result<TagId> {
    TagId::parse("copy", &rec.result_disk).map_err(|e| CoordError::invalid("copy", e.to_string()))
}

/// What a full clone asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullClone {
    /// The domain.
    pub domain: uuid::Uuid,
    /// The disk or snapshot cloned.
    #[serde(rename = "disk")]
    pub source: TagId,
    /// The clone's name.
    #[serde(default)]
    pub name: String,
    /// Its format; none keeps the source's.
    #[serde(default, with = "text::opt_format")]
    pub format: Option<Format>,
    /// Its provisioning.
    #[serde(default = "text::sparse", deserialize_with = "text::de_allocation")]
    pub allocation: Allocation,
    /// The clone's description.
    #[serde(default)]
    pub description: String,
}

#[tonic::async_trait]
impl Kind for FullClone {
    facts!("clone", [Copy], domain: domain, disk: source);

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, lock: Lock<'_>) -> Result<()> {
        let what = CopyOf {
            domain: self.domain,
            source: self.source,
            target: self.domain,
            format: self.format,
            allocation: self.allocation,
            name: &self.name,
            description: &self.description,
            mark: Some(CLONE_OF_KEY),
            keep_owner: false,
        };
        copy(c, rec, lock, what).await
    }

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        copy_done(c, rec, self.domain, self.domain).await
    }

    fn validate(&self) -> Result<()> {
        check_label(&self.name, &self.description)
    }
}
