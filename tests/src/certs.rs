//! Certificates for tests, made by `deploy/make-certs` (so the script is
//! tested too): a CA, a server certificate for loopback, client
//! certificates by name.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of certificates made by `deploy/make-certs`.
#[derive(Debug, Clone)]
pub struct Certs {
    /// Where they are.
    pub dir: PathBuf,
}

impl Certs {
    /// Make a CA, the server certificate and client certificates `clients`
    /// (default: "service" and "admin") in `dir`.
    pub fn make(dir: &Path, clients: &[&str]) -> Certs {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/make-certs");
        crate::agent::run(Command::new(script).arg(dir).args(clients));
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    /// A file of the directory.
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A server's flags: TLS with this certificate, clients must present
    /// one the CA signed.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.file("server.pem"),
            "--tls-key".into(),
            self.file("server.key"),
            "--tls-client-ca".into(),
            self.file("ca.pem"),
        ]
    }

    /// A client's flags: the CA, and the certificate of `name`.
    pub fn client_args(&self, name: &str) -> Vec<String> {
        vec![
            "--ca".into(),
            self.file("ca.pem"),
            "--cert".into(),
            self.file(&format!("{name}.pem")),
            "--key".into(),
            self.file(&format!("{name}.key")),
        ]
    }
}
