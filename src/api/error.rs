//! The one mapping from domain errors to gRPC statuses. Malformed requests
//! carry `google.rpc.BadRequest` details so that any client (grpcurl,
//! Python, Go) can point at the bad field; internal details are logged,
//! never sent.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{auth::AuthError, fleet::FleetError};

impl From<FleetError> for Status {
    fn from(err: FleetError) -> Self {
        match err {
            FleetError::InvalidArgument(violations) => {
                let message = FleetError::InvalidArgument(violations.clone()).to_string();
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            FleetError::ServerNotFound(id) => {
                let message = FleetError::ServerNotFound(id.clone()).to_string();
                let details = ErrorDetails::with_resource_info(
                    "dcv.sessionmanager.v1.Server",
                    id,
                    "",
                    "register the server before sending heartbeats",
                );
                Status::with_error_details(Code::NotFound, message, details)
            }
            FleetError::SessionNotFound(id) => {
                let details = ErrorDetails::with_resource_info(
                    "dcv.sessionmanager.v1.Session",
                    id,
                    "",
                    crate::fleet::sessions::SESSION_NOT_FOUND_TEXT,
                );
                Status::with_error_details(
                    Code::NotFound,
                    crate::fleet::sessions::SESSION_NOT_FOUND_TEXT,
                    details,
                )
            }
            FleetError::FailedPrecondition(why) => Status::failed_precondition(why),
            FleetError::Unavailable(why) => {
                tracing::error!(%why, "request failed: broker unavailable");
                Status::unavailable(why)
            }
            FleetError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; see the broker's log")
            }
        }
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Missing(_) | AuthError::InvalidClient | AuthError::InvalidToken(_) => {
                Status::unauthenticated(err.to_string())
            }
            AuthError::Forbidden(_) | AuthError::ScopeNotGranted(_) => {
                Status::permission_denied(err.to_string())
            }
            AuthError::Invalid(_) => Status::invalid_argument(err.to_string()),
            AuthError::NotFound(_) => Status::not_found(err.to_string()),
            AuthError::Busy => Status::unavailable(err.to_string()),
            AuthError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; see the broker's log")
            }
        }
    }
}
