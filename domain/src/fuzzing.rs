//! The bodies of the fuzz targets (`fuzz/`), here so that the inputs they
//! once failed on (`fuzz/regressions/<target>/`) are replayed by the unit
//! tests through exactly the same code.
//!
//! An input is one mode byte and the structure's bytes. With bit 0 of the
//! mode set, the magic, version and checksum are made right again after
//! the fuzzer's mutation, so that decoders are exercised past their front
//! gate (random bytes never pass a magic and a CRC); bits 1-2 pick which
//! magic where a target reads several kinds of structure. Every body
//! asserts that decoding never panics and that whatever decodes
//! re-encodes to the same value.

use crate::geometry::{FormatParams, Geometry};
use crate::journal::{decode_block, scan, Commit, Intent};
use crate::layout::*;
use crate::records::*;
use crate::TagId;

/// The mode byte and the structure's bytes (owned, so they can be fixed).
fn split(data: &[u8]) -> Option<(u8, Vec<u8>)> {
    let (&mode, rest) = data.split_first()?;
    Some((mode, rest.to_vec()))
}

fn repairing(mode: u8) -> bool {
    mode & 1 == 1
}

/// Stamp `magic` and the record version at the front of `b`.
fn stamp(b: &mut [u8], magic: &[u8]) {
    if b.len() >= magic.len() + 2 {
        b[..magic.len()].copy_from_slice(magic);
        b[magic.len()..magic.len() + 2].copy_from_slice(&RECORD_VERSION.to_le_bytes());
    }
}

/// Stamp `magic` and the version, then seal with the salted checksum.
fn stamp_and_seal(salt: &[u8; 16], b: &mut [u8], magic: &[u8]) {
    if b.len() >= 8 {
        stamp(b, magic);
        seal(salt, b);
    }
}

/// The superblock decoder. Repair mode fixes the magic, version, size,
/// feature bits and the (unsalted) checksum, so the geometry's own checks
/// are reached.
pub fn superblock(data: &[u8]) {
    let Some((mode, mut b)) = split(data) else {
        return;
    };
    if b.len() < 4096 {
        return;
    }
    let sb = &mut b[..4096];
    if repairing(mode) {
        sb[..8].copy_from_slice(&SB_MAGIC);
        sb[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        sb[12..16].copy_from_slice(&4096u32.to_le_bytes());
        // Incompatible and read-only feature bits this build knows: none.
        sb[24..40].fill(0);
        let crc = crc32c::crc32c(&sb[..4092]);
        sb[4092..].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(g) = Geometry::decode(sb, 0) {
        let again = Geometry::decode(as_bytes(&g.encode()), 0).expect("re-decodes");
        assert_eq!(again, g);
    }
}

/// Volume, tag and host slot records: a 512-byte record, a 16-byte salt
/// and a slot number. Repair mode stamps a magic (bits 1-2: volume, tag,
/// host slot) and seals the record.
pub fn records(data: &[u8]) {
    let Some((mode, mut b)) = split(data) else {
        return;
    };
    if b.len() < 512 + 16 + 4 {
        return;
    }
    let salt: [u8; 16] = b[512..528].try_into().expect("16 bytes");
    let slot = u32::from_le_bytes(b[528..532].try_into().expect("4 bytes")) % 4096;
    let rec = &mut b[..512];
    if repairing(mode) {
        let magic = match (mode >> 1) % 3 {
            0 => VOL_MAGIC,
            1 => TAG_MAGIC,
            _ => SLOT_MAGIC,
        };
        stamp_and_seal(&salt, rec, &magic);
    }
    let rec = &*rec;
    if let Ok(Slot::Live(v)) = decode_volume(&salt, slot, rec) {
        let again = decode_volume(&salt, slot, &encode_volume(&salt, &v)).expect("re-decodes");
        assert_eq!(again, Slot::Live(v));
    }
    if let Ok(Slot::Live(t)) = decode_tag(&salt, slot, rec) {
        let again = decode_tag(&salt, slot, &encode_tag(&salt, &t)).expect("re-decodes");
        assert_eq!(again, Slot::Live(t));
    }
    if let Ok(h) = SlotHeader::decode(&salt, slot, rec) {
        if h.state != SlotState::Never {
            let again =
                SlotHeader::decode(&salt, slot, &h.encode(&salt, slot)).expect("re-decodes");
            assert_eq!(again, h);
        }
    }
}

/// The geometry the allocation map target decodes against.
pub fn alloc_geometry() -> Geometry {
    let p = FormatParams::tiny("fuzz", 2, 64);
    Geometry::compute(64 << 20, 512, &p, uuid::Uuid::nil(), 0).expect("a small geometry")
}

/// The allocation map root and bitmap page decoders. Repair mode stamps
/// the root's magic (bit 1 clear) or a bitmap page's (bit 1 set) and
/// seals the page with the domain's salt.
pub fn alloc_pages(data: &[u8]) {
    let Some((mode, mut b)) = split(data) else {
        return;
    };
    if b.len() < 4096 {
        return;
    }
    let g = alloc_geometry();
    let page = &mut b[..4096];
    if repairing(mode) {
        let magic = if mode & 2 == 0 {
            ROOT_MAGIC
        } else {
            BITMAP_MAGIC
        };
        stamp_and_seal(&g.salt(), page, &magic);
    }
    let _ = crate::alloc::decode_root(&g, page);
    for map in 0..3 {
        for index in 0..2 {
            let _ = crate::alloc::decode_page(&g, map, index, page);
        }
    }
}

/// The journal block decoder and ring scanner over rings of 4 KiB blocks.
/// Repair mode stamps every block's magic, version and owner slot and
/// seals it, so the scanner's logic (sequences, multi-block records, torn
/// tails, payloads) is what gets fuzzed.
pub fn journal_ring(data: &[u8]) {
    let Some((mode, mut b)) = split(data) else {
        return;
    };
    let pages = b.len() / 4096;
    if pages == 0 {
        return;
    }
    let salt = [0u8; 16];
    let ring = &mut b[..pages * 4096];
    if repairing(mode) {
        for block in ring.chunks_mut(4096) {
            stamp(block, &JOURNAL_MAGIC);
            // The slot that owns the ring.
            block[32..34].copy_from_slice(&0u16.to_le_bytes());
            seal(&salt, block);
        }
    }
    let ring = &*ring;
    for p in 0..pages {
        let _ = decode_block(&salt, 0, &ring[p * 4096..(p + 1) * 4096]);
    }
    if let Ok(s) = scan(&salt, 0, ring, 0) {
        // What a scan finds fits the ring it was found in.
        assert!(s.live.len() + s.torn.len() <= pages, "{} pages", pages);
    }
}

/// Intent and commit payloads (no checksum of their own: the journal
/// block has it). The mode byte is read and ignored.
pub fn intent(data: &[u8]) {
    let Some((_, p)) = data.split_first() else {
        return;
    };
    if let Ok(i) = Intent::decode(p) {
        assert_eq!(Intent::decode(&i.encode()).expect("re-decodes"), i);
    }
    if let Ok(c) = Commit::decode(p) {
        assert_eq!(Commit::decode(&c.encode()).expect("re-decodes"), c);
    }
}

/// The tag the user data target's blobs belong to (the golden tag).
pub fn user_data_tag() -> TagId {
    TagId::parse("tag", "00000001-7a5a-855a-5a5a-5a5a5a5a5a5a").expect("a tag id")
}

/// The user data blob decoder (the blob's checksum is in its tag record).
/// Repair mode stamps the blob's magic and version.
pub fn user_data(data: &[u8]) {
    let Some((mode, mut b)) = split(data) else {
        return;
    };
    if repairing(mode) {
        stamp(&mut b, &USER_DATA_MAGIC);
    }
    let t = user_data_tag();
    if let Ok(items) = decode_user_data(&t, &b) {
        let again = decode_user_data(&t, &encode_user_data(&t, &items)).expect("re-decodes");
        assert_eq!(again, items);
    }
}

/// The catalog head decoder (the anchor's user data item `seq`). Repair
/// mode stamps the magic and version and seals the checksum under the
/// golden salt.
pub fn catalog_head(data: &[u8]) {
    use crate::catalog::{CatalogHead, HEAD_MAGIC, HEAD_VERSION};
    let Some((mode, mut b)) = split(data) else {
        return;
    };
    let salt = [0x5a; 16];
    if repairing(mode) && b.len() >= 8 {
        b[..4].copy_from_slice(&HEAD_MAGIC);
        b[4..6].copy_from_slice(&HEAD_VERSION.to_le_bytes());
        seal(&salt, &mut b);
    }
    if let Ok(h) = CatalogHead::decode(&salt, &b) {
        let again = CatalogHead::decode(&salt, &h.encode(&salt)).expect("re-decodes");
        assert_eq!(again, h);
    }
}

/// The catalog change log decoder (the anchor's user data item `log`).
/// Repair mode stamps the magic and version, fits the count to the
/// length and seals the checksum under the golden salt.
pub fn catalog_log(data: &[u8]) {
    use crate::catalog::{CatalogLog, LOG_MAGIC, LOG_VERSION};
    let Some((mode, mut b)) = split(data) else {
        return;
    };
    let salt = [0x5a; 16];
    if repairing(mode) && b.len() >= 24 {
        b[..4].copy_from_slice(&LOG_MAGIC);
        b[4..6].copy_from_slice(&LOG_VERSION.to_le_bytes());
        let n = ((b.len() - 24) / 24) as u16;
        b.truncate(24 + n as usize * 24);
        b[16..18].copy_from_slice(&n.to_le_bytes());
        crate::catalog::log_seal(&salt, &mut b);
    }
    if let Ok(l) = CatalogLog::decode(&salt, &b) {
        let again = CatalogLog::decode(&salt, &l.encode(&salt)).expect("re-decodes");
        assert_eq!(again, l);
        assert!(l.changed_since(l.since).is_some());
    }
}
