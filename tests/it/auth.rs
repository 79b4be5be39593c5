//! Who is asking, end to end with real TLS and real token files: callers
//! without an identity are refused, a `user` sees and changes only its
//! own disks (others' look absent), the agent API admits only admin and
//! service identities, the unix socket's mode and group decide who may
//! connect and the peer's uid who connected, and etcd is reached over
//! mutual TLS.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use cairn_proto::agent as apb;
use cairn_proto::auth::Role;
use cairn_proto::coordinator as pb;
use cairn_proto::coordinator::coordinator_client::CoordinatorClient;
use cairn_tests::ask::{coord, CoordCalls};
use tonic::Code;
use tonic_types::StatusExt;

use cairn_tests::agent::*;
use cairn_tests::auth::{agent_as, cert, coord_as, token, As, Authed, Tokens};
use cairn_tests::bins::cairn_bin;
use cairn_tests::certs::Certs;
use cairn_tests::coordinator::*;
use cairn_tests::domain::*;
use cairn_tests::etcd::Etcd;
use cairn_tests::Answer;

const MIB: u64 = 1 << 20;

fn create(rid: &str, name: &str) -> pb::CreateDiskRequest {
    coord::create(rid, name, pb::Format::Raw, 4 * MIB)
}

/// The code and stable reason of a refusal.
fn refusal<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("refused");
    let reason = s
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default();
    (s.code(), reason)
}

/// A disk made through the coordinator as the caller of `c`.
async fn made(c: &mut CoordinatorClient<Authed>, rid: &str, name: &str) -> pb::Disk {
    ok(c.create_disk(create(rid, name)).await.answer())
        .disk
        .expect("the disk made")
}

/// A job followed to its end.
async fn done(c: &mut CoordinatorClient<Authed>, mut j: pb::Job) -> pb::Job {
    while j.state == pb::JobState::Running as i32 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        j = c.get_job(pb::GetJobRequest { job_id: j.id }).await.answer();
    }
    j
}

/// The (name, owner) of every disk `c` may see, sorted.
async fn seen(c: &mut CoordinatorClient<Authed>) -> Vec<(String, String)> {
    owners(
        &c.list_disks(pb::ListDisksRequest::default())
            .await
            .answer()
            .disks,
    )
}

/// The (name, owner) of `disks`, sorted.
fn owners(disks: &[pb::Disk]) -> Vec<(String, String)> {
    let mut v: Vec<_> = disks
        .iter()
        .map(|d| (d.name.clone(), d.owner.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn users_see_and_change_only_their_own_disks_and_the_agent_api_is_for_services() {
    let (dir, dom, plain) = AgentFixture::new(1).parts();
    let home = plain.dir.clone();
    drop(plain);
    let certs = Certs::make(&dir.path().join("certs"), &["admin", "service", "carol"]);
    // "service" is also a user's token name: the name grants nothing.
    let tokens = Tokens::make(
        &dir.path().join("tokens"),
        &[
            ("alice", Role::User),
            ("bob", Role::User),
            ("ops", Role::Admin),
            ("service", Role::User),
        ],
    );
    let mut extra = vec!["--listen".to_string(), "127.0.0.1:0".into()];
    extra.extend(certs.server_args());
    extra.extend(tokens.server_args());
    let agent = AgentProc::start_with(&dom, &home, &extra);
    let mut cextra = vec!["--agent".to_string(), agent.socket.display().to_string()];
    cextra.extend(certs.server_args());
    cextra.extend(tokens.server_args());
    let log = dir.path().join("coordinator.log");
    let coord = CoordProc::start_logging(&dir.path().join("coord"), &cextra, &log);
    let url = coord.listen.clone().unwrap();
    let aurl = agent.listen.clone().unwrap();
    rt().block_on(async {
        let anon = As::default();
        let mut nobody = coord_as(&url, &certs, anon).await;
        // No certificate and no token: UNAUTHENTICATED, and nothing made.
        assert_eq!(
            refusal(nobody.create_disk(create("anon", "x")).await),
            (Code::Unauthenticated, "unauthenticated".into())
        );
        assert_eq!(
            refusal(nobody.list_disks(pb::ListDisksRequest::default()).await).0,
            Code::Unauthenticated
        );
        let mut forged = coord_as(&url, &certs, token("cairn_0000")).await;
        assert_eq!(
            refusal(forged.create_disk(create("forged", "x")).await),
            (Code::Unauthenticated, "unknown_token".into())
        );

        let mut alice = coord_as(&url, &certs, token(tokens.of("alice"))).await;
        let mut bob = coord_as(&url, &certs, token(tokens.of("bob"))).await;
        let mut carol = coord_as(&url, &certs, cert("carol")).await;
        let mut ops = coord_as(&url, &certs, token(tokens.of("ops"))).await;
        let mut admin = coord_as(&url, &certs, cert("admin")).await;
        for (c, want) in [
            (&mut alice, ("alice", "user")),
            (&mut carol, ("carol", "user")),
            (&mut ops, ("ops", "admin")),
            (&mut admin, ("admin", "admin")),
        ] {
            let w = c.who_am_i(pb::WhoAmIRequest {}).await.answer();
            assert_eq!((w.name.as_str(), w.role.as_str()), want);
        }
        let a = made(&mut alice, "a-create", "a-disk").await;
        let get = |id: &str| pb::GetDiskRequest {
            domain: String::new(),
            disk_id: id.into(),
        };
        assert_eq!(alice.get_disk(get(&a.id)).await.answer().owner, "alice");
        let b = made(&mut bob, "b-create", "b-disk").await;
        made(&mut carol, "c-create", "c-disk").await;
        let snap = alice
            .snapshot_disk(coord::snapshot("a-snap", "", &a.id))
            .await
            .answer()
            .snapshot_id;
        let clone = ok(alice
            .clone_disk(coord::clone("a-clone", "", &snap, "a-clone"))
            .await
            .answer());
        let cl = clone.disk.unwrap().id;
        assert_eq!(ops.get_disk(get(&cl)).await.answer().owner, "alice");

        // Alice sees her own disks only.
        assert_eq!(
            seen(&mut alice).await,
            vec![
                ("a-clone".into(), "alice".into()),
                ("a-disk".into(), "alice".into())
            ]
        );
        // Bob's disk and snapshot are as absent to her as a disk that never
        // was: the same code and the same message but for the id.
        let ghost = cairn_domain::TagId::generate(9).to_string();
        let theirs = alice.get_disk(get(&b.id)).await.unwrap_err();
        let none = alice.get_disk(get(&ghost)).await.unwrap_err();
        assert_eq!(
            (theirs.code(), none.code()),
            (Code::NotFound, Code::NotFound)
        );
        assert_eq!(
            theirs.message().replace(&b.id, "ID"),
            none.message().replace(&ghost, "ID")
        );
        let bsnap = bob
            .snapshot_disk(coord::snapshot("b-snap", "", &b.id))
            .await
            .answer()
            .snapshot_id;
        let refused = [
            refusal(alice.delete_disk(coord::delete("x1", "", &b.id)).await),
            refusal(alice.snapshot_disk(coord::snapshot("x2", "", &b.id)).await),
            refusal(
                alice
                    .extend_disk(coord::extend("x3", "", &b.id, 8 * MIB))
                    .await,
            ),
            refusal(alice.clone_disk(coord::clone("x4", "", &bsnap, "")).await),
            refusal(
                alice
                    .delete_snapshot(coord::delete_snapshot("x5", "", &bsnap))
                    .await,
            ),
        ];
        for r in &refused {
            assert_eq!(r.0, Code::NotFound, "{refused:?}");
        }
        // Nor are his jobs hers, nor his request ids.
        let bjob = bob.list_jobs(pb::ListJobsRequest::default()).await.answer();
        assert_eq!(bjob.jobs.len(), 2, "{bjob:?}");
        assert!(bjob.jobs.iter().all(|j| j.caller == "bob"));
        let get_job = |id: &str| pb::GetJobRequest { job_id: id.into() };
        assert_eq!(
            refusal(alice.get_job(get_job(&bjob.jobs[0].id)).await).0,
            Code::NotFound
        );
        assert_eq!(
            alice
                .list_jobs(pb::ListJobsRequest::default())
                .await
                .answer()
                .jobs
                .len(),
            3
        );
        assert_eq!(
            refusal(bob.create_disk(create("a-create", "a-disk")).await),
            (Code::InvalidArgument, "request_id_reused".into())
        );
        // Which agents there are is for admins and services.
        assert_eq!(
            refusal(alice.list_agents(pb::ListAgentsRequest {}).await).0,
            Code::PermissionDenied
        );
        ops.list_agents(pb::ListAgentsRequest {}).await.answer();

        // Admins see and act on everything; bob's disk is as it was.
        assert_eq!(
            seen(&mut ops).await,
            vec![
                ("a-clone".into(), "alice".into()),
                ("a-disk".into(), "alice".into()),
                ("b-disk".into(), "bob".into()),
                ("c-disk".into(), "carol".into()),
            ]
        );
        let b_now = ops.get_disk(get(&b.id)).await.answer();
        assert_eq!((b_now.size, b_now.snapshots.len()), (4 * MIB, 1));
        let merge = admin
            .delete_snapshot(coord::delete_snapshot("admin-merge", "", &bsnap))
            .await
            .answer();
        ok(done(&mut admin, merge).await);

        // The agent API: admin and service identities only. A user's token
        // is refused whatever it is named and whatever else it sends.
        let list = || apb::ListDomainsRequest {};
        for who in [
            token(tokens.of("alice")),
            token(tokens.of("service")),
            cert("carol"),
        ] {
            let mut c = agent_as(&aurl, &certs, who).await;
            assert_eq!(
                refusal(c.list_domains(list()).await).0,
                Code::PermissionDenied
            );
        }
        let mut c = agent_as(&aurl, &certs, token(tokens.of("service"))).await;
        let mut r = tonic::Request::new(list());
        r.metadata_mut()
            .insert("x-cairn-role", "service".parse().unwrap());
        assert_eq!(
            c.list_domains(r).await.unwrap_err().code(),
            Code::PermissionDenied
        );
        let mut c = agent_as(&aurl, &certs, As::default()).await;
        assert_eq!(
            refusal(c.list_domains(list()).await).0,
            Code::Unauthenticated
        );
        for who in [cert("service"), cert("admin"), token(tokens.of("ops"))] {
            let mut c = agent_as(&aurl, &certs, who).await;
            assert_eq!(c.list_domains(list()).await.answer().domains.len(), 1);
        }
    });
    drop(coord);
    // Every mutating request left an audit line naming the identity.
    let audit = cairn_tests::auth::audit_lines(&log);
    let line = |rid: &str| {
        audit
            .iter()
            .find(|v| v["fields"]["request_id"] == rid)
            .unwrap_or_else(|| panic!("no audit line for {rid}: {audit:#?}"))
            .clone()
    };
    let f = line("a-create");
    assert_eq!(
        (
            &f["fields"]["who"],
            &f["fields"]["role"],
            &f["fields"]["outcome"]
        ),
        (&"alice".into(), &"user".into(), &"ok".into())
    );
    assert!(f["fields"]["from"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let f = line("x1");
    assert_eq!(f["fields"]["outcome"], "not_found");
    assert_eq!(line("admin-merge")["fields"]["who"], "admin");
    // The refusals of the gate are there too, with nobody's name.
    assert!(
        audit
            .iter()
            .any(|v| v["fields"]["reason"] == "unauthenticated"),
        "{audit:#?}"
    );
    drop(agent);
    domain_clean(&dom);
}

/// A copy of the `cairn` binary that any uid may run.
fn cairn_for_anyone(dir: &Path) -> std::path::PathBuf {
    let bin = dir.join("cairn");
    std::fs::copy(cairn_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// `cairn ARGS` as uid and gid 65534 (nobody, nogroup).
fn as_nobody(bin: &Path, args: &[&str]) -> std::process::Output {
    // As root, std drops the supplementary groups when it sets the uid.
    let mut c = Command::new(bin);
    c.args(args).uid(65534).gid(65534);
    c.output().unwrap()
}

#[test]
fn root_the_socket_mode_and_group_decide_who_connects_and_the_uid_who_it_is() {
    let (dir, dom, agent) = AgentFixture::new(1).parts();
    // Others may pass through the directory to the sockets.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let bin = cairn_for_anyone(dir.path());
    let agent_sock = agent.socket.display().to_string();
    let closed = CoordProc::start(
        &dir.path().join("closed"),
        &["--agent".into(), agent_sock.clone()],
    );
    let group = CoordProc::start(
        &dir.path().join("group"),
        &[
            "--agent".into(),
            agent_sock,
            "--socket-group".into(),
            "65534".into(),
        ],
    );
    for d in ["closed", "group"] {
        std::fs::set_permissions(dir.path().join(d), std::fs::Permissions::from_mode(0o711))
            .unwrap();
    }
    // The default: owner and group only, the process's group.
    let m = std::fs::metadata(&closed.socket).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o660, 0));
    let m = std::fs::metadata(&group.socket).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o660, 65534));
    let s = |p: &CoordProc| p.socket.display().to_string();
    let out = as_nobody(&bin, &["--coordinator", &s(&closed), "whoami"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the coordinator"),
        "{out:?}"
    );
    // Through the group's socket nobody is the user uid:65534.
    let out = as_nobody(&bin, &["--coordinator", &s(&group), "whoami"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "uid:65534 (user)",
        "{out:?}"
    );
    let out = as_nobody(
        &bin,
        &[
            "--coordinator",
            &s(&group),
            "--json",
            "disk",
            "create",
            "--name",
            "mine",
            "--size",
            "4M",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    rt().block_on(async {
        // Root is the local administrator and owns what it makes.
        let mut c = group.client().await;
        ok(c.create_disk(create("root-disk", "roots")).await.answer());
        let all = owners(&c.disks().await);
        let want = [("mine", "uid:65534"), ("roots", "uid:0")];
        assert_eq!(all, want.map(|(n, o)| (n.to_string(), o.to_string())));
    });
    let out = as_nobody(
        &bin,
        &["--coordinator", &s(&group), "--json", "disk", "list"],
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = cairn_tests::data::strings(&listed, "name");
    assert_eq!(listed, vec!["mine"]);
    // The agent's socket: nobody may not connect at all.
    let out = as_nobody(
        &bin,
        &[
            "--socket",
            &agent.socket.display().to_string(),
            "volume",
            "list",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    drop((closed, group, agent));
    domain_clean(&dom);
}

#[test]
fn etcd_over_mutual_tls_for_agents_and_coordinators() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(&dir.path().join("certs"), &["service", "stranger:user"]);
    let etcd = Etcd::start_tls(&certs);
    assert!(etcd.url().starts_with("https://"));
    let dom = dir.path().join("domain.img");
    make_domain(&dom, 1);
    let mut a = vec!["--etcd".to_string(), etcd.url(), "--host-id".into()];
    a.push(uuid::Uuid::from_bytes([3; 16]).to_string());
    a.extend(etcd.client_args());
    a.extend(["--listen".to_string(), "127.0.0.1:0".into()]);
    a.extend(certs.server_args());
    let agent = AgentProc::start_with(&dom, &dir.path().join("a"), &a);
    let mut c = vec!["--etcd".to_string(), etcd.url()];
    c.extend(etcd.client_args());
    c.extend(certs.client_args("service"));
    let coord = CoordProc::start(&dir.path().join("c"), &c);
    rt().block_on(async {
        let mut cc = coord.client().await;
        // The agent registered through etcd; the coordinator finds it there.
        let mut found = false;
        for _ in 0..100 {
            let r = cc.list_agents(pb::ListAgentsRequest {}).await.answer();
            if !r.agents.is_empty() {
                found = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(found, "the agent registers through etcd over TLS");
        ok(cc.create_disk(create("over-tls", "t")).await.answer());
        // etcd admits no client without a certificate of the CA.
        let ca = std::fs::read(certs.dir.join("ca.pem")).unwrap();
        let tls =
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
        let opts = etcd_client::ConnectOptions::new()
            .with_tls(tls)
            .with_timeout(std::time::Duration::from_secs(2));
        let r = match etcd_client::Client::connect([etcd.url()], Some(opts)).await {
            Ok(mut cl) => cl.get("cairn/", None).await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(r.is_err(), "etcd answered a client without a certificate");
        // With one it does, and the cluster's keys are there.
        let mut cl = etcd_client::Client::connect([etcd.url()], etcd.connect_options())
            .await
            .unwrap();
        let keys = cl
            .get(
                "cairn/agents/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert_eq!(keys.kvs().len(), 1);
    });
    drop(coord);
    drop(agent);
    domain_clean(&dom);
}
