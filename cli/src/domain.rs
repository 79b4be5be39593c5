//! `cairn domain`: the offline tools, straight on a device or file
//! (format, info, dump, check, recover).

use std::fs::OpenOptions as FsOpen;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use cairn_domain::check::{check, dump, Finding};
use cairn_domain::engine::read_superblocks;
use cairn_domain::io::{BlockDev, FileDev};
use cairn_domain::{
    format, Domain, FormatParams, HostIdentity, LocalLockService, LockService, OpenOptions,
    SystemClock,
};
use clap::Subcommand;

use crate::args::parse_size;
use crate::output::{human_bytes, Out};

/// Offline commands on a domain.
#[derive(Subcommand)]
pub enum DomainCmd {
    /// Format a block device or file as a new domain.
    Format {
        /// Block device or regular file.
        path: PathBuf,
        /// Domain name (1-64 bytes, no '/').
        #[arg(long)]
        name: String,
        /// Create or grow a regular file to this size first (e.g. 20G).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Extent size (power of two, at least 1M; default from device size).
        #[arg(long, value_parser = parse_size)]
        extent_size: Option<u64>,
        /// Host slots (default from device size).
        #[arg(long)]
        host_slots: Option<u32>,
        /// Volume metadata slots (default: one per extent, at most 1Mi).
        #[arg(long)]
        volume_slots: Option<u32>,
        /// Tag metadata slots (default: as many as volume slots).
        #[arg(long)]
        tag_slots: Option<u32>,
        /// User data bytes per tag (multiple of 4K; default 8K).
        #[arg(long, value_parser = parse_size)]
        user_data_size: Option<u64>,
        /// Journal bytes per host slot (default from device size).
        #[arg(long, value_parser = parse_size)]
        journal_size: Option<u64>,
        /// Zero (or discard) every deleted volume's extents before they
        /// are freed, as VDSM's wipe-after-delete (for every disk of the
        /// domain; single disks can ask for it when they are created).
        #[arg(long)]
        wipe_after_delete: bool,
        /// Overwrite an existing domain (refused while a host has it open).
        #[arg(long)]
        force: bool,
    },
    /// Show a domain's identity, geometry, usage and host slots.
    Info {
        /// Block device or regular file.
        path: PathBuf,
    },
    /// Print every structure of a domain.
    Dump {
        /// Block device or regular file.
        path: PathBuf,
    },
    /// Verify every invariant; exit 0 clean, 1 with findings, 2 if it cannot check.
    Check {
        /// Block device or regular file.
        path: PathBuf,
    },
    /// Replay the journals of dead hosts (one slot, or all of them).
    Recover {
        /// Block device or regular file.
        path: PathBuf,
        /// Only this host slot.
        #[arg(long)]
        host_slot: Option<u32>,
    },
}

fn open_dev(path: &Path, writable: bool) -> Result<Arc<dyn BlockDev>> {
    let dev = FileDev::open(path, writable).with_context(|| {
        format!(
            "cannot open {} {}",
            path.display(),
            if writable {
                "read-write"
            } else {
                "for reading"
            }
        )
    })?;
    Ok(Arc::new(dev))
}

fn locks(dir: &Path) -> Result<Arc<dyn LockService>> {
    Ok(Arc::new(LocalLockService::new(dir).with_context(|| {
        format!(
            "cannot use lock directory {} (set --lock-dir or CAIRN_LOCK_DIR)",
            dir.display()
        )
    })?))
}

/// Run a domain command.
pub fn run(lock_dir: &Path, c: &DomainCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    let json = out.json_mode();
    match c {
        DomainCmd::Format {
            path,
            name,
            size,
            extent_size,
            host_slots,
            volume_slots,
            tag_slots,
            user_data_size,
            journal_size,
            wipe_after_delete,
            force,
        } => {
            if let Some(size) = size {
                use std::os::unix::fs::OpenOptionsExt;
                // VM data: readable by its owner only.
                let f = FsOpen::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                let m = f.metadata()?;
                if !m.is_file() {
                    bail!(
                        "--size only applies to regular files; {} is not one",
                        path.display()
                    );
                }
                if m.len() < *size {
                    f.set_len(*size).with_context(|| {
                        format!("cannot grow {} to {size} bytes", path.display())
                    })?;
                }
            } else if !path.exists() {
                bail!(
                    "{} does not exist (pass --size to create a sparse file)",
                    path.display()
                );
            }
            warn_if_world_readable(path);
            let dev = open_dev(path, true)?;
            let params = FormatParams {
                name: name.clone(),
                extent_size: *extent_size,
                host_slots: *host_slots,
                volume_slots: *volume_slots,
                tag_slots: *tag_slots,
                user_data_size: user_data_size
                    .map(|u| u32::try_from(u).map_err(|_| anyhow!("--user-data-size is too large")))
                    .transpose()?,
                journal_size: *journal_size,
                wipe_after_delete: *wipe_after_delete,
            };
            let g = format(
                dev.as_ref(),
                &params,
                *force,
                locks(lock_dir)?.as_ref(),
                &SystemClock,
            )?;
            if json {
                out.json(&g)?;
            } else {
                writeln!(
                    out,
                    "formatted {} as domain {:?} ({})\n  {} extents of {}, {} host slots, {} volume slots, {} tag slots, metadata {}",
                    path.display(),
                    g.name,
                    g.domain_id,
                    g.extent_count,
                    human_bytes(g.extent_size),
                    g.host_slots,
                    g.volume_slots,
                    g.tag_slots,
                    human_bytes(g.metadata_bytes())
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DomainCmd::Info { path } => {
            let dev = open_dev(path, false)?;
            let d = Domain::open(
                dev,
                locks(lock_dir)?,
                OpenOptions::read_only(HostIdentity::local()),
            )?;
            let usage = d.usage()?;
            let slots: Vec<serde_json::Value> = d
                .read_slot_headers()?
                .into_iter()
                .enumerate()
                .filter_map(|(i, h)| match h {
                    Ok(h) if h.state == cairn_domain::layout::SlotState::Never => None,
                    Ok(h) => Some(serde_json::json!({
                        "slot": i,
                        "state": if h.state == cairn_domain::layout::SlotState::Active { "active" } else { "free" },
                        "host_id": h.host_id,
                        "host_name": h.host_name,
                        "claimed_at": h.claimed_at,
                    })),
                    Err(e) => Some(serde_json::json!({"slot": i, "state": "damaged", "error": e.to_string()})),
                })
                .collect();
            if json {
                out.json(&serde_json::json!({
                    "geometry": d.geometry(),
                    "superblocks": d.superblock_status(),
                    "usage": usage,
                    "slots": slots,
                }))?;
            } else {
                let g = d.geometry();
                writeln!(out, "domain     {} ({})", g.name, g.domain_id)?;
                writeln!(
                    out,
                    "size       {} ({} bytes)",
                    human_bytes(g.device_size),
                    g.device_size
                )?;
                writeln!(
                    out,
                    "extents    {} used of {} ({} each, data from offset {:#x})",
                    usage.extents_used,
                    usage.extents_total,
                    human_bytes(g.extent_size),
                    g.data_off
                )?;
                if g.compat & cairn_domain::layout::COMPAT_WIPE_AFTER_DELETE != 0 {
                    writeln!(
                        out,
                        "wipe       every deleted volume is zeroed before it is freed"
                    )?;
                }
                writeln!(
                    out,
                    "volumes    {} of {} slots",
                    usage.volumes, usage.volume_slots
                )?;
                writeln!(
                    out,
                    "tags       {} of {} slots",
                    usage.tags, usage.tag_slots
                )?;
                writeln!(
                    out,
                    "hosts      {} slots, journal {} each",
                    g.host_slots,
                    human_bytes(g.journal_size)
                )?;
                writeln!(
                    out,
                    "user data  {} per tag",
                    human_bytes(g.user_data_size as u64)
                )?;
                let sb = d.superblock_status();
                if let Some(p) = &sb.primary {
                    writeln!(out, "WARNING    primary superblock: {p}")?;
                }
                if let Some(b) = &sb.backup {
                    writeln!(out, "WARNING    backup superblock: {b}")?;
                }
                for s in slots {
                    writeln!(
                        out,
                        "slot {:<5} {:<7} {} {}",
                        s["slot"],
                        s["state"].as_str().unwrap_or(""),
                        s["host_name"].as_str().unwrap_or(""),
                        s["host_id"]
                            .as_str()
                            .unwrap_or(s["error"].as_str().unwrap_or(""))
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DomainCmd::Dump { path } => {
            let dev = open_dev(path, false)?;
            let d = dump(dev.as_ref())?;
            if json {
                out.json(&d)?;
            } else {
                let g = &d.geometry;
                writeln!(out, "domain {} ({})", g.name, g.domain_id)?;
                writeln!(out, "geometry {}", serde_json::to_string(g)?)?;
                for s in &d.slots {
                    if s.state == "never" && s.journal.is_empty() {
                        continue;
                    }
                    writeln!(
                        out,
                        "slot {} {} {}",
                        s.index,
                        s.state,
                        s.header
                            .as_ref()
                            .map(|h| h.host_name.as_str())
                            .unwrap_or("")
                    )?;
                    if let Some(e) = &s.journal_error {
                        writeln!(out, "  journal error: {e}")?;
                    }
                    for r in &s.journal {
                        writeln!(
                            out,
                            "  #{:<6} {:<6} page {:<5} {}{} {}",
                            r.seq,
                            r.kind,
                            r.page,
                            r.summary,
                            if r.open { " [OPEN]" } else { "" },
                            r.actions.join("; ")
                        )?;
                    }
                }
                for v in &d.volumes {
                    writeln!(
                        out,
                        "volume {} {} {} cap={} run={}+{} parent={} tags={} gen={} token={} {:?}",
                        v.id,
                        v.format,
                        v.legality,
                        v.capacity,
                        v.extent_start,
                        v.extent_count,
                        v.parent
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "-".into()),
                        v.tag_refs,
                        v.generation,
                        v.token,
                        v.description
                    )?;
                }
                for t in &d.tags {
                    let t2 = &t.tag;
                    writeln!(
                        out,
                        "tag {} -> {} {} {} {} children={} gen={} token={} user-data={:?}",
                        t2.id,
                        t2.volume,
                        t2.tag_type,
                        t2.state,
                        if t2.mutable { "mutable" } else { "immutable" },
                        t2.child_refs,
                        t2.generation,
                        t2.token,
                        t.user_data_items
                    )?;
                }
                for f in &d.damaged {
                    writeln!(out, "DAMAGE {}: {}", f.location, f.detail)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DomainCmd::Check { path } => {
            let report = match open_dev(path, false).and_then(|d| Ok(check(d.as_ref())?)) {
                Ok(r) => r,
                Err(e) => {
                    if json {
                        out.json(&serde_json::json!({"error": format!("{e:#}")}))?;
                    } else {
                        eprintln!("cairn: cannot check {}: {e:#}", path.display());
                    }
                    return Ok(ExitCode::from(2));
                }
            };
            if json {
                out.json(&report)?;
            } else {
                let mut show = |tag: &str, f: &Finding| {
                    let at = f.offset.map(|o| format!(" @{o:#x}")).unwrap_or_default();
                    writeln!(out, "{tag} [{}] {}{at}: {}", f.code, f.location, f.detail)
                };
                for f in &report.findings {
                    show("FINDING", f)?;
                }
                for w in &report.warnings {
                    show("warning", w)?;
                }
                writeln!(
                    out,
                    "{} ({}): {} volumes, {} tags, {} extents used, {} open intents: {}",
                    report.name,
                    report.domain_id,
                    report.volumes,
                    report.tags,
                    report.extents_used,
                    report.open_intents,
                    if report.is_clean() {
                        "clean".to_string()
                    } else {
                        format!("{} finding(s)", report.findings.len())
                    }
                )?;
            }
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        DomainCmd::Recover { path, host_slot } => {
            let dev = open_dev(path, true)?;
            // Fail early with a clear message if this is not a domain.
            read_superblocks(dev.as_ref())?;
            let (reports, busy) = Domain::recover_offline(
                dev,
                locks(lock_dir)?,
                OpenOptions::new(HostIdentity::local()),
                *host_slot,
            )?;
            if json {
                out.json(&serde_json::json!({"recovered": reports, "in_use": busy}))?;
            } else {
                if reports.is_empty() && busy.is_empty() {
                    writeln!(out, "nothing to recover")?;
                }
                for r in &reports {
                    writeln!(
                        out,
                        "host slot {}: {} intent(s) rolled forward {:?}, {} rolled back {:?}, {} torn record(s) discarded",
                        r.slot,
                        r.forward.len(),
                        r.forward,
                        r.back.len(),
                        r.back,
                        r.torn.len()
                    )?;
                }
                for s in &busy {
                    writeln!(out, "host slot {s}: in use by a live host, skipped")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A domain holds VM data: say so when every user of the host can read it
/// (nothing is refused: the device's permissions are the operator's).
pub(crate) fn warn_if_world_readable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            eprintln!(
                "warning: {} is readable by every user of this host (mode {mode:04o}); it holds VM data: chmod 600 it",
                path.display()
            );
        }
    }
}
