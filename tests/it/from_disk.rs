//! Images made from disks through the `cairn` CLI, over a real agent and
//! coordinator: requests the catalog would refuse are refused with nothing
//! made; an idle disk's image is its data, with the agent's SHA-256 and
//! a metafile, and its snapshot is merged away; an active disk's image is
//! its state at the snapshot, and the snapshot stays until the leader
//! merges it once the disk is idle; a disk made from the image reads as
//! the image. The data is read back through activations with qemu-img.

use cairn_proto::agent as apb;
use cairn_proto::auth::Role;
use cairn_tests::agent::{rt, AgentProc};
use cairn_tests::auth::Tokens;
use cairn_tests::coordinator::{activate, check_disk, deactivate, CoordProc};
use cairn_tests::data::{expected_file, write_both};
use cairn_tests::domain::{domain_clean, make_named_domain};
use cairn_tests::Answer;
use serde_json::Value;

use crate::files::Cli;
use crate::from_image::json;

const MIB: u64 = 1 << 20;

fn sha256_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

async fn tag_count(a: &mut apb::agent_client::AgentClient<tonic::transport::Channel>) -> usize {
    a.list_tags(apb::ListTagsRequest {
        domain: "one".into(),
    })
    .await
    .answer()
    .tags
    .len()
}

#[test]
fn root_qemu_images_from_disks_idle_and_active() {
    let dir = tempfile::tempdir().unwrap();
    let d1 = dir.path().join("one.img");
    make_named_domain(&d1, 2, "one");
    let agent = AgentProc::start(&d1, &dir.path().join("agent"));
    let tokens = Tokens::make(
        &dir.path().join("tokens"),
        &[("alice", Role::User), ("bob", Role::User)],
    );
    let mut extra = vec![
        "--agent".to_string(),
        agent.socket.display().to_string(),
        // The leader sweeps every 2 s.
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
    let (alice, bob) = (cli(Some("alice")), cli(Some("bob")));
    let exp = cwd.join("disk.expected");

    // Alice's raw disk of 8 MiB with data at 1 MiB and 6 MiB.
    let disk = alice
        .ok(&["disk", "create", "-q", "--size", "8M", "--name", "src"])
        .trim()
        .to_string();
    expected_file(&exp, 8 * MIB);
    rt().block_on(async {
        let mut a = agent.client().await;
        let p = activate(&mut a, "one", &disk).await;
        write_both(&p, &exp, MIB, MIB, 0x41);
        write_both(&p, &exp, 6 * MIB, 512 << 10, 0x42);
        deactivate(&mut a, "one", &disk).await;
    });
    alice.ok(&["file", "upload", "disk.expected", "one:taken.raw"]);
    let tags0 = rt().block_on(async { tag_count(&mut agent.client().await).await });

    // Refused with nothing made: another user's disk (as if it did not
    // exist), a path that exists or climbs out, a bad property, no name.
    bob.refused(
        &["image", "create", "--from-disk", &disk, "Nope"],
        "not_found",
    );
    alice.refused(
        &[
            "image",
            "create",
            "--from-disk",
            &disk,
            "X",
            "--path",
            "taken.raw",
        ],
        "already exists",
    );
    alice.refused(
        &[
            "image",
            "create",
            "--from-disk",
            &disk,
            "X",
            "--path",
            "a/../b.raw",
        ],
        "invalid",
    );
    alice.refused(
        &["image", "create", "--from-disk", &disk, "X", "-p", "a\tb=1"],
        "key",
    );
    alice.refused(&["image", "create", "--from-disk", &disk, ""], "name");
    rt().block_on(async {
        assert_eq!(tag_count(&mut agent.client().await).await, tags0);
    });

    // An idle disk: the image is its data, checksummed by the agent, with
    // a metafile beside its file; the snapshot is merged away.
    let i = json(
        &alice,
        &[
            "image",
            "create",
            "--from-disk",
            &disk,
            "Golden",
            "-p",
            "os=debian",
        ],
    );
    let want = std::fs::read(&exp).unwrap();
    assert_eq!(i["name"], "Golden", "{i}");
    assert_eq!(i["owner"], "alice");
    assert_eq!(i["disk-format"], "raw");
    assert_eq!(i["size"].as_u64(), Some(8 * MIB));
    assert_eq!(i["virtual-size"].as_u64(), Some(8 * MIB));
    assert_eq!(i["properties"]["OS"], "debian");
    assert_eq!(i["checksum"].as_str(), Some(sha256_hex(&want).as_str()));
    let loc = i["location"].as_str().unwrap().to_string();
    let prefix = format!("cairn://alice/one/images/from-disk/{disk}-");
    assert!(loc.starts_with(&prefix) && loc.ends_with(".raw"), "{loc}");
    let path = loc.trim_start_matches("cairn://alice/one/").to_string();
    let back = alice.run(&["file", "cat", &format!("one:{path}")]);
    assert!(back.status.success());
    assert!(
        back.stdout == want,
        "the image's file is not the disk's data"
    );
    let meta = alice.ok(&["file", "cat", &format!("one:{path}.meta")]);
    let meta: Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["name"], "Golden", "{meta}");
    let v = json(&alice, &["disk", "show", &disk]);
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 0, "{v}");
    let golden = i["id"].as_str().unwrap().to_string();
    bob.refused(&["image", "info", &golden], "not_found");
    rt().block_on(async {
        let mut a = agent.client().await;
        check_disk(&mut a, "one", &disk, &exp).await;
    });

    // An active disk: the image is its state at the snapshot, and the
    // snapshot stays while the disk is active; the leader merges it once
    // the disk is idle.
    let exp2 = cwd.join("disk2.expected");
    std::fs::copy(&exp, &exp2).unwrap();
    rt().block_on(async {
        let mut a = agent.client().await;
        let p = activate(&mut a, "one", &disk).await;
        write_both(&p, &exp2, 2 * MIB, MIB, 0x43);
    });
    let live = json(
        &alice,
        &[
            "image",
            "create",
            "--from-disk",
            &disk,
            "Live",
            "--path",
            "live.raw",
        ],
    );
    let want2 = std::fs::read(&exp2).unwrap();
    assert_eq!(live["checksum"].as_str(), Some(sha256_hex(&want2).as_str()));
    assert_eq!(live["location"], "cairn://alice/one/live.raw");
    let v = json(&alice, &["disk", "show", &disk]);
    let snaps = v["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{v}");
    let desc = snaps[0]["description"].as_str().unwrap();
    assert!(desc.contains(live["id"].as_str().unwrap()), "{desc}");
    rt().block_on(async {
        let mut a = agent.client().await;
        deactivate(&mut a, "one", &disk).await;
    });
    let t0 = std::time::Instant::now();
    loop {
        let v = json(&alice, &["disk", "show", &disk]);
        if v["snapshots"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(t0.elapsed().as_secs() < 60, "the snapshot stayed: {v}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    rt().block_on(async {
        let mut a = agent.client().await;
        check_disk(&mut a, "one", &disk, &exp2).await;
    });

    // A disk from the first image reads as the disk did then.
    let from = alice
        .ok(&["disk", "create", "-q", "--from-image", &golden])
        .trim()
        .to_string();
    rt().block_on(async {
        let mut a = agent.client().await;
        check_disk(&mut a, "one", &from, &exp).await;
    });
    // The image's file holds the new disk: it cannot go.
    alice.refused(&["file", "delete", &format!("one:{path}")], "registered");
    drop(coord);
    drop(agent);
    domain_clean(&d1);
}

/// Poll job `id` on `c` until an agent copies for it.
async fn copying(
    c: &mut cairn_coordinator::pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    id: &str,
) -> cairn_coordinator::pb::Job {
    use cairn_tests::ask::CoordCalls;
    let t = std::time::Instant::now();
    loop {
        let j = c.job_now(id).await;
        if j.step == "copying" && !j.host_id.is_empty() {
            return j;
        }
        assert_eq!(
            j.state,
            cairn_coordinator::pb::JobState::Running as i32,
            "{j:?}"
        );
        assert!(t.elapsed().as_secs() < 30, "{j:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// An image-from-disk job whose agent, then whose coordinator, is killed
/// in the middle of its copy: the copy runs again (on another host, or
/// under the coordinator that took the job over), and the end is one
/// image of the disk's data, one version of its file, no snapshot left
/// and nothing half made. A disk from a qcow2 image whose coordinator is
/// killed while it fills the image cache ends with one cache.
#[test]
fn root_etcd_qemu_images_from_disks_survive_killed_agents_and_coordinators() {
    use cairn_coordinator::pb;
    use cairn_tests::cluster::{filled_disk, Cluster};
    use cairn_tests::coordinator::{finish, ok};

    let mut cl = Cluster::start(3, 2);
    let base = cl.dir.path().to_path_buf();
    let exp = base.join("big.expected");
    rt().block_on(async {
        let mut c0 = cl.wait_agents(0, 3).await;
        let c1 = cl.wait_agents(1, 3).await;
        let big = filled_disk(&mut c0, &cl.agents[0], "big", 256, 0x6b, &exp).await;
        let want = sha256_hex(&std::fs::read(&exp).unwrap());
        let ask = |rid: &str| pb::CreateImageFromDiskRequest {
            request_id: rid.into(),
            domain: String::new(),
            disk_id: big.clone(),
            name: rid.into(),
            path: format!("{rid}.raw"),
            properties: Default::default(),
            public: false,
        };
        let check =
            |mut c: pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
             j: pb::Job,
             rid: &'static str| {
                let want = want.clone();
                async move {
                    let i = c
                        .get_image(pb::GetImageRequest {
                            image_id: j.image_id.clone(),
                        })
                        .await
                        .answer();
                    assert_eq!(i.checksum, want, "{i:?}");
                    assert_eq!(i.size, 256 * MIB);
                    let v = c
                        .file_versions(pb::FileVersionsRequest {
                            location: format!("{}:{rid}.raw", i.domain),
                        })
                        .await
                        .answer();
                    assert_eq!(v.files.len(), 1, "one version: {v:?}");
                }
            };

        // The agent copying is killed: the copy starts again on another.
        let j = c0.create_image_from_disk(ask("img-agent")).await.answer();
        let running = copying(&mut c0, &j.id).await;
        let victim = cl.agent_of(&running.host_id);
        cl.agents[victim].kill();
        let done = ok(finish(c0.clone(), running).await);
        assert!(done.attempts >= 2, "{done:?}");
        check(c0.clone(), done, "img-agent").await;
        cl.agents[victim] = cl.start_agent(victim);

        // The coordinator running the job is killed: the other takes it
        // over.
        let mut c1 = c1;
        cl.wait_agents(1, 3).await;
        let j = c0.create_image_from_disk(ask("img-coord")).await.answer();
        copying(&mut c0, &j.id).await;
        cl.coords[0].kill();
        let done = ok(finish(c1.clone(), j).await);
        assert_eq!(done.owner, "coord1", "{done:?}");
        check(c1.clone(), done.clone(), "img-coord").await;

        // A disk from a qcow2 image, whose coordinator is killed while it
        // converts the image into the domain's cache: the other takes the
        // job over, and one cache results, read as the image.
        let dom = c1
            .get_image(pb::GetImageRequest {
                image_id: done.image_id.clone(),
            })
            .await
            .answer()
            .domain;
        let q = base.join("q.qcow2");
        let qexp = base.join("q.expected");
        let run = |c: &mut std::process::Command| {
            let o = c.output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("192M"));
        run(std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 77 8M 160M"])
            .arg(&q));
        run(std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&q)
            .arg(&qexp));
        let bytes = std::fs::read(&q).unwrap();
        let mut msgs = vec![pb::UploadFileRequest {
            header: Some(pb::UploadHeader {
                request_id: "up-q".into(),
                location: format!("{dom}:q.qcow2"),
                size: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
                directory: false,
            }),
            data: Vec::new(),
        }];
        msgs.extend(bytes.chunks(1 << 20).map(|d| pb::UploadFileRequest {
            header: None,
            data: d.to_vec(),
        }));
        c1.upload_file(tokio_stream::iter(msgs)).await.answer();
        let img = c1
            .register_image(pb::RegisterImageRequest {
                request_id: "reg-q".into(),
                name: "q".into(),
                location: format!("{dom}:q.qcow2"),
                disk_format: "qcow2".into(),
                no_metafile_upload: true,
                ..Default::default()
            })
            .await
            .answer()
            .image
            .unwrap();
        cl.coords[0] = cl.start_coord(0);
        let mut c0 = cl.wait_agents(0, 3).await;
        // The call answers once the disk is made: it is sent aside, and
        // the job followed by its id.
        let mut sender = c0.clone();
        let call = tokio::spawn(async move {
            sender
                .create_disk(pb::CreateDiskRequest {
                    request_id: "from-q".into(),
                    from_image: img.id.clone(),
                    ..Default::default()
                })
                .await
        });
        let id = cairn_coordinator::runner::job_id("from-q");
        let t = std::time::Instant::now();
        while c0
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .is_err()
        {
            assert!(t.elapsed().as_secs() < 30, "no job {id}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let j = copying(&mut c0, &id).await;
        cl.coords[0].kill();
        assert!(call.await.unwrap().is_err(), "its coordinator died first");
        let made = ok(finish(c1.clone(), j).await);
        assert_eq!(made.owner, "coord1", "{made:?}");
        let from_q = made.disk.unwrap().id;
        let mut a = cl.agents[(victim + 1) % 3].client().await;
        let tags = a
            .list_tags(apb::ListTagsRequest {
                domain: String::new(),
            })
            .await
            .answer()
            .tags;
        let caches = tags
            .iter()
            .filter(|t| t.options.iter().any(|o| o.value == "image-cache"))
            .count();
        assert_eq!(caches, 1, "{tags:?}");
        check_disk(&mut a, "", &from_q, &qexp).await;

        // The disk keeps its data and has no snapshot; nothing is half
        // made once the killed agent's slot is recovered.
        let t = std::time::Instant::now();
        loop {
            let d = c1
                .get_disk(pb::GetDiskRequest {
                    domain: String::new(),
                    disk_id: big.clone(),
                })
                .await
                .answer();
            let vols = cairn_tests::ask::AgentCalls::volumes(&mut a).await;
            let half = vols
                .iter()
                .any(|v| v.legality != apb::Legality::Legal as i32);
            if d.snapshots.is_empty() && !half {
                break;
            }
            assert!(
                t.elapsed().as_secs() < 60,
                "snapshots {:?}, volumes {vols:?}",
                d.snapshots
            );
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        check_disk(&mut a, "", &big, &exp).await;
    });
    cl.stop_and_check();
}
