//! Small constructors for tests, benches and the test kit: a numbered
//! host, a formatted in-memory domain, the offline check as an assertion.
//! Nothing here is used by the engine itself.

use std::sync::Arc;

use crate::engine::{format, FixedClock, HostIdentity};
use crate::geometry::FormatParams;
use crate::io::{BlockDev, MemDev};
use crate::lock::MemLockService;

/// Host `n`: its id is `n` in every byte, its name `host{n}`.
pub fn host(n: u8) -> HostIdentity {
    HostIdentity {
        id: uuid::Uuid::from_bytes([n; 16]),
        name: format!("host{n}"),
    }
}

/// An in-memory device of `bytes`, formatted with `params` (at time 1,
/// under a lock service of its own).
pub fn mem_domain(bytes: u64, params: &FormatParams) -> Arc<MemDev> {
    let dev = Arc::new(MemDev::new(bytes));
    let locks = MemLockService::new();
    format(dev.as_ref(), params, false, &locks, &FixedClock(1)).expect("format");
    dev
}

/// Panic with the findings unless the offline check finds `dev` clean.
pub fn assert_clean(dev: &dyn BlockDev) {
    let r = crate::check::check(dev).expect("the check runs");
    assert!(r.is_clean(), "check found: {:#?}", r.findings);
}
