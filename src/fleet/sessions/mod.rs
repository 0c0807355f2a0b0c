//! Sessions: creation and placement, the queue, the agents' instructions
//! and answers, deletion, permissions and connection tokens.
//!
//! Sessions live in the same state, under the same lock, as the servers.
//! That is what makes a close trustworthy: a placement picks a server and
//! reserves its slot (a [`Placement`](crate::fleet::Placement)) in one write section, and a close
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

mod create;
mod lifecycle;
mod ops;
pub(in crate::fleet) mod queue;
mod reconcile;
pub mod screenshots;
pub(in crate::fleet) mod validate;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

pub use super::model::{CreateSpec, Substate};
use super::{
    availability,
    model::{ServerId, ServerMap, ServerRecord, SessionKind, SessionState},
    persist::{self, StoredSession},
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
    /// DeleteSessions requests that asked its agent to delete it: each
    /// such instruction has its own id ([`Instruction::id`]), so a delete
    /// retried after a failure is not taken for one already carried out.
    pub deletions: u32,
    /// Clients connected at its agent's last report. Volatile, like the
    /// report it comes from (0 after a restart until the next heartbeat).
    pub connections: u32,
    /// When its last client disconnected, at its agent's last report.
    /// Volatile.
    pub last_disconnection: Option<SystemTime>,
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
        servers: &'a ServerMap,
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

/// An instruction's id, as agents see it (`InstructionId`).
pub type InstructionId = Arc<str>;

/// The id of a create or delete instruction: derived from the session and
/// from what is stored about it (`what`, and `attempt`: the servers tried
/// so far, and for deletes the DeleteSessions requests so far), so that
/// the same instruction sent again, after its agent reconnects or the
/// broker restarts, carries the same id, and a new attempt a new one. An
/// agent that journals the ids it carried out thus never carries out one
/// twice. A UUID (version 8) made of a SHA-256 of those, so that any
/// session id gives an id of the same shape as the fresh ones.
pub fn derived_instruction_id(what: &str, session: &str, attempt: [u32; 2]) -> InstructionId {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(b"dcv-broker instruction\0");
    hash.update(what.as_bytes());
    hash.update([0]);
    hash.update(session.as_bytes());
    hash.update([0]);
    hash.update(attempt[0].to_be_bytes());
    hash.update(attempt[1].to_be_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Arc::from(
        uuid::Builder::from_custom_bytes(bytes)
            .into_uuid()
            .to_string(),
    )
}

/// A fresh id, for instructions that are never sent again.
pub fn fresh_instruction_id() -> InstructionId {
    Arc::from(uuid::Uuid::new_v4().to_string())
}

impl SessionRecord {
    /// The id of the create instruction of its current placement.
    pub fn create_id(&self) -> InstructionId {
        derived_instruction_id("create", &self.id, [self.attempts(), 0])
    }

    /// The id of the delete instruction of its latest DeleteSessions.
    pub fn delete_id(&self) -> InstructionId {
        derived_instruction_id("delete", &self.id, [self.attempts(), self.deletions])
    }

    /// The id of the delete sent when the current placement's agent did
    /// not answer in time.
    pub fn abandon_id(&self) -> InstructionId {
        derived_instruction_id("abandon", &self.id, [self.attempts(), 0])
    }

    fn attempts(&self) -> u32 {
        u32::try_from(self.tried.len()).unwrap_or(u32::MAX)
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
        /// Its id ([`SessionRecord::create_id`]).
        id: InstructionId,
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
        /// Its id ([`SessionRecord::delete_id`] or
        /// [`SessionRecord::abandon_id`]).
        id: InstructionId,
    },
    /// Replace a session's permissions.
    UpdatePermissions {
        /// The server.
        server: ServerId,
        /// The session.
        session: SessionId,
        /// A fresh id.
        id: InstructionId,
        /// Permissions file, base64.
        permissions_file: String,
    },
    /// Take a screenshot.
    GetScreenshot {
        /// The server.
        server: ServerId,
        /// The session.
        session: SessionId,
        /// A fresh id; the agent's answer must echo it.
        id: InstructionId,
        /// The most pixels wide.
        max_width: u32,
        /// The most pixels high.
        max_height: u32,
        /// The encoding asked for.
        format: crate::fleet::model::ImageFormat,
    },
}

impl Instruction {
    /// The server it is for.
    pub fn server(&self) -> &ServerId {
        match self {
            Instruction::Create { server, .. }
            | Instruction::Delete { server, .. }
            | Instruction::UpdatePermissions { server, .. }
            | Instruction::GetScreenshot { server, .. } => server,
        }
    }

    /// Its id.
    pub fn id(&self) -> &InstructionId {
        match self {
            Instruction::Create { id, .. }
            | Instruction::Delete { id, .. }
            | Instruction::UpdatePermissions { id, .. }
            | Instruction::GetScreenshot { id, .. } => id,
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
    /// Take a screenshot (answered through [`Fleet::report_screenshot`](crate::fleet::Fleet::report_screenshot)).
    GetScreenshot,
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

impl FleetEvent {
    /// The server it is about.
    pub fn server(&self) -> &ServerId {
        match self {
            FleetEvent::ServerClosed { server, .. }
            | FleetEvent::ServerOpened { server }
            | FleetEvent::SessionPlaced { server, .. }
            | FleetEvent::SessionAppeared { server, .. }
            | FleetEvent::SessionLeft { server, .. } => server,
        }
    }
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

/// A session record as stored.
pub(in crate::fleet) fn stored_session(
    record: &SessionRecord,
    now: Instant,
    wall: SystemTime,
) -> StoredSession {
    StoredSession {
        id: record.id.to_string(),
        name: record.name.clone(),
        owner: record.owner.clone(),
        kind: record.kind,
        server: record.server.as_ref().map(ToString::to_string),
        state: record.state,
        substate: record.substate,
        state_reason: record.state_reason.clone(),
        created_at: record.created_at,
        request: record.order.as_ref().map(|o| o.to_spec()),
        permissions_file: record.permissions_file.clone(),
        tried: record.tried.iter().map(ToString::to_string).collect(),
        deadline: record.deadline.map(|at| persist::wall_time(at, now, wall)),
        forgotten: record.forgotten,
        queue_position: record.queue_position,
        deletions: record.deletions,
    }
}
