//! `cairn`: the administrator's command-line tool.
//!
//! Exit codes: 0 success; 1 the agent refused or failed the operation (the
//! error's stable code is printed), a job did not succeed, or `domain
//! check` / `volume check` found problems; 2 the command could not run
//! (bad arguments, agent unreachable, unreadable device, damaged domain).

mod agent_cmd;
mod disk_cmd;
mod up;

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
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn: cluster-locked volumes on shared block storage"
)]
struct Cli {
    /// Directory of the single-machine lock files (shared by every Cairn
    /// process on this host).
    #[arg(
        long,
        global = true,
        env = "CAIRN_LOCK_DIR",
        default_value = "/run/cairn/locks"
    )]
    lock_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    conn: agent_cmd::Conn,
    #[command(flatten)]
    coord: disk_cmd::CoordConn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a single-host Cairn here: a domain in a sparse file, the
    /// single-machine lock service and the agent (runs until Ctrl-C).
    Up(up::UpArgs),
    /// Work on a storage domain directly (offline tools).
    #[command(subcommand)]
    Domain(DomainCmd),
    #[command(flatten)]
    Agent(agent_cmd::AgentCmd),
    #[command(flatten)]
    Coord(disk_cmd::CoordCmd),
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum DomainCmd {
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

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..].to_ascii_lowercase().as_str() {
                "k" | "kib" | "kb" => 1u64 << 10,
                "m" | "mib" | "mb" => 1 << 20,
                "g" | "gib" | "gb" => 1 << 30,
                "t" | "tib" | "tb" => 1 << 40,
                "b" => 1,
                u => return Err(format!("unknown unit {u:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 20G"))?;
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is zero or too large"))
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

fn locks(cli: &Cli) -> Result<Arc<dyn LockService>> {
    Ok(Arc::new(
        LocalLockService::new(&cli.lock_dir).with_context(|| {
            format!(
                "cannot use lock directory {} (set --lock-dir or CAIRN_LOCK_DIR)",
                cli.lock_dir.display()
            )
        })?,
    ))
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn run(cli: &Cli) -> Result<ExitCode> {
    match &cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "cairn", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Domain(c) => domain(cli, c),
        Cmd::Agent(c) => agent_cmd::run(&cli.conn, cli.json, c),
        Cmd::Coord(c) => disk_cmd::run(&cli.coord, &cli.conn, cli.json, c),
        Cmd::Up(a) => up::up(
            a,
            &cli.conn.socket,
            Path::new(&cli.coord.coordinator),
            &cli.lock_dir,
        )
        .map(|_| ExitCode::SUCCESS),
    }
}

fn domain(cli: &Cli, c: &DomainCmd) -> Result<ExitCode> {
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
            force,
        } => {
            if let Some(size) = size {
                let f = FsOpen::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
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
            };
            let g = format(
                dev.as_ref(),
                &params,
                *force,
                locks(cli)?.as_ref(),
                &SystemClock,
            )?;
            if cli.json {
                print_json(&g)?;
            } else {
                println!(
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
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DomainCmd::Info { path } => {
            let dev = open_dev(path, false)?;
            let d = Domain::open(
                dev,
                locks(cli)?,
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
            if cli.json {
                print_json(&serde_json::json!({
                    "geometry": d.geometry(),
                    "superblocks": d.superblock_status(),
                    "usage": usage,
                    "slots": slots,
                }))?;
            } else {
                let g = d.geometry();
                println!("domain     {} ({})", g.name, g.domain_id);
                println!(
                    "size       {} ({} bytes)",
                    human_bytes(g.device_size),
                    g.device_size
                );
                println!(
                    "extents    {} used of {} ({} each, data from offset {:#x})",
                    usage.extents_used,
                    usage.extents_total,
                    human_bytes(g.extent_size),
                    g.data_off
                );
                println!(
                    "volumes    {} of {} slots",
                    usage.volumes, usage.volume_slots
                );
                println!("tags       {} of {} slots", usage.tags, usage.tag_slots);
                println!(
                    "hosts      {} slots, journal {} each",
                    g.host_slots,
                    human_bytes(g.journal_size)
                );
                println!(
                    "user data  {} per tag",
                    human_bytes(g.user_data_size as u64)
                );
                let sb = d.superblock_status();
                if let Some(p) = &sb.primary {
                    println!("WARNING    primary superblock: {p}");
                }
                if let Some(b) = &sb.backup {
                    println!("WARNING    backup superblock: {b}");
                }
                for s in slots {
                    println!(
                        "slot {:<5} {:<7} {} {}",
                        s["slot"],
                        s["state"].as_str().unwrap_or(""),
                        s["host_name"].as_str().unwrap_or(""),
                        s["host_id"]
                            .as_str()
                            .unwrap_or(s["error"].as_str().unwrap_or(""))
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DomainCmd::Dump { path } => {
            let dev = open_dev(path, false)?;
            let d = dump(dev.as_ref())?;
            if cli.json {
                print_json(&d)?;
            } else {
                let g = &d.geometry;
                println!("domain {} ({})", g.name, g.domain_id);
                println!("geometry {}", serde_json::to_string(g)?);
                for s in &d.slots {
                    if s.state == "never" && s.journal.is_empty() {
                        continue;
                    }
                    println!(
                        "slot {} {} {}",
                        s.index,
                        s.state,
                        s.header
                            .as_ref()
                            .map(|h| h.host_name.as_str())
                            .unwrap_or("")
                    );
                    if let Some(e) = &s.journal_error {
                        println!("  journal error: {e}");
                    }
                    for r in &s.journal {
                        println!(
                            "  #{:<6} {:<6} page {:<5} {}{} {}",
                            r.seq,
                            r.kind,
                            r.page,
                            r.summary,
                            if r.open { " [OPEN]" } else { "" },
                            r.actions.join("; ")
                        );
                    }
                }
                for v in &d.volumes {
                    println!(
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
                    );
                }
                for t in &d.tags {
                    let t2 = &t.tag;
                    println!(
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
                    );
                }
                for f in &d.damaged {
                    println!("DAMAGE {}: {}", f.location, f.detail);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DomainCmd::Check { path } => {
            let report = match open_dev(path, false).and_then(|d| Ok(check(d.as_ref())?)) {
                Ok(r) => r,
                Err(e) => {
                    if cli.json {
                        print_json(&serde_json::json!({"error": format!("{e:#}")}))?;
                    } else {
                        eprintln!("cairn: cannot check {}: {e:#}", path.display());
                    }
                    return Ok(ExitCode::from(2));
                }
            };
            if cli.json {
                print_json(&report)?;
            } else {
                let show = |tag: &str, f: &Finding| {
                    let at = f.offset.map(|o| format!(" @{o:#x}")).unwrap_or_default();
                    println!("{tag} [{}] {}{at}: {}", f.code, f.location, f.detail);
                };
                for f in &report.findings {
                    show("FINDING", f);
                }
                for w in &report.warnings {
                    show("warning", w);
                }
                println!(
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
                );
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
                locks(cli)?,
                OpenOptions::new(HostIdentity::local()),
                *host_slot,
            )?;
            if cli.json {
                print_json(&serde_json::json!({"recovered": reports, "in_use": busy}))?;
            } else {
                if reports.is_empty() && busy.is_empty() {
                    println!("nothing to recover");
                }
                for r in &reports {
                    println!(
                        "host slot {}: {} intent(s) rolled forward {:?}, {} rolled back {:?}, {} torn record(s) discarded",
                        r.slot,
                        r.forward.len(),
                        r.forward,
                        r.back.len(),
                        r.back,
                        r.torn.len()
                    );
                }
                for s in &busy {
                    println!("host slot {s}: in use by a live host, skipped");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            let refused = e.downcast_ref::<agent_cmd::Refused>();
            if cli.json {
                let code = match refused {
                    Some(r) => r.reason.as_str(),
                    None => e
                        .downcast_ref::<cairn_domain::DomainError>()
                        .map(|d| d.code().as_str())
                        .unwrap_or("error"),
                };
                let _ = print_json(&serde_json::json!({"error": format!("{e:#}"), "code": code}));
            } else {
                eprintln!("cairn: {e:#}");
            }
            // The agent said no: 1. We could not even ask: 2.
            ExitCode::from(if refused.is_some() { 1 } else { 2 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
