//! The agent's one error type.

use cairn_domain::{DomainError, ErrorCode};

/// Everything an agent operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The domain layer refused or failed.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// A request field was malformed or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field, as named in the API.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Something named in the request does not exist.
    #[error("{kind} {id} not found")]
    NotFound {
        /// "domain", "lock", ...
        kind: &'static str,
        /// What was looked up.
        id: String,
    },
    /// The state of things forbids the operation.
    #[error("{0}")]
    FailedPrecondition(String),
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
        AgentError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
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
            AgentError::InvalidArgument { .. } => "invalid_argument",
            AgentError::NotFound { .. } => "not_found",
            AgentError::FailedPrecondition(_) => "failed_precondition",
            AgentError::InUse(_) => "in_use",
            AgentError::CannotGrowInPlace(_) => "extents_exhausted",
            AgentError::RequestIdReused(_) => "request_id_reused",
            AgentError::Cancelled => "cancelled",
            AgentError::Qemu { .. } => "qemu_failed",
            AgentError::CorruptImage { .. } => "corrupt_image",
            AgentError::Io { .. } => "io",
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> AgentError {
        AgentError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }
}
