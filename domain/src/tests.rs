//! Engine tests against the in-memory device and lock service.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::*;
use crate::error::DomainError;
use crate::geometry::FormatParams;
use crate::io::{BlockDev, MemDev};
use crate::lock::{LockService, MemLockService};
use crate::model::*;
pub(crate) use crate::testing::{assert_clean, host, mem_domain};

pub(crate) fn params() -> FormatParams {
    FormatParams {
        name: "test".into(),
        host_slots: Some(4),
        volume_slots: Some(64),
        tag_slots: Some(64),
        journal_size: Some(256 * 1024),
        user_data_size: Some(8192),
        extent_size: None,
        wipe_after_delete: false,
    }
}

fn setup() -> (Arc<MemDev>, Arc<MemLockService>, Domain) {
    let dev = mem_domain(64 << 20, &params());
    let locks = Arc::new(MemLockService::new());
    let mut o = OpenOptions::new(host(1));
    o.lock_timeout = Duration::from_secs(2);
    let d = Domain::open(dev.clone(), locks.clone(), o).unwrap();
    (dev, locks, d)
}

pub(crate) fn raw(size: u64) -> VolumeSpec {
    VolumeSpec::raw(size, "a volume")
}

pub(crate) fn tag_on(v: VolumeId) -> TagMeta {
    let options = vec![("cache".into(), "none".into())];
    TagMeta::disk(VolumeRef::Existing(v), 1 << 20, options)
}

#[test]
fn volume_and_tag_lifecycle() {
    let (dev, _l, d) = setup();
    let (v, vg) = d.create_volume(raw(3 << 20)).unwrap();
    assert_eq!(v.extent_count, 3);
    assert_eq!(d.read_volume(&v.id).unwrap(), v);
    let t = d.create_tag(tag_on(v.id), &[&vg]).unwrap();
    assert_eq!(d.read_volume(&v.id).unwrap().tag_refs, 1);
    // A referenced volume cannot be deleted.
    let e = d.delete_volume(&v.id, &[&vg]).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::FailedPrecondition, "{e}");
    // Change replaces the whole metadata.
    let mut m = tag_on(v.id);
    m.state = TagState::Degraded;
    m.options = vec![];
    let t2 = d.change_tag(&t.id, m, &[]).unwrap();
    assert_eq!(t2.state, TagState::Degraded);
    assert!(t2.options.is_empty());
    assert_eq!(t2.generation, t.generation + 1);
    assert_clean(dev.as_ref());
    d.delete_tag(&t.id, &[&vg]).unwrap();
    d.delete_volume(&v.id, &[&vg]).unwrap();
    assert!(d.read_volume(&v.id).is_err());
    assert_eq!(d.usage().unwrap().extents_used, 0);
    assert_clean(dev.as_ref());
}

#[test]
fn volume_metadata_rebase_and_extend() {
    let (dev, _l, d) = setup();
    let (base, bg) = d.create_volume(raw(1 << 20)).unwrap();
    let bt = d.create_tag(tag_on(base.id), &[&bg]).unwrap();
    let mut spec = raw(1 << 20);
    spec.format = Format::Qcow2;
    spec.parent = Some(TagRef::Existing(bt.id));
    let (top, tg) = d.create_volume(spec).unwrap();
    assert_eq!(d.read_tag(&bt.id).unwrap().child_refs, 1);
    // The parent tag cannot go while a volume names it.
    assert!(d.delete_tag(&bt.id, &[]).is_err());
    let mut meta = top.meta();
    meta.parent = None;
    meta.legality = Legality::Illegal;
    meta.description = "rebased".into();
    let top2 = d.write_volume_meta(&top.id, meta, &[&tg]).unwrap();
    assert_eq!(top2.parent, None);
    assert_eq!(d.read_tag(&bt.id).unwrap().child_refs, 0);
    let big = d.extend_volume(&top.id, 4 << 20, &[&tg]).unwrap();
    assert_eq!(big.extent_count, 4);
    // Shrinking is refused, and so is growing into a neighbour.
    assert!(d.extend_volume(&top.id, 1 << 20, &[&tg]).is_err());
    let e = d.extend_volume(&base.id, 2 << 20, &[&bg]).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::ResourceExhausted, "{e}");
    assert_clean(dev.as_ref());
}

#[test]
fn user_data_items() {
    let (dev, _l, d) = setup();
    let (v, g) = d.create_volume(raw(1 << 20)).unwrap();
    let t = d.create_tag(tag_on(v.id), &[&g]).unwrap();
    d.set_user_data(&t.id, "catalog", b"{\"name\":\"debian\"}".to_vec(), &[])
        .unwrap();
    d.set_user_data(&t.id, "manifest", vec![7; 3000], &[])
        .unwrap();
    let ud = d.read_user_data(&t.id).unwrap();
    assert_eq!(ud.len(), 2);
    assert_eq!(ud["manifest"], vec![7; 3000]);
    let e = d
        .set_user_data(&t.id, "huge", vec![0; 9000], &[])
        .unwrap_err();
    assert!(e.to_string().contains("user_data"), "{e}");
    let e = d
        .set_user_data(&t.id, "bad/name", vec![1], &[])
        .unwrap_err();
    assert!(e.to_string().contains("user_data_name"), "{e}");
    d.remove_user_data(&t.id, "catalog", &[]).unwrap();
    assert!(d.remove_user_data(&t.id, "catalog", &[]).is_err());
    assert_eq!(d.read_user_data(&t.id).unwrap().len(), 1);
    assert_clean(dev.as_ref());
}

#[test]
fn grouped_transaction_is_one_intent() {
    let (dev, _l, d) = setup();
    let (v, vg) = d.create_volume(raw(1 << 20)).unwrap();
    let disk = d.create_tag(tag_on(v.id), &[&vg]).unwrap();
    let dg = d.lock_tag(&disk.id).unwrap();
    // Snapshot: weak tag on the old top, new qcow2 top, move the disk tag.
    let mut weak = tag_on(v.id);
    weak.tag_type = TagType::Weak;
    weak.mutable = false;
    let mut spec = raw(1 << 20);
    spec.format = Format::Qcow2;
    spec.parent = Some(TagRef::New(0));
    let mut moved = disk.meta();
    moved.volume = VolumeRef::New(0);
    let before = dev.stats();
    let out = d
        .tx("snapshot")
        .create_tag(weak)
        .create_volume(spec)
        .change_tag(disk.id, moved)
        .held(&[&dg, &vg])
        .commit()
        .unwrap();
    let after = dev.stats();
    assert_eq!(after.flushes - before.flushes, 2);
    let top = &out.volumes[0];
    assert!(out.volume_locks.is_empty(), "not asked for");
    let w = &out.tags[0];
    assert_eq!(d.read_tag(&disk.id).unwrap().volume, top.id);
    assert_eq!(top.parent, Some(w.id));
    assert_eq!(d.read_tag(&w.id).unwrap().child_refs, 1);
    assert_eq!(d.read_volume(&v.id).unwrap().tag_refs, 1);
    assert_clean(dev.as_ref());
}

#[test]
fn a_snapshot_planned_from_unlocked_reads_goes_on_only_if_the_tag_is_unchanged() {
    let (dev, locks, d) = setup();
    let (v, vg) = d.create_volume(raw(1 << 20)).unwrap();
    let disk = d.create_tag(tag_on(v.id), &[&vg]).unwrap();
    drop(vg);
    let snapshot = |seen: &Tag| {
        let mut weak = tag_on(seen.volume);
        weak.tag_type = TagType::Weak;
        weak.mutable = false;
        let mut spec = raw(1 << 20);
        spec.format = Format::Qcow2;
        spec.parent = Some(TagRef::New(0));
        let mut moved = seen.meta();
        moved.volume = VolumeRef::New(0);
        d.tx("snapshot")
            .create_tag(weak)
            .create_volume(spec)
            .change_tag(seen.id, moved)
            .expect_tag(seen)
            .commit()
    };
    // Someone changes the disk between our read and our transaction.
    let seen = d.read_tag(&disk.id).unwrap();
    let mut other = seen.meta();
    other.size = 2 << 20;
    d.change_tag(&disk.id, other, &[]).unwrap();
    let before = dev.image();
    let e = snapshot(&seen).unwrap_err();
    assert!(matches!(e, DomainError::Changed(_)), "{e}");
    assert_eq!(e.code(), crate::error::ErrorCode::Changed);
    assert!(
        dev.image() == before,
        "a refused transaction wrote something"
    );
    // Read again: it goes through, and what it made took no lock of its
    // own yet is writable under a later lock (its token is older).
    let seen = d.read_tag(&disk.id).unwrap();
    let out = snapshot(&seen).unwrap();
    assert!(out.volume_locks.is_empty());
    let top = out.volumes[0].clone();
    let weak = out.tags[0].clone();
    assert_eq!(d.read_tag(&disk.id).unwrap().volume, top.id);
    for r in [
        d.resource(crate::lock::ResourceKind::Volume(top.id)),
        d.resource(crate::lock::ResourceKind::Tag(weak.id)),
    ] {
        assert_eq!(locks.holder(&r).unwrap(), None, "{r:?} is not held");
    }
    let tg = d.lock_tag(&weak.id).unwrap();
    assert!(tg.token() > weak.token);
    let mut m = weak.meta();
    m.options.push(("k".into(), "v".into()));
    d.change_tag(&weak.id, m, &[&tg]).unwrap();
    let vg = d.lock_volume(&top.id).unwrap();
    assert!(vg.token() > top.token);
    d.extend_volume(&top.id, 2 << 20, &[&vg]).unwrap();
    assert_clean(dev.as_ref());
}

#[test]
fn failed_validation_changes_nothing() {
    let (dev, _l, d) = setup();
    let before = dev.image();
    let mut bad = raw(1 << 20);
    bad.capacity = 0;
    assert!(d.create_volume(bad).is_err());
    let mut bad = raw(1 << 20);
    bad.description = "a\u{7}b".into();
    assert!(d.create_volume(bad).is_err());
    let mut bad = raw(1 << 20);
    bad.parent = Some(TagRef::Existing(TagId::generate(3)));
    let e = d.create_volume(bad).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::NotFound, "{e}");
    let e = d.read_volume(&VolumeId::generate(10_000)).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::InvalidArgument, "{e}");
    assert_eq!(dev.image(), before);
}

#[test]
fn out_of_space_is_resource_exhausted() {
    let (_dev, _l, d) = setup();
    let total = d.geometry().extent_count;
    let e = d.create_volume(raw((total + 1) << 20)).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::InvalidArgument, "{e}");
    let (_v, _g) = d.create_volume(raw(total << 20)).unwrap();
    let e = d.create_volume(raw(1 << 20)).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::ResourceExhausted, "{e}");
}

#[test]
fn reopen_keeps_everything_and_reuses_the_slot() {
    let (dev, locks, d) = setup();
    let (v, g) = d.create_volume(raw(1 << 20)).unwrap();
    let t = d.create_tag(tag_on(v.id), &[&g]).unwrap();
    let slot = d.slot();
    drop(g);
    d.close().unwrap();
    let d = Domain::open(dev.clone(), locks.clone(), OpenOptions::new(host(1))).unwrap();
    assert_eq!(d.slot(), slot);
    assert_eq!(d.read_tag(&t.id).unwrap(), t);
    assert_eq!(d.list_volumes().unwrap().len(), 1);
    assert_eq!(d.list_tags().unwrap().len(), 1);
}

#[test]
fn a_dead_hosts_open_intent_is_recovered_by_the_next_transaction() {
    // Host 1 writes an intent and dies before applying it (simulated by
    // writing only the intent); host 2's next transaction recovers it.
    let (dev, locks, d1) = setup();
    let (v, g) = d1.create_volume(raw(1 << 20)).unwrap();
    drop(g);
    let mut o = OpenOptions::new(host(2));
    o.lock_timeout = Duration::from_secs(2);
    let d2 = Domain::open(dev.clone(), locks.clone(), o).unwrap();
    assert_ne!(d1.slot(), d2.slot());
    // Kill host 1 without a clean close: its slot lock goes, its header
    // stays ACTIVE.
    drop(d1);
    let t = d2.create_tag(tag_on(v.id), &[]).unwrap();
    assert_eq!(d2.read_tag(&t.id).unwrap().volume, v.id);
    assert_clean(dev.as_ref());
    for map in 0..3 {
        let r = d2.resource(crate::lock::ResourceKind::AllocPage { map, page: 0 });
        assert_eq!(locks.holder(&r).unwrap(), None, "{r:?} is released");
    }
}

#[test]
fn hosts_allocate_on_different_pages_and_fall_back_to_others_when_full() {
    use crate::alloc::VOLUME_SLOTS;
    use crate::layout::BITS_PER_PAGE;
    use crate::lock::ResourceKind;
    let mut p = params();
    // Two pages of volume slots, the second with room for five.
    p.volume_slots = Some((BITS_PER_PAGE + 5) as u32);
    let dev = mem_domain(64 << 20, &p);
    let locks = Arc::new(MemLockService::new());
    let open = |n| {
        let mut o = OpenOptions::new(host(n));
        o.lock_timeout = Duration::from_millis(300);
        Domain::open(dev.clone(), locks.clone(), o).unwrap()
    };
    let (d1, d2) = (open(1), open(2));
    let home = |d: &Domain| (d.slot().unwrap() as u64 * 3) % 2;
    assert_ne!(
        home(&d1),
        home(&d2),
        "slots {:?} and {:?}",
        d1.slot(),
        d2.slot()
    );
    let (a, b) = if home(&d1) == 0 { (d1, d2) } else { (d2, d1) };
    let page_of = |v: &Volume| v.id.slot() as u64 / BITS_PER_PAGE;
    // While a transaction of host `a` holds page 0, host `b` allocates on
    // page 1 without waiting.
    let page0 = a.resource(ResourceKind::AllocPage {
        map: VOLUME_SLOTS as u8,
        page: 0,
    });
    let held = locks.acquire(&page0, Duration::ZERO).unwrap();
    let (vb, _) = b.create_volume(raw(1 << 20)).unwrap();
    assert_eq!(page_of(&vb), 1);
    drop(held);
    let (va, _) = a.create_volume(raw(1 << 20)).unwrap();
    assert_eq!(page_of(&va), 0);
    // Another host fills page 1 while `b` believes it has room: `b`'s
    // plan finds no free slot there, takes page 0's lock as well and goes
    // on; after that it knows, and asks for page 0 directly.
    let g = b.geometry().clone();
    crate::alloc::apply_on_disk(dev.as_ref(), &g, VOLUME_SLOTS, BITS_PER_PAGE + 1, 4, true)
        .unwrap();
    let (v1, _) = b.create_volume(raw(1 << 20)).unwrap();
    assert_eq!(page_of(&v1), 0, "page 1 is full");
    let (v2, _) = b.create_volume(raw(1 << 20)).unwrap();
    assert_eq!(page_of(&v2), 0);
    crate::alloc::apply_on_disk(dev.as_ref(), &g, VOLUME_SLOTS, BITS_PER_PAGE + 1, 4, false)
        .unwrap();
    assert_eq!(a.list_volumes().unwrap().len(), 4);
    assert_clean(dev.as_ref());
    for map in 0..3u8 {
        for page in 0..2 {
            let r = a.resource(ResourceKind::AllocPage { map, page });
            assert_eq!(locks.holder(&r).unwrap(), None, "{r:?} is released");
        }
    }
}

#[test]
fn stale_token_is_fenced() {
    let (_dev, locks, d) = setup();
    let (v, g) = d.create_volume(raw(1 << 20)).unwrap();
    drop(g);
    // A newer holder writes the record...
    let g2 = d.lock_volume(&v.id).unwrap();
    let mut m = v.meta();
    m.description = "new".into();
    d.write_volume_meta(&v.id, m, &[&g2]).unwrap();
    drop(g2);
    // ...then a writer whose lock carries an older token tries to write.
    struct Old;
    impl crate::lock::HeldLock for Old {
        fn token(&self) -> crate::lock::Token {
            1
        }
        fn check(&self) -> crate::Result<()> {
            Ok(())
        }
    }
    let stale = crate::lock::LockGuard::new(
        d.resource(crate::lock::ResourceKind::Volume(v.id)),
        Box::new(Old),
    );
    let e = d.write_volume_meta(&v.id, v.meta(), &[&stale]).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::Fenced, "{e}");
    let _ = locks;
}

#[test]
fn a_restarted_lock_service_still_outranks_old_tokens() {
    // Regression: a fresh lock service used to start its tokens at 1, so
    // every record written before fenced out every writer after.
    let (dev, locks, d) = setup();
    let (v, g) = d.create_volume(raw(1 << 20)).unwrap();
    drop(g);
    d.close().unwrap();
    drop(locks);
    let d = Domain::open(
        dev,
        Arc::new(MemLockService::new()),
        OpenOptions::new(host(1)),
    )
    .unwrap();
    let mut m = v.meta();
    m.description = "after restart".into();
    d.write_volume_meta(&v.id, m, &[]).unwrap();
}

#[test]
fn sixteen_threads_on_three_hosts_allocate_over_many_pages() {
    use crate::layout::BITS_PER_PAGE;
    let mut p = params();
    p.volume_slots = Some((4 * BITS_PER_PAGE) as u32);
    p.tag_slots = Some(2000);
    p.user_data_size = Some(4096);
    let dev = mem_domain(768 << 20, &p);
    let locks = Arc::new(MemLockService::new());
    let ds: Vec<Arc<Domain>> = (1..4)
        .map(|n| {
            let mut o = OpenOptions::new(host(n));
            o.lock_timeout = Duration::from_secs(5);
            Arc::new(Domain::open(dev.clone(), locks.clone(), o).unwrap())
        })
        .collect();
    std::thread::scope(|s| {
        for i in 0..16 {
            let d = ds[i % 3].clone();
            s.spawn(move || {
                for _ in 0..20 {
                    let (v, g) = d.create_volume(raw(1 << 20)).unwrap();
                    d.create_tag(tag_on(v.id), &[&g]).unwrap();
                }
            });
        }
    });
    let vols = ds[0].list_volumes().unwrap();
    assert_eq!(vols.len(), 320);
    let pages: std::collections::BTreeSet<u64> = vols
        .iter()
        .map(|v| v.id.slot() as u64 / BITS_PER_PAGE)
        .collect();
    assert!(pages.len() > 1, "slots spread over pages: {pages:?}");
    assert_eq!(ds[0].list_tags().unwrap().len(), 320);
    assert_clean(dev.as_ref());
}

/// Regression: a second writable tag on a volume made two disks writing
/// one image.
#[test]
fn a_volume_has_at_most_one_writable_tag() {
    let (dev, _l, d) = setup();
    let (v, vg) = d.create_volume(raw(3 << 20)).unwrap();
    let disk = d.create_tag(tag_on(v.id), &[&vg]).unwrap();
    let before = dev.image();
    let e = d.create_tag(tag_on(v.id), &[&vg]).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::FailedPrecondition, "{e}");
    assert!(e.to_string().contains(&disk.id.to_string()), "{e}");
    assert!(dev.image() == before, "a refused tag changed the domain");
    // Read-only and weak tags are fine beside it.
    let mut ro = tag_on(v.id);
    ro.mutable = false;
    let ro = d.create_tag(ro.clone(), &[&vg]).unwrap();
    let mut weak = tag_on(v.id);
    weak.tag_type = TagType::Weak;
    d.create_tag(weak, &[&vg]).unwrap();
    // Making the read-only one writable is refused too.
    let e = d.change_tag(&ro.id, tag_on(v.id), &[]).unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::FailedPrecondition, "{e}");
    // Once the disk is gone, another may write.
    d.delete_tag(&disk.id, &[&vg]).unwrap();
    d.change_tag(&ro.id, tag_on(v.id), &[]).unwrap();
    assert_clean(dev.as_ref());
}

/// The bytes of `v`'s extent run.
fn run_bytes(dev: &MemDev, d: &Domain, v: &Volume) -> Vec<u8> {
    let g = d.geometry();
    let mut b = crate::io::AlignedBuf::zeroed((v.extent_count * g.extent_size) as usize);
    dev.read_at(&mut b, g.data_off + v.extent_start * g.extent_size)
        .unwrap();
    b.to_vec()
}

#[test]
fn wipe_after_delete_zeroes_a_deleted_volume_before_its_extents_are_free() {
    let pattern = |dev: &MemDev, d: &Domain, v: &Volume| {
        let g = d.geometry();
        let b = crate::io::AlignedBuf::from_slice(&vec![0xa5; 1 << 20], 1 << 20);
        dev.write_at(&b, g.data_off + v.extent_start * g.extent_size)
            .unwrap();
    };
    // Per domain: every delete wipes.
    let p = FormatParams {
        wipe_after_delete: true,
        ..params()
    };
    let dev = mem_domain(64 << 20, &p);
    let d = Domain::open(
        dev.clone(),
        Arc::new(MemLockService::new()),
        OpenOptions::new(host(1)),
    )
    .unwrap();
    assert_ne!(
        d.geometry().compat & crate::layout::COMPAT_WIPE_AFTER_DELETE,
        0
    );
    let (v, g) = d.create_volume(raw(2 << 20)).unwrap();
    pattern(&dev, &d, &v);
    d.delete_volume(&v.id, &[&g]).unwrap();
    assert!(run_bytes(&dev, &d, &v).iter().all(|&b| b == 0));
    assert_clean(dev.as_ref());
    // Without it the bytes stay, unless the transaction asks.
    let (dev, _l, d) = setup();
    let (a, ag) = d.create_volume(raw(1 << 20)).unwrap();
    let (b, bg) = d.create_volume(raw(1 << 20)).unwrap();
    pattern(&dev, &d, &a);
    pattern(&dev, &d, &b);
    d.delete_volume(&a.id, &[&ag]).unwrap();
    assert!(run_bytes(&dev, &d, &a).iter().all(|&x| x == 0xa5));
    d.tx("delete, wiped")
        .delete_volume(b.id)
        .wipe_deleted(true)
        .held(&[&bg])
        .commit()
        .unwrap();
    assert!(run_bytes(&dev, &d, &b).iter().all(|&x| x == 0));
    assert_clean(dev.as_ref());
}
