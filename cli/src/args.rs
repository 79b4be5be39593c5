//! Arguments several command families share.

use cairn_domain::Format;
use clap::{Args, Subcommand, ValueEnum};

/// A volume or disk format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    /// Plain bytes.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

/// Whether to wait for a long job.
#[derive(Args, Debug)]
pub struct Wait {
    /// Print the job and return at once instead of following it.
    #[arg(long)]
    pub no_wait: bool,
}

/// Job commands: the agent's data jobs and the coordinator's jobs alike.
#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// List jobs.
    List {
        /// Only running ones.
        #[arg(long)]
        running: bool,
    },
    /// Show a job.
    Show {
        /// The job.
        id: String,
    },
    /// Follow a job until it ends (with a progress bar on a terminal).
    Watch {
        /// The job.
        id: String,
    },
    /// Cancel a job.
    Cancel {
        /// The job.
        id: String,
    },
}

/// A size like `512M` or `20G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
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

/// A new request id.
pub fn rid() -> String {
    uuid::Uuid::new_v4().to_string()
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
}
