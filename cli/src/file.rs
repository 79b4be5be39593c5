//! `cairn file`: the catalog's files, as kamaki's `file` commands work on
//! Pithos+ objects. A location is `DOMAIN:PATH` (or
//! `cairn://OWNER/DOMAIN/PATH`); `upload` also takes a bare `DOMAIN` or a
//! `DOMAIN:DIR/` and puts the local file's name after it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use cairn_proto::coordinator as pb;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::args::rid;
use crate::connect::{refused, Ask, Coord};
use crate::output::{utc, Out};

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;

/// File commands.
#[derive(Subcommand, Debug)]
pub enum FileCmd {
    /// Upload a local file (or, with -R, a directory tree) to a location.
    Upload {
        /// Upload a directory and everything beneath it.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// The local file or directory.
        local: PathBuf,
        /// `DOMAIN` (the local name), `DOMAIN:DIR/` or `DOMAIN:PATH`.
        location: String,
    },
    /// List the files under a location prefix (`DOMAIN:` for all).
    List {
        /// `DOMAIN:PREFIX`.
        location: String,
    },
    /// Write a file's bytes to standard output.
    Cat {
        /// The version to read (default: the latest).
        #[arg(long)]
        object_version: Option<u64>,
        /// The file.
        location: String,
    },
    /// Download a file to a local path (default: its name, here).
    Download {
        /// The version to read (default: the latest).
        #[arg(long)]
        object_version: Option<u64>,
        /// The file.
        location: String,
        /// Where to write it.
        local: Option<PathBuf>,
    },
    /// Every version of a file and when it was made.
    Versions {
        /// The file.
        location: String,
    },
    /// Delete a file: every version, or the one named.
    Delete {
        /// Only this version.
        #[arg(long)]
        object_version: Option<u64>,
        /// The file.
        location: String,
    },
}

/// Sizes as kamaki lists them: `983MB`, `2.2GB`.
pub fn short_size(n: u64) -> String {
    const U: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v >= 10.0 {
        format!("{}{}", v.round() as u64, U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}

/// Where an upload of `local` to `location` goes: a bare domain or a
/// location ending in `/` takes the local file's name.
pub fn upload_target(location: &str, local: &Path) -> Result<String> {
    let name = local
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", local.display()))?;
    if location.starts_with("cairn://") {
        return Ok(if location.ends_with('/') {
            format!("{location}{name}")
        } else {
            location.to_string()
        });
    }
    Ok(match location.split_once(':') {
        None => format!("{location}:{name}"),
        Some((_, "")) => format!("{location}{name}"),
        Some((_, p)) if p.ends_with('/') => format!("{location}{name}"),
        Some(_) => location.to_string(),
    })
}

/// The location below `base` (a location) for a relative path.
fn below(base: &str, rel: &str) -> String {
    format!("{}/{rel}", base.trim_end_matches('/'))
}

fn file_json(f: &pb::File) -> Value {
    json!({
        "location": f.location, "domain": f.domain, "path": f.path, "owner": f.owner,
        "version": f.version, "size": f.size, "sha256": f.sha256,
        "created": utc(f.created), "directory": f.directory,
        "image": if f.image.is_empty() { Value::Null } else { f.image.clone().into() },
    })
}

/// Run a file command.
pub async fn run(c: &mut Coord, cmd: &FileCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    match cmd {
        FileCmd::Upload {
            recursive,
            local,
            location,
        } => {
            let target = upload_target(location, local)?;
            let meta = std::fs::symlink_metadata(local)
                .with_context(|| format!("cannot read {}", local.display()))?;
            let abs = std::path::absolute(local)?;
            if meta.is_dir() {
                if !recursive {
                    bail!("{} is a directory (upload it with -R)", local.display());
                }
                let files = upload_tree(c, &abs, &target, out).await?;
                if out.json_mode() {
                    out.json(&files.iter().map(file_json).collect::<Vec<_>>())?;
                }
            } else {
                let file = upload_one(c, &abs, &target, out).await?;
                if out.json_mode() {
                    out.json(&file_json(&file))?;
                }
            }
            if !out.json_mode() {
                writeln!(out, "Done")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        FileCmd::List { location } => {
            let r = c
                .list_files(pb::ListFilesRequest {
                    location: location.clone(),
                })
                .await
                .ask()?;
            if out.json_mode() {
                out.json(&r.files.iter().map(file_json).collect::<Vec<_>>())?;
            } else {
                for f in &r.files {
                    if f.directory {
                        writeln!(out, "{:<8}{}/", "D", f.path)?;
                    } else {
                        writeln!(out, "{:<8}{}", short_size(f.size), f.path)?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FileCmd::Versions { location } => {
            let r = c
                .file_versions(pb::FileVersionsRequest {
                    location: location.clone(),
                })
                .await
                .ask()?;
            if out.json_mode() {
                out.json(&r.files.iter().map(file_json).collect::<Vec<_>>())?;
            } else {
                for f in &r.files {
                    writeln!(out, "{}\n created: {}", f.version, utc(f.created))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FileCmd::Cat {
            object_version,
            location,
        } => {
            read_into(c, location, object_version.unwrap_or(0), out).await?;
            Ok(ExitCode::SUCCESS)
        }
        FileCmd::Download {
            object_version,
            location,
            local,
        } => {
            let name = location
                .rsplit(['/', ':'])
                .next()
                .filter(|n| !n.is_empty())
                .with_context(|| format!("{location} names no file"))?;
            let local = std::path::absolute(local.clone().unwrap_or_else(|| PathBuf::from(name)))?;
            writeln!(out, "Downloading {location} --> {}", local.display())?;
            // Into a new file beside the target, renamed over it when whole.
            let tmp = local.with_file_name(format!(
                ".{}.part-{}",
                local
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("download"),
                std::process::id()
            ));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let got = read_into(c, location, object_version.unwrap_or(0), &mut f).await;
            let got = got.and_then(|()| Ok(f.sync_all()?));
            if let Err(e) = got {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, &local)
                .with_context(|| format!("cannot write {}", local.display()))?;
            writeln!(out, "Done")?;
            Ok(ExitCode::SUCCESS)
        }
        FileCmd::Delete {
            object_version,
            location,
        } => {
            let r = c
                .delete_file(pb::DeleteFileRequest {
                    request_id: rid(),
                    location: location.clone(),
                    version: object_version.unwrap_or(0),
                })
                .await
                .ask()?;
            if out.json_mode() {
                out.json(&json!({"location": location, "versions": r.versions}))?;
            } else {
                let v: Vec<String> = r.versions.iter().map(u64::to_string).collect();
                writeln!(out, "Deleted {location} (versions {})", v.join(", "))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A file's bytes (the latest version for 0) into `w`, checked to come in
/// order.
async fn read_into(c: &mut Coord, location: &str, version: u64, w: &mut dyn Write) -> Result<()> {
    let mut s = c
        .read_file(pb::ReadFileRequest {
            location: location.to_string(),
            version,
        })
        .await
        .ask()?;
    write_chunks(&mut s, w).await
}

/// The chunks of `s` into `w`, checked to come in order.
pub async fn write_chunks(
    s: &mut tonic::Streaming<pb::FileChunk>,
    w: &mut dyn Write,
) -> Result<()> {
    let mut at = 0u64;
    while let Some(chunk) = s.message().await.map_err(refused)? {
        if chunk.offset != at {
            bail!(
                "the coordinator sent bytes at {} where {at} was due",
                chunk.offset
            );
        }
        w.write_all(&chunk.data)?;
        at += chunk.data.len() as u64;
    }
    Ok(())
}

/// Upload a directory tree: a directory marker for each directory, then
/// its files, in name order; what was made, in that order. Symbolic links
/// are skipped.
async fn upload_tree(
    c: &mut Coord,
    dir: &Path,
    target: &str,
    out: &mut Out<'_>,
) -> Result<Vec<pb::File>> {
    let mut made = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), target.to_string())];
    while let Some((d, loc)) = stack.pop() {
        made.push(mkdir(c, &loc, out).await?);
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .with_context(|| format!("cannot list {}", d.display()))?
            .collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        let mut dirs = Vec::new();
        for e in entries {
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                eprintln!("cairn: skipping {} (not UTF-8)", e.path().display());
                continue;
            };
            let t = e.file_type()?;
            if t.is_symlink() {
                eprintln!("cairn: skipping symbolic link {}", e.path().display());
            } else if t.is_dir() {
                dirs.push((e.path(), below(&loc, name)));
            } else if t.is_file() {
                made.push(upload_one(c, &e.path(), &below(&loc, name), out).await?);
            }
        }
        stack.extend(dirs.into_iter().rev());
    }
    Ok(made)
}

async fn mkdir(c: &mut Coord, loc: &str, out: &mut Out<'_>) -> Result<pb::File> {
    if !out.json_mode() {
        writeln!(out, "mkdir {loc}")?;
    }
    let header = pb::UploadHeader {
        request_id: rid(),
        location: loc.to_string(),
        directory: true,
        ..Default::default()
    };
    let msg = pb::UploadFileRequest {
        header: Some(header),
        data: Vec::new(),
    };
    let r = c.upload_file(tokio_stream::iter([msg])).await.ask()?;
    r.file
        .context("the coordinator answered without the directory")
}

/// Upload one local file, its SHA-256 taken as the bytes pass and checked
/// against what the domain recorded. In JSON mode it prints nothing: the
/// caller prints one document for the whole command.
pub async fn upload_one(
    c: &mut Coord,
    local: &Path,
    loc: &str,
    out: &mut Out<'_>,
) -> Result<pb::File> {
    let f =
        std::fs::File::open(local).with_context(|| format!("cannot open {}", local.display()))?;
    let size = f.metadata()?.len();
    if !out.json_mode() {
        writeln!(out, "Uploading {} --> {loc}", local.display())?;
    }
    let header = pb::UploadHeader {
        request_id: rid(),
        location: loc.to_string(),
        size,
        ..Default::default()
    };
    let bar = crate::output::progress_bar(size, "upload");
    let progress = bar.clone();
    let (rx, reader) = send_hashed(
        f,
        size,
        header,
        move |n| progress.inc(n),
        |header, data| pb::UploadFileRequest { header, data },
    );
    let sent = c.upload_file(rx).await.ask();
    bar.finish_and_clear();
    let sha = reader.await??;
    let r = sent?;
    let file = r
        .file
        .context("the coordinator answered without the file")?;
    if file.sha256 != sha || file.size != size {
        bail!(
            "{loc} version {} holds {} bytes with SHA-256 {}, but {} bytes with {sha} were sent",
            file.version,
            file.size,
            file.sha256,
            size
        );
    }
    Ok(file)
}

/// The messages that carry `size` bytes of `src` (the first with
/// `header`), made by `msg`, and the SHA-256 of the bytes once read: a
/// thread reads and hashes, the runtime sends; `progress` hears of each
/// chunk.
pub fn send_hashed<H, M>(
    mut src: impl Read + Send + 'static,
    size: u64,
    header: H,
    progress: impl Fn(u64) + Send + 'static,
    msg: impl Fn(Option<H>, Vec<u8>) -> M + Send + 'static,
) -> (
    tokio_stream::wrappers::ReceiverStream<M>,
    tokio::task::JoinHandle<Result<String>>,
)
where
    H: Send + 'static,
    M: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reader = tokio::task::spawn_blocking(move || -> Result<String> {
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        let mut first = Some(header);
        let mut left = size;
        loop {
            let mut buf = vec![0u8; CHUNK.min(left as usize)];
            src.read_exact(&mut buf)?;
            sha.update(&buf);
            left -= buf.len() as u64;
            progress(buf.len() as u64);
            if tx.blocking_send(msg(first.take(), buf)).is_err() || left == 0 {
                break;
            }
        }
        Ok(cairn_proto::auth::hex(sha.finish().as_ref()))
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), reader)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_in_kamaki_listings() {
        assert_eq!(short_size(0), "0B");
        assert_eq!(short_size(1023), "1023B");
        assert_eq!(short_size(983 << 20), "983MB");
        assert_eq!(short_size((22 << 30) / 10), "2.2GB");
        assert_eq!(short_size(1536), "1.5KB");
    }

    #[test]
    fn upload_targets_take_the_local_name_where_none_is_given() {
        let p = Path::new("/tmp/x/debian.raw");
        assert_eq!(upload_target("local", p).unwrap(), "local:debian.raw");
        assert_eq!(upload_target("local:", p).unwrap(), "local:debian.raw");
        assert_eq!(
            upload_target("local:img/", p).unwrap(),
            "local:img/debian.raw"
        );
        assert_eq!(upload_target("local:a.raw", p).unwrap(), "local:a.raw");
        assert_eq!(
            upload_target("cairn://alice/local/img/", p).unwrap(),
            "cairn://alice/local/img/debian.raw"
        );
        assert_eq!(below("local:images", "a"), "local:images/a");
        assert_eq!(below("local:images/", "a"), "local:images/a");
    }
}
