//! `cairn token`: the operator's token file, which agents and coordinators
//! read with `--tokens`. Only hashes are stored; a new token is shown once,
//! when it is made. Every change replaces the file whole (a new file, then
//! a rename), so that a server never reads half of one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use cairn_proto::auth::{self, Role, TokenEntry};
use clap::Subcommand;
use serde_json::json;

use crate::output::Out;

/// The default token file.
pub const DEFAULT_FILE: &str = "/etc/cairn/tokens";

/// Commands on a token file.
#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Make a token for an identity and print it (once: only its hash is
    /// kept).
    Add {
        /// The identity's name (disks it creates record it as owner).
        name: String,
        /// admin, service or user.
        #[arg(long, default_value = "user", value_parser = parse_role)]
        role: Role,
        /// The token file.
        #[arg(long, default_value = DEFAULT_FILE)]
        file: PathBuf,
    },
    /// The identities that have a token.
    List {
        /// The token file.
        #[arg(long, default_value = DEFAULT_FILE)]
        file: PathBuf,
    },
    /// Revoke an identity's token (servers stop admitting it at once).
    Remove {
        /// The identity's name.
        name: String,
        /// The token file.
        #[arg(long, default_value = DEFAULT_FILE)]
        file: PathBuf,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

/// The entries of `file` (none when it does not exist yet).
fn read(file: &Path) -> Result<Vec<TokenEntry>> {
    match std::fs::read_to_string(file) {
        Ok(text) => auth::parse_tokens(&text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("token file {}", file.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// Replace `file` with `entries`: a new 0600 file beside it, synced, then
/// renamed over it.
fn write(file: &Path, entries: &[TokenEntry]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}",
        file.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tokens"),
        std::process::id()
    ));
    let mut text = String::from("# Cairn bearer tokens: NAME ROLE sha256:HASH (cairn token add)\n");
    for e in entries {
        text.push_str(&e.line());
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let done = f
        .write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, file));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", file.display()));
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Run a token command.
pub fn run(c: &TokenCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    match c {
        TokenCmd::Add { name, role, file } => {
            auth::check_token_name(name).map_err(anyhow::Error::msg)?;
            let mut entries = read(file)?;
            if entries.iter().any(|e| e.name == *name) {
                bail!(
                    "{name} already has a token in {}; `cairn token remove {name}` first",
                    file.display()
                );
            }
            let token = auth::new_token();
            entries.push(TokenEntry {
                name: name.clone(),
                role: *role,
                hash: auth::hash_token(&token),
            });
            write(file, &entries)?;
            if out.json_mode() {
                out.json(&json!({"name": name, "role": role.as_str(), "token": token}))?;
            } else {
                writeln!(out, "{token}")?;
                eprintln!(
                    "token for {name} ({role}) added to {}; it is shown only now",
                    file.display()
                );
            }
        }
        TokenCmd::List { file } => {
            let entries = read(file)?;
            if out.json_mode() {
                let v: Vec<_> = entries
                    .iter()
                    .map(|e| json!({"name": e.name, "role": e.role.as_str()}))
                    .collect();
                out.json(&v)?;
            } else {
                let rows = entries
                    .iter()
                    .map(|e| vec![e.name.clone(), e.role.to_string()])
                    .collect();
                out.table(&["NAME", "ROLE"], rows)?;
            }
        }
        TokenCmd::Remove { name, file } => {
            let mut entries = read(file)?;
            let before = entries.len();
            entries.retain(|e| e.name != *name);
            if entries.len() == before {
                bail!("{name} has no token in {}", file.display());
            }
            write(file, &entries)?;
            if out.json_mode() {
                out.json(&json!({"name": name, "removed": true}))?;
            } else {
                writeln!(out, "removed the token of {name}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(c: TokenCmd) -> (Result<ExitCode>, String) {
        let mut buf = Vec::new();
        let r = run(&c, &mut Out::new(&mut buf, false));
        (r, String::from_utf8(buf).unwrap())
    }

    #[test]
    fn tokens_are_added_once_listed_and_revoked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("etc/tokens");
        let add = |name: &str, role| TokenCmd::Add {
            name: name.into(),
            role,
            file: file.clone(),
        };
        let (r, token) = cmd(add("alice", Role::User));
        r.unwrap();
        let token = token.trim().to_string();
        assert!(token.starts_with("cairn_"), "{token}");
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(&token), "the file holds only hashes");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // What a server reads admits the token.
        let tf = auth::TokenFile::load(&file).unwrap();
        assert_eq!(tf.lookup(&token).unwrap().name, "alice");
        cmd(add("ops", Role::Admin)).0.unwrap();
        let e = cmd(add("alice", Role::Admin)).0.unwrap_err();
        assert!(e.to_string().contains("already has a token"), "{e}");
        assert!(cmd(add("a:b", Role::User)).0.is_err());
        let (_, list) = cmd(TokenCmd::List { file: file.clone() });
        assert!(list.contains("alice") && list.contains("admin"), "{list}");
        let rm = |n: &str| TokenCmd::Remove {
            name: n.into(),
            file: file.clone(),
        };
        cmd(rm("alice")).0.unwrap();
        assert!(tf.lookup(&token).is_err(), "revoked at once");
        assert!(cmd(rm("alice")).0.is_err());
    }
}
