//! The agent's own commands: snapshot, activation, the domains it has
//! open and its data jobs; and the dispatch of the agent family
//! ([`crate::volume`], [`crate::tag`]).

use std::io::Write;
use std::process::ExitCode;

use crate::connect::Agent;
use anyhow::Result;
use cairn_proto::agent as pb;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::args::{rid, JobCmd, Wait};
use crate::connect::{self, Ask, Conn};
use crate::output::{human_bytes, Out};
use crate::tag::{TagCmd, UserDataCmd};
use crate::volume::{volume_json, VolumeCmd};

/// Commands against the agent.
#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Tags.
    #[command(subcommand)]
    Tag(TagCmd),
    /// Named user data items of a tag.
    #[command(subcommand, name = "userdata")]
    UserData(UserDataCmd),
    /// Snapshot a disk (a strong, mutable tag).
    Snapshot {
        /// The tag.
        tag: String,
        #[arg(long, default_value = "")]
        /// Free text shown with it.
        description: String,
    },
    /// Make a tag's chain usable by qemu under a stable path.
    Activate {
        /// The tag.
        tag: String,
    },
    /// Take down a tag's activation.
    Deactivate {
        /// The tag.
        tag: String,
        /// Even if the volume is open or another chain needs it.
        #[arg(long)]
        force: bool,
    },
    /// List activations.
    Activations,
    /// The agent's own data jobs (copy, import, export, merge).
    #[command(subcommand, name = "agent-job")]
    Job(JobCmd),
    /// The domains the agent has open.
    Domains,
}

/// An enum's wire name without its prefix, lower case.
pub fn enum_name(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_ascii_lowercase()
}

/// A volume format's name.
pub fn fmt_name(v: i32) -> String {
    pb::VolumeFormat::try_from(v)
        .map(|f| enum_name(f.as_str_name(), "VOLUME_FORMAT_"))
        .unwrap_or_else(|_| v.to_string())
}

/// A tag as JSON.
pub fn tag_json(t: &pb::Tag) -> Value {
    json!({
        "id": t.id, "domain": t.domain, "volume": t.volume, "size": t.size,
        "mutable": t.mutable,
        "strategy": pb::Strategy::try_from(t.strategy).map(|l| enum_name(l.as_str_name(), "STRATEGY_")).unwrap_or_default(),
        "options": t.options.iter().map(|kv| (kv.key.clone(), Value::String(kv.value.clone()))).collect::<serde_json::Map<_, _>>(),
        "type": pb::TagType::try_from(t.r#type).map(|l| enum_name(l.as_str_name(), "TAG_TYPE_")).unwrap_or_default(),
        "state": pb::TagState::try_from(t.state).map(|l| enum_name(l.as_str_name(), "TAG_STATE_")).unwrap_or_default(),
        "ctime": t.ctime, "child_refs": t.child_refs, "user_data_bytes": t.user_data_bytes,
        "generation": t.generation, "token": t.token, "writer_slot": t.writer_slot,
    })
}

fn job_json(j: &pb::Job) -> Value {
    json!({
        "id": j.id, "kind": j.kind,
        "state": pb::JobState::try_from(j.state).map(|l| enum_name(l.as_str_name(), "JOB_STATE_")).unwrap_or_default(),
        "done_bytes": j.done_bytes, "total_bytes": j.total_bytes, "skipped_bytes": j.skipped_bytes,
        "error": if j.error_reason.is_empty() { Value::Null } else { json!({"reason": j.error_reason, "message": j.error_message}) },
        "volume": j.volume.as_ref().map(volume_json), "tag": j.tag.as_ref().map(tag_json),
        "path": if j.path.is_empty() { Value::Null } else { Value::String(j.path.clone()) },
        "started": j.started, "finished": j.finished,
    })
}

fn activation_json(a: &pb::Activation) -> Value {
    json!({
        "domain": a.domain, "tag": a.tag_id, "path": a.path,
        "volumes": a.volumes.iter().map(|v| json!({
            "volume": v.volume_id, "path": v.path, "device": v.device, "format": fmt_name(v.format),
        })).collect::<Vec<_>>(),
    })
}

/// Follow a job with a progress bar (or quietly with --json).
async fn follow(c: &mut Agent, job: pb::Job, json_out: bool) -> Result<pb::Job> {
    let req = pb::GetJobRequest {
        job_id: job.id.clone(),
    };
    let s = c.watch_job(req).await.ask()?;
    connect::follow(s, job, json_out, |j| (j.done_bytes, j.total_bytes, &j.kind)).await
}

/// Follow a job unless `--no-wait`, print how it ended; exit 1 unless it
/// succeeded.
pub async fn job_result(
    c: &mut Agent,
    job: pb::Job,
    wait: &Wait,
    out: &mut Out<'_>,
) -> Result<ExitCode> {
    let json_out = out.json_mode();
    if wait.no_wait {
        out.show(job_json(&job))?;
        return Ok(ExitCode::SUCCESS);
    }
    let j = follow(c, job, json_out).await?;
    out.show(job_json(&j))?;
    Ok(if j.state == pb::JobState::Succeeded as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn domain_json(d: &pb::DomainInfo) -> Value {
    json!({"id": d.id, "name": d.name, "path": d.path, "host_slot": d.host_slot,
    "extent_size": d.extent_size, "extents_total": d.extents_total, "extents_free": d.extents_free,
    "volumes": d.volumes, "volume_slots_total": d.volume_slots_total,
    "tags": d.tags, "tag_slots_total": d.tag_slots_total, "host_slots_total": d.host_slots_total})
}

/// Run an agent command.
pub fn run(conn: &Conn, cmd: &AgentCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    connect::block_on(run_async(conn, cmd, out))
}

async fn run_async(conn: &Conn, cmd: &AgentCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    let j = out.json_mode();
    let mut c = connect::agent(conn).await?;
    let d = conn.domain.clone();
    match cmd {
        AgentCmd::Domains => {
            let r = c.list_domains(pb::ListDomainsRequest {}).await.ask()?;
            let header = ["NAME", "ID", "PATH", "SLOT", "FREE", "VOLUMES", "TAGS"];
            out.list(&r.domains, domain_json, &header, |x| {
                vec![
                    x.name.clone(),
                    x.id.clone(),
                    x.path.clone(),
                    x.host_slot.to_string(),
                    human_bytes(x.extents_free * x.extent_size),
                    x.volumes.to_string(),
                    x.tags.to_string(),
                ]
            })?;
        }
        AgentCmd::Volume(v) => return crate::volume::run(&mut c, d, v, out).await,
        AgentCmd::Tag(t) => return crate::tag::run(&mut c, d, t, out).await,
        AgentCmd::UserData(u) => return crate::tag::run_user_data(&mut c, d, u, out).await,
        AgentCmd::Snapshot { tag, description } => {
            let req = pb::SnapshotRequest {
                request_id: rid(),
                domain: d,
                tag_id: tag.clone(),
                description: description.clone(),
                size: 0,
                clone: None,
                snapshot_options: Vec::new(),
            };
            let r = c.snapshot(req).await.ask()?;
            out.show(json!({
                "volume": r.volume.as_ref().map(|v| v.id.clone()),
                "parent_tag": r.parent_tag.as_ref().map(|t| t.id.clone()),
                "tag": tag,
            }))?;
        }
        AgentCmd::Activate { tag } => {
            let req = pb::ActivateRequest {
                request_id: rid(),
                domain: d,
                tag_id: tag.clone(),
            };
            let r = c.activate(req).await.ask()?;
            let a = r.activation.unwrap_or_default();
            if j {
                out.json(&activation_json(&a))?;
            } else {
                writeln!(out, "{}", a.path)?;
            }
        }
        AgentCmd::Deactivate { tag, force } => {
            let req = pb::DeactivateRequest {
                request_id: rid(),
                domain: d,
                tag_id: tag.clone(),
                force: *force,
            };
            let r = c.deactivate(req).await.ask()?;
            out.show(json!({"changed": r.changed}))?;
        }
        AgentCmd::Activations => {
            let r = c
                .list_activations(pb::ListActivationsRequest { domain: d })
                .await
                .ask()?;
            out.list(
                &r.activations,
                activation_json,
                &["TAG", "VOLUMES", "PATH"],
                |a| {
                    vec![
                        a.tag_id.clone(),
                        a.volumes.len().to_string(),
                        a.path.clone(),
                    ]
                },
            )?;
        }
        AgentCmd::Job(jc) => match jc {
            JobCmd::List { running } => {
                let mut r = c.list_jobs(pb::ListJobsRequest {}).await.ask()?;
                if *running {
                    r.jobs.retain(|x| x.state == pb::JobState::Running as i32);
                }
                let header = ["JOB", "KIND", "STATE", "DONE", "TOTAL"];
                out.list(&r.jobs, job_json, &header, |x| {
                    vec![
                        x.id.clone(),
                        x.kind.clone(),
                        job_json(x)["state"].as_str().unwrap_or("").into(),
                        human_bytes(x.done_bytes),
                        human_bytes(x.total_bytes),
                    ]
                })?;
            }
            JobCmd::Show { id } => {
                let x = c
                    .get_job(pb::GetJobRequest { job_id: id.clone() })
                    .await
                    .ask()?;
                out.show(job_json(&x))?;
            }
            JobCmd::Watch { id } => {
                let x = c
                    .get_job(pb::GetJobRequest { job_id: id.clone() })
                    .await
                    .ask()?;
                return job_result(&mut c, x, &Wait { no_wait: false }, out).await;
            }
            JobCmd::Cancel { id } => {
                let x = c
                    .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
                    .await
                    .ask()?;
                out.show(job_json(&x))?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
