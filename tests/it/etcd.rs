//! The etcd lock service against a real etcd (Debian's etcd-server) that
//! the test starts on free loopback ports and stops afterwards.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_cluster::{EtcdConfig, EtcdLockService};
use cairn_domain::lock::{conformance, Resource, ResourceKind};
use cairn_domain::{DomainError, LockService};
use cairn_tests::agent::run;
use cairn_tests::ask::{self, AgentCalls};
use cairn_tests::etcd::{free_port, Etcd};
use cairn_tests::Answer;

fn cfg(e: &Etcd, ttl: u64, margin_ms: u64) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![e.url()], "test");
    c.ttl = Duration::from_secs(ttl);
    c.margin = Duration::from_millis(margin_ms);
    c
}

fn res(d: uuid::Uuid, i: u32) -> Resource {
    Resource {
        domain: d,
        kind: ResourceKind::HostSlot(i),
    }
}

#[test]
fn etcd_lock_service_conforms() {
    let e = Etcd::start();
    let c = cfg(&e, 10, 3000);
    // Each handle is its own session, like separate processes.
    conformance::run_all(&move || {
        Arc::new(EtcdLockService::connect(c.clone()).unwrap()) as Arc<dyn LockService>
    });
}

#[test]
fn etcd_kv_conforms_and_registrations_die_with_the_session() {
    let e = Etcd::start();
    let s = EtcdLockService::connect(cfg(&e, 2, 700)).unwrap();
    cairn_cluster::kv::conformance::run_all(&s, "cairn/test");
    let other = EtcdLockService::connect(cfg(&e, 10, 3000)).unwrap();
    use cairn_cluster::Kv;
    assert_eq!(
        other.get("cairn/test/live/me").unwrap().as_deref(),
        Some("here")
    );
    // The registering process goes; its lease expires; so does the key,
    // while what was put stays.
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while other.get("cairn/test/live/me").unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "registration outlived its lease"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(other.list("cairn/test/jobs/").unwrap().len(), 2);
}

#[test]
fn etcd_tokens_keep_growing_across_an_etcd_restart_and_wipe() {
    let mut e = Etcd::start();
    let s = EtcdLockService::connect(cfg(&e, 4, 1000)).unwrap();
    let d = uuid::Uuid::new_v4();
    // The token of taking the lock and giving it back at once.
    let token = |wait: u64| {
        s.acquire(&res(d, 1), Duration::from_secs(wait))
            .unwrap()
            .token()
    };
    let t1 = token(0);
    // Restart: the session survives (the lease outlives a quick restart).
    e.restart();
    let t2 = token(10);
    assert!(t2 > t1, "{t2} after {t1}");
    // Wipe: revisions start over, the token base is made again, later.
    e.wipe();
    let t3 = token(15);
    assert!(t3 > t2, "{t3} after a wipe, {t2} before");
    assert!(s.healthy());
}

#[test]
fn etcd_unconfirmed_lease_fences_the_holder_until_etcd_answers() {
    let e = Etcd::start();
    // TTL 3 s, margin 1 s: a holder stops trusting its locks 2 s after the
    // last confirmed keep-alive.
    let s = EtcdLockService::connect(cfg(&e, 3, 1000)).unwrap();
    let d = uuid::Uuid::new_v4();
    let g = s.acquire(&res(d, 1), Duration::ZERO).unwrap();
    g.check().unwrap();
    e.pause();
    let t = Instant::now();
    while g.check().is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "still trusted after 3 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let fenced_after = t.elapsed();
    assert!(
        fenced_after <= Duration::from_millis(2100),
        "fenced only after {fenced_after:?}"
    );
    assert!(matches!(g.check(), Err(DomainError::Fenced(_))));
    // Back within the TTL: the lease survived, the lock is good again.
    std::thread::sleep(Duration::from_millis(300));
    e.resume();
    let t = Instant::now();
    while g.check().is_err() {
        assert!(t.elapsed() < Duration::from_secs(3), "not trusted again");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Gone past the TTL: the lease is lost for good; the old guard never
    // becomes valid again, and the lock can be taken anew.
    e.pause();
    std::thread::sleep(Duration::from_secs(5));
    e.resume();
    let g2 = s.acquire(&res(d, 1), Duration::from_secs(10)).unwrap();
    assert!(g2.token() > g.token());
    assert!(g.check().is_err(), "a guard of a lost session came back");
    g2.check().unwrap();
}

fn open_domain(path: &std::path::Path, s: &EtcdLockService, host: u8) -> cairn_domain::Domain {
    cairn_domain::Domain::open(
        Arc::new(cairn_domain::io::FileDev::open(path, true).unwrap()),
        Arc::new(s.clone()),
        cairn_tests::domain::opts(host),
    )
    .unwrap()
}

#[test]
fn etcd_two_hosts_share_a_domain_and_a_stale_holder_cannot_write() {
    let e = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    cairn_tests::domain::make_domain(&path, 1);
    let (s1, s2) = (
        EtcdLockService::connect(cfg(&e, 3, 1000)).unwrap(),
        EtcdLockService::connect(cfg(&e, 3, 1000)).unwrap(),
    );
    let d1 = Arc::new(open_domain(&path, &s1, 1));
    let d2 = Arc::new(open_domain(&path, &s2, 2));
    assert_ne!(d1.slot(), d2.slot());
    // Both hosts create, tag and delete at once; etcd serializes the
    // allocation map between them.
    let mut threads = Vec::new();
    for d in [d1.clone(), d2.clone()] {
        threads.push(std::thread::spawn(move || {
            let mut kept = Vec::new();
            for i in 0..15 {
                let (v, g) = d.create_volume(cairn_tests::domain::raw(1)).unwrap();
                let t = d
                    .create_tag(cairn_tests::domain::tag_on(v.id), &[&g])
                    .unwrap();
                if i % 3 == 0 {
                    d.delete_tag(&t.id, &[&g]).unwrap();
                    d.delete_volume(&v.id, &[&g]).unwrap();
                } else {
                    kept.push(v.id);
                }
            }
            kept
        }));
    }
    let kept: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(kept.len(), 20);
    for v in &kept {
        d2.read_volume(v).unwrap();
    }
    // Host 1 holds a volume's lock; etcd stops answering; host 1 must not
    // write under that lock any more.
    let v = kept[0];
    let g = d1.lock_volume(&v).unwrap();
    let before = cairn_tests::domain::domain_state(&path);
    e.pause();
    let t = Instant::now();
    while g.check().is_ok() {
        assert!(t.elapsed() < Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut m = d1.read_volume(&v).unwrap().meta();
    m.description = "stale write".into();
    let err = d1.write_volume_meta(&v, m, &[&g]).unwrap_err();
    assert!(matches!(err, DomainError::Fenced(_)), "{err}");
    let after = cairn_tests::domain::domain_state(&path);
    assert!(before == after, "a fenced holder changed the domain");
    e.resume();
    drop(g);
    std::thread::sleep(Duration::from_millis(500));
    drop(d1);
    drop(d2);
    cairn_tests::domain::domain_clean(&path);
}

#[test]
fn root_etcd_qemu_two_agents_on_one_domain_work_on_the_same_disk() {
    use cairn_agent::pb;
    use cairn_tests::agent::*;
    use cairn_tests::domain::*;
    let e = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 2);
    let start = |n: u8| {
        AgentProc::start_with(
            &dom,
            &dir.path().join(format!("host{n}")),
            &[
                "--etcd".into(),
                e.url(),
                "--lease-ttl".into(),
                "4".into(),
                "--host-id".into(),
                uuid::Uuid::from_bytes([n; 16]).to_string(),
            ],
        )
    };
    let (a, b) = (start(1), start(2));
    let disk = rt().block_on(async {
        let mut ca = a.client().await;
        let mut cb = b.client().await;
        let disk = ca.new_disk("c", pb::VolumeFormat::Raw, 8).await.1;
        // The other host snapshots it, the first sees the result.
        let snap = cb.snapshot_tag("s", &disk.id).await;
        let t = ca.tag_of(&disk.id).await;
        assert_eq!(t.volume, snap.volume.unwrap().id);
        ca.assert_clean(&t.volume).await;
        let da = ca.list_domains(pb::ListDomainsRequest {}).await.answer();
        let db = cb.list_domains(pb::ListDomainsRequest {}).await.answer();
        assert_ne!(da.domains[0].host_slot, db.domains[0].host_slot);
        disk.id
    });
    // B activates the disk; A restarts and reconciles its own activations:
    // it must leave B's loop devices alone (regression: it detached every
    // unlinked device over the domain, whoever had made it).
    let path = rt().block_on(async {
        let mut cb = b.client().await;
        cb.activate(ask::activate("act", &disk))
            .await
            .answer()
            .activation
            .unwrap()
            .path
    });
    let before = loops_of(&dom);
    assert_eq!(before.len(), 2);
    let mut a = a;
    a.kill();
    let a = start(1);
    assert_eq!(loops_of(&dom), before, "A's restart touched B's devices");
    run(std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&path));
    rt().block_on(async {
        let mut cb = b.client().await;
        cb.deactivate_tag("deact", &disk).await;
    });
    drop(a);
    drop(b);
    domain_clean(&dom);
}

#[test]
fn etcd_agent_registers_while_alive() {
    use cairn_tests::agent::*;
    use cairn_tests::domain::*;
    let mut e = Etcd::start();
    let url = e.url();
    let dir = tempfile::tempdir().unwrap();
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let id = uuid::Uuid::from_bytes([7; 16]);
    let mut a = AgentProc::start_with(
        &dom,
        &dir.path().join("a"),
        &[
            "--etcd".into(),
            e.url(),
            "--lease-ttl".into(),
            "3".into(),
            "--host-id".into(),
            id.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--insecure".into(),
        ],
    );
    let rt = rt();
    let get = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([url.clone()], None)
                .await
                .unwrap();
            let r = c.get(format!("cairn/agents/{id}"), None).await.unwrap();
            r.kvs()
                .first()
                .map(|kv| serde_json::from_slice::<serde_json::Value>(kv.value()).unwrap())
        })
    };
    let reg = get(&rt).expect("the agent registered itself");
    assert_eq!(reg["host_id"], id.to_string());
    assert!(
        reg["address"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{reg}"
    );
    assert_eq!(reg["domains"].as_array().unwrap().len(), 1);
    assert!(reg["domains"][0]["host_slot"].is_u64(), "{reg}");
    // etcd loses everything: the agent's next session registers it again.
    e.wipe();
    let t = Instant::now();
    // About one lease TTL alone; a loaded machine restarting etcd took
    // over 15 s once.
    while get(&rt).is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not registered again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Killed, it drops out once its lease expires.
    a.kill();
    let t = Instant::now();
    while get(&rt).is_some() {
        assert!(t.elapsed() < Duration::from_secs(8), "still registered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `deploy/local-cluster` starts etcd and three agents, they share the
/// domain, and SIGTERM stops everything it started.
#[test]
fn etcd_local_cluster_script_runs_and_stops() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let bin = cairn_tests::bins::cairn_bin();
    let _ = cairn_tests::bins::agent_bin();
    let _ = cairn_tests::bins::coordinator_bin();
    let mut child = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/local-cluster"
    ))
    .env("CAIRN_CLUSTER_DIR", dir.path())
    .env("CAIRN_BIN", bin.parent().unwrap())
    .env("CAIRN_ETCD_PORT", free_port().to_string())
    .env("CAIRN_PORT_BASE", "0")
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("Local Cairn cluster up"), "{first:?}");
    let cairn = |sock: &str, args: &[&str]| {
        run(Command::new(&bin)
            .arg("--socket")
            .arg(dir.path().join(sock))
            .args(args))
    };
    let disk = cairn("agent1.sock", &["volume", "create", "--size", "64M", "-q"]);
    cairn("agent2.sock", &["snapshot", disk.trim()]);
    let tags = cairn("agent3.sock", &["--json", "tag", "list"]);
    let tags: serde_json::Value = serde_json::from_str(&tags).unwrap();
    assert_eq!(tags.as_array().unwrap().len(), 2, "{tags}");
    // The coordinators: a disk made through one, snapshotted through the
    // other, seen by both, over the three agents.
    let coord = |n: u8, args: &[&str]| {
        let sock = dir.path().join(format!("coordinator{n}.sock"));
        cairn(
            "agent1.sock",
            &[&["--coordinator", sock.to_str().unwrap()], args].concat(),
        )
    };
    let d2 = coord(1, &["disk", "create", "--size", "64M", "-q"]);
    let s2 = coord(2, &["disk", "snapshot", d2.trim(), "-q"]);
    let shown = coord(1, &["--json", "disk", "show", d2.trim()]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["snapshots"][0]["id"], s2.trim(), "{shown}");
    let agents = coord(2, &["--json", "agents"]);
    let agents: serde_json::Value = serde_json::from_str(&agents).unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 3, "{agents}");
    // The coordinators reach the agents over mutual TLS.
    assert!(
        agents
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["reachable"] == true),
        "{agents}"
    );
    // So does an administrator with its certificate, and without one it
    // is refused.
    let ready = std::fs::read_to_string(dir.path().join("agent1.ready")).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let url = format!("https://{}", ready["listen"].as_str().unwrap());
    let certs = dir.path().join("certs");
    let c = |f: &str| certs.join(f).display().to_string();
    let tcp = |client: &[String]| {
        Command::new(&bin)
            .args(["--agent", &url, "--json", "domains"])
            .args(client)
            .output()
            .unwrap()
    };
    let out = tcp(&[
        "--ca".into(),
        c("ca.pem"),
        "--cert".into(),
        c("admin.pem"),
        "--key".into(),
        c("admin.key"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doms: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doms[0]["name"], "local", "{doms}");
    let out = tcp(&["--ca".into(), c("ca.pem")]);
    assert!(
        !out.status.success(),
        "a client without a certificate got in"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    // Nothing it started is left.
    let left = Command::new("pgrep")
        .args(["-f", &dir.path().display().to_string()])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    cairn_tests::domain::domain_clean(&dir.path().join("domain.img"));
}
