//! The image store's rules (seed 004), decided without I/O: names unique
//! in the catalog and taken from the image that had them, lookup by id,
//! name or unambiguous id prefix, names given twice and their repair, the
//! metadata string, flags, and the data items kept as files under
//! `.images/ID/`.

use std::collections::BTreeMap;

use cairn_domain::catalog::{latest, FileVersion};
use cairn_domain::limits::quote;
use cairn_domain::TagId;

use super::images::ImageRecord;
use crate::error::{CoordError, Result};

/// The directory of the images' data items; no caller's file may be in it.
pub const DATA_DIR: &str = ".images";

/// Longest name, key and flag, in bytes; most names an image has.
const MAX_NAME: usize = 128;
const MAX_NAMES: usize = 32;
/// Longest metadata string and flag value, in bytes; most flags.
const MAX_METADATA: usize = 16 << 10;
const MAX_FLAG_VALUE: usize = 1024;
const MAX_FLAGS: usize = 64;

/// Whether `path` is in [`DATA_DIR`].
pub fn reserved(path: &str) -> bool {
    path == DATA_DIR
        || path
            .strip_prefix(DATA_DIR)
            .is_some_and(|r| r.starts_with('/'))
}

/// Refuse a caller's path in [`DATA_DIR`].
pub fn check_not_reserved(path: &str) -> Result<()> {
    if reserved(path) {
        return Err(CoordError::invalid(
            "location",
            format!("{}: {DATA_DIR}/ holds the images' data items", quote(path)),
        ));
    }
    Ok(())
}

/// Refuse an id given at registration that is not a valid image id, or
/// that starts with a dot (ids name directories).
pub fn check_given_id(id: &str) -> Result<()> {
    cairn_domain::catalog::check_image_id(id)?;
    if id.starts_with('.') {
        return Err(CoordError::invalid(
            "image_id",
            format!("{}: starts with '.'", quote(id)),
        ));
    }
    Ok(())
}

/// Where data item `key` of image `id` is kept.
pub fn data_path(id: &str, key: &str) -> String {
    format!("{DATA_DIR}/{id}/{key}")
}

fn word_ok(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b) || extra.contains(&b))
}

/// Refuse a data item key that is not one path component of
/// `[A-Za-z0-9_.:@+=-]` (no leading dot), at most 128 bytes.
pub fn check_key(key: &str) -> Result<()> {
    if word_ok(key, MAX_NAME, b":@+=") {
        return Ok(());
    }
    Err(CoordError::invalid(
        "key",
        format!(
            "{}: 1 to {MAX_NAME} characters of [A-Za-z0-9_.:@+=-], not starting with '.'",
            quote(key)
        ),
    ))
}

/// The names as kept: each checked (`[A-Za-z0-9_.:/@+-]`, no leading
/// dot, at most 128 bytes), duplicates dropped, order kept.
pub fn check_names(names: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if !word_ok(n, MAX_NAME, b":/@+") {
            return Err(CoordError::invalid(
                "names",
                format!(
                    "{}: 1 to {MAX_NAME} characters of [A-Za-z0-9_.:/@+-], not starting with '.'",
                    quote(n)
                ),
            ));
        }
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    if out.len() > MAX_NAMES {
        return Err(CoordError::invalid(
            "names",
            format!("{} names; at most {MAX_NAMES}", out.len()),
        ));
    }
    Ok(out)
}

/// Refuse a metadata string beyond 16 KiB.
pub fn check_metadata(m: &str) -> Result<String> {
    if m.len() > MAX_METADATA {
        return Err(CoordError::invalid(
            "metadata",
            format!("{} bytes; at most {MAX_METADATA}", m.len()),
        ));
    }
    Ok(m.to_string())
}

/// Refuse a flag with a bad name or a value beyond 1 KiB.
pub fn check_flag(k: &str, v: &str) -> Result<()> {
    if !word_ok(k, MAX_NAME, b":") {
        return Err(CoordError::invalid(
            "flags",
            format!(
                "{}: 1 to {MAX_NAME} characters of [A-Za-z0-9_.:-]",
                quote(k)
            ),
        ));
    }
    if v.len() > MAX_FLAG_VALUE {
        return Err(CoordError::invalid(
            "flags",
            format!("{k}: {} bytes; at most {MAX_FLAG_VALUE}", v.len()),
        ));
    }
    Ok(())
}

/// Refuse a record with more than [`MAX_FLAGS`] flags.
pub fn check_flag_count(r: &ImageRecord) -> Result<()> {
    if r.flags.len() > MAX_FLAGS {
        return Err(CoordError::invalid(
            "flags",
            format!("{} flags; at most {MAX_FLAGS}", r.flags.len()),
        ));
    }
    Ok(())
}

/// The one of `records` that `key` names: the image with that id, else
/// the one with that name, else the one whose id starts with it. NOT_FOUND
/// when none does; an ambiguous prefix (or a name two images have) is
/// INVALID_ARGUMENT listing the candidates.
pub fn resolve(records: &[&ImageRecord], key: &str) -> Result<usize> {
    if key.is_empty() {
        return Err(CoordError::invalid("image_id", "is required"));
    }
    if let Some(i) = records.iter().position(|r| r.id == key) {
        return Ok(i);
    }
    let one = |hits: Vec<usize>, what: &str| -> Result<Option<usize>> {
        match hits.len() {
            0 => Ok(None),
            1 => Ok(Some(hits[0])),
            _ => {
                let mut ids: Vec<&str> = hits.iter().map(|&i| records[i].id.as_str()).collect();
                ids.sort_unstable();
                Err(CoordError::invalid(
                    "image_id",
                    format!("{what} {} names {}", quote(key), ids.join(", ")),
                ))
            }
        }
    };
    let named = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.names.iter().any(|n| n == key))
        .map(|(i, _)| i)
        .collect();
    if let Some(i) = one(named, "name")? {
        return Ok(i);
    }
    let prefixed = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.id.starts_with(key))
        .map(|(i, _)| i)
        .collect();
    one(prefixed, "prefix")?.ok_or_else(|| CoordError::NotFound {
        kind: "image",
        id: key.to_string(),
    })
}

/// Every name more than one of `records` has, with their indexes.
pub fn duplicates(records: &[&ImageRecord]) -> BTreeMap<String, Vec<usize>> {
    let mut by: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        for n in &r.names {
            by.entry(n.clone()).or_default().push(i);
        }
    }
    by.retain(|_, v| v.len() > 1);
    by
}

/// Records that lose names, by index, with their names after.
pub type Losers = Vec<(usize, Vec<String>)>;

/// How to repair names given twice: the records that lose names, with
/// their names after. The image changed last keeps a name (the one that
/// took it last), by id when equal.
pub fn repairs(records: &[&ImageRecord]) -> Losers {
    let mut lose: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (name, holders) in duplicates(records) {
        let keep = holders
            .iter()
            .copied()
            .max_by(|&a, &b| {
                let (ra, rb) = (records[a], records[b]);
                (ra.updated_at, &ra.id).cmp(&(rb.updated_at, &rb.id))
            })
            .expect("two holders at least");
        for h in holders.into_iter().filter(|&h| h != keep) {
            lose.entry(h).or_default().push(name.clone());
        }
    }
    lose.into_iter()
        .map(|(i, gone)| {
            let names = records[i]
                .names
                .iter()
                .filter(|n| !gone.contains(n))
                .cloned()
                .collect();
            (i, names)
        })
        .collect()
}

/// What setting `names` on `records[target]` does: the other records
/// that lose a name, with their names after (the target's new names are
/// `check_names(names)`).
pub fn plan_names(
    records: &[&ImageRecord],
    target: usize,
    names: &[String],
) -> Result<(Vec<String>, Losers)> {
    let names = check_names(names)?;
    let mut losers = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if i == target || !r.names.iter().any(|n| names.contains(n)) {
            continue;
        }
        let kept = r
            .names
            .iter()
            .filter(|n| !names.contains(n))
            .cloned()
            .collect();
        losers.push((i, kept));
    }
    Ok((names, losers))
}

/// Refuse names of `names` that one of `records` other than image `id`
/// has (ALREADY_EXISTS naming the image).
pub fn check_names_free(records: &[&ImageRecord], id: &str, names: &[String]) -> Result<()> {
    for r in records.iter().filter(|r| r.id != id) {
        if let Some(n) = r.names.iter().find(|n| names.contains(n)) {
            return Err(CoordError::AlreadyExists(format!(
                "image name {} is image {}'s",
                quote(n),
                r.id
            )));
        }
    }
    Ok(())
}

/// A data item of an image as its file's latest version says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataItem {
    /// Its key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// The file version holding it.
    pub file: FileVersion,
}

/// The data items of image `id` in a domain's listing, by key.
pub fn data_items(files: &[FileVersion], id: &str) -> Vec<DataItem> {
    let dir = format!("{DATA_DIR}/{id}/");
    latest(files)
        .into_iter()
        .filter_map(|(p, f)| {
            let key = p.strip_prefix(&dir)?;
            (!key.contains('/') && !f.directory).then(|| DataItem {
                key: key.to_string(),
                size: f.size,
                sha256: f.sha256.clone(),
                file: f.clone(),
            })
        })
        .collect()
}

/// Every file version under image `id`'s data directory (what goes with
/// the image).
pub fn data_versions(files: &[FileVersion], id: &str) -> Vec<FileVersion> {
    let dir = format!("{DATA_DIR}/{id}/");
    files
        .iter()
        .filter(|f| f.path.starts_with(&dir))
        .cloned()
        .collect()
}

/// The tags of `files`.
pub fn tags(files: &[FileVersion]) -> Vec<TagId> {
    files.iter().map(|f| f.tag).collect()
}
