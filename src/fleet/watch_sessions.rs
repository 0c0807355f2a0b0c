//! WatchSessions: sessions as a snapshot, then every change to them, on
//! the same log, dispatcher and watchers as WatchServers (`watch.rs`),
//! with a log, epoch and sequence of their own.
//!
//! What a session shows depends on its record and on its server (its
//! address and tags in `Server`; UNKNOWN while the agent is unreachable),
//! so a commit re-judges the sessions whose records changed (the set the
//! store is told about), the sessions replicated to a follower, and the
//! sessions on every server touched: those its agent reports or the broker
//! is placing there, and those last published as on it (an index kept
//! here, so a server that goes takes its sessions' `Server` with it). A session's
//! published state shares its server's published state (`Arc`), so
//! recording sessions turns on recording servers.
//!
//! What counts as a change: what DescribeSessions shows of it: its state
//! (as shown), substate and reason, server, name, owner, connections and
//! last disconnection, and its server's address, endpoints and tags.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use tokio::time::Instant;

use super::{
    FieldViolation, Fleet, FleetError, ServerId,
    availability::Reason,
    model::{FastMap, FastSet, ServerMap},
    query::{self, FilterGroups, SessionPredicate},
    sessions::{SessionId, SessionRecord, SessionView},
    watch::{self, Published, ServerSnapshot, WatchShared, WatchStart, Watched, Watcher},
};

/// A session's state as a change left it.
#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    /// Its record, copied.
    pub record: SessionRecord,
    /// Its server's published state then, when it had one the broker knew.
    pub server: Option<Arc<ServerSnapshot>>,
}

impl SessionSnapshot {
    /// As DescribeSessions shows a session.
    pub fn view(&self) -> SessionView<'_> {
        SessionView {
            record: &self.record,
            server: self.server.as_ref().map(|s| &s.record),
            unreachable: self
                .server
                .as_ref()
                .is_some_and(|s| s.reasons.contains(Reason::UnreachableAgent)),
        }
    }
}

/// Sessions, as WatchSessions follows them.
#[derive(Debug, Clone, Copy)]
pub struct SessionsWatched;

impl Watched for SessionsWatched {
    type Snapshot = SessionSnapshot;
    type Filters = FilterGroups<SessionPredicate>;
    fn matches(filters: &Self::Filters, s: &SessionSnapshot) -> bool {
        let view = s.view();
        filters.matches(|p| query::session_matches(p, &view))
    }
}

/// A session watcher.
pub type SessionWatcher = Watcher<SessionsWatched>;

/// What the fleet's state keeps for session watchers (empty until the
/// first).
#[derive(Debug, Default)]
pub(in crate::fleet) struct SessionTracking {
    /// Whether changes are recorded at all.
    pub(in crate::fleet) recording: bool,
    /// Sessions touched since the last publication beyond the store's
    /// dirty set (a follower's replicated ones).
    touched: Vec<SessionId>,
    /// The last published state of every session.
    last: FastMap<SessionId, Arc<SessionSnapshot>>,
    /// The sessions published as on each server: a server that changes
    /// (or goes) re-judges them, whether or not its agent reports them.
    by_server: FastMap<ServerId, FastSet<SessionId>>,
}

/// Whether a watcher would see a difference between a session's published
/// state `a` and its record `b` on server state `server`.
fn differs(a: &SessionSnapshot, b: &SessionRecord, server: Option<&Arc<ServerSnapshot>>) -> bool {
    let r = &a.record;
    let unreachable = |s: Option<&Arc<ServerSnapshot>>| {
        s.is_some_and(|s| s.reasons.contains(Reason::UnreachableAgent))
    };
    let server_facts_differ = match (a.server.as_ref(), server) {
        (None, None) => false,
        (Some(x), Some(y)) if Arc::ptr_eq(x, y) => false,
        (Some(x), Some(y)) => {
            let (dx, dy) = (&x.record.description, &y.record.description);
            x.record.id != y.record.id
                || dx.ip != dy.ip
                || dx.hostname != dy.hostname
                || dx.endpoints != dy.endpoints
                || dx.tags != dy.tags
        }
        _ => true,
    };
    r.state != b.state
        || r.substate != b.substate
        || r.state_reason != b.state_reason
        || r.server != b.server
        || r.name != b.name
        || r.owner != b.owner
        || r.connections != b.connections
        || r.last_disconnection != b.last_disconnection
        || r.created_at != b.created_at
        || unreachable(a.server.as_ref()) != unreachable(server)
        || server_facts_differ
}

impl SessionTracking {
    /// Notes that session `id` may have changed.
    pub(in crate::fleet) fn touch(&mut self, id: &SessionId) {
        if self.recording {
            self.touched.push(id.clone());
        }
    }

    /// Takes over `old`'s published states (a reload replaces the state);
    /// every session, old and new, is judged at the next publication.
    pub(in crate::fleet) fn take_published_from(
        &mut self,
        old: &mut SessionTracking,
        records: &HashMap<SessionId, SessionRecord>,
    ) {
        self.recording = old.recording;
        self.last = std::mem::take(&mut old.last);
        self.by_server = std::mem::take(&mut old.by_server);
        self.touched = self.last.keys().cloned().collect();
        self.touched.extend(records.keys().cloned());
    }

    /// Publishes the changes of the sessions touched: those in the store's
    /// `dirty` set, those noted here, and those on `servers_touched`.
    /// Called under the write lock, after the servers' publication (whose
    /// states `published` holds), before the dirty set is cleared.
    pub(in crate::fleet) fn publish(
        &mut self,
        records: &HashMap<SessionId, SessionRecord>,
        dirty: &HashSet<SessionId>,
        servers: &ServerMap,
        published: &FastMap<ServerId, Arc<ServerSnapshot>>,
        servers_touched: &[ServerId],
        shared: &WatchShared<SessionsWatched>,
    ) {
        if !self.recording {
            return;
        }
        let mut candidates: Vec<SessionId> = std::mem::take(&mut self.touched);
        candidates.extend(dirty.iter().cloned());
        for id in servers_touched {
            if let Some(published) = self.by_server.get(id) {
                candidates.extend(published.iter().cloned());
            }
            let Some(server) = servers.get(id) else {
                continue;
            };
            let on = server
                .sessions
                .iter()
                .map(|s| &*s.id)
                .chain(server.placing.iter().map(|p| &*p.session));
            for session in on {
                if let Some((id, _)) = records.get_key_value(session) {
                    candidates.push(id.clone());
                }
            }
        }
        if candidates.is_empty() {
            return;
        }
        let mut seen = FastSet::default();
        candidates.retain(|id| seen.insert(id.clone()));
        let mut events: Vec<Published<SessionsWatched>> = Vec::new();
        for id in candidates {
            let current = records.get(&id);
            let previous = self.last.get(&id);
            let after = match (current, previous) {
                (None, None) => continue,
                (Some(record), previous) => {
                    let server = record.server.as_ref().and_then(|s| published.get(s));
                    if previous.is_some_and(|p| !differs(p, record, server)) {
                        continue;
                    }
                    Some(Arc::new(SessionSnapshot {
                        record: record.clone(),
                        server: server.cloned(),
                    }))
                }
                (None, Some(_)) => None,
            };
            let before = match &after {
                Some(after) => self.last.insert(id.clone(), after.clone()),
                None => self.last.remove(&id),
            };
            self.index(&id, before.as_deref(), after.as_deref());
            events.push((id, before, after));
        }
        shared.publish_events(events);
    }
}

impl SessionTracking {
    /// Moves `id` in the by-server index from its `before` state's server
    /// to its `after` state's.
    fn index(
        &mut self,
        id: &SessionId,
        before: Option<&SessionSnapshot>,
        after: Option<&SessionSnapshot>,
    ) {
        let server = |s: Option<&SessionSnapshot>| s.and_then(|s| s.record.server.clone());
        let (from, to) = (server(before), server(after));
        if from == to {
            return;
        }
        if let Some(from) = from
            && let Some(set) = self.by_server.get_mut(&from)
        {
            set.remove(id);
            if set.is_empty() {
                self.by_server.remove(&from);
            }
        }
        if let Some(to) = to {
            self.by_server.entry(to).or_default().insert(id.clone());
        }
    }
}

impl Fleet {
    /// Starts watching the sessions `filters` select (DescribeSessions'
    /// keys): from a snapshot, or from the changes after `resume`.
    pub fn watch_sessions(
        &self,
        filters: &[(String, String)],
        resume: Option<(String, u64)>,
    ) -> Result<(SessionWatcher, WatchStart<SessionsWatched>), FleetError> {
        let mut violations: Vec<FieldViolation> = Vec::new();
        let parsed = query::parse_session_filters(filters, &mut violations);
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        self.start_recording_sessions();
        watch::subscribe(&self.session_watch, filters, parsed, resume, || {
            let state = self.read(Instant::now());
            let seq = self.session_watch.last_sequence();
            let sessions = state
                .sessions
                .order
                .iter()
                .filter_map(|id| state.session_watch.last.get(id))
                .cloned()
                .collect::<Vec<_>>();
            (seq, sessions)
        })
    }

    /// Turns recording sessions on (once), servers' first: every session's
    /// state is published as it is, without events.
    fn start_recording_sessions(&self) {
        self.start_recording();
        if self.state.read().session_watch.recording {
            return;
        }
        let mut state = self.write(Instant::now());
        if state.session_watch.recording {
            return;
        }
        let state = &mut *state;
        let published = &state.watch.last;
        let last: FastMap<SessionId, Arc<SessionSnapshot>> = state
            .sessions
            .records
            .iter()
            .map(|(id, record)| {
                let server = record
                    .server
                    .as_ref()
                    .and_then(|s| published.get(s))
                    .cloned();
                (
                    id.clone(),
                    Arc::new(SessionSnapshot {
                        record: record.clone(),
                        server,
                    }),
                )
            })
            .collect();
        let mut by_server: FastMap<ServerId, FastSet<SessionId>> = FastMap::default();
        for (id, snapshot) in &last {
            if let Some(server) = &snapshot.record.server {
                by_server
                    .entry(server.clone())
                    .or_default()
                    .insert(id.clone());
            }
        }
        state.session_watch.last = last;
        state.session_watch.by_server = by_server;
        state.session_watch.recording = true;
        self.session_watch.spawn_dispatcher();
        tracing::info!(
            sessions = state.sessions.records.len(),
            "watchers: recording session changes from now on"
        );
    }
}
