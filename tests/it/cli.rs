//! The `cairn domain` commands as an administrator runs them.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use cairn_domain::io::{CrashKeep, MemDev, SimDev};
use cairn_domain::*;

use cairn_tests::agent::run;
use cairn_tests::bins::*;
use cairn_tests::domain::*;

fn cairn(locks: &Path, args: &[&str]) -> Output {
    Command::new(cairn_bin())
        .env("CAIRN_LOCK_DIR", locks)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn format_refuses_bad_targets_and_formats_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let locks = dir.path().join("locks");
    let img = dir.path().join("d.img");
    let p = img.to_str().unwrap();
    // Missing file without --size.
    let o = cairn(&locks, &["domain", "format", p, "--name", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("does not exist"), "{}", text(&o));
    // Too small.
    let o = cairn(
        &locks,
        &["domain", "format", p, "--name", "x", "--size", "4M"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("too small"), "{}", text(&o));
    // A directory is not a device.
    let o = cairn(
        &locks,
        &[
            "domain",
            "format",
            dir.path().to_str().unwrap(),
            "--name",
            "x",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("cannot open"), "{}", text(&o));
    // Bad parameters name the field.
    let o = cairn(
        &locks,
        &[
            "domain",
            "format",
            p,
            "--name",
            "x",
            "--size",
            "1G",
            "--extent-size",
            "3M",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("extent_size"), "{}", text(&o));
    // A good one.
    let o = cairn(
        &locks,
        &[
            "domain", "format", p, "--name", "demo", "--size", "1G", "--json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(g["name"], "demo");
    // A file it makes is its owner's only; formatting a device everyone may
    // read is not refused, but warned about.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&img).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!text(&o).contains("warning"), "{}", text(&o));
    let open = dir.path().join("open.img");
    std::fs::File::create(&open)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = cairn(
        &locks,
        &["domain", "format", open.to_str().unwrap(), "--name", "open"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("readable by every user"), "{}", text(&o));
    // Formatted to wipe after delete: the compatible feature bit is set.
    let o = cairn(
        &locks,
        &[
            "domain",
            "format",
            open.to_str().unwrap(),
            "--name",
            "wiping",
            "--wipe-after-delete",
            "--force",
            "--json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(g["compat"], cairn_domain::layout::COMPAT_WIPE_AFTER_DELETE);
    let o = cairn(&locks, &["domain", "info", open.to_str().unwrap()]);
    assert!(
        text(&o).contains("zeroed before it is freed"),
        "{}",
        text(&o)
    );
    // Already a domain.
    let o = cairn(&locks, &["domain", "format", p, "--name", "again"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    // --force is refused while a host has it open.
    let dev = Arc::new(cairn_domain::io::FileDev::open(&img, true).unwrap());
    let d = Domain::open(
        dev,
        Arc::new(LocalLockService::new(&locks).unwrap()),
        opts(1),
    )
    .unwrap();
    let o = cairn(
        &locks,
        &["domain", "format", p, "--name", "again", "--force"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("in use"), "{}", text(&o));
    d.close().unwrap();
    let o = cairn(
        &locks,
        &["domain", "format", p, "--name", "again", "--force"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = cairn(&locks, &["domain", "info", p, "--json"]);
    let i: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(i["geometry"]["name"], "again");
}

#[test]
fn check_exit_codes_and_recover_an_open_intent() {
    let dir = tempfile::tempdir().unwrap();
    let locks = dir.path().join("locks");
    // Build a domain whose host died between applying an intent and
    // committing it.
    let mem = mem_domain(24 << 20, &params());
    let base = mem.image();
    let probe = SimDev::new(base.clone(), None);
    let d = Domain::open(probe.clone(), Arc::new(MemLockService::new()), opts(1)).unwrap();
    let start = probe.events();
    d.create_volume(raw(1)).unwrap();
    let end = probe.events();
    drop(d);
    // Crash right before the commit record (the last event).
    let sim = SimDev::new(base, Some(end - 1));
    let d = Domain::open(sim.clone(), Arc::new(MemLockService::new()), opts(1)).unwrap();
    assert!(d.create_volume(raw(1)).is_err());
    assert!(end - 1 > start);
    drop(d);
    let img = dir.path().join("crashed.img");
    std::fs::write(&img, sim.crash_image(CrashKeep::None)).unwrap();
    let p = img.to_str().unwrap();

    let o = cairn(&locks, &["domain", "check", p]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("journal.open_intent"), "{}", text(&o));
    let o = cairn(&locks, &["domain", "check", p, "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["open_intents"], 1);

    let o = cairn(&locks, &["domain", "dump", p]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("[OPEN]"), "{}", text(&o));

    let o = cairn(&locks, &["domain", "recover", p, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        r["recovered"][0]["forward"].as_array().unwrap().len(),
        1,
        "{r}"
    );

    let o = cairn(&locks, &["domain", "check", p]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("1 volumes"), "{}", text(&o));

    // Damage: exit 1 with the location.
    let g =
        cairn_domain::engine::read_superblocks(&MemDev::from_image(std::fs::read(&img).unwrap()))
            .unwrap()
            .0;
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[(g.volume_off(0) + 40) as usize] ^= 4;
    std::fs::write(&img, &bytes).unwrap();
    let o = cairn(&locks, &["domain", "check", p]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("{:#x}", g.volume_off(0))),
        "{}",
        text(&o)
    );

    // Not a domain at all: exit 2.
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let o = cairn(&locks, &["domain", "check", junk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a usable domain"), "{}", text(&o));

    // Recovering a slot a live host holds is refused.
    let live = dir.path().join("live.img");
    let o = cairn(
        &locks,
        &[
            "domain",
            "format",
            live.to_str().unwrap(),
            "--name",
            "l",
            "--size",
            "64M",
            "--volume-slots",
            "16",
            "--tag-slots",
            "16",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let dev = Arc::new(cairn_domain::io::FileDev::open(&live, true).unwrap());
    let d = Domain::open(
        dev,
        Arc::new(LocalLockService::new(&locks).unwrap()),
        opts(1),
    )
    .unwrap();
    let slot = d.slot().unwrap().to_string();
    let o = cairn(
        &locks,
        &[
            "domain",
            "recover",
            live.to_str().unwrap(),
            "--host-slot",
            &slot,
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("live host"), "{}", text(&o));
    d.close().unwrap();
}

#[test]
fn completions_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    let o = cairn(dir.path(), &["completions", "bash"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("cairn"));
}

/// The README's first session, extracted from the README itself and run
/// against `cairn up` (with its paths moved into a temporary directory).
#[test]
fn root_qemu_cairn_up_runs_the_readme_first_session() {
    use std::io::BufRead;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let block = readme
        .split("<!-- first-session: begin -->")
        .nth(1)
        .and_then(|s| s.split("<!-- first-session: end -->").next())
        .expect("README has a first-session block");
    let script: String = block
        .lines()
        .filter(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let bin = cairn_bin();
    // cairn-agent is not needed: `cairn up` runs the agent in process.
    let env = [
        ("CAIRN_SOCKET", dir.path().join("agent.sock")),
        ("CAIRN_COORDINATOR", dir.path().join("coordinator.sock")),
        ("CAIRN_LOCK_DIR", dir.path().join("locks")),
        ("CAIRN_DATA_DIR", dir.path().join("data")),
    ];
    let start = || {
        let mut c = Command::new(&bin);
        c.args([
            "up",
            "--size",
            "4G",
            "--metrics",
            "127.0.0.1:0",
            "--run-dir",
        ])
        .arg(dir.path().join("run"))
        .envs(env.iter().cloned())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.starts_with("Cairn is up"), "{first:?}");
        (child, first)
    };
    let stop = |mut child: std::process::Child| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(
            child.wait().unwrap().success(),
            "cairn up did not exit cleanly"
        );
    };
    let (child, first) = start();
    assert!(first.contains("formatted now"), "{first}");
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .envs(env.iter().cloned())
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the README session failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("backing file format: raw"), "{stdout}");
    assert!(stdout.contains("No errors were found"), "{stdout}");
    assert!(stdout.contains("(delete-snapshot): succeeded"), "{stdout}");
    assert!(
        stdout.contains("  copy  "),
        "the full clone is listed: {stdout}"
    );
    // The agent's own jobs behind the clone and the merge: all ended.
    let jobs = |extra: &[&str]| {
        let out = Command::new(&bin)
            .args(["--json", "agent-job", "list"])
            .args(extra)
            .envs(env.iter().cloned())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    };
    let all = jobs(&[]);
    assert!(all.len() >= 2, "{all:?}");
    assert!(all.iter().all(|j| j["state"] == "succeeded"), "{all:?}");
    assert_eq!(jobs(&["--running"]), Vec::<serde_json::Value>::new());
    stop(child);
    // VM data is its owner's only: the domain file, the data and io dirs.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("data/domain.img"), 0o600);
    assert_eq!(mode("data"), 0o700);
    assert_eq!(mode("data/io"), 0o700);
    // A second start reuses the domain, which is clean.
    let (child, first) = start();
    assert!(first.contains("reused"), "{first}");
    stop(child);
    run(Command::new(&bin)
        .args(["domain", "check"])
        .arg(dir.path().join("data/domain.img"))
        .envs(env.iter().cloned()));
}

/// Format, check and use a domain on a real block device (a loop device
/// over a file), the way a LUN is used.
#[test]
fn root_format_and_check_a_block_device() {
    use cairn_agent::loopdev::{KernelLoop, LoopControl};
    let dir = tempfile::tempdir().unwrap();
    let locks = dir.path().join("locks");
    let backing = dir.path().join("lun.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let lo = KernelLoop
        .attach(&backing, 0, 512 << 20, "cairn:test")
        .unwrap();
    struct Detach(u32);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = KernelLoop.detach(self.0);
        }
    }
    let _d = Detach(lo.index);
    let dev = lo.device();
    let p = dev.to_str().unwrap();
    let o = cairn(&locks, &["domain", "format", p, "--name", "lun"]);
    assert!(o.status.success(), "{}", text(&o));
    // It is a block device: --size makes no sense, and a second format
    // needs --force.
    let o = cairn(&locks, &["domain", "format", p, "--name", "again"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("already"), "{}", text(&o));
    let o = cairn(&locks, &["domain", "check", p]);
    assert!(o.status.success(), "{}", text(&o));
    let o = cairn(&locks, &["--json", "domain", "info", p]);
    assert!(o.status.success(), "{}", text(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["geometry"]["name"], "lun", "{info}");
    // The engine works on it through the block device's own I/O path.
    let d = Domain::open(
        Arc::new(cairn_domain::io::FileDev::open(&dev, true).unwrap()),
        Arc::new(LocalLockService::new(&locks).unwrap()),
        opts(1),
    )
    .unwrap();
    let (v, g) = d.create_volume(raw(4)).unwrap();
    d.delete_volume(&v.id, &[&g]).unwrap();
    drop(g);
    d.close().unwrap();
    let o = cairn(&locks, &["domain", "check", p]);
    assert!(o.status.success(), "{}", text(&o));
}

/// Regression: the signal handler was installed only after the ready line,
/// so a SIGTERM right after it killed `cairn up` (and `cairn-agent`)
/// instead of stopping it cleanly.
#[test]
fn sigterm_right_after_ready_stops_cleanly() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("d.img");
    cairn_tests::domain::make_domain(&dom, 1);
    for i in 0..5 {
        for agent in [false, true] {
            let mut c = if agent {
                let mut c = Command::new(agent_bin());
                c.arg("--domain")
                    .arg(&dom)
                    .arg("--run-dir")
                    .arg(dir.path().join("run"));
                c
            } else {
                let mut c = Command::new(cairn_bin());
                c.args([
                    "up",
                    "--size",
                    "1G",
                    "--metrics",
                    "127.0.0.1:0",
                    "--run-dir",
                ])
                .arg(dir.path().join("run"))
                .env("CAIRN_DATA_DIR", dir.path().join("data"));
                c
            };
            c.arg("--socket")
                .arg(dir.path().join("s.sock"))
                .env("CAIRN_SOCKET", dir.path().join("s.sock"))
                .env("CAIRN_COORDINATOR", dir.path().join("c.sock"))
                .env("CAIRN_LOCK_DIR", dir.path().join("locks"))
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::piped());
            let mut child = c.spawn().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert!(!line.is_empty(), "round {i}: no ready line");
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let st = child.wait().unwrap();
            assert!(st.success(), "round {i} (agent: {agent}): {st}");
        }
    }
}
