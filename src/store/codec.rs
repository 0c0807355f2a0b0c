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

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prost::Message as _;

use crate::{
    fleet::{
        CreateSpec, DrainSpec, Heartbeat, HoldKind, MemoryUsage, OnDeadline, ServerDescription,
        SessionKind, SessionState, Substate, holds,
        persist::{AuditItem, StoredLiveness},
    },
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

/// An audit record's items as stored: a JSON array of objects, readable
/// by `sqlite3` and `psql` alike (and by PostgreSQL's JSON operators).
pub(super) fn encode_audit_items(items: &[AuditItem]) -> String {
    let items: Vec<_> = items
        .iter()
        .map(|i| serde_json::json!({"id": i.id, "outcome": i.outcome, "reason": i.reason}))
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// The items of a stored audit record.
pub(super) fn decode_audit_items(text: &str) -> Result<Vec<AuditItem>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("audit items: {e}"))?;
    let items = value.as_array().ok_or("audit items: not a JSON array")?;
    let text = |item: &serde_json::Value, key: &str| {
        item.get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("audit item without {key}"))
    };
    items
        .iter()
        .map(|item| {
            Ok(AuditItem {
                id: text(item, "id")?,
                outcome: text(item, "outcome")?,
                reason: text(item, "reason")?,
            })
        })
        .collect()
}

/// A hold's drain as stored: a JSON object (`id`, `deadline` in unix
/// microseconds or null, `on_deadline` by its name), one nullable column
/// that both stores read alike.
pub(super) fn encode_drain(drain: &DrainSpec) -> String {
    serde_json::json!({
        "id": &*drain.id,
        "deadline": drain.deadline.map(micros),
        "on_deadline": on_deadline_name(drain.on_deadline),
    })
    .to_string()
}

/// The drain of a stored hold, checked: its id a UUID, its deadline a
/// time, its action a known name.
pub(super) fn decode_drain(text: &str) -> Result<DrainSpec, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("drain: {e}"))?;
    let id = value
        .get("id")
        .and_then(serde_json::Value::as_str)
        .filter(|id| uuid::Uuid::try_parse(id).is_ok())
        .ok_or("drain: no UUID id")?;
    let deadline = match value.get("deadline") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .and_then(time_from_micros)
                .ok_or("drain: deadline is not a time")?,
        ),
    };
    let on_deadline = value
        .get("on_deadline")
        .and_then(serde_json::Value::as_str)
        .and_then(on_deadline_from_name)
        .ok_or("drain: unknown on_deadline")?;
    Ok(DrainSpec {
        id: Arc::from(id),
        deadline,
        on_deadline,
    })
}

fn on_deadline_name(on: OnDeadline) -> &'static str {
    match on {
        OnDeadline::Report => "REPORT",
        OnDeadline::DeleteSessions => "DELETE_SESSIONS",
    }
}

fn on_deadline_from_name(name: &str) -> Option<OnDeadline> {
    match name {
        "REPORT" => Some(OnDeadline::Report),
        "DELETE_SESSIONS" => Some(OnDeadline::DeleteSessions),
        _ => None,
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

/// A stored hold's name, checked as CloseServers checks one: a name no
/// request could have placed means the row was damaged.
pub(super) fn hold_name_from_column(name: &str) -> Result<Arc<str>, String> {
    holds::validate_hold_name(name)?;
    Ok(Arc::from(name))
}

/// A server's state version as a column value (the columns are signed).
pub(super) fn state_version_column(version: u64) -> Result<i64, String> {
    i64::try_from(version).map_err(|_| format!("state version {version} out of range"))
}

/// A server's state version from its column value.
pub(super) fn state_version_from_column(column: i64) -> Result<u64, String> {
    u64::try_from(column).map_err(|_| format!("negative ({column})"))
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

/// A session row's columns that both stores keep in a form of their own
/// (a name, encoded bytes, a signed integer), turned back into the
/// session's values; a refusal names its column.
pub(super) struct SessionColumns {
    pub substate: Option<Substate>,
    pub request: Option<CreateSpec>,
    pub queue_position: Option<u64>,
    pub deletions: u32,
}

impl SessionColumns {
    pub(super) fn decode(
        substate: Option<String>,
        request: Option<Vec<u8>>,
        queue_position: Option<i64>,
        deletions: i64,
    ) -> Result<SessionColumns, (&'static str, String)> {
        let substate = substate
            .map(|name| {
                substate_from_name(&name)
                    .ok_or_else(|| ("substate", format!("unknown value {name:?}")))
            })
            .transpose()?;
        let request = request
            .map(|bytes| decode_request(&bytes).map_err(|e| ("request does not decode", e)))
            .transpose()?;
        let queue_position = queue_position
            .map(|p| u64::try_from(p).map_err(|_| ("queue_position", "negative".to_owned())))
            .transpose()?;
        let deletions =
            u32::try_from(deletions).map_err(|_| ("deletions", "out of range".to_owned()))?;
        Ok(SessionColumns {
            substate,
            request,
            queue_position,
            deletions,
        })
    }
}

/// A heartbeat as the request an agent would send for it, so that the
/// change log passes it on in the published encoding and a follower checks
/// it exactly as the leader checked the agent's.
pub(super) fn heartbeat_to_pb(id: &str, h: &Heartbeat) -> pb::HeartbeatRequest {
    let time = |t: Option<SystemTime>| t.map(prost_types::Timestamp::from);
    pb::HeartbeatRequest {
        server_id: id.to_owned(),
        dcv_server_healthy: h.dcv_server_healthy,
        logged_in_users: h
            .logged_in_users
            .iter()
            .map(|u| pb::LoggedInUser {
                username: u.clone(),
            })
            .collect(),
        sessions: h
            .sessions
            .iter()
            .map(|s| pb::AgentSession {
                id: s.id.clone(),
                owner: s.owner.clone(),
                r#type: match s.kind {
                    SessionKind::Console => pb::SessionType::Console,
                    SessionKind::Virtual => pb::SessionType::Virtual,
                } as i32,
                state: match s.state {
                    SessionState::Creating => pb::SessionState::Creating,
                    SessionState::Ready => pb::SessionState::Ready,
                    SessionState::Deleting => pb::SessionState::Deleting,
                    SessionState::Deleted => pb::SessionState::Deleted,
                    SessionState::Unknown => pb::SessionState::Unknown,
                } as i32,
                num_of_connections: i32::try_from(s.details.connections).unwrap_or(i32::MAX),
                last_disconnection_time: time(s.details.last_disconnection),
                creation_time: time(s.details.created_at),
                name: s.details.name.clone(),
            })
            .collect(),
        cpu_load_average: h.cpu_load_average.map(|l| pb::CpuLoadAverage {
            one_minute: l.one_minute,
            five_minutes: l.five_minutes,
            fifteen_minutes: l.fifteen_minutes,
        }),
        memory: h.memory.map(memory_to_pb),
        swap: h.swap.map(memory_to_pb),
    }
}

fn memory_to_pb(m: MemoryUsage) -> pb::MemoryInfo {
    pb::MemoryInfo {
        total_bytes: m.total_bytes,
        used_bytes: m.used_bytes,
    }
}

/// A group's heartbeats, for the change log: each its arrival time (unix
/// microseconds, 8 bytes big-endian) and its request, length-delimited.
pub(super) fn encode_liveness(records: &[&StoredLiveness]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        out.extend_from_slice(&micros(record.last_seen).to_be_bytes());
        let request = heartbeat_to_pb(&record.id, &record.heartbeat);
        // Writing into a Vec cannot run out of room.
        let _ = request.encode_length_delimited(&mut out);
    }
    out
}

/// The heartbeats of a change-log row; a record that does not decode or
/// that the API would refuse fails the whole row.
pub(super) fn decode_liveness(mut bytes: &[u8]) -> Result<Vec<StoredLiveness>, String> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let Some((time, rest)) = bytes.split_first_chunk::<8>() else {
            return Err("a heartbeat record is cut short".into());
        };
        let last_seen = time_from_micros(i64::from_be_bytes(*time))
            .ok_or("a heartbeat's time is out of range")?;
        bytes = rest;
        let request =
            pb::HeartbeatRequest::decode_length_delimited(&mut bytes).map_err(|e| e.to_string())?;
        let (id, heartbeat) = wire::heartbeat_from_pb(request).map_err(|e| e.to_string())?;
        records.push(StoredLiveness {
            id,
            last_seen,
            heartbeat,
        });
    }
    Ok(records)
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
    fn state_versions_and_hold_names_are_checked_both_ways() {
        for v in [0, 1, i64::MAX as u64] {
            assert_eq!(
                state_version_from_column(state_version_column(v).unwrap()),
                Ok(v)
            );
        }
        assert!(state_version_column(u64::MAX).is_err());
        assert!(state_version_from_column(-1).is_err());
        assert_eq!(
            hold_name_from_column("team:ops-1").as_deref(),
            Ok("team:ops-1")
        );
        assert!(hold_name_from_column("").is_err());
        assert!(hold_name_from_column("two words").is_err());
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

    #[test]
    fn heartbeats_round_trip() {
        use crate::fleet::{LoadAverage, ReportedDetails, ReportedSession};
        let full = StoredLiveness {
            id: "s1".into(),
            last_seen: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            heartbeat: Heartbeat {
                dcv_server_healthy: true,
                logged_in_users: vec!["alice".into(), "bob".into()],
                sessions: vec![ReportedSession {
                    id: "a".into(),
                    owner: "alice".into(),
                    kind: SessionKind::Virtual,
                    state: SessionState::Ready,
                    details: ReportedDetails {
                        connections: 2,
                        last_disconnection: Some(UNIX_EPOCH + Duration::from_secs(5)),
                        created_at: Some(UNIX_EPOCH + Duration::from_secs(3)),
                        name: "desk".into(),
                    },
                }],
                cpu_load_average: Some(LoadAverage {
                    one_minute: 0.5,
                    five_minutes: 1.0,
                    fifteen_minutes: 1.5,
                }),
                memory: Some(MemoryUsage {
                    total_bytes: 10,
                    used_bytes: 4,
                }),
                swap: None,
            },
        };
        let empty = StoredLiveness {
            id: "s2".into(),
            last_seen: UNIX_EPOCH,
            heartbeat: Heartbeat::default(),
        };
        let bytes = encode_liveness(&[&full, &empty]);
        assert_eq!(decode_liveness(&bytes), Ok(vec![full, empty]));
        assert_eq!(decode_liveness(&[]), Ok(vec![]));
        assert!(decode_liveness(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_liveness(&bytes[..3]).is_err());
    }
}
