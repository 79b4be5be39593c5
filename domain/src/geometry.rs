//! Domain geometry: where everything is, computed once at format time and
//! stored in the superblock.

use serde::Serialize;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::error::{DomainError, Result};
use crate::layout::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Format-time choices; `None` means "size it from the device".
#[derive(Debug, Clone, Default)]
pub struct FormatParams {
    /// Domain name.
    pub name: String,
    /// Bytes per extent (power of two, at least 1 MiB).
    pub extent_size: Option<u64>,
    /// Host slots.
    pub host_slots: Option<u32>,
    /// Volume metadata slots.
    pub volume_slots: Option<u32>,
    /// Tag metadata slots.
    pub tag_slots: Option<u32>,
    /// User data bytes per tag (multiple of 4096).
    pub user_data_size: Option<u32>,
    /// Journal bytes per host slot (multiple of 4096).
    pub journal_size: Option<u64>,
    /// Zero every deleted volume's extents before they are freed (the
    /// compatible feature [`crate::layout::COMPAT_WIPE_AFTER_DELETE`]).
    pub wipe_after_delete: bool,
}

impl FormatParams {
    /// A small domain named `name`: `host_slots` host slots, `slots`
    /// volume and tag slots each, 1 MiB extents, the rest sized from the
    /// device (tests, benchmarks, examples).
    pub fn small(name: &str, host_slots: u32, slots: u32) -> FormatParams {
        FormatParams {
            name: name.into(),
            extent_size: Some(MIB),
            host_slots: Some(host_slots),
            volume_slots: Some(slots),
            tag_slots: Some(slots),
            ..Default::default()
        }
    }

    /// A tiny domain named `name`: as [`FormatParams::small`] but with
    /// 64 KiB journals, 4 KiB of user data per tag and the extent size
    /// from the device (golden bytes, fuzzing).
    pub fn tiny(name: &str, host_slots: u32, slots: u32) -> FormatParams {
        FormatParams {
            extent_size: None,
            user_data_size: Some(4096),
            journal_size: Some(65536),
            ..FormatParams::small(name, host_slots, slots)
        }
    }
}

/// Limits on format parameters (in [`crate::limits`]).
pub mod limits {
    pub use crate::limits::{
        MAX_DOMAIN_NAME as MAX_NAME, MAX_HOST_SLOTS, MAX_SLOTS, MAX_USER_DATA, MIN_EXTENTS,
    };
}

/// Where everything is on a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Geometry {
    /// Domain UUID.
    pub domain_id: uuid::Uuid,
    /// Domain name.
    pub name: String,
    /// Creation time.
    pub created: u64,
    /// Bytes covered.
    pub device_size: u64,
    /// Record stride.
    pub sector_size: u32,
    /// Bytes per extent.
    pub extent_size: u64,
    /// Extents in the data area.
    pub extent_count: u64,
    /// Host slots.
    pub host_slots: u32,
    /// Volume slots.
    pub volume_slots: u32,
    /// Tag slots.
    pub tag_slots: u32,
    /// User data bytes per tag half.
    pub user_data_size: u32,
    /// Journal bytes per host slot.
    pub journal_size: u64,
    /// Offset of the slot table.
    pub slot_table_off: u64,
    /// Offset of the first journal.
    pub journal_off: u64,
    /// Offset of the allocation map root.
    pub alloc_off: u64,
    /// Pages of the allocation map including its root.
    pub alloc_pages: u32,
    /// Offset of the volume table.
    pub volume_table_off: u64,
    /// Offset of the tag table.
    pub tag_table_off: u64,
    /// Offset of the user data area.
    pub user_data_off: u64,
    /// Offset of the first extent.
    pub data_off: u64,
    /// Feature bits.
    pub compat: u64,
    /// Feature bits.
    pub incompat: u64,
    /// Feature bits.
    pub ro_compat: u64,
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Pages needed by a bitmap of `bits` bits.
pub fn bitmap_pages(bits: u64) -> u64 {
    bits.div_ceil(BITS_PER_PAGE).max(1)
}

impl Geometry {
    /// Lay out a new domain on a device of `device_size` bytes.
    pub fn compute(
        device_size: u64,
        sector_size: u32,
        p: &FormatParams,
        domain_id: uuid::Uuid,
        created: u64,
    ) -> Result<Geometry> {
        if p.name.is_empty() || p.name.len() > limits::MAX_NAME {
            return Err(DomainError::invalid(
                "name",
                format!("must be 1-{} bytes", limits::MAX_NAME),
            ));
        }
        if let Some(c) = p.name.chars().find(|c| c.is_control() || *c == '/') {
            return Err(DomainError::invalid(
                "name",
                format!("character {c:?} is not allowed"),
            ));
        }
        let sector = sector_size.max(RECORD as u32);
        if sector != 512 && sector != 4096 {
            return Err(DomainError::invalid(
                "sector_size",
                format!("{sector} (expected 512 or 4096)"),
            ));
        }
        let device_size = device_size - device_size % PAGE;
        let extent_size = match p.extent_size {
            Some(e) => {
                if e < MIB || !e.is_power_of_two() || e > 1 << 34 {
                    return Err(DomainError::invalid(
                        "extent_size",
                        format!("{e} must be a power of two between 1 MiB and 16 GiB"),
                    ));
                }
                e
            }
            None => {
                // Keep the extent bitmap at most 4 Mi bits (512 KiB).
                let mut e = MIB;
                while device_size / e > 4 << 20 {
                    e *= 2;
                }
                e
            }
        };
        let host_slots = match p.host_slots {
            Some(h) if h == 0 || h > limits::MAX_HOST_SLOTS => {
                return Err(DomainError::invalid(
                    "host_slots",
                    format!("{h} must be between 1 and {}", limits::MAX_HOST_SLOTS),
                ))
            }
            Some(h) => h,
            None if device_size < 4 * GIB => 8,
            None if device_size < 64 * GIB => 16,
            None => 64,
        };
        let journal_size = match p.journal_size {
            Some(j) if j < 64 * 1024 || j % PAGE != 0 || j > 1 << 30 => {
                return Err(DomainError::invalid(
                    "journal_size",
                    format!("{j} must be a multiple of 4096 between 64 KiB and 1 GiB"),
                ))
            }
            Some(j) => j,
            None => round_up(
                (device_size / 1024 / host_slots as u64).clamp(MIB, 16 * MIB),
                MIB,
            ),
        };
        let user_data_size = match p.user_data_size {
            Some(u) if u == 0 || u % 4096 != 0 || u > limits::MAX_USER_DATA => {
                return Err(DomainError::invalid(
                    "user_data_size",
                    format!(
                        "{u} must be a multiple of 4096 up to {}",
                        limits::MAX_USER_DATA
                    ),
                ))
            }
            Some(u) => u,
            None => 8192,
        };
        let rough_extents = device_size / extent_size;
        let default_slots = (rough_extents.clamp(64, 1 << 20)) as u32;
        let slots = |v: Option<u32>, field: &'static str| -> Result<u32> {
            match v {
                Some(s) if s == 0 || s > limits::MAX_SLOTS => Err(DomainError::invalid(
                    field,
                    format!("{s} must be between 1 and {}", limits::MAX_SLOTS),
                )),
                Some(s) => Ok(s),
                None => Ok(default_slots),
            }
        };
        let volume_slots = slots(p.volume_slots, "volume_slots")?;
        let tag_slots = slots(p.tag_slots, "tag_slots")?;

        let slot_table_off = PAGE;
        let journal_off = round_up(slot_table_off + host_slots as u64 * sector as u64, PAGE);
        let alloc_off = journal_off + host_slots as u64 * journal_size;
        let vol_pages = bitmap_pages(volume_slots as u64);
        let tag_pages = bitmap_pages(tag_slots as u64);
        let volume_table_off_for =
            |ext_pages: u64| alloc_off + (1 + ext_pages + vol_pages + tag_pages) * PAGE;
        // The extent count depends on the metadata size, which depends on the
        // extent bitmap size: size the bitmap for the whole device (an upper
        // bound), then compute the real count.
        let ext_pages = bitmap_pages(device_size / extent_size);
        let volume_table_off = volume_table_off_for(ext_pages);
        let tag_table_off = round_up(volume_table_off + volume_slots as u64 * sector as u64, PAGE);
        let user_data_off = round_up(tag_table_off + tag_slots as u64 * sector as u64, PAGE);
        let meta_end = user_data_off + tag_slots as u64 * 2 * user_data_size as u64;
        let data_off = round_up(meta_end, MIB);
        let usable_end = device_size.saturating_sub(PAGE); // backup superblock
        let extent_count = usable_end.saturating_sub(data_off) / extent_size;
        if extent_count < limits::MIN_EXTENTS {
            let need = data_off + limits::MIN_EXTENTS * extent_size + PAGE;
            return Err(DomainError::NoSpace(format!(
                "device of {device_size} bytes is too small: metadata needs {data_off} bytes and \
                 at least {} extents of {extent_size} bytes must follow (at least {need} bytes \
                 in all; pass smaller --volume-slots/--tag-slots/--journal-size/--host-slots)",
                limits::MIN_EXTENTS
            )));
        }
        Ok(Geometry {
            domain_id,
            name: p.name.clone(),
            created,
            device_size,
            sector_size: sector,
            extent_size,
            extent_count,
            host_slots,
            volume_slots,
            tag_slots,
            user_data_size,
            journal_size,
            slot_table_off,
            journal_off,
            alloc_off,
            alloc_pages: (1 + ext_pages + vol_pages + tag_pages) as u32,
            volume_table_off,
            tag_table_off,
            user_data_off,
            data_off,
            compat: if p.wipe_after_delete {
                crate::layout::COMPAT_WIPE_AFTER_DELETE
            } else {
                0
            },
            incompat: 0,
            ro_compat: 0,
        })
    }

    /// The salt for checksums.
    pub fn salt(&self) -> [u8; 16] {
        *self.domain_id.as_bytes()
    }
    /// Offset of the backup superblock.
    pub fn backup_sb_off(&self) -> u64 {
        self.device_size - PAGE
    }
    /// Offset of host slot `i`'s header.
    pub fn slot_off(&self, i: u32) -> u64 {
        self.slot_table_off + i as u64 * self.sector_size as u64
    }
    /// Offset of host slot `i`'s journal.
    pub fn journal_ring_off(&self, i: u32) -> u64 {
        self.journal_off + i as u64 * self.journal_size
    }
    /// Offset of volume slot `i`.
    pub fn volume_off(&self, i: u32) -> u64 {
        self.volume_table_off + i as u64 * self.sector_size as u64
    }
    /// Offset of tag slot `i`.
    pub fn tag_off(&self, i: u32) -> u64 {
        self.tag_table_off + i as u64 * self.sector_size as u64
    }
    /// How many slots `table` has.
    pub fn slots_of(&self, table: Table) -> u32 {
        match table {
            Table::Volume => self.volume_slots,
            Table::Tag => self.tag_slots,
        }
    }
    /// Offset of slot `i` of `table`.
    pub fn record_off(&self, table: Table, i: u32) -> u64 {
        match table {
            Table::Volume => self.volume_off(i),
            Table::Tag => self.tag_off(i),
        }
    }
    /// Offset of half `h` of tag slot `i`'s user data.
    pub fn user_data_half_off(&self, i: u32, h: u8) -> u64 {
        self.user_data_off + (i as u64 * 2 + h as u64) * self.user_data_size as u64
    }
    /// Offset of extent `e`.
    pub fn extent_off(&self, e: u64) -> u64 {
        self.data_off + e * self.extent_size
    }
    /// Pages of each bitmap: (extents, volume slots, tag slots).
    pub fn bitmap_page_counts(&self) -> [u64; 3] {
        [
            (self.alloc_pages as u64)
                - 1
                - bitmap_pages(self.volume_slots as u64)
                - bitmap_pages(self.tag_slots as u64),
            bitmap_pages(self.volume_slots as u64),
            bitmap_pages(self.tag_slots as u64),
        ]
    }
    /// Item counts of each bitmap: (extents, volume slots, tag slots).
    pub fn bitmap_bits(&self) -> [u64; 3] {
        [
            self.extent_count,
            self.volume_slots as u64,
            self.tag_slots as u64,
        ]
    }
    /// Offset of page `p` of bitmap `map` (0 extents, 1 volumes, 2 tags).
    pub fn bitmap_page_off(&self, map: usize, p: u64) -> u64 {
        let counts = self.bitmap_page_counts();
        let before: u64 = counts[..map].iter().sum();
        self.alloc_off + (1 + before + p) * PAGE
    }
    /// Bytes of metadata before the data area.
    pub fn metadata_bytes(&self) -> u64 {
        self.data_off
    }

    /// Encode as a superblock.
    pub fn encode(&self) -> SuperblockRaw {
        let mut sb = SuperblockRaw::new_zeroed();
        sb.magic = SB_MAGIC;
        sb.version.set(FORMAT_VERSION);
        sb.struct_size.set(size_of::<SuperblockRaw>() as u32);
        sb.compat.set(self.compat);
        sb.incompat.set(self.incompat);
        sb.ro_compat.set(self.ro_compat);
        sb.domain_id = *self.domain_id.as_bytes();
        sb.name_len = put_str(&mut sb.name, &self.name) as u8;
        sb.created.set(self.created);
        sb.device_size.set(self.device_size);
        sb.sector_size.set(self.sector_size);
        sb.page_size.set(PAGE as u32);
        sb.extent_size.set(self.extent_size);
        sb.extent_count.set(self.extent_count);
        sb.host_slots.set(self.host_slots);
        sb.volume_slots.set(self.volume_slots);
        sb.tag_slots.set(self.tag_slots);
        sb.user_data_size.set(self.user_data_size);
        sb.journal_size.set(self.journal_size);
        sb.slot_table_off.set(self.slot_table_off);
        sb.journal_off.set(self.journal_off);
        sb.alloc_off.set(self.alloc_off);
        sb.alloc_pages.set(self.alloc_pages);
        sb.volume_table_off.set(self.volume_table_off);
        sb.tag_table_off.set(self.tag_table_off);
        sb.user_data_off.set(self.user_data_off);
        sb.data_off.set(self.data_off);
        let crc = crc32c::crc32c(&sb.as_bytes()[..4092]);
        sb.crc.set(crc);
        sb
    }

    /// Decode and validate a superblock. `offset` is only for messages.
    pub fn decode(bytes: &[u8], offset: u64) -> Result<Geometry> {
        let sb = SuperblockRaw::read_from_bytes(&bytes[..4096])
            .map_err(|_| DomainError::corrupt("superblock", offset, "short read"))?;
        if sb.magic != SB_MAGIC {
            return Err(DomainError::NotADomain(format!(
                "no Cairn superblock at offset {offset:#x}"
            )));
        }
        if crc32c::crc32c(&bytes[..4092]) != sb.crc.get() {
            return Err(DomainError::corrupt(
                "superblock",
                offset,
                "checksum mismatch",
            ));
        }
        if sb.version.get() != FORMAT_VERSION {
            return Err(DomainError::NotADomain(format!(
                "format version {} is not supported (this build reads {FORMAT_VERSION})",
                sb.version.get()
            )));
        }
        let unknown = sb.incompat.get() & !KNOWN_INCOMPAT;
        if unknown != 0 {
            return Err(DomainError::NotADomain(format!(
                "unknown incompatible features {unknown:#x}"
            )));
        }
        let g = Geometry {
            domain_id: uuid::Uuid::from_bytes(sb.domain_id),
            name: get_str(&sb.name, sb.name_len as usize)
                .map_err(|d| DomainError::corrupt("superblock", offset, d))?,
            created: sb.created.get(),
            device_size: sb.device_size.get(),
            sector_size: sb.sector_size.get(),
            extent_size: sb.extent_size.get(),
            extent_count: sb.extent_count.get(),
            host_slots: sb.host_slots.get(),
            volume_slots: sb.volume_slots.get(),
            tag_slots: sb.tag_slots.get(),
            user_data_size: sb.user_data_size.get(),
            journal_size: sb.journal_size.get(),
            slot_table_off: sb.slot_table_off.get(),
            journal_off: sb.journal_off.get(),
            alloc_off: sb.alloc_off.get(),
            alloc_pages: sb.alloc_pages.get(),
            volume_table_off: sb.volume_table_off.get(),
            tag_table_off: sb.tag_table_off.get(),
            user_data_off: sb.user_data_off.get(),
            data_off: sb.data_off.get(),
            compat: sb.compat.get(),
            incompat: sb.incompat.get(),
            ro_compat: sb.ro_compat.get(),
        };
        g.validate()
            .map_err(|d| DomainError::corrupt("superblock", offset, d))?;
        Ok(g)
    }

    /// Check that the regions are ordered, aligned and inside the device.
    fn validate(&self) -> std::result::Result<(), String> {
        let s = self.sector_size as u64;
        if s != 512 && s != 4096 {
            return Err(format!("bad sector size {s}"));
        }
        if self.extent_size < MIB || !self.extent_size.is_power_of_two() {
            return Err(format!("bad extent size {}", self.extent_size));
        }
        if self.host_slots == 0 || self.host_slots > limits::MAX_HOST_SLOTS {
            return Err(format!("bad host slot count {}", self.host_slots));
        }
        if self.volume_slots == 0
            || self.volume_slots > limits::MAX_SLOTS
            || self.tag_slots == 0
            || self.tag_slots > limits::MAX_SLOTS
        {
            return Err("bad slot counts".into());
        }
        if self.user_data_size == 0 || self.user_data_size % 4096 != 0 {
            return Err(format!("bad user data size {}", self.user_data_size));
        }
        if self.journal_size < 64 * 1024 || self.journal_size % PAGE != 0 {
            return Err(format!("bad journal size {}", self.journal_size));
        }
        let vp = bitmap_pages(self.volume_slots as u64);
        let tp = bitmap_pages(self.tag_slots as u64);
        if (self.alloc_pages as u64) < 1 + vp + tp + bitmap_pages(self.extent_count) {
            return Err("allocation map too small".into());
        }
        let regions = [
            (PAGE, self.slot_table_off),
            (
                self.slot_table_off + self.host_slots as u64 * s,
                self.journal_off,
            ),
            (
                self.journal_off + self.host_slots as u64 * self.journal_size,
                self.alloc_off,
            ),
            (
                self.alloc_off + self.alloc_pages as u64 * PAGE,
                self.volume_table_off,
            ),
            (
                self.volume_table_off + self.volume_slots as u64 * s,
                self.tag_table_off,
            ),
            (
                self.tag_table_off + self.tag_slots as u64 * s,
                self.user_data_off,
            ),
            (
                self.user_data_off + self.tag_slots as u64 * 2 * self.user_data_size as u64,
                self.data_off,
            ),
            (
                self.data_off + self.extent_count * self.extent_size,
                self.device_size - PAGE,
            ),
        ];
        for (end_prev, start_next) in regions {
            if end_prev > start_next {
                return Err(format!(
                    "regions overlap: one ends at {end_prev:#x}, the next starts at {start_next:#x}"
                ));
            }
        }
        for off in [
            self.slot_table_off,
            self.journal_off,
            self.alloc_off,
            self.volume_table_off,
            self.tag_table_off,
            self.user_data_off,
            self.data_off,
            self.device_size,
        ] {
            if off % PAGE != 0 {
                return Err(format!("offset {off:#x} is not page aligned"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(name: &str) -> FormatParams {
        FormatParams {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_scale_with_device() {
        let id = uuid::Uuid::nil();
        let small = Geometry::compute(1 << 30, 512, &params("s"), id, 0).unwrap();
        assert_eq!(small.extent_size, MIB);
        assert_eq!(small.host_slots, 8);
        assert!(small.metadata_bytes() < (1 << 30) / 20, "{small:?}");
        let big = Geometry::compute(8 << 40, 512, &params("b"), id, 0).unwrap();
        assert_eq!(big.extent_size, 2 * MIB);
        assert_eq!(big.host_slots, 64);
        assert_eq!(big.volume_slots, 1 << 20);
        assert!(big.extent_count <= 4 << 20);
        assert!(big.metadata_bytes() < (8 << 40) / 50);
    }

    #[test]
    fn too_small_device_is_refused_with_sizes() {
        let e = Geometry::compute(4 << 20, 512, &params("t"), uuid::Uuid::nil(), 0).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
    }

    #[test]
    fn bad_params_name_the_field() {
        let mut p = params("x");
        p.extent_size = Some(3 << 20);
        let e = Geometry::compute(1 << 30, 512, &p, uuid::Uuid::nil(), 0).unwrap_err();
        assert!(e.to_string().contains("extent_size"), "{e}");
        let e = Geometry::compute(1 << 30, 512, &params("a/b"), uuid::Uuid::nil(), 0).unwrap_err();
        assert!(e.to_string().contains("name"), "{e}");
    }

    #[test]
    fn superblock_round_trip_and_detects_damage() {
        let g = Geometry::compute(1 << 30, 512, &params("dom"), uuid::Uuid::new_v4(), 7).unwrap();
        let sb = g.encode();
        let bytes = sb.as_bytes().to_vec();
        assert_eq!(Geometry::decode(&bytes, 0).unwrap(), g);
        for bit in [0usize, 100 * 8 + 3, 4000 * 8, 4093 * 8] {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(Geometry::decode(&b, 0).is_err(), "bit {bit}");
        }
    }
}

/// A table of metadata records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Volume records.
    Volume,
    /// Tag records.
    Tag,
}

impl Table {
    /// "volume" or "tag".
    pub fn name(self) -> &'static str {
        match self {
            Table::Volume => "volume",
            Table::Tag => "tag",
        }
    }
}
