//! Carrying out file requests: read a domain's listing through an agent,
//! plan with the functions of [`super`], commit expecting the listing's
//! generation, and plan again when another change came first.

use cairn_domain::catalog::{FileVersion, MAX_INLINE};
use std::sync::Arc;

use cairn_proto::auth::Identity;
use tokio_stream::{Stream, StreamExt};

use super::index::{data_owner, DomainCatalog};
use super::{
    base_rid, busy, moved, pick_version, plan_delete, plan_upload, Location, UploadPlan, TRIES,
};
use crate::agents::{AgentConn, Chunks, Commit, FileVolume, Pick};
use crate::coordinator::Coordinator;
use crate::error::{CoordError, Result};
use crate::plan::DomainRef;
use crate::runner::check_request_id;

/// An upload as the service hands it over.
#[derive(Debug, Clone, Default)]
pub struct Upload {
    /// The caller's request id (empty: none).
    pub request_id: String,
    /// Where to.
    pub location: String,
    /// The bytes to come.
    pub size: u64,
    /// Their SHA-256 as the caller says (hex; empty: not checked).
    pub sha256: String,
    /// A directory marker.
    pub directory: bool,
}

impl Coordinator {
    /// A location, its domain, and the domain's listing.
    async fn listing_at(
        &self,
        location: &str,
    ) -> Result<(Location, DomainRef, Arc<DomainCatalog>)> {
        let loc = Location::parse(location)?;
        let d = self.domain(&loc.domain).await?;
        let dd = &d;
        let l = self
            .agents
            .with_agent(
                Pick::on(&d.id),
                |c| async move { self.catalog_of(&c, dd).await },
            )
            .await?;
        Ok((loc, d, l))
    }

    /// The latest version of every file under `location` that `who` may
    /// see, and the generation they were read at.
    pub async fn list_files(
        &self,
        who: &Identity,
        location: &str,
    ) -> Result<(DomainRef, u64, Vec<FileVersion>)> {
        let (loc, d, l) = self.listing_at(location).await?;
        let files = super::listing(who, &loc, &l.files)
            .into_values()
            .cloned()
            .collect();
        Ok((d, l.generation, files))
    }

    /// Every version of the file at `location`, oldest first.
    pub async fn file_versions(
        &self,
        who: &Identity,
        location: &str,
    ) -> Result<(DomainRef, u64, Vec<FileVersion>)> {
        let (loc, d, l) = self.listing_at(location).await?;
        let v = super::file_versions(who, &loc, &l.about(&[&loc.path], None, None))?
            .into_iter()
            .cloned()
            .collect();
        Ok((d, l.generation, v))
    }

    /// A file version's bytes (the latest for `version` 0).
    pub async fn read_file(
        &self,
        who: &Identity,
        location: &str,
        version: u64,
    ) -> Result<(DomainRef, FileVersion, Chunks)> {
        let loc = Location::parse(location)?;
        let d = self.domain(&loc.domain).await?;
        let c = self.catalog_agent(&d).await?;
        let l = self.catalog_of(&c, &d).await?;
        let f = pick_version(who, &loc, version, &l.about(&[&loc.path], None, None))?.clone();
        let chunks = c.read_file(&d.id, &f.tag).await?;
        Ok((d, f, chunks))
    }

    /// Delete one version of a file, or all (`version` 0): the versions
    /// deleted.
    pub async fn delete_file(
        &self,
        who: &Identity,
        request_id: &str,
        location: &str,
        version: u64,
    ) -> Result<Vec<u64>> {
        check_request_id(request_id)?;
        self.catalog_writable()?;
        let loc = Location::parse(location)?;
        super::store::check_not_reserved(loc.file_path()?)?;
        let d = self.domain(&loc.domain).await?;
        let c = self.catalog_agent(&d).await?;
        let base = base_rid("file", who, request_id);
        let _turn = self.catalogs.writer_turn(&d.id).await;
        for attempt in 0..TRIES {
            let l = self.catalog_of(&c, &d).await?;
            let about = l.about(&[&loc.path], None, None);
            let doomed = plan_delete(who, &loc, version, &about)?;
            let tags: Vec<_> = doomed.iter().map(|f| f.tag).collect();
            let rid = format!("{base}.{attempt}");
            match c.delete_files(&rid, &d.id, &tags, l.generation).await {
                Ok(_) => return Ok(doomed.iter().map(|f| f.version).collect()),
                Err(e) if moved(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(busy(&format!("domain {}", loc.domain)))
    }

    /// Upload a file version: `data` yields its bytes. Its domain, the
    /// version made, and whether this request made it (false: a retry of
    /// one that did).
    pub async fn upload_file<S>(
        &self,
        who: &Identity,
        up: &Upload,
        data: S,
    ) -> Result<(DomainRef, FileVersion, bool)>
    where
        S: Stream<Item = Result<Vec<u8>>> + Send + Unpin + 'static,
    {
        check_request_id(&up.request_id)?;
        self.catalog_writable()?;
        let loc = Location::parse(&up.location)?;
        super::store::check_not_reserved(loc.file_path()?)?;
        if up.directory && up.size != 0 {
            return Err(CoordError::invalid(
                "size",
                "a directory marker has no bytes",
            ));
        }
        check_sha(&up.sha256)?;
        let d = self.domain(&loc.domain).await?;
        let (f, created) = self.upload_to(who, up, &loc, &d, data).await?;
        Ok((d, f, created))
    }

    /// Upload to `loc` on `d`, `loc` checked (see [`Self::upload_file`]).
    pub(super) async fn upload_to<S>(
        &self,
        who: &Identity,
        up: &Upload,
        loc: &Location,
        d: &DomainRef,
        data: S,
    ) -> Result<(FileVersion, bool)>
    where
        S: Stream<Item = Result<Vec<u8>>> + Send + Unpin + 'static,
    {
        let path = loc.path.clone();
        let c = self.catalog_agent(d).await?;
        let base = base_rid("file", who, &up.request_id);
        let l = self.catalog_of(&c, d).await?;
        let owner = match plan_upload(who, loc, &base, &upload_about(&l, loc, &base))? {
            UploadPlan::Done(f) => return Ok((f, false)),
            UploadPlan::Commit { owner } => owner,
        };
        let want_sha = up.sha256.to_ascii_lowercase();
        let mut commit = Commit {
            rid: String::new(),
            path: &path,
            owner: &owner,
            directory: up.directory,
            data: &[],
            volume: None,
            expect: l.generation,
        };
        if up.size <= MAX_INLINE {
            let bytes = collect(data, up.size).await?;
            let sha = cairn_proto::auth::hex(
                ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
            );
            if !want_sha.is_empty() && sha != want_sha {
                return Err(mismatch(&sha, &want_sha));
            }
            commit.data = &bytes;
            return self.commit_planned(who, loc, &c, d, &base, commit).await;
        }
        let capacity = up.size.div_ceil(1 << 20) << 20;
        let vol = c.file_volume("", &d.id, capacity).await?;
        let made = self
            .fill_and_commit(
                who, loc, &c, d, &base, &vol, up.size, &want_sha, data, commit,
            )
            .await;
        match &made {
            Ok((f, true)) if f.volume == vol.id => {
                if let Err(e) = c.unlock(&vol).await {
                    tracing::warn!(volume = %vol.id, error = %e, "a committed file's lock stays until it expires");
                }
            }
            _ => c.drop_file_volume(&d.id, &vol).await,
        }
        made
    }

    /// Stream the bytes into `vol`, check them, and commit.
    #[allow(clippy::too_many_arguments)]
    async fn fill_and_commit<S>(
        &self,
        who: &Identity,
        loc: &Location,
        c: &AgentConn,
        d: &DomainRef,
        base: &str,
        vol: &FileVolume,
        size: u64,
        want_sha: &str,
        data: S,
        mut commit: Commit<'_>,
    ) -> Result<(FileVersion, bool)>
    where
        S: Stream<Item = Result<Vec<u8>>> + Send + Unpin + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        // The caller's bytes go on to the agent as they come; what went
        // wrong on the way in ends the agent's stream early.
        let feed = tokio::spawn(async move {
            let mut data = data;
            let mut n = 0u64;
            while let Some(chunk) = data.next().await {
                let chunk = chunk?;
                n += chunk.len() as u64;
                if n > size {
                    return Err(CoordError::invalid(
                        "data",
                        format!("more than the {size} bytes the header announced"),
                    ));
                }
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(n)
        });
        let wrote = c
            .write_file_volume(&d.id, vol, tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let fed = feed
            .await
            .map_err(|e| CoordError::Internal(format!("the upload's feed failed: {e}")))??;
        let (written, sha) = wrote?;
        if fed != size || written != size {
            return Err(CoordError::invalid(
                "data",
                format!("{fed} bytes came, not the {size} the header announced"),
            ));
        }
        if !want_sha.is_empty() && sha != want_sha {
            return Err(mismatch(&sha, want_sha));
        }
        commit.volume = Some(vol);
        self.commit_planned(who, loc, c, d, base, commit).await
    }

    /// Commit `commit`, planned at its `expect` generation; when the
    /// catalog moved, plan again against a fresh listing.
    async fn commit_planned(
        &self,
        who: &Identity,
        loc: &Location,
        c: &AgentConn,
        d: &DomainRef,
        base: &str,
        mut commit: Commit<'_>,
    ) -> Result<(FileVersion, bool)> {
        let _turn = self.catalogs.writer_turn(&d.id).await;
        for attempt in 0..TRIES {
            commit.rid = format!("{base}.{attempt}");
            match c.commit_file(&d.id, &commit).await {
                Ok(f) => return Ok((f, true)),
                Err(e) if moved(&e) => {
                    let l = self.catalog_of(c, d).await?;
                    match plan_upload(who, loc, base, &upload_about(&l, loc, base))? {
                        UploadPlan::Done(f) => return Ok((f, false)),
                        UploadPlan::Commit { .. } => commit.expect = l.generation,
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(busy(&format!("domain {}", loc.domain)))
    }
}

/// Refuse a SHA-256 that is neither empty nor 64 hex digits.
pub(super) fn check_sha(sha: &str) -> Result<()> {
    if !sha.is_empty() && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(CoordError::invalid("sha256", "is not 64 hex digits"));
    }
    Ok(())
}

fn mismatch(got: &str, want: &str) -> CoordError {
    CoordError::DataLoss(format!(
        "the bytes' SHA-256 is {got}, not the {want} the header announced"
    ))
}

/// All of a small upload's bytes: exactly `size`.
async fn collect<S>(mut data: S, size: u64) -> Result<Vec<u8>>
where
    S: Stream<Item = Result<Vec<u8>>> + Unpin,
{
    let mut out = Vec::with_capacity(size as usize);
    while let Some(chunk) = data.next().await {
        out.extend_from_slice(&chunk?);
        if out.len() as u64 > size {
            return Err(CoordError::invalid(
                "data",
                format!("more than the {size} bytes the header announced"),
            ));
        }
    }
    if out.len() as u64 != size {
        return Err(CoordError::invalid(
            "data",
            format!(
                "{} bytes came, not the {size} the header announced",
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// The file versions [`plan_upload`] looks at: `loc`'s, those request
/// `base` made, and the image whose data directory `loc` is in.
fn upload_about(l: &DomainCatalog, loc: &Location, base: &str) -> Vec<FileVersion> {
    l.about(&[&loc.path], Some(base), data_owner(&loc.path))
}
