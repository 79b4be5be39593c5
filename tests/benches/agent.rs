//! Agent benchmark, through the real gRPC API on a unix socket, each figure
//! beside a baseline measured in the same run:
//! - latency (p50, p99) of create (raw, qcow2), snapshot, activate and
//!   extend, against spawning `qemu-img create` for the same image;
//! - create and snapshot over TCP with mutual TLS, and over TCP with TLS
//!   and a bearer token, against the same over the unix socket, samples
//!   interleaved; and the gate's own cost (identifying a token's request)
//!   as a share of a snapshot;
//! - copy throughput of a 2 GiB volume of random data and of one that is
//!   90% zeros, against `qemu-img convert` and `dd` with direct I/O between
//!   the same extents.
//!
//! Run as root (activation uses loop devices):
//! `cargo bench -p cairn-tests --bench agent`. CAIRN_BENCH_DIR picks the
//! directory (default: a temporary one under /var/tmp), CAIRN_BENCH_N the
//! number of latency samples (default 200), CAIRN_BENCH_COPY_MIB the copy
//! size (default 2048).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_agent::server::{serve, ServeOptions};
use cairn_agent::AgentConfig;
use cairn_domain::io::FileDev;
use cairn_domain::{format, FormatParams, HostIdentity, MemLockService, SystemClock};
use cairn_proto::agent as pb;
use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::auth::Bearer;
use cairn_proto::transport::Target;
use cairn_tests::data::pattern_file;
use cairn_tests::stats::{env_u64, median, ms, pct};
use cairn_tests::Answer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client that presents a token or nothing.
type Client = AgentClient<InterceptedService<Channel, Bearer>>;

/// A file of `len` bytes: in every 10 MiB, the first `data_mib` MiB random.
fn make_file(path: &Path, len: u64, data_mib: u64) {
    pattern_file(path, len, 10 << 20, data_mib << 20, 0x9e37_79b9_7f4a_7c15);
}

struct Bench {
    c: Client,
    domain: PathBuf,
    extent_size: u64,
    data_off: u64,
}

impl Bench {
    async fn create(
        &mut self,
        f: pb::VolumeFormat,
        cap: u64,
        tag: bool,
    ) -> pb::CreateVolumeResponse {
        self.c
            .create_volume(pb::CreateVolumeRequest {
                format: f as i32,
                capacity: cap,
                tag: tag.then(|| pb::TagSpec {
                    mutable: true,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .answer()
    }

    async fn job(&mut self, j: pb::Job) -> (pb::Job, Duration) {
        let t = Instant::now();
        loop {
            let s = self
                .c
                .get_job(pb::GetJobRequest {
                    job_id: j.id.clone(),
                })
                .await
                .answer();
            if s.state != pb::JobState::Running as i32 {
                assert_eq!(s.state, pb::JobState::Succeeded as i32, "{s:?}");
                return (s, t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn delete(&mut self, v: &pb::Volume) {
        self.c
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: v.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    fn offset(&self, v: &pb::Volume) -> u64 {
        self.data_off + v.extent_start * self.extent_size
    }

    fn node(&self, v: &pb::Volume) -> String {
        format!(
            r#"json:{{"driver":"raw","offset":{},"size":{},"file":{{"driver":"file","filename":"{}","locking":"off"}}}}"#,
            self.offset(v),
            v.capacity,
            self.domain.display()
        )
    }
}

fn time_cmd(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.output().expect("spawn");
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn main() {
    let n = env_u64("CAIRN_BENCH_N", 200) as usize;
    let copy_len = env_u64("CAIRN_BENCH_COPY_MIB", 2048) << 20;
    let tmp;
    let dir = match std::env::var_os("CAIRN_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir_in("/var/tmp").unwrap();
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(dir.join("io")).unwrap();
    let domain = dir.join("domain.img");
    let _ = std::fs::remove_file(&domain);
    std::fs::File::create(&domain)
        .unwrap()
        .set_len(1 << 41)
        .unwrap();
    let g = format(
        &FileDev::open(&domain, true).unwrap(),
        &FormatParams {
            name: "bench".into(),
            extent_size: Some(1 << 20),
            ..Default::default()
        },
        false,
        &MemLockService::new(),
        &SystemClock,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let socket = dir.join("agent.sock");
    let certs = cairn_tests::certs::Certs::make(&dir.join("certs"), &["admin"]);
    let tls_args = cairn_proto::tls::ServerTlsArgs {
        tls_cert: Some(certs.dir.join("server.pem")),
        tls_key: Some(certs.dir.join("server.key")),
        tls_client_ca: Some(certs.dir.join("ca.pem")),
        insecure: false,
    };
    // An admin token for the TLS + token transport.
    let token = cairn_proto::auth::new_token();
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        cairn_proto::auth::TokenEntry {
            name: "bench".into(),
            role: cairn_proto::auth::Role::Admin,
            hash: cairn_proto::auth::hash_token(&token),
        }
        .line(),
    )
    .unwrap();
    let access = cairn_proto::server::AccessArgs {
        token_file: Some(tokens.clone()),
        ..Default::default()
    };
    let opts = ServeOptions {
        agent: AgentConfig {
            domains: vec![domain.clone()],
            run_dir: dir.join("run"),
            host: HostIdentity::local(),
            lock_timeout: Duration::from_secs(30),
            io_dirs: vec![dir.join("io")],
            gc_quarantine: cairn_agent::agent::GC_QUARANTINE,
        },
        locks: cairn_agent::server::Locks::Local(dir.join("locks")),
        endpoints: cairn_proto::server::Endpoints {
            socket: Some(socket.clone()),
            listen: tls_args
                .security(Some("127.0.0.1:0".parse().unwrap()))
                .unwrap(),
            access: access.clone(),
        },
        metrics: None,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(serve(
        opts,
        move |b| ready_tx.send(b.grpc.listen).unwrap(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let listen = ready_rx.recv().unwrap().unwrap();
    let c = rt
        .block_on(cairn_proto::transport::channel(&Target::Unix(socket)))
        .unwrap();
    let c = AgentClient::with_interceptor(c, Bearer::default());
    let url = format!("https://{listen}");
    let client_tls = cairn_proto::tls::ClientTlsArgs {
        ca: Some(certs.dir.join("ca.pem")),
        cert: Some(certs.dir.join("admin.pem")),
        key: Some(certs.dir.join("admin.key")),
    };
    let tls_channel = rt
        .block_on(cairn_proto::transport::channel_tls(
            &Target::Tcp(url.clone()),
            client_tls.for_address(&url).unwrap(),
        ))
        .unwrap();
    // TLS without a client certificate: the token says who we are.
    let server_only = cairn_proto::tls::ClientTlsArgs {
        ca: Some(certs.dir.join("ca.pem")),
        ..Default::default()
    };
    let token_channel = rt
        .block_on(cairn_proto::transport::channel_tls(
            &Target::Tcp(url.clone()),
            server_only.for_address(&url).unwrap(),
        ))
        .unwrap();
    let mut b = Bench {
        c,
        domain: domain.canonicalize().unwrap(),
        extent_size: g.extent_size,
        data_off: g.data_off,
    };
    let gib = 1u64 << 30;

    // ---- latency ------------------------------------------------------------------
    eprintln!("latency: {n} samples each");
    let mut rows: Vec<(&str, Vec<Duration>)> = Vec::new();
    let mut lat = |name: &'static str, v: Vec<Duration>| rows.push((name, v));
    rt.block_on(async {
        let mut raw = Vec::new();
        let mut q = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let r = b.create(pb::VolumeFormat::Raw, gib, false).await;
            raw.push(t.elapsed());
            b.delete(r.volume.as_ref().unwrap()).await;
            let t = Instant::now();
            let r = b.create(pb::VolumeFormat::Qcow2, gib, false).await;
            q.push(t.elapsed());
            b.delete(r.volume.as_ref().unwrap()).await;
        }
        lat("create raw 1 GiB", raw);
        lat("create qcow2 1 GiB", q);

        let disk = b
            .create(pb::VolumeFormat::Raw, gib, true)
            .await
            .tag
            .unwrap();
        let mut snaps = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            b.c.snapshot(cairn_tests::ask::snapshot("", &disk.id))
                .await
                .unwrap();
            snaps.push(t.elapsed());
        }
        lat("snapshot (qcow2 on a weak tag)", snaps);

        // The same over TCP with mutual TLS and with TLS and a token,
        // interleaved with the unix socket so that all see the same machine.
        let over = |c: Client| Bench {
            c,
            domain: b.domain.clone(),
            extent_size: b.extent_size,
            data_off: b.data_off,
        };
        let mut t = over(AgentClient::with_interceptor(
            tls_channel,
            Bearer::default(),
        ));
        let mut k = over(AgentClient::with_interceptor(
            token_channel,
            Bearer::new(Some(&token)).unwrap(),
        ));
        let (mut cu, mut ct, mut ck) = (vec![], vec![], vec![]);
        let (mut su, mut st, mut sk) = (vec![], vec![], vec![]);
        for _ in 0..n {
            for (bench, out) in [(&mut b, &mut cu), (&mut t, &mut ct), (&mut k, &mut ck)] {
                let at = Instant::now();
                let r = bench.create(pb::VolumeFormat::Raw, gib, false).await;
                out.push(at.elapsed());
                bench.delete(r.volume.as_ref().unwrap()).await;
            }
            for (bench, out) in [(&mut b, &mut su), (&mut t, &mut st), (&mut k, &mut sk)] {
                let at = Instant::now();
                bench
                    .c
                    .snapshot(pb::SnapshotRequest {
                        tag_id: disk.id.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                out.push(at.elapsed());
            }
        }
        lat("create raw 1 GiB (unix, paired)", cu);
        lat("create raw 1 GiB (TCP mutual TLS)", ct);
        lat("create raw 1 GiB (TCP TLS + token)", ck);
        lat("snapshot (unix, paired)", su);
        lat("snapshot (TCP mutual TLS)", st);
        lat("snapshot (TCP TLS + token)", sk);

        let mut act = Vec::new();
        for _ in 0..n.min(100) {
            let d = b
                .create(pb::VolumeFormat::Raw, gib, true)
                .await
                .tag
                .unwrap();
            let t = Instant::now();
            b.c.activate(cairn_tests::ask::activate("", &d.id))
                .await
                .unwrap();
            act.push(t.elapsed());
            b.c.deactivate(cairn_tests::ask::deactivate("", &d.id))
                .await
                .unwrap();
        }
        lat("activate (one loop device)", act);

        let mut ext = Vec::new();
        let mut extq = Vec::new();
        for _ in 0..n {
            for (f, out) in [
                (pb::VolumeFormat::Raw, &mut ext),
                (pb::VolumeFormat::Qcow2, &mut extq),
            ] {
                // The newest volume has free extents after it.
                let v = b.create(f, gib, false).await.volume.unwrap();
                let t = Instant::now();
                b.c.extend_volume(pb::ExtendVolumeRequest {
                    volume_id: v.id.clone(),
                    capacity: gib + (64 << 20),
                    ..Default::default()
                })
                .await
                .unwrap();
                out.push(t.elapsed());
                b.delete(&v).await;
            }
        }
        lat("extend raw +64 MiB", ext);
        lat("extend qcow2 +64 MiB", extq);
    });
    let f = dir.join("io/q.qcow2");
    let base = dir.join("io/base.raw");
    std::fs::File::create(&base).unwrap().set_len(gib).unwrap();
    let mut qc = Vec::new();
    let mut qr = Vec::new();
    let mut qb = Vec::new();
    // `qemu-img create -q -f FMT [-F raw -b BACKING] f [1G]` of a new `f`,
    // timed.
    let create = |fmt: &str, backing: Option<&std::path::Path>| {
        let _ = std::fs::remove_file(&f);
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", fmt]);
        match backing {
            Some(b) => cmd.args(["-F", "raw", "-b"]).arg(b).arg(&f),
            None => cmd.arg(&f).arg("1G"),
        };
        time_cmd(&mut cmd)
    };
    for _ in 0..n {
        qc.push(create("qcow2", None));
        qr.push(create("raw", None));
        qb.push(create("qcow2", Some(&base)));
    }
    rows.push(("baseline: qemu-img create raw 1G", qr));
    rows.push(("baseline: qemu-img create qcow2 1G", qc));
    rows.push(("baseline: qemu-img create qcow2 -b", qb));

    println!(
        "\n{:<38} {:>11} {:>11}",
        "through gRPC (unix socket)", "p50", "p99"
    );
    let mut p50 = std::collections::BTreeMap::new();
    for (name, mut v) in rows {
        let a = pct(&mut v, 0.5);
        let z = pct(&mut v, 0.99);
        p50.insert(name, a);
        println!("{name:<38} {} {}", ms(a), ms(z));
    }
    for (what, unix) in [
        ("create raw 1 GiB", "create raw 1 GiB (unix, paired)"),
        ("snapshot", "snapshot (unix, paired)"),
    ] {
        for how in ["TCP mutual TLS", "TCP TLS + token"] {
            println!(
                "{what} p50, {how} / unix socket: x{:.3}",
                p50[format!("{what} ({how})").as_str()].as_secs_f64() / p50[unix].as_secs_f64()
            );
        }
    }
    // The gate alone: identifying a request that carries a token (the
    // token file's stat, the hash, the lookup), in batches.
    let gate = cairn_proto::auth::Gate::new(
        std::sync::Arc::new(access.authenticator().unwrap()),
        cairn_proto::auth::Policy::AdminOrService,
        "agent API",
    );
    let mut req = tonic::Request::new(());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut per_call = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        for _ in 0..1000 {
            assert!(gate.admit(std::hint::black_box(&req)).is_ok());
        }
        per_call.push(t.elapsed() / 1000);
    }
    let g = pct(&mut per_call, 0.5);
    let snap_token = p50["snapshot (TCP TLS + token)"];
    println!(
        "gate (token) median {:.1} us = {:.3}% of snapshot p50 over TCP TLS + token",
        g.as_secs_f64() * 1e6,
        100.0 * g.as_secs_f64() / snap_token.as_secs_f64()
    );
    let snap = p50["snapshot (qcow2 on a weak tag)"];
    let qcb = p50["baseline: qemu-img create qcow2 -b"];
    println!(
        "snapshot p50 / qemu-img create -b p50: x{:.2}",
        snap.as_secs_f64() / qcb.as_secs_f64()
    );

    // ---- copy throughput ---------------------------------------------------------------
    eprintln!("copy: preparing two {} MiB volumes", copy_len >> 20);
    let kinds = [("random", 10u64), ("90% zeros", 1)];
    let mut srcs = Vec::new();
    for (name, data) in kinds {
        let p = dir.join(format!("io/{}.raw", data));
        make_file(&p, copy_len, data);
        let v = rt.block_on(async {
            let j =
                b.c.import_volume(pb::ImportVolumeRequest {
                    path: p.display().to_string(),
                    source_format: pb::VolumeFormat::Raw as i32,
                    ..Default::default()
                })
                .await
                .answer();
            b.job(j).await.0.volume.unwrap()
        });
        std::fs::remove_file(&p).unwrap();
        srcs.push((name, v));
    }
    let runs = 3;
    let mut table: Vec<(String, Vec<f64>)> = Vec::new();
    for method in [
        "cairn copy raw->raw (native)",
        "cairn copy raw->qcow2 (qemu-img)",
        "baseline: qemu-img convert raw->raw",
        "baseline: dd direct bs=4M",
    ] {
        let mut per_kind = Vec::new();
        for (_, src) in &srcs {
            let mut secs = Vec::new();
            for _ in 0..runs {
                let s = rt.block_on(async {
                    match method {
                        "cairn copy raw->raw (native)" | "cairn copy raw->qcow2 (qemu-img)" => {
                            let fmt = if method.contains("qcow2") {
                                pb::VolumeFormat::Qcow2
                            } else {
                                pb::VolumeFormat::Raw
                            };
                            let t = Instant::now();
                            let j =
                                b.c.copy_volume(pb::CopyVolumeRequest {
                                    volume_id: src.id.clone(),
                                    target: Some(pb::TargetSpec {
                                        format: fmt as i32,
                                        ..Default::default()
                                    }),
                                    ..Default::default()
                                })
                                .await
                                .answer();
                            let (j, _) = b.job(j).await;
                            let d = t.elapsed();
                            b.delete(j.volume.as_ref().unwrap()).await;
                            d
                        }
                        _ => {
                            let dst = b.create(pb::VolumeFormat::Raw, copy_len, false).await;
                            let dst = dst.volume.unwrap();
                            let d = if method.contains("qemu-img") {
                                time_cmd(
                                    Command::new("qemu-img")
                                        .args([
                                            "convert",
                                            "-n",
                                            "--target-is-zero",
                                            "-t",
                                            "none",
                                            "-T",
                                            "none",
                                            "-O",
                                            "raw",
                                        ])
                                        .arg(b.node(src))
                                        .arg(b.node(&dst)),
                                )
                            } else {
                                time_cmd(
                                    Command::new("dd")
                                        .arg(format!("if={}", b.domain.display()))
                                        .arg(format!("of={}", b.domain.display()))
                                        .args([
                                            "bs=4M",
                                            "iflag=direct,skip_bytes,count_bytes",
                                            "oflag=direct,seek_bytes",
                                            "conv=notrunc",
                                            "status=none",
                                        ])
                                        .arg(format!("skip={}", b.offset(src)))
                                        .arg(format!("seek={}", b.offset(&dst)))
                                        .arg(format!("count={copy_len}")),
                                )
                            };
                            b.delete(&dst).await;
                            d
                        }
                    }
                });
                secs.push(s.as_secs_f64());
            }
            per_kind.push(median(secs));
        }
        table.push((method.to_string(), per_kind));
    }
    println!(
        "\ncopy of {} MiB, median of {runs}      {:>22} {:>22} {:>12}",
        copy_len >> 20,
        "random",
        "90% zeros",
        "zeros/random"
    );
    let mbps = |s: f64| (copy_len as f64 / s) / 1e6;
    for (m, v) in &table {
        println!(
            "{m:<38} {:>8.2} s {:>7.0} MB/s {:>8.2} s {:>7.0} MB/s {:>11.2}",
            v[0],
            mbps(v[0]),
            v[1],
            mbps(v[1]),
            v[1] / v[0]
        );
    }
    let native = &table[0].1;
    let qemu = &table[2].1;
    println!(
        "native copy throughput / qemu-img convert: random x{:.2}, 90% zeros x{:.2}",
        qemu[0] / native[0],
        qemu[1] / native[1]
    );

    // ---- upload through the API ----------------------------------------------------------
    // The bytes of a file streamed into a new raw volume (WriteVolumeData,
    // 1 MiB messages, SHA-256 on), against dd of the same file into the
    // same domain with direct I/O.
    let up = dir.join("io/upload.raw");
    make_file(&up, copy_len, 10);
    let bytes = std::fs::read(&up).unwrap();
    let (mut api, mut dd) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        rt.block_on(async {
            let r =
                b.c.create_volume(pb::CreateVolumeRequest {
                    format: pb::VolumeFormat::Raw as i32,
                    capacity: copy_len,
                    keep_locked: true,
                    ..Default::default()
                })
                .await
                .answer();
            let (v, lock) = (r.volume.unwrap(), r.lock_id);
            let legality = |l: pb::Legality| pb::UpdateVolumeRequest {
                volume_id: v.id.clone(),
                legality: l as i32,
                lock_id: lock.clone(),
                ..Default::default()
            };
            b.c.update_volume(legality(pb::Legality::Illegal))
                .await
                .answer();
            let mut msgs: Vec<pb::WriteVolumeDataRequest> = bytes
                .chunks(1 << 20)
                .map(|c| pb::WriteVolumeDataRequest {
                    data: c.to_vec(),
                    ..Default::default()
                })
                .collect();
            msgs[0].volume_id = v.id.clone();
            msgs[0].lock_id = lock.clone();
            let t = Instant::now();
            let w =
                b.c.write_volume_data(tokio_stream::iter(msgs))
                    .await
                    .answer();
            api.push(t.elapsed().as_secs_f64());
            assert_eq!(w.bytes_written, copy_len);
            b.c.update_volume(legality(pb::Legality::Legal))
                .await
                .answer();
            b.c.delete_volume(pb::DeleteVolumeRequest {
                volume_id: v.id.clone(),
                lock_id: lock.clone(),
                ..Default::default()
            })
            .await
            .answer();
            let dst = b.create(pb::VolumeFormat::Raw, copy_len, false).await;
            let dst = dst.volume.unwrap();
            let d = time_cmd(
                Command::new("dd")
                    .arg(format!("if={}", up.display()))
                    .arg(format!("of={}", b.domain.display()))
                    .args(["bs=4M", "oflag=direct,seek_bytes", "conv=notrunc,fsync"])
                    .arg("status=none")
                    .arg(format!("seek={}", b.offset(&dst))),
            );
            dd.push(d.as_secs_f64());
            b.delete(&dst).await;
        });
    }
    std::fs::remove_file(&up).unwrap();
    let (api, dd) = (median(api), median(dd));
    println!(
        "\nupload of {} MiB (random), median of {runs}",
        copy_len >> 20
    );
    println!(
        "{:<38} {api:>8.2} s {:>7.0} MB/s",
        "cairn WriteVolumeData (SHA-256)",
        mbps(api)
    );
    println!(
        "{:<38} {dd:>8.2} s {:>7.0} MB/s",
        "baseline: dd oflag=direct",
        mbps(dd)
    );
    println!("upload throughput / dd: x{:.2}", dd / api);
    let _ = stop_tx.send(());
    rt.block_on(server).unwrap().unwrap();
}
