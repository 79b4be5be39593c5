//! `cairn image`: images registered from files, as kamaki's `image`
//! commands work on Plankton (seed 001): the same fields, the same output.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_coordinator::catalog::images::date;
use cairn_proto::coordinator as pb;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::args::rid;
use crate::connect::{Ask, Coord, Refused};
use crate::image_store::{DataCmd, FlagCmd, MembersCmd, NamesCmd};
use crate::output::Out;

/// Image commands.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Register an image from a file (`DOMAIN:PATH`), writing its metafile
    /// `PATH.meta` beside it.
    Register(RegisterArgs),
    /// Make an image of a disk's current state: a snapshot (the only pause
    /// the disk's writer sees), a flat raw copy into a new file on the
    /// disk's domain, the image registered from it, the snapshot merged
    /// away. Prints the image.
    Create(CreateArgs),
    /// The images you may see: yours, and the public ones.
    List {
        /// Only this owner's.
        #[arg(long)]
        owner: Option<String>,
        /// DOMAIN=GENERATION from an earlier answer: of that domain, only
        /// what changed since (repeatable). Prints the generations.
        #[arg(long, value_parser = key_value)]
        since: Vec<(String, String)>,
    },
    /// Every field of an image.
    Info {
        /// The image id.
        id: String,
    },
    /// Unregister an image (its file stays).
    Unregister {
        /// The image id.
        id: String,
    },
    /// Change an image's metadata or properties.
    #[command(subcommand)]
    Meta(MetaCmd),
    /// An image's names: aliases unique in the catalog.
    #[command(subcommand)]
    Names(NamesCmd),
    /// An image's named data items.
    #[command(subcommand)]
    Data(DataCmd),
    /// An image's flags.
    #[command(subcommand)]
    Flag(FlagCmd),
    /// Who a shared image is shared with, and their answers.
    #[command(subcommand)]
    Members(MembersCmd),
    /// Set an image's metadata string.
    Metadata {
        /// The image.
        image: String,
        /// The new metadata.
        value: String,
    },
    /// Unregister every image (admin only); no file is deleted.
    Wipe {
        /// Only this domain's images.
        #[arg(long, default_value = "")]
        domain: String,
        /// Say so: every image goes.
        #[arg(long, required = true)]
        yes: bool,
    },
}

/// `image register`.
#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// The image's name.
    pub name: String,
    /// Where its file is: `DOMAIN:PATH` or `cairn://OWNER/DOMAIN/PATH`.
    pub location: String,
    /// A property, KEY=VALUE (keys are case-insensitive).
    #[arg(short = 'p', long = "property", value_parser = key_value)]
    pub properties: Vec<(String, String)>,
    /// A metafile to use as a template (the name and -p win over it).
    #[arg(long)]
    pub metafile: Option<PathBuf>,
    /// Overwrite an existing metafile (a new version of it).
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Write no metafile.
    #[arg(long)]
    pub no_metafile_upload: bool,
    /// Publish the image.
    #[arg(long)]
    pub public: bool,
    /// Upload this local file to LOCATION first.
    #[arg(long)]
    pub upload_image_file: Option<PathBuf>,
    /// The disk format (default: the metafile's, else raw).
    #[arg(long, default_value = "")]
    pub disk_format: String,
    /// The container format (default: the metafile's, else bare).
    #[arg(long, default_value = "")]
    pub container_format: String,
    /// The image's id (default: the one its file gives).
    #[arg(long, default_value = "")]
    pub id: String,
    /// A name unique in the catalog (repeatable).
    #[arg(long = "alias")]
    pub names: Vec<String>,
    /// The image's metadata string.
    #[arg(long, default_value = "")]
    pub metadata: String,
}

/// `image create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The disk (on the domain `--domain` names).
    #[arg(long, required = true)]
    pub from_disk: String,
    /// The image's name.
    pub name: String,
    /// The new file's path on the disk's domain (default:
    /// `images/from-disk/DISK-JOB.raw`).
    #[arg(long)]
    pub path: Option<String>,
    /// A property, KEY=VALUE (keys are case-insensitive).
    #[arg(short = 'p', long = "property", value_parser = key_value)]
    pub properties: Vec<(String, String)>,
    /// Publish the image.
    #[arg(long)]
    pub public: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub wait: crate::args::Wait,
}

/// `image meta`.
#[derive(Subcommand, Debug)]
pub enum MetaCmd {
    /// Set metadata fields and properties.
    Set {
        /// The image id.
        id: String,
        /// A new name.
        #[arg(long)]
        name: Option<String>,
        /// Make it public.
        #[arg(long, conflicts_with = "unpublish")]
        publish: bool,
        /// Make it private.
        #[arg(long)]
        unpublish: bool,
        /// A new disk format.
        #[arg(long)]
        disk_format: Option<String>,
        /// A new container format.
        #[arg(long)]
        container_format: Option<String>,
        /// A new status.
        #[arg(long)]
        status: Option<String>,
        /// A property, KEY=VALUE.
        #[arg(short = 'p', long = "property", value_parser = key_value)]
        properties: Vec<(String, String)>,
        /// Glance's visibility: private, public or shared.
        #[arg(long, conflicts_with_all = ["publish", "unpublish"])]
        visibility: Option<String>,
        /// No unregistering while true.
        #[arg(long)]
        protected: Option<String>,
        /// The smallest disk it needs, GiB.
        #[arg(long)]
        min_disk: Option<String>,
        /// The least memory it needs, MiB.
        #[arg(long)]
        min_ram: Option<String>,
        /// Add a tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Set metadata fields to "" and remove properties.
    Delete {
        /// The image id.
        id: String,
        /// Fields to empty (e.g. status).
        fields: Vec<String>,
        /// A property to remove.
        #[arg(short = 'p', long = "property")]
        properties: Vec<String>,
        /// A tag to remove (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
}

fn key_value(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A refusal of another's image as kamaki shows it: `(403) FORBIDDEN`.
fn forbidden(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<Refused>() {
        Ok(mut r) if r.code == tonic::Code::PermissionDenied => {
            r.message = format!("(403) FORBIDDEN {}", r.message);
            r.into()
        }
        Ok(r) => r.into(),
        Err(e) => e,
    }
}

fn image_json(i: &pb::Image) -> Value {
    let props: std::collections::BTreeMap<_, _> = i.properties.iter().collect();
    json!({
        "checksum": i.checksum, "container-format": i.container_format,
        "created-at": date(i.created_at), "deleted-at": "",
        "disk-format": i.disk_format, "id": i.id,
        "is-public": if i.is_public { "True" } else { "False" },
        "location": i.location, "name": i.name, "owner": i.owner,
        "properties": props, "size": i.size, "status": i.status,
        "updated-at": date(i.updated_at), "names": i.names,
        "metadata": i.metadata, "flags": i.flags,
        "data": i.data.iter().map(|d| json!({"key": d.key, "size": d.size, "sha256": d.sha256})).collect::<Vec<_>>(),
        "visibility": i.visibility, "protected": i.protected, "tags": i.tags,
        "members": i.members.iter().map(|m| json!({"member": m.member, "status": m.status})).collect::<Vec<_>>(),
        "min-disk": i.min_disk, "min-ram": i.min_ram, "virtual-size": i.virtual_size,
        "os-hash-algo": i.os_hash_algo, "os-hash-value": i.os_hash_value,
    })
}

/// Every field, as kamaki prints an image.
fn show(out: &mut Out<'_>, i: &pb::Image) -> Result<()> {
    if out.json_mode() {
        return out.json(&image_json(i));
    }
    let line = |out: &mut Out<'_>, k: &str, v: &str| {
        let s = format!("{:<18}{v}", format!("{k}:"));
        writeln!(out, "{}", s.trim_end())
    };
    line(out, "checksum", &i.checksum)?;
    line(out, "container-format", &i.container_format)?;
    line(out, "created-at", &date(i.created_at))?;
    line(out, "deleted-at", "")?;
    line(out, "disk-format", &i.disk_format)?;
    line(out, "id", &i.id)?;
    line(out, "is-public", if i.is_public { "True" } else { "False" })?;
    line(out, "location", &i.location)?;
    line(out, "name", &i.name)?;
    line(out, "owner", &i.owner)?;
    line(out, "properties", "")?;
    let mut props: Vec<_> = i.properties.iter().collect();
    props.sort();
    for (k, v) in props {
        writeln!(out, "        {:<8}{v}", format!("{k}:"))?;
    }
    line(out, "size", &i.size.to_string())?;
    line(out, "status", &i.status)?;
    line(out, "updated-at", &date(i.updated_at))?;
    // The image store's fields (seed 004), when there are any.
    if !i.names.is_empty() {
        line(out, "names", &i.names.join(" "))?;
    }
    if !i.metadata.is_empty() {
        line(out, "metadata", &i.metadata)?;
    }
    let mut flags: Vec<_> = i.flags.iter().collect();
    flags.sort();
    if !flags.is_empty() {
        line(out, "flags", "")?;
    }
    for (k, v) in flags {
        writeln!(out, "        {k}: {v}")?;
    }
    if !i.data.is_empty() {
        line(out, "data", "")?;
    }
    for d in &i.data {
        writeln!(out, "        {} {} {}", d.key, d.size, d.sha256)?;
    }
    glance_lines(out, i)
}

/// Glance's fields, each only when it is not its default, so that a
/// Plankton image prints as kamaki shows it (a shared image's visibility
/// is shown, private and public are `is-public`; the virtual size when it
/// is not the file's size).
fn glance_lines(out: &mut Out<'_>, i: &pb::Image) -> Result<()> {
    let line = |out: &mut Out<'_>, k: &str, v: &str| writeln!(out, "{:<18}{v}", format!("{k}:"));
    if i.visibility == "shared" {
        line(out, "visibility", "shared")?;
        for m in &i.members {
            writeln!(out, "        {}: {}", m.member, m.status)?;
        }
    }
    if i.protected {
        line(out, "protected", "True")?;
    }
    if !i.tags.is_empty() {
        line(out, "tags", &i.tags.join(" "))?;
    }
    if i.min_disk != 0 {
        line(out, "min-disk", &i.min_disk.to_string())?;
    }
    if i.min_ram != 0 {
        line(out, "min-ram", &i.min_ram.to_string())?;
    }
    if i.virtual_size != 0 && i.virtual_size != i.size {
        line(out, "virtual-size", &i.virtual_size.to_string())?;
    }
    Ok(())
}

/// Run an image command.
pub async fn run(c: &mut Coord, d: &str, cmd: &ImageCmd, out: &mut Out<'_>) -> Result<ExitCode> {
    match cmd {
        ImageCmd::Create(a) => create(c, d, a, out).await.map_err(forbidden),
        cmd => {
            go(c, cmd, out).await.map_err(forbidden)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `image create --from-disk`: follow the job, then print the image.
async fn create(c: &mut Coord, d: &str, a: &CreateArgs, out: &mut Out<'_>) -> Result<ExitCode> {
    let req = pb::CreateImageFromDiskRequest {
        request_id: rid(),
        domain: d.to_string(),
        disk_id: a.from_disk.clone(),
        name: a.name.clone(),
        path: a.path.clone().unwrap_or_default(),
        properties: a.properties.iter().cloned().collect(),
        public: a.public,
    };
    let j = c.create_image_from_disk(req).await.ask()?;
    if a.wait.no_wait {
        return crate::coord::outcome(&j, out, None);
    }
    let j = crate::coord::follow(c, j, out.json_mode()).await?;
    if j.state != pb::JobState::Succeeded as i32 {
        return crate::coord::outcome(&j, out, None);
    }
    let i = c
        .get_image(pb::GetImageRequest {
            image_id: j.image_id.clone(),
        })
        .await
        .ask()?;
    show(out, &i)?;
    Ok(ExitCode::SUCCESS)
}

async fn go(c: &mut Coord, cmd: &ImageCmd, out: &mut Out<'_>) -> Result<()> {
    match cmd {
        ImageCmd::Register(a) => register(c, a, out).await,
        ImageCmd::Create(_) => unreachable!("run makes images from disks"),
        ImageCmd::List { owner, since } => {
            let mut asked = HashMap::new();
            for (d, g) in since {
                let g: u64 = g
                    .parse()
                    .with_context(|| format!("--since {d}={g}: not a generation"))?;
                asked.insert(d.clone(), g);
            }
            let r = c
                .list_images(pb::ListImagesRequest {
                    owner: owner.clone().unwrap_or_default(),
                    since: asked,
                })
                .await
                .ask()?;
            for p in &r.problems {
                eprintln!("warning: {p}");
            }
            if !since.is_empty() {
                return changes(out, &r);
            }
            if out.json_mode() {
                return out.json(&r.images.iter().map(image_json).collect::<Vec<_>>());
            }
            for i in &r.images {
                writeln!(out, "{} {}", i.id, i.name)?;
                writeln!(out, "    container_format: {}", i.container_format)?;
                writeln!(out, "    disk_format:      {}", i.disk_format)?;
                writeln!(out, "    size:             {}", i.size)?;
                writeln!(out, "    status:           {}", i.status)?;
            }
            Ok(())
        }
        ImageCmd::Info { id } => {
            let i = c
                .get_image(pb::GetImageRequest {
                    image_id: id.clone(),
                })
                .await
                .ask()?;
            show(out, &i)
        }
        ImageCmd::Unregister { id } => {
            c.unregister_image(pb::UnregisterImageRequest {
                request_id: rid(),
                image_id: id.clone(),
            })
            .await
            .ask()?;
            Ok(())
        }
        ImageCmd::Meta(m) => meta(c, m, out).await,
        ImageCmd::Names(n) => crate::image_store::names(c, n, out).await,
        ImageCmd::Data(d) => crate::image_store::data(c, d, out).await,
        ImageCmd::Flag(f) => crate::image_store::flag(c, f).await,
        ImageCmd::Members(m) => crate::image_store::members(c, m, out).await,
        ImageCmd::Metadata { image, value } => crate::image_store::metadata(c, image, value).await,
        ImageCmd::Wipe { domain, .. } => crate::image_store::wipe(c, domain, out).await,
    }
}

/// `image list --since`: the images changed, those removed, and each
/// domain's generation (with `changes` false, all of its images).
fn changes(out: &mut Out<'_>, r: &pb::ListImagesResponse) -> Result<()> {
    let gens: Vec<Value> = r
        .generations
        .iter()
        .map(|g| json!({"domain": g.domain, "domain-id": g.domain_id, "generation": g.generation, "changes": g.changes}))
        .collect();
    if out.json_mode() {
        return out.json(&json!({
            "images": r.images.iter().map(image_json).collect::<Vec<_>>(),
            "removed": r.removed_image_ids,
            "generations": gens,
        }));
    }
    for i in &r.images {
        writeln!(out, "changed {} {}", i.id, i.name)?;
    }
    for id in &r.removed_image_ids {
        writeln!(out, "removed {id}")?;
    }
    for g in &r.generations {
        let what = if g.changes { "changes" } else { "all" };
        writeln!(out, "generation {}={} ({what})", g.domain, g.generation)?;
    }
    Ok(())
}

async fn register(c: &mut Coord, a: &RegisterArgs, out: &mut Out<'_>) -> Result<()> {
    let template = match &a.metafile {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => Vec::new(),
    };
    if let Some(local) = &a.upload_image_file {
        let abs = std::path::absolute(local)?;
        crate::file::upload_one(c, &abs, &a.location, out).await?;
    }
    let r = c
        .register_image(pb::RegisterImageRequest {
            request_id: rid(),
            name: a.name.clone(),
            location: a.location.clone(),
            properties: a.properties.iter().cloned().collect::<HashMap<_, _>>(),
            metafile: template,
            force: a.force,
            no_metafile_upload: a.no_metafile_upload,
            public: a.public,
            disk_format: a.disk_format.clone(),
            container_format: a.container_format.clone(),
            image_id: a.id.clone(),
            names: a.names.clone(),
            metadata: a.metadata.clone(),
        })
        .await
        .ask()?;
    let i = r
        .image
        .context("the coordinator answered without the image")?;
    show(out, &i)?;
    if !r.metafile_location.is_empty() && !out.json_mode() {
        writeln!(
            out,
            "Metadata file uploaded as {} (version {})",
            r.metafile_location, r.metafile_version
        )?;
    }
    Ok(())
}

async fn meta(c: &mut Coord, m: &MetaCmd, out: &mut Out<'_>) -> Result<()> {
    let req = match m {
        MetaCmd::Set {
            id,
            name,
            publish,
            unpublish,
            disk_format,
            container_format,
            status,
            properties,
            visibility,
            protected,
            min_disk,
            min_ram,
            tags,
        } => {
            let mut set = HashMap::new();
            for (k, v) in [
                ("name", name),
                ("disk_format", disk_format),
                ("container_format", container_format),
                ("status", status),
                ("visibility", visibility),
                ("protected", protected),
                ("min_disk", min_disk),
                ("min_ram", min_ram),
            ] {
                if let Some(v) = v {
                    set.insert(k.to_string(), v.clone());
                }
            }
            pb::UpdateImageRequest {
                request_id: rid(),
                image_id: id.clone(),
                set,
                set_properties: properties.iter().cloned().collect(),
                public: match (publish, unpublish) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                add_tags: tags.clone(),
                ..Default::default()
            }
        }
        MetaCmd::Delete {
            id,
            fields,
            properties,
            tags,
        } => pb::UpdateImageRequest {
            request_id: rid(),
            image_id: id.clone(),
            clear: fields.clone(),
            remove_properties: properties.clone(),
            remove_tags: tags.clone(),
            ..Default::default()
        },
    };
    let i = c.update_image(req).await.ask()?;
    if out.json_mode() {
        out.json(&image_json(&i))?;
    }
    Ok(())
}
