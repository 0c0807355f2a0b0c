//! The one mapping from domain errors to gRPC statuses. Malformed requests
//! carry `google.rpc.BadRequest` details so that any client (grpcurl,
//! Python, Go) can point at the bad field; internal details are logged,
//! never sent.

use std::fmt::Write as _;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    auth::AuthError,
    fleet::{FieldViolation, FleetError},
};

/// The most field violations one INVALID_ARGUMENT reply lists (default
/// 100); one more then says how many were left out. A client fixing a
/// request needs the first few, not one per item of a huge one.
pub const MAX_REPORTED_VIOLATIONS: usize = 100;

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
pub fn truncated(s: &str, max: usize) -> &str {
    let end = (0..=max.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    &s[..end]
}
/// The most bytes of field paths and descriptions one reply's BadRequest
/// carries (default 1 KiB). The details travel base64-encoded in the
/// `grpc-status-details-bin` header, and gRPC clients refuse replies whose
/// metadata pass 8 KiB (grpc-core's default) or 16 KiB (HTTP/2 stacks'):
/// this keeps the header near 2 KiB whatever the request held.
pub const MAX_DETAILS_TEXT_BYTES: usize = 1024;
/// The longest field path or description in the details, in bytes
/// (default 256): one violation must not take the whole budget.
pub const MAX_VIOLATION_TEXT_BYTES: usize = 256;
/// The longest INVALID_ARGUMENT message, in bytes (default 512): it travels
/// percent-encoded in the `grpc-message` header, up to three times longer.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// An INVALID_ARGUMENT status with google.rpc.BadRequest details: the
/// first violations that fit [`MAX_REPORTED_VIOLATIONS`] and
/// [`MAX_DETAILS_TEXT_BYTES`], plus one saying how many more there were.
/// The one place BadRequest details are built, so that no request, however
/// many items it names, makes a reply header bigger than clients accept.
fn bad_request(violations: Vec<FieldViolation>) -> Status {
    let total = violations.len();
    let mut budget = MAX_DETAILS_TEXT_BYTES;
    let mut kept = Vec::with_capacity(total.min(MAX_REPORTED_VIOLATIONS + 1));
    for v in violations.into_iter().take(MAX_REPORTED_VIOLATIONS) {
        let field = truncated(&v.field, MAX_VIOLATION_TEXT_BYTES);
        let description = truncated(&v.description, MAX_VIOLATION_TEXT_BYTES);
        let Some(left) = budget.checked_sub(field.len() + description.len()) else {
            break;
        };
        budget = left;
        kept.push(tonic_types::FieldViolation::new(field, description));
    }
    let omitted = total - kept.len();
    let mut message = String::from("invalid request: ");
    for (i, v) in kept.iter().enumerate() {
        let sep = if i == 0 { "" } else { "; " };
        let _ = write!(message, "{sep}{}: {}", v.field, v.description);
        if message.len() > MAX_MESSAGE_BYTES {
            break;
        }
    }
    message.truncate(truncated(&message, MAX_MESSAGE_BYTES).len());
    if omitted > 0 {
        let more = format!("{omitted} more violation(s) not listed");
        let _ = write!(message, "; and {more}");
        kept.push(tonic_types::FieldViolation::new("", more));
    }
    Status::with_error_details(
        Code::InvalidArgument,
        message,
        ErrorDetails::with_bad_request(kept),
    )
}

impl From<FleetError> for Status {
    fn from(err: FleetError) -> Self {
        match err {
            FleetError::InvalidArgument(violations) => bad_request(violations),
            FleetError::ServerNotFound(id, step) => {
                let message = FleetError::ServerNotFound(id.clone(), step).to_string();
                let details = ErrorDetails::with_resource_info(
                    "dcv.sessionmanager.v1.Server",
                    id,
                    "",
                    step.hint(),
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
            FleetError::Aborted(why) => Status::aborted(why),
            FleetError::ResourceExhausted(why) => Status::resource_exhausted(why),
            FleetError::OutOfRange(why) => Status::out_of_range(why),
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
            AuthError::Busy | AuthError::NotLeader => Status::unavailable(err.to_string()),
            AuthError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; see the broker's log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt as _;

    use super::*;

    fn listed(status: &Status) -> Vec<tonic_types::FieldViolation> {
        status
            .get_details_bad_request()
            .expect("BadRequest details")
            .field_violations
    }

    #[test]
    fn few_violations_are_listed_whole() {
        let status = Status::from(FleetError::InvalidArgument(vec![
            FieldViolation::new("A", "is bad"),
            FieldViolation::new("B", "is worse"),
        ]));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid request: A: is bad; B: is worse");
        assert_eq!(listed(&status).len(), 2);
    }

    #[test]
    fn many_violations_are_cut_to_the_budget_and_counted() {
        let violations = (0..100_000)
            .map(|i| FieldViolation::new(format!("Sessions[{i}].Type"), "unknown enum value 99"))
            .collect();
        let status = Status::from(FleetError::InvalidArgument(violations));
        let listed = listed(&status);
        assert!(listed.len() <= MAX_REPORTED_VIOLATIONS + 1);
        let text: usize = listed[..listed.len() - 1]
            .iter()
            .map(|v| v.field.len() + v.description.len())
            .sum();
        assert!(text <= MAX_DETAILS_TEXT_BYTES);
        let more = &listed[listed.len() - 1];
        assert_eq!(
            more.description,
            format!(
                "{} more violation(s) not listed",
                100_000 - (listed.len() - 1)
            )
        );
        assert!(status.message().len() <= MAX_MESSAGE_BYTES + more.description.len() + 10);
        assert!(status.message().ends_with(&more.description));
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        let status = Status::from(FleetError::invalid("é".repeat(1000), "ü".repeat(10_000)));
        let listed = listed(&status);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].field, "é".repeat(MAX_VIOLATION_TEXT_BYTES / 2));
        assert_eq!(
            listed[0].description,
            "ü".repeat(MAX_VIOLATION_TEXT_BYTES / 2)
        );
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        // Encoded, the details stay far below any client's header limit.
        assert!(status.details().len() < 2048);
    }
}
