//! The one mapping from agent errors to gRPC statuses.

use std::collections::HashMap;

use cairn_domain::{DomainError, ErrorCode};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::AgentError;

/// The error domain in status details.
pub const ERROR_DOMAIN: &str = "cairn.agent.v1";

/// The one mapping from agent errors to gRPC statuses. The stable code
/// goes into a google.rpc.ErrorInfo; invalid fields into a BadRequest.
pub fn to_status(e: &AgentError) -> Status {
    let code = match e {
        AgentError::Domain(d) => match d.code() {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::FailedPrecondition | ErrorCode::NotADomain | ErrorCode::ReadOnly => {
                Code::FailedPrecondition
            }
            ErrorCode::ResourceExhausted => Code::ResourceExhausted,
            ErrorCode::LockTimeout | ErrorCode::Changed => Code::Aborted,
            ErrorCode::Fenced | ErrorCode::Io => Code::Unavailable,
            ErrorCode::Corrupt => Code::DataLoss,
        },
        AgentError::InUse(_) => Code::FailedPrecondition,
        AgentError::CannotGrowInPlace(_) => Code::ResourceExhausted,
        AgentError::RequestIdReused(_) => Code::InvalidArgument,
        AgentError::Cancelled => Code::Cancelled,
        AgentError::Qemu { .. } => Code::Internal,
        AgentError::CorruptImage { .. } => Code::DataLoss,
        AgentError::Io { .. } => Code::Unavailable,
    };
    let mut details = ErrorDetails::new();
    details.set_error_info(e.code(), ERROR_DOMAIN, HashMap::new());
    let field = match e {
        AgentError::Domain(DomainError::InvalidArgument { field, reason }) => {
            Some((*field, reason.clone()))
        }
        AgentError::RequestIdReused(_) => Some(("request_id", e.to_string())),
        _ => None,
    };
    if let Some((f, r)) = field {
        details.add_bad_request_violation(f, r);
    }
    // The whole cause chain, so "I/O error: x" also says why.
    Status::with_error_details(code, cairn_proto::with_causes(e), details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_code_and_status() {
        let cases: Vec<(AgentError, Code, &str)> = vec![
            (
                AgentError::invalid("capacity", "x"),
                Code::InvalidArgument,
                "invalid_argument",
            ),
            (
                AgentError::not_found("domain", "d"),
                Code::NotFound,
                "not_found",
            ),
            (
                AgentError::CannotGrowInPlace("x".into()),
                Code::ResourceExhausted,
                "extents_exhausted",
            ),
            (
                AgentError::InUse("x".into()),
                Code::FailedPrecondition,
                "in_use",
            ),
            (
                AgentError::Domain(DomainError::LockTimeout {
                    resource: "r".into(),
                }),
                Code::Aborted,
                "lock_timeout",
            ),
            (
                AgentError::Domain(DomainError::Corrupt {
                    what: "w".into(),
                    offset: 0,
                    detail: "d".into(),
                }),
                Code::DataLoss,
                "corrupt",
            ),
            (
                AgentError::Domain(DomainError::AlreadyExists { what: "w".into() }),
                Code::AlreadyExists,
                "already_exists",
            ),
        ];
        for (e, code, reason) in cases {
            let s = to_status(&e);
            assert_eq!(s.code(), code, "{e}");
            let info = s.get_details_error_info().expect("error info");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, ERROR_DOMAIN);
        }
        let s = to_status(&AgentError::invalid("capacity", "too big"));
        let br = s.get_details_bad_request().expect("bad request");
        assert_eq!(br.field_violations[0].field, "capacity");
    }
}
