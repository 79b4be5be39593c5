//! Grow a disk: one agent call grows its top volume (in place, or by
//! moving the top where there is room) and the tag's size. Disks only
//! grow.

use cairn_domain::{TagId, TagType};
use serde::{Deserialize, Serialize};

use super::{check_size, Cx, Kind};
use crate::coordinator::Coordinator;
use crate::error::{CoordError, Result};
use crate::record::{JobRecord, Step};

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

    async fn step(&self, cx: &mut Cx<'_>) -> Result<()> {
        let (c, rec) = (cx.c, &mut *cx.rec);
        let (dom, disk, size) = (self.domain, self.disk, self.size);
        let t = c.tag(&dom, &disk).await?;
        if t.tag_type != TagType::Strong {
            return Err(CoordError::NotFound {
                kind: "disk",
                id: disk.to_string(),
            });
        }
        if size < t.size {
            return Err(CoordError::invalid(
                "size",
                format!(
                    "{size} is smaller than the disk's {}; disks only grow",
                    t.size
                ),
            ));
        }
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
