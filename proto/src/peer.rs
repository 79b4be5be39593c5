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
    /// The caller of `r`: the identity the gate found, else what the
    /// transport says (its certificate is parsed only then).
    pub fn of<T>(r: &tonic::Request<T>) -> Peer {
        let from = Peer::from(r);
        match r.extensions().get::<crate::auth::Identity>() {
            Some(id) => Peer {
                who: id.name.clone(),
                role: id.role.as_str(),
                from,
            },
            None => Peer {
                who: Peer::transport_who(r),
                role: "none",
                from,
            },
        }
    }

    /// The unix peer's pid, or the remote address.
    fn from<T>(r: &tonic::Request<T>) -> String {
        if let Some(uds) = r.extensions().get::<UdsConnectInfo>() {
            return match uds.peer_cred.and_then(|c| c.pid()) {
                Some(pid) => format!("unix pid {pid}"),
                None => "unix".into(),
            };
        }
        r.remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into())
    }

    /// `uid:N`, `cert:NAME` or `anonymous`.
    fn transport_who<T>(r: &tonic::Request<T>) -> String {
        if let Some(uds) = r.extensions().get::<UdsConnectInfo>() {
            return match uds.peer_cred {
                Some(c) => format!("uid:{}", c.uid()),
                None => "anonymous".into(),
            };
        }
        r.peer_certs()
            .and_then(|certs| {
                certs
                    .first()
                    .and_then(|c| crate::auth::cert_identity(c.as_ref()))
            })
            .map(|id| format!("cert:{}", id.name))
            .unwrap_or_else(|| "anonymous".into())
    }
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
        assert_eq!(crate::auth::cert_identity(b"not DER"), None);
    }
}
