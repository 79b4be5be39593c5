//! Long data operations as jobs: copy between volumes, import from a file,
//! export to a file. Each runs on its own thread, reports progress, can be
//! cancelled, and leaves nothing behind when it fails: a new volume stays
//! ILLEGAL until its data is complete and flushed, and is removed on
//! failure (or, after a crash, when the agent starts again); a partly
//! written export file is removed.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cairn_domain::{Clock, Format, Legality, LockGuard, Tag, Volume, VolumeId, VolumeSpec};

use cairn_domain::api::CopyTarget;
use cairn_domain::catalog::NewFile;

use crate::agent::{Agent, Opened};
use crate::confine::{self, Ruleset};
use crate::datapath::{copy_raw, CopyError, Progress, Region};
use crate::error::{AgentError, Result};
use crate::iodir::Source;
use crate::qcow2;
use crate::qemu::QemuImg;

/// What a job made.
#[derive(Clone)]
pub enum Outcome {
    /// A new volume (copy, import).
    Volume {
        /// Its domain.
        domain: Arc<Opened>,
        /// The volume.
        volume: Box<Volume>,
        /// Its tag, if one was asked for.
        tag: Option<Box<Tag>>,
    },
    /// A file (export).
    File(PathBuf),
}

/// Where a job is.
#[derive(Clone)]
pub enum Status {
    /// Still working.
    Running,
    /// Done.
    Succeeded(Outcome),
    /// Failed; nothing is left behind.
    Failed(Arc<AgentError>),
    /// Cancelled; nothing is left behind.
    Cancelled,
}

/// One job.
pub struct Job {
    /// Id.
    pub id: String,
    /// "copy", "import" or "export".
    pub kind: &'static str,
    /// Progress and the cancel flag.
    pub progress: Arc<Progress>,
    /// Seconds since the epoch.
    pub started: u64,
    status: Mutex<(Status, u64)>,
}

impl Job {
    /// Current status and when it ended (0 while running).
    pub fn status(&self) -> (Status, u64) {
        self.status.lock().expect("poisoned").clone()
    }
    fn end(&self, s: Status, now: u64) {
        *self.status.lock().expect("poisoned") = (s, now);
    }
}

/// The jobs an agent knows (running, and the last finished ones).
pub struct Jobs {
    map: Mutex<BTreeMap<String, Arc<Job>>>,
    clock: Arc<dyn Clock>,
}

const KEEP_FINISHED: usize = 1000;

impl Jobs {
    /// No jobs yet; times by `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Jobs {
        Jobs {
            map: Mutex::default(),
            clock,
        }
    }

    fn add(&self, kind: &'static str) -> Arc<Job> {
        let job = Arc::new(Job {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            progress: Arc::new(Progress::default()),
            started: self.clock.now(),
            status: Mutex::new((Status::Running, 0)),
        });
        let mut m = self.map.lock().expect("poisoned");
        let finished: Vec<String> = m
            .iter()
            .filter(|(_, j)| !matches!(j.status().0, Status::Running))
            .map(|(k, _)| k.clone())
            .collect();
        if finished.len() >= KEEP_FINISHED {
            for k in &finished[..finished.len() + 1 - KEEP_FINISHED] {
                m.remove(k);
            }
        }
        m.insert(job.id.clone(), job.clone());
        job
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Result<Arc<Job>> {
        self.map
            .lock()
            .expect("poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::not_found("job", id.to_string()))
    }

    /// Every job.
    pub fn list(&self) -> Vec<Arc<Job>> {
        self.map
            .lock()
            .expect("poisoned")
            .values()
            .cloned()
            .collect()
    }
}

/// A data copy's error as the agent's; `tool` names what ran when qemu
/// failed.
pub(crate) fn from_copy(tool: &'static str) -> impl FnOnce(CopyError) -> AgentError {
    move |e| match e {
        CopyError::Cancelled => AgentError::Cancelled,
        CopyError::Io { context, source } => AgentError::Io { context, source },
        CopyError::Qemu(detail) => AgentError::Qemu {
            tool: tool.into(),
            detail,
        },
    }
}

/// The domain device, opened for data with direct I/O.
pub(crate) fn open_direct(path: &Path, write: bool) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
        .map_err(AgentError::io(format!("opening {}", path.display())))
}

impl Agent {
    /// The jobs of this agent.
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// Ask a job to stop.
    pub fn cancel_job(&self, id: &str) -> Result<Arc<Job>> {
        let j = self.jobs.get(id)?;
        j.progress.cancel.store(true, Ordering::Relaxed);
        Ok(j)
    }

    pub(crate) fn spawn_job(
        self: &Arc<Self>,
        kind: &'static str,
        work: impl FnOnce(&Arc<Agent>, &Progress) -> Result<Outcome> + Send + 'static,
    ) -> Arc<Job> {
        let job = self.jobs.add(kind);
        let (agent, j) = (self.clone(), job.clone());
        std::thread::Builder::new()
            .name(format!("job-{kind}"))
            .spawn(move || {
                let r = work(&agent, &j.progress);
                let s = match r {
                    Ok(o) => Status::Succeeded(o),
                    Err(AgentError::Cancelled) => Status::Cancelled,
                    Err(e) => Status::Failed(Arc::new(e)),
                };
                match &s {
                    Status::Failed(e) => {
                        tracing::warn!(job = %j.id, kind, error = %e, "job failed")
                    }
                    Status::Cancelled => tracing::info!(job = %j.id, kind, "job cancelled"),
                    _ => tracing::info!(job = %j.id, kind, "job done"),
                }
                j.end(s, agent.jobs.clock.now());
            })
            .expect("spawning a job thread");
        job
    }

    /// Copy a volume's data (its chain, flattened) into a new volume, on
    /// the same domain or on `to`. With `read_as`, the source is a raw
    /// volume without parents whose bytes are an untrusted image of that
    /// format (a catalog file): its header is judged first, and qemu-img
    /// reads it confined to the domains. With `file`, the copy is raw and
    /// becomes a new version of that catalog file (see
    /// [`Agent::commit_copied_file`]) instead of a disk.
    #[allow(clippy::too_many_arguments)]
    pub fn start_copy(
        self: &Arc<Self>,
        o: Arc<Opened>,
        src: &VolumeId,
        to: Option<Arc<Opened>>,
        read_as: Option<Format>,
        target: CopyTarget,
        file: Option<NewFile>,
        request_id: [u8; 16],
    ) -> Result<Arc<Job>> {
        let d = to.unwrap_or_else(|| o.clone());
        self.check_target(&target)?;
        if let Some(f) = &file {
            cairn_domain::catalog::check_path(&f.path)?;
            if target.tag.is_some() || target.format.is_some_and(|f| f != Format::Raw) {
                return Err(AgentError::invalid(
                    "as_file",
                    "a copy into a file is raw and has no tag of its own",
                ));
            }
        }
        let v = self.legal_chain(&o, src, "the source chain")?;
        let image = match read_as {
            Some(Format::Qcow2) => Some(self.judge_image(&o, &v)?),
            _ => None,
        };
        let format = match (&file, target.format, image) {
            (Some(_), _, _) => Format::Raw,
            (None, Some(f), _) => f,
            (None, None, Some(_)) => Format::Qcow2,
            (None, None, None) => v.format,
        };
        let src_id = v.id;
        Ok(self.spawn_job("copy", move |a, p| {
            // The source keeps still (no delete, no metadata change) while
            // it is read.
            let _lock = o.domain.lock_volume(&src_id)?;
            let v = o.domain.read_volume(&src_id)?;
            let chain = a.volume_chain(&o, &v)?;
            let capacity = image.unwrap_or(v.capacity);
            let (vol, guard) = a.begin_target(&d, format, capacity, &target, request_id)?;
            let r = fenced_while(&[&_lock, &guard], p, || {
                if let Some(size) = image {
                    let (qemu, node) = a.image_node(&o, &d, &v)?;
                    let src = format!("json:{node}");
                    a.convert_into_volume(&*qemu, &src, &d, &vol, format, size, p)
                } else if format == Format::Raw && chain.len() == 1 && v.format == Format::Raw {
                    let f = open_direct(&o.path, false)?;
                    let se = o.extent(&v);
                    let from = Region {
                        file: &f,
                        offset: se.offset,
                        len: v.capacity,
                    };
                    copy_into_volume(from, &d, &vol, p)
                } else {
                    let (src, _scratch) = a.chain_node(&o, &v)?;
                    let src = format!("json:{src}");
                    a.convert_into_volume(&*a.qemu, &src, &d, &vol, format, v.capacity, p)
                }
            });
            match &file {
                None => a.end_target(&d, vol, guard, &target, request_id, r),
                Some(f) => {
                    let r =
                        r.and_then(|()| fenced_while(&[&guard], p, || a.hash_volume(&d, &vol, p)));
                    let made = r
                        .and_then(|sha| a.commit_copied_file(&d, f, &vol, &guard, sha, request_id));
                    match made {
                        Ok(tag) => Ok(Outcome::Volume {
                            volume: Box::new(d.domain.read_volume(&vol.id)?),
                            domain: d,
                            tag: Some(Box::new(tag)),
                        }),
                        Err(e) => {
                            a.undo_create(&d, &vol, &guard);
                            Err(e)
                        }
                    }
                }
            }
        }))
    }

    /// The SHA-256 of new volume `vol`'s bytes, read back from `d`.
    fn hash_volume(&self, d: &Opened, vol: &Volume, p: &Progress) -> Result<String> {
        p.total.fetch_add(vol.capacity, Ordering::Relaxed);
        let f = open_direct(&d.path, false)?;
        let r = Region {
            file: &f,
            offset: d.extent(vol).offset,
            len: vol.capacity,
        };
        crate::datapath::sha256_of(r, p).map_err(from_copy("hashing the copy"))
    }

    /// The virtual size of the qcow2 image raw volume `v` holds, judged
    /// from its first bytes: it must stand alone (see
    /// [`qcow2::inspect_untrusted`]).
    fn judge_image(&self, o: &Opened, v: &Volume) -> Result<u64> {
        if v.format != Format::Raw || v.parent.is_some() {
            return Err(AgentError::invalid(
                "source_format",
                format!(
                    "volume {} is not a raw volume without parents, so its bytes are no image",
                    v.id
                ),
            ));
        }
        let f = File::open(&o.path).map_err(AgentError::io("opening the domain"))?;
        let mut head = vec![0u8; (v.capacity as usize).min(qcow2::INSPECT_BYTES)];
        f.read_exact_at(&mut head, o.extent(v).offset)
            .map_err(AgentError::io("reading the image header"))?;
        let size = qcow2::inspect_untrusted(&head).map_err(|why| {
            AgentError::invalid("source_format", format!("volume {} {why}", v.id))
        })?;
        if size == 0 {
            return Err(AgentError::invalid(
                "source_format",
                format!("volume {} holds an image of 0 bytes", v.id),
            ));
        }
        Ok(size.div_ceil(512) * 512)
    }

    /// A qemu node reading raw volume `v` of `o` as a qcow2 image without
    /// backing, and qemu-img confined (where the kernel has Landlock) to
    /// the source domain and target domain `d`.
    fn image_node<'a>(
        &'a self,
        o: &Opened,
        d: &Opened,
        v: &Volume,
    ) -> Result<(Box<dyn QemuImg + 'a>, serde_json::Value)> {
        let ext = o.extent(v);
        let node = serde_json::json!({
            "driver": "qcow2",
            "file": {
                "driver": "raw", "offset": ext.offset, "size": v.capacity,
                "file": {"driver": "file", "filename": o.path, "locking": "off"},
            },
            "backing": serde_json::Value::Null,
        });
        let failed = || AgentError::io("confining qemu-img");
        let Some(r) = Ruleset::for_untrusted_images().map_err(failed())? else {
            tracing::warn!(
                "the kernel has no Landlock: qemu-img reads an untrusted image unconfined"
            );
            return Ok((self.qemu.confined(None), node));
        };
        for p in [&o.path, &d.path] {
            r.allow_path(p, confine::READ_FILE | confine::WRITE_FILE)
                .map_err(failed())?;
        }
        Ok((self.qemu.confined(Some(r)), node))
    }

    /// Import a file of this host into a new volume.
    pub fn start_import(
        self: &Arc<Self>,
        o: Arc<Opened>,
        path: &str,
        source_format: Format,
        target: CopyTarget,
        request_id: [u8; 16],
    ) -> Result<Arc<Job>> {
        self.check_target(&target)?;
        let src = self.io.open_source(path)?;
        let capacity = match source_format {
            Format::Raw => src.len.div_ceil(512) * 512,
            Format::Qcow2 => qcow2_source_size(&*self.qemu, &src, &o.path)?,
        };
        if capacity == 0 {
            return Err(AgentError::invalid("path", "the file is empty"));
        }
        let format = target.format.unwrap_or(source_format);
        Ok(self.spawn_job("import", move |a, p| {
            let (vol, guard) = a.begin_target(&o, format, capacity, &target, request_id)?;
            let r = fenced_while(&[&guard], p, || {
                if source_format == Format::Raw && format == Format::Raw {
                    let from = Region {
                        file: &src.file,
                        offset: 0,
                        len: src.len,
                    };
                    copy_into_volume(from, &o, &vol, p)
                } else {
                    let (qemu, path) = import_qemu(&*a.qemu, &src, &o.path)?;
                    let node = format!("json:{}", file_node(&path, source_format));
                    a.convert_into_volume(&*qemu, &node, &o, &vol, format, capacity, p)
                }
            });
            a.end_target(&o, vol, guard, &target, request_id, r)
        }))
    }

    /// Export a volume's data (its chain) to a new file of this host.
    pub fn start_export(
        self: &Arc<Self>,
        o: Arc<Opened>,
        src: &VolumeId,
        path: &str,
        format: Format,
    ) -> Result<Arc<Job>> {
        let v = self.legal_chain(&o, src, "the chain")?;
        let src_id = v.id;
        // Created last: a request refused before this leaves no file.
        let out = self.io.create_target(path)?;
        Ok(self.spawn_job("export", move |a, p| {
            let _lock = o.domain.lock_volume(&src_id)?;
            let v = o.domain.read_volume(&src_id)?;
            let chain = a.volume_chain(&o, &v)?;
            let r = fenced_while(&[&_lock], p, || {
                if format == Format::Raw {
                    out.file
                        .set_len(v.capacity)
                        .map_err(AgentError::io("sizing the file"))?;
                }
                if format == Format::Raw && chain.len() == 1 && v.format == Format::Raw {
                    let f = open_direct(&o.path, false)?;
                    let s = o.extent(&v);
                    copy_raw(
                        Region {
                            file: &f,
                            offset: s.offset,
                            len: v.capacity,
                        },
                        Region {
                            file: &out.file,
                            offset: 0,
                            len: v.capacity,
                        },
                        p,
                    )
                    .map_err(from_copy("qemu-img convert"))?;
                } else {
                    // qemu-img writes into the file created here, reopened
                    // through this process's descriptor: it creates nothing.
                    let (src, _scratch) = a.chain_node(&o, &v)?;
                    let target = crate::iodir::fd_path(&out.file);
                    if format != Format::Raw {
                    a.qemu.run(&[
                        "create".into(),
                        "-q".into(),
                        "-f".into(),
                        format.as_str().into(),
                        target.clone(),
                        v.capacity.to_string(),
                    ])?;
                    }
                    let args = vec![
                        "-n".into(),
                        "--target-is-zero".into(),
                        "-T".into(),
                        "none".into(),
                        "-O".into(),
                        format.as_str().into(),
                        format!("json:{src}"),
                        target,
                    ];
                    a.qemu
                        .with_progress("convert", &args, v.capacity, p)
                        .map_err(from_copy("qemu-img convert"))?;
                }
                out.file
                    .sync_all()
                    .map_err(AgentError::io("flushing the file"))
            });
            match r {
                Ok(()) => Ok(Outcome::File(out.path.clone())),
                Err(e) => {
                    if let Err(rm) = out.remove() {
                        tracing::warn!(path = %out.path.display(), error = %rm, "could not remove a failed export");
                    }
                    Err(e)
                }
            }
        }))
    }

    fn check_target(&self, t: &CopyTarget) -> Result<()> {
        crate::agent::validate_description(&t.description)?;
        if let Some(s) = &t.tag {
            crate::agent::validate_tag_spec(s)?;
        }
        Ok(())
    }

    fn begin_target(
        &self,
        o: &Opened,
        format: Format,
        capacity: u64,
        t: &CopyTarget,
        request_id: [u8; 16],
    ) -> Result<(Volume, cairn_domain::LockGuard)> {
        let size = match format {
            Format::Raw => capacity,
            Format::Qcow2 => qcow2::fully_allocated(capacity),
        };
        let spec = VolumeSpec {
            format,
            capacity,
            size,
            allocation: t.allocation,
            parent: None,
            legality: Legality::Illegal,
            description: t.description.clone(),
        };
        self.begin_volume(o, spec, None, request_id)
    }

    fn end_target(
        &self,
        o: &Arc<Opened>,
        vol: Volume,
        guard: cairn_domain::LockGuard,
        t: &CopyTarget,
        request_id: [u8; 16],
        r: Result<()>,
    ) -> Result<Outcome> {
        if let Err(e) = r {
            self.undo_create(o, &vol, &guard);
            return Err(e);
        }
        let (volume, tag) = self.finish_volume(o, &vol, &guard, t.tag.as_ref(), request_id)?;
        Ok(Outcome::Volume {
            domain: o.clone(),
            volume: Box::new(volume),
            tag: tag.map(Box::new),
        })
    }
}

/// Run a job's data work `f` while watching its locks: once one may be
/// lost (the lease is unconfirmed), the work is told to stop, so that its
/// writes end before the lease can expire and another host takes over
/// (a qemu-img child is killed). The job then fails as fenced.
impl Agent {
    /// Volume `id`, whose chain must be legal throughout (`what` names the
    /// chain in the refusal).
    fn legal_chain(&self, o: &Opened, id: &VolumeId, what: &str) -> Result<Volume> {
        let v = o.domain.read_volume(id)?;
        let chain = self.volume_chain(o, &v)?;
        if let Some(bad) = chain.iter().find(|c| c.legality != Legality::Legal) {
            let e = format!("volume {} of {what} is not legal", bad.id);
            return Err(AgentError::precondition(e));
        }
        Ok(v)
    }
}

/// Copy `src` as it is into new volume `vol` of `d` (raw into raw).
fn copy_into_volume(src: Region<'_>, d: &Opened, vol: &Volume, p: &Progress) -> Result<()> {
    let out = open_direct(&d.path, true)?;
    let de = d.extent(vol);
    let to = Region {
        file: &out,
        offset: de.offset,
        len: de.len,
    };
    copy_raw(src, to, p).map_err(from_copy("qemu-img convert"))
}

impl Agent {
    /// Convert the image `src` (a `json:` node) into new volume `vol` of
    /// `d` as `format`, and flush the domain.
    #[allow(clippy::too_many_arguments)]
    fn convert_into_volume(
        &self,
        qemu: &dyn QemuImg,
        src: &str,
        d: &Opened,
        vol: &Volume,
        format: Format,
        total: u64,
        p: &Progress,
    ) -> Result<()> {
        convert_into(qemu, format, src, &self.node(d, vol), total, p)?;
        d.domain
            .device()
            .flush()
            .map_err(AgentError::io("flushing"))
    }
}

pub(crate) fn fenced_while<T>(
    guards: &[&LockGuard],
    p: &Progress,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let done = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Some(e) = guards.iter().find_map(|g| g.check().err()) {
                    tracing::warn!(error = %e, "a running job's lock may be lost; stopping it");
                    p.fenced.store(true, Ordering::SeqCst);
                    p.cancel.store(true, Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        r
    });
    match r {
        Err(AgentError::Cancelled) if p.fenced.load(Ordering::SeqCst) => {
            Err(AgentError::Domain(cairn_domain::DomainError::Fenced(
                "the job's lock may be lost (its lease is unconfirmed); it stopped".into(),
            )))
        }
        r => r,
    }
}

/// `qemu-img convert` into an existing volume image (`dst` node), which
/// reads as zeros.
fn convert_into(
    qemu: &dyn QemuImg,
    format: Format,
    src: &str,
    dst: &serde_json::Value,
    total: u64,
    p: &Progress,
) -> Result<()> {
    let args = vec![
        "-n".into(),
        "--target-is-zero".into(),
        "-t".into(),
        "none".into(),
        "-T".into(),
        "none".into(),
        "-O".into(),
        format.as_str().into(),
        src.to_string(),
        format!("json:{dst}"),
    ];
    qemu.with_progress("convert", &args, total, p)
        .map_err(from_copy("qemu-img convert"))
}

/// The qemu node of an import's source, `path` being the agent's open
/// descriptor of it, with backing files disabled.
fn file_node(path: &str, fmt: Format) -> serde_json::Value {
    let file = serde_json::json!({"driver": "file", "filename": path});
    match fmt {
        Format::Raw => serde_json::json!({"driver": "raw", "file": file}),
        Format::Qcow2 => serde_json::json!({"driver": "qcow2", "file": file, "backing": null}),
    }
}

/// The virtual size of a qcow2 file to import: its header judged from its
/// bytes first (it must stand alone), then qemu-img's reading of it.
fn qcow2_source_size(qemu: &dyn QemuImg, src: &Source, domain: &Path) -> Result<u64> {
    let mut head = vec![0u8; (src.len as usize).min(qcow2::INSPECT_BYTES)];
    src.file
        .read_exact_at(&mut head, 0)
        .map_err(AgentError::io("reading the image header"))?;
    let refuse = |why: String| AgentError::invalid("path", format!("{} {why}", src.path.display()));
    let size = qcow2::inspect_untrusted(&head).map_err(refuse)?;
    let (qemu, path) = import_qemu(qemu, src, domain)?;
    let node = file_node(&path, Format::Qcow2);
    let out = qemu
        .output(&[
            "info".into(),
            "--output=json".into(),
            format!("json:{node}"),
        ])
        .map_err(AgentError::io("running qemu-img info"))?;
    if out.code != Some(0) {
        let why = format!("is not a readable qcow2 image: {}", out.stderr.trim());
        return Err(refuse(why));
    }
    Ok(size.div_ceil(512) * 512)
}

/// qemu-img as it may run on an import's source, and the path by which it
/// opens the source's descriptor: confined (where the kernel has Landlock)
/// to the source and the domain it writes into, besides the system's
/// programs and libraries.
fn import_qemu<'a>(
    qemu: &'a dyn QemuImg,
    src: &Source,
    domain: &Path,
) -> Result<(Box<dyn QemuImg + 'a>, String)> {
    let failed = || AgentError::io("confining qemu-img");
    let Some(mut r) = Ruleset::for_untrusted_images().map_err(failed())? else {
        tracing::warn!("the kernel has no Landlock: qemu-img reads an untrusted image unconfined");
        return Ok((qemu.confined(None), crate::iodir::fd_path(&src.file)));
    };
    let path = r.pass(&src.file, confine::READ_FILE).map_err(failed())?;
    r.allow_path(domain, confine::READ_FILE | confine::WRITE_FILE)
        .map_err(failed())?;
    Ok((qemu.confined(Some(r)), path))
}
