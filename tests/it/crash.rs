//! Crash at every write and flush boundary of every operation, with
//! different sets of unflushed writes surviving, then recover and check.

use std::sync::Arc;

use cairn_domain::io::{BlockDev, CrashKeep, MemDev, SimDev};
use cairn_domain::*;

use cairn_tests::domain::*;

/// A domain's contents with random id bytes replaced by slot numbers, so
/// two runs of the same operation compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State(Vec<String>);

fn state(d: &Domain) -> State {
    let mut s = Vec::new();
    for v in d.list_volumes().unwrap() {
        // The first 64 KiB of every volume's data, as a checksum.
        let mut head = cairn_domain::io::AlignedBuf::zeroed(64 << 10);
        d.device()
            .read_at(&mut head, d.geometry().extent_off(v.extent_start))
            .unwrap();
        let sum = head.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        s.push(format!(
            "vol {} data={sum:x} parent={:?} {} {} cap={} run={}+{} {} {:?} refs={} gen={}",
            v.id.slot(),
            v.parent.map(|p| p.slot()),
            v.format,
            v.legality,
            v.capacity,
            v.extent_start,
            v.extent_count,
            v.allocation,
            v.description,
            v.tag_refs,
            v.generation
        ));
    }
    for t in d.list_tags().unwrap() {
        s.push(format!(
            "tag {} vol={} size={} {} {} {} {} {:?} children={} gen={} ud={:?}",
            t.id.slot(),
            t.volume.slot(),
            t.size,
            t.mutable,
            t.strategy,
            t.tag_type,
            t.state,
            t.options,
            t.child_refs,
            t.generation,
            user_data(d, &t.id)
        ));
    }
    let u = d.usage().unwrap();
    s.push(format!("usage {} {} {}", u.extents_used, u.volumes, u.tags));
    State(s)
}

/// A tag's user data as text; the catalog's change log by slots, since
/// the ids of the tags it names are random in every run.
fn user_data(d: &Domain, t: &cairn_domain::TagId) -> String {
    use cairn_domain::catalog::{CatalogLog, LOG_ITEM};
    let mut items = d.read_user_data(t).unwrap();
    let log = items.remove(LOG_ITEM).map(|b| {
        let l = CatalogLog::decode(d.geometry().domain_id.as_bytes(), &b).unwrap();
        let e: Vec<_> = l.entries.iter().map(|(g, t)| (g, t.slot())).collect();
        format!("log since {} {e:?}", l.since)
    });
    format!("{items:?} {log:?}")
}

/// Objects the setup made, for the operation under test.
/// A snapshot of the disk, but for moving the disk's tag onto the new top
/// volume (the tag's changed metadata comes with it).
fn snapshot<'a>(d: &'a Domain, f: &Fixture) -> Result<(Transaction<'a>, TagMeta)> {
    let mut weak = tag_on(f.disk_vol);
    weak.tag_type = TagType::Weak;
    weak.mutable = false;
    let mut top = raw(1);
    top.format = Format::Qcow2;
    top.parent = Some(TagRef::New(0));
    let mut moved = d.read_tag(&f.disk)?.meta();
    moved.volume = VolumeRef::New(0);
    let tx = d.tx("snapshot").create_tag(weak).create_volume(top);
    Ok((tx, moved))
}

struct Fixture {
    base_tag: TagId,
    disk_vol: VolumeId,
    disk: TagId,
    spare: VolumeId,
    leaf: VolumeId,
    leaf_tag: TagId,
}

fn setup(d: &Domain) -> Fixture {
    let (base, bg) = d.create_volume(raw(1)).unwrap();
    let base_tag = d.create_tag(tag_on(base.id), &[&bg]).unwrap();
    let mut spec = raw(1);
    spec.format = Format::Qcow2;
    spec.parent = Some(TagRef::Existing(base_tag.id));
    let (disk_vol, dg) = d.create_volume(spec).unwrap();
    let disk = d.create_tag(tag_on(disk_vol.id), &[&dg]).unwrap();
    d.set_user_data(&disk.id, "catalog", b"first".to_vec(), &[])
        .unwrap();
    let (spare, _sg) = d.create_volume(raw(2)).unwrap();
    let (leaf, lg) = d.create_volume(raw(1)).unwrap();
    let leaf_tag = d.create_tag(tag_on(leaf.id), &[&lg]).unwrap();
    Fixture {
        base_tag: base_tag.id,
        disk_vol: disk_vol.id,
        disk: disk.id,
        spare: spare.id,
        leaf: leaf.id,
        leaf_tag: leaf_tag.id,
    }
}

type OpFn = fn(&Domain, &Fixture) -> Result<()>;

fn ops() -> Vec<(&'static str, OpFn)> {
    vec![
        ("create volume", |d, _| d.create_volume(raw(2)).map(|_| ())),
        ("create volume on a parent", |d, f| {
            let mut s = raw(1);
            s.format = Format::Qcow2;
            s.parent = Some(TagRef::Existing(f.base_tag));
            d.create_volume(s).map(|_| ())
        }),
        ("delete volume", |d, f| d.delete_volume(&f.spare, &[])),
        ("write volume metadata (rebase)", |d, f| {
            let mut m = d.read_volume(&f.disk_vol)?.meta();
            m.parent = None;
            m.description = "rebased".into();
            d.write_volume_meta(&f.disk_vol, m, &[]).map(|_| ())
        }),
        ("extend volume", |d, f| {
            d.extend_volume(&f.leaf, 3 << 20, &[]).map(|_| ())
        }),
        ("create tag", |d, f| {
            d.create_tag(tag_on(f.spare), &[]).map(|_| ())
        }),
        ("delete tag", |d, f| d.delete_tag(&f.leaf_tag, &[])),
        ("change tag (move to another volume)", |d, f| {
            let mut m = tag_on(f.spare);
            m.state = TagState::Degraded;
            d.change_tag(&f.leaf_tag, m, &[]).map(|_| ())
        }),
        ("write user data", |d, f| {
            d.set_user_data(&f.disk, "manifest", vec![0xab; 2500], &[])
        }),
        ("remove user data", |d, f| {
            d.remove_user_data(&f.disk, "catalog", &[])
        }),
        ("grouped: snapshot", |d, f| {
            let (tx, moved) = snapshot(d, f)?;
            tx.change_tag(f.disk, moved).commit().map(|_| ())
        }),
        ("grouped: snapshot with an initialised image", |d, f| {
            let (tx, moved) = snapshot(d, f)?;
            tx.init_volume_data(
                VolumeRef::New(0),
                64 << 10,
                vec![(0, vec![0x51; 512]), (8192, vec![7; 4096])],
            )
            .change_tag(f.disk, moved)
            .commit()
            .map(|_| ())
        }),
        ("catalog: make the anchor", |d, _| {
            d.ensure_anchor().map(|_| ())
        }),
        ("grouped: delete a chain", |d, f| {
            d.tx("delete leaf")
                .delete_tag(f.leaf_tag)
                .delete_volume(f.leaf)
                .commit()
                .map(|_| ())
        }),
    ]
}

fn open_on(dev: Arc<dyn BlockDev>) -> Result<Domain> {
    Domain::open(dev, Arc::new(MemLockService::new()), opts(1))
}

const KEEPS: [CrashKeep; 5] = [
    CrashKeep::None,
    CrashKeep::All,
    CrashKeep::Subset(1),
    CrashKeep::Subset(2),
    CrashKeep::Subset(3),
];

/// Recover `image`, check it, and return its state. Also crash the
/// recovery itself at every boundary and recover again.
fn recover_and_check(
    image: Vec<u8>,
    before: &State,
    after: &State,
    what: &str,
    deep: bool,
    points: &mut u64,
) {
    // Plain recovery.
    let dev = Arc::new(MemDev::from_image(image.clone()));
    let d = open_on(dev.clone()).unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    let got = state(&d);
    drop(d);
    assert_clean(dev.as_ref());
    assert!(
        got == *before || got == *after,
        "{what}: state is neither before nor after:\n{got:#?}\nbefore {before:#?}\nafter {after:#?}"
    );
    if !deep {
        return;
    }
    // Recovery that crashes, at every one of its writes and flushes.
    let probe = SimDev::new(image.clone(), None);
    let _ = open_on(probe.clone()).unwrap();
    let events = probe.events();
    for k in 0..events {
        let sim = SimDev::new(image.clone(), Some(k));
        assert!(
            open_on(sim.clone()).is_err(),
            "{what}: recovery crash {k} did not stop"
        );
        for keep in [CrashKeep::None, CrashKeep::All] {
            *points += 1;
            let dev = Arc::new(MemDev::from_image(sim.crash_image(keep)));
            let d = open_on(dev.clone())
                .unwrap_or_else(|e| panic!("{what}: second recovery after crash {k} failed: {e}"));
            let again = state(&d);
            drop(d);
            assert_clean(dev.as_ref());
            assert_eq!(
                again, got,
                "{what}: recovery crashed at {k} changed the outcome"
            );
        }
    }
}

#[test]
fn crash_at_every_boundary_of_every_operation() {
    let rollbacks = crash_every(ops(), setup);
    assert!(rollbacks > 0, "no crash point exercised a rollback");
}

/// A domain's catalog: its anchor, a small file, a file in a volume, and
/// an illegal raw volume with bytes written, to commit as a file.
struct Catalog {
    anchor: catalog::Anchor,
    small: TagId,
    large: TagId,
    written: VolumeId,
    registered: TagId,
}

fn catalog_setup(d: &Domain) -> Catalog {
    use catalog::{FileBytes, ImageChange, NewFile};
    let anchor = d.ensure_anchor().unwrap();
    let file = |path: &str| NewFile {
        path: path.into(),
        owner: "alice".into(),
        directory: false,
        request: String::new(),
    };
    let small = d
        .commit_file(
            &anchor,
            &file("a.meta"),
            FileBytes::Inline(b"{}"),
            None,
            [1; 16],
        )
        .unwrap();
    let illegal = |n: u8| {
        let (v, g) = d.create_volume(raw(1)).unwrap();
        let mut m = v.meta();
        m.legality = Legality::Illegal;
        d.write_volume_meta(&v.id, m, &[&g]).unwrap();
        let mut b = cairn_domain::io::AlignedBuf::zeroed(4096);
        b.fill(n);
        d.device()
            .write_at(&b, d.geometry().extent_off(v.extent_start))
            .unwrap();
        (v.id, g)
    };
    let (lv, lg) = illegal(1);
    let bytes = FileBytes::Volume {
        id: lv,
        guard: &lg,
        size: 4096,
        sha256: "ab".repeat(32),
    };
    let large = d
        .commit_file(&anchor, &file("disk.raw"), bytes, None, [2; 16])
        .unwrap();
    let (written, _) = illegal(2);
    let reg = d
        .commit_file(
            &anchor,
            &file("reg.raw"),
            FileBytes::Inline(b"r"),
            None,
            [3; 16],
        )
        .unwrap();
    d.set_file_image(
        &anchor,
        &reg.tag,
        ImageChange {
            image: Some(("img-r", b"{}")),
            ..Default::default()
        },
        None,
        [4; 16],
    )
    .unwrap();
    Catalog {
        anchor,
        small: small.tag,
        large: large.tag,
        written,
        registered: reg.tag,
    }
}

/// Named operations on a domain a setup prepared with `F`.
type Ops<F> = Vec<(&'static str, fn(&Domain, &F) -> Result<()>)>;

fn catalog_ops() -> Ops<Catalog> {
    use catalog::{FileBytes, ImageChange, NewFile};
    vec![
        ("catalog: commit a small file", |d, f| {
            let nf = NewFile {
                path: "a.meta".into(),
                owner: "alice".into(),
                directory: false,
                request: "r".into(),
            };
            d.commit_file(
                &f.anchor,
                &nf,
                FileBytes::Inline(b"{\"v\":2}"),
                Some(4),
                [3; 16],
            )
            .map(|_| ())
        }),
        ("catalog: commit a file in a volume", |d, f| {
            let g = d.lock_volume(&f.written)?;
            let nf = NewFile {
                path: "images/b.raw".into(),
                owner: "alice".into(),
                directory: false,
                request: "r".into(),
            };
            let bytes = FileBytes::Volume {
                id: f.written,
                guard: &g,
                size: 4000,
                sha256: "cd".repeat(32),
            };
            d.commit_file(&f.anchor, &nf, bytes, Some(4), [4; 16])
                .map(|_| ())
        }),
        ("catalog: register an image with its metafile", |d, f| {
            let m = NewFile {
                path: "disk.raw.meta".into(),
                owner: "alice".into(),
                directory: false,
                request: "r".into(),
            };
            let image = Some(("img-1", &b"{\"name\":\"x\"}"[..]));
            d.set_file_image(
                &f.anchor,
                &f.large,
                ImageChange {
                    image,
                    metafile: Some((&m, b"{}")),
                    ..Default::default()
                },
                Some(4),
                [6; 16],
            )
            .map(|_| ())
        }),
        (
            "catalog: unregister an image with its data items",
            |d, f| {
                d.set_file_image(
                    &f.anchor,
                    &f.registered,
                    ImageChange {
                        drop: &[f.small, f.large],
                        ..Default::default()
                    },
                    Some(4),
                    [7; 16],
                )
                .map(|_| ())
            },
        ),
        ("catalog: delete files", |d, f| {
            d.delete_files(&f.anchor, &[f.small, f.large], Some(4), [5; 16])
                .map(|_| ())
        }),
    ]
}

#[test]
fn crash_at_every_boundary_of_the_catalog_operations() {
    crash_every(catalog_ops(), catalog_setup);
}

/// Crash every operation of `ops` on a domain `setup` prepared, at every
/// write and flush boundary, with each [`KEEPS`] set of unflushed writes
/// surviving; recover and check. The intents rolled back.
fn crash_every<F>(ops: Ops<F>, setup: fn(&Domain) -> F) -> u64 {
    let mut total_points = 0u64;
    let mut rollbacks = 0u64;
    for (name, op) in ops {
        // A clean domain with the fixture, closed cleanly.
        let dev = mem_domain(12 << 20, &params());
        let d = open_on(dev.clone()).unwrap();
        let fix = setup(&d);
        d.close().unwrap();
        let base = dev.image();
        // Reference run: how many events, and the states before and after.
        let sim = SimDev::new(base.clone(), None);
        let d = open_on(sim.clone()).unwrap();
        let before = state(&d);
        let start = sim.events();
        let flushes_before = sim.stats().flushes;
        op(&d, &fix).unwrap_or_else(|e| panic!("{name}: reference run failed: {e}"));
        let end = sim.events();
        let after = state(&d);
        assert_ne!(before, after, "{name}: the operation changed nothing");
        let flushes = sim.stats().flushes - flushes_before;
        assert!(flushes <= 3, "{name}: {flushes} flushes");
        drop(d);
        assert!(end - start >= 4, "{name}: only {} events", end - start);
        let mut points = 0;
        for n in start..=end {
            let sim = SimDev::new(base.clone(), Some(n));
            let d = open_on(sim.clone()).unwrap();
            let res = op(&d, &fix);
            let crashed = sim.crashed();
            drop(d);
            for keep in KEEPS {
                points += 1;
                let image = sim.crash_image(keep);
                if res.is_ok() {
                    // Success was reported: the change must survive.
                    let dev = Arc::new(MemDev::from_image(image.clone()));
                    let d = open_on(dev).unwrap();
                    assert_eq!(
                        state(&d),
                        after,
                        "{name}: reported success but lost it (crash {n})"
                    );
                }
                let dev = Arc::new(MemDev::from_image(image.clone()));
                let d = open_on(dev).unwrap();
                rollbacks += d
                    .recovery_reports()
                    .iter()
                    .map(|r| r.back.len() as u64)
                    .sum::<u64>();
                drop(d);
                let deep = matches!(keep, CrashKeep::None | CrashKeep::All);
                recover_and_check(
                    image,
                    &before,
                    &after,
                    &format!("{name} crash {n} {keep:?}"),
                    deep,
                    &mut points,
                );
            }
            if !crashed {
                assert!(res.is_ok(), "{name}: failed without a crash: {res:?}");
            }
        }
        println!(
            "{name}: {} writes and flushes ({} flushes), {points} crash points",
            end - start,
            flushes
        );
        total_points += points;
    }
    println!("crash points covered: {total_points}; intents rolled back: {rollbacks}");
    rollbacks
}
