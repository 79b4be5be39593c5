//! One agent's catalog file calls, in the coordinator's own types: list,
//! commit, delete and read file versions, and the volume a large file's
//! bytes are streamed into.

use cairn_domain::catalog::FileVersion;
use cairn_domain::{Format, TagId, VolumeId};
use cairn_proto::agent as pb;
use cairn_proto::convert as wire;

use super::AgentConn;
use crate::error::{CoordError, Result};

/// A large file's volume being written: its id and the lock it is held by.
#[derive(Debug, Clone)]
pub struct FileVolume {
    /// The volume.
    pub id: VolumeId,
    /// The agent's client lock of it.
    pub lock_id: String,
}

/// What one image transaction does (see `Domain::set_file_image`):
/// register (id and record) or unregister (`None`), a metafile (path,
/// owner, bytes), and file versions to delete.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageSet<'a> {
    /// The image's id and record; `None`: unregister.
    pub image: Option<(&'a str, &'a [u8])>,
    /// A metafile's path, owner and bytes.
    pub metafile: Option<(&'a str, &'a str, &'a [u8])>,
    /// File versions deleted with it.
    pub drop: &'a [TagId],
}

/// A file version to commit, as the coordinator asks for it.
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    /// The agent request id (also kept on the version).
    pub rid: String,
    /// The path.
    pub path: &'a str,
    /// The owner.
    pub owner: &'a str,
    /// A directory marker.
    pub directory: bool,
    /// Inline bytes (when `volume` is `None`).
    pub data: &'a [u8],
    /// The written volume holding the bytes.
    pub volume: Option<&'a FileVolume>,
    /// The generation the commit was planned at.
    pub expect: u64,
}

/// The stream of a file's bytes from an agent.
pub type Chunks = tonic::Streaming<pb::VolumeDataChunk>;

/// Bytes of one page of a whole listing: well under the 64 MiB a message
/// may have, and few enough to hold in memory twice.
pub const LIST_PAGE_BYTES: u64 = 8 << 20;

/// One whole listing from `pages` (in tag order, each read at its own
/// generation, the first one's the lowest): when they were not all read at
/// one generation, `later` (the changes after the first page's) makes
/// them so. `None`: they were not, and `later` is missing or is no list of
/// changes (the change log does not reach back; list again).
pub fn merge_pages(pages: Vec<FileDelta>, later: Option<FileDelta>) -> Option<FileDelta> {
    let first = pages.first().map(|p| p.generation).unwrap_or(0);
    let files = pages.into_iter().flat_map(|p| p.files);
    let Some(later) = later else {
        return Some(FileDelta {
            generation: first,
            changes: false,
            files: files.collect(),
            removed: Vec::new(),
        });
    };
    if !later.changes {
        return None;
    }
    let mut by_tag: std::collections::BTreeMap<TagId, (FileVersion, Vec<u8>)> =
        files.map(|f| (f.0.tag, f)).collect();
    for t in &later.removed {
        by_tag.remove(t);
    }
    for f in later.files {
        by_tag.insert(f.0.tag, f);
    }
    Some(FileDelta {
        generation: later.generation,
        changes: false,
        files: by_tag.into_values().collect(),
        removed: Vec::new(),
    })
}

/// What changed in a domain's catalog (see [`AgentConn::file_delta`]).
#[derive(Debug, Clone, Default)]
pub struct FileDelta {
    /// The generation now.
    pub generation: u64,
    /// `files` and `removed` are the changes since the generation asked
    /// about; false: `files` is every version.
    pub changes: bool,
    /// Versions, each with its image's record (empty: none).
    pub files: Vec<(FileVersion, Vec<u8>)>,
    /// Versions deleted.
    pub removed: Vec<TagId>,
}

fn parse_tag(field: &'static str, s: &str) -> Result<TagId> {
    TagId::parse(field, s).map_err(|e| CoordError::Internal(format!("an agent answered {e}")))
}

fn file_of(host: &str, f: &pb::FileVersion) -> Result<FileVersion> {
    FileVersion::try_from(f)
        .map_err(|e| CoordError::Internal(format!("agent {host} answered a bad file: {e}")))
}

impl AgentConn {
    /// What changed in domain `domain`'s catalog after generation
    /// `since`, with the records of the images registered from changed
    /// versions; the whole catalog when `since` is `None` or the domain's
    /// log does not reach back to it (`changes` false).
    pub async fn file_delta(&self, domain: &uuid::Uuid, since: Option<u64>) -> Result<FileDelta> {
        if since.is_some() {
            let (d, _) = self.files_page(domain, since, "", 0).await?;
            return Ok(d);
        }
        // A whole listing in pages, each under the message size limit;
        // pages read at later generations are made whole by the changes
        // after the first one's.
        for _ in 0..4 {
            let mut pages = Vec::new();
            let mut after = String::new();
            loop {
                let (page, next) = self
                    .files_page(domain, None, &after, LIST_PAGE_BYTES)
                    .await?;
                pages.push(page);
                if next.is_empty() {
                    break;
                }
                after = next;
            }
            let first = pages[0].generation;
            let later = if pages.iter().all(|p| p.generation == first) {
                None
            } else {
                Some(self.files_page(domain, Some(first), "", 0).await?.0)
            };
            if let Some(whole) = merge_pages(pages, later) {
                return Ok(whole);
            }
        }
        Err(CoordError::Unsettled(format!(
            "the catalog of domain {domain} changed too much while it was listed"
        )))
    }

    /// One ListFiles answer and the next page's start.
    async fn files_page(
        &self,
        domain: &uuid::Uuid,
        since: Option<u64>,
        after: &str,
        page_bytes: u64,
    ) -> Result<(FileDelta, String)> {
        let r = self
            .c()
            .list_files(pb::ListFilesRequest {
                domain: domain.to_string(),
                with_images: true,
                since,
                page_after: after.to_string(),
                page_bytes,
            })
            .await
            .map_err(self.err())?
            .into_inner();
        let mut files = Vec::with_capacity(r.files.len());
        for f in r.files {
            files.push((file_of(&self.host, &f)?, f.image_record));
        }
        let removed = r
            .removed_tag_ids
            .iter()
            .map(|t| parse_tag("removed_tag_ids", t))
            .collect::<Result<_>>()?;
        let d = FileDelta {
            generation: r.generation,
            changes: r.changes && since.is_some(),
            files,
            removed,
        };
        Ok((d, r.next_page_after))
    }

    /// Apply `change` to file version `tag` in one transaction planned at
    /// generation `expect`.
    pub async fn set_file_image(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        tag: &TagId,
        change: &ImageSet<'_>,
        expect: u64,
    ) -> Result<(FileVersion, Option<FileVersion>)> {
        let ImageSet {
            image,
            metafile,
            drop,
        } = *change;
        let (image_id, record) = image.unwrap_or_default();
        let (metafile_path, metafile_owner, metafile_data) = metafile.unwrap_or_default();
        let r = self
            .c()
            .set_file_image(pb::SetFileImageRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                tag_id: tag.to_string(),
                image_id: image_id.into(),
                record: record.to_vec(),
                metafile_path: metafile_path.into(),
                metafile_owner: metafile_owner.into(),
                metafile_data: metafile_data.to_vec(),
                expect_generation: Some(expect),
                drop_tag_ids: drop.iter().map(ToString::to_string).collect(),
            })
            .await
            .map_err(self.err())?
            .into_inner();
        let f = r
            .file
            .ok_or_else(|| CoordError::Internal(format!("agent {} answered no file", self.host)))?;
        let m = match &r.metafile {
            Some(m) => Some(file_of(&self.host, m)?),
            None => None,
        };
        Ok((file_of(&self.host, &f)?, m))
    }

    /// Commit a file version (ABORTED from the agent when the catalog
    /// moved past `expect`).
    pub async fn commit_file(&self, domain: &uuid::Uuid, c: &Commit<'_>) -> Result<FileVersion> {
        let r = self
            .c()
            .commit_file(pb::CommitFileRequest {
                request_id: c.rid.clone(),
                domain: domain.to_string(),
                path: c.path.into(),
                owner: c.owner.into(),
                directory: c.directory,
                data: c.data.to_vec(),
                volume_id: c.volume.map(|v| v.id.to_string()).unwrap_or_default(),
                lock_id: c.volume.map(|v| v.lock_id.clone()).unwrap_or_default(),
                expect_generation: Some(c.expect),
            })
            .await
            .map_err(self.err())?
            .into_inner();
        let f = r.file.ok_or_else(|| {
            CoordError::Internal(format!("agent {} committed no file", self.host))
        })?;
        file_of(&self.host, &f)
    }

    /// Delete file versions planned at generation `expect`; the new
    /// generation.
    pub async fn delete_files(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        tags: &[TagId],
        expect: u64,
    ) -> Result<u64> {
        let r = self
            .c()
            .delete_files(pb::DeleteFilesRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                tag_ids: tags.iter().map(|t| t.to_string()).collect(),
                expect_generation: Some(expect),
            })
            .await
            .map_err(self.err())?
            .into_inner();
        Ok(r.generation)
    }

    /// A file version's bytes, in chunks.
    pub async fn read_file(&self, domain: &uuid::Uuid, tag: &TagId) -> Result<Chunks> {
        self.read_file_part(domain, tag, 0).await
    }

    /// The first `length` bytes of a file version (0: all of them).
    pub async fn read_file_part(
        &self,
        domain: &uuid::Uuid,
        tag: &TagId,
        length: u64,
    ) -> Result<Chunks> {
        Ok(self
            .c()
            .read_file(pb::ReadFileRequest {
                domain: domain.to_string(),
                tag_id: tag.to_string(),
                offset: 0,
                length,
            })
            .await
            .map_err(self.err())?
            .into_inner())
    }

    /// A raw volume of `capacity` bytes, locked and illegal, to stream a
    /// large file's bytes into.
    pub async fn file_volume(
        &self,
        rid: &str,
        domain: &uuid::Uuid,
        capacity: u64,
    ) -> Result<FileVolume> {
        let r = self
            .c()
            .create_volume(pb::CreateVolumeRequest {
                request_id: rid.into(),
                domain: domain.to_string(),
                format: wire::volume_format_code(Format::Raw),
                capacity,
                description: "catalog file".into(),
                keep_locked: true,
                ..Default::default()
            })
            .await
            .map_err(self.err())?
            .into_inner();
        let v = r
            .volume
            .ok_or_else(|| CoordError::Internal(format!("agent {} made no volume", self.host)))?;
        let id = wire::volume_id("volume.id", &v.id)?;
        let fv = FileVolume {
            id,
            lock_id: r.lock_id,
        };
        let illegal = self
            .c()
            .update_volume(pb::UpdateVolumeRequest {
                domain: domain.to_string(),
                volume_id: id.to_string(),
                legality: pb::Legality::Illegal as i32,
                lock_id: fv.lock_id.clone(),
                ..Default::default()
            })
            .await
            .map_err(self.err());
        if let Err(e) = illegal {
            self.drop_file_volume(domain, &fv).await;
            return Err(e);
        }
        Ok(fv)
    }

    /// Stream bytes into a file volume from offset 0: the bytes written
    /// and their SHA-256 (hex), as the agent counted them.
    pub async fn write_file_volume(
        &self,
        domain: &uuid::Uuid,
        v: &FileVolume,
        data: impl tokio_stream::Stream<Item = Vec<u8>> + Send + 'static,
    ) -> Result<(u64, String)> {
        use tokio_stream::StreamExt;
        let first = pb::WriteVolumeDataRequest {
            domain: domain.to_string(),
            volume_id: v.id.to_string(),
            lock_id: v.lock_id.clone(),
            ..Default::default()
        };
        let rest = data.map(|data| pb::WriteVolumeDataRequest {
            data,
            ..Default::default()
        });
        let msgs = tokio_stream::once(first).chain(rest);
        let r = self
            .c()
            .write_volume_data(msgs)
            .await
            .map_err(self.err())?
            .into_inner();
        Ok((r.bytes_written, r.sha256))
    }

    /// Give back a committed file volume's lock.
    pub async fn unlock(&self, v: &FileVolume) -> Result<()> {
        self.c()
            .unlock_volume(pb::UnlockVolumeRequest {
                lock_id: v.lock_id.clone(),
            })
            .await
            .map_err(self.err())?;
        Ok(())
    }

    /// Delete a file volume that will not be committed, and give back its
    /// lock (best effort: what is left is half-made and collected later).
    pub async fn drop_file_volume(&self, domain: &uuid::Uuid, v: &FileVolume) {
        let del = self
            .c()
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: String::new(),
                domain: domain.to_string(),
                volume_id: v.id.to_string(),
                lock_id: v.lock_id.clone(),
            })
            .await;
        if let Err(e) = del {
            tracing::warn!(volume = %v.id, error = %e.message(), "an uncommitted file volume stays");
        }
        let _ = self.unlock(v).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tag `n`, the same at every call (ids are random).
    fn tag(n: u32) -> TagId {
        static IDS: std::sync::OnceLock<Vec<TagId>> = std::sync::OnceLock::new();
        IDS.get_or_init(|| (0..8).map(TagId::generate).collect())[n as usize]
    }

    fn version(n: u32) -> (FileVersion, Vec<u8>) {
        let f = FileVersion {
            tag: tag(n),
            volume: VolumeId::generate(n),
            path: format!("f{n}"),
            version: u64::from(n),
            size: 1,
            sha256: String::new(),
            owner: "alice".into(),
            created: 0,
            directory: false,
            inline: true,
            image: None,
            request: String::new(),
        };
        (f, Vec::new())
    }

    fn page(generation: u64, ns: &[u32]) -> FileDelta {
        FileDelta {
            generation,
            changes: false,
            files: ns.iter().map(|&n| version(n)).collect(),
            removed: Vec::new(),
        }
    }

    fn tags(d: &FileDelta) -> Vec<TagId> {
        d.files.iter().map(|(f, _)| f.tag).collect()
    }

    #[test]
    fn pages_of_one_generation_are_the_listing() {
        let whole = merge_pages(vec![page(5, &[1, 2]), page(5, &[3])], None).unwrap();
        assert_eq!(whole.generation, 5);
        assert!(!whole.changes);
        assert_eq!(tags(&whole), vec![tag(1), tag(2), tag(3)]);
    }

    #[test]
    fn pages_read_across_changes_are_made_whole_by_them() {
        // Read at 5, then at 7: 1 went and 4 came after 5 (4 sorts into
        // the first page, so no page saw it); 2 changed.
        let later = FileDelta {
            generation: 7,
            changes: true,
            files: vec![version(4), version(2)],
            removed: vec![tag(1)],
        };
        let whole = merge_pages(vec![page(5, &[1, 2]), page(7, &[3])], Some(later)).unwrap();
        assert_eq!(whole.generation, 7);
        let mut want = vec![tag(2), tag(3), tag(4)];
        want.sort();
        assert_eq!(tags(&whole), want);
        // Without the changes (the log does not reach back): list again.
        let too_old = FileDelta {
            generation: 7,
            ..page(7, &[])
        };
        assert!(merge_pages(vec![page(5, &[1]), page(7, &[3])], Some(too_old)).is_none());
    }
}
