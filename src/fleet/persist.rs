//! What the fleet keeps durably, and the trait a store implements.
//!
//! The in-memory state stays the serving state; every change is also
//! handed to a [`Store`], in the order it happened (changes are submitted
//! under the fleet's write lock), and an operation whose reply promises
//! durability (CloseServers, OpenServers, RegisterServer, DeregisterServer,
//! CreateSessions, DeleteSessions, UpdateSessionPermissions) waits for its
//! changes to be on disk before it replies. Each submission is applied
//! atomically: after a crash, all of it or none of it.
//!
//! Nothing here assumes the store is local: a shared database serving
//! several brokers would implement the same trait.
//!
//! What is not stored, on purpose: heartbeat times and host metrics
//! (refreshed by every heartbeat; after a restart every server gets a fresh
//! heartbeat window), which servers an agent reported sessions on beyond
//! the session records themselves (rebuilt from them), and agents'
//! instruction streams (agents reconnect). A store shared by replicas
//! ([`Store::keeps_liveness`]) is handed what heartbeats said too
//! ([`Change::PutLiveness`], the latest per server in each submission), to
//! pass on to followers, not to keep.

use std::time::SystemTime;

use tokio::{sync::oneshot, time::Instant};
use tracing::Instrument as _;

use crate::telemetry::otlp::TRACE_TARGET;

use super::{
    error::FleetError,
    model::{
        CreateSpec, Heartbeat, Hold, ServerDescription, ServerRecord, SessionKind, SessionState,
        Substate,
    },
};

/// A server as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredServer {
    /// Stable id.
    pub id: String,
    /// The agent's latest registration.
    pub description: ServerDescription,
    /// Operators' holds (the closed state: who, when, why).
    pub holds: Vec<Hold>,
    /// The version of `holds` (see [`ServerRecord::state_version`]).
    pub state_version: u64,
    /// When it first registered.
    pub registered_at: SystemTime,
    /// When its agent last registered (heartbeats are not stored).
    pub last_seen: SystemTime,
    /// Its agent deregistered while it was held.
    pub agent_departed: bool,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Type.
    pub kind: SessionKind,
    /// Its server; `None` while queued.
    pub server: Option<String>,
    /// State.
    pub state: SessionState,
    /// Detail of CREATING.
    pub substate: Option<Substate>,
    /// Why it is in its state.
    pub state_reason: String,
    /// When the broker accepted or adopted it.
    pub created_at: SystemTime,
    /// The creation request (`None` for adopted sessions); validated again
    /// when loaded.
    pub request: Option<CreateSpec>,
    /// Current permissions file, base64.
    pub permissions_file: String,
    /// Servers tried so far.
    pub tried: Vec<String>,
    /// Its pending deadline, in wall-clock time.
    pub deadline: Option<SystemTime>,
    /// Deleted with Force.
    pub forgotten: bool,
    /// Its position in the queue while queued (smaller: earlier).
    pub queue_position: Option<u64>,
    /// DeleteSessions requests sent to its agent so far (part of each
    /// delete instruction's id).
    pub deletions: u32,
}

/// One change to durable state.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace a server.
    PutServer(StoredServer),
    /// Replace a stored server's operator state only (holds, departure):
    /// what CloseServers and OpenServers change, without rewriting the
    /// registration.
    PutServerState {
        /// The server, already stored.
        id: String,
        /// Its holds.
        holds: Vec<Hold>,
        /// Their version.
        state_version: u64,
        /// Its agent deregistered while it was held.
        agent_departed: bool,
    },
    /// Remove a server (its sessions are changed separately).
    DeleteServer(String),
    /// Create or replace a session.
    PutSession(StoredSession),
    /// Remove a session.
    DeleteSession(String),
    /// Create or replace an API or agent client.
    PutClient(StoredClient),
    /// Create or replace a named secret (the token-signing key).
    PutSecret {
        /// Its name.
        name: String,
        /// Its bytes.
        value: Vec<u8>,
    },
    /// What a server's latest heartbeat said, for replicas that serve
    /// reads (several brokers on one database): never stored in a table,
    /// only passed on, and submitted only to a store whose
    /// [`Store::keeps_liveness`] says so.
    PutLiveness(StoredLiveness),
    /// Append one audit record (who changed what, and how each item
    /// went): insert-only, never passed on to followers' fleets.
    PutAudit(AuditRecord),
    /// Remove the audit records older than `before` (the retention).
    PruneAudit {
        /// The oldest time kept.
        before: SystemTime,
    },
    /// Keep the first reply to a call made with a `ClientToken`, replacing
    /// an expired record of the same key: the leader's alone, never
    /// passed on to followers' fleets (a new leader loads them).
    PutClientToken(StoredClientToken),
    /// Remove the `ClientToken` records created before `before` (the
    /// retention), at most a bounded number per prune.
    PruneClientTokens {
        /// The oldest creation time kept.
        before: SystemTime,
    },
}

/// The first reply to a call made with a `ClientToken` (see
/// `fleet::client_tokens`), as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredClientToken {
    /// The caller (the authenticated client id, or `anonymous`).
    pub actor: String,
    /// The gRPC method (`CloseServers`).
    pub method: String,
    /// The caller's token.
    pub token: String,
    /// SHA-256 of the request, encoded with its token cleared.
    pub request_hash: [u8; 32],
    /// The reply, encoded.
    pub reply: Vec<u8>,
    /// When the reply was kept (microsecond precision, as stored).
    pub created_at: SystemTime,
}

/// One state-changing call, as the audit log keeps it: built by the API
/// adapters from what the fleet returned, and kept by the store in the
/// same writer (and group commit) as the changes themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// When the call was answered (microsecond precision, as stored).
    pub at: SystemTime,
    /// The authenticated client id; `anonymous` without authentication,
    /// `admin` for the admin socket.
    pub actor: String,
    /// The request id the caller was answered with (empty when there is
    /// none, as for the admin socket).
    pub request_id: String,
    /// The gRPC method (`CloseServers`), the REST route (`POST
    /// /closeServers`) or the admin command (`clients register`).
    pub method: String,
    /// The caller's address, when known.
    pub peer: Option<String>,
    /// Each item of the call, in request order.
    pub items: Vec<AuditItem>,
}

/// One item of an audited call and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditItem {
    /// The server, session or client it named.
    pub id: String,
    /// `OK`, or the failure code it got (`SERVER_NOT_FOUND`, ...).
    pub outcome: String,
    /// The reason the caller gave (a close's Reason), or the failure's.
    pub reason: String,
}

impl AuditItem {
    /// The outcome of a successful item.
    pub const OK: &'static str = "OK";

    /// The longest id an audit item keeps, in bytes: an item refused for
    /// its id may name one as long as the request allowed.
    pub const MAX_ID_BYTES: usize = 512;

    /// The item naming `id` (as the caller sent it, however malformed),
    /// with its `outcome` and `reason`. The id is made storable: a NUL
    /// becomes U+FFFD (PostgreSQL's text and JSON refuse NUL, and a write
    /// the store refuses would cost the leader its lease) and a long id is
    /// cut at [`Self::MAX_ID_BYTES`], marked with an ellipsis.
    pub fn new(id: &str, outcome: String, reason: String) -> AuditItem {
        let mut end = id.len().min(Self::MAX_ID_BYTES);
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        let mut kept = id[..end].replace('\0', "\u{FFFD}");
        if end < id.len() {
            kept.push('…');
        }
        AuditItem {
            id: kept,
            outcome,
            reason: reason.replace('\0', "\u{FFFD}"),
        }
    }
}

/// A server's heartbeat-derived state, as passed to replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLiveness {
    /// The server.
    pub id: String,
    /// When the heartbeat arrived, in wall-clock time.
    pub last_seen: SystemTime,
    /// What it said.
    pub heartbeat: Heartbeat,
}

/// An API or agent client, as stored: never its secret, only a slow
/// salted hash of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredClient {
    /// The client id it authenticates with.
    pub id: String,
    /// The name an operator gave it.
    pub name: String,
    /// Its secret's hash, a PHC string (`$argon2id$...`).
    pub secret_hash: String,
    /// The scopes it may be granted, by name.
    pub scopes: Vec<String>,
    /// For an agent client: the only server it may register and report for.
    pub server_id: Option<String>,
    /// When it was registered.
    pub created_at: SystemTime,
    /// When it was revoked; a revoked client is kept so the listing shows
    /// it, but it authenticates no more and its tokens stop working.
    pub revoked_at: Option<SystemTime>,
}

/// Everything a store holds, to serve from after a start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Servers.
    pub servers: Vec<StoredServer>,
    /// Sessions.
    pub sessions: Vec<StoredSession>,
    /// API and agent clients, in id order.
    pub clients: Vec<StoredClient>,
    /// Named secrets.
    pub secrets: Vec<(String, Vec<u8>)>,
    /// `ClientToken` records, oldest first (expired ones included: the
    /// fleet skips them).
    pub client_tokens: Vec<StoredClientToken>,
}

/// Which audit records to read; every field narrows, `None` does not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records with an item naming this server, session or client id.
    pub subject: Option<String>,
    /// Records of this actor.
    pub actor: Option<String>,
    /// Records at or after this time.
    pub since: Option<SystemTime>,
    /// Records before this time.
    pub until: Option<SystemTime>,
    /// Records strictly after this one in the reading order (a page's
    /// continuation).
    pub after: Option<AuditCursor>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    /// At most this many (`None`: all).
    pub limit: Option<u32>,
    /// Stop before the record that would make the records read hold more
    /// than this many bytes of items (always at least one record), so that
    /// a page of large batches stays small.
    pub item_bytes: Option<usize>,
}

/// Where a stored audit record stands in the log: its time and its row,
/// the order records are read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuditCursor {
    /// Its time, in microseconds since the epoch, as stored.
    pub at_micros: i64,
    /// Its row's id, which breaks ties between records of one microsecond.
    pub row: i64,
}

/// An audit record read back, with its place in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAudit {
    /// Where it stands.
    pub cursor: AuditCursor,
    /// The record.
    pub record: AuditRecord,
}

/// The records an [`AuditFilter`] selected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditPage {
    /// The records, in the filter's order.
    pub records: Vec<StoredAudit>,
    /// Whether another record followed them (past the filter's limit or
    /// item budget).
    pub more: bool,
}

/// The answer of [`Store::read_audit`]: the records, or why the store
/// could not read them.
pub type AuditRead =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<AuditPage, String>> + Send>>;

/// Where the fleet's changes go to be kept.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Queues `changes` (applied in submission order, each submission
    /// atomically) and returns what resolves once they are durable.
    fn submit(&self, changes: Vec<Change>) -> Durable;

    /// Whether submissions are kept at all. A store that keeps nothing
    /// spares the fleet building them: copies of every changed record,
    /// under the write lock, on every write.
    fn keeps_changes(&self) -> bool {
        true
    }

    /// Whether heartbeats are passed on too ([`Change::PutLiveness`]):
    /// only for replicas on a shared database, where followers show what
    /// the leader's agents report.
    fn keeps_liveness(&self) -> bool {
        false
    }

    /// Whether audit records are wanted ([`Change::PutAudit`]): by
    /// default when changes are kept; a store that keeps nothing but feeds
    /// an audit log says yes too. Nobody builds a record otherwise.
    fn keeps_audit(&self) -> bool {
        self.keeps_changes()
    }

    /// Reads the audit records `filter` selects, in its order; `None` when
    /// this store keeps no audit log to read (`--in-memory`).
    fn read_audit(&self, filter: AuditFilter) -> Option<AuditRead> {
        let _ = filter;
        None
    }
}

/// Resolves when a submission is durable.
#[derive(Debug)]
#[must_use = "wait for durability before acknowledging"]
pub struct Durable(Option<oneshot::Receiver<Result<(), String>>>);

impl Durable {
    /// Already durable (or nothing to keep).
    pub fn done() -> Self {
        Durable(None)
    }

    /// Never durable: `why` is what the waiter is told.
    pub fn failed(why: &str) -> Self {
        let (tx, rx) = oneshot::channel();
        // The receiver is right here: the send cannot fail.
        let _ = tx.send(Err(why.to_owned()));
        Durable(Some(rx))
    }

    /// Durable when the store sends on the other end.
    pub fn pending(receiver: oneshot::Receiver<Result<(), String>>) -> Self {
        Durable(Some(receiver))
    }

    /// Waits until the changes are durable.
    pub async fn wait(self) -> Result<(), FleetError> {
        let Some(receiver) = self.0 else {
            return Ok(());
        };
        // Exported with --otlp-endpoint only; a disabled call site else.
        let commit = tracing::info_span!(target: TRACE_TARGET, "store commit");
        match receiver.instrument(commit).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(FleetError::Unavailable(format!(
                "the change could not be stored: {why}"
            ))),
            Err(_) => Err(FleetError::Unavailable(
                "the store stopped before the change was stored".into(),
            )),
        }
    }
}

/// Keeps nothing: the `--in-memory` mode, and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn submit(&self, _changes: Vec<Change>) -> Durable {
        Durable::done()
    }

    fn keeps_changes(&self) -> bool {
        false
    }
}

/// A server record as stored.
pub(super) fn stored_server(server: &ServerRecord) -> StoredServer {
    StoredServer {
        id: server.id.to_string(),
        description: server.description.clone(),
        holds: server.holds.clone(),
        state_version: server.state_version,
        registered_at: server.registered_at,
        last_seen: server.last_seen_wall,
        agent_departed: server.agent_departed,
    }
}

/// What a server's heartbeats said, as passed to replicas: its record's
/// current reported sessions, health, users and host metrics (what
/// DescribeServers and DescribeSessions show of them), so the latest one
/// carries everything and earlier ones can be dropped.
pub(super) fn stored_liveness(server: &ServerRecord) -> StoredLiveness {
    let host = &server.description.host;
    StoredLiveness {
        id: server.id.to_string(),
        last_seen: server.last_seen_wall,
        heartbeat: Heartbeat {
            dcv_server_healthy: server.dcv_server_healthy,
            logged_in_users: server.logged_in_users.clone(),
            sessions: server.sessions.clone(),
            cpu_load_average: Some(host.cpu_load_average),
            memory: Some(host.memory),
            swap: Some(host.swap),
        },
    }
}

/// The wall-clock time of a monotonic deadline, relative to a pair of
/// readings of both clocks taken together.
pub(super) fn wall_time(at: Instant, now: Instant, wall: SystemTime) -> SystemTime {
    match at.checked_duration_since(now) {
        Some(ahead) => wall + ahead,
        None => wall - now.saturating_duration_since(at),
    }
}

/// The monotonic time of a stored wall-clock deadline (a past one is due
/// now).
pub(super) fn monotonic_time(at: SystemTime, now: Instant, wall: SystemTime) -> Instant {
    now + at.duration_since(wall).unwrap_or_default()
}

/// The wall clock at the precision stores keep (microseconds), so a time
/// the broker shows is the same before and after a restart.
pub fn wall_clock() -> SystemTime {
    let now = SystemTime::now();
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => {
            std::time::UNIX_EPOCH + std::time::Duration::from_micros(since.as_micros() as u64)
        }
        Err(_) => now,
    }
}

#[cfg(test)]
mod tests {
    use super::AuditItem;

    #[test]
    fn an_audit_item_never_holds_a_nul() {
        let item = AuditItem::new("nul\0id", "NOT_FOUND".into(), "no \0 such".into());
        assert_eq!(item.id, "nul\u{FFFD}id");
        assert_eq!(item.reason, "no \u{FFFD} such");
        assert_eq!(item.outcome, "NOT_FOUND");
    }

    #[test]
    fn a_long_audit_item_id_is_cut_on_a_char_boundary() {
        // 'é' is two bytes: 300 of them straddle the limit at an odd offset.
        let id = format!("x{}", "é".repeat(300));
        let item = AuditItem::new(&id, AuditItem::OK.into(), String::new());
        assert!(item.id.ends_with('…'));
        let kept = item.id.trim_end_matches('…');
        assert!(kept.len() <= AuditItem::MAX_ID_BYTES);
        assert!(kept.len() > AuditItem::MAX_ID_BYTES - 2);
        assert!(id.starts_with(kept));
        let short = AuditItem::new("srv-1", AuditItem::OK.into(), String::new());
        assert_eq!(short.id, "srv-1");
    }
}
