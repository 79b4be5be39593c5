//! The coordinator's errors, each with a stable code.

use cairn_cluster::ClusterError;
use cairn_domain::DomainError;

/// Everything a coordinator operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// A request field is wrong.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Something named does not exist.
    #[error("{kind} {} not found", cairn_domain::limits::shorten(.id))]
    NotFound {
        /// "disk", "domain", "job", ...
        kind: &'static str,
        /// What was asked for.
        id: String,
    },
    /// The operation does not fit the state of things.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something with this id or name is there already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller may not do this.
    #[error("permission denied: {0}")]
    Denied(String),
    /// A request id came back with a different request.
    #[error("request id {0:?} was already used for a different request")]
    RequestIdReused(String),
    /// No agent that sees the domain answered.
    #[error("no agent that sees domain {0} is reachable")]
    NoAgent(String),
    /// An agent refused or failed the call.
    #[error("agent {host}: {}", status.message())]
    Agent {
        /// The agent's host id.
        host: String,
        /// What it answered.
        #[source]
        status: tonic::Status,
    },
    /// Another operation holds the disk for longer than we waited.
    #[error("{0} is busy with another operation")]
    Busy(String),
    /// The coordinator's etcd session is unconfirmed: it may not write.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The cluster store or lock service failed.
    #[error("cluster store: {0}")]
    Store(#[source] ClusterError),
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The job cannot be cancelled any more.
    #[error("job {0} is past the point where it can be cancelled")]
    TooLate(String),
    /// A call's outcome cannot be learnt yet (its agent neither answered
    /// nor died in time).
    #[error("outcome unknown: {0}")]
    Unsettled(String),
    /// Bytes did not arrive as they were said to be (a size or checksum
    /// that does not match).
    #[error("data loss: {0}")]
    DataLoss(String),
    /// A bug or an impossible answer.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoordError {
    /// The stable code put into `google.rpc.ErrorInfo.reason`.
    pub fn code(&self) -> &'static str {
        match self {
            CoordError::InvalidArgument { .. } => "invalid_argument",
            CoordError::NotFound { .. } => "not_found",
            CoordError::FailedPrecondition(_) => "failed_precondition",
            CoordError::AlreadyExists(_) => "already_exists",
            CoordError::Denied(_) => "permission_denied",
            CoordError::RequestIdReused(_) => "request_id_reused",
            CoordError::NoAgent(_) => "no_agent",
            CoordError::Agent { .. } => "agent_error",
            CoordError::Busy(_) => "disk_busy",
            CoordError::Fenced(_) => "fenced",
            CoordError::Store(_) => "store_unavailable",
            CoordError::Cancelled => "cancelled",
            CoordError::TooLate(_) => "too_late_to_cancel",
            CoordError::Unsettled(_) => "outcome_unknown",
            CoordError::DataLoss(_) => "data_loss",
            CoordError::Internal(_) => "internal",
        }
    }

    /// The gRPC status code of the error: an agent's own code for what
    /// an agent refused or failed.
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            CoordError::InvalidArgument { .. } => Code::InvalidArgument,
            CoordError::NotFound { .. } => Code::NotFound,
            CoordError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordError::AlreadyExists(_) => Code::AlreadyExists,
            CoordError::Denied(_) => Code::PermissionDenied,
            CoordError::RequestIdReused(_) => Code::InvalidArgument,
            CoordError::NoAgent(_) => Code::Unavailable,
            CoordError::Agent { status, .. } => status.code(),
            CoordError::Busy(_) => Code::Aborted,
            CoordError::Fenced(_) => Code::Unavailable,
            CoordError::Store(_) => Code::Unavailable,
            CoordError::Cancelled => Code::Cancelled,
            CoordError::TooLate(_) => Code::FailedPrecondition,
            CoordError::Unsettled(_) => Code::Unavailable,
            CoordError::DataLoss(_) => Code::DataLoss,
            CoordError::Internal(_) => Code::Internal,
        }
    }

    /// An invalid argument naming its field.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> CoordError {
        CoordError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Whether the cluster store did not answer (etcd down, slow or
    /// between leaders; the file store failing): asking again later may
    /// succeed.
    pub fn store_unavailable(&self) -> bool {
        matches!(
            self,
            CoordError::Store(ClusterError::Etcd { .. } | ClusterError::Io { .. })
        )
    }

    /// The stable code clients see: an agent's own code when the agent
    /// refused (its ErrorInfo reason), else [`CoordError::code`].
    pub fn reason(&self) -> String {
        use tonic_types::StatusExt;
        if let CoordError::Agent { status, .. } = self {
            if let Some(info) = status.get_details_error_info() {
                return info.reason;
            }
        }
        self.code().to_string()
    }

    /// Whether trying another agent may help: the agent could not be
    /// reached, stopped answering, or is fenced off the domain.
    pub fn agent_unavailable(&self) -> bool {
        matches!(self, CoordError::Agent { status, .. }
            if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown
                | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded))
    }
}

impl From<DomainError> for CoordError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::LockTimeout { resource } => CoordError::Busy(resource),
            DomainError::Fenced(m) => CoordError::Fenced(m),
            DomainError::InvalidArgument { field, reason } => {
                CoordError::InvalidArgument { field, reason }
            }
            other => CoordError::Store(ClusterError::Session(other)),
        }
    }
}

impl From<ClusterError> for CoordError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Session(d) => d.into(),
            other => CoordError::Store(other),
        }
    }
}

impl From<cairn_proto::ConvertError> for CoordError {
    fn from(e: cairn_proto::ConvertError) -> Self {
        CoordError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

/// Results of this crate.
pub type Result<T, E = CoordError> = std::result::Result<T, E>;
