//! Images as Plankton has them (seed 001), decided without I/O: the record
//! kept on the file version (user data item `image`, JSON), the metafile
//! written beside it (kamaki's field names), registration as an override,
//! metafile templates, changes, and who may see or change an image.

use std::collections::BTreeMap;

use cairn_domain::catalog::FileVersion;
use cairn_proto::auth::Identity;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{CoordError, Result};

/// An image's record, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Derived from the file's domain and path ([`image_id`]).
    pub id: String,
    /// For people.
    pub name: String,
    /// The file's owner.
    pub owner: String,
    /// `cairn://OWNER/DOMAIN/PATH`.
    pub location: String,
    /// SHA-256 of the file's bytes, hex.
    pub checksum: String,
    /// `bare` unless said.
    pub container_format: String,
    /// `raw` unless said.
    pub disk_format: String,
    /// When its file version was made (seconds).
    pub created_at: u64,
    /// When the record last changed (seconds).
    pub updated_at: u64,
    /// Listed for everyone.
    pub is_public: bool,
    /// Upper-cased keys.
    pub properties: BTreeMap<String, String>,
    /// Bytes of the file.
    pub size: u64,
    /// `available` when registered; set freely after.
    pub status: String,
    /// Aliases, unique in the catalog (seed 004).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Kept for the caller (seed 004).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metadata: String,
    /// Flags (seed 004).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flags: BTreeMap<String, String>,
    /// Seen by its members (Glance's `shared`; `is_public` wins).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// Members of a shared image and their answer: `pending`,
    /// `accepted` or `rejected`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, String>,
    /// Not unregistered, nor registered over, while set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protected: bool,
    /// Glance's tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// GiB a disk made from it needs at least.
    #[serde(default)]
    pub min_disk: u64,
    /// MiB of memory a machine booting it needs at least.
    #[serde(default)]
    pub min_ram: u64,
    /// The size of the disk it holds, read from its header at
    /// registration (0: not known).
    #[serde(default)]
    pub virtual_size: u64,
}

/// Longest property key and value, in bytes.
const MAX_KEY: usize = 128;
const MAX_VALUE: usize = 1024;
/// The metafile must fit a small file.
const MAX_METAFILE: usize = cairn_domain::catalog::MAX_INLINE as usize;

/// Fields set by the system, never by a caller.
const IMMUTABLE: [&str; 11] = [
    "id",
    "owner",
    "location",
    "checksum",
    "size",
    "created_at",
    "updated_at",
    "deleted_at",
    "virtual_size",
    "os_hash_algo",
    "os_hash_value",
];

/// The image id of the file at `path` on domain `domain`: the same for
/// every registration of that file (seed 001, 5.7).
pub fn image_id(domain: &uuid::Uuid, path: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("cairn-image\0{domain}\0{path}").as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    // A version 8 (custom) UUID of the RFC 9562 variant.
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b).to_string()
}

/// A property key as shown and stored: upper case (kamaki's `-p user=x`
/// is `USER`).
pub fn property_key(k: &str) -> Result<String> {
    if k.is_empty() || k.len() > MAX_KEY || k.chars().any(|c| c.is_control() || c == '=') {
        return Err(CoordError::invalid(
            "properties",
            format!(
                "key {}: 1 to {MAX_KEY} bytes without '=' or control characters",
                cairn_domain::limits::quote(k)
            ),
        ));
    }
    Ok(k.to_uppercase())
}

fn property_value(k: &str, v: &str) -> Result<String> {
    if v.len() > MAX_VALUE {
        return Err(CoordError::invalid(
            "properties",
            format!("{k}: {} bytes, at most {MAX_VALUE}", v.len()),
        ));
    }
    Ok(v.to_string())
}

/// What a registration asks for, besides its file.
#[derive(Debug, Clone, Default)]
pub struct Register {
    /// The name; empty: the template's.
    pub name: String,
    /// `-p` properties (win over the template's).
    pub properties: BTreeMap<String, String>,
    /// A metafile's JSON used as a template (empty: none).
    pub template: Vec<u8>,
    /// Publish it.
    pub public: bool,
    /// Empty: the template's, else `raw`.
    pub disk_format: String,
    /// Empty: the template's, else `bare`.
    pub container_format: String,
    /// A given id (empty: the one already registered from the file, else
    /// the file's own, [`image_id`]).
    pub id: String,
    /// Aliases (checked for uniqueness by the caller).
    pub names: Vec<String>,
    /// The metadata string.
    pub metadata: String,
    /// Register from this version of the file, which must be its latest
    /// (the one a job made); none: the latest.
    pub version: Option<cairn_domain::TagId>,
}

/// What a metafile template gives.
#[derive(Debug, Default, PartialEq)]
struct Template {
    name: Option<String>,
    properties: BTreeMap<String, String>,
    disk_format: Option<String>,
    container_format: Option<String>,
    is_public: bool,
}

fn template(b: &[u8]) -> Result<Template> {
    if b.is_empty() {
        return Ok(Template::default());
    }
    let bad = |why: String| CoordError::invalid("metafile", why);
    let v: Value = serde_json::from_slice(b).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(bad("not a JSON object".into()));
    };
    let text = |k: &str| -> Result<Option<String>> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(bad(format!("{k:?} is {other}, not a string"))),
        }
    };
    let mut properties = BTreeMap::new();
    match m.get("properties") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            for (k, v) in p {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => return Err(bad(format!("property {k:?} is {other}, not a string"))),
                };
                let key = property_key(k)?;
                let v = property_value(&key, &v)?;
                properties.insert(key, v);
            }
        }
        Some(other) => return Err(bad(format!("\"properties\" is {other}, not an object"))),
    }
    let is_public = match m.get("is-public") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") || s.is_empty() => false,
        Some(other) => return Err(bad(format!("\"is-public\" is {other}, not True or False"))),
    };
    Ok(Template {
        name: text("name")?,
        properties,
        disk_format: text("disk-format")?,
        container_format: text("container-format")?,
        is_public,
    })
}

/// Whether `who` may see image `r`.
pub fn visible(who: &Identity, r: &ImageRecord) -> bool {
    r.is_public || who.may_act_on(Some(&r.owner)) || super::glance::member(who, r)
}

/// Refuse `who` changing image `r`: PERMISSION_DENIED when it may see
/// it, NOT_FOUND otherwise (a private image of another is not told of).
pub fn may_change(who: &Identity, r: &ImageRecord) -> Result<()> {
    if who.may_act_on(Some(&r.owner)) {
        Ok(())
    } else if visible(who, r) {
        Err(CoordError::Denied(format!(
            "image {} belongs to {}; only its owner may change it",
            r.id, r.owner
        )))
    } else {
        Err(CoordError::NotFound {
            kind: "image",
            id: r.id.clone(),
        })
    }
}

/// The record a registration of file version `f` (at `location`, on
/// domain `domain`) makes at time `now`: everything customizable comes
/// from the request, then the template, then the defaults; nothing from
/// an earlier registration (an override, not an update).
pub fn plan_register(
    who: &Identity,
    f: &FileVersion,
    location: &str,
    domain: &uuid::Uuid,
    req: &Register,
    now: u64,
) -> Result<ImageRecord> {
    if !who.may_act_on(Some(&f.owner)) {
        return Err(CoordError::Denied(format!(
            "{} may not register an image from {location}: it belongs to another owner",
            who.name
        )));
    }
    if f.directory {
        return Err(CoordError::FailedPrecondition(format!(
            "{location} is a directory"
        )));
    }
    let t = template(&req.template)?;
    let name = if req.name.is_empty() {
        t.name.clone().unwrap_or_default()
    } else {
        req.name.clone()
    };
    if name.is_empty() {
        return Err(CoordError::invalid("name", "is required"));
    }
    let mut properties = t.properties;
    for (k, v) in &req.properties {
        let key = property_key(k)?;
        let v = property_value(&key, v)?;
        properties.insert(key, v);
    }
    let pick = |asked: &str, from: Option<String>, default: &str| {
        if !asked.is_empty() {
            asked.to_string()
        } else {
            from.filter(|s| !s.is_empty())
                .unwrap_or_else(|| default.to_string())
        }
    };
    let id = if !req.id.is_empty() {
        cairn_domain::catalog::check_image_id(&req.id)?;
        req.id.clone()
    } else {
        f.image.clone().unwrap_or_else(|| image_id(domain, &f.path))
    };
    let r = ImageRecord {
        id,
        name,
        owner: f.owner.clone(),
        location: location.to_string(),
        checksum: f.sha256.clone(),
        container_format: pick(&req.container_format, t.container_format, "bare"),
        disk_format: pick(&req.disk_format, t.disk_format, "raw"),
        created_at: f.created,
        updated_at: now,
        is_public: req.public || t.is_public,
        properties,
        size: f.size,
        status: "available".into(),
        names: super::store::check_names(&req.names)?,
        metadata: super::store::check_metadata(&req.metadata)?,
        flags: BTreeMap::new(),
        shared: false,
        members: BTreeMap::new(),
        protected: false,
        tags: Vec::new(),
        min_disk: 0,
        min_ram: 0,
        virtual_size: 0,
    };
    check_size(&r)?;
    Ok(r)
}

/// Refuse a record whose metafile would not fit a small file, or that
/// is larger than [`MAX_RECORD`] as stored.
fn check_size(r: &ImageRecord) -> Result<()> {
    let n = metafile(r).len();
    if n > MAX_METAFILE {
        return Err(CoordError::invalid(
            "properties",
            format!("the image's metadata is {n} bytes; at most {MAX_METAFILE}"),
        ));
    }
    let n = encode(r).len();
    if n > MAX_RECORD {
        return Err(CoordError::invalid(
            "image",
            format!("the image's record is {n} bytes; at most {MAX_RECORD}"),
        ));
    }
    Ok(())
}

/// The largest record kept, as stored.
const MAX_RECORD: usize = 64 << 10;

/// A change to an image's record.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// Fields to set.
    pub set: BTreeMap<String, String>,
    /// Fields to set to "".
    pub clear: Vec<String>,
    /// Properties to set.
    pub set_properties: BTreeMap<String, String>,
    /// Properties to remove.
    pub remove_properties: Vec<String>,
    /// Publish (true) or unpublish (false).
    pub public: Option<bool>,
    /// Flags to set.
    pub set_flags: BTreeMap<String, String>,
    /// Flags to clear.
    pub clear_flags: Vec<String>,
    /// Tags to add.
    pub add_tags: Vec<String>,
    /// Tags to remove.
    pub remove_tags: Vec<String>,
    /// Members to add (`pending`).
    pub add_members: Vec<String>,
    /// Members to remove.
    pub remove_members: Vec<String>,
}

/// A field name as the API and the CLI accept it (`disk-format` or
/// `disk_format`).
fn field_name(f: &str) -> String {
    f.to_ascii_lowercase().replace('-', "_")
}

/// The record after `c`, at time `now`.
pub fn plan_change(r: &ImageRecord, c: &Change, now: u64) -> Result<ImageRecord> {
    let mut n = r.clone();
    let fields = c
        .set
        .iter()
        .map(|(k, v)| (k, Some(v)))
        .chain(c.clear.iter().map(|k| (k, None)));
    for (k, v) in fields {
        let name = field_name(k);
        if IMMUTABLE.contains(&name.as_str()) || name == "is_public" && v.is_none() {
            return Err(CoordError::invalid(
                "set",
                format!("field {k} cannot be changed"),
            ));
        }
        let v = v.cloned().unwrap_or_default();
        match name.as_str() {
            "name" => n.name = v,
            "disk_format" => n.disk_format = v,
            "container_format" => n.container_format = v,
            "status" => n.status = v,
            "metadata" => n.metadata = super::store::check_metadata(&v)?,
            "is_public" => {
                n.shared = false;
                n.is_public = match v.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(CoordError::invalid(
                            "set",
                            format!("is_public is {v:?}, not true or false"),
                        ))
                    }
                }
            }
            other => {
                if !super::glance::set_field(&mut n, other, &v)? {
                    return Err(CoordError::invalid(
                        "set",
                        format!(
                            "unknown field {k} (name, disk_format, container_format, status, \
                             metadata, visibility, protected, min_disk, min_ram)"
                        ),
                    ));
                }
            }
        }
    }
    for (k, v) in &c.set_properties {
        let key = property_key(k)?;
        let v = property_value(&key, v)?;
        n.properties.insert(key, v);
    }
    for k in &c.remove_properties {
        let key = property_key(k)?;
        if n.properties.remove(&key).is_none() {
            return Err(CoordError::NotFound {
                kind: "property",
                id: format!("{key} of image {}", r.id),
            });
        }
    }
    if let Some(p) = c.public {
        let v = if p { "public" } else { "private" };
        super::glance::set_visibility(&mut n, v)?;
    }
    super::glance::change_tags(&mut n, &c.add_tags, &c.remove_tags)?;
    super::glance::change_members(&mut n, &c.add_members, &c.remove_members)?;
    for (k, v) in &c.set_flags {
        super::store::check_flag(k, v)?;
        n.flags.insert(k.clone(), v.clone());
    }
    for k in &c.clear_flags {
        n.flags.remove(k);
    }
    super::store::check_flag_count(&n)?;
    n.updated_at = now;
    check_size(&n)?;
    Ok(n)
}

/// Seconds as kamaki shows dates: `2013-06-19 08:00:22` (UTC).
pub fn date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The metafile of an image: kamaki's fields and spelling, pretty JSON.
pub fn metafile(r: &ImageRecord) -> Vec<u8> {
    let v = json!({
        "status": r.status,
        "name": r.name,
        "checksum": r.checksum,
        "id": r.id,
        "updated-at": date(r.updated_at),
        "created-at": date(r.created_at),
        "properties": r.properties,
        "location": r.location,
        "is-public": if r.is_public { "True" } else { "False" },
        "owner": r.owner,
        "disk-format": r.disk_format,
        "size": r.size.to_string(),
        "deleted-at": "",
        "container-format": r.container_format,
    });
    let mut b = serde_json::to_vec_pretty(&v).expect("a JSON value");
    b.push(b'\n');
    b
}

/// A stored record (from user data item `image`).
pub fn decode(b: &[u8]) -> Result<ImageRecord> {
    serde_json::from_slice(b)
        .map_err(|e| CoordError::Internal(format!("an image record does not read: {e}")))
}

/// A record as stored.
pub fn encode(r: &ImageRecord) -> Vec<u8> {
    serde_json::to_vec(r).expect("a record")
}
