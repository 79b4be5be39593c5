//! Two processes, each with its own host slot, working on one domain file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use cairn_domain::io::FileDev;
use cairn_domain::*;

use cairn_tests::domain::*;

fn format_file(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let dev = FileDev::open(path, true).unwrap();
    let p = FormatParams {
        name: "shared".into(),
        volume_slots: Some(2048),
        tag_slots: Some(2048),
        ..Default::default()
    };
    format(&dev, &p, false, &MemLockService::new(), &SystemClock).unwrap();
}

fn worker(path: &Path, locks: &Path, secs: u64, seed: u64, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cairn-torture"))
        .arg(path)
        .arg(locks)
        .arg(secs.to_string())
        .arg(seed.to_string())
        .arg(log)
        .spawn()
        .unwrap()
}

#[derive(Default, Debug)]
struct Expect {
    live: HashMap<String, String>, // tag -> volume
    user_data: HashMap<String, usize>,
    size: HashMap<String, u64>,
    ops: usize,
}

fn replay(log: &Path, e: &mut Expect) {
    for line in std::fs::read_to_string(log).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let tag = v["tag"].as_str().unwrap().to_string();
        match v["op"].as_str().unwrap() {
            "create" => {
                e.live.insert(tag, v["vol"].as_str().unwrap().into());
            }
            "delete" => {
                e.live.remove(&tag);
            }
            "ud" => {
                e.user_data.insert(tag, v["len"].as_u64().unwrap() as usize);
            }
            "change" => {
                e.size.insert(tag, v["size"].as_u64().unwrap());
            }
            o => panic!("unknown op {o}"),
        }
        e.ops += 1;
    }
}

/// Compare the domain with what the workers reported; returns how many
/// reported facts are missing or different.
fn verify(path: &Path, locks: &Path, e: &Expect) -> usize {
    let dev = Arc::new(FileDev::open(path, true).unwrap());
    // Opening read-write also recovers any dead host's journal.
    let d = Domain::open(
        dev.clone(),
        Arc::new(LocalLockService::new(locks).unwrap()),
        opts(9),
    )
    .unwrap();
    let tags = d.list_tags().unwrap();
    let mut wrong = tags.len().abs_diff(e.live.len());
    for (t, v) in &e.live {
        let Ok(tag) = d.read_tag(&t.parse().unwrap()) else {
            wrong += 1;
            continue;
        };
        wrong += usize::from(tag.volume.to_string() != *v);
        if let Some(len) = e.user_data.get(t) {
            wrong += usize::from(d.read_user_data(&tag.id).unwrap()["item"].len() != *len);
        }
        if let Some(size) = e.size.get(t) {
            wrong += usize::from(tag.size != *size);
        }
    }
    d.close().unwrap();
    assert_clean(&FileDev::open(path, false).unwrap());
    wrong
}

/// A formatted domain file for two workers: its directory, the file, their
/// lock directory and their two logs.
fn shared_domain() -> (tempfile::TempDir, PathBuf, PathBuf, [PathBuf; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("domain.img");
    let locks = dir.path().join("locks");
    format_file(&path);
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    (dir, path, locks, logs)
}

#[test]
fn two_processes_share_one_domain() {
    let (_dir, path, locks, logs) = shared_domain();
    let mut a = worker(&path, &locks, 4, 11, &logs[0]);
    let mut b = worker(&path, &locks, 4, 22, &logs[1]);
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let mut e = Expect::default();
    replay(&logs[0], &mut e);
    replay(&logs[1], &mut e);
    println!("{} operations reported successful", e.ops);
    assert!(e.ops > 100, "too few operations ({})", e.ops);
    assert_eq!(verify(&path, &locks, &e), 0);
}

#[test]
fn a_killed_process_is_recovered_by_the_other() {
    let (_dir, path, locks, logs) = shared_domain();
    let mut a = worker(&path, &locks, 30, 33, &logs[0]);
    let mut b = worker(&path, &locks, 5, 44, &logs[1]);
    std::thread::sleep(Duration::from_millis(1500));
    a.kill().unwrap();
    a.wait().unwrap();
    assert!(b.wait().unwrap().success(), "the survivor failed");
    let mut e = Expect::default();
    replay(&logs[0], &mut e);
    let killed_ops = e.ops;
    replay(&logs[1], &mut e);
    println!(
        "killed worker reported {killed_ops} operations, survivor {}",
        e.ops - killed_ops
    );
    assert!(killed_ops > 10);
    // The killed worker's last operation did not report success and may or
    // may not have landed: at most that one fact may differ.
    let wrong = verify(&path, &locks, &e);
    assert!(wrong <= 2, "{wrong} reported facts missing or different");
}
