//! Every run of `qemu-img` goes through [`QemuImg`]: the real one spawns
//! the program, the fake one ([`FakeQemu`]) answers from a script and
//! records what it was asked, for tests of what the agent makes of the
//! answers. Arguments are built by the callers; nothing here interprets
//! them.

use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::confine::Ruleset;
use crate::datapath::{io_err, CopyError, Progress};
use crate::error::{AgentError, Result};

/// What one run of qemu-img said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuOutput {
    /// Its exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// A qemu-img run whose progress is followed (see [`QemuImg::tracked`]).
#[derive(Clone, Copy)]
pub struct Tracked<'a> {
    /// The subcommand.
    pub sub: &'a str,
    /// Its arguments after `-p`.
    pub args: &'a [String],
    /// The bytes 100% stands for.
    pub total: u64,
    /// Where progress goes, and the cancellation.
    pub p: &'a Progress,
}

/// qemu-img, as the agent uses it.
pub trait QemuImg: Send + Sync {
    /// Run `qemu-img args` to its end.
    fn output(&self, args: &[String]) -> std::io::Result<QemuOutput>;
    /// Run `qemu-img <sub> -p <args>` (convert, commit, rebase), mapping
    /// its percentage onto `total` bytes of `p`; killed when `p` is
    /// cancelled.
    fn tracked(&self, run: Tracked<'_>) -> std::result::Result<(), CopyError>;
    /// The same qemu-img with every run confined to `rules` (see
    /// [`crate::confine`]); unconfined when there are none.
    fn confined(&self, rules: Option<Ruleset>) -> Box<dyn QemuImg + '_>;
}

impl dyn QemuImg + '_ {
    /// [`QemuImg::tracked`] of `qemu-img <sub> -p <args>`.
    pub fn with_progress(
        &self,
        sub: &str,
        args: &[String],
        total: u64,
        p: &Progress,
    ) -> std::result::Result<(), CopyError> {
        self.tracked(Tracked {
            sub,
            args,
            total,
            p,
        })
    }

    /// Run `qemu-img args`; its standard output when it succeeded, else
    /// an error naming the subcommand with qemu-img's own message.
    pub fn run(&self, args: &[String]) -> Result<String> {
        let sub = args.first().map(String::as_str).unwrap_or("");
        let out = self
            .output(args)
            .map_err(AgentError::io(format!("running qemu-img {sub}")))?;
        if out.code != Some(0) {
            return Err(AgentError::Qemu {
                tool: format!("qemu-img {sub}"),
                detail: out.stderr.trim().to_string(),
            });
        }
        Ok(out.stdout)
    }
}

/// The qemu-img on `PATH`; every run confined to its rules when it has
/// some ([`QemuImg::confined`]).
#[derive(Debug, Clone, Default)]
pub struct SystemQemu {
    rules: Option<Arc<Ruleset>>,
}

impl QemuImg for SystemQemu {
    fn output(&self, args: &[String]) -> std::io::Result<QemuOutput> {
        system_output(self.rules.as_deref(), args)
    }

    fn tracked(&self, run: Tracked<'_>) -> std::result::Result<(), CopyError> {
        system_tracked(self.rules.as_deref(), run)
    }

    /// Confined to `rules`; a confined one is never loosened.
    fn confined(&self, rules: Option<Ruleset>) -> Box<dyn QemuImg + '_> {
        let rules = rules.map(Arc::new).or_else(|| self.rules.clone());
        Box::new(SystemQemu { rules })
    }
}

/// A borrowed qemu-img is one.
impl<Q: QemuImg + ?Sized> QemuImg for &Q {
    fn output(&self, args: &[String]) -> std::io::Result<QemuOutput> {
        (**self).output(args)
    }

    fn tracked(&self, run: Tracked<'_>) -> std::result::Result<(), CopyError> {
        (**self).tracked(run)
    }

    fn confined(&self, rules: Option<Ruleset>) -> Box<dyn QemuImg + '_> {
        (**self).confined(rules)
    }
}

/// `qemu-img`, confined to `rules` from its first instruction when given.
fn qemu_command(rules: Option<&Ruleset>) -> std::io::Result<Command> {
    let mut cmd = Command::new("qemu-img");
    if let Some(r) = rules {
        let r = r.try_clone()?;
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe system calls (fcntl, prctl,
        // landlock_restrict_self); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || r.enter());
        }
    }
    Ok(cmd)
}

fn system_output(rules: Option<&Ruleset>, args: &[String]) -> std::io::Result<QemuOutput> {
    let out = qemu_command(rules)?
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok(QemuOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Run `qemu-img <sub> -p <args>` (convert, commit, rebase), mapping its
/// percentage onto `total` bytes of progress; killed when cancelled.
fn system_tracked(rules: Option<&Ruleset>, run: Tracked<'_>) -> Result<(), CopyError> {
    let Tracked {
        sub,
        args,
        total,
        p,
    } = run;
    p.total.store(total, Ordering::Relaxed);
    let mut child = qemu_command(rules)
        .map_err(io_err("running qemu-img"))?
        .arg(sub)
        .arg("-p")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err("running qemu-img"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (pct_tx, pct_rx) = mpsc::channel::<f64>();
    let stdout = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut line = Vec::new();
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if b == b'\r' || b == b'\n' {
                    if let Some(v) = parse_percent(&String::from_utf8_lossy(&line)) {
                        let _ = pct_tx.send(v);
                    }
                    line.clear();
                } else {
                    line.push(b);
                }
            }
        }
    });
    let status = loop {
        while let Ok(v) = pct_rx.try_recv() {
            p.done
                .store(((v / 100.0) * total as f64) as u64, Ordering::Relaxed);
        }
        if p.cancelled() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = stdout.join();
            let _ = stderr.join();
            return Err(CopyError::Cancelled);
        }
        match child.try_wait().map_err(io_err("waiting for qemu-img"))? {
            Some(st) => break st,
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = stdout.join();
    let msg = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(CopyError::Qemu(msg.trim().to_string()));
    }
    p.done.store(total, Ordering::Relaxed);
    Ok(())
}

/// "    (45.50/100%)" -> 45.5
fn parse_percent(s: &str) -> Option<f64> {
    let s = s.trim();
    let inner = s.strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.trim().parse().ok()
}

/// A scripted qemu-img: each call takes the next answer (a call with no
/// answer left fails as qemu-img not found), and every call's arguments
/// are kept.
#[derive(Debug, Default)]
pub struct FakeQemu {
    answers: Mutex<VecDeque<QemuOutput>>,
    calls: Mutex<Vec<Vec<String>>>,
}

impl FakeQemu {
    /// A fake that will give these answers, in order.
    pub fn answering(answers: impl IntoIterator<Item = QemuOutput>) -> FakeQemu {
        FakeQemu {
            answers: Mutex::new(answers.into_iter().collect()),
            calls: Mutex::default(),
        }
    }

    /// A successful answer with this standard output.
    pub fn ok(stdout: &str) -> QemuOutput {
        QemuOutput {
            code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// A failed answer with this exit code and standard error.
    pub fn failed(code: i32, stderr: &str) -> QemuOutput {
        QemuOutput {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    /// The arguments of every call so far (with_progress calls start with
    /// their subcommand and `-p`).
    pub fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().expect("poisoned").clone()
    }

    fn next(&self, args: Vec<String>) -> std::io::Result<QemuOutput> {
        self.calls.lock().expect("poisoned").push(args);
        self.answers
            .lock()
            .expect("poisoned")
            .pop_front()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no answer left"))
    }
}

impl QemuImg for FakeQemu {
    fn output(&self, args: &[String]) -> std::io::Result<QemuOutput> {
        self.next(args.to_vec())
    }

    fn tracked(&self, run: Tracked<'_>) -> std::result::Result<(), CopyError> {
        let mut all = vec![run.sub.to_string(), "-p".to_string()];
        all.extend_from_slice(run.args);
        let out = self.next(all).map_err(io_err("running qemu-img"))?;
        if out.code != Some(0) {
            return Err(CopyError::Qemu(out.stderr.trim().to_string()));
        }
        run.p.total.store(run.total, Ordering::Relaxed);
        run.p.done.store(run.total, Ordering::Relaxed);
        Ok(())
    }

    fn confined(&self, _: Option<Ruleset>) -> Box<dyn QemuImg + '_> {
        Box::new(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_lines_parse() {
        assert_eq!(parse_percent("    (45.50/100%)"), Some(45.5));
        assert_eq!(parse_percent("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_percent("garbage"), None);
    }

    #[test]
    fn a_failed_run_names_its_subcommand_and_says_why() {
        let q: &dyn QemuImg = &FakeQemu::answering([
            FakeQemu::ok("{}"),
            FakeQemu::failed(1, "  Could not open 'x'\n"),
        ]);
        assert_eq!(q.run(&["info".into()]).unwrap(), "{}");
        match q.run(&["check".into(), "x".into()]) {
            Err(AgentError::Qemu { tool, detail }) => {
                assert_eq!(tool, "qemu-img check");
                assert_eq!(detail, "Could not open 'x'");
            }
            other => panic!("{other:?}"),
        }
        // No answer left: as if qemu-img were missing.
        assert!(matches!(
            q.run(&["info".into()]),
            Err(AgentError::Io { .. })
        ));
    }

    #[test]
    fn qemu_the_system_binary_runs() {
        let q: &dyn QemuImg = &SystemQemu::default();
        let v = q.run(&["--version".into()]).unwrap();
        assert!(v.contains("qemu-img"), "{v}");
        assert!(q.run(&["info".into(), "/nonexistent".into()]).is_err());
    }
}
