//! DeleteSessions, UpdateSessionPermissions, DescribeSessions and
//! connection data.

use std::{sync::Arc, time::SystemTime};

use tokio::time::Instant;

use super::{
    DeleteItem, Instruction, PermissionsItem, SessionId, SessionQuery, SessionView,
    validate::{check_name, check_permissions, check_session_id, dedupe_ids, invalid, not_found},
};
use crate::fleet::{
    availability,
    blast::{self, AffectedServer, AffectedSession, BlastRadius},
    error::{FieldViolation, FleetError, ItemFailure},
    handle::Fleet,
    model::{FastMap, FastSet, ServerId, ServerRecord, SessionState},
    persist::Durable,
    query::{self, parse_session_filters, session_matches},
    state::State,
    validate::validate_batch_size,
};

/// What a judged DeleteSessions item would do. Judged against the state
/// before the batch: no item's verdict depends on what an earlier item of
/// the same batch did (see [`Fleet::delete_sessions`]), which is what lets
/// a dry run give the real call's results.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DeleteStep {
    /// Deleted already: nothing to do.
    Gone,
    /// Queued, on no server: deleted at once.
    Dequeue,
    /// Forgotten at once (Force); its room on the server is freed.
    Forget(ServerId),
    /// Its server's agent is asked to delete it.
    Ask(ServerId),
}

impl DeleteStep {
    /// The state the item reports.
    fn result(&self) -> SessionState {
        match self {
            DeleteStep::Ask(_) => SessionState::Deleting,
            DeleteStep::Gone | DeleteStep::Dequeue | DeleteStep::Forget(_) => SessionState::Deleted,
        }
    }
}

/// Per-item checks of a DeleteSessions batch that need no state.
fn delete_precheck(items: &[DeleteItem]) -> Result<Vec<Option<ItemFailure>>, FleetError> {
    validate_batch_size("Sessions", items.len())?;
    let mut pre = dedupe_ids(items.iter().map(|i| i.session_id.as_str()));
    for (item, slot) in items.iter().zip(pre.iter_mut()) {
        if slot.is_none()
            && let Err(why) = check_name("Owner", &item.owner)
        {
            *slot = Some(invalid(why));
        }
    }
    Ok(pre)
}

/// Judges one item against `state`.
fn judge_delete(
    state: &State,
    item: &DeleteItem,
    pre: Option<ItemFailure>,
) -> Result<DeleteStep, ItemFailure> {
    if let Some(failure) = pre {
        return Err(failure);
    }
    let record = state
        .sessions
        .records
        .get(item.session_id.as_str())
        .filter(|r| r.owner == item.owner)
        .ok_or_else(not_found)?;
    Ok(match (record.state, &record.server) {
        (SessionState::Deleted, _) => DeleteStep::Gone,
        (_, None) => DeleteStep::Dequeue,
        (_, Some(server)) if item.force => DeleteStep::Forget(server.clone()),
        (_, Some(server)) => DeleteStep::Ask(server.clone()),
    })
}

impl State {
    /// Marks session `id` DELETING and asks its server's agent to delete
    /// it (again, with the same instruction id, if it was asked already).
    pub(in crate::fleet) fn ask_to_delete(&mut self, id: &SessionId, server: ServerId) {
        let mut instruction_id = None;
        if let Some(record) = self.sessions.record_mut(id) {
            if record.state != SessionState::Deleting {
                // A new attempt (a repeat of a pending one keeps its id).
                record.deletions = record.deletions.saturating_add(1);
            }
            record.state = SessionState::Deleting;
            record.substate = None;
            record.state_reason.clear();
            instruction_id = Some(record.delete_id());
        }
        self.set_deadline(id, None);
        if let Some(instruction_id) = instruction_id {
            self.send(Instruction::Delete {
                server,
                session: id.clone(),
                id: instruction_id,
            });
        }
    }
}

impl Fleet {
    /// Deletes sessions; one result per item (the state the session is in
    /// afterwards), in order.
    ///
    /// Every item is judged against the state before the batch: the room a
    /// forced deletion frees goes to the queue only once the whole batch is
    /// applied, so a queued session deleted by a later item of the same
    /// batch is never placed first.
    pub async fn delete_sessions(
        &self,
        items: &[DeleteItem],
    ) -> Result<Vec<Result<SessionState, ItemFailure>>, FleetError> {
        let (results, durable) = self.delete_sessions_locked(items)?;
        durable.wait().await?;
        Ok(results)
    }

    /// Judges a DeleteSessions batch exactly as [`Fleet::delete_sessions`]
    /// would, changes nothing, and says what it would affect: each server
    /// (in order of first appearance) with the sessions that would be
    /// deleted on it, and capacity counted per value of `tag_key` (none
    /// when empty) as if they were gone. A queued session is on no server,
    /// so it appears in its item's result only.
    #[allow(clippy::type_complexity)]
    pub fn delete_sessions_dry_run(
        &self,
        items: &[DeleteItem],
        tag_key: &str,
    ) -> Result<(Vec<Result<SessionState, ItemFailure>>, BlastRadius), FleetError> {
        let pre = delete_precheck(items)?;
        blast::check_tag_key(tag_key)?;
        let now = Instant::now();
        let unreachable_after = self.config.unreachable_after;
        let state = self.read(now);
        let mut radius = BlastRadius::default();
        // Each affected server's index in `radius.servers`.
        let mut index: FastMap<ServerId, usize> = FastMap::default();
        let mut results = Vec::with_capacity(items.len());
        for (item, pre) in items.iter().zip(pre) {
            let judged = judge_delete(&state, item, pre);
            if let Ok(DeleteStep::Forget(server) | DeleteStep::Ask(server)) = &judged
                && let Some(record) = state.sessions.records.get(item.session_id.as_str())
            {
                let at = *index.entry(server.clone()).or_insert_with(|| {
                    radius.servers.push(AffectedServer {
                        server_id: server.to_string(),
                        available_before: false,
                        available_after: false,
                        sessions: Vec::new(),
                    });
                    radius.servers.len() - 1
                });
                if let Some(affected) = radius.servers.get_mut(at) {
                    affected.sessions.push(AffectedSession {
                        id: record.id.to_string(),
                        owner: record.owner.clone(),
                        kind: record.kind,
                    });
                }
            }
            results.push(judged.map(|step| step.result()));
        }
        for affected in &mut radius.servers {
            // A server forgotten since its sessions were placed on it
            // counts as unavailable before and after.
            let Some(server) = state.servers.get(affected.server_id.as_str()) else {
                continue;
            };
            affected.available_before =
                availability::reasons(server, now, unreachable_after).is_available();
            let gone: FastSet<&str> = affected.sessions.iter().map(|s| s.id.as_str()).collect();
            let mut after = ServerRecord::clone(server);
            after.sessions.retain(|s| !gone.contains(&*s.id));
            after.placing.retain(|p| !gone.contains(&*p.session));
            affected.available_after =
                availability::reasons(&after, now, unreachable_after).is_available();
        }
        state.count_capacity(&mut radius, tag_key, now, unreachable_after);
        Ok((results, radius))
    }

    #[allow(clippy::type_complexity)]
    fn delete_sessions_locked(
        &self,
        items: &[DeleteItem],
    ) -> Result<(Vec<Result<SessionState, ItemFailure>>, Durable), FleetError> {
        let pre = delete_precheck(items)?;
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let mut results = Vec::with_capacity(items.len());
        // The servers forced deletions freed room on, in order, once each.
        let mut freed: Vec<ServerId> = Vec::new();
        for (item, pre) in items.iter().zip(pre) {
            let step = match judge_delete(&state, item, pre) {
                Ok(step) => step,
                Err(failure) => {
                    results.push(Err(failure));
                    continue;
                }
            };
            results.push(Ok(step.result()));
            let id: SessionId = Arc::from(item.session_id.as_str());
            match step {
                DeleteStep::Gone => {}
                DeleteStep::Dequeue => {
                    state.mark_deleted(&id, "Deleted while queued.".into(), now, &ctx);
                }
                DeleteStep::Forget(server) => {
                    state.mark_deleted(&id, "Deleted with Force.".into(), now, &ctx);
                    if let Some(record) = state.sessions.record_mut(&id) {
                        record.forgotten = true;
                    }
                    // Forgotten means it no longer occupies its server, from
                    // now on (if the agent still reports it, the next
                    // heartbeat brings it back).
                    state.forget_reported(&server, &id, &ctx);
                    if !freed.contains(&server) {
                        freed.push(server);
                    }
                }
                DeleteStep::Ask(server) => state.ask_to_delete(&id, server),
            }
        }
        // The freed room goes to the queue, oldest first, before any newer
        // request can take it.
        for server in freed {
            state.drain_queue_onto(&server, now, &ctx);
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
        validate_batch_size("Sessions", items.len())?;
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
                    id: super::fresh_instruction_id(),
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

    /// Checks a connection token an agent presents for `session` on its
    /// `server` (gRPC `Agent/ValidateConnectionToken`); returns the user it
    /// admits, or why not.
    pub fn validate_connection_token(
        &self,
        server: &str,
        session: &str,
        token: &str,
    ) -> Result<Result<String, String>, FleetError> {
        Ok(self.check_connection_token(Some(server), session, token, SystemTime::now()))
    }

    /// Checks a connection token a DCV server presents for `session` (its
    /// `auth-token-verifier` request, which names no server); returns the
    /// user it admits, or why not.
    ///
    /// Still bound to one server without naming it: a token is bound to
    /// exactly one session (it is signed over the session id), session ids
    /// are unique in the fleet, and a session lives on exactly one server;
    /// a DCV server asks only about the session a client is connecting to
    /// on it. So the token admits its user to that session's server and
    /// no other. (The verifier needs no credentials, as DCV servers have
    /// none; whoever asks learns only what the token says in clear, its
    /// session and user, and whether it is still valid.)
    pub fn verify_connection_token(&self, session: &str, token: &str) -> Result<String, String> {
        self.check_connection_token(None, session, token, SystemTime::now())
    }

    /// The one check behind both forms, at `now`: the token is genuine and
    /// unexpired, it is for `session`, and `session` is READY (on `server`
    /// when one is named). The token is checked before the lock is taken:
    /// the lock is held for one lookup, whatever the caller sent.
    fn check_connection_token(
        &self,
        server: Option<&str>,
        session: &str,
        token: &str,
        now: SystemTime,
    ) -> Result<String, String> {
        let (token_session, user) = self.connection_tokens.check(token, now)?;
        if token_session != session {
            return Err("the token is for another session".into());
        }
        let state = self.read(Instant::now());
        let ready = state
            .sessions
            .records
            .get(token_session.as_str())
            .is_some_and(|r| {
                r.state == SessionState::Ready
                    && server.is_none_or(|server| r.server.as_deref() == Some(server))
            });
        match (ready, server) {
            (true, _) => Ok(user),
            (false, Some(_)) => Err("the session is not READY on this server".into()),
            (false, None) => Err("the session is not READY".into()),
        }
    }

    /// How many requests wait in the queue.
    pub fn queued(&self) -> usize {
        self.state.read().sessions.queue.len()
    }
}
