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
//! instruction streams (agents reconnect).

use std::time::SystemTime;

use tokio::sync::oneshot;

use super::{
    FleetError,
    model::{Hold, ServerDescription, SessionKind, SessionState},
    sessions::{CreateSpec, Substate},
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
}

/// One change to durable state.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace a server.
    PutServer(StoredServer),
    /// Remove a server (its sessions are changed separately).
    DeleteServer(String),
    /// Create or replace a session.
    PutSession(StoredSession),
    /// Remove a session.
    DeleteSession(String),
}

/// Everything a store holds, to serve from after a start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Servers.
    pub servers: Vec<StoredServer>,
    /// Sessions.
    pub sessions: Vec<StoredSession>,
}

/// Where the fleet's changes go to be kept.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Queues `changes` (applied in submission order, each submission
    /// atomically) and returns what resolves once they are durable.
    fn submit(&self, changes: Vec<Change>) -> Durable;
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

    /// Durable when the store sends on the other end.
    pub fn pending(receiver: oneshot::Receiver<Result<(), String>>) -> Self {
        Durable(Some(receiver))
    }

    /// Waits until the changes are durable.
    pub async fn wait(self) -> Result<(), FleetError> {
        let Some(receiver) = self.0 else {
            return Ok(());
        };
        match receiver.await {
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
}
