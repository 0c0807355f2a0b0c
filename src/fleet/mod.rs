//! The fleet: every DCV server the broker knows, behind one cloneable
//! handle.
//!
//! State lives in a `HashMap` (lookups by id) plus an ordered index of ids
//! (stable pagination), both inside one `parking_lot::RwLock`. The lock is a
//! synchronous one on purpose: every critical section is short, CPU-only and
//! never spans an `.await`, so an async lock would only add cost. A batch is
//! validated before the lock is taken and applied inside one write section,
//! so nobody ever observes half of it.
//!
//! Time is tokio's clock (`tokio::time::Instant`), so tests can pause and
//! advance it. Heartbeat expiry needs no timer: availability is derived from
//! the age of the last heartbeat when asked, and servers past the removal
//! timeout are swept by whichever operation first notices they are due (and
//! by a periodic sweeper the server runs), so removal is exact whether or
//! not anything is running in the background.

pub mod availability;
pub mod error;
pub mod model;
pub mod page_token;
pub mod query;
pub mod requirements;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    ops::Bound,
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::RwLock;
use tokio::time::Instant;

pub use self::{
    availability::{Reason, Reasons},
    error::{FieldViolation, FleetError},
    model::*,
    query::DescribeQuery,
};
use self::{page_token::PageTokens, query::ValidQuery};

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

/// Timeouts and lifetimes the fleet enforces.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// How often agents are asked to send heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a server is UNREACHABLE_AGENT.
    pub unreachable_after: Duration,
    /// Silence after which an open server is forgotten (closed ones never).
    pub remove_after: Duration,
    /// How long a DescribeServers page token stays valid.
    pub page_token_ttl: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            heartbeat_interval: Duration::from_secs(30),
            unreachable_after: Duration::from_secs(90),
            remove_after: Duration::from_secs(3600),
            page_token_ttl: Duration::from_secs(3600),
        }
    }
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
    fn new(code: FailureCode, reason: impl Into<String>) -> Self {
        ItemFailure {
            code,
            reason: reason.into(),
        }
    }

    fn not_found() -> Self {
        // DCV's exact text: clients match it.
        ItemFailure::new(FailureCode::ServerNotFound, "Dcv server not found.")
    }
}

/// The outcome of one batch item, in request order.
pub type ItemResult = Result<(), ItemFailure>;

/// One CloseServers item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseItem {
    /// Server to close.
    pub server_id: String,
    /// Close even with running sessions.
    pub force: bool,
    /// Why (may be empty).
    pub reason: String,
}

/// A server as DescribeServers sees it: the record and its availability.
#[derive(Debug, Clone, Copy)]
pub struct ServerView<'a> {
    /// The record.
    pub record: &'a ServerRecord,
    /// Why it is unavailable, if it is.
    pub reasons: Reasons,
}

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
    } else {
        Ok(())
    }
}

fn validate_reason(reason: &str) -> Result<(), String> {
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

/// Bidirectional overrides and isolates can make a reason display as
/// something other than what it says, in logs and terminals ("Trojan
/// Source"); nobody needs them in a sentence about maintenance.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn validate_batch_size(len: usize) -> Result<(), FleetError> {
    if len == 0 || len > MAX_BATCH_ITEMS {
        return Err(FleetError::invalid(
            "Servers",
            format!("must hold 1 to {MAX_BATCH_ITEMS} items; got {len}"),
        ));
    }
    Ok(())
}

/// Per-item checks that need no state: id shape and duplicates. Returns,
/// in order, `None` for items to apply and the failure of the others.
fn precheck<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<Option<ItemFailure>> {
    let mut seen = HashSet::new();
    ids.map(|id| {
        if let Err(why) = validate_server_id(id) {
            Some(ItemFailure::new(
                FailureCode::InvalidServerId,
                format!("ServerId {why}."),
            ))
        } else if !seen.insert(id) {
            Some(ItemFailure::new(
                FailureCode::DuplicateServerId,
                "ServerId appears earlier in this batch; only its first occurrence is processed.",
            ))
        } else {
            None
        }
    })
    .collect()
}

#[derive(Debug, Default)]
struct State {
    servers: HashMap<ServerId, ServerRecord>,
    /// The same ids, ordered, for pagination.
    order: BTreeSet<ServerId>,
    /// No open server can be due for removal before this (a lower bound,
    /// refreshed by each sweep); `None` when no server is removable.
    next_removal: Option<Instant>,
}

impl State {
    fn removal_due(&self, now: Instant) -> bool {
        self.next_removal.is_some_and(|at| now > at)
    }

    fn note_removable(&mut self, deadline: Instant) {
        self.next_removal = Some(self.next_removal.map_or(deadline, |d| d.min(deadline)));
    }

    /// Forgets every open server silent for longer than `remove_after`.
    fn sweep(&mut self, now: Instant, remove_after: Duration) -> Vec<ServerId> {
        let due: Vec<ServerId> = self
            .servers
            .values()
            .filter(|s| !s.is_closed() && now.saturating_duration_since(s.last_seen) > remove_after)
            .map(|s| s.id.clone())
            .collect();
        for id in &due {
            self.servers.remove(id);
            self.order.remove(id);
        }
        self.next_removal = self
            .servers
            .values()
            .filter(|s| !s.is_closed())
            .map(|s| s.last_seen + remove_after)
            .min();
        due
    }
}

/// The handle to the fleet. Cheap to clone; all clones share one state.
#[derive(Debug, Clone)]
pub struct Fleet {
    state: Arc<RwLock<State>>,
    config: Arc<FleetConfig>,
    tokens: PageTokens,
}

impl Fleet {
    /// An empty fleet.
    pub fn new(config: FleetConfig) -> Result<Self, FleetError> {
        let tokens = PageTokens::random(config.page_token_ttl)
            .map_err(|e| FleetError::Internal(format!("no randomness for page tokens: {e}")))?;
        Ok(Fleet {
            state: Arc::default(),
            config: Arc::new(config),
            tokens,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// How many servers the broker knows.
    pub fn len(&self) -> usize {
        self.state.read().servers.len()
    }

    /// Whether the broker knows no server.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the write lock, first sweeping servers that are due for
    /// removal, so no operation ever sees one.
    fn write(&self, now: Instant) -> parking_lot::RwLockWriteGuard<'_, State> {
        let mut state = self.state.write();
        if state.removal_due(now) {
            log_removed(&state.sweep(now, self.config.remove_after));
        }
        state
    }

    /// Takes the read lock, sweeping first when removal is due.
    fn read(&self, now: Instant) -> parking_lot::RwLockReadGuard<'_, State> {
        let state = self.state.read();
        if !state.removal_due(now) {
            return state;
        }
        drop(state);
        drop(self.write(now));
        self.state.read()
    }

    /// Forgets every open server whose agent has been silent for longer
    /// than the removal timeout; returns their ids.
    pub fn sweep(&self) -> Vec<ServerId> {
        let now = Instant::now();
        let mut state = self.state.write();
        let removed = state.sweep(now, self.config.remove_after);
        log_removed(&removed);
        removed
    }

    /// Closes servers on behalf of `actor`. See `servers.proto` for the
    /// semantics; the result has one entry per item, in order.
    pub fn close_servers(
        &self,
        items: &[CloseItem],
        actor: &str,
    ) -> Result<Vec<ItemResult>, FleetError> {
        validate_batch_size(items.len())?;
        let mut pre = precheck(items.iter().map(|i| i.server_id.as_str()));
        for (item, slot) in items.iter().zip(pre.iter_mut()) {
            if slot.is_none()
                && let Err(why) = validate_reason(&item.reason)
            {
                *slot = Some(ItemFailure::new(FailureCode::InvalidReason, why));
            }
        }
        let wall = SystemTime::now();
        let mut state = self.write(Instant::now());
        let results = items
            .iter()
            .zip(pre)
            .map(|(item, pre)| {
                if let Some(failure) = pre {
                    return Err(failure);
                }
                let server = state
                    .servers
                    .get_mut(item.server_id.as_str())
                    .ok_or_else(ItemFailure::not_found)?;
                if server.is_closed() {
                    return Ok(());
                }
                let running = server.live_sessions().count();
                if running > 0 && !item.force {
                    return Err(ItemFailure::new(
                        FailureCode::HasRunningSessions,
                        format!(
                            "Dcv server has {running} running session(s); set Force to close it anyway (the sessions keep running)."
                        ),
                    ));
                }
                server.holds.push(Hold {
                    kind: HoldKind::Closed,
                    actor: actor.to_string(),
                    since: wall,
                    reason: item.reason.clone(),
                });
                Ok(())
            })
            .collect();
        Ok(results)
    }

    /// Opens servers. See `servers.proto`; one result per item, in order.
    pub fn open_servers(&self, server_ids: &[String]) -> Result<Vec<ItemResult>, FleetError> {
        validate_batch_size(server_ids.len())?;
        let pre = precheck(server_ids.iter().map(String::as_str));
        let now = Instant::now();
        let mut state = self.write(now);
        let remove_after = self.config.remove_after;
        let results = server_ids
            .iter()
            .zip(pre)
            .map(|(id, pre)| {
                if let Some(failure) = pre {
                    return Err(failure);
                }
                let server = state
                    .servers
                    .get_mut(id.as_str())
                    .ok_or_else(ItemFailure::not_found)?;
                if !server.is_closed() {
                    return Ok(());
                }
                server.holds.retain(|h| h.kind != HoldKind::Closed);
                let deadline = server.last_seen + remove_after;
                state.note_removable(deadline);
                Ok(())
            })
            .collect();
        Ok(results)
    }

    /// Runs a DescribeServers query, handing each server of the page to
    /// `visit` (under the read lock: `visit` must be quick and must not
    /// call back into the fleet). Returns the next page's token, if any.
    pub fn describe_servers(
        &self,
        query: &DescribeQuery,
        mut visit: impl FnMut(ServerView<'_>),
    ) -> Result<Option<String>, FleetError> {
        let valid: ValidQuery = query::validate(query).map_err(FleetError::InvalidArgument)?;
        let wall = SystemTime::now();
        let after = if query.next_token.is_empty() {
            None
        } else {
            Some(
                self.tokens
                    .check(&query.next_token, &valid.fingerprint, wall)
                    .map_err(|e| FleetError::invalid("NextToken", e.to_string()))?,
            )
        };
        let now = Instant::now();
        let state = self.read(now);
        let lower = match &after {
            Some(id) => Bound::Excluded(id.as_str()),
            None => Bound::Unbounded,
        };
        let candidates: Box<dyn Iterator<Item = &ServerRecord>> = match &valid.ids {
            None => Box::new(
                state
                    .order
                    .range::<str, _>((lower, Bound::Unbounded))
                    .filter_map(|id| state.servers.get(id)),
            ),
            Some(ids) => {
                let start = match &after {
                    Some(a) => ids.partition_point(|id| id.as_str() <= a.as_str()),
                    None => 0,
                };
                Box::new(
                    ids[start..]
                        .iter()
                        .filter_map(|id| state.servers.get(id.as_str())),
                )
            }
        };
        let unreachable_after = self.config.unreachable_after;
        let mut matching = candidates.filter_map(|record| {
            let reasons = availability::reasons(record, now, unreachable_after);
            valid
                .filters
                .matches(record, reasons)
                .then_some(ServerView { record, reasons })
        });
        let mut last: Option<&ServerRecord> = None;
        for view in matching.by_ref().take(valid.page_size) {
            last = Some(view.record);
            visit(view);
        }
        // A next page exists only if another server matches now; a walk
        // never ends on an empty page it could have avoided.
        let more = matching.next().is_some();
        Ok(match (more, last) {
            (true, Some(last)) => Some(self.tokens.issue(&valid.fingerprint, &last.id, wall)),
            _ => None,
        })
    }

    /// Registers a server, or refreshes a known one's description. A
    /// known server keeps its holds and last reported sessions. Returns
    /// whether the server was new.
    pub fn register(&self, id: &str, description: ServerDescription) -> Result<bool, FleetError> {
        let mut violations = Vec::new();
        if let Err(why) = validate_server_id(id) {
            violations.push(FieldViolation::new("ServerId", why));
        }
        validate_description(&description, &mut violations);
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut state = self.write(now);
        let new = match state.servers.get_mut(id) {
            Some(server) => {
                server.description = description;
                server.last_seen = now;
                server.last_seen_wall = wall;
                server.agent_departed = false;
                false
            }
            None => {
                let id: ServerId = Arc::from(id);
                state.order.insert(id.clone());
                state.servers.insert(
                    id.clone(),
                    ServerRecord {
                        id,
                        description,
                        dcv_server_healthy: true,
                        logged_in_users: Vec::new(),
                        sessions: Vec::new(),
                        holds: Vec::new(),
                        registered_at: wall,
                        last_seen: now,
                        last_seen_wall: wall,
                        agent_departed: false,
                    },
                );
                true
            }
        };
        state.note_removable(now + self.config.remove_after);
        Ok(new)
    }

    /// Records a heartbeat. Fails with `ServerNotFound` for a server the
    /// broker does not know (its agent must register again).
    pub fn heartbeat(&self, id: &str, report: Heartbeat) -> Result<(), FleetError> {
        let mut violations = Vec::new();
        if let Err(why) = validate_server_id(id) {
            violations.push(FieldViolation::new("ServerId", why));
        }
        validate_heartbeat(&report, &mut violations);
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut state = self.write(now);
        let server = state
            .servers
            .get_mut(id)
            .ok_or_else(|| FleetError::ServerNotFound(id.to_string()))?;
        apply_heartbeat(server, report);
        server.last_seen = now;
        server.last_seen_wall = wall;
        server.agent_departed = false;
        Ok(())
    }

    /// Applies many heartbeats under one lock hold (the simulated fleet
    /// uses it). Unknown ids are skipped and returned.
    pub fn heartbeat_many(
        &self,
        reports: impl IntoIterator<Item = (ServerId, Heartbeat)>,
    ) -> Vec<ServerId> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut state = self.write(now);
        let mut unknown = Vec::new();
        for (id, report) in reports {
            match state.servers.get_mut(&id) {
                Some(server) => {
                    apply_heartbeat(server, report);
                    server.last_seen = now;
                    server.last_seen_wall = wall;
                    server.agent_departed = false;
                }
                None => unknown.push(id),
            }
        }
        unknown
    }

    /// An agent leaves. An open server is forgotten at once (returns
    /// true); a closed one stays, unreachable, so the operator's close is
    /// not lost (returns false).
    pub fn deregister(&self, id: &str) -> Result<bool, FleetError> {
        validate_server_id(id).map_err(|why| FleetError::invalid("ServerId", why))?;
        let mut state = self.write(Instant::now());
        let server = state
            .servers
            .get_mut(id)
            .ok_or_else(|| FleetError::ServerNotFound(id.to_string()))?;
        if server.is_closed() {
            server.agent_departed = true;
            return Ok(false);
        }
        state.servers.remove(id);
        state.order.remove(id);
        Ok(true)
    }
}

fn log_removed(removed: &[ServerId]) {
    for id in removed {
        tracing::info!(server_id = %id, "server forgotten after heartbeat loss");
    }
}

fn apply_heartbeat(server: &mut ServerRecord, report: Heartbeat) {
    server.dcv_server_healthy = report.dcv_server_healthy;
    server.logged_in_users = report.logged_in_users;
    server.sessions = report.sessions;
    let host = &mut server.description.host;
    if let Some(load) = report.cpu_load_average {
        host.cpu_load_average = load;
    }
    if let Some(memory) = report.memory {
        host.memory = memory;
    }
    if let Some(swap) = report.swap {
        host.swap = swap;
    }
}

fn check_text(field: &str, value: &str, violations: &mut Vec<FieldViolation>) {
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

fn validate_description(d: &ServerDescription, violations: &mut Vec<FieldViolation>) {
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

fn validate_heartbeat(h: &Heartbeat, violations: &mut Vec<FieldViolation>) {
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
        }
    }
}
