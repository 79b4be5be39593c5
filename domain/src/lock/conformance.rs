//! The conformance suite every [`LockService`] implementation must pass.
//!
//! `make` returns a handle on the shared lock backend; two handles from it
//! must behave like two processes of the cluster.

use super::*;

fn res(domain: uuid::Uuid, i: u32) -> Resource {
    Resource {
        domain,
        kind: ResourceKind::HostSlot(i),
    }
}

/// Run every check.
pub fn run_all(make: &dyn Fn() -> Arc<dyn LockService>) {
    exclusion_and_try(make);
    release_on_drop_and_holder(make);
    tokens_grow(make);
    blocking_wait(make);
    two_handles_exclude(make);
    acquire_all_is_all_or_none(make);
    no_later_lock_held_while_waiting_for_an_earlier(make);
}

/// A held lock cannot be taken again; other resources can.
pub fn exclusion_and_try(make: &dyn Fn() -> Arc<dyn LockService>) {
    let s = make();
    let d = uuid::Uuid::new_v4();
    let g = s.acquire(&res(d, 1), Duration::ZERO).unwrap();
    g.check().unwrap();
    let e = s
        .acquire(&res(d, 1), Duration::from_millis(20))
        .unwrap_err();
    assert!(matches!(e, DomainError::LockTimeout { .. }), "{e}");
    let _g2 = s.acquire(&res(d, 2), Duration::ZERO).unwrap();
    let other = Resource {
        domain: uuid::Uuid::new_v4(),
        kind: ResourceKind::HostSlot(1),
    };
    let _g3 = s.acquire(&other, Duration::ZERO).unwrap();
}

/// A handle that waits for a lock never holds a later one (in lock
/// order) meanwhile, even one its own previous holder left to it: else
/// a handle holding the earlier lock and wanting the later one would
/// wait for it forever.
pub fn no_later_lock_held_while_waiting_for_an_earlier(make: &dyn Fn() -> Arc<dyn LockService>) {
    let (a, b) = (make(), make());
    let d = uuid::Uuid::new_v4();
    let (x, y) = (res(d, 1), res(d, 2));
    let gx = a.acquire(&x, Duration::ZERO).unwrap();
    let gy = b.acquire(&y, Duration::ZERO).unwrap();
    // Another thread of `b` wants both; it queues behind `gy` here.
    let both = std::thread::spawn({
        let (b, x, y) = (b.clone(), x.clone(), y.clone());
        move || b.acquire_all(&[x, y], Duration::from_secs(20))
    });
    std::thread::sleep(Duration::from_millis(300));
    // `y` goes to that thread, which still waits for `x`.
    drop(gy);
    std::thread::sleep(Duration::from_millis(300));
    // The holder of `x` can take `y`.
    let gy = a
        .acquire(&y, Duration::from_secs(5))
        .expect("y is not held by a handle waiting for x");
    drop((gx, gy));
    let got = both.join().expect("no panic").unwrap();
    assert_eq!(got.len(), 2);
}

/// Dropping a guard releases it; `holder` reports the holder's token.
pub fn release_on_drop_and_holder(make: &dyn Fn() -> Arc<dyn LockService>) {
    let s = make();
    let d = uuid::Uuid::new_v4();
    assert_eq!(s.holder(&res(d, 1)).unwrap(), None);
    let g = s.acquire(&res(d, 1), Duration::ZERO).unwrap();
    assert_eq!(s.holder(&res(d, 1)).unwrap(), Some(g.token()));
    drop(g);
    assert_eq!(s.holder(&res(d, 1)).unwrap(), None);
    let _g = s.acquire(&res(d, 1), Duration::ZERO).unwrap();
}

/// Tokens grow across acquisitions of any resource.
pub fn tokens_grow(make: &dyn Fn() -> Arc<dyn LockService>) {
    let s = make();
    let d = uuid::Uuid::new_v4();
    let mut last = 0;
    for i in 0..20 {
        let g = s.acquire(&res(d, i % 3), Duration::ZERO).unwrap();
        assert!(g.token() > last, "token {} after {last}", g.token());
        last = g.token();
    }
}

/// A waiter gets the lock when the holder lets go. (A waiter of the
/// same process may take the lock over as it is, with the same token:
/// tokens never go back.)
pub fn blocking_wait(make: &dyn Fn() -> Arc<dyn LockService>) {
    let s = make();
    let d = uuid::Uuid::new_v4();
    let g = s.acquire(&res(d, 1), Duration::ZERO).unwrap();
    let first = g.token();
    let s2 = s.clone();
    let t = std::thread::spawn(move || {
        let g = s2.acquire(&res(d, 1), Duration::from_secs(10)).unwrap();
        g.token()
    });
    std::thread::sleep(Duration::from_millis(50));
    drop(g);
    assert!(t.join().unwrap() >= first);
}

/// Several locks are taken together or not at all; holders reads
/// several at once.
pub fn acquire_all_is_all_or_none(make: &dyn Fn() -> Arc<dyn LockService>) {
    let a = make();
    let b = make();
    let d = uuid::Uuid::new_v4();
    let set = [res(d, 1), res(d, 2), res(d, 3)];
    let mut gs = a.acquire_all(&set, Duration::ZERO).unwrap();
    assert_eq!(gs.len(), 3);
    for (g, r) in gs.iter().zip(&set) {
        assert_eq!(g.resource(), r);
        g.check().unwrap();
    }
    let want: Vec<Option<Token>> = gs.iter().map(|g| Some(g.token())).collect();
    assert_eq!(b.holders(&set).unwrap(), want);
    drop(gs.pop());
    // One of b's set is held: b gets none, and keeps none.
    let e = b
        .acquire_all(&[res(d, 2), res(d, 4)], Duration::from_millis(30))
        .unwrap_err();
    assert!(matches!(e, DomainError::LockTimeout { .. }), "{e}");
    assert_eq!(b.holder(&res(d, 4)).unwrap(), None);
    assert_eq!(b.holder(&res(d, 3)).unwrap(), None);
    // The same handle waits for its own holders too.
    assert!(a
        .acquire_all(&[res(d, 1), res(d, 5)], Duration::ZERO)
        .is_err());
    assert_eq!(a.holder(&res(d, 5)).unwrap(), None);
    let last = gs.iter().map(|g| g.token()).max().unwrap();
    drop(gs);
    let gs = b.acquire_all(&set, Duration::from_secs(5)).unwrap();
    assert!(gs.iter().all(|g| g.token() > last));
    assert_eq!(
        a.holders(&set).unwrap(),
        gs.iter().map(|g| Some(g.token())).collect::<Vec<_>>()
    );
    assert_eq!(a.holders(&[]).unwrap(), vec![]);
    // Taking some while reading others.
    drop(gs);
    // Released as far as b can tell, so for everyone.
    assert_eq!(b.holders(&set).unwrap(), vec![None; set.len()]);
    let (gs, seen) = a
        .acquire_all_then_read(&[res(d, 8), res(d, 9)], Duration::ZERO, &set[..2])
        .unwrap();
    assert_eq!(gs.len(), 2);
    assert_eq!(seen, vec![None, None]);
    let held = b.acquire(&res(d, 1), Duration::ZERO).unwrap();
    drop(gs);
    let (gs, seen) = a
        .acquire_all_then_read(&[res(d, 8), res(d, 9)], Duration::ZERO, &set[..2])
        .unwrap();
    assert_eq!(seen, vec![Some(held.token()), None]);
    assert!(gs.iter().all(|g| g.token() > held.token()));
}

/// Two handles on the same backend exclude each other.
pub fn two_handles_exclude(make: &dyn Fn() -> Arc<dyn LockService>) {
    let a = make();
    let b = make();
    let d = uuid::Uuid::new_v4();
    let g = a.acquire(&res(d, 7), Duration::ZERO).unwrap();
    assert!(b.acquire(&res(d, 7), Duration::from_millis(30)).is_err());
    assert_eq!(b.holder(&res(d, 7)).unwrap(), Some(g.token()));
    drop(g);
    let g2 = b.acquire(&res(d, 7), Duration::from_secs(5)).unwrap();
    assert!(a.acquire(&res(d, 7), Duration::ZERO).is_err());
    drop(g2);
}
