//! The two superblock copies: reading them (a damaged copy is repaired
//! from its twin) and formatting a device.

use super::*;

/// What happened to the two superblock copies at open.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SuperblockStatus {
    /// Problem with the primary copy, if any.
    pub primary: Option<String>,
    /// Problem with the backup copy, if any.
    pub backup: Option<String>,
    /// A damaged copy was rewritten from its twin.
    pub repaired: bool,
}

/// Read both superblocks; returns the geometry and what was wrong.
pub fn read_superblocks(dev: &dyn BlockDev) -> Result<(Geometry, SuperblockStatus)> {
    let size = dev.size();
    if size < 2 * PAGE {
        return Err(DomainError::NotADomain(format!(
            "device of {size} bytes is too small to hold a domain"
        )));
    }
    let mut buf = AlignedBuf::zeroed(PAGE as usize);
    dev.read_at(&mut buf, 0)
        .map_err(DomainError::io("reading the primary superblock"))?;
    let primary = Geometry::decode(&buf, 0);
    let mut st = SuperblockStatus::default();
    let backup_at = |g: &Geometry| g.backup_sb_off();
    let read_backup = |off: u64| -> Result<Geometry> {
        if off + PAGE > size {
            return Err(DomainError::corrupt(
                "backup superblock",
                off,
                "beyond end of device",
            ));
        }
        let mut b = AlignedBuf::zeroed(PAGE as usize);
        dev.read_at(&mut b, off)
            .map_err(DomainError::io("reading the backup superblock"))?;
        Geometry::decode(&b, off)
    };
    match primary {
        Ok(g) => {
            match read_backup(backup_at(&g)) {
                Ok(b) if b == g => {}
                Ok(_) => {
                    return Err(DomainError::corrupt(
                        "superblocks",
                        0,
                        "primary and backup disagree",
                    ))
                }
                Err(e) => st.backup = Some(e.to_string()),
            }
            Ok((g, st))
        }
        Err(pe) => {
            // The backup is in the last page of the device (or of the size the
            // domain was formatted with, which we cannot know without it).
            let off = size - size % PAGE - PAGE;
            match read_backup(off) {
                Ok(g) => {
                    st.primary = Some(pe.to_string());
                    Ok((g, st))
                }
                Err(be) => match (&pe, &be) {
                    (DomainError::NotADomain(_), DomainError::NotADomain(_)) => Err(pe),
                    (DomainError::NotADomain(_), _) => Err(be),
                    _ => Err(pe),
                },
            }
        }
    }
}

/// Format `dev` as a new domain. Refuses a device that already holds a
/// domain unless `force`, and even then refuses one a live host has open.
pub fn format(
    dev: &dyn BlockDev,
    params: &FormatParams,
    force: bool,
    locks: &dyn LockService,
    clock: &dyn Clock,
) -> Result<Geometry> {
    match read_superblocks(dev) {
        Ok((g, _)) => {
            if !force {
                return Err(DomainError::AlreadyExists {
                    what: format!(
                        "device already holds domain {:?} ({}); pass --force to overwrite it",
                        g.name, g.domain_id
                    ),
                });
            }
            for i in 0..g.host_slots {
                let r = Resource {
                    domain: g.domain_id,
                    kind: ResourceKind::HostSlot(i),
                };
                if locks.holder(&r)?.is_some() {
                    return Err(DomainError::FailedPrecondition(format!(
                        "domain {:?} is in use by a live host (slot {i}); stop it first",
                        g.name
                    )));
                }
            }
        }
        Err(DomainError::NotADomain(_)) => {}
        Err(e) if force => {
            tracing::warn!("overwriting a damaged domain: {e}");
        }
        Err(e) => {
            return Err(DomainError::AlreadyExists {
                what: format!("device holds a damaged domain ({e}); pass --force to overwrite it"),
            })
        }
    }
    let g = Geometry::compute(
        dev.size(),
        dev.sector_size(),
        params,
        uuid::Uuid::new_v4(),
        clock.now(),
    )?;
    let io = |what: &'static str| DomainError::io(format!("formatting: {what}"));
    // Old superblocks go first so a crash mid-format leaves no domain.
    dev.zero_range(g.backup_sb_off(), PAGE)
        .map_err(io("clearing the backup superblock"))?;
    dev.zero_range(0, g.data_off)
        .map_err(io("clearing metadata"))?;
    dev.flush().map_err(io("flush"))?;
    let alloc = AllocMap::empty(&g);
    dev.write_at(&alloc.format_pages(&g), g.alloc_off)
        .map_err(io("writing the allocation map"))?;
    dev.flush().map_err(io("flush"))?;
    let sb = AlignedBuf::from_slice(g.encode().as_bytes(), PAGE as usize);
    dev.write_at(&sb, 0).map_err(io("writing the superblock"))?;
    dev.flush().map_err(io("flush"))?;
    dev.write_at(&sb, g.backup_sb_off())
        .map_err(io("writing the backup superblock"))?;
    dev.flush().map_err(io("flush"))?;
    Ok(g)
}
