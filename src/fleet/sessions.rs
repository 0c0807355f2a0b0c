//! Sessions: creation and placement, the queue, the agents' instructions
//! and answers, deletion, permissions and connection tokens.
//!
//! Sessions live in the same state, under the same lock, as the servers.
//! That is what makes a close trustworthy: a placement picks a server and
//! reserves its slot (a [`Placement`]) in one write section, and a close
//! without Force counts those reservations as running sessions in another,
//! so the two can never interleave.
//!
//! A broker-created session moves through
//! CREATING/SESSION_PLACING (queued, or waiting for the chosen agent) →
//! CREATING/PENDING_PREPARATION (the agent created it) → READY, and on
//! deletion DELETING → DELETED. An agent that fails, or does not answer
//! within the agent timeout, gets the session taken back: it is retried on
//! another server (unless DisableRetryOnFailure, or the retries are used
//! up), queued again (with EnqueueRequest), or DELETED with a StateReason.
//! Sessions an agent reports that the broker did not create (a console
//! session started by hand) are adopted and count like any other.
//!
//! Every deadline (queue expiry, agent answer, retention of DELETED
//! sessions) sits in one ordered index; the first operation at or after a
//! deadline processes it, as the periodic sweep does, so tests on a paused
//! clock see exact timing without background timers.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine as _, engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD,
};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::{sync::mpsc, time::Instant};

use super::{
    AgentStep, FailureCode, FieldViolation, Fleet, FleetError, ItemFailure, State, availability,
    model::{
        OsFamily, Placement, ReportedSession, ServerId, ServerRecord, SessionKind, SessionState,
    },
    persist::Durable,
    query,
    requirements::Requirements,
};

/// A session id: assigned by the broker (a UUID) or, for sessions it
/// adopts, by the agent.
pub type SessionId = Arc<str>;

/// The longest session id accepted, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 256;
/// The longest name, owner or user, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// The longest path-like parameter (InitFile, AutorunFile, StorageRoot).
pub const MAX_PATH_CHARS: usize = 1024;
/// The largest permissions file, decoded: DCV permissions files are a few
/// lines; this leaves room without letting one request bloat memory.
pub const MAX_PERMISSIONS_BYTES: usize = 64 * 1024;
/// DCV's broker defaults for autorun arguments: at most 50, each at most
/// 150 characters.
pub const MAX_AUTORUN_ARGUMENTS: usize = 50;
/// See [`MAX_AUTORUN_ARGUMENTS`].
pub const MAX_AUTORUN_ARGUMENT_CHARS: usize = 150;
/// DCV's CLI range for MaxConcurrentClients.
pub const MAX_CONCURRENT_CLIENTS: i32 = 100;

/// The most Requirements evaluation work one CreateSessions request may
/// cause, in [`Requirements::cost`] units: each distinct expression costs
/// its cost times the number of servers. About a tenth of a second of one
/// core: one of the longest expressions against 3,000 servers, or a
/// one-tag expression against a million. Items whose expression would pass
/// it fail with `InvalidRequirements`.
pub const MAX_REQUEST_EVALUATION_COST: u64 = 32 * 1024 * 1024;

/// The most Requirements evaluation work done under one hold of the
/// fleet's lock, read or write, in [`Requirements::cost`] units (well
/// under a millisecond): a request's evaluation is cut into slices of it.
pub const MAX_SECTION_EVALUATION_COST: u64 = 64 * 1024;

/// The most CreateSessions items placed under one hold of the write lock:
/// each may walk the fleet's load index, so a batch of 1,000 is placed in
/// several short holds rather than one long one.
pub const MAX_ITEMS_PER_SECTION: usize = 64;

/// What walking past one server costs, in [`Requirements::cost`] units.
const STEP_COST: u64 = 4;

/// How many of a request's matching servers may turn out not to match
/// when re-checked under the write lock (their agents re-registered with
/// other tags in between) before the item is treated as finding none.
const MAX_RECHECK_MISSES: usize = 4;

/// The text DCV uses for an unknown session; clients match it.
pub const SESSION_NOT_FOUND_TEXT: &str = "The requested dcvSession does not exist";

/// How the broker chooses among the servers that can take a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlacementStrategy {
    /// The server with the fewest sessions; ties go to the lowest id.
    #[default]
    Spread,
    /// The server with the most sessions that still has room; ties go to
    /// the lowest id. Keeps servers empty for scale-in.
    Pack,
}

/// The detail of a CREATING session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Substate {
    /// Queued, or waiting for the chosen agent to create it.
    Placing,
    /// Created by the agent, not yet usable.
    PendingPreparation,
}

/// A CreateSessions item as the caller sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSpec {
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Type; `None` when the caller left it unspecified.
    pub kind: Option<SessionKind>,
    /// Init file.
    pub init_file: String,
    /// Most concurrent clients.
    pub max_concurrent_clients: Option<i32>,
    /// DCV-GL.
    pub dcv_gl_enabled: bool,
    /// Permissions file, base64.
    pub permissions_file: String,
    /// Queue when nothing fits now.
    pub enqueue: bool,
    /// Autorun file.
    pub autorun_file: String,
    /// Autorun arguments.
    pub autorun_file_arguments: Vec<String>,
    /// No retry on another server.
    pub disable_retry: bool,
    /// Placement expression (empty: none).
    pub requirements: String,
    /// Storage root.
    pub storage_root: String,
}

/// A validated creation request: what placement and the agent need.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Type.
    pub kind: SessionKind,
    /// Init file.
    pub init_file: String,
    /// Most concurrent clients (0: the server's default).
    pub max_concurrent_clients: u32,
    /// DCV-GL.
    pub dcv_gl_enabled: bool,
    /// Autorun file.
    pub autorun_file: String,
    /// Autorun arguments.
    pub autorun_file_arguments: Vec<String>,
    /// Storage root.
    pub storage_root: String,
    /// Parsed placement expression.
    pub requirements: Option<Requirements>,
    /// Queue when nothing fits.
    pub enqueue: bool,
    /// No retry on another server.
    pub disable_retry: bool,
}

impl Order {
    /// The request this order was validated from (Requirements in their
    /// canonical form), for storing.
    pub fn to_spec(&self) -> CreateSpec {
        CreateSpec {
            name: self.name.clone(),
            owner: self.owner.clone(),
            kind: Some(self.kind),
            init_file: self.init_file.clone(),
            max_concurrent_clients: (self.max_concurrent_clients > 0)
                .then(|| i32::try_from(self.max_concurrent_clients).unwrap_or(i32::MAX)),
            dcv_gl_enabled: self.dcv_gl_enabled,
            permissions_file: String::new(),
            enqueue: self.enqueue,
            autorun_file: self.autorun_file.clone(),
            autorun_file_arguments: self.autorun_file_arguments.clone(),
            disable_retry: self.disable_retry,
            requirements: self
                .requirements
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            storage_root: self.storage_root.clone(),
        }
    }
}

/// Everything the broker keeps about one session.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// Id.
    pub id: SessionId,
    /// Name (the id, for adopted sessions).
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Type.
    pub kind: SessionKind,
    /// The server it is on or being placed on; `None` while queued.
    pub server: Option<ServerId>,
    /// State.
    pub state: SessionState,
    /// Detail of CREATING.
    pub substate: Option<Substate>,
    /// Why it is in its state, when that needs saying.
    pub state_reason: String,
    /// When the broker accepted (or adopted) it.
    pub created_at: SystemTime,
    /// The creation request; `None` for adopted sessions.
    pub order: Option<Arc<Order>>,
    /// Current permissions file, base64 (empty: the server's default).
    pub permissions_file: String,
    /// Servers tried so far, in order.
    pub tried: Vec<ServerId>,
    /// The pending deadline: queue expiry, agent answer, or the end of a
    /// DELETED session's retention.
    pub deadline: Option<Instant>,
    /// Deleted with Force: if its agent still reports it, it is adopted
    /// again (DCV's behaviour for stale-session cleanup).
    pub forgotten: bool,
    /// Its place in the queue while queued (smaller: earlier).
    pub queue_position: Option<u64>,
}

/// A session as DescribeSessions sees it: the record and its server.
#[derive(Debug, Clone, Copy)]
pub struct SessionView<'a> {
    /// The record.
    pub record: &'a SessionRecord,
    /// Its server, when it has one the broker still knows.
    pub server: Option<&'a ServerRecord>,
    /// Its server's agent is unreachable: the broker cannot vouch for the
    /// session's state, and DescribeSessions shows it as UNKNOWN.
    pub unreachable: bool,
}

impl<'a> SessionView<'a> {
    fn new(
        record: &'a SessionRecord,
        servers: &'a super::ServerMap,
        now: Instant,
        unreachable_after: Duration,
    ) -> Self {
        let server = record
            .server
            .as_ref()
            .and_then(|s| servers.get(s))
            .map(|s| &**s);
        let unreachable = server.is_some_and(|s| {
            availability::reasons(s, now, unreachable_after)
                .contains(availability::Reason::UnreachableAgent)
        });
        SessionView {
            record,
            server,
            unreachable,
        }
    }

    /// The state to show: the record's, or UNKNOWN for a live session
    /// whose agent is unreachable.
    pub fn shown_state(&self) -> SessionState {
        match self.record.state {
            SessionState::Ready | SessionState::Creating if self.unreachable => {
                SessionState::Unknown
            }
            state => state,
        }
    }
}

/// An instruction for a server's agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Instruction {
    /// Create a session.
    Create {
        /// The server.
        server: ServerId,
        /// The session.
        session: SessionId,
        /// What to create.
        order: Arc<Order>,
        /// Permissions file, base64 (empty: default).
        permissions_file: String,
    },
    /// Delete a session.
    Delete {
        /// The server.
        server: ServerId,
        /// The session.
        session: SessionId,
    },
    /// Replace a session's permissions.
    UpdatePermissions {
        /// The server.
        server: ServerId,
        /// The session.
        session: SessionId,
        /// Permissions file, base64.
        permissions_file: String,
    },
}

impl Instruction {
    /// The server it is for.
    pub fn server(&self) -> &ServerId {
        match self {
            Instruction::Create { server, .. }
            | Instruction::Delete { server, .. }
            | Instruction::UpdatePermissions { server, .. } => server,
        }
    }
}

/// Which instruction an agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstructionKind {
    /// Create.
    Create,
    /// Delete.
    Delete,
    /// Update permissions.
    UpdatePermissions,
}

/// An agent's answer to an instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionOutcome {
    /// Done; for a create, whether the session is READY already.
    Done {
        /// The session is READY (else still preparing).
        ready: bool,
    },
    /// Failed, with the agent's reason.
    Failed(String),
}

/// Something that changed which sessions occupy which servers, or which
/// servers are closed. Emitted in the order it happened, under the lock,
/// with a gap-free sequence number: an audit trail, and what the
/// concurrency tests check their invariants against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEvent {
    /// A close succeeded on a server that was open.
    ServerClosed {
        /// The server.
        server: ServerId,
        /// Whether Force was set.
        force: bool,
    },
    /// An open succeeded on a server that was closed.
    ServerOpened {
        /// The server.
        server: ServerId,
    },
    /// The broker placed a session on a server.
    SessionPlaced {
        /// The session.
        session: SessionId,
        /// The server.
        server: ServerId,
    },
    /// An agent reported a session the broker had not placed there.
    SessionAppeared {
        /// The session.
        session: SessionId,
        /// The server.
        server: ServerId,
    },
    /// A session stopped occupying a server.
    SessionLeft {
        /// The session.
        session: SessionId,
        /// The server.
        server: ServerId,
    },
}

/// A [`FleetEvent`] with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequencedEvent {
    /// Starts at 1, one more for each event.
    pub seq: u64,
    /// What happened.
    pub event: FleetEvent,
}

/// A DeleteSessions item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteItem {
    /// Session id.
    pub session_id: String,
    /// Owner.
    pub owner: String,
    /// Forget without asking the agent.
    pub force: bool,
}

/// An UpdateSessionPermissions item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermissionsItem {
    /// Session id.
    pub session_id: String,
    /// Owner.
    pub owner: String,
    /// Permissions file, base64.
    pub permissions_file: String,
}

/// A DescribeSessions request as the caller sent it.
#[derive(Debug, Clone, Default)]
pub struct SessionQuery {
    /// Only these ids (empty: all).
    pub session_ids: Vec<String>,
    /// Filters as key/value pairs.
    pub filters: Vec<(String, String)>,
    /// Page size, if given.
    pub max_results: Option<i32>,
    /// Token of the previous page.
    pub next_token: String,
}

/// Sessions' share of the state behind the fleet's lock.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    pub(super) records: HashMap<SessionId, SessionRecord>,
    /// The same ids, ordered, for pagination.
    order: BTreeSet<SessionId>,
    /// Queued sessions, oldest first.
    pub(super) queue: super::queue::Queue,
    /// Pending deadlines, earliest first.
    deadlines: BTreeSet<(Instant, SessionId)>,
    /// Each connected agent's instruction channel.
    agents: HashMap<ServerId, mpsc::UnboundedSender<Instruction>>,
    /// The last event's sequence number.
    seq: u64,
    /// Sessions changed since the last submission to the store.
    pub(super) dirty: HashSet<SessionId>,
    /// The next queue position (queue order survives restarts).
    pub(super) next_queue_position: u64,
}

impl Sessions {
    /// A record to change; marks it for the store.
    pub(super) fn record_mut(&mut self, id: &str) -> Option<&mut SessionRecord> {
        let record = self.records.get_mut(id)?;
        self.dirty.insert(record.id.clone());
        Some(record)
    }

    /// Adds a record; marks it for the store.
    pub(super) fn insert_record(&mut self, id: SessionId, record: SessionRecord) {
        self.dirty.insert(id.clone());
        self.order.insert(id.clone());
        self.records.insert(id, record);
    }

    /// Removes a record; marks it for the store.
    pub(super) fn remove_record(&mut self, id: &SessionId) {
        self.dirty.insert(id.clone());
        self.order.remove(id);
        self.records.remove(id);
    }
}

fn check_session_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        Err("must not be empty".into())
    } else if id.len() > MAX_SESSION_ID_BYTES {
        Err(format!(
            "must be at most {MAX_SESSION_ID_BYTES} bytes; got {}",
            id.len()
        ))
    } else {
        Ok(())
    }
}

fn check_name(what: &str, value: &str) -> Result<(), String> {
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

fn check_permissions(value: &str) -> Result<(), String> {
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

fn invalid(why: String) -> ItemFailure {
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
fn can_take(
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
fn room_for_any(server: &ServerRecord, now: Instant, unreachable_after: Duration) -> bool {
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
fn has_room(
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

impl State {
    fn emit(
        &mut self,
        event: FleetEvent,
        events: Option<&tokio::sync::broadcast::Sender<SequencedEvent>>,
    ) {
        self.sessions.seq += 1;
        if let Some(events) = events {
            // A receiver may have gone since; that is fine.
            let _ = events.send(SequencedEvent {
                seq: self.sessions.seq,
                event,
            });
        }
    }

    fn set_deadline(&mut self, id: &SessionId, deadline: Option<Instant>) {
        let Some(record) = self.sessions.records.get_mut(id) else {
            return;
        };
        self.sessions.dirty.insert(id.clone());
        if let Some(old) = record.deadline.take() {
            self.sessions.deadlines.remove(&(old, id.clone()));
        }
        if let Some(at) = deadline {
            record.deadline = Some(at);
            self.sessions.deadlines.insert((at, id.clone()));
        }
    }

    fn send(&mut self, instruction: Instruction) {
        let server = instruction.server().clone();
        if let Some(agent) = self.sessions.agents.get(&server)
            && agent.send(instruction).is_err()
        {
            // The agent's stream is gone; what it misses is resent when it
            // reconnects, or times out and is placed elsewhere.
            self.sessions.agents.remove(&server);
        }
    }

    /// The best server for `order`, by the placement strategy: the first
    /// server that can take it in the load index's order for the strategy
    /// (see `load_index`), without scanning the fleet. Requirements are
    /// evaluated here, under the lock, only within what is left of the
    /// operation's budget (`Ctx::evaluation_budget`): past it, no server
    /// is found (the session is queued or fails). CreateSessions evaluates
    /// them before it takes the lock (see [`State::choose_among`]); this
    /// is for retries and tests.
    pub(super) fn choose_server(
        &self,
        order: &Order,
        exclude: &[ServerId],
        now: Instant,
        ctx: &Ctx<'_>,
    ) -> Option<ServerId> {
        let budget = &ctx.evaluation_budget;
        let cost = order.requirements.as_ref().map_or(0, |r| r.cost());
        let takes = |entry: &&(u32, ServerId)| {
            let (load, id) = entry;
            if exclude.contains(id) {
                return false;
            }
            let server = self.servers.get(id);
            debug_assert!(server.is_some(), "the load index holds unknown server {id}");
            let Some(server) = server else {
                return false;
            };
            debug_assert_eq!(
                super::load_index::load_of(server),
                *load,
                "the load index is behind server {id}'s sessions"
            );
            if !has_room(server, order, now, ctx.config.unreachable_after) {
                return false;
            }
            let Some(requirements) = &order.requirements else {
                return true;
            };
            budget.set(budget.get().saturating_sub(cost));
            requirements.matches(server)
        };
        let affordable = |_: &&(u32, ServerId)| budget.get() >= cost;
        let chosen = match ctx.config.placement {
            PlacementStrategy::Spread => self
                .by_load
                .least_loaded_first()
                .take_while(affordable)
                .find(takes),
            PlacementStrategy::Pack => self
                .by_load
                .most_loaded_first()
                .take_while(affordable)
                .find(takes),
        };
        chosen.map(|(_, id)| id.clone())
    }

    /// The best server for `order` among `matching`, the servers its
    /// Requirements matched when evaluated outside the lock (see
    /// [`Fleet::matching_servers`]). The choice is re-checked against the
    /// server as it is now: room and availability always (a close that
    /// got in first wins), the Requirements once more on the chosen server
    /// only, since its agent may have re-registered in between; a server
    /// that no longer matches leaves `matching`. Adds the work done to
    /// `work`, in [`Requirements::cost`] units.
    pub(super) fn choose_among(
        &self,
        order: &Order,
        matching: &mut super::FastSet<ServerId>,
        now: Instant,
        ctx: &Ctx<'_>,
        work: &mut u64,
    ) -> Option<ServerId> {
        let requirements = order.requirements.as_ref()?;
        let unreachable_after = ctx.config.unreachable_after;
        for _ in 0..=MAX_RECHECK_MISSES {
            if matching.is_empty() {
                return None;
            }
            let best = if matching.len().saturating_mul(8) < self.servers.len() {
                // Few candidates: compare them directly rather than walk
                // the whole index past the others.
                *work += STEP_COST * matching.len() as u64;
                let candidates = matching
                    .iter()
                    .filter_map(|id| self.servers.get(id))
                    .filter(|s| has_room(s, order, now, unreachable_after))
                    .map(|s| (super::load_index::load_of(s), &s.id));
                match ctx.config.placement {
                    PlacementStrategy::Spread => candidates.min(),
                    PlacementStrategy::Pack => {
                        candidates.min_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)))
                    }
                }
                .map(|(_, id)| id.clone())
            } else {
                let mut walk: Box<dyn Iterator<Item = &(u32, ServerId)>> =
                    match ctx.config.placement {
                        PlacementStrategy::Spread => Box::new(self.by_load.least_loaded_first()),
                        PlacementStrategy::Pack => Box::new(self.by_load.most_loaded_first()),
                    };
                walk.find(|(_, id)| {
                    *work += STEP_COST;
                    matching.contains(id)
                        && self
                            .servers
                            .get(id)
                            .is_some_and(|s| has_room(s, order, now, unreachable_after))
                })
                .map(|(_, id)| id.clone())
            };
            let id = best?;
            *work += requirements.cost();
            if self
                .servers
                .get(&id)
                .is_some_and(|s| requirements.matches(s))
            {
                return Some(id);
            }
            matching.remove(&id);
        }
        None
    }

    /// What [`State::choose_server`] did before the load index: a scan of
    /// every server. The index's tests hold it to the same choices.
    #[cfg(test)]
    pub(super) fn choose_server_by_scan(
        &self,
        order: &Order,
        exclude: &[ServerId],
        now: Instant,
        ctx: &Ctx<'_>,
    ) -> Option<ServerId> {
        let candidates = self.servers.values().filter(|s| {
            !exclude.contains(&s.id) && can_take(s, order, now, ctx.config.unreachable_after)
        });
        let load = |s: &ServerRecord| s.live_sessions().count();
        match ctx.config.placement {
            PlacementStrategy::Spread => {
                candidates.min_by(|a, b| load(a).cmp(&load(b)).then_with(|| a.id.cmp(&b.id)))
            }
            PlacementStrategy::Pack => {
                candidates.min_by(|a, b| load(b).cmp(&load(a)).then_with(|| a.id.cmp(&b.id)))
            }
        }
        .map(|s| s.id.clone())
    }

    /// Takes in one CreateSessions item whose server (if any) is chosen:
    /// places it, queues it, or says why not. Returns the new session's id.
    fn accept(
        &mut self,
        spec: &CreateSpec,
        order: Arc<Order>,
        target: Option<ServerId>,
        now: Instant,
        wall: SystemTime,
        ctx: &Ctx<'_>,
    ) -> Result<SessionId, ItemFailure> {
        if target.is_none() && !order.enqueue {
            return Err(ItemFailure::new(
                FailureCode::NoServerAvailable,
                "No DCV server is available for the session's Type and Requirements.",
            ));
        }
        let queue_max_size = ctx.config.queue_max_size;
        if target.is_none() && self.sessions.queue.len() >= queue_max_size {
            return Err(ItemFailure::new(
                FailureCode::QueueFull,
                format!(
                    "No DCV server is available and the queue already holds {queue_max_size} requests."
                ),
            ));
        }
        if target.is_none() && !self.sessions.queue.admits(order.requirements.as_ref()) {
            return Err(ItemFailure::new(
                FailureCode::QueueFull,
                format!(
                    "No DCV server is available, and the queue's distinct Requirements already \
                     cost nearly the {} units a check of the queue may take; queue it again when \
                     some have been placed, or reuse an expression already queued.",
                    super::queue::MAX_QUEUE_REQUIREMENTS_COST
                ),
            ));
        }
        let id: SessionId = Arc::from(uuid::Uuid::new_v4().to_string());
        self.sessions.insert_record(
            id.clone(),
            SessionRecord {
                id: id.clone(),
                name: order.name.clone(),
                owner: order.owner.clone(),
                kind: order.kind,
                server: None,
                state: SessionState::Creating,
                substate: Some(Substate::Placing),
                state_reason: String::new(),
                created_at: wall,
                order: Some(order),
                permissions_file: spec.permissions_file.clone(),
                tried: Vec::new(),
                deadline: None,
                forgotten: false,
                queue_position: None,
            },
        );
        match target {
            Some(server) => self.place(&id, &server, now, ctx),
            None => self.enqueue(&id, now, ctx),
        }
        Ok(id)
    }

    /// Reserves a slot for `session` on `server` and tells its agent.
    fn place(&mut self, session: &SessionId, server: &ServerId, now: Instant, ctx: &Ctx<'_>) {
        let Some(record) = self.sessions.record_mut(session) else {
            return;
        };
        let Some(order) = record.order.clone() else {
            return;
        };
        record.server = Some(server.clone());
        record.state = SessionState::Creating;
        record.substate = Some(Substate::Placing);
        record.state_reason.clear();
        record.queue_position = None;
        record.tried.push(server.clone());
        let permissions_file = record.permissions_file.clone();
        if let Some(target) = self.servers.get_mut(server) {
            self.by_load.update(target, |target| {
                target.placing.push(Placement {
                    session: session.clone(),
                    kind: order.kind,
                    owner: order.owner.clone(),
                });
            });
        }
        self.set_deadline(session, Some(now + ctx.config.agent_timeout));
        self.emit(
            FleetEvent::SessionPlaced {
                session: session.clone(),
                server: server.clone(),
            },
            ctx.events,
        );
        self.send(Instruction::Create {
            server: server.clone(),
            session: session.clone(),
            order,
            permissions_file,
        });
    }

    /// Removes `session`'s reservation on its server, if it has one.
    fn release(&mut self, session: &SessionId, ctx: &Ctx<'_>) {
        let Some(server) = self
            .sessions
            .records
            .get(session)
            .and_then(|r| r.server.clone())
        else {
            return;
        };
        let Some(target) = self.servers.get_mut(&server) else {
            return;
        };
        let before = target.placing.len();
        self.by_load.update(target, |target| {
            target.placing.retain(|p| p.session != *session)
        });
        if target.placing.len() != before {
            self.emit(
                FleetEvent::SessionLeft {
                    session: session.clone(),
                    server,
                },
                ctx.events,
            );
        }
    }

    /// Drops `session` from `server`'s last report (its agent confirmed the
    /// deletion).
    fn forget_reported(&mut self, server: &ServerId, session: &SessionId, ctx: &Ctx<'_>) {
        let Some(target) = self.servers.get_mut(server) else {
            return;
        };
        let live_before = target
            .sessions
            .iter()
            .any(|s| *s.id == **session && s.state != SessionState::Deleted);
        self.by_load.update(target, |target| {
            target.sessions.retain(|s| *s.id != **session)
        });
        if live_before {
            self.emit(
                FleetEvent::SessionLeft {
                    session: session.clone(),
                    server: server.clone(),
                },
                ctx.events,
            );
        }
    }

    fn mark_deleted(&mut self, session: &SessionId, reason: String, now: Instant, ctx: &Ctx<'_>) {
        self.release(session, ctx);
        self.sessions.queue.remove(session);
        if let Some(record) = self.sessions.record_mut(session) {
            record.state = SessionState::Deleted;
            record.substate = None;
            record.state_reason = reason;
        }
        self.set_deadline(session, Some(now + ctx.config.deleted_retention));
    }

    /// The order of `session`, if it has one (adopted sessions do not).
    fn queued_order(&self, session: &SessionId) -> Option<Arc<Order>> {
        self.sessions
            .records
            .get(session)
            .and_then(|r| r.order.clone())
    }

    /// Queues `session`. The caller has checked that the queue admits it
    /// ([`super::queue::Queue::admits`]).
    fn enqueue(&mut self, session: &SessionId, now: Instant, ctx: &Ctx<'_>) {
        let position = self.sessions.next_queue_position;
        self.sessions.next_queue_position += 1;
        if let Some(record) = self.sessions.record_mut(session) {
            record.queue_position = Some(position);
            record.server = None;
            record.state = SessionState::Creating;
            record.substate = Some(Substate::Placing);
        }
        if let Some(order) = self.queued_order(session) {
            self.sessions.queue.push(session.clone(), order);
        }
        self.set_deadline(session, Some(now + ctx.config.queue_timeout));
    }

    /// The chosen agent failed or did not answer: take the session back
    /// and retry, queue or fail it.
    fn attempt_failed(&mut self, session: &SessionId, why: String, now: Instant, ctx: &Ctx<'_>) {
        self.release(session, ctx);
        let Some(record) = self.sessions.records.get(session) else {
            return;
        };
        let Some(order) = record.order.clone() else {
            return;
        };
        let tried = record.tried.clone();
        let retries_left =
            !order.disable_retry && tried.len() <= ctx.config.create_retries as usize;
        if retries_left && let Some(next) = self.choose_server(&order, &tried, now, ctx) {
            self.place(session, &next, now, ctx);
            return;
        }
        if order.enqueue && retries_left && self.sessions.queue.admits(order.requirements.as_ref())
        {
            self.enqueue(session, now, ctx);
            if let Some(record) = self.sessions.record_mut(session) {
                record.state_reason = why;
            }
            return;
        }
        self.mark_deleted(session, format!("Creation failed: {why}"), now, ctx);
    }

    /// Places queued sessions that `server` can take now, oldest first.
    /// Each distinct Requirements expression is evaluated at most once
    /// (a server's match does not depend on its sessions), so the work is
    /// bounded by the queue's admission bound
    /// ([`super::queue::MAX_QUEUE_REQUIREMENTS_COST`]).
    pub(super) fn drain_queue_onto(&mut self, server: &ServerId, now: Instant, ctx: &Ctx<'_>) {
        if self.sessions.queue.is_empty() {
            return;
        }
        let Some(target) = self.servers.get(server) else {
            return;
        };
        let unreachable_after = ctx.config.unreachable_after;
        if !room_for_any(target, now, unreachable_after) {
            return;
        }
        // Each Requirements group's verdict on this server, once
        // evaluated: it holds for the whole drain, since Requirements do
        // not look at sessions.
        let mut verdicts: super::FastMap<u64, bool> = super::FastMap::default();
        let mut i = 0;
        while let Some(entry) = self.sessions.queue.get(i) {
            let Some(target) = self.servers.get(server) else {
                return;
            };
            let matches = match (entry.group, &entry.order.requirements) {
                (Some(group), Some(r)) => {
                    *verdicts.entry(group).or_insert_with(|| r.matches(target))
                }
                _ => true,
            };
            if !matches {
                i += 1;
                continue;
            }
            let (id, order) = (entry.id.clone(), entry.order.clone());
            if has_room(target, &order, now, unreachable_after) {
                self.sessions.queue.remove_at(i);
                self.place(&id, server, now, ctx);
                let full = self
                    .servers
                    .get(server)
                    .is_none_or(|t| !room_for_any(t, now, unreachable_after));
                if full {
                    return;
                }
            } else {
                i += 1;
            }
        }
    }

    /// Loads stored sessions, rebuilding what depends on them: each
    /// server's occupancy (placements in flight, and live sessions as if
    /// its agent had just reported them, until it does), the queue in its
    /// stored order, and the deadlines.
    pub(super) fn restore_sessions(
        &mut self,
        stored: Vec<super::persist::StoredSession>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), FleetError> {
        let mut queued = Vec::new();
        for s in stored {
            let id: SessionId = Arc::from(s.id.as_str());
            let order = match s.request {
                Some(spec) => Some(Arc::new(validate_create(&spec).map_err(|f| {
                    FleetError::Internal(format!(
                        "stored session {id} has a request this broker refuses: {}",
                        f.reason
                    ))
                })?)),
                None => None,
            };
            let server = s
                .server
                .as_deref()
                .and_then(|sid| self.servers.get(sid))
                .map(|srv| srv.id.clone());
            if let (Some(server_id), true) = (&server, s.state != SessionState::Deleted)
                && let Some(target) = self.servers.get_mut(server_id)
            {
                self.by_load.update(target, |target| {
                    if s.state == SessionState::Creating && s.substate == Some(Substate::Placing) {
                        target.placing.push(Placement {
                            session: id.clone(),
                            kind: s.kind,
                            owner: s.owner.clone(),
                        });
                    } else {
                        // Whether its agent had reported it yet is not
                        // stored: it counts as reported, and the agent's
                        // next heartbeat says whether it still runs.
                        target.sessions.push(ReportedSession {
                            id: s.id.clone(),
                            owner: s.owner.clone(),
                            kind: s.kind,
                            state: s.state,
                        });
                    }
                });
            }
            if server.is_none()
                && s.state == SessionState::Creating
                && s.substate == Some(Substate::Placing)
            {
                queued.push((s.queue_position.unwrap_or(0), id.clone()));
            }
            let deadline = s
                .deadline
                .map(|at| super::persist::monotonic_time(at, now, wall));
            if let Some(at) = deadline {
                self.sessions.deadlines.insert((at, id.clone()));
            }
            self.sessions.order.insert(id.clone());
            self.sessions.records.insert(
                id.clone(),
                SessionRecord {
                    id,
                    name: s.name,
                    owner: s.owner,
                    kind: s.kind,
                    server,
                    state: s.state,
                    substate: s.substate,
                    state_reason: s.state_reason,
                    created_at: s.created_at,
                    order,
                    permissions_file: s.permissions_file,
                    tried: s.tried.iter().map(|t| Arc::from(t.as_str())).collect(),
                    deadline,
                    forgotten: s.forgotten,
                    queue_position: s.queue_position,
                },
            );
        }
        queued.sort();
        self.sessions.next_queue_position = queued.last().map_or(0, |(p, _)| p + 1);
        for (_, id) in queued {
            // Admitted when it was queued: restored whatever the bound.
            if let Some(order) = self.queued_order(&id) {
                self.sessions.queue.push(id, order);
            }
        }
        Ok(())
    }

    /// Processes every session deadline at or before `now`.
    pub(super) fn process_session_deadlines(&mut self, now: Instant, ctx: &Ctx<'_>) {
        while let Some((at, id)) = self.sessions.deadlines.first().cloned() {
            if at > now {
                break;
            }
            // A retry evaluates Requirements under the lock; once this
            // section's budget cannot pay for one, the rest wait for the
            // next operation (the deadline stays due, so it comes soon),
            // rather than fail for want of budget.
            let retry_cost = self
                .sessions
                .records
                .get(&id)
                .filter(|r| r.server.is_some() && r.substate == Some(Substate::Placing))
                .and_then(|r| r.order.as_ref())
                .and_then(|o| o.requirements.as_ref())
                .map_or(0, |r| r.cost());
            if retry_cost > ctx.evaluation_budget.get() {
                break;
            }
            self.sessions.deadlines.remove(&(at, id.clone()));
            let Some(record) = self.sessions.record_mut(&id) else {
                continue;
            };
            record.deadline = None;
            match (record.state, record.substate, record.server.is_some()) {
                (SessionState::Deleted, _, _) => {
                    self.sessions.remove_record(&id);
                }
                (SessionState::Creating, Some(Substate::Placing), false) => {
                    let waited = ctx.config.queue_timeout.as_secs();
                    self.mark_deleted(
                        &id,
                        format!(
                            "No DCV server could take the session within {waited} s in the queue."
                        ),
                        now,
                        ctx,
                    );
                }
                (SessionState::Creating, Some(Substate::Placing), true) => {
                    let server = record.server.clone();
                    let waited = ctx.config.agent_timeout.as_secs();
                    if let Some(server) = server {
                        // It may still appear later: ask for it to go.
                        self.send(Instruction::Delete {
                            server: server.clone(),
                            session: id.clone(),
                        });
                        self.attempt_failed(
                            &id,
                            format!(
                                "the agent of server {server} did not answer within {waited} s"
                            ),
                            now,
                            ctx,
                        );
                    }
                }
                _ => {}
            }
        }
    }

    pub(super) fn session_deadline_due(&self, now: Instant) -> bool {
        self.sessions
            .deadlines
            .first()
            .is_some_and(|(at, _)| *at <= now)
    }

    /// Brings session records in line with a server's new report, then
    /// lets queued sessions onto the server. `old` is the previous report.
    pub(super) fn reconcile_report(
        &mut self,
        server: &ServerId,
        old: &[ReportedSession],
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        let Some(target) = self.servers.get_mut(server) else {
            return;
        };
        let reported: Vec<ReportedSession> = target.sessions.clone();
        let placing_before: HashSet<SessionId> =
            target.placing.iter().map(|p| p.session.clone()).collect();
        // Placements the agent now reports stop being reservations.
        self.by_load.update(target, |target| {
            target.placing.retain(|p| {
                !reported
                    .iter()
                    .any(|s| s.id == *p.session && s.state != SessionState::Deleted)
            });
        });
        let live_now: HashSet<&str> = reported
            .iter()
            .filter(|s| s.state != SessionState::Deleted)
            .map(|s| s.id.as_str())
            .collect();
        let was_live: HashSet<&str> = old
            .iter()
            .filter(|s| s.state != SessionState::Deleted)
            .map(|s| s.id.as_str())
            .collect();
        let placing_ids: HashSet<SessionId> =
            target.placing.iter().map(|p| p.session.clone()).collect();

        for s in &reported {
            let id: SessionId = Arc::from(s.id.as_str());
            let (state, substate) = match s.state {
                SessionState::Creating => {
                    (SessionState::Creating, Some(Substate::PendingPreparation))
                }
                other => (other, None),
            };
            match self.sessions.record_mut(&id) {
                Some(record) => {
                    let revive = record.state == SessionState::Deleted
                        && record.forgotten
                        && state != SessionState::Deleted;
                    let deleting =
                        record.state == SessionState::Deleting && state != SessionState::Deleted;
                    if record.state == SessionState::Deleted && !revive {
                        continue;
                    }
                    if deleting {
                        continue;
                    }
                    record.server = Some(server.clone());
                    record.state = state;
                    record.substate = substate;
                    if revive {
                        record.forgotten = false;
                        record.state_reason = "Reported again by its agent.".into();
                    }
                    if state == SessionState::Deleted {
                        record.state_reason = "Deleted on its server.".into();
                        self.set_deadline(&id, Some(now + ctx.config.deleted_retention));
                    } else {
                        self.set_deadline(&id, None);
                    }
                }
                None if state != SessionState::Deleted => {
                    self.sessions.insert_record(
                        id.clone(),
                        SessionRecord {
                            id: id.clone(),
                            name: s.id.clone(),
                            owner: s.owner.clone(),
                            kind: s.kind,
                            server: Some(server.clone()),
                            state,
                            substate,
                            state_reason: "Reported by its agent; not created by the broker."
                                .into(),
                            created_at: super::persist::wall_clock(),
                            order: None,
                            permissions_file: String::new(),
                            tried: Vec::new(),
                            deadline: None,
                            forgotten: false,
                            queue_position: None,
                        },
                    );
                }
                None => {}
            }
        }
        // Sessions the agent reported before and no longer does are gone.
        for gone in was_live.difference(&live_now) {
            let id: SessionId = Arc::from(*gone);
            if placing_ids.contains(&id) {
                continue;
            }
            if let Some(record) = self.sessions.record_mut(&id)
                && record.server.as_ref() == Some(server)
                && record.state != SessionState::Deleted
            {
                let reason = if record.state == SessionState::Deleting {
                    "Deleted on its server."
                } else {
                    "No longer reported by its agent."
                };
                record.state = SessionState::Deleted;
                record.substate = None;
                record.state_reason = reason.into();
                self.set_deadline(&id, Some(now + ctx.config.deleted_retention));
            }
        }
        // Occupancy changes, for the event trail.
        let before: HashSet<&str> = was_live
            .iter()
            .copied()
            .chain(placing_before.iter().map(|p| &**p))
            .collect();
        let after: HashSet<&str> = live_now
            .iter()
            .copied()
            .chain(placing_ids.iter().map(|p| &**p))
            .collect();
        let appeared: Vec<SessionId> = after.difference(&before).map(|s| Arc::from(*s)).collect();
        let left: Vec<SessionId> = before.difference(&after).map(|s| Arc::from(*s)).collect();
        for session in appeared {
            self.emit(
                FleetEvent::SessionAppeared {
                    session,
                    server: server.clone(),
                },
                ctx.events,
            );
        }
        for session in left {
            self.emit(
                FleetEvent::SessionLeft {
                    session,
                    server: server.clone(),
                },
                ctx.events,
            );
        }
        self.drain_queue_onto(server, now, ctx);
    }

    /// A server is gone for good: its reservations are placed elsewhere,
    /// its sessions end.
    pub(super) fn server_removed(&mut self, server: &ServerRecord, now: Instant, ctx: &Ctx<'_>) {
        for p in &server.placing {
            self.emit(
                FleetEvent::SessionLeft {
                    session: p.session.clone(),
                    server: server.id.clone(),
                },
                ctx.events,
            );
        }
        for s in server
            .sessions
            .iter()
            .filter(|s| s.state != SessionState::Deleted)
        {
            self.emit(
                FleetEvent::SessionLeft {
                    session: Arc::from(s.id.as_str()),
                    server: server.id.clone(),
                },
                ctx.events,
            );
        }
        self.sessions.agents.remove(&server.id);
        let ids: Vec<SessionId> = self
            .sessions
            .records
            .values()
            .filter(|r| r.server.as_ref() == Some(&server.id) && r.state != SessionState::Deleted)
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            let placing = server.placing.iter().any(|p| p.session == id);
            if placing {
                // Already released with the server; retry elsewhere.
                if let Some(record) = self.sessions.record_mut(&id) {
                    record.server = None;
                }
                self.attempt_failed(&id, format!("server {} was removed", server.id), now, ctx);
            } else {
                if let Some(record) = self.sessions.record_mut(&id) {
                    record.server = None;
                }
                self.mark_deleted(
                    &id,
                    format!("Its server {} was removed.", server.id),
                    now,
                    ctx,
                );
            }
        }
    }

    pub(super) fn after_server_change(&mut self, server: &ServerId, now: Instant, ctx: &Ctx<'_>) {
        self.drain_queue_onto(server, now, ctx);
    }

    pub(super) fn emit_close(&mut self, server: &ServerId, force: bool, ctx: &Ctx<'_>) {
        self.emit(
            FleetEvent::ServerClosed {
                server: server.clone(),
                force,
            },
            ctx.events,
        );
    }

    pub(super) fn emit_open(&mut self, server: &ServerId, ctx: &Ctx<'_>) {
        self.emit(
            FleetEvent::ServerOpened {
                server: server.clone(),
            },
            ctx.events,
        );
    }
}

/// What state methods need besides the state: configuration and the event
/// channel.
pub(super) struct Ctx<'a> {
    pub(super) config: &'a super::FleetConfig,
    /// The event channel, when anyone listens.
    pub(super) events: Option<&'a tokio::sync::broadcast::Sender<SequencedEvent>>,
    /// What is left of the operation's Requirements evaluation under the
    /// lock ([`MAX_SECTION_EVALUATION_COST`] to start with), shared by
    /// every retry it makes ([`State::choose_server`]).
    pub(super) evaluation_budget: std::cell::Cell<u64>,
}

/// Signs connection tokens: who may connect to which session until when.
#[derive(Clone)]
pub(super) struct ConnectionTokens {
    key: [u8; 32],
}

impl std::fmt::Debug for ConnectionTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionTokens").finish_non_exhaustive()
    }
}

const TOKEN_MAC_BYTES: usize = 32;

impl ConnectionTokens {
    pub(super) fn with_key(key: [u8; 32]) -> Self {
        ConnectionTokens { key }
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
    }

    /// `base64url(session \n user \n expiry) . base64url(hmac)`.
    pub(super) fn issue(&self, session: &str, user: &str, expires: SystemTime) -> String {
        let secs = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let payload = format!("{session}\n{user}\n{secs}");
        let tag = self
            .mac()
            .chain_update(payload.as_bytes())
            .finalize()
            .into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The (session, user) a genuine, unexpired token admits.
    pub(super) fn check(&self, token: &str, now: SystemTime) -> Result<(String, String), String> {
        let (payload, tag) = token
            .split_once('.')
            .ok_or_else(|| "malformed token".to_string())?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| "malformed token".to_string())?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| "malformed token".to_string())?;
        if tag.len() != TOKEN_MAC_BYTES {
            return Err("malformed token".into());
        }
        self.mac()
            .chain_update(&payload)
            .verify_slice(&tag)
            .map_err(|_| "the token was not issued by this broker".to_string())?;
        let text = String::from_utf8(payload).map_err(|_| "malformed token".to_string())?;
        let mut parts = text.split('\n');
        let (Some(session), Some(user), Some(secs), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed token".into());
        };
        let secs: u64 = secs.parse().map_err(|_| "malformed token".to_string())?;
        if now > UNIX_EPOCH + Duration::from_secs(secs) {
            return Err("the token has expired".into());
        }
        Ok((session.to_string(), user.to_string()))
    }
}

fn dedupe_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<Option<ItemFailure>> {
    super::precheck_ids(
        ids,
        "SessionId",
        check_session_id,
        FailureCode::InvalidSessionParameter,
        FailureCode::DuplicateSessionId,
    )
}

fn not_found() -> ItemFailure {
    ItemFailure::new(FailureCode::SessionNotFound, SESSION_NOT_FOUND_TEXT)
}

/// One DescribeSessions filter predicate.
#[derive(Debug)]
enum SessionPredicate {
    Owner(String),
    Tag(String, String),
    State(SessionState),
}

fn parse_state(s: &str) -> Option<SessionState> {
    Some(match s {
        "CREATING" => SessionState::Creating,
        "READY" => SessionState::Ready,
        "DELETING" => SessionState::Deleting,
        "DELETED" => SessionState::Deleted,
        "UNKNOWN" => SessionState::Unknown,
        _ => return None,
    })
}

fn parse_session_filters(
    pairs: &[(String, String)],
    violations: &mut Vec<FieldViolation>,
) -> query::FilterGroups<SessionPredicate> {
    query::FilterGroups::parse(pairs, violations, |i, key, value| match key {
        "owner" => Ok(SessionPredicate::Owner(value.to_string())),
        "state" => parse_state(value)
            .map(SessionPredicate::State)
            .ok_or_else(|| {
                FieldViolation::new(
                    format!("Filters[{i}].Value"),
                    "state is CREATING, READY, DELETING, DELETED or UNKNOWN",
                )
            }),
        _ => match query::tag_key(key) {
            Some(tag) => Ok(SessionPredicate::Tag(tag.to_string(), value.to_string())),
            None => Err(FieldViolation::new(
                format!("Filters[{i}].Key"),
                "unknown filter key; use owner, state or tag:KEY",
            )),
        },
    })
}

fn session_matches(p: &SessionPredicate, view: &SessionView<'_>) -> bool {
    match p {
        SessionPredicate::Owner(o) => view.record.owner == *o,
        SessionPredicate::State(s) => view.shown_state() == *s,
        SessionPredicate::Tag(k, v) => view
            .server
            .and_then(|s| s.tag(k))
            .is_some_and(|got| got == v.as_str()),
    }
}

impl Fleet {
    pub(super) fn ctx(&self) -> Ctx<'_> {
        Ctx {
            config: &self.config,
            // Asked once per operation, not per event: a send with nobody
            // listening still takes the channel's lock, and a batch of
            // 1,000 closes sends 1,000 events. A receiver that subscribes
            // during an operation sees the events of the next one.
            events: (self.events.receiver_count() > 0).then_some(&self.events),
            evaluation_budget: std::cell::Cell::new(MAX_SECTION_EVALUATION_COST),
        }
    }

    /// A stream of fleet events, from now on. A receiver that falls more
    /// than the configured buffer behind loses events and is told so.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<SequencedEvent> {
        self.events.subscribe()
    }

    /// Creates sessions; one result per item, in order. Each accepted
    /// session is handed to `visit` (under the lock) with its index.
    ///
    /// The work under the fleet's lock is bounded whatever the request
    /// holds: items are validated and their Requirements parsed first;
    /// each distinct expression is then evaluated against the fleet under
    /// the read lock, in slices of [`MAX_SECTION_EVALUATION_COST`], within
    /// the request's budget ([`MAX_REQUEST_EVALUATION_COST`]); and the
    /// items are placed in write sections of at most
    /// [`MAX_ITEMS_PER_SECTION`], each choice re-checked against the
    /// server as it is then. Observers may thus see part of a batch placed
    /// before the rest; each item is placed (or queued) whole.
    pub async fn create_sessions(
        &self,
        specs: &[CreateSpec],
        visit: impl FnMut(usize, SessionView<'_>),
    ) -> Result<Vec<Result<(), ItemFailure>>, FleetError> {
        let (results, durables) = self.create_sessions_locked(specs, visit)?;
        for durable in durables {
            durable.wait().await?;
        }
        Ok(results)
    }

    /// The servers `requirements` matches now, evaluated under the read
    /// lock in slices of at most [`MAX_SECTION_EVALUATION_COST`], so that
    /// writers get in between. A server that joins or changes meanwhile
    /// may be missed or kept: the choice is re-checked under the write
    /// lock ([`State::choose_among`]).
    fn matching_servers(&self, requirements: &Requirements) -> super::FastSet<ServerId> {
        use std::ops::Bound;
        let per_slice =
            usize::try_from((MAX_SECTION_EVALUATION_COST / requirements.cost().max(1)).max(1))
                .unwrap_or(usize::MAX);
        let mut matching = super::FastSet::default();
        let mut after: Option<ServerId> = None;
        loop {
            let state = self.state.read();
            let range = match &after {
                None => state.order.range::<ServerId, _>(..),
                Some(last) => state
                    .order
                    .range::<ServerId, _>((Bound::Excluded(last), Bound::Unbounded)),
            };
            let mut seen = 0;
            for id in range.take(per_slice) {
                seen += 1;
                if state
                    .servers
                    .get(id)
                    .is_some_and(|server| requirements.matches(server))
                {
                    matching.insert(id.clone());
                }
                after = Some(id.clone());
            }
            drop(state);
            if seen < per_slice {
                return matching;
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn create_sessions_locked(
        &self,
        specs: &[CreateSpec],
        mut visit: impl FnMut(usize, SessionView<'_>),
    ) -> Result<(Vec<Result<(), ItemFailure>>, Vec<Durable>), FleetError> {
        super::validate_batch_size("Sessions", specs.len())?;
        // Parsing and validation happen before the lock is taken.
        let mut orders: Vec<Result<Arc<Order>, ItemFailure>> = specs
            .iter()
            .map(|spec| validate_create(spec).map(Arc::new))
            .collect();
        // Each distinct expression, with the servers it matches: charged
        // to the request's budget once, evaluated once, outside the write
        // lock.
        let servers = self.len().max(1) as u64;
        // Per group: its expression (from its first order) and matches.
        let mut groups: Vec<(Arc<Order>, super::FastSet<ServerId>)> = Vec::new();
        let mut group_of: Vec<Option<usize>> = vec![None; orders.len()];
        let mut by_fingerprint: super::FastMap<u64, Vec<usize>> = super::FastMap::default();
        let mut spent: u64 = 0;
        for (index, slot) in orders.iter_mut().enumerate() {
            let Ok(order) = slot else { continue };
            let Some(requirements) = &order.requirements else {
                continue;
            };
            let known = by_fingerprint
                .get(&requirements.fingerprint())
                .and_then(|candidates| {
                    candidates.iter().copied().find(|&g| {
                        groups[g]
                            .0
                            .requirements
                            .as_ref()
                            .is_some_and(|r| r.same_as(requirements))
                    })
                });
            if let Some(g) = known {
                group_of[index] = Some(g);
                continue;
            }
            let cost = requirements.cost().saturating_mul(servers);
            if spent.saturating_add(cost) > MAX_REQUEST_EVALUATION_COST {
                *slot = Err(ItemFailure::new(
                    FailureCode::InvalidRequirements,
                    format!(
                        "Requirements: evaluating this request's distinct Requirements against \
                         the {servers} servers would take more than the {MAX_REQUEST_EVALUATION_COST} \
                         units one request may use (an expression costs about a unit per \
                         character, per server); send fewer distinct or shorter expressions per \
                         request."
                    ),
                ));
                continue;
            }
            spent += cost;
            by_fingerprint
                .entry(requirements.fingerprint())
                .or_default()
                .push(groups.len());
            group_of[index] = Some(groups.len());
            groups.push((order.clone(), super::FastSet::default()));
        }
        for (order, matching) in &mut groups {
            if let Some(requirements) = &order.requirements {
                *matching = self.matching_servers(requirements);
            }
        }

        let mut results = Vec::with_capacity(specs.len());
        let mut durables = Vec::new();
        let mut items = specs.iter().zip(orders).zip(group_of).enumerate();
        let mut next = items.next();
        while next.is_some() {
            let now = Instant::now();
            let wall = super::persist::wall_clock();
            let ctx = self.ctx();
            let mut state = self.write(now);
            let mut accepted = Vec::new();
            let mut placed = 0;
            let mut work = 0;
            while let Some((index, ((spec, order), group))) = next.take() {
                let order = match order {
                    Ok(order) => order,
                    Err(failure) => {
                        results.push(Err(failure));
                        next = items.next();
                        continue;
                    }
                };
                let target = match group.and_then(|g| groups.get_mut(g)) {
                    Some((_, matching)) => {
                        state.choose_among(&order, matching, now, &ctx, &mut work)
                    }
                    None => state.choose_server(&order, &[], now, &ctx),
                };
                let result = state.accept(spec, order, target, now, wall, &ctx);
                if let Ok(id) = &result {
                    accepted.push((index, id.clone()));
                }
                results.push(result.map(|_| ()));
                placed += 1;
                next = items.next();
                if placed >= MAX_ITEMS_PER_SECTION || work >= MAX_SECTION_EVALUATION_COST {
                    break;
                }
            }
            for (index, id) in accepted {
                if let Some(record) = state.sessions.records.get(&id) {
                    let unreachable_after = self.config.unreachable_after;
                    visit(
                        index,
                        SessionView::new(record, &state.servers, now, unreachable_after),
                    );
                }
            }
            durables.push(self.commit(&mut state));
        }
        Ok((results, durables))
    }

    /// Deletes sessions; one result per item (the state the session is in
    /// afterwards), in order.
    pub async fn delete_sessions(
        &self,
        items: &[DeleteItem],
    ) -> Result<Vec<Result<SessionState, ItemFailure>>, FleetError> {
        let (results, durable) = self.delete_sessions_locked(items)?;
        durable.wait().await?;
        Ok(results)
    }

    #[allow(clippy::type_complexity)]
    fn delete_sessions_locked(
        &self,
        items: &[DeleteItem],
    ) -> Result<(Vec<Result<SessionState, ItemFailure>>, Durable), FleetError> {
        super::validate_batch_size("Sessions", items.len())?;
        let mut pre = dedupe_ids(items.iter().map(|i| i.session_id.as_str()));
        for (item, slot) in items.iter().zip(pre.iter_mut()) {
            if slot.is_none()
                && let Err(why) = check_name("Owner", &item.owner)
            {
                *slot = Some(invalid(why));
            }
        }
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let mut results = Vec::with_capacity(items.len());
        for (item, pre) in items.iter().zip(pre) {
            if let Some(failure) = pre {
                results.push(Err(failure));
                continue;
            }
            let id: SessionId = Arc::from(item.session_id.as_str());
            let Some(record) = state.sessions.records.get(&id) else {
                results.push(Err(not_found()));
                continue;
            };
            if record.owner != item.owner {
                results.push(Err(not_found()));
                continue;
            }
            let server = record.server.clone();
            match (record.state, server) {
                (SessionState::Deleted, _) => results.push(Ok(SessionState::Deleted)),
                (_, None) => {
                    state.mark_deleted(&id, "Deleted while queued.".into(), now, &ctx);
                    results.push(Ok(SessionState::Deleted));
                }
                (_, Some(server)) if item.force => {
                    state.mark_deleted(&id, "Deleted with Force.".into(), now, &ctx);
                    if let Some(record) = state.sessions.record_mut(&id) {
                        record.forgotten = true;
                    }
                    // Forgotten means it no longer occupies its server, from
                    // now on (if the agent still reports it, the next
                    // heartbeat brings it back); the room goes to the queue,
                    // oldest first, before any newer request can take it.
                    state.forget_reported(&server, &id, &ctx);
                    state.drain_queue_onto(&server, now, &ctx);
                    results.push(Ok(SessionState::Deleted));
                }
                (_, Some(server)) => {
                    if let Some(record) = state.sessions.record_mut(&id) {
                        record.state = SessionState::Deleting;
                        record.substate = None;
                        record.state_reason.clear();
                    }
                    state.set_deadline(&id, None);
                    state.send(Instruction::Delete {
                        server,
                        session: id.clone(),
                    });
                    results.push(Ok(SessionState::Deleting));
                }
            }
        }
        let durable = self.commit(&mut state);
        Ok((results, durable))
    }

    /// Replaces sessions' permissions files; one result per item.
    pub async fn update_session_permissions(
        &self,
        items: &[PermissionsItem],
    ) -> Result<Vec<Result<(), ItemFailure>>, FleetError> {
        let (results, durable) = self.update_session_permissions_locked(items)?;
        durable.wait().await?;
        Ok(results)
    }

    #[allow(clippy::type_complexity)]
    fn update_session_permissions_locked(
        &self,
        items: &[PermissionsItem],
    ) -> Result<(Vec<Result<(), ItemFailure>>, Durable), FleetError> {
        super::validate_batch_size("Sessions", items.len())?;
        let mut pre = dedupe_ids(items.iter().map(|i| i.session_id.as_str()));
        for (item, slot) in items.iter().zip(pre.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            if let Err(why) = check_name("Owner", &item.owner) {
                *slot = Some(invalid(why));
            } else if item.permissions_file.is_empty() {
                *slot = Some(invalid("PermissionsFile is required.".into()));
            } else if let Err(why) = check_permissions(&item.permissions_file) {
                *slot = Some(invalid(why));
            }
        }
        let now = Instant::now();
        let mut state = self.write(now);
        let mut results = Vec::with_capacity(items.len());
        for (item, pre) in items.iter().zip(pre) {
            if let Some(failure) = pre {
                results.push(Err(failure));
                continue;
            }
            let id: SessionId = Arc::from(item.session_id.as_str());
            let Some(record) = state.sessions.record_mut(&id) else {
                results.push(Err(not_found()));
                continue;
            };
            if record.owner != item.owner
                || matches!(record.state, SessionState::Deleted | SessionState::Deleting)
            {
                results.push(Err(not_found()));
                continue;
            }
            record.permissions_file = item.permissions_file.clone();
            if let Some(server) = record.server.clone() {
                state.send(Instruction::UpdatePermissions {
                    server,
                    session: id.clone(),
                    permissions_file: item.permissions_file.clone(),
                });
            }
            results.push(Ok(()));
        }
        let durable = self.commit(&mut state);
        Ok((results, durable))
    }

    /// Runs a DescribeSessions query; see [`Fleet::describe_servers`].
    pub fn describe_sessions(
        &self,
        query: &SessionQuery,
        visit: impl FnMut(SessionView<'_>),
    ) -> Result<Option<String>, FleetError> {
        let mut violations = Vec::new();
        let page_size = query::page_size(query.max_results, &mut violations);
        let ids = query::id_list(
            "SessionIds",
            &query.session_ids,
            check_session_id,
            &mut violations,
        );
        let filters = parse_session_filters(&query.filters, &mut violations);
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        let fingerprint = || query::query_fingerprint("sessions", ids.as_deref(), &query.filters);
        let wall = SystemTime::now();
        let after = self.resume_after(&query.next_token, fingerprint, wall)?;
        let now = Instant::now();
        let state = self.read(now);
        let records = query::walk(
            &state.sessions.order,
            &state.sessions.records,
            ids.as_deref(),
            after.as_deref(),
        );
        let matching = records
            .map(|record| {
                SessionView::new(record, &state.servers, now, self.config.unreachable_after)
            })
            .filter(|view| filters.matches(|p| session_matches(p, view)));
        let last = query::paginate(matching, page_size, |v| v.record.id.clone(), visit);
        Ok(last.map(|id| self.tokens.issue(&fingerprint(), &id, wall)))
    }

    /// A READY session's view (to `visit`) and a connection token for
    /// `user`.
    pub fn connection_data(
        &self,
        session_id: &str,
        user: &str,
        visit: impl FnOnce(SessionView<'_>),
    ) -> Result<String, FleetError> {
        let mut violations = Vec::new();
        if let Err(why) = check_session_id(session_id) {
            violations.push(FieldViolation::new("SessionId", why));
        }
        if let Err(why) = check_name("User", user) {
            violations.push(FieldViolation::new("User", why));
        }
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        let now = Instant::now();
        let state = self.read(now);
        let record = state
            .sessions
            .records
            .get(session_id)
            .filter(|r| r.state != SessionState::Deleted)
            .ok_or_else(|| FleetError::SessionNotFound(session_id.to_string()))?;
        let view = SessionView::new(record, &state.servers, now, self.config.unreachable_after);
        match view.shown_state() {
            SessionState::Ready => {}
            SessionState::Unknown => {
                return Err(FleetError::FailedPrecondition(format!(
                    "session {session_id} is UNKNOWN: its server's agent is unreachable"
                )));
            }
            _ => {
                return Err(FleetError::FailedPrecondition(format!(
                    "session {session_id} is not READY yet; try again when it is"
                )));
            }
        }
        visit(view);
        let expires = SystemTime::now() + self.config.connection_token_ttl;
        Ok(self.connection_tokens.issue(session_id, user, expires))
    }

    /// Checks a connection token presented to `server` for `session`;
    /// returns the user it admits, or why not.
    pub fn validate_connection_token(
        &self,
        server: &str,
        session: &str,
        token: &str,
    ) -> Result<Result<String, String>, FleetError> {
        let verdict = match self.connection_tokens.check(token, SystemTime::now()) {
            Err(why) => Err(why),
            Ok((token_session, user)) => {
                let state = self.read(Instant::now());
                let on_server = state
                    .sessions
                    .records
                    .get(token_session.as_str())
                    .is_some_and(|r| {
                        r.state == SessionState::Ready && r.server.as_deref() == Some(server)
                    });
                if token_session != session {
                    Err("the token is for another session".into())
                } else if !on_server {
                    Err("the session is not READY on this server".into())
                } else {
                    Ok(user)
                }
            }
        };
        Ok(verdict)
    }

    /// Opens the instruction channel of `server`'s agent, replacing any
    /// older one, and resends what is still waiting for an answer.
    pub fn subscribe_instructions(
        &self,
        server: &str,
    ) -> Result<mpsc::UnboundedReceiver<Instruction>, FleetError> {
        super::validate_server_id(server).map_err(|why| FleetError::invalid("ServerId", why))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.write(Instant::now());
        let id = state
            .servers
            .get(server)
            .map(|s| s.id.clone())
            .ok_or_else(|| {
                FleetError::ServerNotFound(server.to_string(), AgentStep::StreamInstructions)
            })?;
        for record in state.sessions.records.values() {
            if record.server.as_ref() != Some(&id) {
                continue;
            }
            let resend = match (record.state, record.substate, &record.order) {
                (SessionState::Creating, Some(Substate::Placing), Some(order)) => {
                    Some(Instruction::Create {
                        server: id.clone(),
                        session: record.id.clone(),
                        order: order.clone(),
                        permissions_file: record.permissions_file.clone(),
                    })
                }
                (SessionState::Deleting, _, _) => Some(Instruction::Delete {
                    server: id.clone(),
                    session: record.id.clone(),
                }),
                _ => None,
            };
            if let Some(instruction) = resend {
                let _ = tx.send(instruction);
            }
        }
        state.sessions.agents.insert(id, tx);
        Ok(rx)
    }

    /// One instruction channel for many servers (the simulated fleet).
    pub fn subscribe_instructions_many(
        &self,
        servers: &[ServerId],
    ) -> mpsc::UnboundedReceiver<Instruction> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.write(Instant::now());
        for id in servers {
            state.sessions.agents.insert(id.clone(), tx.clone());
        }
        rx
    }

    /// Records an agent's answer to an instruction. Answers about sessions
    /// that are no longer the agent's business are ignored.
    pub fn report_instruction(
        &self,
        server: &str,
        session: &str,
        kind: InstructionKind,
        outcome: InstructionOutcome,
    ) -> Result<(), FleetError> {
        let mut violations = Vec::new();
        if let Err(why) = super::validate_server_id(server) {
            violations.push(FieldViolation::new("ServerId", why));
        }
        if let Err(why) = check_session_id(session) {
            violations.push(FieldViolation::new("SessionId", why));
        }
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        if !state.servers.contains_key(server) {
            return Err(FleetError::ServerNotFound(
                server.to_string(),
                AgentStep::ReportInstructionResult,
            ));
        }
        let id: SessionId = Arc::from(session);
        let Some(record) = state.sessions.record_mut(&id) else {
            return Ok(());
        };
        if record.server.as_deref() != Some(server) {
            return Ok(());
        }
        match (kind, outcome) {
            (InstructionKind::Create, InstructionOutcome::Done { ready }) => {
                if record.state == SessionState::Creating
                    && record.substate == Some(Substate::Placing)
                {
                    if ready {
                        record.state = SessionState::Ready;
                        record.substate = None;
                    } else {
                        record.substate = Some(Substate::PendingPreparation);
                    }
                    state.set_deadline(&id, None);
                }
            }
            (InstructionKind::Create, InstructionOutcome::Failed(why)) => {
                if record.state == SessionState::Creating
                    && record.substate == Some(Substate::Placing)
                {
                    state.set_deadline(&id, None);
                    let why = format!("server {server} could not create it: {why}");
                    state.attempt_failed(&id, why, now, &ctx);
                }
            }
            (InstructionKind::Delete, InstructionOutcome::Done { .. }) => {
                if record.state != SessionState::Deleted {
                    state.mark_deleted(&id, "Deleted on its server.".into(), now, &ctx);
                }
                // The agent says it is gone: it stops occupying the server
                // now, not at the next heartbeat.
                let server_id = state.servers.get(server).map(|s| s.id.clone());
                if let Some(server_id) = server_id {
                    state.forget_reported(&server_id, &id, &ctx);
                    state.drain_queue_onto(&server_id, now, &ctx);
                }
            }
            (InstructionKind::Delete, InstructionOutcome::Failed(why)) => {
                if record.state == SessionState::Deleting {
                    record.state = SessionState::Ready;
                    record.state_reason = format!("Deletion failed on its server: {why}");
                }
            }
            (InstructionKind::UpdatePermissions, InstructionOutcome::Failed(why)) => {
                record.state_reason = format!("Permissions update failed on its server: {why}");
            }
            (InstructionKind::UpdatePermissions, InstructionOutcome::Done { .. }) => {}
        }
        drop(self.commit(&mut state));
        Ok(())
    }

    /// How many requests wait in the queue.
    pub fn queued(&self) -> usize {
        self.state.read().sessions.queue.len()
    }
}
