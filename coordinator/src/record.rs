//! A job as the cluster store keeps it (`cairn/jobs/<id>`), and the
//! decisions about a record that need no I/O: where a job goes after a
//! step, whether it can still be cancelled, how an orphan is taken over.

use serde::{Deserialize, Serialize};

use crate::jobs::JobSpec;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Not started.
    Begin,
    /// One agent call (short jobs).
    Call,
    /// An agent copies data into a new volume.
    Copy,
    /// An agent merges a snapshot away.
    Merge,
    /// An agent points the disk at the copy and frees the old chain.
    Swap,
    /// An agent deletes the source disk.
    DeleteSource,
    /// One agent call snapshots the disk (a job that goes on after it).
    Snapshot,
    /// An image is registered from the file the job made.
    Register,
    /// Finished.
    Done,
}

impl Step {
    /// What people see.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Begin => "starting",
            Step::Call => "working",
            Step::Copy => "copying",
            Step::Merge => "merging",
            Step::Swap => "swapping the disk onto the copy",
            Step::DeleteSource => "deleting the source",
            Step::Snapshot => "snapshotting the disk",
            Step::Register => "registering the image",
            Step::Done => "done",
        }
    }
}

/// The step after `step` in `plan` (a job kind's steps, in order):
/// the first one after Begin, Done after the last.
pub fn next_step(plan: &[Step], step: Step) -> Step {
    match step {
        Step::Done => Step::Done,
        Step::Begin => plan.first().copied().unwrap_or(Step::Done),
        s => plan
            .iter()
            .position(|p| *p == s)
            .and_then(|i| plan.get(i + 1))
            .copied()
            .unwrap_or(Step::Done),
    }
}

/// Whether a job at `step` can still be cancelled and leave the disk as
/// it was: up to and during the data copy or merge, not once the disk has
/// been switched over or the source is being deleted.
pub fn cancellable(step: Step) -> bool {
    matches!(step, Step::Begin | Step::Copy | Step::Merge)
}

/// Where a job ended or is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Working.
    Running,
    /// Done.
    Succeeded,
    /// Failed (see the error).
    Failed,
    /// Cancelled; the disk is as it was.
    Cancelled,
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// gRPC status code.
    pub code: i32,
    /// Stable error code.
    pub reason: String,
    /// Message.
    pub message: String,
}

/// A job as kept in the cluster store. The spec is stored as `kind` and
/// `params` beside the other fields, as records have always been.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Id.
    pub id: String,
    /// What was asked, resolved (ids, not names).
    #[serde(flatten)]
    pub spec: JobSpec,
    /// Where it ended or is.
    pub state: JobState,
    /// The client's request id.
    pub request_id: String,
    /// Hash of the request, to tell a retry from a reuse of the id.
    pub fingerprint: u64,
    /// The step it is at.
    pub step: Step,
    /// The agent working on the step.
    #[serde(default)]
    pub host: String,
    /// The agent's job id for the step.
    #[serde(default)]
    pub agent_job: String,
    /// The agent process running `agent_job` (its instance id).
    #[serde(default)]
    pub instance: String,
    /// The coordinator running it.
    pub owner: String,
    /// The identity that asked for it: it owns the disk the job makes, and
    /// a `user` sees only its own jobs (empty in records of earlier
    /// versions: those are for admin and service identities).
    #[serde(default)]
    pub caller: String,
    /// Progress of the current step.
    #[serde(default)]
    pub done: u64,
    /// Size of the current step.
    #[serde(default)]
    pub total: u64,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<JobError>,
    /// The disk made or changed: domain id and tag id.
    #[serde(default)]
    pub result_domain: String,
    /// See `result_domain`.
    #[serde(default)]
    pub result_disk: String,
    /// The snapshot a snapshot job made.
    #[serde(default)]
    pub snapshot: String,
    /// The file version an image-from-disk job made (its tag id).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// Seconds since the epoch, 0 while running.
    #[serde(default)]
    pub finished: u64,
    /// Times the work was (re)started.
    #[serde(default)]
    pub attempts: u32,
    /// A client asked to cancel.
    #[serde(default)]
    pub cancel: bool,
}

impl JobRecord {
    /// A new running job.
    pub fn new(
        spec: JobSpec,
        request_id: &str,
        fingerprint: u64,
        owner: &str,
        caller: &str,
        now: u64,
    ) -> JobRecord {
        JobRecord {
            id: uuid::Uuid::new_v4().to_string(),
            spec,
            state: JobState::Running,
            request_id: request_id.to_string(),
            fingerprint,
            step: Step::Begin,
            host: String::new(),
            agent_job: String::new(),
            instance: String::new(),
            owner: owner.to_string(),
            caller: caller.to_string(),
            done: 0,
            total: 0,
            error: None,
            result_domain: String::new(),
            result_disk: String::new(),
            snapshot: String::new(),
            file: String::new(),
            created: now,
            finished: 0,
            attempts: 0,
            cancel: false,
        }
    }

    /// The request id of the current attempt of the current step: an
    /// agent that gets it twice answers the second time with the first
    /// outcome.
    pub fn step_request_id(&self) -> String {
        format!("{}:{:?}:{}", self.id, self.step, self.attempts)
    }

    /// Record the disk the job made or changed.
    pub fn made(&mut self, domain: impl std::fmt::Display, disk: impl std::fmt::Display) {
        self.result_domain = domain.to_string();
        self.result_disk = disk.to_string();
    }

    /// The domain the job works on.
    pub fn domain(&self) -> uuid::Uuid {
        self.spec.domain()
    }
}

/// The store key of a job.
pub fn job_key(id: &str) -> String {
    format!("cairn/jobs/{id}")
}

/// What the leader does with a running job whose owner is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adopt {
    /// Keep following the agent's job at this step.
    Follow,
    /// Start the step again: the agent's job is gone (the step first
    /// looks on the domain for whether it finished).
    Restart,
    /// The dead owner's one agent call may still be running: wait until no
    /// agent runs it, then run the step again (which first looks on the
    /// domain for whether the call took effect).
    Reconcile,
}

/// Decide how to take over an orphaned job: `agent_job_alive` says whether
/// the agent doing its step still knows the step's job.
pub fn adopt(rec: &JobRecord, agent_job_alive: bool) -> Adopt {
    match rec.step {
        Step::Copy | Step::Merge if agent_job_alive => Adopt::Follow,
        Step::Copy | Step::Merge | Step::Begin => Adopt::Restart,
        Step::Call
        | Step::Snapshot
        | Step::Register
        | Step::Swap
        | Step::DeleteSource
        | Step::Done => Adopt::Reconcile,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{Convert, JobSpec, Move};
    use cairn_domain::{Allocation, Format, TagId};

    #[test]
    fn orphans_are_followed_restarted_or_reconciled() {
        let spec = JobSpec::Convert(Convert {
            domain: uuid::Uuid::nil(),
            disk: TagId::generate(1),
            format: Format::Qcow2,
            allocation: Allocation::Sparse,
            flatten: false,
        });
        let mut r = JobRecord::new(spec, "r", 1, "c1", "alice", 0);
        r.step = Step::Copy;
        assert_eq!(adopt(&r, true), Adopt::Follow);
        assert_eq!(adopt(&r, false), Adopt::Restart);
        r.step = Step::Swap;
        assert_eq!(
            adopt(&r, true),
            Adopt::Reconcile,
            "a single call may be in flight"
        );
        r.step = Step::Begin;
        assert_eq!(adopt(&r, false), Adopt::Restart);
        r.step = Step::Call;
        assert_eq!(adopt(&r, false), Adopt::Reconcile);
    }

    /// A record written before job specs were typed (kind and a map of
    /// string params) reads as the same job.
    #[test]
    fn records_of_earlier_versions_still_read() {
        let dom = uuid::Uuid::new_v4();
        let disk = TagId::generate(7);
        let old = serde_json::json!({
            "id": "j1", "kind": "move", "state": "running", "request_id": "r",
            "fingerprint": 5,
            "params": {"domain": dom.to_string(), "disk": disk.to_string(), "name": "",
                       "format": "", "allocation": "sparse", "size": 0, "description": "",
                       "target_domain": dom.to_string()},
            "step": "copy", "owner": "c1", "created": 1,
        });
        let rec: JobRecord = serde_json::from_value(old).unwrap();
        let JobSpec::Move(Move(m)) = &rec.spec else {
            panic!("{:?}", rec.spec)
        };
        assert_eq!((m.domain, m.disk, m.target), (dom, disk, dom));
        assert_eq!(m.format, None);
        assert_eq!(rec.step, Step::Copy);
        // And what is written now reads back the same.
        let again: JobRecord = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(again, rec);
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["kind"], "move");
        assert_eq!(v["params"]["disk"], disk.to_string());
    }
}
