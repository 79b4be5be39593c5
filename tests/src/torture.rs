//! `cairn-torture`: one host hammering a shared domain, for multi-process
//! tests. Logs every operation that reported success, one JSON line each,
//! so the test can verify afterwards that all of them are on the domain.
//!
//! Usage: cairn-torture PATH LOCK_DIR SECONDS SEED LOG

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_domain::io::FileDev;
use cairn_domain::*;
use cairn_tests::stats::Rng;
use serde_json::json;

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 6,
        "usage: cairn-torture PATH LOCK_DIR SECONDS SEED LOG"
    );
    let seconds: u64 = a[3].parse()?;
    let seed: u64 = a[4].parse()?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a[5])?;
    let dev = Arc::new(FileDev::open(a[1].as_ref(), true)?);
    let locks = Arc::new(LocalLockService::new(&a[2])?);
    let host = HostIdentity {
        id: uuid::Uuid::new_v4(),
        name: format!("torture-{seed}"),
    };
    let mut o = OpenOptions::new(host);
    o.lock_timeout = Duration::from_secs(20);
    let d = Domain::open(dev, locks, o).context("open")?;
    let mut rng = Rng(seed | 1);
    let mut mine: Vec<(VolumeId, TagId)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    while Instant::now() < deadline {
        let pick = rng.next_u64() % 10;
        let line = if mine.is_empty() || pick < 4 {
            let spec = VolumeSpec::raw(1 << 20, format!("seed {seed} op {n}"));
            let meta = TagMeta::disk(VolumeRef::New(0), 1 << 20, vec![]);
            match d.tx("create").create_volume(spec).create_tag(meta).commit() {
                Ok(out) => {
                    let (v, t) = (out.volumes[0].id, out.tags[0].id);
                    mine.push((v, t));
                    json!({"op": "create", "vol": v, "tag": t})
                }
                Err(e) if e.code() == ErrorCode::ResourceExhausted => continue,
                Err(e) => return Err(e).context("create"),
            }
        } else {
            let i = (rng.next_u64() % mine.len() as u64) as usize;
            let (v, t) = mine[i];
            if pick < 6 {
                let len = (rng.next_u64() % 1500) as usize;
                d.set_user_data(&t, "item", vec![n as u8; len], &[])
                    .context("user data")?;
                json!({"op": "ud", "tag": t, "len": len})
            } else if pick < 8 {
                mine.swap_remove(i);
                d.tx("delete")
                    .delete_tag(t)
                    .delete_volume(v)
                    .commit()
                    .context("delete")?;
                json!({"op": "delete", "vol": v, "tag": t})
            } else {
                let mut m = d.read_tag(&t)?.meta();
                m.size = n;
                d.change_tag(&t, m, &[]).context("change")?;
                json!({"op": "change", "tag": t, "size": n})
            }
        };
        writeln!(log, "{line}")?;
        n += 1;
    }
    d.close()?;
    println!("{n} operations");
    Ok(())
}
