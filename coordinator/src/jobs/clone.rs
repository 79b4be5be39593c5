//! Clones. A thin clone is one agent call: a new qcow2 layer on a
//! snapshot, or, of a disk, a snapshot and the clone's layer on it in one
//! transaction. A full clone is a copy of the chain in the same domain.

use cairn_domain::{Allocation, Format, TagId};
use serde::{Deserialize, Serialize};

use super::copy::{copy, copy_done, CopyOf};
use super::{check_description, check_name, options, text, Cx, Kind};
use crate::coordinator::Coordinator;
use crate::error::{CoordError, Result};
use crate::plan::{self, CloneSource, CLONE_OF_KEY, SNAP_KEY};
use crate::record::{JobRecord, Step};

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
impl Kind for ThinClone {
    facts!("clone", [Call], domain: domain, disk: source);

    async fn step(&self, cx: &mut Cx<'_>) -> Result<()> {
        let (c, rec) = (cx.c, &mut *cx.rec);
        let (dom, src) = (self.domain, self.source);
        let st = c.tag(&dom, &src).await?;
        let source = plan::clone_source(&src, std::slice::from_ref(&st))?;
        let of = match &source {
            CloneSource::Disk(d) => d.to_string(),
            CloneSource::Snapshot(_) => st.option(SNAP_KEY).unwrap_or_default().to_string(),
        };
        let opts = options(&self.name, &rec.id, &[(CLONE_OF_KEY, &of)]);
        let desc = self.description.clone();
        let made = c
            .mutate(rec, |a, rid| {
                let (opts, desc, source) = (opts.clone(), desc.clone(), source.clone());
                async move {
                    match source {
                        CloneSource::Snapshot(s) => a.create_on(&rid, &dom, &s, &desc, &opts).await,
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

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        c.found_made(rec, self.domain).await
    }

    fn validate(&self) -> Result<()> {
        check_name(&self.name)?;
        check_description(&self.description)
    }
}

#[tonic::async_trait]
impl Kind for FullClone {
    facts!("clone", [Copy], domain: domain, disk: source);

    async fn step(&self, cx: &mut Cx<'_>) -> Result<()> {
        let (c, rec, lock) = (cx.c, &mut *cx.rec, cx.lock);
        let what = CopyOf {
            domain: self.domain,
            source: self.source,
            target: self.domain,
            format: self.format,
            allocation: self.allocation,
            name: &self.name,
            description: &self.description,
            mark: Some(CLONE_OF_KEY),
        };
        copy(c, rec, lock, what).await
    }

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        copy_done(c, rec, self.domain, self.domain).await
    }

    fn validate(&self) -> Result<()> {
        check_name(&self.name)?;
        check_description(&self.description)
    }
}
