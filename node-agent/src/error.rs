//! The agent's one error type.

use cairn_domain::{DomainError, ErrorCode};

/// Everything an agent operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The domain layer refused or failed; also the agent's own refusals
    /// of a field, of something that is not there and of a state that
    /// forbids the operation ([`AgentError::invalid`],
    /// [`AgentError::not_found`], [`AgentError::precondition`]): one
    /// vocabulary for both layers.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// A volume is in use (open by a process or needed by an active chain).
    #[error("{0}")]
    InUse(String),
    /// The extents after a volume are taken, so it cannot grow in place.
    #[error("{0}")]
    CannotGrowInPlace(String),
    /// A request id was reused for a different request.
    #[error("request_id {0} was already used for a different request")]
    RequestIdReused(String),
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A qemu tool failed.
    #[error("{tool} failed: {detail}")]
    Qemu {
        /// "qemu-img check", ...
        tool: String,
        /// Its error output.
        detail: String,
    },
    /// An image's data failed validation.
    #[error("corrupt image of volume {volume}: {detail}")]
    CorruptImage {
        /// The volume.
        volume: String,
        /// What is wrong.
        detail: String,
    },
    /// A host-side I/O error (loop devices, run directory, files).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<cairn_proto::ConvertError> for AgentError {
    fn from(e: cairn_proto::ConvertError) -> Self {
        AgentError::Domain(DomainError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        })
    }
}

/// Result alias for the agent.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    /// The stable error code that goes into status details.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Domain(e) => match e.code() {
                ErrorCode::NotADomain => "not_a_domain",
                c => c.as_str(),
            },
            AgentError::InUse(_) => "in_use",
            AgentError::CannotGrowInPlace(_) => "extents_exhausted",
            AgentError::RequestIdReused(_) => "request_id_reused",
            AgentError::Cancelled => "cancelled",
            AgentError::Qemu { .. } => "qemu_failed",
            AgentError::CorruptImage { .. } => "corrupt_image",
            AgentError::Io { .. } => "io",
        }
    }

    /// Field `field` of a request is refused.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> AgentError {
        AgentError::Domain(DomainError::InvalidArgument {
            field,
            reason: reason.into(),
        })
    }

    /// The `kind` named `id` is not there.
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> AgentError {
        AgentError::Domain(DomainError::NotFound {
            kind,
            id: id.into(),
        })
    }

    /// The state of things forbids the operation.
    pub fn precondition(why: impl Into<String>) -> AgentError {
        AgentError::Domain(DomainError::FailedPrecondition(why.into()))
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }
}
