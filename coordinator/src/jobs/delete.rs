//! Delete a disk: refused while it is active on any host; one agent call
//! removes its tag and every volume only it reaches.

use std::sync::Arc;

use cairn_domain::{LockGuard, TagId};
use serde::{Deserialize, Serialize};

use super::Kind;
use crate::coordinator::Coordinator;
use crate::error::Result;
use crate::record::{JobRecord, Step};

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
    fn name(&self) -> &'static str {
        "delete"
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
        Ok(())
    }

    async fn step(
        &self,
        c: &Arc<Coordinator>,
        rec: &mut JobRecord,
        _: Option<&LockGuard>,
    ) -> Result<()> {
        let (dom, disk) = (self.domain, self.disk);
        c.refuse_active(&dom, &disk).await?;
        c.mutate(rec, |a, rid| async move {
            a.delete_disk(&rid, &dom, &disk).await
        })
        .await?;
        rec.result_domain = dom.to_string();
        rec.result_disk = disk.to_string();
        Ok(())
    }

    async fn done(&self, c: &Coordinator, _: &mut JobRecord) -> Result<bool> {
        c.gone(&self.domain, &self.disk).await
    }
}
