//! The boundary: a request is checked before its domain is resolved
//! (here there is no agent at all, so a request that passes the checks
//! fails for want of one).

use tonic::Code;
use tonic::{Request, Status};
use tonic_types::StatusExt;

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::agents::{Agents, Discovery};
use crate::coordinator::CoordConfig;
use crate::record::job_key;
use cairn_cluster::{ClusterError, Kv};
use pb::coordinator_server::Coordinator as _;

fn service() -> CoordService {
    service_on(Arc::new(cairn_cluster::MemKv::new()))
}

fn service_on(kv: Arc<dyn Kv>) -> CoordService {
    CoordService::new(Arc::new(Coordinator::new(
        CoordConfig::new("c1"),
        kv,
        Arc::new(cairn_domain::MemLockService::new()),
        Agents::new(Discovery::Fixed(vec![])),
    )))
}

/// A store whose reads fail while it is `down`, as etcd's do when it
/// is busy or between leaders.
#[derive(Default)]
struct Flaky {
    kv: cairn_cluster::MemKv,
    down: AtomicBool,
}

type KvResult<T> = std::result::Result<T, ClusterError>;

impl Kv for Flaky {
    fn put(&self, key: &str, value: &str) -> KvResult<()> {
        self.kv.put(key, value)
    }
    fn get(&self, key: &str) -> KvResult<Option<String>> {
        if self.down.load(Ordering::SeqCst) {
            let e = std::io::Error::other("the store is down");
            let context = format!("reading {key}");
            return Err(ClusterError::Io { context, source: e });
        }
        self.kv.get(key)
    }
    fn list(&self, prefix: &str) -> KvResult<Vec<(String, String)>> {
        self.kv.list(prefix)
    }
    fn delete(&self, key: &str) -> KvResult<bool> {
        self.kv.delete(key)
    }
    fn create(&self, key: &str, value: &str) -> KvResult<Option<String>> {
        self.kv.create(key, value)
    }
    fn register(&self, key: &str, value: &str) -> KvResult<()> {
        self.kv.register(key, value)
    }
}

/// A request as the gate leaves it for an identity.
fn as_who<T>(m: T, name: &str, role: Role) -> Request<T> {
    let mut r = Request::new(m);
    r.extensions_mut().insert(Identity {
        name: name.into(),
        role,
    });
    r
}

fn as_admin<T>(m: T) -> Request<T> {
    as_who(m, "uid:0", Role::Admin)
}

#[tokio::test]
async fn jobs_are_seen_by_their_caller_and_admins_only() {
    let kv = Arc::new(Flaky::default());
    let svc = service_on(kv.clone());
    let rec = running_job(&kv);
    let get = |n: &str, role| {
        as_who(
            pb::GetJobRequest {
                job_id: rec.id.clone(),
            },
            n,
            role,
        )
    };
    assert_eq!(
        svc.get_job(get("alice", Role::User))
            .await
            .unwrap()
            .into_inner()
            .caller,
        "alice"
    );
    svc.get_job(get("ops", Role::Admin)).await.unwrap();
    // Another user: as if there were no such job.
    let e = svc.get_job(get("bob", Role::User)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = svc
        .cancel_job(as_who(
            pb::CancelJobRequest {
                job_id: rec.id.clone(),
            },
            "bob",
            Role::User,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let mine = |n: &str| as_who(pb::ListJobsRequest { running: false }, n, Role::User);
    assert_eq!(
        svc.list_jobs(mine("alice"))
            .await
            .unwrap()
            .into_inner()
            .jobs
            .len(),
        1
    );
    assert!(svc
        .list_jobs(mine("bob"))
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());
    // No identity (a service without its gate): nobody is answered.
    let e = svc
        .get_job(Request::new(pb::GetJobRequest {
            job_id: rec.id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = svc
        .list_agents(as_who(pb::ListAgentsRequest {}, "bob", Role::User))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

fn running_job(kv: &Flaky) -> JobRecord {
    let spec = JobSpec::Delete(Delete {
        domain: uuid::Uuid::nil(),
        disk: TagId::generate(1),
    });
    let rec = JobRecord::new(spec, "r", 0, "c1", "alice", 1);
    kv.put(&job_key(&rec.id), &serde_json::to_string(&rec).unwrap())
        .unwrap();
    rec
}

// Regression: one etcd read that timed out under load ended a watch
// with UNAVAILABLE while the job ran on.
#[tokio::test(start_paused = true)]
async fn a_watch_outlasts_a_store_that_stops_answering_for_a_while() {
    use tokio_stream::StreamExt;
    let kv = Arc::new(Flaky::default());
    let svc = service_on(kv.clone());
    let watch = |id: &str| pb::GetJobRequest { job_id: id.into() };

    let mut rec = running_job(&kv);
    let mut s = svc
        .watch_job(as_admin(watch(&rec.id)))
        .await
        .unwrap()
        .into_inner();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first.state, pb::JobState::Running as i32);
    // Down for five seconds: the watch asks some 25 times meanwhile.
    kv.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    rec.state = JobState::Succeeded;
    kv.put(&job_key(&rec.id), &serde_json::to_string(&rec).unwrap())
        .unwrap();
    kv.down.store(false, Ordering::SeqCst);
    let last = s.next().await.unwrap().unwrap();
    assert_eq!(last.state, pb::JobState::Succeeded as i32, "{last:?}");
    assert!(s.next().await.is_none());

    // A store that stays down ends the watch with its error and why.
    let rec = running_job(&kv);
    let mut s = svc
        .watch_job(as_admin(watch(&rec.id)))
        .await
        .unwrap()
        .into_inner();
    s.next().await.unwrap().unwrap();
    kv.down.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let e = s.next().await.unwrap().unwrap_err();
    assert!(t.elapsed() >= WATCH_PATIENCE, "{:?}", t.elapsed());
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().ends_with(": the store is down"),
        "{}",
        e.message()
    );
}

fn field(s: &Status) -> String {
    s.get_details_bad_request()
        .map(|b| b.field_violations[0].field.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn requests_are_checked_before_anything_runs() {
    let svc = service();
    let create = |format: pb::Format, size| pb::CreateDiskRequest {
        format: format as i32,
        size,
        ..Default::default()
    };
    let e = svc
        .create_disk(as_admin(create(pb::Format::Unspecified, 4096)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "format")
    );
    let e = svc
        .create_disk(as_admin(create(pb::Format::Raw, 1000)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "size")
    );
    let mut bad = create(pb::Format::Raw, 4096);
    bad.format = 9;
    let e = svc.create_disk(as_admin(bad)).await.unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "format")
    );
    // A valid request gets as far as looking for the domain.
    let e = svc
        .create_disk(as_admin(create(pb::Format::Raw, 4096)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = svc
        .copy_disk(as_admin(pb::CopyDiskRequest {
            disk_id: "x".into(),
            target_domain: "other".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "disk_id")
    );
    let e = svc
        .copy_disk(as_admin(pb::CopyDiskRequest {
            disk_id: cairn_domain::TagId::generate(1).to_string(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "target_domain")
    );
    let e = svc
        .create_disk(as_admin(pb::CreateDiskRequest {
            request_id: "x".repeat(65),
            ..create(pb::Format::Raw, 4096)
        }))
        .await
        .unwrap_err();
    assert_eq!(field(&e), "request_id");
}
