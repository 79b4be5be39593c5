//! Disks from images against plain snapshots, in the catalog bench's
//! setting (one agent and coordinator on unix sockets): each timed call
//! is one CreateDisk (or SnapshotDisk) through the coordinator's API,
//! which returns once the disk is made.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_proto::coordinator as pb;
use cairn_tests::stats::{ms, pct};
use cairn_tests::Answer;

use super::{cairn, make_file, Client};

async fn from_image(c: &mut Client, image: &str, rid: String) -> Duration {
    let t = Instant::now();
    let j = c
        .create_disk(pb::CreateDiskRequest {
            request_id: rid,
            domain: "bench".into(),
            from_image: image.into(),
            ..Default::default()
        })
        .await
        .answer();
    let took = t.elapsed();
    assert_eq!(j.state, pb::JobState::Succeeded as i32, "{j:?}");
    took
}

/// `n` disks from a raw image (a thin layer on its file), the first disk
/// from a qcow2 image (its conversion into the cache) and `n` more (thin
/// on the cache), against `n` snapshots of a qcow2 disk.
pub fn against_snapshot(c: &mut Client, rt: &tokio::runtime::Runtime, dir: &Path, n: usize) {
    let coord = dir.join("coordinator.sock");
    make_file(&dir.join("base.raw"), 256 << 20, 3);
    let q = dir.join("base.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(dir.join("base.raw"))
        .arg(&q)
        .status()
        .unwrap();
    assert!(st.success());
    for (f, alias, fmt) in [
        ("base.raw", "fi-raw", "raw"),
        ("base.qcow2", "fi-qcow2", "qcow2"),
    ] {
        let loc = format!("bench:from-image/{f}");
        cairn(
            &coord,
            &["file", "upload", dir.join(f).to_str().unwrap(), &loc],
        );
        cairn(
            &coord,
            &[
                "image",
                "register",
                alias,
                &loc,
                "--alias",
                alias,
                "--disk-format",
                fmt,
                "--no-metafile-upload",
            ],
        );
    }
    rt.block_on(async {
        let mut raw = Vec::new();
        for i in 0..n {
            raw.push(from_image(c, "fi-raw", format!("fi-raw-{i}")).await);
        }
        let first = from_image(c, "fi-qcow2", "fi-q-first".into()).await;
        let mut cached = Vec::new();
        for i in 0..n {
            cached.push(from_image(c, "fi-qcow2", format!("fi-q-{i}")).await);
        }
        let d = c
            .create_disk(pb::CreateDiskRequest {
                request_id: "fi-snap-disk".into(),
                domain: "bench".into(),
                format: pb::Format::Qcow2 as i32,
                size: 256 << 20,
                ..Default::default()
            })
            .await
            .answer()
            .disk
            .unwrap()
            .id;
        let mut snaps = Vec::new();
        for i in 0..n {
            let t = Instant::now();
            let j = c
                .snapshot_disk(pb::SnapshotDiskRequest {
                    request_id: format!("fi-snap-{i}"),
                    domain: "bench".into(),
                    disk_id: d.clone(),
                    description: String::new(),
                })
                .await
                .answer();
            snaps.push(t.elapsed());
            assert_eq!(j.state, pb::JobState::Succeeded as i32, "{j:?}");
        }
        println!(
            "\n{:<52} {:>11} {:>11}",
            format!("disk from an image (256 MiB, {n} each)"),
            "p50",
            "p99"
        );
        let snap50 = pct(&mut snaps, 0.5);
        let rows: [(&str, &mut Vec<Duration>); 3] = [
            ("from a raw image, thin on its file", &mut raw),
            (
                "from a qcow2 image, thin on the domain's cache",
                &mut cached,
            ),
            ("baseline: snapshot of a qcow2 disk", &mut snaps),
        ];
        let mut p50s = Vec::new();
        for (what, v) in rows {
            let p50 = pct(v, 0.5);
            p50s.push(p50);
            println!("{what:<52} {} {}", ms(p50), ms(pct(v, 0.99)));
        }
        println!(
            "{:<52} {}",
            "the qcow2 image's first disk (conversion)",
            ms(first)
        );
        for (what, p) in [("raw", p50s[0]), ("qcow2 (cached)", p50s[1])] {
            println!(
                "disk from {what} image p50 / snapshot p50: x{:.2}",
                p.as_secs_f64() / snap50.as_secs_f64()
            );
        }
    });
    // The scale runs that follow count only their own images.
    for alias in ["fi-raw", "fi-qcow2"] {
        cairn(&coord, &["image", "unregister", alias]);
    }
}
