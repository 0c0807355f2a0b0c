//! Checks of servers' and agents' input that need no state: ids, reasons,
//! batch sizes, descriptions and heartbeats.

use std::collections::HashSet;

use super::{
    error::{FailureCode, FieldViolation, FleetError, ItemFailure},
    model::{self, FastSet, Heartbeat, OsFamily, ServerDescription, SessionKind, SessionState},
};

/// The most items one CloseServers or OpenServers batch may carry, as in
/// DCV's batch APIs: bounded work per request and per write-lock hold.
pub const MAX_BATCH_ITEMS: usize = 1000;

/// The longest descriptive string an agent may send (host names, versions,
/// tag values, ...), in bytes: generous for real values, small enough that
/// one agent cannot bloat the broker's memory.
pub const MAX_TEXT_BYTES: usize = 1024;
/// The most custom tags per server.
pub const MAX_TAGS: usize = 256;
/// The most endpoints per server.
pub const MAX_ENDPOINTS: usize = 32;
/// The most GPUs per server.
pub const MAX_GPUS: usize = 64;
/// The most sessions one heartbeat may report.
pub const MAX_REPORTED_SESSIONS: usize = 10_000;
/// The most logged-in users one heartbeat may report.
pub const MAX_LOGGED_IN_USERS: usize = 1024;
/// The most connections one session may report: far above what a DCV
/// server admits (`--max-concurrent-clients` goes to 100), so only a
/// broken or hostile agent hits it.
pub const MAX_SESSION_CONNECTIONS: u32 = 10_000;

/// Checks a server id's shape; the error says what is wrong (without the
/// field name, which the caller adds where it helps).
pub fn validate_server_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        Err("must not be empty".into())
    } else if id.len() > model::MAX_SERVER_ID_BYTES {
        Err(format!(
            "must be at most {} bytes; got {}",
            model::MAX_SERVER_ID_BYTES,
            id.len()
        ))
    } else if id.contains('\0') {
        Err(NUL_REFUSED.into())
    } else {
        Ok(())
    }
}

/// Why text with a NUL character is refused. No DCV id or name holds one,
/// and a store may not be able to keep it (PostgreSQL's TEXT cannot): a
/// value the store refuses would stop the broker, so it is refused here.
pub(in crate::fleet) const NUL_REFUSED: &str = "must not contain NUL characters";

pub(in crate::fleet) fn validate_reason(reason: &str) -> Result<(), String> {
    let chars = reason.chars().count();
    if chars > model::MAX_REASON_CHARS {
        Err(format!(
            "Reason must be at most {} characters; got {chars}.",
            model::MAX_REASON_CHARS
        ))
    } else if reason.chars().any(|c| c.is_control() && c != '\t') {
        Err("Reason must not contain control characters other than tab.".into())
    } else if reason.chars().any(is_bidi_control) {
        Err("Reason must not contain Unicode bidirectional control characters.".into())
    } else {
        Ok(())
    }
}

/// Bidirectional overrides, isolates and marks can make a reason display
/// as something other than what it says, in logs and terminals ("Trojan
/// Source"); nobody needs them in a sentence about maintenance. The set is
/// Unicode's Bidi_Control property, from regex-syntax's tables, so that it
/// follows the standard rather than a list copied by hand.
fn is_bidi_control(c: char) -> bool {
    static BIDI_CONTROL: std::sync::LazyLock<Vec<(char, char)>> = std::sync::LazyLock::new(|| {
        use regex_syntax::hir::{Class, HirKind};
        match regex_syntax::parse(r"\p{Bidi_Control}").map(|hir| hir.into_kind()) {
            Ok(HirKind::Class(Class::Unicode(class))) => class
                .ranges()
                .iter()
                .map(|r| (r.start(), r.end()))
                .collect(),
            // Cannot happen with the tables compiled in; a test checks the
            // set against the property's definition.
            _ => Vec::new(),
        }
    });
    BIDI_CONTROL
        .binary_search_by(|&(start, end)| {
            if end < c {
                std::cmp::Ordering::Less
            } else if start > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Checks a batch's size; `field` is the request's repeated field. The
/// API calls it before it converts a single item, so that a request naming
/// millions of empty items costs nothing per item.
pub fn validate_batch_size(field: &str, len: usize) -> Result<(), FleetError> {
    validate_batch_size_up_to(field, len, MAX_BATCH_ITEMS)
}

/// [`validate_batch_size`] for a batch whose items cost more than most,
/// with its own bound `max`.
pub fn validate_batch_size_up_to(field: &str, len: usize, max: usize) -> Result<(), FleetError> {
    if len == 0 || len > max {
        return Err(FleetError::invalid(
            field,
            format!("must hold 1 to {max} items; got {len}"),
        ));
    }
    Ok(())
}

/// Per-item checks of a servers batch that need no state.
pub(in crate::fleet) fn precheck<'a>(
    ids: impl Iterator<Item = &'a str>,
) -> Vec<Option<ItemFailure>> {
    precheck_ids(
        ids,
        "ServerId",
        validate_server_id,
        FailureCode::InvalidServerId,
        FailureCode::DuplicateServerId,
    )
}

/// Per-item id checks of any batch: the id's shape (`check`), then
/// repeats. Returns, in order, `None` for items to apply and the failure of
/// the others; an id's first occurrence counts even when it fails later.
pub(in crate::fleet) fn precheck_ids<'a>(
    ids: impl Iterator<Item = &'a str>,
    field: &str,
    check: impl Fn(&str) -> Result<(), String>,
    invalid: FailureCode,
    duplicate: FailureCode,
) -> Vec<Option<ItemFailure>> {
    // Sized up front: growing the set while a batch of 1,000 is checked
    // rehashes it several times.
    let mut seen = FastSet::with_capacity_and_hasher(ids.size_hint().0, Default::default());
    ids.map(|id| {
        if let Err(why) = check(id) {
            Some(ItemFailure::new(invalid, format!("{field} {why}.")))
        } else if !seen.insert(id) {
            Some(ItemFailure::new(
                duplicate,
                format!(
                    "{field} appears earlier in this batch; only its first occurrence is processed."
                ),
            ))
        } else {
            None
        }
    })
    .collect()
}

fn check_text(field: &str, value: &str, violations: &mut Vec<FieldViolation>) {
    if value.contains('\0') {
        violations.push(FieldViolation::new(field, NUL_REFUSED));
    }
    if value.len() > MAX_TEXT_BYTES {
        violations.push(FieldViolation::new(
            field,
            format!(
                "must be at most {MAX_TEXT_BYTES} bytes; got {}",
                value.len()
            ),
        ));
    }
}

/// Refuses lists longer than their limits, each given as (field, length,
/// most allowed). Callers check lengths before they build or check
/// anything per item: a request small on the wire can name millions of
/// empty items, and work or violations per item would then cost memory
/// and time in proportion to what the limit exists to refuse.
pub fn check_lengths(lists: &[(&str, usize, usize)]) -> Result<(), FleetError> {
    let mut violations = Vec::new();
    for &(field, len, max) in lists {
        check_count(field, len, max, &mut violations);
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(FleetError::InvalidArgument(violations))
    }
}

fn check_count(field: &str, len: usize, max: usize, violations: &mut Vec<FieldViolation>) -> bool {
    if len > max {
        violations.push(FieldViolation::new(
            field,
            format!("at most {max} items; got {len}"),
        ));
        return false;
    }
    true
}

pub(in crate::fleet) fn validate_description(
    d: &ServerDescription,
    violations: &mut Vec<FieldViolation>,
) {
    for (field, value) in [
        ("Ip", &d.ip),
        ("Hostname", &d.hostname),
        ("DefaultDnsName", &d.default_dns_name),
        ("Version", &d.version),
        ("SessionManagerAgentVersion", &d.agent_version),
        ("Host.Os.Name", &d.host.os.name),
        ("Host.Os.Version", &d.host.os.version),
        ("Host.Os.KernelVersion", &d.host.os.kernel_version),
        ("Host.Os.BuildNumber", &d.host.os.build_number),
        ("Host.CpuInfo.Vendor", &d.host.cpu_info.vendor),
        ("Host.CpuInfo.ModelName", &d.host.cpu_info.model_name),
        ("Host.CpuInfo.Architecture", &d.host.cpu_info.architecture),
    ] {
        check_text(field, value, violations);
    }
    if let Some(aws) = &d.host.aws {
        for (field, value) in [
            ("Host.Aws.Region", &aws.region),
            ("Host.Aws.EC2InstanceType", &aws.ec2_instance_type),
            ("Host.Aws.EC2InstanceId", &aws.ec2_instance_id),
            ("Host.Aws.EC2ImageId", &aws.ec2_image_id),
        ] {
            check_text(field, value, violations);
        }
    }
    if d.host.os.family != OsFamily::Linux && d.max_virtual_sessions != 0 {
        violations.push(FieldViolation::new(
            "MaxVirtualSessions",
            format!(
                "must be 0 on {}: only Linux runs virtual sessions",
                d.host.os.family.as_str()
            ),
        ));
    }
    if check_count("Endpoints", d.endpoints.len(), MAX_ENDPOINTS, violations) {
        for (i, e) in d.endpoints.iter().enumerate() {
            check_text(
                &format!("Endpoints[{i}].IpAddress"),
                &e.ip_address,
                violations,
            );
            check_text(
                &format!("Endpoints[{i}].WebUrlPath"),
                &e.web_url_path,
                violations,
            );
        }
    }
    if check_count("Host.Gpus", d.host.gpus.len(), MAX_GPUS, violations) {
        for (i, g) in d.host.gpus.iter().enumerate() {
            check_text(&format!("Host.Gpus[{i}].Vendor"), &g.vendor, violations);
            check_text(
                &format!("Host.Gpus[{i}].ModelName"),
                &g.model_name,
                violations,
            );
        }
    }
    if check_count("Tags", d.tags.len(), MAX_TAGS, violations) {
        for (i, t) in d.tags.iter().enumerate() {
            if t.key.is_empty() {
                violations.push(FieldViolation::new(
                    format!("Tags[{i}].Key"),
                    "must not be empty",
                ));
            } else if t.key.starts_with("dcv:") {
                violations.push(FieldViolation::new(
                    format!("Tags[{i}].Key"),
                    "keys starting with dcv: are reserved for built-in tags",
                ));
            }
            check_text(&format!("Tags[{i}].Key"), &t.key, violations);
            check_text(&format!("Tags[{i}].Value"), &t.value, violations);
        }
    }
}

pub(in crate::fleet) fn validate_heartbeat(h: &Heartbeat, violations: &mut Vec<FieldViolation>) {
    if check_count(
        "LoggedInUsers",
        h.logged_in_users.len(),
        MAX_LOGGED_IN_USERS,
        violations,
    ) {
        for (i, u) in h.logged_in_users.iter().enumerate() {
            check_text(&format!("LoggedInUsers[{i}].Username"), u, violations);
        }
    }
    if check_count(
        "Sessions",
        h.sessions.len(),
        MAX_REPORTED_SESSIONS,
        violations,
    ) {
        let mut ids = HashSet::new();
        let mut consoles = 0;
        for (i, s) in h.sessions.iter().enumerate() {
            if s.id.is_empty() {
                violations.push(FieldViolation::new(
                    format!("Sessions[{i}].Id"),
                    "must not be empty",
                ));
            } else if !ids.insert(s.id.as_str()) {
                violations.push(FieldViolation::new(
                    format!("Sessions[{i}].Id"),
                    "is reported twice",
                ));
            }
            if s.kind == SessionKind::Console && s.state != SessionState::Deleted {
                consoles += 1;
                if consoles == 2 {
                    violations.push(FieldViolation::new(
                        format!("Sessions[{i}].Type"),
                        "a server runs at most one console session",
                    ));
                }
            }
            check_text(&format!("Sessions[{i}].Id"), &s.id, violations);
            check_text(&format!("Sessions[{i}].Owner"), &s.owner, violations);
            check_text(&format!("Sessions[{i}].Name"), &s.details.name, violations);
            if s.details.connections > MAX_SESSION_CONNECTIONS {
                violations.push(FieldViolation::new(
                    format!("Sessions[{i}].NumOfConnections"),
                    format!(
                        "must be at most {MAX_SESSION_CONNECTIONS}; got {}",
                        s.details.connections
                    ),
                ));
            }
        }
    }
}

/// The longest failure reason kept from an agent, in characters: room for
/// a tool's error message, not for its whole output.
pub const MAX_AGENT_REASON_CHARS: usize = 1024;

/// An agent's text made safe to show: control characters dropped (a
/// terminal or a log must not be driven by what an agent says), at most
/// [`MAX_AGENT_REASON_CHARS`] characters.
pub fn agent_text(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_AGENT_REASON_CHARS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unicode's definition of Bidi_Control (PropList.txt).
    fn defined_bidi_control(c: char) -> bool {
        matches!(u32::from(c), 0x061C | 0x200E | 0x200F | 0x202A..=0x202E | 0x2066..=0x2069)
    }

    #[test]
    fn bidi_control_is_the_unicode_property_for_every_char() {
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            assert_eq!(
                is_bidi_control(c),
                defined_bidi_control(c),
                "U+{:04X}",
                u32::from(c)
            );
        }
    }

    #[test]
    fn a_reason_with_any_bidi_control_is_refused() {
        for c in ['\u{061C}', '\u{200E}', '\u{202E}', '\u{2069}'] {
            assert!(validate_reason(&format!("maintenance {c}window")).is_err());
        }
        assert!(validate_reason("maintenance\twindow, مرحبا").is_ok());
    }
}
