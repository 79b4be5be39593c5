//! Glance v2's additions to Plankton's images, decided without I/O:
//! visibility `private | public | shared` with members who accept or
//! reject, `protected`, tags, `min_disk`/`min_ram`, the virtual size read
//! from the image's header, and the checksum as `os_hash_algo` plus value.

use cairn_domain::limits::quote;
use cairn_proto::auth::Identity;

use super::images::ImageRecord;
use crate::error::{CoordError, Result};

/// The hash algorithm of `checksum` (`os_hash_value`).
pub const OS_HASH_ALGO: &str = "sha256";

/// Most tags and members an image has; longest tag.
const MAX_TAGS: usize = 64;
const MAX_MEMBERS: usize = 256;
const MAX_TAG: usize = 255;

/// Bytes of a file's start that [`virtual_size`] needs.
pub const HEAD: u64 = 512;

/// `private`, `public` or `shared`.
pub fn visibility(r: &ImageRecord) -> &'static str {
    if r.is_public {
        "public"
    } else if r.shared {
        "shared"
    } else {
        "private"
    }
}

/// Set the visibility `v` names.
pub fn set_visibility(r: &mut ImageRecord, v: &str) -> Result<()> {
    (r.is_public, r.shared) = match v {
        "public" => (true, false),
        "shared" => (false, true),
        "private" => (false, false),
        _ => {
            return Err(CoordError::invalid(
                "visibility",
                format!("{}: private, public or shared", quote(v)),
            ))
        }
    };
    Ok(())
}

/// Whether `who` is a member of shared image `r` (any answer).
pub fn member(who: &Identity, r: &ImageRecord) -> bool {
    r.shared && r.members.contains_key(&who.name)
}

/// Whether `who` sees image `r` in listings: as `visible`, but a member
/// only once it accepted.
pub fn listed(who: &Identity, r: &ImageRecord) -> bool {
    r.is_public
        || who.may_act_on(Some(&r.owner))
        || (r.shared && r.members.get(&who.name).is_some_and(|s| s == "accepted"))
}

/// A member's answer, checked.
pub fn check_status(s: &str) -> Result<()> {
    if ["pending", "accepted", "rejected"].contains(&s) {
        return Ok(());
    }
    Err(CoordError::invalid(
        "status",
        format!("{}: pending, accepted or rejected", quote(s)),
    ))
}

/// Add members (as `pending`) and remove others; members are added only
/// to a shared image.
pub fn change_members(r: &mut ImageRecord, add: &[String], remove: &[String]) -> Result<()> {
    if !add.is_empty() && !r.shared {
        return Err(CoordError::FailedPrecondition(format!(
            "image {} is not shared: set its visibility to shared first",
            r.id
        )));
    }
    for m in add {
        cairn_proto::auth::check_token_name(m).map_err(|e| CoordError::invalid("members", e))?;
        if *m == r.owner {
            return Err(CoordError::invalid(
                "members",
                format!("{} owns image {}", quote(m), r.id),
            ));
        }
        r.members
            .entry(m.clone())
            .or_insert_with(|| "pending".into());
    }
    for m in remove {
        if r.members.remove(m).is_none() {
            return Err(CoordError::NotFound {
                kind: "member",
                id: format!("{m} of image {}", r.id),
            });
        }
    }
    if r.members.len() > MAX_MEMBERS {
        return Err(CoordError::invalid(
            "members",
            format!("{} members; at most {MAX_MEMBERS}", r.members.len()),
        ));
    }
    Ok(())
}

/// Add and remove tags (a set, kept in the order added).
pub fn change_tags(r: &mut ImageRecord, add: &[String], remove: &[String]) -> Result<()> {
    for t in add {
        if t.is_empty() || t.len() > MAX_TAG || t.chars().any(char::is_control) {
            return Err(CoordError::invalid(
                "tags",
                format!(
                    "{}: 1 to {MAX_TAG} bytes without control characters",
                    quote(t)
                ),
            ));
        }
        if !r.tags.contains(t) {
            r.tags.push(t.clone());
        }
    }
    r.tags.retain(|t| !remove.contains(t));
    if r.tags.len() > MAX_TAGS {
        return Err(CoordError::invalid(
            "tags",
            format!("{} tags; at most {MAX_TAGS}", r.tags.len()),
        ));
    }
    Ok(())
}

/// A field of Glance's set through a change: `visibility`, `protected`,
/// `min_disk`, `min_ram`. False when `name` is none of them.
pub fn set_field(r: &mut ImageRecord, name: &str, v: &str) -> Result<bool> {
    let number = |v: &str| {
        v.parse::<u64>().map_err(|_| {
            CoordError::invalid("set", format!("{name} is {}, not a number", quote(v)))
        })
    };
    match name {
        "visibility" => set_visibility(r, v)?,
        "protected" => {
            r.protected = match v.to_ascii_lowercase().as_str() {
                "true" => true,
                "false" | "" => false,
                _ => {
                    return Err(CoordError::invalid(
                        "set",
                        format!("protected is {}, not true or false", quote(v)),
                    ))
                }
            }
        }
        "min_disk" => r.min_disk = if v.is_empty() { 0 } else { number(v)? },
        "min_ram" => r.min_ram = if v.is_empty() { 0 } else { number(v)? },
        _ => return Ok(false),
    }
    Ok(true)
}

/// Refuse unregistering (or registering over) protected image `r`.
pub fn check_unprotected(r: &ImageRecord) -> Result<()> {
    if r.protected {
        return Err(CoordError::FailedPrecondition(format!(
            "image {} is protected: clear protected first",
            r.id
        )));
    }
    Ok(())
}

/// Whether [`virtual_size`] needs the file's first bytes: not for a raw
/// image, whose bytes are the disk.
pub fn needs_head(disk_format: &str) -> bool {
    disk_format != "raw"
}

/// The virtual size of a disk image whose first bytes are `head` and
/// whose file holds `size` bytes: the file's size when `disk_format` is
/// `raw` (its bytes are the disk, whatever they hold, as a disk made from
/// it reads them); otherwise a qcow2 header's size field, else 0 (not
/// known).
pub fn virtual_size(head: &[u8], size: u64, disk_format: &str) -> u64 {
    if !needs_head(disk_format) {
        return size;
    }
    if head.len() >= 32 && head[..4] == *b"QFI\xfb" {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[24..32]);
        return u64::from_be_bytes(b);
    }
    0
}
