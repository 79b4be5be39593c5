//! Snapshot a disk: one agent call adds a qcow2 layer and moves the disk's
//! tag onto it; the weak tag left on the old top carries the job's id, so
//! that a lost answer can be found on the domain.

use cairn_domain::{TagId, TagType};
use serde::{Deserialize, Serialize};

use super::{check_description, Cx, Kind};
use crate::coordinator::Coordinator;
use crate::error::Result;
use crate::plan::{DomainRef, JOB_KEY};
use crate::record::{JobRecord, Step};

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

    async fn step(&self, cx: &mut Cx<'_>) -> Result<()> {
        let (c, rec) = (cx.c, &mut *cx.rec);
        let (dom, disk) = (self.domain, self.disk);
        let desc = self.description.clone();
        let mark = vec![(JOB_KEY.to_string(), rec.id.clone())];
        let made = c
            .mutate(rec, |a, rid| {
                let (desc, mark) = (desc.clone(), mark.clone());
                async move { a.snapshot(&rid, &dom, &disk, &desc, &mark, None).await }
            })
            .await?;
        if let Some((weak, _)) = made {
            rec.snapshot = weak.id.to_string();
            rec.made(dom, disk);
        }
        Ok(())
    }

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        let (tags, _) = c
            .contents(&DomainRef {
                id: self.domain,
                name: String::new(),
            })
            .await?;
        let made = tags
            .iter()
            .find(|t| t.tag_type == TagType::Weak && t.option(JOB_KEY) == Some(&rec.id));
        Ok(match made {
            Some(t) => {
                rec.snapshot = t.id.to_string();
                rec.made(self.domain, self.disk);
                true
            }
            None => false,
        })
    }

    fn validate(&self) -> Result<()> {
        check_description(&self.description)
    }
}
