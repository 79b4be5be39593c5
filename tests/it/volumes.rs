//! Volumes through the agent's real gRPC API: extend and measure, client
//! locks, rebase, deleting a disk, preallocation.

use cairn_proto::agent as pb;
use cairn_tests::agent::*;
use cairn_tests::ask::{self, AgentCalls};
use cairn_tests::domain::*;
use cairn_tests::Answer;

#[test]
fn qemu_agent_extend_in_place_or_resource_exhausted_and_measure() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    rt().block_on(async {
        let mut c = agent.client().await;
        let a = c.new_disk("a", pb::VolumeFormat::Qcow2, 16).await.0;
        let b = c.new_disk("b", pb::VolumeFormat::Raw, 16).await.0;
        // b is last: it grows in place.
        let r = c
            .extend_volume(pb::ExtendVolumeRequest {
                request_id: "x1".into(),
                volume_id: b.id.clone(),
                capacity: 32 << 20,
                ..Default::default()
            })
            .await
            .answer();
        assert!(r.changed);
        let v = r.volume.unwrap();
        assert_eq!((v.capacity, v.extent_start), (32 << 20, b.extent_start));
        // a is followed by b: no room in place.
        let before = domain_state(&dom);
        let e = c
            .extend_volume(pb::ExtendVolumeRequest {
                request_id: "x2".into(),
                volume_id: a.id.clone(),
                capacity: 64 << 20,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
        use tonic_types::StatusExt;
        assert_eq!(
            e.get_details_error_info().unwrap().reason,
            "extents_exhausted"
        );
        assert!(
            before == domain_state(&dom),
            "a refused extend changed the domain"
        );
        // A qcow2 grows its virtual size within the slack of its run (a
        // header rewrite), and stays a valid image.
        let r = c
            .extend_volume(pb::ExtendVolumeRequest {
                request_id: "x3".into(),
                volume_id: a.id.clone(),
                capacity: (16 << 20) + (512 << 10),
                ..Default::default()
            })
            .await
            .answer();
        let grown = r.volume.unwrap();
        assert_eq!(grown.capacity, (16 << 20) + (512 << 10));
        assert_eq!(grown.extent_count, a.extent_count, "the run moved or grew");
        c.assert_clean(&a.id).await;
        let m = c
            .measure_volume(pb::MeasureVolumeRequest {
                volume_id: b.id.clone(),
                target_format: pb::VolumeFormat::Qcow2 as i32,
                ..Default::default()
            })
            .await
            .answer();
        // An empty raw volume needs only qcow2 metadata; fully written, all.
        assert!(m.required < 1 << 20, "{m:?}");
        assert!(m.fully_allocated > 32 << 20, "{m:?}");
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_client_locks_exclude_others_until_unlocked() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    rt().block_on(async {
        let mut c = agent.client().await;
        let mut req = disk_request("v", pb::VolumeFormat::Raw, 4);
        req.tag = None;
        req.keep_locked = true;
        let r = c.create_volume(req).await.answer();
        let v = r.volume.unwrap();
        assert!(!r.lock_id.is_empty(), "keep_locked gave no lock id");
        // With the lock id the holder changes the volume at once.
        let u = c
            .update_volume(pb::UpdateVolumeRequest {
                request_id: "u1".into(),
                volume_id: v.id.clone(),
                description: "mine".into(),
                legality: pb::Legality::Legal as i32,
                lock_id: r.lock_id.clone(),
                ..Default::default()
            })
            .await
            .answer();
        assert_eq!(u.volume.unwrap().description, "mine");
        // Without it, a change waits for the lock and gives up (ABORTED
        // after the agent's 5 s lock timeout).
        let t = std::time::Instant::now();
        let e = c
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: "d1".into(),
                volume_id: v.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted, "{}", e.message());
        assert!(t.elapsed().as_secs_f64() > 4.0);
        // Someone else's lock id does not fit this volume.
        let other = c.new_disk("w", pb::VolumeFormat::Raw, 4).await.0;
        let e = c
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: "d2".into(),
                volume_id: other.id.clone(),
                lock_id: r.lock_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        let un = c
            .unlock_volume(pb::UnlockVolumeRequest {
                lock_id: r.lock_id.clone(),
            })
            .await
            .answer();
        assert!(un.released);
        let again = c
            .unlock_volume(pb::UnlockVolumeRequest {
                lock_id: r.lock_id.clone(),
            })
            .await
            .answer();
        assert!(!again.released);
        // Now anyone may delete it; LockVolume takes it again on request.
        let l = c
            .lock_volume(pb::LockVolumeRequest {
                request_id: "l".into(),
                volume_id: v.id.clone(),
                lease_seconds: 60,
                ..Default::default()
            })
            .await
            .answer();
        assert!(l.token > 0);
        c.delete_volume(pb::DeleteVolumeRequest {
            request_id: "d3".into(),
            volume_id: v.id.clone(),
            lock_id: l.lock_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_rebase_changes_the_parent_and_refuses_loops() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    rt().block_on(async {
        let mut c = agent.client().await;
        let base = c
            .create_volume(disk_request("a", pb::VolumeFormat::Raw, 4))
            .await
            .answer();
        let base_tag = base.tag.unwrap();
        let mut q = disk_request("q", pb::VolumeFormat::Qcow2, 4);
        q.parent_tag = base_tag.id.clone();
        let q = c.create_volume(q).await.answer();
        let qv = q.volume.unwrap();
        let q_tag = q.tag.unwrap();
        assert_eq!(qv.parent_tag, base_tag.id);
        let r = c
            .create_volume(disk_request("r", pb::VolumeFormat::Qcow2, 4))
            .await
            .answer();
        let (rv, r_tag) = (r.volume.unwrap(), r.tag.unwrap());
        let upd = |id: &str, parent: &str, rid: &str| pb::UpdateVolumeRequest {
            request_id: rid.into(),
            volume_id: id.into(),
            legality: pb::Legality::Legal as i32,
            description: "disk".into(),
            set_parent: true,
            parent_tag: parent.into(),
            ..Default::default()
        };
        // A raw volume cannot get a parent.
        let e = c
            .update_volume(upd(&base.volume.unwrap().id, &r_tag.id, "u0"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        // Rebase q onto r.
        let u = c.update_volume(upd(&qv.id, &r_tag.id, "u1")).await.answer();
        assert!(u.changed);
        assert_eq!(u.volume.unwrap().parent_tag, r_tag.id);
        // r onto q's tag would be a loop (q's chain goes through r).
        let e = c
            .update_volume(upd(&rv.id, &q_tag.id, "u2"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("loop"), "{}", e.message());
        // The old parent's child count went down, the new one's up.
        let t = c.tag_of(&base_tag.id).await;
        assert_eq!(t.child_refs, 0);
        let t = c.tag_of(&r_tag.id).await;
        assert_eq!(t.child_refs, 1);
        // No parent at all.
        let u = c.update_volume(upd(&qv.id, "", "u3")).await.answer();
        assert_eq!(u.volume.unwrap().parent_tag, "");
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_delete_disk_reclaims_what_only_it_references() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    rt().block_on(async {
        let mut c = agent.client().await;
        let disk = c.new_disk("d", pb::VolumeFormat::Raw, 4).await.1;
        let mut weak = Vec::new();
        for i in 0..3 {
            let s = c
                .snapshot(ask::snapshot(&format!("s{i}"), &disk.id))
                .await
                .answer();
            weak.push(s.parent_tag.unwrap().id);
        }
        // A thin clone on the first snapshot's weak tag keeps that part of
        // the chain alive.
        let mut clone = disk_request("clone", pb::VolumeFormat::Qcow2, 4);
        clone.parent_tag = weak[0].clone();
        let clone = c.create_volume(clone).await.answer().tag.unwrap();
        let counts = |c: &mut cairn_agent::pb::agent_client::AgentClient<_>| {
            let mut c = c.clone();
            async move {
                let v = c.volumes().await.len();
                let t = c
                    .list_tags(pb::ListTagsRequest::default())
                    .await
                    .answer()
                    .tags
                    .len();
                (v, t)
            }
        };
        assert_eq!(counts(&mut c).await, (5, 5));
        let r = c
            .delete_disk(ask::delete_disk("del", &disk.id))
            .await
            .answer();
        // The disk, its top three volumes and the two upper weak tags go;
        // the base and its weak tag stay for the clone.
        assert_eq!(r.tags_removed.len(), 3, "{r:?}");
        assert_eq!(r.volumes_removed.len(), 3, "{r:?}");
        assert!(!r.tags_removed.contains(&weak[0]));
        assert_eq!(counts(&mut c).await, (2, 2));
        let r = c
            .delete_disk(ask::delete_disk("del2", &clone.id))
            .await
            .answer();
        assert_eq!(
            (r.tags_removed.len(), r.volumes_removed.len()),
            (2, 2),
            "{r:?}"
        );
        assert_eq!(counts(&mut c).await, (0, 0));
    });
    drop(agent);
    domain_clean(&dom);
}

#[test]
fn agent_preallocated_volumes_own_their_blocks() {
    use std::os::unix::fs::MetadataExt;
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    let blocks = || std::fs::metadata(&dom).unwrap().blocks() * 512;
    rt().block_on(async {
        let mut c = agent.client().await;
        for (i, f) in [pb::VolumeFormat::Raw, pb::VolumeFormat::Qcow2]
            .into_iter()
            .enumerate()
        {
            let before = blocks();
            let mut sparse = disk_request(&format!("s{i}"), f, 32);
            sparse.tag = None;
            c.create_volume(sparse).await.unwrap();
            let mid = blocks();
            let mut pre = disk_request(&format!("p{i}"), f, 32);
            pre.tag = None;
            pre.allocation = pb::Allocation::Preallocated as i32;
            let v = c.create_volume(pre).await.answer().volume.unwrap();
            assert_eq!(v.allocation, pb::Allocation::Preallocated as i32);
            let after = blocks();
            // A sparse volume costs next to nothing; a preallocated one its
            // whole run.
            assert!(mid - before < 4 << 20, "{f:?} sparse took {}", mid - before);
            assert!(
                after - mid >= 32 << 20,
                "{f:?} preallocated took {}",
                after - mid
            );
        }
    });
    drop(agent);
    domain_clean(&dom);
}

/// Regression: `CreateTag --volume X` on the volume of an existing disk
/// made two writable disks over one image.
#[test]
fn agent_refuses_a_second_writable_tag_on_a_volume() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    rt().block_on(async {
        let mut c = agent.client().await;
        let (v, disk) = c.new_disk("a", pb::VolumeFormat::Raw, 16).await;
        let spec = |mutable: bool, t: pb::TagType| pb::TagSpec {
            volume: v.id.clone(),
            mutable,
            r#type: t as i32,
            ..Default::default()
        };
        let before = domain_state(&dom);
        let e = c
            .create_tag(pb::CreateTagRequest {
                request_id: "second".into(),
                tag: Some(spec(true, pb::TagType::Strong)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains(&disk.id), "{}", e.message());
        assert!(
            before == domain_state(&dom),
            "a refused tag changed the domain"
        );
        // A read-only view of the same volume is fine.
        c.create_tag(pb::CreateTagRequest {
            request_id: "ro".into(),
            tag: Some(spec(false, pb::TagType::Strong)),
            ..Default::default()
        })
        .await
        .answer();
    });
    drop(agent);
    domain_clean(&dom);
}

/// Regression: a request id reused by another method was accepted (a
/// CreateTag and a DeleteVolume with CreateVolume's id both acted).
#[test]
fn agent_refuses_a_request_id_reused_by_another_method() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    rt().block_on(async {
        let mut c = agent.client().await;
        let (v, _) = c.new_disk("one-id", pb::VolumeFormat::Raw, 16).await;
        let before = domain_state(&dom);
        use tonic_types::StatusExt;
        let reused = |e: tonic::Status| {
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
            assert_eq!(
                e.get_details_error_info().unwrap().reason,
                "request_id_reused"
            );
        };
        reused(
            c.create_tag(pb::CreateTagRequest {
                request_id: "one-id".into(),
                tag: Some(pb::TagSpec {
                    volume: v.id.clone(),
                    r#type: pb::TagType::Weak as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        );
        reused(
            c.delete_volume(pb::DeleteVolumeRequest {
                request_id: "one-id".into(),
                volume_id: v.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        );
        assert!(before == domain_state(&dom), "a reused id acted");
        // A request that failed may be retried as it was, not as another.
        let missing = pb::DeleteVolumeRequest {
            request_id: "failed-id".into(),
            volume_id: uuid_of_missing_volume(&v.id),
            ..Default::default()
        };
        let e = c.delete_volume(missing.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
        let e = c.delete_volume(missing).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
        reused(
            c.update_volume(pb::UpdateVolumeRequest {
                request_id: "failed-id".into(),
                volume_id: v.id.clone(),
                description: "x".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        );
    });
    drop(agent);
    domain_clean(&dom);
}

/// A volume id of the same kind as `id` that names another (empty) slot.
fn uuid_of_missing_volume(id: &str) -> String {
    let mut b = *uuid::Uuid::parse_str(id).unwrap().as_bytes();
    b[..4].copy_from_slice(&999u32.to_be_bytes());
    uuid::Uuid::from_bytes(b).to_string()
}

/// Bytes through the API: written into a raw volume being made under the
/// caller's lock, read back once it is legal; refused for anything else.
#[test]
fn agent_writes_and_reads_a_raw_volume_s_bytes_through_the_api() {
    use std::os::unix::fs::FileExt;
    use tonic::Code;
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    // 20 MiB less 100 bytes of a pattern no chunk boundary lines up with.
    let len = (20 << 20) - 100;
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let hex = cairn_proto::auth::hex;
    let want_sha = hex(ring::digest::digest(&ring::digest::SHA256, &data).as_ref());
    let write = |first: pb::WriteVolumeDataRequest, rest: Vec<Vec<u8>>| {
        let msgs =
            std::iter::once(first).chain(rest.into_iter().map(|data| pb::WriteVolumeDataRequest {
                data,
                ..Default::default()
            }));
        tokio_stream::iter(msgs.collect::<Vec<_>>())
    };
    rt().block_on(async {
        let mut c = agent.client().await;
        let r = c
            .create_volume(pb::CreateVolumeRequest {
                request_id: "up".into(),
                format: pb::VolumeFormat::Raw as i32,
                capacity: 20 << 20,
                keep_locked: true,
                ..Default::default()
            })
            .await
            .answer();
        let (vol, lock) = (r.volume.unwrap(), r.lock_id);
        let open = |offset, lock: &str, data: Vec<u8>| pb::WriteVolumeDataRequest {
            volume_id: vol.id.clone(),
            lock_id: lock.into(),
            offset,
            data,
            ..Default::default()
        };
        // A legal volume takes no bytes.
        let e = c
            .write_volume_data(write(open(0, &lock, vec![1; 512]), vec![]))
            .await
            .refused(Code::FailedPrecondition, "is legal");
        assert!(!e.message().is_empty());
        let set = |legality: pb::Legality| pb::UpdateVolumeRequest {
            volume_id: vol.id.clone(),
            legality: legality as i32,
            lock_id: lock.clone(),
            ..Default::default()
        };
        c.update_volume(set(pb::Legality::Illegal)).await.answer();
        // Without the lock, with another lock, at an odd offset, past the end.
        c.write_volume_data(write(open(0, "", vec![1; 512]), vec![]))
            .await
            .refused(Code::InvalidArgument, "needs the volume's lock");
        c.write_volume_data(write(open(0, "no-such-lock", vec![1; 512]), vec![]))
            .await
            .refused(Code::NotFound, "no-such-lock");
        c.write_volume_data(write(open(100, &lock, vec![1; 512]), vec![]))
            .await
            .refused(Code::InvalidArgument, "not a multiple");
        c.write_volume_data(write(open(20 << 20, &lock, vec![1; 512]), vec![]))
            .await
            .refused(Code::InvalidArgument, "beyond");
        // Not readable while it is being made.
        let read = |offset, length| pb::ReadVolumeDataRequest {
            volume_id: vol.id.clone(),
            offset,
            length,
            ..Default::default()
        };
        c.read_volume_data(read(0, 0))
            .await
            .refused(Code::FailedPrecondition, "being made");
        // The bytes in uneven messages, the first one empty.
        let sizes = [3 << 20, 1, 4095, (4 << 20) - 64, 12345];
        let mut rest = Vec::new();
        let mut at = 0;
        for s in sizes.iter().cycle() {
            if at == data.len() {
                break;
            }
            let n = (*s).min(data.len() - at);
            rest.push(data[at..at + n].to_vec());
            at += n;
        }
        let r = c
            .write_volume_data(write(open(0, &lock, vec![]), rest))
            .await
            .answer();
        assert_eq!(
            (r.bytes_written, r.sha256.as_str()),
            (len as u64, want_sha.as_str())
        );
        c.update_volume(set(pb::Legality::Legal)).await.answer();
        // Read back whole: the bytes, then the zeros that padded the tail.
        let mut s = c.read_volume_data(read(0, 0)).await.answer();
        let mut back = Vec::new();
        while let Some(chunk) = s.message().await.unwrap() {
            assert_eq!(chunk.offset, back.len() as u64);
            back.extend_from_slice(&chunk.data);
        }
        assert_eq!(back.len(), 20 << 20);
        assert!(back[..len] == data[..], "the bytes read back differ");
        assert!(back[len..].iter().all(|b| *b == 0));
        // A range, and one past the end.
        let mut s = c.read_volume_data(read(4096, 8192)).await.answer();
        let chunk = s.message().await.unwrap().unwrap();
        assert_eq!(
            (chunk.offset, &chunk.data[..]),
            (4096, &data[4096..4096 + 8192])
        );
        assert!(s.message().await.unwrap().is_none());
        c.read_volume_data(read(4096, 20 << 20))
            .await
            .refused(Code::InvalidArgument, "beyond");
        // The bytes are in the volume's run on the domain, nowhere else.
        let v = c.volume_of(&vol.id).await;
        let dev = cairn_domain::io::FileDev::open(&dom, false).unwrap();
        let (g, _) = cairn_domain::engine::read_superblocks(&dev).unwrap();
        let f = std::fs::File::open(&dom).unwrap();
        let mut on_disk = vec![0u8; len];
        f.read_exact_at(&mut on_disk, g.extent_off(v.extent_start))
            .unwrap();
        assert!(on_disk == data, "the run does not hold the bytes");
        // qcow2 volumes are not bytes.
        let q = c.new_disk("q", pb::VolumeFormat::Qcow2, 16).await.0;
        c.read_volume_data(pb::ReadVolumeDataRequest {
            volume_id: q.id.clone(),
            ..Default::default()
        })
        .await
        .refused(Code::FailedPrecondition, "only raw volumes");
    });
    drop(agent);
    domain_clean(&dom);
}
