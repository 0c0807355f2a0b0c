//! Checks of session requests that need no state, and whether a server
//! has room for a session.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use tokio::time::Instant;

use super::{
    CreateSpec, MAX_AUTORUN_ARGUMENT_CHARS, MAX_AUTORUN_ARGUMENTS, MAX_CONCURRENT_CLIENTS,
    MAX_NAME_CHARS, MAX_PATH_CHARS, MAX_PERMISSIONS_BYTES, MAX_SESSION_ID_BYTES, Order,
    SESSION_NOT_FOUND_TEXT,
};
use crate::fleet::{
    availability,
    error::{FailureCode, ItemFailure},
    model::{OsFamily, ServerRecord, SessionKind},
    requirements::Requirements,
    validate::{NUL_REFUSED, precheck_ids},
};

pub(in crate::fleet) fn check_session_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        Err("must not be empty".into())
    } else if id.len() > MAX_SESSION_ID_BYTES {
        Err(format!(
            "must be at most {MAX_SESSION_ID_BYTES} bytes; got {}",
            id.len()
        ))
    } else if id.contains('\0') {
        Err(NUL_REFUSED.into())
    } else {
        Ok(())
    }
}

pub(in crate::fleet) fn check_name(what: &str, value: &str) -> Result<(), String> {
    let chars = value.chars().count();
    if chars == 0 {
        Err(format!("{what} is required."))
    } else if chars > MAX_NAME_CHARS {
        Err(format!(
            "{what} must be at most {MAX_NAME_CHARS} characters; got {chars}."
        ))
    } else if value.chars().any(char::is_control) {
        Err(format!("{what} must not contain control characters."))
    } else {
        Ok(())
    }
}

fn check_path(what: &str, value: &str) -> Result<(), String> {
    let chars = value.chars().count();
    if chars > MAX_PATH_CHARS {
        Err(format!(
            "{what} must be at most {MAX_PATH_CHARS} characters; got {chars}."
        ))
    } else if value.chars().any(char::is_control) {
        Err(format!("{what} must not contain control characters."))
    } else {
        Ok(())
    }
}

pub(in crate::fleet) fn check_permissions(value: &str) -> Result<(), String> {
    let decoded = STANDARD
        .decode(value)
        .map_err(|_| "PermissionsFile must be base64.".to_string())?;
    if decoded.len() > MAX_PERMISSIONS_BYTES {
        return Err(format!(
            "PermissionsFile must be at most {MAX_PERMISSIONS_BYTES} bytes decoded; got {}.",
            decoded.len()
        ));
    }
    Ok(())
}

pub(in crate::fleet) fn invalid(why: String) -> ItemFailure {
    ItemFailure::new(FailureCode::InvalidSessionParameter, why)
}

/// Validates one creation request; the failure says which field.
pub fn validate_create(spec: &CreateSpec) -> Result<Order, ItemFailure> {
    check_name("Name", &spec.name).map_err(invalid)?;
    check_name("Owner", &spec.owner).map_err(invalid)?;
    let kind = spec
        .kind
        .ok_or_else(|| invalid("Type is required: CONSOLE or VIRTUAL.".into()))?;
    let virtual_only = |what: &str, set: bool| {
        if set && kind == SessionKind::Console {
            Err(invalid(format!("{what} applies to VIRTUAL sessions only.")))
        } else {
            Ok(())
        }
    };
    virtual_only("InitFile", !spec.init_file.is_empty())?;
    virtual_only("DcvGlEnabled", spec.dcv_gl_enabled)?;
    virtual_only(
        "AutorunFileArguments",
        !spec.autorun_file_arguments.is_empty(),
    )?;
    check_path("InitFile", &spec.init_file).map_err(invalid)?;
    check_path("AutorunFile", &spec.autorun_file).map_err(invalid)?;
    check_path("StorageRoot", &spec.storage_root).map_err(invalid)?;
    let max_concurrent_clients = match spec.max_concurrent_clients {
        None => 0,
        Some(n) if (1..=MAX_CONCURRENT_CLIENTS).contains(&n) => n as u32,
        Some(n) => {
            return Err(invalid(format!(
                "MaxConcurrentClients must be 1 to {MAX_CONCURRENT_CLIENTS}; got {n}."
            )));
        }
    };
    if spec.autorun_file_arguments.len() > MAX_AUTORUN_ARGUMENTS {
        return Err(invalid(format!(
            "AutorunFileArguments may hold at most {MAX_AUTORUN_ARGUMENTS} arguments; got {}.",
            spec.autorun_file_arguments.len()
        )));
    }
    for (i, arg) in spec.autorun_file_arguments.iter().enumerate() {
        let chars = arg.chars().count();
        if chars > MAX_AUTORUN_ARGUMENT_CHARS || arg.chars().any(char::is_control) {
            return Err(invalid(format!(
                "AutorunFileArguments[{i}] must be at most {MAX_AUTORUN_ARGUMENT_CHARS} characters without control characters."
            )));
        }
    }
    if !spec.autorun_file_arguments.is_empty() && spec.autorun_file.is_empty() {
        return Err(invalid("AutorunFileArguments needs an AutorunFile.".into()));
    }
    if !spec.permissions_file.is_empty() {
        check_permissions(&spec.permissions_file).map_err(invalid)?;
    }
    let requirements = if spec.requirements.trim().is_empty() {
        None
    } else {
        Some(Requirements::parse(&spec.requirements).map_err(|e| {
            ItemFailure::new(
                FailureCode::InvalidRequirements,
                format!("Requirements {e}."),
            )
        })?)
    };
    Ok(Order {
        name: spec.name.clone(),
        owner: spec.owner.clone(),
        kind,
        init_file: spec.init_file.clone(),
        max_concurrent_clients,
        dcv_gl_enabled: spec.dcv_gl_enabled,
        autorun_file: spec.autorun_file.clone(),
        autorun_file_arguments: spec.autorun_file_arguments.clone(),
        storage_root: spec.storage_root.clone(),
        requirements,
        enqueue: spec.enqueue,
        disable_retry: spec.disable_retry,
    })
}

/// Whether `server` can take a session of `order` now.
#[cfg(test)]
pub(in crate::fleet) fn can_take(
    server: &ServerRecord,
    order: &Order,
    now: Instant,
    unreachable_after: Duration,
) -> bool {
    has_room(server, order, now, unreachable_after)
        && order
            .requirements
            .as_ref()
            .is_none_or(|r| r.matches(server))
}

/// Whether `server` could take some session now (ignoring the per-user
/// limit and Requirements): a full or unavailable server makes a check of
/// the queue cost nothing.
pub(in crate::fleet) fn room_for_any(
    server: &ServerRecord,
    now: Instant,
    unreachable_after: Duration,
) -> bool {
    if !availability::reasons(server, now, unreachable_after).is_available() {
        return false;
    }
    let (consoles, virtuals) = server.session_counts();
    consoles + virtuals == 0
        || (server.description.host.os.family == OsFamily::Linux
            && consoles == 0
            && virtuals < server.description.max_virtual_sessions)
}

/// Whether `server` can take a session of `order` now, Requirements
/// aside: the cheap checks, done first.
pub(in crate::fleet) fn has_room(
    server: &ServerRecord,
    order: &Order,
    now: Instant,
    unreachable_after: Duration,
) -> bool {
    if !availability::reasons(server, now, unreachable_after).is_available() {
        return false;
    }
    let (consoles, virtuals) = server.session_counts();
    let fits = match order.kind {
        SessionKind::Console => consoles + virtuals == 0,
        SessionKind::Virtual => {
            server.description.host.os.family == OsFamily::Linux
                && consoles == 0
                && virtuals < server.description.max_virtual_sessions
        }
    };
    if !fits {
        return false;
    }
    let per_user = server.description.max_concurrent_sessions_per_user;
    if per_user > 0
        && server
            .live_sessions()
            .filter(|s| s.owner == order.owner)
            .count()
            >= per_user as usize
    {
        return false;
    }
    true
}

pub(in crate::fleet) fn dedupe_ids<'a>(
    ids: impl Iterator<Item = &'a str>,
) -> Vec<Option<ItemFailure>> {
    precheck_ids(
        ids,
        "SessionId",
        check_session_id,
        FailureCode::InvalidSessionParameter,
        FailureCode::DuplicateSessionId,
    )
}

pub(in crate::fleet) fn not_found() -> ItemFailure {
    ItemFailure::new(FailureCode::SessionNotFound, SESSION_NOT_FOUND_TEXT)
}
