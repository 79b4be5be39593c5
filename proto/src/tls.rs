//! TLS on TCP: how a server's TCP listener is secured, and how a client
//! reaches a server over TLS.
//!
//! A TCP listener is TLS (mutual when a client CA is given) or, only when
//! the operator says `--insecure`, plaintext with a warning at start;
//! there is no silent default. Unix sockets are not TLS: who may connect is
//! the socket's mode and group, and who connected is the peer's
//! credentials. Certificates and keys are read once, at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TCP listener was asked for without TLS and without `--insecure`.
    #[error(
        "--listen {0} needs --tls-cert and --tls-key (add --tls-client-ca for mutual TLS), or --insecure to serve plaintext"
    )]
    PlaintextRefused(SocketAddr),
    /// An `https://` address without a CA to check the server against.
    #[error("{0} is https: pass --ca (the CA that signed the server's certificate)")]
    NoCa(String),
    /// A client certificate without its key, or the other way round.
    #[error("--cert and --key go together")]
    HalfIdentity,
    /// The etcd TLS flags do not fit the endpoints.
    #[error("{0}")]
    Etcd(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A server's TLS flags (the agent's, the coordinator's, `cairn up`'s).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTlsArgs {
    /// PEM certificate (chain) the TCP listener presents.
    #[arg(long, env = "CAIRN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CAIRN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: clients over TCP must present a certificate it signed
    /// (mutual TLS).
    #[arg(long, env = "CAIRN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve TCP without TLS: whoever can reach the port can read and
    /// change everything. Logged as a warning at start.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure: bool,
}

/// A daemon's TCP listener: where, and how it is secured.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenArgs {
    /// Also serve gRPC on this TCP address (TLS, or --insecure).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Its certificate, or --insecure.
    #[command(flatten)]
    pub tls: ServerTlsArgs,
}

impl ListenArgs {
    /// The listener to open, if any (see [`ServerTlsArgs::security`]).
    pub fn security(&self) -> Result<Option<(SocketAddr, TcpSecurity)>, TlsError> {
        self.tls.security(self.listen)
    }
}

/// How a TCP listener is secured.
#[derive(Debug, Clone)]
pub enum TcpSecurity {
    /// TLS (mutual when its config has a client CA).
    Tls(Box<ServerTlsConfig>),
    /// Plaintext, as the operator asked (`--insecure`).
    Insecure,
}

impl TcpSecurity {
    /// The scheme of the listener's address: `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        match self {
            TcpSecurity::Tls(_) => "https",
            TcpSecurity::Insecure => "http",
        }
    }
}

impl ServerTlsArgs {
    /// The security of a TCP listener on `listen` (none without one):
    /// refused when neither TLS nor `--insecure` was given.
    pub fn security(
        &self,
        listen: Option<SocketAddr>,
    ) -> Result<Option<(SocketAddr, TcpSecurity)>, TlsError> {
        let Some(addr) = listen else {
            return Ok(None);
        };
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            if !self.insecure {
                return Err(TlsError::PlaintextRefused(addr));
            }
            tracing::warn!(
                %addr,
                "serving gRPC over TCP without TLS (--insecure): whoever can reach this port can read and change everything"
            );
            return Ok(Some((addr, TcpSecurity::Insecure)));
        };
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &self.tls_client_ca {
            // A certificate presented must be one the CA signed and live;
            // a client without one may still come with a bearer token, and
            // is otherwise refused by the gate with UNAUTHENTICATED.
            cfg = cfg
                .client_ca_root(Certificate::from_pem(read(ca)?))
                .client_auth_optional(true);
        }
        Ok(Some((addr, TcpSecurity::Tls(Box::new(cfg)))))
    }
}

/// A client's TLS flags: the CA to check servers against and, for mutual
/// TLS, the client's own certificate.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsArgs {
    /// PEM CA that signed the servers' certificates (for https://
    /// addresses).
    #[arg(long, env = "CAIRN_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for servers that require one.
    #[arg(long, env = "CAIRN_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "CAIRN_KEY", global = true)]
    pub key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The TLS config for reaching `address`: none for a unix socket or an
    /// `http://` address, a config (refused without a CA) for `https://`.
    pub fn for_address(&self, address: &str) -> Result<Option<ClientTlsConfig>, TlsError> {
        if !address.starts_with("https://") {
            return Ok(None);
        }
        let Some(ca) = &self.ca else {
            return Err(TlsError::NoCa(address.to_string()));
        };
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => cfg = cfg.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => return Err(TlsError::HalfIdentity),
        }
        Ok(Some(cfg))
    }
}

/// How etcd is reached over TLS (the agent's and the coordinator's
/// flags): for `https://` endpoints, the CA of etcd's certificate and, for
/// an etcd that checks clients (`--client-cert-auth`), our certificate.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTlsArgs {
    /// PEM CA that signed etcd's server certificate.
    #[arg(long, env = "CAIRN_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate presented to etcd.
    #[arg(long, env = "CAIRN_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, env = "CAIRN_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The TLS config for `endpoints`: none when they are `http://`
    /// (refused with TLS flags, which would be silently unused), a config
    /// (refused without a CA) when they are `https://`; a mix is refused.
    pub fn config(&self, endpoints: &[String]) -> Result<Option<ClientTlsConfig>, TlsError> {
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https == 0 {
            if self.etcd_ca.is_some() || self.etcd_cert.is_some() {
                return Err(TlsError::Etcd(
                    "--etcd-ca/--etcd-cert need https:// etcd endpoints".into(),
                ));
            }
            return Ok(None);
        }
        if https != endpoints.len() {
            return Err(TlsError::Etcd(
                "etcd endpoints are all https:// or all http://".into(),
            ));
        }
        if self.etcd_ca.is_none() {
            return Err(TlsError::Etcd(
                "https:// etcd endpoints need --etcd-ca (the CA of etcd's certificate)".into(),
            ));
        }
        ClientTlsArgs {
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
        }
        .for_address(&endpoints[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_listener_is_tls_or_explicitly_insecure() {
        let addr: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let none = ServerTlsArgs::default();
        assert!(none.security(None).unwrap().is_none());
        let e = none.security(Some(addr)).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
        let insecure = ServerTlsArgs {
            insecure: true,
            ..Default::default()
        };
        let (_, s) = insecure.security(Some(addr)).unwrap().unwrap();
        assert_eq!(s.scheme(), "http");
        let missing = ServerTlsArgs {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            ..Default::default()
        };
        let e = missing.security(Some(addr)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    }

    #[test]
    fn https_needs_a_ca_and_a_whole_identity() {
        let c = ClientTlsArgs::default();
        assert!(c.for_address("http://127.0.0.1:1").unwrap().is_none());
        assert!(c.for_address("/run/cairn/agent.sock").unwrap().is_none());
        let e = c.for_address("https://127.0.0.1:1").unwrap_err();
        assert!(e.to_string().contains("--ca"), "{e}");
        let dir = std::env::temp_dir().join(format!("cairn-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), b"not checked until a connection").unwrap();
        let half = ClientTlsArgs {
            ca: Some(dir.join("ca.pem")),
            cert: Some(dir.join("ca.pem")),
            key: None,
        };
        assert!(matches!(
            half.for_address("https://127.0.0.1:1"),
            Err(TlsError::HalfIdentity)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
