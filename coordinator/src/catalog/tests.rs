//! The catalog's decisions, without I/O.

use super::*;
use cairn_domain::{TagId, VolumeId};
use cairn_proto::auth::Role;

pub(super) fn who(name: &str, role: Role) -> Identity {
    Identity {
        name: name.into(),
        role,
    }
}

fn alice() -> Identity {
    who("alice", Role::User)
}

pub(super) fn file(n: u32, path: &str, owner: &str, version: u64) -> FileVersion {
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

pub(super) fn loc(s: &str) -> Location {
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

mod image_rules {
    use super::*;
    use crate::catalog::images::visible as image_visible;
    use crate::catalog::images::*;

    fn dom() -> uuid::Uuid {
        uuid::Uuid::from_u128(7)
    }

    fn reg(name: &str, props: &[(&str, &str)], template: &str) -> Register {
        Register {
            name: name.into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            template: template.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn registered(r: &Register) -> Result<ImageRecord> {
        let f = file(1, "debian.raw", "alice", 1352);
        plan_register(&alice(), &f, "cairn://alice/it/debian.raw", &dom(), r, 99)
    }

    #[test]
    fn ids_follow_the_file_and_properties_are_upper_case() {
        assert_eq!(image_id(&dom(), "a"), image_id(&dom(), "a"));
        assert_ne!(image_id(&dom(), "a"), image_id(&dom(), "b"));
        assert_ne!(image_id(&dom(), "a"), image_id(&uuid::Uuid::nil(), "a"));
        let r = registered(&reg("Alpha", &[("OS", "Linux"), ("user", "someuser")], "")).unwrap();
        assert_eq!(r.id, image_id(&dom(), "debian.raw"));
        let props: Vec<_> = r
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(props, [("OS", "Linux"), ("USER", "someuser")]);
        assert_eq!(
            (
                r.owner.as_str(),
                r.status.as_str(),
                r.created_at,
                r.updated_at
            ),
            ("alice", "available", 0, 99)
        );
        assert_eq!(
            (r.disk_format.as_str(), r.container_format.as_str()),
            ("raw", "bare")
        );
        assert_eq!(r.checksum, "0".repeat(64));
    }

    #[test]
    fn a_metafile_is_a_template_that_the_command_line_overrides() {
        let t = r#"{"name": "Debian Base Gama", "properties": {"OS": "Linux", "USER": "root"},
                    "disk-format": "diskdump", "is-public": "False", "id": "ignored",
                    "owner": "mallory"}"#;
        // An explicit name wins; -p wins over the template's property.
        let r = registered(&reg("Debian Base Delta", &[("user", "admin")], t)).unwrap();
        assert_eq!(r.name, "Debian Base Delta");
        assert_eq!(r.properties["OS"], "Linux");
        assert_eq!(r.properties["USER"], "admin");
        assert_eq!(
            (r.disk_format.as_str(), r.owner.as_str()),
            ("diskdump", "alice")
        );
        // No name given: the template's.
        assert_eq!(
            registered(&reg("", &[], t)).unwrap().name,
            "Debian Base Gama"
        );
        assert!(registered(&reg("", &[], "{}")).is_err(), "no name at all");
        // Re-registration is an override: nothing of an earlier record.
        let again = registered(&reg("Other", &[], "")).unwrap();
        assert!(again.properties.is_empty());
        for (bad, why) in [
            ("{\"name\": ", "not valid JSON"),
            ("[1]", "not a JSON object"),
            ("{\"properties\": []}", "not an object"),
            ("{\"name\": 3}", "not a string"),
            ("{\"is-public\": \"maybe\"}", "True or False"),
        ] {
            let e = registered(&reg("n", &[], bad)).unwrap_err();
            assert!(
                matches!(
                    &e,
                    CoordError::InvalidArgument {
                        field: "metafile",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        // Huge properties do not fit a metafile.
        let huge: Vec<(String, String)> = (0..8)
            .map(|i| (format!("k{i}"), "v".repeat(1000)))
            .collect();
        let props: Vec<(&str, &str)> = huge.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let e = registered(&reg("n", &props, "")).unwrap_err();
        assert!(e.to_string().contains("at most 4096"), "{e}");
        let e = registered(&reg("n", &[("a=b", "x")], "")).unwrap_err();
        assert!(e.to_string().contains("'='"), "{e}");
    }

    #[test]
    fn only_the_owner_registers_and_changes_and_private_ones_are_hidden() {
        let f = file(1, "debian.raw", "alice", 1);
        let bob = who("bob", Role::User);
        let e = plan_register(&bob, &f, "l", &dom(), &reg("n", &[], ""), 1).unwrap_err();
        assert!(matches!(e, CoordError::Denied(_)), "{e}");
        let mut r = registered(&reg("n", &[], "")).unwrap();
        assert!(!image_visible(&bob, &r) && image_visible(&alice(), &r));
        assert!(matches!(
            may_change(&bob, &r),
            Err(CoordError::NotFound { .. })
        ));
        r.is_public = true;
        assert!(image_visible(&bob, &r));
        assert!(matches!(may_change(&bob, &r), Err(CoordError::Denied(_))));
        assert!(may_change(&who("root", Role::Admin), &r).is_ok());
    }

    #[test]
    fn changes_follow_the_seed_and_immutable_fields_are_refused() {
        let r = registered(&reg("Gama", &[("OS", "Linux"), ("USER", "root")], "")).unwrap();
        let set = |pairs: &[(&str, &str)]| Change {
            set: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let n = plan_change(&r, &set(&[("name", "Changed Name")]), 200).unwrap();
        assert_eq!((n.name.as_str(), n.updated_at), ("Changed Name", 200));
        let mut publish = set(&[("name", "Debian Base Gama")]);
        publish.public = Some(true);
        let n = plan_change(&n, &publish, 201).unwrap();
        assert!(n.is_public);
        assert_eq!(n.name, "Debian Base Gama");
        let clear = Change {
            clear: vec!["status".into()],
            ..Default::default()
        };
        assert_eq!(plan_change(&n, &clear, 202).unwrap().status, "");
        let props = Change {
            set_properties: [("greet".to_string(), "Hi there".to_string())].into(),
            ..Default::default()
        };
        let n = plan_change(&n, &props, 203).unwrap();
        assert_eq!(n.properties["GREET"], "Hi there");
        let rm = Change {
            remove_properties: vec!["greet".into()],
            ..Default::default()
        };
        let n = plan_change(&n, &rm, 204).unwrap();
        assert!(!n.properties.contains_key("GREET"));
        assert!(matches!(
            plan_change(&n, &rm, 205),
            Err(CoordError::NotFound { .. })
        ));
        for field in ["id", "owner", "location", "checksum", "created-at", "size"] {
            let e = plan_change(&n, &set(&[(field, "x")]), 1).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("field {field} cannot be changed")),
                "{e}"
            );
            let clear = Change {
                clear: vec![field.into()],
                ..Default::default()
            };
            assert!(plan_change(&n, &clear, 1).is_err(), "{field}");
        }
        let e = plan_change(&n, &set(&[("colour", "x")]), 1).unwrap_err();
        assert!(e.to_string().contains("unknown field colour"), "{e}");
    }

    #[test]
    fn the_metafile_has_kamaki_s_fields_and_round_trips_as_a_template() {
        let mut r = registered(&reg("Gama", &[("OS", "Linux")], "")).unwrap();
        r.created_at = 1_371_628_822;
        let m: serde_json::Value = serde_json::from_slice(&metafile(&r)).unwrap();
        assert_eq!(m["created-at"], "2013-06-19 08:00:22");
        assert_eq!(m["is-public"], "False");
        assert_eq!(m["size"], "1");
        assert_eq!(m["deleted-at"], "");
        assert_eq!(m["properties"]["OS"], "Linux");
        let keys: Vec<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 14, "{keys:?}");
        let back = registered(&reg("", &[], std::str::from_utf8(&metafile(&r)).unwrap())).unwrap();
        assert_eq!(
            (back.name, back.properties),
            (r.name.clone(), r.properties.clone())
        );
        assert_eq!(decode(&encode(&r)).unwrap(), r);
    }
}

// The image store's rules (seed 004).

pub(super) fn image(id: &str, names: &[&str], updated_at: u64) -> images::ImageRecord {
    images::ImageRecord {
        id: id.into(),
        name: id.into(),
        owner: "alice".into(),
        location: String::new(),
        checksum: String::new(),
        container_format: "bare".into(),
        disk_format: "raw".into(),
        created_at: 0,
        updated_at,
        is_public: false,
        properties: BTreeMap::new(),
        size: 0,
        status: "available".into(),
        names: names.iter().map(|s| s.to_string()).collect(),
        metadata: String::new(),
        flags: BTreeMap::new(),
        shared: false,
        members: BTreeMap::new(),
        protected: false,
        tags: Vec::new(),
        min_disk: 0,
        min_ram: 0,
        virtual_size: 0,
    }
}

#[test]
fn images_are_found_by_id_then_name_then_unambiguous_prefix() {
    let (a, b, c) = (
        image("3f12aa", &["debian"], 1),
        image("3f9abb", &["3f12aa-old"], 1),
        image("77cc", &["3f"], 1),
    );
    let all = [&a, &b, &c];
    assert_eq!(store::resolve(&all, "3f9abb").unwrap(), 1);
    assert_eq!(store::resolve(&all, "debian").unwrap(), 0);
    // A name wins over a prefix; an id over a name.
    assert_eq!(store::resolve(&all, "3f").unwrap(), 2);
    assert_eq!(store::resolve(&all, "3f12").unwrap(), 0);
    assert_eq!(store::resolve(&all, "7").unwrap(), 2);
    let e = store::resolve(&[&a, &b], "3f").unwrap_err();
    assert_eq!(e.grpc_code(), tonic::Code::InvalidArgument);
    assert!(e.to_string().contains("3f12aa, 3f9abb"), "{e}");
    let e = store::resolve(&all, "nothing").unwrap_err();
    assert_eq!(e.grpc_code(), tonic::Code::NotFound);
    assert!(store::resolve(&all, "").is_err());
}

#[test]
fn names_are_taken_from_the_images_that_had_them() {
    let (a, b, c) = (
        image("a", &["x", "y"], 1),
        image("b", &["z"], 1),
        image("c", &[], 1),
    );
    let all = [&a, &b, &c];
    let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (names, losers) = store::plan_names(&all, 2, &want(&["y", "z", "y"])).unwrap();
    assert_eq!(names, want(&["y", "z"]));
    assert_eq!(losers, vec![(0, want(&["x"])), (1, want(&[]))]);
    // The image's own names are not taken from itself.
    let (_, losers) = store::plan_names(&all, 0, &want(&["x"])).unwrap();
    assert!(losers.is_empty());
    assert!(store::check_names_free(&all, "c", &want(&["z"])).is_err());
    assert!(store::check_names_free(&all, "b", &want(&["z", "w"])).is_ok());
    for bad in ["", ".hidden", "a b", "tab\t", &"n".repeat(129)] {
        let e = store::check_names(&want(&[bad])).unwrap_err();
        assert_eq!(e.grpc_code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
    let many: Vec<String> = (0..33).map(|i| format!("n{i}")).collect();
    assert!(store::check_names(&many).is_err());
    assert!(store::check_names(&want(&["docker.io/library/debian:12", "a@b+c"])).is_ok());
}

#[test]
fn a_name_given_twice_stays_with_the_image_changed_last() {
    let (a, b, c) = (
        image("a", &["x", "y"], 5),
        image("b", &["x"], 9),
        image("c", &["y", "w"], 5),
    );
    let all = [&a, &b, &c];
    let d = store::duplicates(&all);
    assert_eq!(d.len(), 2);
    assert_eq!(d["x"], vec![0, 1]);
    let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // x stays with b (changed last); y with c (same time, larger id).
    assert_eq!(store::repairs(&all), vec![(0, want(&[]))]);
    assert!(store::repairs(&[&a, &image("b", &["z"], 1)]).is_empty());
}

#[test]
fn data_items_are_the_latest_files_under_the_images_directory() {
    let mut files = vec![
        file(1, ".images/i1/manifest", "alice", 3),
        file(2, ".images/i1/manifest", "alice", 7),
        file(3, ".images/i1/sig", "alice", 4),
        file(4, ".images/i10/other", "alice", 5),
        file(5, ".images/i1/deep/x", "alice", 6),
    ];
    files[1].size = 42;
    let items = store::data_items(&files, "i1");
    let keys: Vec<(&str, u64)> = items.iter().map(|d| (d.key.as_str(), d.size)).collect();
    assert_eq!(keys, vec![("manifest", 42), ("sig", 1)]);
    let all = store::data_versions(&files, "i1");
    assert_eq!(all.len(), 4);
    assert!(store::reserved(".images") && store::reserved(".images/a"));
    assert!(!store::reserved(".imagesx/a") && !store::reserved("images/.images"));
    assert!(store::check_key("manifest-sha256:ab12").is_ok());
    for bad in ["", ".x", "a/b", "a b", &"k".repeat(129)] {
        assert!(store::check_key(bad).is_err(), "{bad:?}");
    }
    assert!(store::check_given_id("..").is_err());
    assert!(store::check_given_id("abc-1").is_ok());
}

#[test]
fn a_data_item_is_uploaded_only_beside_its_image() {
    let mut img = file(1, "images/a.raw", "alice", 1);
    img.image = Some("i1".into());
    let files = vec![img];
    let e = plan_upload(&alice(), &loc("local:.images/i2/k"), "r", &files).unwrap_err();
    assert_eq!(e.grpc_code(), tonic::Code::NotFound);
    assert!(matches!(
        plan_upload(&alice(), &loc("local:.images/i1/k"), "r", &files).unwrap(),
        UploadPlan::Commit { .. }
    ));
    // Hidden from listings unless asked for.
    let mut files = files;
    files.push(file(2, ".images/i1/k", "alice", 2));
    assert_eq!(listing(&alice(), &loc("local:"), &files).len(), 1);
    assert_eq!(listing(&alice(), &loc("local:.images/"), &files).len(), 1);
}

#[test]
fn metadata_and_flags_change_through_a_change() {
    let r = image("a", &[], 1);
    let mut c = images::Change::default();
    c.set.insert("metadata".into(), "{\"k\":1}".into());
    c.set_flags.insert("readonly".into(), "true".into());
    let n = images::plan_change(&r, &c, 5).unwrap();
    assert_eq!(
        (n.metadata.as_str(), n.flags["readonly"].as_str()),
        ("{\"k\":1}", "true")
    );
    let c = images::Change {
        clear_flags: vec!["readonly".into(), "absent".into()],
        ..Default::default()
    };
    assert!(images::plan_change(&n, &c, 6).unwrap().flags.is_empty());
    let mut c = images::Change::default();
    c.set.insert("metadata".into(), "m".repeat(16 << 10 | 1));
    assert!(images::plan_change(&r, &c, 5).is_err());
    let mut c = images::Change::default();
    c.set_flags.insert("bad flag".into(), "v".into());
    assert!(images::plan_change(&r, &c, 5).is_err());
}

// Glance v2's additions.

#[test]
fn shared_images_are_seen_by_members_and_listed_once_accepted() {
    let bob = who("bob", Role::User);
    let mut r = image("s", &[], 1);
    assert!(!images::visible(&bob, &r));
    let add = |r: &images::ImageRecord, m: &[&str]| {
        let c = images::Change {
            add_members: m.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        images::plan_change(r, &c, 2)
    };
    let e = add(&r, &["bob"]).unwrap_err();
    assert_eq!(e.grpc_code(), tonic::Code::FailedPrecondition);
    let mut c = images::Change::default();
    c.set.insert("visibility".into(), "shared".into());
    r = images::plan_change(&r, &c, 2).unwrap();
    assert_eq!(glance::visibility(&r), "shared");
    assert!(add(&r, &["alice"]).is_err(), "the owner is no member");
    r = add(&r, &["bob"]).unwrap();
    assert_eq!(r.members["bob"], "pending");
    assert!(images::visible(&bob, &r) && !glance::listed(&bob, &r));
    r.members.insert("bob".into(), "accepted".into());
    assert!(glance::listed(&bob, &r));
    // A member does not change the image.
    assert!(images::may_change(&bob, &r).is_err());
    // Publishing makes it public; unpublishing private, not shared.
    let c = images::Change {
        public: Some(true),
        ..Default::default()
    };
    r = images::plan_change(&r, &c, 3).unwrap();
    assert_eq!(glance::visibility(&r), "public");
    let c = images::Change {
        public: Some(false),
        ..Default::default()
    };
    r = images::plan_change(&r, &c, 4).unwrap();
    assert_eq!(glance::visibility(&r), "private");
    assert!(!images::visible(&bob, &r));
    assert!(glance::check_status("accepted").is_ok() && glance::check_status("maybe").is_err());
}

#[test]
fn protected_tags_and_minimums_change_and_the_header_gives_the_virtual_size() {
    let mut r = image("p", &[], 1);
    let mut c = images::Change::default();
    c.set.insert("protected".into(), "true".into());
    c.set.insert("min_disk".into(), "20".into());
    c.set.insert("min-ram".into(), "2048".into());
    c.add_tags = vec!["lts".into(), "x86".into(), "lts".into()];
    r = images::plan_change(&r, &c, 2).unwrap();
    assert!(r.protected);
    assert_eq!((r.min_disk, r.min_ram), (20, 2048));
    assert_eq!(r.tags, vec!["lts".to_string(), "x86".to_string()]);
    assert_eq!(
        glance::check_unprotected(&r).unwrap_err().grpc_code(),
        tonic::Code::FailedPrecondition
    );
    let c = images::Change {
        remove_tags: vec!["lts".into()],
        clear: vec!["protected".into(), "min_disk".into()],
        ..Default::default()
    };
    r = images::plan_change(&r, &c, 3).unwrap();
    assert!(!r.protected && r.min_disk == 0 && r.tags == vec!["x86".to_string()]);
    for (k, v) in [
        ("min_disk", "lots"),
        ("protected", "maybe"),
        ("visibility", "community"),
    ] {
        let mut c = images::Change::default();
        c.set.insert(k.into(), v.into());
        assert!(images::plan_change(&r, &c, 4).is_err(), "{k}={v}");
    }
    for f in ["virtual_size", "os_hash_value"] {
        let mut c = images::Change::default();
        c.set.insert(f.into(), "1".into());
        assert!(images::plan_change(&r, &c, 4)
            .unwrap_err()
            .to_string()
            .contains(f));
    }
    let mut head = vec![0u8; 512];
    head[..4].copy_from_slice(b"QFI\xfb");
    head[24..32].copy_from_slice(&(10u64 << 30).to_be_bytes());
    assert_eq!(glance::virtual_size(&head, 200_000, "qcow2"), 10 << 30);
    assert_eq!(glance::virtual_size(&[0; 512], 4 << 20, "raw"), 4 << 20);
    assert_eq!(glance::virtual_size(&[0; 512], 4 << 20, "vmdk"), 0);
    assert_eq!(glance::virtual_size(b"QFI", 3, "raw"), 3);
    // A raw image's bytes are the disk, even when they look like qcow2.
    assert_eq!(glance::virtual_size(&head, 200_000, "raw"), 200_000);
    assert!(!glance::needs_head("raw") && glance::needs_head("qcow2"));
}

#[test]
fn a_kept_catalog_takes_changes_and_groups_data_items_by_image() {
    use index::DomainCatalog;
    let d = crate::plan::DomainRef {
        id: uuid::Uuid::new_v4(),
        name: "it".into(),
    };
    let with_image = |mut f: FileVersion, id: &str| {
        f.image = Some(id.into());
        f
    };
    let a = with_image(file(1, "a.raw", "alice", 1), "A");
    let item = file(2, ".images/A/k", "alice", 2);
    let other = file(3, ".images/B/k", "alice", 3);
    let b = file(4, "b.raw", "alice", 4);
    let rec = |id: &str| images::encode(&image(id, &[], 0));
    let full = crate::agents::FileDelta {
        generation: 4,
        changes: false,
        files: vec![
            (b.clone(), Vec::new()),
            (a.clone(), rec("A")),
            (item.clone(), Vec::new()),
            (other.clone(), Vec::new()),
        ],
        removed: Vec::new(),
    };
    let mut cat = DomainCatalog::default();
    cat.apply(&d, full).unwrap();
    assert_eq!((cat.generation, cat.floor), (4, 4));
    assert_eq!(cat.files.len(), 4);
    let imgs = cat.images();
    assert_eq!(imgs.len(), 1);
    let keys: Vec<_> = imgs[0].data.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(keys, ["k"]);
    assert_eq!(imgs[0].data[0].file.tag, item.tag);
    let bob = who("bob", Role::User);
    assert!(cat.since(&alice(), 3).is_none(), "before the floor");
    assert!(cat.since(&alice(), 4).unwrap().changed.is_empty());
    let kept = cat.clone();
    // Unregister A, register B, delete A's item: only those are sent.
    let mut a2 = a.clone();
    a2.image = None;
    let delta = crate::agents::FileDelta {
        generation: 7,
        changes: true,
        files: vec![(a2, Vec::new()), (with_image(b.clone(), "B"), rec("B"))],
        removed: vec![item.tag],
    };
    cat.apply(&d, delta).unwrap();
    assert_eq!(cat.generation, 7);
    assert_eq!(cat.files.len(), 3);
    let imgs = cat.images();
    let ids: Vec<_> = imgs.iter().map(|i| i.record.id.as_str()).collect();
    assert_eq!(ids, ["B"]);
    assert_eq!(imgs[0].data[0].file.tag, other.tag);
    assert_eq!(imgs[0].generation, 7);
    // The copy taken before is unchanged.
    assert_eq!(kept.images()[0].record.id, "A");
    // Since 4: B is new, A is gone, for its owner; bob saw neither.
    let s = cat.since(&alice(), 4).unwrap();
    let changed: Vec<_> = s.changed.iter().map(|i| i.record.id.as_str()).collect();
    assert_eq!((changed, s.removed), (vec!["B"], vec!["A".to_string()]));
    let s = cat.since(&bob, 4).unwrap();
    assert!(s.changed.is_empty() && s.removed.is_empty(), "{s:?}");
    assert!(cat.since(&alice(), 7).unwrap().changed.is_empty());
    // B made public: bob sees it change; made private again, bob is told
    // it went (he could list it at 8), alice that it changed.
    let mut public = image("B", &[], 1);
    public.is_public = true;
    let b_img = with_image(b.clone(), "B");
    let step = |g: u64, r: &images::ImageRecord| crate::agents::FileDelta {
        generation: g,
        changes: true,
        files: vec![(b_img.clone(), images::encode(r))],
        removed: Vec::new(),
    };
    cat.apply(&d, step(8, &public)).unwrap();
    assert_eq!(cat.since(&bob, 7).unwrap().changed.len(), 1);
    cat.apply(&d, step(9, &image("B", &[], 2))).unwrap();
    assert_eq!(cat.since(&bob, 8).unwrap().removed, ["B"]);
    assert!(
        cat.since(&bob, 7).unwrap().removed.is_empty(),
        "private at 7"
    );
    assert_eq!(cat.since(&alice(), 8).unwrap().changed.len(), 1);
}
