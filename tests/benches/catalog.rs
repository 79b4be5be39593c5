//! Catalog benchmark: one release agent and coordinator on unix sockets
//! (the quick start's single host), a sparse domain file:
//!
//! - upload of a large file through the API (`cairn file upload`: the CLI
//!   reads and hashes, the coordinator forwards, the agent writes with
//!   direct I/O and hashes), against `dd oflag=direct` of the same file
//!   into a raw disk of the same domain;
//! - image registration (with its metafile) p50 and p99, against the
//!   baseline of committing a small file through the same API;
//! - `image list` of what was registered.
//!
//! `cargo bench -p cairn-tests --bench catalog`. CAIRN_BENCH_UPLOAD_MIB:
//! the upload's size (default 2048); CAIRN_BENCH_N: registrations
//! (default 200); CAIRN_BENCH_RUNS: upload runs (default 3).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_proto::coordinator as pb;
use cairn_proto::coordinator::coordinator_client::CoordinatorClient;
use cairn_proto::transport::{channel, Target};
use cairn_tests::bins::{built_bin, spawn_ready, Profile};
use cairn_tests::stats::{env_u64, median, ms, pct, Rng};
use cairn_tests::Answer;

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

    // ---- upload through the API against dd ------------------------------------------------
    let src = dir.join("big.raw");
    make_file(&src, mib << 20, 11);
    let (mut api, mut dd) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let loc = format!("bench:big-{run}.raw");
        let t = Instant::now();
        cairn(
            &coord_sock,
            &["file", "upload", src.to_str().unwrap(), &loc],
        );
        api.push(t.elapsed().as_secs_f64());
        cairn(&coord_sock, &["file", "delete", &loc]);
        let size = format!("{mib}M");
        let disk = cairn(&coord_sock, &["disk", "create", "--size", &size, "-q"]);
        let disk = disk.trim();
        let off = disk_offset(&domain, disk);
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
        cairn(&coord_sock, &["disk", "delete", disk]);
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

    // ---- registrations against small-file commits -----------------------------------------
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c =
            CoordinatorClient::new(channel(&Target::Unix(coord_sock.clone())).await.unwrap());
        let upload = |loc: String, body: Vec<u8>| {
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
        };
        let mut small = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            c.upload_file(upload(
                format!("bench:images/img-{i:05}.raw"),
                vec![i as u8; 512],
            ))
            .await
            .answer();
            small.push(t.elapsed());
        }
        let mut reg = Vec::with_capacity(n);
        for i in 0..n {
            let req = pb::RegisterImageRequest {
                name: format!("image {i}"),
                location: format!("bench:images/img-{i:05}.raw"),
                properties: [("OS".to_string(), "Linux".to_string())].into(),
                ..Default::default()
            };
            let t = Instant::now();
            c.register_image(req).await.answer();
            reg.push(t.elapsed());
        }
        let t = Instant::now();
        let listed = c
            .list_images(pb::ListImagesRequest::default())
            .await
            .answer()
            .images
            .len();
        let list = t.elapsed();
        assert_eq!(listed, n);
        println!(
            "\n{:<44} {:>11} {:>11}",
            "catalog operation (one client)", "p50", "p99"
        );
        let line = |label: &str, v: &mut Vec<Duration>| {
            println!("{label:<44} {} {}", ms(pct(v, 0.5)), ms(pct(v, 0.99)));
        };
        line("register image with its metafile", &mut reg);
        line("baseline: upload a 512-byte file", &mut small);
        println!(
            "register p50 / small upload p50: x{:.2}",
            pct(&mut reg, 0.5).as_secs_f64() / pct(&mut small, 0.5).as_secs_f64()
        );
        println!("image list of {n} images: {}", ms(list));
    });
}
