//! A replica's side of several brokers on one database: a follower's fleet
//! takes the leader's committed changes ([`Fleet::apply_replicated`]), and
//! any replica replaces its whole state when its role changes
//! ([`Fleet::reload`]).
//!
//! A follower decides nothing: it places no session, runs no deadline and
//! forgets no silent server ([`Fleet::set_writable`]); the leader does all
//! of that and its changes arrive here as full records. What the records
//! do not carry is rebuilt from them the way a start from the store
//! rebuilds it (`State::from_snapshot`): each server's placements in
//! flight, the queue in position order, the deadlines. What agents report
//! (their sessions, health, users, load) comes from the leader's
//! `PutLiveness` records. Applying a batch costs what the batch holds,
//! never a walk of the fleet, and happens under one hold of the write lock,
//! so readers see a leader's submission whole or not at all.

use std::{sync::Arc, time::SystemTime};

use tokio::time::Instant;

use super::{
    client_tokens::ClientTokens,
    error::FleetError,
    handle::{CONNECTION_TOKEN_KEY, Fleet, PAGE_TOKEN_KEY},
    model::{DrainSpec, Hold, Placement, ServerId, ServerRecord, SessionState, Substate},
    persist::{self, Change, Snapshot, StoredLiveness, StoredServer, StoredSession},
    sessions::{Order, SessionId, SessionRecord, validate::validate_create},
    state::State,
};

/// The token keys a batch or a snapshot carries, checked.
#[derive(Default)]
struct Keys {
    page: Option<[u8; 32]>,
    connection: Option<[u8; 32]>,
}

impl Keys {
    /// Notes `name` if it is one of the fleet's keys; a key of the wrong
    /// length is refused (the store inserts 32 random bytes).
    fn note(&mut self, name: &str, value: &[u8]) -> Result<(), FleetError> {
        let slot = match name {
            PAGE_TOKEN_KEY => &mut self.page,
            CONNECTION_TOKEN_KEY => &mut self.connection,
            _ => return Ok(()),
        };
        *slot = Some(<[u8; 32]>::try_from(value).map_err(|_| {
            FleetError::Internal(format!("the stored {name} is not 32 bytes long"))
        })?);
        Ok(())
    }
}

/// A stored session's request, validated as at start-up.
fn stored_order(s: &StoredSession) -> Result<Option<Arc<Order>>, FleetError> {
    s.request
        .as_ref()
        .map(|spec| {
            validate_create(spec).map(Arc::new).map_err(|f| {
                FleetError::Internal(format!(
                    "replicated session {} has a request this broker refuses: {}",
                    s.id, f.reason
                ))
            })
        })
        .transpose()
}

impl Fleet {
    /// Replaces servers, sessions, the queue and deadlines with what
    /// `snapshot` holds, built exactly as [`Fleet::restore`] builds them,
    /// keeping agents' instruction channels and pending screenshots (an
    /// agent connected here keeps its stream across a change of role).
    /// Re-keys page and connection tokens from the snapshot's secrets when
    /// it has them. On error nothing changed.
    pub fn reload(&self, snapshot: &Snapshot) -> Result<(), FleetError> {
        let mut keys = Keys::default();
        for (name, value) in &snapshot.secrets {
            keys.note(name, value)?;
        }
        // Built outside the lock: it costs the whole fleet.
        let mut fresh = State::from_snapshot(snapshot.clone(), &self.config)?;
        let tokens = ClientTokens::load(
            &snapshot.client_tokens,
            self.config.client_token_retention,
            Instant::now(),
            persist::wall_clock(),
        );
        let mut state = self.lock_write();
        fresh.tracks_changes = state.tracks_changes;
        fresh.tracks_liveness = state.tracks_liveness;
        fresh.tracks_audit = state.tracks_audit;
        fresh.sessions.agents = std::mem::take(&mut state.sessions.agents);
        // Event numbers stay gap-free and increasing for watchers.
        fresh.sessions.seq = state.sessions.seq;
        // Watchers see the reload as the changes it makes, server by
        // server, against what they were last told.
        if state.watch.recording {
            fresh.watch.recording = true;
            fresh.watch.take_published_from(&mut state.watch);
            let ids: Vec<ServerId> = fresh.servers.keys().cloned().collect();
            for id in ids.iter().chain(fresh.watch.published_ids().iter()) {
                fresh.watch.touch(id);
            }
            fresh
                .session_watch
                .take_published_from(&mut state.session_watch, &fresh.sessions.records);
            self.publish_watched(&mut fresh, Instant::now());
        }
        let old = std::mem::replace(&mut *state, fresh);
        self.rekey(&keys);
        // A new leader answers retries of what its predecessor did.
        self.client_tokens.replace(tokens);
        drop(state);
        // Freed after the lock is released: dropping a fleet's worth of
        // records is not free.
        drop(old);
        Ok(())
    }

    /// Applies a batch of the leader's committed changes (a follower's),
    /// under one hold of the write lock, in time proportional to the
    /// batch: servers first, then sessions, then what heartbeats said, as
    /// the leader's own submissions order them, so a batch whose rows come
    /// in another order lands the same. `PutClient` is the registry's
    /// ([`crate::auth::Auth::apply_replicated`]). Never submits anything
    /// and never sends agents an instruction. On error (a record this
    /// broker cannot load) nothing changed.
    pub fn apply_replicated(&self, changes: &[Change]) -> Result<(), FleetError> {
        // What can fail, and the parsing, before the lock.
        let mut keys = Keys::default();
        let mut orders = Vec::new();
        for change in changes {
            match change {
                Change::PutSession(s) => orders.push(stored_order(s)?),
                Change::PutSecret { name, value } => keys.note(name, value)?,
                _ => {}
            }
        }
        let remove_after = self.config.remove_after;
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut state = self.lock_write();
        let mut settle = Vec::new();
        for change in changes {
            match change {
                Change::PutServer(s) => {
                    state.put_replicated_server(s, now, remove_after);
                    if let Some(id) = state.servers.get(s.id.as_str()).map(|r| r.id.clone()) {
                        state.watch.touch(&id);
                    }
                }
                Change::PutServerState {
                    id,
                    holds,
                    state_version,
                    agent_departed,
                } => {
                    if let Some(server) = state.servers.get_mut(id.as_str()) {
                        let before = drains_of(&server.holds);
                        server.holds.clone_from(holds);
                        server.state_version = *state_version;
                        server.agent_departed = *agent_departed;
                        let id = server.id.clone();
                        state.drain_holds_replaced(&id, &before, holds);
                        state.watch.touch(&id);
                    }
                    state.schedule_hold_expiries(id, holds);
                }
                Change::DeleteServer(id) => {
                    if let Some(server) = state.take_server(id) {
                        // As on the leader: the agent's stream here ends.
                        state.sessions.agents.remove(&server.id);
                    }
                }
                _ => {}
            }
        }
        let mut orders = orders.into_iter();
        for change in changes {
            match change {
                Change::PutSession(s) => {
                    let order = orders.next().flatten();
                    state.put_replicated_session(s, order, now, wall, &mut settle);
                }
                Change::DeleteSession(id) => state.delete_replicated_session(id, &mut settle),
                _ => {}
            }
        }
        for change in changes {
            if let Change::PutLiveness(l) = change {
                state.put_liveness(l, now, remove_after, &mut settle);
                if let Some(id) = state.servers.get(l.id.as_str()).map(|r| r.id.clone()) {
                    state.watch.touch(&id);
                }
            }
        }
        // Only a bound for whoever becomes writable without a reload.
        state.note_silence_watch(now + self.config.unreachable_after);
        for (session, server) in settle {
            state.settle_placement(&session, &server);
            state.watch.touch(&server);
        }
        if state.watch.recording {
            self.publish_watched(&mut state, now);
        }
        self.rekey(&keys);
        Ok(())
    }

    fn rekey(&self, keys: &Keys) {
        if let Some(key) = keys.page {
            self.tokens.set_key(key);
        }
        if let Some(key) = keys.connection {
            self.connection_tokens.set_key(key);
        }
    }
}

impl State {
    /// A leader's server record: a new one as a start would load it, a
    /// known one with its registration and holds replaced and what its
    /// heartbeats said kept (as a re-registration keeps it).
    fn put_replicated_server(
        &mut self,
        s: &StoredServer,
        now: Instant,
        remove_after: std::time::Duration,
    ) {
        self.schedule_hold_expiries(&s.id, &s.holds);
        let mut description = s.description.clone();
        self.texts.description(&mut description);
        // Another registration time: the leader forgot the server and it
        // registered anew (both within one batch, whose rows are the
        // current ones), so nothing its old agent said still holds.
        if self
            .servers
            .get(s.id.as_str())
            .is_some_and(|old| old.registered_at != s.registered_at)
        {
            self.take_server(&s.id);
        }
        let id: ServerId = match self.servers.get(s.id.as_str()) {
            Some(server) => server.id.clone(),
            None => Arc::from(s.id.as_str()),
        };
        let before = self
            .servers
            .get(s.id.as_str())
            .map(|server| drains_of(&server.holds))
            .unwrap_or_default();
        self.drain_holds_replaced(&id, &before, &s.holds);
        match self.servers.get_mut(s.id.as_str()) {
            Some(server) => {
                if s.last_seen < server.last_seen_wall {
                    // A heartbeat newer than the row (a row read again from
                    // the tables, not rewritten by heartbeats) said these.
                    let host = &server.description.host;
                    description.host.cpu_load_average = host.cpu_load_average;
                    description.host.memory = host.memory;
                    description.host.swap = host.swap;
                }
                server.description = description;
                server.holds.clone_from(&s.holds);
                server.state_version = s.state_version;
                server.registered_at = s.registered_at;
                server.agent_departed = s.agent_departed;
                if s.last_seen > server.last_seen_wall {
                    // Heard from again (it re-registered): heard of here now.
                    server.last_seen_wall = s.last_seen;
                    server.last_seen = now;
                }
            }
            None => {
                self.insert_server(
                    id.clone(),
                    Box::new(ServerRecord {
                        id,
                        description,
                        dcv_server_healthy: true,
                        logged_in_users: Vec::new(),
                        sessions: Vec::new(),
                        placing: Vec::new(),
                        holds: s.holds.clone(),
                        state_version: s.state_version,
                        registered_at: s.registered_at,
                        last_seen: now,
                        last_seen_wall: s.last_seen,
                        agent_departed: s.agent_departed,
                        silence_noted: false,
                    }),
                );
            }
        }
        // Only a bound for whoever becomes writable without a reload.
        self.note_removable(now + remove_after);
    }

    /// A leader's session record, replacing the one held: the queue, the
    /// deadlines and the order index follow; its servers' placements are
    /// settled once the batch is in (`settle`). What the agent last said of
    /// it (connections) is kept: records do not carry it.
    fn put_replicated_session(
        &mut self,
        s: &StoredSession,
        order: Option<Arc<Order>>,
        now: Instant,
        wall: SystemTime,
        settle: &mut Vec<(SessionId, ServerId)>,
    ) {
        let old = self.take_replicated_session(&s.id, settle);
        let id: SessionId = old
            .as_ref()
            .map_or_else(|| Arc::from(s.id.as_str()), |o| o.id.clone());
        self.session_watch.touch(&id);
        let server = s
            .server
            .as_deref()
            .and_then(|sid| self.known_server(sid, s.state));
        let deadline = s.deadline.map(|at| persist::monotonic_time(at, now, wall));
        if let Some(at) = deadline {
            self.sessions.deadlines.insert((at, id.clone()));
        }
        if is_queued(server.is_none(), s.state, s.substate)
            && let Some(order) = &order
        {
            let position = s.queue_position.unwrap_or(0);
            self.sessions
                .queue
                .insert(id.clone(), order.clone(), position);
            self.sessions.next_queue_position = self
                .sessions
                .next_queue_position
                .max(position.saturating_add(1));
        }
        if let Some(server) = &server {
            settle.push((id.clone(), server.clone()));
        }
        // Kept unless the leader reset them: a new attempt on a server,
        // back in the queue, or its server gone.
        let (connections, last_disconnection) = old
            .filter(|o| {
                !is_queued(server.is_none(), s.state, s.substate)
                    && s.tried.len() <= o.tried.len()
                    && (o.server.is_none() || server.is_some())
            })
            .map(|o| (o.connections, o.last_disconnection))
            .unwrap_or_default();
        self.sessions.order.insert(id.clone());
        self.sessions.records.insert(
            id.clone(),
            SessionRecord {
                id,
                name: s.name.clone(),
                owner: s.owner.clone(),
                kind: s.kind,
                server,
                state: s.state,
                substate: s.substate,
                state_reason: s.state_reason.clone(),
                created_at: s.created_at,
                order,
                permissions_file: s.permissions_file.clone(),
                tried: s.tried.iter().map(|t| Arc::from(t.as_str())).collect(),
                deadline,
                forgotten: s.forgotten,
                queue_position: s.queue_position,
                deletions: s.deletions,
                connections,
                last_disconnection,
            },
        );
    }

    fn delete_replicated_session(&mut self, id: &str, settle: &mut Vec<(SessionId, ServerId)>) {
        if self.take_replicated_session(id, settle).is_some() {
            self.sessions.order.remove(id);
        }
    }

    /// Takes session `id` out of the records, the deadlines and the queue
    /// (not the order index), noting its server for settling.
    fn take_replicated_session(
        &mut self,
        id: &str,
        settle: &mut Vec<(SessionId, ServerId)>,
    ) -> Option<SessionRecord> {
        let old = self.sessions.records.remove(id)?;
        self.session_watch.touch(&old.id);
        if let Some(at) = old.deadline {
            self.sessions.deadlines.remove(&(at, old.id.clone()));
        }
        if is_queued(old.server.is_none(), old.state, old.substate) {
            self.sessions.queue.remove(&old.id);
        }
        if let Some(server) = &old.server {
            settle.push((old.id.clone(), server.clone()));
        }
        Some(old)
    }

    /// What a server's latest heartbeat said, from the leader: its reported
    /// sessions, health, users and load, and the connections of the
    /// sessions it reports (as the leader's reconciliation sets them).
    fn put_liveness(
        &mut self,
        l: &StoredLiveness,
        now: Instant,
        remove_after: std::time::Duration,
        settle: &mut Vec<(SessionId, ServerId)>,
    ) {
        let report = &l.heartbeat;
        // As the leader's reconciliation: every reported session of this
        // server's takes what the agent says of its connections (even when
        // the server went in the same batch: the leader set them first).
        // Except one the agent reports DELETED that the leader has not
        // taken as deleted: the leader took the report, then gave the
        // session a new attempt, which starts with no client connected.
        for s in &report.sessions {
            if let Some(record) = self.sessions.records.get_mut(s.id.as_str())
                && record.server.as_deref() == Some(l.id.as_str())
                && (s.state != SessionState::Deleted || record.state == SessionState::Deleted)
            {
                record.connections = s.details.connections;
                record.last_disconnection = s.details.last_disconnection;
            }
        }
        let Some(server) = self.servers.get_mut(l.id.as_str()) else {
            return;
        };
        server.dcv_server_healthy = report.dcv_server_healthy;
        server.logged_in_users.clone_from(&report.logged_in_users);
        let old = self.by_load.update(server, |server| {
            std::mem::replace(&mut server.sessions, report.sessions.clone())
        });
        // A registration the leader took after this heartbeat (applied
        // first: servers come before liveness in a batch) brought newer
        // host figures; the sessions, health and users the heartbeat said
        // still stand, as a registration keeps them on the leader.
        if l.last_seen >= server.last_seen_wall {
            report.update_host(&mut server.description.host);
        }
        if l.last_seen > server.last_seen_wall {
            server.last_seen_wall = l.last_seen;
            // The leader heard from the agent when it said so; this
            // replica hears of it now, a log's lag later. Counted from now,
            // so that clocks that disagree between hosts cannot make a
            // live agent look silent here (nor a silent one live for long:
            // the next change of the leader's says so). A record sent
            // again for another reason (a session the agent confirmed
            // gone) says nothing new of the agent's silence.
            server.last_seen = now;
        }
        let id = server.id.clone();
        self.note_removable(now + remove_after);
        // Every session whose occupancy the report may have changed:
        // reported now (no longer a placement) or reported before.
        for s in old.iter().chain(&report.sessions) {
            settle.push((Arc::from(s.id.as_str()), id.clone()));
        }
    }

    /// Makes `server`'s placements hold `session` exactly when the leader's
    /// do: a live session on it that its agent does not report (yet). The
    /// same rule a start from the store follows, with the reported sessions
    /// the leader's heartbeats gave.
    fn settle_placement(&mut self, session: &SessionId, server: &ServerId) {
        let Some(target) = self.servers.get_mut(server) else {
            return;
        };
        let record = self
            .sessions
            .records
            .get(session)
            .filter(|r| r.state != SessionState::Deleted && r.server.as_ref() == Some(server));
        let reported = target
            .sessions
            .iter()
            .any(|s| *s.id == **session && s.state != SessionState::Deleted);
        let present = target.placing.iter().any(|p| p.session == *session);
        match record.filter(|_| !reported) {
            Some(record) if !present => {
                let placement = Placement {
                    session: record.id.clone(),
                    kind: record.kind,
                    owner: record.owner.clone(),
                };
                self.by_load
                    .update(target, |target| target.placing.push(placement));
            }
            None if present => {
                self.by_load.update(target, |target| {
                    target.placing.retain(|p| p.session != *session)
                });
            }
            _ => {}
        }
    }
}

/// Whether a session in this state is in the queue (as a start from the
/// store decides it).
fn is_queued(serverless: bool, state: SessionState, substate: Option<Substate>) -> bool {
    serverless && state == SessionState::Creating && substate == Some(Substate::Placing)
}

impl Fleet {
    /// Each server's reported sessions and placements in flight, one line
    /// per server: what DescribeServers counts without showing, for tests
    /// that compare replicas to say where they differ.
    #[doc(hidden)]
    pub fn occupancy_report(&self) -> String {
        let state = self.state.read();
        let mut out = String::new();
        for server in state.order.iter().filter_map(|id| state.servers.get(id)) {
            let reported: Vec<_> = server.sessions.iter().map(|r| (&*r.id, r.state)).collect();
            let placing: Vec<_> = server.placing.iter().map(|p| &*p.session).collect();
            out += &format!(
                "{}: reported {reported:?}, placing {placing:?}\n",
                server.id
            );
        }
        out
    }
}

/// The drains `holds` belong to.
fn drains_of(holds: &[Hold]) -> Vec<Arc<DrainSpec>> {
    holds.iter().filter_map(|h| h.drain.clone()).collect()
}
