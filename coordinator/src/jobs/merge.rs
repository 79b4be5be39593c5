//! Delete a snapshot: an agent job merges it away (the child is rebased
//! onto the snapshot's parent, or committed into a base it sits on),
//! under the lock of the disk it belongs to.

use super::prelude::*;
use crate::plan::SNAP_KEY;

/// What a delete-snapshot asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteSnapshot {
    /// The domain.
    pub domain: uuid::Uuid,
    /// The snapshot's weak tag.
    #[serde(rename = "disk")]
    pub snapshot: TagId,
}

#[tonic::async_trait]
impl Kind for DeleteSnapshot {
    facts!("delete-snapshot", [Merge], domain: domain, disk: snapshot);

    /// The disk the snapshot belongs to, so that its other operations
    /// wait; the snapshot itself when that is not known.
    async fn lock_target(&self, c: &Coordinator) -> Result<Option<TagId>> {
        let t = match c.tag(&self.domain, &self.snapshot).await {
            Ok(t) => Some(t),
            Err(CoordError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(Some(
            t.as_ref()
                .and_then(|t| t.option(SNAP_KEY))
                .and_then(|d| TagId::parse("", d).ok())
                .unwrap_or(self.snapshot),
        ))
    }

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, lock: Lock<'_>) -> Result<()> {
        let (dom, snap) = (self.domain, self.snapshot);
        if rec.agent_job.is_empty() {
            let t = match c.tag(&dom, &snap).await {
                Ok(t) => t,
                Err(CoordError::NotFound { .. }) => {
                    return Err(CoordError::NotFound {
                        kind: "snapshot",
                        id: snap.to_string(),
                    })
                }
                Err(e) => return Err(e),
            };
            if let Some(disk) = t.option(SNAP_KEY).and_then(|d| TagId::parse("", d).ok()) {
                c.refuse_active(&dom, &disk).await?;
                rec.result_disk = disk.to_string();
            }
            rec.result_domain = dom.to_string();
        }
        // Otherwise this follows the merge an earlier run of this job
        // started (and checked): the snapshot may be gone already.
        c.agent_job(rec, lock, &dom, None, |a, rid| async move {
            a.merge(&rid, &dom, &snap).await
        })
        .await?;
        Ok(())
    }

    async fn done(&self, c: &Coordinator, _: &mut JobRecord) -> Result<bool> {
        c.gone(&self.domain, &self.snapshot).await
    }
}
