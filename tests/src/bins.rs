//! The workspace's binaries, built on first use: debug ones for the
//! tests, release ones for the benchmarks.

use std::path::PathBuf;

/// Which build of a binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `cargo build` (tests).
    Debug,
    /// `cargo build --release` (benchmarks).
    Release,
}

/// Binary `name` of `package` in `profile`, built (once per process and
/// profile) if missing or stale.
pub fn built_bin(package: &str, name: &str, profile: Profile) -> PathBuf {
    static DEBUG: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    static RELEASE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let (built, dir) = match profile {
        Profile::Debug => (&DEBUG, "debug"),
        Profile::Release => (&RELEASE, "release"),
    };
    let mut done = built.lock().expect("poisoned");
    if !done.iter().any(|p| p == package) {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", package])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile == Profile::Release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building {package} failed");
        done.push(package.to_string());
    }
    target.join(dir).join(name)
}

/// The `cairn` binary.
pub fn cairn_bin() -> PathBuf {
    built_bin("cairn-cli", "cairn", Profile::Debug)
}

/// The `cairn-agent` binary.
pub fn agent_bin() -> PathBuf {
    built_bin("cairn-agent", "cairn-agent", Profile::Debug)
}

/// The `cairn-coordinator` binary.
pub fn coordinator_bin() -> PathBuf {
    built_bin("cairn-coordinator", "cairn-coordinator", Profile::Debug)
}

/// Start a server process that announces itself with one JSON line on
/// standard output once clients can connect; its log level comes from
/// `log_var` (default `warn`). Returns the process and that line.
pub fn spawn_ready(
    cmd: &mut std::process::Command,
    log_var: &str,
) -> (std::process::Child, serde_json::Value) {
    use std::io::{BufRead, BufReader};
    // A level the caller set on the command wins.
    if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
        cmd.env(
            "RUST_LOG",
            std::env::var(log_var).unwrap_or_else(|_| "warn".into()),
        );
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("reading the ready line");
    assert!(!line.is_empty(), "{cmd:?} exited before it was ready");
    let ready = serde_json::from_str(&line).expect("a JSON ready line");
    (child, ready)
}
