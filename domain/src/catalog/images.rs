//! Images registered from file versions (ADR 0004, point 3): the version's
//! tag carries option `cairn.image` (the image's id) and user data item
//! `image` (its record, opaque here: the coordinator's JSON). Registering,
//! changing and unregistering are catalog transactions, and may write a
//! metafile (a new small file version) in the same one.

use super::*;

/// User data item of a file version holding its image's record.
pub const IMAGE_ITEM: &str = "image";

/// Longest image id, in bytes.
const MAX_IMAGE_ID: usize = 64;

/// Refuse an image id that is empty, too long, or not of
/// `[A-Za-z0-9._-]`.
pub fn check_image_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_IMAGE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(DomainError::invalid(
            "image_id",
            format!(
                "{}: 1 to {MAX_IMAGE_ID} characters of [A-Za-z0-9._-]",
                quote(id)
            ),
        ))
    }
}

/// What one image transaction does to a file version: register (an
/// image's id and record; one already there is replaced) or unregister
/// (`None`), commit a metafile beside it, and delete file versions that
/// belong to the image (its data items).
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageChange<'a> {
    /// The image's id and record; `None`: unregister.
    pub image: Option<(&'a str, &'a [u8])>,
    /// A small file to commit in the same transaction.
    pub metafile: Option<(&'a NewFile, &'a [u8])>,
    /// File versions to delete in the same transaction.
    pub drop: &'a [TagId],
}

impl Domain {
    /// Apply `change` to file version `tag` in one catalog transaction.
    /// Returns the file version and the metafile's.
    pub fn set_file_image(
        &self,
        a: &Anchor,
        tag: &TagId,
        change: ImageChange<'_>,
        expect: Option<u64>,
        request_id: [u8; 16],
    ) -> Result<(FileVersion, Option<FileVersion>)> {
        let ImageChange {
            image,
            metafile,
            drop,
        } = change;
        if drop.contains(tag) {
            return Err(DomainError::invalid(
                "drop",
                "names the image's own file version",
            ));
        }
        if let Some((id, _)) = image {
            check_image_id(id)?;
        }
        if let Some((m, b)) = metafile {
            check_path(&m.path)?;
            check_inline(b.len())?;
        }
        let turn = self.catalog_turn(a, expect)?;
        let next = turn.next;
        let t = self.read_tag(tag)?;
        let items = self.read_user_data(tag)?;
        let long = || {
            Ok(items
                .get(PATH_ITEM)
                .map(|b| String::from_utf8_lossy(b).into_owned()))
        };
        let f = FileVersion::of_tag(&t, Some(a.volume), long)?.ok_or_else(|| {
            DomainError::NotFound {
                kind: "file version",
                id: tag.to_string(),
            }
        })?;
        if f.directory {
            return Err(DomainError::FailedPrecondition(format!(
                "{} is a directory",
                quote(&f.path)
            )));
        }
        if image.is_none() && f.image.is_none() {
            return Err(DomainError::FailedPrecondition(format!(
                "no image is registered from {}",
                quote(&f.path)
            )));
        }
        let mut options: Vec<(String, String)> = t
            .options
            .iter()
            .filter(|(k, _)| k != PATH && k != IMAGE)
            .cloned()
            .collect();
        if let Some((id, _)) = image {
            options.push((IMAGE.to_string(), id.to_string()));
        }
        let used: usize = options.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let fits = used + PATH.len() + f.path.len() + 2 <= MAX_OPTIONS;
        if fits {
            options.push((PATH.to_string(), f.path.clone()));
        }
        let mut meta = t.meta();
        meta.options = options;
        let mut tx = self
            .tx("set file image")
            .request_id(request_id)
            .change_tag(*tag, meta);
        match (fits, items.contains_key(PATH_ITEM)) {
            (false, false) => {
                let p = f.path.clone().into_bytes();
                tx = tx.set_user_data(TagRef::Existing(*tag), PATH_ITEM, p);
            }
            (true, true) => tx = tx.remove_user_data(*tag, PATH_ITEM),
            _ => {}
        }
        tx = match image {
            Some((_, record)) => {
                tx.set_user_data(TagRef::Existing(*tag), IMAGE_ITEM, record.to_vec())
            }
            None if items.contains_key(IMAGE_ITEM) => tx.remove_user_data(*tag, IMAGE_ITEM),
            None => tx,
        };
        for id in drop {
            tx = self.drop_file_ops(tx, a, id)?;
        }
        if let Some((m, b)) = metafile {
            let sha = hex(ring_sha256(b).as_ref());
            let now = self.clock.now();
            tx = self.new_file_ops(tx, m, a.volume, (b.len() as u64, &sha, Some(b)), next, now)?;
        }
        let mut touched = vec![TagRef::Existing(*tag)];
        touched.extend(drop.iter().map(|t| TagRef::Existing(*t)));
        if metafile.is_some() {
            touched.push(TagRef::New(0));
        }
        let out = self.close_turn(tx, a, &turn, &touched).commit()?;
        // The version as committed: only its options changed.
        let file = FileVersion {
            image: image.map(|(id, _)| id.to_string()),
            ..f
        };
        let meta = match (metafile, out.tags.first()) {
            (Some((m, _)), Some(t)) => {
                let p = m.path.clone();
                FileVersion::of_tag(t, Some(a.volume), || Ok(Some(p)))?
            }
            _ => None,
        };
        Ok((file, meta))
    }

    /// The image record kept on file version `f`, if one is.
    pub fn image_record(&self, f: &FileVersion) -> Result<Option<Vec<u8>>> {
        if f.image.is_none() {
            return Ok(None);
        }
        Ok(self.read_user_data(&f.tag)?.remove(IMAGE_ITEM))
    }
}
