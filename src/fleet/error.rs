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

/// What an agent was doing when it spoke for a server the broker does not
/// know: what it should do about it depends on that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStep {
    /// Sending a heartbeat.
    Heartbeat,
    /// Opening its instruction stream.
    StreamInstructions,
    /// Reporting an instruction's result.
    ReportInstructionResult,
    /// Leaving.
    Deregister,
}

impl AgentStep {
    /// What the agent should do, as a clause that follows "server X is
    /// not registered;".
    pub fn hint(self) -> &'static str {
        match self {
            AgentStep::Heartbeat => "register it (RegisterServer) before sending heartbeats",
            AgentStep::StreamInstructions => {
                "register it (RegisterServer) before opening its instruction stream"
            }
            AgentStep::ReportInstructionResult => {
                "the broker forgot it and its instructions: register it again (RegisterServer) and reopen its instruction stream"
            }
            AgentStep::Deregister => {
                "there is nothing to deregister (it left already, or was forgotten after its heartbeats stopped)"
            }
        }
    }
}

/// Why a fleet operation failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// The request is malformed; nothing was changed.
    #[error("invalid request: {}", summarize(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// An agent spoke for a server the broker does not know, while doing
    /// the step given.
    #[error("server {0:?} is not registered; {hint}", hint = .1.hint())]
    ServerNotFound(String, AgentStep),
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
    /// A concurrent call conflicts with this one (a call with the same
    /// `ClientToken` is still running); retrying later is right.
    #[error("aborted: {0}")]
    Aborted(String),
    /// A bounded resource of the broker is full (its `ClientToken`
    /// records); nothing was changed.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// Something failed inside the broker.
    #[error("internal error: {0}")]
    Internal(String),
    /// What the request points at is past what the broker keeps (a watch
    /// resumed from a sequence no longer kept); start over.
    #[error("out of range: {0}")]
    OutOfRange(String),
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

/// Why one item of a batch could not be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCode {
    /// No such server.
    ServerNotFound,
    /// Close without Force on a server running sessions.
    HasRunningSessions,
    /// Empty or over-long id.
    InvalidServerId,
    /// Id repeated within the batch.
    DuplicateServerId,
    /// Over-long reason or one with control characters.
    InvalidReason,
    /// No such session (or another owner's).
    SessionNotFound,
    /// Session id repeated within the batch.
    DuplicateSessionId,
    /// A malformed session parameter.
    InvalidSessionParameter,
    /// Requirements that do not parse.
    InvalidRequirements,
    /// No server can take the session and it may not wait.
    NoServerAvailable,
    /// The queue is full.
    QueueFull,
    /// GetSessionScreenshots: the session is not READY.
    SessionNotReady,
    /// GetSessionScreenshots: no open instruction stream, or no answer in
    /// time.
    AgentUnavailable,
    /// GetSessionScreenshots: the agent tried and failed.
    AgentFailed,
    /// GetSessionScreenshots: earlier items' images filled the reply.
    ReplySizeLimit,
    /// The named hold is gone, but others keep the server closed.
    HoldsRemain,
    /// The item's expected state version is not the server's.
    StateVersionMismatch,
    /// Closing would leave a pool below its capacity floor.
    CapacityFloor,
    /// The hold's name or expiry is malformed.
    InvalidHold,
    /// DrainServers: the server already has a hold of the drain's name.
    AlreadyDraining,
}

/// A failed batch item: a code for programs and a reason for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFailure {
    /// The code.
    pub code: FailureCode,
    /// The reason text.
    pub reason: String,
}

impl ItemFailure {
    pub(in crate::fleet) fn new(code: FailureCode, reason: impl Into<String>) -> Self {
        ItemFailure {
            code,
            reason: reason.into(),
        }
    }

    pub(in crate::fleet) fn not_found() -> Self {
        // DCV's exact text: clients match it.
        ItemFailure::new(FailureCode::ServerNotFound, "Dcv server not found.")
    }
}
/// The outcome of one batch item, in request order.
pub type ItemResult = Result<(), ItemFailure>;
