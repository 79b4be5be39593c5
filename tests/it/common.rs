//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_domain::io::BlockDev;
use cairn_domain::*;

pub fn params() -> FormatParams {
    FormatParams {
        name: "it".into(),
        host_slots: Some(3),
        volume_slots: Some(32),
        tag_slots: Some(32),
        journal_size: Some(64 * 1024),
        user_data_size: Some(4096),
        extent_size: None,
    }
}

pub fn host(n: u8) -> HostIdentity {
    HostIdentity {
        id: uuid::Uuid::from_bytes([n; 16]),
        name: format!("host{n}"),
    }
}

pub fn opts(n: u8) -> OpenOptions {
    let mut o = OpenOptions::new(host(n));
    o.lock_timeout = Duration::from_secs(5);
    o.clock = Arc::new(FixedClock(1_700_000_000));
    o
}

pub fn raw(mib: u64) -> VolumeSpec {
    VolumeSpec {
        format: Format::Raw,
        capacity: mib << 20,
        size: mib << 20,
        allocation: Allocation::Sparse,
        parent: None,
        legality: Legality::Legal,
        description: "volume".into(),
    }
}

pub fn tag_on(v: VolumeId) -> TagMeta {
    TagMeta {
        volume: VolumeRef::Existing(v),
        size: 1 << 20,
        mutable: true,
        strategy: Strategy::Chain,
        options: vec![("k".into(), "v".into())],
        tag_type: TagType::Strong,
        state: TagState::Optimized,
    }
}

pub fn assert_clean(dev: &dyn BlockDev) {
    let r = cairn_domain::check::check(dev).expect("check runs");
    assert!(r.is_clean(), "check found: {:#?}", r.findings);
}

/// The `cairn` binary, built if missing.
pub fn cairn_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    built_bin(&BUILT, "cairn-cli", "cairn")
}

/// The `cairn-agent` binary, built if missing.
pub fn agent_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    built_bin(&BUILT, "cairn-agent", "cairn-agent")
}

pub fn built_bin(once: &'static std::sync::Once, package: &str, name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    once.call_once(|| {
        let st = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", package])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(st.success(), "building {package} failed");
    });
    target.join("debug").join(name)
}
