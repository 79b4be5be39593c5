//! Identities for tests: a token file with tokens by name, and clients of
//! the coordinator and the agent that present a token and/or a client
//! certificate over TLS.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cairn_proto::agent::agent_client::AgentClient;
use cairn_proto::auth::{hash_token, new_token, Bearer, Role, TokenEntry};
use cairn_proto::coordinator::coordinator_client::CoordinatorClient;
use cairn_proto::tls::ClientTlsArgs;
use cairn_proto::transport::{channel_tls, Target};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::certs::Certs;

/// The audit lines of a JSON log (`--log-json`), in order.
pub fn audit_lines(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "audit")
        .collect()
}

/// A channel that presents a token, or nothing.
pub type Authed = InterceptedService<Channel, Bearer>;

/// A token file and the tokens in it.
pub struct Tokens {
    /// The file (`--tokens`).
    pub file: PathBuf,
    tokens: HashMap<String, String>,
}

impl Tokens {
    /// A token file in `dir` with a new token for each identity.
    pub fn make(dir: &Path, who: &[(&str, Role)]) -> Tokens {
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("tokens");
        let mut tokens = HashMap::new();
        let mut text = String::new();
        for (name, role) in who {
            let t = new_token();
            text += &TokenEntry {
                name: name.to_string(),
                role: *role,
                hash: hash_token(&t),
            }
            .line();
            text.push('\n');
            tokens.insert(name.to_string(), t);
        }
        std::fs::write(&file, text).unwrap();
        Tokens { file, tokens }
    }

    /// The token of `name`.
    pub fn of(&self, name: &str) -> &str {
        &self.tokens[name]
    }

    /// A server's flag for this file.
    pub fn server_args(&self) -> Vec<String> {
        vec!["--tokens".into(), self.file.display().to_string()]
    }
}

/// How a test client says who it is.
#[derive(Clone, Copy, Default)]
pub struct As<'a> {
    /// A bearer token.
    pub token: Option<&'a str>,
    /// The name of a client certificate of the CA.
    pub cert: Option<&'a str>,
}

/// As the holder of `token`.
pub fn token(t: &str) -> As<'_> {
    As {
        token: Some(t),
        cert: None,
    }
}

/// As the holder of client certificate `name`.
pub fn cert(name: &str) -> As<'_> {
    As {
        token: None,
        cert: Some(name),
    }
}

/// A channel over TLS to `url` (checked against `certs`' CA) as `who`.
pub async fn channel_as(url: &str, certs: &Certs, who: As<'_>) -> Authed {
    let args = ClientTlsArgs {
        ca: Some(certs.dir.join("ca.pem")),
        cert: who.cert.map(|n| certs.dir.join(format!("{n}.pem"))),
        key: who.cert.map(|n| certs.dir.join(format!("{n}.key"))),
    };
    let ch = channel_tls(&Target::Tcp(url.into()), args.for_address(url).unwrap())
        .await
        .expect("TLS connection");
    InterceptedService::new(ch, Bearer::new(who.token).unwrap())
}

/// A coordinator client over TLS as `who`.
pub async fn coord_as(url: &str, certs: &Certs, who: As<'_>) -> CoordinatorClient<Authed> {
    CoordinatorClient::new(channel_as(url, certs, who).await)
}

/// An agent client over TLS as `who`.
pub async fn agent_as(url: &str, certs: &Certs, who: As<'_>) -> AgentClient<Authed> {
    AgentClient::new(channel_as(url, certs, who).await)
}
