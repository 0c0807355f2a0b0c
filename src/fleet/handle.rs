//! The handle to the fleet: one cloneable value sharing the locked state,
//! the token keys, the event channel and the store.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::RwLock;
use tokio::time::Instant;

use super::{
    client_tokens::{Claim, ClientTokens, TokenKey, TokenTicket},
    config::FleetConfig,
    connection_token::ConnectionTokens,
    error::FleetError,
    model::PendingShots,
    model::ServerId,
    page_token::PageTokens,
    persist,
    sessions::{MAX_SECTION_EVALUATION_COST, SequencedEvent},
    state::{Ctx, State, WriteGuard},
};

/// The handle to the fleet. Cheap to clone; all clones share one state.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub(in crate::fleet) state: Arc<RwLock<State>>,
    pub(in crate::fleet) config: Arc<FleetConfig>,
    pub(in crate::fleet) tokens: PageTokens,
    pub(in crate::fleet) connection_tokens: ConnectionTokens,
    pub(in crate::fleet) events: tokio::sync::broadcast::Sender<SequencedEvent>,
    pub(in crate::fleet) store: Arc<dyn persist::Store>,
    /// The longest write-lock hold so far, in nanoseconds (see
    /// [`Fleet::take_longest_write_hold`]).
    pub(in crate::fleet) longest_write_ns: Arc<AtomicU64>,
    /// Screenshots waiting for agents. Beside the state, not in it: an
    /// agent's answer then never waits for the fleet's lock, and the
    /// lock is never taken while this one is held.
    pub(in crate::fleet) screenshots: PendingShots,
    /// False on a replica that follows another's writes (see
    /// [`Fleet::set_writable`]).
    pub(in crate::fleet) writable: Arc<AtomicBool>,
    /// The `ClientToken` records (idempotent retries), beside the state
    /// with a lock of their own.
    pub(in crate::fleet) client_tokens: ClientTokens,
    /// The watchers' log of server changes.
    pub(in crate::fleet) watch: Arc<super::watch::WatchShared<super::watch::ServersWatched>>,
    /// Session watchers' log.
    pub(in crate::fleet) session_watch:
        Arc<super::watch::WatchShared<super::watch_sessions::SessionsWatched>>,
}

/// The stored secret keying page tokens.
pub(in crate::fleet) const PAGE_TOKEN_KEY: &str = "page-token-key/hmac-sha256";

/// The stored secret keying connection tokens.
pub(in crate::fleet) const CONNECTION_TOKEN_KEY: &str = "connection-token-key/hmac-sha256";

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
        mut snapshot: persist::Snapshot,
    ) -> Result<Self, FleetError> {
        let client_tokens = ClientTokens::load(
            &std::mem::take(&mut snapshot.client_tokens),
            config.client_token_retention,
            Instant::now(),
            persist::wall_clock(),
        );
        let tokens = PageTokens::with_key(
            stored_key(&snapshot, PAGE_TOKEN_KEY, &*store)?,
            config.page_token_ttl,
        );
        let connection_tokens =
            ConnectionTokens::with_key(stored_key(&snapshot, CONNECTION_TOKEN_KEY, &*store)?);
        let (events, _) = tokio::sync::broadcast::channel(config.event_buffer.max(1));
        let config_watch_buffer = config.watch_buffer;
        let mut state = State::from_snapshot(snapshot, &config)?;
        state.tracks_changes = store.keeps_changes();
        state.tracks_liveness = state.tracks_changes && store.keeps_liveness();
        state.tracks_audit = state.tracks_changes && store.keeps_audit();
        Ok(Fleet {
            state: Arc::new(RwLock::new(state)),
            config: Arc::new(config),
            tokens,
            connection_tokens,
            events,
            store,
            longest_write_ns: Arc::new(AtomicU64::new(0)),
            screenshots: PendingShots::default(),
            writable: Arc::new(AtomicBool::new(true)),
            client_tokens,
            watch: super::watch::WatchShared::new(config_watch_buffer),
            session_watch: super::watch::WatchShared::new(config_watch_buffer),
        })
    }

    /// The longest the fleet's write lock was held since the last call
    /// (or since the fleet was built), and starts measuring afresh. Wall
    /// time, not tokio's clock: a paused test clock does not stop the CPU.
    pub fn take_longest_write_hold(&self) -> Duration {
        Duration::from_nanos(self.longest_write_ns.swap(0, Ordering::Relaxed))
    }

    /// Takes the write lock, timed (see [`WriteGuard`]), and nothing else.
    pub(in crate::fleet) fn lock_write(&self) -> WriteGuard<'_> {
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
    pub(in crate::fleet) fn write(&self, now: Instant) -> WriteGuard<'_> {
        let mut state = self.lock_write();
        if self.is_writable() && state.maintenance_due(now) {
            state.maintain(now, &self.ctx());
            // Nobody waits for housekeeping to be durable, but it goes to
            // the store in order, before what the caller changes next.
            drop(self.commit(&mut state));
        }
        state
    }

    /// Submits what changed under the lock `state` comes from. Call it
    /// before the lock is released, so the store sees changes in order.
    pub(in crate::fleet) fn commit(&self, state: &mut State) -> persist::Durable {
        if state.watch.recording {
            self.publish_watched(state, Instant::now());
        }
        if !self.store.keeps_changes() {
            state.forget_changes();
            return persist::Durable::done();
        }
        if !self.is_writable() {
            // A follower's writes are the leader's to make (the API
            // forwards them); one made here anyway is not kept, and whoever
            // waits for it is told so rather than told it is durable.
            let changed = !state.dirty_servers.is_empty()
                || !state.dirty_server_state.is_empty()
                || !state.sessions.dirty.is_empty();
            state.forget_changes();
            return if changed {
                persist::Durable::failed("this broker is not the leader")
            } else {
                persist::Durable::done()
            };
        }
        let changes = state.take_changes();
        if changes.is_empty() {
            persist::Durable::done()
        } else {
            self.store.submit(changes)
        }
    }

    /// Publishes, for watchers, what the write section changed: servers,
    /// then the sessions whose records or servers changed.
    pub(in crate::fleet) fn publish_watched(&self, state: &mut State, now: Instant) {
        let after = self.config.unreachable_after;
        let touched = state.watch.publish(&state.servers, &self.watch, now, after);
        state.session_watch.publish(
            &state.sessions.records,
            &state.sessions.dirty,
            &state.servers,
            &state.watch.last,
            &touched,
            &self.session_watch,
        );
    }

    /// Whether audit records are wanted (see [`persist::Store::keeps_audit`]):
    /// the adapters build none otherwise.
    pub fn keeps_audit(&self) -> bool {
        self.store.keeps_audit()
    }

    /// Submits an audit record through the store's writer, in the next
    /// group commit. Never takes the fleet's lock: records are
    /// insert-only and order nothing else. A follower writes none (the
    /// leader audits what it was forwarded).
    pub fn record_audit(&self, record: persist::AuditRecord) -> persist::Durable {
        if !self.is_writable() || !self.store.keeps_audit() {
            return persist::Durable::done();
        }
        self.store.submit(vec![persist::Change::PutAudit(record)])
    }

    /// Removes audit records older than `before`, on the replica that
    /// writes (the leader); nothing on a follower.
    pub fn prune_audit(&self, before: std::time::SystemTime) -> persist::Durable {
        if !self.is_writable() || !self.store.keeps_audit() {
            return persist::Durable::done();
        }
        self.store
            .submit(vec![persist::Change::PruneAudit { before }])
    }

    /// Whether this fleet makes changes of its own (see
    /// [`Fleet::set_writable`]).
    pub(in crate::fleet) fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Makes this fleet a leader's (true, the default) or a follower's
    /// (false). A follower's state moves only by
    /// [`Fleet::apply_replicated`] and [`Fleet::reload`]: nothing that
    /// changes state on its own (forgetting silent servers, session
    /// deadlines, queue timeouts, the end of deleted sessions' retention)
    /// runs on reads, writes or [`Fleet::sweep`], since the leader does it
    /// and its changes arrive here; and nothing is submitted to the store.
    pub fn set_writable(&self, writable: bool) {
        self.writable.store(writable, Ordering::Release);
    }

    /// Takes the read lock, doing what is due first.
    pub(in crate::fleet) fn read(&self, now: Instant) -> parking_lot::RwLockReadGuard<'_, State> {
        let state = self.state.read();
        if !self.is_writable() || !state.maintenance_due(now) {
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
        if !self.is_writable() {
            self.note_silences_for_watchers();
            return Vec::new();
        }
        let now = Instant::now();
        let mut state = self.lock_write();
        let removed = state.maintain(now, &self.ctx());
        drop(self.commit(&mut state));
        drop(state);
        self.expire_client_tokens(now);
        removed
    }

    pub(in crate::fleet) fn ctx(&self) -> Ctx<'_> {
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
}

impl Fleet {
    /// Claims `key` for a call whose request hashes to `request_hash`
    /// (see [`client_tokens`](super::client_tokens)): [`Claim::New`] to run
    /// it, or [`Claim::Replay`] of the first reply. Fails with
    /// INVALID_ARGUMENT when the token was used with another request,
    /// ABORTED while a call with it is still running, FAILED_PRECONDITION
    /// when the broker stopped while the first call with it ran, and
    /// RESOURCE_EXHAUSTED when the table is full. A new claim is stored at
    /// once, without its reply, ahead of the call's changes.
    pub fn claim_client_token(
        &self,
        key: TokenKey,
        request_hash: [u8; 32],
    ) -> Result<Claim, FleetError> {
        let claim = self.client_tokens.claim(
            key,
            request_hash,
            self.config.client_token_limit,
            Instant::now(),
            self.config.client_token_retention,
        )?;
        if let Claim::New(ticket) = &claim
            && self.is_writable()
            && self.store.keeps_changes()
            && let Some(claimed) = ClientTokens::claimed(ticket, persist::wall_clock())
        {
            // Not waited for: the call's own changes, submitted after it,
            // are acknowledged only once it is durable too.
            drop(
                self.store
                    .submit(vec![persist::Change::PutClientToken(claimed)]),
            );
        }
        Ok(claim)
    }

    /// Keeps `reply` as the answer to the call `ticket` was claimed for,
    /// in memory at once and in the store, and waits until it is durable.
    /// Call it only once the call's own changes are durable: a retry that
    /// finds the record must find its effects too. A record the store
    /// cannot keep is logged, not returned: the call itself is done, and a
    /// failed store stops the broker anyway.
    pub async fn keep_client_token(&self, ticket: TokenTicket, reply: Vec<u8>) {
        let expires = Instant::now() + self.config.client_token_retention;
        let Some(stored) = ClientTokens::keep(ticket, reply, expires, persist::wall_clock()) else {
            return;
        };
        if !self.is_writable() || !self.store.keeps_changes() {
            return;
        }
        let durable = self
            .store
            .submit(vec![persist::Change::PutClientToken(stored)]);
        if let Err(e) = durable.wait().await {
            tracing::error!(error = %e, "a ClientToken record could not be stored");
        }
    }

    /// Forgets expired `ClientToken` records and, while the store may hold
    /// records past the retention, prunes a batch of them (not waited
    /// for). Part of the sweep, on the replica that writes.
    fn expire_client_tokens(&self, now: Instant) {
        if !self.client_tokens.expire(now) || !self.store.keeps_changes() {
            return;
        }
        let retention = self.config.client_token_retention;
        if let Some(before) = persist::wall_clock().checked_sub(retention) {
            drop(
                self.store
                    .submit(vec![persist::Change::PruneClientTokens { before }]),
            );
        }
    }

    /// How many `ClientToken` records the broker holds (running and kept).
    pub fn client_token_count(&self) -> usize {
        self.client_tokens.len()
    }
}
