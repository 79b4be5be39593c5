//! Who is asking, and what their role lets them do.
//!
//! Every request to a Cairn service passes one gate ([`Gate`]) before any
//! handler sees it. The gate finds the caller's identity, in this order:
//!
//! 1. a bearer token (`authorization: Bearer …`), checked against the
//!    operator's token file, which holds only SHA-256 hashes; a token that
//!    is presented but unknown is refused, never passed over for another
//!    credential;
//! 2. on a unix socket, the peer's credentials: uid 0 (and the server's
//!    own uid) is the local administrator, any other uid the user `uid:N`
//!    (who may connect at all is the socket's mode and group);
//! 3. over TLS, the client certificate the server verified: its subject
//!    CN (or first SAN) is the name, an organization `cairn:admin` or
//!    `cairn:service` the role, any other certificate a user.
//!
//! A caller with none of these is refused with UNAUTHENTICATED; the
//! identity found goes into the request's extensions for the handler (and
//! the audit line). The role comes from the credential alone: nothing a
//! caller sends can raise it.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// What coordinators and agents use to call each other: the agent API,
    /// and every disk on the coordinator.
    Service,
    /// Only what it owns.
    User,
}

impl Role {
    /// `admin`, `service` or `user`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::User => "user",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "service" => Ok(Role::Service),
            "user" => Ok(Role::User),
            _ => Err(format!(
                "unknown role {} (admin, service or user)",
                cairn_domain::limits::quote(s)
            )),
        }
    }
}

/// A caller: a name (what owners record) and a role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// `uid:N`, a token's name, or a certificate's CN.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl Identity {
    /// Whether this caller may see and act on something owned by `owner`
    /// (none: made without an owner, e.g. through the agent API).
    pub fn may_act_on(&self, owner: Option<&str>) -> bool {
        match self.role {
            Role::Admin | Role::Service => true,
            Role::User => owner == Some(self.name.as_str()),
        }
    }

    /// The identity the gate put into `r`; UNAUTHENTICATED without one (a
    /// service served without its gate answers nobody).
    pub fn of<T>(r: &Request<T>) -> Result<Identity, Status> {
        r.extensions()
            .get::<Identity>()
            .cloned()
            .ok_or_else(|| AuthError::Anonymous.to_status())
    }
}

/// Why a caller was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential at all.
    #[error(
        "who is asking? present a client certificate (--cert/--key), a bearer token (--token or CAIRN_TOKEN), or connect on the unix socket"
    )]
    Anonymous,
    /// A bearer token not in the token file (or no token file).
    #[error("unknown or revoked bearer token")]
    UnknownToken,
    /// An `authorization` header that is not `Bearer TOKEN`.
    #[error("the authorization header must be `Bearer TOKEN`")]
    Malformed,
    /// The role may not call this API.
    #[error("{name} ({role}) may not call the {api}: it is for {allowed} identities")]
    Denied {
        /// The caller.
        name: String,
        /// Its role.
        role: Role,
        /// The API.
        api: &'static str,
        /// Who may.
        allowed: &'static str,
    },
    /// The token file could not be read.
    #[error("reading token file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token file is malformed or unsafe.
    #[error("token file {}: {what}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        what: String,
    },
}

impl AuthError {
    /// The stable error code.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Anonymous => "unauthenticated",
            AuthError::UnknownToken => "unknown_token",
            AuthError::Malformed => "malformed_authorization",
            AuthError::Denied { .. } => "permission_denied",
            AuthError::Read { .. } | AuthError::TokenFile { .. } => "token_file",
        }
    }

    /// The status a caller sees: UNAUTHENTICATED for a missing or bad
    /// credential, PERMISSION_DENIED for a role that may not.
    pub fn to_status(&self) -> Status {
        let code = match self {
            AuthError::Denied { .. } => tonic::Code::PermissionDenied,
            AuthError::Read { .. } | AuthError::TokenFile { .. } => tonic::Code::Internal,
            _ => tonic::Code::Unauthenticated,
        };
        let details = ErrorDetails::with_error_info(self.reason(), "cairn.auth", HashMap::new());
        Status::with_error_details(code, self.to_string(), details)
    }
}

// ---- tokens --------------------------------------------------------------------------------

/// The SHA-256 of a token, as the token file stores it. Tokens are 256
/// random bits, so a plain hash is as hard to reverse as the token is to
/// guess; no salt or slow hash is needed.
pub fn hash_token(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// A new random token: `cairn_` and 64 hex digits (256 bits).
pub fn new_token() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source");
    format!("cairn_{}", hex(&b))
}

/// Bytes as lower-case hex digits, as tokens and digests are shown.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One line of a token file: who a token's holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// The identity's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// SHA-256 of the token.
    pub hash: [u8; 32],
}

impl TokenEntry {
    /// The entry as a line of the file (`NAME ROLE sha256:HEX`).
    pub fn line(&self) -> String {
        format!("{} {} sha256:{}", self.name, self.role, hex(&self.hash))
    }
}

/// Whether `name` may name a token's identity: 1 to 64 of `A-Z a-z 0-9 .
/// _ @ -` (no `:`, so it never looks like `uid:N`).
pub fn check_token_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "token name {} must be 1 to 64 of A-Z a-z 0-9 . _ @ -",
            cairn_domain::limits::quote(name)
        ))
    }
}

/// Parse a token file: one `NAME ROLE sha256:HEX` per line, `#` comments
/// and blank lines ignored; names are unique. The error names the line.
pub fn parse_tokens(text: &str) -> Result<Vec<TokenEntry>, String> {
    let mut out: Vec<TokenEntry> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |what: String| format!("line {}: {what}", n + 1);
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, role, hash] = f[..] else {
            return Err(at("expected `NAME ROLE sha256:HEX`".into()));
        };
        check_token_name(name).map_err(at)?;
        let role: Role = role.parse().map_err(at)?;
        let hash = hash
            .strip_prefix("sha256:")
            .and_then(unhex)
            .ok_or_else(|| at("the hash must be sha256: and 64 hex digits".into()))?;
        if out.iter().any(|e| e.name == name) {
            return Err(at(format!("{name} is named twice")));
        }
        if out.iter().any(|e| e.hash == hash) {
            return Err(at(format!("{name} has the hash of another line")));
        }
        out.push(TokenEntry {
            name: name.to_string(),
            role,
            hash,
        });
    }
    Ok(out)
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What identifies a version of the token file: a change of any makes the
/// next lookup read it again.
type Stamp = (u64, u64, i64, i64, u64);

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size())
}

/// The operator's token file, read again when it changes (a token added
/// or revoked counts from the next request). A file that becomes
/// unreadable or malformed admits no token until it is fixed: a revocation
/// must never be undone by a typo.
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<(Option<Stamp>, ByHash)>,
}

impl TokenFile {
    /// Read `path`: refused when unreadable, malformed, not a regular
    /// file, or writable by anyone but its owner.
    pub fn load(path: &Path) -> Result<TokenFile, AuthError> {
        let (st, map) = read_tokens(path)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            state: Mutex::new((Some(st), map)),
        })
    }

    /// Who holds `token`.
    pub fn lookup(&self, token: &str) -> Result<Identity, AuthError> {
        let mut s = self.state.lock().expect("token state");
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| stamp(&m));
        if now.is_none() || now != s.0 {
            *s = match read_tokens(&self.path) {
                Ok((st, map)) => (Some(st), map),
                Err(e) => {
                    tracing::error!(error = %crate::with_causes(&e), "token file unusable: no token is admitted until it is fixed");
                    (now, HashMap::new())
                }
            };
        }
        s.1.get(&hash_token(token))
            .cloned()
            .ok_or(AuthError::UnknownToken)
    }
}

/// Identities by the hash of their token.
type ByHash = HashMap<[u8; 32], Identity>;

fn read_tokens(path: &Path) -> Result<(Stamp, ByHash), AuthError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let bad = |what: String| AuthError::TokenFile {
        path: path.to_path_buf(),
        what,
    };
    let read = |source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(read)?;
    let m = f.metadata().map_err(read)?;
    if !m.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "writable by others (mode {:o}): make it 0600",
            m.mode() & 0o777
        )));
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(read)?;
    let entries = parse_tokens(&text).map_err(bad)?;
    let map = entries
        .into_iter()
        .map(|e| {
            (
                e.hash,
                Identity {
                    name: e.name,
                    role: e.role,
                },
            )
        })
        .collect();
    Ok((stamp(&m), map))
}

// ---- the gate ------------------------------------------------------------------------------

/// Finds the identity of a request (see the module's documentation).
pub struct Authenticator {
    tokens: Option<TokenFile>,
    own_uid: u32,
}

impl Authenticator {
    /// With the token file `tokens` (none: no token is admitted).
    pub fn new(tokens: Option<TokenFile>) -> Authenticator {
        Authenticator {
            tokens,
            // SAFETY: geteuid has no preconditions and cannot fail.
            own_uid: unsafe { libc::geteuid() },
        }
    }

    /// The identity of the caller of `r`.
    pub fn identify<T>(&self, r: &Request<T>) -> Result<Identity, AuthError> {
        if let Some(v) = r.metadata().get("authorization") {
            let token = v
                .to_str()
                .ok()
                .and_then(|s| s.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or(AuthError::Malformed)?;
            return match &self.tokens {
                Some(t) => t.lookup(token),
                None => Err(AuthError::UnknownToken),
            };
        }
        if let Some(uds) = r.extensions().get::<UdsConnectInfo>() {
            let uid = uds.peer_cred.ok_or(AuthError::Anonymous)?.uid();
            return Ok(Identity {
                name: format!("uid:{uid}"),
                role: if uid == 0 || uid == self.own_uid {
                    Role::Admin
                } else {
                    Role::User
                },
            });
        }
        r.peer_certs()
            .and_then(|certs| certs.first().and_then(|c| cert_identity(c.as_ref())))
            .ok_or(AuthError::Anonymous)
    }
}

/// The identity a verified client certificate names: its subject CN, or
/// its first DNS, email or URI SAN; the role its organization says.
pub fn cert_identity(der: &[u8]) -> Option<Identity> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    let san = || {
        let ext = cert.subject_alternative_name().ok()??;
        ext.value.general_names.iter().find_map(|g| match g {
            GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                Some(s.to_string())
            }
            _ => None,
        })
    };
    let name = cn.filter(|s| !s.is_empty()).or_else(san)?;
    let orgs: Vec<&str> = cert
        .subject()
        .iter_organization()
        .filter_map(|a| a.as_str().ok())
        .collect();
    let role = if orgs.contains(&"cairn:admin") {
        Role::Admin
    } else if orgs.contains(&"cairn:service") {
        Role::Service
    } else {
        Role::User
    };
    Some(Identity {
        name: cairn_domain::limits::shorten(&name).into_owned(),
        role,
    })
}

/// Which identities an API admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Any identity (what it may act on is the handlers' business).
    Anyone,
    /// Admin and service only: the agent API.
    AdminOrService,
}

/// The interceptor in front of a service: identifies every request, refuses
/// what the policy does not admit, and leaves the [`Identity`] in the
/// request's extensions.
#[derive(Clone)]
pub struct Gate {
    auth: Arc<Authenticator>,
    policy: Policy,
    api: &'static str,
}

impl Gate {
    /// A gate for `api` (named in refusals).
    pub fn new(auth: Arc<Authenticator>, policy: Policy, api: &'static str) -> Gate {
        Gate { auth, policy, api }
    }

    /// The identity of `r` if the policy admits it.
    pub fn admit<T>(&self, r: &Request<T>) -> Result<Identity, AuthError> {
        let id = self.auth.identify(r)?;
        match (self.policy, id.role) {
            (Policy::Anyone, _) | (Policy::AdminOrService, Role::Admin | Role::Service) => Ok(id),
            (Policy::AdminOrService, role) => Err(AuthError::Denied {
                name: id.name,
                role,
                api: self.api,
                allowed: "admin and service",
            }),
        }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        match self.admit(&r) {
            Ok(id) => {
                r.extensions_mut().insert(id);
                Ok(r)
            }
            Err(e) => {
                let p = crate::peer::Peer::of(&r);
                tracing::warn!(target: "audit", from = %p.from, who = %p.who, api = self.api, reason = e.reason(), "refused: {e}");
                Err(e.to_status())
            }
        }
    }
}

// ---- the client's side ---------------------------------------------------------------------

/// A client interceptor that presents a bearer token (or nothing).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<token>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    /// Present `token` (none or empty: present nothing). The header is
    /// marked sensitive, so that transports never log it.
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        let Some(t) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(Bearer(None));
        };
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token must be printable ASCII without spaces".into());
        }
        let mut v: MetadataValue<Ascii> = format!("Bearer {t}")
            .parse()
            .map_err(|_| "a token must be printable ASCII".to_string())?;
        v.set_sensitive(true);
        Ok(Bearer(Some(v)))
    }

    /// Read the token from the first line of `path` (so that it is on no
    /// command line).
    pub fn from_file(path: &Path) -> Result<Bearer, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading token file {}: {e}", path.display()))?;
        let first = text.lines().next().unwrap_or("");
        if first.trim().is_empty() {
            return Err(format!("token file {} is empty", path.display()));
        }
        Bearer::new(Some(first))
    }

    /// Whether a token is presented.
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Put the token into the headers of an HTTP request (for transports
    /// that are not a tonic client).
    pub fn apply(&self, headers: &mut tonic::codegen::http::HeaderMap) {
        if let Some(v) = &self.0 {
            let mut h = tonic::codegen::http::HeaderValue::from_bytes(v.as_encoded_bytes())
                .expect("checked when made");
            h.set_sensitive(true);
            headers.insert(tonic::codegen::http::header::AUTHORIZATION, h);
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_token(t: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
        r
    }

    /// Tokens `t-alice` (a user), `t-ops` (an admin) and `t-c1` (a
    /// service).
    fn people(dir: &Path) -> Authenticator {
        let who = [
            ("alice", Role::User, "t-alice"),
            ("ops", Role::Admin, "t-ops"),
            ("c1", Role::Service, "t-c1"),
        ];
        Authenticator::new(Some(TokenFile::load(&token_file(dir, &who)).unwrap()))
    }

    fn token_file(dir: &Path, entries: &[(&str, Role, &str)]) -> PathBuf {
        let p = dir.join("tokens");
        let text: String = entries
            .iter()
            .map(|(n, r, t)| {
                TokenEntry {
                    name: n.to_string(),
                    role: *r,
                    hash: hash_token(t),
                }
                .line()
                    + "\n"
            })
            .collect();
        std::fs::write(&p, format!("# tokens\n\n{text}")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn token_lines_round_trip_and_bad_lines_are_named() {
        let e = TokenEntry {
            name: "alice".into(),
            role: Role::User,
            hash: hash_token("secret"),
        };
        assert_eq!(parse_tokens(&e.line()).unwrap(), vec![e.clone()]);
        assert!(e.line().starts_with("alice user sha256:"));
        assert!(!e.line().contains("secret"));
        for (text, what) in [
            ("alice user", "line 1: expected"),
            ("# c\nal:ice user sha256:00", "line 2: token name"),
            ("alice root sha256:00", "unknown role"),
            ("alice user md5:00", "sha256: and 64 hex"),
            ("alice user sha256:zz", "sha256: and 64 hex"),
        ] {
            let err = parse_tokens(text).unwrap_err();
            assert!(err.contains(what), "{text}: {err}");
        }
        let twice = format!("{}\n{}", e.line(), e.line());
        assert!(parse_tokens(&twice).unwrap_err().contains("twice"));
        let h = format!("{}\nbob user sha256:{}", e.line(), hex(&e.hash));
        assert!(parse_tokens(&h).unwrap_err().contains("another line"));
    }

    #[test]
    fn new_tokens_are_random_and_long() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), "cairn_".len() + 64);
    }

    #[test]
    fn tokens_identify_and_unknown_or_malformed_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let auth = people(dir.path());
        let id = auth.identify(&with_token("t-alice")).unwrap();
        assert_eq!((id.name.as_str(), id.role), ("alice", Role::User));
        assert_eq!(
            auth.identify(&with_token("t-ops")).unwrap().role,
            Role::Admin
        );
        assert!(matches!(
            auth.identify(&with_token("t-mallory")),
            Err(AuthError::UnknownToken)
        ));
        let mut basic = Request::new(());
        basic
            .metadata_mut()
            .insert("authorization", "Basic YTpi".parse().unwrap());
        assert!(matches!(auth.identify(&basic), Err(AuthError::Malformed)));
        // Nothing at all: anonymous, UNAUTHENTICATED.
        let e = auth.identify(&Request::new(())).unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::Unauthenticated);
        // Without a token file no token is admitted.
        let none = Authenticator::new(None);
        assert!(matches!(
            none.identify(&with_token("t-ops")),
            Err(AuthError::UnknownToken)
        ));
    }

    #[test]
    fn a_changed_token_file_counts_at_once_and_a_broken_one_admits_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let p = token_file(dir.path(), &[("alice", Role::User, "t-alice")]);
        let tokens = TokenFile::load(&p).unwrap();
        assert!(tokens.lookup("t-alice").is_ok());
        // Revoked by rewriting the file.
        token_file(dir.path(), &[("bob", Role::User, "t-bob")]);
        assert!(tokens.lookup("t-alice").is_err());
        assert_eq!(tokens.lookup("t-bob").unwrap().name, "bob");
        // A typo: nobody is admitted until it is fixed.
        std::fs::write(&p, "bob user sha256:nothex\n").unwrap();
        assert!(tokens.lookup("t-bob").is_err());
        token_file(dir.path(), &[("bob", Role::User, "t-bob")]);
        assert!(tokens.lookup("t-bob").is_ok());
    }

    #[test]
    fn an_unsafe_token_file_is_refused_at_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = token_file(dir.path(), &[("alice", Role::User, "t")]);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = TokenFile::load(&p).err().unwrap();
        assert!(e.to_string().contains("writable by others"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(
            TokenFile::load(&link),
            Err(AuthError::Read { .. })
        ));
        assert!(matches!(
            TokenFile::load(&dir.path().join("missing")),
            Err(AuthError::Read { .. })
        ));
    }

    #[test]
    fn the_agent_gate_refuses_users_and_leaves_the_identity_for_handlers() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Arc::new(people(dir.path()));
        let mut agent = Gate::new(auth.clone(), Policy::AdminOrService, "agent API");
        let s = agent.call(with_token("t-alice")).unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert!(s.message().contains("alice (user)"), "{}", s.message());
        let r = agent.call(with_token("t-c1")).unwrap();
        assert_eq!(Identity::of(&r).unwrap().role, Role::Service);
        let mut coord = Gate::new(auth, Policy::Anyone, "coordinator API");
        let r = coord.call(with_token("t-alice")).unwrap();
        assert_eq!(Identity::of(&r).unwrap().name, "alice");
        let s = coord.call(Request::new(())).unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        // A handler without the gate in front answers nobody.
        assert_eq!(
            Identity::of(&Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn a_bearer_presents_its_token_and_never_shows_it() {
        let mut b = Bearer::new(Some(" tok ")).unwrap();
        assert_eq!(format!("{b:?}"), "Bearer(<token>)");
        let r = b.call(Request::new(())).unwrap();
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer tok");
        let mut none = Bearer::new(Some("")).unwrap();
        assert!(!none.is_some());
        let r = none.call(Request::new(())).unwrap();
        assert!(r.metadata().get("authorization").is_none());
        assert!(Bearer::new(Some("tök")).is_err());
    }

    #[test]
    fn ownership_binds_users_only() {
        let alice = Identity {
            name: "alice".into(),
            role: Role::User,
        };
        assert!(alice.may_act_on(Some("alice")));
        assert!(!alice.may_act_on(Some("bob")));
        assert!(!alice.may_act_on(None));
        for role in [Role::Admin, Role::Service] {
            let i = Identity {
                name: "x".into(),
                role,
            };
            assert!(i.may_act_on(Some("bob")) && i.may_act_on(None));
        }
    }
}
