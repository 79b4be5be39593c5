//! `cairn image names|data|flag|metadata|wipe`: the image store's
//! commands (seed 004). Every command takes an image by id, name, or an
//! unambiguous id prefix.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cairn_proto::coordinator as pb;
use clap::Subcommand;
use serde_json::json;

use crate::args::rid;
use crate::connect::{Ask, Coord};
use crate::output::Out;

/// `image names`.
#[derive(Subcommand, Debug)]
pub enum NamesCmd {
    /// Give the image exactly these names, taking each from the image that
    /// had it (none: no names).
    Set {
        /// The image.
        image: String,
        /// Its names.
        names: Vec<String>,
    },
}

/// `image data`.
#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Keep a named data item (from FILE, else standard input).
    Set {
        /// The image.
        image: String,
        /// The item's key.
        #[arg(id = "item", value_name = "KEY")]
        key: String,
        /// Where its bytes are.
        file: Option<PathBuf>,
    },
    /// A data item's bytes (into FILE, else standard output).
    Get {
        /// The image.
        image: String,
        /// The item's key.
        #[arg(id = "item", value_name = "KEY")]
        key: String,
        /// Where to write them.
        file: Option<PathBuf>,
    },
    /// The image's data items: key, size, SHA-256.
    List {
        /// The image.
        image: String,
    },
    /// Remove a data item.
    Remove {
        /// The image.
        image: String,
        /// The item's key.
        #[arg(id = "item", value_name = "KEY")]
        key: String,
    },
}

/// `image flag`.
#[derive(Subcommand, Debug)]
pub enum FlagCmd {
    /// Set a flag (to VALUE, else `true`).
    Set {
        /// The image.
        image: String,
        /// The flag.
        flag: String,
        /// Its value.
        #[arg(default_value = "true")]
        value: String,
    },
    /// Clear a flag.
    Clear {
        /// The image.
        image: String,
        /// The flag.
        flag: String,
    },
}

/// `image members`: Glance's sharing. The owner adds and removes members
/// of a shared image; a member accepts (the image is then listed for it)
/// or rejects.
#[derive(Subcommand, Debug)]
pub enum MembersCmd {
    /// Share the image with these users (as pending).
    Add {
        /// The image.
        image: String,
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Stop sharing the image with these users.
    Remove {
        /// The image.
        image: String,
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Accept an image shared with you.
    Accept {
        /// The image.
        image: String,
    },
    /// Reject an image shared with you.
    Reject {
        /// The image.
        image: String,
    },
    /// The image's members and their answers.
    List {
        /// The image.
        image: String,
    },
}

/// `image members`.
pub async fn members(c: &mut Coord, cmd: &MembersCmd, out: &mut Out<'_>) -> Result<()> {
    let i = match cmd {
        MembersCmd::Add { image, users } => c
            .update_image(pb::UpdateImageRequest {
                request_id: rid(),
                image_id: image.clone(),
                add_members: users.clone(),
                ..Default::default()
            })
            .await
            .ask()?,
        MembersCmd::Remove { image, users } => c
            .update_image(pb::UpdateImageRequest {
                request_id: rid(),
                image_id: image.clone(),
                remove_members: users.clone(),
                ..Default::default()
            })
            .await
            .ask()?,
        MembersCmd::Accept { image } | MembersCmd::Reject { image } => c
            .set_image_member_status(pb::SetImageMemberStatusRequest {
                request_id: rid(),
                image_id: image.clone(),
                status: if matches!(cmd, MembersCmd::Accept { .. }) {
                    "accepted"
                } else {
                    "rejected"
                }
                .into(),
            })
            .await
            .ask()?,
        MembersCmd::List { image } => c
            .get_image(pb::GetImageRequest {
                image_id: image.clone(),
            })
            .await
            .ask()?,
    };
    if out.json_mode() {
        let v: Vec<_> = i
            .members
            .iter()
            .map(|m| json!({"member": m.member, "status": m.status}))
            .collect();
        return out.json(&v);
    }
    if matches!(cmd, MembersCmd::List { .. }) {
        for m in &i.members {
            writeln!(out, "{} {}", m.member, m.status)?;
        }
    }
    Ok(())
}

/// `image names set`.
pub async fn names(c: &mut Coord, cmd: &NamesCmd, out: &mut Out<'_>) -> Result<()> {
    let NamesCmd::Set { image, names } = cmd;
    let i = c
        .set_image_names(pb::SetImageNamesRequest {
            request_id: rid(),
            image_id: image.clone(),
            names: names.clone(),
        })
        .await
        .ask()?;
    if out.json_mode() {
        return out.json(&json!({"id": i.id, "names": i.names}));
    }
    writeln!(out, "{} {}", i.id, i.names.join(" "))?;
    Ok(())
}

/// `image metadata set`.
pub async fn metadata(c: &mut Coord, image: &str, value: &str) -> Result<()> {
    let mut set = std::collections::HashMap::new();
    set.insert("metadata".to_string(), value.to_string());
    c.update_image(pb::UpdateImageRequest {
        request_id: rid(),
        image_id: image.to_string(),
        set,
        ..Default::default()
    })
    .await
    .ask()?;
    Ok(())
}

/// `image flag`.
pub async fn flag(c: &mut Coord, cmd: &FlagCmd) -> Result<()> {
    let req = match cmd {
        FlagCmd::Set { image, flag, value } => pb::UpdateImageRequest {
            request_id: rid(),
            image_id: image.clone(),
            set_flags: [(flag.clone(), value.clone())].into_iter().collect(),
            ..Default::default()
        },
        FlagCmd::Clear { image, flag } => pb::UpdateImageRequest {
            request_id: rid(),
            image_id: image.clone(),
            clear_flags: vec![flag.clone()],
            ..Default::default()
        },
    };
    c.update_image(req).await.ask()?;
    Ok(())
}

/// `image data`.
pub async fn data(c: &mut Coord, cmd: &DataCmd, out: &mut Out<'_>) -> Result<()> {
    match cmd {
        DataCmd::Set { image, key, file } => set_data(c, image, key, file.as_ref(), out).await,
        DataCmd::Get { image, key, file } => {
            let mut s = c
                .get_image_data(pb::GetImageDataRequest {
                    image_id: image.clone(),
                    key: key.clone(),
                })
                .await
                .ask()?;
            let mut w: Box<dyn Write> = match file {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot create {}", p.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            crate::file::write_chunks(&mut s, &mut w).await?;
            w.flush()?;
            Ok(())
        }
        DataCmd::List { image } => {
            let i = c
                .get_image(pb::GetImageRequest {
                    image_id: image.clone(),
                })
                .await
                .ask()?;
            if out.json_mode() {
                let v: Vec<_> = i
                    .data
                    .iter()
                    .map(|d| json!({"key": d.key, "size": d.size, "sha256": d.sha256}))
                    .collect();
                return out.json(&v);
            }
            for d in &i.data {
                writeln!(out, "{} {} {}", d.key, d.size, d.sha256)?;
            }
            Ok(())
        }
        DataCmd::Remove { image, key } => {
            c.remove_image_data(pb::RemoveImageDataRequest {
                request_id: rid(),
                image_id: image.clone(),
                key: key.clone(),
            })
            .await
            .ask()?;
            Ok(())
        }
    }
}

async fn set_data(
    c: &mut Coord,
    image: &str,
    key: &str,
    file: Option<&PathBuf>,
    out: &mut Out<'_>,
) -> Result<()> {
    let (src, size): (Box<dyn Read + Send>, u64) = match file {
        Some(p) => {
            let f =
                std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
            let n = f.metadata()?.len();
            (Box::new(f), n)
        }
        None => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            let n = b.len() as u64;
            (Box::new(std::io::Cursor::new(b)), n)
        }
    };
    let header = pb::ImageDataHeader {
        request_id: rid(),
        image_id: image.to_string(),
        key: key.to_string(),
        size,
        sha256: String::new(),
    };
    let (rx, reader) = crate::file::send_hashed(
        src,
        size,
        header,
        |_| {},
        |header, data| pb::SetImageDataRequest { header, data },
    );
    let sent = c.set_image_data(rx).await.ask();
    let sha = reader.await??;
    let item = sent?
        .item
        .context("the coordinator answered without the item")?;
    if item.sha256 != sha || item.size != size {
        bail!(
            "data item {key} holds {} bytes with SHA-256 {}, but {size} bytes with {sha} were sent",
            item.size,
            item.sha256
        );
    }
    if out.json_mode() {
        return out.json(&json!({"key": item.key, "size": item.size, "sha256": item.sha256}));
    }
    writeln!(out, "{} {} {}", item.key, item.size, item.sha256)?;
    Ok(())
}

/// `image wipe`.
pub async fn wipe(c: &mut Coord, domain: &str, out: &mut Out<'_>) -> Result<()> {
    let r = c
        .wipe_images(pb::WipeImagesRequest {
            request_id: rid(),
            domain: domain.to_string(),
        })
        .await
        .ask()?;
    if out.json_mode() {
        return out.json(&json!({"unregistered": r.image_ids}));
    }
    writeln!(out, "Unregistered {} images", r.image_ids.len())?;
    Ok(())
}
