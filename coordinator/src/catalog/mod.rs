//! The catalog as the coordinator serves it. Its durable state is on the
//! domains (`cairn_domain::catalog`); this module decides, without I/O,
//! what a request means against a domain's listing: locations, who owns a
//! path, what a user may see, what an upload or delete changes. The
//! calls that carry the decisions out are in [`files`].
//!
//! Every change is planned against a listing read at generation `g` and
//! committed with `g` as the expected generation: when another change
//! came first the agent refuses (ABORTED) and the request is planned again
//! against a fresh listing, so checks made here hold at the commit.

pub mod files;
pub mod glance;
pub mod image_ops;
pub mod images;
pub mod index;
pub mod store;
pub mod store_ops;

use std::collections::BTreeMap;

use cairn_domain::catalog::{check_path, FileVersion};
use cairn_proto::auth::Identity;

use crate::agents::{AgentConn, Pick};
use crate::coordinator::Coordinator;
use crate::error::{CoordError, Result};
use crate::plan::DomainRef;
use crate::runner::job_id;

/// How often a change is planned again when others keep coming first.
const TRIES: usize = 8;

/// The agent request id base of a caller's request, `KIND-…`: one per
/// caller and request id (random without one). Attempts add `.N`.
fn base_rid(kind: &str, who: &Identity, rid: &str) -> String {
    if rid.is_empty() {
        return format!("{kind}-{}", uuid::Uuid::new_v4());
    }
    format!("{kind}-{}", job_id(&format!("{}\0{rid}", who.name)))
}

/// Whether a version's stored request id is an attempt of `base`.
pub fn made_by(stored: &str, base: &str) -> bool {
    stored
        .strip_prefix(base)
        .is_some_and(|r| r.is_empty() || r.starts_with('.'))
}

/// Whether an agent refused because the catalog moved (or its lock was
/// busy): plan again.
fn moved(e: &CoordError) -> bool {
    matches!(e, CoordError::Agent { status, .. } if status.code() == tonic::Code::Aborted)
}

/// Others kept changing the catalog of `what` for [`TRIES`] plans.
fn busy(what: &str) -> CoordError {
    CoordError::Busy(format!("the catalog of {what}"))
}

/// A domain's name for locations (its id when it has none).
pub fn domain_name(d: &DomainRef) -> String {
    if d.name.is_empty() {
        d.id.to_string()
    } else {
        d.name.clone()
    }
}

impl Coordinator {
    /// The versions of the file at `path` on domain `d`, oldest first.
    pub(crate) async fn versions_at(
        &self,
        d: &DomainRef,
        path: &str,
    ) -> Result<Vec<cairn_domain::catalog::FileVersion>> {
        let c = self.catalog_agent(d).await?;
        let l = self.catalog_of(&c, d).await?;
        Ok(l.versions(path).into_iter().cloned().collect())
    }

    /// An agent that sees domain `d` (the calls of one request go to it).
    async fn catalog_agent(&self, d: &DomainRef) -> Result<AgentConn> {
        self.agents
            .with_agent(Pick::on(&d.id), |c| async move { Ok(c) })
            .await
    }
}

/// Where a file is, as a caller names it: `DOMAIN:PATH` or
/// `cairn://OWNER/DOMAIN/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The owner the location names (`cairn://` form only).
    pub owner: Option<String>,
    /// The domain's name or id.
    pub domain: String,
    /// The path (empty: the whole domain, as a prefix).
    pub path: String,
}

/// The URL scheme of a full location.
pub const SCHEME: &str = "cairn://";

impl Location {
    /// Parse a location; `PATH` may be empty only as a listing prefix
    /// (checked by [`Location::file_path`] for a file).
    pub fn parse(s: &str) -> Result<Location> {
        let bad = |why: &str| {
            CoordError::invalid(
                "location",
                format!("{}: {why}", cairn_domain::limits::quote(s)),
            )
        };
        if s.chars().any(char::is_control) {
            return Err(bad("holds a control character"));
        }
        let (owner, domain, path) = if let Some(rest) = s.strip_prefix(SCHEME) {
            let mut it = rest.splitn(3, '/');
            let owner = it.next().unwrap_or_default();
            let domain = it.next().unwrap_or_default();
            let path = it.next().unwrap_or_default();
            if owner.is_empty() {
                return Err(bad("no owner (cairn://OWNER/DOMAIN/PATH)"));
            }
            (Some(owner.to_string()), domain, path)
        } else if let Some((domain, path)) = s.split_once(':') {
            if domain.contains('/') {
                return Err(bad("expected DOMAIN:PATH or cairn://OWNER/DOMAIN/PATH"));
            }
            (None, domain, path)
        } else {
            return Err(bad("expected DOMAIN:PATH or cairn://OWNER/DOMAIN/PATH"));
        };
        if domain.is_empty() {
            return Err(bad("no domain"));
        }
        Ok(Location {
            owner,
            domain: domain.to_string(),
            path: path.to_string(),
        })
    }

    /// The path of a single file: refused when it is not a clean one.
    pub fn file_path(&self) -> Result<&str> {
        check_path(&self.path)?;
        Ok(&self.path)
    }

    /// The full form, `cairn://OWNER/DOMAIN/PATH`.
    pub fn full(owner: &str, domain: &str, path: &str) -> String {
        format!("{SCHEME}{owner}/{domain}/{path}")
    }
}

/// The owner a new file would get: the location's when it names one (a
/// `user` may name only itself), else the caller.
pub fn owner_for(who: &Identity, loc: &Location) -> Result<String> {
    match &loc.owner {
        None => Ok(who.name.clone()),
        Some(o) if who.may_act_on(Some(o)) => Ok(o.clone()),
        Some(o) => Err(CoordError::Denied(format!(
            "{} may not act for owner {o}",
            who.name
        ))),
    }
}

/// Whether `who` may see file version `f` under location `loc` (a `user`
/// only its own; a location's owner filters).
pub fn visible(who: &Identity, loc: &Location, f: &FileVersion) -> bool {
    who.may_act_on(Some(&f.owner)) && loc.owner.as_ref().is_none_or(|o| *o == f.owner)
}

/// The versions of `path`, oldest first.
pub fn versions_of<'a>(files: &'a [FileVersion], path: &str) -> Vec<&'a FileVersion> {
    let mut v: Vec<_> = files.iter().filter(|f| f.path == path).collect();
    v.sort_by_key(|f| f.version);
    v
}

/// The latest version of every file under `prefix` that `who` may see,
/// by path.
pub fn listing<'a>(
    who: &Identity,
    loc: &Location,
    files: impl IntoIterator<Item = &'a FileVersion>,
) -> BTreeMap<&'a str, &'a FileVersion> {
    let mut out: BTreeMap<&str, &FileVersion> = BTreeMap::new();
    // A directory marker is listed under its own prefix too (`images`
    // under `images/`), as kamaki lists `D images/`.
    let under = |f: &FileVersion| {
        f.path.starts_with(&loc.path)
            || (f.directory && loc.path.strip_suffix('/') == Some(f.path.as_str()))
    };
    // The images' data items are listed only when asked for.
    let hidden = |f: &FileVersion| store::reserved(&f.path) && !store::reserved(&loc.path);
    for f in files
        .into_iter()
        .filter(|f| under(f) && !hidden(f) && visible(who, loc, f))
    {
        let e = out.entry(f.path.as_str()).or_insert(f);
        if f.version > e.version {
            *e = f;
        }
    }
    out
}

/// The versions of the one file `loc` names that `who` may act on:
/// NOT_FOUND when there are none, PERMISSION_DENIED when they are
/// another's.
pub fn file_versions<'a>(
    who: &Identity,
    loc: &Location,
    files: &'a [FileVersion],
) -> Result<Vec<&'a FileVersion>> {
    let path = loc.file_path()?;
    let v = versions_of(files, path);
    let Some(first) = v.first() else {
        return Err(CoordError::NotFound {
            kind: "file",
            id: loc_name(loc),
        });
    };
    if !visible(who, loc, first) {
        return Err(denied(who, path));
    }
    Ok(v)
}

fn loc_name(loc: &Location) -> String {
    format!("{}:{}", loc.domain, loc.path)
}

fn denied(who: &Identity, path: &str) -> CoordError {
    CoordError::Denied(format!(
        "{} may not act on {}: it belongs to another owner",
        who.name,
        cairn_domain::limits::quote(path)
    ))
}

/// What an upload to `loc` is to do, from the domain's listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadPlan {
    /// Commit a new version owned by `owner`.
    Commit {
        /// Its owner.
        owner: String,
    },
    /// The request was done before: this version is its answer.
    Done(FileVersion),
}

/// Plan an upload of `loc` for `who` with agent request id `rid`: the
/// version `rid` made already (a retry), or the owner of the new version.
/// Refused when the path is another's, or its latest version holds a
/// registered image.
pub fn plan_upload(
    who: &Identity,
    loc: &Location,
    rid: &str,
    files: &[FileVersion],
) -> Result<UploadPlan> {
    let path = loc.file_path()?;
    // A data item's file is kept only beside its image.
    if let Some(rest) = path
        .strip_prefix(store::DATA_DIR)
        .and_then(|r| r.strip_prefix('/'))
    {
        let id = rest.split('/').next().unwrap_or_default();
        if !files.iter().any(|f| f.image.as_deref() == Some(id)) {
            return Err(CoordError::NotFound {
                kind: "image",
                id: id.to_string(),
            });
        }
    }
    // What the request made before, whatever order the versions are in.
    let made: Vec<_> = files.iter().filter(|f| made_by(&f.request, rid)).collect();
    if made.iter().any(|f| f.path != path) {
        return Err(CoordError::RequestIdReused(rid.to_string()));
    }
    if let Some(f) = made.into_iter().max_by_key(|f| f.version) {
        return Ok(UploadPlan::Done(f.clone()));
    }
    let v = versions_of(files, path);
    let owner = match (v.first(), &loc.owner) {
        (None, _) => owner_for(who, loc)?,
        (Some(first), named) => {
            if !who.may_act_on(Some(&first.owner))
                || named.as_ref().is_some_and(|o| *o != first.owner)
            {
                return Err(denied(who, path));
            }
            first.owner.clone()
        }
    };
    if let Some(image) = v.last().and_then(|l| l.image.as_ref()) {
        return Err(CoordError::FailedPrecondition(format!(
            "{} holds registered image {image}; unregister it first",
            loc_name(loc)
        )));
    }
    Ok(UploadPlan::Commit { owner })
}

/// The versions a delete of `loc` (one `version`, or 0 for all) removes.
/// Refused when one holds a registered image.
pub fn plan_delete<'a>(
    who: &Identity,
    loc: &Location,
    version: u64,
    files: &'a [FileVersion],
) -> Result<Vec<&'a FileVersion>> {
    let all = file_versions(who, loc, files)?;
    let doomed: Vec<_> = all
        .into_iter()
        .filter(|f| version == 0 || f.version == version)
        .collect();
    if doomed.is_empty() {
        return Err(CoordError::NotFound {
            kind: "file version",
            id: format!("{} version {version}", loc_name(loc)),
        });
    }
    if let Some(f) = doomed.iter().find(|f| f.image.is_some()) {
        return Err(CoordError::FailedPrecondition(format!(
            "{} version {} holds registered image {}; unregister it first",
            loc_name(loc),
            f.version,
            f.image.as_deref().unwrap_or_default()
        )));
    }
    Ok(doomed)
}

/// The version of `loc` to read: `version`, or the latest for 0.
pub fn pick_version<'a>(
    who: &Identity,
    loc: &Location,
    version: u64,
    files: &'a [FileVersion],
) -> Result<&'a FileVersion> {
    let all = file_versions(who, loc, files)?;
    let found = if version == 0 {
        all.last().copied()
    } else {
        all.iter().find(|f| f.version == version).copied()
    };
    found.ok_or_else(|| CoordError::NotFound {
        kind: "file version",
        id: format!("{} version {version}", loc_name(loc)),
    })
}

#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod tests;
