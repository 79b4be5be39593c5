//! Where a command's output goes: JSON (`--json`) or text for people,
//! written to the writer `run` was given.

use std::io::Write;

use anyhow::Result;
use serde_json::Value;

/// A command's output: the writer, and whether JSON was asked for.
pub struct Out<'a> {
    w: &'a mut dyn Write,
    json: bool,
}

impl<'a> Out<'a> {
    /// Output to `w`, as JSON when `json`.
    pub fn new(w: &'a mut dyn Write, json: bool) -> Out<'a> {
        Out { w, json }
    }

    /// Whether JSON was asked for.
    pub fn json_mode(&self) -> bool {
        self.json
    }

    /// One JSON document, pretty.
    pub fn json(&mut self, v: &impl serde::Serialize) -> Result<()> {
        serde_json::to_writer_pretty(&mut *self.w, v)?;
        writeln!(self.w)?;
        Ok(())
    }

    /// An object: as JSON, or as `key: value` lines.
    pub fn show(&mut self, v: Value) -> Result<()> {
        if self.json {
            return self.json(&v);
        }
        if let Value::Object(m) = &v {
            for (k, x) in m {
                let s = match x {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    other => other.to_string(),
                };
                writeln!(self.w, "{k:>16}: {s}")?;
            }
        }
        Ok(())
    }

    /// A list: a JSON array of each item as `json` shows it, or a table of
    /// `header` with a row of each item as `row` shows it.
    pub fn list<T>(
        &mut self,
        items: &[T],
        json: impl Fn(&T) -> Value,
        header: &[&str],
        row: impl Fn(&T) -> Vec<String>,
    ) -> Result<()> {
        if self.json {
            return self.json(&items.iter().map(json).collect::<Vec<_>>());
        }
        self.table(header, items.iter().map(row).collect())
    }

    /// Rows as aligned columns under a header.
    pub fn table(&mut self, header: &[&str], rows: Vec<Vec<String>>) -> Result<()> {
        let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        let mut line = |cells: Vec<String>| {
            let s: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<width$}", width = w[i]))
                .collect();
            writeln!(self.w, "{}", s.join("  ").trim_end())
        };
        line(header.iter().map(|h| h.to_string()).collect())?;
        for r in rows {
            line(r)?;
        }
        Ok(())
    }
}

/// Text lines go straight to the writer (`writeln!(out, ...)`).
impl Write for Out<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// A field for a table: `-` when empty.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// Bytes for people: `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
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

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC); empty for 0.
pub fn utc(secs: u64) -> String {
    if secs == 0 {
        return String::new();
    }
    cairn_coordinator::catalog::images::date(secs)
}

/// A progress bar for a job of `total` bytes (on standard error).
pub fn progress_bar(total: u64, msg: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total.max(1));
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:8} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_objects_show_as_lines_or_json() {
        let mut buf = Vec::new();
        let mut o = Out::new(&mut buf, false);
        o.table(&["A", "BB"], vec![vec!["xyz".into(), "1".into()]])
            .unwrap();
        o.show(serde_json::json!({"k": "v", "n": null})).unwrap();
        let s = String::from_utf8(buf).unwrap();
        assert_eq!(
            s,
            "A    BB\nxyz  1\n               k: v\n               n: -\n"
        );
        let mut buf = Vec::new();
        Out::new(&mut buf, true)
            .show(serde_json::json!({"k": 1}))
            .unwrap();
        assert_eq!(String::from_utf8(buf).unwrap(), "{\n  \"k\": 1\n}\n");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(utc(0), "");
        assert_eq!(utc(1_371_628_822), "2013-06-19 08:00:22");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
    }
}
