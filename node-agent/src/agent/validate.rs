//! Checks of what callers ask for, before anything is changed.

use super::*;

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
pub(super) fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(super) fn tag_meta(s: &TagSpec, volume: VolumeRef, capacity: u64) -> TagMeta {
    TagMeta {
        volume,
        size: if s.size == 0 { capacity } else { s.size },
        mutable: s.mutable,
        strategy: s.strategy,
        options: s.options.clone(),
        tag_type: s.tag_type,
        state: s.state,
    }
}

pub(super) fn validate_capacity(c: u64) -> Result<()> {
    if c == 0 {
        return Err(AgentError::invalid("capacity", "must be more than 0 bytes"));
    }
    if c > limits::MAX_CAPACITY {
        return Err(AgentError::invalid(
            "capacity",
            format!(
                "{c} bytes is more than the largest volume ({} bytes)",
                limits::MAX_CAPACITY
            ),
        ));
    }
    if c % 512 != 0 {
        return Err(AgentError::invalid(
            "capacity",
            format!("{c} bytes is not a multiple of 512"),
        ));
    }
    Ok(())
}

pub(crate) fn validate_description(d: &str) -> Result<()> {
    limits::check_text("description", d, limits::MAX_DESCRIPTION)?;
    Ok(())
}

pub(super) fn validate_item_name(n: &str) -> Result<()> {
    Ok(limits::check_name("name", "", n, limits::MAX_ITEM_NAME)?)
}

/// A domain name or id as given in a request: no path separators, no
/// control characters.
pub fn validate_name(field: &'static str, n: &str) -> Result<()> {
    if n.len() > limits::MAX_DOMAIN_NAME
        || n.contains('/')
        || n.contains('\0')
        || n.chars().any(char::is_control)
    {
        return Err(AgentError::invalid(
            field,
            format!(
                "{} is not a name (at most {} bytes, no '/' or control characters)",
                limits::quote(n),
                limits::MAX_DOMAIN_NAME
            ),
        ));
    }
    Ok(())
}

pub(crate) fn validate_tag_spec(s: &TagSpec) -> Result<()> {
    cairn_domain::model::encode_options(&s.options)?;
    Ok(())
}

/// A parent tag for a volume of `format` and the volume it points at; only
/// qcow2 volumes have parents.
pub(super) fn read_parent(o: &Opened, format: Format, p: &TagId) -> Result<(Tag, Volume)> {
    if format != Format::Qcow2 {
        return Err(AgentError::invalid(
            "parent_tag",
            "only a qcow2 volume can have a parent",
        ));
    }
    let t = o.domain.read_tag(p).map_err(|e| match e {
        DomainError::NotFound { .. } => AgentError::not_found("parent tag", p.to_string()),
        e => e.into(),
    })?;
    let v = o.domain.read_volume(&t.volume)?;
    Ok((t, v))
}
