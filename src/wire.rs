//! Conversions between the protobuf contract and the domain, used by the
//! gRPC adapters (`api`) and by the store, which keeps descriptions and
//! creation requests in their wire encoding. Incoming messages are checked
//! here for what only the wire can get wrong (enum numbers, negative
//! counts, missing required parts); everything else is the domain's to
//! judge. Nothing here knows about gRPC statuses: that mapping is `api`'s.

use prost_types::Timestamp;

use crate::{
    fleet::{self, FieldViolation, FleetError, ServerView},
    pb,
};

fn enum_violation(field: &str, value: i32) -> FieldViolation {
    FieldViolation::new(field, format!("unknown or unspecified enum value {value}"))
}

fn non_negative(field: &str, value: i32, violations: &mut Vec<FieldViolation>) -> u32 {
    u32::try_from(value).unwrap_or_else(|_| {
        violations.push(FieldViolation::new(
            field,
            format!("must not be negative; got {value}"),
        ));
        0
    })
}

/// A timestamp from the wire; a violation of `field` if it is not one
/// (nanos out of range, or a time this platform cannot hold).
fn time_from_pb(
    field: &str,
    t: Option<Timestamp>,
    violations: &mut Vec<FieldViolation>,
) -> Option<std::time::SystemTime> {
    let t = t?;
    let (seconds, nanos) = (t.seconds, t.nanos);
    if !(0..1_000_000_000).contains(&nanos) {
        violations.push(FieldViolation::new(
            field,
            format!("not a valid timestamp: nanos {nanos} out of range"),
        ));
        return None;
    }
    std::time::SystemTime::try_from(t)
        .map_err(|_| {
            violations.push(FieldViolation::new(
                field,
                format!("not a valid timestamp: {seconds} seconds"),
            ));
        })
        .ok()
}

/// A DrainServers request as the fleet takes it: its deadline one of
/// Deadline and DeadlineIn, its OnDeadline a known value.
pub fn drain_request_from_pb(
    r: pb::DrainServersRequest,
) -> Result<fleet::DrainRequest, FleetError> {
    let mut violations = Vec::new();
    let deadline = match (r.deadline, r.deadline_in) {
        (None, None) => fleet::DrainDeadline::None,
        (Some(_), Some(_)) => {
            violations.push(FieldViolation::new(
                "DeadlineIn",
                "give Deadline or DeadlineIn, not both",
            ));
            fleet::DrainDeadline::None
        }
        (Some(t), None) => time_from_pb("Deadline", Some(t), &mut violations)
            .map_or(fleet::DrainDeadline::None, fleet::DrainDeadline::At),
        (None, Some(d)) => match std::time::Duration::try_from(d) {
            Ok(d) => fleet::DrainDeadline::In(d),
            Err(_) => {
                violations.push(FieldViolation::new("DeadlineIn", "must be positive"));
                fleet::DrainDeadline::None
            }
        },
    };
    let on_deadline = match pb::OnDeadline::try_from(r.on_deadline) {
        Ok(pb::OnDeadline::Unspecified | pb::OnDeadline::Report) => fleet::OnDeadline::Report,
        Ok(pb::OnDeadline::DeleteSessions) => fleet::OnDeadline::DeleteSessions,
        Err(_) => {
            violations.push(FieldViolation::new(
                "OnDeadline",
                format!("unknown value {}", r.on_deadline),
            ));
            fleet::OnDeadline::Report
        }
    };
    if !violations.is_empty() {
        return Err(FleetError::InvalidArgument(violations));
    }
    Ok(fleet::DrainRequest {
        server_ids: r.servers.into_iter().map(|s| s.server_id).collect(),
        reason: r.reason,
        hold_name: r.hold_name.unwrap_or_default(),
        deadline,
        on_deadline,
        override_floor: r.override_capacity_floor,
    })
}

/// A drain on the wire.
pub fn drain_to_pb(d: fleet::DrainView) -> pb::Drain {
    pb::Drain {
        drain_id: d.id,
        state: match d.state {
            fleet::DrainState::Draining => pb::DrainState::Draining,
            fleet::DrainState::Drained => pb::DrainState::Drained,
            fleet::DrainState::DeadlinePassed => pb::DrainState::DeadlinePassed,
        } as i32,
        hold_name: d.hold_name,
        actor: d.actor,
        reason: d.reason,
        start_time: Some(Timestamp::from(d.started)),
        deadline: d.deadline.map(Timestamp::from),
        on_deadline: match d.on_deadline {
            fleet::OnDeadline::Report => pb::OnDeadline::Report,
            fleet::OnDeadline::DeleteSessions => pb::OnDeadline::DeleteSessions,
        } as i32,
        servers: d
            .servers
            .into_iter()
            .map(|(server_id, left)| pb::DrainServer {
                server_id,
                sessions_left: saturating_i32(left),
            })
            .collect(),
        sessions_left: saturating_i32(d.sessions_left),
        busy_servers: saturating_i32(d.busy_servers),
    }
}

/// A DescribeServerHistory request as the fleet takes it; its times must
/// be timestamps.
pub fn history_query_from_pb(
    r: pb::DescribeServerHistoryRequest,
) -> Result<fleet::HistoryQuery, fleet::FleetError> {
    let mut violations = Vec::new();
    let start_time = time_from_pb("StartTime", r.start_time, &mut violations);
    let end_time = time_from_pb("EndTime", r.end_time, &mut violations);
    if !violations.is_empty() {
        return Err(fleet::FleetError::InvalidArgument(violations));
    }
    Ok(fleet::HistoryQuery {
        server_id: r.server_id,
        actor: r.actor,
        start_time,
        end_time,
        newest_first: r.newest_first,
        max_results: r.max_results,
        next_token: r.next_token,
    })
}

/// A history record on the wire.
pub fn history_record_to_pb(h: fleet::HistoryRecord) -> pb::HistoryRecord {
    let record = h.record;
    pb::HistoryRecord {
        time: Some(Timestamp::from(record.at)),
        actor: record.actor,
        request_id: record.request_id,
        method: record.method,
        peer: record.peer.unwrap_or_default(),
        items: record
            .items
            .into_iter()
            .map(|item| pb::HistoryItem {
                id: item.id,
                outcome: item.outcome,
                reason: item.reason,
            })
            .collect(),
        item_count: i32::try_from(h.item_count).unwrap_or(i32::MAX),
    }
}

/// A CloseServers item's expiry from its ExpiresAt and ExpiresIn.
pub fn expiry_from_pb(
    at: Option<Timestamp>,
    within: Option<prost_types::Duration>,
) -> fleet::Expiry {
    match (at, within) {
        (None, None) => fleet::Expiry::Never,
        (Some(_), Some(_)) => {
            fleet::Expiry::Malformed("Give ExpiresAt or ExpiresIn, not both.".into())
        }
        (Some(t), None) => {
            let mut violations = Vec::new();
            match time_from_pb("ExpiresAt", Some(t), &mut violations) {
                Some(at) => fleet::Expiry::At(at),
                None => fleet::Expiry::Malformed(format!(
                    "ExpiresAt is {}",
                    violations
                        .first()
                        .map_or("not a valid timestamp", |v| v.description.as_str())
                )),
            }
        }
        (None, Some(d)) => match std::time::Duration::try_from(d) {
            Ok(d) => fleet::Expiry::In(d),
            Err(_) => fleet::Expiry::Malformed("ExpiresIn must be positive.".into()),
        },
    }
}

/// A dry run's report on the wire.
pub fn blast_radius_to_pb(radius: fleet::BlastRadius) -> pb::BlastRadius {
    let pool = |p: fleet::PoolCapacity| pb::PoolCapacity {
        tag_key: p.key,
        tag_value: p.value,
        available_before: saturating_i32(p.before),
        available_after: saturating_i32(p.after),
    };
    pb::BlastRadius {
        servers: radius
            .servers
            .into_iter()
            .map(|s| pb::AffectedServer {
                server_id: s.server_id,
                available_before: s.available_before,
                available_after: s.available_after,
                sessions: s
                    .sessions
                    .into_iter()
                    .map(|x| pb::AffectedSession {
                        id: x.id,
                        owner: x.owner,
                        r#type: session_kind_to_pb(x.kind) as i32,
                    })
                    .collect(),
            })
            .collect(),
        pools: radius.pools.into_iter().map(pool).collect(),
        overall: Some(pool(radius.overall)),
    }
}

fn memory_from_pb(m: Option<pb::MemoryInfo>) -> Option<fleet::MemoryUsage> {
    m.map(|m| fleet::MemoryUsage {
        total_bytes: m.total_bytes,
        used_bytes: m.used_bytes,
    })
}

fn load_from_pb(l: Option<pb::CpuLoadAverage>) -> Option<fleet::LoadAverage> {
    l.map(|l| fleet::LoadAverage {
        one_minute: l.one_minute,
        five_minutes: l.five_minutes,
        fifteen_minutes: l.fifteen_minutes,
    })
}

fn tags_from_pb(tags: Vec<pb::KeyValuePair>) -> Vec<fleet::Tag> {
    tags.into_iter()
        .map(|t| fleet::Tag {
            key: t.key.into(),
            value: t.value.into(),
        })
        .collect()
}

/// A registration request as the server id and the domain's description.
pub fn registration_from_pb(
    r: pb::RegisterServerRequest,
) -> Result<(String, fleet::ServerDescription), FleetError> {
    // Lengths first: nothing is converted or checked per item of a list
    // longer than its limit.
    fleet::check_lengths(&[
        ("Endpoints", r.endpoints.len(), fleet::MAX_ENDPOINTS),
        (
            "Host.Gpus",
            r.host.as_ref().map_or(0, |h| h.gpus.len()),
            fleet::MAX_GPUS,
        ),
        ("Tags", r.tags.len(), fleet::MAX_TAGS),
    ])?;
    let mut v = Vec::new();
    let host = r.host.unwrap_or_default();
    let os = host.os.unwrap_or_default();
    let family = fleet::OsFamily::parse(&os.family).unwrap_or_else(|| {
        v.push(FieldViolation::new(
            "Host.Os.Family",
            format!("must be windows, linux or macos; got {:?}", os.family),
        ));
        fleet::OsFamily::Linux
    });
    let endpoints = r
        .endpoints
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let protocol = match pb::Protocol::try_from(e.protocol) {
                Ok(pb::Protocol::Unspecified) => fleet::Protocol::Unspecified,
                Ok(pb::Protocol::Http) => fleet::Protocol::Http,
                Ok(pb::Protocol::Quic) => fleet::Protocol::Quic,
                Err(_) => {
                    v.push(enum_violation(
                        &format!("Endpoints[{i}].Protocol"),
                        e.protocol,
                    ));
                    fleet::Protocol::Unspecified
                }
            };
            let port = u16::try_from(e.port).unwrap_or_else(|_| {
                v.push(FieldViolation::new(
                    format!("Endpoints[{i}].Port"),
                    format!("must be 0 to 65535; got {}", e.port),
                ));
                0
            });
            fleet::Endpoint {
                ip_address: e.ip_address.into(),
                port,
                protocol,
                web_url_path: e.web_url_path.into(),
            }
        })
        .collect();
    let cpu = host.cpu_info.unwrap_or_default();
    let cpu_info = fleet::CpuInfo {
        number_of_cpus: non_negative("Host.CpuInfo.NumberOfCpus", cpu.number_of_cpus, &mut v),
        physical_cores_per_cpu: non_negative(
            "Host.CpuInfo.PhysicalCoresPerCpu",
            cpu.physical_cores_per_cpu,
            &mut v,
        ),
        vendor: cpu.vendor.into(),
        model_name: cpu.model_name.into(),
        architecture: cpu.architecture.into(),
    };
    let max_virtual_sessions = non_negative("MaxVirtualSessions", r.max_virtual_sessions, &mut v);
    let max_concurrent_sessions_per_user = non_negative(
        "MaxConcurrentSessionsPerUser",
        r.max_concurrent_sessions_per_user,
        &mut v,
    );
    if !v.is_empty() {
        return Err(FleetError::InvalidArgument(v));
    }
    let description = fleet::ServerDescription {
        ip: r.ip.into(),
        hostname: r.hostname.into(),
        default_dns_name: r.default_dns_name.into(),
        endpoints,
        version: r.version.into(),
        agent_version: r.session_manager_agent_version.into(),
        host: fleet::HostInfo {
            os: fleet::OsInfo {
                family,
                name: os.name.into(),
                version: os.version.into(),
                kernel_version: os.kernel_version.into(),
                build_number: os.build_number.into(),
            },
            memory: memory_from_pb(host.memory).unwrap_or_default(),
            swap: memory_from_pb(host.swap).unwrap_or_default(),
            aws: host.aws.map(|a| fleet::AwsInfo {
                region: a.region.into(),
                ec2_instance_type: a.ec2_instance_type.into(),
                ec2_instance_id: a.ec2_instance_id.into(),
                ec2_image_id: a.ec2_image_id.into(),
            }),
            cpu_info,
            cpu_load_average: load_from_pb(host.cpu_load_average).unwrap_or_default(),
            gpus: host
                .gpus
                .into_iter()
                .map(|g| fleet::Gpu {
                    vendor: g.vendor.into(),
                    model_name: g.model_name.into(),
                })
                .collect(),
        },
        tags: tags_from_pb(r.tags),
        max_virtual_sessions,
        max_concurrent_sessions_per_user,
    };
    Ok((r.server_id, description))
}

/// A heartbeat request as the server id and the domain's report.
pub fn heartbeat_from_pb(
    h: pb::HeartbeatRequest,
) -> Result<(String, fleet::Heartbeat), FleetError> {
    // Lengths first: a heartbeat naming millions of sessions with bad
    // enums must not cost a violation each.
    fleet::check_lengths(&[
        (
            "LoggedInUsers",
            h.logged_in_users.len(),
            fleet::MAX_LOGGED_IN_USERS,
        ),
        ("Sessions", h.sessions.len(), fleet::MAX_REPORTED_SESSIONS),
    ])?;
    let mut v = Vec::new();
    let sessions = h
        .sessions
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let kind = match pb::SessionType::try_from(s.r#type) {
                Ok(pb::SessionType::Console) => fleet::SessionKind::Console,
                Ok(pb::SessionType::Virtual) => fleet::SessionKind::Virtual,
                _ => {
                    v.push(enum_violation(&format!("Sessions[{i}].Type"), s.r#type));
                    fleet::SessionKind::Console
                }
            };
            let state = match pb::SessionState::try_from(s.state) {
                Ok(pb::SessionState::Creating) => fleet::SessionState::Creating,
                Ok(pb::SessionState::Ready) => fleet::SessionState::Ready,
                Ok(pb::SessionState::Deleting) => fleet::SessionState::Deleting,
                Ok(pb::SessionState::Deleted) => fleet::SessionState::Deleted,
                Ok(pb::SessionState::Unknown) => fleet::SessionState::Unknown,
                _ => {
                    v.push(enum_violation(&format!("Sessions[{i}].State"), s.state));
                    fleet::SessionState::Unknown
                }
            };
            let connections = non_negative(
                &format!("Sessions[{i}].NumOfConnections"),
                s.num_of_connections,
                &mut v,
            );
            let last_disconnection = time_from_pb(
                &format!("Sessions[{i}].LastDisconnectionTime"),
                s.last_disconnection_time,
                &mut v,
            );
            let created_at = time_from_pb(
                &format!("Sessions[{i}].CreationTime"),
                s.creation_time,
                &mut v,
            );
            fleet::ReportedSession {
                id: s.id,
                owner: s.owner,
                kind,
                state,
                details: fleet::ReportedDetails {
                    connections,
                    last_disconnection,
                    created_at,
                    name: s.name,
                },
            }
        })
        .collect();
    if !v.is_empty() {
        return Err(FleetError::InvalidArgument(v));
    }
    Ok((
        h.server_id,
        fleet::Heartbeat {
            dcv_server_healthy: h.dcv_server_healthy,
            logged_in_users: h.logged_in_users.into_iter().map(|u| u.username).collect(),
            sessions,
            cpu_load_average: load_from_pb(h.cpu_load_average),
            memory: memory_from_pb(h.memory),
            swap: memory_from_pb(h.swap),
        },
    ))
}

/// The wire value of a failure code.
pub fn failure_code_to_pb(code: fleet::FailureCode) -> pb::FailureCode {
    match code {
        fleet::FailureCode::ServerNotFound => pb::FailureCode::DcvServerNotFound,
        fleet::FailureCode::HasRunningSessions => pb::FailureCode::DcvServerHasRunningSessions,
        fleet::FailureCode::InvalidServerId => pb::FailureCode::InvalidServerId,
        fleet::FailureCode::DuplicateServerId => pb::FailureCode::DuplicateServerId,
        fleet::FailureCode::InvalidReason => pb::FailureCode::InvalidReason,
        fleet::FailureCode::SessionNotFound => pb::FailureCode::SessionNotFound,
        fleet::FailureCode::DuplicateSessionId => pb::FailureCode::DuplicateSessionId,
        fleet::FailureCode::InvalidSessionParameter => pb::FailureCode::InvalidSessionParameter,
        fleet::FailureCode::InvalidRequirements => pb::FailureCode::InvalidRequirements,
        fleet::FailureCode::NoServerAvailable => pb::FailureCode::NoServerAvailable,
        fleet::FailureCode::QueueFull => pb::FailureCode::QueueFull,
        fleet::FailureCode::SessionNotReady => pb::FailureCode::SessionNotReady,
        fleet::FailureCode::AgentUnavailable => pb::FailureCode::AgentUnavailable,
        fleet::FailureCode::AgentFailed => pb::FailureCode::AgentFailed,
        fleet::FailureCode::ReplySizeLimit => pb::FailureCode::ReplySizeLimit,
        fleet::FailureCode::HoldsRemain => pb::FailureCode::HoldsRemain,
        fleet::FailureCode::StateVersionMismatch => pb::FailureCode::StateVersionMismatch,
        fleet::FailureCode::CapacityFloor => pb::FailureCode::CapacityFloor,
        fleet::FailureCode::InvalidHold => pb::FailureCode::InvalidHold,
        fleet::FailureCode::AlreadyDraining => pb::FailureCode::AlreadyDraining,
    }
}

fn reason_to_pb(reason: fleet::Reason) -> pb::UnavailabilityReason {
    match reason {
        fleet::Reason::ServerClosed => pb::UnavailabilityReason::ServerClosed,
        fleet::Reason::UnreachableAgent => pb::UnavailabilityReason::UnreachableAgent,
        fleet::Reason::UnhealthyDcvServer => pb::UnavailabilityReason::UnhealthyDcvServer,
        fleet::Reason::ExistingLoggedInUser => pb::UnavailabilityReason::ExistingLoggedInUser,
        fleet::Reason::ServerFull => pb::UnavailabilityReason::ServerFull,
    }
}

fn memory_to_pb(m: fleet::MemoryUsage) -> pb::MemoryInfo {
    pb::MemoryInfo {
        total_bytes: m.total_bytes,
        used_bytes: m.used_bytes,
    }
}

fn saturating_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

// Texts are copied with `String::from(&*text)`: `to_string` on an `Arc<str>`
// goes through `Display` (a formatter and a growing buffer), which showed in
// DescribeServers' profile.
/// A host description on the wire, with the users the agent last
/// reported.
pub fn host_to_pb(h: &fleet::HostInfo, logged_in_users: &[String]) -> pb::Host {
    pb::Host {
        os: Some(pb::Os {
            family: h.os.family.as_str().to_string(),
            name: String::from(&*h.os.name),
            version: String::from(&*h.os.version),
            kernel_version: String::from(&*h.os.kernel_version),
            build_number: String::from(&*h.os.build_number),
        }),
        memory: Some(memory_to_pb(h.memory)),
        swap: Some(memory_to_pb(h.swap)),
        aws: h.aws.as_ref().map(|a| pb::Aws {
            region: String::from(&*a.region),
            ec2_instance_type: String::from(&*a.ec2_instance_type),
            ec2_instance_id: String::from(&*a.ec2_instance_id),
            ec2_image_id: String::from(&*a.ec2_image_id),
        }),
        cpu_info: Some(pb::CpuInfo {
            vendor: String::from(&*h.cpu_info.vendor),
            model_name: String::from(&*h.cpu_info.model_name),
            architecture: String::from(&*h.cpu_info.architecture),
            number_of_cpus: saturating_i32(h.cpu_info.number_of_cpus),
            physical_cores_per_cpu: saturating_i32(h.cpu_info.physical_cores_per_cpu),
        }),
        cpu_load_average: Some(pb::CpuLoadAverage {
            one_minute: h.cpu_load_average.one_minute,
            five_minutes: h.cpu_load_average.five_minutes,
            fifteen_minutes: h.cpu_load_average.fifteen_minutes,
        }),
        gpus: h
            .gpus
            .iter()
            .map(|g| pb::Gpu {
                vendor: String::from(&*g.vendor),
                model_name: String::from(&*g.model_name),
            })
            .collect(),
        logged_in_users: logged_in_users
            .iter()
            .map(|u| pb::LoggedInUser {
                username: u.clone(),
            })
            .collect(),
    }
}

/// The registration an agent would send for `d` (the inverse of
/// [`registration_from_pb`]; the counts came from the wire's int32s, so
/// they fit back).
pub fn registration_to_pb(id: &str, d: &fleet::ServerDescription) -> pb::RegisterServerRequest {
    pb::RegisterServerRequest {
        server_id: String::from(id),
        ip: String::from(&*d.ip),
        hostname: String::from(&*d.hostname),
        default_dns_name: String::from(&*d.default_dns_name),
        endpoints: d.endpoints.iter().map(endpoint_to_pb).collect(),
        version: String::from(&*d.version),
        session_manager_agent_version: String::from(&*d.agent_version),
        host: Some(host_to_pb(&d.host, &[])),
        tags: d.tags.iter().map(tag_to_pb).collect(),
        max_virtual_sessions: saturating_i32(d.max_virtual_sessions),
        max_concurrent_sessions_per_user: saturating_i32(d.max_concurrent_sessions_per_user),
    }
}

fn endpoint_to_pb(e: &fleet::Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        ip_address: String::from(&*e.ip_address),
        port: i32::from(e.port),
        protocol: match e.protocol {
            fleet::Protocol::Unspecified => pb::Protocol::Unspecified,
            fleet::Protocol::Http => pb::Protocol::Http,
            fleet::Protocol::Quic => pb::Protocol::Quic,
        } as i32,
        web_url_path: String::from(&*e.web_url_path),
    }
}

fn tag_to_pb(t: &fleet::Tag) -> pb::KeyValuePair {
    pb::KeyValuePair {
        key: String::from(&*t.key),
        value: String::from(&*t.value),
    }
}

/// A server's custom tags followed by its built-in ones.
fn tags_to_pb(server: &fleet::ServerRecord) -> Vec<pb::KeyValuePair> {
    server
        .description
        .tags
        .iter()
        .map(tag_to_pb)
        .chain(server.builtin_tags().map(|(key, value)| pb::KeyValuePair {
            key: key.to_string(),
            value,
        }))
        .collect()
}

/// A server as DescribeServers returns it.
pub fn server_to_pb(view: ServerView<'_>) -> pb::Server {
    let r = view.record;
    let d = &r.description;
    let h = &d.host;
    let (consoles, virtuals) = r.session_counts();
    let (port, web_url_path) = dcv_web_endpoint(d);
    pb::Server {
        id: String::from(&*r.id),
        ip: String::from(&*d.ip),
        hostname: String::from(&*d.hostname),
        default_dns_name: String::from(&*d.default_dns_name),
        endpoints: d.endpoints.iter().map(endpoint_to_pb).collect(),
        version: String::from(&*d.version),
        session_manager_agent_version: String::from(&*d.agent_version),
        availability: if view.reasons.is_available() {
            pb::Availability::Available
        } else {
            pb::Availability::Unavailable
        } as i32,
        unavailability_reason: view
            .reasons
            .primary()
            .map_or(pb::UnavailabilityReason::Unspecified, reason_to_pb)
            as i32,
        unavailability_reasons: view
            .reasons
            .iter()
            .map(|r| reason_to_pb(r) as i32)
            .collect(),
        console_session_count: saturating_i32(consoles),
        virtual_session_count: saturating_i32(virtuals),
        host: Some(host_to_pb(h, &r.logged_in_users)),
        tags: tags_to_pb(r),
        holds: r
            .holds
            .iter()
            .map(|hold| pb::Hold {
                kind: match hold.kind {
                    fleet::HoldKind::Closed => pb::HoldKind::Closed,
                } as i32,
                actor: String::from(&*hold.actor),
                creation_time: Some(Timestamp::from(hold.since)),
                reason: hold.reason.clone(),
                name: String::from(&*hold.name),
                expiration_time: hold.expires_at.map(Timestamp::from),
                drain_id: hold
                    .drain
                    .as_ref()
                    .map(|d| d.id.to_string())
                    .unwrap_or_default(),
            })
            .collect(),
        state_version: r.state_version,
        last_heartbeat_time: Some(Timestamp::from(r.last_seen_wall)),
        registration_time: Some(Timestamp::from(r.registered_at)),
        max_virtual_sessions: saturating_i32(d.max_virtual_sessions),
        max_concurrent_sessions_per_user: saturating_i32(d.max_concurrent_sessions_per_user),
        port,
        web_url_path,
    }
}

fn session_kind_to_pb(kind: fleet::SessionKind) -> pb::SessionType {
    match kind {
        fleet::SessionKind::Console => pb::SessionType::Console,
        fleet::SessionKind::Virtual => pb::SessionType::Virtual,
    }
}

/// A session type from the wire; `None` when unspecified or unknown.
pub fn session_kind_from_pb(value: i32) -> Option<fleet::SessionKind> {
    match pb::SessionType::try_from(value) {
        Ok(pb::SessionType::Console) => Some(fleet::SessionKind::Console),
        Ok(pb::SessionType::Virtual) => Some(fleet::SessionKind::Virtual),
        _ => None,
    }
}

/// The wire value of a session state.
pub fn session_state_to_pb(state: fleet::SessionState) -> pb::SessionState {
    match state {
        fleet::SessionState::Creating => pb::SessionState::Creating,
        fleet::SessionState::Ready => pb::SessionState::Ready,
        fleet::SessionState::Deleting => pb::SessionState::Deleting,
        fleet::SessionState::Deleted => pb::SessionState::Deleted,
        fleet::SessionState::Unknown => pb::SessionState::Unknown,
    }
}

/// A CreateSessions item as the domain's request.
pub fn create_spec_from_pb(d: &pb::CreateSessionRequestData) -> fleet::CreateSpec {
    fleet::CreateSpec {
        name: d.name.clone(),
        owner: d.owner.clone(),
        kind: session_kind_from_pb(d.r#type),
        init_file: d.init_file.clone(),
        max_concurrent_clients: d.max_concurrent_clients,
        dcv_gl_enabled: d.dcv_gl_enabled,
        permissions_file: d.permissions_file.clone(),
        enqueue: d.enqueue_request,
        autorun_file: d.autorun_file.clone(),
        autorun_file_arguments: d.autorun_file_arguments.clone(),
        disable_retry: d.disable_retry_on_failure,
        requirements: d.requirements.clone(),
        storage_root: d.storage_root.clone(),
    }
}

/// A creation request as the CreateSessions item it came from (the
/// inverse of [`create_spec_from_pb`]).
pub fn create_spec_to_pb(spec: &fleet::CreateSpec) -> pb::CreateSessionRequestData {
    pb::CreateSessionRequestData {
        name: spec.name.clone(),
        owner: spec.owner.clone(),
        r#type: spec
            .kind
            .map_or(pb::SessionType::Unspecified, session_kind_to_pb) as i32,
        init_file: spec.init_file.clone(),
        max_concurrent_clients: spec.max_concurrent_clients,
        dcv_gl_enabled: spec.dcv_gl_enabled,
        permissions_file: spec.permissions_file.clone(),
        enqueue_request: spec.enqueue,
        autorun_file: spec.autorun_file.clone(),
        autorun_file_arguments: spec.autorun_file_arguments.clone(),
        disable_retry_on_failure: spec.disable_retry,
        requirements: spec.requirements.clone(),
        storage_root: spec.storage_root.clone(),
    }
}

/// DCV's flat `Port` and `WebUrlPath` of a server: those of its first HTTP
/// endpoint, or of its first endpoint if none is HTTP (empty without any).
fn dcv_web_endpoint(d: &fleet::ServerDescription) -> (String, String) {
    let web = d
        .endpoints
        .iter()
        .find(|e| e.protocol == fleet::Protocol::Http)
        .or(d.endpoints.first());
    (
        web.map(|e| e.port.to_string()).unwrap_or_default(),
        web.map(|e| String::from(&*e.web_url_path))
            .unwrap_or_default(),
    )
}

fn session_server_to_pb(server: &fleet::ServerRecord) -> pb::SessionServer {
    let d = &server.description;
    let (port, web_url_path) = dcv_web_endpoint(d);
    pb::SessionServer {
        id: String::from(&*server.id),
        ip: String::from(&*d.ip),
        hostname: String::from(&*d.hostname),
        port,
        endpoints: d.endpoints.iter().map(endpoint_to_pb).collect(),
        web_url_path,
        tags: tags_to_pb(server),
    }
}

/// A session as the Sessions API returns it.
pub fn session_to_pb(view: fleet::SessionView<'_>) -> pb::Session {
    let r = view.record;
    pb::Session {
        id: String::from(&*r.id),
        name: r.name.clone(),
        owner: r.owner.clone(),
        server: view.server.map(session_server_to_pb),
        r#type: session_kind_to_pb(r.kind) as i32,
        max_concurrent_clients: r
            .order
            .as_ref()
            .map_or(0, |o| saturating_i32(o.max_concurrent_clients)),
        state: session_state_to_pb(view.shown_state()) as i32,
        substate: match r.substate {
            None => pb::SessionSubstate::Unspecified,
            Some(fleet::Substate::Placing) => pb::SessionSubstate::SessionPlacing,
            Some(fleet::Substate::PendingPreparation) => pb::SessionSubstate::PendingPreparation,
        } as i32,
        state_reason: r.state_reason.clone(),
        creation_time: Some(Timestamp::from(r.created_at)),
        last_disconnection_time: r.last_disconnection.map(Timestamp::from),
        num_of_connections: saturating_i32(r.connections),
        storage_root: r
            .order
            .as_ref()
            .map(|o| o.storage_root.clone())
            .unwrap_or_default(),
    }
}

/// An instruction as an agent receives it.
pub fn instruction_to_pb(instruction: fleet::Instruction) -> pb::StreamInstructionsResponse {
    use pb::stream_instructions_response::Instruction as I;
    let instruction_id = instruction.id().to_string();
    let body = match instruction {
        fleet::Instruction::Create {
            session,
            order,
            permissions_file,
            ..
        } => I::CreateSession(pb::CreateSessionInstruction {
            session_id: session.to_string(),
            name: order.name.clone(),
            owner: order.owner.clone(),
            r#type: session_kind_to_pb(order.kind) as i32,
            init_file: order.init_file.clone(),
            max_concurrent_clients: saturating_i32(order.max_concurrent_clients),
            dcv_gl_enabled: order.dcv_gl_enabled,
            permissions_file,
            autorun_file: order.autorun_file.clone(),
            autorun_file_arguments: order.autorun_file_arguments.clone(),
            storage_root: order.storage_root.clone(),
        }),
        fleet::Instruction::Delete { session, .. } => {
            I::DeleteSession(pb::DeleteSessionInstruction {
                session_id: session.to_string(),
            })
        }
        fleet::Instruction::UpdatePermissions {
            session,
            permissions_file,
            ..
        } => I::UpdatePermissions(pb::UpdatePermissionsInstruction {
            session_id: session.to_string(),
            permissions_file,
        }),
        fleet::Instruction::GetScreenshot {
            session,
            max_width,
            max_height,
            format,
            ..
        } => I::GetScreenshot(pb::GetScreenshotInstruction {
            session_id: session.to_string(),
            max_width: saturating_i32(max_width),
            max_height: saturating_i32(max_height),
            format: format.as_str().to_string(),
        }),
    };
    pb::StreamInstructionsResponse {
        instruction_id,
        instruction: Some(body),
    }
}

/// A GetSessionScreenshots item as the domain's.
pub fn screenshot_item_from_pb(d: &pb::GetSessionScreenshotRequestData) -> fleet::ScreenshotItem {
    fleet::ScreenshotItem {
        session_id: d.session_id.clone(),
        max_width: d.max_width,
        max_height: d.max_height,
    }
}

/// The images of a GET_SCREENSHOT report, checked for what only the wire
/// can get wrong (the format's name, the times); their number and size
/// are the domain's to judge.
pub fn screenshot_images_from_pb(
    images: Vec<pb::SessionScreenshotImage>,
) -> Result<Vec<fleet::ScreenshotImage>, FleetError> {
    // The count first: no violation per item of a list past its bound.
    fleet::check_lengths(&[(
        "Images",
        images.len(),
        fleet::sessions::screenshots::MAX_SCREENSHOT_IMAGES,
    )])?;
    let mut v = Vec::new();
    let images = images
        .into_iter()
        .enumerate()
        .map(|(i, image)| {
            let format = fleet::ImageFormat::parse(&image.format).unwrap_or_else(|| {
                v.push(FieldViolation::new(
                    format!("Images[{i}].Format"),
                    format!(
                        "must be png or jpeg; got {:?}",
                        fleet::agent_text(&image.format)
                    ),
                ));
                fleet::ImageFormat::Png
            });
            let created_at = time_from_pb(
                &format!("Images[{i}].CreationTime"),
                image.creation_time,
                &mut v,
            )
            .unwrap_or_else(std::time::SystemTime::now);
            fleet::ScreenshotImage {
                format,
                data: image.data,
                created_at,
                primary: image.primary,
            }
        })
        .collect();
    if v.is_empty() {
        Ok(images)
    } else {
        Err(FleetError::InvalidArgument(v))
    }
}

/// A screenshot image on the wire.
pub fn screenshot_image_to_pb(image: fleet::ScreenshotImage) -> pb::SessionScreenshotImage {
    pb::SessionScreenshotImage {
        format: image.format.as_str().to_string(),
        data: image.data,
        creation_time: Some(Timestamp::from(image.created_at)),
        primary: image.primary,
    }
}
