//! The domain layer's one error type.

use std::io;

/// Stable, machine-readable error codes. They never change meaning once
/// released; gRPC services put them in status details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A request field was malformed or out of range.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// The object already exists.
    AlreadyExists,
    /// The domain state does not allow the operation (for example a
    /// referenced volume cannot be deleted).
    FailedPrecondition,
    /// No room left: extents, metadata slots, host slots or journal.
    ResourceExhausted,
    /// A lock could not be taken in time.
    LockTimeout,
    /// The caller's lock is no longer valid (lease lost or token stale).
    Fenced,
    /// On-disk data failed validation.
    Corrupt,
    /// The device does not hold a Cairn domain, or one this build cannot read.
    NotADomain,
    /// The operation needs a read-write open.
    ReadOnly,
    /// An operating-system I/O error.
    Io,
    /// A record changed between the caller's read and its transaction;
    /// reading again and retrying may succeed.
    Changed,
}

impl ErrorCode {
    /// The code as a stable string, e.g. `"not_found"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::LockTimeout => "lock_timeout",
            ErrorCode::Fenced => "fenced",
            ErrorCode::Corrupt => "corrupt",
            ErrorCode::NotADomain => "not_a_domain",
            ErrorCode::ReadOnly => "read_only",
            ErrorCode::Io => "io",
            ErrorCode::Changed => "changed",
        }
    }
}

/// Everything that can go wrong in the domain layer.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// A field of a request was invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending field.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// An object was not found.
    #[error("{kind} {} not found", crate::limits::shorten(.id))]
    NotFound {
        /// "volume", "tag", "user data item", ...
        kind: &'static str,
        /// The id that was looked up.
        id: String,
    },
    /// An object already exists (the message is a whole sentence).
    #[error("{what}")]
    AlreadyExists {
        /// What exists.
        what: String,
    },
    /// The domain's state forbids the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Out of space of some kind.
    #[error("no space: {0}")]
    NoSpace(String),
    /// Lock wait timed out.
    #[error("timed out waiting for lock {resource}")]
    LockTimeout {
        /// The lock's key.
        resource: String,
    },
    /// The caller's lock is not valid for this write.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Data on the domain failed validation.
    #[error("corrupt {what} at offset {offset:#x}: {detail}; run `cairn domain check`")]
    Corrupt {
        /// Which structure (e.g. "volume record slot 7").
        what: String,
        /// Byte offset on the device.
        offset: u64,
        /// What exactly failed.
        detail: String,
    },
    /// Not a Cairn domain (or an unsupported one).
    #[error("not a usable domain: {0}")]
    NotADomain(String),
    /// A write was attempted on a read-only handle.
    #[error("domain is open read-only")]
    ReadOnly,
    /// A lock-service failure that is not a timeout.
    #[error("lock service: {context}")]
    Lock {
        /// What was being done.
        context: String,
        /// The cause (an I/O error of lock files, etcd's own error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record was not what the transaction expected (someone changed it
    /// since the caller read it).
    #[error("changed concurrently: {0}")]
    Changed(String),
    /// An I/O error from the device.
    #[error("I/O error: {context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl DomainError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DomainError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            DomainError::NotFound { .. } => ErrorCode::NotFound,
            DomainError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            DomainError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            DomainError::NoSpace(_) => ErrorCode::ResourceExhausted,
            DomainError::LockTimeout { .. } => ErrorCode::LockTimeout,
            DomainError::Fenced(_) => ErrorCode::Fenced,
            DomainError::Corrupt { .. } => ErrorCode::Corrupt,
            DomainError::NotADomain(_) => ErrorCode::NotADomain,
            DomainError::ReadOnly => ErrorCode::ReadOnly,
            DomainError::Changed(_) => ErrorCode::Changed,
            DomainError::Lock { .. } | DomainError::Io { .. } => ErrorCode::Io,
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> DomainError {
        let context = context.into();
        move |source| DomainError::Io { context, source }
    }

    /// An invalid argument naming its field.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> DomainError {
        DomainError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Damage found at `offset` while reading `what`.
    pub fn corrupt(
        what: impl Into<String>,
        offset: u64,
        detail: impl std::fmt::Display,
    ) -> DomainError {
        DomainError::Corrupt {
            what: what.into(),
            offset,
            detail: detail.to_string(),
        }
    }
}

/// Result alias for the domain layer.
pub type Result<T, E = DomainError> = std::result::Result<T, E>;
