//! Disks made from images through the `cairn` CLI, over a real agent on
//! two domain files: a thin layer on a raw image's own file, a qcow2 image
//! and another domain's image copied once into the domain's cache and
//! shared, what a caller may not use or ask for refused with nothing
//! made, an image that names a backing file refused from its bytes, and
//! the caches removed once their image is unregistered and unused. The
//! data is read back through activations with qemu-img.

use std::path::Path;
use std::process::Command;

use cairn_proto::agent as apb;
use cairn_proto::auth::Role;
use cairn_tests::agent::{rt, run, AgentProc};
use cairn_tests::auth::Tokens;
use cairn_tests::coordinator::{activate, check_disk, deactivate, CoordProc};
use cairn_tests::data::{assert_reads_like, write_both};
use cairn_tests::domain::{domain_clean, make_named_domain};
use cairn_tests::Answer;
use serde_json::Value;

use crate::files::{pattern, Cli};

const MIB: u64 = 1 << 20;

#[track_caller]
pub(crate) fn json(c: &Cli<'_>, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = c.run(&a);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "cairn {a:?}: {:?} {out} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&out).unwrap()
}

/// `disk create --from-image` as `c`, on `domain` ("" for the image's);
/// the new disk's id.
fn from_image(c: &Cli<'_>, domain: &str, image: &str, extra: &[&str]) -> String {
    let mut a = vec![
        "--domain",
        domain,
        "disk",
        "create",
        "-q",
        "--from-image",
        image,
    ];
    a.extend_from_slice(extra);
    c.ok(&a).trim().to_string()
}

/// The image caches on `domain`, as the agent lists its tags.
async fn caches(
    a: &mut apb::agent_client::AgentClient<tonic::transport::Channel>,
    domain: &str,
) -> Vec<apb::Tag> {
    let tags = a
        .list_tags(apb::ListTagsRequest {
            domain: domain.into(),
        })
        .await
        .answer()
        .tags;
    tags.into_iter()
        .filter(|t| {
            t.options
                .iter()
                .any(|o| o.key == "cairn.kind" && o.value == "image-cache")
        })
        .collect()
}

fn qcow2_image(path: &Path, extra: &[&str]) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"])
        .args(extra)
        .arg(path)
        .arg("8M");
    run(&mut c);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 90 1M 1M"])
        .arg(path));
}

#[test]
fn root_qemu_disks_from_images_thin_cached_shared_and_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("one.img"), dir.path().join("two.img"));
    make_named_domain(&d1, 2, "one");
    make_named_domain(&d2, 2, "two");
    let agent = AgentProc::start_with(
        &d1,
        &dir.path().join("agent"),
        &["--domain".into(), d2.display().to_string()],
    );
    let tokens = Tokens::make(
        &dir.path().join("tokens"),
        &[("alice", Role::User), ("bob", Role::User)],
    );
    let mut extra = vec![
        "--agent".to_string(),
        agent.socket.display().to_string(),
        // The leader's sweeps (and so its removal of unused caches) every
        // 2 s.
        "--orphan-quarantine".into(),
        "2".into(),
    ];
    extra.extend(tokens.server_args());
    let coord = CoordProc::start(&dir.path().join("coord"), &extra);
    let cwd = std::fs::canonicalize(dir.path()).unwrap();
    let cli = |who: Option<&'static str>| Cli {
        coord: &coord.socket,
        token: who.map(|u| tokens.of(u)),
        cwd: &cwd,
    };
    let (alice, bob, admin) = (cli(Some("alice")), cli(Some("bob")), cli(None));
    let exp = |n: &str| cwd.join(format!("{n}.expected"));

    // A raw image (3 MiB and 512 bytes) and a qcow2 one (8 MiB, 1 MiB of
    // 0x5a at 1 MiB), both on domain one.
    let raw = pattern((3 * MIB + 512) as usize, 7);
    std::fs::write(cwd.join("raw.img"), &raw).unwrap();
    std::fs::write(exp("raw"), &raw).unwrap();
    qcow2_image(&cwd.join("q.qcow2"), &[]);
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(cwd.join("q.qcow2"))
        .arg(exp("q")));
    alice.ok(&["file", "upload", "raw.img", "one:images/raw.img"]);
    alice.ok(&["file", "upload", "q.qcow2", "one:images/q.qcow2"]);
    let reg = |name: &str, loc: &str, fmt: &str| -> Value {
        json(
            &alice,
            &[
                "image",
                "register",
                name,
                loc,
                "--disk-format",
                fmt,
                "--alias",
                &name.to_lowercase(),
                "--no-metafile-upload",
            ],
        )
    };
    let raw_id = reg("Raw", "one:images/raw.img", "raw")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let q = reg("Q", "one:images/q.qcow2", "qcow2");
    assert_eq!(q["virtual-size"].as_u64(), Some(8 * MIB), "{q}");
    let before1 = rt().block_on(async {
        let mut a = agent.client().await;
        a.list_tags(apb::ListTagsRequest {
            domain: "one".into(),
        })
        .await
        .answer()
        .tags
        .len()
    });

    // Refused with nothing made: another user's private image (as if it
    // did not exist), a size below the image's, a format or allocation a
    // thin layer cannot have, an image that is no disk.
    bob.refused(&["disk", "create", "--from-image", "raw"], "not_found");
    alice.refused(
        &["disk", "create", "--from-image", "q", "--size", "1M"],
        "smaller than image",
    );
    let o = alice.run(&["disk", "create", "--from-image", "q", "--preallocate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
    std::fs::write(cwd.join("notes.txt"), pattern(5000, 3)).unwrap();
    alice.ok(&["file", "upload", "notes.txt", "one:notes.txt"]);
    json(
        &alice,
        &[
            "image",
            "register",
            "Notes",
            "one:notes.txt",
            "--disk-format",
            "iso",
            "--alias",
            "notes",
            "--no-metafile-upload",
        ],
    );
    alice.refused(
        &["disk", "create", "--from-image", "notes"],
        "disks are made from raw and qcow2 images",
    );
    let listed = |c: &Cli<'_>| json(c, &["disk", "list"]).as_array().unwrap().len();
    assert_eq!(listed(&admin), 0);

    // A raw image on its own domain: one layer on the file itself, no
    // cache; the disk reads as the image and its writes leave the file.
    let d_raw = from_image(&alice, "", "raw", &[]);
    let v = json(&alice, &["--domain", "one", "disk", "show", &d_raw]);
    assert_eq!(v["image"], raw_id.as_str(), "{v}");
    assert_eq!(v["domain_name"], "one");
    assert_eq!(v["size"].as_u64(), Some(3 * MIB + 512));
    assert_eq!(v["chain"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["chain"][0]["format"], "raw");
    assert_eq!(v["owner"], "alice");
    rt().block_on(async {
        let mut a = agent.client().await;
        assert!(caches(&mut a, "one").await.is_empty());
        let tags = a
            .list_tags(apb::ListTagsRequest {
                domain: "one".into(),
            })
            .await
            .answer()
            .tags;
        assert_eq!(tags.len(), before1 + 2, "the Notes file and the disk's tag");
        let p = activate(&mut a, "one", &d_raw).await;
        assert_reads_like(&p, &exp("raw"));
        std::fs::copy(exp("raw"), exp("raw-disk")).unwrap();
        write_both(&p, &exp("raw-disk"), 0, MIB, 0x33);
        deactivate(&mut a, "one", &d_raw).await;
        check_disk(&mut a, "one", &d_raw, &exp("raw-disk")).await;
    });
    let back = alice.run(&["file", "cat", "one:images/raw.img"]);
    assert!(back.status.success());
    assert_eq!(back.stdout.len(), raw.len());
    assert!(back.stdout == raw, "the image's file changed");

    // A qcow2 image: copied once into the domain's cache, judged from its
    // bytes; two disks share it.
    let d_q1 = from_image(&alice, "one", "q", &["--name", "q1"]);
    let d_q2 = from_image(
        &alice,
        "one",
        &q["id"].as_str().unwrap()[..8],
        &["--size", "16M"],
    );
    let v2 = json(&alice, &["--domain", "one", "disk", "show", &d_q2]);
    assert_eq!(v2["size"].as_u64(), Some(16 * MIB));
    rt().block_on(async {
        let mut a = agent.client().await;
        let c = caches(&mut a, "one").await;
        assert_eq!(c.len(), 1, "one cache for two disks: {c:?}");
        assert_eq!(c[0].child_refs, 2);
        check_disk(&mut a, "one", &d_q1, &exp("q")).await;
        check_disk(&mut a, "one", &d_q2, &exp("q")).await;
    });

    // Another domain: the raw image copied there once, then thin layers.
    alice.ok(&["image", "meta", "set", "raw", "--publish"]);
    let d_two = from_image(&bob, "two", "raw", &[]);
    let d_two_b = from_image(&alice, "two", "raw", &[]);
    assert_eq!(
        json(&bob, &["--domain", "two", "disk", "show", &d_two])["owner"],
        "bob"
    );
    rt().block_on(async {
        let mut a = agent.client().await;
        let c = caches(&mut a, "two").await;
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].child_refs, 2);
        check_disk(&mut a, "two", &d_two, &exp("raw")).await;
        check_disk(&mut a, "two", &d_two_b, &exp("raw")).await;
    });

    // A snapshot of a disk from an image, merged away, keeps its data.
    let snap = alice
        .ok(&["--domain", "one", "disk", "snapshot", "-q", &d_raw])
        .trim()
        .to_string();
    alice.ok(&["--domain", "one", "disk", "delete-snapshot", &snap]);
    rt().block_on(async {
        let mut a = agent.client().await;
        check_disk(&mut a, "one", &d_raw, &exp("raw-disk")).await;
    });

    // An image whose header names a backing file is refused from its
    // bytes: the job fails, and no cache or disk is left.
    qcow2_image(&cwd.join("evil.qcow2"), &["-b", "/etc/passwd", "-F", "raw"]);
    alice.ok(&["file", "upload", "evil.qcow2", "one:evil.qcow2"]);
    json(
        &alice,
        &[
            "image",
            "register",
            "Evil",
            "one:evil.qcow2",
            "--disk-format",
            "qcow2",
            "--alias",
            "evil",
            "--no-metafile-upload",
        ],
    );
    let n = listed(&admin);
    let o = alice.run(&["disk", "create", "--from-image", "evil"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("has a backing file"), "{text}");
    assert_eq!(listed(&admin), n);
    rt().block_on(async {
        let mut a = agent.client().await;
        assert_eq!(caches(&mut a, "one").await.len(), 1);
    });

    // Unregistered while disks use them, the caches stay; once their
    // disks are gone too, they go (the leader's sweep, or the unregister).
    alice.ok(&["image", "unregister", "q"]);
    rt().block_on(async {
        let mut a = agent.client().await;
        assert_eq!(caches(&mut a, "one").await.len(), 1);
    });
    alice.ok(&["--domain", "one", "disk", "delete", &d_q1]);
    alice.ok(&["--domain", "one", "disk", "delete", &d_q2]);
    rt().block_on(async {
        let mut a = agent.client().await;
        let t0 = std::time::Instant::now();
        while !caches(&mut a, "one").await.is_empty() {
            assert!(t0.elapsed().as_secs() < 30, "the unused cache stayed");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    bob.ok(&["--domain", "two", "disk", "delete", &d_two]);
    alice.ok(&["--domain", "two", "disk", "delete", &d_two_b]);
    alice.ok(&["image", "unregister", "raw"]);
    rt().block_on(async {
        let mut a = agent.client().await;
        assert!(
            caches(&mut a, "two").await.is_empty(),
            "unregister removes unused caches"
        );
    });
    // The file under a disk cannot go, even once its image is unregistered.
    alice.refused(
        &["file", "delete", "one:images/raw.img"],
        "is the base of 1 disk layer(s)",
    );
    alice.ok(&["--domain", "one", "disk", "delete", &d_raw]);
    alice.ok(&["file", "delete", "one:images/raw.img"]);
    drop(coord);
    drop(agent);
    domain_clean(&d1);
    domain_clean(&d2);
}
