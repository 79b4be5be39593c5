//! Who is asking and from where, as the transport tells it, for the audit
//! line every mutating request leaves: on a unix socket the peer's
//! credentials (`uid:0` is the local administrator), over TLS the subject
//! of the client certificate the server checked (`cert:CN`), over
//! plaintext TCP nobody in particular (`anonymous`).
//!
//! Once the gate ([`crate::auth::Gate`]) has identified a request, its
//! identity is the name given; this names callers, it grants nothing.

use tonic::transport::server::UdsConnectInfo;

/// A caller as the transport identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The identity's name; without one, what the transport says:
    /// `uid:N`, `cert:CN` or `anonymous`.
    pub who: String,
    /// The identity's role (`admin`, `service`, `user`; `none` before the
    /// gate has identified the caller).
    pub role: &'static str,
    /// `unix` (with the peer's pid when known) or the remote address.
    pub from: String,
}

impl Peer {
    /// The caller of `r`.
    pub fn of<T>(r: &tonic::Request<T>) -> Peer {
        let mut p = Peer::of_transport(r);
        if let Some(id) = r.extensions().get::<crate::auth::Identity>() {
            p.who = id.name.clone();
            p.role = id.role.as_str();
        }
        p
    }

    fn of_transport<T>(r: &tonic::Request<T>) -> Peer {
        if let Some(uds) = r.extensions().get::<UdsConnectInfo>() {
            return match uds.peer_cred {
                Some(c) => Peer {
                    role: "none",
                    who: format!("uid:{}", c.uid()),
                    from: match c.pid() {
                        Some(pid) => format!("unix pid {pid}"),
                        None => "unix".into(),
                    },
                },
                None => Peer {
                    role: "none",
                    who: "anonymous".into(),
                    from: "unix".into(),
                },
            };
        }
        let from = r
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let who = r
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| subject_cn(c.as_ref())))
            .map(|cn| format!("cert:{cn}"))
            .unwrap_or_else(|| "anonymous".into());
        Peer {
            who,
            role: "none",
            from,
        }
    }
}

/// The common name of a DER certificate's subject (quoted at most 64
/// characters: it is the caller's text).
fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cairn_domain::limits::shorten(cn).into_owned())
}

/// Write the audit line of a mutating request: who, from where, what, its
/// request id and how it ended (`ok` or the stable error code). One
/// structured event, target `audit`, so that JSON logs can be filtered.
pub fn audit(peer: &Peer, method: &str, request_id: &str, outcome: &str) {
    tracing::info!(
        target: "audit",
        who = %peer.who,
        role = peer.role,
        from = %peer.from,
        method,
        request_id = %cairn_domain::limits::shorten(request_id),
        outcome,
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_transport_facts_is_anonymous() {
        let p = Peer::of(&tonic::Request::new(()));
        assert_eq!(p.who, "anonymous");
        assert_eq!(p.from, "unknown");
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert_eq!(subject_cn(b"not DER"), None);
    }
}
