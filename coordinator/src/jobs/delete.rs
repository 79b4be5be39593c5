//! Delete a disk: refused while it is active on any host; one agent call
//! removes its tag and every volume only it reaches.

use cairn_domain::TagId;
use serde::{Deserialize, Serialize};

use super::{Cx, Kind};
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
    facts!("delete", [Call], domain: domain, disk: disk);

    async fn step(&self, cx: &mut Cx<'_>) -> Result<()> {
        let (c, rec) = (cx.c, &mut *cx.rec);
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
