//! The kinds of job, each in its module: what it asks for (a typed spec,
//! checked once when the request comes in), its steps, the disk it locks,
//! the agent call of each step, and how to tell from the domain whether a
//! step whose answer was lost took effect.
//!
//! A spec is stored in the job record as `kind` and `params`, the shape
//! records have always had, so that a record written by an earlier
//! version reads as the same job.

/// A kind's fixed facts, written once: its name, its steps after Begin,
/// the field that holds its domain and the one that holds the disk it
/// works on (`none` for a create).
macro_rules! facts {
    ($name:literal, [$($step:ident),+], domain: $($d:tt).+, disk: none) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn domain(&self) -> uuid::Uuid {
            self.$($d).+
        }
        fn disk(&self) -> Option<TagId> {
            None
        }
        fn plan(&self) -> &'static [Step] {
            &[$(Step::$step),+]
        }
    };
    ($name:literal, [$($step:ident),+], domain: $($d:tt).+, disk: $($k:tt).+) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn domain(&self) -> uuid::Uuid {
            self.$($d).+
        }
        fn disk(&self) -> Option<TagId> {
            Some(self.$($k).+)
        }
        fn plan(&self) -> &'static [Step] {
            &[$(Step::$step),+]
        }
    };
}

mod call;
mod copy;
mod from_disk;
pub(crate) mod image;
mod merge;

/// What every kind's module works with.
mod prelude {
    pub(super) use std::sync::Arc;

    pub(super) use cairn_domain::TagId;
    pub(super) use serde::{Deserialize, Serialize};

    pub(super) use super::{Kind, Lock};
    pub(super) use crate::coordinator::Coordinator;
    pub(super) use crate::error::{CoordError, Result};
    pub(super) use crate::record::{JobRecord, Step};
}

use std::sync::Arc;

use cairn_domain::{limits, Format, LockGuard, TagId};
use serde::{Deserialize, Serialize};

use crate::coordinator::Coordinator;
use crate::error::{CoordError, Result};
use crate::record::{JobRecord, Step};

pub use call::{Create, Delete, Extend, Snapshot, ThinClone};
pub use copy::{Convert, CopyTo, FullClone, Move};
pub use from_disk::FromDisk;
pub use image::FromImage;
pub use merge::DeleteSnapshot;

/// What a job was asked to do, with domains resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "params", rename_all = "kebab-case")]
pub enum JobSpec {
    /// Create a disk.
    Create(Create),
    /// Snapshot a disk.
    Snapshot(Snapshot),
    /// Thin clone of a disk or snapshot.
    Clone(ThinClone),
    /// Full clone (a copy in the same domain).
    FullClone(FullClone),
    /// Merge a snapshot away.
    DeleteSnapshot(DeleteSnapshot),
    /// Delete a disk.
    Delete(Delete),
    /// Copy to another domain.
    Copy(CopyTo),
    /// Copy, then delete the source.
    Move(Move),
    /// Grow a disk.
    Extend(Extend),
    /// Rewrite in another format.
    Convert(Convert),
    /// A disk made from an image.
    FromImage(FromImage),
    /// An image made from a disk.
    ImageFromDisk(FromDisk),
}

impl JobSpec {
    /// The behaviour of this kind of job.
    pub(crate) fn kind(&self) -> &dyn Kind {
        match self {
            JobSpec::Create(k) => k,
            JobSpec::Snapshot(k) => k,
            JobSpec::Clone(k) => k,
            JobSpec::FullClone(k) => k,
            JobSpec::DeleteSnapshot(k) => k,
            JobSpec::Delete(k) => k,
            JobSpec::Copy(k) => k,
            JobSpec::Move(k) => k,
            JobSpec::Extend(k) => k,
            JobSpec::Convert(k) => k,
            JobSpec::FromImage(k) => k,
            JobSpec::ImageFromDisk(k) => k,
        }
    }

    /// The name clients see.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The domain it works on.
    pub fn domain(&self) -> uuid::Uuid {
        self.kind().domain()
    }

    /// The disk or snapshot it works on (none for a create).
    pub fn disk(&self) -> Option<TagId> {
        self.kind().disk()
    }

    /// Its steps after Begin, in order.
    pub fn plan(&self) -> &'static [Step] {
        self.kind().plan()
    }

    /// The image the job `job` of this spec makes, if it makes one.
    pub fn image(&self, job: &str) -> Option<String> {
        match self {
            JobSpec::ImageFromDisk(k) => Some(k.image_id(job)),
            _ => None,
        }
    }

    /// Whether it runs in the background (the call returns at once).
    pub fn long(&self) -> bool {
        !self.plan().contains(&Step::Call)
    }

    /// Check what can be checked without the cluster.
    pub fn validate(&self) -> Result<()> {
        self.kind().validate()
    }

    /// Check it against the state of the cluster, before it is recorded.
    pub async fn admit(&self, c: &Coordinator) -> Result<()> {
        self.kind().admit(c).await
    }
}

/// The disk lock a step runs under, if any.
pub(crate) type Lock<'a> = Option<&'a LockGuard>;

/// What each kind of job does.
#[tonic::async_trait]
pub(crate) trait Kind: Send + Sync {
    /// The name clients see.
    fn name(&self) -> &'static str;
    /// The domain it works on.
    fn domain(&self) -> uuid::Uuid;
    /// The disk or snapshot it works on.
    fn disk(&self) -> Option<TagId>;
    /// Its steps after Begin.
    fn plan(&self) -> &'static [Step];
    /// Check its fields (nothing to check by default).
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    /// Check it against the state of the cluster before it is recorded (a
    /// request the state refuses starts no job); nothing by default.
    async fn admit(&self, _c: &Coordinator) -> Result<()> {
        Ok(())
    }
    /// The disk whose lock it runs under: by default the one it works on.
    async fn lock_target(&self, _c: &Coordinator) -> Result<Option<TagId>> {
        Ok(self.disk())
    }
    /// Carry out `rec.step` on replica `c`; its results go into `rec`.
    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, lock: Lock<'_>) -> Result<()>;
    /// Whether `rec.step` took effect though nobody heard its answer (the
    /// domain is settled); fills in the step's results when it did. By
    /// default: whether the disk the job makes is on the domain.
    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        c.found_made(rec, self.domain()).await
    }
}

pub use cairn_domain::limits::{MAX_CAPACITY as MAX_SIZE, MAX_DESCRIPTION, MAX_NAME};

fn check_name(name: &str) -> Result<()> {
    if name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(CoordError::invalid(
            "name",
            format!("must be at most {MAX_NAME} bytes without control characters"),
        ));
    }
    Ok(())
}

/// A new disk's name and description.
fn check_label(name: &str, description: &str) -> Result<()> {
    check_name(name)?;
    check_description(description)
}

fn check_description(d: &str) -> Result<()> {
    Ok(limits::check_text("description", d, MAX_DESCRIPTION)?)
}

fn check_size(size: u64) -> Result<()> {
    Ok(limits::check_capacity("size", size)?)
}

/// The options of a disk a job makes: the job (so that a retry finds
/// it), its name, its owner, and `extra` ones that are set.
fn options(name: &str, job: &str, owner: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut o = vec![(crate::plan::JOB_KEY.to_string(), job.to_string())];
    if !owner.is_empty() {
        o.push((crate::plan::OWNER_KEY.to_string(), owner.to_string()));
    }
    if !name.is_empty() {
        o.push((crate::plan::NAME_KEY.to_string(), name.to_string()));
    }
    for (k, v) in extra {
        if !v.is_empty() {
            o.push((k.to_string(), v.to_string()));
        }
    }
    o
}

/// How optional fields are kept in a record: an empty string is none, as
/// in records of earlier versions.
mod text {
    use cairn_domain::Allocation;
    use serde::{Deserialize, Deserializer};

    /// An optional format: an empty string is none.
    pub mod opt_format {
        use cairn_domain::Format;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(f: &Option<Format>, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(f.map(Format::as_str).unwrap_or(""))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Format>, D::Error> {
            let s = String::deserialize(d)?;
            if s.is_empty() {
                return Ok(None);
            }
            s.parse().map(Some).map_err(serde::de::Error::custom)
        }
    }

    pub fn de_allocation<'de, D: Deserializer<'de>>(d: D) -> Result<Allocation, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(Allocation::Sparse);
        }
        s.parse().map_err(serde::de::Error::custom)
    }

    pub fn sparse() -> Allocation {
        Allocation::Sparse
    }
}

/// A format asked for, or the source's.
pub(crate) fn format_or(f: Option<Format>, source: Format) -> Format {
    f.unwrap_or(source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::next_step;
    use cairn_domain::Allocation;

    fn walk(spec: &JobSpec) -> Vec<Step> {
        let mut s = Step::Begin;
        let mut out = vec![];
        while s != Step::Done {
            s = next_step(spec.plan(), s);
            out.push(s);
        }
        out
    }

    #[test]
    fn composed_operations_follow_their_plans() {
        let (domain, disk) = (uuid::Uuid::new_v4(), TagId::generate(1));
        let create = JobSpec::Create(Create {
            domain,
            name: String::new(),
            format: Format::Raw,
            allocation: Allocation::Sparse,
            size: 512,
            description: String::new(),
            wipe_after_delete: false,
        });
        let to = CopyTo {
            domain,
            disk,
            target: domain,
            format: None,
            allocation: Allocation::Sparse,
        };
        let convert = JobSpec::Convert(Convert {
            domain,
            disk,
            format: Format::Qcow2,
            allocation: Allocation::Sparse,
            flatten: false,
        });
        let full = JobSpec::FullClone(FullClone {
            domain,
            source: disk,
            name: String::new(),
            format: None,
            allocation: Allocation::Sparse,
            description: String::new(),
        });
        let merge = JobSpec::DeleteSnapshot(DeleteSnapshot {
            domain,
            snapshot: disk,
        });
        assert_eq!(walk(&create), [Step::Call, Step::Done]);
        assert_eq!(
            walk(&JobSpec::Move(Move(to.clone()))),
            [Step::Copy, Step::DeleteSource, Step::Done]
        );
        assert_eq!(walk(&convert), [Step::Copy, Step::Swap, Step::Done]);
        assert_eq!(walk(&merge), [Step::Merge, Step::Done]);
        assert_eq!(walk(&full), [Step::Copy, Step::Done]);
        assert_eq!(walk(&JobSpec::Copy(to)), [Step::Copy, Step::Done]);
        assert!(!create.long() && convert.long() && merge.long());
        assert!(crate::record::cancellable(Step::Copy) && !crate::record::cancellable(Step::Swap));
        assert!(!crate::record::cancellable(Step::DeleteSource));
    }

    #[test]
    fn specs_are_checked_before_anything_runs() {
        let mut c = Create {
            domain: uuid::Uuid::nil(),
            name: String::new(),
            format: Format::Raw,
            allocation: Allocation::Sparse,
            size: 1000,
            description: String::new(),
            wipe_after_delete: false,
        };
        assert!(matches!(
            JobSpec::Create(c.clone()).validate(),
            Err(CoordError::InvalidArgument { field: "size", .. })
        ));
        c.size = 4096;
        JobSpec::Create(c.clone()).validate().unwrap();
        c.name = "x".repeat(MAX_NAME + 1);
        assert!(matches!(
            JobSpec::Create(c.clone()).validate(),
            Err(CoordError::InvalidArgument { field: "name", .. })
        ));
        c.name.clear();
        c.description = "d".repeat(MAX_DESCRIPTION + 1);
        assert!(matches!(
            JobSpec::Create(c).validate(),
            Err(CoordError::InvalidArgument {
                field: "description",
                ..
            })
        ));
    }
}
