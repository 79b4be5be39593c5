//! `cairn tag` and `cairn userdata`: tags and their named user data on
//! the local agent.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::connect::Agent;
use anyhow::{Context, Result};
use cairn_domain::{Strategy, TagState, TagType};
use cairn_proto::agent as pb;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::agent::tag_json;
use crate::args::rid;
use crate::connect::Ask;
use crate::output::{human_bytes, Out};

/// What a tag is made as.
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
    /// The tag spec on `volume` (empty: the new volume).
    pub fn spec(&self, volume: String) -> Result<pb::TagSpec> {
        let mut options = Vec::new();
        for o in &self.options {
            let (k, v) = o
                .split_once('=')
                .with_context(|| format!("--option {o:?} is not KEY=VALUE"))?;
            options.push((k.to_string(), v.to_string()));
        }
        let spec = cairn_domain::api::TagSpec {
            size: 0,
            mutable: !self.immutable,
            strategy: if self.copy_strategy {
                Strategy::Copy
            } else {
                Strategy::Chain
            },
            options,
            tag_type: if self.weak {
                TagType::Weak
            } else {
                TagType::Strong
            },
            state: TagState::Optimized,
        };
        Ok(pb::TagSpec {
            volume,
            ..(&spec).into()
        })
    }
}

/// Tag commands.
#[derive(Subcommand, Debug)]
pub enum TagCmd {
    /// Create a tag on a volume.
    Create {
        /// The volume.
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        tag: TagArgs,
    },
    /// List tags.
    List,
    /// Show one tag.
    Show {
        /// The tag.
        id: String,
    },
    /// Replace a tag's metadata (point it at a volume).
    Change {
        /// The tag.
        id: String,
        #[arg(long)]
        /// The volume the tag points at.
        volume: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        tag: TagArgs,
    },
    /// Delete a tag (with --chain: and every volume and weak tag of its
    /// chain that nothing else references, in one transaction).
    Delete {
        /// The tag.
        id: String,
        #[arg(long)]
        /// Also remove every volume and weak tag that only it references.
        chain: bool,
    },
}

/// User data commands.
#[derive(Subcommand, Debug)]
pub enum UserDataCmd {
    /// Set an item from --value or --file.
    Set {
        /// The tag.
        tag: String,
        /// The item's name.
        name: String,
        #[arg(long, conflicts_with = "file")]
        /// The value, as text.
        value: Option<String>,
        #[arg(long)]
        /// A file whose bytes are the value.
        file: Option<PathBuf>,
    },
    /// Print one item's bytes, or list every item.
    Get {
        /// The tag.
        tag: String,
        /// The item's name.
        name: Option<String>,
    },
    /// Remove an item.
    Remove {
        /// The tag.
        tag: String,
        /// The item's name.
        name: String,
    },
}

/// Run a tag command.
pub async fn run(c: &mut Agent, d: String, t: &TagCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    match t {
        TagCmd::Create { volume, tag } => {
            let req = pb::CreateTagRequest {
                request_id: rid(),
                domain: d,
                tag: Some(tag.spec(volume.clone())?),
            };
            let r = c.create_tag(req).await.ask()?;
            out.show(tag_json(&r.tag.unwrap_or_default()))?;
        }
        TagCmd::List => {
            let r = c.list_tags(pb::ListTagsRequest { domain: d }).await.ask()?;
            out.list(&r.tags, tag_json, TAG_HEADER, tag_row)?;
        }
        TagCmd::Show { id } => {
            let req = pb::GetTagRequest {
                domain: d,
                tag_id: id.clone(),
            };
            let t = c.get_tag(req).await.ask()?;
            out.show(tag_json(&t))?;
        }
        TagCmd::Change { id, volume, tag } => {
            let req = pb::ChangeTagRequest {
                request_id: rid(),
                domain: d,
                tag_id: id.clone(),
                tag: Some(tag.spec(volume.clone())?),
            };
            let r = c.change_tag(req).await.ask()?;
            out.show(tag_json(&r.tag.unwrap_or_default()))?;
        }
        TagCmd::Delete { id, chain: false } => {
            let req = pb::DeleteTagRequest {
                request_id: rid(),
                domain: d,
                tag_id: id.clone(),
            };
            c.delete_tag(req).await.ask()?;
            out.show(json!({"deleted": id}))?;
        }
        TagCmd::Delete { id, chain: true } => {
            let req = pb::DeleteDiskRequest {
                request_id: rid(),
                domain: d,
                tag_id: id.clone(),
            };
            let r = c.delete_disk(req).await.ask()?;
            out.show(
                json!({"tags_removed": r.tags_removed, "volumes_removed": r.volumes_removed}),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Run a user data command.
pub async fn run_user_data(
    c: &mut Agent,
    d: String,
    u: &UserDataCmd,
    out: &mut Out<'_>,
) -> Result<ExitCode> {
    let j = out.json_mode();
    match u {
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
            let req = pb::SetUserDataRequest {
                request_id: rid(),
                domain: d,
                tag_id: tag.clone(),
                name: name.clone(),
                data,
            };
            let r = c.set_user_data(req).await.ask()?;
            out.show(json!({"changed": r.changed}))?;
        }
        UserDataCmd::Get { tag, name } => {
            let req = pb::GetUserDataRequest {
                domain: d,
                tag_id: tag.clone(),
                name: name.clone().unwrap_or_default(),
            };
            let r = c.get_user_data(req).await.ask()?;
            match (name, j) {
                    (Some(_), false) => {
                        out.write_all(&r.items[0].data)?;
                    }
                    (_, _) => out.list(
                        &r.items,
                        |i| json!({"name": i.name, "data": String::from_utf8_lossy(&i.data), "bytes": i.data.len()}),
                        &["NAME", "BYTES"],
                        |i| vec![i.name.clone(), i.data.len().to_string()],
                    )?,
                }
        }
        UserDataCmd::Remove { tag, name } => {
            let req = pb::RemoveUserDataRequest {
                request_id: rid(),
                domain: d,
                tag_id: tag.clone(),
                name: name.clone(),
            };
            let r = c.remove_user_data(req).await.ask()?;
            out.show(json!({"removed": r.removed}))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

const TAG_HEADER: &[&str] = &[
    "TAG", "VOLUME", "TYPE", "MUTABLE", "STATE", "SIZE", "CHILDREN",
];

fn tag_row(t: &pb::Tag) -> Vec<String> {
    let j = tag_json(t);
    vec![
        t.id.clone(),
        t.volume.clone(),
        j["type"].as_str().unwrap_or("").into(),
        t.mutable.to_string(),
        j["state"].as_str().unwrap_or("").into(),
        human_bytes(t.size),
        t.child_refs.to_string(),
    ]
}
