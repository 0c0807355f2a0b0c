//! The fleet: every DCV server the broker knows, behind one cloneable
//! handle.
//!
//! State lives in a `HashMap` (lookups by id) plus an ordered index of ids
//! (stable pagination) and an index of ids by load (placement without a
//! scan of the fleet), all inside one `parking_lot::RwLock`. The lock is a
//! synchronous one on purpose: every critical section is short, CPU-only and
//! never spans an `.await`, so an async lock would only add cost. A batch is
//! validated before the lock is taken and applied inside one write section,
//! so nobody ever observes half of it (CreateSessions excepted: it places
//! its items in several short sections, see `Fleet::create_sessions`).
//! Every write section is timed ([`Fleet::take_longest_write_hold`]).
//!
//! Time is tokio's clock (`tokio::time::Instant`), so tests can pause and
//! advance it. Heartbeat expiry needs no timer: availability is derived from
//! the age of the last heartbeat when asked, and servers past the removal
//! timeout are swept by whichever operation first notices they are due (and
//! by a periodic sweeper the server runs), so removal is exact whether or
//! not anything is running in the background.

pub mod availability;
pub mod error;
mod intern;
mod load_index;
pub mod model;
pub mod page_token;
pub mod persist;
pub mod query;
mod queue;
pub mod requirements;
pub mod sessions;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use parking_lot::RwLock;
use tokio::time::Instant;

pub use self::{
    availability::{Reason, Reasons},
    error::{AgentStep, FieldViolation, FleetError},
    model::*,
    query::DescribeQuery,
    sessions::{
        CreateSpec, DeleteItem, FleetEvent, Instruction, InstructionKind, InstructionOutcome,
        Order, PermissionsItem, PlacementStrategy, SequencedEvent, SessionId, SessionQuery,
        SessionRecord, SessionView, Substate,
    },
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
    /// How long a DescribeServers or DescribeSessions page token stays
    /// valid.
    pub page_token_ttl: Duration,
    /// How the broker chooses among servers that can take a session.
    pub placement: PlacementStrategy,
    /// The most CreateSessions requests that may wait for a server (DCV's
    /// `create-sessions-queue-max-size`).
    pub queue_max_size: usize,
    /// How long a queued request waits before it fails (DCV's
    /// `create-sessions-queue-max-time-seconds`).
    pub queue_timeout: Duration,
    /// How long the broker waits for an agent to confirm a creation before
    /// it tries elsewhere.
    pub agent_timeout: Duration,
    /// How many other servers a failed creation is retried on (DCV's
    /// `create-sessions-number-of-retries-on-failure`).
    pub create_retries: u32,
    /// How long DELETED sessions stay visible in DescribeSessions.
    pub deleted_retention: Duration,
    /// How long a connection token admits its user.
    pub connection_token_ttl: Duration,
    /// Fleet events buffered for each slow subscriber before it lags.
    pub event_buffer: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            heartbeat_interval: Duration::from_secs(30),
            unreachable_after: Duration::from_secs(90),
            remove_after: Duration::from_secs(3600),
            page_token_ttl: Duration::from_secs(3600),
            placement: PlacementStrategy::Spread,
            queue_max_size: 1000,
            queue_timeout: Duration::from_secs(1800),
            agent_timeout: Duration::from_secs(30),
            create_retries: 2,
            deleted_retention: Duration::from_secs(3600),
            connection_token_ttl: Duration::from_secs(3600),
            event_buffer: 4096,
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
    /// No such session (or another owner's).
    SessionNotFound,
    /// Session id repeated within the batch.
    DuplicateSessionId,
    /// A malformed session parameter.
    InvalidSessionParameter,
    /// Requirements that do not parse.
    InvalidRequirements,
    /// No server can take the session and it may not wait.
    NoServerAvailable,
    /// The queue is full.
    QueueFull,
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
    if len == 0 || len > MAX_BATCH_ITEMS {
        return Err(FleetError::invalid(
            field,
            format!("must hold 1 to {MAX_BATCH_ITEMS} items; got {len}"),
        ));
    }
    Ok(())
}

/// Per-item checks of a servers batch that need no state.
fn precheck<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<Option<ItemFailure>> {
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
fn precheck_ids<'a>(
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

/// A hash map on the fleet's hot paths. foldhash instead of std's SipHash:
/// every CloseServers item costs a few lookups, and SipHash was a visible
/// share of a batch's time. foldhash's per-process random seed still keeps
/// collisions from being chosen by whoever picks the ids.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// The set counterpart of [`FastMap`].
pub(crate) type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// The server records by id. Boxed, so that the table holds small entries:
/// records inline made the table's empty slots cost as much as records,
/// and scattered every lookup over a table of hundreds of megabytes.
pub(crate) type ServerMap = FastMap<ServerId, Box<ServerRecord>>;

#[derive(Debug, Default)]
struct State {
    servers: ServerMap,
    /// The same ids, ordered, for pagination.
    order: BTreeSet<ServerId>,
    /// The same ids by load, for placement.
    by_load: load_index::LoadIndex,
    /// No open server can be due for removal before this (a lower bound,
    /// refreshed by each sweep); `None` when no server is removable.
    next_removal: Option<Instant>,
    /// Sessions, the queue, agents' instruction channels.
    sessions: sessions::Sessions,
    /// Servers changed since the last submission to the store.
    dirty_servers: FastSet<ServerId>,
    /// Servers whose holds or departure alone changed since then.
    dirty_server_state: FastSet<ServerId>,
    /// Whether the store keeps changes; when it does not, nothing is
    /// marked dirty (a set insert per item of every batch, for nothing).
    tracks_changes: bool,
    /// The shared copies of description texts.
    texts: intern::Interner,
}

impl State {
    fn removal_due(&self, now: Instant) -> bool {
        self.next_removal.is_some_and(|at| now > at)
    }

    /// Notes that `id`'s record changed, for the store.
    fn server_changed(&mut self, id: &ServerId) {
        if self.tracks_changes {
            self.dirty_servers.insert(id.clone());
        }
    }

    /// Notes that only `id`'s holds or departure changed, for the store.
    fn server_state_changed(&mut self, id: &ServerId) {
        if self.tracks_changes {
            self.dirty_server_state.insert(id.clone());
        }
    }

    fn note_removable(&mut self, deadline: Instant) {
        self.next_removal = Some(self.next_removal.map_or(deadline, |d| d.min(deadline)));
    }

    /// The state a snapshot describes. Every server gets a fresh heartbeat
    /// window: heartbeat times are not stored, and a broker that was down
    /// cannot tell a silent agent from one it could not hear.
    fn from_snapshot(
        snapshot: persist::Snapshot,
        config: &FleetConfig,
    ) -> Result<State, FleetError> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut state = State::default();
        for stored in snapshot.servers {
            let id: ServerId = Arc::from(stored.id.as_str());
            let mut description = stored.description;
            state.texts.description(&mut description);
            state.insert_server(
                id.clone(),
                Box::new(ServerRecord {
                    id,
                    description,
                    dcv_server_healthy: true,
                    logged_in_users: Vec::new(),
                    sessions: Vec::new(),
                    placing: Vec::new(),
                    holds: stored.holds,
                    registered_at: stored.registered_at,
                    last_seen: now,
                    last_seen_wall: stored.last_seen,
                    agent_departed: stored.agent_departed,
                }),
            );
        }
        state.restore_sessions(snapshot.sessions, now, wall)?;
        state.next_removal = state
            .servers
            .values()
            .filter(|s| !s.is_closed())
            .map(|s| s.last_seen + config.remove_after)
            .min();
        Ok(state)
    }

    /// Everything changed since the last call, as store changes: the
    /// current record of each changed server and session, or its removal.
    fn take_changes(&mut self) -> Vec<persist::Change> {
        use persist::Change;
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut changes = Vec::with_capacity(self.dirty_servers.len() + self.sessions.dirty.len());
        for id in std::mem::take(&mut self.dirty_server_state) {
            if self.dirty_servers.contains(&id) {
                continue;
            }
            if let Some(server) = self.servers.get(&id) {
                changes.push(Change::PutServerState {
                    id: id.to_string(),
                    holds: server.holds.clone(),
                    agent_departed: server.agent_departed,
                });
            }
        }
        for id in std::mem::take(&mut self.dirty_servers) {
            changes.push(match self.servers.get(&id) {
                Some(server) => Change::PutServer(persist::stored_server(server)),
                None => Change::DeleteServer(id.to_string()),
            });
        }
        for id in std::mem::take(&mut self.sessions.dirty) {
            changes.push(match self.sessions.records.get(&id) {
                Some(record) => Change::PutSession(persist::stored_session(record, now, wall)),
                None => Change::DeleteSession(id.to_string()),
            });
        }
        changes
    }

    /// Forgets what changed, for a store that keeps nothing.
    fn forget_changes(&mut self) {
        self.dirty_server_state.clear();
        self.dirty_servers.clear();
        self.sessions.dirty.clear();
    }

    fn maintenance_due(&self, now: Instant) -> bool {
        self.removal_due(now) || self.session_deadline_due(now)
    }

    /// Forgets due servers and processes due session deadlines.
    fn maintain(&mut self, now: Instant, ctx: &sessions::Ctx<'_>) -> Vec<ServerId> {
        let removed = if self.removal_due(now) {
            self.sweep(now, ctx)
        } else {
            Vec::new()
        };
        self.process_session_deadlines(now, ctx);
        log_removed(&removed);
        removed
    }

    /// Adds server `id` (the record's own id) to the map and to both
    /// indexes. The only way a server enters the state, so the indexes
    /// hold exactly its servers.
    fn insert_server(&mut self, id: ServerId, record: Box<ServerRecord>) {
        let load = load_index::load_of(&record);
        if let Some(old) = self.servers.insert(id.clone(), record) {
            // Callers insert new ids only; were one to replace a record,
            // its entry must not linger at the old load.
            self.by_load.remove(load_index::load_of(&old), &id);
        }
        self.by_load.insert(load, id.clone());
        self.order.insert(id);
    }

    /// Takes a server out of the map and both indexes. The only way a
    /// server leaves the state.
    fn take_server(&mut self, id: &str) -> Option<Box<ServerRecord>> {
        let server = self.servers.remove(id)?;
        self.order.remove(id);
        self.by_load
            .remove(load_index::load_of(&server), &server.id);
        Some(server)
    }

    /// Removes a server for good, ending its sessions.
    fn remove_server(&mut self, id: &str, now: Instant, ctx: &sessions::Ctx<'_>) {
        if let Some(server) = self.take_server(id) {
            self.server_changed(&server.id);
            self.server_removed(&server, now, ctx);
        }
    }

    /// Forgets every open server silent for longer than the removal
    /// timeout.
    fn sweep(&mut self, now: Instant, ctx: &sessions::Ctx<'_>) -> Vec<ServerId> {
        let remove_after = ctx.config.remove_after;
        let due: Vec<ServerId> = self
            .servers
            .values()
            .filter(|s| !s.is_closed() && now.saturating_duration_since(s.last_seen) > remove_after)
            .map(|s| s.id.clone())
            .collect();
        for id in &due {
            self.remove_server(id, now, ctx);
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
    connection_tokens: sessions::ConnectionTokens,
    events: tokio::sync::broadcast::Sender<SequencedEvent>,
    store: Arc<dyn persist::Store>,
    /// The longest write-lock hold so far, in nanoseconds (see
    /// [`Fleet::take_longest_write_hold`]).
    longest_write_ns: Arc<AtomicU64>,
}

/// The fleet's write guard: the lock's own, plus a stopwatch. Every write
/// section goes through [`Fleet::write`] or [`Fleet::sweep`], so the
/// longest hold is known; tests and the fuzzer hold it to a bound. Two
/// clock reads and an atomic max per section: within the noise of the
/// cheapest RPC.
struct WriteGuard<'a> {
    guard: parking_lot::RwLockWriteGuard<'a, State>,
    since: std::time::Instant,
    longest: &'a AtomicU64,
}

impl std::ops::Deref for WriteGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl std::ops::DerefMut for WriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let held = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.longest.fetch_max(held, Ordering::Relaxed);
    }
}

/// The stored secret keying page tokens.
const PAGE_TOKEN_KEY: &str = "page-token-key/hmac-sha256";
/// The stored secret keying connection tokens.
const CONNECTION_TOKEN_KEY: &str = "connection-token-key/hmac-sha256";

/// The key called `name` in the store, or a fresh random one, stored. Kept
/// so that page and connection tokens survive a restart (a DCV server
/// validating a user's connection token must not fail because the broker
/// restarted). Not awaited: if the first start crashes before it is
/// durable, the next start draws another, and only tokens issued in
/// between are lost.
fn stored_key(
    snapshot: &persist::Snapshot,
    name: &str,
    store: &dyn persist::Store,
) -> Result<[u8; 32], FleetError> {
    if let Some((_, value)) = snapshot.secrets.iter().find(|(n, _)| n == name) {
        return <[u8; 32]>::try_from(value.as_slice())
            .map_err(|_| FleetError::Internal(format!("the stored {name} is not 32 bytes long")));
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)
        .map_err(|e| FleetError::Internal(format!("no randomness for {name}: {e}")))?;
    drop(store.submit(vec![persist::Change::PutSecret {
        name: name.to_owned(),
        value: key.to_vec(),
    }]));
    Ok(key)
}

impl Fleet {
    /// An empty fleet that keeps nothing beyond memory.
    pub fn new(config: FleetConfig) -> Result<Self, FleetError> {
        Fleet::restore(
            config,
            Arc::new(persist::MemoryStore),
            persist::Snapshot::default(),
        )
    }

    /// A fleet serving what `snapshot` holds, writing every change through
    /// to `store`.
    pub fn restore(
        config: FleetConfig,
        store: Arc<dyn persist::Store>,
        snapshot: persist::Snapshot,
    ) -> Result<Self, FleetError> {
        let tokens = PageTokens::with_key(
            stored_key(&snapshot, PAGE_TOKEN_KEY, &*store)?,
            config.page_token_ttl,
        );
        let connection_tokens = sessions::ConnectionTokens::with_key(stored_key(
            &snapshot,
            CONNECTION_TOKEN_KEY,
            &*store,
        )?);
        let (events, _) = tokio::sync::broadcast::channel(config.event_buffer.max(1));
        let mut state = State::from_snapshot(snapshot, &config)?;
        state.tracks_changes = store.keeps_changes();
        Ok(Fleet {
            state: Arc::new(RwLock::new(state)),
            config: Arc::new(config),
            tokens,
            connection_tokens,
            events,
            store,
            longest_write_ns: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The longest the fleet's write lock was held since the last call
    /// (or since the fleet was built), and starts measuring afresh. Wall
    /// time, not tokio's clock: a paused test clock does not stop the CPU.
    pub fn take_longest_write_hold(&self) -> Duration {
        Duration::from_nanos(self.longest_write_ns.swap(0, Ordering::Relaxed))
    }

    /// Takes the write lock, timed (see [`WriteGuard`]), and nothing else.
    fn lock_write(&self) -> WriteGuard<'_> {
        let guard = self.state.write();
        WriteGuard {
            guard,
            since: std::time::Instant::now(),
            longest: &self.longest_write_ns,
        }
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

    /// Takes the write lock, first doing whatever is due (forgetting
    /// silent servers, session deadlines), so no operation ever sees a
    /// state that should already have moved on.
    fn write(&self, now: Instant) -> WriteGuard<'_> {
        let mut state = self.lock_write();
        if state.maintenance_due(now) {
            state.maintain(now, &self.ctx());
            // Nobody waits for housekeeping to be durable, but it goes to
            // the store in order, before what the caller changes next.
            drop(self.commit(&mut state));
        }
        state
    }

    /// Submits what changed under the lock `state` comes from. Call it
    /// before the lock is released, so the store sees changes in order.
    fn commit(&self, state: &mut State) -> persist::Durable {
        if !self.store.keeps_changes() {
            state.forget_changes();
            return persist::Durable::done();
        }
        let changes = state.take_changes();
        if changes.is_empty() {
            persist::Durable::done()
        } else {
            self.store.submit(changes)
        }
    }

    /// Takes the read lock, doing what is due first.
    fn read(&self, now: Instant) -> parking_lot::RwLockReadGuard<'_, State> {
        let state = self.state.read();
        if !state.maintenance_due(now) {
            return state;
        }
        drop(state);
        drop(self.write(now));
        self.state.read()
    }

    /// Does what is due now: forgets every open server whose agent has been
    /// silent past the removal timeout (returning their ids) and processes
    /// session deadlines. The server runs it periodically.
    pub fn sweep(&self) -> Vec<ServerId> {
        let now = Instant::now();
        let mut state = self.lock_write();
        let removed = state.maintain(now, &self.ctx());
        drop(self.commit(&mut state));
        removed
    }

    /// Closes servers on behalf of `actor`. See `servers.proto` for the
    /// semantics; the result has one entry per item, in order.
    pub async fn close_servers(
        &self,
        items: &[CloseItem],
        actor: &str,
    ) -> Result<Vec<ItemResult>, FleetError> {
        let (results, durable) = self.close_servers_locked(items, actor)?;
        durable.wait().await?;
        Ok(results)
    }

    fn close_servers_locked(
        &self,
        items: &[CloseItem],
        actor: &str,
    ) -> Result<(Vec<ItemResult>, persist::Durable), FleetError> {
        validate_batch_size("Servers", items.len())?;
        let mut pre = precheck(items.iter().map(|i| i.server_id.as_str()));
        for (item, slot) in items.iter().zip(pre.iter_mut()) {
            if slot.is_none()
                && let Err(why) = validate_reason(&item.reason)
            {
                *slot = Some(ItemFailure::new(FailureCode::InvalidReason, why));
            }
        }
        let wall = persist::wall_clock();
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let mut results = Vec::with_capacity(items.len());
        let actor: Arc<str> = Arc::from(actor);
        for (item, pre) in items.iter().zip(pre) {
            if let Some(failure) = pre {
                results.push(Err(failure));
                continue;
            }
            let Some(server) = state.servers.get_mut(item.server_id.as_str()) else {
                results.push(Err(ItemFailure::not_found()));
                continue;
            };
            if server.is_closed() {
                results.push(Ok(()));
                continue;
            }
            // Placements in flight count: a close never races a placement.
            let running = server.live_sessions().count();
            if running > 0 && !item.force {
                results.push(Err(ItemFailure::new(
                    FailureCode::HasRunningSessions,
                    format!(
                        "Dcv server has {running} running session(s); set Force to close it anyway (the sessions keep running)."
                    ),
                )));
                continue;
            }
            server.holds.push(Hold {
                kind: HoldKind::Closed,
                actor: actor.clone(),
                since: wall,
                reason: item.reason.clone(),
            });
            let id = server.id.clone();
            state.server_state_changed(&id);
            state.emit_close(&id, item.force, &ctx);
            results.push(Ok(()));
        }
        let durable = self.commit(&mut state);
        Ok((results, durable))
    }

    /// Opens servers. See `servers.proto`; one result per item, in order.
    pub async fn open_servers(&self, server_ids: &[String]) -> Result<Vec<ItemResult>, FleetError> {
        let (results, durable) = self.open_servers_locked(server_ids)?;
        durable.wait().await?;
        Ok(results)
    }

    fn open_servers_locked(
        &self,
        server_ids: &[String],
    ) -> Result<(Vec<ItemResult>, persist::Durable), FleetError> {
        validate_batch_size("Servers", server_ids.len())?;
        let pre = precheck(server_ids.iter().map(String::as_str));
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let remove_after = self.config.remove_after;
        let mut results = Vec::with_capacity(server_ids.len());
        let mut opened = Vec::new();
        for (id, pre) in server_ids.iter().zip(pre) {
            if let Some(failure) = pre {
                results.push(Err(failure));
                continue;
            }
            let Some(server) = state.servers.get_mut(id.as_str()) else {
                results.push(Err(ItemFailure::not_found()));
                continue;
            };
            if !server.is_closed() {
                results.push(Ok(()));
                continue;
            }
            server.holds.retain(|h| h.kind != HoldKind::Closed);
            let deadline = server.last_seen + remove_after;
            let id = server.id.clone();
            state.server_state_changed(&id);
            state.note_removable(deadline);
            state.emit_open(&id, &ctx);
            opened.push(id);
            results.push(Ok(()));
        }
        let durable = self.commit(&mut state);
        drop(state);
        // Queued sessions may fit now. Each server checks the queue in a
        // write section of its own: one check is bounded, a batch of them
        // under one hold would not be.
        for id in opened {
            let now = Instant::now();
            let mut state = self.write(now);
            state.after_server_change(&id, now, &ctx);
            // As for heartbeats: placements are not acknowledged here.
            drop(self.commit(&mut state));
        }
        Ok((results, durable))
    }

    /// Runs a DescribeServers query, handing each server of the page to
    /// `visit` (under the read lock: `visit` must be quick and must not
    /// call back into the fleet). Returns the next page's token, if any.
    pub fn describe_servers(
        &self,
        query: &DescribeQuery,
        visit: impl FnMut(ServerView<'_>),
    ) -> Result<Option<String>, FleetError> {
        let valid: ValidQuery = query::validate(query).map_err(FleetError::InvalidArgument)?;
        let wall = SystemTime::now();
        // Hashed only when a token is checked or issued: most queries (one
        // page, or a few ids) need neither.
        let fingerprint =
            || query::query_fingerprint("servers", valid.ids.as_deref(), &query.filters);
        let after = self.resume_after(&query.next_token, fingerprint, wall)?;
        let now = Instant::now();
        let state = self.read(now);
        let candidates = query::walk(
            &state.order,
            &state.servers,
            valid.ids.as_deref(),
            after.as_deref(),
        );
        let unreachable_after = self.config.unreachable_after;
        let matching = candidates.filter_map(|record| {
            let reasons = availability::reasons(record, now, unreachable_after);
            valid
                .filters
                .matches(record, reasons)
                .then_some(ServerView { record, reasons })
        });
        let last = query::paginate(matching, valid.page_size, |v| v.record.id.clone(), visit);
        Ok(last.map(|id| self.tokens.issue(&fingerprint(), &id, wall)))
    }

    /// Where a page starts: after the id in `token`, if the token is
    /// genuine, fresh and issued for this query.
    fn resume_after(
        &self,
        token: &str,
        fingerprint: impl FnOnce() -> page_token::Fingerprint,
        wall: SystemTime,
    ) -> Result<Option<String>, FleetError> {
        if token.is_empty() {
            return Ok(None);
        }
        self.tokens
            .check(token, &fingerprint(), wall)
            .map(Some)
            .map_err(|e| FleetError::invalid("NextToken", e.to_string()))
    }

    /// Registers a server, or refreshes a known one's description. A
    /// known server keeps its holds and last reported sessions. Returns
    /// whether the server was new.
    pub async fn register(
        &self,
        id: &str,
        description: ServerDescription,
    ) -> Result<bool, FleetError> {
        let (new, durable) = self.register_nowait(id, description)?;
        durable.wait().await?;
        Ok(new)
    }

    /// [`Fleet::register`] without waiting for the store (the simulated
    /// fleet registers thousands of servers at start-up).
    pub fn register_nowait(
        &self,
        id: &str,
        mut description: ServerDescription,
    ) -> Result<(bool, persist::Durable), FleetError> {
        let mut violations = Vec::new();
        if let Err(why) = validate_server_id(id) {
            violations.push(FieldViolation::new("ServerId", why));
        }
        validate_description(&description, &mut violations);
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        let now = Instant::now();
        let wall = persist::wall_clock();
        let ctx = self.ctx();
        let mut state = self.write(now);
        state.texts.description(&mut description);
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
                state.insert_server(
                    id.clone(),
                    Box::new(ServerRecord {
                        id,
                        description,
                        dcv_server_healthy: true,
                        logged_in_users: Vec::new(),
                        sessions: Vec::new(),
                        placing: Vec::new(),
                        holds: Vec::new(),
                        registered_at: wall,
                        last_seen: now,
                        last_seen_wall: wall,
                        agent_departed: false,
                    }),
                );
                true
            }
        };
        state.note_removable(now + self.config.remove_after);
        if let Some(id) = state.servers.get(id).map(|s| s.id.clone()) {
            state.server_changed(&id);
            state.after_server_change(&id, now, &ctx);
        }
        let durable = self.commit(&mut state);
        Ok((new, durable))
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
        let mut state = self.write(now);
        if !state.apply_heartbeat(id, report, now, &self.ctx()) {
            return Err(FleetError::ServerNotFound(
                id.to_string(),
                AgentStep::Heartbeat,
            ));
        }
        // Heartbeats are not acknowledged as durable: the next one repeats
        // what the agent knows.
        drop(self.commit(&mut state));
        Ok(())
    }

    /// Applies many heartbeats under one lock hold (the simulated fleet
    /// uses it). Unknown ids are skipped and returned.
    pub fn heartbeat_many(
        &self,
        reports: impl IntoIterator<Item = (ServerId, Heartbeat)>,
    ) -> Vec<ServerId> {
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let mut unknown = Vec::new();
        for (id, report) in reports {
            if !state.apply_heartbeat(&id, report, now, &ctx) {
                unknown.push(id);
            }
        }
        drop(self.commit(&mut state));
        unknown
    }

    /// An agent leaves. An open server is forgotten at once (returns
    /// true); a closed one stays, unreachable, so the operator's close is
    /// not lost (returns false).
    pub async fn deregister(&self, id: &str) -> Result<bool, FleetError> {
        let (removed, durable) = self.deregister_nowait(id)?;
        durable.wait().await?;
        Ok(removed)
    }

    fn deregister_nowait(&self, id: &str) -> Result<(bool, persist::Durable), FleetError> {
        validate_server_id(id).map_err(|why| FleetError::invalid("ServerId", why))?;
        let now = Instant::now();
        let mut state = self.write(now);
        let server = state
            .servers
            .get_mut(id)
            .ok_or_else(|| FleetError::ServerNotFound(id.to_string(), AgentStep::Deregister))?;
        if server.is_closed() {
            server.agent_departed = true;
            let sid = server.id.clone();
            state.server_state_changed(&sid);
            let durable = self.commit(&mut state);
            return Ok((false, durable));
        }
        state.remove_server(id, now, &self.ctx());
        let durable = self.commit(&mut state);
        Ok((true, durable))
    }
}

fn log_removed(removed: &[ServerId]) {
    for id in removed {
        tracing::info!(server_id = %id, "server forgotten after heartbeat loss");
    }
}

impl State {
    /// Records a heartbeat for `id`; false if the server is unknown.
    fn apply_heartbeat(
        &mut self,
        id: &str,
        report: Heartbeat,
        now: Instant,
        ctx: &sessions::Ctx<'_>,
    ) -> bool {
        let Some(server) = self.servers.get_mut(id) else {
            return false;
        };
        server.dcv_server_healthy = report.dcv_server_healthy;
        server.logged_in_users = report.logged_in_users;
        let old = self.by_load.update(server, |server| {
            std::mem::replace(&mut server.sessions, report.sessions)
        });
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
        server.last_seen = now;
        server.last_seen_wall = persist::wall_clock();
        let returned = std::mem::replace(&mut server.agent_departed, false);
        let id = server.id.clone();
        if returned {
            self.server_state_changed(&id);
        }
        self.reconcile_report(&id, &old, now, ctx);
        true
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
