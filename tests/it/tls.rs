//! TLS on TCP with certificates from `deploy/make-certs`: a TCP listener is
//! TLS or explicitly `--insecure`; with a client CA only certificates it
//! signed, and not expired, get in.

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_proto::agent as pb;
use cairn_proto::tls::ClientTlsArgs;
use cairn_proto::transport::{channel_tls, Target};
use cairn_tests::agent::*;
use cairn_tests::ask::AgentCalls;
use cairn_tests::bins::agent_bin;
use cairn_tests::certs::Certs;
use cairn_tests::domain::*;

/// ListDomains over TCP to `url` as a client with these files (None: not
/// presented); the domain names, or why the call failed.
async fn domains_as(
    url: &str,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
) -> Result<Vec<String>, String> {
    let args = ClientTlsArgs {
        ca: Some(ca.to_path_buf()),
        cert: cert.map(|c| c.0.to_path_buf()),
        key: cert.map(|c| c.1.to_path_buf()),
    };
    let tls = args.for_address(url).map_err(|e| e.to_string())?;
    let ch = channel_tls(&Target::Tcp(url.into()), tls)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut c = pb::agent_client::AgentClient::new(ch);
    let r = c
        .list_domains(pb::ListDomainsRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(r.into_inner().domains.into_iter().map(|d| d.name).collect())
}

/// A client certificate of the CA in `certs` that expired yesterday.
fn expired_client(certs: &Certs) {
    let d = &certs.dir;
    let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(d).args(args));
    openssl(&[
        "req",
        "-new",
        "-nodes",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-keyout",
        "old.key",
        "-out",
        "old.csr",
        "-subj",
        "/CN=old",
    ]);
    std::fs::write(d.join("old.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(&[
        "x509", "-req", "-in", "old.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-out", "old.pem",
        "-days", "-1", "-extfile", "old.ext",
    ]);
}

/// A domain, and the directory of an agent's files with no agent running.
fn unstarted() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, dom, plain) = AgentFixture::new(1).parts();
    let home = plain.dir.clone();
    drop(plain);
    (dir, dom, home)
}

#[test]
fn agent_mutual_tls_admits_only_live_certificates_of_its_ca() {
    let (dir, dom, home) = unstarted();
    let certs = Certs::make(&dir.path().join("certs"), &["admin"]);
    let other = Certs::make(&dir.path().join("other"), &["admin"]);
    expired_client(&certs);
    let mut extra = vec!["--listen".to_string(), "127.0.0.1:0".into()];
    extra.extend(certs.server_args());
    let agent = AgentProc::start_with(&dom, &home, &extra);
    let url = agent.listen.clone().unwrap();
    assert!(url.starts_with("https://"), "{url}");
    let f = |c: &Certs, n: &str| c.dir.join(n);
    rt().block_on(async {
        let ca = f(&certs, "ca.pem");
        let admin = (f(&certs, "admin.pem"), f(&certs, "admin.key"));
        let names = domains_as(&url, &ca, Some((&admin.0, &admin.1)))
            .await
            .unwrap();
        assert_eq!(names.len(), 1, "{names:?}");
        // No certificate, one of another CA, an expired one: refused.
        let e = domains_as(&url, &ca, None).await.unwrap_err();
        assert!(!e.is_empty());
        let stranger = (f(&other, "admin.pem"), f(&other, "admin.key"));
        domains_as(&url, &ca, Some((&stranger.0, &stranger.1)))
            .await
            .unwrap_err();
        let old = (f(&certs, "old.pem"), f(&certs, "old.key"));
        domains_as(&url, &ca, Some((&old.0, &old.1)))
            .await
            .unwrap_err();
        // A client that trusts another CA does not trust this server.
        domains_as(&url, &f(&other, "ca.pem"), Some((&admin.0, &admin.1)))
            .await
            .unwrap_err();
        // Plaintext is not served on the TLS port.
        let plain = url.replace("https://", "http://");
        let ch = cairn_proto::transport::channel(&Target::Tcp(plain)).await;
        if let Ok(ch) = ch {
            let mut c = pb::agent_client::AgentClient::new(ch);
            c.list_domains(pb::ListDomainsRequest {}).await.unwrap_err();
        }
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn a_tcp_listener_without_tls_needs_insecure() {
    let (dir, dom, home) = unstarted();
    let run = |extra: &[&str]| {
        Command::new(agent_bin())
            .arg("--domain")
            .arg(&dom)
            .arg("--socket")
            .arg(dir.path().join("x.sock"))
            .arg("--run-dir")
            .arg(dir.path().join("xrun"))
            .arg("--lock-dir")
            .arg(home.join("locks"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("--tls-cert"),
        "{err}"
    );
    // --insecure and TLS flags do not go together.
    let out = run(&["--insecure", "--tls-cert", "c.pem", "--tls-key", "k.pem"]);
    assert!(!out.status.success());
    // With --insecure it serves plaintext.
    let agent = AgentProc::start_with(
        &dom,
        &home,
        &["--listen".into(), "127.0.0.1:0".into(), "--insecure".into()],
    );
    assert!(agent.listen.as_deref().unwrap().starts_with("http://"));
    drop(agent);
    domain_clean(&dom);
}

/// Every mutating request leaves one audit line (JSON log, target `audit`):
/// who (the unix peer's uid, or the client certificate's subject), from
/// where, the method, the request id and the outcome.
#[test]
fn agent_audits_every_mutating_request_with_who_and_from() {
    let (dir, dom, home) = unstarted();
    let certs = Certs::make(&dir.path().join("certs"), &["admin"]);
    let log = dir.path().join("agent.log");
    let mut extra = certs.server_args();
    extra.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let agent = AgentProc::start_logging(&dom, &home, &extra, &log);
    let url = agent.listen.clone().unwrap();
    rt().block_on(async {
        // Over the unix socket, as root.
        let mut c = agent.client().await;
        c.new_disk("audit-unix", pb::VolumeFormat::Raw, 1).await;
        c.delete_volume(pb::DeleteVolumeRequest {
            request_id: "audit-refused".into(),
            volume_id: "not-an-id".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
        // Over TCP with the admin's certificate.
        let args = ClientTlsArgs {
            ca: Some(certs.dir.join("ca.pem")),
            cert: Some(certs.dir.join("admin.pem")),
            key: Some(certs.dir.join("admin.key")),
        };
        let ch = channel_tls(&Target::Tcp(url.clone()), args.for_address(&url).unwrap())
            .await
            .unwrap();
        let mut c = pb::agent_client::AgentClient::new(ch);
        c.new_disk("audit-tls", pb::VolumeFormat::Raw, 1).await;
        // A query leaves none.
        c.volumes().await;
    });
    drop(agent);
    let lines = cairn_tests::auth::audit_lines(&log);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let f = |i: usize, k: &str| {
        lines[i]["fields"][k]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        (
            f(0, "who"),
            f(0, "method"),
            f(0, "request_id"),
            f(0, "outcome")
        ),
        (
            "uid:0".into(),
            "create_volume".into(),
            "audit-unix".into(),
            "ok".into()
        )
    );
    assert_eq!(f(0, "role"), "admin");
    assert!(f(0, "from").starts_with("unix"), "{:?}", lines[0]);
    assert_eq!(
        (f(1, "request_id"), f(1, "outcome")),
        ("audit-refused".into(), "invalid_argument".into())
    );
    assert_eq!(
        (f(2, "who"), f(2, "role"), f(2, "outcome")),
        ("admin".into(), "admin".into(), "ok".into())
    );
    assert!(f(2, "from").starts_with("127.0.0.1:"), "{:?}", lines[2]);
    domain_clean(&dom);
}
