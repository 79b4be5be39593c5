//! A flipped bit in any on-disk structure is detected: `check` reports it
//! with its location, and the engine refuses to use the damaged structure
//! (or repairs a superblock from its twin).

use std::sync::Arc;

use cairn_domain::check::check;
use cairn_domain::io::{BlockDev, MemDev};
use cairn_domain::layout::PAGE;
use cairn_domain::*;

use cairn_tests::domain::*;

struct Populated {
    image: Vec<u8>,
    geom: Geometry,
    vol: VolumeId,
    tag: TagId,
}

fn populated() -> Populated {
    let dev = mem_domain(24 << 20, &params());
    let d = Domain::open(dev.clone(), Arc::new(MemLockService::new()), opts(1)).unwrap();
    let (v, g) = d.create_volume(raw(1)).unwrap();
    let t = d.create_tag(tag_on(v.id), &[&g]).unwrap();
    d.set_user_data(&t.id, "catalog", b"{\"name\":\"x\"}".to_vec(), &[&g])
        .unwrap();
    let geom = d.geometry().clone();
    drop(g);
    // Leave the slot active (as a running host would) so the journal's
    // latest records are live.
    std::mem::forget(d);
    Populated {
        image: dev.image(),
        geom,
        vol: v.id,
        tag: t.id,
    }
}

fn flipped(p: &Populated, byte: u64, bit: u8) -> Arc<MemDev> {
    let dev = Arc::new(MemDev::from_image(p.image.clone()));
    dev.flip_bit(byte, bit);
    dev
}

/// Bytes to flip inside a structure: header, middle, checksum.
/// The domain on `dev`, opened read-only by another host.
fn open_read_only(dev: Arc<MemDev>) -> Result<Domain> {
    Domain::open(
        dev,
        Arc::new(MemLockService::new()),
        OpenOptions::read_only(host(2)),
    )
}

fn positions(off: u64, len: u64) -> Vec<(u64, u8)> {
    vec![
        (off, 0),
        (off + 5, 3),
        (off + len / 2, 6),
        (off + len - 5, 1),
        (off + len - 1, 7),
    ]
}

fn expect_finding(dev: &dyn BlockDev, code_prefix: &str, what: &str) {
    let r = check(dev).unwrap();
    assert!(
        r.findings
            .iter()
            .any(|f| f.code.starts_with(code_prefix) && f.offset.is_some()),
        "{what}: expected a {code_prefix} finding, got {:#?}",
        r.findings
    );
}

#[test]
fn superblock_flips_are_repaired_from_the_twin() {
    let p = populated();
    for off in [0, p.geom.backup_sb_off()] {
        for (byte, bit) in positions(off, PAGE) {
            let dev = flipped(&p, byte, bit);
            expect_finding(dev.as_ref(), "superblock", "superblock flip");
            let d = Domain::open(dev.clone(), Arc::new(MemLockService::new()), opts(2)).unwrap();
            assert!(d.superblock_status().repaired);
            assert_eq!(d.read_volume(&p.vol).unwrap().id, p.vol);
            drop(d);
            // The repair left both copies good.
            let r = check(dev.as_ref()).unwrap();
            assert!(!r.findings.iter().any(|f| f.code.starts_with("superblock")));
        }
    }
}

#[test]
fn record_flips_are_detected_and_named() {
    let p = populated();
    let g = &p.geom;
    let cases = [
        (g.volume_off(p.vol.slot()), "volume.record"),
        (g.tag_off(p.tag.slot()), "tag.record"),
        // An unused slot must stay all zero.
        (g.volume_off(20), "volume.record"),
        (g.tag_off(20), "tag.record"),
    ];
    for (off, code) in cases {
        for (byte, bit) in positions(off, 512) {
            let dev = flipped(&p, byte, bit);
            expect_finding(dev.as_ref(), code, code);
        }
    }
    // The engine refuses a damaged record with its location.
    let dev = flipped(&p, g.volume_off(p.vol.slot()) + 70, 2);
    let d = open_read_only(dev).unwrap();
    let e = d.read_volume(&p.vol).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Corrupt);
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("{:#x}", g.volume_off(p.vol.slot()))) && msg.contains("check"),
        "{msg}"
    );
}

#[test]
fn slot_header_and_allocation_map_flips_are_detected() {
    let p = populated();
    let g = &p.geom;
    for (byte, bit) in positions(g.slot_off(0), 512) {
        let dev = flipped(&p, byte, bit);
        expect_finding(dev.as_ref(), "slot.header", "slot header");
        let e = Domain::open(dev, Arc::new(MemLockService::new()), opts(2))
            .err()
            .expect("open must refuse a damaged slot header");
        assert_eq!(e.code(), ErrorCode::Corrupt, "{e}");
    }
    for off in [
        g.alloc_off,
        g.bitmap_page_off(0, 0),
        g.bitmap_page_off(1, 0),
        g.bitmap_page_off(2, 0),
    ] {
        for (byte, bit) in positions(off, PAGE) {
            let dev = flipped(&p, byte, bit);
            expect_finding(dev.as_ref(), "alloc", "allocation map");
            let e = open_read_only(dev)
                .err()
                .expect("open must refuse a damaged allocation map");
            assert!(
                e.to_string().contains("allocation map") || e.to_string().contains("bitmap"),
                "{e}"
            );
        }
    }
}

#[test]
fn user_data_flips_are_detected() {
    let p = populated();
    let g = &p.geom;
    let d = open_read_only(Arc::new(MemDev::from_image(p.image.clone()))).unwrap();
    let t = d.read_tag(&p.tag).unwrap();
    let off = g.user_data_half_off(p.tag.slot(), t.user_data.half);
    for (byte, bit) in positions(off, t.user_data.len as u64) {
        let dev = flipped(&p, byte, bit);
        expect_finding(dev.as_ref(), "tag.user_data", "user data");
        let d = open_read_only(dev).unwrap();
        assert_eq!(
            d.read_user_data(&p.tag).unwrap_err().code(),
            ErrorCode::Corrupt
        );
    }
}

#[test]
fn journal_flips_are_detected() {
    let p = populated();
    let g = &p.geom;
    let ring = g.journal_ring_off(0);
    let scan = {
        let dev = MemDev::from_image(p.image.clone());
        let mut buf = vec![0u8; g.journal_size as usize];
        dev.read_at(&mut buf, ring).unwrap();
        cairn_domain::journal::scan(&g.salt(), 0, &buf, ring).unwrap()
    };
    let durable = scan.durable;
    let mut checked = 0;
    for (seq, rec) in &scan.live {
        let off = ring + rec.page * PAGE;
        for (byte, bit) in positions(off, rec.pages * PAGE) {
            let dev = flipped(&p, byte, bit);
            let r = check(dev.as_ref()).unwrap();
            assert!(
                !r.is_clean(),
                "journal record {seq}: flip at {byte:#x} not detected"
            );
            if *seq <= durable {
                // Flushed history must be intact: opening stops with its location.
                let e = Domain::open(dev, Arc::new(MemLockService::new()), opts(1))
                    .err()
                    .expect("open must refuse a damaged journal");
                assert_eq!(e.code(), ErrorCode::Corrupt, "{e}");
                assert!(e.to_string().contains("journal"), "{e}");
            }
            checked += 1;
        }
    }
    // History outside the live window: reported as a warning.
    let first_page = scan.live.values().map(|r| r.page).min().unwrap();
    if first_page > 0 {
        let dev = flipped(&p, ring + 100, 1);
        let r = check(dev.as_ref()).unwrap();
        assert!(
            r.warnings.iter().any(|w| w.code == "journal.damaged_block"),
            "{:#?}",
            r.warnings
        );
    }
    assert!(checked > 0);
}
