//! Domain benchmark: open (with recovery of a dead host's slot), list,
//! create and delete latency at 1k, 10k and 100k volumes on a sparse file
//! with direct I/O, and flushes per operation. The baseline, measured in the
//! same run on the same file, is the device's floor for one durable change:
//! a 4 KiB direct write followed by fdatasync; for open, a direct read of as
//! many bytes as open reads.
//!
//! Create and delete are measured in rounds that alternate between the
//! domains, so noise from other tenants of the machine lands on every size
//! alike.
//!
//! Run: `cargo bench -p cairn-domain --bench domain` (set CAIRN_BENCH_SIZES
//! to e.g. "1000,10000" for a shorter run, CAIRN_BENCH_DIR for the file).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_domain::io::{AlignedBuf, BlockDev, FileDev};
use cairn_domain::testing::host;
use cairn_domain::*;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn spec() -> VolumeSpec {
    VolumeSpec::raw(1 << 20, "bench")
}

struct Row {
    n: usize,
    open: Duration,
    open_bytes: u64,
    open_baseline: Duration,
    list: Duration,
    create_p50: Duration,
    create_p99: Duration,
    delete_p50: Duration,
    delete_p99: Duration,
    flushes_create: f64,
    flushes_delete: f64,
    /// Reads, writes and bytes moved per create and per delete.
    io_create: (f64, f64, f64),
    io_delete: (f64, f64, f64),
    sync_p50: Duration,
}

/// A populated domain, open.
struct Setup {
    n: usize,
    path: std::path::PathBuf,
    dev: Arc<dyn BlockDev>,
    locks: Arc<dyn LockService>,
    d: Domain,
}

fn setup(n: usize, dir: &std::path::Path) -> Setup {
    let path = dir.join(format!("bench-{n}.img"));
    let _ = std::fs::remove_file(&path);
    let size = ((n as u64 + 4096) << 20) + (1 << 30);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    let lockdir = dir.join(format!("locks-{n}"));
    let locks: Arc<dyn LockService> = Arc::new(LocalLockService::new(&lockdir).unwrap());
    let dev: Arc<dyn BlockDev> = Arc::new(FileDev::open(&path, true).unwrap());
    let params = FormatParams {
        name: format!("bench{n}"),
        volume_slots: Some(n as u32 + 2048),
        tag_slots: Some(1024),
        extent_size: Some(1 << 20),
        ..Default::default()
    };
    format(dev.as_ref(), &params, false, locks.as_ref(), &SystemClock).unwrap();
    let d = Domain::open(dev.clone(), locks.clone(), OpenOptions::new(host(1))).unwrap();
    // Populate in batches: one intent per 200 volumes.
    let t0 = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(200);
        let mut tx = d.tx("populate");
        for _ in 0..k {
            tx = tx.create_volume(spec());
        }
        tx.commit().unwrap();
        left -= k;
    }
    eprintln!(
        "  populated {n} volumes in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Setup {
        n,
        path,
        dev,
        locks,
        d,
    }
}

/// Latency samples of one domain.
#[derive(Default)]
struct Samples {
    creates: Vec<Duration>,
    deletes: Vec<Duration>,
    sync: Vec<Duration>,
    flushes_create: u64,
    flushes_delete: u64,
    io_create: [u64; 3],
    io_delete: [u64; 3],
}

fn io_delta(a: cairn_domain::io::IoStats, b: cairn_domain::io::IoStats) -> [u64; 3] {
    [
        b.reads - a.reads,
        b.writes - a.writes,
        (b.bytes_read - a.bytes_read) + (b.bytes_written - a.bytes_written),
    ]
}

/// One round on one domain: the fsync floor, `k` creates, `k` deletes.
fn round(st: &Setup, k: usize, out: &mut Samples) {
    let page = AlignedBuf::zeroed(4096);
    let scratch = st.d.geometry().extent_off(st.d.geometry().extent_count - 1);
    for i in 0..k as u64 {
        let t = Instant::now();
        st.dev.write_at(&page, scratch + (i % 64) * 4096).unwrap();
        st.dev.flush().unwrap();
        out.sync.push(t.elapsed());
    }
    let s0 = st.dev.stats();
    let mut ids = Vec::new();
    for _ in 0..k {
        let t = Instant::now();
        let (v, _g) = st.d.create_volume(spec()).unwrap();
        out.creates.push(t.elapsed());
        ids.push(v.id);
    }
    let s1 = st.dev.stats();
    for id in &ids {
        let t = Instant::now();
        st.d.delete_volume(id, &[]).unwrap();
        out.deletes.push(t.elapsed());
    }
    let s2 = st.dev.stats();
    out.flushes_create += s1.flushes - s0.flushes;
    out.flushes_delete += s2.flushes - s1.flushes;
    for (i, v) in io_delta(s0, s1).into_iter().enumerate() {
        out.io_create[i] += v;
    }
    for (i, v) in io_delta(s1, s2).into_iter().enumerate() {
        out.io_delete[i] += v;
    }
}

fn finish(st: Setup, mut smp: Samples, dir: &std::path::Path) -> Row {
    let Setup {
        n,
        path,
        dev: _,
        locks,
        d,
    } = st;
    let ops = smp.creates.len() as f64;
    let per = |x: [u64; 3]| (x[0] as f64 / ops, x[1] as f64 / ops, x[2] as f64 / ops);
    let flushes_create = smp.flushes_create as f64 / ops;
    let flushes_delete = smp.flushes_delete as f64 / ops;
    let io_create = per(smp.io_create);
    let io_delete = per(smp.io_delete);
    let creates = &mut smp.creates;
    let deletes = &mut smp.deletes;
    let sync = &mut smp.sync;

    // List.
    let mut lists = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let l = d.list_volumes().unwrap();
        lists.push(t.elapsed());
        assert_eq!(l.len(), n);
    }

    // Open after the host died (slot left active): includes the barrier's
    // recovery of the dead slot's journal.
    let g = d.geometry().clone();
    std::mem::forget(d);
    drop(locks);
    let mut opens = Vec::new();
    let mut open_bytes = 0;
    for i in 0..7 {
        let locks: Arc<dyn LockService> =
            Arc::new(LocalLockService::new(dir.join(format!("locks-{n}-{i}"))).unwrap());
        let dev: Arc<dyn BlockDev> = Arc::new(FileDev::open(&path, true).unwrap());
        let t = Instant::now();
        let d2 = Domain::open(dev.clone(), locks, OpenOptions::new(host(2 + i as u8))).unwrap();
        opens.push(t.elapsed());
        open_bytes = dev.stats().bytes_read;
        if i < 6 {
            // Leave the slot active again so the next open also recovers one.
            std::mem::forget(d2);
        } else {
            d2.close().unwrap();
        }
    }
    // Baseline for open: read the same number of bytes, in the same regions.
    let mut base = Vec::new();
    for _ in 0..7 {
        let dev = FileDev::open(&path, false).unwrap();
        let t = Instant::now();
        let len = (open_bytes.min(g.data_off - g.journal_off) as usize).div_ceil(4096) * 4096;
        let mut buf = AlignedBuf::zeroed(len);
        dev.read_at(&mut buf, g.journal_off).unwrap();
        base.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    Row {
        n,
        open: pct(&mut opens, 0.5),
        open_bytes,
        open_baseline: pct(&mut base, 0.5),
        list: pct(&mut lists, 0.5),
        create_p50: pct(creates, 0.5),
        create_p99: pct(creates, 0.99),
        delete_p50: pct(deletes, 0.5),
        delete_p99: pct(deletes, 0.99),
        flushes_create,
        flushes_delete,
        io_create,
        io_delete,
        sync_p50: pct(sync, 0.5),
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("CAIRN_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dir = std::env::var("CAIRN_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("cairn-bench"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut setups = Vec::new();
    for n in sizes {
        eprintln!("volumes: {n}");
        setups.push(setup(n, &dir));
    }
    // Create and delete latency, interleaved across the domains in short
    // rounds so that the machine's noise falls on every size alike.
    let mut samples: Vec<Samples> = setups.iter().map(|_| Samples::default()).collect();
    for _ in 0..15 {
        for (st, smp) in setups.iter().zip(samples.iter_mut()) {
            round(st, 20, smp);
        }
    }
    let rows: Vec<Row> = setups
        .into_iter()
        .zip(samples)
        .map(|(st, smp)| finish(st, smp, &dir))
        .collect();
    println!(
        "\n{:>8} | {:>22} | {:>10} | {:>22} | {:>22} | {:>13} | {:>12}",
        "volumes",
        "open+recovery (base)",
        "list",
        "create p50 / p99",
        "delete p50 / p99",
        "flushes c/d",
        "fsync floor"
    );
    for r in &rows {
        println!(
            "{:>8} | {:>10} ({:>9}) | {:>10} | {:>10} / {:>9} | {:>10} / {:>9} | {:>5.2} / {:>5.2} | {:>12}",
            r.n,
            ms(r.open),
            ms(r.open_baseline),
            ms(r.list),
            ms(r.create_p50),
            ms(r.create_p99),
            ms(r.delete_p50),
            ms(r.delete_p99),
            r.flushes_create,
            r.flushes_delete,
            ms(r.sync_p50)
        );
        eprintln!(
            "  open read {} bytes; per create {:.1} reads {:.1} writes {:.0} bytes; per delete {:.1} reads {:.1} writes {:.0} bytes",
            r.open_bytes,
            r.io_create.0,
            r.io_create.1,
            r.io_create.2,
            r.io_delete.0,
            r.io_delete.1,
            r.io_delete.2
        );
    }
    if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
        println!(
            "fsync floor {}→{} volumes: x{:.2}; create p50 / floor: {:.2} → {:.2}; delete p50 / floor: {:.2} → {:.2}",
            a.n,
            b.n,
            b.sync_p50.as_secs_f64() / a.sync_p50.as_secs_f64(),
            a.create_p50.as_secs_f64() / a.sync_p50.as_secs_f64(),
            b.create_p50.as_secs_f64() / b.sync_p50.as_secs_f64(),
            a.delete_p50.as_secs_f64() / a.sync_p50.as_secs_f64(),
            b.delete_p50.as_secs_f64() / b.sync_p50.as_secs_f64()
        );
        let c = b.create_p50.as_secs_f64() / a.create_p50.as_secs_f64();
        let d = b.delete_p50.as_secs_f64() / a.delete_p50.as_secs_f64();
        println!(
            "\ncreate p50 {}→{} volumes: x{:.2}; delete p50: x{:.2}; create p50 / fsync floor at {}: x{:.2}",
            a.n,
            b.n,
            c,
            d,
            b.n,
            b.create_p50.as_secs_f64() / b.sync_p50.as_secs_f64()
        );
    }
}
