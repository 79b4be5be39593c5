//! `cairn volume`: volumes on the local agent, and the data jobs that
//! make or read them (copy, import, export).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::connect::Agent;
use anyhow::Result;
use cairn_domain::{Allocation, Legality};
use cairn_proto::agent as pb;
use cairn_proto::convert as wire;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::agent::{enum_name, fmt_name, job_result, tag_json};
use crate::args::{parse_size, rid, FormatArg, Wait};
use crate::connect::Ask;
use crate::output::{human_bytes, Out};
use crate::tag::TagArgs;

/// Volume commands.
#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume (with a disk tag on it unless --no-tag).
    Create {
        /// Virtual size, e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[arg(long, value_enum, default_value = "raw")]
        /// The format.
        format: FormatArg,
        /// Parent tag (qcow2 only).
        #[arg(long)]
        parent: Option<String>,
        /// Allocate the whole run now.
        #[arg(long)]
        preallocate: bool,
        #[arg(long, default_value = "")]
        /// Free text shown with it.
        description: String,
        /// Do not create a tag on the new volume (tag it within the
        /// coordinator's --orphan-quarantine, an hour by default, or the
        /// leader reclaims it).
        #[arg(long)]
        no_tag: bool,
        /// Print only the new tag's id (the volume's with --no-tag).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        #[allow(missing_docs)]
        tag: TagArgs,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show {
        /// The volume.
        id: String,
    },
    /// Delete a volume no tag points at.
    Delete {
        /// The volume.
        id: String,
    },
    /// Grow a volume's virtual size.
    Extend {
        /// The volume.
        id: String,
        /// New virtual size, e.g. 20G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Change a volume's description or legality.
    Update {
        /// The volume.
        id: String,
        #[arg(long)]
        /// Free text shown with it.
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
        /// The volume.
        id: String,
        #[arg(long, value_enum, default_value = "qcow2")]
        /// The format.
        format: FormatArg,
    },
    /// Check a volume's image (qemu-img check).
    Check {
        /// The volume.
        id: String,
    },
    /// Copy a volume (its whole chain) into a new volume.
    Copy {
        /// The volume.
        id: String,
        /// Target format (default: the source's).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Put a disk tag on the copy.
        #[arg(long)]
        tag: bool,
        #[command(flatten)]
        #[allow(missing_docs)]
        wait: Wait,
    },
    /// Import a file of this host into a new volume.
    Import {
        /// The file.
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
        #[allow(missing_docs)]
        wait: Wait,
    },
    /// Export a volume (its whole chain) to a new file of this host.
    Export {
        /// The volume.
        id: String,
        /// The file.
        path: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        /// The format.
        format: FormatArg,
        #[command(flatten)]
        #[allow(missing_docs)]
        wait: Wait,
    },
}

/// A volume as JSON.
pub fn volume_json(v: &pb::Volume) -> Value {
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

const VOLUME_HEADER: &[&str] = &[
    "VOLUME",
    "FORMAT",
    "CAPACITY",
    "SIZE",
    "LEGALITY",
    "PARENT TAG",
    "TAGS",
];

fn volume_row(v: &pb::Volume) -> Vec<String> {
    let j = volume_json(v);
    vec![
        v.id.clone(),
        fmt_name(v.format),
        human_bytes(v.capacity),
        human_bytes(v.size),
        j["legality"].as_str().unwrap_or("").to_string(),
        crate::output::or_dash(&v.parent_tag),
        v.tag_refs.to_string(),
    ]
}

/// Run a volume command.
pub async fn run(c: &mut Agent, d: String, cmd: &VolumeCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    let j = out.json_mode();
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
            let req = pb::CreateVolumeRequest {
                request_id: rid(),
                domain: d,
                format: wire::volume_format_code((*format).into()),
                capacity: size.unwrap_or(0),
                allocation: wire::allocation_code(if *preallocate {
                    Allocation::Preallocated
                } else {
                    Allocation::Sparse
                }),
                parent_tag: parent.clone().unwrap_or_default(),
                description: description.clone(),
                tag: if *no_tag {
                    None
                } else {
                    Some(tag.spec(String::new())?)
                },
                ..Default::default()
            };
            let r = c.create_volume(req).await.ask()?;
            let v = r.volume.unwrap_or_default();
            if j {
                out.json(&json!({"volume": volume_json(&v), "tag": r.tag.as_ref().map(tag_json)}))?;
            } else if *quiet {
                writeln!(out, "{}", r.tag.map(|t| t.id).unwrap_or(v.id))?;
            } else {
                writeln!(out, "volume {}", v.id)?;
                if let Some(t) = r.tag {
                    writeln!(out, "tag    {}", t.id)?;
                }
            }
        }
        VolumeCmd::List => {
            let r = c
                .list_volumes(pb::ListVolumesRequest { domain: d })
                .await
                .ask()?;
            out.list(&r.volumes, volume_json, VOLUME_HEADER, volume_row)?;
        }
        VolumeCmd::Show { id } => {
            let req = pb::GetVolumeRequest {
                domain: d,
                volume_id: id.clone(),
            };
            let v = c.get_volume(req).await.ask()?;
            out.show(volume_json(&v))?;
        }
        VolumeCmd::Delete { id } => {
            let req = pb::DeleteVolumeRequest {
                request_id: rid(),
                domain: d,
                volume_id: id.clone(),
                lock_id: String::new(),
            };
            c.delete_volume(req).await.ask()?;
            out.show(json!({"deleted": id}))?;
        }
        VolumeCmd::Extend { id, size } => {
            let req = pb::ExtendVolumeRequest {
                request_id: rid(),
                domain: d,
                volume_id: id.clone(),
                capacity: *size,
                lock_id: String::new(),
                tag_id: String::new(),
            };
            let r = c.extend_volume(req).await.ask()?;
            out.show(volume_json(&r.volume.unwrap_or_default()))?;
        }
        VolumeCmd::Update {
            id,
            description,
            legality,
            parent,
            no_parent,
        } => {
            let req = pb::GetVolumeRequest {
                domain: d.clone(),
                volume_id: id.clone(),
            };
            let cur = c.get_volume(req).await.ask()?;
            let legality = match legality.as_deref() {
                None => cur.legality,
                Some("legal") => wire::legality_code(Legality::Legal),
                Some("illegal") => wire::legality_code(Legality::Illegal),
                Some(o) => anyhow::bail!("--legality {o:?}: use legal or illegal"),
            };
            let req = pb::UpdateVolumeRequest {
                request_id: rid(),
                domain: d,
                volume_id: id.clone(),
                description: description.clone().unwrap_or(cur.description),
                legality,
                lock_id: String::new(),
                set_parent: parent.is_some() || *no_parent,
                parent_tag: parent.clone().unwrap_or_default(),
            };
            let r = c.update_volume(req).await.ask()?;
            out.show(volume_json(&r.volume.unwrap_or_default()))?;
        }
        VolumeCmd::Measure { id, format } => {
            let req = pb::MeasureVolumeRequest {
                domain: d,
                volume_id: id.clone(),
                target_format: wire::volume_format_code((*format).into()),
            };
            let r = c.measure_volume(req).await.ask()?;
            out.show(json!({"required": r.required, "fully_allocated": r.fully_allocated}))?;
        }
        VolumeCmd::Check { id } => {
            let req = pb::CheckVolumeRequest {
                domain: d,
                volume_id: id.clone(),
            };
            let r = c.check_volume(req).await.ask()?;
            out.show(json!({"clean": r.clean, "corruptions": r.corruptions, "leaks": r.leaks, "check_errors": r.check_errors}),
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
            let req = pb::CopyVolumeRequest {
                request_id: rid(),
                domain: d,
                volume_id: id.clone(),
                target: Some(target(*format, *tag)),
                target_domain: String::new(),
                source_format: 0,
                as_file: None,
            };
            let job = c.copy_volume(req).await.ask()?;
            return job_result(c, job, wait, out).await;
        }
        VolumeCmd::Import {
            path,
            source_format,
            format,
            tag,
            wait,
        } => {
            let abs = std::path::absolute(path)?;
            let req = pb::ImportVolumeRequest {
                request_id: rid(),
                domain: d,
                path: abs.display().to_string(),
                source_format: wire::volume_format_code((*source_format).into()),
                target: Some(target(*format, *tag)),
            };
            let job = c.import_volume(req).await.ask()?;
            return job_result(c, job, wait, out).await;
        }
        VolumeCmd::Export {
            id,
            path,
            format,
            wait,
        } => {
            let abs = std::path::absolute(path)?;
            let req = pb::ExportVolumeRequest {
                request_id: rid(),
                domain: d,
                volume_id: id.clone(),
                path: abs.display().to_string(),
                format: wire::volume_format_code((*format).into()),
            };
            let job = c.export_volume(req).await.ask()?;
            return job_result(c, job, wait, out).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn target(format: Option<FormatArg>, tag: bool) -> pb::TargetSpec {
    pb::TargetSpec {
        format: format
            .map(|f| wire::volume_format_code(f.into()))
            .unwrap_or(0),
        tag: tag.then(|| pb::TagSpec {
            mutable: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}
