//! Test data: files of known patterns, and what images read like.

use std::path::Path;
use std::process::Command;

use crate::agent::run;

/// Write `len` bytes of a file: random-looking data in the first `data`
/// bytes of every `stride` (multiples of 8), zeros elsewhere (written, not
/// holes).
pub fn pattern_file(path: &Path, len: u64, stride: u64, data: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut pos = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        for (i, w) in buf[..n].chunks_mut(8).enumerate() {
            let at = pos + 8 * i as u64;
            if at % stride < data {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x.to_le_bytes();
                w.copy_from_slice(&b[..w.len()]);
            } else {
                w.fill(0);
            }
        }
        f.write_all(&buf[..n]).unwrap();
        pos += n as u64;
    }
    f.flush().unwrap();
}

/// Run a qemu-io command on the `fmt` image at `path`.
pub fn qemu_io(fmt: &str, path: &Path, cmd: &str) {
    run(Command::new("qemu-io")
        .args(["-f", fmt, "-c", cmd])
        .arg(path));
}

/// Write `len` bytes of `byte` at `off` into the raw file `path`.
pub fn write_expected(path: &Path, off: u64, len: u64, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len as usize], off).unwrap();
}

/// What `qemu-img info` says of the image at `path` (with
/// `--backing-chain`: an array, the image first).
pub fn qemu_info(path: &Path, chain: bool) -> serde_json::Value {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json"]);
    if chain {
        cmd.arg("--backing-chain");
    }
    serde_json::from_str(&run(cmd.arg(path))).unwrap()
}

/// Field `key` of every object of the JSON array `v`, as strings.
pub fn strings<'a>(v: &'a serde_json::Value, key: &str) -> Vec<&'a str> {
    let all = v.as_array().expect("a JSON array");
    all.iter().map(|i| i[key].as_str().unwrap()).collect()
}

/// The format qemu sees at `path`.
pub fn qemu_format(path: &Path) -> String {
    qemu_info(path, false)["format"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The virtual size qemu sees at `path`.
pub fn qemu_size(path: &Path) -> u64 {
    qemu_info(path, false)["virtual-size"].as_u64().unwrap()
}

/// Assert the image at `path` (its whole chain) reads like the raw file
/// `expected`, and that `qemu-img check` finds a qcow2 image clean.
pub fn assert_reads_like(path: &Path, expected: &Path) {
    let fmt = qemu_format(path);
    run(Command::new("qemu-img")
        .args(["compare", "-f", &fmt, "-F", "raw"])
        .arg(path)
        .arg(expected));
    if fmt == "qcow2" {
        run(Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(path));
    }
}

/// Write `len` bytes of `byte` at `off` through qemu-io into the image at
/// `path` and into the raw file `expected`.
pub fn write_both(path: &Path, expected: &Path, off: u64, len: u64, byte: u8) {
    let fmt = qemu_format(path);
    qemu_io(&fmt, path, &format!("write -P {byte} {off} {len}"));
    write_expected(expected, off, len, byte);
}

/// A raw file of `len` zero bytes.
pub fn expected_file(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}
