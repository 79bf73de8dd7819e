//! The one place where a failure becomes a gRPC status.
//!
//! Handlers return [`ServiceError`]; expected failures carry a message safe to show the
//! caller (never personal data), and unexpected ones are logged here and reach the caller
//! only as a bare `INTERNAL`, so that database or provider details never leak.

pub mod fields;

use std::fmt::Display;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// The error domain reported in `google.rpc.ErrorInfo`.
pub const ERROR_DOMAIN: &str = "healthcode";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// ALREADY_EXISTS with a stable machine-readable `reason` (e.g. `OPEN_BOOKING_THAT_DAY`).
    #[error("{message}")]
    Conflict { reason: String, message: String },
    /// The request is well-formed but the state does not allow it. `reason` is a stable
    /// machine-readable code (e.g. `PHONE_CODE_EXPIRED`).
    #[error("{message}")]
    FailedPrecondition { reason: String, message: String },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{message}")]
    ResourceExhausted {
        message: String,
        retry_after: Option<std::time::Duration>,
    },
    /// A position outside what is held (a cursor older than the retained history, or
    /// beyond the latest record).
    #[error("{0}")]
    OutOfRange(String),
    /// No answer came in time from what the call depends on (e.g. every partner asked).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A dependency (database, cache, provider) is not answering; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        ServiceError::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    pub fn precondition(reason: impl Into<String>, message: impl Into<String>) -> Self {
        ServiceError::FailedPrecondition {
            reason: reason.into(),
            message: message.into(),
        }
    }

    pub fn conflict(reason: impl Into<String>, message: impl Into<String>) -> Self {
        ServiceError::Conflict {
            reason: reason.into(),
            message: message.into(),
        }
    }

    pub fn internal(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ServiceError::Internal(err.into())
    }

    pub fn code(&self) -> Code {
        match self {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::AlreadyExists(_) | ServiceError::Conflict { .. } => Code::AlreadyExists,
            ServiceError::FailedPrecondition { .. } => Code::FailedPrecondition,
            ServiceError::PermissionDenied(_) => Code::PermissionDenied,
            ServiceError::Unauthenticated(_) => Code::Unauthenticated,
            ServiceError::ResourceExhausted { .. } => Code::ResourceExhausted,
            ServiceError::OutOfRange(_) => Code::OutOfRange,
            ServiceError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Internal(_) => Code::Internal,
        }
    }
}

/// Collects every bad field of a request before answering, so the caller learns all of
/// them at once.
#[derive(Debug, Default)]
#[must_use]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Records the error of a parse under `field` and returns the value if it parsed.
    pub fn check<T, E: Display>(&mut self, field: &str, parsed: Result<T, E>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(err) => {
                self.add(field, err.to_string());
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when no field was bad.
    pub fn finish(self) -> Result<(), ServiceError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ServiceError::InvalidArgument(self.0))
        }
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(err: ServiceError) -> Self {
        let code = err.code();
        match err {
            ServiceError::InvalidArgument(violations) => {
                let message = format!("invalid argument: {}", describe(&violations));
                let mut details = ErrorDetails::new();
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
                tonic::Status::with_error_details(code, message, details)
            }
            ServiceError::FailedPrecondition { reason, message }
            | ServiceError::Conflict { reason, message } => {
                let details = ErrorDetails::with_error_info(
                    reason,
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                );
                tonic::Status::with_error_details(code, message, details)
            }
            ServiceError::ResourceExhausted {
                message,
                retry_after: Some(delay),
            } => tonic::Status::with_error_details(
                code,
                message,
                ErrorDetails::with_retry_info(Some(delay)),
            ),
            ServiceError::Internal(source) => {
                tracing::error!(error = %source, "internal error");
                tonic::Status::internal("internal error")
            }
            other => tonic::Status::new(code, other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_one_field_violation_per_field() {
        let mut v = Violations::new();
        v.add("document.number", "bad check digit");
        let parsed: Option<u8> = v.check("name", "x".parse::<u8>());
        assert_eq!(parsed, None);
        let status = tonic::Status::from(v.finish().unwrap_err());
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status
            .get_details_bad_request()
            .expect("bad request details");
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|f| f.field.as_str())
            .collect();
        assert_eq!(fields, ["document.number", "name"]);
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let status = tonic::Status::from(ServiceError::internal("connection to 10.0.0.5 refused"));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn precondition_carries_a_machine_readable_reason() {
        let status = tonic::Status::from(ServiceError::precondition("CODE_EXPIRED", "expired"));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.get_error_details().error_info().unwrap().reason,
            "CODE_EXPIRED"
        );
    }
}
