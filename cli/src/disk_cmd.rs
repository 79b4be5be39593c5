//! Commands that talk to the coordinator: disks and their jobs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_coordinator::pb;
use cairn_coordinator::pb::coordinator_client::CoordinatorClient;
use cairn_proto::transport::{channel, Target};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::agent_cmd::{progress_bar, refused, table, Conn, FormatArg};
use crate::{human_bytes, parse_size, print_json};

/// How to reach the coordinator.
#[derive(Args, Debug, Clone)]
pub struct CoordConn {
    /// The coordinator: its unix socket, or http://host:port.
    #[arg(
        long,
        global = true,
        env = "CAIRN_COORDINATOR",
        default_value = "/run/cairn/coordinator.sock"
    )]
    pub coordinator: String,
}

/// Whether to wait for a long job.
#[derive(Args, Debug)]
pub struct Wait {
    /// Print the job and return at once instead of following it.
    #[arg(long)]
    no_wait: bool,
}

/// Disk commands.
#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Create a disk.
    Create {
        /// Virtual size, e.g. 20G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, value_enum, default_value = "raw")]
        format: FormatArg,
        /// A name for people (not unique).
        #[arg(long, default_value = "")]
        name: String,
        /// Allocate every block now.
        #[arg(long)]
        preallocate: bool,
        #[arg(long, default_value = "")]
        description: String,
        /// Print only the new disk's id.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List disks (of --domain, or of every domain).
    List,
    /// Show a disk's chain and snapshots.
    Show { id: String },
    /// Snapshot a disk.
    Snapshot {
        id: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Print only the snapshot's id.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Make a new disk from a disk or a snapshot: thin, or a full copy.
    Clone {
        /// A disk or a snapshot.
        source: String,
        #[arg(long, default_value = "")]
        name: String,
        /// A full, independent copy.
        #[arg(long)]
        full: bool,
        /// Full clones: the format.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Full clones: allocate every block.
        #[arg(long)]
        preallocate: bool,
        /// Print only the new disk's id.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a snapshot by merging it into the chain.
    DeleteSnapshot {
        snapshot: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a disk (and what only it references).
    Delete { id: String },
    /// Copy a disk to another domain.
    Copy {
        id: String,
        /// Target domain (name or id).
        #[arg(long)]
        to: String,
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        #[arg(long)]
        preallocate: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Move a disk to another domain (copy, then delete the source).
    Move {
        id: String,
        /// Target domain (name or id).
        #[arg(long)]
        to: String,
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Grow a disk.
    Extend {
        id: String,
        /// New virtual size, e.g. 40G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Rewrite a disk in another format (it keeps its id).
    Convert {
        id: String,
        #[arg(long, value_enum)]
        format: FormatArg,
        #[arg(long)]
        preallocate: bool,
        #[command(flatten)]
        wait: Wait,
    },
}

/// Coordinator job commands.
#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// List jobs.
    List {
        /// Only running ones.
        #[arg(long)]
        running: bool,
    },
    /// Show a job.
    Show { id: String },
    /// Follow a job until it ends.
    Watch { id: String },
    /// Cancel a job.
    Cancel { id: String },
}

/// Commands against the coordinator.
#[derive(Subcommand, Debug)]
pub enum CoordCmd {
    /// Disks (through the coordinator).
    #[command(subcommand)]
    Disk(DiskCmd),
    /// The coordinator's jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// The agents the coordinator uses.
    Agents,
}

fn pf(f: Option<FormatArg>) -> i32 {
    match f {
        None => pb::Format::Unspecified as i32,
        Some(FormatArg::Raw) => pb::Format::Raw as i32,
        Some(FormatArg::Qcow2) => pb::Format::Qcow2 as i32,
    }
}

fn pa(pre: bool) -> i32 {
    if pre {
        pb::Allocation::Preallocated as i32
    } else {
        pb::Allocation::Sparse as i32
    }
}

fn fmt(v: i32) -> &'static str {
    match pb::Format::try_from(v) {
        Ok(pb::Format::Raw) => "raw",
        Ok(pb::Format::Qcow2) => "qcow2",
        _ => "-",
    }
}

fn state(v: i32) -> String {
    pb::JobState::try_from(v)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn disk_json(d: &pb::Disk) -> Value {
    json!({
        "id": d.id, "name": d.name, "domain": d.domain, "domain_name": d.domain_name,
        "size": d.size, "format": fmt(d.format), "state": d.state, "ctime": d.ctime,
        "parent_disk": if d.parent_disk.is_empty() { Value::Null } else { d.parent_disk.clone().into() },
        "chain": d.chain.iter().map(|l| json!({
            "volume": l.volume_id, "format": fmt(l.format), "capacity": l.capacity,
            "size": l.size, "snapshot": if l.snapshot_id.is_empty() { Value::Null } else { l.snapshot_id.clone().into() },
            "description": l.description, "legal": l.legal,
        })).collect::<Vec<_>>(),
        "snapshots": d.snapshots.iter().map(|s| json!({
            "id": s.id, "volume": s.volume_id, "description": s.description,
            "ctime": s.ctime, "state": s.state, "clones": s.clones,
        })).collect::<Vec<_>>(),
    })
}

fn job_json(j: &pb::Job) -> Value {
    json!({
        "id": j.id, "kind": j.kind, "state": state(j.state), "step": j.step,
        "request_id": j.request_id, "domain": j.domain, "disk": j.disk_id,
        "done_bytes": j.done_bytes, "total_bytes": j.total_bytes,
        "host": j.host_id, "owner": j.owner, "attempts": j.attempts,
        "snapshot": if j.snapshot_id.is_empty() { Value::Null } else { j.snapshot_id.clone().into() },
        "result": j.disk.as_ref().map(disk_json),
        "error": if j.error_reason.is_empty() { Value::Null } else {
            json!({"reason": j.error_reason, "message": j.error_message}) },
        "created": j.created, "finished": j.finished,
    })
}

async fn client(c: &CoordConn) -> Result<CoordinatorClient<Channel>> {
    let t = if c.coordinator.starts_with("http://") || c.coordinator.starts_with("https://") {
        Target::Tcp(c.coordinator.clone())
    } else {
        Target::Unix(PathBuf::from(&c.coordinator))
    };
    let ch = channel(&t).await.with_context(|| {
        format!(
            "cannot reach the coordinator at {} (is `cairn up` or cairn-coordinator running? set --coordinator)",
            c.coordinator
        )
    })?;
    Ok(CoordinatorClient::new(ch))
}

/// Follow a job with a progress bar (quietly with --json or -q).
async fn follow(c: &mut CoordinatorClient<Channel>, job: pb::Job, quiet: bool) -> Result<pb::Job> {
    if job.state != pb::JobState::Running as i32 {
        return Ok(job);
    }
    let mut s = c
        .watch_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    let bar = (!quiet).then(|| progress_bar(job.total_bytes, &job.step));
    let mut last = job;
    while let Some(j) = s.message().await.map_err(refused)? {
        if let Some(b) = &bar {
            b.set_message(j.step.clone());
            b.set_length(j.total_bytes.max(1));
            b.set_position(j.done_bytes);
        }
        last = j;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(last)
}

/// Print a job's outcome; exit 1 unless it succeeded (or is still running
/// with --no-wait).
fn outcome(j: &pb::Job, json_out: bool, quiet: Option<&str>) -> Result<ExitCode> {
    let ok = j.state == pb::JobState::Succeeded as i32;
    match quiet {
        Some(id) if ok && !json_out => println!("{id}"),
        _ => {
            if json_out {
                print_json(&job_json(j))?;
            } else {
                let d = j.disk.as_ref().map(|d| d.id.as_str()).unwrap_or("-");
                println!("job {} ({}): {} — disk {d}", j.id, j.kind, state(j.state));
                if !j.snapshot_id.is_empty() {
                    println!("snapshot {}", j.snapshot_id);
                }
                if !j.error_reason.is_empty() {
                    println!("error: {} ({})", j.error_message, j.error_reason);
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

async fn long(
    c: &mut CoordinatorClient<Channel>,
    j: pb::Job,
    wait: &Wait,
    json_out: bool,
    quiet: bool,
) -> Result<ExitCode> {
    if wait.no_wait {
        return outcome(&j, json_out, None);
    }
    let j = follow(c, j, json_out || quiet).await?;
    let id = j.disk.as_ref().map(|d| d.id.clone()).unwrap_or_default();
    outcome(&j, json_out, quiet.then_some(id.as_str()))
}

fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Run a coordinator command.
pub fn run(cc: &CoordConn, conn: &Conn, json_out: bool, cmd: &CoordCmd) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(cc, conn, json_out, cmd))
}

async fn run_async(cc: &CoordConn, conn: &Conn, j: bool, cmd: &CoordCmd) -> Result<ExitCode> {
    let mut c = client(cc).await?;
    let d = conn.domain.clone();
    match cmd {
        CoordCmd::Agents => {
            let r = c
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if j {
                print_json(&json!(r.agents.iter().map(|a| json!({
                    "host_id": a.host_id, "host_name": a.host_name, "address": a.address,
                    "reachable": a.reachable,
                    "domains": a.domains.iter().map(|d| json!({"id": d.id, "name": d.name})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>()))?;
            } else {
                table(
                    &["HOST", "NAME", "ADDRESS", "REACHABLE", "DOMAINS"],
                    r.agents
                        .iter()
                        .map(|a| {
                            vec![
                                a.host_id.clone(),
                                a.host_name.clone(),
                                a.address.clone(),
                                a.reachable.to_string(),
                                a.domains
                                    .iter()
                                    .map(|d| d.name.clone())
                                    .collect::<Vec<_>>()
                                    .join(","),
                            ]
                        })
                        .collect(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CoordCmd::Job(cmd) => job(&mut c, j, cmd).await,
        CoordCmd::Disk(cmd) => disk(&mut c, &d, j, cmd).await,
    }
}

async fn job(c: &mut CoordinatorClient<Channel>, j: bool, cmd: &JobCmd) -> Result<ExitCode> {
    match cmd {
        JobCmd::List { running } => {
            let r = c
                .list_jobs(pb::ListJobsRequest { running: *running })
                .await
                .map_err(refused)?
                .into_inner();
            if j {
                print_json(&json!(r.jobs.iter().map(job_json).collect::<Vec<_>>()))?;
            } else {
                table(
                    &["JOB", "KIND", "STATE", "STEP", "DISK", "PROGRESS", "HOST"],
                    r.jobs
                        .iter()
                        .map(|x| {
                            vec![
                                x.id.clone(),
                                x.kind.clone(),
                                state(x.state),
                                x.step.clone(),
                                x.disk_id.clone(),
                                if x.total_bytes > 0 {
                                    format!(
                                        "{}/{}",
                                        human_bytes(x.done_bytes),
                                        human_bytes(x.total_bytes)
                                    )
                                } else {
                                    "-".into()
                                },
                                if x.host_id.is_empty() {
                                    "-".into()
                                } else {
                                    x.host_id.clone()
                                },
                            ]
                        })
                        .collect(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCmd::Show { id } => {
            let x = c
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .map_err(refused)?
                .into_inner();
            print_json(&job_json(&x))?;
            Ok(ExitCode::SUCCESS)
        }
        JobCmd::Watch { id } => {
            let x = c
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .map_err(refused)?
                .into_inner();
            let x = follow(c, x, j).await?;
            outcome(&x, j, None)
        }
        JobCmd::Cancel { id } => {
            let x = c
                .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
                .await
                .map_err(refused)?
                .into_inner();
            outcome(&x, j, None)
        }
    }
}

async fn disk(
    c: &mut CoordinatorClient<Channel>,
    d: &str,
    j: bool,
    cmd: &DiskCmd,
) -> Result<ExitCode> {
    let d = d.to_string();
    match cmd {
        DiskCmd::Create {
            size,
            format,
            name,
            preallocate,
            description,
            quiet,
        } => {
            let x = c
                .create_disk(pb::CreateDiskRequest {
                    request_id: rid(),
                    domain: d,
                    name: name.clone(),
                    format: pf(Some(*format)),
                    size: *size,
                    allocation: pa(*preallocate),
                    description: description.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            let id = x.disk.as_ref().map(|d| d.id.clone()).unwrap_or_default();
            outcome(&x, j, quiet.then_some(id.as_str()))
        }
        DiskCmd::List => {
            let r = c
                .list_disks(pb::ListDisksRequest { domain: d })
                .await
                .map_err(refused)?
                .into_inner();
            if j {
                print_json(&json!(r.disks.iter().map(disk_json).collect::<Vec<_>>()))?;
            } else {
                table(
                    &[
                        "DISK",
                        "NAME",
                        "DOMAIN",
                        "SIZE",
                        "FORMAT",
                        "LAYERS",
                        "SNAPSHOTS",
                    ],
                    r.disks
                        .iter()
                        .map(|x| {
                            vec![
                                x.id.clone(),
                                if x.name.is_empty() {
                                    "-".into()
                                } else {
                                    x.name.clone()
                                },
                                x.domain_name.clone(),
                                human_bytes(x.size),
                                fmt(x.format).into(),
                                x.chain.len().to_string(),
                                x.snapshots.len().to_string(),
                            ]
                        })
                        .collect(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DiskCmd::Show { id } => {
            let x = c
                .get_disk(pb::GetDiskRequest {
                    domain: d,
                    disk_id: id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if j {
                print_json(&disk_json(&x))?;
            } else {
                println!(
                    "disk {} {:?} on {}: {} {}",
                    x.id,
                    x.name,
                    x.domain_name,
                    human_bytes(x.size),
                    fmt(x.format)
                );
                table(
                    &["LAYER", "VOLUME", "FORMAT", "CAPACITY", "SNAPSHOT"],
                    x.chain
                        .iter()
                        .enumerate()
                        .map(|(i, l)| {
                            vec![
                                i.to_string(),
                                l.volume_id.clone(),
                                fmt(l.format).into(),
                                human_bytes(l.capacity),
                                if l.snapshot_id.is_empty() {
                                    "-".into()
                                } else {
                                    l.snapshot_id.clone()
                                },
                            ]
                        })
                        .collect(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DiskCmd::Snapshot {
            id,
            description,
            quiet,
        } => {
            let x = c
                .snapshot_disk(pb::SnapshotDiskRequest {
                    request_id: rid(),
                    domain: d,
                    disk_id: id.clone(),
                    description: description.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            let s = x.snapshot_id.clone();
            outcome(&x, j, quiet.then_some(s.as_str()))
        }
        DiskCmd::Clone {
            source,
            name,
            full,
            format,
            preallocate,
            quiet,
            wait,
        } => {
            let x = c
                .clone_disk(pb::CloneDiskRequest {
                    request_id: rid(),
                    domain: d,
                    source_id: source.clone(),
                    name: name.clone(),
                    full: *full,
                    format: pf(*format),
                    allocation: if *full { pa(*preallocate) } else { 0 },
                })
                .await
                .map_err(refused)?
                .into_inner();
            long(c, x, wait, j, *quiet).await
        }
        DiskCmd::DeleteSnapshot { snapshot, wait } => {
            let x = c
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    request_id: rid(),
                    domain: d,
                    snapshot_id: snapshot.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            long(c, x, wait, j, false).await
        }
        DiskCmd::Delete { id } => {
            let x = c
                .delete_disk(pb::DeleteDiskRequest {
                    request_id: rid(),
                    domain: d,
                    disk_id: id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            outcome(&x, j, None)
        }
        DiskCmd::Copy {
            id,
            to,
            format,
            preallocate,
            wait,
        } => {
            let x = c
                .copy_disk(pb::CopyDiskRequest {
                    request_id: rid(),
                    domain: d,
                    disk_id: id.clone(),
                    target_domain: to.clone(),
                    r#move: false,
                    format: pf(*format),
                    allocation: pa(*preallocate),
                })
                .await
                .map_err(refused)?
                .into_inner();
            long(c, x, wait, j, false).await
        }
        DiskCmd::Move {
            id,
            to,
            format,
            wait,
        } => {
            let x = c
                .copy_disk(pb::CopyDiskRequest {
                    request_id: rid(),
                    domain: d,
                    disk_id: id.clone(),
                    target_domain: to.clone(),
                    r#move: true,
                    format: pf(*format),
                    allocation: 0,
                })
                .await
                .map_err(refused)?
                .into_inner();
            long(c, x, wait, j, false).await
        }
        DiskCmd::Extend { id, size } => {
            let x = c
                .extend_disk(pb::ExtendDiskRequest {
                    request_id: rid(),
                    domain: d,
                    disk_id: id.clone(),
                    size: *size,
                })
                .await
                .map_err(refused)?
                .into_inner();
            outcome(&x, j, None)
        }
        DiskCmd::Convert {
            id,
            format,
            preallocate,
            wait,
        } => {
            let x = c
                .convert_disk(pb::ConvertDiskRequest {
                    request_id: rid(),
                    domain: d,
                    disk_id: id.clone(),
                    format: pf(Some(*format)),
                    allocation: pa(*preallocate),
                })
                .await
                .map_err(refused)?
                .into_inner();
            long(c, x, wait, j, false).await
        }
    }
}
