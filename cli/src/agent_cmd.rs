//! Commands that talk to the local agent over its unix socket (or TCP).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_agent::pb;
use cairn_agent::pb::agent_client::AgentClient;
use cairn_proto::transport::{agent_client as connect, Target};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::{human_bytes, parse_size, print_json};

/// How to reach the agent.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The agent's unix socket.
    #[arg(
        long,
        global = true,
        env = "CAIRN_SOCKET",
        default_value = "/run/cairn/agent.sock"
    )]
    pub socket: PathBuf,
    /// Talk to an agent over TCP instead, e.g. http://10.0.0.5:7070.
    #[arg(long, global = true, env = "CAIRN_AGENT")]
    pub agent: Option<String>,
    /// Domain name or id (may be left out when the agent has one domain).
    #[arg(long, global = true, env = "CAIRN_DOMAIN", default_value = "")]
    pub domain: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

impl FormatArg {
    fn pb(self) -> i32 {
        match self {
            FormatArg::Raw => pb::VolumeFormat::Raw as i32,
            FormatArg::Qcow2 => pb::VolumeFormat::Qcow2 as i32,
        }
    }
}

#[derive(Args, Debug)]
pub struct TagArgs {
    /// Make the tag weak (internal) instead of strong.
    #[arg(long)]
    weak: bool,
    /// Make the tag immutable (an image rather than a disk).
    #[arg(long)]
    immutable: bool,
    /// Snapshot and clone by full copies instead of qcow2 chains.
    #[arg(long)]
    copy_strategy: bool,
    /// Low-level option KEY=VALUE (repeatable).
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
}

impl TagArgs {
    fn spec(&self, volume: String) -> Result<pb::TagSpec> {
        let mut options = Vec::new();
        for o in &self.options {
            let (k, v) = o
                .split_once('=')
                .with_context(|| format!("--option {o:?} is not KEY=VALUE"))?;
            options.push(pb::KeyValue {
                key: k.into(),
                value: v.into(),
            });
        }
        Ok(pb::TagSpec {
            volume,
            mutable: !self.immutable,
            strategy: if self.copy_strategy {
                pb::Strategy::Copy
            } else {
                pb::Strategy::Chain
            } as i32,
            r#type: if self.weak {
                pb::TagType::Weak
            } else {
                pb::TagType::Strong
            } as i32,
            options,
            ..Default::default()
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume (with a disk tag on it unless --no-tag).
    Create {
        /// Virtual size, e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[arg(long, value_enum, default_value = "raw")]
        format: FormatArg,
        /// Parent tag (qcow2 only).
        #[arg(long)]
        parent: Option<String>,
        /// Allocate the whole run now.
        #[arg(long)]
        preallocate: bool,
        #[arg(long, default_value = "")]
        description: String,
        /// Do not create a tag on the new volume.
        #[arg(long)]
        no_tag: bool,
        /// Print only the new tag's id (the volume's with --no-tag).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        tag: TagArgs,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { id: String },
    /// Delete a volume no tag points at.
    Delete { id: String },
    /// Grow a volume's virtual size.
    Extend {
        id: String,
        /// New virtual size, e.g. 20G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Change a volume's description or legality.
    Update {
        id: String,
        #[arg(long)]
        description: Option<String>,
        /// legal or illegal.
        #[arg(long)]
        legality: Option<String>,
        /// New parent tag (metadata only; rewrite the image's backing
        /// reference with qemu-img rebase -u).
        #[arg(long, conflicts_with = "no_parent")]
        parent: Option<String>,
        /// Remove the parent.
        #[arg(long)]
        no_parent: bool,
    },
    /// How much space the volume's data needs in a format (qemu-img measure).
    Measure {
        id: String,
        #[arg(long, value_enum, default_value = "qcow2")]
        format: FormatArg,
    },
    /// Check a volume's image (qemu-img check).
    Check { id: String },
    /// Copy a volume (its whole chain) into a new volume.
    Copy {
        id: String,
        /// Target format (default: the source's).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Put a disk tag on the copy.
        #[arg(long)]
        tag: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Import a file of this host into a new volume.
    Import {
        path: PathBuf,
        /// The file's format (never guessed).
        #[arg(long, value_enum)]
        source_format: FormatArg,
        /// Target format (default: the file's).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Put a disk tag on the new volume.
        #[arg(long)]
        tag: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Export a volume (its whole chain) to a new file of this host.
    Export {
        id: String,
        path: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: FormatArg,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Args, Debug)]
pub struct Wait {
    /// Print the job id and return instead of following it.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Subcommand, Debug)]
pub enum TagCmd {
    /// Create a tag on a volume.
    Create {
        /// The volume.
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        tag: TagArgs,
    },
    /// List tags.
    List,
    /// Show one tag.
    Show { id: String },
    /// Replace a tag's metadata (point it at a volume).
    Change {
        id: String,
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        tag: TagArgs,
    },
    /// Delete a tag (with --chain: and every volume and weak tag of its
    /// chain that nothing else references, in one transaction).
    Delete {
        id: String,
        #[arg(long)]
        chain: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserDataCmd {
    /// Set an item from --value or --file.
    Set {
        tag: String,
        name: String,
        #[arg(long, conflicts_with = "file")]
        value: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Print one item's bytes, or list every item.
    Get { tag: String, name: Option<String> },
    /// Remove an item.
    Remove { tag: String, name: String },
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// List this agent's jobs.
    List,
    /// Show a job.
    Show { id: String },
    /// Follow a job with a progress bar until it ends.
    Watch { id: String },
    /// Cancel a job.
    Cancel { id: String },
}

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
        tag: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Make a tag's chain usable by qemu under a stable path.
    Activate { tag: String },
    /// Take down a tag's activation.
    Deactivate {
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

/// An agent error, for the exit code and --json.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({reason})")]
pub struct Refused {
    pub code: tonic::Code,
    pub reason: String,
    pub message: String,
}

pub fn refused(s: tonic::Status) -> anyhow::Error {
    let reason = s
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_else(|| format!("{:?}", s.code()).to_lowercase());
    Refused {
        code: s.code(),
        reason,
        message: s.message().to_string(),
    }
    .into()
}

fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn enum_name(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_ascii_lowercase()
}

fn fmt_name(v: i32) -> String {
    pb::VolumeFormat::try_from(v)
        .map(|f| enum_name(f.as_str_name(), "VOLUME_FORMAT_"))
        .unwrap_or_else(|_| v.to_string())
}

fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "id": v.id, "domain": v.domain, "parent_tag": v.parent_tag,
        "format": fmt_name(v.format), "capacity": v.capacity, "size": v.size,
        "extent_start": v.extent_start, "extent_count": v.extent_count,
        "legality": pb::Legality::try_from(v.legality).map(|l| enum_name(l.as_str_name(), "LEGALITY_")).unwrap_or_default(),
        "allocation": pb::Allocation::try_from(v.allocation).map(|l| enum_name(l.as_str_name(), "ALLOCATION_")).unwrap_or_default(),
        "ctime": v.ctime, "description": v.description, "tag_refs": v.tag_refs,
        "generation": v.generation, "token": v.token, "writer_slot": v.writer_slot,
    })
}

fn tag_json(t: &pb::Tag) -> Value {
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

/// Print rows as aligned columns under a header.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn short(id: &str) -> String {
    id.to_string()
}

fn volume_rows(vs: &[pb::Volume]) {
    table(
        &[
            "VOLUME",
            "FORMAT",
            "CAPACITY",
            "SIZE",
            "LEGALITY",
            "PARENT TAG",
            "TAGS",
        ],
        vs.iter()
            .map(|v| {
                let j = volume_json(v);
                vec![
                    short(&v.id),
                    fmt_name(v.format),
                    human_bytes(v.capacity),
                    human_bytes(v.size),
                    j["legality"].as_str().unwrap_or("").to_string(),
                    if v.parent_tag.is_empty() {
                        "-".into()
                    } else {
                        short(&v.parent_tag)
                    },
                    v.tag_refs.to_string(),
                ]
            })
            .collect(),
    );
}

fn tag_rows(ts: &[pb::Tag]) {
    table(
        &[
            "TAG", "VOLUME", "TYPE", "MUTABLE", "STATE", "SIZE", "CHILDREN",
        ],
        ts.iter()
            .map(|t| {
                let j = tag_json(t);
                vec![
                    short(&t.id),
                    short(&t.volume),
                    j["type"].as_str().unwrap_or("").into(),
                    t.mutable.to_string(),
                    j["state"].as_str().unwrap_or("").into(),
                    human_bytes(t.size),
                    t.child_refs.to_string(),
                ]
            })
            .collect(),
    );
}

fn show(json_out: bool, v: Value) -> Result<()> {
    if json_out {
        print_json(&v)
    } else {
        if let Value::Object(m) = &v {
            for (k, x) in m {
                let s = match x {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    other => other.to_string(),
                };
                println!("{k:>16}: {s}");
            }
        }
        Ok(())
    }
}

async fn client(c: &Conn) -> Result<AgentClient<Channel>> {
    let t = match &c.agent {
        Some(a) => Target::Tcp(a.clone()),
        None => Target::Unix(c.socket.clone()),
    };
    connect(&t).await.with_context(|| match &t {
        Target::Unix(p) => format!(
            "cannot reach the agent at {} (is `cairn up` or cairn-agent running? set --socket)",
            p.display()
        ),
        Target::Tcp(a) => format!("cannot reach the agent at {a}"),
    })
}

/// A progress bar for a job of `total` bytes.
pub fn progress_bar(total: u64, msg: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total.max(1));
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:8} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}

/// Follow a job with a progress bar (or quietly with --json).
async fn follow(c: &mut AgentClient<Channel>, job: pb::Job, json_out: bool) -> Result<pb::Job> {
    let mut s = c
        .watch_job(pb::GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    let bar = (!json_out).then(|| progress_bar(job.total_bytes, &job.kind));
    let mut last = job;
    while let Some(j) = s.message().await.map_err(refused)? {
        if let Some(b) = &bar {
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

async fn job_result(
    c: &mut AgentClient<Channel>,
    job: pb::Job,
    wait: &Wait,
    json_out: bool,
) -> Result<ExitCode> {
    if wait.no_wait {
        show(json_out, job_json(&job))?;
        return Ok(ExitCode::SUCCESS);
    }
    let j = follow(c, job, json_out).await?;
    show(json_out, job_json(&j))?;
    Ok(if j.state == pb::JobState::Succeeded as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Run an agent command.
pub fn run(conn: &Conn, json_out: bool, cmd: &AgentCmd) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(conn, json_out, cmd))
}

async fn run_async(conn: &Conn, j: bool, cmd: &AgentCmd) -> Result<ExitCode> {
    let mut c = client(conn).await?;
    let d = conn.domain.clone();
    match cmd {
        AgentCmd::Domains => {
            let r = c
                .list_domains(pb::ListDomainsRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if j {
                let v: Vec<Value> = r
                    .domains
                    .iter()
                    .map(|d| {
                        json!({"id": d.id, "name": d.name, "path": d.path, "host_slot": d.host_slot,
                        "extent_size": d.extent_size, "extents_total": d.extents_total, "extents_free": d.extents_free,
                        "volumes": d.volumes, "volume_slots_total": d.volume_slots_total,
                        "tags": d.tags, "tag_slots_total": d.tag_slots_total, "host_slots_total": d.host_slots_total})
                    })
                    .collect();
                print_json(&v)?;
            } else {
                table(
                    &["NAME", "ID", "PATH", "SLOT", "FREE", "VOLUMES", "TAGS"],
                    r.domains
                        .iter()
                        .map(|x| {
                            vec![
                                x.name.clone(),
                                x.id.clone(),
                                x.path.clone(),
                                x.host_slot.to_string(),
                                human_bytes(x.extents_free * x.extent_size),
                                x.volumes.to_string(),
                                x.tags.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        AgentCmd::Volume(v) => return volume(&mut c, d, j, v).await,
        AgentCmd::Tag(t) => match t {
            TagCmd::Create { volume, tag } => {
                let r = c
                    .create_tag(pb::CreateTagRequest {
                        request_id: rid(),
                        domain: d,
                        tag: Some(tag.spec(volume.clone())?),
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                show(j, tag_json(&r.tag.unwrap_or_default()))?;
            }
            TagCmd::List => {
                let r = c
                    .list_tags(pb::ListTagsRequest { domain: d })
                    .await
                    .map_err(refused)?
                    .into_inner();
                if j {
                    print_json(&r.tags.iter().map(tag_json).collect::<Vec<_>>())?;
                } else {
                    tag_rows(&r.tags);
                }
            }
            TagCmd::Show { id } => {
                let t = c
                    .get_tag(pb::GetTagRequest {
                        domain: d,
                        tag_id: id.clone(),
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                show(j, tag_json(&t))?;
            }
            TagCmd::Change { id, volume, tag } => {
                let r = c
                    .change_tag(pb::ChangeTagRequest {
                        request_id: rid(),
                        domain: d,
                        tag_id: id.clone(),
                        tag: Some(tag.spec(volume.clone())?),
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                show(j, tag_json(&r.tag.unwrap_or_default()))?;
            }
            TagCmd::Delete { id, chain: false } => {
                c.delete_tag(pb::DeleteTagRequest {
                    request_id: rid(),
                    domain: d,
                    tag_id: id.clone(),
                })
                .await
                .map_err(refused)?;
                show(j, json!({"deleted": id}))?;
            }
            TagCmd::Delete { id, chain: true } => {
                let r = c
                    .delete_disk(pb::DeleteDiskRequest {
                        request_id: rid(),
                        domain: d,
                        tag_id: id.clone(),
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                show(
                    j,
                    json!({"tags_removed": r.tags_removed, "volumes_removed": r.volumes_removed}),
                )?;
            }
        },
        AgentCmd::UserData(u) => match u {
            UserDataCmd::Set {
                tag,
                name,
                value,
                file,
            } => {
                let data = match (value, file) {
                    (Some(v), _) => v.clone().into_bytes(),
                    (None, Some(f)) => {
                        std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?
                    }
                    (None, None) => anyhow::bail!("give --value or --file"),
                };
                let r = c
                    .set_user_data(pb::SetUserDataRequest {
                        request_id: rid(),
                        domain: d,
                        tag_id: tag.clone(),
                        name: name.clone(),
                        data,
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                show(j, json!({"changed": r.changed}))?;
            }
            UserDataCmd::Get { tag, name } => {
                let r = c
                    .get_user_data(pb::GetUserDataRequest {
                        domain: d,
                        tag_id: tag.clone(),
                        name: name.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                match (name, j) {
                    (Some(_), false) => {
                        use std::io::Write;
                        std::io::stdout().write_all(&r.items[0].data)?;
                    }
                    (_, true) => print_json(
                        &r.items
                            .iter()
                            .map(|i| json!({"name": i.name, "data": String::from_utf8_lossy(&i.data), "bytes": i.data.len()}))
                            .collect::<Vec<_>>(),
                    )?,
                    (None, false) => table(
                        &["NAME", "BYTES"],
                        r.items
                            .iter()
                            .map(|i| vec![i.name.clone(), i.data.len().to_string()])
                            .collect(),
                    ),
                }
            }
            UserDataCmd::Remove { tag, name } => {
                let r = c
                    .remove_user_data(pb::RemoveUserDataRequest {
                        request_id: rid(),
                        domain: d,
                        tag_id: tag.clone(),
                        name: name.clone(),
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                show(j, json!({"removed": r.removed}))?;
            }
        },
        AgentCmd::Snapshot { tag, description } => {
            let r = c
                .snapshot(pb::SnapshotRequest {
                    request_id: rid(),
                    domain: d,
                    tag_id: tag.clone(),
                    description: description.clone(),
                    size: 0,
                    clone: None,
                    snapshot_options: Vec::new(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(
                j,
                json!({
                    "volume": r.volume.as_ref().map(|v| v.id.clone()),
                    "parent_tag": r.parent_tag.as_ref().map(|t| t.id.clone()),
                    "tag": tag,
                }),
            )?;
        }
        AgentCmd::Activate { tag } => {
            let r = c
                .activate(pb::ActivateRequest {
                    request_id: rid(),
                    domain: d,
                    tag_id: tag.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            let a = r.activation.unwrap_or_default();
            if j {
                print_json(&activation_json(&a))?;
            } else {
                println!("{}", a.path);
            }
        }
        AgentCmd::Deactivate { tag, force } => {
            let r = c
                .deactivate(pb::DeactivateRequest {
                    request_id: rid(),
                    domain: d,
                    tag_id: tag.clone(),
                    force: *force,
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(j, json!({"changed": r.changed}))?;
        }
        AgentCmd::Activations => {
            let r = c
                .list_activations(pb::ListActivationsRequest { domain: d })
                .await
                .map_err(refused)?
                .into_inner();
            if j {
                print_json(
                    &r.activations
                        .iter()
                        .map(activation_json)
                        .collect::<Vec<_>>(),
                )?;
            } else {
                table(
                    &["TAG", "VOLUMES", "PATH"],
                    r.activations
                        .iter()
                        .map(|a| {
                            vec![
                                a.tag_id.clone(),
                                a.volumes.len().to_string(),
                                a.path.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        AgentCmd::Job(jc) => match jc {
            JobCmd::List => {
                let r = c
                    .list_jobs(pb::ListJobsRequest {})
                    .await
                    .map_err(refused)?
                    .into_inner();
                if j {
                    print_json(&r.jobs.iter().map(job_json).collect::<Vec<_>>())?;
                } else {
                    table(
                        &["JOB", "KIND", "STATE", "DONE", "TOTAL"],
                        r.jobs
                            .iter()
                            .map(|x| {
                                vec![
                                    x.id.clone(),
                                    x.kind.clone(),
                                    job_json(x)["state"].as_str().unwrap_or("").into(),
                                    human_bytes(x.done_bytes),
                                    human_bytes(x.total_bytes),
                                ]
                            })
                            .collect(),
                    );
                }
            }
            JobCmd::Show { id } => {
                let x = c
                    .get_job(pb::GetJobRequest { job_id: id.clone() })
                    .await
                    .map_err(refused)?
                    .into_inner();
                show(j, job_json(&x))?;
            }
            JobCmd::Watch { id } => {
                let x = c
                    .get_job(pb::GetJobRequest { job_id: id.clone() })
                    .await
                    .map_err(refused)?
                    .into_inner();
                return job_result(&mut c, x, &Wait { no_wait: false }, j).await;
            }
            JobCmd::Cancel { id } => {
                let x = c
                    .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
                    .await
                    .map_err(refused)?
                    .into_inner();
                show(j, job_json(&x))?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

async fn volume(
    c: &mut AgentClient<Channel>,
    d: String,
    j: bool,
    cmd: &VolumeCmd,
) -> Result<ExitCode> {
    match cmd {
        VolumeCmd::Create {
            size,
            format,
            parent,
            preallocate,
            description,
            no_tag,
            quiet,
            tag,
        } => {
            let r = c
                .create_volume(pb::CreateVolumeRequest {
                    request_id: rid(),
                    domain: d,
                    format: format.pb(),
                    capacity: size.unwrap_or(0),
                    allocation: if *preallocate {
                        pb::Allocation::Preallocated
                    } else {
                        pb::Allocation::Sparse
                    } as i32,
                    parent_tag: parent.clone().unwrap_or_default(),
                    description: description.clone(),
                    tag: if *no_tag {
                        None
                    } else {
                        Some(tag.spec(String::new())?)
                    },
                    ..Default::default()
                })
                .await
                .map_err(refused)?
                .into_inner();
            let v = r.volume.unwrap_or_default();
            if j {
                print_json(
                    &json!({"volume": volume_json(&v), "tag": r.tag.as_ref().map(tag_json)}),
                )?;
            } else if *quiet {
                println!("{}", r.tag.map(|t| t.id).unwrap_or(v.id));
            } else {
                println!("volume {}", v.id);
                if let Some(t) = r.tag {
                    println!("tag    {}", t.id);
                }
            }
        }
        VolumeCmd::List => {
            let r = c
                .list_volumes(pb::ListVolumesRequest { domain: d })
                .await
                .map_err(refused)?
                .into_inner();
            if j {
                print_json(&r.volumes.iter().map(volume_json).collect::<Vec<_>>())?;
            } else {
                volume_rows(&r.volumes);
            }
        }
        VolumeCmd::Show { id } => {
            let v = c
                .get_volume(pb::GetVolumeRequest {
                    domain: d,
                    volume_id: id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(j, volume_json(&v))?;
        }
        VolumeCmd::Delete { id } => {
            c.delete_volume(pb::DeleteVolumeRequest {
                request_id: rid(),
                domain: d,
                volume_id: id.clone(),
                lock_id: String::new(),
            })
            .await
            .map_err(refused)?;
            show(j, json!({"deleted": id}))?;
        }
        VolumeCmd::Extend { id, size } => {
            let r = c
                .extend_volume(pb::ExtendVolumeRequest {
                    request_id: rid(),
                    domain: d,
                    volume_id: id.clone(),
                    capacity: *size,
                    lock_id: String::new(),
                    tag_id: String::new(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(j, volume_json(&r.volume.unwrap_or_default()))?;
        }
        VolumeCmd::Update {
            id,
            description,
            legality,
            parent,
            no_parent,
        } => {
            let cur = c
                .get_volume(pb::GetVolumeRequest {
                    domain: d.clone(),
                    volume_id: id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            let legality = match legality.as_deref() {
                None => cur.legality,
                Some("legal") => pb::Legality::Legal as i32,
                Some("illegal") => pb::Legality::Illegal as i32,
                Some(o) => anyhow::bail!("--legality {o:?}: use legal or illegal"),
            };
            let r = c
                .update_volume(pb::UpdateVolumeRequest {
                    request_id: rid(),
                    domain: d,
                    volume_id: id.clone(),
                    description: description.clone().unwrap_or(cur.description),
                    legality,
                    lock_id: String::new(),
                    set_parent: parent.is_some() || *no_parent,
                    parent_tag: parent.clone().unwrap_or_default(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(j, volume_json(&r.volume.unwrap_or_default()))?;
        }
        VolumeCmd::Measure { id, format } => {
            let r = c
                .measure_volume(pb::MeasureVolumeRequest {
                    domain: d,
                    volume_id: id.clone(),
                    target_format: format.pb(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(
                j,
                json!({"required": r.required, "fully_allocated": r.fully_allocated}),
            )?;
        }
        VolumeCmd::Check { id } => {
            let r = c
                .check_volume(pb::CheckVolumeRequest {
                    domain: d,
                    volume_id: id.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            show(
                j,
                json!({"clean": r.clean, "corruptions": r.corruptions, "leaks": r.leaks, "check_errors": r.check_errors}),
            )?;
            if !r.clean {
                return Ok(ExitCode::from(1));
            }
        }
        VolumeCmd::Copy {
            id,
            format,
            tag,
            wait,
        } => {
            let job = c
                .copy_volume(pb::CopyVolumeRequest {
                    request_id: rid(),
                    domain: d,
                    volume_id: id.clone(),
                    target: Some(target(*format, *tag)),
                    target_domain: String::new(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            return job_result(c, job, wait, j).await;
        }
        VolumeCmd::Import {
            path,
            source_format,
            format,
            tag,
            wait,
        } => {
            let abs = std::path::absolute(path)?;
            let job = c
                .import_volume(pb::ImportVolumeRequest {
                    request_id: rid(),
                    domain: d,
                    path: abs.display().to_string(),
                    source_format: source_format.pb(),
                    target: Some(target(*format, *tag)),
                })
                .await
                .map_err(refused)?
                .into_inner();
            return job_result(c, job, wait, j).await;
        }
        VolumeCmd::Export {
            id,
            path,
            format,
            wait,
        } => {
            let abs = std::path::absolute(path)?;
            let job = c
                .export_volume(pb::ExportVolumeRequest {
                    request_id: rid(),
                    domain: d,
                    volume_id: id.clone(),
                    path: abs.display().to_string(),
                    format: format.pb(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            return job_result(c, job, wait, j).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn target(format: Option<FormatArg>, tag: bool) -> pb::TargetSpec {
    pb::TargetSpec {
        format: format.map(|f| f.pb()).unwrap_or(0),
        tag: tag.then(|| pb::TagSpec {
            mutable: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}
