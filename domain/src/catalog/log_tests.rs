//! The change log: its bytes, what it keeps when full, and what a reader
//! learns from it on a real (in-memory) domain.
use super::tests::{domain, file};
use super::*;
use proptest::prelude::*;

const SALT: [u8; 16] = [7; 16];

fn tag(slot: u32) -> TagId {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&slot.to_be_bytes());
    b[4] = 0x7a;
    b[6] = 0x80;
    b[8] = 0x80;
    TagId::from_stored(b).expect("a tag id")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn the_log_s_golden_bytes() {
    let l = CatalogLog {
        since: 0x10,
        entries: vec![(0x11, tag(3))],
    };
    let b = l.encode(&SALT);
    assert_eq!(b.len(), 48);
    assert_eq!(hex(&b[..20]), "434c4f4701000000100000000000000001000000");
    assert_eq!(hex(&b[24..32]), "1100000000000000");
    assert_eq!(&b[32..48], tag(3).as_bytes());
    assert_eq!(CatalogLog::decode(&SALT, &b), Ok(l));
}

#[test]
fn a_damaged_log_is_refused() {
    let b = CatalogLog {
        since: 4,
        entries: vec![(5, tag(1)), (7, tag(2))],
    }
    .encode(&SALT);
    for i in 0..b.len() {
        let mut x = b.clone();
        x[i] ^= 0x10;
        assert!(CatalogLog::decode(&SALT, &x).is_err(), "flip at byte {i}");
    }
    assert_eq!(CatalogLog::decode(&[8; 16], &b), Err(DecodeError::Checksum));
    assert!(CatalogLog::decode(&SALT, &b[..b.len() - 1]).is_err());
    // Sealed but out of order, or not above `since`: refused all the same.
    for entries in [vec![(7, tag(1)), (5, tag(2))], vec![(4, tag(1))]] {
        let bad = CatalogLog { since: 4, entries }.encode(&SALT);
        let e = CatalogLog::decode(&SALT, &bad).unwrap_err();
        assert!(e.to_string().contains("entries"), "{e}");
    }
}

#[test]
fn a_full_log_drops_whole_generations_and_says_how_far_it_reaches() {
    let mut l = CatalogLog::starting_at(0);
    for g in 1..=200u64 {
        let tags: Vec<TagRef> = (0..(g % 3 + 1) as u32)
            .map(|i| TagRef::Existing(tag(i)))
            .collect();
        let mut n = l.next(g, &tags);
        log_seal(&SALT, &mut n.bytes);
        l = CatalogLog::decode(&SALT, &n.bytes).unwrap();
        assert!(l.entries.len() <= MAX_LOG);
        assert_eq!(l.newest(), g);
        // Whatever it still holds of a generation, it holds whole.
        let first = l.entries[0].0;
        assert_eq!(
            l.entries.iter().filter(|e| e.0 == first).count() as u64,
            first % 3 + 1
        );
        assert_eq!(l.since + 1, first);
    }
    assert_eq!(l.changed_since(l.since - 1), None);
    assert_eq!(l.changed_since(200), Some(vec![]));
    assert_eq!(l.changed_since(199), Some(vec![tag(0), tag(1), tag(2)]));
    // One change touching more than the log holds leaves it empty, and
    // only "since that change" is answered.
    let many: Vec<TagRef> = (0..MAX_LOG as u32 + 1)
        .map(|i| TagRef::Existing(tag(i)))
        .collect();
    let mut n = l.next(201, &many);
    log_seal(&SALT, &mut n.bytes);
    let l = CatalogLog::decode(&SALT, &n.bytes).unwrap();
    assert_eq!((l.since, l.entries.len()), (201, 0));
    assert_eq!(l.changed_since(200), None);
}

#[test]
fn the_fuzz_seeds_decode_and_round_trip() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/catalog_log");
    for name in ["log", "log-repair"] {
        let b = std::fs::read(root.join(name)).unwrap();
        crate::fuzzing::catalog_log(&b);
        let l = CatalogLog::decode(&[0x5a; 16], &b[1..]).unwrap();
        assert_eq!(l.entries.len(), 3);
    }
}

/// What `catalog_changes` says changed since `g`, as (path, version) for
/// files there now and tag ids for files gone.
type Seen = (Vec<(String, u64)>, Vec<TagId>);

fn changes(d: &Domain, a: &Anchor, g: u64) -> Option<Seen> {
    let c = d.catalog_changes(a, g).unwrap();
    assert_eq!(c.generation, d.catalog_generation(a).unwrap());
    let files = c.files?;
    let mut now = Vec::new();
    let mut gone = Vec::new();
    for f in files {
        match f {
            FileChange::Now(f) => now.push((f.path, f.version)),
            FileChange::Gone(t) => gone.push(t),
        }
    }
    now.sort();
    Some((now, gone))
}

#[test]
fn a_reader_learns_every_change_since_a_generation_from_the_log() {
    let (dev, d) = domain();
    let a = d.ensure_anchor().unwrap();
    assert_eq!(changes(&d, &a, 0), Some((vec![], vec![])));
    let f1 = d
        .commit_file(&a, &file("a"), FileBytes::Inline(b"one"), None, [1; 16])
        .unwrap();
    let f2 = d
        .commit_file(&a, &file("b"), FileBytes::Inline(b"two"), None, [2; 16])
        .unwrap();
    assert_eq!(
        changes(&d, &a, 0),
        Some((vec![("a".into(), 1), ("b".into(), 2)], vec![]))
    );
    assert_eq!(changes(&d, &a, 1), Some((vec![("b".into(), 2)], vec![])));
    // Registering with a metafile touches the version and the metafile.
    let m = file("b.meta");
    let change = ImageChange {
        image: Some(("img1", b"{}")),
        metafile: Some((&m, b"meta")),
        drop: &[],
    };
    d.set_file_image(&a, &f2.tag, change, Some(2), [3; 16])
        .unwrap();
    assert_eq!(
        changes(&d, &a, 2),
        Some((vec![("b".into(), 2), ("b.meta".into(), 3)], vec![]))
    );
    d.delete_files(&a, &[f1.tag], None, [4; 16]).unwrap();
    assert_eq!(changes(&d, &a, 3), Some((vec![], vec![f1.tag])));
    // A file made and deleted since is gone, not there.
    assert_eq!(changes(&d, &a, 0).unwrap().1, vec![f1.tag]);
    crate::testing::assert_clean(dev.as_ref());
}

#[test]
fn a_reader_further_behind_than_the_log_is_told_to_list_everything() {
    let (_dev, d) = domain();
    let a = d.ensure_anchor().unwrap();
    let f = d
        .commit_file(&a, &file("x"), FileBytes::Inline(b"x"), None, [1; 16])
        .unwrap();
    // Each delete of nothing still raises the generation and logs nothing;
    // each rename-by-upload logs one tag.
    for i in 0..MAX_LOG as u8 + 5 {
        d.commit_file(
            &a,
            &file("y"),
            FileBytes::Inline(&[i]),
            None,
            [i.wrapping_add(9); 16],
        )
        .map(|v| d.delete_files(&a, &[v.tag], None, [i.wrapping_add(200); 16]))
        .unwrap()
        .unwrap();
    }
    let g = d.catalog_generation(&a).unwrap();
    assert_eq!(changes(&d, &a, 1), None);
    assert!(changes(&d, &a, g - 10).is_some());
    // The full listing is what a reader falls back to.
    let l = d.list_files(Some(&a)).unwrap();
    assert_eq!(
        l.files.iter().map(|x| x.tag).collect::<Vec<_>>(),
        vec![f.tag]
    );
}

#[test]
fn an_anchor_from_before_the_log_starts_one_at_its_next_change() {
    let (dev, d) = domain();
    let a = d.ensure_anchor().unwrap();
    d.commit_file(&a, &file("x"), FileBytes::Inline(b"x"), None, [1; 16])
        .unwrap();
    // As a domain of the previous release: a head and no log.
    d.remove_user_data(&a.tag, LOG_ITEM, &[]).unwrap();
    assert_eq!(changes(&d, &a, 0), None);
    assert_eq!(changes(&d, &a, 1), Some((vec![], vec![])));
    d.commit_file(&a, &file("y"), FileBytes::Inline(b"y"), None, [2; 16])
        .unwrap();
    assert_eq!(changes(&d, &a, 0), None);
    assert_eq!(changes(&d, &a, 1), Some((vec![("y".into(), 2)], vec![])));
    crate::testing::assert_clean(dev.as_ref());
}

#[test]
fn a_full_log_fits_the_smallest_user_data() {
    let dev = crate::testing::mem_domain(
        64 << 20,
        &crate::geometry::FormatParams {
            user_data_size: Some(4096),
            tag_slots: Some(MAX_LOG as u32 + 16),
            ..crate::tests::params()
        },
    );
    let locks = std::sync::Arc::new(crate::lock::MemLockService::new());
    let d = Domain::open(
        dev,
        locks,
        crate::engine::OpenOptions::new(crate::testing::host(1)),
    )
    .unwrap();
    let a = d.ensure_anchor().unwrap();
    for i in 0..MAX_LOG as u8 + 3 {
        d.commit_file(
            &a,
            &file(&format!("f{i}")),
            FileBytes::Inline(b"z"),
            None,
            [i; 16],
        )
        .unwrap();
    }
    let items = d.read_user_data(&a.tag).unwrap();
    let l = CatalogLog::decode(d.geometry().domain_id.as_bytes(), &items[LOG_ITEM]).unwrap();
    assert_eq!(l.entries.len(), MAX_LOG);
}

proptest! {
    #[test]
    fn the_log_round_trips(
        since in 0u64..1 << 60,
        steps in proptest::collection::vec((0u64..3, 1u32..200), 0..MAX_LOG),
        salt in any::<[u8; 16]>(),
    ) {
        let mut g = since;
        let entries = steps
            .into_iter()
            .map(|(d, s)| {
                g += d + u64::from(g == since);
                (g, tag(s))
            })
            .collect();
        let l = CatalogLog { since, entries };
        prop_assert_eq!(CatalogLog::decode(&salt, &l.encode(&salt)), Ok(l));
    }
}
