//! Cairn's wire types.
//!
//! The generated packages (`cairn.agent.v1` as [`agent`],
//! `cairn.coordinator.v1` as [`coordinator`]) and the one place that
//! converts between them and domain types ([`convert`]): an enum value a
//! peer does not know is refused with the field it came in, never read as
//! a default. Besides them: the well-known tag option keys ([`keys`]),
//! channels to agents and coordinators ([`transport`]), and the bootstrap
//! every server shares ([`server`]: sockets, health, reflection, logging).
//!
//! Generated types stop at the gRPC service layers of the agent and the
//! coordinator; nothing below them sees this crate's messages.
#![warn(missing_docs)]

pub mod auth;
pub mod codec;
pub mod convert;
pub mod keys;
pub mod peer;
pub mod server;
pub mod tls;
pub mod transport;

pub use convert::ConvertError;

/// Generated types of `cairn.agent.v1`.
#[allow(missing_docs, clippy::all)]
pub mod agent {
    tonic::include_proto!("cairn.agent.v1");
    /// Encoded file descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cairn_agent_v1");
}

/// Generated types of `cairn.coordinator.v1`.
#[allow(missing_docs, clippy::all)]
pub mod coordinator {
    tonic::include_proto!("cairn.coordinator.v1");
    /// Encoded file descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cairn_coordinator_v1");
}

/// An error's message followed by its causes (`reading x: timed out`),
/// for a status message: a caller sees why, not only what.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// FNV-1a of a request's bytes: only equality of requests matters, to
/// tell a retry from a reuse of its request id.
pub fn fingerprint(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
