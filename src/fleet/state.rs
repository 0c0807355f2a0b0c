//! The fleet's state behind its one lock: servers and their indexes,
//! sessions' share, what changed for the store, and the timed write guard.
//!
//! The lock is a synchronous `parking_lot::RwLock` on purpose: every
//! critical section is short, CPU-only and never spans an `.await`, so an
//! async lock would only add cost.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use tokio::{sync::mpsc, time::Instant};

use super::{
    config::FleetConfig,
    error::FleetError,
    holds, intern, load_index,
    model::{FastSet, ServerId, ServerMap, ServerRecord},
    persist,
    sessions::{
        Instruction, SequencedEvent, SessionId, SessionRecord, queue::Queue, stored_session,
    },
};

#[derive(Debug, Default)]
pub(in crate::fleet) struct State {
    pub(in crate::fleet) servers: ServerMap,
    /// The same ids, ordered, for pagination.
    pub(in crate::fleet) order: BTreeSet<ServerId>,
    /// The same ids by load, for placement.
    pub(in crate::fleet) by_load: load_index::LoadIndex,
    /// No open server can be due for removal before this (a lower bound,
    /// refreshed by each sweep); `None` when no server is removable.
    pub(in crate::fleet) next_removal: Option<Instant>,
    /// No server whose silence is not yet noted can pass the unreachable
    /// timeout before this (a lower bound, refreshed by each walk);
    /// `None` when every server's silence is noted.
    pub(in crate::fleet) next_silence: Option<Instant>,
    /// Sessions, the queue, agents' instruction channels.
    pub(in crate::fleet) sessions: Sessions,
    /// Servers changed since the last submission to the store.
    pub(in crate::fleet) dirty_servers: FastSet<ServerId>,
    /// Servers whose holds or departure alone changed since then.
    pub(in crate::fleet) dirty_server_state: FastSet<ServerId>,
    /// Whether the store keeps changes; when it does not, nothing is
    /// marked dirty (a set insert per item of every batch, for nothing).
    pub(in crate::fleet) tracks_changes: bool,
    /// Servers whose heartbeat-derived state changed since the last
    /// submission; tracked only for a store that passes heartbeats on to
    /// replicas ([`persist::Store::keeps_liveness`]).
    pub(in crate::fleet) dirty_liveness: FastSet<ServerId>,
    /// Whether `dirty_liveness` is tracked.
    pub(in crate::fleet) tracks_liveness: bool,
    /// The shared copies of description texts.
    pub(in crate::fleet) texts: intern::Interner,
    /// Holds that end by themselves, and the clock they end by.
    pub(in crate::fleet) hold_expiries: holds::HoldExpiries,
    /// The greatest server state version given out or seen.
    pub(in crate::fleet) last_state_version: u64,
    /// Whether the store keeps audit records the state makes itself
    /// (expired holds).
    pub(in crate::fleet) tracks_audit: bool,
    /// Audit records for the next submission.
    pub(in crate::fleet) audit: Vec<persist::AuditRecord>,
    /// What watchers need (nothing until the first comes).
    pub(in crate::fleet) watch: super::watch::WatchTracking,
    /// What session watchers need (nothing until the first comes).
    pub(in crate::fleet) session_watch: super::watch_sessions::SessionTracking,
    /// Drains by id, and their deadlines.
    pub(in crate::fleet) drains: super::drain_index::DrainIndex,
}

impl State {
    fn removal_due(&self, now: Instant) -> bool {
        self.next_removal.is_some_and(|at| now > at)
    }

    /// Notes that `id`'s record changed, for the store.
    pub(in crate::fleet) fn server_changed(&mut self, id: &ServerId) {
        self.watch.touch(id);
        if self.tracks_changes {
            self.dirty_servers.insert(id.clone());
        }
    }

    /// Notes that what `id`'s heartbeats say changed (its reported
    /// sessions, health, users, load), for replicas.
    pub(in crate::fleet) fn liveness_changed(&mut self, id: &ServerId) {
        self.watch.touch(id);
        if self.tracks_liveness {
            self.dirty_liveness.insert(id.clone());
        }
    }

    /// Notes that only `id`'s holds or departure changed, for the store.
    pub(in crate::fleet) fn server_state_changed(&mut self, id: &ServerId) {
        self.watch.touch(id);
        if self.tracks_changes {
            self.dirty_server_state.insert(id.clone());
        }
    }

    /// Notes that a server whose silence is not noted may pass the
    /// unreachable timeout at `deadline`.
    pub(in crate::fleet) fn note_silence_watch(&mut self, deadline: Instant) {
        self.next_silence = Some(self.next_silence.map_or(deadline, |d| d.min(deadline)));
    }

    pub(in crate::fleet) fn silence_due(&self, now: Instant) -> bool {
        self.next_silence.is_some_and(|at| now > at)
    }

    /// Notes, for the audit log, every server whose agent has been silent
    /// past the unreachable timeout since the last walk (one
    /// `ServerUnreachable` record, an item per server), so that a
    /// server's history shows when it dropped out, not only when it was
    /// forgotten.
    pub(in crate::fleet) fn note_silences(&mut self, now: Instant, ctx: &Ctx<'_>) {
        let after = ctx.config.unreachable_after;
        let mut silent = Vec::new();
        let mut next = None::<Instant>;
        for server in self.servers.values_mut() {
            if server.silence_noted {
                continue;
            }
            if server.agent_departed || now.saturating_duration_since(server.last_seen) > after {
                server.silence_noted = true;
                self.watch.touch(&server.id);
                // A departure is its own record (DeregisterServer).
                if !server.agent_departed {
                    silent.push(server.id.clone());
                }
            } else {
                let at = server.last_seen + after;
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        self.next_silence = next;
        if !silent.is_empty() {
            tracing::info!(
                servers = silent.len(),
                "agents went silent: servers unreachable"
            );
            self.audit_own_act(persist::wall_clock(), "ServerUnreachable", || {
                let why = format!(
                    "its agent was not heard from for more than {}",
                    humantime::format_duration(after)
                );
                silent
                    .iter()
                    .map(|id| {
                        persist::AuditItem::new(id, persist::AuditItem::OK.to_owned(), why.clone())
                    })
                    .collect()
            });
        }
    }

    /// The agent of `id`, whose silence was noted, was heard from again:
    /// its silence is watched for anew and, when `audit` (the call that
    /// brought it back is not audited itself), the audit log notes that
    /// it is reachable again (`ServerReachable`).
    pub(in crate::fleet) fn silence_ended(
        &mut self,
        id: &ServerId,
        now: Instant,
        ctx: &Ctx<'_>,
        audit: bool,
    ) {
        self.note_silence_watch(now + ctx.config.unreachable_after);
        if audit {
            self.audit_own_act(persist::wall_clock(), "ServerReachable", || {
                vec![persist::AuditItem::new(
                    id,
                    persist::AuditItem::OK.to_owned(),
                    "its agent was heard from again".to_owned(),
                )]
            });
        }
    }

    pub(in crate::fleet) fn note_removable(&mut self, deadline: Instant) {
        self.next_removal = Some(self.next_removal.map_or(deadline, |d| d.min(deadline)));
    }

    /// The state a snapshot describes. Every server gets a fresh heartbeat
    /// window: heartbeat times are not stored, and a broker that was down
    /// cannot tell a silent agent from one it could not hear.
    pub(in crate::fleet) fn from_snapshot(
        snapshot: persist::Snapshot,
        config: &FleetConfig,
    ) -> Result<State, FleetError> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut state = State::default();
        // The broker's clock starts with the state, not at its first use:
        // an expiry is as far ahead as it was when the store was written.
        state.hold_expiries.wall(now);
        for stored in snapshot.servers {
            let id: ServerId = Arc::from(stored.id.as_str());
            state.schedule_hold_expiries(&stored.id, &stored.holds);
            state.drain_holds_replaced(&id, &[], &stored.holds);
            state.last_state_version = state.last_state_version.max(stored.state_version);
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
                    state_version: stored.state_version,
                    registered_at: stored.registered_at,
                    last_seen: now,
                    last_seen_wall: stored.last_seen,
                    agent_departed: stored.agent_departed,
                    silence_noted: false,
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
        // Every server starts a fresh heartbeat window (`last_seen: now`).
        state.next_silence = (!state.servers.is_empty()).then(|| now + config.unreachable_after);
        Ok(state)
    }

    /// Everything changed since the last call, as store changes: the
    /// current record of each changed server and session, or its removal.
    pub(in crate::fleet) fn take_changes(&mut self) -> Vec<persist::Change> {
        use persist::Change;
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut changes = Vec::with_capacity(
            self.dirty_servers.len() + self.sessions.dirty.len() + self.dirty_liveness.len(),
        );
        for id in std::mem::take(&mut self.dirty_server_state) {
            if self.dirty_servers.contains(&id) {
                continue;
            }
            if let Some(server) = self.servers.get(&id) {
                changes.push(Change::PutServerState {
                    id: id.to_string(),
                    holds: server.holds.clone(),
                    state_version: server.state_version,
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
                Some(record) => Change::PutSession(stored_session(record, now, wall)),
                None => Change::DeleteSession(id.to_string()),
            });
        }
        // Last, so that a replica applying them in order finds the
        // sessions they report already in place.
        for id in std::mem::take(&mut self.dirty_liveness) {
            if let Some(server) = self.servers.get(&id) {
                changes.push(Change::PutLiveness(persist::stored_liveness(server)));
            }
        }
        changes.extend(self.audit.drain(..).map(Change::PutAudit));
        changes
    }

    /// Forgets what changed, for a store that keeps nothing.
    pub(in crate::fleet) fn forget_changes(&mut self) {
        self.dirty_server_state.clear();
        self.dirty_servers.clear();
        self.sessions.dirty.clear();
        self.dirty_liveness.clear();
        self.audit.clear();
    }

    /// Records an act of the broker's own (an expired hold, a forgotten
    /// server) for the audit log, as a call is recorded: actor
    /// [`holds::BROKER_ACTOR`], a fresh request id, no peer. `items` is
    /// built only when the store keeps audit records.
    pub(in crate::fleet) fn audit_own_act(
        &mut self,
        at: SystemTime,
        method: &str,
        items: impl FnOnce() -> Vec<persist::AuditItem>,
    ) {
        if !self.tracks_audit {
            return;
        }
        self.audit.push(persist::AuditRecord {
            at,
            actor: holds::BROKER_ACTOR.to_owned(),
            request_id: uuid::Uuid::new_v4().to_string(),
            method: method.to_owned(),
            peer: None,
            items: items(),
        });
    }

    pub(in crate::fleet) fn maintenance_due(&self, now: Instant) -> bool {
        self.removal_due(now)
            || self.session_deadline_due(now)
            || self.hold_expiry_due(now)
            || self.drain_deadline_due(now)
            || ((self.tracks_audit || self.watch.recording) && self.silence_due(now))
    }

    /// Forgets due servers and processes due session deadlines.
    pub(in crate::fleet) fn maintain(&mut self, now: Instant, ctx: &Ctx<'_>) -> Vec<ServerId> {
        let removed = if self.removal_due(now) {
            self.sweep(now, ctx)
        } else {
            Vec::new()
        };
        self.process_session_deadlines(now, ctx);
        if self.hold_expiry_due(now) {
            self.expire_holds(now, ctx);
        }
        if self.drain_deadline_due(now) {
            self.process_drain_deadlines(now);
        }
        if (self.tracks_audit || self.watch.recording) && self.silence_due(now) {
            self.note_silences(now, ctx);
        }
        log_removed(&removed);
        removed
    }

    /// Adds server `id` (the record's own id) to the map and to both
    /// indexes. The only way a server enters the state, so the indexes
    /// hold exactly its servers.
    pub(in crate::fleet) fn insert_server(&mut self, id: ServerId, record: Box<ServerRecord>) {
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
    pub(in crate::fleet) fn take_server(&mut self, id: &str) -> Option<Box<ServerRecord>> {
        let server = self.servers.remove(id)?;
        self.watch.touch(&server.id);
        for hold in &server.holds {
            self.hold_removed(id, hold);
        }
        self.order.remove(id);
        self.by_load
            .remove(load_index::load_of(&server), &server.id);
        Some(server)
    }

    /// Removes a server for good, ending its sessions.
    pub(in crate::fleet) fn remove_server(&mut self, id: &str, now: Instant, ctx: &Ctx<'_>) {
        if let Some(server) = self.take_server(id) {
            self.server_changed(&server.id);
            self.server_removed(&server, now, ctx);
        }
    }

    /// Forgets every open server silent for longer than the removal
    /// timeout.
    pub(in crate::fleet) fn sweep(&mut self, now: Instant, ctx: &Ctx<'_>) -> Vec<ServerId> {
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
        if !due.is_empty() {
            // A server's history shows when and why it left the fleet.
            self.audit_own_act(persist::wall_clock(), "ServerRemoved", || {
                let why = format!(
                    "its agent was not heard from for more than {}",
                    humantime::format_duration(remove_after)
                );
                due.iter()
                    .map(|id| {
                        persist::AuditItem::new(id, persist::AuditItem::OK.to_owned(), why.clone())
                    })
                    .collect()
            });
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

/// Placements and their failures since the broker started. Kept in the
/// state, so they move under the write lock with the placement itself.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlacementCounts {
    /// Sessions handed to a server's agent to create (retries included).
    pub placed: u64,
    /// CreateSessions items refused because no server could take them
    /// and they could not be queued.
    pub no_server: u64,
    /// CreateSessions items refused because the queue was full.
    pub queue_full: u64,
    /// Attempts an agent failed or did not answer in time.
    pub agent_failed: u64,
}

/// Sessions' share of the state behind the fleet's lock.
#[derive(Debug, Default)]
pub(in crate::fleet) struct Sessions {
    pub(in crate::fleet) records: HashMap<SessionId, SessionRecord>,
    /// The same ids, ordered, for pagination.
    pub(in crate::fleet) order: BTreeSet<SessionId>,
    /// Queued sessions, oldest first.
    pub(in crate::fleet) queue: Queue,
    /// Pending deadlines, earliest first.
    pub(in crate::fleet) deadlines: BTreeSet<(Instant, SessionId)>,
    /// Each connected agent's instruction channel.
    pub(in crate::fleet) agents: HashMap<ServerId, mpsc::UnboundedSender<Instruction>>,
    /// The last event's sequence number.
    pub(in crate::fleet) seq: u64,
    /// Sessions changed since the last submission to the store.
    pub(in crate::fleet) dirty: HashSet<SessionId>,
    /// The next queue position (queue order survives restarts).
    pub(in crate::fleet) next_queue_position: u64,
    /// Placements and their failures since start, for metrics.
    pub(in crate::fleet) placements: PlacementCounts,
}

impl Sessions {
    /// A record to change; marks it for the store.
    pub(in crate::fleet) fn record_mut(&mut self, id: &str) -> Option<&mut SessionRecord> {
        let record = self.records.get_mut(id)?;
        self.dirty.insert(record.id.clone());
        Some(record)
    }

    /// Adds a record; marks it for the store.
    pub(in crate::fleet) fn insert_record(&mut self, id: SessionId, record: SessionRecord) {
        self.dirty.insert(id.clone());
        self.order.insert(id.clone());
        self.records.insert(id, record);
    }

    /// Removes a record; marks it for the store.
    pub(in crate::fleet) fn remove_record(&mut self, id: &SessionId) {
        self.dirty.insert(id.clone());
        self.order.remove(id);
        self.records.remove(id);
    }
}

/// What state methods need besides the state: configuration and the event
/// channel.
pub(in crate::fleet) struct Ctx<'a> {
    pub(in crate::fleet) config: &'a FleetConfig,
    /// The event channel, when anyone listens.
    pub(in crate::fleet) events: Option<&'a tokio::sync::broadcast::Sender<SequencedEvent>>,
    /// What is left of the operation's Requirements evaluation under the
    /// lock ([`MAX_SECTION_EVALUATION_COST`](crate::fleet::sessions::MAX_SECTION_EVALUATION_COST) to start with), shared by
    /// every retry it makes ([`State::choose_server`]).
    pub(in crate::fleet) evaluation_budget: std::cell::Cell<u64>,
}

/// The fleet's write guard: the lock's own, plus a stopwatch. Every write
/// section goes through [`Fleet::write`](crate::fleet::Fleet::write) or
/// [`Fleet::sweep`](crate::fleet::Fleet::sweep), so the longest hold is
/// known; tests and the fuzzer hold it to a bound. Two clock reads and an
/// atomic max per section: within the noise of the cheapest RPC.
pub(in crate::fleet) struct WriteGuard<'a> {
    pub(in crate::fleet) guard: parking_lot::RwLockWriteGuard<'a, State>,
    pub(in crate::fleet) since: std::time::Instant,
    pub(in crate::fleet) longest: &'a AtomicU64,
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

fn log_removed(removed: &[ServerId]) {
    for id in removed {
        tracing::info!(server_id = %id, "server forgotten after heartbeat loss");
    }
}
