//! The catalog's decisions, without I/O.

use super::files::made_by;
use super::*;
use cairn_domain::{TagId, VolumeId};
use cairn_proto::auth::Role;

fn who(name: &str, role: Role) -> Identity {
    Identity {
        name: name.into(),
        role,
    }
}

fn alice() -> Identity {
    who("alice", Role::User)
}

fn file(n: u32, path: &str, owner: &str, version: u64) -> FileVersion {
    FileVersion {
        tag: TagId::generate(n),
        volume: VolumeId::generate(n),
        path: path.into(),
        version,
        size: 1,
        sha256: "0".repeat(64),
        owner: owner.into(),
        created: 0,
        directory: false,
        inline: true,
        image: None,
        request: String::new(),
    }
}

fn loc(s: &str) -> Location {
    Location::parse(s).unwrap()
}

#[test]
fn locations_parse_in_both_forms() {
    assert_eq!(
        loc("local:images/debian.qcow2"),
        Location {
            owner: None,
            domain: "local".into(),
            path: "images/debian.qcow2".into()
        }
    );
    assert_eq!(
        loc("cairn://alice/local/images/a/b"),
        Location {
            owner: Some("alice".into()),
            domain: "local".into(),
            path: "images/a/b".into()
        }
    );
    // A prefix may be empty; a file's path may not.
    assert_eq!(loc("local:").path, "");
    assert_eq!(loc("cairn://alice/local").path, "");
    assert!(loc("local:").file_path().is_err());
    for (bad, why) in [
        ("images/debian", "expected DOMAIN:PATH"),
        ("a/b:c", "expected DOMAIN:PATH"),
        (":x", "no domain"),
        ("cairn:///local/x", "no owner"),
        ("cairn://alice//x", "no domain"),
        ("local:a\nb", "control"),
    ] {
        let e = Location::parse(bad).unwrap_err();
        assert!(
            matches!(
                &e,
                CoordError::InvalidArgument {
                    field: "location",
                    ..
                }
            ),
            "{bad}: {e}"
        );
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }
    for bad in ["local:../x", "local:a/../b", "local:/abs", "local:a//b"] {
        let e = loc(bad).file_path().unwrap_err();
        assert!(e.to_string().contains("path"), "{bad}: {e}");
    }
    assert_eq!(
        Location::full("alice", "local", "a/b"),
        "cairn://alice/local/a/b"
    );
}

#[test]
fn a_user_sees_only_its_own_files_and_admin_all() {
    let files = vec![
        file(1, "images/a", "alice", 1),
        file(2, "images/a", "alice", 3),
        file(3, "images/b", "bob", 2),
        file(4, "other/c", "alice", 4),
    ];
    let mut dir = file(5, "images", "alice", 5);
    dir.directory = true;
    let with_dir = [files.clone(), vec![dir]].concat();
    let l = listing(&alice(), &loc("local:images/"), &with_dir);
    assert_eq!(
        l.keys().copied().collect::<Vec<_>>(),
        ["images", "images/a"]
    );
    let l = listing(&alice(), &loc("local:images/"), &files);
    assert_eq!(l.keys().copied().collect::<Vec<_>>(), ["images/a"]);
    assert_eq!(l["images/a"].version, 3, "the latest version is listed");
    let admin = who("root", Role::Admin);
    let l = listing(&admin, &loc("local:"), &files);
    assert_eq!(l.len(), 3);
    let l = listing(&admin, &loc("cairn://bob/local/"), &files);
    assert_eq!(l.keys().copied().collect::<Vec<_>>(), ["images/b"]);
    // Another's file: refused, naming why; a missing one is not found.
    let e = file_versions(&alice(), &loc("local:images/b"), &files).unwrap_err();
    assert!(matches!(e, CoordError::Denied(_)), "{e}");
    let e = file_versions(&alice(), &loc("local:images/zz"), &files).unwrap_err();
    assert!(matches!(e, CoordError::NotFound { .. }), "{e}");
    let v = file_versions(&alice(), &loc("local:images/a"), &files).unwrap();
    assert_eq!(v.iter().map(|f| f.version).collect::<Vec<_>>(), [1, 3]);
    assert_eq!(
        pick_version(&alice(), &loc("local:images/a"), 0, &files)
            .unwrap()
            .version,
        3
    );
    assert_eq!(
        pick_version(&alice(), &loc("local:images/a"), 1, &files)
            .unwrap()
            .version,
        1
    );
    assert!(pick_version(&alice(), &loc("local:images/a"), 2, &files).is_err());
}

#[test]
fn uploads_keep_a_path_s_owner_and_respect_registered_images() {
    let mut files = vec![file(1, "images/a", "alice", 1)];
    let bob = who("bob", Role::User);
    // A new path: the caller owns it; a user may not name another owner.
    assert_eq!(
        plan_upload(&bob, &loc("local:images/b"), "file-x", &files).unwrap(),
        UploadPlan::Commit {
            owner: "bob".into()
        }
    );
    let e = plan_upload(&bob, &loc("cairn://alice/local/images/b"), "r", &files).unwrap_err();
    assert!(matches!(e, CoordError::Denied(_)), "{e}");
    // Another's path is refused; admin writes a new version for its owner.
    let e = plan_upload(&bob, &loc("local:images/a"), "r", &files).unwrap_err();
    assert!(matches!(e, CoordError::Denied(_)), "{e}");
    let admin = who("root", Role::Admin);
    assert_eq!(
        plan_upload(&admin, &loc("local:images/a"), "r", &files).unwrap(),
        UploadPlan::Commit {
            owner: "alice".into()
        }
    );
    assert_eq!(
        plan_upload(&admin, &loc("cairn://carol/local/images/c"), "r", &files).unwrap(),
        UploadPlan::Commit {
            owner: "carol".into()
        }
    );
    // A retried request finds the version it made; at another path its id
    // is reused.
    files[0].request = "file-abc.2".into();
    assert_eq!(
        plan_upload(&alice(), &loc("local:images/a"), "file-abc", &files).unwrap(),
        UploadPlan::Done(files[0].clone())
    );
    let e = plan_upload(&alice(), &loc("local:images/z"), "file-abc", &files).unwrap_err();
    assert!(matches!(e, CoordError::RequestIdReused(_)), "{e}");
    assert!(made_by("file-abc", "file-abc") && made_by("file-abc.0", "file-abc"));
    assert!(!made_by("file-abcd.0", "file-abc") && !made_by("", "file-abc"));
    // The latest version holds an image: no new version, no delete.
    files[0].image = Some("img-1".into());
    let e = plan_upload(&alice(), &loc("local:images/a"), "r", &files).unwrap_err();
    assert!(e.to_string().contains("img-1"), "{e}");
    assert!(matches!(e, CoordError::FailedPrecondition(_)));
    let e = plan_delete(&alice(), &loc("local:images/a"), 0, &files).unwrap_err();
    assert!(e.to_string().contains("img-1"), "{e}");
}

#[test]
fn deletes_take_one_version_or_all() {
    let files = vec![
        file(1, "a", "alice", 1),
        file(2, "a", "alice", 2),
        file(3, "b", "alice", 3),
    ];
    let all = plan_delete(&alice(), &loc("local:a"), 0, &files).unwrap();
    assert_eq!(all.iter().map(|f| f.version).collect::<Vec<_>>(), [1, 2]);
    let one = plan_delete(&alice(), &loc("local:a"), 2, &files).unwrap();
    assert_eq!(one.iter().map(|f| f.version).collect::<Vec<_>>(), [2]);
    let e = plan_delete(&alice(), &loc("local:a"), 3, &files).unwrap_err();
    assert!(matches!(e, CoordError::NotFound { .. }), "{e}");
    let e = plan_delete(&who("bob", Role::User), &loc("local:a"), 0, &files).unwrap_err();
    assert!(matches!(e, CoordError::Denied(_)), "{e}");
}
