//! `cairn disk`: disks through the coordinator.

use std::io::Write;
use std::process::ExitCode;

use crate::connect::Coord;
use anyhow::Result;
use cairn_domain::Allocation;
use cairn_proto::convert as wire;
use cairn_proto::coordinator as pb;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::args::{parse_size, rid, FormatArg, Wait};
use crate::connect::Ask;
use crate::coord::{long, outcome};
use crate::output::{human_bytes, Out};

/// Disk commands.
#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Create a disk.
    Create {
        /// Virtual size, e.g. 20G (with --from-image: at least the
        /// image's, which is the default).
        #[arg(long, value_parser = parse_size, required_unless_present = "from_image")]
        size: Option<u64>,
        #[arg(long, value_enum, default_value = "raw", conflicts_with = "from_image")]
        /// The format.
        format: FormatArg,
        /// Make it from an image (an id, a name or an id prefix): a thin
        /// qcow2 layer on the image, on the image's domain unless --domain
        /// names another (the image is then copied there once, into the
        /// domain's image cache).
        #[arg(long, value_name = "IMAGE", conflicts_with = "preallocate")]
        from_image: Option<String>,
        /// A name for people (not unique).
        #[arg(long, default_value = "")]
        name: String,
        /// Allocate every block now.
        #[arg(long)]
        preallocate: bool,
        /// Zero (or discard) its data when it is deleted, before its
        /// extents are freed.
        #[arg(long)]
        wipe_after_delete: bool,
        #[arg(long, default_value = "")]
        /// Free text shown with it.
        description: String,
        /// Print only the new disk's id.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List disks (of --domain, or of every domain).
    List,
    /// Show a disk's chain and snapshots.
    Show {
        /// The disk.
        id: String,
    },
    /// Snapshot a disk.
    Snapshot {
        /// The disk.
        id: String,
        #[arg(long, default_value = "")]
        /// Free text shown with it.
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
        /// A name for people (not unique).
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
        #[allow(missing_docs)]
        wait: Wait,
    },
    /// Delete a snapshot by merging it into the chain.
    DeleteSnapshot {
        /// The snapshot.
        snapshot: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        wait: Wait,
    },
    /// Delete a disk (and what only it references).
    Delete {
        /// The disk.
        id: String,
    },
    /// Copy a disk to another domain.
    Copy {
        /// The disk.
        id: String,
        /// Target domain (name or id).
        #[arg(long)]
        to: String,
        #[arg(long, value_enum)]
        /// The format (default: the source's).
        format: Option<FormatArg>,
        #[arg(long)]
        /// Allocate every block now.
        preallocate: bool,
        #[command(flatten)]
        #[allow(missing_docs)]
        wait: Wait,
    },
    /// Move a disk to another domain (copy, then delete the source).
    Move {
        /// The disk.
        id: String,
        /// Target domain (name or id).
        #[arg(long)]
        to: String,
        #[arg(long, value_enum)]
        /// The format (default: the source's).
        format: Option<FormatArg>,
        #[command(flatten)]
        #[allow(missing_docs)]
        wait: Wait,
    },
    /// Grow a disk.
    Extend {
        /// The disk.
        id: String,
        /// New virtual size, e.g. 40G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Rewrite a disk in another format (it keeps its id).
    Convert {
        /// The disk.
        id: String,
        #[arg(long, value_enum)]
        /// The format.
        format: FormatArg,
        #[arg(long)]
        /// Drop the disk's snapshots (a conversion cannot keep them; without
        /// this a disk with snapshots is refused).
        flatten: bool,
        #[arg(long)]
        /// Allocate every block now.
        preallocate: bool,
        #[command(flatten)]
        #[allow(missing_docs)]
        wait: Wait,
    },
}

fn pf(f: Option<FormatArg>) -> i32 {
    f.map(|f| wire::disk_format_code(f.into())).unwrap_or(0)
}

fn pa(pre: bool) -> i32 {
    wire::disk_allocation_code(if pre {
        Allocation::Preallocated
    } else {
        Allocation::Sparse
    })
}

/// A disk format's name (`-` for none this version knows).
pub fn fmt(v: i32) -> &'static str {
    match wire::disk_format("format", v) {
        Ok(Some(f)) => f.as_str(),
        _ => "-",
    }
}

/// A disk as JSON.
pub fn disk_json(d: &pb::Disk) -> Value {
    json!({
        "id": d.id, "name": d.name, "domain": d.domain, "domain_name": d.domain_name,
        "size": d.size, "format": fmt(d.format), "state": d.state, "ctime": d.ctime,
        "owner": if d.owner.is_empty() { Value::Null } else { d.owner.clone().into() },
        "wipe_after_delete": d.wipe_after_delete,
        "parent_disk": if d.parent_disk.is_empty() { Value::Null } else { d.parent_disk.clone().into() },
        "image": if d.image_id.is_empty() { Value::Null } else { d.image_id.clone().into() },
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

/// Run a disk command.
pub async fn run(c: &mut Coord, d: &str, cmd: &DiskCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    let j = out.json_mode();
    let d = d.to_string();
    match cmd {
        DiskCmd::Create {
            size,
            format,
            from_image,
            name,
            preallocate,
            wipe_after_delete,
            description,
            quiet,
        } => {
            let req = pb::CreateDiskRequest {
                request_id: rid(),
                domain: d,
                name: name.clone(),
                format: if from_image.is_some() {
                    0
                } else {
                    pf(Some(*format))
                },
                size: size.unwrap_or(0),
                allocation: pa(*preallocate),
                description: description.clone(),
                wipe_after_delete: *wipe_after_delete,
                from_image: from_image.clone().unwrap_or_default(),
            };
            let x = c.create_disk(req).await.ask()?;
            let id = x.disk.as_ref().map(|d| d.id.clone()).unwrap_or_default();
            outcome(&x, out, quiet.then_some(id.as_str()))
        }
        DiskCmd::List => {
            let r = c
                .list_disks(pb::ListDisksRequest { domain: d })
                .await
                .ask()?;
            let header = [
                "DISK",
                "NAME",
                "DOMAIN",
                "SIZE",
                "FORMAT",
                "LAYERS",
                "SNAPSHOTS",
                "OWNER",
            ];
            out.list(&r.disks, disk_json, &header, |x| {
                vec![
                    x.id.clone(),
                    crate::output::or_dash(&x.name),
                    x.domain_name.clone(),
                    human_bytes(x.size),
                    fmt(x.format).into(),
                    x.chain.len().to_string(),
                    x.snapshots.len().to_string(),
                    crate::output::or_dash(&x.owner),
                ]
            })?;
            Ok(ExitCode::SUCCESS)
        }
        DiskCmd::Show { id } => {
            let req = pb::GetDiskRequest {
                domain: d,
                disk_id: id.clone(),
            };
            let x = c.get_disk(req).await.ask()?;
            if j {
                out.json(&disk_json(&x))?;
            } else {
                writeln!(
                    out,
                    "disk {} {:?} on {}: {} {}",
                    x.id,
                    x.name,
                    x.domain_name,
                    human_bytes(x.size),
                    fmt(x.format)
                )?;
                if !x.image_id.is_empty() {
                    writeln!(out, "made from image {}", x.image_id)?;
                }
                out.table(
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
                                crate::output::or_dash(&l.snapshot_id),
                            ]
                        })
                        .collect(),
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DiskCmd::Snapshot {
            id,
            description,
            quiet,
        } => {
            let req = pb::SnapshotDiskRequest {
                request_id: rid(),
                domain: d,
                disk_id: id.clone(),
                description: description.clone(),
            };
            let x = c.snapshot_disk(req).await.ask()?;
            let s = x.snapshot_id.clone();
            outcome(&x, out, quiet.then_some(s.as_str()))
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
            let req = pb::CloneDiskRequest {
                request_id: rid(),
                domain: d,
                source_id: source.clone(),
                name: name.clone(),
                full: *full,
                format: pf(*format),
                allocation: if *full { pa(*preallocate) } else { 0 },
            };
            let x = c.clone_disk(req).await.ask()?;
            long(c, x, wait, out, *quiet).await
        }
        DiskCmd::DeleteSnapshot { snapshot, wait } => {
            let req = pb::DeleteSnapshotRequest {
                request_id: rid(),
                domain: d,
                snapshot_id: snapshot.clone(),
            };
            let x = c.delete_snapshot(req).await.ask()?;
            long(c, x, wait, out, false).await
        }
        DiskCmd::Delete { id } => {
            let req = pb::DeleteDiskRequest {
                request_id: rid(),
                domain: d,
                disk_id: id.clone(),
            };
            let x = c.delete_disk(req).await.ask()?;
            outcome(&x, out, None)
        }
        DiskCmd::Copy {
            id,
            to,
            format,
            preallocate,
            wait,
        } => {
            let req = pb::CopyDiskRequest {
                request_id: rid(),
                domain: d,
                disk_id: id.clone(),
                target_domain: to.clone(),
                r#move: false,
                format: pf(*format),
                allocation: pa(*preallocate),
            };
            let x = c.copy_disk(req).await.ask()?;
            long(c, x, wait, out, false).await
        }
        DiskCmd::Move {
            id,
            to,
            format,
            wait,
        } => {
            let req = pb::CopyDiskRequest {
                request_id: rid(),
                domain: d,
                disk_id: id.clone(),
                target_domain: to.clone(),
                r#move: true,
                format: pf(*format),
                allocation: 0,
            };
            let x = c.copy_disk(req).await.ask()?;
            long(c, x, wait, out, false).await
        }
        DiskCmd::Extend { id, size } => {
            let req = pb::ExtendDiskRequest {
                request_id: rid(),
                domain: d,
                disk_id: id.clone(),
                size: *size,
            };
            let x = c.extend_disk(req).await.ask()?;
            outcome(&x, out, None)
        }
        DiskCmd::Convert {
            id,
            format,
            flatten,
            preallocate,
            wait,
        } => {
            let req = pb::ConvertDiskRequest {
                request_id: rid(),
                domain: d,
                disk_id: id.clone(),
                format: pf(Some(*format)),
                allocation: pa(*preallocate),
                flatten: *flatten,
            };
            let x = c.convert_disk(req).await.ask()?;
            long(c, x, wait, out, false).await
        }
    }
}
