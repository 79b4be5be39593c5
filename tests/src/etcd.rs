//! A real etcd (Debian's etcd-server) on free loopback ports, started and
//! stopped by the test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single-member etcd on loopback.
pub struct Etcd {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    data: PathBuf,
    client: u16,
    peer: u16,
    /// Certificates when it serves clients over TLS and checks theirs.
    tls: Option<crate::certs::Certs>,
}

impl Etcd {
    /// Start one, ready when it answers a read.
    pub fn start() -> Etcd {
        Etcd::start_in(&std::env::temp_dir())
    }

    /// [`Etcd::start`] with its data under `parent` (its disk decides how
    /// fast etcd's writes are durable).
    pub fn start_in(parent: &std::path::Path) -> Etcd {
        Etcd::start_with(parent, None)
    }

    fn start_with(parent: &std::path::Path, tls: Option<crate::certs::Certs>) -> Etcd {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let mut e = Etcd {
            child: None,
            data: dir.path().join("data"),
            _dir: dir,
            client: free_port(),
            peer: free_port(),
            tls,
        };
        e.spawn();
        e
    }

    /// One that serves clients only over TLS with `certs`' server
    /// certificate and admits only clients with a certificate of its CA.
    pub fn start_tls(certs: &crate::certs::Certs) -> Etcd {
        Etcd::start_with(&std::env::temp_dir(), Some(certs.clone()))
    }

    /// The client flags of an agent or coordinator for this etcd (none
    /// without TLS): the CA and the "service" certificate.
    pub fn client_args(&self) -> Vec<String> {
        match &self.tls {
            None => Vec::new(),
            Some(c) => vec![
                "--etcd-ca".into(),
                c.file("ca.pem"),
                "--etcd-cert".into(),
                c.file("service.pem"),
                "--etcd-key".into(),
                c.file("service.key"),
            ],
        }
    }

    /// A client's TLS options for this etcd (the "service" certificate).
    pub fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        let c = self.tls.as_ref()?;
        let read = |n: &str| std::fs::read(c.dir.join(n)).unwrap();
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
            .identity(etcd_client::Identity::from_pem(
                read("service.pem"),
                read("service.key"),
            ));
        Some(etcd_client::ConnectOptions::new().with_tls(tls))
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client)
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let tls: Vec<String> = match &self.tls {
            None => Vec::new(),
            Some(c) => vec![
                format!("--cert-file={}", c.file("server.pem")),
                format!("--key-file={}", c.file("server.key")),
                format!("--trusted-ca-file={}", c.file("ca.pem")),
                "--client-cert-auth".into(),
            ],
        };
        let child = Command::new("etcd")
            .args(tls)
            .arg("--name=t")
            .arg(format!("--data-dir={}", self.data.display()))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (apt-get install etcd-server)");
        self.child = Some(child);
        // Ready when it answers a read.
        let t = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        loop {
            let ok = rt.block_on(async {
                let opts = self.connect_options();
                let Ok(mut c) = etcd_client::Client::connect([self.url()], opts).await else {
                    return false;
                };
                c.get("probe", None).await.is_ok()
            });
            if ok {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGSTOP: etcd stops answering without closing connections.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Kill it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again after `stop`, on the same ports and data.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Start it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Start it again with no data at all.
    pub fn wipe(&mut self) {
        self.stop();
        std::fs::remove_dir_all(&self.data).unwrap();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.resume();
        self.stop();
    }
}
