//! The catalog's files on a domain (see `cairn_domain::catalog`): commit a
//! version from inline bytes or from a volume written through
//! WriteVolumeData, list, delete, read.

use std::fs::File;

use cairn_domain::catalog::{
    Anchor, Changes, FileBytes, FileVersion, ImageChange, Listing, NewFile,
};

use super::*;
use crate::jobs::open_direct;

/// Where a file version's bytes are read from.
pub enum FileRead {
    /// A small file's bytes (already cut to the range asked for).
    Inline(Vec<u8>),
    /// The device, the device offset to start at, and the bytes to read.
    Volume(File, u64, u64),
}

impl Agent {
    /// The domain's catalog anchor: made on the first change (`create`),
    /// else `None` while there is none.
    fn anchor(&self, o: &Opened, create: bool) -> Result<Option<Anchor>> {
        if let Some(a) = o.anchor.get() {
            return Ok(Some(*a));
        }
        let a = if create {
            Some(o.domain.ensure_anchor()?)
        } else {
            o.domain.find_anchor()?
        };
        if let Some(a) = a {
            let _ = o.anchor.set(a);
        }
        Ok(a)
    }

    /// Note what a WriteVolumeData stream from offset 0 wrote under
    /// `lock_id`: what CommitFile records.
    pub fn note_written(&self, lock_id: &str, bytes: u64, sha256: String) {
        let mut m = self.written.lock().expect("poisoned");
        m.insert(lock_id.to_string(), (bytes, sha256));
    }

    /// Commit a new version of a file: `data` inline, or the volume
    /// written under `lock_id`.
    pub fn commit_file(
        &self,
        o: &Opened,
        f: &NewFile,
        data: &[u8],
        volume: Option<(VolumeId, &str)>,
        expect: Option<u64>,
        request_id: [u8; 16],
    ) -> Result<FileVersion> {
        cairn_domain::catalog::check_path(&f.path)?;
        if volume.is_none() {
            cairn_domain::catalog::check_inline(data.len())?;
        }
        let a = self.anchor(o, true)?.expect("made");
        let Some((id, lock_id)) = volume else {
            let bytes = FileBytes::Inline(data);
            return Ok(o.domain.commit_file(&a, f, bytes, expect, request_id)?);
        };
        let Some(guard) = self.client_lock(o, &id, lock_id)? else {
            return Err(AgentError::invalid(
                "lock_id",
                "a file's volume is committed under its lock",
            ));
        };
        let (size, sha256) = self
            .written
            .lock()
            .expect("poisoned")
            .get(lock_id)
            .cloned()
            .ok_or_else(|| {
                AgentError::precondition(format!(
                    "nothing was written into volume {id} from offset 0 under lock {lock_id}"
                ))
            })?;
        let bytes = FileBytes::Volume {
            id,
            guard: &guard,
            size,
            sha256,
        };
        let v = o.domain.commit_file(&a, f, bytes, expect, request_id)?;
        self.written.lock().expect("poisoned").remove(lock_id);
        Ok(v)
    }

    /// Commit new volume `vol`, which a job of this agent wrote (under
    /// `guard`) and read back as `sha256`, as a version of file `f`: its
    /// size is the volume's capacity. The version's tag.
    pub(crate) fn commit_copied_file(
        &self,
        o: &Opened,
        f: &NewFile,
        vol: &Volume,
        guard: &cairn_domain::LockGuard,
        sha256: String,
        request_id: [u8; 16],
    ) -> Result<Tag> {
        let a = self.anchor(o, true)?.expect("made");
        let bytes = FileBytes::Volume {
            id: vol.id,
            guard,
            size: vol.capacity,
            sha256,
        };
        let v = o.domain.commit_file(&a, f, bytes, None, request_id)?;
        Ok(o.domain.read_tag(&v.tag)?)
    }

    /// Every file version of the domain.
    pub fn list_files(&self, o: &Opened) -> Result<Listing> {
        let a = self.anchor(o, false)?;
        Ok(o.domain.list_files(a.as_ref())?)
    }

    /// What changed in the catalog after generation `since` (see
    /// `Domain::catalog_changes`); a domain without a catalog has none.
    pub fn file_changes(&self, o: &Opened, since: u64) -> Result<Changes> {
        match self.anchor(o, false)? {
            Some(a) => Ok(o.domain.catalog_changes(&a, since)?),
            None => Ok(Changes {
                generation: 0,
                files: (since == 0).then(Vec::new),
            }),
        }
    }

    /// Delete file versions; the new generation.
    pub fn delete_files(
        &self,
        o: &Opened,
        tags: &[TagId],
        expect: Option<u64>,
        request_id: [u8; 16],
    ) -> Result<u64> {
        let Some(a) = self.anchor(o, false)? else {
            let id = tags.first().map(|t| t.to_string()).unwrap_or_default();
            return Err(AgentError::not_found("file version", id));
        };
        Ok(o.domain.delete_files(&a, tags, expect, request_id)?)
    }

    /// Register or unregister an image from file version `tag` (see
    /// `Domain::set_file_image`).
    pub fn set_file_image(
        &self,
        o: &Opened,
        tag: &TagId,
        change: ImageChange<'_>,
        expect: Option<u64>,
        request_id: [u8; 16],
    ) -> Result<(FileVersion, Option<FileVersion>)> {
        let Some(a) = self.anchor(o, false)? else {
            return Err(AgentError::not_found("file version", tag.to_string()));
        };
        Ok(o.domain
            .set_file_image(&a, tag, change, expect, request_id)?)
    }

    /// Where to read `length` bytes (0: to the end) of file version `tag`
    /// from `offset`.
    pub fn file_reader(
        &self,
        o: &Opened,
        tag: &TagId,
        offset: u64,
        length: u64,
    ) -> Result<FileRead> {
        let a = self.anchor(o, false)?;
        let t = o.domain.read_tag(tag)?;
        let f = FileVersion::of_tag(&t, a.map(|a| a.volume), || Ok(Some(String::new())))?
            .ok_or_else(|| AgentError::not_found("file version", tag.to_string()))?;
        let end = if length == 0 {
            f.size
        } else {
            offset.saturating_add(length)
        };
        if offset > f.size || end > f.size {
            return Err(AgentError::invalid(
                "offset",
                format!(
                    "{length} bytes at {offset} go beyond the file's {} bytes",
                    f.size
                ),
            ));
        }
        if f.inline {
            let b = o.domain.inline_file(&f)?;
            return Ok(FileRead::Inline(b[offset as usize..end as usize].to_vec()));
        }
        let sector = o.domain.geometry().sector_size as u64;
        if offset % sector != 0 {
            return Err(AgentError::invalid(
                "offset",
                format!("{offset} is not a multiple of the domain's {sector}-byte sector"),
            ));
        }
        let v = o.domain.read_volume(&f.volume)?;
        Ok(FileRead::Volume(
            open_direct(&o.path, false)?,
            o.extent(&v).offset + offset,
            end - offset,
        ))
    }
}
