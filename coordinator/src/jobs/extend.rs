//! Grow a disk: one agent call grows its top volume (in place, or by
//! moving the top where there is room) and the tag's size. Disks only
//! grow.

use std::sync::Arc;

use cairn_domain::{LockGuard, TagId, TagType};
use serde::{Deserialize, Serialize};

use super::{check_size, Kind};
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
    fn name(&self) -> &'static str {
        "extend"
    }
    fn domain(&self) -> uuid::Uuid {
        self.domain
    }
    fn disk(&self) -> Option<TagId> {
        Some(self.disk)
    }
    fn plan(&self) -> &'static [Step] {
        &[Step::Call]
    }
    fn validate(&self) -> Result<()> {
        check_size(self.size)
    }

    async fn step(
        &self,
        c: &Arc<Coordinator>,
        rec: &mut JobRecord,
        _: Option<&LockGuard>,
    ) -> Result<()> {
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
        rec.result_domain = dom.to_string();
        rec.result_disk = disk.to_string();
        Ok(())
    }

    async fn done(&self, c: &Coordinator, _: &mut JobRecord) -> Result<bool> {
        match c.tag(&self.domain, &self.disk).await {
            Ok(t) => Ok(t.size >= self.size),
            Err(CoordError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
