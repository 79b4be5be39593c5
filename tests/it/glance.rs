//! Glance v2's additions through the `cairn` CLI: a shared image seen by
//! a member who accepts or rejects it, protected images, tags,
//! min_disk/min_ram, and the virtual size read from a qcow2 header.

use serde_json::{json, Value};

use crate::files::{pattern, Cli, TwoUsers};

fn info(c: &Cli<'_>, image: &str) -> Value {
    serde_json::from_str(&c.ok(&["--json", "image", "info", image])).unwrap()
}

/// The ids `c` sees in `image list`.
fn listed(c: &Cli<'_>) -> Vec<String> {
    let v: Value = serde_json::from_str(&c.ok(&["--json", "image", "list"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn cairn_shared_image_members_accept_reject_and_protected_blocks_unregister() {
    let h = TwoUsers::start();
    let (alice, bob) = (h.cli(Some("alice")), h.cli(Some("bob")));
    std::fs::write(h.cwd.join("s.raw"), pattern(70_000, 3)).unwrap();
    alice.ok(&["file", "upload", "s.raw", "it:s.raw"]);
    let img: Value = serde_json::from_str(&alice.ok(&[
        "--json",
        "image",
        "register",
        "S",
        "it:s.raw",
        "--no-metafile-upload",
    ]))
    .unwrap();
    let id = img["id"].as_str().unwrap().to_string();
    assert_eq!(img["visibility"], "private");
    assert_eq!(img["os-hash-algo"], "sha256");
    assert_eq!(img["os-hash-value"], img["checksum"]);
    // A raw image's virtual size is its file's.
    assert_eq!(img["virtual-size"], 70_000);

    // Members only on a shared image; bob sees nothing of a private one.
    alice.refused(
        &["image", "members", "add", &id, "bob"],
        "is not shared: set its visibility to shared first",
    );
    assert!(!listed(&bob).contains(&id));
    bob.refused(&["image", "info", &id], "not_found");

    // Bad values are refused, naming what was wrong, and change nothing.
    let before = info(&alice, &id);
    for (args, text) in [
        (vec!["--visibility", "friends"], "private, public or shared"),
        (
            vec!["--min-disk", "ten"],
            "min_disk is \"ten\", not a number",
        ),
        (vec!["--protected", "maybe"], "not true or false"),
        (vec!["--tag", ""], "1 to 255 bytes"),
    ] {
        let mut a = vec!["image", "meta", "set", id.as_str()];
        a.extend(args);
        alice.refused(&a, text);
    }
    assert_eq!(info(&alice, &id), before);

    alice.ok(&[
        "image",
        "meta",
        "set",
        &id,
        "--visibility",
        "shared",
        "--tag",
        "gold",
        "--tag",
        "lts",
        "--min-disk",
        "10",
        "--min-ram",
        "512",
        "--protected",
        "true",
    ]);
    alice.ok(&["image", "members", "add", &id, "bob"]);
    let i = info(&alice, &id);
    assert_eq!(i["visibility"], "shared");
    assert_eq!(i["is-public"], "False");
    assert_eq!(i["tags"], json!(["gold", "lts"]));
    assert_eq!(
        (i["min-disk"].clone(), i["min-ram"].clone()),
        (json!(10), json!(512))
    );
    assert_eq!(i["protected"], true);
    assert_eq!(
        i["members"],
        json!([{"member": "bob", "status": "pending"}])
    );
    let text = alice.ok(&["image", "info", &id]);
    for l in [
        "visibility:       shared",
        "        bob: pending",
        "protected:        True",
        "tags:             gold lts",
        "min-disk:         10",
        "min-ram:          512",
    ] {
        assert!(text.contains(l), "{l:?} not in {text}");
    }
    // A raw image's virtual size is its size: not printed again.
    assert!(!text.contains("virtual-size"), "{text}");

    // Pending: bob may look at it but it is not in his list.
    assert_eq!(info(&bob, &id)["name"], "S");
    assert!(!listed(&bob).contains(&id));
    // Only the owner changes the image or its members; bob only answers.
    bob.refused(
        &["image", "members", "add", &id, "carol"],
        "(403) FORBIDDEN",
    );
    bob.refused(
        &["image", "meta", "set", &id, "--tag", "mine"],
        "(403) FORBIDDEN",
    );
    alice.refused(&["image", "members", "accept", &id], "not a member");

    bob.ok(&["image", "members", "accept", &id]);
    assert!(listed(&bob).contains(&id));
    assert_eq!(
        alice.ok(&["image", "members", "list", &id]).trim(),
        "bob accepted"
    );
    bob.ok(&["image", "members", "reject", &id]);
    assert!(!listed(&bob).contains(&id));
    assert_eq!(info(&bob, &id)["members"][0]["status"], "rejected");

    // Removing bob ends his view of it.
    alice.ok(&["image", "members", "remove", &id, "bob"]);
    bob.refused(&["image", "info", &id], "not_found");
    alice.refused(&["image", "members", "remove", &id, "bob"], "not_found");

    // Tags go one by one; protected blocks unregistering until cleared.
    alice.ok(&["image", "meta", "delete", &id, "--tag", "gold"]);
    assert_eq!(info(&alice, &id)["tags"], json!(["lts"]));
    alice.refused(
        &["image", "unregister", &id],
        &format!("image {id} is protected: clear protected first"),
    );
    assert_eq!(info(&alice, &id)["id"], id.as_str());
    alice.ok(&["image", "meta", "set", &id, "--protected", "false"]);
    alice.ok(&["image", "unregister", &id]);
    alice.refused(&["image", "info", &id], "not_found");
    h.stop_and_check();
}

#[test]
fn cairn_qcow2_image_virtual_size_is_read_from_its_header() {
    let h = TwoUsers::start();
    let alice = h.cli(Some("alice"));
    let q = h.cwd.join("d.qcow2");
    let o = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("3G")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let size = std::fs::metadata(&q).unwrap().len();
    let img: Value = serde_json::from_str(&alice.ok(&[
        "--json",
        "image",
        "register",
        "Q",
        "it:d.qcow2",
        "--upload-image-file",
        "d.qcow2",
        "--disk-format",
        "qcow2",
        "--no-metafile-upload",
    ]))
    .unwrap();
    // One JSON document for the whole command (regression: the upload
    // printed its own before the image's).
    assert_eq!(img["size"], size);
    assert_eq!(img["virtual-size"], 3u64 << 30);
    let text = alice.ok(&["image", "info", img["id"].as_str().unwrap()]);
    assert!(text.contains("virtual-size:     3221225472\n"), "{text}");
    // Likewise a tree upload: one array, the directory before its files.
    std::fs::create_dir(h.cwd.join("t")).unwrap();
    std::fs::write(h.cwd.join("t/x"), b"x").unwrap();
    let v: Value =
        serde_json::from_str(&alice.ok(&["--json", "file", "upload", "-R", "t", "it:t"])).unwrap();
    let paths: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap(),
                f["directory"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(paths, [("t", true), ("t/x", false)], "{v}");
    h.stop_and_check();
}
