//! Seed 004's image store through the `cairn` CLI: ids given or derived
//! and never shared, names unique and taken away, lookup by id, name or
//! prefix, data items with sizes and digests, flags and metadata, a
//! read-only catalog, names given twice and their repair, and the wipe.

use cairn_proto::agent as apb;
use cairn_tests::agent::rt;
use cairn_tests::coordinator::CoordProc;
use serde_json::Value;

use crate::files::{pattern, Cli, TwoUsers};

fn info(c: &Cli<'_>, image: &str) -> Value {
    serde_json::from_str(&c.ok(&["--json", "image", "info", image])).unwrap()
}

fn sha(b: &[u8]) -> String {
    cairn_proto::auth::hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

/// Upload `n` small files `PREFIXi.raw` as the CLI's user.
fn files(c: &Cli<'_>, cwd: &std::path::Path, prefix: &str, n: usize) {
    for i in 0..n {
        let name = format!("{prefix}{i}.raw");
        std::fs::write(cwd.join(&name), pattern(5000 + i, i as u32)).unwrap();
        c.ok(&["file", "upload", &name, &format!("it:{name}")]);
    }
}

#[test]
fn cairn_image_store_ids_names_prefixes_data_and_flags() {
    let h = TwoUsers::start();
    let (alice, bob) = (h.cli(Some("alice")), h.cli(Some("bob")));
    files(&alice, &h.cwd, "a", 4);
    files(&bob, &h.cwd, "b", 1);
    let reg = |c: &Cli<'_>, extra: &[&str]| -> Value {
        let mut args = vec!["--json", "image", "register"];
        args.extend_from_slice(extra);
        args.push("--no-metafile-upload");
        serde_json::from_str(&c.ok(&args)).unwrap()
    };

    // Ids: given, or the file's own; a given id another image has is
    // ALREADY_EXISTS, and a bad one is refused with nothing registered.
    let a0 = reg(
        &alice,
        &["A0", "it:a0.raw", "--id", "abc1", "--alias", "debian:12"],
    );
    assert_eq!(a0["id"], "abc1");
    assert_eq!(a0["names"], serde_json::json!(["debian:12"]));
    let a1 = reg(&alice, &["A1", "it:a1.raw", "--id", "abc2"]);
    assert_eq!(a1["id"], "abc2");
    let a2 = reg(&alice, &["A2", "it:a2.raw"]);
    let a2_id = a2["id"].as_str().unwrap().to_string();
    assert_eq!(a2_id.len(), 36, "{a2_id}");
    let e = alice.refused(
        &[
            "image",
            "register",
            "X",
            "it:a3.raw",
            "--id",
            "abc1",
            "--no-metafile-upload",
        ],
        "image id abc1 is taken",
    );
    assert!(e.contains("already_exists"), "{e}");
    for bad in ["..", "a/b", "x y"] {
        alice.refused(
            &[
                "image",
                "register",
                "X",
                "it:a3.raw",
                "--id",
                bad,
                "--no-metafile-upload",
            ],
            "invalid image_id",
        );
    }
    // Registering the same file again keeps its given id.
    assert_eq!(
        reg(&alice, &["A0 again", "it:a0.raw", "--alias", "debian:12"])["id"],
        "abc1"
    );

    // Names: a taken one is ALREADY_EXISTS; `names set` takes it away.
    alice.refused(
        &[
            "image",
            "register",
            "X",
            "it:a3.raw",
            "--alias",
            "debian:12",
            "--no-metafile-upload",
        ],
        "image name \"debian:12\" is image abc1's",
    );
    assert_eq!(
        alice
            .ok(&["image", "names", "set", "abc2", "debian:12", "stable"])
            .trim(),
        "abc2 debian:12 stable"
    );
    assert_eq!(info(&alice, "abc1")["names"], serde_json::json!([]));
    assert_eq!(info(&alice, "debian:12")["id"], "abc2");
    // Bob may not take a name from alice's image, nor change hers.
    let b0 = reg(&bob, &["B0", "it:b0.raw", "--alias", "bobs"]);
    bob.refused(
        &[
            "image",
            "names",
            "set",
            b0["id"].as_str().unwrap(),
            "stable",
        ],
        "another owner",
    );
    bob.refused(&["image", "names", "set", "stable", "x"], "not found");

    // Prefixes: unambiguous ones name the image; an ambiguous one lists
    // the candidates; bob's prefixes see only what bob may see.
    assert_eq!(info(&alice, &a2_id[..6])["id"], a2_id.as_str());
    alice.refused(&["image", "info", "abc"], "prefix \"abc\" names abc1, abc2");
    bob.refused(&["image", "info", "abc"], "not found");

    // Metadata and flags.
    alice.ok(&["image", "metadata", "abc1", "{\"layers\":3}"]);
    alice.ok(&["image", "flag", "set", "abc1", "readonly"]);
    alice.ok(&["image", "flag", "set", "abc1", "arch", "arm64"]);
    alice.ok(&["image", "flag", "clear", "abc1", "readonly"]);
    let i = info(&alice, "abc1");
    assert_eq!(i["metadata"], "{\"layers\":3}");
    assert_eq!(i["flags"], serde_json::json!({"arch": "arm64"}));
    let text = alice.ok(&["image", "info", "abc1"]);
    assert!(text.contains("metadata:         {\"layers\":3}"), "{text}");

    // Data items: sizes and digests as the bytes say; a new value replaces
    // the old; a removed one is gone; another user may not add one.
    let manifest = pattern((3 << 20) + 7, 9);
    std::fs::write(h.cwd.join("manifest"), &manifest).unwrap();
    std::fs::write(h.cwd.join("sig"), b"signed").unwrap();
    let said = alice.ok(&["image", "data", "set", "abc1", "manifest", "manifest"]);
    assert_eq!(
        said.trim(),
        format!("manifest {} {}", manifest.len(), sha(&manifest))
    );
    alice.ok(&["image", "data", "set", "abc1", "sig", "sig"]);
    alice.ok(&["image", "data", "set", "abc1", "sig", "sig"]);
    let listed = alice.ok(&["image", "data", "list", "abc1"]);
    assert_eq!(
        listed,
        format!(
            "manifest {} {}\nsig 6 {}\n",
            manifest.len(),
            sha(&manifest),
            sha(b"signed")
        )
    );
    alice.ok(&["image", "data", "get", "abc1", "manifest", "back"]);
    assert!(std::fs::read(h.cwd.join("back")).unwrap() == manifest);
    assert_eq!(alice.ok(&["image", "data", "get", "abc1", "sig"]), "signed");
    alice.ok(&["image", "data", "remove", "abc1", "sig"]);
    alice.refused(&["image", "data", "get", "abc1", "sig"], "not found");
    bob.refused(&["image", "data", "set", "abc1", "x", "sig"], "not found");
    alice.refused(
        &["image", "data", "set", "abc1", "../x", "sig"],
        "invalid key",
    );
    // The data directory is not a caller's: hidden, and not writable.
    assert!(!alice.ok(&["file", "list", "it:"]).contains(".images"));
    alice.refused(
        &["file", "upload", "sig", "it:.images/abc1/sig"],
        "holds the images' data items",
    );
    alice.refused(
        &["file", "delete", "it:.images/abc1/manifest"],
        "holds the images' data items",
    );

    // Unregistering takes the data items along; the file stays.
    alice.ok(&["image", "unregister", "abc1"]);
    let admin = h.cli(None);
    assert!(admin.ok(&["file", "list", "it:.images/"]).trim().is_empty());
    assert!(alice.ok(&["file", "list", "it:"]).contains("a0.raw"));
    h.stop_and_check();
}

#[test]
fn cairn_read_only_catalog_serves_reads_and_reports_names_given_twice() {
    let h = TwoUsers::start();
    let alice = h.cli(Some("alice"));
    files(&alice, &h.cwd, "a", 2);
    for (i, id) in ["one", "two"].iter().enumerate() {
        let loc = format!("it:a{i}.raw");
        let alias = format!("n{i}");
        alice.ok(&["image", "register", id, &loc, "--id", id, "--alias", &alias]);
    }
    // Give image two the name of image one behind the coordinator's back,
    // as a second domain's commit racing the first would.
    rt().block_on(async {
        let mut c = h.agent.client().await;
        let dom = c
            .list_domains(apb::ListDomainsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .domains[0]
            .id
            .clone();
        let l = c
            .list_files(apb::ListFilesRequest {
                domain: dom.clone(),
                with_images: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // The same listing in pages of at least one version each, in tag
        // order, each naming where the next starts.
        let mut paged = Vec::new();
        let mut after = String::new();
        loop {
            let p = c
                .list_files(apb::ListFilesRequest {
                    domain: dom.clone(),
                    with_images: true,
                    page_after: after.clone(),
                    page_bytes: 1,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(p.files.len(), 1, "{p:?}");
            assert_eq!(p.generation, l.generation);
            paged.extend(p.files);
            if p.next_page_after.is_empty() {
                break;
            }
            after = p.next_page_after;
        }
        let mut whole = l.files.clone();
        whole.sort_by(|a, b| a.tag_id.cmp(&b.tag_id));
        assert_eq!(paged, whole);
        assert!(whole.len() >= 4, "two files and their metafiles");
        let f = l.files.iter().find(|f| f.image == "two").unwrap();
        let mut rec: Value = serde_json::from_slice(&f.image_record).unwrap();
        rec["names"] = serde_json::json!(["n0", "n1"]);
        rec["updated_at"] = serde_json::json!(4_000_000_000u64);
        c.set_file_image(apb::SetFileImageRequest {
            request_id: "dup".into(),
            domain: dom,
            tag_id: f.tag_id.clone(),
            image_id: "two".into(),
            record: serde_json::to_vec(&rec).unwrap(),
            expect_generation: Some(l.generation),
            ..Default::default()
        })
        .await
        .unwrap();
    });

    // A read-only coordinator on the same domain: every read, no change,
    // and the name given twice reported, not repaired.
    let mut extra = vec!["--agent".to_string(), h.agent.socket.display().to_string()];
    extra.extend(h.tokens.server_args());
    extra.push("--read-only".into());
    let ro = CoordProc::start(&h.cwd.parent().unwrap().join("coord-ro"), &extra);
    let ro_alice = Cli {
        coord: &ro.socket,
        token: Some(h.tokens.of("alice")),
        cwd: &h.cwd,
    };
    let o = ro_alice.run(&["image", "list"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("name \"n0\" is given to images one, two"),
        "{err}"
    );
    ro_alice.refused(&["image", "info", "n0"], "name \"n0\" names one, two");
    assert_eq!(info(&ro_alice, "n1")["id"], "two");
    assert_eq!(
        ro_alice.run(&["file", "cat", "it:a0.raw"]).stdout.len(),
        5000
    );
    std::fs::write(h.cwd.join("x"), b"x").unwrap();
    let disk = alice.ok(&["disk", "create", "-q", "--size", "1M"]);
    for args in [
        &["image", "create", "--from-disk", disk.trim(), "X"][..],
        &["image", "register", "X", "it:a1.raw", "-f"],
        &["image", "unregister", "one"],
        &["image", "names", "set", "one", "z"],
        &["image", "flag", "set", "one", "f"],
        &["image", "data", "set", "one", "k", "x"],
        &["image", "data", "remove", "one", "k"],
        &["file", "upload", "x", "it:x"],
        &["file", "delete", "it:a0.raw.meta"],
    ] {
        let e = ro_alice.refused(args, "catalog is read-only");
        assert!(e.contains("failed_precondition"), "{args:?}: {e}");
    }
    ro_alice.refused(&["image", "wipe", "--yes"], "catalog is read-only");

    // The writable coordinator repairs it at its next read: the image
    // changed last keeps the name.
    let o = alice.run(&["image", "list"]);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(info(&alice, "n0")["id"], "two");
    assert_eq!(info(&alice, "one")["names"], serde_json::json!([]));
    assert!(String::from_utf8_lossy(&ro_alice.run(&["image", "list"]).stderr).is_empty());
    drop(ro);

    // The wipe: admin only; every record goes, no file.
    alice.refused(&["image", "wipe", "--yes"], "only an admin may");
    let admin = h.cli(None);
    assert_eq!(
        admin.ok(&["image", "wipe", "--yes"]).trim(),
        "Unregistered 2 images"
    );
    assert!(admin.ok(&["image", "list"]).trim().is_empty());
    let listed = alice.ok(&["file", "list", "it:"]);
    assert!(
        listed.contains("a0.raw") && listed.contains("a1.raw"),
        "{listed}"
    );
    // Registered again, an image gets its file's id: ids are not reused.
    let again: Value =
        serde_json::from_str(&alice.ok(&["--json", "image", "register", "A", "it:a0.raw", "-f"]))
            .unwrap();
    assert_ne!(again["id"], "one");
    h.stop_and_check();
}

/// `image list --since` as `c`: (changed ids, removed ids, the domain's
/// generation, whether only changes were given).
fn since(c: &Cli<'_>, g: u64) -> (Vec<String>, Vec<String>, u64, bool) {
    let v: Value =
        serde_json::from_str(&c.ok(&["--json", "image", "list", "--since", &format!("it={g}")]))
            .unwrap();
    let ids = |k: &str, f: &dyn Fn(&Value) -> String| -> Vec<String> {
        let mut v: Vec<String> = v[k].as_array().unwrap().iter().map(f).collect();
        v.sort();
        v
    };
    let changed = ids("images", &|i| i["id"].as_str().unwrap().to_string());
    let removed = ids("removed", &|i| i.as_str().unwrap().to_string());
    let g = &v["generations"][0];
    assert_eq!(g["domain"], "it");
    (
        changed,
        removed,
        g["generation"].as_u64().unwrap(),
        g["changes"].as_bool().unwrap(),
    )
}

#[test]
fn cairn_image_list_since_a_generation_gives_changes_and_a_second_coordinator_follows() {
    let h = TwoUsers::start();
    let (alice, bob) = (h.cli(Some("alice")), h.cli(Some("bob")));
    files(&alice, &h.cwd, "a", 3);
    for (i, id) in ["one", "two"].iter().enumerate() {
        let loc = format!("it:a{i}.raw");
        alice.ok(&["image", "register", id, &loc, "--id", id, "--public"]);
    }
    // This coordinator followed the domain from its start: since 0, the
    // changes are every image.
    let (all, removed, g1, _) = since(&alice, 0);
    assert_eq!((all, removed), (vec!["one".into(), "two".into()], vec![]));
    assert_eq!(since(&alice, g1), (vec![], vec![], g1, true));

    alice.ok(&["image", "register", "three", "it:a2.raw", "--id", "three"]);
    alice.ok(&["image", "meta", "set", "one", "-p", "os=debian"]);
    alice.ok(&["image", "unregister", "two"]);
    let (changed, removed, g2, changes) = since(&alice, g1);
    assert!(changes && g2 > g1);
    assert_eq!(changed, ["one", "three"]);
    assert_eq!(removed, ["two"]);
    // Bob could list two (public) and cannot list three (private).
    assert_eq!(
        since(&bob, g1),
        (vec!["one".into()], vec!["two".into()], g2, true)
    );
    // A data item is a change of its image.
    std::fs::write(h.cwd.join("item"), b"abc").unwrap();
    alice.ok(&["image", "data", "set", "three", "k", "item"]);
    let (changed, _, g3, _) = since(&alice, g2);
    assert_eq!((changed, g3), (vec!["three".into()], g2 + 1));
    // Unpublishing one: bob is told it went; alice that it changed.
    alice.ok(&["image", "meta", "set", "one", "--unpublish"]);
    assert_eq!(since(&bob, g3).1, ["one"]);
    assert_eq!(since(&alice, g3).0, ["one"]);

    // A second coordinator on the same domain follows the first's
    // changes from the domain's change log.
    let mut extra = vec!["--agent".to_string(), h.agent.socket.display().to_string()];
    extra.extend(h.tokens.server_args());
    let other = CoordProc::start(&h.cwd.parent().unwrap().join("coord-2"), &extra);
    let alice2 = Cli {
        coord: &other.socket,
        token: Some(h.tokens.of("alice")),
        cwd: &h.cwd,
    };
    let (all, _, g4, changes) = since(&alice2, 0);
    assert_eq!((all.len(), changes), (2, false));
    alice.ok(&["image", "flag", "set", "three", "ro"]);
    alice.ok(&["image", "unregister", "one"]);
    let (changed, removed, g5, changes) = since(&alice2, g4);
    assert_eq!(
        (changed, removed, changes),
        (vec!["three".into()], vec!["one".into()], true)
    );
    assert_eq!(g5, g4 + 2);
    assert_eq!(info(&alice2, "three")["flags"]["ro"], "true");
    // And the first follows the second's.
    alice2.ok(&["image", "metadata", "three", "from the second"]);
    assert_eq!(since(&alice, g5).0, ["three"]);
    assert_eq!(info(&alice, "three")["metadata"], "from the second");

    // Bad input names what was wrong.
    alice.refused(
        &["image", "list", "--since", "nowhere=1"],
        "no domain \"nowhere\"",
    );
    let o = alice.run(&["image", "list", "--since", "it=soon"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a generation"),
        "{err}"
    );
    drop(other);
    h.stop_and_check();
}
