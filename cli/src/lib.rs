//! `cairn`, the administrator's command-line tool, as a library: [`run`]
//! parses the arguments, runs the command and writes its output to the
//! writer it is given (errors go to standard error, or into the JSON with
//! `--json`). One module per command family: [`domain`] (offline tools),
//! [`volume`], [`tag`] and [`agent`] (the local agent), [`disk`] and
//! [`coord`] (the coordinator), [`file`] and [`image`] (the catalog), [`token`] (the token file), [`up`];
//! [`output`], [`connect`] and
//! [`args`] are what they share.
//!
//! Exit codes: 0 success; 1 the agent or coordinator refused or failed the
//! operation (the error's stable code is printed), a job did not succeed,
//! or `domain check` / `volume check` found problems; 2 the command could
//! not run (bad arguments, agent unreachable, unreadable device, damaged
//! domain).
#![warn(missing_docs)]

pub mod agent;
pub mod args;
pub mod connect;
pub mod coord;
pub mod disk;
pub mod domain;
pub mod file;
pub mod image;
pub mod image_store;
pub mod output;
pub mod tag;
pub mod token;
pub mod up;
pub mod volume;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

use crate::connect::Refused;
use crate::output::Out;

/// The command line.
#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn: cluster-locked volumes on shared block storage"
)]
pub struct Cli {
    /// Directory of the single-machine lock files (shared by every Cairn
    /// process on this host).
    #[arg(
        long,
        global = true,
        env = "CAIRN_LOCK_DIR",
        default_value = "/run/cairn/locks"
    )]
    pub lock_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    conn: connect::Conn,
    #[command(flatten)]
    coord: connect::CoordConn,
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
    Domain(domain::DomainCmd),
    /// The bearer tokens servers admit (`--tokens` of agents and
    /// coordinators): add, list, remove.
    #[command(subcommand)]
    Token(token::TokenCmd),
    #[command(flatten)]
    Agent(agent::AgentCmd),
    #[command(flatten)]
    Coord(coord::CoordCmd),
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Run `cairn` with `args` (the first is the program name), writing its
/// output to `out`.
pub fn run<I, T>(args: I, out: &mut dyn Write) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            // --help and --version are answers; anything else a usage error.
            let code = e.exit_code();
            if e.use_stderr() {
                eprint!("{}", e.render().ansi());
            } else {
                let _ = write!(out, "{}", e.render());
            }
            return ExitCode::from(code as u8);
        }
    };
    // One set of client TLS flags for both servers.
    cli.coord.tls = cli.conn.tls.clone();
    cli.coord.token = cli.conn.token.clone();
    let json = cli.json;
    let mut o = Out::new(out, json);
    match dispatch(&cli, &mut o) {
        Ok(code) => code,
        Err(e) => {
            let refused = e.downcast_ref::<Refused>();
            if json {
                let code = match refused {
                    Some(r) => r.reason.as_str(),
                    None => e
                        .downcast_ref::<cairn_domain::DomainError>()
                        .map(|d| d.code().as_str())
                        .unwrap_or("error"),
                };
                let _ = o.json(&serde_json::json!({"error": format!("{e:#}"), "code": code}));
            } else {
                eprintln!("cairn: {e:#}");
            }
            // The agent said no: 1. We could not even ask: 2.
            ExitCode::from(if refused.is_some() { 1 } else { 2 })
        }
    }
}

fn dispatch(cli: &Cli, out: &mut Out<'_>) -> Result<ExitCode> {
    match &cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "cairn", out);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Domain(c) => domain::run(&cli.lock_dir, c, out),
        Cmd::Token(c) => token::run(c, out),
        Cmd::Agent(c) => agent::run(&cli.conn, c, out),
        Cmd::Coord(c) => coord::run(&cli.coord, &cli.conn, c, out),
        Cmd::Up(a) => up::up(
            a,
            &cli.conn.socket,
            Path::new(&cli.coord.coordinator),
            &cli.lock_dir,
        )
        .map(|_| ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    // Regression: a positional named `key` collided with the global
    // `--key` (a path), and parsing panicked.
    #[test]
    fn image_data_commands_parse_beside_the_global_tls_options() {
        use clap::Parser;
        for args in [
            &["cairn", "image", "data", "set", "i", "k", "f"][..],
            &["cairn", "image", "data", "get", "i", "k"],
            &["cairn", "image", "data", "remove", "i", "k"],
            &["cairn", "--key", "/k.pem", "image", "data", "get", "i", "k"],
        ] {
            Cli::try_parse_from(args).unwrap();
        }
    }

    #[test]
    fn help_goes_to_the_writer_and_bad_arguments_exit_2() {
        let mut buf = Vec::new();
        let code = run(["cairn", "--help"], &mut buf);
        assert_eq!(code, ExitCode::SUCCESS);
        assert!(String::from_utf8(buf).unwrap().contains("Usage: cairn"));
        let mut buf = Vec::new();
        assert_eq!(
            run(["cairn", "no-such-command"], &mut buf),
            ExitCode::from(2)
        );
        let mut buf = Vec::new();
        assert_eq!(
            run(["cairn", "completions", "bash"], &mut buf),
            ExitCode::SUCCESS
        );
        assert!(String::from_utf8(buf).unwrap().contains("_cairn"));
    }

    #[test]
    fn an_unreachable_agent_is_exit_2_with_json_naming_it() {
        let dir = std::env::temp_dir().join(format!("cairn-cli-{}", std::process::id()));
        let sock = dir.join("none.sock");
        let mut buf = Vec::new();
        let code = run(
            [
                "cairn",
                "--json",
                "--socket",
                sock.to_str().unwrap(),
                "domains",
            ],
            &mut buf,
        );
        assert_eq!(code, ExitCode::from(2));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["code"], "error");
        assert!(v["error"]
            .as_str()
            .unwrap()
            .contains("cannot reach the agent"));
    }
}
