//! The kept catalog's indexes answer as a look at every file and image
//! does: random catalogs, changed at random, against the plain functions
//! given everything.

use std::collections::BTreeSet;

use super::index::DomainCatalog;
use super::tests::{file, image, loc, who};
use super::*;
use crate::agents::FileDelta;
use cairn_proto::auth::Role;

/// A small xorshift generator (seeded: a failure replays).
struct Gen(u64);

impl Gen {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

const PATHS: [&str; 6] = [
    "a.raw",
    "a.raw.meta",
    "b.raw",
    "dir/c",
    ".images/ab1/k",
    ".images/zz/k",
];
const IDS: [&str; 5] = ["ab1", "ab2", "b", "zz", "ab1x"];
const NAMES: [&str; 4] = ["one", "two", "ab", "b"];

/// One random change: new versions (some registered, some made by a
/// request) and deleted ones.
fn step(g: &mut Gen, cat: &DomainCatalog, n: &mut u32, generation: u64) -> FileDelta {
    let mut files = Vec::new();
    let mut removed = Vec::new();
    for _ in 0..1 + g.below(3) {
        if !cat.files.is_empty() && g.below(3) == 0 {
            removed.push(cat.files[g.below(cat.files.len())].tag);
            continue;
        }
        *n += 1;
        let mut f = file(
            *n,
            PATHS[g.below(PATHS.len())],
            ["alice", "bob"][g.below(2)],
            // Version numbers only grow, one per version.
            u64::from(*n),
        );
        if g.below(2) == 0 {
            f.request = format!("file-r{}.{}", g.below(4), g.below(2));
        }
        let mut rec = Vec::new();
        let id = IDS[g.below(IDS.len())];
        // A domain registers an id once (its commits are checked against
        // one generation).
        let taken = cat.images().iter().any(|i| i.record.id == id)
            || files
                .iter()
                .any(|(f, _): &(FileVersion, _)| f.image.as_deref() == Some(id));
        if g.below(2) == 0 && !taken {
            f.image = Some(id.into());
            if g.below(4) != 0 {
                let names: Vec<&str> = (0..g.below(3))
                    .map(|_| NAMES[g.below(NAMES.len())])
                    .collect();
                let mut r = image(id, &names, generation);
                r.owner = f.owner.clone();
                rec = images::encode(&r);
            }
        }
        files.push((f, rec));
    }
    removed.sort();
    removed.dedup();
    files.retain(|(f, _)| !removed.contains(&f.tag));
    FileDelta {
        generation,
        changes: true,
        files,
        removed,
    }
}

fn same<T: PartialEq + std::fmt::Debug>(a: Result<T>, b: Result<T>, what: &str) {
    match (a, b) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{what}"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{what}"),
        (a, b) => panic!("{what}: {a:?} against {b:?}"),
    }
}

#[test]
fn the_indexes_answer_as_a_look_at_everything() {
    let d = crate::plan::DomainRef {
        id: uuid::Uuid::new_v4(),
        name: "it".into(),
    };
    let people = [
        who("alice", Role::User),
        who("bob", Role::User),
        who("root", Role::Admin),
    ];
    for seed in 1..40u64 {
        let mut g = Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut cat = DomainCatalog::default();
        cat.apply(
            &d,
            FileDelta {
                generation: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let mut n = 0;
        for generation in 2..40 {
            let delta = step(&mut g, &cat, &mut n, generation);
            cat.apply(&d, delta).unwrap();
            let images = cat.images();
            let files: Vec<_> = cat.files.iter().cloned().collect();
            // Lookups: every id, prefix and name, for every caller.
            let keys = IDS.iter().chain(&NAMES).chain(&["a", "z", "q", ""]);
            for who in &people {
                for key in keys.clone() {
                    let seen: Vec<_> = images
                        .iter()
                        .filter(|i| images::visible(who, &i.record))
                        .collect();
                    let recs: Vec<_> = seen.iter().map(|i| &i.record).collect();
                    let want = store::resolve(&recs, key).map(|i| seen[i].file.tag);
                    let cands: Vec<_> = cat
                        .matching(key)
                        .into_iter()
                        .filter(|i| images::visible(who, &i.record))
                        .collect();
                    let recs: Vec<_> = cands.iter().map(|i| &i.record).collect();
                    let got = store::resolve(&recs, key).map(|i| cands[i].file.tag);
                    same(
                        got,
                        want,
                        &format!("seed {seed} resolve {key:?} as {}", who.name),
                    );
                }
            }
            // Names: their holders, and whether one is given twice.
            for name in NAMES {
                let want: BTreeSet<_> = images
                    .iter()
                    .filter(|i| i.record.names.iter().any(|n| n == name))
                    .map(|i| i.file.tag)
                    .collect();
                let got: BTreeSet<_> = cat.holders(name).iter().map(|i| i.file.tag).collect();
                assert_eq!(got, want, "seed {seed} holders of {name}");
            }
            let records: Vec<_> = images.iter().map(|i| &i.record).collect();
            let twice = cat.names().any(|(_, t)| t.len() > 1);
            assert_eq!(
                twice,
                !store::duplicates(&records).is_empty(),
                "seed {seed}"
            );
            // Plans about one path.
            for path in PATHS {
                let l = loc(&format!("it:{path}"));
                for who in &people {
                    for r in 0..4 {
                        let base = format!("file-r{r}");
                        let about = cat.about(&[path], Some(&base), index::data_owner(path));
                        same(
                            plan_upload(who, &l, &base, &about),
                            plan_upload(who, &l, &base, &files),
                            &format!("seed {seed} upload {path} {base} as {}", who.name),
                        );
                    }
                    let about = cat.about(&[path], None, None);
                    let tags = |v: Result<Vec<&FileVersion>>| {
                        v.map(|v| v.iter().map(|f| f.tag).collect::<Vec<_>>())
                    };
                    same(
                        tags(file_versions(who, &l, &about)),
                        tags(file_versions(who, &l, &files)),
                        &format!("seed {seed} versions {path}"),
                    );
                    same(
                        tags(plan_delete(who, &l, 0, &about)),
                        tags(plan_delete(who, &l, 0, &files)),
                        &format!("seed {seed} delete {path}"),
                    );
                }
            }
            for id in IDS {
                let want: BTreeSet<_> = files
                    .iter()
                    .filter(|f| f.image.as_deref() == Some(id))
                    .map(|f| f.tag)
                    .collect();
                let got: BTreeSet<_> = cat.image_files(id).iter().map(|f| f.tag).collect();
                assert_eq!(got, want, "seed {seed} files of image {id}");
            }
        }
    }
}

/// Regression: two readers that read the same changes at once. The second
/// found the kept catalog moved on (by the first) and read again, and
/// under steady writes every reader ran out of tries and listed the whole
/// domain, which itself never finished between writes at 10,000 images.
#[test]
fn a_reader_behind_another_takes_the_catalog_it_brought_up_to_date() {
    let d = crate::plan::DomainRef {
        id: uuid::Uuid::new_v4(),
        name: "it".into(),
    };
    let idx = super::index::Indexes::default();
    let full = FileDelta {
        generation: 1,
        ..Default::default()
    };
    assert!(idx.update(&d, None, full).unwrap().is_some());
    let change = || FileDelta {
        generation: 2,
        changes: true,
        files: vec![(file(1, "a.raw", "alice", 1), Vec::new())],
        removed: Vec::new(),
    };
    let first = idx.update(&d, Some(1), change()).unwrap().unwrap();
    assert_eq!((first.generation, first.files.len()), (2, 1));
    let second = idx.update(&d, Some(1), change()).unwrap();
    let second = second.expect("the catalog the first reader kept");
    assert_eq!((second.generation, second.files.len()), (2, 1));
    // One kept at another generation, older than what was read, is not
    // the answer: the changes are read again.
    let newer = FileDelta {
        generation: 4,
        ..change()
    };
    assert!(idx.update(&d, Some(1), newer).unwrap().is_none());
}
