//! Seed 001, sections 5.1 to 5.9, replayed step by step through the
//! `cairn` CLI with two users: register, list, unregister, properties,
//! metafiles as templates, metadata changes, re-registration, metafile
//! versions, and a batch registration in a shell loop.

use std::collections::BTreeMap;

use cairn_tests::bins::cairn_bin;

use crate::files::{pattern, Cli, TwoUsers};

/// The `key: value` lines kamaki prints for an image, and the properties
/// (the indented lines under `properties:`).
fn fields(text: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let (mut f, mut p) = (BTreeMap::new(), BTreeMap::new());
    for line in text.lines() {
        if let Some(prop) = line.strip_prefix("        ") {
            let (k, v) = prop.split_once(':').expect("KEY: value");
            p.insert(k.to_string(), v.trim().to_string());
        } else if let Some((k, v)) = line.split_once(':') {
            if !line.starts_with("Metadata file") {
                f.insert(k.to_string(), v.trim().to_string());
            }
        }
    }
    (f, p)
}

fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The version a register's last line reports.
fn meta_version(text: &str, location: &str) -> u64 {
    let last = text.lines().last().unwrap();
    let prefix = format!("Metadata file uploaded as {location} (version ");
    let v = last
        .strip_prefix(&prefix)
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{last:?} is not {prefix:?}…"));
    v.parse().unwrap()
}

#[test]
fn cairn_image_commands_replay_seed_001_with_two_users() {
    let h = TwoUsers::start();
    std::fs::create_dir_all(h.cwd.join("images")).unwrap();
    let cwd = h.cwd.clone();
    let alice = h.cli(Some("alice"));
    let bob = h.cli(Some("bob"));

    // 5.1: upload, then register; every field printed, the metafile too.
    let image = pattern((2 << 20) + 11, 5);
    let sha = cairn_proto::auth::hex(ring::digest::digest(&ring::digest::SHA256, &image).as_ref());
    std::fs::write(cwd.join("debian_base3.diskdump"), &image).unwrap();
    alice.ok(&["file", "upload", "debian_base3.diskdump", "it"]);
    let loc = "it:debian_base3.diskdump";
    let meta = "it:debian_base3.diskdump.meta";
    let out = alice.ok(&["image", "register", "Debian Base Alpha", loc]);
    let keys: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, _)| k))
        .collect();
    assert_eq!(
        keys,
        [
            "checksum",
            "container-format",
            "created-at",
            "deleted-at",
            "disk-format",
            "id",
            "is-public",
            "location",
            "name",
            "owner",
            "properties",
            "size",
            "status",
            "updated-at",
            "Metadata file uploaded as it"
        ],
        "{out}"
    );
    let (f, p) = fields(&out);
    let id = f["id"].clone();
    assert_eq!(f["checksum"], sha);
    assert_eq!(f["location"], "cairn://alice/it/debian_base3.diskdump");
    assert_eq!(
        (
            f["name"].as_str(),
            f["owner"].as_str(),
            f["is-public"].as_str()
        ),
        ("Debian Base Alpha", "alice", "False")
    );
    assert_eq!(
        (f["size"].clone(), f["status"].as_str()),
        (image.len().to_string(), "available")
    );
    assert_eq!(
        (f["container-format"].as_str(), f["disk-format"].as_str()),
        ("bare", "raw")
    );
    assert_eq!(f["deleted-at"], "");
    assert!(p.is_empty());
    let v1 = meta_version(&out, meta);
    let m: serde_json::Value = serde_json::from_str(&alice.ok(&["file", "cat", meta])).unwrap();
    assert_eq!(
        (m["name"].as_str(), m["id"].as_str()),
        (Some("Debian Base Alpha"), Some(id.as_str()))
    );
    assert_eq!(m["is-public"], "False");
    // The file of a registered image is not overwritten or deleted.
    let e = alice.refused(
        &["file", "upload", "debian_base3.diskdump", "it"],
        "failed_precondition",
    );
    assert!(e.contains("registered image"), "{e}");
    alice.refused(&["file", "delete", loc], "registered image");
    // Upload and register in one step, as another user, public.
    std::fs::write(cwd.join("beta.raw"), pattern(5000, 6)).unwrap();
    let out = bob.ok(&[
        "image",
        "register",
        "Beta Debian Base",
        "it:beta.raw",
        "--upload-image-file",
        "beta.raw",
        "--public",
    ]);
    let (bf, _) = fields(&out);
    let beta = bf["id"].clone();
    assert_eq!(
        (bf["owner"].as_str(), bf["is-public"].as_str()),
        ("bob", "True")
    );

    // 5.2: lists: public ones for everyone, private ones for their owner.
    let listed = |c: &Cli, args: &[&str]| -> Vec<String> {
        c.ok(args)
            .lines()
            .filter(|l| !l.starts_with(' '))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        listed(&alice, &["image", "list"]),
        [
            format!("{beta} Beta Debian Base"),
            format!("{id} Debian Base Alpha")
        ]
    );
    assert_eq!(
        listed(&alice, &["image", "list", "--owner", "alice"]),
        [format!("{id} Debian Base Alpha")]
    );
    assert_eq!(
        listed(&bob, &["image", "list"]),
        [format!("{beta} Beta Debian Base")]
    );
    let text = alice.ok(&["image", "list", "--owner", "alice"]);
    assert_eq!(
        text,
        format!(
            "{id} Debian Base Alpha\n    container_format: bare\n    disk_format:      raw\n    size:             {}\n    status:           available\n",
            image.len()
        )
    );
    assert_eq!(alice.ok(&["whoami"]).trim(), "alice (user)");

    // 5.3: unregister one's own; another's is (403) FORBIDDEN; a private
    // one of another is not found.
    alice.ok(&["image", "unregister", &id]);
    assert_eq!(alice.ok(&["image", "list", "--owner", "alice"]), "");
    let e = alice.refused(&["image", "unregister", &beta], "(403) FORBIDDEN");
    assert!(e.contains("permission_denied"), "{e}");
    assert!(bob
        .ok(&["image", "info", &beta])
        .contains("Beta Debian Base"));

    // 5.4: the metafile exists: refused, nothing registered; -f overrides.
    let args = [
        "image",
        "register",
        "Debian Base Gama",
        loc,
        "-p",
        "OS=Linux",
        "-p",
        "user=someuser",
    ];
    let e = alice.refused(&args, "failed_precondition");
    assert!(
        e.contains(&format!("Metadata file {meta} already exists")),
        "{e}"
    );
    assert_eq!(alice.ok(&["image", "list", "--owner", "alice"]), "");
    let mut forced = args.to_vec();
    forced.push("-f");
    let out = alice.ok(&forced);
    let (f, p) = fields(&out);
    assert_eq!(f["id"], id, "the id follows the file");
    assert_eq!(p, props(&[("OS", "Linux"), ("USER", "someuser")]));
    let v2 = meta_version(&out, meta);
    assert!(v2 > v1);

    // 5.5: the metafile as a template; an explicit name wins over it.
    let out = alice.ok(&["file", "download", meta]);
    assert!(out.ends_with("Done\n"), "{out}");
    let local = cwd.join("debian_base3.diskdump.meta");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&local).unwrap()).unwrap();
    m["properties"]["USER"] = "root".into();
    std::fs::write(&local, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let with_meta = [
        "image",
        "register",
        "-f",
        "Debian Base Delta",
        loc,
        "--metafile=debian_base3.diskdump.meta",
    ];
    let out = alice.ok(&with_meta);
    let (f, p) = fields(&out);
    assert_eq!(
        (f["name"].as_str(), f["id"].as_str()),
        ("Debian Base Delta", id.as_str())
    );
    assert_eq!(p, props(&[("OS", "Linux"), ("USER", "root")]));
    let v3 = meta_version(&out, meta);
    assert!(v3 > v2);
    // An invalid metafile: refused, naming the problem, nothing changed.
    std::fs::write(cwd.join("bad.meta"), b"{\"name\": \"x\",").unwrap();
    let before = alice.ok(&["image", "info", &id]);
    let e = alice.refused(
        &[
            "image",
            "register",
            "-f",
            "X",
            loc,
            "--metafile",
            "bad.meta",
        ],
        "invalid_argument",
    );
    assert!(
        e.contains("metafile") && e.contains("not valid JSON"),
        "{e}"
    );
    assert_eq!(alice.ok(&["image", "info", &id]), before);

    // 5.6: metadata and properties changed after registration.
    alice.ok(&["image", "meta", "set", &id, "--name=Changed Name"]);
    let (f, p) = fields(&alice.ok(&["image", "info", &id]));
    assert_eq!(f["name"], "Changed Name");
    assert_eq!(p, props(&[("OS", "Linux"), ("USER", "root")]));
    alice.ok(&[
        "image",
        "meta",
        "set",
        &id,
        "--publish",
        "--name=Debian Base Gama",
    ]);
    let (f, _) = fields(&alice.ok(&["image", "info", &id]));
    assert_eq!(
        (f["is-public"].as_str(), f["name"].as_str()),
        ("True", "Debian Base Gama")
    );
    assert!(listed(&bob, &["image", "list"]).contains(&format!("{id} Debian Base Gama")));
    let e = bob.refused(
        &["image", "meta", "set", &id, "--name=mine"],
        "(403) FORBIDDEN",
    );
    assert!(!e.is_empty());
    alice.ok(&["image", "meta", "set", &id, "--unpublish"]);
    assert!(!listed(&bob, &["image", "list"])
        .iter()
        .any(|l| l.starts_with(&id)));
    bob.refused(&["image", "info", &id], "not_found");
    alice.ok(&["image", "meta", "delete", &id, "status"]);
    let (f, _) = fields(&alice.ok(&["image", "info", &id]));
    assert_eq!(f["status"], "");
    alice.ok(&["image", "meta", "set", &id, "-p", "user=user"]);
    let (_, p) = fields(&alice.ok(&["image", "info", &id]));
    assert_eq!(p, props(&[("OS", "Linux"), ("USER", "user")]));
    alice.ok(&[
        "image",
        "meta",
        "set",
        &id,
        "-p",
        "greet=Hi there",
        "-p",
        "user=root",
    ]);
    let (_, p) = fields(&alice.ok(&["image", "info", &id]));
    assert_eq!(
        p,
        props(&[("GREET", "Hi there"), ("OS", "Linux"), ("USER", "root")])
    );
    alice.ok(&["image", "meta", "delete", &id, "-p", "greet"]);
    let (_, p) = fields(&alice.ok(&["image", "info", &id]));
    assert_eq!(p, props(&[("OS", "Linux"), ("USER", "root")]));
    // id, owner, location, checksum and the dates do not change.
    for field in ["id", "owner", "location", "checksum", "created-at"] {
        let e = alice.refused(&["image", "meta", "delete", &id, field], "invalid_argument");
        assert!(
            e.contains(&format!("field {field} cannot be changed")),
            "{e}"
        );
    }

    // 5.7: the command line wins over the metafile; re-registering is an
    // override (GREET is gone, USER is the command line's).
    let mut cmdline = with_meta.to_vec();
    cmdline.extend(["-p", "user=admin"]);
    let out = alice.ok(&cmdline);
    let (f, p) = fields(&out);
    assert_eq!(
        (f["name"].as_str(), f["id"].as_str()),
        ("Debian Base Delta", id.as_str())
    );
    assert_eq!(p, props(&[("OS", "Linux"), ("USER", "admin")]));
    assert_eq!(f["status"], "available");
    let v4 = meta_version(&out, meta);

    // 5.8: no metafile written; the old versions are all there.
    let out = alice.ok(&[
        "image",
        "register",
        "Debian Base Delta",
        loc,
        "--metafile=debian_base3.diskdump.meta",
        "--no-metafile-upload",
    ]);
    assert!(!out.contains("Metadata file"), "{out}");
    let versions: Vec<u64> = alice
        .ok(&["file", "versions", meta])
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(versions, [v1, v2, v3, v4]);
    let first: serde_json::Value =
        serde_json::from_str(&alice.ok(&["file", "cat", &format!("--object-version={v1}"), meta]))
            .unwrap();
    assert_eq!(first["name"], "Debian Base Alpha");
    alice.ok(&[
        "file",
        "download",
        &format!("--object-version={v2}"),
        meta,
        "meta.v2",
    ]);
    let second: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cwd.join("meta.v2")).unwrap()).unwrap();
    assert_eq!(second["properties"]["USER"], "someuser");

    // 5.9: a batch upload, registered in a shell loop.
    for (n, name) in ["debian.diskdump", "win8.diskdump"].iter().enumerate() {
        std::fs::write(cwd.join("images").join(name), pattern(6000 + n, n as u32)).unwrap();
    }
    alice.ok(&["file", "upload", "-R", "images", "it"]);
    let script = "for path in images/*.diskdump; do \
                  location=it:${path}; \
                  cairn image register $path $location || exit 1; done";
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(&cwd)
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", cairn_bin().parent().unwrap().display()),
        )
        .env("CAIRN_COORDINATOR", &h.coord.socket)
        .env("CAIRN_TOKEN", h.tokens.of("alice"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("Metadata file uploaded as it:images/debian.diskdump.meta (version "));
    assert!(out.contains("Metadata file uploaded as it:images/win8.diskdump.meta (version "));
    let names: Vec<String> = listed(&alice, &["image", "list", "--owner", "alice"])
        .iter()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "Debian Base Delta",
            "images/debian.diskdump",
            "images/win8.diskdump"
        ]
    );
    h.stop_and_check();
}
