//! The domain's error type. The gRPC layer maps it to a status in one
//! place (`api::error`); per-item batch failures are not errors but typed
//! outcomes (`ItemFailure`).

/// One malformed field of a request: becomes a `google.rpc.BadRequest`
/// field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field's path in the request, with DCV's JSON names
    /// (`Servers[3].ServerId`).
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Why a fleet operation failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// The request is malformed; nothing was changed.
    #[error("invalid request: {}", summarize(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// An agent spoke for a server the broker does not know.
    #[error("server {0:?} is not registered; register it first")]
    ServerNotFound(String),
    /// No such session.
    #[error("session {0:?} does not exist")]
    SessionNotFound(String),
    /// The operation does not apply in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The broker cannot serve the request now (for example its store
    /// failed); it is safe to retry against a healthy broker.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Something failed inside the broker.
    #[error("internal error: {0}")]
    Internal(String),
}

impl FleetError {
    /// A malformed request with a single bad field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        FleetError::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

fn summarize(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}
