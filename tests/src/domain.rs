//! Domains for tests: formatting parameters, hosts, specs, and checks of
//! a domain's state.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_domain::io::FileDev;
use cairn_domain::*;

pub use cairn_domain::testing::{assert_clean, host, mem_domain};

/// Small format parameters: three host slots, 32 volumes and tags.
pub fn params() -> FormatParams {
    FormatParams {
        name: "it".into(),
        host_slots: Some(3),
        volume_slots: Some(32),
        tag_slots: Some(32),
        journal_size: Some(64 * 1024),
        user_data_size: Some(4096),
        extent_size: None,
        wipe_after_delete: false,
    }
}

/// Open options of host `n` on a fixed clock.
pub fn opts(n: u8) -> OpenOptions {
    let mut o = OpenOptions::new(host(n));
    o.lock_timeout = Duration::from_secs(5);
    o.clock = Arc::new(FixedClock(1_700_000_000));
    o
}

/// A raw volume of `mib` MiB.
pub fn raw(mib: u64) -> VolumeSpec {
    VolumeSpec::raw(mib << 20, "volume")
}

/// A strong tag on `v`.
pub fn tag_on(v: VolumeId) -> TagMeta {
    TagMeta::disk(
        VolumeRef::Existing(v),
        1 << 20,
        vec![("k".into(), "v".into())],
    )
}

/// Format a sparse domain file of `gib` GiB.
pub fn make_domain(path: &Path, gib: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(gib << 30)
        .unwrap();
    let dev = FileDev::open(path, true).unwrap();
    let params = FormatParams::small("it", 4, 1024);
    format(&dev, &params, false, &MemLockService::new(), &SystemClock).unwrap();
}

/// Format a sparse domain file of `gib` GiB named `name`.
pub fn make_named_domain(path: &Path, gib: u64, name: &str) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(gib << 30)
        .unwrap();
    let dev = FileDev::open(path, true).unwrap();
    let params = FormatParams::small(name, 8, 1024);
    format(&dev, &params, false, &MemLockService::new(), &SystemClock).unwrap();
}

/// The domain's offline check, through the library.
pub fn domain_clean(path: &Path) {
    let dev = FileDev::open(path, false).unwrap();
    assert_clean(&dev);
}

/// The domain as bytes (all metadata, journals included) and as a dump.
pub fn domain_state(path: &Path) -> (Vec<u8>, String) {
    let dev = cairn_domain::io::FileDev::open(path, false).unwrap();
    let (g, _) = cairn_domain::engine::read_superblocks(&dev).unwrap();
    let mut meta = cairn_domain::io::AlignedBuf::zeroed(g.data_off as usize);
    use cairn_domain::io::BlockDev;
    dev.read_at(&mut meta, 0).unwrap();
    let d = cairn_domain::check::dump(&dev).unwrap();
    (meta.to_vec(), serde_json::to_string(&d).unwrap())
}
