//! Golden bytes of every on-disk structure, and property tests of every
//! encode/decode pair. A change to a layout breaks these on purpose: bump
//! the format version and document it in `docs/format.md` and the changelog.

use proptest::prelude::{any, prop_assert_eq, prop_compose, proptest};
use proptest::strategy::Strategy as _;
use zerocopy::IntoBytes;

use crate::geometry::{FormatParams, Geometry};
use crate::journal::{encode_record, Action, Commit, Intent, RecordHeader};
use crate::layout::*;
use crate::model::Strategy as TagStrategy;
use crate::model::*;
use crate::records::*;

const SALT: [u8; 16] = [0x11; 16];

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Compare the meaningful prefix, require zeros up to the checksum, and
/// compare the checksum.
fn golden(name: &str, bytes: &[u8], prefix: usize, want_prefix: &str, want_crc: &str) {
    let got_prefix = hex(&bytes[..prefix]);
    let got_crc = hex(&bytes[bytes.len() - 4..]);
    if std::env::var_os("CAIRN_BLESS").is_some() {
        println!("{name}:\n  {got_prefix}\n  {got_crc}");
        return;
    }
    assert_eq!(got_prefix, want_prefix, "{name}: field bytes changed");
    assert!(
        bytes[prefix..bytes.len() - 4].iter().all(|&b| b == 0),
        "{name}: reserved bytes are not zero"
    );
    assert_eq!(got_crc, want_crc, "{name}: checksum changed");
}

/// Fixed id bytes: `fill`, then the slot, the kind byte and the version.
fn id_bytes(fill: u8, kind: u8, slot: u32) -> [u8; 16] {
    let mut b = [fill; 16];
    b[..4].copy_from_slice(&slot.to_be_bytes());
    b[4] = kind;
    b[6] = 0x85;
    b
}

fn vid(slot: u32) -> VolumeId {
    VolumeId(id_bytes(0xa5, 0x56, slot))
}

fn tid(slot: u32) -> TagId {
    TagId(id_bytes(0x5a, 0x7a, slot))
}

fn sample_slot() -> SlotHeader {
    SlotHeader {
        state: SlotState::Active,
        generation: 3,
        token: 77,
        host_id: uuid::Uuid::from_bytes([0x22; 16]),
        host_name: "node-a".into(),
        claimed_at: 1_700_000_000,
        released_at: 0,
    }
}

fn sample_volume() -> Volume {
    Volume {
        id: vid(3),
        parent: Some(tid(1)),
        format: Format::Qcow2,
        capacity: 10 << 30,
        extent_start: 17,
        extent_count: 4,
        legality: Legality::Legal,
        allocation: Allocation::Sparse,
        ctime: 1_700_000_000,
        description: "disk".into(),
        tag_refs: 1,
        generation: 2,
        token: 99,
        writer_slot: 5,
    }
}

fn sample_tag() -> Tag {
    Tag {
        id: tid(1),
        volume: vid(3),
        size: 10 << 30,
        mutable: true,
        strategy: TagStrategy::Chain,
        options: vec![("cache".into(), "none".into())],
        tag_type: TagType::Strong,
        state: TagState::Optimized,
        ctime: 1_700_000_000,
        child_refs: 2,
        user_data: UserDataRef {
            half: 1,
            len: 40,
            crc: 0xdead_beef,
        },
        generation: 7,
        token: 100,
        writer_slot: 5,
    }
}

/// The geometry every golden structure is laid out in: 64 MiB, 512-byte
/// sectors, 2 host slots, 16 volume and tag slots.
fn gold_geometry() -> Geometry {
    let p = FormatParams::tiny("gold", 2, 16);
    Geometry::compute(
        64 << 20,
        512,
        &p,
        uuid::Uuid::from_bytes(SALT),
        1_700_000_000,
    )
    .unwrap()
}

#[test]
fn golden_superblock() {
    let g = gold_geometry();
    golden(
        "superblock",
        g.encode().as_bytes(),
        256,
        "434149524e444f4d0100000000100000000000000000000000000000000000000000000000000000111111111111111111111111111111110400000000000000676f6c6400000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000f15365000000000000000400000000000200000010000000001000000000003e0000000000000002000000100000001000000000100000000001000000000000100000000000000020000000000000002002000000000004000000000000000060020000000000008002000000000000a00200000000000000100000000000",
        "83ef64ad",
    );
}

#[test]
fn golden_records() {
    golden(
        "volume record",
        &encode_volume(&SALT, &sample_volume()),
        108,
        "43564f4c010001000200000000000000630000000000000005000201010000000000000356a585a5a5a5a5a5a5a5a5a5000000017a5a855a5a5a5a5a5a5a5a5a00000080020000001100000000000000040000000000000000f153650000000001000000040000006469736b",
        "8e33e74d",
    );
    golden(
        "tag record",
        &encode_tag(&SALT, &sample_tag()),
        106,
        "4354414701000100070000000000000064000000000000000500010101010100000000017a5a855a5a5a5a5a5a5a5a5a0000000356a585a5a5a5a5a5a5a5a5a5000000800200000000f15365000000000200000028000000efbeadde0a00000063616368653d6e6f6e65",
        "163b1a20",
    );
    golden(
        "free record",
        &encode_free(&SALT, VOL_MAGIC, 9, 8, 2),
        26,
        "43564f4c01000200090000000000000008000000000000000200",
        "75d32c36",
    );
    let h = sample_slot();
    golden(
        "slot header",
        &h.encode(&SALT, 4),
        128,
        "43534c5401000100040000000000000003000000000000004d000000000000002222222222222222222222222222222206000000000000006e6f64652d610000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000f1536500000000",
        "f35c4f83",
    );
}

#[test]
fn golden_alloc_and_journal() {
    let g = gold_geometry();
    golden(
        "alloc root",
        &crate::alloc::encode_root(&g, 5, 6, 1),
        44,
        "43414d5201000000050000000000000006000000000000000100000000000000010000000100000001000000",
        "efc21bad",
    );
    let mut bits = [0u8; 4032];
    bits[0] = 0b1011;
    golden(
        "bitmap page",
        &crate::alloc::encode_page(&g, 0, 0, &bits, 2, 6),
        33,
        "43424d50010001000000000000000000020000000000000006000000000000000b",
        "6922e42c",
    );
    let intent = Intent {
        created: 1_700_000_000,
        request_id: [3; 16],
        label: "create volume".into(),
        actions: vec![Action::SetBits {
            map: 0,
            start: 17,
            count: 4,
        }],
    };
    let h = RecordHeader {
        kind: JournalKind::Intent.code(),
        seq: 12,
        oldest_open: 11,
        durable: 10,
        slot: 1,
    };
    let rec = encode_record(&SALT, &h, &intent.encode());
    golden(
        "journal intent block",
        &rec,
        48 + 112,
        "434a4e4c010001000c000000000000000b000000000000000a0000000000000001000000010000007000000000000000010000000000000000f1536500000000030303030303030303030303030303030d0000000000000063726561746520766f6c756d650000000000000000000000000000000000000000000000000000000300000000000000110000000000000004000000000000000000000000000000",
        "d29b7d9b",
    );
    let c = Commit {
        intent_seq: 12,
        outcome: Direction::Forward,
        resolver_slot: 1,
    };
    assert_eq!(
        hex(&c.encode()),
        "0c0000000000000001000000000000000100000000000000"
    );
}

#[test]
fn golden_user_data() {
    let mut items = UserData::new();
    items.insert("a".into(), b"xy".to_vec());
    assert_eq!(
        hex(&encode_user_data(&tid(1), &items)),
        "4355444201000100000000017a5a855a5a5a5a5a5a5a5a5a28000000000000000161020000007879"
    );
}

fn arb_text(max: usize) -> impl proptest::strategy::Strategy<Value = String> {
    proptest::collection::vec(proptest::char::range(' ', '~'), 0..max)
        .prop_map(|v| v.into_iter().collect::<String>())
        .prop_filter("fits", move |s| s.len() <= max)
}

prop_compose! {
    fn arb_volume()(slot in 0u32..1000, parent in proptest::option::of(0u32..1000),
                    raw in any::<bool>(), legal in any::<bool>(), sparse in any::<bool>(),
                    cap in 1u64..1 << 50, start in 0u64..1 << 30, count in 1u64..1 << 20,
                    ctime in any::<u64>(), desc in arb_text(400), refs in any::<u32>(),
                    gen in any::<u64>(), token in any::<u64>(), w in any::<u16>()) -> Volume {
        Volume {
            id: VolumeId::generate(slot),
            parent: parent.map(TagId::generate),
            format: if raw { Format::Raw } else { Format::Qcow2 },
            capacity: cap, extent_start: start, extent_count: count,
            legality: if legal { Legality::Legal } else { Legality::Illegal },
            allocation: if sparse { Allocation::Sparse } else { Allocation::Preallocated },
            ctime, description: desc, tag_refs: refs, generation: gen, token, writer_slot: w,
        }
    }
}

prop_compose! {
    fn arb_tag()(slot in 0u32..1000, vol in 0u32..1000, size in any::<u64>(), mutable in any::<bool>(),
                 copy in any::<bool>(), weak in any::<bool>(), state in 1u8..4,
                 opts in proptest::collection::btree_map("[a-z]{1,8}", "[ -~&&[^\n]]{0,20}", 0..6),
                 ctime in any::<u64>(), children in any::<u32>(), half in 0u8..2, len in any::<u32>(),
                 crc in any::<u32>(), gen in any::<u64>(), token in any::<u64>(), w in any::<u16>()) -> Tag {
        Tag {
            id: TagId::generate(slot), volume: VolumeId::generate(vol), size, mutable,
            strategy: if copy { TagStrategy::Copy } else { TagStrategy::Chain },
            options: opts.into_iter().collect(),
            tag_type: if weak { TagType::Weak } else { TagType::Strong },
            state: TagState::from_code(state).unwrap(),
            ctime, child_refs: children, user_data: UserDataRef { half, len, crc },
            generation: gen, token, writer_slot: w,
        }
    }
}

proptest! {
    #[test]
    fn volume_records_round_trip(v in arb_volume()) {
        let b = encode_volume(&SALT, &v);
        prop_assert_eq!(decode_volume(&SALT, v.id.slot(), &b).unwrap(), Slot::Live(v));
    }

    #[test]
    fn tag_records_round_trip(t in arb_tag()) {
        let b = encode_tag(&SALT, &t);
        prop_assert_eq!(decode_tag(&SALT, t.id.slot(), &b).unwrap(), Slot::Live(t));
    }

    #[test]
    fn slot_headers_round_trip(gen in any::<u64>(), token in any::<u64>(), id in any::<[u8; 16]>(),
                               name in "[a-z0-9.-]{0,64}", c in any::<u64>(), r in any::<u64>(), active in any::<bool>()) {
        let h = SlotHeader { state: if active { SlotState::Active } else { SlotState::Free },
            generation: gen, token, host_id: uuid::Uuid::from_bytes(id), host_name: name,
            claimed_at: c, released_at: r };
        prop_assert_eq!(SlotHeader::decode(&SALT, 9, &h.encode(&SALT, 9)).unwrap(), h);
    }

    #[test]
    fn intents_round_trip(n in 0usize..20, label in "[a-z ]{0,40}", req in any::<[u8; 16]>(),
                          recs in proptest::collection::vec((any::<u32>(), any::<u8>()), 0..5)) {
        let mut actions = Vec::new();
        for i in 0..n {
            actions.push(match i % 5 {
                0 => Action::SetBits { map: (i % 3) as u8, start: i as u64, count: 3 },
                1 => Action::ClearBits { map: 1, start: 9, count: i as u64 },
                2 => Action::UserData { slot: i as u32, half: (i % 2) as u8, len: 77, crc: 5 },
                3 => Action::VolumeData { slot: i as u32, len: 4096 * (i as u64 + 1), crc: 0xdead_beef },
                _ => Action::PutTag { slot: 1, before: Box::new([1; RECORD]), after: Box::new([2; RECORD]) },
            });
        }
        for (s, b) in recs {
            actions.push(Action::PutVolume { slot: s, before: Box::new([b; RECORD]), after: Box::new([!b; RECORD]) });
        }
        let i = Intent { created: 5, request_id: req, label, actions };
        prop_assert_eq!(Intent::decode(&i.encode()).unwrap(), i);
    }

    #[test]
    fn user_data_round_trips(items in proptest::collection::btree_map("[a-z0-9._:-]{1,64}",
                                 proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
        let t = TagId::generate(4);
        let items: UserData = items;
        let b = encode_user_data(&t, &items);
        prop_assert_eq!(b.len(), encoded_user_data_len(&items));
        prop_assert_eq!(decode_user_data(&t, &b).unwrap(), items);
    }

    #[test]
    fn geometry_round_trips(size_mib in 64u64..1 << 20, slots in 1u32..64, vs in 1u32..5000) {
        let p = FormatParams { name: "p".into(), host_slots: Some(slots), volume_slots: Some(vs),
            tag_slots: Some(vs), ..Default::default() };
        if let Ok(g) = Geometry::compute(size_mib << 20, 512, &p, uuid::Uuid::new_v4(), 1) {
            prop_assert_eq!(Geometry::decode(g.encode().as_bytes(), 0).unwrap(), g);
        }
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
        let _ = decode_volume(&SALT, 0, &bytes[..512]);
        let _ = decode_tag(&SALT, 0, &bytes[..512]);
        let _ = SlotHeader::decode(&SALT, 0, &bytes[..512]);
        let _ = Geometry::decode(&bytes, 0);
        let _ = Intent::decode(&bytes);
        let _ = Intent::decode(&bytes[..100]);
        let _ = Commit::decode(&bytes[..24]);
        let _ = decode_user_data(&TagId::generate(0), &bytes);
        let _ = crate::journal::decode_block(&SALT, 0, &bytes);
        let _ = crate::journal::scan(&SALT, 0, &bytes, 0);
    }
}

#[test]
fn non_utf8_text_is_refused_not_decoded_lossily() {
    // Regression (found by the `intent` fuzz target): a label of invalid
    // UTF-8 decoded lossily and did not re-encode to the same bytes.
    let i = Intent {
        created: 1,
        request_id: [0; 16],
        label: "ok".into(),
        actions: vec![],
    };
    let mut b = i.encode();
    b[32] = 2; // label length
    b[40] = 0xff;
    b[41] = 0xfe;
    assert!(Intent::decode(&b).is_err());
    let mut v = encode_volume(&SALT, &sample_volume());
    v[104] = 0xff;
    seal(&SALT, &mut v);
    assert!(decode_volume(&SALT, 3, &v).is_err());
}

/// The fuzz targets' seed corpora (`fuzz/seeds/<target>/`): the golden
/// structures above, each as the target reads it (a mode byte, then the
/// bytes), once as they are and once in repair mode. Regenerated with
/// `CAIRN_BLESS=1`; checked against the files otherwise, so a layout
/// change cannot leave the fuzzers seeded with stale structures.
#[test]
fn fuzz_seeds_are_the_golden_structures() {
    let g = gold_geometry();
    // The alloc_pages target's own geometry.
    let fz = FormatParams::tiny("fuzz", 2, 64);
    let fg = Geometry::compute(64 << 20, 512, &fz, uuid::Uuid::nil(), 0).unwrap();
    let with = |mode: u8, parts: &[&[u8]]| -> Vec<u8> {
        let mut v = vec![mode];
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let rec = |r: &[u8], slot: u32, mode: u8| with(mode, &[r, &SALT, &slot.to_le_bytes()]);
    let intent = Intent {
        created: 1_700_000_000,
        request_id: [3; 16],
        label: "create volume".into(),
        actions: vec![
            Action::SetBits {
                map: 0,
                start: 17,
                count: 4,
            },
            Action::PutVolume {
                slot: 3,
                before: Box::new([0; RECORD]),
                after: Box::new(encode_volume(&SALT, &sample_volume())),
            },
        ],
    };
    let commit = Commit {
        intent_seq: 12,
        outcome: Direction::Forward,
        resolver_slot: 0,
    };
    let header = |kind: JournalKind, seq| RecordHeader {
        kind: kind.code(),
        seq,
        oldest_open: 12,
        durable: seq - 1,
        slot: 0,
    };
    let mut ring =
        encode_record(&[0; 16], &header(JournalKind::Intent, 12), &intent.encode()).to_vec();
    ring.extend_from_slice(&encode_record(
        &[0; 16],
        &header(JournalKind::Commit, 13),
        &commit.encode(),
    ));
    let slot = sample_slot();
    let mut bits = [0u8; 4032];
    bits[0] = 0b1011;
    let mut items = UserData::new();
    items.insert("a".into(), b"xy".to_vec());
    let sb = g.encode();
    let (volume, tag) = (
        encode_volume(&SALT, &sample_volume()),
        encode_tag(&SALT, &sample_tag()),
    );
    let head = crate::catalog::CatalogHead { generation: 1377 }.encode(&[0x5a; 16]);
    let log = crate::catalog::CatalogLog {
        since: 1370,
        entries: vec![(1371, tid(1)), (1371, tid(2)), (1377, tid(1))],
    }
    .encode(&[0x5a; 16]);
    let seeds: Vec<(&str, &str, Vec<u8>)> = vec![
        ("superblock", "golden", with(0, &[sb.as_bytes()])),
        ("superblock", "golden-repair", with(1, &[sb.as_bytes()])),
        ("records", "volume", rec(&volume, 3, 0)),
        ("records", "volume-repair", rec(&volume, 3, 1)),
        ("records", "tag", rec(&tag, 1, 0)),
        ("records", "tag-repair", rec(&tag, 1, 3)),
        ("records", "slot", rec(&slot.encode(&SALT, 4), 4, 0)),
        ("records", "slot-repair", rec(&slot.encode(&SALT, 4), 4, 5)),
        (
            "records",
            "free",
            rec(&encode_free(&SALT, VOL_MAGIC, 9, 8, 2), 9, 0),
        ),
        (
            "alloc_pages",
            "root",
            with(0, &[&crate::alloc::encode_root(&fg, 5, 6, 1)]),
        ),
        (
            "alloc_pages",
            "root-repair",
            with(1, &[&crate::alloc::encode_root(&fg, 5, 6, 1)]),
        ),
        (
            "alloc_pages",
            "bitmap",
            with(0, &[&crate::alloc::encode_page(&fg, 0, 0, &bits, 2, 6)]),
        ),
        (
            "alloc_pages",
            "bitmap-repair",
            with(3, &[&crate::alloc::encode_page(&fg, 0, 0, &bits, 2, 6)]),
        ),
        ("journal_ring", "intent-commit", with(0, &[&ring])),
        ("journal_ring", "intent-commit-repair", with(1, &[&ring])),
        ("intent", "intent", with(0, &[&intent.encode()])),
        ("intent", "commit", with(0, &[&commit.encode()])),
        (
            "user_data",
            "blob",
            with(0, &[&encode_user_data(&tid(1), &items)]),
        ),
        (
            "user_data",
            "blob-repair",
            with(1, &[&encode_user_data(&tid(1), &items)]),
        ),
        ("catalog_head", "head", with(0, &[&head])),
        ("catalog_head", "head-repair", with(1, &[&head])),
        ("catalog_log", "log", with(0, &[&log])),
        ("catalog_log", "log-repair", with(1, &[&log])),
    ];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let bless = std::env::var_os("CAIRN_BLESS").is_some();
    for (target, name, bytes) in seeds {
        let p = root.join(target).join(name);
        if bless {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &bytes).unwrap();
        } else {
            let on_disk = std::fs::read(&p)
                .unwrap_or_else(|e| panic!("{}: {e} (regenerate with CAIRN_BLESS=1)", p.display()));
            assert!(
                on_disk == bytes,
                "{} is stale (regenerate with CAIRN_BLESS=1)",
                p.display()
            );
        }
    }
}
