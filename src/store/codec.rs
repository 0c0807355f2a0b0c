//! How domain values become column values and back: times as integer unix
//! microseconds, enums as their upper-case names (readable in the `sqlite3`
//! shell, and stable if the Rust enums are reordered), a server's
//! description as an encoded `RegisterServerRequest` and a session's
//! creation request as an encoded `CreateSessionRequestData`.
//!
//! The protobuf encodings reuse the published contract, so a stored
//! description and request evolve the way the wire does (new fields are
//! added compatibly) instead of needing a column per field and a migration
//! per new field. Decoding goes through the same conversions the API
//! uses, so a stored value is checked exactly like one an agent or a
//! portal sends.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;

use crate::{
    fleet::{CreateSpec, HoldKind, ServerDescription, SessionKind, SessionState, Substate},
    pb, wire,
};

/// A wall-clock time as unix microseconds (saturating far outside the
/// years any broker runs in).
pub(super) fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

/// The wall-clock time of unix microseconds, if the platform can hold it.
pub(super) fn time_from_micros(m: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_micros(m.unsigned_abs());
    if m >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
}

pub(super) fn hold_kind_name(kind: HoldKind) -> &'static str {
    match kind {
        HoldKind::Closed => "CLOSED",
    }
}

pub(super) fn hold_kind_from_name(name: &str) -> Option<HoldKind> {
    match name {
        "CLOSED" => Some(HoldKind::Closed),
        _ => None,
    }
}

pub(super) fn session_kind_name(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::Console => "CONSOLE",
        SessionKind::Virtual => "VIRTUAL",
    }
}

pub(super) fn session_kind_from_name(name: &str) -> Option<SessionKind> {
    match name {
        "CONSOLE" => Some(SessionKind::Console),
        "VIRTUAL" => Some(SessionKind::Virtual),
        _ => None,
    }
}

pub(super) fn state_name(state: SessionState) -> &'static str {
    match state {
        SessionState::Creating => "CREATING",
        SessionState::Ready => "READY",
        SessionState::Deleting => "DELETING",
        SessionState::Deleted => "DELETED",
        SessionState::Unknown => "UNKNOWN",
    }
}

pub(super) fn state_from_name(name: &str) -> Option<SessionState> {
    match name {
        "CREATING" => Some(SessionState::Creating),
        "READY" => Some(SessionState::Ready),
        "DELETING" => Some(SessionState::Deleting),
        "DELETED" => Some(SessionState::Deleted),
        "UNKNOWN" => Some(SessionState::Unknown),
        _ => None,
    }
}

pub(super) fn substate_name(substate: Substate) -> &'static str {
    match substate {
        Substate::Placing => "PLACING",
        Substate::PendingPreparation => "PENDING_PREPARATION",
    }
}

pub(super) fn substate_from_name(name: &str) -> Option<Substate> {
    match name {
        "PLACING" => Some(Substate::Placing),
        "PENDING_PREPARATION" => Some(Substate::PendingPreparation),
        _ => None,
    }
}

/// A description as the registration an agent would send for it. The id
/// is left out: it is the row's key.
pub(super) fn encode_description(d: &ServerDescription) -> Vec<u8> {
    wire::registration_to_pb("", d).encode_to_vec()
}

/// A stored description, checked as a registration is.
pub(super) fn decode_description(bytes: &[u8]) -> Result<ServerDescription, String> {
    let request = pb::RegisterServerRequest::decode(bytes).map_err(|e| e.to_string())?;
    wire::registration_from_pb(request)
        .map(|(_, description)| description)
        .map_err(|e| e.to_string())
}

/// A creation request as the CreateSessions item it came from.
pub(super) fn encode_request(spec: &CreateSpec) -> Vec<u8> {
    wire::create_spec_to_pb(spec).encode_to_vec()
}

/// A stored creation request.
pub(super) fn decode_request(bytes: &[u8]) -> Result<CreateSpec, String> {
    pb::CreateSessionRequestData::decode(bytes)
        .map(|data| wire::create_spec_from_pb(&data))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_at_microsecond_precision() {
        for m in [0, 1, -1, 1_700_000_000_123_456, -86_400_000_000] {
            assert_eq!(micros(time_from_micros(m).unwrap()), m);
        }
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(micros(t), 1_700_000_000_123_456);
    }

    #[test]
    fn enum_names_round_trip() {
        for kind in [SessionKind::Console, SessionKind::Virtual] {
            assert_eq!(session_kind_from_name(session_kind_name(kind)), Some(kind));
        }
        for state in [
            SessionState::Creating,
            SessionState::Ready,
            SessionState::Deleting,
            SessionState::Deleted,
            SessionState::Unknown,
        ] {
            assert_eq!(state_from_name(state_name(state)), Some(state));
        }
        for substate in [Substate::Placing, Substate::PendingPreparation] {
            assert_eq!(substate_from_name(substate_name(substate)), Some(substate));
        }
        assert_eq!(
            hold_kind_from_name(hold_kind_name(HoldKind::Closed)),
            Some(HoldKind::Closed)
        );
        assert_eq!(state_from_name("ready"), None);
    }

    #[test]
    fn descriptions_and_requests_round_trip() {
        for i in 0..12 {
            let d = crate::sample::description(i);
            assert_eq!(decode_description(&encode_description(&d)), Ok(d));
        }
        let spec = CreateSpec {
            name: "n".into(),
            owner: "o".into(),
            kind: None,
            max_concurrent_clients: Some(0),
            autorun_file_arguments: vec!["a".into(), String::new()],
            ..CreateSpec::default()
        };
        assert_eq!(decode_request(&encode_request(&spec)), Ok(spec));
    }
}
