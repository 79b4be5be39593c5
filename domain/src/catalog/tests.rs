//! The catalog's files: head bytes, paths, and file versions on a real
//! (in-memory) domain.
use super::*;
use proptest::prelude::*;

const SALT: [u8; 16] = [7; 16];

#[test]
fn the_head_s_golden_bytes() {
    let b = CatalogHead { generation: 0x0102 }.encode(&SALT);
    assert_eq!(hex(&b[..20]), "4343415401000000020100000000000000000000");
    assert_eq!(b.len(), 24);
    assert_eq!(
        CatalogHead::decode(&SALT, &b),
        Ok(CatalogHead { generation: 0x0102 })
    );
}

#[test]
fn a_damaged_head_is_refused() {
    let b = CatalogHead { generation: 9 }.encode(&SALT);
    for i in 0..b.len() {
        let mut x = b.clone();
        x[i] ^= 0x10;
        assert!(CatalogHead::decode(&SALT, &x).is_err(), "flip at byte {i}");
    }
    assert_eq!(
        CatalogHead::decode(&[8; 16], &b),
        Err(DecodeError::Checksum)
    );
    assert!(CatalogHead::decode(&SALT, &b[..23]).is_err());
}

/// Regression: with a CRC-32C of its own bytes at its end, every head
/// gave the anchor's user data blob the same CRC-32C (CRC is linear),
/// so a lost blob write left a stale head that verified: a crash
/// could take the generation back.
#[test]
fn heads_of_different_generations_give_different_blob_checksums() {
    let tag = crate::fuzzing::user_data_tag();
    let blob = |g: u64| {
        let mut items = UserData::new();
        items.insert(
            HEAD_ITEM.to_string(),
            CatalogHead { generation: g }.encode(&SALT),
        );
        crate::records::encode_user_data(&tag, &items)
    };
    let sums: std::collections::BTreeSet<u32> = (1..50)
        .map(|g| crate::layout::csum(&SALT, &blob(g)))
        .collect();
    assert_eq!(sums.len(), 49, "blob checksums collide");
}

#[test]
fn paths_are_clean_relative_paths() {
    for ok in ["a", "images/debian.qcow2", "a b/c.meta", "x/.hidden", "..a"] {
        check_path(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let long = "a".repeat(MAX_PATH + 1);
    for bad in ["", "/a", "a/", "a//b", "a/../b", "..", "./a", "a\nb", &long] {
        let e = check_path(bad).expect_err(bad);
        assert_eq!(e.code().as_str(), "invalid_argument", "{bad}");
    }
}

#[test]
fn latest_keeps_the_highest_version_of_each_path() {
    let f = |path: &str, version| FileVersion {
        tag: crate::fuzzing::user_data_tag(),
        volume: VolumeId::generate(1),
        path: path.into(),
        version,
        size: 0,
        sha256: "0".repeat(64),
        owner: String::new(),
        created: 0,
        directory: false,
        inline: true,
        image: None,
        request: String::new(),
    };
    let all = [f("a", 3), f("b", 2), f("a", 7), f("a", 5)];
    let l = latest(&all);
    assert_eq!(l.len(), 2);
    assert_eq!(l["a"].version, 7);
    assert_eq!(l["b"].version, 2);
}

pub(super) fn domain() -> (std::sync::Arc<crate::io::MemDev>, Domain) {
    let dev = crate::testing::mem_domain(64 << 20, &crate::tests::params());
    let locks = std::sync::Arc::new(crate::lock::MemLockService::new());
    let mut o = crate::engine::OpenOptions::new(crate::testing::host(1));
    o.clock = std::sync::Arc::new(crate::engine::FixedClock(1_700_000_000));
    (dev.clone(), Domain::open(dev, locks, o).expect("open"))
}

pub(super) fn file(path: &str) -> NewFile {
    NewFile {
        path: path.into(),
        owner: "alice".into(),
        directory: false,
        request: String::new(),
    }
}

#[test]
fn files_get_versions_that_only_grow_and_go_with_their_volumes() {
    let (dev, d) = domain();
    assert_eq!(d.find_anchor().unwrap(), None);
    assert_eq!(d.list_files(None).unwrap().files, vec![]);
    let a = d.ensure_anchor().unwrap();
    assert_eq!(d.ensure_anchor().unwrap(), a, "one anchor");
    assert_eq!(d.catalog_generation(&a).unwrap(), 0);

    // A small file: inline, on the anchor's volume.
    let m1 = d
        .commit_file(
            &a,
            &file("x.meta"),
            FileBytes::Inline(b"{}"),
            Some(0),
            [1; 16],
        )
        .unwrap();
    assert_eq!((m1.version, m1.size, m1.inline), (1, 2, true));
    assert_eq!(m1.volume, a.volume);
    assert_eq!(m1.created, 1_700_000_000);
    assert_eq!(
        m1.sha256,
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
    assert_eq!(d.inline_file(&m1).unwrap(), b"{}");

    // A planned change against an old generation is refused, unchanged.
    let e = d
        .commit_file(&a, &file("y"), FileBytes::Inline(b"y"), Some(0), [2; 16])
        .unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::Changed, "{e}");
    assert_eq!(d.catalog_generation(&a).unwrap(), 1);

    // A large file: an illegal raw volume made legal by the commit.
    let mut spec = VolumeSpec::raw(3 << 20, "upload");
    spec.legality = Legality::Illegal;
    let (v, g) = d.create_volume(spec).unwrap();
    let bytes = FileBytes::Volume {
        id: v.id,
        guard: &g,
        size: (3 << 20) - 5,
        sha256: "ab".repeat(32),
    };
    let big = d.commit_file(&a, &file("x"), bytes, None, [3; 16]).unwrap();
    assert_eq!(
        (big.version, big.size, big.inline),
        (2, (3 << 20) - 5, false)
    );
    assert_eq!(d.read_volume(&v.id).unwrap().legality, Legality::Legal);
    drop(g);

    // A second version of the small file, and a long path in user data.
    let m2 = d
        .commit_file(&a, &file("x.meta"), FileBytes::Inline(b"[]"), None, [4; 16])
        .unwrap();
    let long = format!("deep/{}", "p".repeat(600));
    let l = d
        .commit_file(&a, &file(&long), FileBytes::Inline(b""), None, [5; 16])
        .unwrap();
    let listed = d.list_files(Some(&a)).unwrap();
    assert_eq!(listed.generation, 4);
    assert_eq!(listed.files.len(), 4);
    assert!(listed.files.contains(&l), "the long path is read back");
    let newest = latest(&listed.files);
    assert_eq!(newest["x.meta"].version, m2.version);
    crate::testing::assert_clean(dev.as_ref());

    // Deleting the big file frees its volume; versions never come back.
    assert_eq!(d.delete_files(&a, &[big.tag], Some(4), [6; 16]).unwrap(), 5);
    assert!(d.read_volume(&v.id).is_err(), "its volume went with it");
    let n = d
        .commit_file(&a, &file("x"), FileBytes::Inline(b"z"), None, [7; 16])
        .unwrap();
    assert_eq!(n.version, 6);
    crate::testing::assert_clean(dev.as_ref());
}

#[test]
fn bad_files_are_refused_without_a_change() {
    let (dev, d) = domain();
    let a = d.ensure_anchor().unwrap();
    let big = vec![0u8; MAX_INLINE as usize + 1];
    let e = d
        .commit_file(&a, &file("a"), FileBytes::Inline(&big), None, [1; 16])
        .unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::InvalidArgument, "{e}");
    let e = d
        .commit_file(&a, &file("a/../b"), FileBytes::Inline(b""), None, [1; 16])
        .unwrap_err();
    assert!(e.to_string().contains("'..'"), "{e}");
    // A legal volume is not an upload.
    let (v, g) = d.create_volume(VolumeSpec::raw(1 << 20, "legal")).unwrap();
    let bytes = FileBytes::Volume {
        id: v.id,
        guard: &g,
        size: 1,
        sha256: "00".repeat(32),
    };
    let e = d
        .commit_file(&a, &file("a"), bytes, None, [1; 16])
        .unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::FailedPrecondition, "{e}");
    assert_eq!(d.catalog_generation(&a).unwrap(), 0);
    assert_eq!(d.list_files(Some(&a)).unwrap().files, vec![]);
    // Not a file's tag.
    let e = d.delete_files(&a, &[a.tag], None, [1; 16]).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::NotFound, "{e}");
    drop(g);
    crate::testing::assert_clean(dev.as_ref());
}

#[test]
fn a_version_an_image_is_registered_from_is_not_deleted() {
    let (_dev, d) = domain();
    let a = d.ensure_anchor().unwrap();
    let f = d
        .commit_file(&a, &file("img"), FileBytes::Inline(b"i"), None, [1; 16])
        .unwrap();
    let mut meta = d.read_tag(&f.tag).unwrap().meta();
    meta.options.push((IMAGE.into(), "7h1rd".into()));
    d.change_tag(&f.tag, meta, &[]).unwrap();
    let e = d.delete_files(&a, &[f.tag], None, [2; 16]).unwrap_err();
    assert!(e.to_string().contains("registered image 7h1rd"), "{e}");
    assert_eq!(d.catalog_generation(&a).unwrap(), 1);
}

#[test]
fn images_are_registered_replaced_and_unregistered_with_their_metafile() {
    let (dev, d) = domain();
    let a = d.ensure_anchor().unwrap();
    // A path that only just fits the options: registering pushes it into
    // user data, unregistering brings it back.
    let long = format!("images/{}", "p".repeat(140));
    let mut nf = file(&long);
    nf.request = "file-0123456789abcdef0123456789abcdef0123".into();
    let f = d
        .commit_file(&a, &nf, FileBytes::Inline(b"disk"), None, [1; 16])
        .unwrap();
    assert!(d.read_tag(&f.tag).unwrap().option(PATH).is_some());
    let meta = file(&format!("{long}.meta"));
    let (r, m) = d
        .set_file_image(
            &a,
            &f.tag,
            ImageChange {
                image: Some(("img-1", b"{\"name\":\"A\"}")),
                metafile: Some((&meta, b"{\"name\":\"A\"}")),
                ..Default::default()
            },
            Some(1),
            [2; 16],
        )
        .unwrap();
    assert_eq!(r.image.as_deref(), Some("img-1"));
    assert_eq!((r.path.as_str(), r.version), (long.as_str(), 1));
    let m = m.expect("the metafile");
    assert_eq!((m.path, m.version, m.size), (format!("{long}.meta"), 2, 12));
    assert_eq!(d.image_record(&r).unwrap().unwrap(), b"{\"name\":\"A\"}");
    let listed = d.list_files(Some(&a)).unwrap();
    assert_eq!(listed.generation, 2);
    let again = listed.files.iter().find(|x| x.tag == f.tag).unwrap();
    assert_eq!(
        (again.path.as_str(), again.image.as_deref()),
        (long.as_str(), Some("img-1"))
    );
    // Planned at an old generation: refused, unchanged.
    let e = d
        .set_file_image(
            &a,
            &f.tag,
            ImageChange {
                ..Default::default()
            },
            Some(1),
            [3; 16],
        )
        .unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::Changed);
    // Replaced, then unregistered; a second unregister is refused.
    let (r, _) = d
        .set_file_image(
            &a,
            &f.tag,
            ImageChange {
                image: Some(("img-1", b"{}")),
                ..Default::default()
            },
            None,
            [4; 16],
        )
        .unwrap();
    assert_eq!(d.image_record(&r).unwrap().unwrap(), b"{}");
    let (r, _) = d
        .set_file_image(
            &a,
            &f.tag,
            ImageChange {
                ..Default::default()
            },
            None,
            [5; 16],
        )
        .unwrap();
    assert_eq!((r.image.clone(), d.image_record(&r).unwrap()), (None, None));
    assert!(!d.read_user_data(&f.tag).unwrap().contains_key(IMAGE_ITEM));
    assert_eq!(
        d.read_tag(&f.tag).unwrap().option(PATH),
        Some(long.as_str())
    );
    let e = d
        .set_file_image(
            &a,
            &f.tag,
            ImageChange {
                ..Default::default()
            },
            None,
            [6; 16],
        )
        .unwrap_err();
    assert!(e.to_string().contains("no image is registered"), "{e}");
    // Bad ids and huge metafiles change nothing.
    let g = d.catalog_generation(&a).unwrap();
    for bad in ["", "a/b", &"x".repeat(65)] {
        let e = d
            .set_file_image(
                &a,
                &f.tag,
                ImageChange {
                    image: Some((bad, b"{}")),
                    ..Default::default()
                },
                None,
                [7; 16],
            )
            .unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::InvalidArgument, "{bad:?}");
    }
    let big = vec![b' '; 5000];
    let e = d
        .set_file_image(
            &a,
            &f.tag,
            ImageChange {
                image: Some(("i", b"{}")),
                metafile: Some((&meta, &big)),
                ..Default::default()
            },
            None,
            [8; 16],
        )
        .unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::InvalidArgument);
    assert_eq!(d.catalog_generation(&a).unwrap(), g);
    // Data items go with the image in one transaction; a version that
    // holds an image, or the image's own, is refused with no change.
    let item = d
        .commit_file(&a, &file("data/k"), FileBytes::Inline(b"v"), None, [9; 16])
        .unwrap();
    let other = d
        .commit_file(&a, &file("other"), FileBytes::Inline(b"o"), None, [10; 16])
        .unwrap();
    let reg = |tag: &TagId, id: &'static str, rid: u8| {
        let image = Some((id, &b"{}"[..]));
        let change = ImageChange {
            image,
            ..Default::default()
        };
        d.set_file_image(&a, tag, change, None, [rid; 16]).unwrap()
    };
    reg(&f.tag, "img-1", 11);
    reg(&other.tag, "img-2", 12);
    let g = d.catalog_generation(&a).unwrap();
    for drop in [&[item.tag, other.tag][..], &[f.tag]] {
        let change = ImageChange {
            drop,
            ..Default::default()
        };
        assert!(d
            .set_file_image(&a, &f.tag, change, None, [13; 16])
            .is_err());
    }
    assert_eq!(d.catalog_generation(&a).unwrap(), g);
    let change = ImageChange {
        drop: &[item.tag],
        ..Default::default()
    };
    d.set_file_image(&a, &f.tag, change, None, [14; 16])
        .unwrap();
    let left = d.list_files(Some(&a)).unwrap().files;
    assert!(left.iter().all(|x| x.tag != item.tag));
    assert_eq!(d.catalog_generation(&a).unwrap(), g + 1);
    crate::testing::assert_clean(dev.as_ref());
}

proptest! {
    #[test]
    fn the_head_round_trips(generation in any::<u64>(), salt in any::<[u8; 16]>()) {
        let h = CatalogHead { generation };
        prop_assert_eq!(CatalogHead::decode(&salt, &h.encode(&salt)), Ok(h));
    }
}
