//! Catalog benchmark: one release agent and coordinator on unix sockets
//! (the quick start's single host), a sparse domain file:
//!
//! - upload of a large file through the API (`cairn file upload`: the CLI
//!   reads and hashes, the coordinator forwards, the agent writes with
//!   direct I/O and hashes), against `dd oflag=direct` of the same file
//!   into a raw disk of the same domain;
//! - at each catalog size (1,000, 10,000 and 100,000 images on one
//!   domain, each with its metafile): image registration p50 and p99
//!   against the baseline of committing a small file through the same
//!   API at the same size, `image list` of every image (and per image),
//!   `image list --since` the last registrations, and `image info`;
//! - disks from a raw and a qcow2 image (p50, p99), against snapshots of
//!   a disk through the same API.
//!
//! `cargo bench -p cairn-tests --bench catalog`. CAIRN_BENCH_UPLOAD_MIB:
//! the upload's size (default 2048; 0 leaves it out); CAIRN_BENCH_SIZES:
//! the catalog sizes (default `1000,10000,100000`); CAIRN_BENCH_N:
//! registrations timed at each size (default 200); CAIRN_BENCH_RUNS:
//! upload runs (default 3); CAIRN_BENCH_FROM_IMAGE_N: disks from each
//! image and snapshots (default 50; 0 leaves them out).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_proto::coordinator as pb;
use cairn_proto::coordinator::coordinator_client::CoordinatorClient;
use cairn_proto::transport::{channel, Target};
use cairn_tests::bins::{built_bin, spawn_ready, Profile};
use cairn_tests::stats::{env_u64, median, ms, pct, Rng};
use cairn_tests::Answer;

#[path = "catalog/from_image.rs"]
mod from_image;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin(package: &str, name: &str) -> PathBuf {
    built_bin(package, name, Profile::Release)
}

fn cairn(coord: &Path, args: &[&str]) -> String {
    let o = Command::new(bin("cairn-cli", "cairn"))
        .env("CAIRN_COORDINATOR", coord)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(o.status.success(), "cairn {args:?} failed");
    String::from_utf8(o.stdout).unwrap()
}

fn make_file(path: &Path, len: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// The device offset of disk `tag`'s volume in `domain`.
fn disk_offset(domain: &Path, tag: &str) -> u64 {
    let dev = cairn_domain::io::FileDev::open(domain, false).unwrap();
    let d = cairn_domain::check::dump(&dev).unwrap();
    let t = d
        .tags
        .iter()
        .find(|t| t.tag.id.to_string() == tag)
        .expect("the disk's tag");
    let v = d.volumes.iter().find(|v| v.id == t.tag.volume).unwrap();
    d.geometry.extent_off(v.extent_start)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib = env_u64("CAIRN_BENCH_UPLOAD_MIB", 2048);
    let n = env_u64("CAIRN_BENCH_N", 200) as usize;
    let runs = env_u64("CAIRN_BENCH_RUNS", 3) as usize;
    let sizes: Vec<usize> = std::env::var("CAIRN_BENCH_SIZES")
        .unwrap_or("1000,10000,100000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("CAIRN_BENCH_SIZES: numbers"))
        .collect();
    let most = sizes.iter().copied().max().unwrap_or(0);
    // An image is two tags: its file and its metafile.
    let tag_slots = (2 * most + 4 * n + 1024).max(65536).to_string();
    let tmp = tempfile::tempdir_in(std::env::var("CAIRN_BENCH_DIR").unwrap_or("/var/tmp".into()))
        .unwrap();
    let dir = tmp.path();
    let domain = dir.join("domain.img");
    let st = Command::new(bin("cairn-cli", "cairn"))
        .args([
            "domain",
            "format",
            "--name",
            "bench",
            "--size",
            "64G",
            "--tag-slots",
            &tag_slots,
            "--lock-dir",
        ])
        .arg(dir.join("locks"))
        .arg(&domain)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::create_dir_all(dir.join("io")).unwrap();
    let agent_sock = dir.join("agent.sock");
    let (agent, _) = spawn_ready(
        Command::new(bin("cairn-agent", "cairn-agent"))
            .arg("--domain")
            .arg(&domain)
            .arg("--socket")
            .arg(&agent_sock)
            .arg("--io-dir")
            .arg(dir.join("io"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--lock-dir")
            .arg(dir.join("locks"))
            .args(["--metrics", "127.0.0.1:0"]),
        "CAIRN_BENCH_LOG",
    );
    let _agent = Proc(agent);
    let coord_sock = dir.join("coordinator.sock");
    let (coord, _) = spawn_ready(
        Command::new(bin("cairn-coordinator", "cairn-coordinator"))
            .arg("--socket")
            .arg(&coord_sock)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--agent")
            .arg(&agent_sock),
        "CAIRN_BENCH_LOG",
    );
    let _coord = Proc(coord);

    if mib > 0 {
        upload_against_dd(&coord_sock, &domain, dir, mib, runs);
    }
    let fi = env_u64("CAIRN_BENCH_FROM_IMAGE_N", 50) as usize;
    if fi > 0 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut c = rt.block_on(async {
            let ch = channel(&Target::Unix(coord_sock.clone())).await.unwrap();
            CoordinatorClient::new(ch)
        });
        from_image::against_snapshot(&mut c, &rt, dir, fi);
    }
    scale(&coord_sock, &sizes, n);
}

/// `cairn file upload` of a `mib` MiB file against dd into a raw disk.
fn upload_against_dd(coord_sock: &Path, domain: &Path, dir: &Path, mib: u64, runs: usize) {
    let (coord_sock, domain) = (&coord_sock.to_path_buf(), &domain.to_path_buf());
    // ---- upload through the API against dd ------------------------------------------------
    let src = dir.join("big.raw");
    make_file(&src, mib << 20, 11);
    let (mut api, mut dd) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let loc = format!("bench:big-{run}.raw");
        let t = Instant::now();
        cairn(coord_sock, &["file", "upload", src.to_str().unwrap(), &loc]);
        api.push(t.elapsed().as_secs_f64());
        cairn(coord_sock, &["file", "delete", &loc]);
        let size = format!("{mib}M");
        let disk = cairn(coord_sock, &["disk", "create", "--size", &size, "-q"]);
        let disk = disk.trim();
        let off = disk_offset(domain, disk);
        let t = Instant::now();
        let st = Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", domain.display()))
            .args(["bs=4M", "oflag=direct,seek_bytes", "conv=notrunc,fsync"])
            .arg("status=none")
            .arg(format!("seek={off}"))
            .status()
            .unwrap();
        assert!(st.success());
        dd.push(t.elapsed().as_secs_f64());
        cairn(coord_sock, &["disk", "delete", disk]);
    }
    std::fs::remove_file(&src).unwrap();
    let mbps = |s: f64| ((mib << 20) as f64 / s) / 1e6;
    let (api, dd) = (median(api), median(dd));
    println!("upload of {mib} MiB (random bytes), median of {runs}");
    println!(
        "{:<44} {api:>7.2} s {:>6.0} MB/s",
        "cairn file upload (SHA-256 in CLI and agent)",
        mbps(api)
    );
    println!(
        "{:<44} {dd:>7.2} s {:>6.0} MB/s",
        "baseline: dd oflag=direct into a raw disk",
        mbps(dd)
    );
    println!("upload throughput / dd: x{:.2}", dd / api);
}

type Client = CoordinatorClient<tonic::transport::Channel>;

fn upload_req(
    loc: String,
    body: Vec<u8>,
) -> impl tokio_stream::Stream<Item = pb::UploadFileRequest> {
    let header = pb::UploadHeader {
        request_id: String::new(),
        location: loc,
        size: body.len() as u64,
        ..Default::default()
    };
    tokio_stream::iter([pb::UploadFileRequest {
        header: Some(header),
        data: body,
    }])
}

fn register_req(i: usize) -> pb::RegisterImageRequest {
    pb::RegisterImageRequest {
        name: format!("image {i}"),
        location: format!("bench:images/img-{i:06}.raw"),
        properties: [("OS".to_string(), "Linux".to_string())].into(),
        ..Default::default()
    }
}

/// A 512-byte body of its own for image `i`.
fn body(i: usize) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b
}

/// Upload and register images `from..to` with `k` clients at once (a
/// registration that lost its generation to another is tried again).
async fn grow(c: &Client, from: usize, to: usize, k: usize) {
    let mut tasks = Vec::new();
    for t in 0..k {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = from + t;
            while i < to {
                c.upload_file(upload_req(format!("bench:images/img-{i:06}.raw"), body(i)))
                    .await
                    .answer();
                loop {
                    match c.register_image(register_req(i)).await {
                        Ok(_) => break,
                        Err(s) if s.code() == tonic::Code::Aborted => continue,
                        Err(s) => panic!("register {i}: {s}"),
                    }
                }
                i += k;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The bench's domain's generation, from an answer's `generations`.
fn generation(r: &pb::ListImagesResponse) -> u64 {
    r.generations.first().map(|g| g.generation).unwrap_or(0)
}

/// Registration, listing and lookup at each catalog size.
fn scale(coord_sock: &Path, sizes: &[usize], n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = channel(&Target::Unix(coord_sock.to_path_buf()))
            .await
            .unwrap();
        let mut c = CoordinatorClient::new(ch).max_decoding_message_size(usize::MAX);
        let mut have = 0;
        let mut rng = Rng::new(7);
        println!(
            "\n{:<8} {:<40} {:>11} {:>11}",
            "images", "catalog operation (one client)", "p50", "p99"
        );
        let mut firsts = Vec::new();
        for &size in sizes {
            let start = size.saturating_sub(n).max(have);
            let t = Instant::now();
            grow(&c, have, start, 4).await;
            let grown = t.elapsed();
            let before = c
                .list_images(pb::ListImagesRequest::default())
                .await
                .answer();
            let (mut reg, mut small) = (Vec::new(), Vec::new());
            for i in start..size {
                let t = Instant::now();
                c.upload_file(upload_req(format!("bench:images/img-{i:06}.raw"), body(i)))
                    .await
                    .answer();
                small.push(t.elapsed());
                let t = Instant::now();
                c.register_image(register_req(i)).await.answer();
                reg.push(t.elapsed());
            }
            have = size;
            let (mut list, mut since, mut info) = (Vec::new(), Vec::new(), Vec::new());
            let mut listed = 0;
            for _ in 0..3 {
                let t = Instant::now();
                let r = c
                    .list_images(pb::ListImagesRequest::default())
                    .await
                    .answer();
                list.push(t.elapsed());
                listed = r.images.len();
                let t = Instant::now();
                let r = c
                    .list_images(pb::ListImagesRequest {
                        since: [("bench".to_string(), generation(&before))].into(),
                        ..Default::default()
                    })
                    .await
                    .answer();
                since.push(t.elapsed());
                assert!(r.generations[0].changes, "changes since, not everything");
                assert_eq!(r.images.len(), size - start);
            }
            assert_eq!(listed, size);
            let all = c
                .list_images(pb::ListImagesRequest::default())
                .await
                .answer()
                .images;
            for _ in 0..50 {
                let id = all[rng.below(all.len() as u64) as usize].id.clone();
                let t = Instant::now();
                let got = c
                    .get_image(pb::GetImageRequest { image_id: id.clone() })
                    .await
                    .answer();
                info.push(t.elapsed());
                assert_eq!(got.id, id);
            }
            let line = |label: &str, v: &mut Vec<Duration>| {
                println!("{size:<8} {label:<40} {} {}", ms(pct(v, 0.5)), ms(pct(v, 0.99)));
            };
            line("register image with its metafile", &mut reg);
            line("baseline: upload a 512-byte file", &mut small);
            line("image list (every image)", &mut list);
            line(&format!("image list --since ({} changed)", size - start), &mut since);
            line("image info ID", &mut info);
            let per = pct(&mut list, 0.5).as_secs_f64() * 1e6 / size as f64;
            println!(
                "{size:<8} register p50 / small upload p50: x{:.2}; list {per:.1} µs per image; grown in {:.0} s",
                pct(&mut reg, 0.5).as_secs_f64() / pct(&mut small, 0.5).as_secs_f64(),
                grown.as_secs_f64()
            );
            firsts.push((size, pct(&mut reg, 0.5), per, pct(&mut info, 0.5)));
        }
        if let (Some(a), Some(b)) = (firsts.iter().rev().nth(1), firsts.last()) {
            println!(
                "{} against {} images: register p50 x{:.2}, list per image x{:.2}, info p50 x{:.2}",
                b.0,
                a.0,
                b.1.as_secs_f64() / a.1.as_secs_f64(),
                b.2 / a.2,
                b.3.as_secs_f64() / a.3.as_secs_f64()
            );
        }
    });
}
