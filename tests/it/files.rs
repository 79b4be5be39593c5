//! The catalog's files through the agent's real gRPC API: inline and
//! volume-backed versions, reads, optimistic concurrency, deletes, bad
//! input with no change.

use std::path::Path;
use std::process::{Command, Output};

use cairn_proto::agent as pb;
use cairn_proto::auth::Role;
use cairn_tests::agent::*;
use cairn_tests::auth::Tokens;
use cairn_tests::bins::cairn_bin;
use cairn_tests::coordinator::CoordProc;
use cairn_tests::domain::*;
use cairn_tests::Answer;
use tonic::Code;

fn commit(rid: &str, path: &str, data: &[u8]) -> pb::CommitFileRequest {
    pb::CommitFileRequest {
        request_id: rid.into(),
        path: path.into(),
        owner: "alice".into(),
        data: data.to_vec(),
        ..Default::default()
    }
}

async fn read_all(c: &mut AgentClient, tag: &str, offset: u64, length: u64) -> Vec<u8> {
    let mut s = c
        .read_file(pb::ReadFileRequest {
            tag_id: tag.into(),
            offset,
            length,
            ..Default::default()
        })
        .await
        .answer();
    let mut back = Vec::new();
    while let Some(chunk) = s.message().await.unwrap() {
        assert_eq!(chunk.offset, offset + back.len() as u64);
        back.extend_from_slice(&chunk.data);
    }
    back
}

type AgentClient = pb::agent_client::AgentClient<tonic::transport::Channel>;

#[test]
fn agent_commits_lists_reads_and_deletes_file_versions() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    let hex = cairn_proto::auth::hex;
    let sha = |b: &[u8]| hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
    rt().block_on(async {
        let mut c = agent.client().await;
        // A domain nobody stored a file on has no catalog and is not changed
        // by being asked.
        let before = domain_state(&dom);
        let l = c.list_files(pb::ListFilesRequest::default()).await.answer();
        assert_eq!((l.files.len(), l.generation), (0, 0));
        assert!(before == domain_state(&dom), "listing changed the domain");

        // Bad paths and oversized inline bytes: refused, nothing changed.
        for (n, (path, why)) in [
            ("", "empty"),
            ("../etc/passwd", ".."),
            ("images/../x", ".."),
            ("/abs", "/"),
            ("a//b", "empty"),
            ("a/", "'/'"),
            ("a\0b", "control"),
        ]
        .into_iter()
        .enumerate()
        {
            let e = c
                .commit_file(commit(&format!("bad-{n}"), path, b"x"))
                .await
                .refused(Code::InvalidArgument, "path");
            assert!(e.message().contains(why), "{path:?}: {}", e.message());
        }
        c.commit_file(commit("huge", "big.meta", &vec![7; 4097]))
            .await
            .refused(Code::InvalidArgument, "4096");
        assert!(before == domain_state(&dom), "bad input changed the domain");

        // Inline versions: each commit raises the generation; the version is
        // the generation it made, so a path's versions only grow.
        let v1 = c
            .commit_file(commit("m1", "images/a.meta", b"{\"name\":1}"))
            .await
            .answer();
        let f1 = v1.file.unwrap();
        assert_eq!((f1.version, v1.generation, f1.inline), (1, 1, true));
        assert_eq!(f1.sha256, sha(b"{\"name\":1}"));
        assert_eq!((f1.size, f1.owner.as_str()), (10, "alice"));
        // The same request again answers the same, and does nothing more.
        let again = c
            .commit_file(commit("m1", "images/a.meta", b"{\"name\":1}"))
            .await
            .answer();
        assert_eq!(again.file.unwrap().tag_id, f1.tag_id);
        let v2 = c
            .commit_file(commit("m2", "images/a.meta", b"{\"name\":2}"))
            .await
            .answer();
        let f2 = v2.file.unwrap();
        assert_eq!((f2.version, v2.generation), (2, 2));
        assert_ne!(f2.tag_id, f1.tag_id);
        // The old version stays readable beside the new one; ranges work.
        assert_eq!(read_all(&mut c, &f1.tag_id, 0, 0).await, b"{\"name\":1}");
        assert_eq!(read_all(&mut c, &f2.tag_id, 2, 4).await, b"name");
        c.read_file(pb::ReadFileRequest {
            tag_id: f2.tag_id.clone(),
            offset: 8,
            length: 8,
            ..Default::default()
        })
        .await
        .refused(Code::InvalidArgument, "beyond");

        // A commit planned at an older generation is ABORTED, no change.
        let before = domain_state(&dom);
        let mut stale = commit("stale", "images/b.meta", b"b");
        stale.expect_generation = Some(1);
        c.commit_file(stale).await.refused(Code::Aborted, "");
        assert!(before == domain_state(&dom), "a stale commit acted");

        // A volume-backed version: the bytes written through
        // WriteVolumeData under the lock, committed, read back exactly.
        let len = (5 << 20) + 100;
        let data: Vec<u8> = (0..len as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        let r = c
            .create_volume(pb::CreateVolumeRequest {
                request_id: "vol".into(),
                format: pb::VolumeFormat::Raw as i32,
                capacity: 6 << 20,
                keep_locked: true,
                ..Default::default()
            })
            .await
            .answer();
        let (vol, lock) = (r.volume.unwrap(), r.lock_id);
        c.update_volume(pb::UpdateVolumeRequest {
            volume_id: vol.id.clone(),
            legality: pb::Legality::Illegal as i32,
            lock_id: lock.clone(),
            ..Default::default()
        })
        .await
        .answer();
        let mut file = commit("big", "images/debian.raw", b"");
        file.volume_id = vol.id.clone();
        file.lock_id = lock.clone();
        // Nothing written yet: refused.
        c.commit_file(file.clone())
            .await
            .refused(Code::FailedPrecondition, "nothing was written");
        let first = pb::WriteVolumeDataRequest {
            volume_id: vol.id.clone(),
            lock_id: lock.clone(),
            ..Default::default()
        };
        let msgs = std::iter::once(first).chain(data.chunks(1 << 20).map(|d| {
            pb::WriteVolumeDataRequest {
                data: d.to_vec(),
                ..Default::default()
            }
        }));
        c.write_volume_data(tokio_stream::iter(msgs.collect::<Vec<_>>()))
            .await
            .answer();
        file.request_id = "big-2".into();
        let fv = c.commit_file(file).await.answer().file.unwrap();
        assert_eq!((fv.version, fv.inline, fv.size), (3, false, len as u64));
        assert_eq!(
            (fv.volume_id.as_str(), fv.sha256),
            (vol.id.as_str(), sha(&data))
        );
        c.unlock_volume(pb::UnlockVolumeRequest {
            lock_id: lock.clone(),
        })
        .await
        .answer();
        let back = read_all(&mut c, &fv.tag_id, 0, 0).await;
        assert!(back == data, "the file's bytes read back differ");
        c.read_file(pb::ReadFileRequest {
            tag_id: fv.tag_id.clone(),
            offset: 100,
            length: 512,
            ..Default::default()
        })
        .await
        .refused(Code::InvalidArgument, "sector");

        // The listing: every version, at the generation it was read at.
        let l = c.list_files(pb::ListFilesRequest::default()).await.answer();
        assert_eq!(l.generation, 3);
        let mut seen: Vec<_> = l
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.version))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("images/a.meta", 1),
                ("images/a.meta", 2),
                ("images/debian.raw", 3)
            ]
        );

        // Deletes: stale is ABORTED; a version goes with its volume.
        let del = |rid: &str, tags: Vec<String>, expect| pb::DeleteFilesRequest {
            request_id: rid.into(),
            tag_ids: tags,
            expect_generation: expect,
            ..Default::default()
        };
        c.delete_files(del("d0", vec![fv.tag_id.clone()], Some(2)))
            .await
            .refused(Code::Aborted, "");
        c.delete_files(del("d00", vec![], None))
            .await
            .refused(Code::InvalidArgument, "tag_ids");
        let d = c
            .delete_files(del(
                "d1",
                vec![fv.tag_id.clone(), f1.tag_id.clone()],
                Some(3),
            ))
            .await
            .answer();
        assert_eq!(d.generation, 4);
        let l = c.list_files(pb::ListFilesRequest::default()).await.answer();
        assert_eq!(l.files.len(), 1);
        assert_eq!(l.files[0].tag_id, f2.tag_id);
        c.get_volume(pb::GetVolumeRequest {
            volume_id: vol.id.clone(),
            ..Default::default()
        })
        .await
        .refused(Code::NotFound, "");
        c.read_file(pb::ReadFileRequest {
            tag_id: f1.tag_id.clone(),
            ..Default::default()
        })
        .await
        .refused(Code::NotFound, "");
    });
    drop(agent);
    domain_clean(&dom);
}

/// The `cairn` CLI against a coordinator, as `who` (a token; `None`: the
/// local administrator, by the socket's peer uid).
pub(crate) struct Cli<'a> {
    pub(crate) coord: &'a Path,
    pub(crate) token: Option<&'a str>,
    pub(crate) cwd: &'a Path,
}

impl Cli<'_> {
    pub(crate) fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(cairn_bin());
        c.env("CAIRN_COORDINATOR", self.coord)
            .env_remove("CAIRN_TOKEN")
            .current_dir(self.cwd)
            .args(args);
        if let Some(t) = self.token {
            c.env("CAIRN_TOKEN", t);
        }
        c.output().unwrap()
    }

    /// Standard output of a command that must succeed.
    #[track_caller]
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "cairn {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Standard error of a command that must be refused (exit 1) saying
    /// `text`.
    #[track_caller]
    pub(crate) fn refused(&self, args: &[&str], text: &str) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "cairn {args:?}: {err}");
        assert!(
            err.contains(text),
            "cairn {args:?}: {text:?} not in {err:?}"
        );
        err
    }
}

/// A domain, its agent and a coordinator that knows users alice and bob
/// by token, and a working directory for the CLI.
pub(crate) struct TwoUsers {
    pub(crate) tokens: Tokens,
    pub(crate) coord: CoordProc,
    pub(crate) agent: AgentProc,
    pub(crate) dom: std::path::PathBuf,
    pub(crate) cwd: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TwoUsers {
    pub(crate) fn start() -> TwoUsers {
        let (dir, dom, plain) = AgentFixture::new(1).parts();
        let home = plain.dir.clone();
        drop(plain);
        let tokens = Tokens::make(
            &dir.path().join("tokens"),
            &[("alice", Role::User), ("bob", Role::User)],
        );
        let agent = AgentProc::start(&dom, &home);
        let mut extra = vec!["--agent".to_string(), agent.socket.display().to_string()];
        extra.extend(tokens.server_args());
        let coord = CoordProc::start(&dir.path().join("coord"), &extra);
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let cwd = std::fs::canonicalize(&work).unwrap();
        TwoUsers {
            tokens,
            coord,
            agent,
            dom,
            cwd,
            _dir: dir,
        }
    }

    /// The CLI as `user` (`None`: the local administrator).
    pub(crate) fn cli(&self, user: Option<&str>) -> Cli<'_> {
        Cli {
            coord: &self.coord.socket,
            token: user.map(|u| self.tokens.of(u)),
            cwd: &self.cwd,
        }
    }

    /// Stop the servers and check the domain.
    pub(crate) fn stop_and_check(self) {
        let TwoUsers {
            coord, agent, dom, ..
        } = self;
        drop(coord);
        drop(agent);
        domain_clean(&dom);
    }
}

pub(crate) fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 24) as u8)
        .collect()
}

/// Seed 001's file steps through the CLI with two users: upload, list
/// with sizes and directories, versions, cat and download of an old
/// version, a directory tree, another user's files refused, bad input
/// refused with no change, deletes.
#[test]
fn cairn_file_commands_upload_list_version_read_and_delete_as_two_users() {
    let h = TwoUsers::start();
    std::fs::create_dir_all(h.cwd.join("images/sub")).unwrap();
    let (dom, cwd) = (&h.dom, h.cwd.clone());
    let alice = h.cli(Some("alice"));
    let bob = h.cli(Some("bob"));
    let admin = h.cli(None);
    assert_eq!(alice.ok(&["whoami"]).trim(), "alice (user)");

    // 5.1: upload to a bare domain takes the local name.
    let image = pattern((3 << 20) + 7, 1);
    std::fs::write(cwd.join("debian.raw"), &image).unwrap();
    assert_eq!(
        alice.ok(&["file", "upload", "debian.raw", "it"]),
        format!(
            "Uploading {}/debian.raw --> it:debian.raw\nDone\n",
            cwd.display()
        )
    );
    assert_eq!(alice.ok(&["file", "list", "it:"]), "3.0MB   debian.raw\n");

    // 5.8: a metafile uploaded twice keeps both versions.
    std::fs::write(cwd.join("m1"), b"{\"name\": \"Alpha\"}").unwrap();
    std::fs::write(cwd.join("m2"), b"{\"name\": \"Beta\"}").unwrap();
    alice.ok(&["file", "upload", "m1", "it:debian.raw.meta"]);
    alice.ok(&["file", "upload", "m2", "it:debian.raw.meta"]);
    let v: serde_json::Value =
        serde_json::from_str(&alice.ok(&["--json", "file", "versions", "it:debian.raw.meta"]))
            .unwrap();
    let versions: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions.len(), 2);
    assert!(versions[0] < versions[1], "{versions:?}");
    assert_eq!(v[0]["location"], "cairn://alice/it/debian.raw.meta");
    let text = alice.ok(&["file", "versions", "it:debian.raw.meta"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(lines[0], versions[0].to_string());
    assert!(lines[1].starts_with(" created: 20"), "{text}");
    let old = versions[0].to_string();
    assert_eq!(
        alice.ok(&[
            "file",
            "cat",
            "--object-version",
            &old,
            "it:debian.raw.meta"
        ]),
        "{\"name\": \"Alpha\"}"
    );
    assert_eq!(
        alice.ok(&["file", "cat", "it:debian.raw.meta"]),
        "{\"name\": \"Beta\"}"
    );
    assert_eq!(
        alice.ok(&[
            "file",
            "download",
            "--object-version",
            &old,
            "it:debian.raw.meta",
            "meta.v1"
        ]),
        format!(
            "Downloading it:debian.raw.meta --> {}/meta.v1\nDone\n",
            cwd.display()
        )
    );
    assert_eq!(
        std::fs::read(cwd.join("meta.v1")).unwrap(),
        b"{\"name\": \"Alpha\"}"
    );
    alice.ok(&[
        "file",
        "download",
        "cairn://alice/it/debian.raw",
        "back.raw",
    ]);
    assert!(std::fs::read(cwd.join("back.raw")).unwrap() == image);

    // 5.9: a directory tree, its markers listed as D.
    std::fs::write(cwd.join("images/b.raw"), pattern(6000, 2)).unwrap();
    std::fs::write(cwd.join("images/a.raw"), pattern(5 << 20, 3)).unwrap();
    std::fs::write(cwd.join("images/sub/c.raw"), b"c").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", cwd.join("images/link")).unwrap();
    let up = alice.ok(&["file", "upload", "-R", "images", "it"]);
    let d = cwd.display();
    assert_eq!(
        up,
        format!(
            "mkdir it:images\n\
             Uploading {d}/images/a.raw --> it:images/a.raw\n\
             Uploading {d}/images/b.raw --> it:images/b.raw\n\
             mkdir it:images/sub\n\
             Uploading {d}/images/sub/c.raw --> it:images/sub/c.raw\n\
             Done\n"
        )
    );
    assert_eq!(
        alice.ok(&["file", "list", "it:images/"]),
        "D       images/\n\
         5.0MB   images/a.raw\n\
         5.9KB   images/b.raw\n\
         D       images/sub/\n\
         1B      images/sub/c.raw\n"
    );

    // Another user sees none of it and may not touch it; admin sees all.
    assert_eq!(bob.ok(&["file", "list", "it:"]), "");
    bob.refused(&["file", "cat", "it:debian.raw.meta"], "permission_denied");
    bob.refused(
        &["file", "upload", "m1", "it:debian.raw.meta"],
        "permission_denied",
    );
    bob.refused(&["file", "delete", "it:debian.raw"], "permission_denied");
    bob.refused(
        &["file", "upload", "m1", "cairn://alice/it/mine"],
        "may not act for owner alice",
    );
    assert_eq!(admin.ok(&["file", "list", "it:"]).lines().count(), 7);
    assert_eq!(
        admin.ok(&["file", "list", "cairn://alice/it/images/sub"]),
        "D       images/sub/\n1B      images/sub/c.raw\n"
    );

    // Bad input: refused, naming what was wrong, with no change at all.
    let before = domain_state(dom);
    for (loc, why) in [
        ("it:../x", "'..'"),
        ("it:a//b", "empty"),
        ("images/x", "expected DOMAIN:PATH"),
        ("nosuch:x", "not found"),
    ] {
        let code = if why == "not found" {
            "not_found"
        } else {
            "invalid_argument"
        };
        let e = alice.refused(&["file", "upload", "m1", loc], code);
        assert!(e.contains(why), "{loc}: {e}");
    }
    alice.refused(&["file", "cat", "it:nothing"], "not_found");
    alice.refused(
        &["file", "cat", "--object-version", "1", "it:debian.raw.meta"],
        "not_found",
    );
    assert!(before == domain_state(dom), "bad input changed the domain");

    // Deletes: one version, then a whole file with its volume.
    alice.ok(&[
        "file",
        "delete",
        "--object-version",
        &old,
        "it:debian.raw.meta",
    ]);
    let text = alice.ok(&["file", "versions", "it:debian.raw.meta"]);
    assert_eq!(text.lines().next(), Some(versions[1].to_string().as_str()));
    assert_eq!(text.lines().count(), 2);
    let out = alice.ok(&["file", "delete", "it:debian.raw"]);
    assert!(out.starts_with("Deleted it:debian.raw (versions "), "{out}");
    alice.refused(&["file", "cat", "it:debian.raw"], "not_found");
    assert!(!alice.ok(&["file", "list", "it:"]).contains("debian.raw\n"));
    // Catalog tags are no disks, for anyone.
    assert_eq!(admin.ok(&["--json", "disk", "list"]).trim(), "[]");
    h.stop_and_check();
}

/// Uploads through the coordinator's API: a retry answers the first
/// upload's version; short, long or mismatched bytes keep nothing (no
/// version, no volume); the bytes of a large file are the agent's count.
#[test]
fn coordinator_uploads_are_idempotent_and_keep_nothing_of_bad_bytes() {
    use cairn_proto::coordinator as cpb;
    let (dir, dom, agent) = AgentFixture::new(1).parts();
    let coord = CoordProc::of(dir.path(), &agent);
    let hex = cairn_proto::auth::hex;
    let data = pattern((2 << 20) + 300, 9);
    let sha = hex(ring::digest::digest(&ring::digest::SHA256, &data).as_ref());
    let upload = |rid: &str, loc: &str, size: u64, sha256: &str, body: Vec<Vec<u8>>| {
        let header = cpb::UploadHeader {
            request_id: rid.into(),
            location: loc.into(),
            size,
            sha256: sha256.into(),
            directory: false,
        };
        let mut msgs = vec![cpb::UploadFileRequest {
            header: Some(header),
            data: Vec::new(),
        }];
        msgs.extend(
            body.into_iter()
                .map(|data| cpb::UploadFileRequest { header: None, data }),
        );
        tokio_stream::iter(msgs)
    };
    let chunks = |b: &[u8]| b.chunks(700_000).map(<[u8]>::to_vec).collect::<Vec<_>>();
    rt().block_on(async {
        let mut c = coord.client().await;
        let mut a = agent.client().await;
        let volumes = |l: pb::ListVolumesResponse| l.volumes.len();
        let n0 = volumes(
            a.list_volumes(pb::ListVolumesRequest::default())
                .await
                .answer(),
        );
        let r = c
            .upload_file(upload(
                "u1",
                "it:big.raw",
                data.len() as u64,
                &sha,
                chunks(&data),
            ))
            .await
            .answer();
        let f = r.file.unwrap();
        assert!(r.created);
        assert_eq!(
            (f.size, f.sha256.as_str()),
            (data.len() as u64, sha.as_str())
        );
        assert_eq!(f.location, "cairn://uid:0/it/big.raw");
        // The same request again: the same version, nothing new.
        let again = c
            .upload_file(upload(
                "u1",
                "it:big.raw",
                data.len() as u64,
                &sha,
                chunks(&data),
            ))
            .await
            .answer();
        assert!(!again.created);
        assert_eq!(again.file.unwrap().version, f.version);
        let listed = |c: &mut cpb::coordinator_client::CoordinatorClient<_>| {
            let mut c = c.clone();
            async move {
                c.list_files(cpb::ListFilesRequest {
                    location: "it:".into(),
                })
                .await
                .answer()
            }
        };
        let before = listed(&mut c).await;
        let n1 = volumes(
            a.list_volumes(pb::ListVolumesRequest::default())
                .await
                .answer(),
        );
        assert!(n1 > n0, "the file has a volume");
        // Short, long, and mismatched bytes; a header in the middle.
        let short = data[..data.len() - 1].to_vec();
        c.upload_file(upload(
            "u2",
            "it:big.raw",
            data.len() as u64,
            "",
            chunks(&short),
        ))
        .await
        .refused(Code::InvalidArgument, "came, not the");
        let mut long = data.clone();
        long.push(0);
        c.upload_file(upload(
            "u3",
            "it:big.raw",
            data.len() as u64,
            "",
            chunks(&long),
        ))
        .await
        .refused(Code::InvalidArgument, "more than");
        let wrong = "0".repeat(64);
        c.upload_file(upload(
            "u4",
            "it:big.raw",
            data.len() as u64,
            &wrong,
            chunks(&data),
        ))
        .await
        .refused(Code::DataLoss, "SHA-256");
        c.upload_file(upload("u5", "it:small", 3, &wrong, vec![b"abc".to_vec()]))
            .await
            .refused(Code::DataLoss, "SHA-256");
        c.upload_file(upload("u6", "it:small", 3, "", vec![b"ab".to_vec()]))
            .await
            .refused(Code::InvalidArgument, "came, not the");
        c.upload_file(upload("u7", "it:small", 3, "xyz", vec![b"abc".to_vec()]))
            .await
            .refused(Code::InvalidArgument, "sha256");
        let after = listed(&mut c).await;
        assert_eq!(
            after.generation, before.generation,
            "a bad upload committed"
        );
        assert_eq!(after.files, before.files);
        let n2 = volumes(
            a.list_volumes(pb::ListVolumesRequest::default())
                .await
                .answer(),
        );
        assert_eq!(n2, n1, "a bad upload left a volume behind");
        // A stream without its header.
        let e = c
            .upload_file(tokio_stream::iter(Vec::<cpb::UploadFileRequest>::new()))
            .await
            .refused(Code::InvalidArgument, "header");
        assert!(!e.message().is_empty());
    });
    drop(coord);
    drop(agent);
    domain_clean(&dom);
}
