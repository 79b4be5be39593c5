//! The catalog's files on a domain (ADR 0004): named, versioned objects
//! kept as tags. A file version is a strong, immutable tag
//! (`cairn.kind=file`) whose options say its version, owner, size and
//! SHA-256; its bytes are in a raw volume of its own, or, for a small file,
//! in the tag's user data on the domain's catalog anchor volume.
//!
//! Invariants:
//! - every catalog change is one transaction that also raises the anchor's
//!   generation, taken under the anchor tag's lock: catalog writes of a
//!   domain are serialized, and a caller that planned against generation
//!   `g` is refused (`Changed`) if another change came first;
//! - a version number is the generation its commit made: it only grows,
//!   domain-wide, and is never given twice, even after deletes;
//! - a file version's bytes never change; a new upload is a new version.

use std::collections::BTreeMap;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::engine::{Domain, Transaction};
use crate::error::{DomainError, Result};
use crate::layout::DecodeError;
use crate::limits::{quote, MAX_OPTIONS};
use crate::lock::LockGuard;
use crate::model::*;
use crate::records::UserData;

/// What a catalog tag is (`file`, `catalog`).
pub const KIND: &str = "cairn.kind";
/// [`KIND`] of a file version.
pub const KIND_FILE: &str = "file";
/// [`KIND`] of a domain's catalog anchor.
pub const KIND_ANCHOR: &str = "catalog";
/// A file version's number.
pub const VERSION: &str = "cairn.file.version";
/// A file's size in bytes.
pub const SIZE: &str = "cairn.file.size";
/// A file's SHA-256, 64 lower-case hex digits.
pub const SHA256: &str = "cairn.file.sha256";
/// When the version was made, seconds since the Unix epoch.
pub const CREATED: &str = "cairn.file.created";
/// The identity that owns a file (the same key as a disk's owner).
pub const OWNER: &str = "cairn.owner";
/// A file's path, when it fits the options (else user data [`PATH_ITEM`]).
pub const PATH: &str = "cairn.path";
/// `dir` on a directory marker (an empty file listed as `D`).
pub const TYPE: &str = "cairn.file.type";
/// On a file version an image is registered from: the image's id.
pub const IMAGE: &str = "cairn.image";
/// The request id that made a version, so that a retried upload finds it.
pub const REQUEST: &str = "cairn.file.request";
/// User data item holding a path too long for the options.
pub const PATH_ITEM: &str = "path";
/// User data item holding a small file's bytes.
pub const DATA_ITEM: &str = "data";
/// User data item of the anchor holding the [`CatalogHead`].
pub const HEAD_ITEM: &str = "seq";
/// Files of at most this many bytes live in user data, not a volume.
pub const MAX_INLINE: u64 = 4096;
/// Longest path, in bytes.
pub const MAX_PATH: usize = 1024;

/// Magic of the catalog head.
pub const HEAD_MAGIC: [u8; 4] = *b"CCAT";
/// Version of the catalog head.
pub const HEAD_VERSION: u16 = 1;

/// The catalog head as stored: the anchor's user data item `seq`.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CatalogHeadRaw {
    /// [`HEAD_MAGIC`].
    pub magic: [u8; 4],
    /// [`HEAD_VERSION`].
    pub version: U16,
    /// Feature bits; none are defined, any set bit is refused.
    pub features: U16,
    /// The catalog's generation.
    pub generation: U64,
    /// Zero.
    pub reserved: U32,
    /// The first four bytes of SHA-256 over the domain id and the bytes
    /// before it (see [`CatalogHeadRaw`]'s note in `docs/format.md`).
    pub checksum: U32,
}

const _: () = assert!(size_of::<CatalogHeadRaw>() == 24);

/// A domain's catalog generation: raised by every catalog change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CatalogHead {
    /// Changes made so far.
    pub generation: u64,
}

/// The head's checksum: the first four bytes (little-endian) of SHA-256
/// over the salt and the bytes before it. Not a CRC: the head lives in a
/// user data blob whose own CRC-32C would cancel an embedded CRC-32C of
/// the same bytes (CRC is linear), making every head's blob checksum the
/// same and a stale blob half indistinguishable from the current one.
fn head_digest(salt: &[u8; 16], bytes: &[u8]) -> u32 {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    c.update(salt);
    c.update(bytes);
    let d = c.finish();
    u32::from_le_bytes(d.as_ref()[..4].try_into().expect("4 bytes"))
}

impl CatalogHead {
    /// Its bytes on domain `salt`.
    pub fn encode(&self, salt: &[u8; 16]) -> Vec<u8> {
        let mut raw = CatalogHeadRaw {
            magic: HEAD_MAGIC,
            version: HEAD_VERSION.into(),
            features: 0.into(),
            generation: self.generation.into(),
            reserved: 0.into(),
            checksum: 0.into(),
        };
        raw.checksum = head_digest(salt, &raw.as_bytes()[..20]).into();
        raw.as_bytes().to_vec()
    }

    /// From its bytes on domain `salt`.
    pub fn decode(salt: &[u8; 16], b: &[u8]) -> std::result::Result<CatalogHead, DecodeError> {
        let raw = CatalogHeadRaw::read_from_bytes(b)
            .map_err(|_| DecodeError::Length("catalog head is 24 bytes"))?;
        if raw.magic != HEAD_MAGIC {
            return Err(DecodeError::Magic);
        }
        if raw.version.get() != HEAD_VERSION {
            return Err(DecodeError::Version(raw.version.get().into()));
        }
        if head_digest(salt, &b[..20]) != raw.checksum.get() {
            return Err(DecodeError::Checksum);
        }
        if raw.features.get() != 0 {
            return Err(DecodeError::field(
                "features",
                format!("unknown bits {:#x}", raw.features.get()),
            ));
        }
        if raw.reserved.get() != 0 {
            return Err(DecodeError::field("reserved", "not zero"));
        }
        Ok(CatalogHead {
            generation: raw.generation.get(),
        })
    }
}

/// Refuse a path that is not a clean relative path: empty, too long, with
/// control characters, a leading or trailing `/`, or an empty, `.` or `..`
/// component.
pub fn check_path(path: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(DomainError::invalid(
            "path",
            format!("{}: {why}", quote(path)),
        ))
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH {
        return bad(&format!("{} bytes, at most {MAX_PATH}", path.len()));
    }
    if path.chars().any(char::is_control) {
        return bad("holds a control character");
    }
    if path.starts_with('/') || path.ends_with('/') {
        return bad("starts or ends with '/'");
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, '.' or '..' component");
    }
    Ok(())
}

/// Refuse inline bytes beyond [`MAX_INLINE`].
pub fn check_inline(len: usize) -> Result<()> {
    if len as u64 > MAX_INLINE {
        let e = format!("{len} bytes; at most {MAX_INLINE} go inline");
        return Err(DomainError::invalid("data", e));
    }
    Ok(())
}

/// One version of a file, as its tag says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileVersion {
    /// Its tag.
    pub tag: TagId,
    /// The volume holding its bytes (the anchor's for a small file).
    pub volume: VolumeId,
    /// Its path.
    pub path: String,
    /// Its version number.
    pub version: u64,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
    /// Who owns it.
    pub owner: String,
    /// When it was made (seconds since the Unix epoch).
    pub created: u64,
    /// A directory marker.
    pub directory: bool,
    /// Its bytes are in the tag's user data.
    pub inline: bool,
    /// The image registered from it, if any.
    pub image: Option<String>,
    /// The request id that made it (empty: none was given).
    pub request: String,
}

impl FileVersion {
    /// The file version tag `t` describes (`None`: not a file's tag). The
    /// path comes from the options, or `long_path` when it did not fit.
    /// A file's tag that does not say what a file version must is corrupt.
    pub fn of_tag(
        t: &Tag,
        anchor_volume: Option<VolumeId>,
        long_path: impl FnOnce() -> Result<Option<String>>,
    ) -> Result<Option<FileVersion>> {
        if t.option(KIND) != Some(KIND_FILE) {
            return Ok(None);
        }
        let corrupt = |what: &str| DomainError::Corrupt {
            what: format!("file tag {}", t.id),
            offset: 0,
            detail: what.to_string(),
        };
        let num = |k: &str| {
            t.option(k)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| corrupt(&format!("option {k} is missing or not a number")))
        };
        let path = match t.option(PATH) {
            Some(p) => p.to_string(),
            None => long_path()?.ok_or_else(|| corrupt("no path"))?,
        };
        let sha256 = t.option(SHA256).unwrap_or_default().to_string();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(corrupt("option cairn.file.sha256 is not 64 hex digits"));
        }
        Ok(Some(FileVersion {
            tag: t.id,
            volume: t.volume,
            path,
            version: num(VERSION)?,
            size: num(SIZE)?,
            sha256,
            owner: t.option(OWNER).unwrap_or_default().to_string(),
            created: num(CREATED)?,
            directory: t.option(TYPE) == Some("dir"),
            inline: Some(t.volume) == anchor_volume,
            image: t.option(IMAGE).map(str::to_string),
            request: t.option(REQUEST).unwrap_or_default().to_string(),
        }))
    }
}

/// A file version to commit.
#[derive(Debug, Clone)]
pub struct NewFile {
    /// Its path (checked by [`check_path`]).
    pub path: String,
    /// Who owns it.
    pub owner: String,
    /// A directory marker (no bytes).
    pub directory: bool,
    /// The request id making it (empty: none), kept in its options.
    pub request: String,
}

/// Where a new version's bytes are.
pub enum FileBytes<'a> {
    /// A small file's bytes, stored in user data.
    Inline(&'a [u8]),
    /// An illegal raw volume the caller wrote under `guard`, holding
    /// `size` bytes whose SHA-256 is `sha256`; the commit makes it legal.
    Volume {
        /// The volume.
        id: VolumeId,
        /// The caller's lock of it.
        guard: &'a LockGuard,
        /// Bytes written.
        size: u64,
        /// Their SHA-256, hex.
        sha256: String,
    },
}

/// The catalog anchor of a domain: its weak tag and volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The tag whose user data holds the head.
    pub tag: TagId,
    /// Its volume, which small files' tags point at.
    pub volume: VolumeId,
}

/// A catalog turn: the anchor's lock, the generation the change makes,
/// and the change log before it.
struct Turn {
    guard: LockGuard,
    next: u64,
    log: CatalogLog,
}

/// What [`Domain::catalog_changes`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The catalog's generation.
    pub generation: u64,
    /// The file versions changed since, or `None`: the log does not reach
    /// back that far.
    pub files: Option<Vec<FileChange>>,
}

/// One changed file version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChange {
    /// As it is now (new or changed).
    Now(FileVersion),
    /// Deleted.
    Gone(TagId),
}

/// Every file version of a domain, and the generation they were read at.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// The generation.
    pub generation: u64,
    /// The versions, by tag id.
    pub files: Vec<FileVersion>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The options of a new version; the path goes in them when it fits.
fn file_options(
    f: &NewFile,
    version: u64,
    size: u64,
    sha: &str,
    now: u64,
) -> Vec<(String, String)> {
    let mut o = vec![
        (KIND.to_string(), KIND_FILE.to_string()),
        (VERSION.to_string(), version.to_string()),
        (OWNER.to_string(), f.owner.clone()),
        (SIZE.to_string(), size.to_string()),
        (SHA256.to_string(), sha.to_string()),
        (CREATED.to_string(), now.to_string()),
    ];
    if f.directory {
        o.push((TYPE.to_string(), "dir".to_string()));
    }
    if !f.request.is_empty() {
        o.push((REQUEST.to_string(), f.request.clone()));
    }
    let used: usize = o.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if used + PATH.len() + f.path.len() + 2 <= MAX_OPTIONS {
        o.push((PATH.to_string(), f.path.clone()));
    }
    o
}

impl Domain {
    /// The anchor, if this domain has one (one pass over the tag table).
    pub fn find_anchor(&self) -> Result<Option<Anchor>> {
        Ok(self
            .list_tags()?
            .into_iter()
            .filter(|t| t.option(KIND) == Some(KIND_ANCHOR))
            .min_by_key(|t| t.id.to_string())
            .map(|t| Anchor {
                tag: t.id,
                volume: t.volume,
            }))
    }

    /// The anchor, made if there is none yet (under a domain-wide lock, so
    /// two hosts never make two).
    pub fn ensure_anchor(&self) -> Result<Anchor> {
        if let Some(a) = self.find_anchor()? {
            return Ok(a);
        }
        let name = format!("catalog-anchor-{}", self.geometry().domain_id);
        let _g = self.lock_named(name)?;
        if let Some(a) = self.find_anchor()? {
            return Ok(a);
        }
        let extent = self.geometry().extent_size;
        let mut spec = VolumeSpec::raw(extent, "catalog anchor");
        spec.size = extent;
        let head = CatalogHead::default().encode(self.geometry().domain_id.as_bytes());
        let mut tag = TagMeta::disk(
            VolumeRef::New(0),
            extent,
            vec![(KIND.to_string(), KIND_ANCHOR.to_string())],
        );
        tag.tag_type = TagType::Weak;
        tag.mutable = false;
        let out = self
            .tx("create catalog anchor")
            .create_volume(spec)
            .create_tag(tag)
            .set_user_data(TagRef::New(0), HEAD_ITEM, head)
            .set_user_data(
                TagRef::New(0),
                LOG_ITEM,
                CatalogLog::starting_at(0).encode(self.geometry().domain_id.as_bytes()),
            )
            .commit()?;
        Ok(Anchor {
            tag: out.tags[0].id,
            volume: out.volumes[0].id,
        })
    }

    /// The catalog's generation, read from the anchor's head.
    pub fn catalog_generation(&self, a: &Anchor) -> Result<u64> {
        let items = self.read_user_data(&a.tag)?;
        self.head_of(a, &items).map(|h| h.generation)
    }

    fn head_of(&self, a: &Anchor, items: &UserData) -> Result<CatalogHead> {
        let b = items.get(HEAD_ITEM).ok_or_else(|| DomainError::Corrupt {
            what: format!("catalog anchor {}", a.tag),
            offset: 0,
            detail: "no head".into(),
        })?;
        CatalogHead::decode(self.geometry().domain_id.as_bytes(), b).map_err(|e| {
            DomainError::Corrupt {
                what: format!("catalog head of anchor {}", a.tag),
                offset: 0,
                detail: e.to_string(),
            }
        })
    }

    /// The head and change log of the anchor's user data `items` (a log
    /// that is not there yet covers nothing before the head).
    fn head_and_log(&self, a: &Anchor, items: &UserData) -> Result<(CatalogHead, CatalogLog)> {
        let head = self.head_of(a, items)?;
        let corrupt = |detail: String| DomainError::Corrupt {
            what: format!("catalog change log of anchor {}", a.tag),
            offset: 0,
            detail,
        };
        let log = match items.get(LOG_ITEM) {
            None => CatalogLog::starting_at(head.generation),
            Some(b) => CatalogLog::decode(self.geometry().domain_id.as_bytes(), b)
                .map_err(|e| corrupt(e.to_string()))?,
        };
        if log.newest() > head.generation {
            return Err(corrupt(format!(
                "it reaches generation {}, the head is at {}",
                log.newest(),
                head.generation
            )));
        }
        Ok((head, log))
    }

    /// Lock the anchor and check the generation is `expect` (when given).
    fn catalog_turn(&self, a: &Anchor, expect: Option<u64>) -> Result<Turn> {
        let guard = self.lock_tag(&a.tag)?;
        let (head, log) = self.head_and_log(a, &self.read_user_data(&a.tag)?)?;
        let now = head.generation;
        if let Some(e) = expect {
            if e != now {
                return Err(DomainError::Changed(format!(
                    "the catalog is at generation {now}, not {e}"
                )));
            }
        }
        Ok(Turn {
            guard,
            next: now + 1,
            log,
        })
    }

    /// End `tx`, a catalog change that touched `tags`: the raised head and
    /// the change log that names them, under the turn's lock.
    fn close_turn<'a>(
        &self,
        tx: Transaction<'a>,
        a: &Anchor,
        turn: &'a Turn,
        tags: &[TagRef],
    ) -> Transaction<'a> {
        let head = CatalogHead {
            generation: turn.next,
        }
        .encode(self.geometry().domain_id.as_bytes());
        tx.set_user_data(TagRef::Existing(a.tag), HEAD_ITEM, head)
            .set_user_data_naming(
                TagRef::Existing(a.tag),
                LOG_ITEM,
                turn.log.next(turn.next, tags),
            )
            .held(&[&turn.guard])
    }

    /// What changed after generation `since`: the generation now, and the
    /// file versions changed since (`Gone` for those deleted), or `None`
    /// when the change log does not reach back that far (list every file).
    pub fn catalog_changes(&self, a: &Anchor, since: u64) -> Result<Changes> {
        for _ in 0..8 {
            let (head, log) = self.head_and_log(a, &self.read_user_data(&a.tag)?)?;
            let Some(tags) = log.changed_since(since) else {
                return Ok(Changes {
                    generation: head.generation,
                    files: None,
                });
            };
            let mut files = Vec::with_capacity(tags.len());
            for id in tags {
                let t = match self.read_tag(&id) {
                    Ok(t) => t,
                    Err(DomainError::NotFound { .. }) => {
                        files.push(FileChange::Gone(id));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let long = || {
                    let items = self.read_user_data(&t.id)?;
                    Ok(items
                        .get(PATH_ITEM)
                        .map(|b| String::from_utf8_lossy(b).into_owned()))
                };
                files.push(match FileVersion::of_tag(&t, Some(a.volume), long)? {
                    Some(f) => FileChange::Now(f),
                    None => FileChange::Gone(id),
                });
            }
            if self.catalog_generation(a)? == head.generation {
                return Ok(Changes {
                    generation: head.generation,
                    files: Some(files),
                });
            }
        }
        Err(DomainError::Changed(
            "the catalog kept changing while it was read".into(),
        ))
    }

    /// Commit a new version of a file: its tag (and, for a small file, its
    /// bytes) and the raised generation in one transaction; a volume's
    /// bytes become legal in it. The version is the new generation.
    pub fn commit_file(
        &self,
        a: &Anchor,
        f: &NewFile,
        bytes: FileBytes<'_>,
        expect: Option<u64>,
        request_id: [u8; 16],
    ) -> Result<FileVersion> {
        check_path(&f.path)?;
        let turn = self.catalog_turn(a, expect)?;
        let next = turn.next;
        let now = self.clock.now();
        let mut tx = self.tx("commit file").request_id(request_id);
        let (volume, size, sha, inline) = match bytes {
            FileBytes::Inline(b) => {
                check_inline(b.len())?;
                let sha = hex(ring_sha256(b).as_ref());
                (a.volume, b.len() as u64, sha, Some(b))
            }
            FileBytes::Volume {
                id,
                guard,
                size,
                sha256,
            } => {
                let v = self.read_volume(&id)?;
                if v.format != Format::Raw || v.legality != Legality::Illegal || v.capacity < size {
                    return Err(DomainError::FailedPrecondition(format!(
                        "volume {id} is not an illegal raw volume of at least {size} bytes"
                    )));
                }
                let mut meta = v.meta();
                meta.legality = Legality::Legal;
                tx = tx.write_volume_meta(id, meta).held(&[guard]);
                (id, size, sha256, None)
            }
        };
        tx = self.new_file_ops(tx, f, volume, (size, &sha, inline), next, now)?;
        let out = self.close_turn(tx, a, &turn, &[TagRef::New(0)]).commit()?;
        let t = &out.tags[0];
        let path = f.path.clone();
        FileVersion::of_tag(t, Some(a.volume), || Ok(Some(path)))?
            .ok_or_else(|| DomainError::FailedPrecondition("the new tag is not a file".into()))
    }

    /// Add a new file version's tag (the transaction's first new tag) and
    /// its user data to `tx`: on `volume`, of `size` bytes with SHA-256
    /// `sha`, its bytes inline when given.
    pub(crate) fn new_file_ops<'a>(
        &self,
        mut tx: Transaction<'a>,
        f: &NewFile,
        volume: VolumeId,
        (size, sha, inline): (u64, &str, Option<&[u8]>),
        next: u64,
        now: u64,
    ) -> Result<Transaction<'a>> {
        let options = file_options(f, next, size, sha, now);
        let long = options.iter().all(|(k, _)| k != PATH);
        let cap = self.read_volume(&volume)?.capacity;
        let mut meta = TagMeta::disk(VolumeRef::Existing(volume), cap, options);
        meta.mutable = false;
        tx = tx.create_tag(meta);
        if long {
            tx = tx.set_user_data(TagRef::New(0), PATH_ITEM, f.path.clone().into_bytes());
        }
        if let Some(b) = inline {
            tx = tx.set_user_data(TagRef::New(0), DATA_ITEM, b.to_vec());
        }
        Ok(tx)
    }

    /// Delete file versions (their tags, and the volumes of those not
    /// inline) and raise the generation, in one transaction. A version an
    /// image is registered from is refused, naming the image.
    pub fn delete_files(
        &self,
        a: &Anchor,
        tags: &[TagId],
        expect: Option<u64>,
        request_id: [u8; 16],
    ) -> Result<u64> {
        let turn = self.catalog_turn(a, expect)?;
        let mut tx = self.tx("delete files").request_id(request_id);
        for id in tags {
            tx = self.drop_file_ops(tx, a, id)?;
        }
        let touched: Vec<TagRef> = tags.iter().map(|t| TagRef::Existing(*t)).collect();
        self.close_turn(tx, a, &turn, &touched).commit()?;
        Ok(turn.next)
    }

    /// Add the deletion of file version `id` (its tag, and its volume
    /// unless inline) to `tx`; a version an image is registered from is
    /// refused, naming the image.
    pub(crate) fn drop_file_ops<'a>(
        &self,
        tx: Transaction<'a>,
        a: &Anchor,
        id: &TagId,
    ) -> Result<Transaction<'a>> {
        let t = self.read_tag(id)?;
        let f = FileVersion::of_tag(&t, Some(a.volume), || Ok(Some(String::new())))?.ok_or_else(
            || DomainError::NotFound {
                kind: "file version",
                id: id.to_string(),
            },
        )?;
        if let Some(image) = &f.image {
            return Err(DomainError::FailedPrecondition(format!(
                "file version {} holds registered image {image}; unregister it first",
                f.version
            )));
        }
        if t.child_refs > 0 {
            return Err(DomainError::FailedPrecondition(format!(
                "file version {} is the base of {} disk layer(s) made from its image; delete those disks first",
                f.version, t.child_refs
            )));
        }
        let tx = tx.delete_tag(*id);
        Ok(if f.inline {
            tx
        } else {
            tx.delete_volume(f.volume)
        })
    }

    /// Every file version, and the generation they were read at (read
    /// again until the generation stood still across the table pass).
    pub fn list_files(&self, a: Option<&Anchor>) -> Result<Listing> {
        let Some(a) = a else {
            return Ok(Listing::default());
        };
        for _ in 0..8 {
            let before = self.catalog_generation(a)?;
            let mut files = Vec::new();
            for t in self.list_tags()? {
                let long = || -> Result<Option<String>> {
                    let items = self.read_user_data(&t.id)?;
                    Ok(items
                        .get(PATH_ITEM)
                        .map(|b| String::from_utf8_lossy(b).into_owned()))
                };
                if let Some(f) = FileVersion::of_tag(&t, Some(a.volume), long)? {
                    files.push(f);
                }
            }
            if self.catalog_generation(a)? == before {
                return Ok(Listing {
                    generation: before,
                    files,
                });
            }
        }
        Err(DomainError::Changed(
            "the catalog kept changing while it was read".into(),
        ))
    }

    /// A small file's bytes.
    pub fn inline_file(&self, f: &FileVersion) -> Result<Vec<u8>> {
        let mut items = self.read_user_data(&f.tag)?;
        items.remove(DATA_ITEM).ok_or_else(|| DomainError::Corrupt {
            what: format!("file tag {}", f.tag),
            offset: 0,
            detail: "a small file without its data".into(),
        })
    }
}

fn ring_sha256(b: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, b)
}

/// The latest version of each path, by path.
pub fn latest(files: &[FileVersion]) -> BTreeMap<&str, &FileVersion> {
    let mut m: BTreeMap<&str, &FileVersion> = BTreeMap::new();
    for f in files {
        match m.get(f.path.as_str()) {
            Some(o) if o.version >= f.version => {}
            _ => {
                m.insert(f.path.as_str(), f);
            }
        }
    }
    m
}

mod images;
mod log;
pub use images::{check_image_id, ImageChange, IMAGE_ITEM};
pub use log::{
    seal as log_seal, CatalogLog, CatalogLogRaw, LogEntryRaw, LOG_ITEM, LOG_MAGIC, LOG_VERSION,
    MAX_LOG,
};

#[cfg(test)]
mod log_tests;
#[cfg(test)]
mod tests;
