//! An image made from a disk's current state, under the disk's lock:
//!
//! 1. Snapshot: the disk gets a new top, so its old top keeps still. It is
//!    the only moment the disk's writer notices (as with any snapshot).
//! 2. Copy: an agent copies the snapshot's chain, flattened, into a new raw
//!    volume and commits it as a version of a catalog file on the disk's
//!    domain. The SHA-256 it records is its own reading of the volume.
//! 3. Register: the image is registered from that version (with its
//!    metafile beside it, as a registration does). Its id comes from the
//!    file's path, so it is known from the start.
//! 4. Merge: the snapshot is merged away. While the disk is active the
//!    snapshot stays, and the leader merges it once the disk is not
//!    (as it does for a job that failed or was cancelled after step 1).
//!
//! Each step's effect can be found on the domain (a weak tag carrying the
//! job's id, a file version carrying it as its request, the image on that
//! version, the snapshot gone), so a coordinator that takes the job over
//! neither repeats nor loses one.

use std::collections::BTreeMap;

use cairn_domain::TagType;
use cairn_proto::auth::{Identity, Role};
use cairn_proto::keys::IMAGE_SNAPSHOT_JOB;

use super::prelude::*;
use crate::catalog::images::{self, Register};
use crate::catalog::{domain_name, Location};
use crate::plan::DomainRef;

/// What an image from a disk asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FromDisk {
    /// The disk's domain, where the image's file goes.
    pub domain: uuid::Uuid,
    /// The disk.
    pub disk: TagId,
    /// The image's name.
    pub name: String,
    /// The file's path; empty: [`FromDisk::path`]'s default.
    #[serde(default)]
    pub path: String,
    /// The image's properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Publish it.
    #[serde(default)]
    pub public: bool,
}

impl FromDisk {
    /// The file's path for job `job`.
    pub fn path(&self, job: &str) -> String {
        if self.path.is_empty() {
            format!("images/from-disk/{}-{job}.raw", self.disk)
        } else {
            self.path.clone()
        }
    }

    /// The id the image of job `job` gets.
    pub fn image_id(&self, job: &str) -> String {
        images::image_id(&self.domain, &self.path(job))
    }

    fn register(&self, version: TagId) -> Register {
        Register {
            name: self.name.clone(),
            properties: self.properties.clone(),
            public: self.public,
            disk_format: "raw".into(),
            container_format: "bare".into(),
            version: Some(version),
            ..Register::default()
        }
    }

    fn domain_ref(&self) -> DomainRef {
        DomainRef {
            id: self.domain,
            name: String::new(),
        }
    }

    /// The version the copy step of job `job` made, if it is there.
    async fn made_file(
        &self,
        c: &Coordinator,
        job: &str,
    ) -> Result<Option<cairn_domain::catalog::FileVersion>> {
        let versions = c.versions_at(&self.domain_ref(), &self.path(job)).await?;
        Ok(versions.into_iter().find(|v| v.request == job))
    }
}

/// Who registers the image: the job's caller, as the owner of the file it
/// made.
fn registrar(rec: &JobRecord) -> Identity {
    Identity {
        name: rec.caller.clone(),
        role: Role::User,
    }
}

#[tonic::async_trait]
impl Kind for FromDisk {
    facts!("image-from-disk", [Snapshot, Copy, Register, Merge], domain: domain, disk: disk);

    /// Name, path and properties are checked as a registration checks
    /// them, before anything is made.
    fn validate(&self) -> Result<()> {
        if !self.path.is_empty() {
            cairn_domain::catalog::check_path(&self.path)?;
            crate::catalog::store::check_not_reserved(&self.path)?;
            cairn_domain::catalog::check_path(&format!("{}.meta", self.path))?;
        }
        let who = Identity {
            name: "check".into(),
            role: Role::User,
        };
        let probe = cairn_domain::catalog::FileVersion {
            tag: TagId::generate(1),
            volume: cairn_domain::VolumeId::generate(1),
            path: self.path("probe"),
            version: 1,
            size: 0,
            sha256: String::new(),
            owner: who.name.clone(),
            created: 0,
            directory: false,
            inline: false,
            image: None,
            request: String::new(),
        };
        let loc = Location::full(&who.name, &self.domain.to_string(), &probe.path);
        images::plan_register(
            &who,
            &probe,
            &loc,
            &self.domain,
            &self.register(probe.tag),
            0,
        )?;
        Ok(())
    }

    /// A read-only catalog makes no image, and a path given must be new.
    async fn admit(&self, c: &Coordinator) -> Result<()> {
        c.catalog_writable()?;
        if self.path.is_empty() {
            return Ok(());
        }
        let d = c.domain(&self.domain.to_string()).await?;
        if !c.versions_at(&d, &self.path).await?.is_empty() {
            return Err(CoordError::FailedPrecondition(format!(
                "{}:{} already exists; an image from a disk makes a new file",
                domain_name(&d),
                self.path
            )));
        }
        Ok(())
    }

    async fn step(&self, c: &Arc<Coordinator>, rec: &mut JobRecord, lock: Lock<'_>) -> Result<()> {
        let (dom, disk) = (self.domain, self.disk);
        match rec.step {
            Step::Snapshot => {
                let desc = format!("for image {}", self.image_id(&rec.id));
                let job = rec.id.clone();
                let mark = [(IMAGE_SNAPSHOT_JOB, job.as_str())];
                super::call::snapshot(c, rec, dom, disk, &desc, &mark).await?;
                Ok(())
            }
            Step::Copy => {
                let snap = snapshot_made(rec)?;
                let vol = c.tag(&dom, &snap).await?.volume;
                let (path, owner, job) = (self.path(&rec.id), rec.caller.clone(), rec.id.clone());
                let made = c
                    .agent_job(rec, lock, &dom, None, |a, rid| {
                        let (path, owner, job) = (path.clone(), owner.clone(), job.clone());
                        async move { a.copy_to_file(&rid, &dom, &vol, &path, &owner, &job).await }
                    })
                    .await?;
                match made {
                    Some(Some(t)) => rec.file = t.id.to_string(),
                    Some(None) => {
                        return Err(CoordError::Internal(
                            "a copy into a file without its tag".into(),
                        ))
                    }
                    // Found done on the domain: `rec.file` is set.
                    None => {}
                }
                Ok(())
            }
            Step::Register => {
                let file = crate::coordinator::parse_tag("file", &rec.file)?;
                let d = c.domain(&dom.to_string()).await?;
                let loc = format!("{}:{}", domain_name(&d), self.path(&rec.id));
                let rid = format!("{}.register", rec.id);
                c.register_image(
                    &registrar(rec),
                    &rid,
                    &loc,
                    &self.register(file),
                    false,
                    false,
                )
                .await?;
                rec.made(dom, disk);
                Ok(())
            }
            _ => {
                let snap = snapshot_made(rec)?;
                if let Err(e) = c.refuse_active(&dom, &disk).await {
                    tracing::info!(job = %rec.id, snapshot = %snap, reason = %e, "the image's snapshot stays for the leader to merge");
                    return Ok(());
                }
                c.agent_job(rec, lock, &dom, None, |a, rid| async move {
                    a.merge(&rid, &dom, &snap).await
                })
                .await?;
                Ok(())
            }
        }
    }

    async fn done(&self, c: &Coordinator, rec: &mut JobRecord) -> Result<bool> {
        match rec.step {
            Step::Snapshot => super::call::snapshot_found(c, rec, self.domain).await,
            Step::Copy => Ok(match self.made_file(c, &rec.id).await? {
                Some(v) => {
                    rec.file = v.tag.to_string();
                    true
                }
                None => false,
            }),
            Step::Register => {
                let done = self
                    .made_file(c, &rec.id)
                    .await?
                    .is_some_and(|v| v.image.as_deref() == Some(&self.image_id(&rec.id)));
                if done {
                    rec.made(self.domain, self.disk);
                }
                Ok(done)
            }
            _ => c.gone(&self.domain, &snapshot_made(rec)?).await,
        }
    }
}

/// The snapshot the job's first step made.
fn snapshot_made(rec: &JobRecord) -> Result<TagId> {
    crate::coordinator::parse_tag("snapshot", &rec.snapshot)
}

impl Coordinator {
    /// Merge away the snapshots among `tags` (of domain `d`) that ended
    /// image-from-disk jobs left behind, each through a delete-snapshot
    /// job, once its disk is not active; how many merges were started. A
    /// merge that fails is tried again in the next ten-minute window.
    pub(crate) async fn merge_image_snapshots(
        self: &Arc<Self>,
        d: &DomainRef,
        tags: &[crate::plan::TagInfo],
    ) -> Result<usize> {
        let mut n = 0;
        for t in tags.iter().filter(|t| t.tag_type == TagType::Weak) {
            let Some(job) = t.option(IMAGE_SNAPSHOT_JOB) else {
                continue;
            };
            match self.job(job).await {
                Ok(r) if r.state == crate::record::JobState::Running => continue,
                Ok(_) | Err(CoordError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            let disk = t
                .option(crate::plan::SNAP_KEY)
                .and_then(|s| TagId::parse("", s).ok());
            if let Some(disk) = disk {
                if self.refuse_active(&d.id, &disk).await.is_err() {
                    continue;
                }
            }
            let rid = format!("unsnap-{}-{}", t.id, crate::coordinator::now() / 600);
            let spec = super::JobSpec::DeleteSnapshot(super::DeleteSnapshot {
                domain: d.id,
                snapshot: t.id,
            });
            let fp = cairn_proto::fingerprint(rid.as_bytes());
            let rec = self.submit(&rid, fp, spec, "").await?;
            if rec.state == crate::record::JobState::Running {
                tracing::info!(domain = %d.id, snapshot = %t.id, job = %rec.id, "merging away a snapshot an image-from-disk job left");
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::next_step;

    fn spec() -> FromDisk {
        FromDisk {
            domain: uuid::Uuid::from_u128(1),
            disk: TagId::generate(2),
            name: "Golden".into(),
            path: String::new(),
            properties: BTreeMap::new(),
            public: false,
        }
    }

    #[test]
    fn an_image_from_a_disk_snapshots_copies_registers_and_merges() {
        let f = spec();
        let s = super::super::JobSpec::ImageFromDisk(f.clone());
        let mut at = Step::Begin;
        let mut steps = vec![];
        while at != Step::Done {
            at = next_step(s.plan(), at);
            steps.push(at);
        }
        assert_eq!(
            steps,
            [
                Step::Snapshot,
                Step::Copy,
                Step::Register,
                Step::Merge,
                Step::Done
            ]
        );
        assert!(s.long(), "the call returns before the copy");
        // The image's id is known from the job's id, and stays.
        assert_eq!(f.image_id("job-1"), f.image_id("job-1"));
        assert_ne!(f.image_id("job-1"), f.image_id("job-2"));
        assert_eq!(s.image("job-1"), Some(f.image_id("job-1")));
        assert!(f.path("job-1").starts_with("images/from-disk/"));
        let given = FromDisk {
            path: "golden.raw".into(),
            ..spec()
        };
        assert_eq!(given.path("job-1"), "golden.raw");
        assert_eq!(
            given.image_id("job-9"),
            images::image_id(&given.domain, "golden.raw")
        );
    }

    #[test]
    fn what_a_registration_would_refuse_is_refused_before_anything_runs() {
        spec().validate().unwrap();
        let field = |f: FromDisk| match f.validate() {
            Err(CoordError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let e = field(FromDisk {
            name: String::new(),
            ..spec()
        });
        assert_eq!(e, "name");
        let mut bad = spec();
        bad.properties.insert("a\tb".into(), "1".into());
        assert_eq!(field(bad), "properties");
        let mut huge = spec();
        huge.properties.insert("k".into(), "v".repeat(1 << 20));
        assert_eq!(field(huge), "properties");
        assert!(FromDisk {
            path: "a/../b.raw".into(),
            ..spec()
        }
        .validate()
        .is_err());
        assert!(FromDisk {
            path: ".images/x/y".into(),
            ..spec()
        }
        .validate()
        .is_err());
    }
}
