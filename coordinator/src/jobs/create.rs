//! Create a disk: one agent call makes a volume and its strong tag in one
//! transaction. No lock: nothing exists yet that another job could touch.

use cairn_domain::{Allocation, Format, TagId};
use serde::{Deserialize, Serialize};

use super::{check_description, check_name, check_size, options, text, Cx, Kind};
use crate::agents::NewDisk;
use crate::coordinator::Coordinator;
use crate::error::Result;
use crate::record::{JobRecord, Step};

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
}

#[tonic::async_trait]
impl Kind for Create {
    facts!("create", [Call], domain: domain, disk: none);

    async fn step(&self, cx: &mut Cx<'_>) -> Result<()> {
        let (c, rec) = (cx.c, &mut *cx.rec);
        let dom = self.domain;
        let nd = NewDisk {
            format: self.format,
            size: self.size,
            preallocated: self.allocation == Allocation::Preallocated,
            description: self.description.clone(),
            options: options(&self.name, &rec.id, &[]),
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

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        c.found_made(rec, self.domain).await
    }

    fn validate(&self) -> Result<()> {
        check_name(&self.name)?;
        check_description(&self.description)?;
        check_size(self.size)
    }
}
