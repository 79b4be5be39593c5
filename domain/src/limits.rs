//! The one set of limits every layer checks against (domain, agent,
//! coordinator, CLI), so that what one layer accepts the next never
//! refuses. On-disk fields may be larger than a limit (room for later);
//! never smaller.

use crate::error::{DomainError, Result};

/// Most host slots of a domain.
pub const MAX_HOST_SLOTS: u32 = 2000;
/// Most volume or tag slots of a domain.
pub const MAX_SLOTS: u32 = 1 << 22;
/// Most user data bytes per tag.
pub const MAX_USER_DATA: u32 = 1 << 20;
/// Fewest extents a domain must have.
pub const MIN_EXTENTS: u64 = 4;
/// Largest domain name in bytes (the superblock's field).
pub const MAX_DOMAIN_NAME: usize = 64;

/// Largest virtual size of a volume or disk: 1 PiB, below what a qcow2
/// image with 64 KiB clusters can address (2 PiB).
pub const MAX_CAPACITY: u64 = 1 << 50;
/// Largest description of a volume, disk or snapshot in bytes. The volume
/// record has room for 400; a snapshot's whole description also fits the
/// options of its weak tag.
pub const MAX_DESCRIPTION: usize = 256;
/// Largest encoded tag options in bytes (the tag record's field).
pub const MAX_OPTIONS: usize = 408;
/// Largest user data item name in bytes.
pub const MAX_ITEM_NAME: usize = 64;
/// Largest name of a disk for people, in bytes (kept in its tag's
/// options).
pub const MAX_NAME: usize = 128;
/// Largest request id in bytes.
pub const MAX_REQUEST_ID: usize = 64;

const _: () = assert!(MAX_DESCRIPTION <= 400, "the volume record holds 400 bytes");
const _: () = assert!(MAX_NAME + 11 < MAX_OPTIONS, "a name fits the options");

/// Most characters of a caller's input any message quotes.
pub const MAX_QUOTED: usize = 64;

/// A caller's input as messages show it: at most [`MAX_QUOTED`] characters
/// and how long it was, so that a huge field is never echoed into a status
/// (whose metadata has a size limit) or a log line.
pub fn shorten(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(MAX_QUOTED) {
        None => s.into(),
        Some((end, _)) => format!("{}… ({} bytes)", &s[..end], s.len()).into(),
    }
}

/// [`shorten`], quoted with escapes (`"abc"`).
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        None => format!("{s:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &s[..end], s.len()),
    }
}

/// Longest tag option key.
pub const MAX_KEY: usize = 64;

/// Whether `s` is a name (an option key, a user data item): 1 to `max`
/// characters of `[A-Za-z0-9._:-]`.
pub fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

/// Refuse `s` in `field` unless it is a name (see [`is_name`]); `what`
/// ("key ", or nothing) goes before it in the message.
pub fn check_name(field: &'static str, what: &str, s: &str, max: usize) -> Result<()> {
    if !is_name(s, max) {
        let q = quote(s);
        return Err(DomainError::invalid(
            field,
            format!("{what}{q} must be 1-{max} characters of [A-Za-z0-9._:-]"),
        ));
    }
    Ok(())
}

/// Check free text: length and no control characters.
pub fn check_text(field: &'static str, s: &str, max: usize) -> Result<()> {
    if s.len() > max {
        return Err(DomainError::invalid(
            field,
            format!("{} bytes is over the limit of {max}", s.len()),
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(DomainError::invalid(
            field,
            format!("control character {c:?} is not allowed"),
        ));
    }
    Ok(())
}

/// Check a request id: it is remembered and journaled, so it is short.
pub fn check_request_id(id: &str) -> Result<()> {
    if id.len() > MAX_REQUEST_ID || id.chars().any(char::is_control) {
        return Err(DomainError::invalid(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID} bytes without control characters"),
        ));
    }
    Ok(())
}

/// Check a virtual size: a positive multiple of 512 up to
/// [`MAX_CAPACITY`].
pub fn check_capacity(field: &'static str, size: u64) -> Result<()> {
    if size == 0 || size % 512 != 0 || size > MAX_CAPACITY {
        return Err(DomainError::invalid(
            field,
            format!("{size} is not a positive multiple of 512 up to {MAX_CAPACITY}"),
        ));
    }
    Ok(())
}

/// Check that a new virtual size `size` of a `what` (a disk, a volume)
/// whose size is `current` does not shrink it: images only grow.
pub fn check_growth(field: &'static str, what: &str, size: u64, current: u64) -> Result<()> {
    if size < current {
        return Err(DomainError::invalid(
            field,
            format!("{size} is smaller than the {what}'s {current}; {what}s only grow"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_what_is_over_them() {
        check_text("d", &"x".repeat(MAX_DESCRIPTION), MAX_DESCRIPTION).unwrap();
        assert!(check_text("d", &"x".repeat(MAX_DESCRIPTION + 1), MAX_DESCRIPTION).is_err());
        assert!(check_text("d", "a\tb", MAX_DESCRIPTION).is_err());
        check_request_id(&"r".repeat(MAX_REQUEST_ID)).unwrap();
        assert!(check_request_id(&"r".repeat(MAX_REQUEST_ID + 1)).is_err());
        check_capacity("size", MAX_CAPACITY).unwrap();
        for bad in [0, 511, MAX_CAPACITY + 512] {
            assert!(check_capacity("size", bad).is_err(), "{bad}");
        }
        check_growth("size", "disk", 4096, 4096).unwrap();
        let e = check_growth("size", "disk", 512, 4096).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid size: 512 is smaller than the disk's 4096; disks only grow"
        );
    }
}
