//! The coordinator's jobs and agents, and the dispatch of the
//! coordinator family ([`crate::disk`]).

use std::io::Write;
use std::process::ExitCode;

use crate::connect::Coord;
use anyhow::Result;
use cairn_proto::coordinator as pb;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::args::{JobCmd, Wait};
use crate::connect::{self, Ask, Conn, CoordConn};
use crate::disk::{disk_json, DiskCmd};
use crate::output::{human_bytes, Out};

/// Commands against the coordinator.
#[derive(Subcommand, Debug)]
pub enum CoordCmd {
    /// Disks (through the coordinator).
    #[command(subcommand)]
    Disk(DiskCmd),
    /// The coordinator's jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// Files on a domain: what images are registered from.
    #[command(subcommand)]
    File(crate::file::FileCmd),
    /// Images registered from files.
    #[command(subcommand)]
    Image(Box<crate::image::ImageCmd>),
    /// The agents the coordinator uses.
    Agents,
    /// Who the coordinator takes you for: the name your disks record as
    /// their owner, and your role.
    Whoami,
}

/// A job state's name.
pub fn state(v: i32) -> String {
    pb::JobState::try_from(v)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// A coordinator job as JSON.
pub fn job_json(j: &pb::Job) -> Value {
    json!({
        "id": j.id, "kind": j.kind, "state": state(j.state), "step": j.step,
        "request_id": j.request_id, "domain": j.domain, "disk": j.disk_id,
        "done_bytes": j.done_bytes, "total_bytes": j.total_bytes,
        "host": j.host_id, "owner": j.owner, "caller": j.caller, "attempts": j.attempts,
        "snapshot": if j.snapshot_id.is_empty() { Value::Null } else { j.snapshot_id.clone().into() },
        "image": if j.image_id.is_empty() { Value::Null } else { j.image_id.clone().into() },
        "result": j.disk.as_ref().map(disk_json),
        "error": if j.error_reason.is_empty() { Value::Null } else {
            json!({"reason": j.error_reason, "message": j.error_message}) },
        "created": j.created, "finished": j.finished,
    })
}

/// Follow a job with a progress bar (quietly with --json or -q).
pub(crate) async fn follow(c: &mut Coord, job: pb::Job, quiet: bool) -> Result<pb::Job> {
    if job.state != pb::JobState::Running as i32 {
        return Ok(job);
    }
    let req = pb::GetJobRequest {
        job_id: job.id.clone(),
    };
    let s = c.watch_job(req).await.ask()?;
    connect::follow(s, job, quiet, |j| (j.done_bytes, j.total_bytes, &j.step)).await
}

/// Print a job's outcome; exit 1 unless it succeeded (or is still running
/// with --no-wait).
pub fn outcome(j: &pb::Job, out: &mut Out<'_>, quiet: Option<&str>) -> Result<ExitCode> {
    let json_out = out.json_mode();
    let ok = j.state == pb::JobState::Succeeded as i32;
    match quiet {
        Some(id) if ok && !json_out => writeln!(out, "{id}")?,
        _ => {
            if json_out {
                out.json(&job_json(j))?;
            } else {
                let d = j.disk.as_ref().map(|d| d.id.as_str()).unwrap_or("-");
                writeln!(
                    out,
                    "job {} ({}): {} — disk {d}",
                    j.id,
                    j.kind,
                    state(j.state)
                )?;
                if !j.snapshot_id.is_empty() {
                    writeln!(out, "snapshot {}", j.snapshot_id)?;
                }
                if !j.image_id.is_empty() {
                    writeln!(out, "image {}", j.image_id)?;
                }
                if !j.error_reason.is_empty() {
                    writeln!(out, "error: {} ({})", j.error_message, j.error_reason)?;
                }
            }
        }
    }
    Ok(
        if ok || (j.state == pb::JobState::Running as i32 && j.finished == 0) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

/// Follow a long job unless `--no-wait`, then print its outcome.
pub async fn long(
    c: &mut Coord,
    j: pb::Job,
    wait: &Wait,
    out: &mut Out<'_>,
    quiet: bool,
) -> Result<ExitCode> {
    let json_out = out.json_mode();
    if wait.no_wait {
        return outcome(&j, out, None);
    }
    let j = follow(c, j, json_out || quiet).await?;
    let id = j.disk.as_ref().map(|d| d.id.clone()).unwrap_or_default();
    outcome(&j, out, quiet.then_some(id.as_str()))
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "host_id": a.host_id, "host_name": a.host_name, "address": a.address,
        "reachable": a.reachable,
        "domains": a.domains.iter().map(|d| json!({"id": d.id, "name": d.name})).collect::<Vec<_>>(),
    })
}

/// Run a coordinator command.
pub fn run(cc: &CoordConn, conn: &Conn, cmd: &CoordCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    connect::block_on(run_async(cc, conn, cmd, out))
}

async fn run_async(
    cc: &CoordConn,
    conn: &Conn,
    cmd: &CoordCmd,
    out: &mut Out<'_>,
) -> Result<ExitCode> {
    let j = out.json_mode();
    let mut c = connect::coordinator(cc).await?;
    let d = conn.domain.clone();
    match cmd {
        CoordCmd::Whoami => {
            let r = c.who_am_i(pb::WhoAmIRequest {}).await.ask()?;
            if j {
                out.json(&json!({"name": r.name, "role": r.role}))?;
            } else {
                writeln!(out, "{} ({})", r.name, r.role)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        CoordCmd::Agents => {
            let r = c.list_agents(pb::ListAgentsRequest {}).await.ask()?;
            let header = ["HOST", "NAME", "ADDRESS", "REACHABLE", "DOMAINS"];
            out.list(&r.agents, agent_json, &header, |a| {
                let domains: Vec<&str> = a.domains.iter().map(|d| d.name.as_str()).collect();
                vec![
                    a.host_id.clone(),
                    a.host_name.clone(),
                    a.address.clone(),
                    a.reachable.to_string(),
                    domains.join(","),
                ]
            })?;
            Ok(ExitCode::SUCCESS)
        }
        CoordCmd::Job(cmd) => job(&mut c, cmd, out).await,
        CoordCmd::File(cmd) => crate::file::run(&mut c, cmd, out).await,
        CoordCmd::Image(cmd) => crate::image::run(&mut c, &d, cmd, out).await,
        CoordCmd::Disk(cmd) => crate::disk::run(&mut c, &d, cmd, out).await,
    }
}

async fn job(c: &mut Coord, cmd: &JobCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    let j = out.json_mode();
    match cmd {
        JobCmd::List { running } => {
            let r = c
                .list_jobs(pb::ListJobsRequest { running: *running })
                .await
                .ask()?;
            let header = ["JOB", "KIND", "STATE", "STEP", "DISK", "PROGRESS", "HOST"];
            out.list(&r.jobs, job_json, &header, |x| {
                let progress = match x.total_bytes {
                    0 => "-".into(),
                    t => format!("{}/{}", human_bytes(x.done_bytes), human_bytes(t)),
                };
                vec![
                    x.id.clone(),
                    x.kind.clone(),
                    state(x.state),
                    x.step.clone(),
                    x.disk_id.clone(),
                    progress,
                    crate::output::or_dash(&x.host_id),
                ]
            })?;
            Ok(ExitCode::SUCCESS)
        }
        JobCmd::Show { id } | JobCmd::Watch { id } => {
            let x = c
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .ask()?;
            if matches!(cmd, JobCmd::Show { .. }) {
                out.json(&job_json(&x))?;
                return Ok(ExitCode::SUCCESS);
            }
            outcome(&follow(c, x, j).await?, out, None)
        }
        JobCmd::Cancel { id } => {
            let x = c
                .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
                .await
                .ask()?;
            outcome(&x, out, None)
        }
    }
}
