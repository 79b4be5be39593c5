//! What the agent's API answers: retried requests, bad requests (each
//! with the right code and field, the domain left as it was), health and
//! reflection.

use cairn_proto::agent as pb;
use cairn_tests::agent::*;
use cairn_tests::ask::{self, AgentCalls};
use cairn_tests::domain::*;
use cairn_tests::refusals::Refusals;
use cairn_tests::Answer;

#[test]
fn agent_retried_requests_return_the_first_outcome() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    rt().block_on(async {
        let mut c = agent.client().await;
        let req = disk_request("same-id", pb::VolumeFormat::Qcow2, 8);
        let a = c.create_volume(req.clone()).await.answer();
        let b = c.create_volume(req.clone()).await.answer();
        assert!(a.created && !b.created);
        assert_eq!(a.volume, b.volume);
        assert_eq!(a.tag, b.tag);
        let vols = c.volumes().await;
        assert_eq!(vols.len(), 1);
        // The same id for a different request is refused.
        let mut other = req.clone();
        other.capacity *= 2;
        c.create_volume(other)
            .await
            .refused(tonic::Code::InvalidArgument, "request_id");

        let disk = a.tag.unwrap().id;
        let snap = ask::snapshot("snap-1", &disk);
        let s1 = c.snapshot(snap.clone()).await.answer();
        let s2 = c.snapshot(snap).await.answer();
        assert!(s1.created && !s2.created);
        assert_eq!(s1.volume, s2.volume);
        let tags = c
            .list_tags(pb::ListTagsRequest::default())
            .await
            .answer()
            .tags;
        assert_eq!(tags.len(), 2, "a retried snapshot made another layer");

        let set = pb::SetUserDataRequest {
            request_id: "ud".into(),
            tag_id: disk.clone(),
            name: "owner".into(),
            data: b"alice".to_vec(),
            ..Default::default()
        };
        assert!(c.set_user_data(set.clone()).await.answer().changed);
        assert!(!c.set_user_data(set).await.answer().changed);
        let got = c
            .get_user_data(pb::GetUserDataRequest {
                tag_id: disk.clone(),
                ..Default::default()
            })
            .await
            .answer()
            .items;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, b"alice");
    });
    drop(agent);
    domain_clean(&dom);
}

/// An agent on a fresh 1 GiB domain with a raw disk (a volume and its
/// strong tag) and a weak tag on the same volume; ids that are well formed
/// but name nothing; the domain's state before any refused request.
struct Bad {
    f: AgentFixture,
    rt: tokio::runtime::Runtime,
    vol: String,
    disk: String,
    weak: String,
    missing_vol: String,
    missing_tag: String,
    before: (Vec<u8>, String),
}

impl Bad {
    fn new() -> Bad {
        let f = AgentFixture::new(1);
        let rt = rt();
        let (vol, (disk, weak)) = rt.block_on(async {
            let mut c = f.agent.client().await;
            let r = c
                .create_volume(disk_request("setup", pb::VolumeFormat::Raw, 8))
                .await
                .answer();
            let weak = c
                .create_tag(pb::CreateTagRequest {
                    request_id: "weak".into(),
                    tag: Some(pb::TagSpec {
                        volume: r.volume.as_ref().unwrap().id.clone(),
                        r#type: pb::TagType::Weak as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .answer()
                .tag
                .unwrap();
            (r.volume.unwrap().id, (r.tag.unwrap().id, weak.id))
        });
        let before = domain_state(&f.domain);
        // Well-formed ids whose slots hold nothing.
        let missing_vol = {
            let mut b = *uuid::Uuid::parse_str(&vol).unwrap().as_bytes();
            b[3] = b[3].wrapping_add(7);
            b[15] ^= 0xff;
            uuid::Uuid::from_bytes(b).to_string()
        };
        let missing_tag = {
            let mut b = *uuid::Uuid::parse_str(&disk).unwrap().as_bytes();
            b[3] = b[3].wrapping_add(7);
            uuid::Uuid::from_bytes(b).to_string()
        };
        Bad {
            f,
            rt,
            vol,
            disk,
            weak,
            missing_vol,
            missing_tag,
            before,
        }
    }

    /// Every refusal as it must be, and the domain exactly as before.
    fn verify(self, r: Refusals) {
        r.verify();
        let after = domain_state(&self.f.domain);
        assert_eq!(self.before.1, after.1, "the domain's dump changed");
        assert!(
            self.before.0 == after.0,
            "the domain's metadata bytes changed"
        );
        eprintln!("{} bad requests refused, domain unchanged", r.len());
        let dom = self.f.domain.clone();
        drop(self.f.agent);
        domain_clean(&dom);
    }
}

fn cv(f: &dyn Fn(&mut pb::CreateVolumeRequest)) -> pb::CreateVolumeRequest {
    let mut r = disk_request("", pb::VolumeFormat::Raw, 8);
    f(&mut r);
    r
}

/// Volume requests: create, get, update, delete, extend, lock, measure, check.
#[test]
fn agent_refuses_bad_volume_requests_and_changes_nothing() {
    use tonic::Code::*;
    let b = Bad::new();
    let (vol, disk, weak) = (b.vol.clone(), b.disk.clone(), b.weak.clone());
    let (missing_vol, missing_tag) = (b.missing_vol.clone(), b.missing_tag.clone());
    let _ = (&vol, &disk, &weak, &missing_vol, &missing_tag);
    let mut r = Refusals::default();
    b.rt.block_on(async {
        let mut c = b.f.agent.client().await;
        r.expect(
            "create: zero capacity",
            InvalidArgument,
            Some("capacity"),
            c.create_volume(cv(&|r| r.capacity = 0)),
        )
        .await;
        r.expect(
            "create: negative-looking capacity",
            InvalidArgument,
            Some("capacity"),
            c.create_volume(cv(&|r| r.capacity = u64::MAX)),
        )
        .await;
        r.expect(
            "create: unaligned capacity",
            InvalidArgument,
            Some("capacity"),
            c.create_volume(cv(&|r| r.capacity = 1000)),
        )
        .await;
        r.expect(
            "create: more than the domain",
            InvalidArgument,
            Some("size"),
            c.create_volume(cv(&|r| r.capacity = 1 << 40)),
        )
        .await;
        r.expect(
            "create: absurd qcow2 run",
            InvalidArgument,
            Some("size"),
            c.create_volume(cv(&|r| {
                r.format = pb::VolumeFormat::Qcow2 as i32;
                r.capacity = 1 << 50;
            })),
        )
        .await;
        r.expect(
            "create: unknown format",
            InvalidArgument,
            Some("format"),
            c.create_volume(cv(&|r| r.format = 7)),
        )
        .await;
        r.expect(
            "create: unspecified format",
            InvalidArgument,
            Some("format"),
            c.create_volume(cv(&|r| r.format = 0)),
        )
        .await;
        r.expect(
            "create: unknown allocation",
            InvalidArgument,
            Some("allocation"),
            c.create_volume(cv(&|r| r.allocation = 9)),
        )
        .await;
        r.expect(
            "create: malformed parent",
            InvalidArgument,
            Some("parent_tag"),
            c.create_volume(cv(&|r| {
                r.format = 2;
                r.parent_tag = "../../etc".into();
            })),
        )
        .await;
        r.expect(
            "create: parent that does not exist",
            NotFound,
            None,
            c.create_volume(cv(&|r| {
                r.format = 2;
                r.parent_tag = missing_tag.clone();
            })),
        )
        .await;
        r.expect(
            "create: raw with a parent",
            InvalidArgument,
            Some("parent_tag"),
            c.create_volume(cv(&|r| r.parent_tag = disk.clone())),
        )
        .await;
        r.expect(
            "create: control character in description",
            InvalidArgument,
            Some("description"),
            c.create_volume(cv(&|r| r.description = "a\u{7}b".into())),
        )
        .await;
        r.expect(
            "create: description too long",
            InvalidArgument,
            Some("description"),
            c.create_volume(cv(&|r| r.description = "x".repeat(5000))),
        )
        .await;
        r.expect(
            "create: domain with a path separator",
            InvalidArgument,
            Some("domain"),
            c.create_volume(cv(&|r| r.domain = "../it".into())),
        )
        .await;
        r.expect(
            "create: unknown domain",
            NotFound,
            None,
            c.create_volume(cv(&|r| r.domain = "nope".into())),
        )
        .await;
        r.expect(
            "create: tag names a volume",
            InvalidArgument,
            Some("tag.volume"),
            c.create_volume(cv(&|r| r.tag.as_mut().unwrap().volume = vol.clone())),
        )
        .await;
        r.expect(
            "create: bad tag option",
            InvalidArgument,
            Some("options"),
            c.create_volume(cv(&|r| {
                r.tag.as_mut().unwrap().options = vec![pb::KeyValue {
                    key: "a/b".into(),
                    value: "x".into(),
                }]
            })),
        )
        .await;
        r.expect(
            "create: control character in request id",
            InvalidArgument,
            Some("request_id"),
            c.create_volume(cv(&|r| r.request_id = "a\nb".into())),
        )
        .await;
        r.expect(
            "get volume: malformed id",
            InvalidArgument,
            Some("volume_id"),
            c.get_volume(pb::GetVolumeRequest {
                volume_id: "x/y".into(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "get volume: a tag id",
            InvalidArgument,
            Some("volume_id"),
            c.get_volume(pb::GetVolumeRequest {
                volume_id: disk.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "get volume: missing",
            NotFound,
            None,
            c.get_volume(pb::GetVolumeRequest {
                volume_id: missing_vol.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "update volume: unknown legality",
            InvalidArgument,
            Some("legality"),
            c.update_volume(pb::UpdateVolumeRequest {
                volume_id: vol.clone(),
                legality: 5,
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "update volume: unknown lock",
            NotFound,
            None,
            c.update_volume(pb::UpdateVolumeRequest {
                volume_id: vol.clone(),
                legality: 1,
                lock_id: "nope".into(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "update volume: control character",
            InvalidArgument,
            Some("description"),
            c.update_volume(pb::UpdateVolumeRequest {
                volume_id: vol.clone(),
                legality: 1,
                description: "\u{1b}[31m".into(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "delete volume: empty id",
            InvalidArgument,
            Some("volume_id"),
            c.delete_volume(pb::DeleteVolumeRequest::default()),
        )
        .await;
        r.expect(
            "delete volume: missing",
            NotFound,
            None,
            c.delete_volume(pb::DeleteVolumeRequest {
                volume_id: missing_vol.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "delete volume: tagged",
            FailedPrecondition,
            None,
            c.delete_volume(pb::DeleteVolumeRequest {
                volume_id: vol.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "extend: shrink",
            InvalidArgument,
            Some("capacity"),
            c.extend_volume(pb::ExtendVolumeRequest {
                volume_id: vol.clone(),
                capacity: 1 << 20,
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "extend: zero",
            InvalidArgument,
            Some("capacity"),
            c.extend_volume(pb::ExtendVolumeRequest {
                volume_id: vol.clone(),
                capacity: 0,
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "extend: absurd",
            InvalidArgument,
            Some("capacity"),
            c.extend_volume(pb::ExtendVolumeRequest {
                volume_id: vol.clone(),
                capacity: u64::MAX - 511,
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "extend: missing",
            NotFound,
            None,
            c.extend_volume(pb::ExtendVolumeRequest {
                volume_id: missing_vol.clone(),
                capacity: 1 << 30,
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "lock: missing",
            NotFound,
            None,
            c.lock_volume(pb::LockVolumeRequest {
                volume_id: missing_vol.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "unlock: empty",
            InvalidArgument,
            Some("lock_id"),
            c.unlock_volume(pb::UnlockVolumeRequest::default()),
        )
        .await;
        r.expect(
            "measure: unknown format",
            InvalidArgument,
            Some("target_format"),
            c.measure_volume(pb::MeasureVolumeRequest {
                volume_id: vol.clone(),
                target_format: 3,
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "check: malformed",
            InvalidArgument,
            Some("volume_id"),
            c.check_volume(pb::CheckVolumeRequest {
                volume_id: "\u{0}".into(),
                ..Default::default()
            }),
        )
        .await;
    });
    b.verify(r);
}

/// Tag and user data requests.
#[test]
fn agent_refuses_bad_tag_and_user_data_requests_and_changes_nothing() {
    use tonic::Code::*;
    let b = Bad::new();
    let (vol, disk, weak) = (b.vol.clone(), b.disk.clone(), b.weak.clone());
    let (missing_vol, missing_tag) = (b.missing_vol.clone(), b.missing_tag.clone());
    let _ = (&vol, &disk, &weak, &missing_vol, &missing_tag);
    let mut r = Refusals::default();
    b.rt.block_on(async {
        let mut c = b.f.agent.client().await;
        r.expect(
            "create tag: no spec",
            InvalidArgument,
            Some("tag"),
            c.create_tag(pb::CreateTagRequest::default()),
        )
        .await;
        r.expect(
            "create tag: missing volume",
            NotFound,
            None,
            c.create_tag(pb::CreateTagRequest {
                tag: Some(pb::TagSpec {
                    volume: missing_vol.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "create tag: unknown type",
            InvalidArgument,
            Some("tag.type"),
            c.create_tag(pb::CreateTagRequest {
                tag: Some(pb::TagSpec {
                    volume: vol.clone(),
                    r#type: 8,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "get tag: a volume id",
            InvalidArgument,
            Some("tag_id"),
            c.get_tag(pb::GetTagRequest {
                tag_id: vol.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "change tag: missing",
            NotFound,
            None,
            c.change_tag(pb::ChangeTagRequest {
                tag_id: missing_tag.clone(),
                tag: Some(pb::TagSpec {
                    volume: vol.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "change tag: unknown state",
            InvalidArgument,
            Some("tag.state"),
            c.change_tag(pb::ChangeTagRequest {
                tag_id: disk.clone(),
                tag: Some(pb::TagSpec {
                    volume: vol.clone(),
                    state: 4,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "delete tag: missing",
            NotFound,
            None,
            c.delete_tag(pb::DeleteTagRequest {
                tag_id: missing_tag.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "user data: name with a path separator",
            InvalidArgument,
            Some("name"),
            c.set_user_data(pb::SetUserDataRequest {
                tag_id: disk.clone(),
                name: "a/b".into(),
                data: vec![1],
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "user data: name with a control character",
            InvalidArgument,
            Some("name"),
            c.set_user_data(pb::SetUserDataRequest {
                tag_id: disk.clone(),
                name: "a\tb".into(),
                data: vec![1],
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "user data: over the limit",
            InvalidArgument,
            Some("user_data"),
            c.set_user_data(pb::SetUserDataRequest {
                tag_id: disk.clone(),
                name: "big".into(),
                data: vec![7; 2 << 20],
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "user data: missing tag",
            NotFound,
            None,
            c.set_user_data(pb::SetUserDataRequest {
                tag_id: missing_tag.clone(),
                name: "a".into(),
                data: vec![1],
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "user data: missing item",
            NotFound,
            None,
            c.get_user_data(pb::GetUserDataRequest {
                tag_id: disk.clone(),
                name: "nope".into(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "user data: remove bad name",
            InvalidArgument,
            Some("name"),
            c.remove_user_data(pb::RemoveUserDataRequest {
                tag_id: disk.clone(),
                name: "".into(),
                ..Default::default()
            }),
        )
        .await;
    });
    b.verify(r);
}

/// Snapshot, activate and deactivate requests.
#[test]
fn root_agent_refuses_bad_snapshot_and_activation_requests_and_changes_nothing() {
    use tonic::Code::*;
    let b = Bad::new();
    let (vol, disk, weak) = (b.vol.clone(), b.disk.clone(), b.weak.clone());
    let (missing_vol, missing_tag) = (b.missing_vol.clone(), b.missing_tag.clone());
    let _ = (&vol, &disk, &weak, &missing_vol, &missing_tag);
    let mut r = Refusals::default();
    b.rt.block_on(async {
        let mut c = b.f.agent.client().await;
        r.expect(
            "snapshot: missing tag",
            NotFound,
            None,
            c.snapshot(pb::SnapshotRequest {
                tag_id: missing_tag.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "snapshot: weak tag",
            FailedPrecondition,
            None,
            c.snapshot(pb::SnapshotRequest {
                tag_id: weak.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "snapshot: control character",
            InvalidArgument,
            Some("description"),
            c.snapshot(pb::SnapshotRequest {
                tag_id: disk.clone(),
                description: "\u{0}".into(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "activate: malformed",
            InvalidArgument,
            Some("tag_id"),
            c.activate(pb::ActivateRequest {
                tag_id: "../x".into(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "activate: missing",
            NotFound,
            None,
            c.activate(pb::ActivateRequest {
                tag_id: missing_tag.clone(),
                ..Default::default()
            }),
        )
        .await;
        r.expect(
            "deactivate: malformed",
            InvalidArgument,
            Some("tag_id"),
            c.deactivate(pb::DeactivateRequest {
                tag_id: "".into(),
                ..Default::default()
            }),
        )
        .await;
    });
    b.verify(r);
}

#[test]
fn agent_serves_health_and_reflection() {
    let (_dir, _dom, agent) = AgentFixture::new(1).parts();
    rt().block_on(async {
        let ch = cairn_proto::transport::channel(&cairn_proto::transport::Target::Unix(
            agent.socket.clone(),
        ))
        .await
        .unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let st = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "cairn.agent.v1.Agent".into(),
            })
            .await
            .answer();
        assert_eq!(
            st.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut r = ServerReflectionClient::new(ch);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut s = r
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .answer();
        let resp = s.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(l)) = resp.message_response else {
            panic!("unexpected reflection answer {resp:?}");
        };
        let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"cairn.agent.v1.Agent".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"grpc.health.v1.Health".to_string()),
            "{names:?}"
        );
    });
}

/// Regression: a request that does not decode was INTERNAL (prost's
/// codec), as if the agent had failed.
#[test]
fn agent_answers_an_undecodable_request_invalid_argument() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    let before = domain_state(&dom);
    rt().block_on(async {
        let ch = cairn_proto::transport::channel(&cairn_proto::transport::Target::Unix(
            agent.socket.clone(),
        ))
        .await
        .unwrap();
        let mut g = tonic::client::Grpc::new(ch);
        g.ready().await.unwrap();
        // Field 1 of a health answer is a varint; of CreateVolumeRequest, a
        // string: the bytes are not a CreateVolumeRequest.
        let wrong = tonic_health::pb::HealthCheckResponse { status: 1 };
        let codec = tonic_prost::ProstCodec::<_, pb::CreateVolumeResponse>::default();
        let path = "/cairn.agent.v1.Agent/CreateVolume".parse().unwrap();
        g.unary(tonic::Request::new(wrong), path, codec)
            .await
            .refused(tonic::Code::InvalidArgument, "could not be decoded");
    });
    assert!(before == domain_state(&dom));
}

/// Regression: a 1 MiB id was echoed whole into the status (the client
/// then failed on the metadata size limit) and the log.
#[test]
fn agent_quotes_at_most_the_start_of_a_huge_field() {
    let (_dir, dom, agent) = AgentFixture::new(1).parts();
    let huge = "x".repeat(1 << 20);
    let before = domain_state(&dom);
    rt().block_on(async {
        let mut c = agent.client().await;
        use tonic::Code::*;
        let answers = [
            (
                "volume id",
                c.get_volume(pb::GetVolumeRequest {
                    volume_id: huge.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
                InvalidArgument,
            ),
            (
                "domain",
                c.get_volume(pb::GetVolumeRequest {
                    domain: huge.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
                InvalidArgument,
            ),
            (
                "request id",
                c.create_volume(disk_request(&huge, pb::VolumeFormat::Raw, 1))
                    .await
                    .map(|_| ()),
                InvalidArgument,
            ),
            (
                "path",
                c.import_volume(pb::ImportVolumeRequest {
                    path: format!("/{huge}"),
                    source_format: pb::VolumeFormat::Raw as i32,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
                InvalidArgument,
            ),
        ];
        assert_refused_briefly(answers);
    });
    // The agent's log line of a failed request prints the same message.
    assert!(before == domain_state(&dom));
}

/// The coordinator quotes at most the start of a huge field too.
#[test]
fn coordinator_quotes_at_most_the_start_of_a_huge_field() {
    use cairn_proto::coordinator as cpb;
    let (dir, _dom, agent) = AgentFixture::new(1).parts();
    let coord = cairn_tests::coordinator::CoordProc::of(dir.path(), &agent);
    let huge = "y".repeat(1 << 20);
    rt().block_on(async {
        let mut c = coord.client().await;
        use tonic::Code::*;
        let get = |domain: &str, disk: &str| cpb::GetDiskRequest {
            domain: domain.into(),
            disk_id: disk.into(),
        };
        let answers = [
            (
                "disk id",
                c.get_disk(get("", &huge)).await.map(|_| ()),
                InvalidArgument,
            ),
            (
                "domain",
                c.get_disk(get(&huge, "")).await.map(|_| ()),
                NotFound,
            ),
            (
                "request id",
                c.delete_disk(cpb::DeleteDiskRequest {
                    request_id: huge.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
                InvalidArgument,
            ),
        ];
        assert_refused_briefly(answers);
    });
}

/// Each call was refused with its code, and a message that does not quote
/// a huge field whole.
fn assert_refused_briefly(
    answers: impl IntoIterator<Item = (&'static str, Result<(), tonic::Status>, tonic::Code)>,
) {
    for (what, r, code) in answers {
        let e = r.unwrap_err();
        let m = e.message();
        assert_eq!(e.code(), code, "{what}: {}", &m[..m.len().min(200)]);
        assert!(m.len() < 400, "{what}: {} bytes of message", m.len());
    }
}
