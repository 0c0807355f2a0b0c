//! The replica's role and sequence numbers, shared by the controller that
//! decides them and everything that reads them; and the store that follows
//! the role.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use parking_lot::RwLock;
use tokio::sync::{oneshot, watch};

use crate::fleet::persist::{AuditFilter, AuditRead, Change, Durable, Store};

/// Where this broker stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Decides and commits every write (a single broker always is).
    Leader,
    /// Serves reads from its own copy of the fleet and forwards writes to
    /// the leader, reached at `leader` (its advertised URL).
    Follower {
        /// The leader's advertised URL (`http://HOST:PORT` or `https://...`).
        leader: String,
    },
    /// Knows no leader to forward to (starting, database unreachable, an
    /// election in progress): writes fail with UNAVAILABLE saying `why`,
    /// reads are served from memory.
    Unavailable {
        /// Why, for the caller and the log.
        why: String,
    },
}

/// The shared view of this replica's role and progress. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClusterView {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    clustered: bool,
    node: String,
    role: watch::Sender<Role>,
    /// The change-log sequence number this replica's memory reflects: on a
    /// leader, its last commit; on a follower, the last change applied.
    applied: watch::Sender<u64>,
    /// On a leader, the sequence number of its last commit.
    committed: AtomicU64,
    /// The key forwarded calls are signed with, shared through the
    /// database by every replica.
    forwarding_key: RwLock<Option<[u8; 32]>>,
    /// The lease's epoch this replica last saw (0: none yet).
    epoch: AtomicI64,
    /// How far behind the leader the last applied change was, in
    /// microseconds: from its commit (the database's clock) to its apply
    /// (this host's clock).
    lag_micros: AtomicU64,
}

/// A replica's state, as health checks report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The role.
    pub role: Role,
    /// The lease's epoch last seen.
    pub epoch: i64,
    /// The change-log position memory reflects.
    pub applied_seq: u64,
    /// How far behind its commit the last applied change was applied
    /// (zero on the leader).
    pub lag: Duration,
}

impl Default for ClusterView {
    fn default() -> Self {
        ClusterView::standalone()
    }
}

impl ClusterView {
    /// A single broker: the leader for good, nothing replicated.
    pub fn standalone() -> ClusterView {
        ClusterView::new(false, String::new(), Role::Leader)
    }

    /// A replica called `node` (unique among the replicas), unavailable
    /// until the controller decides its role.
    pub fn clustered(node: String) -> ClusterView {
        ClusterView::new(
            true,
            node,
            Role::Unavailable {
                why: "the broker is starting".into(),
            },
        )
    }

    fn new(clustered: bool, node: String, role: Role) -> ClusterView {
        ClusterView {
            inner: Arc::new(Inner {
                clustered,
                node,
                role: watch::Sender::new(role),
                applied: watch::Sender::new(0),
                committed: AtomicU64::new(0),
                forwarding_key: RwLock::new(None),
                epoch: AtomicI64::new(0),
                lag_micros: AtomicU64::new(0),
            }),
        }
    }

    /// Whether this broker is one of several replicas.
    pub fn is_clustered(&self) -> bool {
        self.inner.clustered
    }

    /// This replica's name among the replicas (empty when standalone).
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The role now.
    pub fn role(&self) -> Role {
        self.inner.role.borrow().clone()
    }

    /// Told of every role change.
    pub fn roles(&self) -> watch::Receiver<Role> {
        self.inner.role.subscribe()
    }

    /// Sets the role (the controller's).
    pub fn set_role(&self, role: Role) {
        self.inner.role.send_if_modified(|current| {
            let changed = *current != role;
            *current = role;
            changed
        });
    }

    /// On a leader, the sequence number of its last commit.
    pub fn committed(&self) -> u64 {
        self.inner.committed.load(Ordering::Acquire)
    }

    /// Records a leader's commit of `seq`, which its memory already
    /// reflects. Called by the store writer after COMMIT succeeded and
    /// before it tells anyone waiting, so a reply sent after the wait
    /// carries a sequence number at least as new as its change.
    pub fn set_committed(&self, seq: u64) {
        self.inner.committed.fetch_max(seq, Ordering::AcqRel);
        self.set_applied(seq);
    }

    /// The sequence number this replica's memory reflects.
    pub fn applied(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// Records that memory reflects every change up to `seq`. Never goes
    /// back, except through [`ClusterView::reset_applied`].
    pub fn set_applied(&self, seq: u64) {
        self.inner.applied.send_if_modified(|applied| {
            let newer = seq > *applied;
            if newer {
                *applied = seq;
            }
            newer
        });
    }

    /// Memory was reloaded from a snapshot at `seq` (which may be older
    /// than what a lost leader had in memory but never committed).
    pub fn reset_applied(&self, seq: u64) {
        self.inner.applied.send_replace(seq);
        self.inner.committed.store(seq, Ordering::Release);
    }

    /// Waits until memory reflects `seq`, at most `patience`; whether it
    /// does.
    pub async fn wait_applied(&self, seq: u64, patience: Duration) -> bool {
        let mut applied = self.inner.applied.subscribe();
        tokio::time::timeout(patience, applied.wait_for(|a| *a >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The key forwarded calls are signed and checked with; `None` until
    /// the controller read it from the database (and always when
    /// standalone).
    pub fn forwarding_key(&self) -> Option<[u8; 32]> {
        *self.inner.forwarding_key.read()
    }

    /// Records the lease's epoch (the controller's).
    pub fn set_epoch(&self, epoch: i64) {
        self.inner.epoch.store(epoch, Ordering::Relaxed);
    }

    /// Records that a change committed at `committed_at` (the database's
    /// clock) was just applied; a clock behind the database's counts as
    /// no lag.
    pub fn note_lag(&self, committed_at: SystemTime) {
        let lag = SystemTime::now()
            .duration_since(committed_at)
            .unwrap_or_default();
        let micros = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        self.inner.lag_micros.store(micros, Ordering::Relaxed);
    }

    /// The replica's state for health checks.
    pub fn status(&self) -> Status {
        let role = self.role();
        let lag = match role {
            Role::Leader => Duration::ZERO,
            _ => Duration::from_micros(self.inner.lag_micros.load(Ordering::Relaxed)),
        };
        Status {
            role,
            epoch: self.inner.epoch.load(Ordering::Relaxed),
            applied_seq: self.applied(),
            lag,
        }
    }

    /// Sets the forwarding key (the controller's).
    pub fn set_forwarding_key(&self, key: [u8; 32]) {
        *self.inner.forwarding_key.write() = Some(key);
    }
}

/// The store a replica's fleet and client registry write through: the
/// leader's fenced writer while this replica leads, and a refusal
/// otherwise (a write that raced a lost lease fails with UNAVAILABLE and
/// is undone by the reload that follows).
#[derive(Default)]
pub struct ClusterStore {
    writer: RwLock<Option<Arc<dyn Store>>>,
    /// Reads the shared audit log: any replica may, whoever leads.
    audit_reader: RwLock<Option<AuditReader>>,
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStore")
            .field("writer", &*self.writer.read())
            .field("audit_reader", &self.audit_reader.read().is_some())
            .finish()
    }
}

/// How a replica reads the shared audit log.
pub type AuditReader = Arc<dyn Fn(AuditFilter) -> AuditRead + Send + Sync>;

impl ClusterStore {
    /// A store with no writer yet.
    pub fn new() -> ClusterStore {
        ClusterStore::default()
    }

    /// Writes go to `writer` from now on; `None`: refused.
    pub fn set_writer(&self, writer: Option<Arc<dyn Store>>) {
        *self.writer.write() = writer;
    }

    /// Audit reads go to `reader` (the shared database), on any role.
    pub fn set_audit_reader(&self, reader: AuditReader) {
        *self.audit_reader.write() = Some(reader);
    }
}

impl Store for ClusterStore {
    fn submit(&self, changes: Vec<Change>) -> Durable {
        match &*self.writer.read() {
            Some(writer) => writer.submit(changes),
            None => {
                let (answer, durable) = oneshot::channel();
                let _ = answer.send(Err("this broker is not the leader".into()));
                Durable::pending(durable)
            }
        }
    }

    fn keeps_liveness(&self) -> bool {
        true
    }

    fn read_audit(&self, filter: AuditFilter) -> Option<AuditRead> {
        let reader = self.audit_reader.read().clone();
        reader.map(|read| read(filter))
    }
}
